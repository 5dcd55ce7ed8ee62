//! `trustwire bench`: a load generator for any baidu_std server, ours or stock brpc (what brpc
//! users know as rpc_press), over mutual TLS.
//!
//! Callers share one schedule: each claims the next call's index, so `--calls N` makes exactly N
//! calls whatever the concurrency. With `--rate`, call i is due at start + i/rate and its latency
//! is measured from that time, not from when a caller got round to sending it: a server that
//! stalls shows up in the percentiles instead of merely slowing the load (coordinated omission).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use hdrhistogram::Histogram;

use super::{describe_error, Creds, ServerCheck};
use crate::error::{codes, Error};
use crate::rpc::{CallOptions, CancellationToken, Client, ClientOptions};
use crate::tls::ClientTls;

// Caps that keep one command from exhausting the machine it runs on (file descriptors, memory
// for requests in flight), far above what one load generator drives usefully.
const MAX_CONNECTIONS: u32 = 1024;
const MAX_CONCURRENCY: u32 = 4096;
const MAX_PAYLOAD: u32 = 16 << 20;
/// Request payloads in flight at once (payload size × concurrency).
const MAX_IN_FLIGHT_BYTES: u64 = 1 << 30;
const MAX_RATE: f64 = 1_000_000.0;
const MAX_SECONDS: f64 = 86_400.0;
/// Without --duration or --calls.
const DEFAULT_SECONDS: f64 = 10.0;
/// Latencies are recorded in microseconds up to an hour (the longest --timeout-ms), to 3
/// significant digits.
const HIST_MAX_US: u64 = 3_600_000_000;
/// Callers record into this many histograms at most: one per caller would cost ~200 KiB each.
const SHARDS: usize = 16;

#[derive(Args, Debug)]
#[command(after_help = "The report on stdout: calls made (succeeded, failed), duration, calls/s of those that \
succeeded, MiB/s of request and response payloads when there is a payload, latency p50/p90/p99/p99.9/max \
of the calls that succeeded, and failures counted by verdict name (peer_alert, unknown_issuer, …), else by \
brpc error code name (ENOMETHOD, …) or kind (timeout, transport). A progress line goes to stderr about once \
a second. Exit status: 0 when every call succeeded, 1 when any failed, 2 for a usage error.")]
pub(super) struct BenchArgs {
    /// The server, HOST:PORT.
    addr: String,
    /// SERVICE/METHOD, e.g. example.EchoService/Echo
    target: String,
    #[command(flatten)]
    creds: Creds,
    #[command(flatten)]
    server: ServerCheck,
    /// Connections the callers share (1 to 1024; at most --concurrency). They are opened
    /// before the clock starts.
    #[arg(long, value_name = "N", default_value_t = 1, conflicts_with = "new_connection_per_call")]
    #[arg(value_parser = clap::value_parser!(u32).range(1..=MAX_CONNECTIONS as i64))]
    connections: u32,
    /// Calls in flight at once, in total (1 to 4096).
    #[arg(long, value_name = "N", default_value_t = 8)]
    #[arg(value_parser = clap::value_parser!(u32).range(1..=MAX_CONCURRENCY as i64))]
    concurrency: u32,
    /// Make every call on a new connection, with a full handshake, closed after the call: the
    /// handshake-rate benchmark. A refused handshake counts as a failed call under its verdict.
    #[arg(long)]
    new_connection_per_call: bool,
    /// Request payload size (default 0, at most 16 MiB). For example.EchoService/Echo the
    /// request is a real EchoRequest whose message is N bytes, so stock brpc echo servers
    /// accept it; for any other method, N raw bytes.
    #[arg(long, value_name = "N", conflicts_with = "payload_file")]
    #[arg(value_parser = clap::value_parser!(u32).range(0..=MAX_PAYLOAD as i64))]
    payload_bytes: Option<u32>,
    /// Send this file's bytes, as they are, as every request's payload (at most 16 MiB).
    #[arg(long, value_name = "FILE")]
    payload_file: Option<PathBuf>,
    /// Run for S seconds (default 10 without --calls; fractions allowed, at most a day).
    #[arg(long, value_name = "S", conflicts_with = "calls", value_parser = parse_seconds)]
    duration: Option<f64>,
    /// Make exactly N calls, then stop.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    calls: Option<u64>,
    /// Send R calls/s in total on a fixed schedule (open loop) instead of as fast as the
    /// callers can; latency is measured from each call's scheduled time, so a stalled server
    /// shows in the percentiles.
    #[arg(long, value_name = "R", value_parser = parse_rate)]
    rate: Option<f64>,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Give up on a call after this many milliseconds (connecting included).
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    #[arg(value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    timeout_ms: u64,
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= MAX_SECONDS => Ok(v),
        _ => Err(format!("expected seconds above 0 and at most {MAX_SECONDS}")),
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= MAX_RATE => Ok(v),
        _ => Err(format!("expected calls per second above 0 and at most {MAX_RATE}")),
    }
}

/// What every caller follows.
struct Plan {
    addr: String,
    service: String,
    method: String,
    payload: Bytes,
    timeout: Duration,
    tls: ClientTls,
    client_options: ClientOptions,
    rate: Option<f64>,
    /// Calls to make, at most.
    limit: Option<u64>,
    /// No call starts at or after this.
    deadline: Option<Instant>,
    /// Stop once a connection fails before any call succeeded (the pooled mode): every later
    /// call would fail the same way.
    stop_on_setup_failure: bool,
}

/// What callers share while they run.
struct Shared {
    start: Instant,
    next: AtomicU64,
    done: AtomicU64,
    failed: AtomicU64,
    succeeded: AtomicBool,
    stop: CancellationToken,
    /// Why the run stopped early, when a connection failed before any call succeeded.
    aborted: OnceLock<Error>,
    shards: Vec<Mutex<Tally>>,
}

/// Counts and latencies, per shard while running and merged for the report.
struct Tally {
    hist: Histogram<u64>,
    ok: u64,
    failed: u64,
    sent: u64,
    received: u64,
    /// By label: how many, and the first such error for its message.
    errors: BTreeMap<String, (u64, Error)>,
}

impl Tally {
    fn new() -> Result<Self, Error> {
        let hist = Histogram::new_with_bounds(1, HIST_MAX_US, 3)
            .map_err(|e| Error::config(format!("cannot set up the latency histogram: {e}")))?;
        Ok(Tally { hist, ok: 0, failed: 0, sent: 0, received: 0, errors: BTreeMap::new() })
    }

    fn error(&mut self, e: Error) {
        self.failed += 1;
        self.errors.entry(label(&e)).or_insert((0, e)).0 += 1;
    }

    fn merge(&mut self, other: &Tally) {
        // Same bounds everywhere, so adding cannot fail.
        let _ = self.hist.add(&other.hist);
        self.ok += other.ok;
        self.failed += other.failed;
        self.sent += other.sent;
        self.received += other.received;
        for (name, (n, e)) in &other.errors {
            self.errors.entry(name.clone()).or_insert((0, e.clone())).0 += n;
        }
    }
}

/// The name an error is counted under: its verdict (`peer_alert`, `unknown_issuer`, …), else
/// the server's brpc code name (`ENOMETHOD`, or `rpc_<code>`), else its kind (`timeout`, …).
fn label(e: &Error) -> String {
    if let Some(v) = e.verdict() {
        return v.name().to_string();
    }
    match e {
        Error::Rpc { code, .. } => codes::name(*code).map(str::to_string).unwrap_or_else(|| format!("rpc_{code}")),
        other => other.kind_name().to_string(),
    }
}

/// Failures of the connection itself, as opposed to one call's.
fn is_connection_failure(e: &Error) -> bool {
    matches!(e, Error::Handshake { .. } | Error::Transport { .. } | Error::Credentials { .. })
}

/// Runs the benchmark and prints its report. `Ok(true)` when every call succeeded.
pub(super) async fn run(a: BenchArgs) -> Result<bool, Error> {
    let (service, method) =
        a.target.split_once('/').ok_or_else(|| Error::config(format!("'{}': write SERVICE/METHOD", a.target)))?;
    if !a.new_connection_per_call && a.connections > a.concurrency {
        return Err(Error::config(format!(
            "--connections {} is more than --concurrency {}: the extra connections would carry no calls",
            a.connections, a.concurrency
        )));
    }
    let is_echo = service == crate::echo::SERVICE && method == crate::echo::METHOD;
    let payload: Bytes = match (&a.payload_file, a.payload_bytes) {
        (Some(f), _) => {
            let bytes = std::fs::read(f).map_err(|e| Error::config(format!("cannot read {}: {e}", f.display())))?;
            if bytes.len() > MAX_PAYLOAD as usize {
                return Err(Error::config(format!("{} is larger than 16 MiB", f.display())));
            }
            bytes.into()
        }
        (None, n) if is_echo => crate::echo::encode(&"x".repeat(n.unwrap_or(0) as usize)).into(),
        (None, n) => vec![0u8; n.unwrap_or(0) as usize].into(),
    };
    if payload.len() as u64 * u64::from(a.concurrency) > MAX_IN_FLIGHT_BYTES {
        return Err(Error::config(format!(
            "{} payload bytes × --concurrency {} is more than 1 GiB in flight; lower one of them",
            payload.len(),
            a.concurrency
        )));
    }
    let store = a.creds.client_store("bench", &a.server)?;
    let tls = store.client_tls()?;
    // A server name that cannot be derived is a usage error, not one failure per call.
    crate::transport::server_name(&tls, &a.addr)?;
    let timeout = Duration::from_millis(a.timeout_ms);
    let client_options = ClientOptions {
        connect_timeout: timeout,
        default_timeout: Some(timeout),
        pool_size: 1,
        ..ClientOptions::default()
    };
    let run_for = match (a.duration, a.calls) {
        (Some(d), _) => Some(Duration::from_secs_f64(d)),
        (None, Some(_)) => None,
        (None, None) => Some(Duration::from_secs_f64(DEFAULT_SECONDS)),
    };
    let shape = Shape {
        addr: a.addr.clone(),
        target: a.target.clone(),
        connections: (!a.new_connection_per_call).then_some(a.connections),
        concurrency: a.concurrency,
        rate: a.rate,
        payload_bytes: match a.payload_file {
            Some(_) => payload.len(),
            None => a.payload_bytes.unwrap_or(0) as usize,
        },
        request_bytes: payload.len(),
        echo: is_echo && a.payload_file.is_none(),
    };

    // The pooled connections are opened before the clock starts, so the first calls do not
    // carry the handshakes; a server that cannot be reached or refuses us is reported now.
    let mut clients = Vec::new();
    if !a.new_connection_per_call {
        let mut opening = tokio::task::JoinSet::new();
        for _ in 0..a.connections {
            let client = Client::new(a.addr.clone(), tls.clone(), client_options.clone());
            opening.spawn(async move {
                match tokio::time::timeout(timeout, client.connect()).await {
                    Ok(Ok(_)) => Ok(client),
                    Ok(Err(e)) => Err(e),
                    Err(_) => {
                        Err(Error::Timeout { after: timeout, message: "the connection was not up in time".into() })
                    }
                }
            });
        }
        // Each connection that could not be opened counts as one failed call under its verdict.
        let mut failures = Vec::new();
        while let Some(joined) = opening.join_next().await {
            match joined {
                Ok(Ok(client)) => clients.push(client),
                Ok(Err(e)) => failures.push(e),
                Err(e) => failures.push(Error::transport(format!("connecting failed: {e}"))),
            }
        }
        if let Some(first) = failures.first().cloned() {
            if let Error::Config { .. } = first {
                return Err(first);
            }
            let mut tally = Tally::new()?;
            failures.into_iter().for_each(|e| tally.error(e));
            let report =
                Report { shape, tally, elapsed: Duration::ZERO, unsent: 0, interrupted: false, aborted: Some(first) };
            report.print(a.json);
            return Ok(false);
        }
    }

    let start = Instant::now();
    let (limit, deadline) = match (run_for, a.rate, a.calls) {
        // On a schedule for a time: the calls due in that time. A caller that fell behind still
        // sends what was due, for up to one timeout past the end.
        (Some(d), Some(r), _) => (Some(((d.as_secs_f64() * r).ceil() as u64).max(1)), Some(start + d + timeout)),
        (Some(d), None, _) => (None, Some(start + d)),
        (None, _, calls) => (calls, None),
    };
    let plan = Arc::new(Plan {
        addr: a.addr.clone(),
        service: service.to_string(),
        method: method.to_string(),
        payload,
        timeout,
        tls,
        client_options,
        rate: a.rate,
        limit,
        deadline,
        stop_on_setup_failure: !a.new_connection_per_call,
    });
    let shards =
        (0..SHARDS.min(a.concurrency as usize)).map(|_| Tally::new().map(Mutex::new)).collect::<Result<_, _>>()?;
    let shared = Arc::new(Shared {
        start,
        next: AtomicU64::new(0),
        done: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        succeeded: AtomicBool::new(false),
        stop: CancellationToken::new(),
        aborted: OnceLock::new(),
        shards,
    });

    let interrupted = Arc::new(AtomicBool::new(false));
    let on_ctrl_c = tokio::spawn({
        let (stop, interrupted) = (shared.stop.clone(), interrupted.clone());
        async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                interrupted.store(true, Ordering::Relaxed);
                note!("interrupted: finishing the calls in flight");
                stop.cancel();
            }
        }
    });
    let finished = CancellationToken::new();
    let progress = tokio::spawn(progress(shared.clone(), finished.clone()));

    let mut callers = tokio::task::JoinSet::new();
    for k in 0..a.concurrency as usize {
        let client = (!clients.is_empty()).then(|| clients[k % clients.len()].clone());
        callers.spawn(caller(plan.clone(), shared.clone(), client, k % shared.shards.len()));
    }
    while callers.join_next().await.is_some() {}
    let elapsed = start.elapsed();
    finished.cancel();
    on_ctrl_c.abort();
    let _ = progress.await;
    drop(clients);

    let mut tally = Tally::new()?;
    for shard in &shared.shards {
        tally.merge(&shard.lock().unwrap_or_else(|p| p.into_inner()));
    }
    let interrupted = interrupted.load(Ordering::Relaxed);
    let aborted = shared.aborted.get().cloned();
    let unsent = match (limit, interrupted || aborted.is_some()) {
        (Some(n), false) => n.saturating_sub(tally.ok + tally.failed),
        _ => 0,
    };
    let clean = tally.failed == 0 && aborted.is_none();
    Report { shape, tally, elapsed, unsent, interrupted, aborted }.print(a.json);
    Ok(clean)
}

/// One caller: claims the next call, waits for its time (with --rate), makes it, records it.
async fn caller(plan: Arc<Plan>, shared: Arc<Shared>, client: Option<Client>, shard: usize) {
    while !shared.stop.is_cancelled() {
        let i = shared.next.fetch_add(1, Ordering::Relaxed);
        if plan.limit.is_some_and(|n| i >= n) {
            break;
        }
        let due = plan.rate.map(|r| shared.start + Duration::from_secs_f64(i as f64 / r));
        if plan.deadline.is_some_and(|d| Instant::now() >= d || due.is_some_and(|t| t >= d)) {
            break;
        }
        if let Some(at) = due {
            tokio::select! {
                _ = tokio::time::sleep_until(at.into()) => {}
                _ = shared.stop.cancelled() => break,
            }
        }
        let begin = due.unwrap_or_else(Instant::now);
        let opts = CallOptions { timeout: Some(plan.timeout), ..CallOptions::default() };
        let result = match &client {
            Some(c) => c.call(&plan.service, &plan.method, plan.payload.clone(), opts).await,
            None => {
                let c = Client::new(plan.addr.clone(), plan.tls.clone(), plan.client_options.clone());
                let r = c.call(&plan.service, &plan.method, plan.payload.clone(), opts).await;
                c.close();
                r
            }
        };
        let latency = begin.elapsed();
        {
            let mut t = shared.shards[shard].lock().unwrap_or_else(|p| p.into_inner());
            match result {
                Ok(resp) => {
                    t.ok += 1;
                    t.sent += plan.payload.len() as u64;
                    t.received += (resp.payload.len() + resp.attachment.len()) as u64;
                    t.hist.saturating_record(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
                    shared.succeeded.store(true, Ordering::Relaxed);
                }
                Err(e) => {
                    shared.failed.fetch_add(1, Ordering::Relaxed);
                    let give_up = plan.stop_on_setup_failure
                        && is_connection_failure(&e)
                        && !shared.succeeded.load(Ordering::Relaxed);
                    if give_up && shared.aborted.set(e.clone()).is_ok() {
                        shared.stop.cancel();
                    }
                    t.error(e);
                }
            }
        }
        shared.done.fetch_add(1, Ordering::Relaxed);
    }
}

/// A plain line on stderr about once a second: stdout carries only the report.
async fn progress(shared: Arc<Shared>, finished: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = finished.cancelled() => return,
        }
        let done = shared.done.load(Ordering::Relaxed);
        let failed = shared.failed.load(Ordering::Relaxed);
        note!("bench: {}s: {done} calls, {} calls/s, {failed} errors", shared.start.elapsed().as_secs(), done - last);
        last = done;
    }
}

/// What was run, for the report's heading.
struct Shape {
    addr: String,
    target: String,
    /// None: a new connection per call.
    connections: Option<u32>,
    concurrency: u32,
    rate: Option<f64>,
    /// As asked for: the EchoRequest's message size when we built one, else the payload's.
    payload_bytes: usize,
    /// The request payload as sent (an EchoRequest adds its field header).
    request_bytes: usize,
    /// The payload is an EchoRequest we built.
    echo: bool,
}

struct Report {
    shape: Shape,
    tally: Tally,
    elapsed: Duration,
    unsent: u64,
    interrupted: bool,
    aborted: Option<Error>,
}

const MIB: f64 = 1024.0 * 1024.0;

impl Report {
    fn per_sec(&self, n: u64) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            n as f64 / secs
        } else {
            0.0
        }
    }

    /// p50, p90, p99, p99.9, max and mean, in microseconds, over the calls that succeeded.
    fn latency(&self) -> Option<[(&'static str, u64); 6]> {
        let h = &self.tally.hist;
        (!h.is_empty()).then(|| {
            [
                ("p50", h.value_at_quantile(0.5)),
                ("p90", h.value_at_quantile(0.9)),
                ("p99", h.value_at_quantile(0.99)),
                ("p99_9", h.value_at_quantile(0.999)),
                ("max", h.max()),
                ("mean", h.mean().round() as u64),
            ]
        })
    }

    fn print(&self, json: bool) {
        // Why each kind of failure happened, once per kind, for the person at the terminal.
        for (n, e) in self.tally.errors.values() {
            note!("{n} × {}", describe_error(e));
        }
        if self.aborted.is_some() {
            note!("stopped: the connection failed before any call succeeded; every later call would fail the same way");
        }
        if self.unsent > 0 {
            note!(
                "{} calls due by the end were not sent: the callers could not keep up with --rate (raise \
                 --concurrency)",
                self.unsent
            );
        }
        if json {
            say!("{}", self.json());
        } else {
            self.human();
        }
    }

    fn json(&self) -> serde_json::Value {
        let s = &self.shape;
        let t = &self.tally;
        let (service, method) = s.target.split_once('/').unwrap_or((&s.target, ""));
        let mib = |bytes: u64| (s.payload_bytes > 0).then(|| self.per_sec(bytes) / MIB);
        serde_json::json!({
            "addr": s.addr,
            "service": service,
            "method": method,
            "new_connection_per_call": s.connections.is_none(),
            "connections": s.connections,
            "concurrency": s.concurrency,
            "rate": s.rate,
            "payload_bytes": s.payload_bytes,
            "request_bytes": s.request_bytes,
            "calls": t.ok + t.failed,
            "succeeded": t.ok,
            "failed": t.failed,
            "unsent": self.unsent,
            "duration_secs": self.elapsed.as_secs_f64(),
            "calls_per_sec": self.per_sec(t.ok),
            "mib_per_sec_sent": mib(t.sent),
            "mib_per_sec_received": mib(t.received),
            "latency_us": self.latency().map(|l| {
                l.into_iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(v))).collect::<serde_json::Map<_, _>>()
            }),
            "errors": t.errors.iter().map(|(k, (n, _))| (k.clone(), serde_json::Value::from(*n)))
                .collect::<serde_json::Map<_, _>>(),
            "interrupted": self.interrupted,
            "aborted": self.aborted.as_ref().map(describe_error),
        })
    }

    fn human(&self) {
        let s = &self.shape;
        let t = &self.tally;
        let conns = match s.connections {
            Some(1) => "1 connection".to_string(),
            Some(n) => format!("{n} connections"),
            None => "a new connection per call".to_string(),
        };
        let pacing = match s.rate {
            Some(r) => format!("{r} calls/s scheduled"),
            None => "as fast as answered".to_string(),
        };
        let payload = if s.echo {
            format!("EchoRequest with a {}-byte message", s.payload_bytes)
        } else {
            format!("{}-byte payload", s.payload_bytes)
        };
        say!("bench {} {}: {conns}, {} in flight, {pacing}, {payload}", s.addr, s.target, s.concurrency);
        let ended = match (&self.aborted, self.interrupted) {
            (Some(e), _) => format!(", stopped early: the connection failed [{}]", label(e)),
            (None, true) => ", interrupted".to_string(),
            (None, false) => String::new(),
        };
        say!(
            "calls       {} ({} ok, {} failed) in {:.2}s{ended}",
            t.ok + t.failed,
            t.ok,
            t.failed,
            self.elapsed.as_secs_f64()
        );
        if self.unsent > 0 {
            say!("unsent      {} (due, but the callers were behind)", self.unsent);
        }
        let mut rate = format!("{:.1} calls/s", self.per_sec(t.ok));
        if s.payload_bytes > 0 {
            rate.push_str(&format!(
                ", {:.2} MiB/s sent, {:.2} MiB/s received",
                self.per_sec(t.sent) / MIB,
                self.per_sec(t.received) / MIB
            ));
        }
        say!("throughput  {rate}");
        match self.latency() {
            Some(l) => say!(
                "latency     {}",
                l.iter()
                    .map(|(name, us)| format!("{} {}", name.replace('_', "."), ms(*us)))
                    .collect::<Vec<_>>()
                    .join("  ")
            ),
            None => say!("latency     - (no call succeeded)"),
        }
        if t.errors.is_empty() {
            say!("errors      none");
        } else {
            let list: Vec<String> = t.errors.iter().map(|(name, (n, _))| format!("{n} {name}")).collect();
            say!("errors      {}", list.join(", "));
        }
    }
}

fn ms(us: u64) -> String {
    format!("{:.3}ms", us as f64 / 1000.0)
}
