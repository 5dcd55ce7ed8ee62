//! Chains a verifier has already verified, so that a peer that reconnects with the same chain
//! pays for its handshake signature (proof that it holds the key) but not for path building
//! and the chain's signatures again.
//!
//! What keeps this from widening trust:
//! * Each cache belongs to one verifier, and a verifier to one trust generation: a new trust
//!   bundle, CRL or federation change builds new verifiers with empty caches.
//! * Only successes of the chain check are kept, keyed by SHA-256 over every certificate the
//!   peer sent (and, for server certificates, the name asked for). A different chain, order or
//!   name is a miss and is verified in full.
//! * An entry is used only inside the validity window of every certificate sent, only until
//!   the earliest next-update of the CRLs when fresh CRLs are required, and at most
//!   [`CHAIN_CACHE_TTL`] after it was verified.
//! * The peer's handshake signature, the SPIFFE pin, the allow-list and the hooks run on every
//!   handshake, hit or miss.
//! * At most [`CHAIN_CACHE_ENTRIES`] chains per verifier; a full cache drops expired entries,
//!   then an arbitrary one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use aws_lc_rs::digest;
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::tls::identity::PeerIdentity;

/// Verified chains remembered per verifier (one per profile, side and trust generation).
pub const CHAIN_CACHE_ENTRIES: usize = 4096;
/// How long a verified chain is remembered at most.
pub const CHAIN_CACHE_TTL: Duration = Duration::from_secs(600);

pub(crate) type ChainKey = [u8; 32];

/// The cache key: SHA-256 over the name asked for (server certificates) and each certificate,
/// each length-prefixed so that no two different inputs share an encoding.
pub(crate) fn chain_key(name: Option<&str>, end_entity: &CertificateDer<'_>, rest: &[CertificateDer<'_>]) -> ChainKey {
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut part = |bytes: &[u8]| {
        ctx.update(&(bytes.len() as u64).to_be_bytes());
        ctx.update(bytes);
    };
    part(name.unwrap_or("").as_bytes());
    part(end_entity.as_ref());
    for c in rest {
        part(c.as_ref());
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(ctx.finish().as_ref());
    key
}

#[derive(Debug)]
struct Entry {
    peer: Arc<PeerIdentity>,
    /// Seconds since the epoch: usable from `from` (inclusive) until `until` (exclusive).
    from: u64,
    until: u64,
}

#[derive(Debug, Default)]
pub(crate) struct VerifiedChains {
    entries: Mutex<HashMap<ChainKey, Entry>>,
    /// The earliest next-update of the CRLs in force, when fresh CRLs are required.
    crl_deadline: Option<u64>,
}

impl VerifiedChains {
    pub(crate) fn new(crl_deadline: Option<u64>) -> Self {
        VerifiedChains { entries: Mutex::default(), crl_deadline }
    }

    /// An empty cache for verifiers of `bundle`'s material.
    pub(crate) fn for_bundle(bundle: &crate::tls::TrustBundle) -> Self {
        Self::new(fresh_crl_deadline(bundle))
    }

    /// The identity of a chain verified earlier and still usable at `now`.
    pub(crate) fn get(&self, key: &ChainKey, now: UnixTime) -> Option<Arc<PeerIdentity>> {
        let now = now.as_secs();
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let e = entries.get(key)?;
        (e.from <= now && now < e.until).then(|| e.peer.clone())
    }

    /// Remembers a chain that has just verified at `now`.
    pub(crate) fn insert(
        &self,
        key: ChainKey,
        peer: Arc<PeerIdentity>,
        end_entity: &CertificateDer<'_>,
        rest: &[CertificateDer<'_>],
        now: UnixTime,
    ) {
        let now = now.as_secs();
        let Some((from, until)) = validity(end_entity, rest) else { return };
        let until = until.min(now.saturating_add(CHAIN_CACHE_TTL.as_secs())).min(self.crl_deadline.unwrap_or(u64::MAX));
        if from > now || until <= now {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= CHAIN_CACHE_ENTRIES && !entries.contains_key(&key) {
            entries.retain(|_, e| e.until > now);
            if entries.len() >= CHAIN_CACHE_ENTRIES {
                if let Some(k) = entries.keys().next().copied() {
                    entries.remove(&k);
                }
            }
        }
        entries.insert(key, Entry { peer, from, until });
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }
}

/// The window in which every certificate sent is valid, in seconds since the epoch; `None`
/// when one does not parse (nothing is cached then).
pub(crate) fn validity(end_entity: &CertificateDer<'_>, rest: &[CertificateDer<'_>]) -> Option<(u64, u64)> {
    let mut from = 0u64;
    let mut until = u64::MAX;
    for c in std::iter::once(end_entity).chain(rest) {
        let (_, cert) = X509Certificate::from_der(c.as_ref()).ok()?;
        let v = cert.validity();
        from = from.max(u64::try_from(v.not_before.timestamp()).unwrap_or(0));
        until = until.min(u64::try_from(v.not_after.timestamp()).ok()?);
    }
    Some((from, until))
}

/// The moment past which nothing verified against `bundle` may be reused: the earliest
/// next-update of its CRLs when fresh CRLs are required, else none.
pub(crate) fn fresh_crl_deadline(bundle: &crate::tls::TrustBundle) -> Option<u64> {
    if bundle.require_fresh_crls {
        crl_deadline(&bundle.crls)
    } else {
        None
    }
}

/// The earliest next-update among `crls` (seconds since the epoch); a CRL without one, or one
/// that does not parse, gives the present (nothing is cached past it).
fn crl_deadline(crls: &[rustls_pki_types::CertificateRevocationListDer<'_>]) -> Option<u64> {
    use x509_parser::revocation_list::CertificateRevocationList;
    let now = UNIX_EPOCH.elapsed().map(|d| d.as_secs()).unwrap_or(0);
    crls.iter()
        .map(|der| match CertificateRevocationList::from_der(der.as_ref()) {
            Ok((_, crl)) => crl.next_update().and_then(|t| u64::try_from(t.timestamp()).ok()).unwrap_or(now),
            Err(_) => now,
        })
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;

    use crate::pki::{DevCa, IssueRequest};

    fn leaf() -> (CertificateDer<'static>, Arc<PeerIdentity>) {
        let ca = DevCa::new("example.org").unwrap();
        let issued = ca.issue(&IssueRequest::new("a").spiffe_id("spiffe://example.org/a")).unwrap();
        let der = CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes()).next().unwrap().unwrap();
        let peer = Arc::new(PeerIdentity::from_der(&der).unwrap());
        (der, peer)
    }

    fn at(secs: u64) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(secs))
    }

    #[test]
    fn a_chain_is_remembered_inside_its_window_only() {
        let (der, peer) = leaf();
        let cache = VerifiedChains::new(None);
        let now = UnixTime::now();
        let key = chain_key(None, &der, &[]);
        cache.insert(key, peer.clone(), &der, &[], now);
        assert_eq!(cache.get(&key, now).as_deref(), Some(&*peer));
        // Another name (or chain) is another key.
        assert!(cache.get(&chain_key(Some("localhost"), &der, &[]), now).is_none());
        // Past the TTL, and past the certificate's not-after, it is not used.
        assert!(cache.get(&key, at(now.as_secs() + CHAIN_CACHE_TTL.as_secs())).is_none());
        let not_after = peer.not_after.duration_since(UNIX_EPOCH).unwrap().as_secs();
        let before = peer.not_before.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert!(cache.get(&key, at(not_after)).is_none());
        assert!(cache.get(&key, at(before.saturating_sub(1))).is_none());
    }

    #[test]
    fn a_crl_deadline_caps_every_entry() {
        let (der, peer) = leaf();
        let now = UnixTime::now();
        let cache = VerifiedChains::new(Some(now.as_secs() + 5));
        let key = chain_key(None, &der, &[]);
        cache.insert(key, peer, &der, &[], now);
        assert!(cache.get(&key, at(now.as_secs() + 4)).is_some());
        assert!(cache.get(&key, at(now.as_secs() + 5)).is_none());
        // A deadline already past: nothing is kept.
        let stale = VerifiedChains::new(Some(now.as_secs()));
        stale.insert(key, leaf().1, &der, &[], now);
        assert_eq!(stale.len(), 0);
    }

    #[test]
    fn the_cache_is_bounded() {
        let (der, peer) = leaf();
        let cache = VerifiedChains::new(None);
        let now = UnixTime::now();
        for i in 0..CHAIN_CACHE_ENTRIES + 10 {
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&(i as u64).to_be_bytes());
            cache.insert(key, peer.clone(), &der, &[], now);
        }
        assert_eq!(cache.len(), CHAIN_CACHE_ENTRIES);
    }
}
