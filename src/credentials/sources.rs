//! Where credential material comes from, and reading it: PEM files and directories, bytes handed
//! in, SPIFFE bundles (one trust domain's JWKS), bundle maps (trust domain → bundle) and the
//! SPIFFE Workload API (the context it last pushed). The store above turns what is read here into
//! a validated generation, whatever the source.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_lc_rs::digest;
use base64::Engine;
use rustls_pki_types::CertificateDer;

use super::pkcs11::{PinSource, Pkcs11KeySpec};
use super::workload::{SvidSelector, WorkloadApiAddress, X509Context};
use crate::error::{Error, Verdict};
use crate::tls::spiffe::{SpiffeId, TrustDomain};
use crate::tls::trust::check_ca;

/// Where our certificate chain and key come from.
#[derive(Clone, Debug, Default)]
pub enum IdentitySource {
    /// No identity (a client that only verifies servers).
    #[default]
    None,
    /// A chain file (leaf first) and a key file.
    Files { chain: PathBuf, key: PathBuf },
    /// One file holding the key and the chain (SPIFFE helper style).
    Combined(PathBuf),
    /// PEM bytes handed in through the API.
    Pem { chain: Vec<u8>, key: Vec<u8> },
    /// A chain file and a private key that stays on a PKCS#11 token.
    Pkcs11 { chain: PathBuf, key: Box<Pkcs11KeySpec> },
}

/// A PEM (or, for bundles, JSON) source for CA certificates or CRLs.
#[derive(Clone, Debug)]
pub enum PemSource {
    /// A file, or a directory whose `.pem`/`.crt`/`.cer` (CAs), `.pem`/`.crl` (CRLs) or
    /// `.json` (SPIFFE bundles) files are read in name order.
    Path(PathBuf),
    /// Bytes handed in through the API.
    Pem(Vec<u8>),
}

/// A federated trust domain's CAs: PEM files and/or SPIFFE bundles.
#[derive(Clone, Debug, Default)]
pub struct FederatedSource {
    pub ca: Vec<PemSource>,
    /// SPIFFE bundle files (JWKS with `x509-svid` keys) of this trust domain.
    pub bundle: Vec<PemSource>,
}

/// The SPIFFE Workload API (a SPIRE agent's socket, say) as the source of our SVID, our trust
/// domain's bundle, the federated bundles and the CRLs (`[identity] workload_api`). Each response
/// the agent pushes becomes a generation, validated like any other.
#[derive(Clone, Debug)]
pub struct WorkloadApiSpec {
    pub address: WorkloadApiAddress,
    /// Which SVID is ours when the agent returns several (default: the first, as the standard says).
    pub select: SvidSelector,
    /// How long a store waits for the first SVID when it is created.
    pub first_timeout: Duration,
}

impl WorkloadApiSpec {
    /// The first SVID from `address`, waited for up to 30 s.
    pub fn new(address: WorkloadApiAddress) -> Self {
        WorkloadApiSpec { address, select: SvidSelector::First, first_timeout: Duration::from_secs(30) }
    }

    /// The spec every front end builds from what its user wrote: an address, and our SVID
    /// chosen by SPIFFE ID or by hint (not both; neither: the first). `names` are the user's
    /// words for the three settings (e.g. `["--workload-api", "--svid", "--svid-hint"]`), so
    /// a refusal names the one at fault.
    pub fn from_parts(
        address: &str,
        spiffe_id: Option<&str>,
        hint: Option<&str>,
        names: [&str; 3],
    ) -> Result<Self, Error> {
        let [address_name, id_name, hint_name] = names;
        let address = WorkloadApiAddress::parse(address).map_err(|e| Error::config(format!("{address_name}: {e}")))?;
        let mut spec = WorkloadApiSpec::new(address);
        spec.select = match (spiffe_id, hint) {
            (None, None) => SvidSelector::First,
            (Some(id), None) => {
                SpiffeId::parse(id).map_err(|e| Error::config(format!("{id_name}: {e}")))?;
                SvidSelector::SpiffeId(id.to_string())
            }
            (None, Some(hint)) => SvidSelector::Hint(hint.to_string()),
            (Some(_), Some(_)) => return Err(Error::config(format!("give {id_name} or {hint_name}, not both"))),
        };
        Ok(spec)
    }
}

/// Everything a store loads.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    pub identity: IdentitySource,
    /// Our SVID and trust from the Workload API (with `identity` left `None`). Trust sources
    /// below add to what the agent sends (e.g. a federated domain the agent does not know).
    pub workload_api: Option<WorkloadApiSpec>,
    /// Our CAs (PEM): our trust domain's, also trusted for peers without a SPIFFE ID.
    pub trust: Vec<PemSource>,
    pub crls: Vec<PemSource>,
    /// Our trust domain (`[trust] trust_domain`); else taken from our own SPIFFE ID.
    pub trust_domain: Option<TrustDomain>,
    /// SPIFFE bundle files for our own trust domain (needs `trust_domain`).
    pub trust_bundles: Vec<PemSource>,
    /// Other trust domains' CAs.
    pub federation: BTreeMap<TrustDomain, FederatedSource>,
    /// Bundle-map files: one JSON object of trust domain → SPIFFE bundle.
    pub bundle_maps: Vec<PemSource>,
}

impl Sources {
    /// Paths whose changes should trigger a load (files and directories).
    pub(crate) fn paths(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        match &self.identity {
            IdentitySource::Files { chain, key } => out.extend([chain.clone(), key.clone()]),
            IdentitySource::Combined(p) => out.push(p.clone()),
            IdentitySource::Pkcs11 { chain, key } => {
                out.push(chain.clone());
                if let PinSource::File(p) = &key.pin {
                    out.push(p.clone());
                }
            }
            IdentitySource::None | IdentitySource::Pem { .. } => {}
        }
        let federated = self.federation.values().flat_map(|f| f.ca.iter().chain(&f.bundle));
        for s in
            self.trust.iter().chain(&self.crls).chain(&self.trust_bundles).chain(&self.bundle_maps).chain(federated)
        {
            if let PemSource::Path(p) = s {
                out.push(p.clone());
            }
        }
        out
    }
}

pub(crate) fn read(path: &Path, what: &str) -> Result<Vec<u8>, Error> {
    std::fs::read(path)
        .map_err(|e| Error::credentials(Some(Verdict::Io), format!("cannot read {what} {}: {e}", path.display())))
}

/// The bytes of each source, files of a directory in name order.
fn read_sources(sources: &[PemSource], what: &str, exts: &[&str]) -> Result<Vec<(String, Vec<u8>)>, Error> {
    let mut out = Vec::new();
    for s in sources {
        match s {
            PemSource::Pem(b) => out.push((format!("{what} (bytes)"), b.clone())),
            PemSource::Path(p) if p.is_dir() => {
                let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                    .map_err(|e| {
                        Error::credentials(None, format!("cannot list {what} directory {}: {e}", p.display()))
                    })?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|f| {
                        // Kubernetes secret volumes hold `..data` and `..2024_…` entries: skip.
                        !f.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(".."))
                            && f.is_file()
                            && f.extension().and_then(|e| e.to_str()).is_some_and(|e| exts.contains(&e))
                    })
                    .collect();
                files.sort();
                for f in files {
                    out.push((f.display().to_string(), read(&f, what)?));
                }
            }
            PemSource::Path(p) => out.push((p.display().to_string(), read(p, what)?)),
        }
    }
    Ok(out)
}

/// Bytes read from one file (or handed in), with what to call them in messages.
pub(crate) type Named = (String, Vec<u8>);

/// Our identity's bytes as read.
pub(crate) enum IdentityBytes {
    /// A chain and a key, with the file holding the key when there is one.
    Pem { chain: Vec<u8>, key: Vec<u8>, key_file: Option<PathBuf> },
    /// Key and chain in one PEM, and its file.
    Combined { pem: Vec<u8>, file: PathBuf },
    /// A chain, and a key found on a token at each load.
    Token { chain: Vec<u8>, key: Box<Pkcs11KeySpec> },
}

/// The raw bytes of every source, read at one moment.
pub(crate) struct Material {
    pub identity: Option<IdentityBytes>,
    pub trust: Vec<Named>,
    pub crls: Vec<Named>,
    pub trust_bundles: Vec<Named>,
    /// (trust domain, PEM CA files, SPIFFE bundle files)
    pub federation: Vec<(TrustDomain, Vec<Named>, Vec<Named>)>,
    pub bundle_maps: Vec<Named>,
    /// Trust domain CA sets as DER (the Workload API's bundles), with what to call them.
    pub spiffe_bundles: Vec<(TrustDomain, String, Vec<CertificateDer<'static>>)>,
}

const CA_EXTS: &[&str] = &["pem", "crt", "cer"];
const JSON_EXTS: &[&str] = &["json"];

/// Reads every source now. `workload` is the Workload API's last context, when the sources
/// take our SVID from it.
pub(crate) fn read_material(sources: &Sources, workload: Option<&X509Context>) -> Result<Material, Error> {
    let mut crls = read_sources(&sources.crls, "CRL", &["pem", "crl"])?;
    let mut spiffe_bundles = Vec::new();
    let identity = match (&sources.workload_api, workload, &sources.identity) {
        (Some(spec), None, _) => {
            return Err(Error::credentials(None, format!("no X509-SVID from the Workload API at {} yet", spec.address)))
        }
        (Some(spec), Some(context), _) => {
            let from = |what: String| format!("{what} from the Workload API at {}", spec.address);
            let td = |name: &str| {
                TrustDomain::parse(name).map_err(|e| Error::credentials(Some(Verdict::BadPem), from(format!("{e}"))))
            };
            let own = td(context.trust_domain())?;
            spiffe_bundles.push((own.clone(), from(format!("the bundle of {own}")), context.bundle().to_vec()));
            for (name, cas) in context.federated_bundles() {
                let other = td(name)?;
                spiffe_bundles.push((other.clone(), from(format!("the federated bundle of {other}")), cas.clone()));
            }
            for (i, crl) in context.crls().iter().enumerate() {
                crls.push((from(format!("CRL #{}", i + 1)), pem_block("X509 CRL", crl.as_ref())));
            }
            let svid = context.svid();
            let chain = svid.chain().iter().flat_map(|c| pem_block("CERTIFICATE", c.as_ref())).collect();
            Some(IdentityBytes::Pem {
                chain,
                key: pem_block("PRIVATE KEY", svid.key().secret_pkcs8_der()),
                key_file: None,
            })
        }
        (None, _, IdentitySource::None) => None,
        (None, _, IdentitySource::Files { chain, key }) => Some(IdentityBytes::Pem {
            chain: read(chain, "certificate chain")?,
            key: read(key, "private key")?,
            key_file: Some(key.clone()),
        }),
        (None, _, IdentitySource::Combined(p)) => {
            Some(IdentityBytes::Combined { pem: read(p, "combined key and chain")?, file: p.clone() })
        }
        (None, _, IdentitySource::Pem { chain, key }) => {
            Some(IdentityBytes::Pem { chain: chain.clone(), key: key.clone(), key_file: None })
        }
        (None, _, IdentitySource::Pkcs11 { chain, key }) => {
            Some(IdentityBytes::Token { chain: read(chain, "certificate chain")?, key: key.clone() })
        }
    };
    let mut federation = Vec::new();
    for (td, f) in &sources.federation {
        let what = format!("trust domain {td} CA bundle");
        federation.push((
            td.clone(),
            read_sources(&f.ca, &what, CA_EXTS)?,
            read_sources(&f.bundle, &format!("trust domain {td} SPIFFE bundle"), JSON_EXTS)?,
        ));
    }
    Ok(Material {
        identity,
        trust: read_sources(&sources.trust, "CA bundle", CA_EXTS)?,
        crls,
        trust_bundles: read_sources(&sources.trust_bundles, "SPIFFE bundle", JSON_EXTS)?,
        federation,
        bundle_maps: read_sources(&sources.bundle_maps, "SPIFFE bundle map", JSON_EXTS)?,
        spiffe_bundles,
    })
}

/// DER as one PEM block, so material from the Workload API goes through the same parsing as files.
fn pem_block(label: &str, der: &[u8]) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out.into_bytes()
}

fn digest_of(parts: &[&[u8]]) -> Vec<u8> {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for p in parts {
        ctx.update(&(p.len() as u64).to_be_bytes());
        ctx.update(p);
    }
    ctx.finish().as_ref().to_vec()
}

impl Material {
    /// (digest of everything, digest of the trust material only)
    pub fn digests(&self) -> (Vec<u8>, Vec<u8>) {
        fn section<'a>(parts: &mut Vec<&'a [u8]>, tag: &'static [u8], items: &'a [(String, Vec<u8>)]) {
            parts.push(tag);
            parts.extend(items.iter().map(|(_, b)| b.as_slice()));
        }
        let mut parts: Vec<&[u8]> = Vec::new();
        section(&mut parts, b"--cas--", &self.trust);
        section(&mut parts, b"--crls--", &self.crls);
        section(&mut parts, b"--bundles--", &self.trust_bundles);
        section(&mut parts, b"--maps--", &self.bundle_maps);
        for (td, _, cas) in &self.spiffe_bundles {
            parts.push(b"--spiffe-bundle--");
            parts.push(td.as_str().as_bytes());
            parts.extend(cas.iter().map(|c| c.as_ref()));
        }
        for (td, cas, bundles) in &self.federation {
            parts.push(b"--federated--");
            parts.push(td.as_str().as_bytes());
            section(&mut parts, b"--ca--", cas);
            section(&mut parts, b"--bundle--", bundles);
        }
        let trust = digest_of(&parts);
        let mut all: Vec<&[u8]> = vec![&trust];
        // A token key changes when what names it does, or after it failed (it is found again).
        let token_name;
        match &self.identity {
            None => {}
            Some(IdentityBytes::Pem { chain, key, .. }) => all.extend([chain.as_slice(), key.as_slice()]),
            Some(IdentityBytes::Combined { pem, .. }) => all.extend([pem.as_slice(), b"--combined--".as_slice()]),
            Some(IdentityBytes::Token { chain, key }) => {
                token_name = format!(
                    "--pkcs11--{}--{}--{}--{}",
                    key.uri,
                    key.module.display(),
                    key.pin,
                    super::pkcs11::failure_epoch()
                );
                all.extend([chain.as_slice(), token_name.as_bytes()]);
            }
        }
        (digest_of(&all), trust)
    }
}

/// One trust domain's bundle as a SPIFFE bundle states it.
#[derive(Clone, Debug, Default)]
pub(crate) struct SpiffeBundle {
    pub cas: Vec<CertificateDer<'static>>,
    pub sequence: Option<u64>,
}

#[derive(serde::Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
    #[serde(default)]
    spiffe_sequence: Option<u64>,
    #[serde(default)]
    #[allow(dead_code)]
    spiffe_refresh_hint: Option<i64>,
}

#[derive(serde::Deserialize)]
struct Jwk {
    #[serde(default, rename = "use")]
    use_: Option<String>,
    #[serde(default)]
    x5c: Option<Vec<String>>,
}

/// Parses a SPIFFE bundle (JWKS): the `x509-svid` keys' certificates become CAs (each must be a
/// CA certificate); `jwt-svid` and other keys are ignored.
pub(crate) fn parse_spiffe_bundle(json: &[u8], what: &str) -> Result<SpiffeBundle, Error> {
    let jwks: Jwks = serde_json::from_slice(json)
        .map_err(|e| Error::credentials(Some(Verdict::BadPem), format!("{what}: not a SPIFFE bundle (JWKS): {e}")))?;
    jwks_to_bundle(jwks, what)
}

fn jwks_to_bundle(jwks: Jwks, what: &str) -> Result<SpiffeBundle, Error> {
    let mut cas = Vec::new();
    for (i, key) in jwks.keys.into_iter().enumerate() {
        if key.use_.as_deref() != Some("x509-svid") {
            continue;
        }
        let x5c = key.x5c.unwrap_or_default();
        if x5c.len() != 1 {
            return Err(Error::credentials(
                Some(Verdict::BadPem),
                format!(
                    "{what}: x509-svid key #{} has {} x5c entries; a SPIFFE bundle key has exactly one",
                    i + 1,
                    x5c.len()
                ),
            ));
        }
        let der = base64::engine::general_purpose::STANDARD.decode(x5c[0].as_bytes()).map_err(|e| {
            Error::credentials(
                Some(Verdict::BadPem),
                format!("{what}: x509-svid key #{}: x5c is not base64: {e}", i + 1),
            )
        })?;
        let der = CertificateDer::from(der);
        check_ca(&der, &format!("{what}, x509-svid key #{}", i + 1))?;
        cas.push(der);
    }
    if cas.is_empty() {
        return Err(Error::credentials(
            Some(Verdict::BadPem),
            format!("{what}: holds no x509-svid key (empty or truncated bundle?)"),
        ));
    }
    Ok(SpiffeBundle { cas, sequence: jwks.spiffe_sequence })
}

#[derive(serde::Deserialize)]
struct BundleMap {
    trust_domains: BTreeMap<String, Jwks>,
}

/// Parses a bundle map: `{"trust_domains": {"<trust domain>": <SPIFFE bundle>, …}}`.
pub(crate) fn parse_bundle_map(json: &[u8], what: &str) -> Result<Vec<(TrustDomain, SpiffeBundle)>, Error> {
    let map: BundleMap = serde_json::from_slice(json).map_err(|e| {
        Error::credentials(
            Some(Verdict::BadPem),
            format!("{what}: not a SPIFFE bundle map ({{\"trust_domains\": {{…}}}}): {e}"),
        )
    })?;
    let mut out = Vec::new();
    for (name, jwks) in map.trust_domains {
        let td =
            TrustDomain::parse(&name).map_err(|e| Error::credentials(Some(Verdict::BadPem), format!("{what}: {e}")))?;
        let bundle = jwks_to_bundle(jwks, &format!("{what}, trust domain {td}"))?;
        out.push((td, bundle));
    }
    Ok(out)
}

/// Our private key's file, when other users can read it: (path, mode).
#[cfg(unix)]
pub(crate) fn readable_by_others(path: &Path) -> Option<(PathBuf, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| (path.to_path_buf(), mode))
}

#[cfg(not(unix))]
pub(crate) fn readable_by_others(_path: &Path) -> Option<(PathBuf, u32)> {
    None
}
