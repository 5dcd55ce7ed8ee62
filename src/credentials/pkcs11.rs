//! Private keys held by a PKCS#11 token (an HSM, a smart card, SoftHSM): the key never leaves
//! the token, so nothing of it is read from or written to disk. The certificate chain still
//! comes from a file.
//!
//! A key is named by an RFC 7512 URI (`pkcs11:token=svc;object=echo-key`, or `id=%01%02`), the
//! module is the vendor's PKCS#11 library, and the PIN comes from a file or an environment
//! variable, read again at every load and never kept after login. Each load finds the token
//! and the key object anew, so a reload picks up a new key object (rotation), and a token that
//! is absent or refuses login is refused as `key_unavailable` while the last good generation
//! keeps serving.
//!
//! Signing goes through a small pool of sessions of the logged-in token, so handshakes running
//! at once do not queue on one session. A token that fails while signing fails that handshake
//! (`key_unavailable`, counted with the other handshake failures), never the process.

use std::collections::HashMap;
use std::fmt;
use std::os::raw::c_ulong;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use aws_lc_rs::digest;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use rustls::sign::{Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use rustls_pki_types::{alg_id, SubjectPublicKeyInfoDer};

use crate::error::{Error, Verdict};

/// Sessions a key opens at most for signing, unless the profile says otherwise.
pub const DEFAULT_SESSIONS: usize = 8;

/// How long a signature waits for a free session before the handshake fails.
const SESSION_WAIT: Duration = Duration::from_secs(5);

/// A key on a PKCS#11 token, as a profile names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pkcs11KeySpec {
    pub uri: Pkcs11Uri,
    /// The PKCS#11 module (shared library) that drives the token.
    pub module: PathBuf,
    pub pin: PinSource,
    /// Sessions opened at most for signing (handshakes signing at once).
    pub sessions: usize,
}

/// Where the token's user PIN comes from. Never the profile itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinSource {
    /// A file holding the PIN (one trailing newline is ignored).
    File(PathBuf),
    /// An environment variable holding the PIN.
    Env(String),
}

impl fmt::Display for PinSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PinSource::File(p) => write!(f, "PIN file {}", p.display()),
            PinSource::Env(v) => write!(f, "PIN from ${v}"),
        }
    }
}

/// An RFC 7512 PKCS#11 URI naming one private key. Only what selects a token and an object is
/// accepted; `pin-source`, `pin-value` and module attributes are refused (the PIN and the
/// module are set beside the URI, so a URI copied into logs gives nothing away).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pkcs11Uri {
    raw: String,
    pub token: Option<String>,
    pub manufacturer: Option<String>,
    pub model: Option<String>,
    pub serial: Option<String>,
    pub slot_id: Option<u64>,
    /// The key object's label (`CKA_LABEL`).
    pub object: Option<String>,
    /// The key object's `CKA_ID`.
    pub id: Option<Vec<u8>>,
}

impl fmt::Display for Pkcs11Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

/// Whether a key setting names a token object rather than a file.
pub fn is_pkcs11_uri(s: &str) -> bool {
    s.get(..7).is_some_and(|p| p.eq_ignore_ascii_case("pkcs11:"))
}

fn pct_decode(value: &str, attr: &str) -> Result<Vec<u8>, Error> {
    let bad = || Error::config(format!("PKCS#11 URI: {attr}: bad percent-encoding in '{value}'"));
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or_else(bad)?;
            let s = std::str::from_utf8(hex).map_err(|_| bad())?;
            out.push(u8::from_str_radix(s, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

impl Pkcs11Uri {
    /// Parses `pkcs11:attr=value;…[?query]`.
    pub fn parse(uri: &str) -> Result<Self, Error> {
        let err = |m: String| Error::config(format!("PKCS#11 URI '{uri}': {m}"));
        if !is_pkcs11_uri(uri) {
            return Err(err("does not start with \"pkcs11:\"".into()));
        }
        let rest = &uri[7..];
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        let mut out = Pkcs11Uri { raw: uri.to_string(), ..Default::default() };
        let text = |v: &str, a: &str| -> Result<String, Error> {
            String::from_utf8(pct_decode(v, a)?).map_err(|_| err(format!("{a} is not UTF-8")))
        };
        for part in path.split(';').filter(|p| !p.is_empty()) {
            let (attr, value) = part.split_once('=').ok_or_else(|| err(format!("'{part}' is not attr=value")))?;
            let attr_lc = attr.to_ascii_lowercase();
            let slot = match attr_lc.as_str() {
                "token" => &mut out.token,
                "manufacturer" => &mut out.manufacturer,
                "model" => &mut out.model,
                "serial" => &mut out.serial,
                "object" => &mut out.object,
                "id" => {
                    if out.id.is_some() {
                        return Err(err("id given twice".into()));
                    }
                    out.id = Some(pct_decode(value, "id")?);
                    continue;
                }
                "slot-id" => {
                    let n = value.parse().map_err(|_| err(format!("slot-id '{value}' is not a number")))?;
                    out.slot_id = Some(n);
                    continue;
                }
                "type" => {
                    if value != "private" {
                        return Err(err(format!(
                            "type={value}: the identity needs the private key (type=private, or leave it out)"
                        )));
                    }
                    continue;
                }
                // Library attributes only narrow which module answers; the module is set beside
                // the URI, so they are checked nowhere and accepted as information.
                "library-manufacturer"
                | "library-description"
                | "library-version"
                | "slot-manufacturer"
                | "slot-description" => continue,
                "pin-source" | "pin-value" => {
                    return Err(err(format!(
                        "{attr} is not accepted in the URI: give the PIN with pin_file or pin_env beside it"
                    )))
                }
                a if a.starts_with("x-") => continue,
                _ => return Err(err(format!("unknown attribute '{attr}'"))),
            };
            if slot.is_some() {
                return Err(err(format!("{attr} given twice")));
            }
            *slot = Some(text(value, attr)?);
        }
        // Nothing a query may say is accepted: the first query attribute is the error.
        if let Some(part) = query.unwrap_or_default().split('&').find(|p| !p.is_empty()) {
            let attr = part.split_once('=').map(|(a, _)| a).unwrap_or(part);
            return Err(err(match attr {
                "pin-source" | "pin-value" => {
                    format!("{attr} is not accepted in the URI: give the PIN with pin_file or pin_env beside it")
                }
                "module-name" | "module-path" => {
                    format!("{attr} is not accepted in the URI: give the module beside it ([identity.pkcs11] module)")
                }
                other => format!("query attribute '{other}' is not supported"),
            }));
        }
        if out.object.is_none() && out.id.is_none() {
            return Err(err("name the key with object=LABEL or id=%xx…".into()));
        }
        Ok(out)
    }

    /// `token 'svc', object 'echo-key'`, for messages.
    fn describe_object(&self) -> String {
        let mut parts = Vec::new();
        if let Some(o) = &self.object {
            parts.push(format!("object '{o}'"));
        }
        if let Some(id) = &self.id {
            parts.push(format!("id {}", hex::encode(id)));
        }
        parts.join(", ")
    }

    fn describe_token(&self) -> String {
        match (&self.token, self.slot_id) {
            (Some(t), _) => format!("token '{t}'"),
            (None, Some(s)) => format!("the token in slot {s}"),
            (None, None) => "the token".into(),
        }
    }
}

fn unavailable(message: String) -> Error {
    Error::credentials(Some(Verdict::KeyUnavailable), message)
}

/// Each module is loaded and initialised once per process (C_Initialize may be called only
/// once), and shared by every key and generation that uses it.
fn module(path: &Path) -> Result<Pkcs11, Error> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let canonical = std::fs::canonicalize(path)
        .map_err(|e| unavailable(format!("PKCS#11 module {} cannot be opened: {e}", path.display())))?;
    let mut modules = MODULES.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(m) = modules.get(&canonical) {
        return Ok(m.clone());
    }
    let ctx = Pkcs11::new(&canonical)
        .map_err(|e| unavailable(format!("PKCS#11 module {} cannot be loaded: {e}", path.display())))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        // Initialised already by other code in this process (another library using the token).
        Ok(()) | Err(P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(unavailable(format!("PKCS#11 module {} failed to initialise: {e}", path.display()))),
    }
    modules.insert(canonical, ctx.clone());
    Ok(ctx)
}

fn read_pin(source: &PinSource) -> Result<AuthPin, Error> {
    // Trimmed in place and moved into the secret, which wipes it when dropped: no copy is left.
    let pin = match source {
        PinSource::File(p) => {
            let mut text = std::fs::read_to_string(p)
                .map_err(|e| unavailable(format!("cannot read the PIN file {}: {e}", p.display())))?;
            if text.ends_with('\n') {
                text.pop();
            }
            if text.ends_with('\r') {
                text.pop();
            }
            text
        }
        PinSource::Env(v) => {
            std::env::var(v).map_err(|_| unavailable(format!("the PIN variable ${v} is not set (or not UTF-8)")))?
        }
    };
    if pin.is_empty() {
        return Err(unavailable(format!("the {source} is empty")));
    }
    Ok(AuthPin::from(pin))
}

/// The curve of an EC key, from its DER `CKA_EC_PARAMS` (a named-curve OID).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Curve {
    P256,
    P384,
}

const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

impl Curve {
    fn field_len(self) -> usize {
        match self {
            Curve::P256 => 32,
            Curve::P384 => 48,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Ec(Curve),
    Rsa,
}

/// A DER TLV with a definite length.
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let len = n.to_be_bytes();
        let skip = len.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (len.len() - skip) as u8);
        out.extend_from_slice(&len[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// A DER INTEGER from unsigned big-endian bytes (minimal, with a zero byte when the top bit is set).
fn der_uint(bytes: &[u8]) -> Vec<u8> {
    let trimmed = &bytes[bytes.iter().take_while(|b| **b == 0).count().min(bytes.len().saturating_sub(1))..];
    let mut v = Vec::with_capacity(trimmed.len() + 1);
    if trimmed.first().is_none_or(|b| b & 0x80 != 0) {
        v.push(0);
    }
    v.extend_from_slice(trimmed);
    der(0x02, &v)
}

/// The uncompressed point inside `CKA_EC_POINT`: the standard says a DER OCTET STRING, some
/// modules return the bare point.
fn ec_point(value: &[u8], curve: Curve) -> Option<Vec<u8>> {
    let want = 1 + 2 * curve.field_len();
    if value.len() == want && value[0] == 0x04 {
        return Some(value.to_vec());
    }
    let (&tag, rest) = value.split_first()?;
    let (&len, point) = rest.split_first()?;
    (tag == 0x04 && len as usize == want && point.len() == want && point[0] == 0x04).then(|| point.to_vec())
}

/// ECDSA signatures from PKCS#11 are r‖s; TLS wants DER `SEQUENCE { INTEGER r, INTEGER s }`.
fn ecdsa_der(raw: &[u8], curve: Curve) -> Option<Vec<u8>> {
    if raw.len() != 2 * curve.field_len() {
        return None;
    }
    let (r, s) = raw.split_at(curve.field_len());
    let mut seq = der_uint(r);
    seq.extend(der_uint(s));
    Some(der(0x30, &seq))
}

/// Sessions of one logged-in token, opened on demand up to a bound.
struct Pool {
    ctx: Pkcs11,
    slot: Slot,
    max: usize,
    state: Mutex<PoolState>,
    freed: Condvar,
}

struct PoolState {
    idle: Vec<Session>,
    open: usize,
}

/// Signing failures that may mean a token went away, since the process started.
static FAILURES: AtomicU64 = AtomicU64::new(0);

/// Changes whenever a token key failed in a way that may have lost its session or object
/// handles; part of the material digest of token identities, so a reload finds the key again.
pub(crate) fn failure_epoch() -> u64 {
    FAILURES.load(Ordering::Relaxed)
}

/// Errors after which a session is not given back to the pool.
fn session_broken(e: &P11Error) -> bool {
    !matches!(e, P11Error::Pkcs11(RvError::DataLenRange | RvError::DataInvalid | RvError::MechanismInvalid, _))
}

impl Pool {
    fn with_session<T>(&self, f: impl FnOnce(&Session) -> Result<T, P11Error>) -> Result<T, String> {
        let deadline = Instant::now() + SESSION_WAIT;
        let idle = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(s) = state.idle.pop() {
                    break Some(s);
                }
                if state.open < self.max {
                    state.open += 1;
                    break None;
                }
                let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                    return Err(format!("all {} sessions stayed busy for {}s", self.max, SESSION_WAIT.as_secs()));
                };
                state = self.freed.wait_timeout(state, left).unwrap_or_else(|p| p.into_inner()).0;
            }
        };
        let session = match idle {
            Some(s) => s,
            None => match self.ctx.open_ro_session(self.slot) {
                Ok(s) => s,
                Err(e) => {
                    self.release(None);
                    return Err(format!("cannot open a session: {e}"));
                }
            },
        };
        let result = f(&session);
        match &result {
            Err(e) if session_broken(e) => {
                drop(session);
                self.release(None);
                // The token may have gone (and may come back): the next reload or poll opens
                // it again even though the files did not change.
                FAILURES.fetch_add(1, Ordering::Relaxed);
            }
            _ => self.release(Some(session)),
        }
        result.map_err(|e| e.to_string())
    }

    fn release(&self, session: Option<Session>) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match session {
            Some(s) => state.idle.push(s),
            None => state.open = state.open.saturating_sub(1),
        }
        drop(state);
        self.freed.notify_one();
    }
}

/// A private key on a token, usable by rustls. Cheap to share; signing borrows a session of the
/// pool for the duration of one signature.
pub struct TokenKey {
    inner: Arc<TokenKeyInner>,
}

struct TokenKeyInner {
    pool: Pool,
    key: ObjectHandle,
    kind: Kind,
    spki: SubjectPublicKeyInfoDer<'static>,
    /// `token 'svc', object 'echo-key' (module …)`, for messages.
    name: String,
    /// Keeps the token logged in for as long as the key is in use: login state belongs to the
    /// application and ends when its last session closes.
    _login: Mutex<Session>,
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenKey").field("key", &self.inner.name).field("kind", &self.inner.kind).finish()
    }
}

impl TokenKey {
    /// Finds the token and the key object, logs in with the PIN (read now), and reads the key's
    /// public half. Every failure names the module, token or object, and is `key_unavailable`.
    ///
    /// `certificate_key` is the certificate's SubjectPublicKeyInfo: when the URI names several
    /// private keys (a new key generated under the same label, for a rotation), the one this
    /// certificate certifies is chosen, so the new certificate and the new key go live
    /// together. Without it, the URI must name exactly one key.
    pub fn open(spec: &Pkcs11KeySpec, certificate_key: Option<&[u8]>) -> Result<Self, Error> {
        let uri = &spec.uri;
        let module_name = spec.module.display().to_string();
        let ctx = module(&spec.module)?;
        let slot = find_slot(&ctx, uri, &module_name)?;
        let token = uri.describe_token();
        let session = ctx
            .open_ro_session(slot)
            .map_err(|e| unavailable(format!("{token} (module {module_name}): cannot open a session: {e}")))?;
        let pin = read_pin(&spec.pin)?;
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(P11Error::Pkcs11(RvError::PinIncorrect, _)) => {
                return Err(unavailable(format!(
                    "{token} (module {module_name}) refused login: wrong PIN ({})",
                    spec.pin
                )))
            }
            Err(P11Error::Pkcs11(RvError::PinLocked, _)) => {
                return Err(unavailable(format!("{token} (module {module_name}) refused login: the PIN is locked")))
            }
            Err(e) => return Err(unavailable(format!("{token} (module {module_name}) refused login: {e}"))),
        }
        drop(pin);
        let object = uri.describe_object();
        let name = format!("{token}, {object} (module {module_name})");
        let mut template = vec![Attribute::Class(ObjectClass::PRIVATE_KEY)];
        if let Some(label) = &uri.object {
            template.push(Attribute::Label(label.as_bytes().to_vec()));
        }
        if let Some(id) = &uri.id {
            template.push(Attribute::Id(id.clone()));
        }
        let found =
            session.find_objects(&template).map_err(|e| unavailable(format!("{name}: cannot search objects: {e}")))?;
        if found.is_empty() {
            return Err(unavailable(format!("no private key {object} on {token} (module {module_name})")));
        }
        let mut candidates = Vec::new();
        for key in &found {
            candidates.push((*key, public_half(&session, *key, &name)?));
        }
        let chosen = match certificate_key {
            Some(want) => candidates.iter().position(|(_, (_, spki))| spki.as_ref() == want),
            None if candidates.len() == 1 => Some(0),
            None => {
                return Err(unavailable(format!(
                    "{} private keys match {object} on {token}: name one with both object= and id=",
                    candidates.len()
                )))
            }
        };
        let Some(chosen) = chosen else {
            return Err(Error::credentials(
                Some(Verdict::KeyMismatch),
                format!(
                    "the certificate's public key is not that of the private key {object} on {token} ({} \
                     key(s) match the URI; key and certificate from different issuances?)",
                    candidates.len()
                ),
            ));
        };
        let (key, (kind, spki)) = candidates.swap_remove(chosen);
        let pool = Pool {
            ctx,
            slot,
            max: spec.sessions.max(1),
            state: Mutex::new(PoolState { idle: Vec::new(), open: 0 }),
            freed: Condvar::new(),
        };
        let inner = TokenKeyInner { pool, key, kind, spki, name, _login: Mutex::new(session) };
        Ok(TokenKey { inner: Arc::new(inner) })
    }

    /// The key's public half, DER SubjectPublicKeyInfo (for issuing its certificate).
    pub fn public_key_der(&self) -> &[u8] {
        self.inner.spki.as_ref()
    }

    /// The key as rustls uses it.
    pub fn into_signing_key(self) -> Arc<dyn SigningKey> {
        Arc::new(self)
    }
}

fn find_slot(ctx: &Pkcs11, uri: &Pkcs11Uri, module_name: &str) -> Result<Slot, Error> {
    let slots = ctx
        .get_slots_with_token()
        .map_err(|e| unavailable(format!("PKCS#11 module {module_name}: cannot list slots: {e}")))?;
    let mut matched = Vec::new();
    let mut seen = Vec::new();
    for slot in slots {
        let Ok(info) = ctx.get_token_info(slot) else { continue };
        if !info.label().trim().is_empty() {
            seen.push(format!("'{}'", info.label().trim_end()));
        }
        let ok = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have.trim_end());
        if ok(&uri.token, info.label())
            && ok(&uri.manufacturer, info.manufacturer_id())
            && ok(&uri.model, info.model())
            && ok(&uri.serial, info.serial_number())
            && uri.slot_id.is_none_or(|id| id == slot.id())
        {
            matched.push(slot);
        }
    }
    match matched.as_slice() {
        [one] => Ok(*one),
        [] => Err(unavailable(format!(
            "{} is not present in PKCS#11 module {module_name} (tokens present: {})",
            uri.describe_token(),
            if seen.is_empty() { "none".to_string() } else { seen.join(", ") }
        ))),
        more => Err(unavailable(format!(
            "{} tokens in module {module_name} match {}: add serial= or slot-id= to the URI",
            more.len(),
            uri.describe_token()
        ))),
    }
}

/// The key type and the SubjectPublicKeyInfo of the key's public half: `CKA_MODULUS` and
/// `CKA_PUBLIC_EXPONENT` of an RSA key, `CKA_EC_POINT` of the EC public key object that pairs
/// with the private key (same `CKA_ID`, else same label).
fn public_half(
    session: &Session,
    key: ObjectHandle,
    name: &str,
) -> Result<(Kind, SubjectPublicKeyInfoDer<'static>), Error> {
    let attr_err = |e: P11Error| unavailable(format!("{name}: cannot read the key's attributes: {e}"));
    let attrs = session
        .get_attributes(key, &[AttributeType::KeyType, AttributeType::Id, AttributeType::Label])
        .map_err(attr_err)?;
    let mut key_type = None;
    let (mut id, mut label) = (Vec::new(), Vec::new());
    for a in attrs {
        match a {
            Attribute::KeyType(t) => key_type = Some(t),
            Attribute::Id(v) => id = v,
            Attribute::Label(v) => label = v,
            _ => {}
        }
    }
    let unsupported = |what: String| {
        Error::credentials(
            Some(Verdict::UnsupportedCertificate),
            format!("{name}: {what}; use ECDSA P-256/P-384 or RSA"),
        )
    };
    match key_type {
        Some(KeyType::RSA) => {
            let attrs = session
                .get_attributes(key, &[AttributeType::Modulus, AttributeType::PublicExponent])
                .map_err(attr_err)?;
            let (mut n, mut e) = (None, None);
            for a in attrs {
                match a {
                    Attribute::Modulus(v) => n = Some(v),
                    Attribute::PublicExponent(v) => e = Some(v),
                    _ => {}
                }
            }
            let (Some(n), Some(e)) = (n, e) else {
                return Err(unavailable(format!("{name}: the RSA key does not show its modulus and exponent")));
            };
            let mut seq = der_uint(&n);
            seq.extend(der_uint(&e));
            Ok((Kind::Rsa, rustls::sign::public_key_to_spki(&alg_id::RSA_ENCRYPTION, der(0x30, &seq))))
        }
        Some(KeyType::EC) => {
            let params = session.get_attributes(key, &[AttributeType::EcParams]).map_err(attr_err)?;
            let params = params.into_iter().find_map(|a| match a {
                Attribute::EcParams(v) => Some(v),
                _ => None,
            });
            let curve = match params.as_deref() {
                Some(OID_P256) => Curve::P256,
                Some(OID_P384) => Curve::P384,
                Some(other) => return Err(unsupported(format!("EC key on curve {}", hex::encode(other)))),
                None => return Err(unavailable(format!("{name}: the EC key does not show its curve"))),
            };
            let mut template = vec![Attribute::Class(ObjectClass::PUBLIC_KEY), Attribute::KeyType(KeyType::EC)];
            if !id.is_empty() {
                template.push(Attribute::Id(id));
            } else {
                template.push(Attribute::Label(label));
            }
            let public = session.find_objects(&template).map_err(attr_err)?;
            let Some(&public) = public.first() else {
                return Err(unavailable(format!(
                    "{name}: no EC public key object with the same id/label on the token, so the key cannot be \
                     checked against the certificate (import or keep the public key beside the private key)"
                )));
            };
            let point = session.get_attributes(public, &[AttributeType::EcPoint]).map_err(attr_err)?;
            let point = point
                .into_iter()
                .find_map(|a| match a {
                    Attribute::EcPoint(v) => ec_point(&v, curve),
                    _ => None,
                })
                .ok_or_else(|| {
                    unavailable(format!("{name}: the public key's CKA_EC_POINT is not a point on its curve"))
                })?;
            let alg = match curve {
                Curve::P256 => alg_id::ECDSA_P256,
                Curve::P384 => alg_id::ECDSA_P384,
            };
            Ok((Kind::Ec(curve), rustls::sign::public_key_to_spki(&alg, point)))
        }
        Some(other) => Err(unsupported(format!("key type {other}"))),
        None => Err(unavailable(format!("{name}: the key does not show its type"))),
    }
}

impl SigningKey for TokenKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let ours: &[SignatureScheme] = match self.inner.kind {
            Kind::Ec(Curve::P256) => &[SignatureScheme::ECDSA_NISTP256_SHA256],
            Kind::Ec(Curve::P384) => &[SignatureScheme::ECDSA_NISTP384_SHA384],
            Kind::Rsa => {
                &[SignatureScheme::RSA_PSS_SHA512, SignatureScheme::RSA_PSS_SHA384, SignatureScheme::RSA_PSS_SHA256]
            }
        };
        let scheme = ours.iter().copied().find(|s| offered.contains(s))?;
        Some(Box::new(TokenSigner { key: self.inner.clone(), scheme }))
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(self.inner.spki.clone())
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        match self.inner.kind {
            Kind::Ec(_) => SignatureAlgorithm::ECDSA,
            Kind::Rsa => SignatureAlgorithm::RSA,
        }
    }
}

struct TokenSigner {
    key: Arc<TokenKeyInner>,
    scheme: SignatureScheme,
}

impl fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSigner").field("key", &self.key.name).field("scheme", &self.scheme).finish()
    }
}

impl TokenSigner {
    fn sign_on_token(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        let (alg, hash_mech, mgf) = match self.scheme {
            SignatureScheme::ECDSA_NISTP256_SHA256 | SignatureScheme::RSA_PSS_SHA256 => {
                (&digest::SHA256, MechanismType::SHA256, PkcsMgfType::MGF1_SHA256)
            }
            SignatureScheme::ECDSA_NISTP384_SHA384 | SignatureScheme::RSA_PSS_SHA384 => {
                (&digest::SHA384, MechanismType::SHA384, PkcsMgfType::MGF1_SHA384)
            }
            SignatureScheme::RSA_PSS_SHA512 => (&digest::SHA512, MechanismType::SHA512, PkcsMgfType::MGF1_SHA512),
            other => return Err(format!("scheme {other:?} is not supported")),
        };
        let hash = digest::digest(alg, message);
        let mechanism = match self.key.kind {
            Kind::Ec(_) => Mechanism::Ecdsa,
            Kind::Rsa => Mechanism::RsaPkcsPss(PkcsPssParams {
                hash_alg: hash_mech,
                mgf,
                s_len: (hash.as_ref().len() as c_ulong).into(),
            }),
        };
        let raw = self.key.pool.with_session(|s| s.sign(&mechanism, self.key.key, hash.as_ref()))?;
        match self.key.kind {
            Kind::Ec(curve) => {
                ecdsa_der(&raw, curve).ok_or_else(|| format!("the token returned a {}-byte ECDSA signature", raw.len()))
            }
            Kind::Rsa => Ok(raw),
        }
    }
}

impl Signer for TokenSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.sign_on_token(message).map_err(|why| {
            let message = format!("signing with {} failed: {why}", self.key.name);
            tracing::warn!("{message}");
            crate::tls::verify::record(Verdict::KeyUnavailable, message.clone());
            rustls::Error::General(message)
        })
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_selects_token_and_object() {
        let u = Pkcs11Uri::parse("pkcs11:token=svc;object=echo-key").unwrap();
        assert_eq!(u.token.as_deref(), Some("svc"));
        assert_eq!(u.object.as_deref(), Some("echo-key"));
        let u = Pkcs11Uri::parse("pkcs11:token=My%20Token;id=%01%a0;type=private").unwrap();
        assert_eq!(u.token.as_deref(), Some("My Token"));
        assert_eq!(u.id.as_deref(), Some(&[0x01, 0xa0][..]));
        assert_eq!(u.to_string(), "pkcs11:token=My%20Token;id=%01%a0;type=private");
    }

    #[test]
    fn uri_refuses_pins_modules_and_unknowns() {
        for (uri, says) in [
            ("pkcs11:token=a;object=k?pin-source=file:/p", "pin-source is not accepted"),
            ("pkcs11:token=a;object=k?pin-value=1234", "pin-value is not accepted"),
            ("pkcs11:token=a;object=k;pin-value=1234", "pin-value is not accepted"),
            ("pkcs11:token=a;object=k?module-path=/x.so", "module-path is not accepted"),
            ("pkcs11:token=a;colour=k", "unknown attribute 'colour'"),
            ("pkcs11:token=a", "name the key"),
            ("pkcs11:token=a;object=k;type=public", "type=public"),
            ("pkcs11:token=a;id=%zz", "bad percent-encoding"),
            ("/etc/key.pem", "does not start"),
        ] {
            let e = Pkcs11Uri::parse(uri).unwrap_err().to_string();
            assert!(e.contains(says), "{uri}: {e}");
        }
    }

    #[test]
    fn raw_ecdsa_signatures_become_der() {
        let mut raw = vec![0u8; 64];
        raw[0] = 0x80; // r needs a leading zero
        raw[32] = 0x00;
        raw[33] = 0x01; // s has a leading zero to drop
        let der_sig = ecdsa_der(&raw, Curve::P256).unwrap();
        assert_eq!(&der_sig[..2], &[0x30, der_sig.len() as u8 - 2]);
        assert_eq!(&der_sig[2..5], &[0x02, 33, 0x00]);
        let s_at = 2 + 2 + 33;
        assert_eq!(&der_sig[s_at..s_at + 3], &[0x02, 31, 0x01]);
        assert!(ecdsa_der(&raw[..63], Curve::P256).is_none());
        // The P-384 form of a signature long enough to need a long length is still definite.
        let raw = vec![0xffu8; 96];
        let d = ecdsa_der(&raw, Curve::P384).unwrap();
        assert_eq!(d[0], 0x30);
        assert_eq!(d[1] as usize, d.len() - 2);
    }

    #[test]
    fn ec_points_bare_or_wrapped() {
        let mut point = vec![0x04];
        point.extend([7u8; 64]);
        assert_eq!(ec_point(&point, Curve::P256).as_deref(), Some(&point[..]));
        let wrapped = der(0x04, &point);
        assert_eq!(ec_point(&wrapped, Curve::P256).as_deref(), Some(&point[..]));
        assert!(ec_point(&wrapped, Curve::P384).is_none());
    }
}
