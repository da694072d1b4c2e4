//! Least-in-flight backend selection for pingora-load-balancing (it ships round robin, random
//! and hashing only). Ties are broken by a rotating start so sequential traffic still spreads.

use super::pool::Instance;
use pingora::lb::selection::{BackendIter, BackendSelection};
use pingora::lb::Backend;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub struct LeastInFlight {
    backends: Vec<(Backend, usize)>,
    turn: AtomicUsize,
}

impl LeastInFlight {
    fn load(b: &Backend) -> usize {
        b.ext
            .get::<Arc<Instance>>()
            .map_or(usize::MAX, |i| i.in_flight())
    }
}

impl BackendSelection for LeastInFlight {
    type Iter = LeastInFlightIter;
    type Config = ();

    fn build(backends: &BTreeSet<Backend>) -> Self {
        LeastInFlight {
            backends: backends
                .iter()
                .cloned()
                .enumerate()
                .map(|(i, b)| (b, i))
                .collect(),
            turn: AtomicUsize::new(0),
        }
    }

    fn iter(self: &Arc<Self>, _key: &[u8]) -> LeastInFlightIter {
        let n = self.backends.len().max(1);
        let start = self.turn.fetch_add(1, Ordering::Relaxed) % n;
        let mut order: Vec<(usize, usize)> = self
            .backends
            .iter()
            .map(|(b, i)| (Self::load(b), (i + n - start) % n))
            .collect();
        order.sort_unstable();
        LeastInFlightIter {
            selection: self.clone(),
            order: order.into_iter().map(|(_, r)| (r + start) % n).collect(),
            next: 0,
        }
    }
}

pub struct LeastInFlightIter {
    selection: Arc<LeastInFlight>,
    order: Vec<usize>,
    next: usize,
}

impl BackendIter for LeastInFlightIter {
    fn next(&mut self) -> Option<&Backend> {
        let i = *self.order.get(self.next)?;
        self.next += 1;
        self.selection.backends.get(i).map(|(b, _)| b)
    }
}
