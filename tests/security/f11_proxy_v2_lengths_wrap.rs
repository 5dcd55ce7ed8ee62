//! Finding 11: PROXY v2 TLV and total lengths can wrap.

use trustwire::proxy::{proxy_v2_header, PP2_TYPE_SPIFFE_ID};
use trustwire::tls::identity::PeerIdentity;

use crate::common::*;

fn peer_with_spiffe_id_of(pki: &Pki, len: usize) -> PeerIdentity {
    let mut peer = PeerIdentity::from_der(&identity(&pki.client).chain[0]).unwrap();
    let prefix = "spiffe://example.org/";
    peer.spiffe_id = Some(format!("{prefix}{}", "a".repeat(len - prefix.len())));
    peer
}

/// The TLVs of a header, walked by their declared lengths: (type, value) pairs.
fn tlvs(header: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let total = u16::from_be_bytes([header[14], header[15]]) as usize;
    assert_eq!(header.len(), 16 + total, "the declared length is the header's real length");
    let (mut at, mut out) = (16 + 12, Vec::new());
    while at < header.len() {
        let len = u16::from_be_bytes([header[at + 1], header[at + 2]]) as usize;
        out.push((header[at], header[at + 3..at + 3 + len].to_vec()));
        at += 3 + len;
    }
    assert_eq!(at, header.len(), "the TLVs end where the header does");
    out
}

#[test]
fn a_spiffe_id_the_header_cannot_carry_is_refused_instead_of_wrapping_a_length() {
    let pki = Pki::new();
    // 70,000 bytes: more than a TLV's 16-bit length (it would have been written as 4,464).
    let err = proxy_v2_header(&peer_with_spiffe_id_of(&pki, 70_000), "127.0.0.1:4000").unwrap_err();
    assert!(err.to_string().contains("SPIFFE ID is 70000 bytes, more than a TLV holds (65535)"), "{err}");
    // 65,500 bytes: the TLV fits, the header's total length does not.
    let err = proxy_v2_header(&peer_with_spiffe_id_of(&pki, 65_500), "127.0.0.1:4000").unwrap_err();
    assert!(err.to_string().contains("more than the header's length field holds (65535)"), "{err}");
    // The largest ID that fits: every declared length matches the bytes.
    let fits = 65_535 - 12 - (3 + 5) - (3 + 64) - (3 + 10) - 3;
    let peer = peer_with_spiffe_id_of(&pki, fits);
    let header = proxy_v2_header(&peer, "127.0.0.1:4000").unwrap();
    assert_eq!(header.len(), 16 + 65_535);
    let id = tlvs(&header).into_iter().find(|(t, _)| *t == PP2_TYPE_SPIFFE_ID).unwrap().1;
    assert_eq!(id, peer.spiffe_id.unwrap().as_bytes());
}
