//! The profile file: one TOML format that the CLI, C and Python all load. It sits above both
//! [`crate::tls`] and [`crate::credentials`]: it names material and settings, they use them.
//!
//! ```toml
//! [identity]
//! cert = "certs/svc.pem"        # chain, leaf first
//! key = "certs/svc.key"
//! # or: combined = "svc.pem"    # key and chain in one file
//!
//! [trust]
//! ca = ["certs/ca.pem"]          # files or directories
//! crl = []
//! require_fresh_crls = false    # true: a CRL past its next-update refuses (crl_stale)
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
//! handshake_timeout_ms = 10000
//! ```
//!
//! Relative paths are relative to the file's directory. Unknown keys are errors, so a typo
//! cannot silently weaken a check.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::credentials::{CredentialStore, IdentitySource, PemSource, Sources, StoreOptions, Use};
use crate::error::Error;
use crate::tls::policy::Policy;
use crate::tls::{Identity, MinVersion, TlsProfile, TrustBundle};

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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustSection {
    pub ca: Vec<PathBuf>,
    #[serde(default)]
    pub crl: Vec<PathBuf>,
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
    pub handshake_timeout_ms: Option<u64>,
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
    /// rotates, see [`crate::credentials::CredentialStore::from_file`]).
    pub fn into_profile(self) -> Result<TlsProfile, Error> {
        let sources = self.sources()?;
        let mut profile = self.settings()?;
        profile.identity = match &sources.identity {
            IdentitySource::None => None,
            IdentitySource::Combined(p) => {
                let pem = std::fs::read(p)
                    .map_err(|e| Error::credentials(None, format!("cannot read {}: {e}", p.display())))?;
                Some(Identity::from_combined_pem(&pem)?)
            }
            IdentitySource::Files { chain, key } => Some(Identity::from_files(chain, key)?),
            IdentitySource::Pem { chain, key } => Some(Identity::from_pem(chain, key)?),
        };
        let ca: Vec<PathBuf> = self.trust.ca.iter().map(|p| self.path(p)).collect();
        let mut trust = TrustBundle::from_paths(&ca)?;
        for crl in &self.trust.crl {
            let pem = std::fs::read(self.path(crl))
                .map_err(|e| Error::credentials(None, format!("cannot read CRL {}: {e}", crl.display())))?;
            trust.add_crls_pem(&pem)?;
        }
        trust.require_fresh_crls = profile.trust.require_fresh_crls;
        profile.trust = trust;
        Ok(profile)
    }

    /// The files the profile names, as credential sources (paths resolved).
    pub fn sources(&self) -> Result<Sources, Error> {
        let identity = match &self.identity {
            None => IdentitySource::None,
            Some(IdentitySection { combined: Some(c), cert: None, key: None }) => {
                IdentitySource::Combined(self.path(c))
            }
            Some(IdentitySection { cert: Some(c), key: Some(k), combined: None }) => {
                IdentitySource::Files { chain: self.path(c), key: self.path(k) }
            }
            Some(_) => return Err(Error::config("[identity] needs either cert and key, or combined (not both)")),
        };
        Ok(Sources {
            identity,
            trust: self.trust.ca.iter().map(|p| PemSource::Path(self.path(p))).collect(),
            crls: self.trust.crl.iter().map(|p| PemSource::Path(self.path(p))).collect(),
        })
    }

    /// Everything but the material: policy, names and TLS settings.
    pub fn settings(&self) -> Result<TlsProfile, Error> {
        let mut policy = Policy::from_patterns(&self.policy.allow)?;
        for rule in &self.policy.rules {
            policy = policy.with_rule(&rule.methods, &rule.allow)?;
        }
        let mut profile = TlsProfile::new(None, TrustBundle::default());
        profile.trust.require_fresh_crls = self.trust.require_fresh_crls;
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
        Self::new(role, file.sources()?, file.settings()?, options)
    }
}
