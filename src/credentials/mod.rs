//! The credential lifecycle: sources, validated generations, the store that publishes them, and
//! the triggers that reload them.
//!
//! A [`CredentialStore`] reads its [`Sources`] (PEM files, a combined key+chain file, directories
//! such as a Kubernetes secret volume, or bytes handed in), validates them — parse, key matches
//! certificate, validity window, CRLs signed by a trusted CA, then a pre-flight TLS handshake in
//! memory between the new identity and the new trust material — and only then publishes them as
//! a new numbered generation. Every new handshake of the [`ServerTls`]/[`ClientTls`] it hands out
//! uses the current generation; established connections keep theirs. A load that fails leaves
//! the last good generation in service and is reported (event, log, counter).
//!
//! When the trust bundle or a CRL changes, established connections whose peer the new material
//! refuses are closed (after their calls in flight finish), unless that is turned off.

pub mod pkcs11;
mod preflight;
mod sources;
mod watch;
pub mod workload;

pub use pkcs11::{PinSource, Pkcs11KeySpec, Pkcs11Uri};
use sources::{read_material, IdentityBytes, Material};
pub use sources::{FederatedSource, IdentitySource, PemSource, Sources, WorkloadApiSpec};

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use crate::error::{Error, Verdict};
use crate::telemetry;
use crate::tls::identity::{rfc3339, CertificateInfo};
use crate::tls::spiffe::TrustDomain;
use crate::tls::trust::{check_ca, parse_ca_bundle};
use crate::tls::{ClientTls, Identity, ServerTls, TlsProfile, TrustBundle};
use sources::readable_by_others;
use workload::{StreamState, WorkloadApiOptions, WorkloadApiSource, X509Context};

/// Which sides of TLS a store serves; the pre-flight handshake checks each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    Server,
    Client,
    Both,
}

impl Use {
    fn server(self) -> bool {
        matches!(self, Use::Server | Use::Both)
    }
    fn client(self) -> bool {
        matches!(self, Use::Client | Use::Both)
    }
}

/// How a store reloads.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Names the store in metrics, events and logs.
    pub name: String,
    /// Watch the source files' directories (inotify on Linux) and reload on change.
    pub watch: bool,
    /// Re-read the sources this often and reload if they changed (a fallback for file systems
    /// where change notification does not work). `None` turns polling off.
    pub poll_interval: Option<Duration>,
    /// Reload on this timer as well (checks expiry windows too).
    pub reload_interval: Option<Duration>,
    /// Wait this long after a change before loading, so a burst of writes becomes one load; a
    /// load that fails after a change is retried after the same delay.
    pub settle: Duration,
    /// Retries of a failed load after a change, before the rejection is reported.
    pub retries: u32,
    /// Close established connections whose peer new trust material refuses.
    pub close_on_trust_change: bool,
    /// Emit an `Expiring` event when our certificate has less than this left.
    pub expiry_warning: Duration,
    /// Let a reload put a certificate with another SPIFFE ID (or trust domain) than the one in
    /// service live. Off by default: such a reload is refused (`identity_changed`) and the
    /// previous generation keeps serving, since peers' policies were written for the old one.
    pub allow_identity_change: bool,
    /// The application's connection and call hooks ([`crate::authz`]); each one set here
    /// replaces the template's.
    pub hooks: crate::authz::Hooks,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            name: "default".into(),
            watch: true,
            poll_interval: Some(Duration::from_secs(30)),
            reload_interval: None,
            settle: Duration::from_millis(200),
            retries: 3,
            close_on_trust_change: true,
            expiry_warning: Duration::from_secs(7 * 24 * 3600),
            allow_identity_change: false,
            hooks: Default::default(),
        }
    }
}

/// A lifecycle event, delivered to subscribers and logged.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A new generation went live.
    Reloaded { store: String, generation: u64, serial: Option<String>, not_after: Option<SystemTime> },
    /// New material was refused; the previous generation stays in service.
    Rejected { store: String, verdict: Option<Verdict>, message: String },
    /// Our certificate expires within the configured warning window.
    Expiring { store: String, generation: u64, not_after: SystemTime, seconds_left: i64 },
    /// An established connection was closed because new trust material refuses its peer.
    ConnectionClosed { store: String, peer: String, verdict: Verdict, message: String },
    /// Our private key's file can be read by users other than its owner (mode shown in octal).
    InsecureKeyFile { store: String, path: PathBuf, mode: u32 },
}

/// A CRL in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrlInfo {
    pub issuer: String,
    pub next_update: Option<SystemTime>,
    pub revoked: usize,
}

/// What is in service.
#[derive(Clone, Debug)]
pub struct GenerationInfo {
    pub number: u64,
    pub loaded_at: SystemTime,
    /// Our leaf certificate, if the store has an identity.
    pub certificate: Option<CertificateInfo>,
    pub earliest_ca_expiry: Option<SystemTime>,
    pub crls: Vec<CrlInfo>,
    /// The trust domains whose peers we can verify, with their CA sets.
    pub trust_domains: Vec<TrustDomainInfo>,
    /// Our private key's file when users other than its owner can read it: (path, mode).
    pub insecure_key_file: Option<(PathBuf, u32)>,
    /// Our certificate's issuer is outside our own trust bundle (separate client and server
    /// CAs): then so may the next generation's be. A store whose certificate chained to its
    /// bundle refuses a reload that breaks that (e.g. a CA rotation dropping our own issuer).
    pub issuer_outside_bundle: bool,
    material_digest: Vec<u8>,
    trust_digest: Vec<u8>,
}

/// One trust domain's CA set in a generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustDomainInfo {
    pub name: String,
    pub ca_count: usize,
    pub earliest_ca_expiry: Option<SystemTime>,
    /// The SPIFFE bundle's `spiffe_sequence`, when the CAs came from one.
    pub sequence: Option<u64>,
}

type Subscriber = Arc<dyn Fn(&Event) + Send + Sync>;

pub(crate) struct Inner {
    options: StoreOptions,
    template: TlsProfile,
    role: Use,
    sources: Mutex<Sources>,
    info: ArcSwap<GenerationInfo>,
    server: Option<ServerTls>,
    client: Option<ClientTls>,
    subscribers: Mutex<Vec<Subscriber>>,
    /// One load at a time; a trigger arriving during a load waits and then sees the result.
    load_lock: Mutex<Option<Vec<u8>>>,
    next_number: AtomicU64,
    expiry_warned_for: AtomicU64,
    /// The Workload API stream, when our SVID comes from one.
    workload: Option<Workload>,
}

/// A store's Workload API stream and the context it last accepted.
struct Workload {
    feed: Arc<Feed>,
    _source: WorkloadApiSource,
}

/// What the stream's callback shares with the store.
#[derive(Default)]
struct Feed {
    latest: Mutex<Option<Arc<X509Context>>>,
    /// Signalled when a context arrives or the stream gives up.
    arrived: Condvar,
    /// Set once the store exists: each context after that triggers a load.
    store: OnceLock<Weak<Inner>>,
}

impl Workload {
    /// Starts the stream on the shared runtime and waits (blocking this thread) for the first
    /// context, so a store always starts with an identity.
    fn start(spec: &WorkloadApiSpec, store: &str) -> Result<Self, Error> {
        let feed = Arc::new(Feed::default());
        let on_update = {
            let feed = feed.clone();
            move |context: Arc<X509Context>| {
                *feed.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some(context);
                feed.arrived.notify_all();
                if let Some(store) = feed.store.get().and_then(CredentialStore::upgrade) {
                    // Parsing and the pre-flight handshake are CPU work: off the stream's task.
                    // A load reads the latest context, so loads running late cannot go backwards.
                    tokio::task::spawn_blocking(move || {
                        let _ = store.load_now(true, true);
                    });
                }
            }
        };
        let woken = feed.clone();
        let options = WorkloadApiOptions { name: store.to_string(), select: spec.select.clone(), ..Default::default() }
            .on_event(move |_| woken.arrived.notify_all());
        let source =
            WorkloadApiSource::start_on(crate::runtime::runtime().handle(), spec.address.clone(), options, on_update)?;
        let deadline = std::time::Instant::now() + spec.first_timeout;
        let mut latest = feed.latest.lock().unwrap_or_else(|p| p.into_inner());
        while latest.is_none() && source.status().state != StreamState::Failed {
            let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) else { break };
            latest = feed.arrived.wait_timeout(latest, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        if latest.is_none() {
            let status = source.status();
            let why = status.last_error.map(|e| format!(": {e}")).unwrap_or_default();
            let message =
                format!("no X509-SVID from the Workload API at {} (stream {}{why})", spec.address, status.state.name());
            return Err(match status.state {
                StreamState::Failed => Error::transport(message),
                _ => Error::Timeout { after: spec.first_timeout, message },
            });
        }
        drop(latest);
        Ok(Workload { feed, _source: source })
    }

    fn latest(&self) -> Option<Arc<X509Context>> {
        self.feed.latest.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Rotating credentials for servers and clients. Cheap to clone.
#[derive(Clone)]
pub struct CredentialStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CredentialStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialStore")
            .field("name", &self.inner.options.name)
            .field("generation", &self.inner.info.load().number)
            .finish_non_exhaustive()
    }
}

/// Material read and validated, not yet published.
struct Loaded {
    identity: Option<Identity>,
    trust: TrustBundle,
    certificate: Option<CertificateInfo>,
    earliest_ca_expiry: Option<SystemTime>,
    crls: Vec<CrlInfo>,
    material_digest: Vec<u8>,
    trust_digest: Vec<u8>,
    /// Per trust domain: (name, CA count, earliest CA expiry).
    domains: Vec<(String, usize, Option<SystemTime>)>,
    /// Our private key's file when other users can read it: (path, mode).
    insecure_key_file: Option<(PathBuf, u32)>,
    issuer_outside_bundle: bool,
}

impl CredentialStore {
    /// Loads and validates the sources (an error here means nothing usable was found) and
    /// returns a store serving them as generation 1. `template` supplies the policy, names
    /// and TLS settings; its identity and trust are ignored.
    pub fn new(role: Use, sources: Sources, template: TlsProfile, options: StoreOptions) -> Result<Self, Error> {
        if role.server() && matches!(sources.identity, IdentitySource::None) && sources.workload_api.is_none() {
            return Err(Error::config("a server needs an identity: set a certificate chain and private key"));
        }
        let workload =
            match &sources.workload_api {
                Some(_) if !matches!(sources.identity, IdentitySource::None) => return Err(Error::config(
                    "[identity] workload_api gives our SVID and key: remove cert, key and combined, or workload_api",
                )),
                Some(spec) => Some(Workload::start(spec, &options.name)?),
                None => None,
            };
        let context = workload.as_ref().and_then(Workload::latest);
        let mut template = template;
        template.identity = None;
        if let Some(h) = &options.hooks.peer {
            template.policy.hooks.peer = Some(h.clone());
        }
        if let Some(h) = &options.hooks.call {
            template.policy.hooks.call = Some(h.clone());
        }
        template.trust = TrustBundle { require_fresh_crls: template.trust.require_fresh_crls, ..Default::default() };
        let loaded = read_material(&sources, context.as_deref())
            .and_then(|m| load(&m, &sources, &template, role, &options.name, true))
            .inspect_err(|e| {
                telemetry::reload_rejected(&options.name, e.verdict());
            })?;
        let profile = with_material(&template, loaded.identity.as_ref(), &loaded.trust);
        let server = if role.server() { Some(profile.server_tls_from(profile.server_generation(1)?)) } else { None };
        let client = if role.client() { Some(profile.client_tls_from(profile.client_generation(1)?)?) } else { None };
        let info = info_of(&loaded, 1);
        let store = CredentialStore {
            inner: Arc::new(Inner {
                template,
                role,
                sources: Mutex::new(sources),
                info: ArcSwap::from_pointee(info),
                server,
                client,
                subscribers: Mutex::new(Vec::new()),
                load_lock: Mutex::new(None),
                next_number: AtomicU64::new(2),
                expiry_warned_for: AtomicU64::new(0),
                workload,
                options,
            }),
        };
        store.published(&store.inner.info.load_full());
        if let Some(w) = &store.inner.workload {
            let _ = w.feed.store.set(store.downgrade());
            if w.latest().as_ref().map(Arc::as_ptr) != context.as_ref().map(Arc::as_ptr) {
                // A context arrived while the first one was being loaded.
                let _ = store.load_now(true, true);
            }
        }
        if store.inner.options.watch
            || store.inner.options.poll_interval.is_some()
            || store.inner.options.reload_interval.is_some()
        {
            watch::start(&store)?;
        }
        Ok(store)
    }

    /// The server side: every handshake uses the generation current at that moment.
    pub fn server_tls(&self) -> Result<ServerTls, Error> {
        self.inner.server.clone().ok_or_else(|| Error::config("this credential store was not made for servers"))
    }

    /// The client side: every new connection uses the generation current at that moment.
    pub fn client_tls(&self) -> Result<ClientTls, Error> {
        self.inner.client.clone().ok_or_else(|| Error::config("this credential store was not made for clients"))
    }

    /// What is in service now.
    pub fn generation(&self) -> Arc<GenerationInfo> {
        self.inner.info.load_full()
    }

    pub fn name(&self) -> &str {
        &self.inner.options.name
    }

    /// Calls `f` for every future event. `f` runs on the thread that performed the load (the
    /// caller of `reload()`, or the runtime's worker running the watcher); keep it short.
    pub fn subscribe(&self, f: impl Fn(&Event) + Send + Sync + 'static) {
        self.inner.subscribers.lock().unwrap_or_else(|p| p.into_inner()).push(Arc::new(f));
    }

    /// Reads and validates the sources now. Returns the generation in service afterwards: a new
    /// number if the material changed and passed, the same number if nothing changed. On
    /// failure the previous generation stays in service and the error says why.
    pub fn reload(&self) -> Result<u64, Error> {
        self.load_now(true, true)
    }

    /// Replaces our identity with PEM bytes and reloads.
    pub fn set_identity_pem(&self, chain: &[u8], key: &[u8]) -> Result<u64, Error> {
        self.replace_sources(|s| s.identity = IdentitySource::Pem { chain: chain.to_vec(), key: key.to_vec() })
    }

    /// Replaces the trust bundle with PEM bytes and reloads.
    pub fn set_trust_pem(&self, pem: &[u8]) -> Result<u64, Error> {
        self.replace_sources(|s| s.trust = vec![PemSource::Pem(pem.to_vec())])
    }

    /// Replaces the CRLs with PEM bytes (empty: no CRLs) and reloads.
    pub fn set_crls_pem(&self, pem: &[u8]) -> Result<u64, Error> {
        self.replace_sources(|s| s.crls = if pem.is_empty() { vec![] } else { vec![PemSource::Pem(pem.to_vec())] })
    }

    fn replace_sources(&self, change: impl FnOnce(&mut Sources)) -> Result<u64, Error> {
        let previous = {
            let mut sources = self.inner.sources.lock().unwrap_or_else(|p| p.into_inner());
            let previous = sources.clone();
            change(&mut sources);
            previous
        };
        let result = self.load_now(true, true);
        if result.is_err() {
            // The new bytes were refused; keep sources consistent with what is in service.
            *self.inner.sources.lock().unwrap_or_else(|p| p.into_inner()) = previous;
        }
        result
    }

    /// One validated load. `explicit`: validate and answer even when the same bad material was
    /// already reported. `report`: a failure is reported (event, counter, log); watch-driven
    /// loads that will be retried pass false.
    pub(crate) fn load_now(&self, explicit: bool, report: bool) -> Result<u64, Error> {
        let inner = &self.inner;
        let mut last_rejected = inner.load_lock.lock().unwrap_or_else(|p| p.into_inner());
        let sources = inner.sources.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let current = inner.info.load_full();
        // Read once: the digest decides whether anything changed, and the same bytes are loaded.
        let context = inner.workload.as_ref().and_then(Workload::latest);
        let material = match read_material(&sources, context.as_deref()) {
            Ok(m) => m,
            Err(e) => return Err(self.rejected(e, None, &mut last_rejected, report)),
        };
        let digest = material.digests().0;
        if digest == current.material_digest {
            *last_rejected = None;
            return Ok(current.number);
        }
        if !explicit && last_rejected.as_ref() == Some(&digest) {
            // Same bad material as last time: already reported.
            return Err(Error::credentials(None, "the sources still hold the material rejected before"));
        }
        let outside_ok = current.issuer_outside_bundle || current.certificate.is_none();
        let loaded = match load(&material, &sources, &inner.template, inner.role, &inner.options.name, outside_ok)
            .and_then(|l| check_identity_change(&current, &l, &inner.options).map(|()| l))
        {
            Ok(l) => l,
            Err(e) => return Err(self.rejected(e, Some(digest), &mut last_rejected, report)),
        };
        let number = inner.next_number.fetch_add(1, Ordering::Relaxed);
        let profile = with_material(&inner.template, loaded.identity.as_ref(), &loaded.trust);
        let built = (|| -> Result<_, Error> {
            let s = if inner.server.is_some() { Some(profile.server_generation(number)?) } else { None };
            let c = if inner.client.is_some() { Some(profile.client_generation(number)?) } else { None };
            Ok((s, c))
        })();
        let (server_gen, client_gen) = match built {
            Ok(x) => x,
            Err(e) => return Err(self.rejected(e, Some(digest), &mut last_rejected, report)),
        };
        *last_rejected = None;
        let trust_changed = loaded.trust_digest != current.trust_digest;
        let info = Arc::new(info_of(&loaded, number));
        if let (Some(tls), Some(g)) = (&inner.server, server_gen) {
            tls.current.store(Arc::new(g));
        }
        if let (Some(tls), Some(g)) = (&inner.client, client_gen) {
            tls.current.store(Arc::new(g));
        }
        inner.info.store(info.clone());
        drop(last_rejected);
        self.published(&info);
        if trust_changed && inner.options.close_on_trust_change {
            self.close_refused_connections();
        }
        Ok(number)
    }

    fn rejected(
        &self,
        err: Error,
        digest: Option<Vec<u8>>,
        last_rejected: &mut Option<Vec<u8>>,
        report: bool,
    ) -> Error {
        if !report {
            return err;
        }
        let name = &self.inner.options.name;
        let verdict = err.verdict();
        tracing::warn!(
            store = %name,
            verdict = verdict.map(Verdict::name).unwrap_or("invalid"),
            generation = self.inner.info.load().number,
            "new credentials rejected, previous generation stays in service: {err}"
        );
        telemetry::reload_rejected(name, verdict);
        *last_rejected = digest;
        self.emit(&Event::Rejected { store: name.clone(), verdict, message: err.to_string() });
        err
    }

    fn published(&self, info: &GenerationInfo) {
        let name = &self.inner.options.name;
        let not_after = info.certificate.as_ref().map(|c| c.identity.not_after);
        let serial = info.certificate.as_ref().map(|c| c.identity.serial.clone());
        tracing::info!(
            store = %name,
            generation = info.number,
            serial = serial.as_deref().unwrap_or("-"),
            not_after = %not_after.map(rfc3339).unwrap_or_default(),
            "credentials in service"
        );
        let crls: Vec<(String, Option<SystemTime>)> =
            info.crls.iter().map(|c| (c.issuer.clone(), c.next_update)).collect();
        telemetry::reload_succeeded(telemetry::GenerationGauges {
            store: name,
            generation: info.number,
            not_after,
            earliest_ca_expiry: info.earliest_ca_expiry,
            crl_next_updates: &crls,
            loaded_at: info.loaded_at,
        });
        telemetry::trust_domains(
            name,
            &info
                .trust_domains
                .iter()
                .map(|d| (d.name.clone(), d.ca_count, d.earliest_ca_expiry, d.sequence))
                .collect::<Vec<_>>(),
        );
        telemetry::insecure_key_file(name, info.insecure_key_file.is_some());
        if let Some((path, mode)) = &info.insecure_key_file {
            tracing::warn!(store = %name, path = %path.display(), mode = format!("{mode:03o}"),
                "our private key file can be read by other users; make it readable by its owner only (chmod 600)");
            self.emit(&Event::InsecureKeyFile { store: name.clone(), path: path.clone(), mode: *mode });
        }
        self.emit(&Event::Reloaded { store: name.clone(), generation: info.number, serial, not_after });
        self.check_expiry();
    }

    /// Emits `Expiring` once per generation when our certificate is inside the warning window.
    pub(crate) fn check_expiry(&self) {
        let info = self.inner.info.load();
        let Some(cert) = &info.certificate else { return };
        let left = match cert.identity.not_after.duration_since(SystemTime::now()) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64),
        };
        if left < self.inner.options.expiry_warning.as_secs() as i64
            && self.inner.expiry_warned_for.swap(info.number, Ordering::Relaxed) != info.number
        {
            tracing::warn!(store = %self.inner.options.name, seconds_left = left, "certificate expires soon");
            self.emit(&Event::Expiring {
                store: self.inner.options.name.clone(),
                generation: info.number,
                not_after: cert.identity.not_after,
                seconds_left: left,
            });
        }
    }

    fn close_refused_connections(&self) {
        let name = &self.inner.options.name;
        let mut closed = Vec::new();
        if let Some(tls) = &self.inner.server {
            let generation = tls.current.load_full();
            let number = generation.number;
            closed.extend(tls.tracker.recheck(number, Arc::new(move |chain, _| generation.verifier.recheck(chain))));
        }
        if let Some(tls) = &self.inner.client {
            let generation = tls.current.load_full();
            let number = generation.number;
            let check = move |chain: &[_], server_name: Option<&_>| {
                server_name.and_then(|n| generation.verifier.recheck(chain, n))
            };
            closed.extend(tls.tracker.recheck(number, Arc::new(check)));
        }
        for c in closed {
            tracing::info!(store = %name, peer = %c.peer, verdict = c.diagnosis.verdict.name(),
                "closing a connection the new trust material refuses: {}", c.diagnosis.message);
            telemetry::connection_closed(name, c.diagnosis.verdict);
            self.emit(&Event::ConnectionClosed {
                store: name.clone(),
                peer: c.peer.display_name(),
                verdict: c.diagnosis.verdict,
                message: c.diagnosis.message,
            });
        }
    }

    fn emit(&self, event: &Event) {
        let subscribers = self.inner.subscribers.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for s in subscribers {
            // A subscriber that panics must not take the store down with it.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s(event)));
        }
    }

    pub(crate) fn sources(&self) -> Sources {
        self.inner.sources.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn options(&self) -> &StoreOptions {
        &self.inner.options
    }

    pub(crate) fn downgrade(&self) -> std::sync::Weak<Inner> {
        Arc::downgrade(&self.inner)
    }

    pub(crate) fn upgrade(weak: &std::sync::Weak<Inner>) -> Option<Self> {
        weak.upgrade().map(|inner| CredentialStore { inner })
    }
}

fn with_material(template: &TlsProfile, identity: Option<&Identity>, trust: &TrustBundle) -> TlsProfile {
    let mut p = template.clone();
    p.identity = identity.cloned();
    p.trust = trust.clone();
    p
}

fn info_of(loaded: &Loaded, number: u64) -> GenerationInfo {
    GenerationInfo {
        number,
        loaded_at: SystemTime::now(),
        certificate: loaded.certificate.clone(),
        earliest_ca_expiry: loaded.earliest_ca_expiry,
        crls: loaded.crls.clone(),
        trust_domains: loaded
            .domains
            .iter()
            .map(|(name, ca_count, earliest)| TrustDomainInfo {
                name: name.clone(),
                ca_count: *ca_count,
                earliest_ca_expiry: *earliest,
                sequence: TrustDomain::parse(name).ok().and_then(|td| loaded.trust.sequences.get(&td).copied()),
            })
            .collect(),
        insecure_key_file: loaded.insecure_key_file.clone(),
        issuer_outside_bundle: loaded.issuer_outside_bundle,
        material_digest: loaded.material_digest.clone(),
        trust_digest: loaded.trust_digest.clone(),
    }
}

/// Reads, parses and validates; nothing is published here.
/// `outside_ok`: our certificate may have an issuer outside our bundle (at the first load, or
/// when the generation in service already has one).
fn load(
    m: &Material,
    sources: &Sources,
    template: &TlsProfile,
    role: Use,
    store: &str,
    outside_ok: bool,
) -> Result<Loaded, Error> {
    let mut loaded = validate(m, sources, template)?;
    if let Some(id) = &loaded.identity {
        if role.server() {
            loaded.issuer_outside_bundle |= preflight::server(id, &loaded.trust, template, outside_ok)?;
        }
        if role.client() {
            loaded.issuer_outside_bundle |= preflight::client(id, &loaded.trust, template, outside_ok)?;
        }
    }
    tracing::debug!(store, "credentials validated");
    Ok(loaded)
}

/// Material for a fixed profile: every check a store makes except the pre-flight handshakes
/// (which need to know the role), so a profile loaded once and a store refuse the same files.
pub(crate) fn load_fixed(sources: &Sources, template: &TlsProfile) -> Result<(Option<Identity>, TrustBundle), Error> {
    if let Some(spec) = &sources.workload_api {
        return Err(Error::config(format!(
            "the profile takes its SVID from the Workload API at {}, which rotates: load it as a CredentialStore",
            spec.address
        )));
    }
    let loaded = validate(&read_material(sources, None)?, sources, template)?;
    Ok((loaded.identity, loaded.trust))
}

/// An identity's refusal, saying which files it read.
fn naming_files(e: Error, sources: &Sources) -> Error {
    let files = match &sources.identity {
        IdentitySource::Files { chain, key } => format!("certificate {}, key {}", chain.display(), key.display()),
        IdentitySource::Combined(path) => format!("combined key and chain {}", path.display()),
        _ => return e,
    };
    match e {
        Error::Credentials { verdict, message } => Error::credentials(verdict, format!("{message} [{files}]")),
        other => other,
    }
}

/// Parses the identity, the trust material by trust domain and the CRLs, and checks them.
fn validate(m: &Material, sources: &Sources, template: &TlsProfile) -> Result<Loaded, Error> {
    let (material_digest, trust_digest) = m.digests();
    let (identity, key_file) = match &m.identity {
        None => (None, None),
        Some(IdentityBytes::Pem { chain, key, key_file }) => {
            (Some(Identity::from_pem(chain, key).map_err(|e| naming_files(e, sources))?), key_file.as_deref())
        }
        Some(IdentityBytes::Combined { pem, file }) => {
            (Some(Identity::from_combined_pem(pem).map_err(|e| naming_files(e, sources))?), Some(file.as_path()))
        }
        Some(IdentityBytes::Token { chain, key }) => {
            let chain = crate::tls::parse_certs(chain, "certificate chain")?;
            let what = format!("the key {} on the PKCS#11 token", key.uri);
            let leaf = X509Certificate::from_der(chain[0].as_ref()).map_err(|e| {
                Error::credentials(Some(Verdict::UnsupportedCertificate), format!("our certificate: {e}"))
            })?;
            let signing = pkcs11::TokenKey::open(key, Some(leaf.1.public_key().raw))?.into_signing_key();
            (Some(Identity::from_signing_key(chain, signing, &what)?), None)
        }
    };
    let insecure_key_file = key_file.and_then(readable_by_others);
    let mut trust = TrustBundle {
        require_fresh_crls: template.trust.require_fresh_crls,
        trust_domain: sources.trust_domain.clone().or_else(|| template.trust.trust_domain.clone()),
        ..Default::default()
    };
    for (what, pem) in &m.trust {
        trust.roots.extend(parse_ca_bundle(pem, what)?);
    }
    let mut bundles: Vec<(TrustDomain, sources::SpiffeBundle)> = Vec::new();
    if !m.trust_bundles.is_empty() {
        let Some(td) = trust.trust_domain.clone() else {
            return Err(Error::config("a SPIFFE bundle for our own trust domain needs [trust] trust_domain = \"…\""));
        };
        for (what, json) in &m.trust_bundles {
            bundles.push((td.clone(), sources::parse_spiffe_bundle(json, what)?));
        }
    }
    for (what, json) in &m.bundle_maps {
        bundles.extend(sources::parse_bundle_map(json, what)?);
    }
    for (td, cas, jsons) in &m.federation {
        let mut pem_cas = Vec::new();
        for (what, pem) in cas {
            pem_cas.extend(parse_ca_bundle(pem, what)?);
        }
        trust = trust.federate(td.clone(), pem_cas);
        for (what, json) in jsons {
            bundles.push((td.clone(), sources::parse_spiffe_bundle(json, what)?));
        }
    }
    for (td, b) in bundles {
        if let Some(seq) = b.sequence {
            trust.sequences.insert(td.clone(), seq);
        }
        trust = trust.federate(td, b.cas);
    }
    for (td, what, cas) in &m.spiffe_bundles {
        for (i, ca) in cas.iter().enumerate() {
            check_ca(ca, &format!("{what}, CA #{}", i + 1))?;
        }
        trust = trust.federate(td.clone(), cas.clone());
    }
    let probe = with_material(template, identity.as_ref(), &trust);
    let resolved = trust.resolve(probe.local_trust_domain().as_ref())?;
    let earliest_ca_expiry = resolved.earliest_ca_expiry();
    let all_cas: Vec<CertificateDer<'static>> = trust.all_cas().cloned().collect();
    let mut crls = Vec::new();
    for (what, pem) in &m.crls {
        let before = trust.crls.len();
        trust.add_crls_pem(pem).map_err(|e| Error::credentials(None, format!("{what}: {e}")))?;
        if trust.crls.len() == before {
            return Err(Error::credentials(
                Some(Verdict::BadPem),
                format!("{what}: holds no CRL (empty or truncated file?)"),
            ));
        }
        for crl in &trust.crls[before..] {
            crls.push(check_crl(crl.as_ref(), &all_cas, what, template.trust.require_fresh_crls)?);
        }
    }
    let certificate = match &identity {
        Some(id) => {
            let info = id.leaf_info()?;
            check_validity(&info)?;
            Some(info)
        }
        None => None,
    };
    Ok(Loaded {
        identity,
        trust,
        certificate,
        earliest_ca_expiry,
        crls,
        material_digest,
        trust_digest,
        domains: resolved.domain_summaries(),
        insecure_key_file,
        issuer_outside_bundle: false,
    })
}

/// A reload must not change who we are (our SPIFFE ID, hence our trust domain) unless the
/// store allows it.
fn check_identity_change(current: &GenerationInfo, new: &Loaded, options: &StoreOptions) -> Result<(), Error> {
    let id = |c: &Option<CertificateInfo>| c.as_ref().and_then(|c| c.identity.spiffe_id.clone());
    let (old, new) = (id(&current.certificate), id(&new.certificate));
    if options.allow_identity_change || current.certificate.is_none() || old == new {
        return Ok(());
    }
    Err(Error::credentials(
        Some(Verdict::IdentityChanged),
        format!(
            "the new certificate's SPIFFE ID is {}, but the one in service is {}; the previous \
             generation stays in service (a change of identity must be allowed explicitly: \
             allow_identity_change)",
            new.as_deref().unwrap_or("absent"),
            old.as_deref().unwrap_or("absent")
        ),
    ))
}

fn check_validity(info: &CertificateInfo) -> Result<(), Error> {
    let now = SystemTime::now();
    let id = &info.identity;
    if now > id.not_after {
        return Err(Error::credentials(
            Some(Verdict::Expired),
            format!(
                "our certificate for {} expired: not after {}, now {}; the new material was not put in service",
                id.display_name(),
                rfc3339(id.not_after),
                rfc3339(now)
            ),
        ));
    }
    if now < id.not_before {
        return Err(Error::credentials(
            Some(Verdict::NotYetValid),
            format!(
                "our certificate for {} is not valid yet: not before {}, now {}",
                id.display_name(),
                rfc3339(id.not_before),
                rfc3339(now)
            ),
        ));
    }
    Ok(())
}

/// A CRL issued by a CA in the bundle must carry that CA's signature. One from another issuer
/// (an intermediate CA, which peers send in their chains) is kept: webpki matches it to the
/// issuer of a certificate being verified and checks its signature with that issuer's key, so a
/// CRL whose signature does not verify never revokes (or clears) anything. A stale one is
/// refused when fresh CRLs are required.
fn check_crl(der: &[u8], cas: &[CertificateDer<'static>], what: &str, require_fresh: bool) -> Result<CrlInfo, Error> {
    let (_, crl) = CertificateRevocationList::from_der(der)
        .map_err(|e| Error::credentials(Some(Verdict::BadPem), format!("{what}: not a valid CRL: {e}")))?;
    let issuer = crl.issuer().to_string();
    let mut named_ca_found = false;
    for ca in cas {
        let Ok((_, cert)) = X509Certificate::from_der(ca.as_ref()) else { continue };
        if cert.subject().as_raw() == crl.issuer().as_raw() {
            named_ca_found = true;
            if crl.verify_signature(cert.public_key()).is_ok() {
                named_ca_found = false;
                break;
            }
        }
    }
    if named_ca_found {
        return Err(Error::credentials(
            Some(Verdict::BadSignature),
            format!("{what}: the CRL from '{issuer}' is not signed by the key of the trusted CA of that name"),
        ));
    }
    let next_update =
        crl.next_update().map(|t| SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64));
    if require_fresh {
        if let Some(t) = next_update {
            if t < SystemTime::now() {
                return Err(Error::credentials(
                    Some(Verdict::CrlStale),
                    format!("{what}: the CRL from '{issuer}' was due for renewal at {}", rfc3339(t)),
                ));
            }
        }
    }
    Ok(CrlInfo { issuer, next_update, revoked: crl.iter_revoked_certificates().count() })
}
