//! The open connections, by peer: a cap on all of them and one per peer address. At a cap, the
//! oldest connection that has never carried an authenticated request (a stranger's) is closed
//! to make room; a connection that has authenticated is never closed for a newcomer, so
//! strangers cannot push sidecars' keep-alive connections out, also from behind the same NAT.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Why a new connection was not admitted: every connection at the cap has authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The peer address has its maximum of authenticated connections.
    Peer,
    /// The server has its maximum of authenticated connections.
    Server,
}

struct Entry {
    peer: IpAddr,
    /// Cancelled when the connection is evicted.
    evict: CancellationToken,
}

#[derive(Default)]
struct Peer {
    open: usize,
    /// Ids of this peer's connections that have not authenticated, oldest first.
    strangers: BTreeSet<u64>,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    open: HashMap<u64, Entry>,
    peers: HashMap<IpAddr, Peer>,
    /// Ids of all connections that have not authenticated, oldest first (ids grow).
    strangers: BTreeSet<u64>,
}

impl Table {
    /// Forgets connection `id`; `None` when it was already gone (evicted, then dropped).
    fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.open.remove(&id)?;
        self.strangers.remove(&id);
        if let Some(p) = self.peers.get_mut(&entry.peer) {
            p.open -= 1;
            p.strangers.remove(&id);
            if p.open == 0 {
                self.peers.remove(&entry.peer);
            }
        }
        Some(entry)
    }
}

/// The connection table of one server.
pub struct Connections {
    table: Mutex<Table>,
    max_total: usize,
    max_per_peer: usize,
    open_gauge: Gauge,
    evicted: Counter,
    refused: Counter,
}

impl Connections {
    pub fn new(max_total: usize, max_per_peer: usize, metrics: &Metrics) -> Connections {
        Connections {
            table: Mutex::default(),
            max_total,
            max_per_peer,
            open_gauge: metrics.connections_open.clone(),
            evicted: metrics.connections_evicted.clone(),
            refused: metrics.connections_refused.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a new connection from `peer` (already a [`super::peer_key`]), closing the oldest
    /// stranger's connection of that peer, or of the whole server, when one is at its cap.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Admission, Refused> {
        let mut t = self.lock();
        let mut evicted = Vec::new();
        if t.peers
            .get(&peer)
            .is_some_and(|p| p.open >= self.max_per_peer)
        {
            let oldest = t
                .peers
                .get(&peer)
                .and_then(|p| p.strangers.first().copied());
            match oldest.and_then(|id| t.remove(id)) {
                Some(e) => evicted.push(e),
                None => {
                    self.refused.inc();
                    return Err(Refused::Peer);
                }
            }
        }
        if t.open.len() >= self.max_total {
            let oldest = t.strangers.first().copied();
            match oldest.and_then(|id| t.remove(id)) {
                Some(e) => evicted.push(e),
                None => {
                    self.refused.inc();
                    return Err(Refused::Server);
                }
            }
        }
        for e in &evicted {
            e.evict.cancel();
            self.evicted.inc();
        }
        let id = t.next_id;
        t.next_id += 1;
        let evict = CancellationToken::new();
        t.open.insert(
            id,
            Entry {
                peer,
                evict: evict.clone(),
            },
        );
        t.strangers.insert(id);
        let p = t.peers.entry(peer).or_default();
        p.open += 1;
        p.strangers.insert(id);
        self.open_gauge.set(t.open.len() as i64);
        Ok(Admission {
            mark: ConnectionMark {
                table: self.clone(),
                id,
                authenticated: Arc::new(AtomicBool::new(false)),
            },
            evict,
        })
    }

    fn authenticated(&self, id: u64) {
        let mut t = self.lock();
        let Some(peer) = t.open.get(&id).map(|e| e.peer) else {
            return;
        };
        t.strangers.remove(&id);
        if let Some(p) = t.peers.get_mut(&peer) {
            p.strangers.remove(&id);
        }
    }

    fn close(&self, id: u64) {
        let mut t = self.lock();
        t.remove(id);
        self.open_gauge.set(t.open.len() as i64);
    }

    /// Open connections, and those of them that have not authenticated.
    pub fn counts(&self) -> (usize, usize) {
        let t = self.lock();
        (t.open.len(), t.strangers.len())
    }
}

/// A connection's place in the table, for as long as it lives.
pub struct Admission {
    mark: ConnectionMark,
    evict: CancellationToken,
}

impl Admission {
    /// What the connection's requests carry, to mark it authenticated.
    pub fn mark(&self) -> ConnectionMark {
        self.mark.clone()
    }

    /// Resolves when the connection was closed to make room for a newer one.
    pub async fn evicted(&self) {
        self.evict.cancelled().await
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.mark.table.close(self.mark.id);
    }
}

/// Carried by each request (in its extensions) to its connection's entry.
#[derive(Clone)]
pub struct ConnectionMark {
    table: Arc<Connections>,
    id: u64,
    authenticated: Arc<AtomicBool>,
}

impl ConnectionMark {
    /// The connection carried an authenticated request: it is no longer evicted for newcomers.
    pub fn authenticated(&self) {
        if !self.authenticated.swap(true, Ordering::Relaxed) {
            self.table.authenticated(self.id);
        }
    }

    pub fn is_authenticated(&self) -> bool {
        self.authenticated.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_peer_at_its_cap_loses_its_oldest_stranger() {
        let c = Arc::new(Connections::new(10, 2, &Metrics::new()));
        let a = c.admit(ip("10.0.0.1")).unwrap();
        let b = c.admit(ip("10.0.0.1")).unwrap();
        a.mark().authenticated();
        let other = c.admit(ip("10.0.0.2")).unwrap();
        // a authenticated, so b, the oldest stranger of that peer, makes room.
        let d = c.admit(ip("10.0.0.1")).unwrap();
        assert!(b.evict.is_cancelled() && !a.evict.is_cancelled());
        assert!(!other.evict.is_cancelled() && !d.evict.is_cancelled());
        assert_eq!(c.counts(), (3, 2));
        d.mark().authenticated();
        assert_eq!(c.admit(ip("10.0.0.1")).err(), Some(Refused::Peer));
        drop(b); // already evicted: dropping it again frees nothing twice
        assert_eq!(c.counts(), (3, 1));
        drop(a);
        assert!(c.admit(ip("10.0.0.1")).is_ok());
    }

    #[test]
    fn the_server_at_its_cap_loses_its_oldest_stranger() {
        let c = Arc::new(Connections::new(2, 10, &Metrics::new()));
        let a = c.admit(ip("10.0.0.1")).unwrap();
        let b = c.admit(ip("10.0.0.2")).unwrap();
        let _n = c.admit(ip("10.0.0.3")).unwrap();
        assert!(a.evict.is_cancelled() && !b.evict.is_cancelled());
        b.mark().authenticated();
        _n.mark().authenticated();
        assert_eq!(c.admit(ip("10.0.0.4")).err(), Some(Refused::Server));
        assert_eq!(c.counts(), (2, 0));
    }
}
