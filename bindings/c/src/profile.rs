//! Profiles: identity, trust, policy and TLS settings, loaded from the TOML profile format or
//! built with setters, served by a rotating credential store.

use std::ffi::{c_char, c_void, CString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::ThreadId;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tw::credentials::{CredentialStore, Event, IdentitySource, PemSource, Sources, StoreOptions, Use, WorkloadApiSpec};
use tw::tls::{ClientTls, MinVersion, ServerTls, TlsProfile, TrustBundle};
use tw::{Error, Policy, Verdict};

use crate::ffi::{
    self, arg, bytes_arg, guard, guard_value, opt_str_arg, out, out_box, str_arg, str_array_arg, Failure, UserData,
};
use crate::hooks::{tw_call_hook_fn, tw_connection_hook_fn, tw_free_fn, CHook};
use crate::tw_result;

/// Settings for a profile, set one by one and turned into a `tw_profile` by
/// `tw_profile_builder_build` (which consumes the builder). A builder is used by one thread at
/// a time.
pub struct tw_profile_builder {
    sources: Sources,
    template: TlsProfile,
    options: StoreOptions,
}

/// Certificates, trust, policy and TLS settings in service, reloadable without a restart
/// (a credential store). Servers and clients made from a profile keep using it after
/// `tw_profile_free`; every new handshake uses the generation in service at that moment. All
/// functions may be called from any thread.
pub struct tw_profile {
    pub(crate) store: CredentialStore,
    role: Use,
    events: Arc<Events>,
}

impl tw_profile {
    pub(crate) fn server_tls(&self) -> Result<ServerTls, Failure> {
        self.store.server_tls().map_err(|_| {
            Failure::new(
                tw_result::TW_INVALID_CONFIG,
                "this profile cannot serve: its certificate is client-only, or it has no identity",
            )
        })
    }

    pub(crate) fn client_tls(&self) -> Result<ClientTls, Failure> {
        self.store.client_tls().map_err(|_| {
            Failure::new(
                tw_result::TW_INVALID_CONFIG,
                "this profile cannot be used by a client: its certificate is server-only",
            )
        })
    }
}

/// What happened to a profile's credentials.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum tw_event_kind {
    /// A new generation is in service.
    TW_EVENT_RELOADED = 1,
    /// New material was refused; the previous generation stays in service.
    TW_EVENT_REJECTED = 2,
    /// Our certificate expires soon.
    TW_EVENT_EXPIRING = 3,
    /// An established connection was closed because new trust material refuses its peer.
    TW_EVENT_CONNECTION_CLOSED = 4,
    /// Our private key's file can be read by users other than its owner; `message` names the
    /// file and its mode.
    TW_EVENT_INSECURE_KEY_FILE = 5,
}

/// One credential event, borrowed by the callback: the struct and its strings are valid only
/// until the callback returns.
#[repr(C)]
pub struct tw_event {
    pub kind: tw_event_kind,
    /// The generation in service (RELOADED, EXPIRING); 0 otherwise.
    pub generation: u64,
    /// Why (REJECTED, CONNECTION_CLOSED): a catalogue verdict, or TW_CREDENTIALS when none
    /// applies; TW_OK for the other kinds.
    pub verdict: tw_result,
    /// A description; "" when there is nothing to add. Never NULL.
    pub message: *const c_char,
    /// Our certificate's not-after, Unix seconds (RELOADED, EXPIRING); 0 when unknown.
    pub not_after: i64,
    /// Seconds until `not_after` (EXPIRING); 0 otherwise.
    pub seconds_left: i64,
    /// The refused peer (CONNECTION_CLOSED); "" otherwise. Never NULL.
    pub peer: *const c_char,
}

/// Called for each credential event, in order, on a thread trustwire runs for this profile's
/// events (never a runtime thread, so it may block briefly and may call trustwire, including
/// `tw_profile_reload`). `event` and its strings are valid until it returns.
pub type tw_event_fn = Option<unsafe extern "C" fn(user_data: *mut c_void, event: *const tw_event)>;

type Subscriber = (unsafe extern "C" fn(*mut c_void, *const tw_event), UserData);

struct Events {
    subscribers: Mutex<Vec<Subscriber>>,
    closed: AtomicBool,
    thread: Mutex<Option<ThreadId>>,
}

fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

fn deliver(events: &Events, event: &Event) {
    let mut ev = tw_event {
        kind: tw_event_kind::TW_EVENT_RELOADED,
        generation: 0,
        verdict: tw_result::TW_OK,
        message: std::ptr::null(),
        not_after: 0,
        seconds_left: 0,
        peer: std::ptr::null(),
    };
    let (message, peer) = match event {
        Event::Reloaded { generation, not_after, .. } => {
            ev.generation = *generation;
            ev.not_after = not_after.map(unix).unwrap_or(0);
            (String::new(), String::new())
        }
        Event::Rejected { verdict, message, .. } => {
            ev.kind = tw_event_kind::TW_EVENT_REJECTED;
            ev.verdict = verdict.map(ffi::verdict_result).unwrap_or(tw_result::TW_CREDENTIALS);
            (message.clone(), String::new())
        }
        Event::Expiring { generation, not_after, seconds_left, .. } => {
            ev.kind = tw_event_kind::TW_EVENT_EXPIRING;
            ev.generation = *generation;
            ev.not_after = unix(*not_after);
            ev.seconds_left = *seconds_left;
            (String::new(), String::new())
        }
        Event::ConnectionClosed { peer, verdict, message, .. } => {
            ev.kind = tw_event_kind::TW_EVENT_CONNECTION_CLOSED;
            ev.verdict = ffi::verdict_result(*verdict);
            (message.clone(), peer.clone())
        }
        Event::InsecureKeyFile { path, mode, .. } => {
            ev.kind = tw_event_kind::TW_EVENT_INSECURE_KEY_FILE;
            (format!("{} is readable by other users (mode {mode:03o})", path.display()), String::new())
        }
        // Kinds this library does not know yet are not delivered.
        _ => return,
    };
    let message = ffi::owned_cstring(message);
    let peer = ffi::owned_cstring(peer);
    ev.message = message.as_ptr();
    ev.peer = peer.as_ptr();
    // Held while calling back, so tw_profile_free (which takes it) returns only once no
    // callback is running and none will run again.
    let subscribers = events.subscribers.lock().unwrap_or_else(|p| p.into_inner());
    for (f, user_data) in subscribers.iter() {
        if events.closed.load(Ordering::Acquire) {
            break;
        }
        unsafe { f(user_data.0, &ev) };
    }
}

impl Events {
    fn start(store: &CredentialStore) -> Arc<Events> {
        let events = Arc::new(Events {
            subscribers: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
            thread: Mutex::new(None),
        });
        let (tx, rx) = mpsc::channel::<Event>();
        let tx = Mutex::new(tx);
        store.subscribe(move |event| {
            let _ = tx.lock().unwrap_or_else(|p| p.into_inner()).send(event.clone());
        });
        let ev = events.clone();
        let spawned = std::thread::Builder::new().name("trustwire-events".into()).spawn(move || {
            *ev.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::thread::current().id());
            while let Ok(event) = rx.recv() {
                if ev.closed.load(Ordering::Acquire) {
                    break;
                }
                deliver(&ev, &event);
            }
        });
        if spawned.is_err() {
            // Without a thread there is nobody to call back; subscribing still succeeds and
            // events are only logged.
            events.closed.store(true, Ordering::Release);
        }
        events
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let on_event_thread =
            *self.thread.lock().unwrap_or_else(|p| p.into_inner()) == Some(std::thread::current().id());
        if !on_event_thread {
            self.subscribers.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
    }
}

/// Creates an empty builder: no identity, no trust, an empty allow-list (any peer the trust
/// verifies), TLS 1.3 only, a 10 s handshake timeout, file watching on. On TW_OK
/// `*builder_out` is owned by the caller: pass it to `tw_profile_builder_build` or
/// `tw_profile_builder_free`.
#[no_mangle]
pub unsafe extern "C" fn tw_profile_builder_new(builder_out: *mut *mut tw_profile_builder) -> tw_result {
    guard(|| {
        let b = tw_profile_builder {
            sources: Sources::default(),
            template: TlsProfile::new(None, TrustBundle::default()),
            options: StoreOptions { name: "c".into(), ..StoreOptions::default() },
        };
        unsafe { out_box(builder_out, b) }
    })
}

/// Frees a builder that was not built. NULL does nothing.
#[no_mangle]
pub unsafe extern "C" fn tw_profile_builder_free(builder: *mut tw_profile_builder) {
    unsafe { ffi::free_box(builder) }
}

unsafe fn builder_mut<'a>(b: *mut tw_profile_builder) -> Result<&'a mut tw_profile_builder, Failure> {
    unsafe { b.as_mut() }.ok_or_else(|| Failure::null("builder"))
}

/// Our certificate chain (leaf first) and private key from PEM bytes, copied. Replaces any
/// identity set before.
#[no_mangle]
pub unsafe extern "C" fn tw_profile_builder_set_identity_pem(
    builder: *mut tw_profile_builder,
    chain_pem: *const u8,
    chain_len: usize,
    key_pem: *const u8,
    key_len: usize,
) -> tw_result {
    guard(|| {
        let b = unsafe { builder_mut(builder) }?;
        let chain = unsafe { bytes_arg(chain_pem, chain_len, "chain_pem") }?.to_vec();
        let key = unsafe { bytes_arg(key_pem, key_len, "key_pem") }?.to_vec();
        b.sources.identity = IdentitySource::Pem { chain, key };
        b.sources.workload_api = None;
        Ok(())
    })
}

/// Our certificate chain and key from files, re-read on every reload (and on change, when
/// watching). Replaces any identity set before.
#[no_mangle]
pub unsafe extern "C" fn tw_profile_builder_set_identity_files(
    builder: *mut tw_profile_builder,
    chain_path: *const c_char,
    key_path: *const c_char,
) -> tw_result {
    guard(|| {
        let b = unsafe { builder_mut(builder) }?;
        let chain = PathBuf::from(unsafe { str_arg(chain_path, "chain_path") }?);
        let key = PathBuf::from(unsafe { str_arg(key_path, "key_path") }?);
        b.sources.identity = IdentitySource::Files { chain, key };
        b.sources.workload_api = None;
        Ok(())
    })
}

/// Our SVID and key, our trust domain's bundle, the federated bundles and the CRLs from the
/// SPIFFE Workload API at `address` (a SPIRE agent): "unix:///run/spire/sockets/agent.sock",
/// "tcp://IP:PORT", or "env" for the SPIFFE_ENDPOINT_SOCKET environment variable. Every response
/// the agent pushes becomes a new generation, checked like any other; while the agent is away
/// the last good one stays in service. `svid_spiffe_id` or `svid_hint` (either or both NULL)
/// choose our SVID when the agent returns several (default: the first). Replaces any identity
/// set before; trust added with the other setters is kept as well. `tw_profile_builder_build`
/// then waits up to 30 s for the first SVID and fails (TW_TIMEOUT, TW_TRANSPORT) without one.
#[no_mangle]
pub unsafe extern "C" fn tw_profile_builder_set_workload_api(
    builder: *mut tw_profile_builder,
    address: *const c_char,
    svid_spiffe_id: *const c_char,
    svid_hint: *const c_char,
) -> tw_result {
    guard(|| {
        let b = unsafe { builder_mut(builder) }?;
        let address = unsafe { str_arg(address, "address") }?;
        let optional = |p: *const c_char, what| match p.is_null() {
            true => Ok(None),
            false => unsafe { str_arg(p, what) }.map(Some),
        };
        let (id, hint) = (optional(svid_spiffe_id, "svid_spiffe_id")?, optional(svid_hint, "svid_hint")?);
        let spec = WorkloadApiSpec::from_parts(address, id, hint, ["address", "svid_spiffe_id", "svid_hint"])
            .map_err(|e| Failure::new(tw_result::TW_INVALID_ARGUMENT, e.to_string()))?;
        b.sources.identity = IdentitySource::None;
        b.sources.workload_api = Some(spec);
        Ok(())
    })
}

/// Our certificate chain from a file, and a private key that stays on a PKCS#11 token:
/// `key_uri` is an RFC 7512 URI (`pkcs11:token=svc;object=echo-key`, or `id=%01`),
/// `module_path` the token's PKCS#11 library (e.g. libsofthsm2.so). The user PIN is read from
/// the environment variable `pin_env` or the file `pin_file` (exactly one non-NULL) at every
/// load, never kept. The URI is checked here; the token is opened by `tw_profile_builder_build`
/// (`TW_KEY_UNAVAILABLE` when it is absent, refuses login or lacks the key). Replaces any
/// identity set before. Strings are copied. Any thread.
#[no_mangle]
pub unsafe extern "C" fn tw_profile_builder_set_identity_pkcs11(
    builder: *mut tw_profile_builder,
    chain_path: *const c_char,
    key_uri: *const c_char,
    module_path: *const c_char,
    pin_env: *const c_char,
    pin_file: *const c_char,
) -> tw_result {
    guard(|| {
        let b = unsafe { builder_mut(builder) }?;
        let chain = PathBuf::from(unsafe { str_arg(chain_path, "chain_path") }?);
        let uri = unsafe { str_arg(key_uri, "key_uri") }?;
        let module = PathBuf::from(unsafe { str_arg(module_path, "module_path") }?);
        let section = tw::profile::Pkcs11Section {
            module,
            pin_env: unsafe { opt_str_arg(pin_env, "pin_env") }?.map(str::to_string),
            pin_file: unsafe { opt_str_arg(pin_file, "pin_file") }?.map(PathBuf::from),
            sessions: None,
        };
        let key = section.key_spec(uri, Path::to_path_buf)?;
        b.sources.identity = IdentitySource::Pkcs11 { chain, key: Box::new(key) };
        Ok(())
    })
}

/// Adds trusted CA certificates from PEM bytes (copied).
#[no_mangle]
pub unsafe extern "C" fn tw_profile_builder_add_trust_pem(
    builder: *mut tw_profile_builder,
    pem: *const u8,
    len: usize,
) -> tw_result {
    guard(|| {
        let b = unsafe { builder_mut(builder) }?;
        b.sources.trust.push(PemSource::Pem(unsafe { bytes_arg(pem, len, "pem") }?.to_vec()));
        Ok(())
    })
}

/// Adds trusted CA certificates from a file, or from every `.pem`/`.crt`/`.cer` file of a
/// directory; re-read on reload.
#[no_mangle]
pub unsafe extern "C" fn tw_profile_builder_add_trust_path(
    builder: *mut tw_profile_builder,
    path: *const c_char,
) -> tw_result {
    guard(|| {
        let b = unsafe { builder_mut(builder) }?;
        b.sources.trust.push(PemSource::Path(PathBuf::from(unsafe { str_arg(path, "path") }?)));
        Ok(())
    })
}

/// Adds CRLs from PEM bytes (copied).
#[no_mangle]
pub unsafe extern "C" fn tw_profile_builder_add_crl_pem(
    builder: *mut tw_profile_builder,
    pem: *const u8,
    len: usize,
) -> tw_result {
    guard(|| {
        let b = unsafe { builder_mut(builder) }?;
        b.sources.crls.push(PemSource::Pem(unsafe { bytes_arg(pem, len, "pem") }?.to_vec()));
        Ok(())
    })
}

/// Adds CRLs from a file or a directory of `.pem`/`.crl` files; re-read on reload.
#[no_mangle]
pub unsafe extern "C" fn tw_profile_builder_add_crl_path(
    builder: *mut tw_profile_builder,
    path: *const c_char,
) -> tw_result {
    guard(|| {
        let b = unsafe { builder_mut(builder) }?;
        b.sources.crls.push(PemSource::Path(PathBuf::from(unsafe { str_arg(path, "path") }?)));
        Ok(())
    })
}

/// Adds a pattern to the allow-list of peers that may connect: a SPIFFE ID
/// ("spiffe://example.org/ns/prod/web"; a trailing "/*" matches every ID below it),
/// "dns:NAME", "dns:*.SUFFIX", "cn:NAME", or "*" for any verified peer. An empty allow-list
/// admits every peer the trust verifies.
/// TW_INVALID_CONFIG for a pattern that does not parse.
#[no_mangle]
pub unsafe extern "C" fn tw_profile_builder_allow(
    builder: *mut tw_profile_builder,
    pattern: *const c_char,
) -> tw_result {
    guard(|| {
        let b = unsafe { builder_mut(builder) }?;
        let p = unsafe { str_arg(pattern, "pattern") }?;
        let more = Policy::from_patterns(&[p]).map_err(Failure::from)?;
        b.template.policy.allow.extend(more.allow);
        Ok(())
    })
}

/// Adds a per-method rule: calls to a method matching one of `methods` ("pkg.Service/Method",
/// "pkg.Service/*") are allowed only to peers matching one of `allow`. With any rule set, a
/// call no rule covers is refused (TW_METHOD_NOT_ALLOWED on the caller's side). The first
/// matching rule decides. The arrays are read during the call only.
#[no_mangle]
pub unsafe extern "C" fn tw_profile_builder_add_rule(
    builder: *mut tw_profile_builder,
    methods: *const *const c_char,
    methods_len: usize,
    allow: *const *const c_char,
    allow_len: usize,
) -> tw_result {
    guard(|| {
        let b = unsafe { builder_mut(builder) }?;
        let methods = unsafe { str_array_arg(methods, methods_len, "methods") }?;
        let allow = unsafe { str_array_arg(allow, allow_len, "allow") }?;
        let policy = std::mem::take(&mut b.template.policy);
        b.template.policy = match policy.clone().with_rule(&methods, &allow) {
            Ok(p) => p,
            Err(e) => {
                b.template.policy = policy;
                return Err(e.into());
            }
        };
        Ok(())
    })
}

/// Client side: the name the server's certificate must cover, sent as SNI (default: the host
/// part of the address dialled).
#[no_mangle]
pub unsafe extern "C" fn tw_profile_builder_set_server_name(
    builder: *mut tw_profile_builder,
    name: *const c_char,
) -> tw_result {
    guard(|| {
        let b = unsafe { builder_mut(builder) }?;
        b.template.server_name = Some(unsafe { str_arg(name, "name") }?.to_string());
        Ok(())
    })
}

/// Client side: the server's SPIFFE ID must be exactly this.
#[no_mangle]
pub unsafe extern "C" fn tw_profile_builder_set_server_spiffe_id(
    builder: *mut tw_profile_builder,
    spiffe_id: *const c_char,
) -> tw_result {
    guard(|| {
        let b = unsafe { builder_mut(builder) }?;
        b.template.server_spiffe_id = Some(unsafe { str_arg(spiffe_id, "spiffe_id") }?.to_string());
        Ok(())
    })
}

/// Weakens the default: also accept TLS 1.2 (TLS 1.3 is still preferred). Only for peers that
/// cannot do 1.3.
#[no_mangle]
pub unsafe extern "C" fn tw_profile_builder_allow_tls12_insecure(builder: *mut tw_profile_builder) -> tw_result {
    guard(|| {
        unsafe { builder_mut(builder) }?.template.min_version = MinVersion::Tls12;
        Ok(())
    })
}

/// How long a handshake may take before it fails with TW_HANDSHAKE_TIMEOUT (default 10000).
#[no_mangle]
pub unsafe extern "C" fn tw_profile_builder_set_handshake_timeout_ms(
    builder: *mut tw_profile_builder,
    ms: u32,
) -> tw_result {
    guard(|| {
        if ms == 0 {
            return Err(Failure::new(tw_result::TW_INVALID_ARGUMENT, "handshake timeout must be positive"));
        }
        unsafe { builder_mut(builder) }?.template.handshake_timeout = Duration::from_millis(ms.into());
        Ok(())
    })
}

/// A CRL past its next-update refuses the peers it covers (TW_CRL_STALE) instead of being
/// used as is.
#[no_mangle]
pub unsafe extern "C" fn tw_profile_builder_require_fresh_crls(
    builder: *mut tw_profile_builder,
    require: bool,
) -> tw_result {
    guard(|| {
        unsafe { builder_mut(builder) }?.template.trust.require_fresh_crls = require;
        Ok(())
    })
}

/// Reload triggers: `watch` reloads when a source file changes; `reload_interval_ms` > 0 also
/// reloads on that timer (0: no timer). Both are off for material given as PEM bytes.
#[no_mangle]
pub unsafe extern "C" fn tw_profile_builder_set_reload(
    builder: *mut tw_profile_builder,
    watch: bool,
    reload_interval_ms: u64,
) -> tw_result {
    guard(|| {
        let b = unsafe { builder_mut(builder) }?;
        b.options.watch = watch;
        if !watch {
            b.options.poll_interval = None;
        }
        b.options.reload_interval = (reload_interval_ms > 0).then(|| Duration::from_millis(reload_interval_ms));
        Ok(())
    })
}

/// Runs `hook` on every peer whose certificate verified and that the allow-list admits, in
/// every server and client made from this profile (see `tw_connection_hook_fn` for threads).
/// NULL removes a hook set before. `free_user_data` (may be NULL) is called with `user_data`
/// once nothing uses the hook any more, which can be after `tw_profile_free` (while servers or
/// clients made from the profile live).
#[no_mangle]
pub unsafe extern "C" fn tw_profile_builder_set_connection_hook(
    builder: *mut tw_profile_builder,
    hook: tw_connection_hook_fn,
    user_data: *mut c_void,
    free_user_data: tw_free_fn,
) -> tw_result {
    guard(|| {
        let b = unsafe { builder_mut(builder) }?;
        b.options.hooks.peer = match hook {
            Some(f) => Some(Arc::new(CHook::new(f, user_data, free_user_data))),
            None => None,
        };
        Ok(())
    })
}

/// Runs `hook` on every call the method rules allow, before its handler, in every server made
/// from this profile (see `tw_call_hook_fn`). NULL removes a hook set
/// before; `free_user_data` as for `tw_profile_builder_set_connection_hook`.
#[no_mangle]
pub unsafe extern "C" fn tw_profile_builder_set_call_hook(
    builder: *mut tw_profile_builder,
    hook: tw_call_hook_fn,
    user_data: *mut c_void,
    free_user_data: tw_free_fn,
) -> tw_result {
    guard(|| {
        let b = unsafe { builder_mut(builder) }?;
        b.options.hooks.call = match hook {
            Some(f) => Some(Arc::new(CHook::new(f, user_data, free_user_data))),
            None => None,
        };
        Ok(())
    })
}

/// Names the profile in metrics and logs (default "c").
#[no_mangle]
pub unsafe extern "C" fn tw_profile_builder_set_name(
    builder: *mut tw_profile_builder,
    name: *const c_char,
) -> tw_result {
    guard(|| {
        let b = unsafe { builder_mut(builder) }?;
        b.options.name = unsafe { str_arg(name, "name") }?.to_string();
        Ok(())
    })
}

/// Loads and checks the material (a handshake with itself for each role the certificate
/// allows) and returns the profile in service as generation 1. Consumes `builder` whatever
/// the result. On TW_OK `*profile_out` is owned by the caller (`tw_profile_free`). On failure
/// the result names what is wrong (TW_KEY_MISMATCH, TW_BAD_PEM, TW_IO, TW_INVALID_CONFIG…).
/// Blocks while it reads files; any thread but a trustwire callback's.
#[no_mangle]
pub unsafe extern "C" fn tw_profile_builder_build(
    builder: *mut tw_profile_builder,
    profile_out: *mut *mut tw_profile,
) -> tw_result {
    guard(|| {
        if builder.is_null() {
            return Err(Failure::null("builder"));
        }
        let b = *unsafe { Box::from_raw(builder) };
        if profile_out.is_null() {
            return Err(Failure::null("profile_out"));
        }
        if b.sources.trust.is_empty() && b.sources.workload_api.is_none() {
            return Err(Failure::new(
                tw_result::TW_INVALID_CONFIG,
                "no trust: add the CA certificates that vouch for peers (tw_profile_builder_add_trust_*)",
            ));
        }
        let any_file = matches!(
            b.sources.identity,
            IdentitySource::Files { .. } | IdentitySource::Combined(_) | IdentitySource::Pkcs11 { .. }
        ) || b.sources.trust.iter().chain(&b.sources.crls).any(|s| matches!(s, PemSource::Path(_)));
        let mut options = b.options;
        if !any_file {
            options.watch = false;
            options.poll_interval = None;
        }
        let p = build(b.sources, b.template, options)?;
        unsafe { out_box(profile_out, p) }
    })
}

fn build(sources: Sources, template: TlsProfile, options: StoreOptions) -> Result<tw_profile, Failure> {
    // The store's watcher runs on the shared runtime.
    let _guard = tw::runtime::runtime().enter();
    let (store, role) = if matches!(sources.identity, IdentitySource::None) && sources.workload_api.is_none() {
        (CredentialStore::new(Use::Client, sources, template, options)?, Use::Client)
    } else {
        // Serve every role the certificate allows: both, else server-only or client-only.
        let mut last: Option<Error> = None;
        let mut made = None;
        for role in [Use::Both, Use::Server, Use::Client] {
            match CredentialStore::new(role, sources.clone(), template.clone(), options.clone()) {
                Ok(s) => {
                    made = Some((s, role));
                    break;
                }
                Err(e) if e.verdict() == Some(Verdict::BadKeyUsage) => last = Some(e),
                Err(e) => return Err(e.into()),
            }
        }
        match made {
            Some(m) => m,
            None => {
                return Err(last
                    .map(Failure::from)
                    .unwrap_or_else(|| Failure::new(tw_result::TW_BAD_KEY_USAGE, "no usable role")))
            }
        }
    };
    let events = Events::start(&store);
    Ok(tw_profile { store, role, events })
}

/// Loads a profile file (the TOML format `trustwire` and the Python module share; see
/// "Profile file" in the README). Relative paths in it are relative to the file. Watches the files it names
/// and reloads on change. On TW_OK `*profile_out` is owned by the caller (`tw_profile_free`).
/// Blocks while it reads files.
#[no_mangle]
pub unsafe extern "C" fn tw_profile_load_file(path: *const c_char, profile_out: *mut *mut tw_profile) -> tw_result {
    guard(|| {
        let path = PathBuf::from(unsafe { str_arg(path, "path") }?);
        if profile_out.is_null() {
            return Err(Failure::null("profile_out"));
        }
        let file = tw::profile::ProfileFile::load(&path)?;
        let options = StoreOptions { name: "c".into(), ..StoreOptions::default() };
        let p = build(file.sources()?, file.settings()?, options)?;
        unsafe { out_box(profile_out, p) }
    })
}

/// Releases the caller's profile. Servers and clients made from it keep working. After it
/// returns no event callback of this profile is running or will run (unless called from such
/// a callback, where it stops later ones). NULL does nothing.
#[no_mangle]
pub unsafe extern "C" fn tw_profile_free(profile: *mut tw_profile) {
    if profile.is_null() {
        return;
    }
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let p = unsafe { Box::from_raw(profile) };
        p.events.close();
        drop(p);
    }));
}

/// Re-reads the sources now. On TW_OK `*generation_out` (may be NULL) is the generation in
/// service: a new number if the material changed and passed the checks, the same one if it
/// did not change. On failure the previous generation stays in service and the result names
/// the reason. Blocks while it reads files.
#[no_mangle]
pub unsafe extern "C" fn tw_profile_reload(profile: *const tw_profile, generation_out: *mut u64) -> tw_result {
    guard(|| {
        let p = unsafe { arg(profile, "profile") }?;
        let g = p.store.reload()?;
        if !generation_out.is_null() {
            unsafe { generation_out.write(g) };
        }
        Ok(())
    })
}

/// Replaces our identity with PEM bytes (copied) and reloads: the rotation path for material
/// that does not live in files. Same results as `tw_profile_reload`.
#[no_mangle]
pub unsafe extern "C" fn tw_profile_set_identity_pem(
    profile: *const tw_profile,
    chain_pem: *const u8,
    chain_len: usize,
    key_pem: *const u8,
    key_len: usize,
    generation_out: *mut u64,
) -> tw_result {
    guard(|| {
        let p = unsafe { arg(profile, "profile") }?;
        let chain = unsafe { bytes_arg(chain_pem, chain_len, "chain_pem") }?;
        let key = unsafe { bytes_arg(key_pem, key_len, "key_pem") }?;
        let g = p.store.set_identity_pem(chain, key)?;
        if !generation_out.is_null() {
            unsafe { generation_out.write(g) };
        }
        Ok(())
    })
}

/// Replaces the trusted CAs with PEM bytes (copied) and reloads. Established connections
/// whose peer the new trust refuses are closed.
#[no_mangle]
pub unsafe extern "C" fn tw_profile_set_trust_pem(
    profile: *const tw_profile,
    pem: *const u8,
    len: usize,
    generation_out: *mut u64,
) -> tw_result {
    guard(|| {
        let p = unsafe { arg(profile, "profile") }?;
        let g = p.store.set_trust_pem(unsafe { bytes_arg(pem, len, "pem") }?)?;
        if !generation_out.is_null() {
            unsafe { generation_out.write(g) };
        }
        Ok(())
    })
}

/// Replaces the CRLs with PEM bytes (copied; len 0 removes them) and reloads.
#[no_mangle]
pub unsafe extern "C" fn tw_profile_set_crls_pem(
    profile: *const tw_profile,
    pem: *const u8,
    len: usize,
    generation_out: *mut u64,
) -> tw_result {
    guard(|| {
        let p = unsafe { arg(profile, "profile") }?;
        let g = p.store.set_crls_pem(unsafe { bytes_arg(pem, len, "pem") }?)?;
        if !generation_out.is_null() {
            unsafe { generation_out.write(g) };
        }
        Ok(())
    })
}

/// Calls `callback(user_data, event)` for every later event of this profile (see
/// `tw_event_fn` for the thread). `user_data` is passed back unchanged and must stay valid
/// until `tw_profile_free` returns.
#[no_mangle]
pub unsafe extern "C" fn tw_profile_subscribe(
    profile: *const tw_profile,
    callback: tw_event_fn,
    user_data: *mut c_void,
) -> tw_result {
    guard(|| {
        let p = unsafe { arg(profile, "profile") }?;
        let f = callback.ok_or_else(|| Failure::null("callback"))?;
        p.events.subscribers.lock().unwrap_or_else(|e| e.into_inner()).push((f, UserData(user_data)));
        Ok(())
    })
}

/// The number of the generation in service (1 after build; +1 per accepted change); 0 for
/// NULL.
#[no_mangle]
pub unsafe extern "C" fn tw_profile_generation(profile: *const tw_profile) -> u64 {
    guard_value(0, || Ok(unsafe { arg(profile, "profile") }?.store.generation().number))
}

/// Our certificate's not-after (Unix seconds) in `*not_after_out`; TW_NOT_FOUND for a profile
/// without identity.
#[no_mangle]
pub unsafe extern "C" fn tw_profile_not_after(profile: *const tw_profile, not_after_out: *mut i64) -> tw_result {
    guard(|| {
        let p = unsafe { arg(profile, "profile") }?;
        let g = p.store.generation();
        let cert = g
            .certificate
            .as_ref()
            .ok_or_else(|| Failure::new(tw_result::TW_NOT_FOUND, "this profile has no identity"))?;
        unsafe { out(not_after_out, cert.identity.not_after_unix()) }
    })
}

/// Our certificate's serial number (lowercase hex) in `*serial_out`, a string the caller frees
/// with `tw_string_free`; TW_NOT_FOUND for a profile without identity.
#[no_mangle]
pub unsafe extern "C" fn tw_profile_serial(profile: *const tw_profile, serial_out: *mut *mut c_char) -> tw_result {
    guard(|| {
        let p = unsafe { arg(profile, "profile") }?;
        let g = p.store.generation();
        let cert = g
            .certificate
            .as_ref()
            .ok_or_else(|| Failure::new(tw_result::TW_NOT_FOUND, "this profile has no identity"))?;
        let s: CString = ffi::owned_cstring(cert.identity.serial.clone());
        unsafe { ffi::out_string(serial_out, s) }
    })
}

/// Whether the profile can serve (its certificate allows the server role).
#[no_mangle]
pub unsafe extern "C" fn tw_profile_can_serve(profile: *const tw_profile) -> bool {
    guard_value(false, || Ok(matches!(unsafe { arg(profile, "profile") }?.role, Use::Server | Use::Both)))
}
