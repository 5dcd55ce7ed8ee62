//! The SPIFFE Workload API source against a Workload API agent written in Go with go-spiffe's
//! generated `workload` package (tests/go/workloadapi, built with Go modules into the target
//! directory): what a response carries, rotations pushed on the stream, malformed responses,
//! the agent going away and coming back, the security metadata, the message size limit; and the
//! address syntax of the SPIFFE Workload Endpoint standard.
//!
//! The agent serves files this test writes (certificates generated here) and pushes a new
//! response on a `push` line on its stdin.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::peers::*;
use common::workload::*;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};
use trustwire::credentials::workload::{
    StreamState, SvidSelector, WorkloadApiAddress, WorkloadApiEvent, WorkloadApiOptions, WorkloadApiSource, X509Context,
};
use trustwire::pki::{Credential, DevCa, IssueRequest};

const ID: &str = "spiffe://example.org/ns/test/workload";
const OTHER_ID: &str = "spiffe://example.org/ns/test/external";
const PARTNER_TD: &str = "partner.example";

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    trustwire::runtime::runtime().block_on(f)
}

/// A started source whose contexts and events the test collects.
struct Watched {
    source: WorkloadApiSource,
    contexts: Arc<Mutex<Vec<Arc<X509Context>>>>,
    events: Arc<Mutex<Vec<WorkloadApiEvent>>>,
}

impl Watched {
    fn start(address: WorkloadApiAddress, options: WorkloadApiOptions) -> Watched {
        let contexts: Arc<Mutex<Vec<Arc<X509Context>>>> = Arc::default();
        let events: Arc<Mutex<Vec<WorkloadApiEvent>>> = Arc::default();
        let sink = events.clone();
        let options = options.on_event(move |e| sink.lock().unwrap().push(e.clone()));
        let into = contexts.clone();
        let source = WorkloadApiSource::start(address, options, move |c| into.lock().unwrap().push(c)).unwrap();
        Watched { source, contexts, events }
    }

    fn serials(&self) -> Vec<String> {
        self.contexts.lock().unwrap().iter().map(|c| c.svid().serial()).collect()
    }

    fn wait_contexts(&self, n: usize) {
        wait_until(&format!("{n} contexts"), || self.contexts.lock().unwrap().len() >= n);
    }

    fn rejections(&self) -> Vec<String> {
        let events = self.events.lock().unwrap();
        events
            .iter()
            .filter_map(|e| match e {
                WorkloadApiEvent::Rejected { message, .. } => Some(message.clone()),
                _ => None,
            })
            .collect()
    }

    /// (reason, message, retry_in) of every stream failure so far.
    fn failures(&self) -> Vec<(&'static str, String, Option<Duration>)> {
        let events = self.events.lock().unwrap();
        events
            .iter()
            .filter_map(|e| match e {
                WorkloadApiEvent::StreamFailed { reason, message, retry_in, .. } => {
                    Some((*reason, message.clone(), *retry_in))
                }
                _ => None,
            })
            .collect()
    }
}

fn options(name: &str) -> WorkloadApiOptions {
    WorkloadApiOptions {
        name: name.into(),
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        ..Default::default()
    }
}

fn metric_line(name: &str, labels: &str) -> Option<String> {
    let prefix = format!("{name}{{{labels}}} ");
    trustwire::telemetry::metrics_text().lines().find(|l| l.starts_with(&prefix)).map(|l| l[prefix.len()..].to_string())
}

#[test]
fn the_first_context_carries_the_svid_bundle_federated_bundles_and_crls() {
    let Some(bin) = agent_bin() else { return };
    let m = Material::new();
    let svid = m.issue("0", ID, Some("internal"));
    let partner = DevCa::new(PARTNER_TD).unwrap();
    m.write(&format!("federated/{PARTNER_TD}.pem"), partner.cert_pem().as_bytes());
    let revoked = m.ca.issue(&IssueRequest::new("revoked").spiffe_id(OTHER_ID)).unwrap();
    let crl_pem = m.ca.crl_pem(&[&serial(&revoked)], SystemTime::now() + Duration::from_secs(3600)).unwrap();
    m.write("crls/example.pem", crl_pem.as_bytes());
    let agent = Agent::start(&bin, &m, &m.path("agent.sock"), false);

    let w = Watched::start(agent.address(), options("wl-first"));
    let first = block_on(w.source.first(WAIT)).unwrap();
    let s = first.svid();
    assert_eq!(s.spiffe_id(), ID);
    assert_eq!(s.trust_domain(), "example.org");
    assert_eq!(s.hint(), Some("internal"));
    assert_eq!(s.chain(), &[der(&svid.cert_pem)]);
    assert_eq!(s.serial(), serial(&svid));
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(svid.key_pem.as_bytes()).unwrap();
    assert_eq!(s.key().secret_pkcs8_der(), key.secret_der(), "the PKCS#8 key as served");
    assert_eq!(first.trust_domain(), "example.org");
    assert_eq!(first.bundle(), &[der(m.ca.cert_pem())]);
    let federated: Vec<(&str, &[CertificateDer<'static>])> =
        first.federated_bundles().iter().map(|(td, cas)| (td.as_str(), cas.as_slice())).collect();
    assert_eq!(federated, vec![(PARTNER_TD, &[der(partner.cert_pem())][..])], "keyed by trust domain name");
    assert_eq!(first.crls(), &[CertificateRevocationListDer::from_pem_slice(crl_pem.as_bytes()).unwrap()]);
    // The chain and key make a TLS identity as they are.
    let profile = trustwire::TlsProfile::new(
        Some(s.identity().unwrap()),
        trustwire::tls::TrustBundle { roots: first.bundle().to_vec(), ..Default::default() },
    );
    profile.server().expect("the served SVID works as a server identity");

    let status = w.source.status();
    assert_eq!(
        (status.state, status.updates, status.rejected, status.stream_failures),
        (StreamState::Streaming, 1, 0, 0)
    );
    assert_eq!(
        metric_line("trustwire_workload_api_stream_state", "source=\"wl-first\",state=\"streaming\"").as_deref(),
        Some("1")
    );
    assert_eq!(
        metric_line("trustwire_workload_api_stream_state", "source=\"wl-first\",state=\"backoff\"").as_deref(),
        Some("0")
    );
    drop(w);
    assert_eq!(
        metric_line("trustwire_workload_api_stream_state", "source=\"wl-first\",state=\"streaming\""),
        None,
        "a stopped source leaves no state behind"
    );
}

#[test]
fn an_svid_is_selected_by_spiffe_id_or_hint_and_fetched_once_over_tcp() {
    let Some(bin) = agent_bin() else { return };
    let m = Material::new();
    m.issue("0", ID, Some("internal"));
    let external = m.issue("1", OTHER_ID, Some("external"));
    let agent = Agent::start(&bin, &m, &m.path("agent.sock"), true);
    let tcp = WorkloadApiAddress::parse(&format!("tcp://{}", agent.tcp.as_deref().unwrap())).unwrap();

    let fetch = |address: &WorkloadApiAddress, select: SvidSelector| {
        let options = WorkloadApiOptions { select, ..Default::default() };
        block_on(WorkloadApiSource::fetch_once(address, &options, WAIT))
    };
    let c = fetch(&agent.address(), SvidSelector::First).unwrap();
    assert_eq!(c.svid().spiffe_id(), ID, "the first SVID by default, as the standard says");
    assert_eq!(c.svids().len(), 2);
    let c = fetch(&agent.address(), SvidSelector::SpiffeId(OTHER_ID.into())).unwrap();
    assert_eq!((c.svid().spiffe_id(), c.svid().serial()), (OTHER_ID, serial(&external)));
    let c = fetch(&tcp, SvidSelector::Hint("external".into())).unwrap();
    assert_eq!(c.svid().spiffe_id(), OTHER_ID);
    let e = fetch(&agent.address(), SvidSelector::Hint("admin".into())).unwrap_err();
    let text = e.to_string();
    assert_eq!(e.kind_name(), "credentials");
    assert!(
        text.contains("no SVID with hint 'admin'") && text.contains(&format!("{OTHER_ID} (hint 'external')")),
        "{text}"
    );
}

#[test]
fn twenty_rotations_pushed_on_the_stream_all_arrive_in_order() {
    let Some(bin) = agent_bin() else { return };
    let m = Material::new();
    let mut expected = vec![serial(&m.issue("0", ID, None))];
    let mut agent = Agent::start(&bin, &m, &m.path("agent.sock"), false);
    let w = Watched::start(agent.address(), options("wl-rotations"));
    w.wait_contexts(1);
    for _ in 0..20 {
        expected.push(serial(&m.issue("0", ID, None)));
        agent.push();
    }
    w.wait_contexts(21);
    assert_eq!(w.serials(), expected);
    let status = w.source.status();
    assert_eq!((status.updates, status.stream_failures, status.rejected), (21, 0, 0));
    assert_eq!(agent.count("stream 0 opened"), 1, "one stream carried every rotation");
    assert_eq!(w.source.current().unwrap().svid().serial(), *expected.last().unwrap());
    assert_eq!(
        metric_line("trustwire_workload_api_updates_total", "source=\"wl-rotations\",result=\"accepted\"").as_deref(),
        Some("21")
    );
}

#[test]
fn a_malformed_response_is_reported_and_the_previous_context_kept() {
    let Some(bin) = agent_bin() else { return };
    let m = Material::new();
    let good = m.issue("0", ID, None);
    let mut agent = Agent::start(&bin, &m, &m.path("agent.sock"), false);
    let w = Watched::start(agent.address(), options("wl-malformed"));
    w.wait_contexts(1);

    let leaf = der(&good.cert_pem).to_vec();
    let other = m.ca.issue(&IssueRequest::new("other").spiffe_id(ID)).unwrap();
    let ca_dir = tempfile::tempdir().unwrap();
    m.ca.write(ca_dir.path()).unwrap();
    let ca_key = std::fs::read(ca_dir.path().join("ca.key")).unwrap();
    let wrong_id = format!("the leaf certificate is for {ID}, not this ID");
    type Break<'a> = Box<dyn Fn(&Material) + 'a>;
    let cases: Vec<(&str, Break, &str)> = vec![
        (
            "a certificate cut short",
            Box::new(|m: &Material| m.write("svids/0/chain.der", &leaf[..leaf.len() - 10])),
            "certificate chain: certificate #1 (at byte 0) is not DER X.509",
        ),
        (
            "bytes after the last certificate",
            Box::new(|m: &Material| m.write("svids/0/chain.der", &[leaf.as_slice(), &[0x30, 0x03, 1, 2]].concat())),
            "certificate chain: certificate #2 (at byte",
        ),
        (
            "an empty bundle",
            Box::new(|m: &Material| m.write("svids/0/bundle.der", b"")),
            "bundle: empty (no certificate)",
        ),
        (
            "another certificate's key",
            Box::new(|m: &Material| m.write("svids/0/key.pem", other.key_pem.as_bytes())),
            "the private key does not belong to the leaf certificate",
        ),
        (
            "a CA certificate as the leaf",
            Box::new(|m: &Material| {
                m.write("svids/0/chain.pem", m.ca.cert_pem().as_bytes());
                m.write("svids/0/key.pem", &ca_key);
            }),
            "the leaf certificate is a CA certificate",
        ),
        (
            "a key that is not PKCS#8",
            Box::new(|m: &Material| m.write("svids/0/key.der", b"\x30\x03\x02\x01\x01")),
            "the private key is not a usable PKCS#8 key",
        ),
        (
            "an ID the certificate does not carry",
            Box::new(|m: &Material| m.write("svids/0/id", OTHER_ID.as_bytes())),
            &wrong_id,
        ),
        (
            "an ID against the SPIFFE ID standard",
            Box::new(|m: &Material| m.write("svids/0/id", b"spiffe://example.org/ns/../admin")),
            "is not a valid SPIFFE ID: the path has a '..' segment",
        ),
        (
            "an upper-case federated trust domain",
            Box::new(|m: &Material| m.write("federated/Partner.Example.pem", m.ca.cert_pem().as_bytes())),
            "federated bundle key 'spiffe://Partner.Example'",
        ),
        (
            "a CRL that is a certificate",
            Box::new(|m: &Material| m.write("crls/bad.der", &leaf)),
            "CRL #1 is not a DER CRL",
        ),
    ];
    for (i, (what, break_it, says)) in cases.iter().enumerate() {
        break_it(&m);
        agent.push();
        wait_until(&format!("the rejection of {what}"), || w.rejections().len() > i);
        let message = w.rejections()[i].clone();
        assert!(message.contains("malformed Workload API response") && message.contains(says), "{what}: {message}");
        assert_eq!(w.source.current().unwrap().svid().serial(), serial(&good), "{what}: the previous context stays");
        // Back to the good material for the next case.
        m.svid("0", ID, &good, None);
        for f in ["federated/Partner.Example.pem", "crls/bad.der"] {
            m.remove(f);
        }
    }
    let status = w.source.status();
    assert_eq!(
        (status.state, status.updates, status.rejected, status.stream_failures),
        (StreamState::Streaming, 1, 10, 0)
    );
    assert!(status.last_error.unwrap().contains("CRL #1"));
    assert_eq!(
        metric_line("trustwire_workload_api_updates_total", "source=\"wl-malformed\",result=\"rejected\"").as_deref(),
        Some("10")
    );

    let next = m.issue("0", ID, None);
    agent.push();
    w.wait_contexts(2);
    assert_eq!(w.serials(), vec![serial(&good), serial(&next)], "a good response after bad ones is taken");
    assert_eq!(agent.count("stream 0 opened"), 1, "malformed responses do not break the stream");
}

#[test]
fn the_agent_going_away_and_coming_back_is_reported_backed_off_and_streamed_again() {
    let Some(bin) = agent_bin() else { return };
    let m = Material::new();
    let socket = m.path("agent.sock");

    let before = m.issue("0", ID, None);
    let agent = Agent::start(&bin, &m, &socket, false);
    let w = Watched::start(agent.address(), options("wl-restart"));
    w.wait_contexts(1);

    drop(agent);
    // The broken stream, then attempts at a socket nobody listens on.
    wait_until("three failed attempts", || w.failures().len() >= 4);
    let failures = w.failures();
    assert_eq!(failures[0].0, "broken", "{failures:?}");
    assert!(failures[1..].iter().all(|f| f.0 == "unreachable"), "{failures:?}");
    let waits: Vec<Duration> = failures.iter().map(|f| f.2.expect("retried")).collect();
    // Each step doubles (50, 100, 200, 400 ms) and the jitter stays within its upper half, so
    // waits never shrink until the cap and never pass it.
    assert!(waits.windows(2).take(2).all(|p| p[0] <= p[1]), "{waits:?}");
    assert!(waits.iter().all(|d| *d <= Duration::from_millis(400)), "{waits:?}");
    assert!(waits[0] <= Duration::from_millis(50), "{waits:?}");
    let status = w.source.status();
    assert!(matches!(status.state, StreamState::Backoff | StreamState::Connecting), "{status:?}");
    assert!(status.last_error.unwrap().contains("cannot connect to the Workload API at unix://"));
    assert_eq!(w.source.current().unwrap().svid().serial(), serial(&before), "the last context stays in use");
    let unreachable =
        metric_line("trustwire_workload_api_stream_failures_total", "source=\"wl-restart\",reason=\"unreachable\"");
    assert!(unreachable.unwrap().parse::<u64>().unwrap() >= 3);

    let after = m.issue("0", ID, None);
    let mut agent = Agent::start(&bin, &m, &socket, false);
    w.wait_contexts(2);
    assert_eq!(w.serials(), vec![serial(&before), serial(&after)]);
    assert_eq!(w.source.status().state, StreamState::Streaming);

    // A healthy stream resets the backoff: the next failure waits the first step again.
    let seen = w.failures().len();
    agent.command("close", "closed");
    wait_until("the closed stream's failure", || w.failures().len() > seen);
    let (reason, message, retry_in) = w.failures()[seen].clone();
    assert_eq!(reason, "broken");
    assert!(message.contains("stream closed on command"), "{message}");
    assert!(retry_in.unwrap() <= Duration::from_millis(50), "{retry_in:?}");
    w.wait_contexts(3);
    assert_eq!(w.serials()[2], serial(&after), "the reopened stream starts with the agent's current response");
}

#[test]
fn the_agent_refuses_requests_without_the_security_metadata_and_ours_carry_it() {
    let Some(bin) = agent_bin() else { return };
    let m = Material::new();
    m.issue("0", ID, None);
    let agent = Agent::start(&bin, &m, &m.path("agent.sock"), false);
    let probe = |header: bool| {
        let out = Command::new(&bin)
            .args(["probe", "-unix"])
            .arg(&agent.socket)
            .arg(format!("-header={header}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(probe(false), "error InvalidArgument: security header missing from request");
    assert_eq!(probe(true), format!("ok {ID}"));
    let c = block_on(WorkloadApiSource::fetch_once(&agent.address(), &WorkloadApiOptions::default(), WAIT)).unwrap();
    assert_eq!(c.svid().spiffe_id(), ID);
}

#[test]
fn invalid_argument_is_not_retried_and_permission_denied_is() {
    let Some(bin) = agent_bin() else { return };
    let m = Material::new();
    m.issue("0", ID, None);
    let mut agent = Agent::start(&bin, &m, &m.path("agent.sock"), false);

    agent.command("refuse invalid_argument", "refusing");
    let w = Watched::start(agent.address(), options("wl-invalid"));
    wait_until("the refusal", || w.source.status().state == StreamState::Failed);
    let failures = w.failures();
    assert_eq!(failures.len(), 1, "{failures:?}");
    let (reason, message, retry_in) = &failures[0];
    assert_eq!((*reason, *retry_in), ("refused", None), "the standard says not to retry InvalidArgument");
    assert!(message.contains("refused the request as invalid") && message.contains("refused on command"), "{message}");
    let e = block_on(w.source.first(WAIT)).unwrap_err().to_string();
    assert!(e.contains("stopped retrying") && e.contains("refused the request as invalid"), "{e}");
    let e =
        block_on(WorkloadApiSource::fetch_once(&agent.address(), &WorkloadApiOptions::default(), WAIT)).unwrap_err();
    assert_eq!(e.kind_name(), "transport", "{e}");
    drop(w);

    agent.command("refuse permission_denied", "refusing");
    let w = Watched::start(agent.address(), options("wl-denied"));
    wait_until("two refusals", || w.failures().len() >= 2);
    let (reason, message, retry_in) = w.failures()[0].clone();
    assert_eq!(reason, "refused");
    assert!(retry_in.is_some() && message.contains("has no identity for this workload"), "{message}");
    agent.command("refuse ok", "refusing");
    w.wait_contexts(1);
    assert_eq!(w.source.status().state, StreamState::Streaming);
}

#[test]
fn a_response_over_the_size_limit_breaks_the_stream_and_is_counted() {
    let Some(bin) = agent_bin() else { return };
    let m = Material::new();
    m.issue("0", ID, None);
    let agent = Agent::start(&bin, &m, &m.path("agent.sock"), false);
    let w = Watched::start(agent.address(), WorkloadApiOptions { max_message_bytes: 256, ..options("wl-limit") });
    wait_until("the failure", || !w.failures().is_empty());
    let (reason, message, _) = w.failures()[0].clone();
    assert_eq!(reason, "too_large");
    assert!(message.contains("over max_message_bytes (256 bytes)"), "{message}");
    assert!(w.source.current().is_none());
    let counted =
        metric_line("trustwire_workload_api_stream_failures_total", "source=\"wl-limit\",reason=\"too_large\"");
    assert!(counted.unwrap().parse::<u64>().unwrap() >= 1);
    let e = block_on(w.source.first(Duration::from_millis(1))).unwrap_err().to_string();
    assert!(e.contains("no X509-SVID from the Workload API") && e.contains("over max_message_bytes"), "{e}");
}

#[test]
fn addresses_follow_the_workload_endpoint_standard() {
    let ok = |s: &str| WorkloadApiAddress::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
    assert_eq!(
        ok("unix:///run/spire/sockets/agent.sock"),
        WorkloadApiAddress::Unix("/run/spire/sockets/agent.sock".into())
    );
    assert_eq!(ok("unix:/tmp/agent.sock"), WorkloadApiAddress::Unix("/tmp/agent.sock".into()));
    assert_eq!(ok("unix:///tmp/my%20agent.sock"), WorkloadApiAddress::Unix("/tmp/my agent.sock".into()));
    assert_eq!(ok("tcp://127.0.0.1:8081"), WorkloadApiAddress::Tcp("127.0.0.1:8081".parse().unwrap()));
    assert_eq!(ok("tcp://[::1]:8081"), WorkloadApiAddress::Tcp("[::1]:8081".parse().unwrap()));
    assert_eq!(ok("TCP://127.0.0.1:1").to_string(), "tcp://127.0.0.1:1", "schemes are case-insensitive");
    for s in ["unix:///run/a.sock", "tcp://10.0.0.1:8081", "tcp://[::1]:8081"] {
        assert_eq!(ok(s).to_string(), s);
        assert_eq!(ok(&ok(s).to_string()), ok(s));
    }
    for (s, says) in [
        ("", "not a URI"),
        ("/run/agent.sock", "not a URI"),
        ("http://127.0.0.1:80", "scheme 'http' is not supported"),
        ("unix://agent/run/agent.sock", "a unix address has no authority"),
        ("unix:run/agent.sock", "must be absolute"),
        ("unix://", "the socket path is missing"),
        ("unix:///run/agent.sock?mode=1", "a query"),
        ("unix:///run/agent.sock#x", "a fragment"),
        ("unix:///run/agent%zz.sock", "'%' must start an escape"),
        ("unix:///run/agent%00.sock", "NUL"),
        ("tcp://localhost:8081", "'localhost' is not an IP address"),
        ("tcp://127.0.0.1", "the port is missing"),
        ("tcp://127.0.0.1:0", "'0' is not a port number"),
        ("tcp://127.0.0.1:65536", "not a port number"),
        ("tcp://user@127.0.0.1:8081", "userinfo"),
        ("tcp://127.0.0.1:8081/agent", "a tcp address has no path"),
        ("tcp:127.0.0.1:8081", "write tcp://127.0.0.1:8081"),
        ("tcp://::1:8081", "in brackets"),
        ("tcp://[::1:8081", "not closed"),
        ("tcp://[127.0.0.1]:8081", "only an IPv6 address goes in brackets"),
    ] {
        let e = WorkloadApiAddress::parse(s).expect_err(s);
        let text = e.to_string();
        assert_eq!(e.kind_name(), "config", "{s}");
        assert!(text.contains(&format!("Workload API address '{s}'")) && text.contains(says), "{s}: {text}");
    }
}

/// Runs `env_child` in a child process with SPIFFE_ENDPOINT_SOCKET as given, so no test here
/// changes its own environment (other threads read it).
fn parse_env_in_child(value: Option<&str>) -> String {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "env_child", "--nocapture", "--test-threads=1"]).env("TW_WORKLOAD_ENV_CHILD", "1");
    match value {
        Some(v) => cmd.env("SPIFFE_ENDPOINT_SOCKET", v),
        None => cmd.env_remove("SPIFFE_ENDPOINT_SOCKET"),
    };
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.split_once("ENV-RESULT ").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("{stdout}"))
        .to_string()
}

#[test]
fn env_child() {
    if std::env::var_os("TW_WORKLOAD_ENV_CHILD").is_none() {
        return;
    }
    match WorkloadApiAddress::parse("env") {
        Ok(a) => println!("ENV-RESULT ok {a}"),
        Err(e) => println!("ENV-RESULT error {e}"),
    }
}

#[test]
fn env_takes_the_address_from_spiffe_endpoint_socket() {
    assert_eq!(parse_env_in_child(Some("unix:///run/spire/agent.sock")), "ok unix:///run/spire/agent.sock");
    assert_eq!(parse_env_in_child(Some("tcp://127.0.0.1:8081")), "ok tcp://127.0.0.1:8081");
    let bad = parse_env_in_child(Some("tcp://spire-agent:8081"));
    assert!(
        bad.starts_with("error")
            && bad.contains("SPIFFE_ENDPOINT_SOCKET='tcp://spire-agent:8081'")
            && bad.contains("not an IP address"),
        "{bad}"
    );
    for unset in [None, Some("")] {
        let e = parse_env_in_child(unset);
        assert!(e.contains("SPIFFE_ENDPOINT_SOCKET, which is not set"), "{e}");
    }
}

/// A real SPIRE server and agent (built by `make test-spire`, which runs this): the agent
/// attests this process by its uid and serves the registered SVID, then rotates it.
#[test]
#[ignore = "needs spire-server and spire-agent: make test-spire"]
fn real_spire_serves_and_rotates_the_workload_svid() {
    let bin = PathBuf::from(std::env::var_os("TRUSTWIRE_SPIRE_BIN").expect("TRUSTWIRE_SPIRE_BIN: the SPIRE build"));
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let server_socket = d.join("server.sock");
    let agent_socket = d.join("agent.sock");
    std::fs::write(
        d.join("server.conf"),
        format!(
            r#"server {{
    bind_address = "127.0.0.1"
    bind_port = "{port}"
    socket_path = "{server}"
    trust_domain = "example.org"
    data_dir = "{d}/server-data"
    log_level = "INFO"
    ca_ttl = "1h"
    default_x509_svid_ttl = "1m"
}}
plugins {{
    DataStore "sql" {{ plugin_data {{ database_type = "sqlite3" connection_string = "{d}/server-data/datastore.sqlite3" }} }}
    KeyManager "memory" {{ plugin_data {{}} }}
    NodeAttestor "join_token" {{ plugin_data {{}} }}
}}
"#,
            server = server_socket.display(),
            d = d.display()
        ),
    )
    .unwrap();
    std::fs::write(
        d.join("agent.conf"),
        format!(
            r#"agent {{
    data_dir = "{d}/agent-data"
    log_level = "INFO"
    server_address = "127.0.0.1"
    server_port = "{port}"
    socket_path = "{agent}"
    trust_domain = "example.org"
    insecure_bootstrap = true
}}
plugins {{
    KeyManager "memory" {{ plugin_data {{}} }}
    NodeAttestor "join_token" {{ plugin_data {{}} }}
    WorkloadAttestor "unix" {{ plugin_data {{}} }}
}}
"#,
            agent = agent_socket.display(),
            d = d.display()
        ),
    )
    .unwrap();
    let spire = |args: &[&str]| {
        let out = Command::new(bin.join("spire-server")).args(args).output().unwrap();
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    };
    let socket_arg = server_socket.to_str().unwrap();
    let _server =
        Proc::spawn(Command::new(bin.join("spire-server")).arg("run").arg("-config").arg(d.join("server.conf")));
    wait_until("the SPIRE server", || spire(&["healthcheck", "-socketPath", socket_arg]).0);
    let (ok, out) = spire(&["token", "generate", "-socketPath", socket_arg, "-spiffeID", "spiffe://example.org/agent"]);
    assert!(ok, "{out}");
    let token = out.split_whitespace().last().unwrap().to_string();
    let uid = String::from_utf8(Command::new("id").arg("-u").output().unwrap().stdout).unwrap().trim().to_string();
    let selector = format!("unix:uid:{uid}");
    let (ok, out) = spire(&[
        "entry",
        "create",
        "-socketPath",
        socket_arg,
        "-parentID",
        "spiffe://example.org/agent",
        "-spiffeID",
        ID,
        "-selector",
        &selector,
        "-x509SVIDTTL",
        "30",
    ]);
    assert!(ok, "{out}");
    let _agent = Proc::spawn(
        Command::new(bin.join("spire-agent"))
            .arg("run")
            .arg("-config")
            .arg(d.join("agent.conf"))
            .args(["-joinToken", &token]),
    );

    let address = WorkloadApiAddress::parse(&format!("unix://{}", agent_socket.display())).unwrap();
    let w = Watched::start(address, options("wl-spire"));
    // Registration entries reach the agent on its next sync (every few seconds).
    let first = block_on(w.source.first(Duration::from_secs(120))).unwrap();
    assert_eq!(first.svid().spiffe_id(), ID);
    assert_eq!(first.trust_domain(), "example.org");
    // Until the agent is up and has the entry, attempts fail (unreachable, then no identity).
    let failed_before = w.failures();
    assert!(
        failed_before.iter().all(|f| matches!(f.0, "unreachable" | "refused") && f.2.is_some()),
        "{failed_before:?}"
    );
    let profile = trustwire::TlsProfile::new(
        Some(first.svid().identity().unwrap()),
        trustwire::tls::TrustBundle { roots: first.bundle().to_vec(), ..Default::default() },
    );
    profile.server().expect("SPIRE's SVID works as a server identity");
    // A 30 s SVID is renewed at about half its life.
    let deadline = Instant::now() + Duration::from_secs(120);
    while w.serials().iter().collect::<std::collections::BTreeSet<_>>().len() < 2 {
        assert!(Instant::now() < deadline, "no rotation from SPIRE: {:?}", w.source.status());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(w.failures().len(), failed_before.len(), "the rotation came on the open stream");
}

// ---------------------------------------------------------------------------------------------
// A credential store fed by the Workload API: what a server or client built on it does while the
// agent pushes rotations, federated bundles and CRLs, and while the agent is away.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use trustwire::credentials::{CredentialStore, Event, Sources, StoreOptions, Use, WorkloadApiSpec};
use trustwire::rpc::{Request, Response, RunningServer, Server, Status};
use trustwire::tls::{Policy, TlsProfile, TrustBundle};

const CLIENT: &str = "spiffe://example.org/ns/test/client";
const PARTNER_CLIENT: &str = "spiffe://partner.example/ns/test/client";

/// The store's sources: everything from the agent at `agent`.
fn workload_sources(agent: &Agent) -> Sources {
    Sources { workload_api: Some(WorkloadApiSpec::new(agent.address())), ..Default::default() }
}

fn store_options(name: &str) -> StoreOptions {
    StoreOptions { name: name.into(), watch: false, poll_interval: None, ..Default::default() }
}

/// A server SVID a client can also check by name (localhost and 127.0.0.1 as well).
fn issue_server(m: &Material) -> Credential {
    let c =
        m.ca.issue(&IssueRequest::new("server").spiffe_id(ID).dns("localhost").ip("127.0.0.1".parse().unwrap()))
            .unwrap();
    m.svid("0", ID, &c, None);
    c
}

/// A server on `store` whose `test.Peer/Serial` answers with the caller's certificate serial.
fn server_on(store: &CredentialStore) -> RunningServer {
    let mut server = Server::new(store.server_tls().unwrap());
    trustwire::echo::register(&mut server);
    server.register("test.Peer", "Serial", |req: Request| async move {
        Ok::<_, Status>(Response::new(req.peer.serial.clone().into_bytes()))
    });
    block_on(server.bind("127.0.0.1:0")).unwrap()
}

/// A client profile holding `cred` and trusting `ca_pem`.
fn client_profile(cred: &Credential, ca_pem: &str) -> TlsProfile {
    let identity = trustwire::tls::Identity::from_pem(cred.cert_pem.as_bytes(), cred.key_pem.as_bytes()).unwrap();
    TlsProfile::new(Some(identity), TrustBundle { roots: vec![der(ca_pem)], ..Default::default() })
}

fn echo(client: &trustwire::rpc::Client, text: &str) -> trustwire::Result<String> {
    let opts = trustwire::rpc::CallOptions { timeout: Some(Duration::from_secs(5)), ..Default::default() };
    let r = block_on(client.call("example.EchoService", "Echo", trustwire::echo::encode(text), opts))?;
    Ok(trustwire::echo::decode(&r.payload).unwrap())
}

fn client_for(server: &RunningServer, profile: &TlsProfile) -> trustwire::rpc::Client {
    trustwire::rpc::Client::new(server.local_addr().to_string(), profile.client().unwrap(), Default::default())
}

fn events(store: &CredentialStore) -> Arc<Mutex<Vec<Event>>> {
    let seen: Arc<Mutex<Vec<Event>>> = Arc::default();
    let s = seen.clone();
    store.subscribe(move |e| s.lock().unwrap().push(e.clone()));
    seen
}

/// Callers on a pooled connection and on a fresh connection per call, counting failures.
struct Calls {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Calls {
    fn start(server: &RunningServer, profile: &TlsProfile) -> Calls {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let pooled = client_for(server, profile);
        let mut threads = Vec::new();
        for fresh in [false, true] {
            let (stop, ok, failures, pooled) = (stop.clone(), ok.clone(), failures.clone(), pooled.clone());
            let (addr, tls) = (server.local_addr().to_string(), profile.client().unwrap());
            threads.push(std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let c = match fresh {
                        true => trustwire::rpc::Client::new(addr.clone(), tls.clone(), Default::default()),
                        false => pooled.clone(),
                    };
                    match echo(&c, &format!("call {i}")) {
                        Ok(t) if t == format!("call {i}") => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(t) => failures.lock().unwrap().push(format!("wrong answer {t}")),
                        Err(e) => failures.lock().unwrap().push(e.to_string()),
                    }
                }
            }));
        }
        Calls { stop, ok, failures, threads }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let failures = self.failures.lock().unwrap();
        assert!(failures.is_empty(), "{} failed calls, first: {:?}", failures.len(), failures.first());
        self.ok.load(Ordering::Relaxed)
    }
}

fn serial_in_service(store: &CredentialStore) -> Option<String> {
    store.generation().certificate.as_ref().map(|c| c.identity.serial.clone())
}

#[test]
fn a_server_store_follows_twenty_rotations_pushed_on_the_stream_without_a_failed_call() {
    let Some(bin) = agent_bin() else { return };
    let m = Material::new();
    let first = issue_server(&m);
    let mut agent = Agent::start(&bin, &m, &m.path("agent.sock"), false);
    let store = CredentialStore::new(
        Use::Server,
        workload_sources(&agent),
        TlsProfile::new(None, Default::default()),
        store_options("wl-store-rotation"),
    )
    .unwrap();
    assert_eq!(serial_in_service(&store), Some(serial(&first)), "the store starts with the agent's SVID");
    let server = server_on(&store);
    let cred = m.ca.issue(&IssueRequest::new("client").spiffe_id(CLIENT)).unwrap();
    let profile = client_profile(&cred, m.ca.cert_pem());
    let calls = Calls::start(&server, &profile);

    for round in 0..20 {
        let next = issue_server(&m);
        agent.push();
        wait_until(&format!("round {round}: the pushed SVID in service"), || {
            serial_in_service(&store) == Some(serial(&next))
        });
        let fresh = client_for(&server, &profile);
        let seen = block_on(fresh.server_identity()).unwrap().unwrap();
        assert_eq!(seen.serial, serial(&next), "round {round}: a new connection sees the new SVID");
        assert_eq!(seen.spiffe_id.as_deref(), Some(ID));
    }
    let ok = calls.finish();
    assert!(ok > 0, "calls were made during the rotations");
    assert_eq!(store.generation().number, 21, "one generation per pushed response");
    assert_eq!(agent.count("stream 0 opened"), 1, "one stream carried every rotation");
    // A call on a connection opened before the last rotation still works.
    assert_eq!(echo(&client_for(&server, &profile), "after").unwrap(), "after");
}

#[test]
fn a_federated_bundle_pushed_then_withdrawn_admits_then_refuses_the_partner_and_closes_its_connection() {
    let Some(bin) = agent_bin() else { return };
    let m = Material::new();
    issue_server(&m);
    let partner = DevCa::new(PARTNER_TD).unwrap();
    let partner_cred = partner.issue(&IssueRequest::new("partner").spiffe_id(PARTNER_CLIENT)).unwrap();
    let mut agent = Agent::start(&bin, &m, &m.path("agent.sock"), false);
    let mut template = TlsProfile::new(None, Default::default());
    template.policy = Policy::from_patterns(&["spiffe://example.org/*", "spiffe://partner.example/*"]).unwrap();
    let store =
        CredentialStore::new(Use::Server, workload_sources(&agent), template, store_options("wl-store-federation"))
            .unwrap();
    let seen = events(&store);
    let server = server_on(&store);
    // The partner trusts our CA, so only our side decides.
    let partner_profile = client_profile(&partner_cred, m.ca.cert_pem());
    let domains = |store: &CredentialStore| -> Vec<String> {
        store.generation().trust_domains.iter().map(|d| d.name.clone()).collect()
    };

    // The client is told by alert; the server refused it as unknown_issuer.
    let refused = |e: trustwire::Error, alert: &str| {
        assert_eq!(e.verdict().map(|v| v.name()), Some("peer_alert"), "{e}");
        assert!(e.to_string().contains(alert), "{e}");
    };
    refused(echo(&client_for(&server, &partner_profile), "before").unwrap_err(), "unknown_ca");
    assert_eq!(domains(&store), vec!["example.org"]);

    m.write(&format!("federated/{PARTNER_TD}.pem"), partner.cert_pem().as_bytes());
    agent.push();
    wait_until("the federated bundle in service", || domains(&store).contains(&PARTNER_TD.to_string()));
    let live = client_for(&server, &partner_profile);
    assert_eq!(echo(&live, "federated").unwrap(), "federated");

    m.remove(&format!("federated/{PARTNER_TD}.pem"));
    agent.push();
    wait_until("the federated bundle withdrawn", || !domains(&store).contains(&PARTNER_TD.to_string()));
    wait_until("the partner's live connection closed", || {
        seen.lock().unwrap().iter().any(|e| {
            matches!(e, Event::ConnectionClosed { peer, verdict, .. }
                if peer == PARTNER_CLIENT && verdict.name() == "unknown_issuer")
        })
    });
    refused(echo(&client_for(&server, &partner_profile), "after").unwrap_err(), "unknown_ca");
}

#[test]
fn a_crl_pushed_on_the_stream_revokes_a_peer_and_closes_its_connection() {
    let Some(bin) = agent_bin() else { return };
    let m = Material::new();
    issue_server(&m);
    let mut agent = Agent::start(&bin, &m, &m.path("agent.sock"), false);
    let store = CredentialStore::new(
        Use::Server,
        workload_sources(&agent),
        TlsProfile::new(None, Default::default()),
        store_options("wl-store-crl"),
    )
    .unwrap();
    let seen = events(&store);
    let server = server_on(&store);
    let revoked = m.ca.issue(&IssueRequest::new("client").spiffe_id(CLIENT)).unwrap();
    let kept = m.ca.issue(&IssueRequest::new("kept").spiffe_id(OTHER_ID)).unwrap();
    let live = client_for(&server, &client_profile(&revoked, m.ca.cert_pem()));
    assert_eq!(echo(&live, "before").unwrap(), "before");

    let crl = m.ca.crl_pem(&[&serial(&revoked)], SystemTime::now() + Duration::from_secs(3600)).unwrap();
    m.write("crls/example.pem", crl.as_bytes());
    agent.push();
    wait_until("the pushed CRL in service", || store.generation().crls.len() == 1);
    wait_until("the revoked peer's connection closed", || {
        seen.lock()
            .unwrap()
            .iter()
            .any(|e| matches!(e, Event::ConnectionClosed { verdict, .. } if verdict.name() == "revoked"))
    });
    let e = echo(&client_for(&server, &client_profile(&revoked, m.ca.cert_pem())), "again").unwrap_err();
    assert_eq!(e.verdict().map(|v| v.name()), Some("peer_alert"), "{e}");
    assert!(e.to_string().contains("certificate_revoked"), "the server refused it as revoked: {e}");
    let other = client_for(&server, &client_profile(&kept, m.ca.cert_pem()));
    assert_eq!(echo(&other, "kept").unwrap(), "kept", "a peer the CRL does not name is still admitted");
}

#[test]
fn live_connections_lose_no_call_while_the_agent_is_away_and_the_store_resumes_when_it_returns() {
    let Some(bin) = agent_bin() else { return };
    let m = Material::new();
    let socket = m.path("agent.sock");
    let first = issue_server(&m);
    let agent = Agent::start(&bin, &m, &socket, false);
    let store = CredentialStore::new(
        Use::Server,
        workload_sources(&agent),
        TlsProfile::new(None, Default::default()),
        store_options("wl-store-agent-loss"),
    )
    .unwrap();
    let seen = events(&store);
    let server = server_on(&store);
    let cred = m.ca.issue(&IssueRequest::new("client").spiffe_id(CLIENT)).unwrap();
    let profile = client_profile(&cred, m.ca.cert_pem());
    let calls = Calls::start(&server, &profile);

    drop(agent);
    wait_until("the stream to notice", || {
        metric_line("trustwire_workload_api_stream_failures_total", "source=\"wl-store-agent-loss\",reason=\"broken\"")
            .is_some()
    });
    let during = calls.ok.load(Ordering::Relaxed);
    wait_until("calls while the agent is away", || calls.ok.load(Ordering::Relaxed) > during + 50);
    assert_eq!(serial_in_service(&store), Some(serial(&first)), "the last SVID keeps serving");
    assert!(
        !seen.lock().unwrap().iter().any(|e| matches!(e, Event::Rejected { .. })),
        "losing the agent is not a rejected load"
    );

    let next = issue_server(&m);
    let _agent = Agent::start(&bin, &m, &socket, false);
    wait_until("the returning agent's SVID in service", || serial_in_service(&store) == Some(serial(&next)));
    assert!(calls.finish() > 0);
}

#[test]
fn a_workload_api_profile_is_refused_with_a_file_identity_and_waits_for_its_first_svid_within_a_bound() {
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("p.toml");
    std::fs::write(
        &profile,
        "[identity]\nworkload_api = \"unix:///nonexistent/agent.sock\"\ncert = \"a.pem\"\nkey = \"a.key\"\n",
    )
    .unwrap();
    let e = CredentialStore::from_file(&profile, Use::Server, store_options("wl-both")).unwrap_err();
    assert!(e.to_string().contains("remove cert, key and combined, or workload_api"), "{e}");

    let address = WorkloadApiAddress::parse(&format!("unix://{}", dir.path().join("nobody.sock").display())).unwrap();
    let spec = WorkloadApiSpec { first_timeout: Duration::from_millis(500), ..WorkloadApiSpec::new(address) };
    let sources = Sources { workload_api: Some(spec), ..Default::default() };
    let e =
        CredentialStore::new(Use::Server, sources, TlsProfile::new(None, Default::default()), store_options("wl-none"))
            .unwrap_err();
    let text = e.to_string();
    assert_eq!(e.kind_name(), "timeout", "{text}");
    assert!(
        text.contains("no X509-SVID from the Workload API at unix://") && text.contains("cannot connect"),
        "{text}"
    );
}

/// `serve-echo --workload-api` and `call --workload-api`: both ends take their SVIDs from the
/// agent, and the server follows a rotation pushed while it runs.
#[test]
fn serve_echo_and_call_take_their_svids_from_the_workload_api() {
    let Some(bin) = agent_bin() else { return };
    let m = Material::new();
    let first = issue_server(&m);
    let client = m.ca.issue(&IssueRequest::new("client").spiffe_id(CLIENT)).unwrap();
    m.svid("1", CLIENT, &client, Some("client"));
    let mut agent = Agent::start(&bin, &m, &m.path("agent.sock"), false);
    let address = format!("unix://{}", m.path("agent.sock").display());
    let mut server = Proc::spawn(Command::new(common::trustwire_bin()).args([
        "serve-echo",
        "--listen",
        "127.0.0.1:0",
        "--workload-api",
        &address,
        "--allow",
        CLIENT,
    ]));
    let addr = server.wait_for("serve-echo to listen", |out, _| {
        let out = String::from_utf8_lossy(out);
        out.lines().find(|l| l.contains("serving")).map(|l| l.trim().rsplit(' ').next().unwrap().to_string())
    });
    // The agent's first SVID is the server's; the client profile picks its own by hint.
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("client.toml");
    std::fs::write(&profile, format!("[identity]\nworkload_api = \"{address}\"\nsvid_hint = \"client\"\n")).unwrap();
    let call = |extra: &[&str]| {
        let mut args = vec!["call", &addr, "example.EchoService/Echo", "--config", profile.to_str().unwrap()];
        args.extend_from_slice(extra);
        Command::new(common::trustwire_bin()).args(&args).output().unwrap()
    };
    let out = call(&["--echo", "hello", "--server-spiffe-id", ID]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("hello"));
    // The same client from flags alone; without the hint it would present the server's SVID.
    let flags = |hint: &[&str]| {
        let mut args = vec!["call", &addr, "example.EchoService/Echo", "--workload-api", &address];
        args.extend_from_slice(hint);
        args.extend_from_slice(&["--server-spiffe-id", ID, "--echo", "flags"]);
        Command::new(common::trustwire_bin()).args(&args).output().unwrap()
    };
    let out = flags(&["--svid-hint", "client"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = flags(&["--svid", CLIENT]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = flags(&[]);
    assert!(!out.status.success(), "the first SVID is the server's, which the server does not allow");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("access_denied") && err.contains(ID), "{err}");

    let next = issue_server(&m);
    agent.push();
    server.wait_for("the rotation in serve-echo's log", |_, err| err.contains(&serial(&next)).then_some(()));
    let probe = Command::new(common::trustwire_bin())
        .args(["probe", &addr, "--config", profile.to_str().unwrap(), "--server-spiffe-id", ID])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&probe.stdout).to_string() + &String::from_utf8_lossy(&probe.stderr);
    assert!(text.contains(&serial(&next)) || text.contains(&serial(&next).to_uppercase()), "{text}");
    assert!(!text.contains(&serial(&first)), "{text}");
}
