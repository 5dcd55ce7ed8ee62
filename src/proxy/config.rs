//! `trustwire proxy --config FILE`: several routes, each with its own profile (identity, trust,
//! allow-list) and upstream.
//!
//! ```toml
//! metrics = "127.0.0.1:9464"      # optional /metrics listener
//! drain_seconds = 30              # SIGTERM: how long open streams may finish
//!
//! [[route]]
//! name = "echo-in"
//! mode = "server"                 # mTLS in, plaintext to upstream
//! listen = "0.0.0.0:8443"
//! upstream = "127.0.0.1:8000"     # or "unix:/run/echo.sock"
//! profile = "server.toml"         # the profile file format (identity, trust, policy)
//! protocol = "baidu_std"          # or "tcp" (default)
//! identity_key_id = "k1"          # baidu_std: sign identity tokens with this key …
//! identity_key_file = "token.key" # … whose secret is this file's bytes
//! identity_token_max_age_seconds = 300 # the max age the upstream's verifier checks; the
//!                                 # token of a long-lived connection is re-issued at a fifth of it
//! proxy_protocol = false          # true: PROXY v2 header with identity TLVs first
//!
//! [[route]]
//! name = "echo-out"
//! mode = "client"                 # plaintext in (loopback/unix only), mTLS to upstream
//! listen = "unix:/run/echo-out.sock" # or loopback "127.0.0.1:9000"
//! listen_mode = "0660"            # unix: listen paths: who may connect (default owner+group)
//! upstream = "echo.example.org:8443"
//! profile = "client.toml"
//! ```
//!
//! Relative paths are relative to the file. Unknown keys are errors. A server-side `tcp` route
//! whose profile has `[[policy.rules]]` is refused (it cannot read calls to enforce them).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{Endpoint, Protocol, Route, RouteTls, RunningProxy};
use crate::credentials::{CredentialStore, StoreOptions, Use, WorkloadApiSpec};
use crate::error::Error;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyFile {
    #[serde(default)]
    pub metrics: Option<String>,
    #[serde(default)]
    pub drain_seconds: Option<u64>,
    pub route: Vec<RouteSection>,
    /// When set (`trustwire proxy --workload-api`), every route takes its SVID from this
    /// Workload API instead of its profile's `[identity]`.
    #[serde(skip)]
    pub workload_api: Option<WorkloadApiSpec>,
    /// The application's connection and call hooks ([`crate::authz`]), for every route: the
    /// connection hook wherever the route verifies peers, the call hook on baidu_std routes (a
    /// tcp route with a call hook refuses to start). Set by programs embedding the proxy.
    #[serde(skip)]
    pub hooks: crate::authz::Hooks,
    #[serde(skip)]
    base: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    pub name: String,
    pub mode: String,
    pub listen: String,
    pub upstream: String,
    pub profile: PathBuf,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub identity_key_id: Option<String>,
    #[serde(default)]
    pub identity_key_file: Option<PathBuf>,
    #[serde(default)]
    pub proxy_protocol: bool,
    #[serde(default)]
    pub connect_timeout_ms: Option<u64>,
    #[serde(default)]
    pub identity_token_max_age_seconds: Option<u64>,
    /// Octal permission bits of a `unix:` listen socket, e.g. "0660".
    #[serde(default)]
    pub listen_mode: Option<String>,
}

impl ProxyFile {
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::config(format!("cannot read proxy config {}: {e}", path.display())))?;
        let mut file: ProxyFile =
            toml::from_str(&text).map_err(|e| Error::config(format!("proxy config {}: {e}", path.display())))?;
        file.base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        if file.route.is_empty() {
            return Err(Error::config("the proxy config has no [[route]]"));
        }
        Ok(file)
    }

    fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    fn store(&self, profile: &Path, use_: Use, options: StoreOptions) -> Result<CredentialStore, Error> {
        let file = crate::profile::ProfileFile::load(&self.path(profile))?;
        let options = file.store_options(options);
        let mut sources = file.sources()?;
        if let Some(spec) = &self.workload_api {
            sources.identity = crate::credentials::IdentitySource::None;
            sources.workload_api = Some(spec.clone());
        }
        CredentialStore::new(use_, sources, file.settings()?, options)
    }

    pub fn drain(&self) -> Duration {
        Duration::from_secs(self.drain_seconds.unwrap_or(30))
    }

    /// Starts every route and returns once all listen, with each route's credential store (for
    /// reloads), in file order. If one cannot start, those started before are closed.
    pub async fn start(&self) -> Result<Vec<(RunningProxy, CredentialStore)>, Error> {
        let mut started = Vec::new();
        for (route, store) in self.routes()? {
            started.push((super::start(route).await?, store));
        }
        Ok(started)
    }

    /// Builds every route, each with its own credential store (named after the route).
    pub fn routes(&self) -> Result<Vec<(Route, CredentialStore)>, Error> {
        let mut out = Vec::new();
        for r in &self.route {
            let err = |m: String| Error::config(format!("route {}: {m}", r.name));
            let use_ = match r.mode.as_str() {
                "server" => Use::Server,
                "client" => Use::Client,
                other => return Err(err(format!("mode = \"{other}\": use \"server\" or \"client\""))),
            };
            let protocol = match r.protocol.as_deref() {
                None | Some("tcp") => Protocol::Tcp,
                Some("baidu_std") => Protocol::BaiduStd,
                Some(other) => return Err(err(format!("protocol = \"{other}\": use \"tcp\" or \"baidu_std\""))),
            };
            let token_key = match (&r.identity_key_id, &r.identity_key_file) {
                (Some(id), Some(f)) => {
                    let secret = std::fs::read(self.path(f))
                        .map_err(|e| err(format!("cannot read identity_key_file {}: {e}", f.display())))?;
                    if secret.len() < 16 {
                        return Err(err("identity_key_file must hold at least 16 bytes of secret".into()));
                    }
                    Some((id.clone(), secret))
                }
                (None, None) => None,
                _ => return Err(err("identity_key_id and identity_key_file go together".into())),
            };
            if protocol == Protocol::BaiduStd && use_ == Use::Server && token_key.is_none() {
                return Err(err("a server-side baidu_std route needs identity_key_id and identity_key_file".into()));
            }
            let listen = Endpoint::parse(&r.listen);
            let listen_mode = match (&r.listen_mode, &listen) {
                (None, _) => super::DEFAULT_LISTEN_MODE,
                (Some(m), Endpoint::Unix(_)) => u32::from_str_radix(m.trim_start_matches("0o"), 8)
                    .ok()
                    .filter(|m| m & !0o777 == 0)
                    .ok_or_else(|| err(format!("listen_mode = \"{m}\": use octal permission bits such as \"0660\"")))?,
                (Some(_), Endpoint::Tcp(_)) => {
                    return Err(err("listen_mode applies to unix: listen paths only".into()));
                }
            };
            let token_max_age = match r.identity_token_max_age_seconds {
                None => super::token::DEFAULT_MAX_AGE,
                Some(s) if s >= 5 => Duration::from_secs(s),
                Some(s) => return Err(err(format!("identity_token_max_age_seconds = {s}: use at least 5"))),
            };
            let options = StoreOptions { name: r.name.clone(), hooks: self.hooks.clone(), ..StoreOptions::default() };
            let named = |e: Error| super::in_route_name(&r.name, e);
            let store = self.store(&r.profile, use_, options).map_err(named)?;
            let tls = match use_ {
                Use::Server => RouteTls::Server(store.server_tls().map_err(named)?),
                _ => RouteTls::Client(store.client_tls().map_err(named)?),
            };
            out.push((
                Route {
                    name: r.name.clone(),
                    listen,
                    upstream: Endpoint::parse(&r.upstream),
                    tls,
                    protocol,
                    token_key,
                    proxy_protocol: r.proxy_protocol,
                    connect_timeout: Duration::from_millis(r.connect_timeout_ms.unwrap_or(5000)),
                    token_max_age,
                    listen_mode,
                },
                store,
            ));
        }
        Ok(out)
    }
}
