//! Bounded TLS 1.3 session resumption, for trustwire talking to trustwire (`[tls] resumption`).
//!
//! A resumed handshake runs no certificate verifier, so what keeps it from widening trust:
//! * Tickets belong to one generation. Each server generation (new identity, trust bundle, CRL
//!   or federation) has a ticketer with fresh keys, so an earlier generation's tickets do not
//!   decrypt; each client generation has its own ticket store, empty when it starts.
//! * A ticket is usable for `max_age` after the full handshake that verified the peer, however
//!   many times it was resumed and reissued since: the server seals that moment into every
//!   ticket and carries it over to the tickets a resumed connection gets. With fresh CRLs
//!   required, no ticket is accepted past the CRLs' earliest next-update. The client drops the
//!   tickets it has held for longer than its own `max_age`.
//! * The transport checks a resumed connection again: the peer's leaf validity at that moment,
//!   the pinned SPIFFE ID, the allow-list and the connection hook, with the verifier's verdicts.
//! * Bounded memory: the server keeps no sessions; the client at most [`TICKET_NAMES`] server
//!   names with [`TICKETS_PER_NAME`] tickets each. No TLS 1.2 sessions, no early data.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use rustls::client::Tls13ClientSessionValue;
use rustls::server::ProducesTickets;
use rustls::NamedGroup;
use rustls_pki_types::ServerName;

use crate::error::Error;

/// Server names a client generation keeps tickets for.
pub const TICKET_NAMES: usize = 256;
/// Tickets kept per server name: each is used once, so this is how many new connections to one
/// server can resume at once (with 2, a client opening 8 at a time resumed only 6 in 10). As
/// many as rustls' own store keeps; each holds the server's chain.
pub const TICKETS_PER_NAME: usize = 8;
/// Server names a client generation keeps key-exchange hints for.
const KX_HINTS: usize = 1024;

thread_local! {
    /// When the session being resumed was verified in full: set by `decrypt` while a handshake
    /// is polled, carried from poll to poll by the handshake's own future (see
    /// [`crate::tls::verify::Diagnosed`]), read by `encrypt` for the tickets that connection gets.
    static VERIFIED_AT: Cell<Option<u64>> = const { Cell::new(None) };
}

pub(crate) fn set_verified_at(at: Option<u64>) {
    VERIFIED_AT.with(|v| v.set(at));
}

pub(crate) fn take_verified_at() -> Option<u64> {
    VERIFIED_AT.with(Cell::take)
}

fn now_secs() -> u64 {
    UNIX_EPOCH.elapsed().map(|d| d.as_secs()).unwrap_or(0)
}

/// A generation's ticketer: rustls' (fresh keys) under a prefix saying when the peer was last
/// verified in full, refused once that is `max_age` ago or the CRL deadline has passed.
#[derive(Debug)]
pub(crate) struct BoundedTickets {
    inner: Arc<dyn ProducesTickets>,
    max_age: u64,
    crl_deadline: Option<u64>,
}

impl BoundedTickets {
    pub(crate) fn for_generation(
        max_age: Duration,
        crl_deadline: Option<u64>,
    ) -> Result<Arc<dyn ProducesTickets>, Error> {
        let inner = rustls::crypto::aws_lc_rs::Ticketer::new()
            .map_err(|e| Error::config(format!("cannot make a session ticket key: {e}")))?;
        Ok(Arc::new(BoundedTickets { inner, max_age: max_age.as_secs(), crl_deadline }))
    }

    fn usable(&self, verified_at: u64, now: u64) -> bool {
        // A clock that went back past the verification is not trusted either.
        verified_at <= now && now - verified_at < self.max_age && self.crl_deadline.is_none_or(|d| now < d)
    }
}

impl ProducesTickets for BoundedTickets {
    fn enabled(&self) -> bool {
        self.inner.enabled()
    }

    fn lifetime(&self) -> u32 {
        u32::try_from(self.max_age).unwrap_or(u32::MAX)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let now = now_secs();
        // A resumed connection's tickets keep the moment of the full handshake it resumes.
        let verified_at = VERIFIED_AT.with(Cell::get).unwrap_or(now);
        if !self.usable(verified_at, now) {
            return None;
        }
        let mut sealed = Vec::with_capacity(8 + plain.len());
        sealed.extend_from_slice(&verified_at.to_be_bytes());
        sealed.extend_from_slice(plain);
        self.inner.encrypt(&sealed)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let plain = self.inner.decrypt(cipher)?;
        let (at, rest) = plain.split_first_chunk::<8>()?;
        let verified_at = u64::from_be_bytes(*at);
        if !self.usable(verified_at, now_secs()) {
            return None;
        }
        set_verified_at(Some(verified_at));
        Some(rest.to_vec())
    }
}

/// A client generation's memory of servers: the key-exchange group each chose (always), and
/// with resumption their TLS 1.3 tickets. TLS 1.2 sessions are never kept.
#[derive(Debug)]
pub(crate) struct ClientSessions {
    hints: Mutex<HashMap<ServerName<'static>, NamedGroup>>,
    tickets: Option<Tickets>,
}

#[derive(Debug)]
struct Tickets {
    max_age: Duration,
    by_name: Mutex<HashMap<ServerName<'static>, VecDeque<(Instant, Tls13ClientSessionValue)>>>,
}

impl ClientSessions {
    pub(crate) fn new(resumption: Option<Duration>) -> Self {
        ClientSessions {
            hints: Mutex::default(),
            tickets: resumption.map(|max_age| Tickets { max_age, by_name: Mutex::default() }),
        }
    }
}

impl rustls::client::ClientSessionStore for ClientSessions {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        // Bounded: past KX_HINTS names it starts over (a hint only saves a round trip).
        let mut hints = self.hints.lock().unwrap_or_else(|p| p.into_inner());
        if hints.len() >= KX_HINTS && !hints.contains_key(&server_name) {
            hints.clear();
        }
        hints.insert(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.hints.lock().unwrap_or_else(|p| p.into_inner()).get(server_name).copied()
    }

    fn set_tls12_session(&self, _: ServerName<'static>, _: rustls::client::Tls12ClientSessionValue) {}

    fn tls12_session(&self, _: &ServerName<'_>) -> Option<rustls::client::Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _: &ServerName<'static>) {}

    fn insert_tls13_ticket(&self, server_name: ServerName<'static>, value: Tls13ClientSessionValue) {
        let Some(t) = &self.tickets else { return };
        let now = Instant::now();
        let mut by_name = t.by_name.lock().unwrap_or_else(|p| p.into_inner());
        if by_name.len() >= TICKET_NAMES && !by_name.contains_key(&server_name) {
            by_name.retain(|_, q| q.back().is_some_and(|(at, _)| now.duration_since(*at) < t.max_age));
            if by_name.len() >= TICKET_NAMES {
                if let Some(k) = by_name.keys().next().cloned() {
                    by_name.remove(&k);
                }
            }
        }
        let queue = by_name.entry(server_name).or_default();
        if queue.len() >= TICKETS_PER_NAME {
            queue.pop_front();
        }
        queue.push_back((now, value));
    }

    fn take_tls13_ticket(&self, server_name: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        let t = self.tickets.as_ref()?;
        let now = Instant::now();
        let mut by_name = t.by_name.lock().unwrap_or_else(|p| p.into_inner());
        let queue = by_name.get_mut(server_name)?;
        queue.retain(|(at, _)| now.duration_since(*at) < t.max_age);
        // The newest first: it was issued last, and so is the last to expire.
        let taken = queue.pop_back().map(|(_, v)| v);
        if queue.is_empty() {
            by_name.remove(server_name);
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_is_refused_once_its_verification_is_max_age_old_or_the_crls_are_due() {
        let t = BoundedTickets {
            inner: rustls::crypto::aws_lc_rs::Ticketer::new().unwrap(),
            max_age: 10,
            crl_deadline: None,
        };
        assert!(t.usable(100, 100));
        assert!(t.usable(100, 109));
        assert!(!t.usable(100, 110));
        assert!(!t.usable(100, 99));
        let t = BoundedTickets { crl_deadline: Some(105), ..t };
        assert!(t.usable(100, 104));
        assert!(!t.usable(100, 105));
    }

    #[test]
    fn a_resumed_connections_tickets_keep_the_first_verification_time() {
        let t = BoundedTickets {
            inner: rustls::crypto::aws_lc_rs::Ticketer::new().unwrap(),
            max_age: 10,
            crl_deadline: None,
        };
        let now = now_secs();
        set_verified_at(None);
        let fresh = t.encrypt(b"session").unwrap();
        assert_eq!(t.decrypt(&fresh).as_deref(), Some(&b"session"[..]));
        assert!(take_verified_at().is_some_and(|at| at == now || at == now + 1));
        // A connection resuming a session verified 9 s ago gets tickets that expire with it.
        set_verified_at(Some(now - 9));
        let reissued = t.encrypt(b"session").unwrap();
        take_verified_at();
        t.decrypt(&reissued).unwrap();
        assert_eq!(take_verified_at(), Some(now - 9));
        set_verified_at(Some(now - 10));
        assert!(t.encrypt(b"session").is_none());
        take_verified_at();
        // Another generation's ticketer does not read them.
        let other = BoundedTickets {
            inner: rustls::crypto::aws_lc_rs::Ticketer::new().unwrap(),
            max_age: 10,
            crl_deadline: None,
        };
        assert!(other.decrypt(&fresh).is_none());
    }
}
