//! Finding 14: CLI flags replace a profile's whole trust bundle and drop its CRLs.
//!
//! `call`/`probe --config X --ca Y` used to build the trust bundle from `--ca` alone, so the
//! CRLs X names were dropped and a revoked server was trusted again. `--ca` now replaces only
//! the CA list; the profile's CRLs stay in force. And a CRL file holding no CRL, refused by
//! the credential store, was accepted on the CLI's own fixed-profile path: every command now
//! loads through the store, with its one CRL rule.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use crate::common::{echo_server, identity, trustwire_bin, Pki};

fn trustwire(args: &[&str]) -> Output {
    Command::new(trustwire_bin()).args(args).output().expect("run trustwire")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A client profile trusting the CA, with `crl` as its CRL file.
fn profile_with_crl(pki: &Pki, crl: &[u8]) -> std::path::PathBuf {
    std::fs::write(pki.path("ca.crl.pem"), crl).unwrap();
    let profile = pki.path("client.toml");
    std::fs::write(
        &profile,
        "[identity]\ncert = \"client.pem\"\nkey = \"client.key\"\n[trust]\nca = [\"ca.pem\"]\ncrl = [\"ca.crl.pem\"]\n",
    )
    .unwrap();
    profile
}

#[test]
fn ca_flag_keeps_the_profiles_crls() {
    let pki = Pki::new();
    let serial = identity(&pki.server).leaf_info().unwrap().identity.serial;
    let crl = pki.ca.crl_pem(&[&serial], SystemTime::now() + Duration::from_secs(86_400)).unwrap();
    let profile = profile_with_crl(&pki, crl.as_bytes());
    let server = trustwire::runtime::runtime().block_on(echo_server(&pki.server_profile()));
    let addr = server.local_addr().to_string();
    let ca = pki.path("ca.pem");

    for args in [
        vec!["call", &addr, "example.EchoService/Echo", "--echo", "x", "--config", s(&profile)],
        vec!["call", &addr, "example.EchoService/Echo", "--echo", "x", "--config", s(&profile), "--ca", s(&ca)],
        vec!["probe", &addr, "--config", s(&profile), "--ca", s(&ca)],
    ] {
        let out = trustwire(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "trustwire {args:?} must refuse the revoked server: {err}");
        assert!(err.contains("[revoked]"), "trustwire {args:?}: {err}");
    }
}

#[test]
fn a_crl_file_holding_no_crl_is_refused() {
    let pki = Pki::new();
    let profile = profile_with_crl(&pki, b"");
    let server = trustwire::runtime::runtime().block_on(echo_server(&pki.server_profile()));
    let addr = server.local_addr().to_string();
    for args in [
        vec!["call", &addr, "example.EchoService/Echo", "--echo", "x", "--config", s(&profile)],
        vec!["probe", &addr, "--config", s(&profile)],
    ] {
        let out = trustwire(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "trustwire {args:?} accepted an empty CRL file");
        assert!(err.contains("[bad_pem]") && err.contains("holds no CRL"), "trustwire {args:?}: {err}");
    }
}
