//! `trustwire._native`: the Python extension module. It converts types, errors and ownership
//! and calls the core; no TLS or policy logic lives here.

mod errors;
mod logging;
mod pool;
mod rpc;
mod rt;
mod tls;

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pyo3::prelude::*;
use trustwire::pki::{DevCa, IssueRequest, Usage};
use trustwire::tls::Identity;

use crate::errors::to_pyerr;

fn system_time(unix: f64) -> SystemTime {
    if unix >= 0.0 {
        UNIX_EPOCH + Duration::from_secs_f64(unix)
    } else {
        UNIX_EPOCH - Duration::from_secs_f64(-unix)
    }
}

/// A development certificate authority (for tests; keys live in memory).
#[pyclass(module = "trustwire._native", name = "DevCa", frozen)]
struct PyDevCa {
    ca: DevCa,
}

#[pymethods]
impl PyDevCa {
    #[new]
    fn new(py: Python<'_>, trust_domain: &str) -> PyResult<Self> {
        DevCa::new(trust_domain).map(|ca| PyDevCa { ca }).map_err(|e| to_pyerr(py, e))
    }

    #[getter]
    fn ca_pem(&self) -> String {
        self.ca.cert_pem().to_string()
    }

    /// Issues a certificate; returns (cert_pem, key_pem, serial_hex).
    #[pyo3(signature = (name, *, spiffe_id=None, dns=Vec::new(), ips=Vec::new(), not_before=None, not_after=None, usage="both"))]
    #[allow(clippy::too_many_arguments)]
    fn issue(
        &self,
        py: Python<'_>,
        name: &str,
        spiffe_id: Option<String>,
        dns: Vec<String>,
        ips: Vec<String>,
        not_before: Option<f64>,
        not_after: Option<f64>,
        usage: &str,
    ) -> PyResult<(String, String, String)> {
        let mut req = IssueRequest::new(name);
        if let Some(id) = spiffe_id {
            req = req.spiffe_id(id);
        }
        for d in dns {
            req = req.dns(d);
        }
        for ip in ips {
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| pyo3::exceptions::PyValueError::new_err(format!("not an IP address: {ip:?}")))?;
            req = req.ip(ip);
        }
        if not_before.is_some() || not_after.is_some() {
            let now = SystemTime::now();
            let nb = not_before.map(system_time).unwrap_or(now - Duration::from_secs(60));
            let na = not_after.map(system_time).unwrap_or(now + Duration::from_secs(30 * 86400));
            req = req.validity(nb, na);
        }
        req = req.usage(Usage::parse(usage).map_err(|e| to_pyerr(py, e))?);
        let cred = self.ca.issue(&req).map_err(|e| to_pyerr(py, e))?;
        let serial = Identity::from_pem(cred.cert_pem.as_bytes(), cred.key_pem.as_bytes())
            .and_then(|i| i.leaf_info())
            .map_err(|e| to_pyerr(py, e))?
            .identity
            .serial;
        Ok((cred.cert_pem, cred.key_pem, serial))
    }

    /// A CRL revoking `serials` (hex), valid until `next_update` (Unix time).
    fn crl_pem(&self, py: Python<'_>, serials: Vec<String>, next_update: f64) -> PyResult<String> {
        let refs: Vec<&str> = serials.iter().map(String::as_str).collect();
        self.ca.crl_pem(&refs, system_time(next_update)).map_err(|e| to_pyerr(py, e))
    }
}

/// The Prometheus text exposition of this process's trustwire metrics.
#[pyfunction]
fn metrics_text() -> String {
    trustwire::telemetry::metrics_text()
}

/// Verifies an identity token written by a trustwire server-side proxy, for `audience` (the
/// route's name) and no older than `max_age` seconds. Returns `(reason, message, key_id,
/// audience, spiffe_id, fingerprint_sha256, not_after, issued_at)`: `reason` is None for a valid
/// token, else the refusal's stable name (the Python layer raises). The caller checks that
/// `audience` is not empty and `max_age` is positive and finite.
#[pyfunction]
#[allow(clippy::type_complexity)]
fn verify_identity_token(
    token: &[u8],
    keys: std::collections::HashMap<String, Vec<u8>>,
    audience: &str,
    max_age: f64,
) -> PyResult<(Option<&'static str>, String, String, String, Option<String>, String, u64, u64)> {
    let max_age = std::time::Duration::try_from_secs_f64(max_age)
        .map_err(|e| pyo3::exceptions::PyValueError::new_err(format!("max_age: {e}")))?;
    let keys: Vec<(&str, &[u8])> = keys.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
    Ok(match trustwire::proxy::token::verify(token, &keys, audience, max_age) {
        Ok(id) => (
            None,
            String::new(),
            id.key_id,
            id.audience,
            id.spiffe_id,
            id.fingerprint_sha256,
            id.not_after,
            id.issued_at,
        ),
        Err(e) => (Some(e.name()), e.to_string(), String::new(), String::new(), None, String::new(), 0, 0),
    })
}

/// Proxy routes from a `trustwire proxy` config file, running in this process.
#[pyclass(name = "Proxy", module = "trustwire._native")]
struct PyProxy {
    running: Vec<trustwire::proxy::RunningProxy>,
    stores: Vec<trustwire::credentials::CredentialStore>,
    drain: std::time::Duration,
}

#[pymethods]
impl PyProxy {
    /// Starts every route of the config file; returns once all listen.
    #[staticmethod]
    fn start(py: Python<'_>, config: std::path::PathBuf) -> PyResult<Self> {
        let (running, stores, drain) = rt::block_on(py, async move {
            let file = trustwire::proxy::config::ProxyFile::load(&config)?;
            let (running, stores) = file.start().await?.into_iter().unzip();
            Ok((running, stores, file.drain()))
        })?;
        Ok(PyProxy { running, stores, drain })
    }

    /// `{route name: listen address}` (bound ports filled in).
    fn addresses(&self) -> std::collections::BTreeMap<String, String> {
        self.running.iter().map(|r| (r.name().to_string(), r.local().to_string())).collect()
    }

    /// Reloads every route's credentials now; returns `{route: generation}`.
    fn reload(&self, py: Python<'_>) -> PyResult<std::collections::BTreeMap<String, u64>> {
        let mut out = std::collections::BTreeMap::new();
        for s in &self.stores {
            out.insert(s.name().to_string(), s.reload().map_err(|e| errors::to_pyerr(py, e))?);
        }
        Ok(out)
    }

    /// Stops accepting and lets open streams finish (up to the config's drain_seconds).
    fn stop(&mut self, py: Python<'_>) -> PyResult<()> {
        let running = std::mem::take(&mut self.running);
        let drain = self.drain;
        rt::block_on(py, async move {
            let tasks: Vec<_> = running.into_iter().map(|r| tokio::spawn(r.shutdown(drain))).collect();
            for t in tasks {
                let _ = t.await;
            }
            Ok(())
        })
    }
}

/// Runs the `trustwire` command with `argv` (argv[0] is the program name); returns the exit
/// status. The GIL is released while it runs.
#[pyfunction]
fn cli_main(py: Python<'_>, argv: Vec<String>) -> u8 {
    py.allow_threads(move || trustwire::cli::status_with_args(argv))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    pool::watch_exit(m.py())?;
    errors::register(m)?;
    logging::install();
    m.add_class::<tls::PyTlsConfig>()?;
    m.add_class::<tls::PyEvent>()?;
    m.add_class::<rpc::PyServer>()?;
    m.add_class::<rpc::PyClient>()?;
    m.add_class::<rpc::PendingCall>()?;
    m.add_class::<rpc::PyCallContext>()?;
    m.add_class::<rpc::PyCallMetadata>()?;
    m.add_class::<rpc::PyPeerIdentity>()?;
    m.add_class::<PyDevCa>()?;
    m.add_function(wrap_pyfunction!(metrics_text, m)?)?;
    m.add_function(wrap_pyfunction!(cli_main, m)?)?;
    m.add_function(wrap_pyfunction!(verify_identity_token, m)?)?;
    m.add_class::<PyProxy>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
