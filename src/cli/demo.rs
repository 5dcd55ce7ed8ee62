//! `trustwire demo`: a dev PKI, an mTLS echo server, one allowed caller and two refused ones.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Verdict};
use crate::pki::{DevCa, IssueRequest};
use crate::rpc::{CallOptions, Client, ClientOptions, Server};
use crate::tls::{Identity, Policy, TlsProfile, TrustBundle};

const TRUST_DOMAIN: &str = "example.org";
const ALLOW: &str = "spiffe://example.org/ns/demo/*";

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(super) async fn run() -> Result<(), Error> {
    let mut rnd = [0u8; 4];
    aws_lc_rs::rand::fill(&mut rnd).map_err(|_| Error::config("no system randomness"))?;
    let dir = TempDir(std::env::temp_dir().join(format!("trustwire-demo-{}", hex::encode(rnd))));
    let ca = DevCa::new(TRUST_DOMAIN)?;
    ca.write(&dir.0)?;
    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let issue = |name: &str, id: &str| -> Result<Identity, Error> {
        let cred = ca.issue(&IssueRequest::new(name).spiffe_id(id).dns("localhost").ip(localhost))?;
        cred.write(&dir.0, name)?;
        Identity::from_pem(cred.cert_pem.as_bytes(), cred.key_pem.as_bytes())
    };
    let server_id = issue("echo", "spiffe://example.org/ns/demo/echo")?;
    let frontend = issue("frontend", "spiffe://example.org/ns/demo/frontend")?;
    let intruder = issue("intruder", "spiffe://example.org/ns/other/intruder")?;
    let rogue_ca = DevCa::new("rogue.example")?;
    let rogue_cred = rogue_ca.issue(&IssueRequest::new("rogue").spiffe_id("spiffe://example.org/ns/demo/frontend"))?;
    let rogue = Identity::from_pem(rogue_cred.cert_pem.as_bytes(), rogue_cred.key_pem.as_bytes())?;
    let trust = TrustBundle::from_pem(ca.cert_pem().as_bytes())?;
    say!("trustwire demo, working in {}", dir.0.display());
    say!("  dev PKI: a CA for {TRUST_DOMAIN}, certificates for the echo server, 'frontend',");
    say!("           'intruder' (same CA, outside the allow-list) and 'rogue', which impersonates");
    say!("           frontend: the same SPIFFE ID, from a CA the server does not trust");

    let mut profile = TlsProfile::new(Some(server_id), trust.clone());
    profile.policy = Policy::from_patterns(&[ALLOW])?;
    let refusals: Arc<Mutex<Vec<(SocketAddr, Error)>>> = Arc::default();
    let mut server = Server::new(profile.server()?);
    crate::echo::register(&mut server);
    let sink = refusals.clone();
    server.options_mut().on_handshake_error =
        Some(Arc::new(move |addr, e| sink.lock().unwrap_or_else(|p| p.into_inner()).push((addr, e.clone()))));
    let running = server.bind("127.0.0.1:0").await?;
    let addr = running.local_addr().to_string();
    say!("  server:  mTLS echo on {addr}, allowing {ALLOW}");
    say!("");

    let client_for = |id: Identity| -> Result<Client, Error> {
        let tls = TlsProfile::new(Some(id), trust.clone()).client()?;
        Ok(Client::new(&addr, tls, ClientOptions::default()))
    };
    let opts = || CallOptions { timeout: Some(Duration::from_secs(5)), ..Default::default() };
    let mut ok = true;

    // 1. An allowed caller.
    let client = client_for(frontend)?;
    let message = "hello from trustwire";
    match client.call(crate::echo::SERVICE, crate::echo::METHOD, crate::echo::encode(message), opts()).await {
        Ok(resp) => {
            let echoed = crate::echo::decode(&resp.payload).unwrap_or_default();
            let info = client.connect().await?.expect("TLS connection");
            say!("[ok]      frontend called Echo(\"{message}\") and got \"{echoed}\"");
            say!(
                "          {} {} {}, server identity {}",
                info.version,
                info.cipher_suite,
                info.kx_group.as_deref().unwrap_or("?"),
                info.peer
            );
            ok &= echoed == message;
        }
        Err(e) => {
            say!("[FAILED]  frontend's call failed: {e}");
            ok = false;
        }
    }

    // 2 and 3. Callers the server must refuse at the handshake.
    for (who, id, expected) in [
        ("rogue (impersonating frontend, other CA)", rogue, Verdict::UnknownIssuer),
        ("intruder (not allowed)", intruder, Verdict::PeerNotAllowed),
    ] {
        let seen = refusals.lock().unwrap_or_else(|p| p.into_inner()).len();
        let result = client_for(id)?
            .call(crate::echo::SERVICE, crate::echo::METHOD, crate::echo::encode("let me in"), opts())
            .await;
        let server_side = wait_for_refusal(&refusals, seen).await;
        match (&result, &server_side) {
            (Err(client_err), Some(server_err)) => {
                let verdict = server_err.verdict();
                say!(
                    "{} {who} refused: server verdict {}, client saw {}{}",
                    if verdict == Some(expected) { "[ok]    " } else { "[FAILED]" },
                    verdict.map(|v| v.name()).unwrap_or("none"),
                    client_err.verdict().map(|v| v.name()).unwrap_or(client_err.kind_name()),
                    match client_err {
                        Error::Handshake { alert: Some(a), .. } => format!(" ({a})"),
                        _ => String::new(),
                    }
                );
                say!("          why: {}", message_of(server_err));
                ok &= verdict == Some(expected);
            }
            _ => {
                let client = match &result {
                    Ok(_) => "the call was answered".to_string(),
                    Err(e) => super::describe_error(e),
                };
                say!("[FAILED]  {who} was not refused as expected: {client}");
                ok = false;
            }
        }
    }
    running.shutdown().await;
    say!("");
    if ok {
        say!("demo finished: 1 call served, 2 peers refused with their verdicts");
        say!("");
        next_steps();
        Ok(())
    } else {
        Err(Error::Protocol { message: "the demo did not go as expected".into() })
    }
}

/// The same server and allowed caller with the `trustwire` command, to try next.
fn next_steps() {
    let server = "127.0.0.1:8443";
    let creds = |name: &str| format!("--cert pki/{name}.pem --key pki/{name}.key --ca pki/ca.pem");
    say!("next: the same with the trustwire command, in a directory of your own");
    for line in [
        format!("trustwire pki init --dir pki --trust-domain {TRUST_DOMAIN}"),
        "trustwire pki issue --dir pki --name echo --spiffe-id spiffe://example.org/ns/demo/echo --dns localhost \
         --ip 127.0.0.1"
            .to_string(),
        "trustwire pki issue --dir pki --name frontend --spiffe-id spiffe://example.org/ns/demo/frontend --usage client"
            .to_string(),
        format!("trustwire serve-echo --listen {server} {} --allow '{ALLOW}' &", creds("echo")),
        format!("trustwire call {server} example.EchoService/Echo --echo hello {}", creds("frontend")),
        format!("trustwire probe {server} {}", creds("frontend")),
    ] {
        say!("  {line}");
    }
}

fn message_of(e: &Error) -> String {
    match e {
        Error::Handshake { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

async fn wait_for_refusal(log: &Mutex<Vec<(SocketAddr, Error)>>, seen: usize) -> Option<Error> {
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Some((_, e)) = log.lock().unwrap_or_else(|p| p.into_inner()).get(seen) {
            return Some(e.clone());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}
