//! Finding 15: The CLI panics on a closed stdout.
//!
//! `trustwire probe … | head -4` used to end in "failed printing to stdout: Broken pipe" and a
//! backtrace (exit status 101). A closed stdout now ends the output quietly and the command
//! exits with its own status.
//!
//! To close the pipe before the command writes, without racing it, the command first reads a
//! FIFO: stdout's read end is closed, and only then is the FIFO written.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{echo_server, trustwire_bin, Pki};

fn fifo(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let status = Command::new("mkfifo").arg(&path).status().expect("mkfifo (coreutils)");
    assert!(status.success());
    path
}

/// Starts `trustwire ARGS`, closes its stdout, then feeds `contents` through `fifo` (which the
/// command reads before it prints anything) and waits for it to exit.
fn run_with_closed_stdout(args: &[&str], fifo: &Path, contents: &[u8]) -> (Option<i32>, String) {
    let mut child: Child = Command::new(trustwire_bin())
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    // Opening blocks until the command opens the FIFO to read it.
    let mut w = std::fs::OpenOptions::new().write(true).open(fifo).unwrap();
    w.write_all(contents).unwrap();
    drop(w);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("trustwire {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status.code(), err)
}

#[test]
fn inspect_into_a_closed_pipe_exits_cleanly() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let pem = pki.path("server.pem");
    let mut bundle = std::fs::read(&pem).unwrap();
    bundle.extend_from_slice(pki.ca.cert_pem().as_bytes());
    let input = fifo(dir.path(), "bundle.pem");
    let (code, err) = run_with_closed_stdout(&["inspect", input.to_str().unwrap()], &input, &bundle);
    assert!(!err.contains("panicked"), "stderr: {err}");
    assert_eq!(code, Some(0), "stderr: {err}");
}

#[test]
fn probe_into_a_closed_pipe_exits_cleanly() {
    let pki = Pki::new();
    let rt = trustwire::runtime::runtime();
    let server = rt.block_on(echo_server(&pki.server_profile()));
    let addr = server.local_addr().to_string();
    let dir = tempfile::tempdir().unwrap();
    let ca = fifo(dir.path(), "ca.pem");
    let (code, err) = run_with_closed_stdout(
        &[
            "probe",
            &addr,
            "--ca",
            ca.to_str().unwrap(),
            "--cert",
            pki.path("client.pem").to_str().unwrap(),
            "--key",
            pki.path("client.key").to_str().unwrap(),
        ],
        &ca,
        pki.ca.cert_pem().as_bytes(),
    );
    assert!(!err.contains("panicked"), "stderr: {err}");
    assert_eq!(code, Some(0), "the probe succeeded; its status must say so. stderr: {err}");
    drop(server);
}
