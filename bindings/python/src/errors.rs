//! The one place where trustwire's `Error` becomes a Python exception.
//!
//! The base classes are defined in Python (so `RpcError(code, text)` can be raised by handlers
//! and `Timeout` can also be a `TimeoutError`); one `HandshakeError` subclass per verdict is
//! generated from `Verdict::ALL` (`MethodNotAllowed`, a call's refusal, is an `RpcError`), so a verdict added to the core appears here without an edit
//! (and `mypy.stubtest` then fails until the stub names it).

use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::{PyDict, PyModule, PyTuple, PyType};
use trustwire::error::codes;
use trustwire::{Error, Verdict};

const BASES: &std::ffi::CStr = cr#"
class TrustwireError(Exception):
    """Base class of every error trustwire raises."""


class HandshakeError(TrustwireError):
    """The TLS handshake failed, or policy refused the peer. `verdict` is the stable name from
    the failure catalogue; `side` is "local" (we refused the peer) or "remote" (the peer refused
    us); `alert` is the TLS alert, when there was one."""

    verdict = None
    code = None

    def __init__(self, message, side=None, alert=None):
        super().__init__(message)
        self.side = side
        self.alert = alert


class RpcError(TrustwireError):
    """The server answered with an error: brpc code and text. Raise it in a handler to answer
    with that error."""

    def __init__(self, code, text=""):
        super().__init__(code, text)
        self.code = int(code)
        self.text = str(text)

    def __str__(self):
        return f"error {self.code}: {self.text}"


class Timeout(TrustwireError, TimeoutError):
    """The call did not complete in time."""


class CredentialsError(TrustwireError):
    """Certificates, keys or trust material could not be used; `verdict` names why, when known."""

    def __init__(self, message, verdict=None):
        super().__init__(message)
        self.verdict = verdict


class ConfigError(TrustwireError):
    """A setting is invalid."""


class TransportError(TrustwireError):
    """The connection broke, could not be opened, carried invalid baidu_std, or was shut down."""


for _cls in (TrustwireError, HandshakeError, RpcError, Timeout, CredentialsError, ConfigError,
             TransportError):
    _cls.__module__ = "trustwire"
del _cls
"#;

pub struct Classes {
    pub base: Py<PyType>,
    pub handshake: Py<PyType>,
    pub rpc: Py<PyType>,
    pub timeout: Py<PyType>,
    pub credentials: Py<PyType>,
    pub config: Py<PyType>,
    pub transport: Py<PyType>,
    /// Indexed by `Verdict::code() - 1`.
    pub verdicts: Vec<(Verdict, Py<PyType>)>,
}

static CLASSES: GILOnceCell<Classes> = GILOnceCell::new();

/// `unknown_issuer` → `UnknownIssuer`.
pub fn class_name(v: Verdict) -> String {
    v.name()
        .split('_')
        .map(|part| {
            let mut c = part.chars();
            c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
        })
        .collect()
}

/// Defines the classes and adds them to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let defs = PyModule::from_code(py, BASES, c"trustwire/_errors.py", c"trustwire._errors")?;
    let get = |name: &str| -> PyResult<Py<PyType>> {
        let cls = defs.getattr(name)?.downcast_into::<PyType>()?;
        m.add(name, &cls)?;
        Ok(cls.unbind())
    };
    let base = get("TrustwireError")?;
    let handshake = get("HandshakeError")?;
    let rpc = get("RpcError")?;
    let timeout = get("Timeout")?;
    let credentials = get("CredentialsError")?;
    let config = get("ConfigError")?;
    let transport = get("TransportError")?;
    let type_ = py.import("builtins")?.getattr("type")?;
    let mut verdicts = Vec::new();
    for v in Verdict::ALL {
        let name = class_name(v);
        let attrs = PyDict::new(py);
        attrs.set_item("verdict", v.name())?;
        attrs.set_item("code", v.code())?;
        attrs.set_item("__module__", "trustwire")?;
        attrs.set_item(
            "__doc__",
            format!("Handshake or authorization failure `{}` (verdict {}).", v.name(), v.code()),
        )?;
        // A method refusal is the server's answer to a call (ERPCAUTH), not a handshake
        // failure: it is an RpcError that also names its verdict.
        let parent = if v == Verdict::MethodNotAllowed { rpc.bind(py) } else { handshake.bind(py) };
        let cls = type_.call1((name.as_str(), PyTuple::new(py, [parent])?, attrs))?;
        let cls = cls.downcast_into::<PyType>()?;
        m.add(name.as_str(), &cls)?;
        verdicts.push((v, cls.unbind()));
    }
    let names: Vec<(&str, u32, String)> = Verdict::ALL.iter().map(|v| (v.name(), v.code(), class_name(*v))).collect();
    m.add("VERDICTS", names)?;
    let _ = CLASSES.set(py, Classes { base, handshake, rpc, timeout, credentials, config, transport, verdicts });
    Ok(())
}

pub fn classes(py: Python<'_>) -> &Classes {
    CLASSES.get(py).expect("trustwire._native classes are registered at import")
}

fn instantiate<'py>(py: Python<'py>, cls: &Py<PyType>, args: impl pyo3::call::PyCallArgs<'py>) -> PyErr {
    match cls.bind(py).call1(args) {
        Ok(value) => PyErr::from_value(value),
        Err(e) => e,
    }
}

/// The Python exception for a core error.
pub fn to_pyerr(py: Python<'_>, err: Error) -> PyErr {
    let c = classes(py);
    let message = err.to_string();
    let verdict_class = |v: Verdict| c.verdicts.iter().find(|(x, _)| *x == v).map(|(_, cls)| cls);
    match &err {
        Error::Handshake { verdict, side, alert, .. } => {
            let cls = verdict_class(*verdict).unwrap_or(&c.handshake);
            instantiate(py, cls, (message, side.name(), *alert))
        }
        Error::Rpc { code, .. } if *code == codes::ERPCAUTH && err.verdict() == Some(Verdict::MethodNotAllowed) => {
            // Refused by a method rule or a call hook: the catalogue names it, so it is raised
            // by that name, an RpcError with the brpc code and text.
            let text = match &err {
                Error::Rpc { text, .. } => text.clone(),
                _ => message,
            };
            instantiate(py, verdict_class(Verdict::MethodNotAllowed).unwrap_or(&c.rpc), (*code, text))
        }
        Error::Rpc { code, text } => instantiate(py, &c.rpc, (*code, text.clone())),
        Error::Timeout { .. } => instantiate(py, &c.timeout, (message,)),
        Error::Credentials { verdict, .. } => instantiate(py, &c.credentials, (message, verdict.map(|v| v.name()))),
        Error::Config { .. } => instantiate(py, &c.config, (message,)),
        _ => instantiate(py, &c.transport, (message,)),
    }
}

/// A trustwire error without an `Error` value behind it (misuse of the Python API).
pub fn transport_error(py: Python<'_>, message: impl Into<String>) -> PyErr {
    instantiate(py, &classes(py).transport, (message.into(),))
}

pub fn config_error(py: Python<'_>, message: impl Into<String>) -> PyErr {
    instantiate(py, &classes(py).config, (message.into(),))
}

pub fn base_error(py: Python<'_>, message: impl Into<String>) -> PyErr {
    instantiate(py, &classes(py).base, (message.into(),))
}

/// Reads `(code, text)` from an `RpcError` a handler raised, or None for any other exception.
pub fn rpc_status(py: Python<'_>, err: &PyErr) -> Option<(i32, String)> {
    let value = err.value(py);
    if !value.is_instance(classes(py).rpc.bind(py)).ok()? {
        return None;
    }
    let code = value.getattr("code").ok()?.extract::<i32>().ok()?;
    let text = value.getattr("text").ok()?.extract::<String>().ok()?;
    Some((code, text))
}

/// Logs `err` with its traceback under the `trustwire` logger (as handlers' exceptions are);
/// where logging itself fails, Python's unraisable hook gets it.
pub fn log_exception(py: Python<'_>, err: PyErr, message: &str) {
    let logged = (|| -> PyResult<()> {
        let log = py.import("logging")?.call_method1("getLogger", ("trustwire",))?;
        let kwargs = PyDict::new(py);
        kwargs.set_item("exc_info", err.value(py))?;
        log.call_method("error", (message,), Some(&kwargs))?;
        Ok(())
    })();
    if let Err(e) = logged {
        e.write_unraisable(py, None);
    }
}
