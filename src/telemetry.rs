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
struct ClosedLabels {
    store: String,
    verdict: &'static str,
}

struct Metrics {
    registry: Registry,
    handshakes: Family<HandshakeLabels, Counter>,
    reloads: Family<ReloadLabels, Counter>,
    calls: Family<CallLabels, Counter>,
    refused_calls: Family<RefusedLabels, Counter>,
    closed: Family<ClosedLabels, Counter>,
    proxy: Family<ProxyLabels, Counter>,
    generation: Family<StoreLabels, Gauge>,
    not_after: Family<StoreLabels, Gauge>,
    seconds_left: Family<StoreLabels, Gauge>,
    earliest_ca_expiry: Family<StoreLabels, Gauge>,
    crl_next_update: Family<CrlLabels, Gauge>,
    last_reload: Family<StoreLabels, Gauge>,
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
            proxy: Family::default(),
            generation: Family::default(),
            not_after: Family::default(),
            seconds_left: Family::default(),
            earliest_ca_expiry: Family::default(),
            crl_next_update: Family::default(),
            last_reload: Family::default(),
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
            "proxy_streams",
            "Proxied streams by route and outcome (completed, handshake_refused, upstream_error, proxy_header, protocol, io)",
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

pub(crate) fn connection_closed(store: &str, verdict: Verdict) {
    metrics().closed.get_or_create(&ClosedLabels { store: store.to_string(), verdict: verdict.name() }).inc();
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
