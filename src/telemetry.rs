//! Process-wide counters and gauges, exposed as Prometheus text by [`metrics_text`].
//!
//! Labels come only from bounded sets: verdict names, result names, credential store names the
//! application chose, and service/method names the server registered (anything a peer made up
//! is counted under `(unknown)`), so a hostile peer cannot grow the exposition.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::error::{Error, Side, Verdict};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    role: &'static str,
    result: &'static str,
    verdict: &'static str,
    decided_by: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    store: String,
    result: &'static str,
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    role: &'static str,
    service: String,
    method: String,
    code: i32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabels {
    store: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CrlLabels {
    store: String,
    issuer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DomainLabels {
    store: String,
    trust_domain: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProxyLabels {
    route: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    scope: String,
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    scope: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClosedLabels {
    store: String,
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkloadApiStateLabels {
    source: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkloadApiFailureLabels {
    source: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkloadApiUpdateLabels {
    source: String,
    result: &'static str,
}

struct Metrics {
    registry: Registry,
    handshakes: Family<HandshakeLabels, Counter>,
    reloads: Family<ReloadLabels, Counter>,
    calls: Family<CallLabels, Counter>,
    refused_calls: Family<RefusedLabels, Counter>,
    closed: Family<ClosedLabels, Counter>,
    refused_connections: Family<LimitLabels, Counter>,
    closed_by_limit: Family<LimitLabels, Counter>,
    reads_paused: Family<LimitLabels, Counter>,
    proxy: Family<ProxyLabels, Counter>,
    generation: Family<StoreLabels, Gauge>,
    not_after: Family<StoreLabels, Gauge>,
    seconds_left: Family<StoreLabels, Gauge>,
    earliest_ca_expiry: Family<StoreLabels, Gauge>,
    crl_next_update: Family<CrlLabels, Gauge>,
    last_reload: Family<StoreLabels, Gauge>,
    domain_cas: Family<DomainLabels, Gauge>,
    domain_expiry: Family<DomainLabels, Gauge>,
    domain_sequence: Family<DomainLabels, Gauge>,
    insecure_key: Family<StoreLabels, Gauge>,
    /// Trust domains published per store, so a domain that goes away loses its gauges.
    domains: Mutex<HashMap<String, Vec<String>>>,
    workload_api_state: Family<WorkloadApiStateLabels, Gauge>,
    workload_api_failures: Family<WorkloadApiFailureLabels, Counter>,
    workload_api_updates: Family<WorkloadApiUpdateLabels, Counter>,
    /// not-after per store, so seconds-left is computed when scraped.
    expiries: Mutex<HashMap<String, i64>>,
}

fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let mut registry = Registry::with_prefix("trustwire");
        let m = Metrics {
            handshakes: Family::default(),
            reloads: Family::default(),
            calls: Family::default(),
            refused_calls: Family::default(),
            closed: Family::default(),
            refused_connections: Family::default(),
            closed_by_limit: Family::default(),
            reads_paused: Family::default(),
            proxy: Family::default(),
            generation: Family::default(),
            not_after: Family::default(),
            seconds_left: Family::default(),
            earliest_ca_expiry: Family::default(),
            crl_next_update: Family::default(),
            last_reload: Family::default(),
            domain_cas: Family::default(),
            domain_expiry: Family::default(),
            domain_sequence: Family::default(),
            insecure_key: Family::default(),
            domains: Mutex::new(HashMap::new()),
            workload_api_state: Family::default(),
            workload_api_failures: Family::default(),
            workload_api_updates: Family::default(),
            expiries: Mutex::new(HashMap::new()),
            registry: Registry::default(),
        };
        registry.register(
            "handshakes",
            "TLS handshakes by role, result and verdict; decided_by says whether we refused the peer (local) or the peer refused us (remote)",
            m.handshakes.clone(),
        );
        registry.register("reloads", "Credential loads by store and result", m.reloads.clone());
        registry.register("calls", "RPC calls by role, service, method and brpc error code", m.calls.clone());
        registry.register(
            "calls_refused",
            "Calls refused by authorization before a handler or the upstream saw them, by scope (server, or the proxy route) and verdict",
            m.refused_calls.clone(),
        );
        registry.register(
            "connections_closed_by_trust_change",
            "Established connections closed because new trust material refuses their peer",
            m.closed.clone(),
        );
        registry.register(
            "connections_refused",
            "Accepted sockets closed at once because a budget was full, by scope (server, or the proxy route) and reason (max_connections, max_handshakes, max_handshakes_per_source)",
            m.refused_connections.clone(),
        );
        registry.register(
            "connections_closed_by_limit",
            "Connections closed because they hit a limit, by scope and reason (frame_timeout, idle_timeout, max_body)",
            m.closed_by_limit.clone(),
        );
        registry.register(
            "reads_paused",
            "Times a connection stopped reading until its answers drained, by scope and reason (max_unwritten_bytes, max_in_flight_per_connection)",
            m.reads_paused.clone(),
        );
        registry.register(
            "proxy_streams",
            "Proxied streams by route and outcome (completed, handshake_refused, refused, upstream_error, proxy_header, protocol, io)",
            m.proxy.clone(),
        );
        registry.register("credential_generation", "Generation number in service", m.generation.clone());
        registry.register(
            "certificate_not_after_seconds",
            "Our certificate's not-after time (Unix seconds)",
            m.not_after.clone(),
        );
        registry.register(
            "certificate_seconds_left",
            "Seconds until our certificate expires (negative once expired)",
            m.seconds_left.clone(),
        );
        registry.register(
            "trust_bundle_earliest_ca_expiry_seconds",
            "Earliest not-after among the trusted CAs (Unix seconds)",
            m.earliest_ca_expiry.clone(),
        );
        registry.register(
            "crl_next_update_seconds",
            "Each CRL's next-update time (Unix seconds)",
            m.crl_next_update.clone(),
        );
        registry.register(
            "last_successful_reload_seconds",
            "When the current generation went live (Unix seconds)",
            m.last_reload.clone(),
        );
        registry.register(
            "trust_domain_cas",
            "CA certificates trusted for each SPIFFE trust domain",
            m.domain_cas.clone(),
        );
        registry.register(
            "trust_domain_earliest_ca_expiry_seconds",
            "Earliest not-after among each trust domain's CAs (Unix seconds)",
            m.domain_expiry.clone(),
        );
        registry.register(
            "trust_domain_bundle_sequence",
            "The spiffe_sequence of each trust domain's SPIFFE bundle, when it came from one",
            m.domain_sequence.clone(),
        );
        registry.register(
            "insecure_key_file",
            "1 when our private key's file can be read by users other than its owner",
            m.insecure_key.clone(),
        );
        registry.register(
            "workload_api_stream_state",
            "State of each Workload API source's stream: 1 for the current state (connecting, streaming, backoff, failed), 0 for the others",
            m.workload_api_state.clone(),
        );
        registry.register(
            "workload_api_stream_failures",
            "Workload API streams that could not be opened or broke, by source and reason (unreachable, refused, broken, ended, too_large)",
            m.workload_api_failures.clone(),
        );
        registry.register(
            "workload_api_updates",
            "Workload API responses by source and result (accepted, or rejected as malformed or without the selected SVID)",
            m.workload_api_updates.clone(),
        );
        Metrics { registry, ..m }
    })
}

fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// The Prometheus text exposition of every trustwire metric in this process.
pub fn metrics_text() -> String {
    let m = metrics();
    let now = unix(SystemTime::now());
    for (store, not_after) in m.expiries.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        m.seconds_left.get_or_create(&StoreLabels { store: store.clone() }).set(not_after - now);
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &m.registry);
    out
}

/// Role of the local end of a handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Client => "client",
        }
    }
}

pub(crate) fn handshake_accepted(role: Role) {
    metrics()
        .handshakes
        .get_or_create(&HandshakeLabels { role: role.name(), result: "accepted", verdict: "", decided_by: "" })
        .inc();
}

pub(crate) fn handshake_refused(role: Role, err: &Error) {
    let verdict = err.verdict().unwrap_or(Verdict::Io);
    let decided_by = match err.side() {
        Some(Side::Remote) => "remote",
        _ => "local",
    };
    metrics()
        .handshakes
        .get_or_create(&HandshakeLabels { role: role.name(), result: "refused", verdict: verdict.name(), decided_by })
        .inc();
}

pub(crate) fn call(role: Role, service: &str, method: &str, code: i32) {
    metrics()
        .calls
        .get_or_create(&CallLabels {
            role: role.name(),
            service: service.to_string(),
            method: method.to_string(),
            code,
        })
        .inc();
}

pub(crate) fn call_refused(scope: &str, verdict: Verdict) {
    metrics().refused_calls.get_or_create(&RefusedLabels { scope: scope.to_string(), verdict: verdict.name() }).inc();
}

pub(crate) fn reload_rejected(store: &str, verdict: Option<Verdict>) {
    metrics()
        .reloads
        .get_or_create(&ReloadLabels {
            store: store.to_string(),
            result: "rejected",
            verdict: verdict.map(Verdict::name).unwrap_or("invalid"),
        })
        .inc();
}

pub(crate) fn proxy_stream(route: &str, outcome: &'static str) {
    metrics().proxy.get_or_create(&ProxyLabels { route: route.to_string(), outcome }).inc();
}

pub(crate) fn connection_refused(scope: &str, reason: &'static str) {
    metrics().refused_connections.get_or_create(&LimitLabels { scope: scope.to_string(), reason }).inc();
}

pub(crate) fn connection_closed_by_limit(scope: &str, reason: &'static str) {
    metrics().closed_by_limit.get_or_create(&LimitLabels { scope: scope.to_string(), reason }).inc();
}

pub(crate) fn reads_paused(scope: &str, reason: &'static str) {
    metrics().reads_paused.get_or_create(&LimitLabels { scope: scope.to_string(), reason }).inc();
}

pub(crate) fn connection_closed(store: &str, verdict: Verdict) {
    metrics().closed.get_or_create(&ClosedLabels { store: store.to_string(), verdict: verdict.name() }).inc();
}

/// Sets a Workload API source's stream state: `state` to 1, the other `states` to 0.
pub(crate) fn workload_api_state(source: &str, state: &'static str, states: &[&'static str]) {
    let m = metrics();
    for s in states {
        let labels = WorkloadApiStateLabels { source: source.to_string(), state: s };
        m.workload_api_state.get_or_create(&labels).set(i64::from(*s == state));
    }
}

/// Drops a stopped Workload API source's state series, so it does not look stuck.
pub(crate) fn workload_api_stopped(source: &str, states: &[&'static str]) {
    let m = metrics();
    for s in states {
        m.workload_api_state.remove(&WorkloadApiStateLabels { source: source.to_string(), state: s });
    }
}

pub(crate) fn workload_api_failure(source: &str, reason: &'static str) {
    metrics()
        .workload_api_failures
        .get_or_create(&WorkloadApiFailureLabels { source: source.to_string(), reason })
        .inc();
}

pub(crate) fn workload_api_update(source: &str, accepted: bool) {
    let result = if accepted { "accepted" } else { "rejected" };
    metrics().workload_api_updates.get_or_create(&WorkloadApiUpdateLabels { source: source.to_string(), result }).inc();
}

/// What a successful load publishes about the material now in service.
pub(crate) struct GenerationGauges<'a> {
    pub store: &'a str,
    pub generation: u64,
    pub not_after: Option<SystemTime>,
    pub earliest_ca_expiry: Option<SystemTime>,
    pub crl_next_updates: &'a [(String, Option<SystemTime>)],
    pub loaded_at: SystemTime,
}

pub(crate) fn reload_succeeded(g: GenerationGauges<'_>) {
    let m = metrics();
    let store = StoreLabels { store: g.store.to_string() };
    m.reloads.get_or_create(&ReloadLabels { store: g.store.to_string(), result: "ok", verdict: "" }).inc();
    m.generation.get_or_create(&store).set(g.generation as i64);
    m.last_reload.get_or_create(&store).set(unix(g.loaded_at));
    if let Some(t) = g.not_after {
        m.not_after.get_or_create(&store).set(unix(t));
        m.expiries.lock().unwrap_or_else(|p| p.into_inner()).insert(g.store.to_string(), unix(t));
    }
    if let Some(t) = g.earliest_ca_expiry {
        m.earliest_ca_expiry.get_or_create(&store).set(unix(t));
    }
    for (issuer, next) in g.crl_next_updates {
        if let Some(t) = next {
            m.crl_next_update
                .get_or_create(&CrlLabels { store: g.store.to_string(), issuer: issuer.clone() })
                .set(unix(*t));
        }
    }
}

/// Publishes each trust domain's CA count, earliest expiry and bundle sequence for `store`, and
/// removes the gauges of domains no longer in service.
pub(crate) fn trust_domains(store: &str, domains: &[(String, usize, Option<SystemTime>, Option<u64>)]) {
    let m = metrics();
    let label = |td: &str| DomainLabels { store: store.to_string(), trust_domain: td.to_string() };
    let mut published = m.domains.lock().unwrap_or_else(|p| p.into_inner());
    let before = published.insert(store.to_string(), domains.iter().map(|d| d.0.clone()).collect()).unwrap_or_default();
    for gone in before.iter().filter(|td| !domains.iter().any(|d| &d.0 == *td)) {
        m.domain_cas.remove(&label(gone));
        m.domain_expiry.remove(&label(gone));
        m.domain_sequence.remove(&label(gone));
    }
    for (td, count, expiry, sequence) in domains {
        m.domain_cas.get_or_create(&label(td)).set(*count as i64);
        if let Some(t) = expiry {
            m.domain_expiry.get_or_create(&label(td)).set(unix(*t));
        }
        match sequence {
            Some(seq) => {
                m.domain_sequence.get_or_create(&label(td)).set(i64::try_from(*seq).unwrap_or(i64::MAX));
            }
            None => {
                m.domain_sequence.remove(&label(td));
            }
        }
    }
}

pub(crate) fn insecure_key_file(store: &str, insecure: bool) {
    metrics().insecure_key.get_or_create(&StoreLabels { store: store.to_string() }).set(insecure as i64);
}

/// A `/metrics` HTTP listener; stops when dropped.
pub struct MetricsServer {
    local_addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.local_addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves [`metrics_text`] at `http://addr/metrics` (plain HTTP/1.1, one response per
/// connection). Meant for a loopback or cluster-internal address scraped by Prometheus.
pub async fn serve_metrics(addr: &str) -> Result<MetricsServer, Error> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::config(format!("cannot listen for metrics on {addr}: {e}")))?;
    let local_addr =
        listener.local_addr().map_err(|e| Error::config(format!("cannot read the metrics address: {e}")))?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            tokio::spawn(async move {
                // Read the request head (bounded in size and time), answer, close.
                let mut head = Vec::with_capacity(1024);
                let mut buf = [0u8; 1024];
                let read = async {
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return false,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    true
                };
                if !matches!(tokio::time::timeout(std::time::Duration::from_secs(5), read).await, Ok(true)) {
                    return;
                }
                let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
                let line = String::from_utf8_lossy(line);
                let mut parts = line.split_whitespace();
                let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let response = if method == "GET" && (path == "/metrics" || path.starts_with("/metrics?")) {
                    let body = metrics_text();
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    let body = "only GET /metrics is served here\n";
                    format!(
                        "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                };
                let _ = sock.write_all(response.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    Ok(MetricsServer { local_addr, task })
}
