//! Finding 3: Client-chosen authentication_data reaches brpc.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trustwire::proxy::token::{self, TokenError};
use trustwire::tls::identity::PeerIdentity;
use trustwire::wire::{Frame, RpcMeta};

use crate::common::*;
use crate::f01_proxy_ignores_method_rules::{addr_of, baidu_route, brpc_upstream, calls, request, KEY};

/// What a client would put in authentication_data to claim another caller.
const FORGED: &[u8] = b"tw2;kid=k1;aud=f03;spiffe=spiffe://example.org/ns/prod/admin;fp=00;na=9999999999;iat=0;mac=00";

fn verify(t: &[u8], audience: &str) -> Result<token::TokenIdentity, TokenError> {
    token::verify(t, &[("k1", KEY)], audience, token::DEFAULT_MAX_AGE)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_frame_without_request_meta_is_refused_and_the_upstream_never_sees_it() {
    let pki = Pki::new();
    let (upstream, seen) = brpc_upstream().await;
    let proxy = trustwire::proxy::start(baidu_route("f03", &pki.server_profile(), &upstream)).await.unwrap();
    let addr = addr_of(&proxy);

    // No request meta (brpc would still authenticate the connection with it), then a request.
    let no_request = Frame {
        meta: RpcMeta {
            correlation_id: Some(1),
            authentication_data: Some(Bytes::from_static(FORGED)),
            ..Default::default()
        },
        payload: Bytes::from_static(b"x"),
        attachment: Bytes::new(),
    };
    let mut wire = BytesMut::new();
    no_request.encode(&mut wire).unwrap();
    request(2, "example.EchoService", "Echo", Some(FORGED)).encode(&mut wire).unwrap();
    let tls = pki.client_profile().client().unwrap();
    let (mut s, _) = trustwire::transport::connect(&tls, &addr, Duration::from_secs(5)).await.unwrap();
    s.write_all(&wire).await.unwrap();
    let mut back = Vec::new();
    // Closed (EOF or reset), with nothing answered; the guard only stops a hang.
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut back)).await.expect("the route closes");
    assert!(back.is_empty(), "nothing is answered on a refused connection: {back:?}");

    // A request with a forged token on a new connection: the upstream gets our token instead.
    // The upstream serves connections one at a time, so once this is answered it has recorded
    // everything the route ever sent it.
    let answers = calls(&addr, &pki.client_profile(), &[request(3, "example.EchoService", "Echo", Some(FORGED))]).await;
    assert_eq!(answers[0].meta.correlation_id, Some(3));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "only the second connection's request reached the upstream: {seen:?}");
    assert!(seen[0].first_on_connection);
    let auth = seen[0].auth.as_ref().expect("the proxy's token");
    assert_ne!(&auth[..], FORGED);
    let id = verify(auth, "f03").expect("a token the route issued");
    assert_eq!(id.spiffe_id.as_deref(), Some(CLIENT_ID));
    assert_eq!(id.audience, "f03");
    assert_eq!(
        crate::f01_proxy_ignores_method_rules::counter(
            "trustwire_proxy_streams_total{route=\"f03\",outcome=\"protocol\"}"
        ),
        1.0
    );
}

fn client_peer(pki: &Pki) -> PeerIdentity {
    PeerIdentity::from_der(&identity(&pki.client).chain[0]).unwrap()
}

#[test]
fn verifiers_refuse_a_token_for_another_route_one_too_old_and_the_old_format() {
    let pki = Pki::new();
    let peer = client_peer(&pki);
    let name = |r: Result<token::TokenIdentity, TokenError>| r.unwrap_err().name();

    // Minted for route "billing-in", presented to the service behind "echo-in" (same key).
    let t = token::issue(&peer, "k1", KEY, "billing-in");
    assert!(verify(t.as_bytes(), "billing-in").is_ok());
    let err = verify(t.as_bytes(), "echo-in").unwrap_err();
    assert_eq!(err.name(), "wrong_audience");
    assert!(err.to_string().contains("'billing-in'") && err.to_string().contains("'echo-in'"), "{err}");

    // Issued longer ago than the verifier's maximum age.
    let issued = SystemTime::now() - Duration::from_secs(600);
    let old = token::issue_at(&peer, "k1", KEY, "echo-in", issued);
    assert_eq!(name(verify(old.as_bytes(), "echo-in")), "too_old");
    assert!(token::verify(old.as_bytes(), &[("k1", KEY)], "echo-in", Duration::from_secs(3600)).is_ok());
    let future = token::issue_at(&peer, "k1", KEY, "echo-in", SystemTime::now() + Duration::from_secs(3600));
    assert_eq!(name(verify(future.as_bytes(), "echo-in")), "issued_in_future");

    // A tw1 token with a valid MAC, as the previous proxy wrote them: refused by name.
    let unix = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_secs();
    let body = format!(
        "tw1;kid=k1;spiffe={};fp={};na={};iat={}",
        CLIENT_ID,
        peer.fingerprint_sha256,
        unix(peer.not_after),
        unix(SystemTime::now())
    );
    let tag = aws_lc_rs::hmac::sign(&aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, KEY), body.as_bytes());
    let tw1 = format!("{body};mac={}", hex::encode(tag.as_ref()));
    let err = verify(tw1.as_bytes(), "echo-in").unwrap_err();
    assert_eq!(err.name(), "unsupported_version");
    assert!(err.to_string().contains("tw1"), "{err}");
}
