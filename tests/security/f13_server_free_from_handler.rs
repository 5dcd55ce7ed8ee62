//! Finding 13: tw_server_free from a handler thread races dispatch.
//!
//! A C handler freeing its server returned at once while another handler of that server was
//! still running on another runtime thread, so the program freed `user_data` under it. Now
//! `tw_server_free` returns only once no other handler of the server runs, and none starts.
//! The C program (f13_server_free_from_handler.c, beside this file) runs under ASan/UBSan: a
//! heap-use-after-free, or a handler still running after free returned, fails it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::common::peers::tool_available;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// target/<profile>, with libtrustwire.so built from the current sources (integration tests
/// do not make cargo build the C library).
fn lib_dir() -> PathBuf {
    let dir = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().to_path_buf();
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["build", "-p", "trustwire-c"]).current_dir(root()).env("CARGO_TARGET_DIR", dir.parent().unwrap());
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let out = cmd.output().expect("cannot run cargo to build libtrustwire");
    assert!(out.status.success(), "building libtrustwire failed:\n{}", String::from_utf8_lossy(&out.stderr));
    dir
}

fn compile(lib: &Path) -> PathBuf {
    let exe = lib.join("c-tests/f13_server_free_from_handler");
    std::fs::create_dir_all(exe.parent().unwrap()).unwrap();
    let out = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-g"])
        .args(["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"])
        .arg("-I")
        .arg(root().join("include"))
        .arg("-I")
        .arg(root().join("tests/c"))
        .arg(root().join("tests/security/f13_server_free_from_handler.c"))
        .arg("-L")
        .arg(lib)
        .arg("-ltrustwire")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-lpthread")
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("cannot run the C compiler");
    assert!(out.status.success(), "compiling the f13 program failed:\n{}", String::from_utf8_lossy(&out.stderr));
    exe
}

#[test]
fn no_handler_runs_after_tw_server_free_returns_from_another_handler() {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    if !tool_available(Command::new(&cc).arg("--version"), "a C compiler") {
        return;
    }
    let exe = compile(&lib_dir());
    let out = Command::new(&exe)
        // The two handlers must be able to run at once, whatever the machine's core count.
        .env("TOKIO_WORKER_THREADS", "4")
        .env("ASAN_OPTIONS", "detect_leaks=0:abort_on_error=0:exitcode=86")
        .env("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("f13: no handler ran after tw_server_free returned"),
        "status {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
}
