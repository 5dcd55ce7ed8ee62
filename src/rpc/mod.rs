//! baidu_std RPC over mTLS: a server that dispatches to async handlers, a multiplexed client,
//! and a blocking client for a thread that waits on its calls.

#[cfg(unix)]
pub mod blocking;
mod client;
mod queue;
mod server;

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
pub use tokio_util::sync::CancellationToken;

pub use client::{CallOptions, Client, ClientOptions};
pub use server::{RunningServer, Server, ServerOptions};

use crate::error::codes;
use crate::tls::identity::PeerIdentity;
use crate::wire::{Decoder, Encoded, Frame, RpcMeta, RpcResponseMeta};

/// One call as a handler sees it.
#[derive(Clone, Debug)]
pub struct Request {
    /// The service's full name (an unqualified name from the caller is resolved first).
    pub service: String,
    pub method: String,
    pub payload: Bytes,
    pub attachment: Bytes,
    pub log_id: Option<i64>,
    /// The caller's timeout for this call, as sent.
    pub timeout_ms: Option<i32>,
    /// When the caller will give up: arrival time + timeout_ms.
    pub deadline: Option<Instant>,
    pub request_id: Option<String>,
    pub user_fields: BTreeMap<String, String>,
    /// The request's authentication_data, raw: a trustwire proxy's identity token when one
    /// forwarded the call (verify it with `proxy::token::verify`).
    pub authentication_data: Option<Bytes>,
    /// The verified peer.
    pub peer: Arc<PeerIdentity>,
    /// Cancelled when the caller can no longer receive the answer: its connection closed (the
    /// peer went away, or it lost our trust). A handler doing long work can select on
    /// `cancelled.cancelled()` and stop; one that ignores it is answered into the void.
    pub cancelled: CancellationToken,
}

/// A successful answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Response {
    pub payload: Bytes,
    pub attachment: Bytes,
}

impl Response {
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Response { payload: payload.into(), attachment: Bytes::new() }
    }

    pub fn with_attachment(mut self, attachment: impl Into<Bytes>) -> Self {
        self.attachment = attachment.into();
        self
    }
}

/// An error answer: a brpc-style code and text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub code: i32,
    pub text: String,
}

impl Status {
    pub fn new(code: i32, text: impl Into<String>) -> Self {
        Status { code, text: text.into() }
    }

    pub fn internal(text: impl Into<String>) -> Self {
        Status::new(codes::EINTERNAL, text)
    }
}

/// The future a handler returns.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Response, Status>> + Send + 'static>>;

/// Something that answers calls to one method.
pub trait Handler: Send + Sync + 'static {
    fn call(&self, request: Request) -> HandlerFuture;
}

impl<F, Fut> Handler for F
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Response, Status>> + Send + 'static,
{
    fn call(&self, request: Request) -> HandlerFuture {
        Box::pin(self(request))
    }
}

/// Builds the response meta a stock brpc server writes: response{error_code[, error_text]},
/// compress_type 0, correlation_id, [attachment_size], content_type 0, checksum_type 0 and an
/// empty checksum_value.
pub(crate) fn response_frame(correlation_id: i64, result: Result<Response, (i32, String)>) -> Frame {
    let (code, text, payload, attachment) = match result {
        Ok(r) => (0, None, r.payload, r.attachment),
        Err((code, text)) => (code, Some(text), Bytes::new(), Bytes::new()),
    };
    Frame {
        meta: RpcMeta {
            response: Some(RpcResponseMeta { error_code: Some(code), error_text: text }),
            compress_type: Some(0),
            correlation_id: Some(correlation_id),
            attachment_size: (!attachment.is_empty()).then_some(attachment.len() as i32),
            content_type: Some(0),
            checksum_type: Some(0),
            checksum_value: Some(Bytes::new()),
            ..Default::default()
        },
        payload,
        attachment,
    }
}

/// Turns a panic inside a future into an error value, so one bad handler cannot take a
/// connection (or a binding's caller) down with it.
pub(crate) struct CatchUnwind<F>(pub F);

impl<F: Future + Unpin> Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let fut = &mut self.0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| Pin::new(fut).poll(cx))) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(panic_message(&panic))),
        }
    }
}

pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}

/// Room a read buffer that holds part of a frame is given when it runs low, unless the frame's
/// header asks for more.
const READ_BUFFER: usize = 16 * 1024;
/// Spare room below which a read buffer holding part of a frame is grown before the next read.
const MIN_READ: usize = 4096;

/// Reads what has arrived on `rd` into `buf`, which starts at a frame boundary (`decoder` sizes
/// the room for a frame in progress). Returns the bytes read; 0 is the end of the stream.
///
/// An empty `buf` holds no memory: a connection waiting for its next frame keeps no read
/// buffer, and one that grew for a large frame is let go once that frame has been taken off
/// it. The first bytes after a pause are read onto the stack and copied into a buffer just
/// their size; only a frame that is still incomplete then gets room to grow.
pub(crate) async fn read_frames<R>(rd: &mut R, buf: &mut bytes::BytesMut, decoder: &Decoder) -> std::io::Result<usize>
where
    R: tokio::io::AsyncRead + Unpin,
{
    use std::mem::MaybeUninit;
    use tokio::io::{AsyncReadExt, ReadBuf};
    if !buf.is_empty() {
        if buf.capacity() - buf.len() < MIN_READ {
            buf.reserve(decoder.reserve_hint(buf).max(READ_BUFFER));
        }
        return rd.read_buf(buf).await;
    }
    *buf = bytes::BytesMut::new();
    std::future::poll_fn(|cx| {
        // On the stack for this poll only, so the future waiting on an idle connection holds
        // none of it. poll_read reads nothing when it is pending, so nothing is lost if the
        // caller drops this future (it is one branch of a select).
        let mut scratch = [MaybeUninit::<u8>::uninit(); READ_BUFFER];
        let mut read = ReadBuf::uninit(&mut scratch);
        std::task::ready!(Pin::new(&mut *rd).poll_read(cx, &mut read))?;
        buf.extend_from_slice(read.filled());
        Poll::Ready(Ok(read.filled().len()))
    })
    .await
}

/// Writes queued frames until the queue ends, coalescing what is already queued into one TLS
/// write (up to 256 KiB); a frame alone in the queue, or too large to join the others, is
/// written as it is, its pieces in one vectored write, without a copy (in 256 KiB steps). An
/// item is dropped only once its bytes are written (a server's item carries the call's
/// in-flight permit and its share of the connection's unwritten-bytes budget), and `progress`
/// is called after every write, so a reader can tell a slow peer from one that stopped reading.
///
/// Nothing is allocated while the queue is empty: the buffer coalesced frames are copied into
/// is made for them and freed once they are written, so an idle connection holds none.
pub(crate) async fn write_queued<W, T>(
    wr: &mut W,
    rx: &mut queue::Receiver<T>,
    mut progress: impl FnMut(),
) -> std::io::Result<()>
where
    W: tokio::io::AsyncWrite + Unpin,
    T: AsRef<Encoded>,
{
    use bytes::Buf;
    use tokio::io::AsyncWriteExt;
    const BATCH: usize = 256 * 1024;
    // Taken off the queue but too large to join the frames before it: written next.
    let mut carried: Option<T> = None;
    loop {
        let first = match carried.take() {
            Some(item) => item,
            None => match rx.recv().await {
                Some(item) => item,
                None => break,
            },
        };
        let mut len = first.as_ref().len();
        let mut more: Vec<T> = Vec::new();
        while len < BATCH {
            match rx.try_recv() {
                Some(next) if len + next.as_ref().len() <= BATCH => {
                    len += next.as_ref().len();
                    more.push(next);
                }
                Some(next) => {
                    carried = Some(next);
                    break;
                }
                None => break,
            }
        }
        if more.is_empty() {
            let mut pieces = first.as_ref().as_buf();
            while pieces.has_remaining() {
                wr.write_all_buf(&mut (&mut pieces).take(BATCH)).await?;
                progress();
            }
        } else {
            let mut batch = Vec::with_capacity(len);
            for item in std::iter::once(&first).chain(&more) {
                for p in item.as_ref().pieces() {
                    batch.extend_from_slice(p);
                }
            }
            wr.write_all(&batch).await?;
            progress();
        }
        drop((first, more));
        wr.flush().await?;
    }
    Ok(())
}
