//! Established connections and the chains they were verified with, so that when the trust
//! bundle or a CRL changes, connections whose peer the new material would refuse can be closed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rustls_pki_types::{CertificateDer, ServerName};
use tokio::sync::watch;

use crate::tls::identity::PeerIdentity;
use crate::tls::verify::Diagnosis;

#[derive(Debug)]
struct Tracked {
    chain: Vec<CertificateDer<'static>>,
    server_name: Option<ServerName<'static>>,
    peer: Arc<PeerIdentity>,
    close: watch::Sender<Option<Diagnosis>>,
}

/// Connections opened with one `ServerTls` or `ClientTls`.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    conns: Mutex<HashMap<u64, Tracked>>,
    next: AtomicU64,
}

/// Held by a connection for its lifetime; dropping it unregisters the connection.
#[derive(Debug)]
pub(crate) struct TrackGuard {
    id: u64,
    tracker: Arc<Tracker>,
    /// Becomes `Some(reason)` when the connection must close because trust changed.
    pub closed: watch::Receiver<Option<Diagnosis>>,
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
    pub fn register(
        self: &Arc<Self>,
        chain: Vec<CertificateDer<'static>>,
        server_name: Option<ServerName<'static>>,
        peer: Arc<PeerIdentity>,
    ) -> TrackGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (close, closed) = watch::channel(None);
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).insert(id, Tracked { chain, server_name, peer, close });
        TrackGuard { id, tracker: self.clone(), closed }
    }

    /// Re-checks every connection with `check(chain, server_name)` and tells those that fail to
    /// close. Returns what was closed.
    pub fn recheck(
        &self,
        check: impl Fn(&[CertificateDer<'static>], Option<&ServerName<'static>>) -> Option<Diagnosis>,
    ) -> Vec<Closed> {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
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
