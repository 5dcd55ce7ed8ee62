//! Finding 9: The ERPCAUTH text tells a refused caller which identities are allowed.
//!
//! A caller refused by a method rule learns only that it was refused, for which call; the rule
//! and the identities it allows stay in the server's log.

use trustwire::error::codes;
use trustwire::rpc::{CallOptions, Server};
use trustwire::tls::Policy;
use trustwire::{Error, Verdict};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_caller_is_not_told_who_is_allowed() {
    let pki = Pki::new();
    let mut sp = pki.server_profile();
    sp.policy = Policy::from_patterns(&["spiffe://example.org/*"])
        .unwrap()
        .with_rule(&["example.AdminService/*"], &["spiffe://example.org/ns/ops/break-glass"])
        .unwrap();
    let mut server = Server::new(sp.server().unwrap());
    server.register("example.AdminService", "DropAll", trustwire::echo::handler);
    let running = server.bind("127.0.0.1:0").await.unwrap();
    let c = client(running.local_addr(), &pki.client_profile());

    let err = c.call("example.AdminService", "DropAll", vec![], CallOptions::default()).await.unwrap_err();
    assert_eq!(err.rpc_code(), Some(codes::ERPCAUTH), "{err}");
    assert_eq!(err.verdict(), Some(Verdict::MethodNotAllowed), "{err}");
    let Error::Rpc { text, .. } = &err else { panic!("{err:?}") };
    assert!(text.contains("example.AdminService/DropAll"), "the refusal names the call: {text}");
    assert!(!text.contains("break-glass"), "the refusal must not name the allowed identities: {text}");
    assert!(!text.contains("ns/ops"), "the refusal must not name the allowed identities: {text}");
}
