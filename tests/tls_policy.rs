//! Identity, policy and credential checks as a user meets them: who gets in, who is refused
//! with which verdict, and what the message says to fix.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use trustwire::error::codes;
use trustwire::pki::{DevCa, IssueRequest, KeyType};
use trustwire::profile::ProfileFile;
use trustwire::tls::{Identity, Policy, TlsProfile, TrustBundle};
use trustwire::{CallOptions, Error, Server, Side, Verdict};

fn handshake(e: &Error) -> (Verdict, Side, Option<&'static str>, String) {
    match e {
        Error::Handshake { verdict, side, alert, message } => (*verdict, *side, *alert, message.clone()),
        other => panic!("expected a handshake error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_list_patterns_admit_and_refuse() {
    let pki = Pki::new();
    let web = pki.issue(IssueRequest::new("web").spiffe_id("spiffe://example.org/ns/prod/web"));
    let batch = pki.issue(IssueRequest::new("batch").spiffe_id("spiffe://example.org/ns/batch/job"));
    let dns_only = pki.issue(IssueRequest::new("legacy").dns("legacy.example.org"));
    let cases: &[(&[&str], &trustwire::pki::Credential, bool)] = &[
        (&["spiffe://example.org/ns/prod/web"], &web, true),
        (&["spiffe://example.org/ns/prod/*"], &web, true),
        (&["spiffe://example.org/ns/prod/*"], &batch, false),
        (&["spiffe://example.org/*"], &batch, true),
        (&["spiffe://other.org/*"], &web, false),
        (&["dns:legacy.example.org"], &dns_only, true),
        (&["dns:*.example.org"], &dns_only, true),
        (&["dns:legacy.example.org"], &web, false),
        // A CN is only trusted when the pattern says cn: explicitly.
        (&["legacy"], &dns_only, false),
        (&["cn:legacy"], &dns_only, true),
        (&["*"], &batch, true),
    ];
    for (allow, cred, admitted) in cases {
        let policy = match Policy::from_patterns(allow) {
            Ok(p) => p,
            Err(e) => {
                assert!(!admitted, "{allow:?} should parse: {e}");
                assert!(e.to_string().contains("unknown allow pattern"), "{e}");
                continue;
            }
        };
        let mut sp = pki.server_profile();
        sp.policy = policy;
        let server = echo_server(&sp).await;
        let mut cp = pki.client_profile();
        cp.identity = Some(identity(cred));
        let res = echo(&client(server.local_addr(), &cp), "hi").await;
        if *admitted {
            assert_eq!(res.unwrap(), "hi", "{allow:?} should admit");
        } else {
            let (v, side, alert, _) = handshake(&res.unwrap_err());
            assert_eq!((v, side, alert), (Verdict::PeerAlert, Side::Remote, Some("access_denied")), "{allow:?}");
        }
    }
}

#[test]
fn bad_patterns_are_rejected_with_guidance() {
    for bad in ["spiffe://", "spiffe://example.org/ns/*/web", "spiffe://example.org/a*", "dns:", "cn:", "web"] {
        let err = Policy::from_patterns(&[bad]).unwrap_err().to_string();
        assert!(err.contains(bad.trim_end_matches('*')) || err.contains("pattern"), "{bad}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_verdict_for_refused_peer_names_identity_and_patterns() {
    let pki = Pki::new();
    let seen: Arc<Mutex<Vec<Error>>> = Arc::default();
    let mut sp = pki.server_profile();
    sp.policy = Policy::from_patterns(&["spiffe://example.org/ns/prod/*"]).unwrap();
    let mut server = Server::new(sp.server().unwrap());
    trustwire::echo::register(&mut server);
    let sink = seen.clone();
    server.options_mut().on_handshake_error = Some(Arc::new(move |_, e| sink.lock().unwrap().push(e.clone())));
    let running = server.bind("127.0.0.1:0").await.unwrap();
    assert!(echo(&client(running.local_addr(), &pki.client_profile()), "x").await.is_err());
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while seen.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (v, side, _, msg) = handshake(&seen.lock().unwrap()[0]);
    assert_eq!((v, side), (Verdict::PeerNotAllowed, Side::Local));
    assert!(msg.contains(CLIENT_ID) && msg.contains("spiffe://example.org/ns/prod/*"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_rules_deny_with_erpcauth_and_method_not_allowed() {
    let pki = Pki::new();
    let admin = pki.issue(IssueRequest::new("admin").spiffe_id("spiffe://example.org/ns/ops/admin"));
    let mut sp = pki.server_profile();
    sp.policy = Policy::from_patterns(&["spiffe://example.org/*"])
        .unwrap()
        .with_rule(&["example.EchoService/Echo"], &["spiffe://example.org/*"])
        .unwrap()
        .with_rule(&["example.AdminService/*"], &["spiffe://example.org/ns/ops/*"])
        .unwrap();
    let mut server = Server::new(sp.server().unwrap());
    trustwire::echo::register(&mut server);
    server.register("example.AdminService", "Reset", trustwire::echo::handler);
    server.register("example.Unlisted", "Call", trustwire::echo::handler);
    let running = server.bind("127.0.0.1:0").await.unwrap();
    let addr = running.local_addr();

    let plain = client(addr, &pki.client_profile());
    assert_eq!(echo(&plain, "ok").await.unwrap(), "ok");
    for (svc, m) in [("example.AdminService", "Reset"), ("example.Unlisted", "Call")] {
        let err = plain.call(svc, m, vec![], CallOptions::default()).await.unwrap_err();
        assert_eq!(err.rpc_code(), Some(codes::ERPCAUTH), "{err}");
        assert_eq!(err.verdict(), Some(Verdict::MethodNotAllowed), "{err}");
        assert!(err.to_string().contains(CLIENT_ID), "{err}");
    }
    // The unqualified name resolves first, so a rule on the full name still applies.
    let err = plain.call("AdminService", "Reset", vec![], CallOptions::default()).await.unwrap_err();
    assert_eq!(err.verdict(), Some(Verdict::MethodNotAllowed));

    let mut ap = pki.client_profile();
    ap.identity = Some(identity(&admin));
    let admin_client = client(addr, &ap);
    admin_client.call("example.AdminService", "Reset", vec![1, 2], CallOptions::default()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_checks_server_name_with_actionable_message() {
    let pki = Pki::new();
    let server = echo_server(&pki.server_profile()).await;
    let mut cp = pki.client_profile();
    cp.server_name = Some("payments.example.org".into());
    let (v, side, _, msg) = handshake(&echo(&client(server.local_addr(), &cp), "x").await.unwrap_err());
    assert_eq!((v, side), (Verdict::NameMismatch, Side::Local));
    assert!(
        msg.contains("payments.example.org") && msg.contains("dns:localhost") && msg.contains("ip:127.0.0.1"),
        "{msg}"
    );
    // The dialled IP is verified when no server_name is set, and "localhost" works by name.
    cp.server_name = Some("localhost".into());
    assert_eq!(echo(&client(server.local_addr(), &cp), "x").await.unwrap(), "x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_pins_server_spiffe_id_and_applies_its_allow_list() {
    let pki = Pki::new();
    let server = echo_server(&pki.server_profile()).await;
    let mut cp = pki.client_profile();
    cp.server_spiffe_id = Some(SERVER_ID.into());
    assert_eq!(echo(&client(server.local_addr(), &cp), "x").await.unwrap(), "x");

    cp.server_spiffe_id = Some("spiffe://example.org/ns/test/impostor".into());
    let (v, side, _, msg) = handshake(&echo(&client(server.local_addr(), &cp), "x").await.unwrap_err());
    assert_eq!((v, side), (Verdict::PeerNotAllowed, Side::Local));
    assert!(msg.contains(SERVER_ID) && msg.contains("impostor"), "{msg}");

    let mut cp = pki.client_profile();
    cp.policy = Policy::from_patterns(&["spiffe://example.org/ns/prod/*"]).unwrap();
    let (v, _, _, _) = handshake(&echo(&client(server.local_addr(), &cp), "x").await.unwrap_err());
    assert_eq!(v, Verdict::PeerNotAllowed);
}

/// An X509-SVID names no host (SPIRE issues them so): a client that pins the server's SPIFFE
/// ID takes that ID as the server's name, so dialling an address works. The chain is still
/// verified, and a server_name set in the profile is still checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_server_spiffe_id_stands_for_a_name_the_svid_does_not_carry() {
    let pki = Pki::new();
    let svid = pki.issue(IssueRequest::new("svid").spiffe_id(SERVER_ID));
    let mut sp = pki.server_profile();
    sp.identity = Some(identity(&svid));
    let server = echo_server(&sp).await;

    let mut cp = pki.client_profile();
    let (v, _, _, msg) = handshake(&echo(&client(server.local_addr(), &cp), "x").await.unwrap_err());
    assert_eq!(v, Verdict::NameMismatch, "without a pin the dialled address must be named: {msg}");

    cp.server_spiffe_id = Some(SERVER_ID.into());
    assert_eq!(echo(&client(server.local_addr(), &cp), "x").await.unwrap(), "x");

    cp.server_spiffe_id = Some("spiffe://example.org/ns/test/other".into());
    let (v, _, _, _) = handshake(&echo(&client(server.local_addr(), &cp), "x").await.unwrap_err());
    assert_eq!(v, Verdict::PeerNotAllowed, "only the pinned ID stands in for the name");

    let mut named = pki.client_profile();
    named.server_spiffe_id = Some(SERVER_ID.into());
    named.server_name = Some("echo.example.org".into());
    let (v, _, _, _) = handshake(&echo(&client(server.local_addr(), &named), "x").await.unwrap_err());
    assert_eq!(v, Verdict::NameMismatch, "a configured server_name is checked");

    // The same ID from a CA we do not trust is refused on its chain.
    let rogue = DevCa::new(TD).unwrap();
    let forged = rogue.issue(&IssueRequest::new("svid").spiffe_id(SERVER_ID)).unwrap();
    sp.identity = Some(identity(&forged));
    sp.trust = TrustBundle::from_pem(rogue.cert_pem().as_bytes()).unwrap();
    let rogue_server = echo_server(&sp).await;
    let (v, _, _, _) = handshake(&echo(&client(rogue_server.local_addr(), &cp_pinned(&pki)), "x").await.unwrap_err());
    assert_eq!(v, Verdict::UnknownIssuer);
}

fn cp_pinned(pki: &Pki) -> TlsProfile {
    let mut cp = pki.client_profile();
    cp.server_spiffe_id = Some(SERVER_ID.into());
    cp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_server_certificate_message_gives_dates() {
    let pki = Pki::new();
    let (nb, na) = validity(-7200, -3600);
    let old = pki.issue(IssueRequest::new("old").dns("localhost").ip(localhost()).validity(nb, na));
    let mut sp = pki.server_profile();
    sp.identity = Some(identity(&old));
    let server = echo_server(&sp).await;
    let (v, side, _, msg) =
        handshake(&echo(&client(server.local_addr(), &pki.client_profile()), "x").await.unwrap_err());
    assert_eq!((v, side), (Verdict::Expired, Side::Local));
    assert!(msg.contains("not after") && msg.contains("now"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_from_untrusted_ca_names_its_issuer_and_our_cas() {
    let pki = Pki::new();
    let rogue = DevCa::new("rogue.example").unwrap();
    let cred = rogue.issue(&IssueRequest::new("s").dns("localhost").ip(localhost())).unwrap();
    let mut sp = TlsProfile::new(Some(identity(&cred)), pki.trust());
    sp.policy = Policy::default();
    let server = echo_server(&sp).await;
    let (v, _, _, msg) = handshake(&echo(&client(server.local_addr(), &pki.client_profile()), "x").await.unwrap_err());
    assert_eq!(v, Verdict::UnknownIssuer);
    assert!(msg.contains("rogue.example") && msg.contains("example.org"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_supported_key_type_serves_and_calls() {
    let pki = Pki::new();
    for kt in [KeyType::EcdsaP256, KeyType::EcdsaP384, KeyType::Ed25519, KeyType::Rsa2048] {
        let s = pki.issue(IssueRequest::new(format!("s-{kt:?}")).dns("localhost").ip(localhost()).key_type(kt));
        let c = pki.issue(IssueRequest::new(format!("c-{kt:?}")).spiffe_id(CLIENT_ID).key_type(kt));
        let server = echo_server(&TlsProfile::new(Some(identity(&s)), pki.trust())).await;
        let cp = TlsProfile::new(Some(identity(&c)), pki.trust());
        assert_eq!(echo(&client(server.local_addr(), &cp), "k").await.unwrap(), "k", "{kt:?}");
    }
}

#[test]
fn identity_material_errors_are_clear() {
    let pki = Pki::new();
    let other = pki.issue(IssueRequest::new("other"));
    let err = Identity::from_pem(pki.client.cert_pem.as_bytes(), other.key_pem.as_bytes()).unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");

    // A key file cut off halfway, as a writer that has not finished leaves it.
    let half = &pki.client.key_pem.as_bytes()[..pki.client.key_pem.len() / 2];
    let err = Identity::from_pem(pki.client.cert_pem.as_bytes(), half).unwrap_err();
    assert!(matches!(err, Error::Credentials { .. }), "{err:?}");
    let half_cert = &pki.client.cert_pem.as_bytes()[..pki.client.cert_pem.len() / 2];
    assert!(Identity::from_pem(half_cert, pki.client.key_pem.as_bytes()).is_err());
    let err = Identity::from_pem(b"", pki.client.key_pem.as_bytes()).unwrap_err();
    assert!(err.to_string().contains("no \"BEGIN CERTIFICATE\""), "{err}");
    assert!(TrustBundle::from_pem(b"garbage").is_err());
    let combined = format!("{}{}", pki.client.key_pem, pki.client.cert_pem);
    Identity::from_combined_pem(combined.as_bytes()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_file_loads_and_rejects_typos() {
    let pki = Pki::new();
    let server_toml = pki.path("server.toml");
    std::fs::write(
        &server_toml,
        r#"
[identity]
cert = "server.pem"
key = "server.key"
[trust]
ca = ["ca.pem"]
[policy]
allow = ["spiffe://example.org/ns/test/*"]
[[policy.rules]]
methods = ["example.EchoService/*"]
allow = ["spiffe://example.org/ns/test/client"]
"#,
    )
    .unwrap();
    let client_toml = pki.path("client.toml");
    std::fs::write(
        &client_toml,
        format!(
            r#"
[identity]
cert = "client.pem"
key = "client.key"
[trust]
ca = ["{}"]
[client]
server_name = "localhost"
server_spiffe_id = "{SERVER_ID}"
[tls]
min_version = "1.3"
handshake_timeout_ms = 2000
"#,
            pki.path("ca.pem").display()
        ),
    )
    .unwrap();
    let sp = TlsProfile::from_file(&server_toml).unwrap();
    assert_eq!(sp.policy.rules.len(), 1);
    let server = echo_server(&sp).await;
    let cp = TlsProfile::from_file(&client_toml).unwrap();
    assert_eq!(cp.handshake_timeout, Duration::from_secs(2));
    assert_eq!(echo(&client(server.local_addr(), &cp), "toml").await.unwrap(), "toml");

    let err = ProfileFile::parse("[trust]\nca = []\nverify = false\n").unwrap_err().to_string();
    assert!(err.contains("verify"), "{err}");
    let err = ProfileFile::parse("[trust]\nca=[]\n[tls]\nmin_version = \"1.0\"\n").unwrap().into_profile().unwrap_err();
    assert!(err.to_string().contains("trust bundle") || err.to_string().contains("1.0"), "{err}");
}

#[test]
fn verdict_names_are_stable() {
    let names: Vec<&str> = Verdict::ALL.iter().map(|v| v.name()).collect();
    assert_eq!(
        names,
        [
            "unknown_issuer",
            "bad_signature",
            "expired",
            "not_yet_valid",
            "revoked",
            "crl_stale",
            "name_mismatch",
            "bad_key_usage",
            "unsupported_certificate",
            "no_peer_certificate",
            "peer_not_allowed",
            "method_not_allowed",
            "protocol_version",
            "no_shared_cipher",
            "handshake_timeout",
            "peer_alert",
            "not_tls",
            "io",
            "key_mismatch",
            "bad_pem",
            "identity_changed",
            "key_unavailable"
        ]
    );
    for (i, v) in Verdict::ALL.iter().enumerate() {
        assert_eq!(v.code() as usize, i + 1);
        assert_eq!(Verdict::from_name(v.name()), Some(*v));
    }
}

#[test]
fn the_expiry_warning_window_is_set_by_the_profile() {
    use trustwire::credentials::StoreOptions;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    let load = |identity: &str| {
        std::fs::write(
            &path,
            format!("[identity]\ncert = \"a.pem\"\nkey = \"a.key\"\n{identity}\n[trust]\nca = \"ca.pem\"\n"),
        )
        .unwrap();
        ProfileFile::load(&path).map(|f| f.store_options(StoreOptions::default()).expiry_warning)
    };
    assert_eq!(load("").unwrap(), Duration::from_secs(7 * 86400), "seven days by default");
    assert_eq!(load("expiry_warning_days = 30").unwrap(), Duration::from_secs(30 * 86400));
    assert_eq!(load("expiry_warning_days = 0").unwrap(), Duration::ZERO);
    assert!(load("expiry_warning_days = -1").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cipher_suites_prefer_aes_128_gcm_and_a_profile_can_reorder_or_restrict_them() {
    let pki = Pki::new();
    let server = echo_server(&pki.server_profile()).await;
    let addr = server.local_addr().to_string();
    let suite = |cp: TlsProfile| {
        let addr = addr.clone();
        async move {
            let (_, info) =
                trustwire::transport::connect(&cp.client().unwrap(), &addr, Duration::from_secs(5)).await.unwrap();
            info.cipher_suite
        }
    };
    assert_eq!(suite(pki.client_profile()).await, "TLS13_AES_128_GCM_SHA256");
    let mut cp = pki.client_profile();
    cp.cipher_suites = vec!["TLS_AES_256_GCM_SHA384".into(), "TLS13_AES_128_GCM_SHA256".into()];
    assert_eq!(suite(cp).await, "TLS13_AES_256_GCM_SHA384");

    // A server restricted to ChaCha20 refuses a client that offers none of it, by name.
    let mut sp = pki.server_profile();
    sp.cipher_suites = vec!["TLS13_CHACHA20_POLY1305_SHA256".into()];
    let chacha = echo_server(&sp).await;
    let mut cp = pki.client_profile();
    cp.cipher_suites = vec!["TLS13_AES_128_GCM_SHA256".into()];
    let err = echo(&client(chacha.local_addr(), &cp), "x").await.unwrap_err();
    assert_eq!(err.verdict(), Some(Verdict::PeerAlert), "{err}");
    assert!(err.to_string().contains("handshake_failure"), "{err}");
    assert_eq!(echo(&client(chacha.local_addr(), &pki.client_profile()), "c").await.unwrap(), "c");

    let load = |tls: &str| {
        ProfileFile::parse(&format!("[trust]\nca = [\"{}\"]\n[tls]\n{tls}\n", pki.path("ca.pem").display()))
            .unwrap()
            .into_profile()
    };
    assert_eq!(
        load("cipher_suites = [\"TLS13_AES_256_GCM_SHA384\"]").unwrap().cipher_suites,
        ["TLS13_AES_256_GCM_SHA384"]
    );
    let err = load("cipher_suites = [\"TLS_RSA_WITH_RC4_128_MD5\"]").unwrap_err().to_string();
    assert!(err.contains("unknown cipher suite 'TLS_RSA_WITH_RC4_128_MD5'") && err.contains("known: "), "{err}");
    let err = load("cipher_suites = [\"TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256\"]").unwrap_err().to_string();
    assert!(err.contains("no TLS 1.3 suite"), "{err}");
    let err = load("cipher_suites = []").unwrap_err().to_string();
    assert!(err.contains("empty"), "{err}");
}

/// In TLS 1.3 a refused client's side of the handshake is done before the server judges it, so
/// calls sent at once race the server's alert: a write that reaches the closed socket fails with
/// a bare broken pipe or reset. Every call must still get the alert's verdict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_racing_a_refusal_all_get_its_verdict() {
    let pki = Pki::new();
    let server = echo_server_allowing(&pki, &["spiffe://example.org/ns/test/someone-else"]).await;
    for round in 0..20 {
        let c = client(server.local_addr(), &pki.client_profile());
        c.connect().await.unwrap();
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move { echo(&c, "hi").await })
            })
            .collect();
        for call in calls {
            let e = call.await.unwrap().unwrap_err();
            assert_eq!(e.verdict(), Some(Verdict::PeerAlert), "round {round}: {e}");
        }
    }
}
