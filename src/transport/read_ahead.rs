//! A read-ahead buffer under rustls.
//!
//! rustls asks its transport for at most 4 KiB more than it holds, so a full 16 KiB record
//! costs five reads of the socket. [`ReadAhead`] reads whatever the socket has, up to
//! [`READ_AHEAD`], in one call and hands it to rustls from memory.
//!
//! The buffer belongs to a connection only while it holds bytes not yet handed on: the read
//! that hands on its last byte lets it go, so a connection that has read everything keeps none
//! of it, whether it is waiting for its peer or has stopped reading (paused, or rustls holding
//! plaintext its reader has not taken). A let-go buffer is kept by the thread for the next
//! connection that reads there (at most [`SPARES`] per thread): allocating and freeing 64 KiB
//! on every pause would have the allocator hand the pages back and the kernel fault them in
//! again, which costs more than the reads saved. Writes pass straight through, vectored
//! writes included (rustls writes its queued records with one `writev`).

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most a single read of the socket takes: four full TLS records.
pub const READ_AHEAD: usize = 64 * 1024;

/// Drained buffers a thread keeps for the next connection that reads on it.
pub const SPARES: usize = 2;

thread_local! {
    static SPARE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of at least [`READ_AHEAD`] bytes' capacity, empty: one of this thread's spares if it
/// has one.
pub(crate) fn take_buffer() -> Vec<u8> {
    SPARE.try_with(|s| s.borrow_mut().pop()).ok().flatten().unwrap_or_else(|| Vec::with_capacity(READ_AHEAD))
}

/// Keeps `buf` as one of this thread's spares (if it is large enough and there is room).
pub(crate) fn give_back(mut buf: Vec<u8>) {
    if buf.capacity() < READ_AHEAD {
        return;
    }
    buf.clear();
    let _ = SPARE.try_with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < SPARES {
            s.push(buf);
        }
    });
}

/// A byte stream whose reads go through a buffer that is filled in large reads and let go when
/// drained. See the module documentation.
pub struct ReadAhead<IO> {
    io: IO,
    /// Holds `buf[pos..]` unread; empty (no allocation) when drained.
    buf: Vec<u8>,
    pos: usize,
}

impl<IO: std::fmt::Debug> std::fmt::Debug for ReadAhead<IO> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the bytes: they are a peer's, and may be secret.
        f.debug_struct("ReadAhead").field("io", &self.io).field("buffered", &self.buffered()).finish()
    }
}

impl<IO> ReadAhead<IO> {
    pub fn new(io: IO) -> Self {
        ReadAhead { io, buf: Vec::new(), pos: 0 }
    }

    /// The underlying stream (e.g. to read socket options).
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    pub fn get_mut(&mut self) -> &mut IO {
        &mut self.io
    }

    /// Bytes read from the stream and not yet handed on.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Memory the buffer holds now (0 when drained).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// The stream, and the bytes read from it and not yet handed on.
    pub fn into_parts(mut self) -> (IO, Vec<u8>) {
        let rest = self.buf[self.pos..].to_vec();
        self.release();
        (self.io, rest)
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for ReadAhead<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos == this.buf.len() {
            // Drained, so let go already (see the end of this function).
            debug_assert!(this.buf.capacity() == 0 && this.pos == 0);
            if out.remaining() >= READ_AHEAD {
                // The caller has room for as much as we would read: no copy.
                return Pin::new(&mut this.io).poll_read(cx, out);
            }
            this.buf = take_buffer();
            let spare: &mut [MaybeUninit<u8>] = this.buf.spare_capacity_mut();
            let room = spare.len().min(READ_AHEAD);
            let mut fill = ReadBuf::uninit(&mut spare[..room]);
            let start = fill.filled().as_ptr();
            match Pin::new(&mut this.io).poll_read(cx, &mut fill) {
                Poll::Ready(Ok(())) => {
                    let n = fill.filled().len();
                    if fill.filled().as_ptr() != start || n > room {
                        // A stream may replace the ReadBuf it is handed; its bytes are not in
                        // our buffer then.
                        this.release();
                        return Poll::Ready(Err(io::Error::other("the stream read into a buffer of its own")));
                    }
                    // SAFETY: `fill` is still the one built over the vector's spare capacity
                    // (checked above), and poll_read initialised its first `n <= room` bytes.
                    unsafe { this.buf.set_len(n) };
                    if n == 0 {
                        this.release();
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Err(e)) => {
                    this.release();
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => {
                    // Nothing more is coming for now: a waiting connection holds no buffer.
                    this.release();
                    return Poll::Pending;
                }
            }
        }
        let n = out.remaining().min(this.buf.len() - this.pos);
        out.put_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
        if this.pos == this.buf.len() {
            // Read out: the caller may not poll again for a long while (rustls stops reading
            // while it holds plaintext, a paused connection stops reading), so the buffer goes
            // back to the thread now rather than on the next read.
            this.release();
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO> ReadAhead<IO> {
    fn release(&mut self) {
        give_back(std::mem::take(&mut self.buf));
        self.pos = 0;
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for ReadAhead<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn hands_on_every_byte_in_order_and_lets_the_buffer_go_when_drained() {
        let (mut a, b) = tokio::io::duplex(256 * 1024);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        a.write_all(&data).await.unwrap();
        drop(a);
        let mut r = ReadAhead::new(b);
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = r.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            assert!(r.capacity() <= READ_AHEAD);
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, data);
        assert_eq!(r.capacity(), 0, "a drained buffer is let go");
    }

    #[tokio::test]
    async fn a_reader_that_has_read_everything_holds_no_buffer() {
        let (mut a, b) = tokio::io::duplex(64 * 1024);
        let mut r = ReadAhead::new(b);
        a.write_all(b"hello").await.unwrap();
        let mut chunk = [0u8; 3];
        assert_eq!(r.read(&mut chunk).await.unwrap(), 3);
        assert_eq!(r.buffered(), 2);
        assert_eq!(r.read(&mut chunk).await.unwrap(), 2);
        assert_eq!(&chunk[..2], b"lo");
        // Read out: the buffer is gone before any further read, which may never come.
        assert_eq!(r.capacity(), 0, "a read-out buffer is let go at once");
        // Nothing more has arrived: the read is pending, and still no buffer is held.
        let pending = tokio::time::timeout(std::time::Duration::from_millis(20), r.read(&mut chunk)).await;
        assert!(pending.is_err());
        assert_eq!(r.capacity(), 0);
        a.write_all(b"!").await.unwrap();
        assert_eq!(r.read(&mut chunk).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn a_large_read_goes_straight_to_the_caller() {
        let (mut a, b) = tokio::io::duplex(256 * 1024);
        a.write_all(&[7u8; 100_000]).await.unwrap();
        let mut r = ReadAhead::new(b);
        let mut big = vec![0u8; READ_AHEAD];
        let n = r.read(&mut big).await.unwrap();
        assert!(n > 0);
        assert_eq!(r.capacity(), 0);
        assert!(big[..n].iter().all(|&x| x == 7));
    }

    /// A stream that answers a read with a buffer of its own, as safe code may.
    struct Swapper;

    impl AsyncRead for Swapper {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            let own: &'static mut [u8] = Box::leak(vec![1u8; 2 * READ_AHEAD].into_boxed_slice());
            *buf = ReadBuf::new(own);
            buf.set_filled(2 * READ_AHEAD);
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_stream_that_swaps_the_read_buffer_gets_an_error_not_our_memory() {
        let mut r = ReadAhead::new(Swapper);
        let mut chunk = [0u8; 4096];
        let err = r.read(&mut chunk).await.unwrap_err();
        assert!(err.to_string().contains("buffer of its own"), "{err}");
        assert_eq!(r.capacity(), 0);
    }
}
