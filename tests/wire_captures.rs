//! The baidu_std codec against captures of real Apache brpc 1.17 traffic.
//!
//! Every `.bin` in `shared/interop/brpc/` is one complete frame as it crossed the wire; the
//! expected field values come from that directory's README.txt. Besides decoding them, the
//! tests build the same requests and responses from scratch, the way a brpc client and server
//! fill in RpcMeta, and require the encoder to reproduce the captured bytes exactly: that is
//! what makes a trustwire peer indistinguishable from brpc on the wire.

use std::collections::BTreeSet;

use bytes::{Bytes, BytesMut};
use prost::Message;
use trustwire::wire::{
    masked_crc32c, ChecksumError, DecodeError, Decoder, Frame, RpcMeta, RpcRequestMeta, RpcResponseMeta,
    CHECKSUM_CRC32C, HEADER_LEN, MAGIC,
};

/// The brpc captures: shared/ beside the checkout, or TRUSTWIRE_CAPTURES (a git worktree
/// elsewhere), as tests/common finds them.
fn captures() -> std::path::PathBuf {
    match std::env::var_os("TRUSTWIRE_CAPTURES") {
        Some(dir) => dir.into(),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/interop/brpc"),
    }
}

/// Every capture the README documents. `every_capture_is_covered` keeps this list honest.
const ALL: [&str; 14] = [
    "echo_request.bin",
    "echo_response.bin",
    "attachment_request.bin",
    "attachment_response.bin",
    "checksum_request.bin",
    "checksum_response.bin",
    "timeout_request.bin",
    "timeout_response.bin",
    "error_request.bin",
    "error_response.bin",
    "enomethod_request.bin",
    "enomethod_response.bin",
    "enoservice_request_crafted.bin",
    "enoservice_response.bin",
];

/// The correlation_id brpc's client chose in every capture but the crafted one.
const CID: i64 = 4_294_967_298;
/// EchoRequest/EchoResponse{message: "hello world"}.
const HELLO: &[u8] = b"\x0a\x0bhello world";
const ATTACHMENT: &[u8] = b"my-attachment-bytes";
const ECHO: &str = "example.EchoService";

fn capture(name: &str) -> Vec<u8> {
    let path = captures().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read capture {}: {e}", path.display()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}

/// Decodes a buffer that must hold exactly one frame.
fn decode_one(bytes: &[u8]) -> Frame {
    let mut buf = BytesMut::from(bytes);
    let frame =
        Decoder::default().decode(&mut buf).expect("capture must decode").expect("capture is one complete frame");
    assert!(buf.is_empty(), "{} bytes left over after the frame", buf.len());
    frame
}

fn be32(bytes: &[u8], at: usize) -> usize {
    u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize
}

/// The RpcMeta a brpc client writes: request{service, method, log_id, [timeout_ms]},
/// compress_type 0, correlation_id, [attachment_size], content_type 0, checksum_type 0 and an
/// empty checksum_value (brpc always sends those three, even without a checksum).
fn brpc_request(
    service: &str,
    method: &str,
    log_id: i64,
    timeout_ms: Option<i32>,
    payload: &[u8],
    attachment: &[u8],
) -> Frame {
    Frame {
        meta: RpcMeta {
            request: Some(RpcRequestMeta {
                service_name: Some(service.into()),
                method_name: Some(method.into()),
                log_id: Some(log_id),
                timeout_ms,
                ..Default::default()
            }),
            compress_type: Some(0),
            correlation_id: Some(CID),
            attachment_size: (!attachment.is_empty()).then_some(attachment.len() as i32),
            content_type: Some(0),
            checksum_type: Some(0),
            checksum_value: Some(Bytes::new()),
            ..Default::default()
        },
        payload: Bytes::copy_from_slice(payload),
        attachment: Bytes::copy_from_slice(attachment),
    }
}

/// The RpcMeta a brpc server writes: response{error_code, [error_text]}, compress_type 0,
/// the caller's correlation_id, [attachment_size], content_type 0, checksum_type 0, empty
/// checksum_value. Error responses carry no payload.
fn brpc_response(correlation_id: i64, error: Option<(i32, &str)>, payload: &[u8], attachment: &[u8]) -> Frame {
    Frame {
        meta: RpcMeta {
            response: Some(RpcResponseMeta {
                error_code: Some(error.map_or(0, |e| e.0)),
                error_text: error.map(|e| e.1.to_string()),
            }),
            compress_type: Some(0),
            correlation_id: Some(correlation_id),
            attachment_size: (!attachment.is_empty()).then_some(attachment.len() as i32),
            content_type: Some(0),
            checksum_type: Some(0),
            checksum_value: Some(Bytes::new()),
            ..Default::default()
        },
        payload: Bytes::copy_from_slice(payload),
        attachment: Bytes::copy_from_slice(attachment),
    }
}

/// Each capture as the brpc peer built it, written from the README, not from the bytes.
fn built_from_scratch(name: &str) -> Frame {
    match name {
        "echo_request.bin" => brpc_request(ECHO, "Echo", 0, None, HELLO, b""),
        "echo_response.bin" | "timeout_response.bin" => brpc_response(CID, None, HELLO, b""),
        "attachment_request.bin" => brpc_request(ECHO, "Echo", 0, None, HELLO, ATTACHMENT),
        "attachment_response.bin" => brpc_response(CID, None, HELLO, ATTACHMENT),
        "checksum_request.bin" => {
            // The client computes the CRC; set_checksum must do what brpc does.
            let mut f = brpc_request(ECHO, "Echo", 0, None, HELLO, b"");
            f.set_checksum(false);
            f
        }
        "checksum_response.bin" => {
            // brpc's server answers with checksum_type 0 yet fills checksum_value with the
            // masked CRC32C of its payload (see the capture), so build exactly that.
            let mut f = brpc_response(CID, None, HELLO, b"");
            let crc = masked_crc32c(HELLO, None);
            f.meta.checksum_value = Some(Bytes::copy_from_slice(&crc.to_be_bytes()));
            f
        }
        "timeout_request.bin" => brpc_request(ECHO, "Echo", 0, Some(100), HELLO, b""),
        "error_request.bin" => brpc_request(ECHO, "Echo", 8, None, b"\x0a\x04fail", b""),
        "error_response.bin" => {
            brpc_response(CID, Some((4001, "[127.0.0.1:18001][E4001]deliberate failure requested by client")), b"", b"")
        }
        "enomethod_request.bin" => brpc_request("example.MissingService", "Echo", 7, None, HELLO, b""),
        "enomethod_response.bin" => brpc_response(
            CID,
            Some((1002, "[127.0.0.1:18000][E1002]Fail to find method=example.MissingService/Echo")),
            b"",
            b"",
        ),
        // Hand-encoded, not by brpc: only request{service, method} and correlation_id 42.
        "enoservice_request_crafted.bin" => Frame {
            meta: RpcMeta {
                request: Some(RpcRequestMeta {
                    service_name: Some("NoSuchService".into()),
                    method_name: Some("Echo".into()),
                    ..Default::default()
                }),
                correlation_id: Some(42),
                ..Default::default()
            },
            payload: Bytes::from_static(b"\x0a\x01x"),
            attachment: Bytes::new(),
        },
        "enoservice_response.bin" => {
            brpc_response(42, Some((1001, "[127.0.0.1:18000][E1001]Fail to find service=NoSuchService")), b"", b"")
        }
        other => panic!("no expectation for {other}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The capture set itself
// ---------------------------------------------------------------------------------------------

#[test]
fn every_capture_is_covered() {
    let on_disk: BTreeSet<String> = std::fs::read_dir(captures())
        .expect("capture directory")
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".bin"))
        .collect();
    let listed: BTreeSet<String> = ALL.iter().map(|s| s.to_string()).collect();
    assert_eq!(on_disk, listed, "a capture was added or removed; update ALL and the expectations");
}

#[test]
fn sha256sums_match_the_captures() {
    let sums = std::fs::read_to_string(captures().join("SHA256SUMS")).unwrap();
    let mut seen = BTreeSet::new();
    for line in sums.lines().filter(|l| !l.trim().is_empty()) {
        let (digest, name) = line.split_once("  ").expect("`<hex>  <name>` lines");
        let actual = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &capture(name));
        assert_eq!(hex::encode(actual.as_ref()), digest, "{name} does not match SHA256SUMS");
        seen.insert(name.to_string());
    }
    let all: BTreeSet<String> = ALL.iter().map(|s| s.to_string()).collect();
    assert_eq!(seen, all, "SHA256SUMS must list exactly the captures");
}

#[test]
fn headers_are_consistent() {
    for name in ALL {
        let bytes = capture(name);
        assert_eq!(bytes[..4], MAGIC, "{name}");
        let body = be32(&bytes, 4);
        let meta = be32(&bytes, 8);
        assert_eq!(HEADER_LEN + body, bytes.len(), "{name}: body_size");
        let f = decode_one(&bytes);
        assert_eq!(f.meta.encoded_len(), meta, "{name}: meta_size");
        assert_eq!(meta + f.payload.len() + f.attachment.len(), body, "{name}");
        assert_eq!(f.encoded_len(), bytes.len(), "{name}: encoded_len");
    }
}

// ---------------------------------------------------------------------------------------------
// Field by field, as the README documents them
// ---------------------------------------------------------------------------------------------

/// What a brpc client put in a request capture.
struct Req<'a> {
    service: &'a str,
    method: &'a str,
    log_id: Option<i64>,
    timeout_ms: Option<i32>,
    correlation_id: i64,
    payload: &'a [u8],
    attachment: &'a [u8],
    /// None: the crafted request, which has none of brpc's always-present fields.
    checksum: Option<(i32, &'a [u8])>,
}

fn check_request(name: &str, want: Req<'_>) {
    let f = decode_one(&capture(name));
    let m = &f.meta;
    assert!(m.response.is_none(), "{name}: a request has no response meta");
    let r = m.request.as_ref().unwrap_or_else(|| panic!("{name}: request meta"));
    assert_eq!(r.service_name.as_deref(), Some(want.service), "{name}: service_name");
    assert_eq!(r.method_name.as_deref(), Some(want.method), "{name}: method_name");
    assert_eq!(r.log_id, want.log_id, "{name}: log_id");
    assert_eq!(r.timeout_ms, want.timeout_ms, "{name}: timeout_ms");
    assert_eq!(r.trace_id, None, "{name}");
    assert_eq!(r.span_id, None, "{name}");
    assert_eq!(r.parent_span_id, None, "{name}");
    assert_eq!(r.request_id, None, "{name}");
    assert_eq!(m.correlation_id, Some(want.correlation_id), "{name}: correlation_id");
    check_common(name, &f, want.payload, want.attachment, want.checksum);
}

fn check_response(
    name: &str,
    correlation_id: i64,
    error: Option<(i32, &str)>,
    payload: &[u8],
    attachment: &[u8],
    checksum_value: &[u8],
) {
    let bytes = capture(name);
    let f = decode_one(&bytes);
    let m = &f.meta;
    assert!(m.request.is_none(), "{name}: a response has no request meta");
    let r = m.response.as_ref().unwrap_or_else(|| panic!("{name}: response meta"));
    // brpc always writes error_code, 0 on success; error_text only on failure.
    assert_eq!(r.error_code, Some(error.map_or(0, |e| e.0)), "{name}: error_code");
    assert_eq!(r.error_text.as_deref(), error.map(|e| e.1), "{name}: error_text");
    if let Some((code, text)) = error {
        assert!(text.starts_with("[127.0.0.1:"), "{name}: brpc's [ip:port] prefix");
        assert!(text.contains(&format!("][E{code}]")), "{name}: brpc's [E<code>] prefix");
        // Error responses carry no payload: body_size == meta_size.
        assert_eq!(be32(&bytes, 4), be32(&bytes, 8), "{name}: error without payload");
    }
    assert_eq!(m.correlation_id, Some(correlation_id), "{name}: correlation_id echoed");
    check_common(name, &f, payload, attachment, Some((0, checksum_value)));
}

/// Fields requests and responses share.
fn check_common(name: &str, f: &Frame, payload: &[u8], attachment: &[u8], checksum: Option<(i32, &[u8])>) {
    let m = &f.meta;
    assert_eq!(&f.payload[..], payload, "{name}: payload");
    assert_eq!(&f.attachment[..], attachment, "{name}: attachment");
    // attachment_size is only on the wire when there is an attachment.
    let want_att = (!attachment.is_empty()).then_some(attachment.len() as i32);
    assert_eq!(m.attachment_size, want_att, "{name}: attachment_size");
    match checksum {
        Some((ty, value)) => {
            assert_eq!(m.compress_type, Some(0), "{name}: compress_type");
            assert_eq!(m.content_type, Some(0), "{name}: content_type");
            assert_eq!(m.checksum_type, Some(ty), "{name}: checksum_type");
            assert_eq!(m.checksum_value.as_deref(), Some(value), "{name}: checksum_value");
        }
        None => {
            assert_eq!(m.compress_type, None, "{name}: compress_type");
            assert_eq!(m.content_type, None, "{name}: content_type");
            assert_eq!(m.checksum_type, None, "{name}: checksum_type");
            assert_eq!(m.checksum_value, None, "{name}: checksum_value");
        }
    }
    assert_eq!(m.checksum_with_attachment, None, "{name}");
    assert_eq!(m.chunk_info, None, "{name}");
    assert_eq!(m.authentication_data, None, "{name}");
    assert_eq!(m.stream_settings, None, "{name}");
    assert!(m.user_fields.is_empty(), "{name}");
}

const NO_SUM: Option<(i32, &[u8])> = Some((0, b""));
const CRC: [u8; 4] = [0xd3, 0x8c, 0xab, 0x46];

fn echo_req<'a>(payload: &'a [u8], attachment: &'a [u8]) -> Req<'a> {
    Req {
        service: ECHO,
        method: "Echo",
        log_id: Some(0),
        timeout_ms: None,
        correlation_id: CID,
        payload,
        attachment,
        checksum: NO_SUM,
    }
}

#[test]
fn echo_capture_fields() {
    check_request("echo_request.bin", echo_req(HELLO, b""));
    check_response("echo_response.bin", CID, None, HELLO, b"", b"");
}

#[test]
fn attachment_capture_fields() {
    check_request("attachment_request.bin", echo_req(HELLO, ATTACHMENT));
    check_response("attachment_response.bin", CID, None, HELLO, ATTACHMENT, b"");
}

#[test]
fn checksum_capture_fields() {
    check_request("checksum_request.bin", Req { checksum: Some((CHECKSUM_CRC32C, &CRC)), ..echo_req(HELLO, b"") });
    // The server's response says checksum_type 0 but still carries the CRC value.
    check_response("checksum_response.bin", CID, None, HELLO, b"", &CRC);
}

#[test]
fn timeout_capture_fields() {
    check_request("timeout_request.bin", Req { timeout_ms: Some(100), ..echo_req(HELLO, b"") });
    check_response("timeout_response.bin", CID, None, HELLO, b"", b"");
}

#[test]
fn error_capture_fields() {
    check_request("error_request.bin", Req { log_id: Some(8), ..echo_req(b"\x0a\x04fail", b"") });
    check_response(
        "error_response.bin",
        CID,
        Some((4001, "[127.0.0.1:18001][E4001]deliberate failure requested by client")),
        b"",
        b"",
        b"",
    );
}

#[test]
fn enomethod_capture_fields() {
    check_request(
        "enomethod_request.bin",
        Req { service: "example.MissingService", log_id: Some(7), ..echo_req(HELLO, b"") },
    );
    check_response(
        "enomethod_response.bin",
        CID,
        Some((1002, "[127.0.0.1:18000][E1002]Fail to find method=example.MissingService/Echo")),
        b"",
        b"",
        b"",
    );
}

#[test]
fn enoservice_capture_fields() {
    check_request(
        "enoservice_request_crafted.bin",
        Req {
            service: "NoSuchService",
            method: "Echo",
            log_id: None,
            timeout_ms: None,
            correlation_id: 42,
            payload: b"\x0a\x01x",
            attachment: b"",
            checksum: None,
        },
    );
    check_response(
        "enoservice_response.bin",
        42,
        Some((1001, "[127.0.0.1:18000][E1001]Fail to find service=NoSuchService")),
        b"",
        b"",
        b"",
    );
}

// ---------------------------------------------------------------------------------------------
// Encoding: from scratch and round trip, byte for byte
// ---------------------------------------------------------------------------------------------

fn assert_bytes_eq(name: &str, what: &str, got: &[u8], want: &[u8]) {
    assert!(
        got == want,
        "{name}: {what} differs\n  got  ({} bytes): {}\n  want ({} bytes): {}",
        got.len(),
        hex(got),
        want.len(),
        hex(want)
    );
}

#[test]
fn responses_built_from_scratch_match_brpc_bytes() {
    for name in ALL.iter().filter(|n| n.contains("_response")) {
        let frame = built_from_scratch(name);
        assert_bytes_eq(name, "encoding", &frame.to_bytes().unwrap(), &capture(name));
        assert_eq!(decode_one(&capture(name)), frame, "{name}: decoded frame");
    }
}

#[test]
fn requests_built_from_scratch_match_brpc_bytes() {
    for name in ALL.iter().filter(|n| n.contains("_request")) {
        let frame = built_from_scratch(name);
        assert_bytes_eq(name, "encoding", &frame.to_bytes().unwrap(), &capture(name));
        assert_eq!(decode_one(&capture(name)), frame, "{name}: decoded frame");
    }
}

#[test]
fn encode_appends_to_existing_bytes() {
    let mut out = BytesMut::from(&b"prefix"[..]);
    let frame = built_from_scratch("attachment_request.bin");
    frame.encode(&mut out).unwrap();
    assert_eq!(&out[..6], b"prefix");
    assert_bytes_eq("attachment_request.bin", "encode", &out[6..], &capture("attachment_request.bin"));
}

#[test]
fn decode_then_encode_reproduces_every_capture() {
    for name in ALL {
        let bytes = capture(name);
        let frame = decode_one(&bytes);
        assert_bytes_eq(name, "re-encoding", &frame.to_bytes().unwrap(), &bytes);
        let mut out = BytesMut::new();
        frame.encode(&mut out).unwrap();
        assert_bytes_eq(name, "encode()", &out, &bytes);
    }
}

// ---------------------------------------------------------------------------------------------
// Checksums
// ---------------------------------------------------------------------------------------------

#[test]
fn crc32c_worked_example() {
    assert_eq!(crc32c::crc32c(HELLO), 0xe037_1884, "plain CRC32C of 0a 0b \"hello world\"");
    // The leveldb mask, spelled out as the README gives it.
    let c: u32 = 0xe037_1884;
    #[allow(clippy::manual_rotate)] // written as the README's formula on purpose
    let masked = ((c >> 15) | (c << 17)).wrapping_add(0xa282_ead8);
    assert_eq!(masked, 0xd38c_ab46);
    assert_eq!(masked_crc32c(HELLO, None), 0xd38c_ab46);
    assert_eq!(masked_crc32c(HELLO, None).to_be_bytes(), CRC);
    // With an empty attachment appended the value does not change.
    assert_eq!(masked_crc32c(HELLO, Some(b"")), 0xd38c_ab46);
    // Appending the attachment is the CRC of the concatenation.
    let mut joined = HELLO.to_vec();
    joined.extend_from_slice(ATTACHMENT);
    assert_eq!(masked_crc32c(HELLO, Some(ATTACHMENT)), masked_crc32c(&joined, None));
}

#[test]
fn verify_checksum_accepts_every_capture() {
    for name in ALL {
        assert_eq!(decode_one(&capture(name)).verify_checksum(), Ok(()), "{name}");
    }
}

#[test]
fn verify_checksum_rejects_a_flipped_payload_byte() {
    let mut bytes = capture("checksum_request.bin");
    let frame = decode_one(&bytes);
    assert_eq!(frame.meta.checksum_type, Some(CHECKSUM_CRC32C));
    frame.verify_checksum().expect("brpc's CRC verifies");

    // Flip one bit in the payload's last byte ('d' of "hello world").
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    let tampered = decode_one(&bytes);
    let mut hello = HELLO.to_vec();
    *hello.last_mut().unwrap() ^= 0x01;
    assert_eq!(&tampered.payload[..], &hello[..]);
    assert_eq!(
        tampered.verify_checksum(),
        Err(ChecksumError::Mismatch { expected: CRC.to_vec(), actual: masked_crc32c(&hello, None) })
    );

    // Every single-byte change of the payload is caught (CRC32C detects all of them).
    for i in 0..HELLO.len() {
        let mut bytes = capture("checksum_request.bin");
        let at = bytes.len() - HELLO.len() + i;
        bytes[at] ^= 0x80;
        assert!(
            matches!(decode_one(&bytes).verify_checksum(), Err(ChecksumError::Mismatch { .. })),
            "payload byte {i}"
        );
    }
}

#[test]
fn set_checksum_with_attachment_covers_the_attachment() {
    let mut frame = decode_one(&capture("attachment_request.bin"));
    frame.set_checksum(true);
    assert_eq!(frame.meta.checksum_with_attachment, Some(true));
    let bytes = frame.to_bytes().unwrap();
    assert_eq!(decode_one(&bytes).verify_checksum(), Ok(()));

    // Tamper with the attachment (the frame's last byte).
    let mut tampered = bytes.to_vec();
    *tampered.last_mut().unwrap() ^= 0x20;
    assert!(matches!(decode_one(&tampered).verify_checksum(), Err(ChecksumError::Mismatch { .. })));

    // Without checksum_with_attachment the attachment is not covered.
    frame.set_checksum(false);
    assert_eq!(frame.meta.checksum_with_attachment, None);
    let mut tampered = frame.to_bytes().unwrap().to_vec();
    *tampered.last_mut().unwrap() ^= 0x20;
    assert_eq!(decode_one(&tampered).verify_checksum(), Ok(()));
}

// ---------------------------------------------------------------------------------------------
// Streaming decode
// ---------------------------------------------------------------------------------------------

/// Feeds `input` in pieces of the given sizes (cycled), decoding everything available after
/// each piece, and checks that `Ok(None)` never consumes anything.
fn decode_in_pieces(input: &[u8], sizes: &[usize]) -> Vec<Frame> {
    let mut dec = Decoder::default();
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut fed = 0;
    let mut sizes = sizes.iter().cycle();
    while fed < input.len() {
        let n = (*sizes.next().unwrap()).min(input.len() - fed);
        buf.extend_from_slice(&input[fed..fed + n]);
        fed += n;
        loop {
            let before = buf.clone();
            match dec.decode(&mut buf) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => {
                    assert_eq!(buf, before, "Ok(None) must not consume anything");
                    break;
                }
                Err(e) => panic!("valid input gave {e:?} after {fed} bytes"),
            }
        }
    }
    assert!(buf.is_empty(), "{} bytes left over", buf.len());
    frames
}

#[test]
fn byte_at_a_time_decode_of_every_capture() {
    let dec = Decoder::default();
    for name in ALL {
        let bytes = capture(name);
        let mut buf = BytesMut::new();
        for (i, &b) in bytes.iter().enumerate() {
            // `wanted` asks for the rest of the header, then for exactly the rest of the frame.
            let missing = if i < HEADER_LEN { HEADER_LEN - i } else { bytes.len() - i };
            assert_eq!(dec.wanted(&buf), missing, "{name}: wanted after {i} bytes");
            buf.extend_from_slice(&[b]);
            let got = Decoder::default().decode(&mut buf);
            if i + 1 < bytes.len() {
                assert_eq!(got, Ok(None), "{name}: {} of {} bytes", i + 1, bytes.len());
                assert_eq!(&buf[..], &bytes[..=i], "{name}: nothing consumed");
            } else {
                assert_eq!(got, Ok(Some(decode_one(&bytes))), "{name}: complete");
                assert!(buf.is_empty());
            }
        }
        assert_eq!(decode_in_pieces(&bytes, &[1]), vec![decode_one(&bytes)], "{name}");
    }
}

#[test]
fn concatenated_captures_decode_identically() {
    let mut stream = Vec::new();
    let mut expected = Vec::new();
    // Every capture twice, in two orders, so frames start at every kind of offset.
    for name in ALL.iter().chain(ALL.iter().rev()) {
        let bytes = capture(name);
        stream.extend_from_slice(&bytes);
        expected.push(decode_one(&bytes));
    }
    // Whole buffer at once.
    assert_eq!(decode_in_pieces(&stream, &[stream.len()]), expected);
    // One byte at a time, and irregular piece sizes that straddle headers and frames.
    assert_eq!(decode_in_pieces(&stream, &[1]), expected);
    for sizes in [&[2usize][..], &[3, 7, 1, 12, 5], &[11, 13], &[64, 1, 100], &[43, 70]] {
        assert_eq!(decode_in_pieces(&stream, sizes), expected, "piece sizes {sizes:?}");
    }
}

#[test]
fn a_partial_frame_after_complete_ones_waits() {
    let mut stream = capture("echo_request.bin");
    let second = capture("attachment_request.bin");
    stream.extend_from_slice(&second[..20]);
    let mut buf = BytesMut::from(&stream[..]);
    let mut dec = Decoder::default();
    assert_eq!(dec.decode(&mut buf).unwrap(), Some(decode_one(&capture("echo_request.bin"))));
    assert_eq!(dec.decode(&mut buf), Ok(None));
    assert_eq!(&buf[..], &second[..20]);
    buf.extend_from_slice(&second[20..]);
    assert_eq!(dec.decode(&mut buf).unwrap(), Some(decode_one(&second)));
    assert!(buf.is_empty());
}

/// No capture, on its own, is ever a decode error.
#[test]
fn captures_never_produce_errors() {
    for name in ALL {
        let r: Result<Option<Frame>, DecodeError> = Decoder::default().decode(&mut BytesMut::from(&capture(name)[..]));
        assert!(matches!(r, Ok(Some(_))), "{name}: {r:?}");
    }
}
