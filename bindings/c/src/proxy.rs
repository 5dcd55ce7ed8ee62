//! The proxy started inside the calling process, and the verifier of the identity tokens a
//! server-side proxy writes for brpc services.

use std::ffi::{c_char, CString};
use std::path::PathBuf;
use std::time::Duration;

use tw::credentials::CredentialStore;
use tw::proxy::RunningProxy;

use crate::ffi::{self, arg, bytes_arg, guard, guard_value, lend_str, str_arg, Failure};
use crate::tw_result;

/// Proxy routes from a `trustwire proxy` config file, running on trustwire's threads inside
/// this process. Any thread.
pub struct tw_proxy {
    running: std::sync::Mutex<Vec<RunningProxy>>,
    stores: Vec<CredentialStore>,
    names: Vec<CString>,
    addresses: Vec<CString>,
    drain: Duration,
}

/// Starts every route of the proxy config file at `config_path` (the `trustwire proxy
/// --config` format; "Proxy mode" in the README) and returns once all listen. Each route reloads its
/// credentials when its files change. On TW_OK `*proxy_out` is owned by the caller
/// (`tw_proxy_free`). Blocks; TW_WOULD_BLOCK from a handler or callback.
#[no_mangle]
pub unsafe extern "C" fn tw_proxy_start(config_path: *const c_char, proxy_out: *mut *mut tw_proxy) -> tw_result {
    guard(|| {
        let path = PathBuf::from(unsafe { str_arg(config_path, "config_path") }?);
        if proxy_out.is_null() {
            return Err(Failure::null("proxy_out"));
        }
        if ffi::on_runtime_thread() {
            return Err(ffi::would_block("tw_proxy_start"));
        }
        ffi::ignore_sigpipe();
        let file = tw::proxy::config::ProxyFile::load(&path)?;
        let (running, stores): (Vec<_>, Vec<_>) = tw::runtime::runtime().block_on(file.start())?.into_iter().unzip();
        let drain = file.drain();
        let names = running.iter().map(|r| ffi::owned_cstring(r.name().to_string())).collect();
        let addresses = running.iter().map(|r| ffi::owned_cstring(r.local().to_string())).collect();
        let p = tw_proxy { running: std::sync::Mutex::new(running), stores, names, addresses, drain };
        unsafe { proxy_out.write(Box::into_raw(Box::new(p))) };
        Ok(())
    })
}

/// How many routes the proxy runs.
#[no_mangle]
pub unsafe extern "C" fn tw_proxy_route_count(proxy: *const tw_proxy) -> usize {
    guard_value(0, || Ok(unsafe { arg(proxy, "proxy") }?.names.len()))
}

/// Route number `index`'s name; NULL past the end. Valid as long as the proxy.
#[no_mangle]
pub unsafe extern "C" fn tw_proxy_route_name(proxy: *const tw_proxy, index: usize) -> *const c_char {
    unsafe { lend_str(proxy, "proxy", |p| p.names.get(index)) }
}

/// Where route number `index` listens ("127.0.0.1:PORT" with the bound port, or "unix:PATH");
/// NULL past the end. Valid as long as the proxy.
#[no_mangle]
pub unsafe extern "C" fn tw_proxy_route_address(proxy: *const tw_proxy, index: usize) -> *const c_char {
    unsafe { lend_str(proxy, "proxy", |p| p.addresses.get(index)) }
}

/// Reloads every route's credentials now (as SIGHUP does for `trustwire proxy`). Stops at the
/// first route whose new material is refused; that route keeps its previous generation.
#[no_mangle]
pub unsafe extern "C" fn tw_proxy_reload(proxy: *const tw_proxy) -> tw_result {
    guard(|| {
        let p = unsafe { arg(proxy, "proxy") }?;
        for s in &p.stores {
            s.reload()?;
        }
        Ok(())
    })
}

/// Graceful drain: stops accepting, lets open streams finish up to the config's
/// drain_seconds, then closes the rest. Stopping twice is TW_OK. Blocks; TW_WOULD_BLOCK from a
/// handler or callback.
#[no_mangle]
pub unsafe extern "C" fn tw_proxy_stop(proxy: *const tw_proxy) -> tw_result {
    guard(|| {
        let p = unsafe { arg(proxy, "proxy") }?;
        if ffi::on_runtime_thread() {
            return Err(ffi::would_block("tw_proxy_stop"));
        }
        let running = std::mem::take(&mut *p.running.lock().unwrap_or_else(|e| e.into_inner()));
        let drain = p.drain;
        tw::runtime::runtime().block_on(async move {
            let tasks: Vec<_> = running.into_iter().map(|r| tokio::spawn(r.shutdown(drain))).collect();
            for t in tasks {
                let _ = t.await;
            }
        });
        Ok(())
    })
}

/// Closes every route at once (open streams are cut; call `tw_proxy_stop` first to drain) and
/// frees the proxy. NULL does nothing.
#[no_mangle]
pub unsafe extern "C" fn tw_proxy_free(proxy: *mut tw_proxy) {
    unsafe { ffi::free_box(proxy) }
}

/// Verifies an identity token that a trustwire server-side proxy wrote into a baidu_std
/// request's `authentication_data` (brpc hands it to the service's Authenticator), with the
/// route's key (`key_id` and `secret_len` bytes of `secret`), for `audience` (the name of the
/// proxy route in front of this service) and no older than `max_age_seconds` (> 0;
/// TW_IDENTITY_TOKEN_DEFAULT_MAX_AGE_SECONDS is a sensible value). On TW_OK the caller's SPIFFE
/// ID is copied NUL-terminated into `spiffe_id_out` ("" when its certificate has none; the
/// buffer may be NULL when `spiffe_id_cap` is 0 and the ID is not wanted), and
/// `*not_after_out` (may be NULL) is its certificate's not-after in Unix seconds. A refusal
/// names its reason: TW_TOKEN_BAD_FORMAT, TW_TOKEN_UNSUPPORTED_VERSION (a `tw1` token, from a
/// proxy older than this library), TW_TOKEN_UNKNOWN_KEY, TW_TOKEN_BAD_MAC (wrong key or
/// tampered), TW_TOKEN_WRONG_AUDIENCE (issued for another route), TW_TOKEN_EXPIRED (the caller's
/// certificate), TW_TOKEN_TOO_OLD or TW_TOKEN_ISSUED_IN_FUTURE (more than 60 s ahead of this
/// clock); TW_BUFFER_TOO_SMALL when the ID does not fit; TW_INVALID_ARGUMENT for an empty
/// audience or a zero max age. Token format: "Proxy mode" in the README. Any thread; does not
/// block.
#[no_mangle]
pub unsafe extern "C" fn tw_identity_token_verify_for(
    token: *const u8,
    token_len: usize,
    key_id: *const c_char,
    secret: *const u8,
    secret_len: usize,
    audience: *const c_char,
    max_age_seconds: u64,
    spiffe_id_out: *mut c_char,
    spiffe_id_cap: usize,
    not_after_out: *mut u64,
) -> tw_result {
    guard(|| {
        let token = unsafe { bytes_arg(token, token_len, "token") }?;
        let key_id = unsafe { str_arg(key_id, "key_id") }?;
        let secret = unsafe { bytes_arg(secret, secret_len, "secret") }?;
        let audience = unsafe { str_arg(audience, "audience") }?;
        if audience.is_empty() {
            return Err(Failure::new(tw_result::TW_INVALID_ARGUMENT, "audience is empty: pass the proxy route's name"));
        }
        if max_age_seconds == 0 {
            return Err(Failure::new(
                tw_result::TW_INVALID_ARGUMENT,
                "max_age_seconds is 0: pass TW_IDENTITY_TOKEN_DEFAULT_MAX_AGE_SECONDS or another positive age",
            ));
        }
        let max_age = Duration::from_secs(max_age_seconds);
        let id = tw::proxy::token::verify(token, &[(key_id, secret)], audience, max_age).map_err(Failure::from)?;
        let spiffe = id.spiffe_id.unwrap_or_default();
        if spiffe_id_cap > 0 || !spiffe_id_out.is_null() {
            if spiffe_id_out.is_null() {
                return Err(Failure::null("spiffe_id_out"));
            }
            if spiffe.len() + 1 > spiffe_id_cap {
                return Err(Failure::new(
                    tw_result::TW_BUFFER_TOO_SMALL,
                    format!(
                        "the SPIFFE ID needs {} bytes with its NUL; the buffer has {spiffe_id_cap}",
                        spiffe.len() + 1
                    ),
                ));
            }
            unsafe {
                std::ptr::copy_nonoverlapping(spiffe.as_ptr(), spiffe_id_out.cast::<u8>(), spiffe.len());
                spiffe_id_out.add(spiffe.len()).write(0);
            }
        }
        if !not_after_out.is_null() {
            unsafe { not_after_out.write(id.not_after) };
        }
        Ok(())
    })
}

/// Superseded by `tw_identity_token_verify_for`. This function is not told which proxy route
/// the token must come from or how old it may be, so since token format tw2 it accepts no
/// token: it returns TW_TOKEN_AUDIENCE_NOT_CHECKED for every token (TW_NULL_ARGUMENT for a NULL
/// pointer), and a service still calling it refuses every caller, never one meant for another
/// service. Any thread; does not block.
#[no_mangle]
pub unsafe extern "C" fn tw_identity_token_verify(
    token: *const u8,
    token_len: usize,
    key_id: *const c_char,
    secret: *const u8,
    secret_len: usize,
    _spiffe_id_out: *mut c_char,
    _spiffe_id_cap: usize,
    _not_after_out: *mut u64,
) -> tw_result {
    guard(|| {
        unsafe { bytes_arg(token, token_len, "token") }?;
        unsafe { str_arg(key_id, "key_id") }?;
        unsafe { bytes_arg(secret, secret_len, "secret") }?;
        Err(Failure::new(
            tw_result::TW_TOKEN_AUDIENCE_NOT_CHECKED,
            "tw_identity_token_verify cannot check a token's audience and age, so it accepts no token; call \
             tw_identity_token_verify_for with the proxy route's name and a maximum age",
        ))
    })
}
