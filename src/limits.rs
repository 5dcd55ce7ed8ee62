//! Budgets for the sockets a listener accepts, shared by the server and the proxy's routes.
//!
//! A socket costs us memory, a file descriptor and (during the TLS handshake) CPU before we know
//! who is on the other end. So an accepted socket is admitted in two steps: first to a handshake
//! slot, from a budget smaller than the connection budget and limited per source address, then,
//! once the handshake has verified the peer, to a slot among the established connections. A
//! socket that finds a budget full is closed at once (not left in the listen backlog, where it
//! would hold up the sockets behind it) and counted in
//! `trustwire_connections_refused_total{scope,reason}`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::telemetry;

/// Established connections at once (server and proxy route).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Handshakes in progress at once, in total. A 2-core host completes a few thousand mTLS
/// handshakes a second, so a thousand waiting is already a fraction of a second of work queued;
/// beyond that a new socket gains nothing by waiting, and an idle one only holds memory and a
/// descriptor.
pub const DEFAULT_MAX_HANDSHAKES: usize = 1024;
/// Handshakes in progress at once from one source. Half the total: one source can never hold
/// the whole handshake budget, while one client host that opens a few hundred connections at
/// once (a pool warming up after a restart, many processes behind one NAT address) still gets in.
pub const DEFAULT_MAX_HANDSHAKES_PER_SOURCE: usize = 512;

/// How many sockets a listener admits. The defaults suit a service on a shared host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Established (verified) connections at once.
    pub max_connections: usize,
    /// Sockets whose TLS handshake is in progress, from all sources together.
    pub max_handshakes: usize,
    /// Sockets whose TLS handshake is in progress from one source: one IPv4 address, or one
    /// IPv6 /64 (what a single host is usually given). It counts handshakes only, not
    /// established connections: those are verified peers under `max_connections`, and many
    /// legitimate clients can share one address. Unix-socket listeners have no source address
    /// and are held only to the total.
    pub max_handshakes_per_source: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            max_handshakes_per_source: DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
        }
    }
}

/// The budget a socket was refused by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refused {
    /// `max_connections` established connections are open.
    MaxConnections,
    /// `max_handshakes` handshakes are in progress.
    MaxHandshakes,
    /// `max_handshakes_per_source` handshakes are in progress from this socket's source.
    MaxHandshakesPerSource,
}

impl Refused {
    /// The name of the limit, as in the metric's `reason` label and the README.
    pub const fn name(self) -> &'static str {
        match self {
            Refused::MaxConnections => "max_connections",
            Refused::MaxHandshakes => "max_handshakes",
            Refused::MaxHandshakesPerSource => "max_handshakes_per_source",
        }
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a socket comes from, as far as the per-source budget is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Source {
    V4(u32),
    /// The /64 prefix: a host usually gets a whole /64, so its addresses count as one source.
    V6(u64),
}

impl Source {
    fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(a) => Source::V4(u32::from(a)),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => Source::V4(u32::from(v4)),
                None => Source::V6((u128::from(a) >> 64) as u64),
            },
        }
    }
}

/// Admits accepted sockets of one listener (a server, or one proxy route) within its
/// [`ConnectionLimits`].
#[derive(Debug)]
pub struct Admission {
    scope: String,
    limits: ConnectionLimits,
    handshakes: Arc<Semaphore>,
    connections: Arc<Semaphore>,
    /// Handshakes in progress by source; an entry goes when its count reaches zero, so the map
    /// never holds more than `max_handshakes` entries.
    per_source: Mutex<HashMap<Source, usize>>,
}

impl Admission {
    /// `scope` names the listener in logs and metrics (`server`, or a proxy route's name).
    pub fn new(scope: impl Into<String>, limits: ConnectionLimits) -> Arc<Admission> {
        Arc::new(Admission {
            scope: scope.into(),
            handshakes: Arc::new(Semaphore::new(limits.max_handshakes.min(Semaphore::MAX_PERMITS))),
            connections: Arc::new(Semaphore::new(limits.max_connections.min(Semaphore::MAX_PERMITS))),
            per_source: Mutex::new(HashMap::new()),
            limits,
        })
    }

    pub fn limits(&self) -> &ConnectionLimits {
        &self.limits
    }

    /// Admits a socket just accepted from `source` (None for a Unix socket) to its handshake,
    /// or names the budget that is full (and counts the refusal); the caller closes the socket.
    pub fn admit(self: &Arc<Self>, source: Option<IpAddr>) -> Result<Handshaking, Refused> {
        let refuse = |r: Refused| {
            telemetry::connection_refused(&self.scope, r.name());
            Err(r)
        };
        // A socket that could not be kept once verified is refused before its handshake costs
        // anything.
        if self.connections.available_permits() == 0 {
            return refuse(Refused::MaxConnections);
        }
        let source = source.map(Source::of);
        if let Some(s) = source {
            let mut map = self.per_source.lock().unwrap_or_else(|p| p.into_inner());
            let n = map.entry(s).or_insert(0);
            if *n >= self.limits.max_handshakes_per_source {
                if *n == 0 {
                    map.remove(&s);
                }
                drop(map);
                return refuse(Refused::MaxHandshakesPerSource);
            }
            *n += 1;
        }
        let Ok(permit) = self.handshakes.clone().try_acquire_owned() else {
            self.release_source(source);
            return refuse(Refused::MaxHandshakes);
        };
        Ok(Handshaking { admission: self.clone(), source, _permit: permit })
    }

    fn release_source(&self, source: Option<Source>) {
        let Some(s) = source else { return };
        let mut map = self.per_source.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&s) {
            *n -= 1;
            if *n == 0 {
                map.remove(&s);
            }
        }
    }

    /// Resolves once no socket holds a handshake or connection slot (after the listener has
    /// stopped accepting).
    pub async fn all_closed(&self) {
        let all = |n: usize| u32::try_from(n.min(Semaphore::MAX_PERMITS)).unwrap_or(u32::MAX);
        let _ = self.handshakes.acquire_many(all(self.limits.max_handshakes)).await;
        let _ = self.connections.acquire_many(all(self.limits.max_connections)).await;
    }
}

/// A socket admitted to its handshake. Dropping it gives the slot back.
#[derive(Debug)]
pub struct Handshaking {
    admission: Arc<Admission>,
    source: Option<Source>,
    _permit: OwnedSemaphorePermit,
}

impl Handshaking {
    /// The handshake succeeded: trades the handshake slot for an established connection's, or
    /// says (and counts) that `max_connections` filled up meanwhile.
    pub fn established(self) -> Result<Established, Refused> {
        match self.admission.connections.clone().try_acquire_owned() {
            Ok(permit) => Ok(Established { _permit: permit }),
            Err(_) => {
                telemetry::connection_refused(&self.admission.scope, Refused::MaxConnections.name());
                Err(Refused::MaxConnections)
            }
        }
    }
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        self.admission.release_source(self.source);
    }
}

/// An established connection's slot. Dropping it gives the slot back.
#[derive(Debug)]
pub struct Established {
    _permit: OwnedSemaphorePermit,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(conns: usize, total: usize, per_source: usize) -> ConnectionLimits {
        ConnectionLimits { max_connections: conns, max_handshakes: total, max_handshakes_per_source: per_source }
    }

    #[test]
    fn per_source_and_total_budgets_refuse_with_their_names_and_give_slots_back() {
        let a = Admission::new("unit", limits(10, 3, 2));
        let one: IpAddr = "10.0.0.1".parse().unwrap();
        let two: IpAddr = "10.0.0.2".parse().unwrap();
        let h1 = a.admit(Some(one)).unwrap();
        let h2 = a.admit(Some(one)).unwrap();
        assert_eq!(a.admit(Some(one)).unwrap_err(), Refused::MaxHandshakesPerSource);
        let h3 = a.admit(Some(two)).unwrap();
        assert_eq!(a.admit(Some(two)).unwrap_err(), Refused::MaxHandshakes);
        assert_eq!(a.admit(None).unwrap_err(), Refused::MaxHandshakes);
        drop(h1);
        let h4 = a.admit(Some(one)).unwrap();
        // An established connection holds no handshake slot.
        let _c = h2.established().unwrap();
        let _h5 = a.admit(Some(two)).unwrap();
        drop((h3, h4));
        assert!(a.per_source.lock().unwrap().len() <= 1);
    }

    #[test]
    fn a_full_connection_budget_refuses_before_the_handshake() {
        let a = Admission::new("unit", limits(1, 4, 4));
        let _c = a.admit(None).unwrap().established().unwrap();
        assert_eq!(a.admit(None).unwrap_err(), Refused::MaxConnections);
        // Admitted while there was room, verified after it filled: refused then.
        let b = Admission::new("unit", limits(1, 4, 4));
        let (x, y) = (b.admit(None).unwrap(), b.admit(None).unwrap());
        let _cx = x.established().unwrap();
        assert_eq!(y.established().unwrap_err(), Refused::MaxConnections);
    }

    #[test]
    fn an_ipv6_host_is_one_source_and_mapped_ipv4_is_ipv4() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(Source::of(a), Source::of(b));
        assert_ne!(Source::of(a), Source::of(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(Source::of(mapped), Source::of("192.0.2.7".parse().unwrap()));
    }
}
