//! Malformed baidu_std input: every case gives the documented `DecodeError` (or is tolerated,
//! as unknown meta fields must be), consumes exactly what the decoder's contract says, and
//! never panics.
//!
//! Contract under test (`Decoder::decode`): `Ok(None)` consumes nothing; an error for which
//! `stream_in_sync()` is true consumed exactly the bad frame, so the next frame still decodes;
//! any other error consumed nothing and the connection is to be dropped.

use bytes::{Bytes, BytesMut};
use prost::Message;
use trustwire::wire::{
    ChecksumError, DecodeError, Decoder, EncodeError, Frame, RpcMeta, RpcRequestMeta, RpcResponseMeta,
    DEFAULT_MAX_BODY, HEADER_LEN,
};

/// The brpc captures: shared/ beside the checkout, or TRUSTWIRE_CAPTURES (a git worktree
/// elsewhere), as tests/common finds them.
fn captures() -> std::path::PathBuf {
    match std::env::var_os("TRUSTWIRE_CAPTURES") {
        Some(dir) => dir.into(),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/interop/brpc"),
    }
}

fn capture(name: &str) -> Vec<u8> {
    std::fs::read(captures().join(name)).expect("capture")
}

fn all_captures() -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(captures())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".bin"))
        .map(|n| {
            let b = capture(&n);
            (n, b)
        })
        .collect();
    v.sort();
    assert_eq!(v.len(), 14, "expected the 14 brpc captures");
    v
}

/// A 12-byte header with arbitrary sizes.
fn header(body_size: u32, meta_size: u32) -> Vec<u8> {
    let mut h = b"PRPC".to_vec();
    h.extend_from_slice(&body_size.to_be_bytes());
    h.extend_from_slice(&meta_size.to_be_bytes());
    h
}

/// A frame with correct sizes around raw meta bytes (valid or not) and the rest of the body.
fn raw_frame(meta: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut f = header((meta.len() + rest.len()) as u32, meta.len() as u32);
    f.extend_from_slice(meta);
    f.extend_from_slice(rest);
    f
}

fn meta_frame(meta: &RpcMeta, rest: &[u8]) -> Vec<u8> {
    raw_frame(&meta.encode_to_vec(), rest)
}

fn decode(dec: &mut Decoder, buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
    dec.decode(buf)
}

/// Asserts that decoding `input` fails with `want` and consumes nothing (a fatal error).
fn assert_fatal(dec: &mut Decoder, input: &[u8], want: &DecodeError) {
    let mut buf = BytesMut::from(input);
    let got = decode(dec, &mut buf);
    assert_eq!(got.as_ref(), Err(want), "input {:02x?}", &input[..input.len().min(32)]);
    assert!(!want.stream_in_sync(), "{want:?} must be fatal");
    assert_eq!(&buf[..], input, "a fatal error must consume nothing");
    // Asking again gives the same answer: the decoder keeps no hidden state.
    assert_eq!(decode(dec, &mut buf).as_ref(), Err(want));
}

fn bad_magic(found: &[u8]) -> DecodeError {
    let mut f = [0u8; 4];
    f[..found.len()].copy_from_slice(found);
    DecodeError::BadMagic { found: f }
}

// ---------------------------------------------------------------------------------------------
// Magic
// ---------------------------------------------------------------------------------------------

const HTTP: &[u8] = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";
/// The start of a TLS record carrying a ClientHello: handshake(0x16), TLS 1.0 record version,
/// length, then handshake type 1.
const CLIENT_HELLO: &[u8] = &[0x16, 0x03, 0x01, 0x00, 0xf4, 0x01, 0x00, 0x00, 0xf0, 0x03, 0x03];

#[test]
fn plaintext_http_is_bad_magic() {
    let mut dec = Decoder::default();
    let e = bad_magic(b"GET ");
    assert_fatal(&mut dec, HTTP, &e);
    assert_eq!(e.name(), "bad_magic");
    assert!(e.to_string().contains("PRPC"), "{e}");
}

#[test]
fn tls_client_hello_is_bad_magic() {
    assert_fatal(&mut Decoder::default(), CLIENT_HELLO, &bad_magic(&CLIENT_HELLO[..4]));
}

#[test]
fn bad_magic_is_detected_before_four_bytes_arrive() {
    let mut dec = Decoder::default();
    for input in [HTTP, CLIENT_HELLO, b"prpc", b"PX", b"PRX", b"PRPX", b"\0\0\0\0"] {
        // The first byte that differs from "PRPC" is already enough.
        let first_bad = input.iter().zip(b"PRPC").position(|(a, b)| a != b).unwrap();
        for n in first_bad + 1..=input.len().min(4) {
            assert_fatal(&mut dec, &input[..n], &bad_magic(&input[..n]));
        }
    }
    // A correct prefix of the magic is just too short.
    for n in 0..4 {
        let mut buf = BytesMut::from(&b"PRPC"[..n]);
        assert_eq!(dec.decode(&mut buf), Ok(None), "{n} bytes of magic");
        assert_eq!(buf.len(), n);
    }
}

#[test]
fn bad_magic_after_a_good_frame() {
    let good = capture("echo_request.bin");
    let mut input = good.clone();
    input.extend_from_slice(HTTP);
    let mut buf = BytesMut::from(&input[..]);
    let mut dec = Decoder::default();
    assert!(matches!(dec.decode(&mut buf), Ok(Some(_))));
    assert_eq!(dec.decode(&mut buf), Err(bad_magic(b"GET ")));
    assert_eq!(&buf[..], HTTP, "the bytes after the good frame are left alone");
}

// ---------------------------------------------------------------------------------------------
// Sizes
// ---------------------------------------------------------------------------------------------

#[test]
fn meta_size_larger_than_body_skips_the_frame() {
    let next = capture("attachment_request.bin");
    let mut input = header(4, 5);
    input.extend_from_slice(b"abcd");
    input.extend_from_slice(&next);
    let mut buf = BytesMut::from(&input[..]);
    let mut dec = Decoder::default();

    let e = dec.decode(&mut buf).unwrap_err();
    assert_eq!(e, DecodeError::MetaSizeExceedsBody { meta_size: 5, body_size: 4 });
    assert!(e.stream_in_sync());
    assert_eq!(e.name(), "meta_size_exceeds_body");
    assert_eq!(&buf[..], &next[..], "exactly the bad frame was consumed");

    let f = dec.decode(&mut buf).unwrap().expect("the next frame still decodes");
    assert_eq!(f.to_bytes().unwrap(), next);
    assert!(buf.is_empty());

    // Extreme sizes: an empty body with a huge meta_size.
    let mut buf = BytesMut::from(&header(0, u32::MAX)[..]);
    assert_eq!(
        dec.decode(&mut buf),
        Err(DecodeError::MetaSizeExceedsBody { meta_size: u32::MAX as usize, body_size: 0 })
    );
    assert!(buf.is_empty());
}

#[test]
fn meta_size_larger_than_body_waits_for_the_whole_body() {
    // The frame is only judged (and skipped) once all of it has arrived.
    let mut input = header(10, 20);
    input.extend_from_slice(b"abc");
    let mut buf = BytesMut::from(&input[..]);
    assert_eq!(Decoder::default().decode(&mut buf), Ok(None));
    assert_eq!(&buf[..], &input[..]);
}

#[test]
fn body_over_the_limit_is_fatal() {
    let echo = capture("echo_request.bin"); // body_size 58
    assert_fatal(&mut Decoder::new(16), &echo, &DecodeError::BodyTooLarge { body_size: 58, limit: 16 });
    assert_fatal(&mut Decoder::new(57), &echo, &DecodeError::BodyTooLarge { body_size: 58, limit: 57 });
    // Exactly at the limit is fine.
    assert!(matches!(Decoder::new(58).decode(&mut BytesMut::from(&echo[..])), Ok(Some(_))));
    assert_eq!(Decoder::new(16).max_body(), 16);
    assert_eq!(DecodeError::BodyTooLarge { body_size: 1, limit: 0 }.name(), "body_too_large");
}

#[test]
fn body_over_the_limit_is_known_from_the_header_alone() {
    // brpc's 64 MiB default: the header is enough, the body need not (and will not) arrive.
    let mut dec = Decoder::default();
    assert_eq!(dec.max_body(), DEFAULT_MAX_BODY);
    for body in [DEFAULT_MAX_BODY as u32 + 1, 0x7fff_ffff, u32::MAX] {
        assert_fatal(
            &mut dec,
            &header(body, 0),
            &DecodeError::BodyTooLarge { body_size: body as usize, limit: DEFAULT_MAX_BODY },
        );
    }
    // Up to the limit, a header alone only means "wait".
    let mut small = Decoder::new(1000);
    let mut buf = BytesMut::from(&header(1000, 0)[..]);
    assert_eq!(small.decode(&mut buf), Ok(None));
    assert_eq!(buf.len(), HEADER_LEN);
    assert_eq!(small.wanted(&buf), 1000);
    // `wanted` never asks for more than the limit allows.
    assert_eq!(small.wanted(&header(u32::MAX, 0)), 1000);
}

#[test]
fn truncated_frames_wait_and_consume_nothing() {
    let mut dec = Decoder::default();
    for (name, bytes) in all_captures() {
        for n in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..n]);
            assert_eq!(dec.decode(&mut buf), Ok(None), "{name} cut to {n} bytes");
            assert_eq!(&buf[..], &bytes[..n], "{name} cut to {n} bytes: nothing consumed");
            assert!(dec.wanted(&buf) > 0);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// RpcMeta
// ---------------------------------------------------------------------------------------------

#[test]
fn undecodable_meta_is_fatal() {
    let cases: &[(&str, &[u8])] = &[
        ("varint never ends", &[0xff; 8]),
        ("varint longer than 10 bytes", &[0x20, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]),
        ("field number 0", &[0x00, 0x01]),
        ("wire type 7", &[0x0f, 0x00]),
        ("wire type 6", &[0x0e, 0x00]),
        ("length past the end of the meta", &[0x0a, 0x20, 0x0a]),
        ("correlation_id as length-delimited", &[0x22, 0x00]),
        ("request as varint", &[0x08, 0x01]),
        ("service_name as varint inside request", &[0x0a, 0x02, 0x08, 0x01]),
        ("service_name not UTF-8", &[0x0a, 0x04, 0x0a, 0x02, 0xff, 0xfe]),
        ("error_text not UTF-8", &[0x12, 0x03, 0x12, 0x01, 0x80]),
        ("user_fields value not UTF-8", &[0x4a, 0x05, 0x0a, 0x00, 0x12, 0x01, 0xc3]),
        ("end group without start", &[0x0c]),
        ("truncated fixed64", &[0x09, 0x01, 0x02]),
        ("plain garbage", b"\xde\xad\xbe\xef garbage"),
    ];
    let mut dec = Decoder::default();
    for (what, meta) in cases {
        for rest in [&b""[..], b"\x0a\x0bhello world"] {
            let input = raw_frame(meta, rest);
            let mut buf = BytesMut::from(&input[..]);
            match dec.decode(&mut buf) {
                Err(e @ DecodeError::BadMeta { .. }) => {
                    assert!(!e.stream_in_sync(), "{what}");
                    assert_eq!(e.name(), "bad_meta");
                    let DecodeError::BadMeta { reason } = &e else { unreachable!() };
                    assert!(!reason.is_empty(), "{what}: a reason for the log");
                    assert_eq!(&buf[..], &input[..], "{what}: a fatal error consumes nothing");
                }
                other => panic!("{what}: expected BadMeta, got {other:?}"),
            }
        }
    }
}

#[test]
fn attachment_size_that_does_not_fit_skips_the_frame() {
    let payload = b"\x0a\x0bhello world";
    let next = capture("echo_response.bin");
    let mut dec = Decoder::default();
    for (cid, att) in [
        (Some(7), -1),
        (Some(i64::MAX), i32::MIN),
        (Some(-3), payload.len() as i32 + 1),
        (None, 100),
        (Some(0), i32::MAX),
    ] {
        let meta = RpcMeta { correlation_id: cid, attachment_size: Some(att), ..Default::default() };
        let meta_len = meta.encoded_len();
        let mut input = meta_frame(&meta, payload);
        input.extend_from_slice(&next);
        let mut buf = BytesMut::from(&input[..]);

        let e = dec.decode(&mut buf).unwrap_err();
        assert_eq!(
            e,
            DecodeError::BadAttachmentSize {
                correlation_id: cid,
                attachment_size: att.into(),
                available: payload.len(),
            },
            "attachment_size {att} (meta {meta_len} bytes)"
        );
        assert!(e.stream_in_sync(), "the sender can be answered with its correlation_id");
        assert_eq!(e.name(), "bad_attachment_size");
        assert_eq!(&buf[..], &next[..], "exactly the bad frame was consumed");
        assert!(matches!(dec.decode(&mut buf), Ok(Some(_))), "the next frame still decodes");
        assert!(buf.is_empty());
    }
}

#[test]
fn attachment_size_at_the_boundaries_is_accepted() {
    let body = b"\x0a\x0bhello world";
    let mut dec = Decoder::default();
    // The whole rest of the body is attachment: the payload is empty.
    let meta = RpcMeta { attachment_size: Some(body.len() as i32), ..Default::default() };
    let f = dec.decode(&mut BytesMut::from(&meta_frame(&meta, body)[..])).unwrap().unwrap();
    assert!(f.payload.is_empty());
    assert_eq!(&f.attachment[..], body);
    // An explicit attachment_size of 0 is kept (and re-encoded) as present.
    let meta = RpcMeta { attachment_size: Some(0), ..Default::default() };
    let input = meta_frame(&meta, body);
    let f = dec.decode(&mut BytesMut::from(&input[..])).unwrap().unwrap();
    assert_eq!(f.meta.attachment_size, Some(0));
    assert_eq!(&f.payload[..], body);
    assert!(f.attachment.is_empty());
    assert_eq!(f.to_bytes().unwrap(), input);
}

#[test]
fn an_empty_meta_is_a_valid_frame() {
    // Neither request nor response: the codec accepts it; rejecting it is the RPC layer's job.
    let f = Decoder::default().decode(&mut BytesMut::from(&header(0, 0)[..])).unwrap().unwrap();
    assert_eq!(f, Frame::default());
    assert_eq!(f.to_bytes().unwrap(), header(0, 0));
}

/// Appends a protobuf key (field number, wire type) as a varint.
fn key(out: &mut Vec<u8>, field: u32, wire_type: u32) {
    prost::encoding::encode_varint(u64::from(field << 3 | wire_type), out);
}

#[test]
fn unknown_meta_fields_are_ignored() {
    let original = capture("echo_request.bin");
    let expected = Decoder::default().decode(&mut BytesMut::from(&original[..])).unwrap().unwrap();
    let meta_len = u32::from_be_bytes(original[8..12].try_into().unwrap()) as usize;
    let meta = &original[HEADER_LEN..HEADER_LEN + meta_len];
    let rest = &original[HEADER_LEN + meta_len..];

    // Fields 100 and 101 (reserved for other implementations), plus every other wire type.
    let mut unknown = Vec::new();
    key(&mut unknown, 100, 0); // varint
    prost::encoding::encode_varint(123_456_789, &mut unknown);
    key(&mut unknown, 101, 2); // bytes
    unknown.extend_from_slice(&[5, b'x', b't', b'r', b'a', 0xff]);
    key(&mut unknown, 102, 1); // fixed64
    unknown.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
    key(&mut unknown, 103, 5); // fixed32
    unknown.extend_from_slice(&[1, 2, 3, 4]);
    key(&mut unknown, 104, 3); // a (deprecated) group holding a varint
    key(&mut unknown, 1, 0);
    unknown.push(1);
    key(&mut unknown, 104, 4);

    for placement in ["after", "before", "both"] {
        let mut m = Vec::new();
        if placement != "after" {
            m.extend_from_slice(&unknown);
        }
        m.extend_from_slice(meta);
        if placement != "before" {
            m.extend_from_slice(&unknown);
        }
        let input = raw_frame(&m, rest);
        let f = Decoder::default().decode(&mut BytesMut::from(&input[..])).unwrap().unwrap();
        assert_eq!(f, expected, "unknown fields {placement} the known ones");
        // They are not kept: re-encoding gives what brpc itself sent.
        assert_eq!(f.to_bytes().unwrap(), original);
    }

    // Unknown fields inside the request and response sub-messages are ignored too.
    let mut m = Vec::new();
    key(&mut m, 1, 2);
    let mut req = Vec::new();
    key(&mut req, 1, 2);
    req.extend_from_slice(&[3, b'S', b'v', b'c']);
    key(&mut req, 100, 0);
    req.push(1);
    key(&mut req, 2, 2);
    req.extend_from_slice(&[1, b'M']);
    m.push(req.len() as u8);
    m.extend_from_slice(&req);
    key(&mut m, 2, 2);
    let mut resp = Vec::new();
    key(&mut resp, 101, 2);
    resp.extend_from_slice(&[1, 0]);
    key(&mut resp, 1, 0);
    resp.push(5);
    m.push(resp.len() as u8);
    m.extend_from_slice(&resp);
    let f = Decoder::default().decode(&mut BytesMut::from(&raw_frame(&m, b"")[..])).unwrap();
    let meta = f.unwrap().meta;
    assert_eq!(
        meta.request,
        Some(RpcRequestMeta { service_name: Some("Svc".into()), method_name: Some("M".into()), ..Default::default() })
    );
    assert_eq!(meta.response, Some(RpcResponseMeta { error_code: Some(5), error_text: None }));
}

#[test]
fn unsupported_checksum_type_is_reported() {
    for ty in [2, 3, -1, i32::MAX] {
        let meta = RpcMeta {
            checksum_type: Some(ty),
            checksum_value: Some(Bytes::from_static(&[1, 2, 3, 4])),
            ..Default::default()
        };
        let input = meta_frame(&meta, b"payload");
        let f = Decoder::default().decode(&mut BytesMut::from(&input[..])).unwrap().unwrap();
        assert_eq!(f.verify_checksum(), Err(ChecksumError::Unsupported(ty)));
        assert!(f.verify_checksum().unwrap_err().to_string().contains(&ty.to_string()));
    }
}

#[test]
fn crc32c_with_a_missing_or_malformed_value_is_a_mismatch() {
    let crc = trustwire::wire::masked_crc32c(b"payload", None);
    for value in [None, Some(&[][..]), Some(&[1, 2, 3][..]), Some(&[0; 5][..])] {
        let f = Frame {
            meta: RpcMeta {
                checksum_type: Some(1),
                checksum_value: value.map(Bytes::copy_from_slice),
                ..Default::default()
            },
            payload: Bytes::from_static(b"payload"),
            attachment: Bytes::new(),
        };
        assert_eq!(
            f.verify_checksum(),
            Err(ChecksumError::Mismatch { expected: value.unwrap_or(&[]).to_vec(), actual: crc })
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

#[test]
fn encode_rejects_an_attachment_size_mismatch() {
    let cases: &[(Option<i32>, &[u8], i64)] = &[
        (Some(5), b"abc", 5),
        (None, b"abc", 0),
        (Some(0), b"abc", 0),
        (Some(3), b"", 3),
        (Some(-1), b"", -1),
        (Some(i32::MIN), b"x", i64::from(i32::MIN)),
    ];
    for &(declared, attachment, want) in cases {
        let f = Frame {
            meta: RpcMeta { attachment_size: declared, correlation_id: Some(1), ..Default::default() },
            payload: Bytes::from_static(b"p"),
            attachment: Bytes::copy_from_slice(attachment),
        };
        let err = EncodeError::AttachmentSizeMismatch { declared: want, actual: attachment.len() };
        assert_eq!(f.to_bytes(), Err(err.clone()), "{declared:?} vs {attachment:?}");
        let mut out = BytesMut::from(&b"keep"[..]);
        assert_eq!(f.encode(&mut out), Err(err));
        assert_eq!(&out[..], b"keep", "nothing is written on error");
    }
    // The consistent cases encode.
    for (declared, attachment) in [(None, &b""[..]), (Some(0), b""), (Some(3), b"abc")] {
        let f = Frame {
            meta: RpcMeta { attachment_size: declared, ..Default::default() },
            payload: Bytes::new(),
            attachment: Bytes::copy_from_slice(attachment),
        };
        assert!(f.to_bytes().is_ok());
    }
}

// ---------------------------------------------------------------------------------------------
// No panics, and the consumption contract, on systematically damaged captures
// ---------------------------------------------------------------------------------------------

/// Decodes everything in `input`, checking the consumption contract at each step. Returns
/// (frames, errors).
fn decode_all_checked(input: &[u8]) -> (usize, Vec<&'static str>) {
    let mut dec = Decoder::default();
    let mut buf = BytesMut::from(input);
    let (mut frames, mut errors) = (0, Vec::new());
    loop {
        let before = buf.clone();
        let frame_len = (before.len() >= HEADER_LEN)
            .then(|| HEADER_LEN + u32::from_be_bytes(before[4..8].try_into().unwrap()) as usize);
        match dec.decode(&mut buf) {
            Ok(Some(f)) => {
                frames += 1;
                assert_eq!(before.len() - buf.len(), frame_len.unwrap(), "one whole frame");
                let _ = f.verify_checksum();
                let again = f.to_bytes().expect("a decoded frame always re-encodes");
                let g = Decoder::new(usize::MAX).decode(&mut BytesMut::from(&again[..]));
                assert_eq!(g, Ok(Some(f)), "re-encoded frame decodes to the same frame");
            }
            Ok(None) => {
                assert_eq!(buf, before, "Ok(None) consumes nothing");
                return (frames, errors);
            }
            Err(e) => {
                let _ = e.to_string();
                errors.push(e.name());
                if e.stream_in_sync() {
                    assert_eq!(before.len() - buf.len(), frame_len.unwrap(), "{e:?}");
                } else {
                    assert_eq!(buf, before, "{e:?} consumes nothing");
                    return (frames, errors);
                }
            }
        }
    }
}

#[test]
fn damaged_captures_never_panic() {
    let captures = all_captures();
    let mut stream = Vec::new();
    for (_, b) in &captures {
        stream.extend_from_slice(b);
    }
    assert_eq!(decode_all_checked(&stream), (captures.len(), vec![]));

    let mut outcomes = std::collections::BTreeMap::<&str, usize>::new();
    for (_, bytes) in &captures {
        for i in 0..bytes.len() {
            for v in [0x00, 0xff, 0x7f, 0x80, 0x01, bytes[i] ^ 0x01, bytes[i] ^ 0x80] {
                let mut m = bytes.clone();
                m[i] = v;
                // Followed by an intact frame, to exercise resynchronisation too.
                m.extend_from_slice(bytes);
                let (_, errors) = decode_all_checked(&m);
                for e in errors {
                    *outcomes.entry(e).or_default() += 1;
                }
            }
            // Byte deleted / inserted: sizes no longer match the content.
            let mut del = bytes.clone();
            del.remove(i);
            decode_all_checked(&del);
            let mut ins = bytes.clone();
            ins.insert(i, 0x80);
            decode_all_checked(&ins);
        }
    }
    // The damage reaches every kind of error.
    for name in ["bad_magic", "body_too_large", "meta_size_exceeds_body", "bad_meta"] {
        assert!(outcomes.contains_key(name), "no {name} among {outcomes:?}");
    }
}
