//! SPIFFE IDs and trust domains, parsed exactly as the SPIFFE ID standard says.
//!
//! `spiffe://<trust domain>/<path>`: the scheme is `spiffe`, lower case; the trust domain is made
//! of `[a-z0-9.-_]` (at most 255 bytes); the path is zero or more `/segment`s of
//! `[A-Za-z0-9.-_]`, none empty, `.` or `..`, with no trailing `/`; the whole ID is at most 2048
//! bytes. Nothing else is allowed: no percent-encoding, query, fragment, port or userinfo (their
//! characters are outside those sets). An invalid ID is refused, never normalised: an ID that
//! is not in this exact form cannot match an allow-list pattern.

use std::fmt;

/// Longest SPIFFE ID accepted, in bytes.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Longest trust domain name accepted, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

const SCHEME: &str = "spiffe://";

/// Why a string is not a SPIFFE ID or trust domain. The text says what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SpiffeIdError(String);

/// A valid SPIFFE trust domain name, e.g. `example.org`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses `example.org` or `spiffe://example.org`.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        let name = s.strip_prefix(SCHEME).unwrap_or(s);
        check_trust_domain(name).map_err(|why| invalid(s, "trust domain", &why))?;
        Ok(TrustDomain(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `spiffe://<name>`: the trust domain's own SPIFFE ID (what a SPIFFE CA certificate carries).
    pub fn id(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A valid SPIFFE ID.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    id: String,
    /// Byte length of the trust domain (after `spiffe://`).
    td_len: usize,
}

impl SpiffeId {
    /// Parses a SPIFFE ID, refusing anything the standard does not allow.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        let bad = |why: &str| invalid(s, "SPIFFE ID", why);
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(bad(&format!("longer than {MAX_SPIFFE_ID_LEN} bytes")));
        }
        let Some(rest) = s.strip_prefix(SCHEME) else {
            return Err(bad(if s.get(..SCHEME.len()).is_some_and(|p| p.eq_ignore_ascii_case(SCHEME)) {
                "the scheme must be 'spiffe' in lower case"
            } else {
                "it must start with spiffe://"
            }));
        };
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        check_trust_domain(td).map_err(|why| bad(&why))?;
        check_path(path).map_err(|why| bad(&why))?;
        Ok(SpiffeId { id: s.to_string(), td_len: td.len() })
    }

    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The trust domain name, e.g. `example.org`.
    pub fn trust_domain_name(&self) -> &str {
        &self.id[SCHEME.len()..SCHEME.len() + self.td_len]
    }

    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_name().to_string())
    }

    /// The path, `""` or starting with `/`.
    pub fn path(&self) -> &str {
        &self.id[SCHEME.len() + self.td_len..]
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

fn invalid(input: &str, what: &str, why: &str) -> SpiffeIdError {
    SpiffeIdError(format!("'{}' is not a valid {what}: {why}", crate::authz::truncate(input)))
}

fn check_trust_domain(td: &str) -> Result<(), String> {
    if td.is_empty() {
        return Err("the trust domain is empty".into());
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(format!("the trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes"));
    }
    if let Some(c) = td.chars().find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_')) {
        return Err(match c {
            'A'..='Z' => "the trust domain must be lower case".to_string(),
            ':' => "a port or userinfo is not allowed".to_string(),
            '@' => "userinfo is not allowed".to_string(),
            '%' => "percent-encoding is not allowed".to_string(),
            '?' | '#' => "a query or fragment is not allowed".to_string(),
            c => format!("the trust domain may hold only a-z, 0-9, '.', '-' and '_', not {c:?}"),
        });
    }
    Ok(())
}

fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Ok(());
    }
    if path == "/" || path.ends_with('/') {
        return Err("the path must not end with '/'".into());
    }
    for seg in path[1..].split('/') {
        match seg {
            "" => return Err("the path has an empty segment ('//')".into()),
            "." | ".." => return Err(format!("the path has a '{seg}' segment")),
            _ => {}
        }
        if let Some(c) = seg.chars().find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_')) {
            return Err(match c {
                '%' => "percent-encoding is not allowed".to_string(),
                '?' | '#' => "a query or fragment is not allowed".to_string(),
                c => format!("path segments may hold only A-Z, a-z, 0-9, '.', '-' and '_', not {c:?}"),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids_parse_with_their_parts() {
        let id = SpiffeId::parse("spiffe://example.org/ns/prod/sa/web-1_a.b").unwrap();
        assert_eq!(id.trust_domain_name(), "example.org");
        assert_eq!(id.path(), "/ns/prod/sa/web-1_a.b");
        let td_only = SpiffeId::parse("spiffe://my-td_0.example").unwrap();
        assert_eq!(td_only.path(), "");
        assert!(SpiffeId::parse(&format!("spiffe://td/{}", "a".repeat(2000))).is_ok());
    }

    #[test]
    fn everything_the_standard_forbids_is_refused_with_a_reason() {
        for (s, why) in [
            ("SPIFFE://example.org/a", "lower case"),
            ("spiffe://Example.org/a", "lower case"),
            ("spiffe:///a", "empty"),
            ("spiffe://example.org/", "end with '/'"),
            ("spiffe://example.org/a/", "end with '/'"),
            ("spiffe://example.org//a", "empty segment"),
            ("spiffe://example.org/ns/prod/x/../../admin", "'..' segment"),
            ("spiffe://example.org/./a", "'.' segment"),
            ("spiffe://example.org/a%2Fb", "percent-encoding"),
            ("spiffe://example.org/a?x=1", "query or fragment"),
            ("spiffe://example.org/a#f", "query or fragment"),
            ("spiffe://example.org:443/a", "port"),
            ("spiffe://user@example.org/a", "userinfo"),
            ("spiffe://example.org/a b", "not ' '"),
            ("https://example.org/a", "start with spiffe://"),
        ] {
            let e = SpiffeId::parse(s).expect_err(s).to_string();
            assert!(e.contains(why), "{s}: {e}");
        }
        assert!(SpiffeId::parse(&format!("spiffe://{}/a", "a".repeat(256))).is_err());
        assert!(SpiffeId::parse(&format!("spiffe://td/{}", "a".repeat(2048))).is_err());
    }

    #[test]
    fn trust_domains_parse_bare_or_as_an_id() {
        assert_eq!(TrustDomain::parse("example.org").unwrap().as_str(), "example.org");
        assert_eq!(TrustDomain::parse("spiffe://example.org").unwrap().id(), "spiffe://example.org");
        assert!(TrustDomain::parse("Example.org").is_err());
        assert!(TrustDomain::parse("").is_err());
        assert!(TrustDomain::parse("example.org/path").is_err());
    }
}
