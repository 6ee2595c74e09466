//! Failed authentications per peer: a token bucket each, [`FailureLimiter::failed`] takes a
//! token, time gives them back. A peer without tokens is answered 429 for its failures, and its
//! bodies larger than [`super::SMALL_BODY`] are not read at all; a small request that signs
//! right is still served, so a stranger sharing a NAT address cannot lock sidecars out. At most
//! `capacity` peers are remembered; past it the one that failed longest ago is forgotten.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

struct Bucket {
    tokens: f64,
    /// Milliseconds since the limiter's start, at the last failure.
    updated: u64,
}

struct Table {
    buckets: HashMap<IpAddr, Bucket>,
    /// (updated, peer), to forget the peer seen longest ago first.
    by_age: BTreeSet<(u64, IpAddr)>,
}

/// The failure limiter of one server.
pub struct FailureLimiter {
    table: Mutex<Table>,
    start: Instant,
    burst: f64,
    per_ms: f64,
    capacity: usize,
}

impl FailureLimiter {
    pub fn new(burst: u32, per_second: u32, capacity: usize) -> FailureLimiter {
        FailureLimiter {
            table: Mutex::new(Table {
                buckets: HashMap::new(),
                by_age: BTreeSet::new(),
            }),
            start: Instant::now(),
            burst: f64::from(burst.max(1)),
            per_ms: f64::from(per_second.max(1)) / 1000.0,
            capacity: capacity.max(1),
        }
    }

    fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.start).as_millis() as u64
    }

    fn tokens(&self, b: &Bucket, now_ms: u64) -> f64 {
        (b.tokens + now_ms.saturating_sub(b.updated) as f64 * self.per_ms).min(self.burst)
    }

    /// How long until `tokens` reach one, at least a second (Retry-After is whole seconds).
    fn retry_after(&self, tokens: f64) -> Duration {
        let ms = ((1.0 - tokens).max(0.0) / self.per_ms).ceil() as u64;
        Duration::from_secs(ms.div_ceil(1000).max(1))
    }

    /// `Some(retry after)` when `peer` has used its burst of failures.
    pub fn limited(&self, peer: IpAddr, now: Instant) -> Option<Duration> {
        let now_ms = self.ms(now);
        let t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let tokens = self.tokens(t.buckets.get(&peer)?, now_ms);
        (tokens < 1.0).then(|| self.retry_after(tokens))
    }

    /// Counts a failed authentication of `peer`; `Some(retry after)` when it had already used
    /// its burst, so this failure is answered 429.
    pub fn failed(&self, peer: IpAddr, now: Instant) -> Option<Duration> {
        let now_ms = self.ms(now);
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let tokens = match t.buckets.remove(&peer) {
            Some(b) => {
                t.by_age.remove(&(b.updated, peer));
                self.tokens(&b, now_ms)
            }
            None => {
                while t.buckets.len() >= self.capacity {
                    let Some((_, oldest)) = t.by_age.pop_first() else {
                        break;
                    };
                    t.buckets.remove(&oldest);
                }
                self.burst
            }
        };
        let was_limited = tokens < 1.0;
        let tokens = (tokens - 1.0).max(0.0);
        t.buckets.insert(
            peer,
            Bucket {
                tokens,
                updated: now_ms,
            },
        );
        t.by_age.insert((now_ms, peer));
        was_limited.then(|| self.retry_after(tokens))
    }

    /// Peers remembered.
    pub fn len(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .buckets
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(i: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, i])
    }

    #[test]
    fn a_burst_then_one_per_second_per_peer() {
        let l = FailureLimiter::new(3, 1, 100);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.failed(ip(1), t0), None);
        }
        assert_eq!(
            l.failed(ip(1), t0),
            Some(Duration::from_secs(1)),
            "burst used"
        );
        assert!(l.limited(ip(1), t0).is_some());
        assert_eq!(l.limited(ip(2), t0), None, "other peers are not affected");
        assert_eq!(l.failed(ip(2), t0), None);
        let later = t0 + Duration::from_millis(1000);
        assert_eq!(l.limited(ip(1), later), None, "a token back after a second");
        assert_eq!(l.failed(ip(1), later), None, "the token regained");
        assert!(l.failed(ip(1), later).is_some());
        assert_eq!(l.limited(ip(1), t0 + Duration::from_secs(10)), None);
    }

    #[test]
    fn the_table_forgets_the_peer_seen_longest_ago() {
        let l = FailureLimiter::new(1, 1, 3);
        let t0 = Instant::now();
        for i in 0..3 {
            l.failed(ip(i), t0 + Duration::from_millis(u64::from(i)));
        }
        assert!(l.limited(ip(0), t0).is_some());
        l.failed(ip(9), t0 + Duration::from_millis(5));
        assert_eq!(l.len(), 3);
        assert_eq!(l.limited(ip(0), t0), None, "forgotten");
        assert!(l.limited(ip(1), t0 + Duration::from_millis(5)).is_some());
    }
}
