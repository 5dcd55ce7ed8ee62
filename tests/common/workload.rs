//! The Go Workload API agent of tests/go/workloadapi (go-spiffe's generated `workload`
//! package) and the directory of SVIDs, bundles and CRLs it serves, for every suite that needs
//! an agent: the Rust tests and the C programs' harness.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use trustwire::credentials::workload::WorkloadApiAddress;
use trustwire::pki::{Credential, DevCa, IssueRequest};
use trustwire::PeerIdentity;

use super::peers::{go_build, Proc, WAIT};

/// The agent binary, built once per test process; None (after a loud skip line) without Go.
pub fn agent_bin() -> Option<PathBuf> {
    static BUILT: OnceLock<Option<PathBuf>> = OnceLock::new();
    BUILT.get_or_init(|| go_build("workloadapi", true, "the Workload API test agent")).clone()
}

pub fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

pub fn serial(c: &Credential) -> String {
    PeerIdentity::from_der(&der(&c.cert_pem)).unwrap().serial
}

/// Polls `f` until it holds, or panics after the shared guard timeout.
pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The directory the agent serves from (layout: tests/go/workloadapi/main.go).
pub struct Material {
    pub dir: tempfile::TempDir,
    pub ca: DevCa,
}

impl Material {
    pub fn new() -> Self {
        Material { dir: tempfile::tempdir().unwrap(), ca: DevCa::new("example.org").unwrap() }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, bytes: &[u8]) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }

    pub fn remove(&self, rel: &str) {
        let _ = std::fs::remove_file(self.path(rel));
    }

    /// Issues a new SVID for `id` from the CA and puts it in `slot`; returns it.
    pub fn issue(&self, slot: &str, id: &str, hint: Option<&str>) -> Credential {
        let c = self.ca.issue(&IssueRequest::new("workload").spiffe_id(id)).unwrap();
        self.svid(slot, id, &c, hint);
        c
    }

    pub fn svid(&self, slot: &str, id: &str, c: &Credential, hint: Option<&str>) {
        let base = format!("svids/{slot}");
        for item in ["chain", "key", "bundle"] {
            self.remove(&format!("{base}/{item}.der"));
        }
        self.write(&format!("{base}/id"), id.as_bytes());
        self.write(&format!("{base}/chain.pem"), c.cert_pem.as_bytes());
        self.write(&format!("{base}/key.pem"), c.key_pem.as_bytes());
        self.write(&format!("{base}/bundle.pem"), self.ca.cert_pem().as_bytes());
        match hint {
            Some(h) => self.write(&format!("{base}/hint"), h.as_bytes()),
            None => self.remove(&format!("{base}/hint")),
        }
    }
}

/// The Go agent, serving `dir` on a Unix socket (and TCP when asked).
pub struct Agent {
    pub proc: Proc,
    pub socket: PathBuf,
    pub tcp: Option<String>,
}

impl Agent {
    pub fn start(bin: &Path, material: &Material, socket: &Path, tcp: bool) -> Agent {
        let mut cmd = Command::new(bin);
        cmd.arg("serve").arg("-dir").arg(material.dir.path()).arg("-unix").arg(socket);
        if tcp {
            cmd.args(["-tcp", "127.0.0.1:0"]);
        }
        let mut proc = Proc::spawn(&mut cmd);
        proc.wait_for("the agent to listen", |out, _| {
            String::from_utf8_lossy(out).contains("listening unix").then_some(())
        });
        let tcp = tcp.then(|| {
            proc.wait_for("the agent's TCP port", |out, _| {
                let out = String::from_utf8_lossy(out);
                out.lines().find_map(|l| l.strip_prefix("listening tcp ").map(str::to_string))
            })
        });
        Agent { proc, socket: socket.to_path_buf(), tcp }
    }

    pub fn address(&self) -> WorkloadApiAddress {
        WorkloadApiAddress::parse(&format!("unix://{}", self.socket.display())).unwrap()
    }

    pub fn count(&self, needle: &str) -> usize {
        String::from_utf8_lossy(&self.proc.stdout()).matches(needle).count()
    }

    /// Sends a command line and waits for its answer.
    pub fn command(&mut self, line: &str, answer: &str) {
        let before = self.count(answer);
        self.proc.write(format!("{line}\n").as_bytes());
        self.proc.wait_for(answer, |out, _| {
            let out = String::from_utf8_lossy(out);
            assert!(!out.contains("push failed"), "the agent could not read the material:\n{out}");
            (out.matches(answer).count() > before).then_some(())
        });
    }

    pub fn push(&mut self) {
        self.command("push", "pushed to ");
    }
}
