//! Established connections and the chains they were verified with, so that when the trust
//! bundle or a CRL changes, connections whose peer the new material would refuse can be closed,
//! and so that no connection outlives the certificates it was verified with.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls_pki_types::{CertificateDer, ServerName};
use tokio::sync::watch;

use crate::error::Verdict;
use crate::tls::identity::{rfc3339, PeerIdentity};
use crate::tls::verify::Diagnosis;

#[derive(Debug)]
struct Tracked {
    chain: Vec<CertificateDer<'static>>,
    server_name: Option<ServerName<'static>>,
    peer: Arc<PeerIdentity>,
    close: watch::Sender<Option<Diagnosis>>,
}

/// Decides whether trust material still accepts a connection's peer: `Some(reason)` to close.
pub(crate) type Check =
    Arc<dyn Fn(&[CertificateDer<'static>], Option<&ServerName<'static>>) -> Option<Diagnosis> + Send + Sync>;

/// Connections opened with one `ServerTls` or `ClientTls`.
#[derive(Default)]
pub(crate) struct Tracker {
    conns: Mutex<HashMap<u64, Tracked>>,
    next: AtomicU64,
    /// The credential generation of the latest recheck, and its check: a connection verified
    /// under an earlier generation that registers only after that recheck (its handshake was
    /// finishing meanwhile) is checked with it when it registers.
    latest: Mutex<Option<(u64, Check)>>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let conns = self.conns.lock().map(|c| c.len()).unwrap_or_default();
        f.debug_struct("Tracker").field("conns", &conns).finish()
    }
}

/// Held by a connection for its lifetime; dropping it unregisters the connection.
#[derive(Debug)]
pub(crate) struct TrackGuard {
    id: u64,
    tracker: Arc<Tracker>,
    /// Becomes `Some(reason)` when the connection must close because trust changed.
    pub closed: watch::Receiver<Option<Diagnosis>>,
    /// The earlier of the peer's and our certificate's not-after.
    expires: Option<Expiry>,
}

#[derive(Clone, Debug)]
struct Expiry {
    at: SystemTime,
    whose: &'static str,
}

impl TrackGuard {
    /// What a connection waits on to learn that it must close: new trust material refuses its
    /// peer, or the peer's certificate (or ours) has expired.
    pub fn close_signal(&self) -> CloseSignal {
        CloseSignal { closed: Some(self.closed.clone()), expires: self.expires.clone() }
    }
}

/// See [`TrackGuard::close_signal`].
#[derive(Debug)]
pub(crate) struct CloseSignal {
    closed: Option<watch::Receiver<Option<Diagnosis>>>,
    expires: Option<Expiry>,
}

impl Expiry {
    fn diagnosis(&self) -> Diagnosis {
        Diagnosis {
            verdict: Verdict::Expired,
            message: format!("{} certificate expired at {}", self.whose, rfc3339(self.at)),
        }
    }
}

impl CloseSignal {
    /// Why the connection must close, if it must close already; for a connection about to be
    /// given a new call, whose own task may not have run since the signal came (a thread's own
    /// connection waits, unpolled, between that thread's calls).
    pub fn now(&self) -> Option<Diagnosis> {
        if let Some(d) = self.closed.as_ref().and_then(|rx| rx.borrow().clone()) {
            return Some(d);
        }
        let e = self.expires.as_ref()?;
        (SystemTime::now() >= e.at).then(|| e.diagnosis())
    }

    /// Resolves with the reason once the connection must close; never while it may stay open.
    pub async fn wait(&mut self) -> Diagnosis {
        let trust = async {
            if let Some(rx) = self.closed.as_mut() {
                if let Ok(d) = rx.wait_for(|c| c.is_some()).await {
                    if let Some(d) = d.clone() {
                        return d;
                    }
                }
            }
            // The tracker is gone: only expiry can close the connection now.
            std::future::pending().await
        };
        let expiry = async {
            let Some(e) = &self.expires else { return std::future::pending().await };
            // Sleep in bounded steps: a wall-clock deadline years away must not overflow the
            // timer, and a clock that jumps forward is noticed within a step.
            const STEP: Duration = Duration::from_secs(3600);
            loop {
                match e.at.duration_since(SystemTime::now()) {
                    Ok(left) if !left.is_zero() => tokio::time::sleep(left.min(STEP)).await,
                    _ => break,
                }
            }
            e.diagnosis()
        };
        tokio::select! {
            d = trust => d,
            d = expiry => d,
        }
    }
}

impl Drop for TrackGuard {
    fn drop(&mut self) {
        self.tracker.conns.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

/// A connection closed because the new trust material no longer accepts its peer.
#[derive(Clone, Debug)]
pub(crate) struct Closed {
    pub peer: Arc<PeerIdentity>,
    pub diagnosis: Diagnosis,
}

impl Tracker {
    /// Tracks a connection verified under credential generation `generation`. When trust has
    /// been rechecked for a later generation since (the handshake was finishing meanwhile), the
    /// connection is checked against it here: refused, it is not tracked, and the caller gets
    /// the reason and must close it before it serves anything.
    pub fn register(
        self: &Arc<Self>,
        generation: u64,
        chain: Vec<CertificateDer<'static>>,
        server_name: Option<ServerName<'static>>,
        peer: Arc<PeerIdentity>,
        our_not_after: Option<SystemTime>,
    ) -> Result<TrackGuard, Diagnosis> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (close, closed) = watch::channel(None);
        let peer_expiry = Expiry { at: peer.not_after, whose: "the peer's" };
        let expires = match our_not_after {
            Some(ours) if ours < peer.not_after => Some(Expiry { at: ours, whose: "our" }),
            _ => Some(peer_expiry),
        };
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        // Under the connections' lock, as recheck sets it: either that recheck sees this
        // connection, or this sees its check.
        let late = self
            .latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|(g, check)| (*g > generation).then(|| check(&chain, server_name.as_ref())).flatten());
        if let Some(d) = late {
            tracing::info!(peer = %peer, verdict = d.verdict.name(),
                "refusing a connection verified just before the trust material changed: {}", d.message);
            return Err(d);
        }
        conns.insert(id, Tracked { chain, server_name, peer, close });
        drop(conns);
        Ok(TrackGuard { id, tracker: self.clone(), closed, expires })
    }

    /// Re-checks every connection with `check(chain, server_name)`, the trust material of
    /// credential generation `generation`, and tells those that fail to close (connections that
    /// register later, verified under an earlier generation, are checked when they register).
    /// Returns what was closed.
    pub fn recheck(&self, generation: u64, check: Check) -> Vec<Closed> {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some((generation, check.clone()));
        let mut closed = Vec::new();
        for t in conns.values() {
            if t.close.borrow().is_some() {
                continue;
            }
            if let Some(diagnosis) = check(&t.chain, t.server_name.as_ref()) {
                let _ = t.close.send(Some(diagnosis.clone()));
                closed.push(Closed { peer: t.peer.clone(), diagnosis });
            }
        }
        closed
    }
}
