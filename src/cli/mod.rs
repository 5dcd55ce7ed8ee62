//! The `trustwire` command: demo, dev PKI, echo server, one-off calls, probes, inspection.
// Output goes through `say!`/`note!` (see output.rs): `println!` panics on a closed pipe.
#![deny(clippy::print_stdout, clippy::print_stderr)]

#[macro_use]
mod output;
mod bench;
mod demo;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand};

use crate::credentials::pkcs11::{is_pkcs11_uri, Pkcs11KeySpec, TokenKey};
use crate::credentials::{CredentialStore, IdentitySource, PemSource, Sources, StoreOptions, Use, WorkloadApiSpec};
use crate::error::Error;
use crate::pki::{DevCa, IssueRequest, KeyType, Usage};
use crate::rpc::{CallOptions, Client, ClientOptions, Server};
use crate::tls::identity::{rfc3339, CertificateInfo};
use crate::tls::{MinVersion, Policy, TlsProfile, TrustBundle};

#[derive(Parser, Debug)]
#[command(name = "trustwire", version, about = "Mutual-TLS RPC for brpc's baidu_std protocol")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show trustwire working end to end in a temporary directory.
    Demo,
    /// A development PKI (CA and certificates) for tests and trials.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Serve brpc's example.EchoService/Echo over mTLS.
    ServeEcho {
        /// Address to listen on: HOST:PORT, or :PORT for all addresses (port 0 picks a free
        /// one; the address in use is printed).
        #[arg(long, value_name = "ADDR")]
        listen: String,
        #[command(flatten)]
        creds: Creds,
        /// Allow-list pattern (repeatable): spiffe://td/path, spiffe://td/prefix/*, dns:NAME,
        /// cn:NAME or *. Replaces the profile's allow-list (its method rules stay). Without
        /// any, every peer the CA vouches for is accepted.
        #[arg(long = "allow", value_name = "PATTERN")]
        allow: Vec<String>,
        #[command(flatten)]
        reload: ReloadArgs,
    },
    /// Run mTLS proxy routes from a config file (see the README): server side (mTLS in,
    /// plaintext to a local upstream) and client side (plaintext in on loopback, mTLS out).
    Proxy {
        /// The proxy config (TOML): [[route]] tables, each naming its own profile file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Every route takes its SVID, bundles and CRLs from the SPIFFE Workload API at ADDR
        /// (unix:///path, tcp://IP:PORT or env) instead of its profile's [identity].
        #[arg(long, value_name = "ADDR")]
        workload_api: Option<String>,
    },
    /// Make one call and print the response or the error's verdict.
    Call {
        /// The server, HOST:PORT.
        addr: String,
        /// SERVICE/METHOD, e.g. example.EchoService/Echo
        target: String,
        #[command(flatten)]
        creds: Creds,
        #[command(flatten)]
        server: ServerCheck,
        /// Send an EchoRequest with this message and print the EchoResponse's message.
        #[arg(long, value_name = "TEXT", conflicts_with = "payload_file")]
        echo: Option<String>,
        /// Send this file's bytes as the payload and write the response payload to stdout.
        #[arg(long, value_name = "FILE")]
        payload_file: Option<PathBuf>,
        /// Send TEXT as the request's attachment (the response's goes to stderr).
        #[arg(long, value_name = "TEXT")]
        attachment: Option<String>,
        /// Give up on the call after this many milliseconds (connecting included).
        #[arg(long, value_name = "MS", default_value_t = 5000)]
        timeout_ms: u64,
        /// Send this log_id in the request meta (brpc logs it with the call).
        #[arg(long, value_name = "N")]
        log_id: Option<i64>,
    },
    /// Load-test SERVICE/METHOD on any baidu_std server (brpc's rpc_press): calls/s, latency
    /// percentiles and errors by verdict; exits 1 when any call failed.
    Bench(Box<bench::BenchArgs>),
    /// Handshake only: show what was negotiated and who the server is, or the verdict.
    Probe {
        /// The server, HOST:PORT.
        addr: String,
        #[command(flatten)]
        creds: Creds,
        #[command(flatten)]
        server: ServerCheck,
    },
    /// Show the identities, validity, key type and fingerprint of each certificate in a file.
    Inspect {
        /// A PEM file of one or more certificates.
        file: PathBuf,
    },
}

// Parsed once per run: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum PkiCommand {
    /// Create a CA: writes DIR/ca.pem and DIR/ca.key.
    Init {
        /// Directory to write the CA into (created if missing).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The SPIFFE trust domain the CA is for; `pki issue` names certificates inside it.
        #[arg(long, value_name = "DOMAIN", default_value = "example.org")]
        trust_domain: String,
        /// Replace a CA already in DIR. Every certificate it issued stops being trusted by
        /// whoever trusts the new one.
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate: writes DIR/NAME.pem and DIR/NAME.key.
    Issue {
        /// Directory holding the CA (from `pki init`); the certificate is written there.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The certificate's name: its subject CN and the file names NAME.pem and NAME.key.
        #[arg(long, value_name = "NAME")]
        name: String,
        /// The certificate's SPIFFE ID (default: spiffe://<the CA's trust domain>/ns/default/NAME).
        #[arg(long, value_name = "ID")]
        spiffe_id: Option<String>,
        /// Add a DNS name SAN (repeatable), e.g. for a server dialled by name.
        #[arg(long, value_name = "NAME")]
        dns: Vec<String>,
        /// Add an IP address SAN (repeatable), e.g. 127.0.0.1.
        #[arg(long, value_name = "ADDRESS")]
        ip: Vec<IpAddr>,
        /// Days the certificate is valid for (at least 1).
        #[arg(long, value_name = "N", default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
        days: u32,
        /// What the certificate may be used for: both, server or client.
        #[arg(long, value_name = "USE", default_value = "both")]
        usage: String,
        /// Key algorithm: p256, p384, ed25519 or rsa2048.
        #[arg(long, value_name = "TYPE", default_value = "p256", conflicts_with = "key")]
        key_type: String,
        /// Certify a key that stays on a PKCS#11 token instead of a fresh one: a URI such as
        /// pkcs11:token=svc;object=echo-key (with --pkcs11-module and a PIN flag). Only
        /// DIR/NAME.pem is written.
        #[arg(long, value_name = "URI")]
        key: Option<String>,
        #[command(flatten)]
        pkcs11: Pkcs11Flags,
    },
}

/// The token of a `--key pkcs11:…`.
#[derive(Args, Debug, Clone, Default)]
struct Pkcs11Flags {
    /// The PKCS#11 module (shared library) of the token holding --key pkcs11:…, e.g.
    /// /usr/lib/softhsm/libsofthsm2.so.
    #[arg(long, value_name = "FILE")]
    pkcs11_module: Option<PathBuf>,
    /// Read the token's user PIN from FILE.
    #[arg(long, value_name = "FILE", conflicts_with = "pkcs11_pin_env")]
    pkcs11_pin_file: Option<PathBuf>,
    /// Read the token's user PIN from the environment variable VAR.
    #[arg(long, value_name = "VAR")]
    pkcs11_pin_env: Option<String>,
}

impl Pkcs11Flags {
    fn given(&self) -> bool {
        self.pkcs11_module.is_some() || self.pkcs11_pin_file.is_some() || self.pkcs11_pin_env.is_some()
    }

    /// The token key `uri` names, on the module and with the PIN these flags give.
    fn spec(&self, uri: &str) -> Result<Pkcs11KeySpec, Error> {
        let Some(module) = &self.pkcs11_module else {
            return Err(Error::config(format!("--key {uri} needs --pkcs11-module FILE (the token's PKCS#11 library)")));
        };
        let section = crate::profile::Pkcs11Section {
            module: module.clone(),
            pin_file: self.pkcs11_pin_file.clone(),
            pin_env: self.pkcs11_pin_env.clone(),
            sessions: None,
        };
        section.key_spec(uri, Path::to_path_buf).map_err(|e| match e {
            Error::Config { message } if message.contains("PIN's source") => Error::config(format!(
                "--key {uri} needs the token's PIN: --pkcs11-pin-file FILE or --pkcs11-pin-env VAR"
            )),
            other => other,
        })
    }
}

/// How a long-running command picks up new credentials. Files are always watched; SIGHUP
/// reloads at once.
#[derive(Args, Debug, Clone)]
struct ReloadArgs {
    /// Also re-read the credential files every SECS seconds (a fallback where file change
    /// notification does not work, e.g. some network file systems).
    #[arg(long, value_name = "SECS")]
    reload_interval: Option<u64>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
}

/// Where credentials come from: a profile file, completed and overridden by flags.
#[derive(Args, Debug, Clone)]
struct Creds {
    /// A profile file (TOML, see the README). Each flag below replaces the one setting it names
    /// and completes what the file leaves out; everything else in the file stays in force.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Our certificate chain (PEM, leaf first); with --key, replaces the profile's [identity].
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// Our private key (PEM), with --cert; or a key that stays on a PKCS#11 token, as a URI
    /// (pkcs11:token=svc;object=echo-key) with --pkcs11-module and --pkcs11-pin-file/-env.
    #[arg(long, value_name = "FILE|URI", requires = "cert")]
    key: Option<PathBuf>,
    #[command(flatten)]
    pkcs11: Pkcs11Flags,
    /// Take our SVID and key, our trust domain's bundle, federated bundles and CRLs from the
    /// SPIFFE Workload API at ADDR (a SPIRE agent): unix:///path, tcp://IP:PORT, or env
    /// ($SPIFFE_ENDPOINT_SOCKET). Replaces the profile's [identity]; rotates as the agent pushes.
    #[arg(long, value_name = "ADDR", conflicts_with = "cert")]
    workload_api: Option<String>,
    /// With --workload-api: our SVID is the one with this SPIFFE ID (default: the first).
    #[arg(long, value_name = "ID", requires = "workload_api", conflicts_with = "svid_hint")]
    svid: Option<String>,
    /// With --workload-api: our SVID is the one the agent labels with this hint.
    #[arg(long, value_name = "HINT", requires = "workload_api")]
    svid_hint: Option<String>,
    /// Trusted CA certificates (PEM file or directory; repeatable). With --config, replaces the
    /// profile's CA list only: its CRLs and other trust settings stay in force.
    #[arg(long, value_name = "PATH")]
    ca: Vec<PathBuf>,
    /// Also accept TLS 1.2 (TLS 1.3 only by default).
    #[arg(long)]
    tls12: bool,
}

/// The flags a client command adds on top of [`Creds`].
#[derive(Args, Debug, Clone, Default)]
struct ServerCheck {
    /// Verify the server's certificate for NAME and send it as SNI (default: the profile's
    /// [client] server_name, else the host in ADDR).
    #[arg(long, value_name = "NAME")]
    server_name: Option<String>,
    /// Also require the server's SPIFFE ID to be exactly ID (replaces the profile's
    /// [client] server_spiffe_id).
    #[arg(long, value_name = "ID")]
    server_spiffe_id: Option<String>,
}

/// What a command adds to the credentials beyond [`Creds`].
#[derive(Default)]
struct Extra<'a> {
    /// `serve-echo --allow`: replaces the profile's allow-list (its method rules stay).
    allow: &'a [String],
    server: Option<&'a ServerCheck>,
}

impl Creds {
    /// The one place where a profile file and the flags become what a command runs with. Every
    /// command goes through here, so a flag means the same everywhere: it replaces the setting
    /// it names, and completeness is checked after all flags are applied.
    fn resolve(&self, role: Use, extra: &Extra<'_>) -> Result<(Sources, TlsProfile), Error> {
        let (mut sources, mut settings) = match &self.config {
            Some(path) => {
                let file = crate::profile::ProfileFile::load(path)?;
                (file.sources()?, file.settings()?)
            }
            None => (Sources::default(), TlsProfile::new(None, TrustBundle::default())),
        };
        if !self.ca.is_empty() {
            sources.trust = self.ca.iter().cloned().map(PemSource::Path).collect();
        }
        if let (Some(chain), Some(key)) = (&self.cert, &self.key) {
            sources.identity = match key.to_str().filter(|k| is_pkcs11_uri(k)) {
                Some(uri) => IdentitySource::Pkcs11 { chain: chain.clone(), key: Box::new(self.pkcs11.spec(uri)?) },
                None if self.pkcs11.given() => {
                    return Err(Error::config(
                        "--pkcs11-module and --pkcs11-pin-* go with --key pkcs11:…, not with a key file",
                    ))
                }
                None => IdentitySource::Files { chain: chain.clone(), key: key.clone() },
            };
            sources.workload_api = None;
        } else if self.pkcs11.given() {
            return Err(Error::config("--pkcs11-module and --pkcs11-pin-* go with --cert FILE --key pkcs11:…"));
        }
        if let Some(addr) = &self.workload_api {
            sources.identity = IdentitySource::None;
            let names = ["--workload-api", "--svid", "--svid-hint"];
            sources.workload_api =
                Some(WorkloadApiSpec::from_parts(addr, self.svid.as_deref(), self.svid_hint.as_deref(), names)?);
        }
        if self.tls12 {
            settings.min_version = MinVersion::Tls12;
        }
        if !extra.allow.is_empty() {
            settings.policy = Policy { allow: Policy::from_patterns(extra.allow)?.allow, ..settings.policy };
        }
        if let Some(check) = extra.server {
            if check.server_name.is_some() {
                settings.server_name = check.server_name.clone();
            }
            if check.server_spiffe_id.is_some() {
                settings.server_spiffe_id = check.server_spiffe_id.clone();
            }
        }
        let no_trust = sources.trust.is_empty()
            && sources.trust_bundles.is_empty()
            && sources.bundle_maps.is_empty()
            && sources.federation.is_empty()
            && sources.workload_api.is_none();
        if no_trust {
            return Err(Error::config(match &self.config {
                Some(p) => format!(
                    "no trusted CAs: give --ca FILE or --workload-api ADDR, or list them in [trust] ca of {}",
                    p.display()
                ),
                None => "no trusted CAs: give --ca FILE, --workload-api ADDR or --config FILE".to_string(),
            }));
        }
        if role == Use::Server && matches!(sources.identity, IdentitySource::None) && sources.workload_api.is_none() {
            return Err(Error::config(
                "a server needs its certificate: give --cert FILE --key FILE, --workload-api ADDR, or a --config \
                 profile with [identity]",
            ));
        }
        Ok((sources, settings))
    }

    /// A credential store for what [`Creds::resolve`] gives: the same loading and checks (CRLs
    /// included) for a one-off call as for a server.
    fn store(&self, role: Use, extra: &Extra<'_>, options: StoreOptions) -> Result<CredentialStore, Error> {
        let (sources, settings) = self.resolve(role, extra)?;
        CredentialStore::new(role, sources, settings, options)
    }

    /// The store of a one-off client command: loaded once, never watched.
    fn client_store(&self, name: &str, server: &ServerCheck) -> Result<CredentialStore, Error> {
        let options = StoreOptions {
            name: name.to_string(),
            watch: false,
            poll_interval: None,
            reload_interval: None,
            ..StoreOptions::default()
        };
        self.store(Use::Client, &Extra { server: Some(server), ..Extra::default() }, options)
    }
}

/// Runs the command line; the `trustwire` binary and the Python entry point both call this.
pub fn main_with_args<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    ExitCode::from(status_with_args(args))
}

/// [`main_with_args`] returning the exit status as a number, for embedders that cannot take an
/// `ExitCode` apart (the Python console script hands it to `sys.exit`).
pub fn status_with_args<I, T>(args: I) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    let default_level = match cli.command {
        Command::ServeEcho { .. } | Command::Proxy { .. } => "info",
        _ => "warn",
    };
    init_logging(default_level);
    let rt = crate::runtime::runtime();
    // `bench` prints its own report, failures included, and then only sets the exit status.
    let mut status_if_ok = 0;
    let result = match cli.command {
        Command::Demo => rt.block_on(demo::run()),
        Command::Pki(cmd) => pki(cmd),
        Command::ServeEcho { listen, creds, allow, reload } => rt.block_on(serve_echo(listen, creds, allow, reload)),
        Command::Call { addr, target, creds, server, echo, payload_file, attachment, timeout_ms, log_id } => rt
            .block_on(call(CallArgs {
                addr,
                target,
                creds,
                server,
                echo,
                payload_file,
                attachment,
                timeout: Duration::from_millis(timeout_ms),
                log_id,
            })),
        Command::Proxy { config, workload_api } => rt.block_on(proxy(config, workload_api)),
        Command::Probe { addr, creds, server } => rt.block_on(probe(addr, creds, server)),
        Command::Bench(args) => rt.block_on(bench::run(*args)).map(|clean| {
            if !clean {
                status_if_ok = 1;
            }
        }),
        Command::Inspect { file } => inspect(&file),
    };
    let status = match result {
        Ok(()) => status_if_ok,
        Err(e) => {
            note!("{}", describe_error(&e));
            match e {
                Error::Config { .. } => 2,
                _ => 1,
            }
        }
    };
    match output::stdout_error() {
        Some(e) if status == 0 => {
            note!("error: cannot write the output: {e}");
            1
        }
        _ => status,
    }
}

fn init_logging(default_level: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("TRUSTWIRE_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("trustwire={default_level},warn")));
    // Colour codes only for a person at a terminal: in a file or a log collector they are noise.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
}

/// `error [verdict] (who decided): message` or `error (kind): message`, the one shape every
/// failure is printed in. The error's own prefix ("handshake failed [x]") is left out: the
/// verdict and kind are already in front.
pub(crate) fn describe_error(e: &Error) -> String {
    let (context, message) = parts(e);
    match e.verdict() {
        Some(v) => format!("error [{v}] ({context}): {message}"),
        None => format!("error ({context}): {message}"),
    }
}

/// What kind of failure, or who decided, and the message without the kind's prefix.
fn parts(e: &Error) -> (String, String) {
    match e {
        Error::Handshake { side, alert, message, .. } => {
            let alert = alert.map(|a| format!(", alert {a}")).unwrap_or_default();
            (format!("{side}{alert}"), message.clone())
        }
        Error::Rpc { .. } => ("rpc".into(), e.to_string()),
        Error::Timeout { after, message } => (format!("timed out after {}ms", after.as_millis()), message.clone()),
        Error::Transport { message } => ("transport".into(), message.clone()),
        Error::Protocol { message } => ("protocol".into(), message.clone()),
        Error::Credentials { message, .. } => ("credentials rejected".into(), message.clone()),
        Error::Config { message } => ("invalid configuration".into(), message.clone()),
        Error::Shutdown { message } => ("shut down".into(), message.clone()),
    }
}

/// `[verdict]: message` for a one-line report after a prefix of the caller's.
fn short_error(e: &Error) -> String {
    let (context, message) = parts(e);
    format!("[{}] {message}", e.verdict().map(|v| v.name().to_string()).unwrap_or(context))
}

fn pki(cmd: PkiCommand) -> Result<(), Error> {
    match cmd {
        PkiCommand::Init { dir, trust_domain, force } => {
            if !valid_trust_domain(&trust_domain) {
                return Err(Error::config(format!(
                    "--trust-domain '{trust_domain}': a trust domain is lowercase letters, digits, '.', '-' and '_' \
                     (e.g. example.org)"
                )));
            }
            let existing: Vec<PathBuf> =
                ["ca.pem", "ca.key"].iter().map(|f| dir.join(f)).filter(|p| p.exists()).collect();
            if !existing.is_empty() && !force {
                // A new CA orphans every certificate the old one issued.
                return Err(Error::config(format!(
                    "{} already holds a CA ({}); pass --force to replace it (certificates it issued will no \
                     longer be trusted by whoever trusts the new one)",
                    dir.display(),
                    existing.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                )));
            }
            let ca = DevCa::new(&trust_domain)?;
            ca.write(&dir)?;
            say!("wrote {} and {}", dir.join("ca.pem").display(), dir.join("ca.key").display());
        }
        PkiCommand::Issue { dir, name, spiffe_id, dns, ip, days, usage, key_type, key, pkcs11 } => {
            if name.contains('/') || name.contains("..") || name.is_empty() || name == "." {
                return Err(Error::config(format!("--name '{name}' must be a plain file name")));
            }
            let ca = DevCa::load(&dir)?;
            let trust_domain = ca_trust_domain(&ca);
            let spiffe_id = match (spiffe_id, &trust_domain) {
                (Some(id), Some(td)) => {
                    if spiffe_trust_domain(&id).is_some_and(|t| !t.eq_ignore_ascii_case(td)) {
                        note!(
                            "warning: {id} is outside the CA's trust domain {td}; peers that verify SPIFFE trust \
                             domains will refuse it"
                        );
                    }
                    id
                }
                (Some(id), None) => id,
                (None, Some(td)) if valid_path_segment(&name) => format!("spiffe://{td}/ns/default/{name}"),
                (None, Some(_)) => {
                    return Err(Error::config(format!(
                        "--name '{name}' cannot be a SPIFFE ID path segment (letters, digits, '.', '-', '_'); \
                         give --spiffe-id"
                    )))
                }
                (None, None) => {
                    return Err(Error::config(format!(
                        "the CA in {} does not say its trust domain; give --spiffe-id",
                        dir.display()
                    )))
                }
            };
            let mut req = IssueRequest::new(&name).usage(Usage::parse(&usage)?).key_type(KeyType::parse(&key_type)?);
            req.spiffe_id = Some(spiffe_id.clone());
            req.dns = dns;
            req.ips = ip;
            req.days = days;
            match key {
                Some(uri) if is_pkcs11_uri(&uri) => {
                    let token_key = TokenKey::open(&pkcs11.spec(&uri)?, None)?;
                    let pem = ca.issue_for_public_key(&req, token_key.public_key_der())?;
                    let cert = dir.join(format!("{name}.pem"));
                    crate::pki::write_atomic(&cert, pem.as_bytes(), false)?;
                    say!("wrote {} for {spiffe_id}, certifying the token key {uri}", cert.display());
                }
                Some(other) => {
                    return Err(Error::config(format!("--key '{other}' must be a pkcs11: URI (a token key)")));
                }
                None if pkcs11.given() => {
                    return Err(Error::config("--pkcs11-module and --pkcs11-pin-* go with --key pkcs11:…"));
                }
                None => {
                    let (cert, key) = ca.issue(&req)?.write(&dir, &name)?;
                    say!("wrote {} and {} for {spiffe_id}", cert.display(), key.display());
                }
            }
        }
    }
    Ok(())
}

/// SPIFFE: a trust domain is lowercase letters, digits, dots, dashes and underscores.
fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty() && td.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// SPIFFE: a path segment is letters, digits, dots, dashes and underscores, and not `.` or `..`.
fn valid_path_segment(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn spiffe_trust_domain(id: &str) -> Option<&str> {
    let rest = id.get(..9).filter(|p| p.eq_ignore_ascii_case("spiffe://")).map(|_| &id[9..])?;
    Some(rest.split('/').next().unwrap_or(rest))
}

/// The trust domain a CA is for: its own SPIFFE ID when it has one, else the one `pki init`
/// writes into its name ("trustwire dev CA <domain> <id>").
fn ca_trust_domain(ca: &DevCa) -> Option<String> {
    let der = crate::tls::parse_certs(ca.cert_pem().as_bytes(), "ca.pem").ok()?.into_iter().next()?;
    let id = CertificateInfo::from_der(&der).ok()?.identity;
    if let Some(td) = id.spiffe_id.as_deref().and_then(spiffe_trust_domain) {
        return Some(td.to_ascii_lowercase());
    }
    let cn = id.common_name?;
    let mut words = cn.strip_prefix("trustwire dev CA ")?.split(' ');
    words.next().filter(|td| valid_trust_domain(td)).map(str::to_string)
}

async fn serve_echo(listen: String, creds: Creds, allow: Vec<String>, reload: ReloadArgs) -> Result<(), Error> {
    let options = StoreOptions {
        name: "serve-echo".into(),
        reload_interval: reload.reload_interval.map(Duration::from_secs),
        ..StoreOptions::default()
    };
    let store = creds.store(Use::Server, &Extra { allow: &allow, ..Extra::default() }, options)?;
    let tls = store.server_tls()?;
    if tls.policy().allow.is_empty() {
        tracing::warn!("no allow-list: any peer whose certificate the trust bundle verifies may connect");
    }
    let metrics = match &reload.metrics {
        Some(addr) => Some(crate::telemetry::serve_metrics(addr).await?),
        None => None,
    };
    let mut server = Server::new(tls);
    crate::echo::register(&mut server);
    // Listen for signals before announcing the server: a SIGTERM sent as soon as it is up must
    // stop it gracefully, not kill it with the default action.
    let mut signals = Signals::new();
    let running = server.bind(&listen_address(&listen)).await?;
    say!("serving example.EchoService/Echo with mTLS on {}", running.local_addr());
    if let Some(m) = &metrics {
        say!("metrics on http://{}/metrics", m.local_addr());
    }
    while let Signal::Reload = signals.next().await {
        match store.reload() {
            Ok(generation) => note!("SIGHUP: credentials generation {generation} in service"),
            Err(e) => note!("SIGHUP: reload refused, previous generation stays: {}", short_error(&e)),
        }
    }
    // Progress goes to stderr: stdout may be a pipe whose reader only wanted the address.
    note!("stopping: finishing calls in flight");
    running.shutdown().await;
    Ok(())
}

/// `:PORT` means every address of the host: IPv6 and, dual-stack, IPv4 (`[::]`), or IPv4 alone
/// where the host has no IPv6.
fn listen_address(listen: &str) -> String {
    match listen.strip_prefix(':') {
        Some(port) if std::net::TcpListener::bind("[::]:0").is_ok() => format!("[::]:{port}"),
        Some(port) => format!("0.0.0.0:{port}"),
        None => listen.to_string(),
    }
}

async fn proxy(config: PathBuf, workload_api: Option<String>) -> Result<(), Error> {
    let mut file = crate::proxy::config::ProxyFile::load(&config)?;
    let names = ["--workload-api", "", ""];
    file.workload_api = workload_api.map(|a| WorkloadApiSpec::from_parts(&a, None, None, names)).transpose()?;
    let metrics = match &file.metrics {
        Some(addr) => Some(crate::telemetry::serve_metrics(addr).await?),
        None => None,
    };
    let mut signals = Signals::new();
    let (running, stores): (Vec<_>, Vec<_>) = file.start().await?.into_iter().unzip();
    for r in &running {
        say!("route {}: listening on {}", r.name(), r.local());
    }
    if let Some(m) = &metrics {
        say!("metrics on http://{}/metrics", m.local_addr());
    }
    while let Signal::Reload = signals.next().await {
        for store in &stores {
            match store.reload() {
                Ok(g) => note!("SIGHUP: route {}: credentials generation {g} in service", store.name()),
                Err(e) => note!(
                    "SIGHUP: route {}: reload refused, previous generation stays: {}",
                    store.name(),
                    short_error(&e)
                ),
            }
        }
    }
    note!("draining: open streams may finish for {}s", file.drain().as_secs());
    let drain = file.drain();
    // All routes drain at once, under one deadline.
    let draining: Vec<_> = running.into_iter().map(|r| tokio::spawn(r.shutdown(drain))).collect();
    for d in draining {
        let _ = d.await;
    }
    Ok(())
}

enum Signal {
    Stop,
    Reload,
}

/// SIGTERM or Ctrl-C (stop) and SIGHUP (reload credentials), listened for from creation on so
/// that no signal in between two waits is lost.
struct Signals {
    #[cfg(unix)]
    unix: Option<[tokio::signal::unix::Signal; 3]>,
}

impl Signals {
    /// Must be called inside the runtime.
    fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let streams = (|| {
                Ok::<_, std::io::Error>([
                    signal(SignalKind::terminate())?,
                    signal(SignalKind::interrupt())?,
                    signal(SignalKind::hangup())?,
                ])
            })();
            match streams {
                Ok(s) => Signals { unix: Some(s) },
                Err(e) => {
                    tracing::warn!("cannot watch SIGTERM/SIGHUP ({e}); stopping on Ctrl-C only");
                    Signals { unix: None }
                }
            }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    async fn next(&mut self) -> Signal {
        #[cfg(unix)]
        if let Some([term, int, hup]) = &mut self.unix {
            return tokio::select! {
                _ = term.recv() => Signal::Stop,
                _ = int.recv() => Signal::Stop,
                _ = hup.recv() => Signal::Reload,
            };
        }
        let _ = tokio::signal::ctrl_c().await;
        Signal::Stop
    }
}

struct CallArgs {
    addr: String,
    target: String,
    creds: Creds,
    server: ServerCheck,
    echo: Option<String>,
    payload_file: Option<PathBuf>,
    attachment: Option<String>,
    timeout: Duration,
    log_id: Option<i64>,
}

async fn call(a: CallArgs) -> Result<(), Error> {
    let (service, method) =
        a.target.split_once('/').ok_or_else(|| Error::config(format!("'{}': write SERVICE/METHOD", a.target)))?;
    let store = a.creds.client_store("call", &a.server)?;
    let payload = match (&a.echo, &a.payload_file) {
        (Some(text), _) => crate::echo::encode(text),
        (None, Some(f)) => std::fs::read(f).map_err(|e| Error::config(format!("cannot read {}: {e}", f.display())))?,
        (None, None) => Vec::new(),
    };
    let client = Client::new(&a.addr, store.client_tls()?, ClientOptions::default());
    let opts = CallOptions {
        timeout: Some(a.timeout),
        attachment: a.attachment.clone().unwrap_or_default().into(),
        log_id: a.log_id,
        request_id: None,
    };
    let resp = client.call(service, method, payload, opts).await?;
    if a.echo.is_some() {
        match crate::echo::decode(&resp.payload) {
            Ok(text) => say!("{text}"),
            Err(e) => return Err(Error::Protocol { message: format!("response is not an EchoResponse: {e}") }),
        }
    } else {
        output::stdout_bytes(&resp.payload);
    }
    if !resp.attachment.is_empty() {
        note!("attachment: {}", String::from_utf8_lossy(&resp.attachment));
    }
    Ok(())
}

async fn probe(addr: String, creds: Creds, server: ServerCheck) -> Result<(), Error> {
    use tokio::io::AsyncReadExt;
    let store = creds.client_store("probe", &server)?;
    let has_identity = store.generation().certificate.is_some();
    let tls = store.client_tls()?;
    let (mut stream, info) = crate::transport::connect(&tls, &addr, Duration::from_secs(5)).await?;
    say!("connected to {addr}");
    say!("  protocol      {}", info.version);
    say!("  cipher suite  {}", info.cipher_suite);
    say!("  key exchange  {}", info.kx_group.as_deref().unwrap_or("?"));
    say!("  server chain:");
    for (i, der) in info.peer_chain.iter().enumerate() {
        match CertificateInfo::from_der(der) {
            Ok(c) => print_cert(i, &c, "    "),
            Err(e) => say!("    [{i}] unreadable: {e}"),
        }
    }
    // In TLS 1.3 the server judges our certificate after our side has finished; its verdict
    // arrives as an alert, or not at all if it accepted us.
    let mut byte = [0u8; 1];
    match tokio::time::timeout(Duration::from_millis(500), stream.read(&mut byte)).await {
        Ok(Err(e)) => return Err(crate::transport::stream_error(&e, None)),
        Ok(Ok(0)) if has_identity => {
            say!("  the server closed the connection after the handshake");
        }
        _ if has_identity => say!("  client certificate: accepted"),
        _ => say!("  client certificate: none sent (the server will refuse calls)"),
    }
    Ok(())
}

fn inspect(file: &Path) -> Result<(), Error> {
    let pem = std::fs::read(file).map_err(|e| Error::config(format!("cannot read {}: {e}", file.display())))?;
    let certs = crate::tls::parse_certs(&pem, &file.display().to_string())?;
    for (i, der) in certs.iter().enumerate() {
        print_cert(i, &CertificateInfo::from_der(der)?, "");
    }
    Ok(())
}

fn print_cert(i: usize, c: &CertificateInfo, indent: &str) {
    let id = &c.identity;
    let now = SystemTime::now();
    let state = if now > id.not_after {
        "EXPIRED".to_string()
    } else if now < id.not_before {
        "NOT YET VALID".to_string()
    } else {
        let left = id.not_after.duration_since(now).unwrap_or_default().as_secs();
        format!("valid, {}d {}h left", left / 86_400, (left % 86_400) / 3600)
    };
    say!("{indent}[{i}] {}", id.subject);
    say!("{indent}    issuer       {}", id.issuer);
    if let Some(s) = &id.spiffe_id {
        say!("{indent}    spiffe id    {s}");
    }
    if !id.names().is_empty() {
        say!("{indent}    names        {}", id.names().join(", "));
    }
    say!("{indent}    validity     {} .. {} ({state})", rfc3339(id.not_before), rfc3339(id.not_after));
    say!("{indent}    key          {}{}", c.key_type, if c.is_ca { ", CA" } else { "" });
    if !c.extended_key_usage.is_empty() {
        say!("{indent}    usage        {}", c.extended_key_usage.join(", "));
    }
    say!("{indent}    serial       {}", id.serial);
    say!("{indent}    sha256       {}", id.fingerprint_sha256);
}
