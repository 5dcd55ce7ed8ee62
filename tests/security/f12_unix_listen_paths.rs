//! Finding 12, second part: a Unix listen path is removed whatever it is, and the socket's mode is the umask's.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use trustwire::proxy::{Endpoint, Route, RouteTls, RunningProxy};

use crate::common::*;

async fn listen_on(pki: &Pki, name: &str, path: &Path, mode: Option<u32>) -> trustwire::Result<RunningProxy> {
    let mut profile = pki.client_profile();
    profile.server_name = Some("localhost".into());
    let mut route = Route::new(
        name,
        Endpoint::Unix(path.to_path_buf()),
        Endpoint::Tcp("127.0.0.1:9".into()),
        RouteTls::Client(profile.client().unwrap()),
    );
    if let Some(m) = mode {
        route.listen_mode = m;
    }
    trustwire::proxy::start(route).await
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_stale_socket_is_replaced_and_anything_else_at_the_path_is_refused() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();

    let file = dir.path().join("data.db");
    std::fs::write(&file, b"precious").unwrap();
    let err = listen_on(&pki, "f12-file", &file, None).await.err().expect("a regular file is not replaced");
    assert!(err.to_string().contains("route f12-file: unix:"), "{err}");
    assert!(err.to_string().contains("is a regular file"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");

    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let err = listen_on(&pki, "f12-dir", &sub, None).await.err().expect("a directory is refused");
    assert!(err.to_string().contains("route f12-dir:") && err.to_string().contains("is a directory"), "{err}");
    assert!(sub.is_dir());

    // Another process's socket, still accepting.
    let live = dir.path().join("live.sock");
    let other = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let err = listen_on(&pki, "f12-live", &live, None).await.err().expect("a live socket is not taken over");
    assert!(err.to_string().contains("route f12-live:") && err.to_string().contains("a live socket"), "{err}");
    std::os::unix::net::UnixStream::connect(&live).expect("the other process still has its socket");
    drop(other);

    // The same socket now that nobody accepts on it: stale, replaced.
    let proxy = listen_on(&pki, "f12-stale", &live, None).await.expect("a stale socket is replaced");
    assert_eq!(proxy.local(), &Endpoint::Unix(live.clone()));
    tokio::net::UnixStream::connect(&live).await.expect("the route accepts on the path");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_mode_is_owner_and_group_by_default_and_configurable() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let default = dir.path().join("default.sock");
    let _a = listen_on(&pki, "f12-mode-default", &default, None).await.unwrap();
    assert_eq!(mode_of(&default), 0o660, "owner and group, whatever the umask");
    let private = dir.path().join("private.sock");
    let _b = listen_on(&pki, "f12-mode-0600", &private, Some(0o600)).await.unwrap();
    assert_eq!(mode_of(&private), 0o600);
    // Nothing is left behind beside the sockets.
    let mut names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["default.sock", "private.sock"]);

    // From a proxy config file: octal text; refused on a TCP listener.
    let d = pki.dir.path();
    std::fs::write(
        d.join("client.toml"),
        "[identity]\ncert = \"client.pem\"\nkey = \"client.key\"\n[trust]\nca = [\"ca.pem\"]\n",
    )
    .unwrap();
    let config = |listen: &str, mode: &str| {
        std::fs::write(
            d.join("proxy.toml"),
            format!(
                "[[route]]\nname = \"out\"\nmode = \"client\"\nlisten = \"{listen}\"\nlisten_mode = \"{mode}\"\n\
                 upstream = \"127.0.0.1:9\"\nprofile = \"client.toml\"\n"
            ),
        )
        .unwrap();
        trustwire::proxy::config::ProxyFile::load(&d.join("proxy.toml")).unwrap()
    };
    let from_file = dir.path().join("file.sock");
    let started = config(&format!("unix:{}", from_file.display()), "0640").start().await.unwrap();
    assert_eq!(mode_of(&from_file), 0o640);
    drop(started);
    let err = config("127.0.0.1:0", "0600").start().await.err().expect("listen_mode on TCP");
    assert!(err.to_string().contains("route out: listen_mode applies to unix: listen paths only"), "{err}");
    let err =
        config(&format!("unix:{}", dir.path().join("x.sock").display()), "rw-rw----").start().await.err().unwrap();
    assert!(err.to_string().contains("route out: listen_mode = \"rw-rw----\""), "{err}");
}
