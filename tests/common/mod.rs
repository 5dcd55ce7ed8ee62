//! Shared fixtures: a dev PKI generated at test time, an echo server, clients.
#![allow(dead_code)]

pub mod cli;
pub mod peers;
pub mod raw;
pub mod workload;

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use trustwire::pki::{Credential, DevCa, IssueRequest, Usage};
use trustwire::rpc::{CallOptions, Client, ClientOptions, RunningServer, Server};
use trustwire::tls::{Identity, Policy, TlsProfile, TrustBundle};

pub const TD: &str = "example.org";
pub const SERVER_ID: &str = "spiffe://example.org/ns/test/server";
pub const CLIENT_ID: &str = "spiffe://example.org/ns/test/client";

/// Directory of the brpc captures (CI has shared/ beside the checkout; a checkout elsewhere,
/// such as a git worktree, names it with TRUSTWIRE_CAPTURES).
pub fn captures() -> PathBuf {
    match std::env::var_os("TRUSTWIRE_CAPTURES") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/interop/brpc"),
    }
}

pub fn capture(name: &str) -> Vec<u8> {
    std::fs::read(captures().join(name)).unwrap_or_else(|e| panic!("capture {name}: {e}"))
}

/// A CA plus a server and a client credential, all written into a temp dir.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: DevCa,
    pub server: Credential,
    pub client: Credential,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::new(TD).unwrap();
        ca.write(dir.path()).unwrap();
        let server =
            ca.issue(&IssueRequest::new("server").spiffe_id(SERVER_ID).dns("localhost").ip(localhost())).unwrap();
        server.write(dir.path(), "server").unwrap();
        let client = ca.issue(&IssueRequest::new("client").spiffe_id(CLIENT_ID)).unwrap();
        client.write(dir.path(), "client").unwrap();
        Pki { dir, ca, server, client }
    }

    /// Issues and writes another credential under `name`.
    pub fn issue(&self, req: IssueRequest) -> Credential {
        let name = req.name.clone();
        let c = self.ca.issue(&req).unwrap();
        c.write(self.dir.path(), &name).unwrap();
        c
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    pub fn trust(&self) -> TrustBundle {
        TrustBundle::from_pem(self.ca.cert_pem().as_bytes()).unwrap()
    }

    pub fn server_profile(&self) -> TlsProfile {
        TlsProfile::new(Some(identity(&self.server)), self.trust())
    }

    pub fn client_profile(&self) -> TlsProfile {
        TlsProfile::new(Some(identity(&self.client)), self.trust())
    }
}

pub fn identity(c: &Credential) -> Identity {
    Identity::from_pem(c.cert_pem.as_bytes(), c.key_pem.as_bytes()).unwrap()
}

pub fn localhost() -> IpAddr {
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}

/// Credentials valid between the given offsets from now (negative = past).
pub fn validity(from_secs: i64, to_secs: i64) -> (SystemTime, SystemTime) {
    let at = |s: i64| {
        if s >= 0 {
            SystemTime::now() + Duration::from_secs(s as u64)
        } else {
            SystemTime::now() - Duration::from_secs(s.unsigned_abs())
        }
    };
    (at(from_secs), at(to_secs))
}

pub fn client_usage(name: &str, id: &str) -> IssueRequest {
    IssueRequest::new(name).spiffe_id(id).usage(Usage::Client)
}

/// Starts an echo server for `profile` on 127.0.0.1:0.
pub async fn echo_server(profile: &TlsProfile) -> RunningServer {
    let mut server = Server::new(profile.server().unwrap());
    trustwire::echo::register(&mut server);
    server.bind("127.0.0.1:0").await.unwrap()
}

/// An echo server with an allow-list.
pub async fn echo_server_allowing(pki: &Pki, allow: &[&str]) -> RunningServer {
    let mut p = pki.server_profile();
    p.policy = Policy::from_patterns(allow).unwrap();
    echo_server(&p).await
}

pub fn client(addr: impl ToString, profile: &TlsProfile) -> Client {
    Client::new(addr.to_string(), profile.client().unwrap(), ClientOptions::default())
}

pub async fn echo(client: &Client, text: &str) -> trustwire::Result<String> {
    let opts = CallOptions { timeout: Some(Duration::from_secs(5)), ..Default::default() };
    let r = client.call("example.EchoService", "Echo", trustwire::echo::encode(text), opts).await?;
    Ok(trustwire::echo::decode(&r.payload).unwrap())
}

/// One echo call to `addr` as the holder of `cred` (trusting the PKI's CA).
pub async fn echo_as(addr: std::net::SocketAddr, pki: &Pki, cred: &Credential) -> trustwire::Result<String> {
    let mut cp = pki.client_profile();
    cp.identity = Some(identity(cred));
    echo(&client(addr, &cp), "hi").await
}

/// The `trustwire` binary cargo built for this test run.
pub fn trustwire_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_trustwire"))
}
