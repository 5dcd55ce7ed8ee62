//! The identity token a server-side proxy puts into `authentication_data` of each baidu_std
//! request, so a brpc service learns its verified caller through brpc's Authenticator hook.
//!
//! Format (ASCII, one line):
//!
//! ```text
//! tw1;kid=<key id>;spiffe=<SPIFFE ID or empty>;fp=<sha256 hex of the peer's leaf>;na=<not-after, unix s>;iat=<issued at, unix s>;mac=<hex HMAC-SHA256>
//! ```
//!
//! The MAC covers every byte before `;mac=`, under the secret the route is configured with for
//! `kid`. Values are percent-encoded for `%`, `;` and `=`, so a field can never forge another.
//! A verifier checks the version, the key id, the MAC (constant time) and that `na` has not
//! passed; a refusal names its reason.

use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::{constant_time, hmac};

use crate::tls::identity::PeerIdentity;

/// What a valid token says about the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenIdentity {
    pub key_id: String,
    pub spiffe_id: Option<String>,
    pub fingerprint_sha256: String,
    pub not_after: u64,
    pub issued_at: u64,
}

/// Why a token was refused. `name()` is stable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not a trustwire identity token (bad format: {0})")]
    BadFormat(&'static str),
    #[error("token signed with key id '{0}', which this verifier does not hold")]
    UnknownKey(String),
    #[error("token MAC does not verify (wrong key or tampered fields)")]
    BadMac,
    #[error("the caller's certificate expired at {0} (unix seconds)")]
    Expired(u64),
}

impl TokenError {
    pub fn name(&self) -> &'static str {
        match self {
            TokenError::BadFormat(_) => "bad_format",
            TokenError::UnknownKey(_) => "unknown_key",
            TokenError::BadMac => "bad_mac",
            TokenError::Expired(_) => "expired",
        }
    }
}

fn escape(v: &str) -> String {
    v.replace('%', "%25").replace(';', "%3B").replace('=', "%3D")
}

fn unescape(v: &str) -> String {
    v.replace("%3D", "=").replace("%3B", ";").replace("%25", "%")
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn mac(secret: &[u8], body: &[u8]) -> hmac::Tag {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), body)
}

/// Issues a token for `peer` under (`key_id`, `secret`).
pub fn issue(peer: &PeerIdentity, key_id: &str, secret: &[u8]) -> String {
    let body = format!(
        "tw1;kid={};spiffe={};fp={};na={};iat={}",
        escape(key_id),
        escape(peer.spiffe_id.as_deref().unwrap_or("")),
        escape(&peer.fingerprint_sha256),
        unix(peer.not_after),
        unix(SystemTime::now()),
    );
    let tag = mac(secret, body.as_bytes());
    format!("{body};mac={}", hex::encode(tag.as_ref()))
}

/// Verifies a token with the keys the verifier holds (`(key id, secret)` pairs).
pub fn verify(token: &[u8], keys: &[(&str, &[u8])]) -> Result<TokenIdentity, TokenError> {
    let text = std::str::from_utf8(token).map_err(|_| TokenError::BadFormat("not UTF-8"))?;
    let (body, mac_hex) = text.rsplit_once(";mac=").ok_or(TokenError::BadFormat("no mac field"))?;
    let mut fields = body.split(';');
    if fields.next() != Some("tw1") {
        return Err(TokenError::BadFormat("unknown version"));
    }
    let mut get = |name: &'static str| -> Result<String, TokenError> {
        let f = fields.next().ok_or(TokenError::BadFormat("missing field"))?;
        let (k, v) = f.split_once('=').ok_or(TokenError::BadFormat("field without '='"))?;
        if k != name {
            return Err(TokenError::BadFormat("fields out of order"));
        }
        Ok(unescape(v))
    };
    let key_id = get("kid")?;
    let spiffe = get("spiffe")?;
    let fp = get("fp")?;
    let na: u64 = get("na")?.parse().map_err(|_| TokenError::BadFormat("na is not a number"))?;
    let iat: u64 = get("iat")?.parse().map_err(|_| TokenError::BadFormat("iat is not a number"))?;
    if fields.next().is_some() {
        return Err(TokenError::BadFormat("unexpected field"));
    }
    let secret = keys
        .iter()
        .find(|(id, _)| *id == key_id)
        .map(|(_, s)| *s)
        .ok_or_else(|| TokenError::UnknownKey(key_id.clone()))?;
    let given = hex::decode(mac_hex).map_err(|_| TokenError::BadFormat("mac is not hex"))?;
    let expected = mac(secret, body.as_bytes());
    constant_time::verify_slices_are_equal(expected.as_ref(), &given).map_err(|_| TokenError::BadMac)?;
    if na < unix(SystemTime::now()) {
        return Err(TokenError::Expired(na));
    }
    Ok(TokenIdentity {
        key_id,
        spiffe_id: (!spiffe.is_empty()).then_some(spiffe),
        fingerprint_sha256: fp,
        not_after: na,
        issued_at: iat,
    })
}
