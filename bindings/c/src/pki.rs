//! A development CA in memory, so C test harnesses need no openssl commands.

use std::ffi::{c_char, CString};
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tw::pki::{DevCa, IssueRequest, Usage};

use crate::ffi::{self, arg, guard, lend_str, opt_str_arg, out_box, str_arg, str_array_arg, Failure};
use crate::tw_result;

/// A development certificate authority whose key lives in memory. For tests and demos, not for
/// production PKI. Any thread.
pub struct tw_dev_ca {
    ca: DevCa,
    cert_pem: CString,
}

/// What an issued certificate may be used for (its extended key usage).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum tw_usage {
    /// TLS server and client: a service that serves and calls.
    TW_USAGE_BOTH = 0,
    TW_USAGE_SERVER = 1,
    TW_USAGE_CLIENT = 2,
}

/// A new CA for `trust_domain` (e.g. "example.org"), with a fresh ECDSA P-256 key. On TW_OK
/// `*ca_out` is owned by the caller (`tw_dev_ca_free`).
#[no_mangle]
pub unsafe extern "C" fn tw_dev_ca_new(trust_domain: *const c_char, ca_out: *mut *mut tw_dev_ca) -> tw_result {
    guard(|| {
        let domain = unsafe { str_arg(trust_domain, "trust_domain") }?;
        let ca = DevCa::new(domain)?;
        let cert_pem = ffi::owned_cstring(ca.cert_pem().to_string());
        unsafe { out_box(ca_out, tw_dev_ca { ca, cert_pem }) }
    })
}

/// Frees the CA. NULL does nothing.
#[no_mangle]
pub unsafe extern "C" fn tw_dev_ca_free(ca: *mut tw_dev_ca) {
    unsafe { ffi::free_box(ca) }
}

/// The CA certificate (PEM, NUL-terminated), for trust bundles. Valid as long as the CA.
#[no_mangle]
pub unsafe extern "C" fn tw_dev_ca_cert_pem(ca: *const tw_dev_ca) -> *const c_char {
    unsafe { lend_str(ca, "ca", |x| Some(&x.cert_pem)) }
}

fn time(unix: i64) -> SystemTime {
    if unix >= 0 {
        UNIX_EPOCH + Duration::from_secs(unix as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(unix.unsigned_abs())
    }
}

/// Issues a certificate named `name` (its CN) with an optional SPIFFE ID (NULL for none) and
/// `sans_len` extra names, each a DNS name or an IP address. Validity: `not_before` and
/// `not_after` in Unix seconds, 0 for the defaults (five minutes ago; 30 days from now). On
/// TW_OK `*cert_pem_out` and `*key_pem_out` are NUL-terminated PEM strings the caller frees
/// with `tw_string_free`.
#[no_mangle]
pub unsafe extern "C" fn tw_dev_ca_issue(
    ca: *const tw_dev_ca,
    name: *const c_char,
    spiffe_id: *const c_char,
    sans: *const *const c_char,
    sans_len: usize,
    not_before: i64,
    not_after: i64,
    usage: tw_usage,
    cert_pem_out: *mut *mut c_char,
    key_pem_out: *mut *mut c_char,
) -> tw_result {
    guard(|| {
        let ca = unsafe { arg(ca, "ca") }?;
        let mut req = IssueRequest::new(unsafe { str_arg(name, "name") }?);
        if let Some(id) = unsafe { opt_str_arg(spiffe_id, "spiffe_id") }? {
            req = req.spiffe_id(id);
        }
        for san in unsafe { str_array_arg(sans, sans_len, "sans") }? {
            req = match san.parse::<IpAddr>() {
                Ok(ip) => req.ip(ip),
                Err(_) => req.dns(san),
            };
        }
        if not_before != 0 || not_after != 0 {
            let now = SystemTime::now();
            let na = if not_after != 0 { time(not_after) } else { now + Duration::from_secs(30 * 86400) };
            let nb = if not_before != 0 { time(not_before) } else { na.min(now) - Duration::from_secs(300) };
            if nb >= na {
                return Err(Failure::new(tw_result::TW_INVALID_ARGUMENT, "not_before must come before not_after"));
            }
            req = req.validity(nb, na);
        }
        let raw = usage as u32;
        req = req.usage(match raw {
            0 => Usage::Both,
            1 => Usage::Server,
            2 => Usage::Client,
            _ => return Err(Failure::new(tw_result::TW_INVALID_ARGUMENT, format!("unknown usage {raw}"))),
        });
        if cert_pem_out.is_null() || key_pem_out.is_null() {
            return Err(Failure::null("cert_pem_out or key_pem_out"));
        }
        let cred = ca.ca.issue(&req)?;
        unsafe {
            cert_pem_out.write(ffi::give_string(ffi::owned_cstring(cred.cert_pem)));
            key_pem_out.write(ffi::give_string(ffi::owned_cstring(cred.key_pem)));
        }
        Ok(())
    })
}

/// A CRL signed by the CA revoking the certificates whose serials (lowercase hex, as
/// `tw_profile_serial` gives them) are listed, valid until `next_update` (Unix seconds). On
/// TW_OK `*crl_pem_out` is a PEM string the caller frees with `tw_string_free`.
#[no_mangle]
pub unsafe extern "C" fn tw_dev_ca_crl_pem(
    ca: *const tw_dev_ca,
    serials: *const *const c_char,
    serials_len: usize,
    next_update: i64,
    crl_pem_out: *mut *mut c_char,
) -> tw_result {
    guard(|| {
        let ca = unsafe { arg(ca, "ca") }?;
        let serials = unsafe { str_array_arg(serials, serials_len, "serials") }?;
        let pem = ca.ca.crl_pem(&serials, time(next_update))?;
        unsafe { ffi::out_string(crl_pem_out, ffi::owned_cstring(pem)) }
    })
}
