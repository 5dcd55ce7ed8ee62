//! Running the `trustwire` binary as an operator does: a dev PKI made with `pki`, `serve-echo`
//! as a child process, commands and their exit status.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

use super::trustwire_bin;

pub fn run(args: &[&str]) -> Output {
    Command::new(trustwire_bin()).args(args).output().expect("run trustwire")
}

pub fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(out.status.success(), "trustwire {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

pub struct Kill(pub Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn p(dir: &Path, f: &str) -> String {
    dir.join(f).display().to_string()
}

/// Starts `serve-echo` (the dir's echo.pem/echo.key, trusting its ca.pem) on an ephemeral port and returns it with the address it printed.
pub fn serve(dir: &Path, extra: &[&str]) -> (Kill, String) {
    let mut args = vec![
        "serve-echo".to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--cert".into(),
        p(dir, "echo.pem"),
        "--key".into(),
        p(dir, "echo.key"),
        "--ca".into(),
        p(dir, "ca.pem"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut child =
        Command::new(trustwire_bin()).args(&args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().rsplit(' ').next().unwrap().to_string();
    assert!(line.contains("serving"), "unexpected first line: {line}");
    (Kill(child), addr)
}

pub fn pki_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    ok(&["pki", "init", "--dir", &d, "--trust-domain", "example.org"]);
    ok(&[
        "pki",
        "issue",
        "--dir",
        &d,
        "--name",
        "echo",
        "--spiffe-id",
        "spiffe://example.org/ns/prod/echo",
        "--dns",
        "localhost",
        "--ip",
        "127.0.0.1",
    ]);
    ok(&[
        "pki",
        "issue",
        "--dir",
        &d,
        "--name",
        "web",
        "--spiffe-id",
        "spiffe://example.org/ns/prod/web",
        "--usage",
        "client",
    ]);
    ok(&["pki", "issue", "--dir", &d, "--name", "batch", "--spiffe-id", "spiffe://example.org/ns/batch/job"]);
    dir
}
