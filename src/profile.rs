//! The profile file: one TOML format that the CLI, C and Python all load. It sits above both
//! [`crate::tls`] and [`crate::credentials`]: it names material and settings, they use them.
//!
//! ```toml
//! [identity]
//! cert = "certs/svc.pem"        # chain, leaf first
//! key = "certs/svc.key"
//! # or: combined = "svc.pem"    # key and chain in one file
//! # or: key = "pkcs11:token=svc;object=echo-key"  # a key that stays on a PKCS#11 token (RFC
//! #     7512 URI: token=, object= and/or id=%xx…), with [identity.pkcs11] below
//! # or: workload_api = "unix:///run/spire/sockets/agent.sock"  # SVID, bundles and CRLs from a
//! #     SPIRE agent (also "tcp://IP:PORT", or "env": $SPIFFE_ENDPOINT_SOCKET); rotates as pushed
//! # svid = "spiffe://example.org/ns/prod/echo"  # which SVID, when the agent returns several
//! # svid_hint = "internal"       # or choose it by the hint SPIRE gives it
//! allow_identity_change = false # true: a reload may change our SPIFFE ID (refused by default)
//! expiry_warning_days = 7        # warn when our certificate has less left (0: never)
//!
//! # [identity.pkcs11]            # with key = "pkcs11:…"
//! # module = "/usr/lib/softhsm/libsofthsm2.so"
//! # pin_file = "svc.pin"         # or: pin_env = "SVC_PIN" (never the PIN itself)
//! # sessions = 8                 # signing sessions at most (handshakes signing at once)
//!
//! [trust]
//! trust_domain = "example.org"  # what `ca` vouches for (default: our own SPIFFE ID's domain)
//! ca = ["certs/ca.pem"]          # files or directories; also trusted for peers without a SPIFFE ID
//! # bundle = "example.org.json"  # our domain's CAs as a SPIFFE bundle (JWKS)
//! # bundle_map = "bundles.json"  # {"trust_domains": {"<domain>": <SPIFFE bundle>, …}}
//! crl = []
//! require_fresh_crls = false    # true: a CRL past its next-update refuses (crl_stale)
//!
//! [trust.federation."partner.example"]   # another trust domain; its CAs vouch for it only
//! ca = ["certs/partner-ca.pem"]  # or: bundle = "partner.json"
//!
//! [policy]
//! allow = ["spiffe://example.org/ns/prod/*"]
//!
//! [[policy.rules]]
//! methods = ["example.EchoService/*"]
//! allow = ["spiffe://example.org/ns/prod/frontend"]
//!
//! [client]
//! server_name = "echo.example.org"
//! server_spiffe_id = "spiffe://example.org/ns/prod/echo"
//!
//! [tls]
//! min_version = "1.3"            # "1.2" to also accept TLS 1.2
//! cipher_suites = ["TLS13_AES_128_GCM_SHA256", "TLS13_AES_256_GCM_SHA384"]  # optional: order and subset
//! handshake_timeout_ms = 10000
//! # resumption = { max_age_s = 3600 }  # TLS 1.3 tickets between trustwire peers (off by default)
//! ```
//!
//! Relative paths are relative to the file's directory. Unknown keys are errors, so a typo
//! cannot silently weaken a check. SPIFFE IDs (allow-list patterns, `server_spiffe_id`) and
//! trust domain names are validated here, by the same parser the handshake uses.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::credentials::pkcs11::{is_pkcs11_uri, PinSource, Pkcs11KeySpec, Pkcs11Uri, DEFAULT_SESSIONS};
use crate::credentials::{
    CredentialStore, FederatedSource, IdentitySource, PemSource, Sources, StoreOptions, Use, WorkloadApiSpec,
};
use crate::error::Error;
use crate::tls::policy::Policy;
use crate::tls::{MinVersion, SpiffeId, TlsProfile, TrustBundle, TrustDomain};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileFile {
    #[serde(default)]
    pub identity: Option<IdentitySection>,
    #[serde(default)]
    pub trust: TrustSection,
    #[serde(default)]
    pub policy: PolicySection,
    #[serde(default)]
    pub client: ClientSection,
    #[serde(default)]
    pub tls: TlsSection,
    #[serde(skip)]
    base: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySection {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub combined: Option<PathBuf>,
    /// The SPIFFE Workload API address (`unix:///…`, `tcp://IP:PORT`, or `env`).
    pub workload_api: Option<String>,
    /// With `workload_api`: use the SVID with this SPIFFE ID.
    pub svid: Option<String>,
    /// With `workload_api`: use the SVID with this hint.
    pub svid_hint: Option<String>,
    /// Let a reload change our SPIFFE ID (refused by default).
    #[serde(default)]
    pub allow_identity_change: bool,
    /// Warn (log, `Expiring` event) when our certificate has less than this many days left
    /// (default 7; 0: never).
    pub expiry_warning_days: Option<u32>,
    /// The token holding the key, when `key` is a `pkcs11:` URI.
    pub pkcs11: Option<Pkcs11Section>,
}

/// `[identity.pkcs11]`: the module and PIN for a `key = "pkcs11:…"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Section {
    pub module: PathBuf,
    pub pin_file: Option<PathBuf>,
    pub pin_env: Option<String>,
    pub sessions: Option<usize>,
}

impl Pkcs11Section {
    /// The token key `uri` names, with this section's module and PIN; `path` resolves the
    /// module and PIN file (relative to the profile's directory).
    pub fn key_spec(&self, uri: &str, path: impl Fn(&Path) -> PathBuf) -> Result<Pkcs11KeySpec, Error> {
        let uri = Pkcs11Uri::parse(uri)?;
        let pin = match (&self.pin_file, &self.pin_env) {
            (Some(f), None) => PinSource::File(path(f)),
            (None, Some(v)) if !v.is_empty() => PinSource::Env(v.clone()),
            (None, None) => {
                return Err(Error::config(
                    "[identity.pkcs11] needs the PIN's source: pin_file = \"…\" or pin_env = \"VAR\"",
                ))
            }
            _ => return Err(Error::config("[identity.pkcs11]: give pin_file or pin_env, not both")),
        };
        let sessions = match self.sessions {
            None => DEFAULT_SESSIONS,
            Some(n @ 1..=256) => n,
            Some(n) => return Err(Error::config(format!("[identity.pkcs11] sessions = {n}: use 1 to 256"))),
        };
        Ok(Pkcs11KeySpec { uri, module: path(&self.module), pin, sessions })
    }
}

/// A path, or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Paths {
    One(PathBuf),
    Many(Vec<PathBuf>),
}

impl Default for Paths {
    fn default() -> Self {
        Paths::Many(Vec::new())
    }
}

impl Paths {
    pub fn as_slice(&self) -> &[PathBuf] {
        match self {
            Paths::One(p) => std::slice::from_ref(p),
            Paths::Many(v) => v,
        }
    }
}

/// `[trust.federation."<trust domain>"]`: another trust domain's CAs.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationSection {
    #[serde(default)]
    pub ca: Paths,
    /// SPIFFE bundle files (JWKS) of that trust domain.
    #[serde(default)]
    pub bundle: Paths,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustSection {
    /// Our trust domain: the one `ca` vouches for (default: our own SPIFFE ID's).
    pub trust_domain: Option<String>,
    #[serde(default)]
    pub ca: Paths,
    /// Our trust domain's CAs as SPIFFE bundles (needs `trust_domain`).
    #[serde(default)]
    pub bundle: Paths,
    /// Bundle-map files: trust domain → SPIFFE bundle.
    #[serde(default)]
    pub bundle_map: Paths,
    #[serde(default)]
    pub federation: BTreeMap<String, FederationSection>,
    #[serde(default)]
    pub crl: Paths,
    /// Refuse peers whose CRL is past its next-update time (`crl_stale`).
    #[serde(default)]
    pub require_fresh_crls: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub rules: Vec<RuleSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSection {
    pub methods: Vec<String>,
    pub allow: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSection {
    pub server_name: Option<String>,
    pub server_spiffe_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub min_version: Option<String>,
    pub cipher_suites: Option<Vec<String>>,
    pub handshake_timeout_ms: Option<u64>,
    /// TLS 1.3 session resumption (off when absent).
    pub resumption: Option<ResumptionSection>,
}

/// `[tls] resumption = { max_age_s = N }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResumptionSection {
    /// How long a ticket may be used after the full handshake that verified the peer.
    pub max_age_s: u64,
}

impl ProfileFile {
    /// Reads and parses a profile file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::config(format!("cannot read profile {}: {e}", path.display())))?;
        let mut file = Self::parse(&text).map_err(|e| Error::config(format!("profile {}: {e}", path.display())))?;
        file.base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(file)
    }

    /// Parses profile TOML; relative paths stay relative to the current directory.
    pub fn parse(text: &str) -> Result<Self, Error> {
        toml::from_str(text).map_err(|e| Error::config(e.to_string()))
    }

    fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    /// Loads the files the profile names and builds it (fixed material; for material that
    /// rotates, see [`CredentialStore::from_file`]). The files are checked as a store checks them.
    pub fn into_profile(self) -> Result<TlsProfile, Error> {
        let sources = self.sources()?;
        let mut profile = self.settings()?;
        let (identity, trust) = crate::credentials::load_fixed(&sources, &profile)?;
        profile.identity = identity;
        profile.trust = trust;
        Ok(profile)
    }

    /// Store options the profile sets (`allow_identity_change`, `expiry_warning_days`), on top
    /// of `base`.
    pub fn store_options(&self, mut base: StoreOptions) -> StoreOptions {
        if self.identity.as_ref().is_some_and(|i| i.allow_identity_change) {
            base.allow_identity_change = true;
        }
        if let Some(days) = self.identity.as_ref().and_then(|i| i.expiry_warning_days) {
            base.expiry_warning = std::time::Duration::from_secs(u64::from(days) * 24 * 3600);
        }
        base
    }

    /// The files the profile names, as credential sources (paths resolved).
    pub fn sources(&self) -> Result<Sources, Error> {
        let workload_api = self.workload_api()?;
        let identity =
            match &self.identity {
                None => IdentitySource::None,
                Some(IdentitySection { workload_api: Some(_), cert: None, key: None, combined: None, .. }) => {
                    IdentitySource::None
                }
                Some(IdentitySection { workload_api: Some(_), .. }) => return Err(Error::config(
                    "[identity] workload_api gives our SVID and key: remove cert, key and combined, or workload_api",
                )),
                Some(IdentitySection { combined: Some(c), cert: None, key: None, .. }) => {
                    IdentitySource::Combined(self.path(c))
                }
                Some(IdentitySection { cert: Some(c), key: Some(k), combined: None, pkcs11, .. }) => {
                    match (k.to_str().filter(|k| is_pkcs11_uri(k)), pkcs11) {
                    (Some(uri), Some(p11)) => IdentitySource::Pkcs11 {
                        chain: self.path(c),
                        key: Box::new(p11.key_spec(uri, |p| self.path(p))?),
                    },
                    (Some(_), None) => return Err(Error::config(
                        "[identity] key is a pkcs11: URI: add [identity.pkcs11] with module and pin_file or pin_env",
                    )),
                    (None, Some(_)) => {
                        return Err(Error::config(
                            "[identity.pkcs11] is set but [identity] key is a file: use key = \"pkcs11:…\"",
                        ))
                    }
                    (None, None) => IdentitySource::Files { chain: self.path(c), key: self.path(k) },
                }
                }
                Some(_) => return Err(Error::config("[identity] needs either cert and key, or combined (not both)")),
            };
        let paths = |ps: &Paths| ps.as_slice().iter().map(|p| PemSource::Path(self.path(p))).collect::<Vec<_>>();
        let mut federation = BTreeMap::new();
        for (name, f) in &self.trust.federation {
            let td = TrustDomain::parse(name).map_err(|e| Error::config(format!("[trust.federation]: {e}")))?;
            if f.ca.as_slice().is_empty() && f.bundle.as_slice().is_empty() {
                return Err(Error::config(format!("[trust.federation.\"{td}\"] needs ca or bundle")));
            }
            federation.insert(td, FederatedSource { ca: paths(&f.ca), bundle: paths(&f.bundle) });
        }
        Ok(Sources {
            identity,
            workload_api,
            trust: paths(&self.trust.ca),
            crls: paths(&self.trust.crl),
            trust_domain: self.trust_domain()?,
            trust_bundles: paths(&self.trust.bundle),
            federation,
            bundle_maps: paths(&self.trust.bundle_map),
        })
    }

    fn workload_api(&self) -> Result<Option<WorkloadApiSpec>, Error> {
        let Some(id) = &self.identity else { return Ok(None) };
        let Some(address) = &id.workload_api else {
            if id.svid.is_some() || id.svid_hint.is_some() {
                return Err(Error::config(
                    "[identity] svid and svid_hint choose among the Workload API's SVIDs: set workload_api",
                ));
            }
            return Ok(None);
        };
        let names = ["[identity] workload_api", "[identity] svid", "[identity] svid_hint"];
        let spec = WorkloadApiSpec::from_parts(address, id.svid.as_deref(), id.svid_hint.as_deref(), names)?;
        Ok(Some(spec))
    }

    fn trust_domain(&self) -> Result<Option<TrustDomain>, Error> {
        self.trust
            .trust_domain
            .as_deref()
            .map(|t| TrustDomain::parse(t).map_err(|e| Error::config(format!("[trust] trust_domain: {e}"))))
            .transpose()
    }

    /// Everything but the material: policy, names and TLS settings.
    pub fn settings(&self) -> Result<TlsProfile, Error> {
        let mut policy = Policy::from_patterns(&self.policy.allow)?;
        for rule in &self.policy.rules {
            policy = policy.with_rule(&rule.methods, &rule.allow)?;
        }
        let mut profile = TlsProfile::new(None, TrustBundle::default());
        profile.trust.require_fresh_crls = self.trust.require_fresh_crls;
        profile.trust.trust_domain = self.trust_domain()?;
        if let Some(id) = &self.client.server_spiffe_id {
            SpiffeId::parse(id).map_err(|e| Error::config(format!("[client] server_spiffe_id: {e}")))?;
        }
        profile.policy = policy;
        profile.server_name = self.client.server_name.clone();
        profile.server_spiffe_id = self.client.server_spiffe_id.clone();
        profile.min_version = match self.tls.min_version.as_deref() {
            None | Some("1.3") => MinVersion::Tls13,
            Some("1.2") => MinVersion::Tls12,
            Some(other) => {
                return Err(Error::config(format!("tls.min_version = \"{other}\": use \"1.3\" (default) or \"1.2\"")))
            }
        };
        if let Some(ms) = self.tls.handshake_timeout_ms {
            profile.handshake_timeout = Duration::from_millis(ms);
        }
        if let Some(names) = &self.tls.cipher_suites {
            crate::tls::cipher_suites(names)?;
            profile.cipher_suites = names.clone();
        }
        if let Some(r) = &self.tls.resumption {
            profile.resumption = Some(Duration::from_secs(r.max_age_s));
        }
        if self.tls.cipher_suites.is_some() || self.tls.resumption.is_some() {
            profile.crypto()?;
        }
        Ok(profile)
    }
}

impl TlsProfile {
    /// Loads a profile from the shared TOML file format (fixed material).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, Error> {
        ProfileFile::load(path.as_ref())?.into_profile()
    }
}

impl CredentialStore {
    /// A store for the files a profile TOML names.
    pub fn from_file(path: impl AsRef<Path>, role: Use, options: StoreOptions) -> Result<Self, Error> {
        let file = ProfileFile::load(path.as_ref())?;
        let options = file.store_options(options);
        Self::new(role, file.sources()?, file.settings()?, options)
    }
}
