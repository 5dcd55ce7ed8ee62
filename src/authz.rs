//! The one per-call authorization path. The server (before a handler runs) and the proxy's
//! baidu_std routes (before a request is forwarded) both decide here, so a method rule means the
//! same thing wherever it is enforced, and a refusal looks the same to the caller.
//!
//! What the caller is told is only that it was refused and for which call; why (which rule,
//! which identities it allows) is logged on our side, never sent to the peer.
//!
//! Beyond allow-lists and method rules, an application can add its own logic at two points, the
//! same in every language: a [`PeerHook`] after a peer's certificate verified (per connection),
//! and a [`CallHook`] after the method rules allowed a call (per call, before the handler or the
//! upstream sees it). They travel in [`Policy::hooks`], so the server, the client, the proxy's
//! baidu_std routes, C and Python all run them from here. A hook that panics denies.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use tracing::{error, info};

use crate::error::{codes, Verdict};
use crate::rpc::panic_message;
use crate::telemetry;
use crate::tls::identity::PeerIdentity;
use crate::tls::policy::{MethodDecision, Policy};

/// Longest peer-supplied name (service or method) echoed back in an error text or a log line.
pub const MAX_ECHOED_NAME: usize = 128;

/// A call refused before it reached a handler or the upstream: the brpc code and the text the
/// caller gets (without the `[addr][Ecode]` prefix, which the answering side adds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: i32,
    pub verdict: Verdict,
    pub text: String,
}

/// What a [`PeerHook`] decides about a verified peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerDecision {
    Allow,
    /// Refused as `peer_not_allowed`; the reason goes to our logs, never to the peer.
    Deny(String),
}

/// What a [`CallHook`] decides about one call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallDecision {
    Allow,
    /// The caller gets `code` (use [`codes::ERPCAUTH`] unless the application has its own
    /// scheme) and `text`, which is sent to the caller as is.
    Deny {
        code: i32,
        text: String,
    },
}

impl CallDecision {
    /// A denial with ERPCAUTH (1004, `method_not_allowed`).
    pub fn deny(text: impl Into<String>) -> Self {
        CallDecision::Deny { code: codes::ERPCAUTH, text: text.into() }
    }
}

/// What a call carries besides its payload, for a [`CallHook`] (and handlers).
#[derive(Clone, Copy, Debug, Default)]
pub struct CallMetadata<'a> {
    pub log_id: Option<i64>,
    pub request_id: Option<&'a str>,
    /// The caller's timeout, when it set one.
    pub timeout_ms: Option<i32>,
    /// The request's `authentication_data`, raw (a proxy's identity token, when a trustwire
    /// proxy forwarded the call).
    pub authentication_data: Option<&'a [u8]>,
}

/// One call as a [`CallHook`] sees it.
#[derive(Clone, Copy, Debug)]
pub struct Call<'a> {
    pub peer: &'a PeerIdentity,
    /// The service name the call is dispatched to (on a proxy route: the name the caller sent).
    pub service: &'a str,
    pub method: &'a str,
    pub metadata: CallMetadata<'a>,
    /// Where it is enforced: `server`, `client`, or the proxy route's name.
    pub scope: &'a str,
}

/// Per connection, after the peer's chain, the allow-list and any pinned ID passed. Runs on a
/// runtime thread during the handshake: it must not block for long.
pub trait PeerHook: Send + Sync + 'static {
    fn check(&self, peer: &PeerIdentity) -> PeerDecision;
}

/// Per call, after the method rules allowed it and before the handler (or the upstream) sees
/// it. Runs on a runtime thread: it must not block for long.
pub trait CallHook: Send + Sync + 'static {
    fn check(&self, call: &Call<'_>) -> CallDecision;
}

impl<F: Fn(&PeerIdentity) -> PeerDecision + Send + Sync + 'static> PeerHook for F {
    fn check(&self, peer: &PeerIdentity) -> PeerDecision {
        self(peer)
    }
}

impl<F: Fn(&Call<'_>) -> CallDecision + Send + Sync + 'static> CallHook for F {
    fn check(&self, call: &Call<'_>) -> CallDecision {
        self(call)
    }
}

/// The application's hooks; none by default. Equal when they are the same hook objects.
#[derive(Clone, Default)]
pub struct Hooks {
    pub peer: Option<Arc<dyn PeerHook>>,
    pub call: Option<Arc<dyn CallHook>>,
}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hooks").field("peer", &self.peer.is_some()).field("call", &self.call.is_some()).finish()
    }
}

fn same<T: ?Sized>(a: &Option<Arc<T>>, b: &Option<Arc<T>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b)),
        (None, None) => true,
        _ => false,
    }
}

impl PartialEq for Hooks {
    fn eq(&self, other: &Self) -> bool {
        same(&self.peer, &other.peer) && same(&self.call, &other.call)
    }
}

impl Eq for Hooks {}

/// Runs the peer hook, if any: `Err(reason)` refuses the peer. A panic refuses it too.
pub(crate) fn check_peer(hooks: &Hooks, peer: &PeerIdentity) -> Result<(), String> {
    let Some(hook) = &hooks.peer else { return Ok(()) };
    match catch_unwind(AssertUnwindSafe(|| hook.check(peer))) {
        Ok(PeerDecision::Allow) => Ok(()),
        Ok(PeerDecision::Deny(why)) => Err(format!("the connection hook refused peer {}: {why}", peer.display_name())),
        Err(p) => {
            let why = panic_message(&p);
            error!(peer = %peer, "the connection hook panicked, so the peer is refused: {why}");
            Err(format!("the connection hook failed ({why}), so peer {} is refused", peer.display_name()))
        }
    }
}

/// Decides whether `peer` may call `service/method`. `scope` names the enforcement point in
/// logs and metrics (`server`, or the proxy route's name).
///
/// `service` must be the name the call will be dispatched to. Where that is not known (a proxy
/// in front of a brpc server that resolves unqualified names itself), pass every candidate in
/// `aliases`: the call is allowed only if every one of them is.
///
/// The method rules decide first; a call they allow then goes to the policy's [`CallHook`].
pub fn authorize_call(
    policy: &Policy,
    peer: &PeerIdentity,
    service: &str,
    aliases: &[&str],
    method: &str,
    metadata: CallMetadata<'_>,
    scope: &str,
) -> Result<(), Refusal> {
    for name in std::iter::once(service).chain(aliases.iter().copied()) {
        if let MethodDecision::Denied(why) = policy.may_call(peer, name, method) {
            let verdict = Verdict::MethodNotAllowed;
            info!(scope, peer = %peer, service = %truncate(name), method = %truncate(method),
                verdict = verdict.name(), "call denied: {why}");
            telemetry::call_refused(scope, verdict);
            return Err(Refusal { code: codes::ERPCAUTH, verdict, text: refused_text(peer, service, method) });
        }
    }
    let Some(hook) = &policy.hooks.call else { return Ok(()) };
    let call = Call { peer, service, method, metadata, scope };
    let (code, text) = match catch_unwind(AssertUnwindSafe(|| hook.check(&call))) {
        Ok(CallDecision::Allow) => return Ok(()),
        Ok(CallDecision::Deny { code, text }) => (code, text),
        Err(p) => {
            error!(scope, peer = %peer, service = %truncate(service), method = %truncate(method),
                "the call hook panicked, so the call is denied: {}", panic_message(&p));
            (codes::ERPCAUTH, String::new())
        }
    };
    let verdict = Verdict::MethodNotAllowed;
    info!(scope, peer = %peer, service = %truncate(service), method = %truncate(method), code,
        verdict = verdict.name(), "call denied by the call hook: {text}");
    telemetry::call_refused(scope, verdict);
    // A hook must not turn a refusal into success: code 0 is ERPCAUTH.
    let code = if code == 0 { codes::ERPCAUTH } else { code };
    let text = match (code, text.is_empty()) {
        (codes::ERPCAUTH, true) => refused_text(peer, service, method),
        (codes::ERPCAUTH, false) => format!("{}: {text}", verdict.name()),
        _ => text,
    };
    Err(Refusal { code, verdict, text })
}

/// What a caller refused by a rule (or by a hook that gave no text) is told: which call, not why.
fn refused_text(peer: &PeerIdentity, service: &str, method: &str) -> String {
    format!(
        "{}: peer {} may not call {}/{}",
        Verdict::MethodNotAllowed.name(),
        peer.display_name(),
        truncate(service),
        truncate(method)
    )
}

/// A peer-supplied name cut to [`MAX_ECHOED_NAME`] bytes (on a character boundary), with `…`
/// when it was cut, so an error text or a log line cannot be made arbitrarily large.
pub fn truncate(name: &str) -> std::borrow::Cow<'_, str> {
    if name.len() <= MAX_ECHOED_NAME {
        return name.into();
    }
    let mut end = MAX_ECHOED_NAME;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &name[..end]).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_keeps_short_names_and_cuts_long_ones_on_a_char_boundary() {
        assert_eq!(truncate("example.EchoService"), "example.EchoService");
        let long = "é".repeat(200);
        let cut = truncate(&long);
        assert!(cut.len() <= MAX_ECHOED_NAME + '…'.len_utf8(), "{}", cut.len());
        assert!(cut.ends_with('…'));
    }
}
