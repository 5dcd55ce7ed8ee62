//! `TlsConfig`: a credential store built from paths, bytes or a profile file.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};
use trustwire::authz::PeerDecision;
use trustwire::credentials::pkcs11::is_pkcs11_uri;
use trustwire::credentials::{
    CredentialStore, Event, IdentitySource, PemSource, Sources, StoreOptions, Use, WorkloadApiSpec,
};
use trustwire::profile::Pkcs11Section;
use trustwire::tls::{ClientTls, ServerTls, TlsProfile, TrustBundle};
use trustwire::{Error, Policy, Verdict};

use crate::errors::{config_error, to_pyerr};
use crate::rt::checked_runtime;

pub fn unix(t: SystemTime) -> f64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// A path (str or os.PathLike) or PEM bytes.
fn pem_source(obj: &Bound<'_, PyAny>) -> PyResult<PemSource> {
    if let Ok(b) = obj.downcast::<PyBytes>() {
        return Ok(PemSource::Pem(b.as_bytes().to_vec()));
    }
    Ok(PemSource::Path(obj.extract::<PathBuf>()?))
}

/// One source or a list of them.
fn pem_sources(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<PemSource>> {
    let Some(obj) = obj else {
        return Ok(Vec::new());
    };
    if obj.is_none() {
        return Ok(Vec::new());
    }
    if obj.downcast::<PyBytes>().is_ok() || obj.downcast::<PyString>().is_ok() || obj.extract::<PathBuf>().is_ok() {
        return Ok(vec![pem_source(obj)?]);
    }
    obj.try_iter()?.map(|item| pem_source(&item?)).collect()
}

/// Subscribers of one store, called in order on one thread of their own so that a slow Python
/// callback never holds up a reload or a runtime worker.
struct Dispatcher {
    callbacks: Arc<Mutex<Vec<Py<PyAny>>>>,
}

impl Dispatcher {
    fn start(store: &CredentialStore) -> Self {
        let callbacks: Arc<Mutex<Vec<Py<PyAny>>>> = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel::<Event>();
        let tx = Mutex::new(tx);
        store.subscribe(move |event| {
            let _ = tx.lock().unwrap_or_else(|p| p.into_inner()).send(event.clone());
        });
        let cbs = callbacks.clone();
        let _ = std::thread::Builder::new().name("trustwire-events".into()).spawn(move || {
            crate::pool::serve(rx, |py, event: Event| {
                let list: Vec<Py<PyAny>> =
                    cbs.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|c| c.clone_ref(py)).collect();
                if list.is_empty() {
                    return;
                }
                let ev = match Py::new(py, PyEvent::from(&event)) {
                    Ok(ev) => ev,
                    Err(e) => return e.write_unraisable(py, None),
                };
                for cb in list {
                    if let Err(e) = cb.call1(py, (ev.clone_ref(py),)) {
                        e.write_unraisable(py, Some(cb.bind(py)));
                    }
                }
            })
        });
        Dispatcher { callbacks }
    }
}

/// A credential lifecycle event.
#[pyclass(module = "trustwire._native", name = "Event", frozen, get_all)]
pub struct PyEvent {
    /// "reloaded", "rejected", "expiring" or "connection_closed".
    kind: &'static str,
    store: String,
    generation: Option<u64>,
    verdict: Option<&'static str>,
    message: Option<String>,
    serial: Option<String>,
    not_after: Option<f64>,
    seconds_left: Option<i64>,
    peer: Option<String>,
}

impl From<&Event> for PyEvent {
    fn from(e: &Event) -> Self {
        let mut out = PyEvent {
            kind: "",
            store: String::new(),
            generation: None,
            verdict: None,
            message: None,
            serial: None,
            not_after: None,
            seconds_left: None,
            peer: None,
        };
        match e {
            Event::Reloaded { store, generation, serial, not_after } => {
                out.kind = "reloaded";
                out.store = store.clone();
                out.generation = Some(*generation);
                out.serial = serial.clone();
                out.not_after = not_after.map(unix);
            }
            Event::Rejected { store, verdict, message } => {
                out.kind = "rejected";
                out.store = store.clone();
                out.verdict = verdict.map(Verdict::name);
                out.message = Some(message.clone());
            }
            Event::Expiring { store, generation, not_after, seconds_left } => {
                out.kind = "expiring";
                out.store = store.clone();
                out.generation = Some(*generation);
                out.not_after = Some(unix(*not_after));
                out.seconds_left = Some(*seconds_left);
            }
            Event::ConnectionClosed { store, peer, verdict, message } => {
                out.kind = "connection_closed";
                out.store = store.clone();
                out.peer = Some(peer.clone());
                out.verdict = Some(verdict.name());
                out.message = Some(message.clone());
            }
            Event::InsecureKeyFile { store, path, mode } => {
                out.kind = "insecure_key_file";
                out.store = store.clone();
                out.message = Some(format!("{} is readable by other users (mode {mode:03o})", path.display()));
            }
            _ => out.kind = "other",
        }
        out
    }
}

#[pymethods]
impl PyEvent {
    fn __repr__(&self) -> String {
        format!(
            "Event(kind={:?}, store={:?}, generation={:?}, verdict={:?}, message={:?})",
            self.kind, self.store, self.generation, self.verdict, self.message
        )
    }
}

/// Certificates, trust and policy for servers and clients; reloads without a restart.
#[pyclass(module = "trustwire._native", name = "TlsConfig", frozen)]
pub struct PyTlsConfig {
    store: CredentialStore,
    role: Use,
    /// Why the role this configuration lacks was refused, when it was tried and failed.
    refused: Option<String>,
    events: Dispatcher,
}

impl PyTlsConfig {
    pub fn server_tls(&self, py: Python<'_>) -> PyResult<ServerTls> {
        self.store.server_tls().map_err(|_| match &self.refused {
            Some(why) if self.role == Use::Client => {
                config_error(py, format!("this TlsConfig cannot be used by a server: {why}"))
            }
            _ if self.role == Use::Client => config_error(
                py,
                "this TlsConfig was made for clients (role=\"client\", or a client-only certificate, or no key)",
            ),
            _ => config_error(py, "this TlsConfig cannot be used by a server"),
        })
    }

    pub fn client_tls(&self, py: Python<'_>) -> PyResult<ClientTls> {
        self.store.client_tls().map_err(|_| match &self.refused {
            Some(why) if self.role == Use::Server => {
                config_error(py, format!("this TlsConfig cannot be used by a client: {why}"))
            }
            _ => {
                config_error(py, "this TlsConfig was made for servers (role=\"server\", or a server-only certificate)")
            }
        })
    }

    /// Builds the store for `role` when given (pre-flighting only what that role needs). Else
    /// for both roles when the material passes both pre-flights, else for the one it passes (a
    /// certificate marked client-only, say), remembering why the other failed; without an
    /// identity, for clients.
    fn build(
        py: Python<'_>,
        sources: Sources,
        template: TlsProfile,
        options: StoreOptions,
        role: Option<Use>,
    ) -> PyResult<Self> {
        checked_runtime(py)?;
        let has_identity = !matches!(sources.identity, IdentitySource::None) || sources.workload_api.is_some();
        let result = py.allow_threads(move || -> Result<(CredentialStore, Use, Option<String>), Error> {
            // The store's watcher runs on the shared runtime.
            let _guard = trustwire::runtime::runtime().enter();
            let make = |role: Use| CredentialStore::new(role, sources.clone(), template.clone(), options.clone());
            if let Some(role) = role {
                return make(role).map(|s| (s, role, None));
            }
            if !has_identity {
                return make(Use::Client).map(|s| (s, Use::Client, None));
            }
            let both = match make(Use::Both) {
                Ok(s) => return Ok((s, Use::Both, None)),
                Err(e) => e,
            };
            // Which role failed: the one whose pre-flight still fails alone.
            let client = match make(Use::Client) {
                Ok(s) => return Ok((s, Use::Client, Some(both.to_string()))),
                Err(e) => e,
            };
            match make(Use::Server) {
                Ok(s) => Ok((s, Use::Server, Some(client.to_string()))),
                // Neither works: the usage error says least; report the other one.
                Err(_) if both.verdict() == Some(Verdict::BadKeyUsage) => Err(client),
                Err(_) => Err(both),
            }
        });
        let (store, role, refused) = result.map_err(|e| to_pyerr(py, e))?;
        let events = Dispatcher::start(&store);
        Ok(PyTlsConfig { store, role, refused, events })
    }
}

/// `role=`: "server", "client", "both", or None to take what the material allows.
fn parse_role(py: Python<'_>, role: Option<&str>) -> PyResult<Option<Use>> {
    match role {
        None => Ok(None),
        Some("server") => Ok(Some(Use::Server)),
        Some("client") => Ok(Some(Use::Client)),
        Some("both") => Ok(Some(Use::Both)),
        Some(other) => Err(config_error(py, format!("role must be \"server\", \"client\" or \"both\", not {other:?}"))),
    }
}

fn options(reload_interval: Option<f64>) -> PyResult<StoreOptions> {
    let reload_interval = match reload_interval {
        None => None,
        Some(s) if s > 0.0 && s.is_finite() => Some(Duration::from_secs_f64(s)),
        Some(_) => {
            return Err(pyo3::exceptions::PyValueError::new_err("reload_interval must be a positive number of seconds"))
        }
    };
    Ok(StoreOptions { name: "python".into(), reload_interval, ..StoreOptions::default() })
}

#[pymethods]
impl PyTlsConfig {
    #[new]
    #[pyo3(signature = (*, cert=None, key=None, ca=None, crl=None, allow=None, rules=None, server_name=None, server_spiffe_id=None, reload_interval=None, require_fresh_crls=false, workload_api=None, svid_spiffe_id=None, svid_hint=None, authorize_peer=None, pkcs11_module=None, pkcs11_pin_env=None, pkcs11_pin_file=None, role=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        cert: Option<&Bound<'_, PyAny>>,
        key: Option<&Bound<'_, PyAny>>,
        ca: Option<&Bound<'_, PyAny>>,
        crl: Option<&Bound<'_, PyAny>>,
        allow: Option<Vec<String>>,
        rules: Option<Vec<(Vec<String>, Vec<String>)>>,
        server_name: Option<String>,
        server_spiffe_id: Option<String>,
        reload_interval: Option<f64>,
        require_fresh_crls: bool,
        workload_api: Option<String>,
        svid_spiffe_id: Option<String>,
        svid_hint: Option<String>,
        authorize_peer: Option<Py<PyAny>>,
        pkcs11_module: Option<PathBuf>,
        pkcs11_pin_env: Option<String>,
        pkcs11_pin_file: Option<PathBuf>,
        role: Option<&str>,
    ) -> PyResult<Self> {
        let role = parse_role(py, role)?;
        let workload_api = match workload_api {
            None if svid_spiffe_id.is_some() || svid_hint.is_some() => {
                return Err(config_error(
                    py,
                    "svid_spiffe_id and svid_hint choose among the Workload API's SVIDs: give workload_api",
                ))
            }
            None => None,
            Some(_) if cert.is_some() || key.is_some() => {
                return Err(config_error(py, "workload_api gives our SVID and key: give it or cert and key, not both"))
            }
            Some(address) => {
                let names = ["workload_api", "svid_spiffe_id", "svid_hint"];
                let spec =
                    WorkloadApiSpec::from_parts(&address, svid_spiffe_id.as_deref(), svid_hint.as_deref(), names)
                        .map_err(|e| to_pyerr(py, e))?;
                Some(spec)
            }
        };
        let token_uri = key.and_then(|k| k.extract::<String>().ok()).filter(|k| is_pkcs11_uri(k));
        let token_flags = pkcs11_module.is_some() || pkcs11_pin_env.is_some() || pkcs11_pin_file.is_some();
        let identity = match (cert, key) {
            (Some(c), Some(_)) if token_uri.is_some() => {
                let PemSource::Path(chain) = pem_source(c)? else {
                    return Err(config_error(py, "with a pkcs11: key, cert must be a path to the chain file"));
                };
                let Some(module) = pkcs11_module else {
                    return Err(config_error(
                        py,
                        "key is a pkcs11: URI: give pkcs11_module (the token's PKCS#11 library)",
                    ));
                };
                let section =
                    Pkcs11Section { module, pin_env: pkcs11_pin_env, pin_file: pkcs11_pin_file, sessions: None };
                let uri = token_uri.as_deref().unwrap_or_default();
                let key = section.key_spec(uri, Path::to_path_buf).map_err(|e| to_pyerr(py, e))?;
                IdentitySource::Pkcs11 { chain, key: Box::new(key) }
            }
            _ if token_flags => {
                return Err(config_error(py, "pkcs11_module and pkcs11_pin_* go with key=\"pkcs11:…\""));
            }
            (None, None) => IdentitySource::None,
            (Some(c), Some(k)) => match (pem_source(c)?, pem_source(k)?) {
                (PemSource::Path(chain), PemSource::Path(key)) => IdentitySource::Files { chain, key },
                (PemSource::Pem(chain), PemSource::Pem(key)) => IdentitySource::Pem { chain, key },
                _ => return Err(config_error(py, "cert and key must both be paths or both be bytes")),
            },
            _ => return Err(config_error(py, "cert and key go together")),
        };
        let trust = pem_sources(ca)?;
        if trust.is_empty() && workload_api.is_none() {
            return Err(config_error(py, "ca is required: the CA certificates that vouch for peers"));
        }
        let sources = Sources { identity, workload_api, trust, crls: pem_sources(crl)?, ..Sources::default() };
        let mut policy = Policy::from_patterns(&allow.unwrap_or_default()).map_err(|e| to_pyerr(py, e))?;
        for (methods, allow) in rules.unwrap_or_default() {
            policy = policy.with_rule(&methods, &allow).map_err(|e| to_pyerr(py, e))?;
        }
        let mut template = TlsProfile::new(None, TrustBundle::default());
        template.policy = policy;
        template.server_name = server_name;
        template.server_spiffe_id = server_spiffe_id;
        template.trust.require_fresh_crls = require_fresh_crls;
        let mut options = options(reload_interval)?;
        options.hooks.peer = authorize_peer.map(|hook| -> Arc<dyn trustwire::authz::PeerHook> {
            Arc::new(move |peer: &trustwire::PeerIdentity| {
                crate::rt::with_gil_kept(|py| run_peer_hook(py, &hook, peer))
            })
        });
        Self::build(py, sources, template, options, role)
    }

    /// Loads a TOML profile file (the format the CLI and C API share).
    #[staticmethod]
    #[pyo3(signature = (path, *, reload_interval=None, role=None))]
    fn from_file(py: Python<'_>, path: PathBuf, reload_interval: Option<f64>, role: Option<&str>) -> PyResult<Self> {
        let role = parse_role(py, role)?;
        let file = trustwire::profile::ProfileFile::load(&path).map_err(|e| to_pyerr(py, e))?;
        let sources = file.sources().map_err(|e| to_pyerr(py, e))?;
        let template = file.settings().map_err(|e| to_pyerr(py, e))?;
        Self::build(py, sources, template, options(reload_interval)?, role)
    }

    /// Re-reads the sources now; returns the generation in service afterwards. On failure the
    /// previous generation stays in service and the exception says why.
    fn reload(&self, py: Python<'_>) -> PyResult<u64> {
        let store = self.store.clone();
        py.allow_threads(move || store.reload()).map_err(|e| to_pyerr(py, e))
    }

    /// Calls `callback(event)` for every later event, in order, on a thread of trustwire's.
    fn on_event(&self, callback: Py<PyAny>) {
        self.events.callbacks.lock().unwrap_or_else(|p| p.into_inner()).push(callback);
    }

    /// The number of the generation in service (1 after construction).
    #[getter]
    fn generation(&self) -> u64 {
        self.store.generation().number
    }

    /// Our certificate's not-after as a Unix timestamp, or None without an identity.
    #[getter]
    fn not_after(&self) -> Option<f64> {
        self.store.generation().certificate.as_ref().map(|c| unix(c.identity.not_after))
    }

    /// Our certificate's serial (hex), or None without an identity.
    #[getter]
    fn serial(&self) -> Option<String> {
        self.store.generation().certificate.as_ref().map(|c| c.identity.serial.clone())
    }

    /// The roles this configuration serves: "both", "server" or "client".
    #[getter]
    fn roles(&self) -> &'static str {
        match self.role {
            Use::Both => "both",
            Use::Server => "server",
            Use::Client => "client",
        }
    }

    fn __repr__(&self) -> String {
        format!("TlsConfig(roles={:?}, generation={})", self.roles(), self.generation())
    }
}

/// Runs a Python connection hook `hook(peer)`: True admits; False, or an exception (reported
/// as unraisable), refuses; a string returned is taken as the refusal's reason.
fn run_peer_hook(py: Python<'_>, hook: &Py<PyAny>, peer: &trustwire::PeerIdentity) -> PeerDecision {
    let outcome = Py::new(py, crate::rpc::PyPeerIdentity::from(peer)).and_then(|p| hook.call1(py, (p,)));
    match outcome {
        Ok(v) => match (v.extract::<bool>(py), v.extract::<String>(py)) {
            (Ok(true), _) => PeerDecision::Allow,
            (_, Ok(reason)) => PeerDecision::Deny(reason),
            _ => PeerDecision::Deny("refused by the Python connection hook".into()),
        },
        Err(e) => {
            crate::errors::log_exception(py, e, "the authorize_peer hook raised; the peer is refused");
            PeerDecision::Deny("the Python connection hook raised".into())
        }
    }
}
