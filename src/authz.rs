//! The one per-call authorization path. The server (before a handler runs) and the proxy's
//! baidu_std routes (before a request is forwarded) both decide here, so a method rule means the
//! same thing wherever it is enforced, and a refusal looks the same to the caller.
//!
//! What the caller is told is only that it was refused and for which call; why (which rule,
//! which identities it allows) is logged on our side, never sent to the peer.

use tracing::info;

use crate::error::{codes, Verdict};
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

/// Decides whether `peer` may call `service/method`. `scope` names the enforcement point in
/// logs and metrics (`server`, or the proxy route's name).
///
/// `service` must be the name the call will be dispatched to. Where that is not known (a proxy
/// in front of a brpc server that resolves unqualified names itself), pass every candidate in
/// `aliases`: the call is allowed only if every one of them is.
pub fn authorize_call(
    policy: &Policy,
    peer: &PeerIdentity,
    service: &str,
    aliases: &[&str],
    method: &str,
    scope: &str,
) -> Result<(), Refusal> {
    for name in std::iter::once(service).chain(aliases.iter().copied()) {
        if let MethodDecision::Denied(why) = policy.may_call(peer, name, method) {
            let verdict = Verdict::MethodNotAllowed;
            info!(scope, peer = %peer, service = %truncate(name), method = %truncate(method),
                verdict = verdict.name(), "call denied: {why}");
            telemetry::call_refused(scope, verdict);
            return Err(Refusal {
                code: codes::ERPCAUTH,
                verdict,
                text: format!(
                    "{}: peer {} may not call {}/{}",
                    verdict.name(),
                    peer.display_name(),
                    truncate(service),
                    truncate(method)
                ),
            });
        }
    }
    Ok(())
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
