//! Identities whose private key stays on a PKCS#11 token (SoftHSM2), through the `trustwire`
//! command: serving and calling with token keys, interop with `openssl s_client` and Python's
//! `ssl` against a token-keyed server, refusals that name the problem, rotation to a new
//! certificate and key object under load, and a token that goes away.
//!
//! Each test makes its own token store in a temporary directory (SOFTHSM2_CONF) and generates
//! its keys on the token, so no identity private key is ever written to a file; the tests check
//! that. Token work runs in child processes: a PKCS#11 module reads its configuration once per
//! process. The tests skip (loudly) when SoftHSM2 or pkcs11-tool is absent, and fail instead
//! when TRUSTWIRE_REQUIRE_PEERS=1; scripts/deps.sh installs them.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::peers::*;
use common::*;
use trustwire::pki::DevCa;
use trustwire::rpc::{CallOptions, Client, ClientOptions};
use trustwire::tls::{Identity, TlsProfile, TrustBundle};

const PIN: &str = "246810";

fn module() -> Option<PathBuf> {
    if !tool_available(Command::new("softhsm2-util").arg("--version"), "SoftHSM2 (`softhsm2-util`, PKCS#11 tests)")
        || !tool_available(
            Command::new("sh").args(["-c", "command -v pkcs11-tool"]),
            "OpenSC's `pkcs11-tool` (PKCS#11 tests)",
        )
    {
        return None;
    }
    let found = std::env::var_os("TRUSTWIRE_SOFTHSM_MODULE").map(PathBuf::from).into_iter().chain(
        [
            "/usr/lib/softhsm/libsofthsm2.so",
            "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
            "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
            "/usr/local/lib/softhsm/libsofthsm2.so",
            "/usr/lib64/pkcs11/libsofthsm2.so",
        ]
        .map(PathBuf::from),
    );
    let module = found.into_iter().find(|p| p.exists());
    if module.is_none() {
        let message = "libsofthsm2.so was not found (set TRUSTWIRE_SOFTHSM_MODULE); run scripts/deps.sh";
        assert!(std::env::var_os("TRUSTWIRE_REQUIRE_PEERS").is_none(), "{message}");
        let _ = writeln!(std::io::stderr(), "\n!!!!!!!! SKIPPED: {message} !!!!!!!!\n");
    }
    module
}

/// A SoftHSM2 token store of one test: its configuration, tokens and everything the test
/// writes (certificates, the PIN file) live in `dir`. The CA lives apart, in `ca_dir`.
struct Hsm {
    dir: tempfile::TempDir,
    ca_dir: tempfile::TempDir,
    ca: DevCa,
    module: PathBuf,
}

impl Hsm {
    fn new() -> Option<Hsm> {
        let module = module()?;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tokens")).unwrap();
        std::fs::write(
            dir.path().join("softhsm2.conf"),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                dir.path().join("tokens").display()
            ),
        )
        .unwrap();
        std::fs::write(dir.path().join("pin"), format!("{PIN}\n")).unwrap();
        let ca_dir = tempfile::tempdir().unwrap();
        let ca = DevCa::new(TD).unwrap();
        ca.write(ca_dir.path()).unwrap();
        Some(Hsm { dir, ca_dir, ca, module })
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    fn ca_pem(&self) -> PathBuf {
        self.ca_dir.path().join("ca.pem")
    }

    fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        c.env("SOFTHSM2_CONF", self.path("softhsm2.conf")).env_remove("TW_TOKEN_PIN");
        c
    }

    fn run(&self, c: &mut Command) -> Output {
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{c:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn init_token(&self, label: &str) {
        self.run(
            self.cmd("softhsm2-util")
                .args(["--init-token", "--free", "--label", label, "--so-pin", "13579"])
                .args(["--pin", PIN]),
        );
    }

    /// Generates a key pair on the token (`EC:prime256v1`, `EC:secp384r1`, `rsa:2048`).
    fn keygen(&self, token: &str, label: &str, id: &str, key_type: &str) {
        self.run(
            self.cmd("pkcs11-tool")
                .arg("--module")
                .arg(&self.module)
                .args(["--token-label", token, "--login", "--pin", PIN, "--keypairgen", "--key-type", key_type])
                .args(["--label", label, "--id", id]),
        );
    }

    fn token_args(&self) -> Vec<String> {
        vec![
            "--pkcs11-module".into(),
            self.module.display().to_string(),
            "--pkcs11-pin-file".into(),
            self.path("pin").display().to_string(),
        ]
    }

    /// A certificate for the token key `uri`, issued by the CA from the key's public half,
    /// written to `file` in the test's directory (replacing it atomically).
    fn certify(&self, name: &str, uri: &str, file: &str, extra: &[&str]) -> String {
        let staged = self.ca_dir.path().join(format!("{name}.pem"));
        let _ = std::fs::remove_file(&staged);
        self.run(
            self.cmd(trustwire_bin())
                .args(["pki", "issue", "--dir"])
                .arg(self.ca_dir.path())
                .args(["--name", name, "--key", uri])
                .args(self.token_args())
                .args(extra),
        );
        let pem = std::fs::read_to_string(&staged).unwrap();
        let tmp = self.path(&format!("{file}.tmp"));
        std::fs::write(&tmp, &pem).unwrap();
        std::fs::rename(&tmp, self.path(file)).unwrap();
        pem
    }

    /// A certificate and key from files, for peers that are not on the token.
    fn file_credential(&self, name: &str) -> (PathBuf, PathBuf) {
        let c = self
            .ca
            .issue(&trustwire::pki::IssueRequest::new(name).spiffe_id(format!("spiffe://{TD}/ns/test/{name}")))
            .unwrap();
        c.write(self.ca_dir.path(), name).unwrap();
        (self.ca_dir.path().join(format!("{name}.pem")), self.ca_dir.path().join(format!("{name}.key")))
    }

    fn serve(&self, cert: &str, uri: &str, extra: &[&str]) -> (Proc, String) {
        let mut server = Proc::spawn(
            self.cmd(trustwire_bin())
                .args(["serve-echo", "--listen", "127.0.0.1:0", "--cert"])
                .arg(self.path(cert))
                .args(["--key", uri])
                .args(self.token_args())
                .arg("--ca")
                .arg(self.ca_pem())
                .args(extra),
        );
        let addr = server.wait_for("the listening address", |out, _| {
            let out = String::from_utf8_lossy(out);
            out.lines()
                .find_map(|l| l.strip_prefix("serving example.EchoService/Echo with mTLS on ").map(str::to_string))
        });
        (server, addr)
    }

    /// No identity private key was written: nothing outside the token store holds a private
    /// key, and the CA's directory holds the CA's key alone.
    fn assert_no_key_files(&self) {
        let mut stack = vec![self.dir.path().to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p == self.path("tokens") {
                    continue;
                }
                if p.is_dir() {
                    stack.push(p);
                    continue;
                }
                let bytes = std::fs::read(&p).unwrap();
                assert!(
                    !String::from_utf8_lossy(&bytes).contains("PRIVATE KEY")
                        && p.extension().is_none_or(|x| x != "key"),
                    "{} holds a private key",
                    p.display()
                );
            }
        }
        let mut keys: Vec<String> = std::fs::read_dir(self.ca_dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".key"))
            .collect();
        keys.sort();
        keys.retain(|k| k != "ca.key" && !k.starts_with("file-"));
        assert!(keys.is_empty(), "key files written: {keys:?}");
    }
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn serial_of(pem: &str) -> String {
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes()).unwrap();
    trustwire::tls::CertificateInfo::from_der(&der).unwrap().identity.serial
}

fn scrape(metrics: &str) -> String {
    let mut sock = std::net::TcpStream::connect(metrics).unwrap();
    sock.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    sock.read_to_string(&mut body).unwrap();
    body
}

fn metrics_addr(server: &mut Proc) -> String {
    server.wait_for("the metrics address", |out, _| {
        let out = String::from_utf8_lossy(out);
        out.lines()
            .find_map(|l| l.strip_prefix("metrics on http://").map(|a| a.trim_end_matches("/metrics").to_string()))
    })
}

/// A server and a client whose keys are both on tokens (P-256 and RSA-PSS), through the CLI.
#[test]
fn serve_echo_and_call_with_token_keys() {
    let Some(hsm) = Hsm::new() else { return };
    hsm.init_token("svc");
    hsm.init_token("cli");
    hsm.keygen("svc", "echo-key", "01", "EC:prime256v1");
    hsm.keygen("cli", "client-key", "a1", "rsa:2048");
    hsm.certify("echo", "pkcs11:token=svc;object=echo-key", "echo.pem", &["--dns", "localhost", "--usage", "server"]);
    hsm.certify("client", "pkcs11:token=cli;id=%a1", "client.pem", &["--usage", "client"]);
    let (_server, addr) = hsm.serve("echo.pem", "pkcs11:token=svc;object=echo-key", &[]);

    let call = hsm.run(
        hsm.cmd(trustwire_bin())
            .args(["call", &addr, "example.EchoService/Echo", "--echo", "from a token", "--server-name", "localhost"])
            .arg("--cert")
            .arg(hsm.path("client.pem"))
            .args(["--key", "pkcs11:token=cli;id=%a1"])
            .args(hsm.token_args())
            .arg("--ca")
            .arg(hsm.ca_pem()),
    );
    assert_eq!(String::from_utf8_lossy(&call.stdout).trim(), "from a token");
    // The probe shows what the server's token key signed with.
    let probe = hsm.run(
        hsm.cmd(trustwire_bin())
            .args(["probe", &addr, "--server-name", "localhost"])
            .arg("--cert")
            .arg(hsm.path("client.pem"))
            .args(["--key", "pkcs11:token=cli;id=%a1"])
            .args(hsm.token_args())
            .arg("--ca")
            .arg(hsm.ca_pem()),
    );
    let shown = text(&probe);
    assert!(shown.contains("spiffe://example.org/ns/default/echo"), "{shown}");
    assert!(shown.contains("ECDSA P-256"), "{shown}");
    // The PIN may come from the environment instead of a file.
    let by_env = hsm.run(
        hsm.cmd(trustwire_bin())
            .args(["call", &addr, "example.EchoService/Echo", "--echo", "env pin", "--server-name", "localhost"])
            .arg("--cert")
            .arg(hsm.path("client.pem"))
            .args(["--key", "pkcs11:token=cli;object=client-key", "--pkcs11-module"])
            .arg(&hsm.module)
            .args(["--pkcs11-pin-env", "TW_TOKEN_PIN"])
            .env("TW_TOKEN_PIN", PIN)
            .arg("--ca")
            .arg(hsm.ca_pem()),
    );
    assert_eq!(String::from_utf8_lossy(&by_env.stdout).trim(), "env pin");
    hsm.assert_no_key_files();
}

/// A profile names the token key the same way, `[identity.pkcs11]` giving module and PIN.
#[test]
fn profile_with_a_token_key() {
    let Some(hsm) = Hsm::new() else { return };
    hsm.init_token("svc");
    hsm.keygen("svc", "echo-key", "01", "EC:secp384r1");
    hsm.certify("echo", "pkcs11:token=svc;object=echo-key", "echo.pem", &["--dns", "localhost"]);
    std::fs::write(
        hsm.path("echo.toml"),
        format!(
            "[identity]\ncert = \"echo.pem\"\nkey = \"pkcs11:token=svc;object=echo-key\"\n\n[identity.pkcs11]\nmodule = \
             \"{}\"\npin_file = \"pin\"\nsessions = 2\n\n[trust]\nca = [\"{}\"]\n",
            hsm.module.display(),
            hsm.ca_pem().display()
        ),
    )
    .unwrap();
    let mut server = Proc::spawn(
        hsm.cmd(trustwire_bin()).args(["serve-echo", "--listen", "127.0.0.1:0", "--config"]).arg(hsm.path("echo.toml")),
    );
    let addr = server.wait_for("the listening address", |out, _| {
        String::from_utf8_lossy(out).lines().find_map(|l| l.rsplit_once("mTLS on ").map(|(_, a)| a.to_string()))
    });
    let (cert, key) = hsm.file_credential("file-client");
    let mut profile = TlsProfile::new(
        Some(Identity::from_files(&cert, &key).unwrap()),
        TrustBundle::from_pem(hsm.ca.cert_pem().as_bytes()).unwrap(),
    );
    profile.server_name = Some("localhost".into());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = Client::new(addr.clone(), profile.client().unwrap(), ClientOptions::default());
        assert_eq!(echo(&client, "p384 on a token").await.unwrap(), "p384 on a token");
        let id = client.server_identity().await.unwrap().unwrap();
        assert_eq!(id.spiffe_id.as_deref(), Some("spiffe://example.org/ns/default/echo"));
    });
    hsm.assert_no_key_files();
}

/// `openssl s_client` and Python's `ssl` (client certificates from files) call a server whose
/// key is on the token, with the brpc capture, and get brpc's answer.
#[test]
fn openssl_and_python_call_a_token_keyed_server() {
    let Some(hsm) = Hsm::new() else { return };
    let have_openssl = tool_available(Command::new("openssl").arg("version"), "the `openssl` binary (OpenSSL interop)");
    let have_python = tool_available(Command::new("python3").args(["-c", "import ssl"]), "`python3` with ssl");
    hsm.init_token("svc");
    hsm.keygen("svc", "echo-key", "01", "EC:prime256v1");
    hsm.certify("echo", "pkcs11:token=svc;object=echo-key", "echo.pem", &["--dns", "localhost"]);
    let (_server, addr) = hsm.serve("echo.pem", "pkcs11:token=svc;object=echo-key", &[]);
    let port = addr.rsplit(':').next().unwrap().to_string();
    let (cert, key) = hsm.file_credential("file-client");
    if have_openssl {
        let mut sc = Proc::spawn(
            Command::new("openssl")
                .args(["s_client", "-connect", &format!("127.0.0.1:{port}"), "-CAfile"])
                .arg(hsm.ca_pem())
                .args(["-verify_return_error", "-servername", "localhost", "-verify_hostname", "localhost", "-cert"])
                .arg(&cert)
                .arg("-key")
                .arg(&key)
                .args(["-brief", "-ign_eof", "-nocommands"]),
        );
        sc.write(&capture("echo_request.bin"));
        let frame = sc.wait_for("the echo response frame", |out, _| frame_in(out));
        assert_echo_answer(&frame);
        let summary = sc.wait_for("s_client's summary", |_, err| err.contains("Verification").then(|| err.to_string()));
        assert!(summary.contains("Verification: OK"), "{summary}");
        assert!(
            summary.contains("Signature type: ECDSA") && summary.contains("Hash used: SHA256"),
            "the token's P-256 key signed the handshake: {summary}"
        );
    }
    if have_python {
        let script = r#"
import socket, ssl, sys
port, ca, cert, key, request = sys.argv[1:6]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(ca)
ctx.load_cert_chain(cert, key)
with socket.create_connection(("127.0.0.1", int(port)), timeout=10) as raw:
    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(open(request, "rb").read())
        buf = b""
        while len(buf) < 12 or len(buf) < 12 + int.from_bytes(buf[4:8], "big"):
            chunk = tls.recv(65536)
            if not chunk:
                break
            buf += chunk
        print(tls.version(), buf.hex())
"#;
        let out = Command::new("python3")
            .args(["-c", script, &port])
            .arg(hsm.ca_pem())
            .arg(&cert)
            .arg(&key)
            .arg(captures().join("echo_request.bin"))
            .output()
            .unwrap();
        let said = text(&out);
        assert!(out.status.success(), "{said}");
        let (version, hex_frame) = said.trim().split_once(' ').unwrap();
        assert_eq!(version, "TLSv1.3");
        assert_echo_answer(&frame_in(&hex::decode(hex_frame).unwrap()).expect("a whole frame"));
    }
    hsm.assert_no_key_files();
}

/// What an operator gets wrong is refused at start, naming the token, object, module or PIN.
#[test]
fn wrong_pin_missing_object_and_missing_module_are_refused_by_name() {
    let Some(hsm) = Hsm::new() else { return };
    hsm.init_token("svc");
    hsm.keygen("svc", "echo-key", "01", "EC:prime256v1");
    hsm.keygen("svc", "other-key", "02", "EC:prime256v1");
    hsm.certify("echo", "pkcs11:token=svc;object=echo-key", "echo.pem", &["--dns", "localhost"]);
    std::fs::write(hsm.path("wrong-pin"), "000000\n").unwrap();
    let refused = |uri: &str, module: &Path, pin_file: &Path| -> String {
        let out = hsm
            .cmd(trustwire_bin())
            .args(["serve-echo", "--listen", "127.0.0.1:0", "--cert"])
            .arg(hsm.path("echo.pem"))
            .args(["--key", uri, "--pkcs11-module"])
            .arg(module)
            .arg("--pkcs11-pin-file")
            .arg(pin_file)
            .arg("--ca")
            .arg(hsm.ca_pem())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{uri} was accepted");
        text(&out)
    };
    let uri = "pkcs11:token=svc;object=echo-key";
    let said = refused(uri, &hsm.module, &hsm.path("wrong-pin"));
    assert!(said.contains("key_unavailable") && said.contains("wrong PIN"), "{said}");
    assert!(said.contains("token 'svc'") && said.contains("wrong-pin"), "names the token and PIN file: {said}");
    assert!(!said.contains("000000") && !said.contains(PIN), "a PIN was printed: {said}");

    let said = refused("pkcs11:token=svc;object=nope", &hsm.module, &hsm.path("pin"));
    assert!(said.contains("key_unavailable") && said.contains("no private key object 'nope' on token 'svc'"), "{said}");

    let said = refused("pkcs11:token=elsewhere;object=echo-key", &hsm.module, &hsm.path("pin"));
    assert!(said.contains("token 'elsewhere' is not present") && said.contains("'svc'"), "{said}");

    let missing = hsm.path("no-such-module.so");
    let said = refused(uri, &missing, &hsm.path("pin"));
    assert!(said.contains("key_unavailable") && said.contains(&missing.display().to_string()), "{said}");

    let said = refused(uri, &hsm.module, &hsm.path("no-pin-here"));
    assert!(said.contains("PIN file") && said.contains("no-pin-here"), "{said}");

    // The certificate of one key with another key object: key_mismatch, naming the object.
    let said = refused("pkcs11:token=svc;object=other-key", &hsm.module, &hsm.path("pin"));
    assert!(said.contains("key_mismatch") && said.contains("other-key"), "{said}");

    let said = refused("pkcs11:token=svc;object=echo-key?pin-source=file:/etc/pin", &hsm.module, &hsm.path("pin"));
    assert!(said.contains("pin-source is not accepted"), "{said}");
}

/// Rotation: a new key object under the same label and its certificate replace the old ones
/// while calls keep coming; no call fails, and new connections show the new serial.
#[test]
fn rotation_to_a_new_key_object_under_continuous_calls() {
    let Some(hsm) = Hsm::new() else { return };
    hsm.init_token("svc");
    hsm.keygen("svc", "echo-key", "01", "EC:prime256v1");
    let old = hsm.certify("echo", "pkcs11:token=svc;object=echo-key;id=%01", "echo.pem", &["--dns", "localhost"]);
    let (server, addr) = hsm.serve("echo.pem", "pkcs11:token=svc;object=echo-key", &[]);
    let (cert, key) = hsm.file_credential("file-client");
    let mut profile = TlsProfile::new(
        Some(Identity::from_files(&cert, &key).unwrap()),
        TrustBundle::from_pem(hsm.ca.cert_pem().as_bytes()).unwrap(),
    );
    profile.server_name = Some("localhost".into());
    let client_tls = profile.client().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (calls, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let last_serial = Arc::new(std::sync::Mutex::new(String::new()));
    let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (stop, calls, failures, last_serial, errors) =
            (stop.clone(), calls.clone(), failures.clone(), last_serial.clone(), errors.clone());
        let (addr, tls) = (addr.clone(), client_tls.clone());
        tasks.push(rt.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                // A new connection (and full handshake) for every call.
                let client = Client::new(addr.clone(), tls.clone(), ClientOptions::default());
                let opts = CallOptions { timeout: Some(Duration::from_secs(5)), ..Default::default() };
                let r = client.call("example.EchoService", "Echo", trustwire::echo::encode("r"), opts).await;
                match (r, client.server_identity().await) {
                    (Ok(_), Ok(Some(id))) => *last_serial.lock().unwrap() = id.serial.clone(),
                    (r, _) => {
                        failures.fetch_add(1, Ordering::Relaxed);
                        errors.lock().unwrap().push(format!("{:?}", r.err()));
                    }
                }
                calls.fetch_add(1, Ordering::Relaxed);
                client.close();
            }
        }));
    }
    let wait_calls = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(20);
        let start = calls.load(Ordering::Relaxed);
        while calls.load(Ordering::Relaxed) < start + n {
            assert!(Instant::now() < deadline, "calls stalled");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_calls(20);
    assert_eq!(*last_serial.lock().unwrap(), serial_of(&old));
    // The new key is generated on the token beside the old one, under the same label; its
    // certificate is written over the old one, and the watch reloads.
    hsm.keygen("svc", "echo-key", "02", "EC:prime256v1");
    let new = hsm.certify("echo", "pkcs11:token=svc;object=echo-key;id=%02", "echo.pem", &["--dns", "localhost"]);
    let new_serial = serial_of(&new);
    let deadline = Instant::now() + Duration::from_secs(20);
    while *last_serial.lock().unwrap() != new_serial {
        assert!(Instant::now() < deadline, "the new certificate never went live:\n{}", server.output());
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_calls(20);
    // The old key can go now: established connections do not sign again.
    hsm.run(hsm.cmd("pkcs11-tool").arg("--module").arg(&hsm.module).args([
        "--token-label",
        "svc",
        "--login",
        "--pin",
        PIN,
        "--delete-object",
        "--type",
        "privkey",
        "--id",
        "01",
    ]));
    wait_calls(20);
    stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for t in tasks {
            t.await.unwrap();
        }
    });
    assert_eq!(failures.load(Ordering::Relaxed), 0, "failed calls: {:?}", errors.lock().unwrap());
    assert_eq!(*last_serial.lock().unwrap(), new_serial);
    let log = server.stderr();
    assert!(log.contains("generation=2"), "{log}");
    assert!(!log.contains("rejected"), "{log}");
    hsm.assert_no_key_files();
}

/// A token that goes away: the reload that needs it is refused as key_unavailable and the
/// last good generation stays in service; handshakes that need the token fail one by one,
/// counted, and the process serves on.
#[test]
fn token_gone_during_reload_keeps_the_last_good_generation() {
    let Some(hsm) = Hsm::new() else { return };
    hsm.init_token("svc");
    hsm.keygen("svc", "echo-key", "01", "EC:prime256v1");
    hsm.keygen("svc", "echo-key", "02", "EC:prime256v1");
    let old = hsm.certify("echo", "pkcs11:token=svc;id=%01", "echo.pem", &["--dns", "localhost"]);
    // The next certificate is ready, but not in place yet.
    hsm.certify("echo", "pkcs11:token=svc;id=%02", "echo-next.pem", &["--dns", "localhost"]);
    let (mut server, addr) = hsm.serve("echo.pem", "pkcs11:token=svc;object=echo-key", &["--metrics", "127.0.0.1:0"]);
    let metrics = metrics_addr(&mut server);
    let (cert, key) = hsm.file_credential("file-client");
    let mut profile = TlsProfile::new(
        Some(Identity::from_files(&cert, &key).unwrap()),
        TrustBundle::from_pem(hsm.ca.cert_pem().as_bytes()).unwrap(),
    );
    profile.server_name = Some("localhost".into());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let call = |profile: &TlsProfile| {
        rt.block_on(async {
            let client = Client::new(addr.clone(), profile.client().unwrap(), ClientOptions::default());
            let r = echo(&client, "hi").await;
            let id = client.server_identity().await.ok().flatten();
            (r, id.map(|i| i.serial.clone()))
        })
    };
    let (r, serial) = call(&profile);
    assert_eq!(r.unwrap(), "hi");
    assert_eq!(serial.unwrap(), serial_of(&old));

    // The token goes (its store moves away), then the new certificate arrives and SIGHUP.
    std::fs::create_dir(hsm.path("away")).unwrap();
    for e in std::fs::read_dir(hsm.path("tokens")).unwrap() {
        let p = e.unwrap().path();
        std::fs::rename(&p, hsm.path("away").join(p.file_name().unwrap())).unwrap();
    }
    std::fs::rename(hsm.path("echo-next.pem"), hsm.path("echo.pem")).unwrap();
    Command::new("kill").args(["-HUP", &server.child.id().to_string()]).status().unwrap();
    let said = server.wait_for("the refused reload", |_, err| {
        err.lines().find(|l| l.contains("reload refused") || l.contains("rejected")).map(str::to_string)
    });
    assert!(said.contains("key_unavailable") && said.contains("token 'svc' is not present"), "{said}");
    let body = scrape(&metrics);
    assert!(
        body.contains("trustwire_reloads_total{store=\"serve-echo\",result=\"rejected\",verdict=\"key_unavailable\"}"),
        "{body}"
    );
    assert!(body.contains("trustwire_credential_generation{store=\"serve-echo\"} 1"), "{body}");

    // A handshake that needs the token now fails, by name and counted; the server lives on.
    let (r, _) = call(&profile);
    assert!(r.is_err());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let body = scrape(&metrics);
        if body.contains("verdict=\"key_unavailable\",decided_by=\"local\"") {
            assert!(body.contains("trustwire_credential_generation{store=\"serve-echo\"} 1"), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "the failed signature was not counted:\n{body}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(server.child.try_wait().unwrap().is_none(), "the server exited:\n{}", server.output());
    assert!(!server.stderr().contains("panicked"), "{}", server.output());
    hsm.assert_no_key_files();
}
