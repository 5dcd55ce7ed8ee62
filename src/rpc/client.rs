//! The client: multiplexed mTLS connections, unique correlation ids, per-call timeouts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;

use super::queue::{self, Sender};
use super::Response;
use crate::error::{codes, Error};
use crate::telemetry;
use crate::tls::identity::PeerIdentity;
use crate::tls::tracker::TrackGuard;
use crate::tls::ClientTls;
use crate::transport::HandshakeInfo;
use crate::wire::{Decoder, Encoded, Frame, RpcMeta, RpcRequestMeta, DEFAULT_MAX_BODY};

/// Client settings.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub connect_timeout: Duration,
    /// Used when a call gives no timeout. None: wait as long as the connection lives.
    pub default_timeout: Option<Duration>,
    /// Connections to the endpoint; calls are spread over them. One is usually enough.
    pub pool_size: usize,
    pub max_body: usize,
    /// Send a CRC32C checksum with every request.
    pub checksum: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(5),
            default_timeout: Some(Duration::from_secs(30)),
            pool_size: 1,
            max_body: DEFAULT_MAX_BODY,
            checksum: false,
        }
    }
}

/// Per-call settings.
#[derive(Clone, Debug, Default)]
pub struct CallOptions {
    /// Sent to the server as timeout_ms; the call fails with a timeout after it.
    pub timeout: Option<Duration>,
    pub attachment: Bytes,
    pub log_id: Option<i64>,
    pub request_id: Option<String>,
}

type Pending = HashMap<i64, oneshot::Sender<Result<Frame, Error>>>;

/// How long closing a connection waits to send TLS close_notify to a server that is not reading.
const CLOSE_NOTIFY_WAIT: Duration = Duration::from_secs(1);
/// How long a failed write waits for the reader to report why the connection ended.
const WRITE_FAILURE_GRACE: Duration = Duration::from_millis(250);

struct Conn {
    tx: Sender<Encoded>,
    /// None once the connection has failed; calls registered before that get its error.
    pending: Mutex<Option<Pending>>,
    closed: AtomicBool,
    /// Why the connection failed, for calls that arrive after it did.
    failure: std::sync::OnceLock<Error>,
    info: Option<HandshakeInfo>,
    /// Our own identity, to name in errors when the peer refuses it.
    ours: Option<String>,
    /// Tells the reader to close the connection (the client was closed or dropped).
    shutdown: tokio::sync::Notify,
    /// The server ended the connection cleanly (TLS close_notify, then end of stream).
    closed_cleanly: AtomicBool,
    /// Says, without waiting, whether the connection must close (trust or a certificate).
    trust: Option<crate::tls::tracker::CloseSignal>,
}

impl Conn {
    /// The error that closed the connection (e.g. the server refusing our certificate).
    fn failure_or_closed(&self) -> Error {
        self.failure.get().cloned().unwrap_or_else(|| Error::transport("connection closed before the call was sent"))
    }

    /// Whether a new call may be sent here. The reader also learns of a trust change or an
    /// expired certificate, but only when it next runs; a call must not go out before then.
    fn usable(&self) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        match self.trust.as_ref().and_then(|t| t.now()) {
            Some(d) => {
                tracing::info!(verdict = d.verdict.name(), "not reusing a connection to the server: {}", d.message);
                self.closed.store(true, Ordering::Release);
                false
            }
            None => true,
        }
    }

    fn pending_is_empty(&self) -> bool {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).as_ref().is_none_or(|p| p.is_empty())
    }

    fn fail_all(&self, err: Error) {
        let _ = self.failure.set(err.clone());
        self.closed.store(true, Ordering::Release);
        let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner()).take();
        for (_, waiter) in pending.into_iter().flatten() {
            let _ = waiter.send(Err(err.clone()));
        }
    }
}

struct Inner {
    addr: String,
    tls: Option<ClientTls>,
    options: ClientOptions,
    next_id: AtomicI64,
    next_conn: AtomicUsize,
    slots: Vec<tokio::sync::Mutex<Option<Arc<Conn>>>>,
}

impl Inner {
    fn close_all(&self) {
        for slot in &self.slots {
            // A slot being (re)connected is skipped; it is closed when that finishes or when
            // its connection is dropped.
            if let Ok(mut guard) = slot.try_lock() {
                if let Some(conn) = guard.take() {
                    conn.closed.store(true, Ordering::Release);
                    conn.shutdown.notify_one();
                }
            }
        }
    }
}

/// Dropping the last clone of a client closes its connections (the reader task would otherwise
/// keep them open until the server's idle timeout).
impl Drop for Inner {
    fn drop(&mut self) {
        self.close_all();
    }
}

/// A client for one endpoint. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// A client for `addr` (`host:port`). Connects on the first call.
    pub fn new(addr: impl Into<String>, tls: ClientTls, options: ClientOptions) -> Self {
        Self::build(addr.into(), Some(tls), options)
    }

    /// A client WITHOUT TLS. It exists only so benchmarks can measure what TLS costs.
    #[cfg(feature = "insecure-plaintext-bench")]
    pub fn insecure_plaintext_for_benchmarks(addr: impl Into<String>, options: ClientOptions) -> Self {
        Self::build(addr.into(), None, options)
    }

    fn build(addr: String, tls: Option<ClientTls>, options: ClientOptions) -> Self {
        let n = options.pool_size.max(1);
        Client {
            inner: Arc::new(Inner {
                addr,
                tls,
                // brpc's ids are large 64-bit values; starting away from 0 keeps ours distinct
                // from a default-initialised field.
                next_id: AtomicI64::new(1 << 32),
                next_conn: AtomicUsize::new(0),
                slots: (0..n).map(|_| tokio::sync::Mutex::new(None)).collect(),
                options,
            }),
        }
    }

    /// Closes the client's connections now; calls still waiting fail with a transport error.
    /// Later calls open new connections. Dropping the last clone of a client does the same.
    pub fn close(&self) {
        self.inner.close_all();
    }

    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// Makes sure a connection is up and returns what its handshake negotiated.
    pub async fn connect(&self) -> Result<Option<HandshakeInfo>, Error> {
        Ok(self.conn(0).await?.info.clone())
    }

    /// The verified server identity of the first connection, once connected.
    pub async fn server_identity(&self) -> Result<Option<Arc<PeerIdentity>>, Error> {
        Ok(self.connect().await?.map(|i| i.peer))
    }

    /// Calls `service/method` with `payload`.
    pub async fn call(
        &self,
        service: &str,
        method: &str,
        payload: impl Into<Bytes>,
        opts: CallOptions,
    ) -> Result<Response, Error> {
        let result = self.call_once(service, method, payload.into(), opts).await;
        count_call(service, method, &result);
        result
    }

    async fn call_once(
        &self,
        service: &str,
        method: &str,
        payload: Bytes,
        opts: CallOptions,
    ) -> Result<Response, Error> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let timeout = opts.timeout.or(self.inner.options.default_timeout);
        let bytes = request_frame(id, service, method, payload, opts, timeout, self.inner.options.checksum)?;
        let slot = self.inner.next_conn.fetch_add(1, Ordering::Relaxed) % self.inner.slots.len();
        let work = async {
            // A server that closes a connection cleanly (close_notify) has answered everything
            // it read, so a call still unanswered then was never run: it is sent once more on a
            // new connection (as brpc's client retries on a closed connection).
            let mut retried = false;
            loop {
                let conn = self.conn(slot).await?;
                let result = Self::send_on(&conn, id, bytes.clone()).await;
                match result {
                    Err(_) if !retried && conn.closed_cleanly.load(Ordering::Acquire) => retried = true,
                    other => return other,
                }
            }
        };
        let reply = match timeout {
            Some(t) => tokio::time::timeout(t, work)
                .await
                .map_err(|_| no_answer_in_time(t, service, method, &self.inner.addr))??,
            None => work.await?,
        };
        response_of(reply)
    }

    async fn send_on(conn: &Conn, id: i64, bytes: Encoded) -> Result<Frame, Error> {
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = conn.pending.lock().unwrap_or_else(|p| p.into_inner());
            match pending.as_mut() {
                Some(p) => p.insert(id, tx),
                None => return Err(conn.failure_or_closed()),
            };
        }
        if conn.tx.send(bytes).is_err() {
            conn.pending.lock().unwrap_or_else(|p| p.into_inner()).as_mut().map(|p| p.remove(&id));
            return Err(conn.failure_or_closed());
        }
        let guard = PendingGuard { conn, id };
        let res = rx.await.unwrap_or_else(|_| Err(Error::transport("connection dropped")));
        std::mem::forget(guard);
        res
    }

    async fn conn(&self, slot: usize) -> Result<Arc<Conn>, Error> {
        let mut guard = self.inner.slots[slot].lock().await;
        if let Some(c) = guard.as_ref() {
            if c.usable() {
                return Ok(c.clone());
            }
        }
        let conn = self.open().await?;
        *guard = Some(conn.clone());
        Ok(conn)
    }

    async fn open(&self) -> Result<Arc<Conn>, Error> {
        let inner = &self.inner;
        match &inner.tls {
            Some(tls) => {
                let (stream, info) = crate::transport::connect(tls, &inner.addr, inner.options.connect_timeout).await?;
                let guard = crate::transport::track_client(tls, &inner.addr, &info)?;
                let ours = tls.current.load().our_identity.clone();
                Ok(spawn_conn(stream, Some(info), inner.options.max_body, ours, Some(guard)))
            }
            None => {
                let tcp =
                    tokio::time::timeout(inner.options.connect_timeout, tokio::net::TcpStream::connect(&inner.addr))
                        .await
                        .map_err(|_| Error::Timeout {
                            after: inner.options.connect_timeout,
                            message: format!("TCP connect to {}", inner.addr),
                        })?
                        .map_err(|e| Error::transport(format!("cannot connect to {}: {e}", inner.addr)))?;
                let _ = tcp.set_nodelay(true);
                Ok(spawn_conn(tcp, None, inner.options.max_body, None, None))
            }
        }
    }
}

/// Removes a call's waiter when the call is abandoned (timeout or the caller dropped it).
struct PendingGuard<'a> {
    conn: &'a Conn,
    id: i64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.conn.pending.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            p.remove(&self.id);
        }
    }
}

/// The request frame of a call: the meta fields a stock brpc client sends, `timeout_ms` from
/// the call's timeout, the checksum when asked for.
pub(crate) fn request_frame(
    id: i64,
    service: &str,
    method: &str,
    payload: Bytes,
    opts: CallOptions,
    timeout: Option<Duration>,
    checksum: bool,
) -> Result<Encoded, Error> {
    let mut frame = Frame {
        meta: RpcMeta {
            request: Some(RpcRequestMeta {
                service_name: Some(service.to_string()),
                method_name: Some(method.to_string()),
                log_id: opts.log_id,
                request_id: opts.request_id,
                timeout_ms: timeout.map(|t| t.as_millis().min(i32::MAX as u128) as i32),
                ..Default::default()
            }),
            // The fields a stock brpc client always sends.
            compress_type: Some(0),
            correlation_id: Some(id),
            attachment_size: (!opts.attachment.is_empty()).then_some(opts.attachment.len() as i32),
            content_type: Some(0),
            checksum_type: Some(0),
            checksum_value: Some(Bytes::new()),
            ..Default::default()
        },
        payload,
        attachment: opts.attachment,
    };
    if checksum {
        frame.set_checksum(false);
    }
    frame.to_pieces().map_err(|e| Error::Protocol { message: e.to_string() })
}

/// The error of a call that got no answer within its timeout.
pub(crate) fn no_answer_in_time(after: Duration, service: &str, method: &str, addr: &str) -> Error {
    Error::Timeout { after, message: format!("{service}/{method} on {addr} got no answer in time") }
}

/// Counts a finished call in the client's metrics, under the brpc code its result maps to.
pub(crate) fn count_call(service: &str, method: &str, result: &Result<Response, Error>) {
    let code = match result {
        Ok(_) => 0,
        Err(Error::Rpc { code, .. }) => *code,
        Err(Error::Timeout { .. }) => codes::ERPCTIMEDOUT,
        Err(Error::Handshake { .. }) => codes::ESSL,
        Err(_) => codes::EFAILEDSOCKET,
    };
    telemetry::call(telemetry::Role::Client, service, method, code);
}

pub(crate) fn response_of(frame: Frame) -> Result<Response, Error> {
    let resp = frame.meta.response.clone().unwrap_or_default();
    let code = resp.error_code.unwrap_or(0);
    if code != 0 {
        return Err(Error::Rpc { code, text: resp.error_text.unwrap_or_default() });
    }
    if frame.meta.compress_type.unwrap_or(0) != 0 {
        return Err(Error::Rpc {
            code: codes::ERESPONSE,
            text: format!(
                "response uses compress_type {}, which trustwire does not decompress",
                frame.meta.compress_type.unwrap_or(0)
            ),
        });
    }
    frame.verify_checksum().map_err(|e| Error::Protocol { message: format!("response checksum rejected: {e}") })?;
    Ok(Response { payload: frame.payload, attachment: frame.attachment })
}

fn spawn_conn<S>(
    stream: S,
    info: Option<HandshakeInfo>,
    max_body: usize,
    ours: Option<String>,
    guard: Option<TrackGuard>,
) -> Arc<Conn>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = queue::queue::<Encoded>();
    let conn = Arc::new(Conn {
        tx,
        pending: Mutex::new(Some(HashMap::new())),
        closed: AtomicBool::new(false),
        shutdown: tokio::sync::Notify::new(),
        closed_cleanly: AtomicBool::new(false),
        failure: std::sync::OnceLock::new(),
        info,
        ours: ours.clone(),
        trust: guard.as_ref().map(|g| g.close_signal()),
    });
    let reader_conn = conn.clone();
    let writer_conn = Arc::downgrade(&conn);
    // Dropped when the reader ends: the connection is over then (the server closed it, or it
    // must close, e.g. because a certificate expired), so the write side closes too instead of
    // waiting for a Client that may never send again.
    let (reader_done, mut reader_gone) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let written = tokio::select! {
            r = super::write_queued(&mut wr, &mut rx, || {}) => r,
            _ = &mut reader_gone => Ok(()),
        };
        match written {
            Ok(()) => {
                let _ = tokio::time::timeout(CLOSE_NOTIFY_WAIT, wr.shutdown()).await;
            }
            Err(e) => {
                // A server that refuses us after the handshake (TLS 1.3) sends its alert and
                // closes; a write racing that fails with a bare EPIPE or reset. The reader is
                // about to read the alert, which says why: new calls go elsewhere now, and the
                // reader's error wins if it comes within the grace period.
                if let Some(c) = writer_conn.upgrade() {
                    c.closed.store(true, Ordering::Release);
                }
                let _ = tokio::time::timeout(WRITE_FAILURE_GRACE, &mut reader_gone).await;
                if let Some(c) = writer_conn.upgrade() {
                    c.fail_all(crate::transport::stream_error(&e, ours.as_deref()));
                }
            }
        }
    });
    tokio::spawn(async move {
        let _reader_done = reader_done;
        let conn = reader_conn;
        let mut decoder = Decoder::new(max_body);
        let mut buf = BytesMut::new();
        // Told when new trust material no longer accepts this server: stop sending new calls
        // here, let the ones in flight finish, then close.
        let mut close_signal = guard.as_ref().map(|g| g.close_signal());
        let mut draining = false;
        let err = loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => {
                    let id = frame.meta.correlation_id.unwrap_or(0);
                    let waiter =
                        conn.pending.lock().unwrap_or_else(|p| p.into_inner()).as_mut().and_then(|p| p.remove(&id));
                    // A reply to an abandoned call (timed out) has no waiter: drop it.
                    if let Some(w) = waiter {
                        let _ = w.send(Ok(frame));
                    }
                    continue;
                }
                Ok(None) => {}
                Err(e) if e.stream_in_sync() => {
                    tracing::warn!("skipping malformed response frame: {e}");
                    continue;
                }
                Err(e) => break Error::Protocol { message: format!("server sent an invalid frame: {e}") },
            }
            if draining && conn.pending_is_empty() {
                break Error::transport("connection closed: the trust material changed");
            }
            let changed = async {
                match close_signal.as_mut() {
                    Some(signal) if !draining => signal.wait().await,
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                r = super::read_frames(&mut rd, &mut buf, &decoder) => match r {
                    Ok(0) => {
                        // With part of a frame in, the server was answering: a call may have
                        // run, so nothing is sent again.
                        conn.closed_cleanly.store(buf.is_empty(), Ordering::Release);
                        break Error::transport("the server closed the connection");
                    }
                    Ok(_) => {}
                    Err(e) => break crate::transport::stream_error(&e, conn.ours.as_deref()),
                },
                _ = conn.shutdown.notified() => {
                    break Error::transport("the client was closed");
                }
                d = changed => {
                    tracing::info!(verdict = d.verdict.name(), "closing a connection to the server once its calls finish: {}", d.message);
                    draining = true;
                    conn.closed.store(true, Ordering::Release);
                }
            }
        };
        drop(guard);
        if matches!(err, Error::Handshake { .. }) {
            // In TLS 1.3 the client's handshake completes before the server has checked our
            // certificate; a refusal arrives as an alert afterwards and is counted here.
            crate::telemetry::handshake_refused(crate::telemetry::Role::Client, &err);
        }
        conn.fail_all(err);
    });
    conn
}
