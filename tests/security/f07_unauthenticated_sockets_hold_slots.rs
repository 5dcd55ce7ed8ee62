//! Finding 7: Unauthenticated sockets hold connection slots.
//!
//! A socket used to take a connection slot before its handshake (10,000 server-wide, none per
//! source, 10 s each), and the proxy's accept loop had no limit at all, so idle sockets from one
//! source could lock out every client (or exhaust the proxy's file descriptors). Now a socket
//! first needs a handshake slot (1,024 in total, 512 per source by default), established
//! connections have their own budget, and a socket that finds a budget full is closed at once.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use trustwire::rpc::{ClientOptions, Server};
use trustwire::Client;

use super::f02_unbounded_memory_per_connection::child;
use crate::common::*;

/// Idle sockets opened against the server or the route under test.
const IDLE: usize = 2000;
/// The file descriptors the process under attack gets: fewer than `IDLE`, as on a host where a
/// process has its distribution's default of 1,024.
const CHILD_NOFILE: &str = "1024";
/// The attacker's source address; the legitimate client connects from 127.0.0.1.
const ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// Generous: the legitimate client needs milliseconds, but the machine may be busy. Unfixed,
/// it waits for the idle sockets' 60 s handshake timeout.
const PROMPTLY: Duration = Duration::from_secs(20);

/// Lets this process open `IDLE` sockets and more. Fails (never skips) when the hard limit is
/// too low for the test to mean anything.
fn raise_nofile() {
    let need = (IDLE as libc::rlim_t) * 2 + 512;
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < need {
            assert!(
                lim.rlim_max >= need,
                "this test needs RLIMIT_NOFILE >= {need}, the hard limit is {}: raise it (ulimit -Hn)",
                lim.rlim_max
            );
            lim.rlim_cur = need;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
}

/// Opens `n` TCP connections to `to` from `from` that never send a byte. Connects that do not
/// complete (the target's backlog is full) are given up after a while.
async fn idle_sockets(to: SocketAddr, from: IpAddr, n: usize) -> Vec<TcpStream> {
    let mut open = Vec::with_capacity(n);
    for _ in 0..n {
        let s = match from {
            IpAddr::V4(_) => TcpSocket::new_v4(),
            IpAddr::V6(_) => TcpSocket::new_v6(),
        }
        .unwrap();
        s.bind(SocketAddr::new(from, 0)).unwrap();
        match tokio::time::timeout(Duration::from_secs(2), s.connect(to)).await {
            Ok(Ok(stream)) => open.push(stream),
            _ => break,
        }
    }
    open
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_idle_sockets_do_not_keep_a_client_from_the_server() {
    raise_nofile();
    let pki = Pki::new();
    let server = child::start(&pki, &[("kind", "server"), ("nofile", CHILD_NOFILE), ("handshake_timeout_s", "60")]);
    let addr: SocketAddr = server.addr.parse().unwrap();
    let idle = idle_sockets(addr, ATTACKER, IDLE).await;
    eprintln!("{} idle sockets open against the server", idle.len());

    let c = client(addr, &pki.client_profile());
    let answer = tokio::time::timeout(PROMPTLY, echo(&c, "still served")).await;
    assert_eq!(answer.expect("the legitimate client was kept waiting").unwrap(), "still served");
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_idle_sockets_do_not_keep_a_client_from_a_proxy_route() {
    raise_nofile();
    let pki = Pki::new();
    let proxy = child::start(&pki, &[("kind", "proxy"), ("nofile", CHILD_NOFILE), ("handshake_timeout_s", "60")]);
    let addr: SocketAddr = proxy.addr.parse().unwrap();
    let idle = idle_sockets(addr, ATTACKER, IDLE).await;
    eprintln!("{} idle sockets open against the proxy route", idle.len());

    let through = async {
        let tls = pki.client_profile().client().unwrap();
        let (mut s, _) = trustwire::transport::connect(&tls, &proxy.addr, PROMPTLY).await?;
        s.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).await.unwrap();
        Ok::<_, trustwire::Error>(back)
    };
    let back = tokio::time::timeout(PROMPTLY, through).await;
    assert_eq!(&back.expect("the legitimate client was kept waiting").unwrap(), b"ping");
    drop(idle);
}

/// The value of `trustwire_connections_refused_total{scope="server",reason}` in this process.
fn refused(reason: &str) -> f64 {
    let text = trustwire::telemetry::metrics_text();
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == "trustwire_connections_refused_total")
        .filter(|s| s.labels.get("scope") == Some("server") && s.labels.get("reason") == Some(reason))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

/// Whether the server closed `s` (end of stream or reset) before `within` passed.
async fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(tokio::time::timeout(within, s.read(&mut byte)).await, Ok(Ok(0)) | Ok(Err(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_over_a_handshake_budget_are_closed_at_once_and_counted() {
    let pki = Pki::new();
    let mut profile = pki.server_profile();
    // Any socket closed within the test's waits was refused, not timed out.
    profile.handshake_timeout = Duration::from_secs(600);
    let mut server = Server::new(profile.server().unwrap());
    trustwire::echo::register(&mut server);
    server.options_mut().max_handshakes = 6;
    server.options_mut().max_handshakes_per_source = 4;
    let server = server.bind("127.0.0.1:0").await.unwrap();
    let addr = server.local_addr();
    let (per_source0, total0) = (refused("max_handshakes_per_source"), refused("max_handshakes"));

    let mut first = idle_sockets(addr, "127.0.0.2".parse().unwrap(), 5).await;
    assert_eq!(first.len(), 5);
    assert!(closed_by_server(&mut first[4], Duration::from_secs(30)).await, "the 5th socket from one source");
    let mut second = idle_sockets(addr, "127.0.0.3".parse().unwrap(), 3).await;
    assert_eq!(second.len(), 3);
    assert!(closed_by_server(&mut second[2], Duration::from_secs(30)).await, "the 7th handshake in all");
    assert!(refused("max_handshakes_per_source") >= per_source0 + 1.0);
    assert!(refused("max_handshakes") >= total0 + 1.0);

    // Budget full: a client from a third source is refused too, until the idle sockets go.
    let c = client(addr, &pki.client_profile());
    assert!(echo(&c, "refused").await.is_err(), "the handshake budget is full");
    drop((first, second));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match echo(&c, "served").await {
            Ok(text) => break assert_eq!(text, "served"),
            Err(e) => assert!(tokio::time::Instant::now() < deadline, "slots never came back: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_over_max_connections_is_closed_before_its_handshake() {
    let pki = Pki::new();
    let mut profile = pki.server_profile();
    // A socket closed within the test's wait was refused, not timed out in its handshake.
    profile.handshake_timeout = Duration::from_secs(600);
    let mut server = Server::new(profile.server().unwrap());
    trustwire::echo::register(&mut server);
    server.options_mut().max_connections = 1;
    let server = server.bind("127.0.0.1:0").await.unwrap();
    let before = refused("max_connections");

    let first = client(server.local_addr(), &pki.client_profile());
    assert_eq!(echo(&first, "one").await.unwrap(), "one");
    // A socket that never starts its handshake is closed all the same: the budget is checked
    // when it is accepted, not once a handshake has been paid for.
    let mut silent = idle_sockets(server.local_addr(), "127.0.0.1".parse().unwrap(), 1).await;
    assert_eq!(silent.len(), 1);
    assert!(
        closed_by_server(&mut silent[0], Duration::from_secs(30)).await,
        "a socket over max_connections is closed before its handshake"
    );
    let options = ClientOptions { connect_timeout: Duration::from_secs(10), ..Default::default() };
    let second = Client::new(server.local_addr().to_string(), pki.client_profile().client().unwrap(), options);
    let err = echo(&second, "two").await.expect_err("a second connection is over max_connections");
    assert!(refused("max_connections") >= before + 1.0, "{err}");
    drop(first);
}
