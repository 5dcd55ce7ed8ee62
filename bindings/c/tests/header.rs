//! The committed header and symbol list are what this crate produces. Regenerate both with
//! `make header` (TW_BLESS=1) after changing the API, and review the diff: a removed or renamed
//! symbol breaks every program linked against the library.

use std::path::{Path, PathBuf};
use std::process::Command;

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn bless() -> bool {
    std::env::var_os("TW_BLESS").is_some_and(|v| v == "1")
}

/// Compares `actual` with the committed file, or rewrites the file when blessing.
fn check(committed: &Path, actual: &str, what: &str) {
    if bless() {
        std::fs::write(committed, actual).unwrap();
        return;
    }
    let current = std::fs::read_to_string(committed).unwrap_or_default();
    if current != actual {
        let diff: Vec<String> = diff_lines(&current, actual);
        panic!(
            "{what} {} is out of date; run `make header` and commit the result.\nfirst differences:\n{}",
            committed.display(),
            diff.join("\n")
        );
    }
}

fn diff_lines(old: &str, new: &str) -> Vec<String> {
    let old: Vec<&str> = old.lines().collect();
    let new: Vec<&str> = new.lines().collect();
    let mut out = Vec::new();
    for l in old.iter().filter(|l| !new.contains(l)).take(10) {
        out.push(format!("- {l}"));
    }
    for l in new.iter().filter(|l| !old.contains(l)).take(10) {
        out.push(format!("+ {l}"));
    }
    out
}

#[test]
fn committed_header_is_what_cbindgen_generates() {
    let dir = crate_dir();
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).unwrap();
    let mut buf = Vec::new();
    cbindgen::Builder::new()
        .with_crate(&dir)
        .with_config(config)
        .generate()
        .expect("cbindgen cannot generate the header")
        .write(&mut buf);
    let header = String::from_utf8(buf).unwrap();
    check(&dir.join("../../include/trustwire.h"), &header, "the header");
}

mod common;

/// target/<profile>/libtrustwire.so, built from the current sources.
fn library() -> PathBuf {
    common::lib_dir().join("libtrustwire.so")
}

#[test]
fn exported_symbols_match_the_committed_list() {
    let lib = library();
    let out = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(&lib)
        .output()
        .unwrap_or_else(|e| panic!("cannot run nm (binutils) on {}: {e}", lib.display()));
    assert!(out.status.success(), "nm failed: {}", String::from_utf8_lossy(&out.stderr));
    let mut symbols: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace().rev();
            let name = parts.next()?;
            let kind = parts.next()?;
            (kind == "T").then(|| name.to_string())
        })
        .collect();
    symbols.sort();
    // Only our own functions are exported; anything else would be an accident of linking.
    let stray: Vec<&String> = symbols.iter().filter(|s| !s.starts_with("tw_")).collect();
    assert!(stray.is_empty(), "libtrustwire.so exports symbols outside tw_*: {stray:?}");
    let text = symbols.join("\n") + "\n";
    check(&crate_dir().join("symbols.txt"), &text, "the exported symbol list");
}
