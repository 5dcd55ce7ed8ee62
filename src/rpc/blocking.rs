//! A client for one thread that makes one call at a time and waits for each (a Python or C
//! caller's blocking call).
//!
//! The calling thread drives its connection itself with blocking system calls: it writes the
//! request (one `sendmsg` per 64 KiB or less) and sleeps in `recv` until the answer arrives,
//! then takes what it read. A call costs no hand-off to another thread and no event loop turn,
//! about what a blocking OpenSSL client costs. Before each call a non-blocking `recv` (more
//! than one only if the server sent much) takes in what the server sent while the thread was
//! away (its close_notify, or the end of the stream of a server that died), so a call is not
//! sent on a connection that is already gone. A call abandoned half-sent ends its connection.
//!
//! Only the per-call I/O is its own. The handshake, the verifier, the connection tracker (trust
//! changes and certificate expiry close the connection), the request frame, the answer's
//! checks, the errors and the metrics are the ones [`Client`](super::Client) uses, and a call
//! that a server's clean close left unanswered is sent once more on a new connection, as there.

use std::io::{self, IoSlice, Write};
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::client::{count_call, no_answer_in_time, request_frame, response_of};
use super::{CallOptions, ClientOptions, Response};
use crate::error::Error;
use crate::tls::tracker::{CloseSignal, TrackGuard};
use crate::tls::ClientTls;
use crate::wire::{Decoder, Encoded, Frame};

/// The longest a waiting call goes without calling its `check` (e.g. for Python's Ctrl-C).
pub const CHECK_EVERY: Duration = Duration::from_millis(100);

/// How long a failed write waits for the alert that says why (a server refusing our certificate
/// after a TLS 1.3 handshake closes right after its alert).
const WRITE_FAILURE_GRACE: Duration = Duration::from_millis(250);

/// The most bytes taken in before a call when nothing waits for them (stale answers, then the
/// close): the call goes ahead after that and reads the rest itself.
const CATCH_UP_LIMIT: usize = 1 << 20;

/// Why a blocking call ended without an answer.
#[derive(Debug)]
pub enum Failure<I> {
    /// The call failed; the same errors as [`Client::call`](super::Client::call).
    Error(Error),
    /// The caller's `check` asked to stop, with what it returned.
    Interrupted(I),
}

impl<I> From<Error> for Failure<I> {
    fn from(e: Error) -> Self {
        Failure::Error(e)
    }
}

/// A client for one endpoint that holds at most one connection, for one thread at a time.
///
/// Not for a thread of a tokio runtime (calls refuse with a configuration error there): a call
/// blocks the thread.
pub struct BlockingClient {
    addr: String,
    tls: ClientTls,
    options: ClientOptions,
    next_id: i64,
    conn: Option<BlockingConn>,
    closer: Closer,
}

/// Closes a [`BlockingClient`] from another thread, failing the call it has in flight (its
/// socket is shut down under it). Later calls fail with a transport error.
#[derive(Clone, Default)]
pub struct Closer(Arc<CloserInner>);

#[derive(Default)]
struct CloserInner {
    state: Mutex<CloserState>,
    /// Set in a forked child that let go of the connection: its socket is the parent's.
    forgotten: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct CloserState {
    closed: bool,
    /// The client's connection's socket while it is open; it is closed under this lock.
    fd: Option<RawFd>,
}

impl Closer {
    fn state(&self) -> std::sync::MutexGuard<'_, CloserState> {
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn close(&self) {
        if self.0.forgotten.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let mut s = self.state();
        s.closed = true;
        if let Some(fd) = s.fd {
            // SAFETY: `fd` is open: the connection that owns it takes it out of here, under
            // this lock, before closing it.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }

    pub fn is_closed(&self) -> bool {
        self.state().closed
    }
}

impl BlockingClient {
    pub fn new(addr: impl Into<String>, tls: ClientTls, options: ClientOptions) -> Self {
        // Away from 0, as the multiplexed client's ids are.
        BlockingClient { addr: addr.into(), tls, options, next_id: 1 << 32, conn: None, closer: Closer::default() }
    }

    /// What closes this client from another thread.
    pub fn closer(&self) -> Closer {
        self.closer.clone()
    }

    /// The local address of the connection, while one is open.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.conn.as_ref().and_then(|c| c.sock.local_addr().ok())
    }

    /// Calls `service/method` with `payload` and waits for the answer, at most the call's
    /// timeout (else the client's default). While it waits, `check` is called at least every
    /// [`CHECK_EVERY`] (and when a signal interrupts the wait); an `Err` from it abandons the
    /// call: the connection stays, and an answer that comes later is dropped (unless the
    /// request was only partly written: then the connection ends).
    pub fn call<I>(
        &mut self,
        service: &str,
        method: &str,
        payload: impl Into<Bytes>,
        opts: CallOptions,
        check: &mut dyn FnMut() -> Result<(), I>,
    ) -> Result<Response, Failure<I>> {
        // An interrupted call is not counted: the caller gave up, as when an async call's future
        // is dropped.
        let result = self.call_once(service, method, payload.into(), opts, check).map_err(Failure::Interrupted)?;
        count_call(service, method, &result);
        result.map_err(Failure::Error)
    }

    /// The call's result, or Err with what `check` returned.
    fn call_once<I>(
        &mut self,
        service: &str,
        method: &str,
        payload: Bytes,
        opts: CallOptions,
        check: &mut dyn FnMut() -> Result<(), I>,
    ) -> Result<Result<Response, Error>, I> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Ok(Err(Error::config("a blocking call cannot be made on a thread of the runtime")));
        }
        let closed = || Ok(Err(client_closed()));
        if self.closer.is_closed() {
            self.close();
            return closed();
        }
        self.next_id += 1;
        let id = self.next_id;
        let timeout = opts.timeout.or(self.options.default_timeout);
        let deadline = timeout.map(|t| Instant::now() + t);
        let timed_out = || Ok(Err(no_answer_in_time(timeout.unwrap_or_default(), service, method, &self.addr)));
        let request = match request_frame(id, service, method, payload, opts, timeout, self.options.checksum) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let mut retried = false;
        loop {
            if !self.conn.as_mut().is_some_and(|c| c.usable()) {
                // Gone before the next one opens, so the closer never sees the old socket.
                self.conn = None;
                match self.open(deadline, check) {
                    Ok(c) => self.conn = Some(c),
                    Err(Waited::TimedOut) => return timed_out(),
                    Err(Waited::Interrupted(i)) => return Err(i),
                    Err(Waited::Failed(e)) => return Ok(Err(e)),
                }
            }
            let Some(conn) = self.conn.as_mut() else { continue };
            match conn.exchange(id, &request, deadline, check) {
                Ok(frame) => return Ok(response_of(frame)),
                Err(Waited::TimedOut) => return timed_out(),
                Err(Waited::Interrupted(i)) => return Err(i),
                Err(Waited::Failed(_)) if self.closer.is_closed() => {
                    self.conn = None;
                    return closed();
                }
                // A server that closes cleanly (close_notify) has answered all it read, so
                // this call never ran: once more, on a new connection.
                Err(Waited::Failed(_)) if !retried && conn.closed_cleanly() => retried = true,
                Err(Waited::Failed(e)) => return Ok(Err(e)),
            }
        }
    }

    /// Opens a connection on the shared runtime, waiting on this thread.
    fn open<I>(
        &self,
        deadline: Option<Instant>,
        check: &mut dyn FnMut() -> Result<(), I>,
    ) -> Result<BlockingConn, Waited<I>> {
        let open = BlockingConn::open(&self.tls, &self.addr, self.options.connect_timeout, self.options.max_body);
        let mut open = std::pin::pin!(open);
        let rt = crate::runtime::runtime();
        let closed = || Waited::Failed(client_closed());
        let mut conn = loop {
            let slice = slice_until(deadline).ok_or(Waited::TimedOut)?;
            match rt.block_on(async { tokio::time::timeout(slice, &mut open).await }) {
                Ok(result) => break result.map_err(Waited::Failed)?,
                Err(_) if self.closer.is_closed() => return Err(closed()),
                Err(_) => check().map_err(Waited::Interrupted)?,
            }
        };
        let mut s = self.closer.state();
        if s.closed {
            return Err(closed());
        }
        s.fd = Some(conn.sock.as_raw_fd());
        conn.closer = Some(self.closer.clone());
        Ok(conn)
    }

    /// Closes the connection, sending TLS close_notify if the socket takes it at once.
    pub fn close(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.close();
        }
    }

    /// For a forked child: lets go of the connection without writing to it, closing it, or
    /// waiting on a lock (the socket and the tracker are the parent's, and a lock may have been
    /// held by a thread that did not come along). The closer does nothing after this.
    pub fn forget_connection(&mut self) {
        self.closer.0.forgotten.store(true, std::sync::atomic::Ordering::Release);
        if let Some(conn) = self.conn.take() {
            std::mem::forget(conn);
        }
    }
}

/// Why a wait ended without its result.
enum Waited<I> {
    TimedOut,
    Interrupted(I),
    Failed(Error),
}

impl<I> From<Error> for Waited<I> {
    fn from(e: Error) -> Self {
        Waited::Failed(e)
    }
}

/// What a call on a closed client fails with.
fn client_closed() -> Error {
    Error::transport("the client was closed")
}

/// How long to wait before looking at the clock and `check` again; None once `deadline` passed.
fn slice_until(deadline: Option<Instant>) -> Option<Duration> {
    match deadline {
        None => Some(CHECK_EVERY),
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            (!left.is_zero()).then(|| left.min(CHECK_EVERY))
        }
    }
}

/// How a connection ended.
struct Ended {
    error: Error,
    /// The server sent close_notify between frames: it answered everything it had read.
    cleanly: bool,
}

/// One verified connection, driven by the thread that holds it.
struct BlockingConn {
    /// In blocking mode; each call says whether it may wait (`MSG_DONTWAIT`). Closed on drop
    /// under the closer's lock.
    sock: ManuallyDrop<std::net::TcpStream>,
    closer: Option<Closer>,
    tls: rustls::ClientConnection,
    decoder: Decoder,
    /// Plaintext not yet decoded: at most one partial frame.
    buf: BytesMut,
    /// The call whose answer is wanted, and that answer once decoded.
    awaiting: i64,
    answer: Option<Frame>,
    ended: Option<Ended>,
    /// Our identity, named in errors when the server refuses it.
    ours: Option<String>,
    trust: CloseSignal,
    _tracked: TrackGuard,
    /// The socket's receive timeout as last set.
    recv_timeout: Option<Duration>,
}

impl BlockingConn {
    async fn open(tls: &ClientTls, addr: &str, connect_timeout: Duration, max_body: usize) -> Result<Self, Error> {
        let (stream, info) = crate::transport::connect(tls, addr, connect_timeout).await?;
        let tracked = crate::transport::track_client(tls, addr, &info)?;
        let ours = tls.current.load().our_identity.clone();
        let (io, session) = stream.into_inner();
        let (tcp, early) = io.into_parts();
        let broke = |e: io::Error| Error::transport(format!("cannot take over the connection to {addr}: {e}"));
        let sock = tcp.into_std().map_err(broke)?;
        sock.set_nonblocking(false).map_err(broke)?;
        let mut conn = BlockingConn {
            sock: ManuallyDrop::new(sock),
            closer: None,
            tls: session,
            decoder: Decoder::new(max_body),
            buf: BytesMut::new(),
            awaiting: 0,
            answer: None,
            ended: None,
            ours,
            trust: tracked.close_signal(),
            _tracked: tracked,
            recv_timeout: None,
        };
        // What the handshake's last read took in beyond the handshake (e.g. session tickets).
        if !early.is_empty() {
            conn.take_in(&early);
        }
        Ok(conn)
    }

    fn closed_cleanly(&self) -> bool {
        self.ended.as_ref().is_some_and(|e| e.cleanly)
    }

    /// Whether a new call may be sent here: the connection has not ended, trust still accepts
    /// the server and our certificate has not expired, and what came in while the thread was
    /// away (taken in now, without waiting) does not end it.
    fn usable(&mut self) -> bool {
        if self.ended.is_some() {
            return false;
        }
        if let Some(d) = self.trust.now() {
            tracing::info!(verdict = d.verdict.name(), "not reusing a connection to the server: {}", d.message);
            self.end(Error::transport(format!("connection closed: {}", d.message)), false);
            return false;
        }
        self.awaiting = 0;
        let mut taken = 0;
        while self.ended.is_none() && taken < CATCH_UP_LIMIT {
            match self.read_some(libc::MSG_DONTWAIT) {
                Ok(0) => break,
                Ok(n) => taken += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        self.ended.is_none()
    }

    /// Sends the request with correlation id `id` and waits for its answer.
    fn exchange<I>(
        &mut self,
        id: i64,
        request: &Encoded,
        deadline: Option<Instant>,
        check: &mut dyn FnMut() -> Result<(), I>,
    ) -> Result<Frame, Waited<I>> {
        self.awaiting = id;
        self.answer = None;
        self.send(request, deadline, check)?;
        let mut checked = Instant::now();
        loop {
            if let Some(frame) = self.answer.take() {
                return Ok(frame);
            }
            if let Some(e) = &self.ended {
                return Err(Waited::Failed(e.error.clone()));
            }
            let Some(slice) = slice_until(deadline) else {
                // A last look, without waiting: the answer may be in already.
                let _ = self.read_some(libc::MSG_DONTWAIT);
                return self.answer.take().ok_or(Waited::TimedOut);
            };
            self.set_recv_timeout(slice).map_err(|e| Waited::Failed(self.broke(&e)))?;
            // Errors other than these end the connection (read_some), seen above next time.
            let waited = matches!(
                self.read_some(0),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted)
            );
            // Also when bytes keep coming (stale answers, a server that trickles): `check` runs
            // at least every CHECK_EVERY.
            if waited || checked.elapsed() >= CHECK_EVERY {
                check().map_err(Waited::Interrupted)?;
                checked = Instant::now();
            }
        }
    }

    /// Writes `request`, waiting while the socket is full (and taking in what the server sends
    /// meanwhile, so neither side waits on the other).
    fn send<I>(
        &mut self,
        request: &Encoded,
        deadline: Option<Instant>,
        check: &mut dyn FnMut() -> Result<(), I>,
    ) -> Result<(), Waited<I>> {
        use bytes::Buf;
        let mut rest = request.as_buf();
        while rest.has_remaining() {
            let mut slices = [IoSlice::new(&[]); 3];
            let n = rest.chunks_vectored(&mut slices);
            // rustls takes what fits under its buffer limit (possibly nothing until written).
            let took = self.tls.writer().write_vectored(&slices[..n]).map_err(|e| self.broke(&e))?;
            rest.advance(took);
            if let Err(stopped) = self.flush(deadline, check) {
                if rest.has_remaining() && self.ended.is_none() {
                    // Part of the frame is out and the rest never will be: the next frame
                    // would be read as the end of this one.
                    self.end(Error::transport("a request was abandoned half-sent"), false);
                }
                return Err(stopped);
            }
        }
        Ok(())
    }

    /// Writes the records rustls holds.
    fn flush<I>(
        &mut self,
        deadline: Option<Instant>,
        check: &mut dyn FnMut() -> Result<(), I>,
    ) -> Result<(), Waited<I>> {
        while self.tls.wants_write() {
            if let Some(e) = &self.ended {
                return Err(Waited::Failed(e.error.clone()));
            }
            let mut out = self.socket(libc::MSG_DONTWAIT);
            match self.tls.write_tls(&mut out) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let slice = slice_until(deadline).ok_or(Waited::TimedOut)?;
                    let readable = wait_for(out.fd, libc::POLLOUT | libc::POLLIN, slice).map_err(|e| self.broke(&e))?;
                    if readable {
                        let _ = self.read_some(libc::MSG_DONTWAIT);
                    }
                    check().map_err(Waited::Interrupted)?;
                }
                Err(e) => return Err(Waited::Failed(self.write_failed(&e, deadline))),
            }
        }
        Ok(())
    }

    /// A write failed (e.g. the server closed): if the server said why (an alert), that is the
    /// error; else the write's.
    fn write_failed(&mut self, e: &io::Error, deadline: Option<Instant>) -> Error {
        let grace = Instant::now() + WRITE_FAILURE_GRACE;
        let until = deadline.map_or(grace, |d| d.min(grace));
        while self.ended.is_none() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() || self.set_recv_timeout(left).is_err() {
                break;
            }
            match self.read_some(0) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                _ => {}
            }
        }
        match &self.ended {
            Some(Ended { error: error @ Error::Handshake { .. }, .. }) => error.clone(),
            _ => self.broke(e),
        }
    }

    /// Ends the connection with the error an I/O failure means, and returns it.
    fn broke(&mut self, e: &io::Error) -> Error {
        let err = crate::transport::stream_error(e, self.ours.as_deref());
        self.end(err.clone(), false);
        err
    }

    fn end(&mut self, error: Error, cleanly: bool) {
        if self.ended.is_some() {
            return;
        }
        if matches!(error, Error::Handshake { .. }) {
            // In TLS 1.3 the client's handshake completes before the server has checked our
            // certificate; a refusal arrives as an alert afterwards and is counted here.
            crate::telemetry::handshake_refused(crate::telemetry::Role::Client, &error);
        }
        self.ended = Some(Ended { error, cleanly });
    }

    /// The socket, for one call with `flags`.
    fn socket(&self, flags: libc::c_int) -> Socket {
        Socket { fd: self.sock.as_raw_fd(), flags }
    }

    fn set_recv_timeout(&mut self, t: Duration) -> io::Result<()> {
        // Whole milliseconds, so a deadline that moves on by microseconds costs no system call.
        let t = Duration::from_millis(t.as_millis().max(1) as u64);
        if self.recv_timeout != Some(t) {
            self.sock.set_read_timeout(Some(t))?;
            self.recv_timeout = Some(t);
        }
        Ok(())
    }

    /// One `recv` (with `flags`), and everything it brought taken in. Ok(0) at the end of the
    /// stream; the errors of `recv` as they are (the connection is ended for those that end it).
    fn read_some(&mut self, flags: libc::c_int) -> io::Result<usize> {
        let mut buf = crate::transport::take_buffer();
        let result = self.socket(flags).recv_into(&mut buf);
        let out = match result {
            Ok(0) => {
                self.take_in(&[]);
                Ok(0)
            }
            Ok(n) => {
                self.take_in(&buf);
                Ok(n)
            }
            Err(e) => {
                if !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) {
                    self.broke(&e);
                }
                Err(e)
            }
        };
        crate::transport::give_back(buf);
        out
    }

    /// Hands `data` to rustls and decodes what it deciphers; empty `data` is the end of the
    /// stream.
    fn take_in(&mut self, mut data: &[u8]) {
        let at_end = data.is_empty();
        loop {
            if self.ended.is_some() {
                return;
            }
            if !data.is_empty() || at_end {
                if let Err(e) = self.tls.read_tls(&mut data) {
                    self.broke(&e);
                    return;
                }
            }
            let state = match self.tls.process_new_packets() {
                Ok(s) => s,
                Err(e) => {
                    // The alert rustls wants to send back, if the socket takes it.
                    let mut out = self.socket(libc::MSG_DONTWAIT);
                    let _ = self.tls.write_tls(&mut out);
                    let err = crate::tls::verify::tls_error(&e, self.ours.as_deref());
                    self.end(err, false);
                    return;
                }
            };
            self.take_plaintext(state.plaintext_bytes_to_read());
            if state.peer_has_closed() {
                // With part of a frame in, the server was answering: the call may have run.
                let cleanly = self.buf.is_empty();
                self.end(Error::transport("the server closed the connection"), cleanly);
                return;
            }
            if at_end {
                self.end(
                    Error::transport("connection broke: the server closed the connection without TLS close_notify"),
                    false,
                );
                return;
            }
            if data.is_empty() {
                return;
            }
        }
    }

    fn take_plaintext(&mut self, n: usize) {
        use std::io::Read;
        if n > 0 {
            let start = self.buf.len();
            self.buf.resize(start + n, 0);
            let got = self.tls.reader().read(&mut self.buf[start..]).unwrap_or(0);
            self.buf.truncate(start + got);
        }
        loop {
            match self.decoder.decode(&mut self.buf) {
                Ok(Some(frame)) => {
                    // An answer to an abandoned call (timed out, interrupted) has no one waiting.
                    if frame.meta.correlation_id == Some(self.awaiting) && self.awaiting != 0 {
                        self.answer = Some(frame);
                    }
                }
                Ok(None) => {
                    if self.buf.is_empty() && self.buf.capacity() > crate::transport::READ_AHEAD {
                        // What a large frame needed is not kept while the connection waits.
                        self.buf = BytesMut::new();
                    }
                    return;
                }
                Err(e) if e.stream_in_sync() => tracing::warn!("skipping malformed response frame: {e}"),
                Err(e) => {
                    self.end(Error::Protocol { message: format!("server sent an invalid frame: {e}") }, false);
                    return;
                }
            }
        }
    }

    /// Sends close_notify if the socket takes it without waiting, then closes.
    fn close(mut self) {
        if self.ended.is_none() {
            self.tls.send_close_notify();
            let mut out = self.socket(libc::MSG_DONTWAIT);
            while self.tls.wants_write() && self.tls.write_tls(&mut out).is_ok_and(|n| n > 0) {}
        }
    }
}

impl Drop for BlockingConn {
    fn drop(&mut self) {
        let fd = self.sock.as_raw_fd();
        let guard = self.closer.as_ref().map(|c| {
            let mut s = c.state();
            if s.fd == Some(fd) {
                s.fd = None;
            }
            s
        });
        // SAFETY: dropped once, here, and not used after.
        unsafe { ManuallyDrop::drop(&mut self.sock) };
        drop(guard);
    }
}

/// A socket written and read with per-call flags (`MSG_DONTWAIT`) and without SIGPIPE.
struct Socket {
    fd: std::os::fd::RawFd,
    flags: libc::c_int,
}

impl Socket {
    /// Receives into `buf`'s spare capacity (up to `READ_AHEAD` bytes), setting its length.
    fn recv_into(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        debug_assert!(buf.is_empty());
        let room = buf.spare_capacity_mut();
        let len = room.len().min(crate::transport::READ_AHEAD);
        // SAFETY: recv writes at most `len` bytes into the vector's spare capacity, which is at
        // least that long; the first `n` it reports are initialised.
        let n = unsafe { libc::recv(self.fd, room.as_mut_ptr().cast(), len, self.flags) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: see above; `n <= len <= capacity`.
        unsafe { buf.set_len(n as usize) };
        Ok(n as usize)
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: IoSlice is ABI-compatible with iovec on Unix; the message points at `bufs`,
        // which outlive the call, and names no address or control data.
        let n = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
            msg.msg_iovlen = bufs.len().min(libc::c_int::MAX as usize) as _;
            libc::sendmsg(self.fd, &msg, self.flags | libc::MSG_NOSIGNAL)
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Waits until `fd` can be written or read (`events`), at most `t`; true if it can be read.
fn wait_for(fd: std::os::fd::RawFd, events: libc::c_short, t: Duration) -> io::Result<bool> {
    let mut p = libc::pollfd { fd, events, revents: 0 };
    let ms = t.as_millis().clamp(1, libc::c_int::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd, for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted { Ok(false) } else { Err(e) };
    }
    Ok(p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0)
}

/// Blocking connections of one endpoint's client for the threads that call it: each of the
/// first `limit` threads gets a [`BlockingClient`] of its own, kept by the thread (it closes,
/// with close_notify, when the thread exits). For a language binding's blocking calls: a thread
/// that gets none (see [`ThreadConnections::with`]) uses the multiplexed [`Client`](super::Client).
pub struct ThreadConnections {
    addr: String,
    tls: ClientTls,
    options: ClientOptions,
    limit: usize,
    /// The threads that have one. Under this lock `closed` is set, so none is added after.
    threads: Mutex<Vec<(std::thread::ThreadId, std::sync::Weak<Own>)>>,
    closed: std::sync::atomic::AtomicBool,
}

/// A thread's own client of one endpoint.
struct Own {
    /// Locked by its thread for the length of a call; by others only to close it. None once
    /// closed, so a closed client's TLS material (and the hooks in it) is not kept alive by
    /// the threads that called it.
    client: Mutex<Option<BlockingClient>>,
    closer: Closer,
}

impl Own {
    /// Closes and lets go of the client, if this thread gets its lock (a call in flight
    /// lets go of it itself when it ends).
    fn close(&self) {
        if let Ok(mut c) = self.client.try_lock() {
            if let Some(mut client) = c.take() {
                client.close();
            }
        }
        self.closer.close();
    }
}

impl Drop for Own {
    fn drop(&mut self) {
        let Some(client) = self.client.get_mut().unwrap_or_else(|p| p.into_inner()).as_mut() else {
            return;
        };
        if crate::runtime::forked() {
            // The socket is the parent's too: a close_notify from here would end its session.
            client.forget_connection();
        } else {
            client.close();
        }
    }
}

thread_local! {
    /// This thread's own clients, one per ThreadConnections it called through.
    static OWN: std::cell::RefCell<Vec<Arc<Own>>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl ThreadConnections {
    pub fn new(addr: impl Into<String>, tls: ClientTls, options: ClientOptions, limit: usize) -> Self {
        crate::runtime::watch_forks();
        ThreadConnections {
            addr: addr.into(),
            tls,
            options,
            limit,
            threads: Mutex::new(Vec::new()),
            closed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Runs `f` with this thread's own client, made on first use. None, and `f` not run, when
    /// this thread gets none: a thread of the runtime, a forked child, `limit` live threads have
    /// one already, these connections were closed, or the thread's client is busy with a call
    /// of this same thread (one made from a signal handler while the first waits).
    pub fn with<R>(&self, f: impl FnOnce(&mut BlockingClient) -> R) -> Option<R> {
        if crate::runtime::forked() || tokio::runtime::Handle::try_current().is_ok() {
            return None;
        }
        let own = self.own()?;
        let mut slot = own.client.try_lock().ok()?;
        let client = slot.as_mut()?;
        let r = f(client);
        if crate::runtime::forked() {
            // `f` forked (e.g. from a signal handler): the child lets the parent's go.
            client.forget_connection();
        } else if own.closer.is_closed() {
            // Closed while the call was in flight: let go of it now.
            if let Some(mut client) = slot.take() {
                client.close();
            }
        }
        Some(r)
    }

    fn own(&self) -> Option<Arc<Own>> {
        let me = std::thread::current().id();
        let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        threads.retain(|(_, own)| own.strong_count() > 0);
        if let Some(own) = threads.iter().find(|(t, _)| *t == me).and_then(|(_, own)| own.upgrade()) {
            return Some(own);
        }
        if threads.len() >= self.limit {
            return None;
        }
        let client = BlockingClient::new(self.addr.clone(), self.tls.clone(), self.options.clone());
        let own = Arc::new(Own { closer: client.closer(), client: Mutex::new(Some(client)) });
        // Entries of clients closed since go, dropped once no lock is held here.
        let mut gone = Vec::new();
        OWN.try_with(|list| {
            let mut list = list.borrow_mut();
            let (closed, open): (Vec<_>, Vec<_>) = list.drain(..).partition(|o| o.closer.is_closed());
            *list = open;
            gone = closed;
            list.push(own.clone());
        })
        .ok()?;
        threads.push((me, Arc::downgrade(&own)));
        drop(threads);
        drop(gone);
        Some(own)
    }

    /// Closes every thread's connection: an idle one with close_notify, one in a call by
    /// shutting its socket down (the call fails with a transport error). Later calls get None.
    pub fn close(&self) {
        if crate::runtime::forked() {
            // Not even the lock: a thread that did not come along may have held it.
            self.closed.store(true, std::sync::atomic::Ordering::Release);
            return;
        }
        let threads: Vec<_> = {
            let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
            self.closed.store(true, std::sync::atomic::Ordering::Release);
            std::mem::take(&mut *threads)
        };
        for own in threads.iter().filter_map(|(_, own)| own.upgrade()) {
            own.close();
        }
    }
}

impl Drop for ThreadConnections {
    fn drop(&mut self) {
        self.close();
    }
}
