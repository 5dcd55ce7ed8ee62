//! Calls/s of the C client (benches/c_client.c, linked against libtrustwire.so) against the
//! Rust client, both calling the same mTLS echo server in the same run, each from a process of
//! its own: one call at a time, and 64 calls in flight. Prints a table with the ratio C / Rust (target ≥ 0.9). Not a test.
//!
//! `cargo bench -p trustwire-c --bench c_client` (part of `make bench`); BENCH_SECONDS sets the
//! length of each measurement (default 3).

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tw::pki::{DevCa, IssueRequest};
use tw::rpc::{CallOptions, Client, ClientOptions, Request, Response, Server};
use tw::tls::{Identity, TlsProfile, TrustBundle};

const PAYLOAD: &[u8] = b"\x0a\x0bhello world";
const IN_FLIGHT: usize = 64;

#[path = "../tests/common/mod.rs"]
mod common;
use common::{lib_dir, root};

fn rust_sequential(client: &Client, seconds: f64) -> f64 {
    let rt = tw::runtime::runtime();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let mut calls = 0u64;
    while Instant::now() < deadline {
        rt.block_on(client.call("example.EchoService", "Echo", PAYLOAD, CallOptions::default())).unwrap();
        calls += 1;
    }
    calls as f64 / start.elapsed().as_secs_f64()
}

fn rust_concurrent(client: &Client, seconds: f64) -> f64 {
    let rt = tw::runtime::runtime();
    let calls = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let client = client.clone();
            let calls = calls.clone();
            rt.spawn(async move {
                while Instant::now() < deadline {
                    client.call("example.EchoService", "Echo", PAYLOAD, CallOptions::default()).await.unwrap();
                    calls.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        rt.block_on(t).unwrap();
    }
    calls.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// The Rust side of a round, in a process of its own like the C client, so both clients run
/// with their own runtime next to the server's.
fn rust_client_process(profile: &Path, addr: &str, seconds: f64, mode: &str) {
    let store = tw::credentials::CredentialStore::from_file(profile, tw::credentials::Use::Client, Default::default());
    let _guard = tw::runtime::runtime().enter();
    let tls = store.unwrap().client_tls().unwrap();
    let client = Client::new(addr.to_string(), tls, ClientOptions::default());
    tw::runtime::runtime()
        .block_on(client.call("example.EchoService", "Echo", PAYLOAD, CallOptions::default()))
        .unwrap();
    let start = Instant::now();
    let rate = if mode == "sequential" { rust_sequential(&client, seconds) } else { rust_concurrent(&client, seconds) };
    let elapsed = start.elapsed().as_secs_f64();
    println!("calls {} seconds {elapsed:.3}", (rate * elapsed) as u64);
}

fn run_client(cmd: &mut Command, profile: &Path, addr: &str, seconds: f64, mode: &str) -> f64 {
    let out = cmd.arg(profile).arg(addr).arg(seconds.to_string()).arg(mode).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "client failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    let fields: Vec<&str> = stdout.split_whitespace().collect();
    let calls: f64 = fields[1].parse().unwrap();
    let secs: f64 = fields[3].parse().unwrap();
    calls / secs
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    if args.len() == 6 && args[1] == "rust-client" {
        return rust_client_process(Path::new(&args[2]), &args[3], args[4].parse().unwrap(), &args[5]);
    }
    let seconds: f64 = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::new("example.org").unwrap();
    ca.write(dir.path()).unwrap();
    let server_cred = ca
        .issue(
            &IssueRequest::new("server")
                .spiffe_id("spiffe://example.org/server")
                .dns("localhost")
                .ip("127.0.0.1".parse().unwrap()),
        )
        .unwrap();
    let client_cred = ca.issue(&IssueRequest::new("client").spiffe_id("spiffe://example.org/client")).unwrap();
    client_cred.write(dir.path(), "client").unwrap();
    let profile_path = dir.path().join("client.toml");
    std::fs::write(
        &profile_path,
        "[identity]\ncert = \"client.pem\"\nkey = \"client.key\"\n[trust]\nca = [\"ca.pem\"]\n",
    )
    .unwrap();
    let trust = || TrustBundle::from_pem(ca.cert_pem().as_bytes()).unwrap();
    let identity = |c: &tw::pki::Credential| Identity::from_pem(c.cert_pem.as_bytes(), c.key_pem.as_bytes()).unwrap();

    let mut server = Server::new(TlsProfile::new(Some(identity(&server_cred)), trust()).server().unwrap());
    server.register("example.EchoService", "Echo", |req: Request| async move { Ok(Response::new(req.payload)) });
    let running = tw::runtime::runtime().block_on(server.bind("127.0.0.1:0")).unwrap();
    let addr = running.local_addr().to_string();

    let exe = lib_dir().join("c_client_bench");
    let lib = lib_dir();
    let status = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror"])
        .arg("-I")
        .arg(root().join("include"))
        .arg(root().join("benches/c_client.c"))
        .arg("-L")
        .arg(&lib)
        .arg("-ltrustwire")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-lpthread")
        .arg("-o")
        .arg(&exe)
        .status()
        .expect("cannot run the C compiler");
    assert!(status.success(), "compiling benches/c_client.c failed");

    // Interleaved rounds, best of each side: the machine is shared, and the best round is the
    // least disturbed one.
    println!("C client vs Rust client, mTLS echo on loopback, {seconds}s per round, best of 2 rounds");
    println!("{:<34} {:>12} {:>12} {:>7}", "scenario", "Rust", "C", "C/Rust");
    let mut json = Vec::new();
    for (name, mode) in [("sequential, one thread (calls/s)", "sequential"), ("64 in flight (calls/s)", "concurrent")] {
        let (mut rust, mut c) = (0f64, 0f64);
        for _ in 0..2 {
            let me = std::env::current_exe().unwrap();
            rust = rust.max(run_client(Command::new(&me).arg("rust-client"), &profile_path, &addr, seconds, mode));
            c = c.max(run_client(&mut Command::new(&exe), &profile_path, &addr, seconds, mode));
        }
        println!("{name:<34} {rust:>12.0} {c:>12.0} {:>6.2}x", c / rust);
        json.push(format!("{{\"scenario\":\"{mode}\",\"rust\":{rust:.0},\"c\":{c:.0},\"ratio\":{:.3}}}", c / rust));
    }
    println!("target: C/Rust >= 0.90");
    println!("{{\"bench\":\"c_client\",\"results\":[{}]}}", json.join(","));
    drop(running);
}
