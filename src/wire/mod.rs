//! baidu_std framing, sans-IO: bytes in, frames out, and back.
//!
//! Nothing here touches a socket or tokio, so the codec is tested byte-for-byte against captures
//! of real brpc traffic and fuzzed directly. A frame is a 12-byte header (`PRPC`, body size,
//! meta size; big-endian u32s) followed by the RpcMeta, the payload and the attachment.

mod meta;

pub use meta::{ChunkInfo, RpcMeta, RpcRequestMeta, RpcResponseMeta, StreamSettings};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

/// The four bytes every baidu_std frame starts with.
pub const MAGIC: [u8; 4] = *b"PRPC";
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 12;
/// brpc's default `max_body_size`: 64 MiB.
pub const DEFAULT_MAX_BODY: usize = 64 << 20;
/// Most that a frame's header alone makes a reader reserve for its body. A larger body gets room
/// only as fast as it arrives (at most as much again as has come), so a peer cannot make us
/// reserve `max_body` per connection by sending 12 bytes. Frames up to this size (a 1 MiB
/// payload with its meta, say) are still read into one buffer without a copy.
pub const MAX_RESERVE_AHEAD: usize = 2 << 20;

/// Bodies smaller than this are copied behind their header into one buffer (one write for the
/// frame); larger ones are written as they are, after it.
pub const COPY_BODIES_BELOW: usize = 32 * 1024;

/// An encoded frame in up to three pieces (see [`Frame::to_pieces`]). Cloning it shares the
/// pieces.
#[derive(Clone, Debug, Default)]
pub struct Encoded {
    pieces: [Bytes; 3],
}

impl From<Bytes> for Encoded {
    /// A frame already encoded in one buffer.
    fn from(bytes: Bytes) -> Encoded {
        Encoded { pieces: [bytes, Bytes::new(), Bytes::new()] }
    }
}

impl AsRef<Encoded> for Encoded {
    fn as_ref(&self) -> &Encoded {
        self
    }
}

impl Encoded {
    /// The pieces in wire order, empty ones left out.
    pub fn pieces(&self) -> impl Iterator<Item = &Bytes> {
        self.pieces.iter().filter(|p| !p.is_empty())
    }

    /// Bytes on the wire, all pieces together.
    pub fn len(&self) -> usize {
        self.pieces.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.iter().all(Bytes::is_empty)
    }

    /// The pieces as one [`Buf`], for a vectored write.
    pub fn as_buf(&self) -> impl Buf + '_ {
        let [a, b, c] = &self.pieces;
        (&a[..]).chain(&b[..]).chain(&c[..])
    }

    /// The whole frame in one buffer (a copy when it is in more than one piece).
    pub fn to_bytes(&self) -> Bytes {
        match (self.pieces[1].is_empty(), self.pieces[2].is_empty()) {
            (true, true) => self.pieces[0].clone(),
            _ => {
                let mut all = BytesMut::with_capacity(self.len());
                for p in self.pieces() {
                    all.extend_from_slice(p);
                }
                all.freeze()
            }
        }
    }
}

/// `compress_type` value for an uncompressed payload, the only one trustwire accepts.
pub const COMPRESS_NONE: i32 = 0;
/// `checksum_type` value for a masked CRC32C.
pub const CHECKSUM_CRC32C: i32 = 1;

/// One decoded baidu_std frame. `payload` and `attachment` share the frame's buffer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Frame {
    pub meta: RpcMeta,
    pub payload: Bytes,
    pub attachment: Bytes,
}

/// Why bytes could not be decoded as a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The stream does not start with `PRPC`: not baidu_std, or out of sync.
    #[error("bad magic {found:02x?}: not a baidu_std frame (expected \"PRPC\")")]
    BadMagic { found: [u8; 4] },
    /// The declared body is larger than the configured limit.
    #[error("frame body of {body_size} bytes exceeds the limit of {limit} bytes")]
    BodyTooLarge { body_size: usize, limit: usize },
    /// meta_size is larger than body_size. The frame was skipped; the stream is still in sync.
    #[error("meta_size {meta_size} is larger than body_size {body_size}; frame skipped")]
    MetaSizeExceedsBody { meta_size: usize, body_size: usize },
    /// The RpcMeta bytes are not a valid protobuf message.
    #[error("undecodable RpcMeta: {reason}")]
    BadMeta { reason: String },
    /// The meta decoded but its attachment_size does not fit in the frame. The frame was
    /// skipped; the stream is still in sync and the sender can be answered.
    #[error("attachment_size {attachment_size} does not fit in the {available} bytes after the meta")]
    BadAttachmentSize { correlation_id: Option<i64>, attachment_size: i64, available: usize },
}

impl DecodeError {
    /// True when the offending frame was consumed whole and decoding may go on.
    pub fn stream_in_sync(&self) -> bool {
        matches!(self, Self::MetaSizeExceedsBody { .. } | Self::BadAttachmentSize { .. })
    }

    /// A short stable name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::BadMagic { .. } => "bad_magic",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::MetaSizeExceedsBody { .. } => "meta_size_exceeds_body",
            Self::BadMeta { .. } => "bad_meta",
            Self::BadAttachmentSize { .. } => "bad_attachment_size",
        }
    }
}

/// Why a frame could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("frame body of {0} bytes does not fit baidu_std's 32-bit size field")]
    TooLarge(usize),
    #[error("meta says attachment_size {declared} but the attachment has {actual} bytes")]
    AttachmentSizeMismatch { declared: i64, actual: usize },
}

/// Incremental frame decoder with a body-size limit.
#[derive(Debug, Clone)]
pub struct Decoder {
    max_body: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_BODY)
    }
}

impl Decoder {
    pub fn new(max_body: usize) -> Self {
        Self { max_body }
    }

    pub fn max_body(&self) -> usize {
        self.max_body
    }

    /// How many more bytes `buf` needs before [`Decoder::decode`] can make progress, as far as
    /// the header tells. Lets a reader size its next read; never needed for correctness.
    pub fn wanted(&self, buf: &[u8]) -> usize {
        if buf.len() < HEADER_LEN {
            return HEADER_LEN - buf.len();
        }
        let body = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
        (HEADER_LEN + body.min(self.max_body)).saturating_sub(buf.len())
    }

    /// How much room a reader should make in `buf` (which starts at a frame boundary) for its
    /// next read: what the frame still needs, but no more than [`MAX_RESERVE_AHEAD`] or the
    /// bytes of it already received, whichever is larger.
    pub fn reserve_hint(&self, buf: &[u8]) -> usize {
        self.wanted(buf).min(buf.len().max(MAX_RESERVE_AHEAD))
    }

    /// Takes one complete frame off the front of `buf`.
    ///
    /// Returns `Ok(None)` when more bytes are needed (nothing is consumed). On an error for
    /// which [`DecodeError::stream_in_sync`] is true the bad frame has been consumed; on any
    /// other error nothing is consumed and the stream cannot be trusted any more.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        if buf.len() < 4 {
            // A wrong first byte is enough to know this is not baidu_std.
            if !MAGIC.starts_with(&buf[..]) {
                let mut found = [0u8; 4];
                found[..buf.len()].copy_from_slice(buf);
                return Err(DecodeError::BadMagic { found });
            }
            return Ok(None);
        }
        if buf[..4] != MAGIC {
            return Err(DecodeError::BadMagic { found: [buf[0], buf[1], buf[2], buf[3]] });
        }
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let body_size = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
        let meta_size = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
        if body_size > self.max_body {
            return Err(DecodeError::BodyTooLarge { body_size, limit: self.max_body });
        }
        if buf.len() < HEADER_LEN + body_size {
            buf.reserve(self.reserve_hint(buf));
            return Ok(None);
        }
        if meta_size > body_size {
            buf.advance(HEADER_LEN + body_size);
            return Err(DecodeError::MetaSizeExceedsBody { meta_size, body_size });
        }
        // An undecodable meta is fatal, and a fatal error leaves the buffer as it was.
        let meta = RpcMeta::decode(&buf[HEADER_LEN..HEADER_LEN + meta_size])
            .map_err(|e| DecodeError::BadMeta { reason: e.to_string() })?;
        let mut body = buf.split_to(HEADER_LEN + body_size).freeze();
        body.advance(HEADER_LEN);
        let available = body_size - meta_size;
        let attachment_size = i64::from(meta.attachment_size.unwrap_or(0));
        if attachment_size < 0 || attachment_size as u64 > available as u64 {
            return Err(DecodeError::BadAttachmentSize {
                correlation_id: meta.correlation_id,
                attachment_size,
                available,
            });
        }
        let payload_end = body_size - attachment_size as usize;
        Ok(Some(Frame { payload: body.slice(meta_size..payload_end), attachment: body.slice(payload_end..), meta }))
    }
}

impl Frame {
    /// Size of the whole encoded frame, header included.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.meta.encoded_len() + self.payload.len() + self.attachment.len()
    }

    /// Appends the encoded frame to `out`. The meta is written as given (only the fields that
    /// are set), so the caller decides which optional fields appear on the wire.
    pub fn encode(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        out.reserve(self.encoded_len());
        self.encode_head(out)?;
        out.put_slice(&self.payload);
        out.put_slice(&self.attachment);
        Ok(())
    }

    /// Appends the 12-byte header and the meta only: the payload and the attachment are to
    /// follow on the wire as they are, so a relay can pass a large body on without copying it.
    pub fn encode_head(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        let declared = i64::from(self.meta.attachment_size.unwrap_or(0));
        if declared != self.attachment.len() as i64 {
            return Err(EncodeError::AttachmentSizeMismatch { declared, actual: self.attachment.len() });
        }
        let meta_len = self.meta.encoded_len();
        let body = meta_len + self.payload.len() + self.attachment.len();
        if body > u32::MAX as usize {
            return Err(EncodeError::TooLarge(body));
        }
        out.reserve(HEADER_LEN + meta_len);
        out.put_slice(&MAGIC);
        out.put_u32(body as u32);
        out.put_u32(meta_len as u32);
        self.meta.encode(out).expect("BytesMut grows on demand, so prost cannot run out of room");
        Ok(())
    }

    /// The encoded frame as the pieces a writer sends one after another: one buffer for a
    /// small frame; for a body of [`COPY_BODIES_BELOW`] or more, the header and meta followed
    /// by the payload and the attachment as they are, so a large body is never copied to be
    /// framed.
    pub fn to_pieces(&self) -> Result<Encoded, EncodeError> {
        if self.payload.len() + self.attachment.len() < COPY_BODIES_BELOW {
            return self.to_bytes().map(Encoded::from);
        }
        let mut head = BytesMut::with_capacity(HEADER_LEN + self.meta.encoded_len());
        self.encode_head(&mut head)?;
        Ok(Encoded { pieces: [head.freeze(), self.payload.clone(), self.attachment.clone()] })
    }

    /// The encoded frame as a new buffer.
    pub fn to_bytes(&self) -> Result<Bytes, EncodeError> {
        let mut out = BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut out)?;
        Ok(out.freeze())
    }

    /// Checks the frame's checksum if it carries one (`checksum_type` = CRC32C).
    pub fn verify_checksum(&self) -> Result<(), ChecksumError> {
        match self.meta.checksum_type.unwrap_or(0) {
            0 => Ok(()),
            CHECKSUM_CRC32C => {
                let with_att = self.meta.checksum_with_attachment.unwrap_or(false);
                let actual = masked_crc32c(&self.payload, with_att.then_some(&self.attachment[..]));
                let got = self.meta.checksum_value.as_deref().unwrap_or(&[]);
                if got == actual.to_be_bytes() {
                    Ok(())
                } else {
                    Err(ChecksumError::Mismatch { expected: got.to_vec(), actual })
                }
            }
            other => Err(ChecksumError::Unsupported(other)),
        }
    }

    /// Sets a CRC32C checksum over the payload (and the attachment when `with_attachment`).
    pub fn set_checksum(&mut self, with_attachment: bool) {
        let crc = masked_crc32c(&self.payload, with_attachment.then_some(&self.attachment[..]));
        self.meta.checksum_type = Some(CHECKSUM_CRC32C);
        self.meta.checksum_value = Some(Bytes::copy_from_slice(&crc.to_be_bytes()));
        self.meta.checksum_with_attachment = with_attachment.then_some(true);
    }
}

/// Why a frame's checksum was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChecksumError {
    #[error("CRC32C mismatch: frame carries {expected:02x?}, payload hashes to {actual:08x}")]
    Mismatch { expected: Vec<u8>, actual: u32 },
    #[error("unsupported checksum_type {0} (only 0 = none and 1 = CRC32C are known)")]
    Unsupported(i32),
}

/// leveldb-style masked CRC32C, as brpc puts in `checksum_value` (big-endian).
pub fn masked_crc32c(payload: &[u8], attachment: Option<&[u8]>) -> u32 {
    let mut crc = crc32c::crc32c(payload);
    if let Some(att) = attachment {
        crc = crc32c::crc32c_append(crc, att);
    }
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}
