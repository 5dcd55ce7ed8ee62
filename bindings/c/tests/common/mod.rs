//! Paths shared by this crate's tests and its benchmark.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// target/<profile>, holding libtrustwire.so built from the current sources. Integration tests
/// and benches do not make cargo build this crate's cdylib, so it is built here on first use (a
/// no-op when it is up to date), with the profile the caller was built with.
pub fn lib_dir() -> PathBuf {
    let dir = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().to_path_buf();
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["build", "-p", "trustwire-c"]).current_dir(root());
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let out = cmd
            .env("CARGO_TARGET_DIR", dir.parent().unwrap())
            .output()
            .expect("cannot run cargo to build libtrustwire");
        assert!(out.status.success(), "building libtrustwire failed:\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(dir.join("libtrustwire.so").exists(), "no libtrustwire.so in {}", dir.display());
    });
    dir
}
