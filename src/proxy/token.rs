//! The identity token a server-side proxy puts into `authentication_data` of each baidu_std
//! request, so a brpc service learns its verified caller through brpc's Authenticator hook.
//!
//! Format version 2 (ASCII, one line):
//!
//! ```text
//! tw2;kid=<key id>;aud=<route name>;spiffe=<SPIFFE ID or empty>;fp=<sha256 hex of the peer's leaf>;na=<not-after, unix s>;iat=<issued at, unix s>;mac=<hex HMAC-SHA256>
//! ```
//!
//! The MAC covers every byte before `;mac=`, under the secret the route is configured with for
//! `kid`. Values are percent-encoded for `%`, `;` and `=`, so a field can never forge another.
//!
//! A verifier is given the keys it holds, the audience it expects (the name of the proxy route
//! in front of it) and a maximum age, and refuses, naming the reason:
//! - `bad_format`: not a trustwire token;
//! - `unsupported_version`: a trustwire token of another version (`tw1`, which had no audience,
//!   is refused, never read as `tw2`);
//! - `unknown_key` / `bad_mac`: a key id it does not hold, or a MAC that does not verify;
//! - `wrong_audience`: minted for another route, so a token seen by one service cannot be
//!   replayed to another that shares the key;
//! - `expired`: the caller's certificate (`na`) has expired;
//! - `too_old`: `iat` is more than the maximum age ago; `issued_in_future`: `iat` is more than
//!   [`CLOCK_SKEW`] ahead of the verifier's clock.
//!
//! The fields are checked after the MAC, so a refusal for audience or age speaks about a token
//! our proxy really issued. A route re-issues the token of a long-lived connection once it is
//! older than a fifth of the route's `token_max_age`, so requests never carry a stale one.
//!
//! Version history: `tw1` (no `aud`; `iat` was written but not checked) was a bearer value any
//! holder could present to any service sharing the key. `tw2` adds `aud` and makes `iat` count.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::{constant_time, hmac};

use crate::tls::identity::PeerIdentity;

/// The format version this build writes and accepts.
pub const VERSION: &str = "tw2";

/// A sensible maximum age for verifiers, and the default a route assumes its verifiers use.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(300);

/// How far in the future `iat` may be before a token is refused: the proxy's and the verifier's
/// clocks may differ by this much.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// What a valid token says about the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenIdentity {
    pub key_id: String,
    /// The proxy route that issued the token.
    pub audience: String,
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
    #[error(
        "token format '{0}' is not supported: this verifier reads {VERSION} tokens (which name their audience); \
         upgrade the proxy that wrote it"
    )]
    UnsupportedVersion(String),
    #[error("token was issued for route '{got}', this verifier expects '{expected}'")]
    WrongAudience { got: String, expected: String },
    #[error("token was issued {age} s ago, more than the maximum age of {max_age} s")]
    TooOld { age: u64, max_age: u64 },
    #[error("token was issued {ahead} s in the future (is the proxy's clock ahead?)")]
    IssuedInFuture { ahead: u64 },
}

impl TokenError {
    pub fn name(&self) -> &'static str {
        match self {
            TokenError::BadFormat(_) => "bad_format",
            TokenError::UnknownKey(_) => "unknown_key",
            TokenError::BadMac => "bad_mac",
            TokenError::Expired(_) => "expired",
            TokenError::UnsupportedVersion(_) => "unsupported_version",
            TokenError::WrongAudience { .. } => "wrong_audience",
            TokenError::TooOld { .. } => "too_old",
            TokenError::IssuedInFuture { .. } => "issued_in_future",
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

/// Issues a token for `peer` under (`key_id`, `secret`) for `audience` (the route's name), issued
/// now.
pub fn issue(peer: &PeerIdentity, key_id: &str, secret: &[u8], audience: &str) -> String {
    issue_at(peer, key_id, secret, audience, SystemTime::now())
}

/// [`issue`] with the issue time given (tests and verifiers' own checks of `too_old`).
pub fn issue_at(peer: &PeerIdentity, key_id: &str, secret: &[u8], audience: &str, issued_at: SystemTime) -> String {
    let body = format!(
        "{VERSION};kid={};aud={};spiffe={};fp={};na={};iat={}",
        escape(key_id),
        escape(audience),
        escape(peer.spiffe_id.as_deref().unwrap_or("")),
        escape(&peer.fingerprint_sha256),
        unix(peer.not_after),
        unix(issued_at),
    );
    let tag = mac(secret, body.as_bytes());
    format!("{body};mac={}", hex::encode(tag.as_ref()))
}

/// Verifies a token with the keys the verifier holds (`(key id, secret)` pairs), for the
/// `audience` it expects (the proxy route's name) and no older than `max_age`
/// ([`DEFAULT_MAX_AGE`] is a sensible value).
pub fn verify(
    token: &[u8],
    keys: &[(&str, &[u8])],
    audience: &str,
    max_age: Duration,
) -> Result<TokenIdentity, TokenError> {
    verify_at(token, keys, audience, max_age, SystemTime::now())
}

fn verify_at(
    token: &[u8],
    keys: &[(&str, &[u8])],
    audience: &str,
    max_age: Duration,
    now: SystemTime,
) -> Result<TokenIdentity, TokenError> {
    let text = std::str::from_utf8(token).map_err(|_| TokenError::BadFormat("not UTF-8"))?;
    let version = text.split(';').next().unwrap_or("");
    if version != VERSION {
        let digits = version.strip_prefix("tw").unwrap_or("");
        if !digits.is_empty() && digits.len() <= 4 && digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(TokenError::UnsupportedVersion(version.to_string()));
        }
        return Err(TokenError::BadFormat("unknown version"));
    }
    let (body, mac_hex) = text.rsplit_once(";mac=").ok_or(TokenError::BadFormat("no mac field"))?;
    let mut fields = body.split(';').skip(1);
    let mut get = |name: &'static str| -> Result<String, TokenError> {
        let f = fields.next().ok_or(TokenError::BadFormat("missing field"))?;
        let (k, v) = f.split_once('=').ok_or(TokenError::BadFormat("field without '='"))?;
        if k != name {
            return Err(TokenError::BadFormat("fields out of order"));
        }
        Ok(unescape(v))
    };
    let key_id = get("kid")?;
    let aud = get("aud")?;
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
        .ok_or_else(|| TokenError::UnknownKey(crate::authz::truncate(&key_id).into_owned()))?;
    let given = hex::decode(mac_hex).map_err(|_| TokenError::BadFormat("mac is not hex"))?;
    let expected = mac(secret, body.as_bytes());
    constant_time::verify_slices_are_equal(expected.as_ref(), &given).map_err(|_| TokenError::BadMac)?;
    if aud != audience {
        return Err(TokenError::WrongAudience {
            got: crate::authz::truncate(&aud).into_owned(),
            expected: crate::authz::truncate(audience).into_owned(),
        });
    }
    let now = unix(now);
    if na < now {
        return Err(TokenError::Expired(na));
    }
    if iat > now + CLOCK_SKEW.as_secs() {
        return Err(TokenError::IssuedInFuture { ahead: iat - now });
    }
    let age = now.saturating_sub(iat);
    if age > max_age.as_secs() {
        return Err(TokenError::TooOld { age, max_age: max_age.as_secs() });
    }
    Ok(TokenIdentity {
        key_id,
        audience: aud,
        spiffe_id: (!spiffe.is_empty()).then_some(spiffe),
        fingerprint_sha256: fp,
        not_after: na,
        issued_at: iat,
    })
}

/// The token one connection's requests carry, re-issued once it is older than `refresh`, so a
/// long-lived connection never sends a token its verifier would find too old.
pub(crate) struct Signer<'a> {
    peer: &'a PeerIdentity,
    key_id: &'a str,
    secret: &'a [u8],
    audience: &'a str,
    refresh: Duration,
    current: bytes::Bytes,
    issued: std::time::Instant,
}

impl<'a> Signer<'a> {
    pub(crate) fn new(
        peer: &'a PeerIdentity,
        key_id: &'a str,
        secret: &'a [u8],
        audience: &'a str,
        max_age: Duration,
    ) -> Self {
        let current = issue(peer, key_id, secret, audience).into();
        Signer { peer, key_id, secret, audience, refresh: max_age / 5, current, issued: std::time::Instant::now() }
    }

    /// The token to put into the next request.
    pub(crate) fn current(&mut self) -> bytes::Bytes {
        if self.issued.elapsed() >= self.refresh {
            self.current = issue(self.peer, self.key_id, self.secret, self.audience).into();
            self.issued = std::time::Instant::now();
        }
        self.current.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerIdentity {
        PeerIdentity {
            spiffe_id: Some("spiffe://example.org/web".into()),
            dns_sans: vec![],
            ip_sans: vec![],
            uri_sans: vec![],
            common_name: None,
            fingerprint_sha256: "ab".repeat(32),
            serial: "01".into(),
            not_before: UNIX_EPOCH,
            not_after: SystemTime::now() + Duration::from_secs(3600),
            subject: String::new(),
            issuer: String::new(),
        }
    }

    const KEY: &[u8] = b"0123456789abcdef";

    #[test]
    fn age_is_measured_from_iat_with_some_clock_skew_allowed() {
        let t0 = SystemTime::now();
        let t = issue_at(&peer(), "k1", KEY, "in", t0);
        let at = |secs: i64| {
            let now = if secs >= 0 {
                t0 + Duration::from_secs(secs as u64)
            } else {
                t0 - Duration::from_secs((-secs) as u64)
            };
            verify_at(t.as_bytes(), &[("k1", KEY)], "in", Duration::from_secs(300), now).map_err(|e| e.name())
        };
        assert!(at(0).is_ok());
        assert!(at(300).is_ok());
        assert_eq!(at(301).unwrap_err(), "too_old");
        assert!(at(-60).is_ok(), "a verifier whose clock is a minute behind");
        assert_eq!(at(-61).unwrap_err(), "issued_in_future");
    }

    #[test]
    fn signer_reissues_once_the_token_is_a_fifth_of_max_age_old() {
        let p = peer();
        let mut s = Signer::new(&p, "k1", KEY, "in", Duration::from_secs(300));
        let first = s.current();
        assert_eq!(s.current(), first, "a fresh token is reused");
        s.issued -= Duration::from_secs(61);
        // Same second possible, so compare the issue instant, not the bytes.
        let _ = s.current();
        assert!(s.issued.elapsed() < Duration::from_secs(60), "re-issued");
    }
}
