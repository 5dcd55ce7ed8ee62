//! The SPIFFE Workload API as a source of identity and trust: a client of a SPIRE agent (or any
//! Workload API endpoint) that streams `FetchX509SVID` and turns each response into an
//! [`X509Context`] — our SVID (chain and key), our trust domain's bundle, the federated bundles
//! and the CRLs.
//!
//! [`WorkloadApiSource::start`] keeps the stream open on the shared runtime for as long as the
//! returned source lives. Every response that parses is handed to the application's callback;
//! one that does not is reported and changes nothing, so the last good context stays in use. A
//! stream that cannot be opened or breaks is reported too and reopened after an exponential
//! backoff with jitter (reset once a stream has delivered a response). The state, the last
//! failure and counts are readable at any time ([`WorkloadApiSource::status`]), delivered as
//! [`WorkloadApiEvent`]s, and exported as metrics (`trustwire_workload_api_stream_state`,
//! `trustwire_workload_api_stream_failures_total`, `trustwire_workload_api_updates_total`, all
//! labelled with the source name the application chose).
//!
//! [`WorkloadApiSource::fetch_once`] reads one response, for commands that need an identity
//! once.
//!
//! ```no_run
//! use std::time::Duration;
//! use trustwire::credentials::workload::{WorkloadApiAddress, WorkloadApiOptions, WorkloadApiSource};
//!
//! # async fn example() -> Result<(), trustwire::Error> {
//! let address = WorkloadApiAddress::parse("unix:///run/spire/sockets/agent.sock")?;
//! let source = WorkloadApiSource::start(address, WorkloadApiOptions::default(), |context| {
//!     println!("now {} (serial {})", context.svid().spiffe_id(), context.svid().serial());
//! })?;
//! let first = source.first(Duration::from_secs(30)).await?;
//! # drop(first);
//! # Ok(())
//! # }
//! ```

mod address;
mod context;
mod proto;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

pub use address::{WorkloadApiAddress, ENDPOINT_SOCKET_ENV};
pub use context::{SvidSelector, X509Context, X509Svid};

use crate::error::Error;
use crate::telemetry;

/// Receives a source's events (see [`WorkloadApiOptions::on_event`]).
pub type EventHandler = Arc<dyn Fn(&WorkloadApiEvent) + Send + Sync>;

/// How a Workload API source connects, chooses its SVID and retries.
#[derive(Clone)]
pub struct WorkloadApiOptions {
    /// Names the source in metrics, events and logs; keep it unique in the process.
    pub name: String,
    /// Which SVID to use when the agent returns several.
    pub select: SvidSelector,
    /// Time allowed to open the connection to the agent.
    pub connect_timeout: Duration,
    /// Wait before the first reconnection; it doubles after each failed attempt.
    pub backoff_initial: Duration,
    /// Longest wait between reconnections.
    pub backoff_max: Duration,
    /// Largest response accepted (a response over it breaks the stream and is counted with
    /// reason `too_large`).
    pub max_message_bytes: usize,
    /// Called for every event of the source, from its first connection attempt on.
    pub on_event: Option<EventHandler>,
}

impl Default for WorkloadApiOptions {
    fn default() -> Self {
        WorkloadApiOptions {
            name: "workload_api".into(),
            select: SvidSelector::First,
            connect_timeout: Duration::from_secs(10),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            // gRPC's usual default; a bundle map of many federated domains fits easily.
            max_message_bytes: 4 << 20,
            on_event: None,
        }
    }
}

impl std::fmt::Debug for WorkloadApiOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadApiOptions")
            .field("name", &self.name)
            .field("select", &self.select)
            .field("connect_timeout", &self.connect_timeout)
            .field("backoff_initial", &self.backoff_initial)
            .field("backoff_max", &self.backoff_max)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("on_event", &self.on_event.is_some())
            .finish()
    }
}

impl WorkloadApiOptions {
    /// Calls `f` for every event of the source, from its first connection attempt on. `f` runs on
    /// a runtime worker thread; keep it short.
    pub fn on_event(mut self, f: impl Fn(&WorkloadApiEvent) + Send + Sync + 'static) -> Self {
        self.on_event = Some(Arc::new(f));
        self
    }

    fn check(&self) -> Result<(), Error> {
        if self.name.is_empty() {
            return Err(Error::config("a Workload API source needs a name (used in metrics and logs)"));
        }
        if self.backoff_initial.is_zero() || self.backoff_max < self.backoff_initial {
            return Err(Error::config(format!(
                "Workload API backoff: initial {:?} must be above zero and not above the maximum {:?}",
                self.backoff_initial, self.backoff_max
            )));
        }
        if self.connect_timeout.is_zero() || self.max_message_bytes == 0 {
            return Err(Error::config("Workload API connect_timeout and max_message_bytes must be above zero"));
        }
        Ok(())
    }
}

/// Where a source's stream is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StreamState {
    /// Opening the connection and the stream.
    Connecting,
    /// The agent accepted the stream; responses arrive as it sends them.
    Streaming,
    /// The last attempt failed; waiting before the next.
    Backoff,
    /// The agent said retrying cannot help (`InvalidArgument`, `Unimplemented`): no more
    /// attempts. The last context stays in use.
    Failed,
}

impl StreamState {
    /// Every state, for the metric's label set.
    pub const ALL: [StreamState; 4] =
        [StreamState::Connecting, StreamState::Streaming, StreamState::Backoff, StreamState::Failed];

    /// The stable name, as in the metric label.
    pub const fn name(self) -> &'static str {
        match self {
            StreamState::Connecting => "connecting",
            StreamState::Streaming => "streaming",
            StreamState::Backoff => "backoff",
            StreamState::Failed => "failed",
        }
    }
}

const STATE_NAMES: [&str; 4] = ["connecting", "streaming", "backoff", "failed"];

/// A source's state and counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadApiStatus {
    pub state: StreamState,
    /// Why the last stream failed or the last response was rejected, if one was.
    pub last_error: Option<String>,
    /// Streams that could not be opened or broke.
    pub stream_failures: u64,
    /// Responses accepted (the number of the context in use).
    pub updates: u64,
    /// Responses rejected.
    pub rejected: u64,
}

/// What happened to a source, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkloadApiEvent {
    /// The agent accepted the stream.
    Streaming { source: String },
    /// A response was accepted and handed to the callback; `number` counts from 1.
    Updated { source: String, number: u64, spiffe_id: String, serial: String },
    /// A response was refused; the previous context stays in use.
    Rejected { source: String, message: String },
    /// The stream could not be opened or broke. `retry_in`: when the next attempt starts; `None`
    /// when there will be none (state [`StreamState::Failed`]).
    StreamFailed { source: String, reason: &'static str, message: String, retry_in: Option<Duration> },
}

struct Shared {
    options: WorkloadApiOptions,
    status: Mutex<WorkloadApiStatus>,
    current: watch::Sender<Option<Arc<X509Context>>>,
    stopped: AtomicBool,
}

impl Shared {
    fn name(&self) -> &str {
        &self.options.name
    }

    fn update(&self, f: impl FnOnce(&mut WorkloadApiStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn set_state(&self, state: StreamState) {
        // Under the lock, so a state set while the source is being dropped cannot bring back
        // the series the drop removed.
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if !self.stopped.load(Ordering::Relaxed) {
            status.state = state;
            telemetry::workload_api_state(self.name(), state.name(), &STATE_NAMES);
        }
    }

    fn stop(&self) {
        let _status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        self.stopped.store(true, Ordering::Relaxed);
        telemetry::workload_api_stopped(self.name(), &STATE_NAMES);
    }

    fn emit(&self, event: WorkloadApiEvent) {
        if let Some(f) = &self.options.on_event {
            // A handler that panics must not end the stream.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&event)));
        }
    }
}

/// A running Workload API source. The stream stops when this is dropped.
pub struct WorkloadApiSource {
    address: WorkloadApiAddress,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for WorkloadApiSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadApiSource")
            .field("name", &self.shared.name())
            .field("address", &self.address)
            .field("status", &self.status())
            .finish()
    }
}

impl Drop for WorkloadApiSource {
    fn drop(&mut self) {
        self.task.abort();
        self.shared.stop();
    }
}

impl WorkloadApiSource {
    /// Starts streaming from `address` on the current tokio runtime, or the shared one outside
    /// of any. `on_update` receives every accepted context, in order, on a runtime worker
    /// thread; keep it short (a panic in it is caught and the stream goes on). Fails only on
    /// invalid options: an unreachable agent is retried and reported, not an error here.
    pub fn start(
        address: WorkloadApiAddress,
        options: WorkloadApiOptions,
        on_update: impl Fn(Arc<X509Context>) + Send + Sync + 'static,
    ) -> Result<Self, Error> {
        let handle =
            tokio::runtime::Handle::try_current().unwrap_or_else(|_| crate::runtime::runtime().handle().clone());
        Self::start_on(&handle, address, options, on_update)
    }

    /// [`WorkloadApiSource::start`] on the given runtime (the credential store uses the shared
    /// one, so a caller may wait for the first context on its own thread whatever runtime it is in).
    pub(crate) fn start_on(
        handle: &tokio::runtime::Handle,
        address: WorkloadApiAddress,
        options: WorkloadApiOptions,
        on_update: impl Fn(Arc<X509Context>) + Send + Sync + 'static,
    ) -> Result<Self, Error> {
        options.check()?;
        let shared = Arc::new(Shared {
            status: Mutex::new(WorkloadApiStatus {
                state: StreamState::Connecting,
                last_error: None,
                stream_failures: 0,
                updates: 0,
                rejected: 0,
            }),
            current: watch::Sender::new(None),
            stopped: AtomicBool::new(false),
            options,
        });
        shared.set_state(StreamState::Connecting);
        let task = handle.spawn(run(address.clone(), shared.clone(), on_update));
        Ok(WorkloadApiSource { address, shared, task })
    }

    /// Opens a stream, reads the first response and closes it: our context now, for one-shot
    /// use. `timeout` bounds the whole exchange.
    pub async fn fetch_once(
        address: &WorkloadApiAddress,
        options: &WorkloadApiOptions,
        timeout: Duration,
    ) -> Result<X509Context, Error> {
        options.check()?;
        let exchange = async {
            let mut stream = open(address, options).await.map_err(|f| f.error)?;
            match stream.message().await {
                Ok(Some(response)) => X509Context::from_response(response, &options.select),
                Ok(None) => Err(Error::transport(format!(
                    "the Workload API at {address} ended the stream before sending a response"
                ))),
                Err(status) => Err(from_status(address, &status, options.max_message_bytes).error),
            }
        };
        tokio::time::timeout(timeout, exchange).await.unwrap_or_else(|_| {
            Err(Error::Timeout {
                after: timeout,
                message: format!("no X509-SVID response from the Workload API at {address}"),
            })
        })
    }

    /// The address streamed from.
    pub fn address(&self) -> &WorkloadApiAddress {
        &self.address
    }

    /// The source's state, last failure and counts now.
    pub fn status(&self) -> WorkloadApiStatus {
        self.shared.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The context in use: the last one accepted, if any was.
    pub fn current(&self) -> Option<Arc<X509Context>> {
        self.shared.current.borrow().clone()
    }

    /// Waits for the first accepted context (returns at once when there is one). On timeout, or
    /// once the source has stopped retrying ([`StreamState::Failed`]), the error says what the
    /// stream last reported.
    pub async fn first(&self, timeout: Duration) -> Result<Arc<X509Context>, Error> {
        let mut rx = self.shared.current.subscribe();
        let failed = || self.status().state == StreamState::Failed;
        let found = tokio::time::timeout(timeout, rx.wait_for(|c| c.is_some() || failed())).await;
        if let Ok(Ok(context)) = found {
            if let Some(context) = context.as_ref() {
                return Ok(context.clone());
            }
        }
        let status = self.status();
        if status.state == StreamState::Failed {
            return Err(Error::transport(format!(
                "the Workload API source for {} stopped retrying: {}",
                self.address,
                status.last_error.unwrap_or_default()
            )));
        }
        Err(Error::Timeout {
            after: timeout,
            message: format!(
                "no X509-SVID from the Workload API at {} yet (stream {}{})",
                self.address,
                status.state.name(),
                status.last_error.map(|e| format!("; last error: {e}")).unwrap_or_default()
            ),
        })
    }
}

/// Why a stream ended, and whether another attempt may help.
struct Failure {
    reason: &'static str,
    retry: bool,
    error: Error,
}

async fn run(
    address: WorkloadApiAddress,
    shared: Arc<Shared>,
    on_update: impl Fn(Arc<X509Context>) + Send + Sync + 'static,
) {
    let options = shared.options.clone();
    let mut backoff = Backoff::new(options.backoff_initial, options.backoff_max);
    loop {
        shared.set_state(StreamState::Connecting);
        let (failure, delivered) = stream(&address, &shared, &on_update).await;
        if delivered {
            backoff.reset();
        }
        let message = failure.error.to_string();
        telemetry::workload_api_failure(shared.name(), failure.reason);
        shared.update(|s| {
            s.stream_failures += 1;
            s.last_error = Some(message.clone());
        });
        let retry_in = failure.retry.then(|| backoff.next());
        tracing::warn!(
            source = %shared.name(),
            %address,
            reason = failure.reason,
            retry_in_ms = retry_in.map(|d| d.as_millis() as u64),
            "Workload API stream failed, the last context stays in use: {message}"
        );
        shared.set_state(if retry_in.is_some() { StreamState::Backoff } else { StreamState::Failed });
        shared.emit(WorkloadApiEvent::StreamFailed {
            source: shared.name().to_string(),
            reason: failure.reason,
            message,
            retry_in,
        });
        match retry_in {
            Some(d) => tokio::time::sleep(d).await,
            None => {
                // Wakes those waiting in `first`: no context will come.
                shared.current.send_modify(|_| {});
                return;
            }
        }
    }
}

/// One stream, until it fails. Returns how it ended and whether it delivered any response.
async fn stream(
    address: &WorkloadApiAddress,
    shared: &Shared,
    on_update: &(impl Fn(Arc<X509Context>) + Send + Sync),
) -> (Failure, bool) {
    let options = &shared.options;
    let mut stream = match open(address, options).await {
        Ok(s) => s,
        Err(f) => return (f, false),
    };
    shared.set_state(StreamState::Streaming);
    tracing::info!(source = %shared.name(), %address, "Workload API stream open");
    shared.emit(WorkloadApiEvent::Streaming { source: shared.name().to_string() });
    let mut delivered = false;
    loop {
        let response = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => {
                let error = Error::transport(format!("the Workload API at {address} ended the stream"));
                return (Failure { reason: "ended", retry: true, error }, delivered);
            }
            Err(status) => return (from_status(address, &status, options.max_message_bytes), delivered),
        };
        delivered = true;
        match X509Context::from_response(response, &options.select) {
            Ok(context) => accept(shared, Arc::new(context), on_update),
            Err(e) => {
                let message = e.to_string();
                telemetry::workload_api_update(shared.name(), false);
                shared.update(|s| {
                    s.rejected += 1;
                    s.last_error = Some(message.clone());
                });
                tracing::warn!(source = %shared.name(), "Workload API response rejected, the last context stays in use: {message}");
                shared.emit(WorkloadApiEvent::Rejected { source: shared.name().to_string(), message });
            }
        }
    }
}

fn accept(shared: &Shared, context: Arc<X509Context>, on_update: &(impl Fn(Arc<X509Context>) + Send + Sync)) {
    let mut number = 0;
    shared.update(|s| {
        s.updates += 1;
        number = s.updates;
    });
    shared.current.send_replace(Some(context.clone()));
    telemetry::workload_api_update(shared.name(), true);
    let svid = context.svid();
    let (spiffe_id, serial) = (svid.spiffe_id().to_string(), svid.serial());
    tracing::info!(source = %shared.name(), number, spiffe_id = %spiffe_id, serial = %serial, "Workload API context received");
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| on_update(context)));
    shared.emit(WorkloadApiEvent::Updated { source: shared.name().to_string(), number, spiffe_id, serial });
}

/// Connects and opens `FetchX509SVID`, with the security metadata.
async fn open(
    address: &WorkloadApiAddress,
    options: &WorkloadApiOptions,
) -> Result<tonic::Streaming<proto::X509SvidResponse>, Failure> {
    let channel = connect(address, options.connect_timeout).await.map_err(|e| Failure {
        reason: "unreachable",
        retry: true,
        error: Error::transport(format!("cannot connect to the Workload API at {address}: {}", causes(&e))),
    })?;
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(options.max_message_bytes);
    grpc.ready().await.map_err(|e| Failure {
        reason: "unreachable",
        retry: true,
        error: Error::transport(format!("the Workload API at {address} is not ready: {}", causes(&e))),
    })?;
    let mut request = tonic::Request::new(proto::X509SvidRequest {});
    request.metadata_mut().insert(proto::SECURITY_HEADER, tonic::metadata::MetadataValue::from_static("true"));
    let path = http::uri::PathAndQuery::from_static(proto::FETCH_X509_SVID);
    let codec = tonic_prost::ProstCodec::<proto::X509SvidRequest, proto::X509SvidResponse>::default();
    match grpc.server_streaming(request, path, codec).await {
        Ok(response) => Ok(response.into_inner()),
        Err(status) => Err(from_status(address, &status, options.max_message_bytes)),
    }
}

async fn connect(address: &WorkloadApiAddress, timeout: Duration) -> Result<Channel, tonic::transport::Error> {
    match address {
        WorkloadApiAddress::Unix(path) => {
            let path = path.clone();
            // The URI only fills the :authority header; the connector decides where to go.
            Endpoint::from_static("http://localhost")
                .connect_timeout(timeout)
                .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                    let path = path.clone();
                    async move { tokio::net::UnixStream::connect(path).await.map(TokioIo::new) }
                }))
                .await
        }
        WorkloadApiAddress::Tcp(addr) => {
            let addr = *addr;
            Endpoint::from_shared(format!("http://{addr}"))?
                .connect_timeout(timeout)
                .connect_with_connector(tower::service_fn(move |_: http::Uri| async move {
                    let stream = tokio::net::TcpStream::connect(addr).await?;
                    stream.set_nodelay(true)?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }))
                .await
        }
    }
}

/// Classifies a gRPC status the way the SPIFFE Workload Endpoint standard (section 6) says.
fn from_status(address: &WorkloadApiAddress, status: &tonic::Status, limit: usize) -> Failure {
    use tonic::Code;
    let said = status.message();
    let (reason, retry, message) = match status.code() {
        Code::InvalidArgument => (
            "refused",
            false,
            format!("the Workload API at {address} refused the request as invalid ({said}); not retrying"),
        ),
        Code::Unimplemented => (
            "refused",
            false,
            format!("the endpoint at {address} does not implement the Workload API's FetchX509SVID ({said})"),
        ),
        Code::PermissionDenied => (
            "refused",
            true,
            format!(
                "the Workload API at {address} has no identity for this workload ({said}): \
                 check the agent's registration entries and selectors"
            ),
        ),
        // The limit is checked on our side; a Workload API sends no such status itself.
        Code::OutOfRange => {
            ("too_large", true, format!("a response is over max_message_bytes ({limit} bytes): {said}"))
        }
        code => {
            ("broken", true, format!("the Workload API stream from {address} broke ({code:?}): {}", causes(status)))
        }
    };
    Failure { reason, retry, error: Error::transport(message) }
}

/// An error and its causes, each said once; tonic's bare "transport error" adds nothing.
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(cause) = next {
        let text = cause.to_string();
        if text != "transport error" && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = cause.source();
    }
    if parts.is_empty() {
        return e.to_string();
    }
    parts.join(": ")
}

/// Exponential backoff with jitter: each wait is drawn from the upper half of the current step,
/// so sources restarted together (a node's agent restarting) do not reconnect in lockstep.
struct Backoff {
    initial: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Backoff { initial, max, step: initial }
    }

    fn reset(&mut self) {
        self.step = self.initial;
    }

    fn next(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        let mut b = [0u8; 8];
        let unit = match aws_lc_rs::rand::fill(&mut b) {
            Ok(()) => u64::from_le_bytes(b) as f64 / u64::MAX as f64,
            Err(_) => 0.5,
        };
        step.mul_f64(0.5 + unit / 2.0)
    }
}
