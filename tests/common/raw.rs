//! A TLS server written in the test, for answers no trustwire server would send.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::Pki;

/// A TLS server (the PKI's server identity) that hands each connection to `serve`, and the
/// number of connections it accepted.
pub fn raw_server<F, Fut>(pki: &Pki, serve: F) -> (std::net::SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(trustwire::transport::ServerStream<tokio::net::TcpStream>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let tls = pki.server_profile().server().unwrap();
    let listener = trustwire::runtime::runtime().block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let serve = Arc::new(serve);
    trustwire::runtime::runtime().spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let (tls, serve) = (tls.clone(), serve.clone());
            tokio::spawn(async move {
                if let Ok((stream, _)) = trustwire::transport::accept(&tls, tcp).await {
                    serve(stream).await;
                }
            });
        }
    });
    (addr, accepted)
}

/// Reads one request frame.
pub async fn read_request(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> trustwire::wire::Frame {
    use tokio::io::AsyncReadExt;
    let mut decoder = trustwire::wire::Decoder::new(64 << 20);
    let mut buf = bytes::BytesMut::new();
    loop {
        if let Some(f) = decoder.decode(&mut buf).unwrap() {
            return f;
        }
        assert!(s.read_buf(&mut buf).await.unwrap() > 0, "the client closed before its request");
    }
}

pub fn answer(id: i64, payload: &[u8]) -> Vec<u8> {
    let frame = trustwire::wire::Frame {
        meta: trustwire::wire::RpcMeta {
            correlation_id: Some(id),
            response: Some(trustwire::wire::RpcResponseMeta { error_code: Some(0), ..Default::default() }),
            ..Default::default()
        },
        payload: bytes::Bytes::copy_from_slice(payload),
        attachment: bytes::Bytes::new(),
    };
    frame.to_bytes().unwrap().to_vec()
}
