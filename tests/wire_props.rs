//! Property tests for the baidu_std codec: any frame we can build survives encode → decode
//! unchanged, however the bytes are split across reads, and a checksum we set always verifies.

use bytes::{Bytes, BytesMut};
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use trustwire::wire::{
    ChunkInfo, Decoder, Frame, RpcMeta, RpcRequestMeta, RpcResponseMeta, StreamSettings, COPY_BODIES_BELOW,
};

fn text() -> impl Strategy<Value = String> {
    // Mostly ASCII names, sometimes arbitrary Unicode.
    prop_oneof![3 => "[a-zA-Z0-9_.]{0,24}", 1 => any::<String>()]
}

fn bytes_up_to(n: usize) -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..n).prop_map(Bytes::from)
}

fn request_meta() -> impl Strategy<Value = RpcRequestMeta> {
    (
        option::of(text()),
        option::of(text()),
        option::of(any::<i64>()),
        (option::of(any::<i64>()), option::of(any::<i64>()), option::of(any::<i64>())),
        option::of(text()),
        option::of(any::<i32>()),
    )
        .prop_map(
            |(service_name, method_name, log_id, (trace_id, span_id, parent_span_id), request_id, timeout_ms)| {
                RpcRequestMeta {
                    service_name,
                    method_name,
                    log_id,
                    trace_id,
                    span_id,
                    parent_span_id,
                    request_id,
                    timeout_ms,
                }
            },
        )
}

fn response_meta() -> impl Strategy<Value = RpcResponseMeta> {
    (option::of(any::<i32>()), option::of(text()))
        .prop_map(|(error_code, error_text)| RpcResponseMeta { error_code, error_text })
}

fn meta() -> impl Strategy<Value = RpcMeta> {
    (
        (option::of(request_meta()), option::of(response_meta())),
        (option::of(any::<i32>()), option::of(any::<i64>())),
        option::of((option::of(any::<i64>()), option::of(any::<i64>()))),
        option::of(bytes_up_to(64)),
        option::of((
            option::of(any::<i64>()),
            option::of(any::<bool>()),
            option::of(any::<bool>()),
            vec(any::<i64>(), 0..4),
        )),
        btree_map(text(), text(), 0..4),
        (option::of(any::<i32>()), option::of(any::<i32>()), option::of(bytes_up_to(8)), option::of(any::<bool>())),
    )
        .prop_map(
            |(
                (request, response),
                (compress_type, correlation_id),
                chunk,
                auth,
                stream,
                user_fields,
                (content_type, checksum_type, checksum_value, with_att),
            )| {
                RpcMeta {
                    request,
                    response,
                    compress_type,
                    correlation_id,
                    attachment_size: None,
                    chunk_info: chunk.map(|(stream_id, chunk_id)| ChunkInfo { stream_id, chunk_id }),
                    authentication_data: auth,
                    stream_settings: stream.map(|(stream_id, need_feedback, writable, extra_stream_ids)| {
                        StreamSettings { stream_id, need_feedback, writable, extra_stream_ids }
                    }),
                    user_fields,
                    content_type,
                    checksum_type,
                    checksum_value,
                    checksum_with_attachment: with_att,
                }
            },
        )
}

fn frame() -> impl Strategy<Value = Frame> {
    (meta(), bytes_up_to(2048), bytes_up_to(512), any::<bool>()).prop_map(
        |(mut meta, payload, attachment, declare_empty)| {
            // brpc omits attachment_size when there is none; either form must round-trip.
            if !attachment.is_empty() || declare_empty {
                meta.attachment_size = Some(attachment.len() as i32);
            }
            Frame { meta, payload, attachment }
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn encode_then_decode_is_identity(f in frame()) {
        let bytes = f.to_bytes().unwrap();
        prop_assert_eq!(bytes.len(), f.encoded_len());
        let mut buf = BytesMut::from(&bytes[..]);
        let got = Decoder::default().decode(&mut buf).unwrap().expect("a whole frame");
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got, f);
    }

    #[test]
    fn any_split_of_a_frame_stream_decodes_the_same(
        frames in vec(frame(), 1..4),
        cuts in vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let mut wire = Vec::new();
        for f in &frames {
            wire.extend_from_slice(&f.to_bytes().unwrap());
        }
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
        cuts.push(wire.len());
        cuts.sort_unstable();

        let mut dec = Decoder::default();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut at = 0;
        for cut in cuts {
            buf.extend_from_slice(&wire[at..cut]);
            at = cut;
            while let Some(f) = dec.decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got, frames);
    }

    #[test]
    fn a_checksum_we_set_verifies_and_survives_the_wire(f in frame(), with_attachment in any::<bool>()) {
        let mut f = f;
        f.set_checksum(with_attachment);
        prop_assert_eq!(f.verify_checksum(), Ok(()));
        let mut buf = BytesMut::from(&f.to_bytes().unwrap()[..]);
        let got = Decoder::default().decode(&mut buf).unwrap().unwrap();
        prop_assert_eq!(got.verify_checksum(), Ok(()));
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_never_over_consume(data in vec(any::<u8>(), 0..256)) {
        let mut buf = BytesMut::from(&data[..]);
        let mut dec = Decoder::new(1 << 16);
        loop {
            let before = buf.len();
            match dec.decode(&mut buf) {
                Ok(Some(_)) => prop_assert!(buf.len() < before),
                Ok(None) => { prop_assert_eq!(buf.len(), before); break; }
                Err(e) if e.stream_in_sync() => prop_assert!(buf.len() < before),
                Err(_) => { prop_assert_eq!(buf.len(), before); break; }
            }
        }
    }
}

/// Bodies around the size where a frame stops being written as one buffer.
fn body_near_the_cut() -> impl Strategy<Value = Bytes> {
    let cut = COPY_BODIES_BELOW;
    (prop_oneof![Just(0), Just(1), Just(cut / 2), Just(cut - 1), Just(cut), Just(cut + 1), Just(3 * cut)], any::<u8>())
        .prop_map(|(n, seed)| {
            Bytes::from((0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>())
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The pieces a writer sends are the frame's bytes, in order; a large body is one of them
    /// as it is (shared, not copied), a small frame is a single piece.
    #[test]
    fn pieces_are_the_frame_and_share_a_large_body(
        mut meta in meta(),
        payload in body_near_the_cut(),
        attachment in body_near_the_cut(),
    ) {
        meta.attachment_size = (!attachment.is_empty()).then_some(attachment.len() as i32);
        let f = Frame { meta, payload, attachment };
        let encoded = f.to_pieces().unwrap();
        prop_assert_eq!(encoded.len(), f.encoded_len());
        prop_assert_eq!(&encoded.to_bytes()[..], &f.to_bytes().unwrap()[..]);
        let pieces: Vec<_> = encoded.pieces().collect();
        if f.payload.len() + f.attachment.len() < COPY_BODIES_BELOW {
            prop_assert_eq!(pieces.len(), 1);
        } else {
            // Empty pieces are left out.
            let body: Vec<_> = [&f.payload, &f.attachment].into_iter().filter(|b| !b.is_empty()).collect();
            prop_assert_eq!(pieces.len(), 1 + body.len());
            for (piece, part) in pieces[1..].iter().zip(body) {
                prop_assert_eq!(piece.as_ptr(), part.as_ptr(), "the body is passed on, not copied");
            }
        }
        let mut buf = BytesMut::from(&encoded.to_bytes()[..]);
        prop_assert_eq!(Decoder::default().decode(&mut buf).unwrap().expect("a whole frame"), f);
    }
}
