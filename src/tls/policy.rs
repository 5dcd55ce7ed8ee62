//! Which verified peers may connect, and which may call which methods.
//!
//! Patterns: an exact SPIFFE ID (`spiffe://example.org/ns/prod/web`), a path prefix
//! (`spiffe://example.org/ns/prod/*`), a whole trust domain (`spiffe://example.org/*`),
//! a DNS SAN (`dns:api.example.org`, or `dns:*.example.org` for one label), a subject CN only
//! when written `cn:NAME`, and `*` for any peer the trust bundle vouches for.

use std::fmt;

use crate::error::Error;
use crate::tls::identity::PeerIdentity;
use crate::tls::spiffe::SpiffeId;

/// One allow-list entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// `*`: any verified peer.
    Any,
    /// An exact SPIFFE ID.
    SpiffeId(String),
    /// `spiffe://…/*`: SPIFFE IDs starting with this prefix (kept with its trailing `/`).
    SpiffePrefix(String),
    /// `dns:NAME` (case-insensitive); `dns:*.suffix` matches exactly one extra label.
    Dns(String),
    /// `cn:NAME`: the subject common name, exactly.
    Cn(String),
}

impl Pattern {
    pub fn parse(s: &str) -> Result<Self, Error> {
        let s = s.trim();
        if s == "*" {
            return Ok(Pattern::Any);
        }
        if strip_prefix_ci(s, "spiffe://").is_some() {
            let bad = |why: String| Error::config(format!("allow pattern '{s}': {why}"));
            if let Some(base) = s.strip_suffix("/*") {
                // A prefix: the part before `/*` is itself a SPIFFE ID (a trust domain alone,
                // or a path), so `*` can only stand for whole trailing segments.
                let base = SpiffeId::parse(base).map_err(|e| bad(e.to_string()))?;
                return Ok(Pattern::SpiffePrefix(format!("{base}/")));
            }
            if s.contains('*') {
                return Err(bad("'*' is only allowed as a whole last path segment, e.g. \
                                spiffe://example.org/ns/prod/*"
                    .into()));
            }
            return Ok(Pattern::SpiffeId(SpiffeId::parse(s).map_err(|e| bad(e.to_string()))?.as_str().to_string()));
        }
        if let Some(name) = strip_prefix_ci(s, "dns:") {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            let bare = name.strip_prefix("*.").unwrap_or(&name);
            if bare.is_empty() || bare.contains('*') {
                return Err(Error::config(format!("allow pattern '{s}': write dns:NAME or dns:*.SUFFIX")));
            }
            return Ok(Pattern::Dns(name));
        }
        if let Some(cn) = strip_prefix_ci(s, "cn:") {
            if cn.is_empty() {
                return Err(Error::config(format!("allow pattern '{s}' has an empty CN")));
            }
            return Ok(Pattern::Cn(cn.to_string()));
        }
        Err(Error::config(format!(
            "unknown allow pattern '{s}': write spiffe://DOMAIN/PATH, spiffe://DOMAIN/PREFIX/*, \
             dns:NAME, cn:NAME, or * for any verified peer"
        )))
    }

    /// Whether a verified peer matches this pattern.
    pub fn matches(&self, peer: &PeerIdentity) -> bool {
        match self {
            Pattern::Any => true,
            // Peer SPIFFE IDs were validated when the certificate was read (an invalid one is
            // refused at the handshake), so plain comparison is exact: no normalising.
            Pattern::SpiffeId(id) => peer.spiffe_id.as_deref() == Some(id.as_str()),
            Pattern::SpiffePrefix(prefix) => {
                peer.spiffe_id.as_deref().is_some_and(|id| id.len() > prefix.len() && id.starts_with(prefix.as_str()))
            }
            Pattern::Dns(pat) => peer.dns_sans.iter().any(|d| dns_matches(pat, d)),
            Pattern::Cn(cn) => peer.common_name.as_deref() == Some(cn.as_str()),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Any => f.write_str("*"),
            Pattern::SpiffeId(id) => f.write_str(id),
            Pattern::SpiffePrefix(p) => write!(f, "{p}*"),
            Pattern::Dns(d) => write!(f, "dns:{d}"),
            Pattern::Cn(c) => write!(f, "cn:{c}"),
        }
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    (s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix)).then(|| &s[prefix.len()..])
}

fn dns_matches(pattern: &str, name: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(suffix) => name.split_once('.').is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        None => name == pattern,
    }
}

/// `service/method` with `*` for a whole service (`example.EchoService/*`) or everything (`*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MethodPattern {
    service: Option<String>,
    method: Option<String>,
}

impl MethodPattern {
    pub fn parse(s: &str) -> Result<Self, Error> {
        let s = s.trim();
        if s == "*" || s == "*/*" {
            return Ok(MethodPattern { service: None, method: None });
        }
        let (svc, m) = s.split_once('/').ok_or_else(|| {
            Error::config(format!(
                "method pattern '{s}': write SERVICE/METHOD, SERVICE/* or * \
                 (e.g. example.EchoService/Echo)"
            ))
        })?;
        let part = |p: &str| -> Result<Option<String>, Error> {
            match p {
                "*" => Ok(None),
                "" => Err(Error::config(format!("method pattern '{s}' has an empty part"))),
                p if p.contains('*') => Err(Error::config(format!("method pattern '{s}': '*' must stand alone"))),
                p => Ok(Some(p.to_string())),
            }
        };
        Ok(MethodPattern { service: part(svc)?, method: part(m)? })
    }

    /// `service` is the full service name the call resolved to.
    pub fn matches(&self, service: &str, method: &str) -> bool {
        self.service.as_deref().is_none_or(|s| s == service) && self.method.as_deref().is_none_or(|m| m == method)
    }
}

impl fmt::Display for MethodPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.service.as_deref().unwrap_or("*"), self.method.as_deref().unwrap_or("*"))
    }
}

/// Which peers may call the methods matched by `methods`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MethodRule {
    pub methods: Vec<MethodPattern>,
    pub allow: Vec<Pattern>,
}

/// The peer policy of a profile.
///
/// `allow` decides who may connect: an empty list admits any peer whose chain the trust bundle
/// verifies. `rules`, when present, decide who may call what: the first rule whose method
/// pattern matches the call decides, and a call no rule matches is denied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub allow: Vec<Pattern>,
    pub rules: Vec<MethodRule>,
    /// The application's own checks, run after the allow-list and the rules admitted a peer or
    /// a call ([`crate::authz`]).
    pub hooks: crate::authz::Hooks,
}

/// The outcome of a method check, with the reason for a denial.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MethodDecision {
    Allowed,
    Denied(String),
}

impl Policy {
    /// Builds a policy from pattern strings.
    pub fn from_patterns<S: AsRef<str>>(allow: &[S]) -> Result<Self, Error> {
        Ok(Policy {
            allow: allow.iter().map(|p| Pattern::parse(p.as_ref())).collect::<Result<_, _>>()?,
            ..Policy::default()
        })
    }

    /// Adds a per-method rule.
    pub fn with_rule<S: AsRef<str>, T: AsRef<str>>(mut self, methods: &[S], allow: &[T]) -> Result<Self, Error> {
        self.rules.push(MethodRule {
            methods: methods.iter().map(|m| MethodPattern::parse(m.as_ref())).collect::<Result<_, _>>()?,
            allow: allow.iter().map(|p| Pattern::parse(p.as_ref())).collect::<Result<_, _>>()?,
        });
        Ok(self)
    }

    /// Whether a verified peer may connect.
    pub fn admits(&self, peer: &PeerIdentity) -> bool {
        self.allow.is_empty() || self.allow.iter().any(|p| p.matches(peer))
    }

    /// Whether a verified peer may connect: the allow-list, then the connection hook. The
    /// error is the `peer_not_allowed` message for our logs.
    pub fn admit(&self, peer: &PeerIdentity) -> Result<(), String> {
        if !self.admits(peer) {
            return Err(self.explain_refusal(peer));
        }
        crate::authz::check_peer(&self.hooks, peer)
    }

    /// Why a peer is not admitted, for the `peer_not_allowed` message.
    pub fn explain_refusal(&self, peer: &PeerIdentity) -> String {
        format!(
            "peer {} (spiffe id: {}, names: [{}], cn: {}) matches none of the allow-list \
             patterns [{}]; add a pattern for it or issue it a certificate with an allowed identity",
            peer.display_name(),
            peer.spiffe_id.as_deref().unwrap_or("none"),
            peer.names().join(", "),
            peer.common_name.as_deref().unwrap_or("none"),
            join(&self.allow),
        )
    }

    /// The full service names the method rules mention whose last `.`-separated part is
    /// `short`: what an unqualified service name a caller sends may resolve to on a brpc server.
    pub fn rule_services_named(&self, short: &str) -> Vec<&str> {
        let mut out: Vec<&str> = self
            .rules
            .iter()
            .flat_map(|r| r.methods.iter())
            .filter_map(|m| m.service.as_deref())
            .filter(|svc| svc.rsplit('.').next() == Some(short) && *svc != short)
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Whether `peer` may call `service/method` (service = the resolved full name).
    pub fn may_call(&self, peer: &PeerIdentity, service: &str, method: &str) -> MethodDecision {
        if self.rules.is_empty() {
            return MethodDecision::Allowed;
        }
        match self.rules.iter().find(|r| r.methods.iter().any(|m| m.matches(service, method))) {
            Some(rule) if rule.allow.iter().any(|p| p.matches(peer)) => MethodDecision::Allowed,
            Some(rule) => MethodDecision::Denied(format!(
                "peer {} may not call {service}/{method}: the rule for [{}] allows only [{}]",
                peer.display_name(),
                join(&rule.methods),
                join(&rule.allow)
            )),
            None => MethodDecision::Denied(format!(
                "peer {} may not call {service}/{method}: no method rule covers it \
                 (calls not named by a rule are denied)",
                peer.display_name()
            )),
        }
    }
}

fn join<T: fmt::Display>(items: &[T]) -> String {
    items.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}
