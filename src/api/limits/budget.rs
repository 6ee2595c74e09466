//! The body budget: bytes of request bodies being read before their signature is checked, shared
//! by every connection. A body takes its Content-Length from the budget before it is read and
//! gives it back when its request is answered; when the budget has no room the request is
//! answered 503 at once rather than waiting, since a waiting connection holds hyper's buffers.
//! A small body is read on its connection's own allowance ([`SMALL_BODY`]), so a real change
//! never meets the large fake bodies.

use std::sync::Arc;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::SMALL_BODY;

/// What hyper holds for a connection while it reads a body (an 8 KiB read buffer and an 8 KiB
/// write buffer), charged to the budget with the body: else many bodies just over
/// [`SMALL_BODY`] would each hold far more than they take.
pub const CONNECTION_BUFFERS: usize = 16 * 1024;
use crate::metrics::Metrics;

/// The shared budget.
pub struct BodyBudget {
    bytes: Arc<Semaphore>,
    total: usize,
    in_use: Gauge,
}

/// The right to read a body of some length: on the connection's own allowance, or bytes of the
/// shared budget, given back when this drops.
pub enum BodyReservation {
    Own,
    Shared {
        _permit: OwnedSemaphorePermit,
        in_use: Gauge,
        bytes: i64,
    },
}

impl Drop for BodyReservation {
    fn drop(&mut self) {
        if let BodyReservation::Shared { in_use, bytes, .. } = self {
            in_use.dec_by(*bytes);
        }
    }
}

impl BodyBudget {
    pub fn new(total: usize, metrics: &Metrics) -> BodyBudget {
        metrics.body_budget_bytes.set(total as i64);
        BodyBudget {
            bytes: Arc::new(Semaphore::new(total)),
            total,
            in_use: metrics.body_budget_in_use.clone(),
        }
    }

    /// Reserves room for a body of `len` bytes, and for the buffers of the connection reading
    /// it; `None` when the budget has no room now.
    pub fn reserve(&self, len: usize) -> Option<BodyReservation> {
        if len <= SMALL_BODY {
            return Some(BodyReservation::Own);
        }
        let len = len + CONNECTION_BUFFERS;
        let permits = u32::try_from(len).ok().filter(|_| len <= self.total)?;
        let permit = self.bytes.clone().try_acquire_many_owned(permits).ok()?;
        self.in_use.inc_by(len as i64);
        Some(BodyReservation::Shared {
            _permit: permit,
            in_use: self.in_use.clone(),
            bytes: len as i64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_bodies_share_the_budget_small_ones_do_not() {
        let metrics = Metrics::new();
        let budget = BodyBudget::new(100_000, &metrics);
        let a = budget.reserve(60_000).expect("room");
        assert_eq!(
            metrics.body_budget_in_use.get(),
            (60_000 + CONNECTION_BUFFERS) as i64
        );
        assert!(budget.reserve(60_000).is_none(), "no room");
        assert!(matches!(
            budget.reserve(SMALL_BODY),
            Some(BodyReservation::Own)
        ));
        drop(a);
        assert_eq!(metrics.body_budget_in_use.get(), 0);
        assert!(budget.reserve(60_000).is_some());
        assert!(budget.reserve(200_000).is_none(), "over the total");
    }
}
