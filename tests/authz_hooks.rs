//! The application's own authorization hooks: per connection after verification, per call
//! after the method rules; a denial refuses with a stable name, and a hook that panics denies.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use trustwire::authz::{Call, CallDecision, PeerDecision};
use trustwire::error::codes;
use trustwire::tls::PeerIdentity;
use trustwire::{CallOptions, Error, Server, Side, Verdict};

/// What a call hook saw: caller, service, method, log id, scope.
type Seen = (String, String, String, Option<i64>, String);

fn opts() -> CallOptions {
    CallOptions { timeout: Some(Duration::from_secs(5)), ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_hook_refuses_peers_the_allow_list_admits_and_a_panicking_one_refuses_all() {
    let pki = Pki::new();
    let blocked = pki.issue(client_usage("blocked", "spiffe://example.org/ns/test/blocked"));
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut sp = pki.server_profile();
    let s = seen.clone();
    sp.policy.hooks.peer = Some(Arc::new(move |peer: &PeerIdentity| {
        s.lock().unwrap().push(peer.spiffe_id.clone().unwrap_or_default());
        match peer.spiffe_id.as_deref() {
            Some(id) if id.ends_with("/blocked") => PeerDecision::Deny("tenant suspended".into()),
            _ => PeerDecision::Allow,
        }
    }));
    let server = echo_server(&sp).await;
    assert_eq!(echo(&client(server.local_addr(), &pki.client_profile()), "x").await.unwrap(), "x");
    let err = echo_as(server.local_addr(), &pki, &blocked).await.unwrap_err();
    match &err {
        Error::Handshake { verdict, side, alert, .. } => {
            assert_eq!((*verdict, *side, *alert), (Verdict::PeerAlert, Side::Remote, Some("access_denied")), "{err}");
            assert!(!err.to_string().contains("tenant suspended"), "the reason stays on our side: {err}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(*seen.lock().unwrap(), vec![CLIENT_ID.to_string(), "spiffe://example.org/ns/test/blocked".into()]);

    let mut sp = pki.server_profile();
    sp.policy.hooks.peer = Some(Arc::new(|_: &PeerIdentity| -> PeerDecision { panic!("tenant table unavailable") }));
    let failing = echo_server(&sp).await;
    let err = echo(&client(failing.local_addr(), &pki.client_profile()), "x").await.unwrap_err();
    assert!(err.to_string().contains("access_denied"), "a failing hook fails closed: {err}");
    // The server survived the panic and still answers an allowed peer elsewhere.
    assert_eq!(echo(&client(server.local_addr(), &pki.client_profile()), "y").await.unwrap(), "y");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_runs_the_connection_hook_on_the_server_it_dials() {
    let pki = Pki::new();
    let server = echo_server(&pki.server_profile()).await;
    let mut cp = pki.client_profile();
    cp.policy.hooks.peer = Some(Arc::new(|peer: &PeerIdentity| match peer.spiffe_id.as_deref() == Some(SERVER_ID) {
        true => PeerDecision::Deny("not this one".into()),
        false => PeerDecision::Allow,
    }));
    let err = echo(&client(server.local_addr(), &cp), "x").await.unwrap_err();
    match &err {
        Error::Handshake { verdict, side, message, .. } => {
            assert_eq!((*verdict, *side), (Verdict::PeerNotAllowed, Side::Local));
            assert!(message.contains("not this one"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_hook_sees_the_call_and_its_metadata_and_denies_with_its_code() {
    let pki = Pki::new();
    let admin = pki.issue(client_usage("admin", "spiffe://example.org/ns/test/admin"));
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let s = seen.clone();
    let mut server = Server::new(pki.server_profile().server().unwrap());
    trustwire::echo::register(&mut server);
    server.register("example.AdminService", "Reset", |_req: trustwire::rpc::Request| async move {
        Ok(trustwire::rpc::Response::new(b"reset".to_vec()))
    });
    server.register("example.AdminService", "Crash", |_req: trustwire::rpc::Request| async move {
        Ok(trustwire::rpc::Response::new(Vec::new()))
    });
    server.authorize_calls(move |call: &Call<'_>| {
        let who = call.peer.spiffe_id.clone().unwrap_or_default();
        s.lock().unwrap().push((
            who.clone(),
            call.service.into(),
            call.method.into(),
            call.metadata.log_id,
            call.scope.into(),
        ));
        match (call.service, call.method) {
            ("example.AdminService", "Crash") => panic!("feature flag service down"),
            ("example.AdminService", _) if !who.ends_with("/admin") => CallDecision::deny("admins only"),
            ("example.EchoService", _) if call.metadata.log_id == Some(13) => {
                CallDecision::Deny { code: 2001, text: "log id 13 is unlucky".into() }
            }
            _ => CallDecision::Allow,
        }
    });
    let running = server.bind("127.0.0.1:0").await.unwrap();
    let addr = running.local_addr();
    let plain = client(addr, &pki.client_profile());
    let with_log_id = CallOptions { log_id: Some(7), ..opts() };
    plain.call("example.EchoService", "Echo", trustwire::echo::encode("a"), with_log_id).await.unwrap();

    let err = plain.call("example.AdminService", "Reset", vec![], opts()).await.unwrap_err();
    assert_eq!((err.rpc_code(), err.verdict()), (Some(codes::ERPCAUTH), Some(Verdict::MethodNotAllowed)), "{err}");
    assert!(err.to_string().contains("admins only"), "the hook's text reaches the caller: {err}");

    let unlucky = CallOptions { log_id: Some(13), ..opts() };
    let err = plain.call("example.EchoService", "Echo", trustwire::echo::encode("b"), unlucky).await.unwrap_err();
    assert_eq!(err.rpc_code(), Some(2001), "{err}");
    assert!(err.to_string().contains("log id 13 is unlucky"), "{err}");

    let err = plain.call("example.AdminService", "Crash", vec![], opts()).await.unwrap_err();
    assert_eq!(err.rpc_code(), Some(codes::ERPCAUTH), "a panicking hook denies: {err}");
    assert!(!err.to_string().contains("feature flag"), "the panic stays on our side: {err}");

    let mut ap = pki.client_profile();
    ap.identity = Some(identity(&admin));
    let r = client(addr, &ap).call("example.AdminService", "Reset", vec![], opts()).await.unwrap();
    assert_eq!(&r.payload[..], b"reset");
    // The connection that saw the panic still works.
    plain.call("example.EchoService", "Echo", trustwire::echo::encode("c"), opts()).await.unwrap();

    let seen = seen.lock().unwrap();
    assert_eq!(seen[0], (CLIENT_ID.into(), "example.EchoService".into(), "Echo".into(), Some(7), "server".into()));
    assert_eq!(seen.len(), 6, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_call_hook_runs_only_for_calls_the_method_rules_allow() {
    let pki = Pki::new();
    let calls = Arc::new(Mutex::new(0));
    let c = calls.clone();
    let mut sp = pki.server_profile();
    sp.policy = sp.policy.with_rule(&["example.EchoService/Echo"], &["spiffe://example.org/ns/test/nobody"]).unwrap();
    sp.policy.hooks.call = Some(Arc::new(move |_: &Call<'_>| {
        *c.lock().unwrap() += 1;
        CallDecision::Allow
    }));
    let server = echo_server(&sp).await;
    let err = echo(&client(server.local_addr(), &pki.client_profile()), "x").await.unwrap_err();
    assert_eq!(err.verdict(), Some(Verdict::MethodNotAllowed));
    assert_eq!(*calls.lock().unwrap(), 0, "a hook cannot allow what a rule denies");
}
