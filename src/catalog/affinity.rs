//! Prefix affinity: requests whose prompts start alike go to the same instance, where vLLM's
//! prefix cache already holds that start, so it is not computed again.
//!
//! The instance is found by consistent hashing (a ketama ring, `pingora-ketama`) of the prompt
//! key, so an instance joining or leaving moves only its own share of the keys. Load is bounded
//! (after "consistent hashing with bounded loads", Mirrokni et al.): an instance with
//! `⌈(1 + slack) × (the others' average + 1)⌉` requests in flight or more, or whose vLLM reports
//! a queue well above the others' (at least 2 waiting and `1 + slack` times their average), is
//! passed over for the next one on the ring, so a hot prefix cannot overload one node. The
//! queue test is relative: under load every vLLM queues a little, and passing over any queue
//! would pass over every instance and lose the affinity.
//!
//! A ring places a handful of keys unevenly (8 system prompts over 4 instances often put 3 on
//! one, whose cache then cannot hold them), so the gateway also remembers where it placed each
//! key ([`Placements`]): a key seen for the first time goes to the instance holding the fewest
//! keys (the first such on the ring from the key), as SGLang's `cache_aware` router sends an
//! unmatched prompt to the worker with the smallest tree, and stays there while that instance
//! serves. Keys idle for [`FORGET_AFTER`] are forgotten.
//!
//! The key is a hash of the prompt's first bytes (see `openai::ControlFields::prefix_key`);
//! no prompt text is kept.

use pingora_ketama::{Bucket, Continuum};
use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::rc::Rc;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

/// One instance as prefix affinity weighs it.
#[derive(Debug, Clone, Copy)]
pub struct Member<'a> {
    /// `host:port`: its place on the ring depends on this only.
    pub id: &'a str,
    /// Requests this gateway has in flight there.
    pub in_flight: i64,
    /// Requests vLLM reports waiting in its own queue (`vllm:num_requests_waiting`).
    pub waiting: i64,
}

/// A ring of instance ids. Points are placed by the id alone (hashed into an address for
/// ketama), so the same instances make the same ring in every gateway replica.
struct Ring {
    continuum: Continuum,
    /// The ring's node addresses, in the order of `ids`.
    nodes: Vec<SocketAddr>,
    ids: Vec<String>,
}

impl Ring {
    fn new(mut ids: Vec<String>) -> Ring {
        ids.sort_unstable();
        ids.dedup();
        let nodes: Vec<SocketAddr> = ids.iter().map(|id| node_of(id)).collect();
        let buckets: Vec<Bucket> = nodes.iter().map(|n| Bucket::new(*n, 1)).collect();
        Ring {
            continuum: Continuum::new(&buckets),
            nodes,
            ids,
        }
    }

    /// Instance ids in ring order from `key`, each once.
    fn walk(&self, key: u64) -> impl Iterator<Item = &str> + '_ {
        let mut seen = vec![false; self.ids.len()];
        let mut left = self.ids.len();
        self.continuum
            .node_iter(&key.to_le_bytes())
            .take(self.continuum_len())
            .filter_map(move |addr| {
                if left == 0 {
                    return None;
                }
                let i = self.nodes.iter().position(|n| n == addr)?;
                if std::mem::replace(&mut seen[i], true) {
                    return None;
                }
                left -= 1;
                Some(self.ids[i].as_str())
            })
    }

    /// An upper bound on the ring's points (160 per node for ketama's version 1).
    fn continuum_len(&self) -> usize {
        self.ids.len() * 160
    }
}

/// A stable address standing for an instance id on the ring.
fn node_of(id: &str) -> SocketAddr {
    let digest = Sha256::digest(id.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(bytes), 1, 0, 0))
}

thread_local! {
    /// Rings by their set of ids: rebuilt only when membership changes.
    static RINGS: RefCell<HashMap<u64, Rc<Ring>>> = RefCell::new(HashMap::new());
}

fn ring_of(members: &[Member<'_>]) -> Rc<Ring> {
    let mut ids: Vec<&str> = members.iter().map(|m| m.id).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut h = std::hash::DefaultHasher::new();
    std::hash::Hash::hash(&ids, &mut h);
    let set = std::hash::Hasher::finish(&h);
    RINGS.with(|rings| {
        let mut rings = rings.borrow_mut();
        if let Some(r) = rings.get(&set).filter(|r| r.ids == ids) {
            return r.clone();
        }
        if rings.len() >= 64 {
            rings.clear();
        }
        let ring = Rc::new(Ring::new(ids.iter().map(|s| s.to_string()).collect()));
        rings.insert(set, ring.clone());
        ring
    })
}

/// The bound never goes below this many requests in flight: at low load a single request in
/// flight (one that has just ended, even: its slot is freed after the answer's last byte)
/// would otherwise be over a bound of small slack and move the prefix, while vLLM batches
/// far more than that at no cost. Likewise a vLLM queue of one request is passing, not a sign
/// of overload.
const MIN_BOUND: f64 = 2.0;

/// Prefix affinity's two load bounds over a set of members. Each instance is measured against
/// the average of the *others*: against an average counting itself, an instance holding all
/// the load would never be over `1 + slack` times it once `slack` reaches the number of other
/// instances (with 2 or 3 instances, a slack of 2 would bound nothing).
struct Bounds {
    factor: f64,
    others: f64,
    in_flight: i64,
    waiting: i64,
}

impl Bounds {
    fn of(members: &[Member<'_>], slack: f64) -> Bounds {
        Bounds {
            factor: 1.0 + slack.max(0.0),
            others: members.len().saturating_sub(1) as f64,
            in_flight: members.iter().map(|m| m.in_flight.max(0)).sum(),
            waiting: members.iter().map(|m| m.waiting.max(0)).sum(),
        }
    }

    /// Within both bounds: fewer than `⌈(1 + slack) × (others' average in flight + 1)⌉`
    /// requests in flight, and fewer than `(1 + slack) × others' average` waiting in vLLM's
    /// queue, both bounds at least 2.
    fn admit(&self, m: &Member<'_>) -> bool {
        if self.others == 0.0 {
            // The only instance: there is nowhere to spill to.
            return true;
        }
        let in_flight = m.in_flight.max(0);
        let waiting = m.waiting.max(0);
        let others_in_flight = (self.in_flight - in_flight) as f64 / self.others;
        let others_waiting = (self.waiting - waiting) as f64 / self.others;
        let in_flight_bound = (self.factor * (others_in_flight + 1.0))
            .ceil()
            .max(MIN_BOUND);
        let waiting_bound = (self.factor * others_waiting).max(MIN_BOUND);
        (in_flight as f64) < in_flight_bound && (waiting as f64) < waiting_bound
    }
}

/// The index of the first member on the ring from `key` that `ok` accepts.
fn first_on_ring(
    key: u64,
    members: &[Member<'_>],
    ok: impl Fn(&Member<'_>) -> bool,
) -> Option<usize> {
    let ring = ring_of(members);
    let found = ring
        .walk(key)
        .filter_map(|id| members.iter().position(|m| m.id == id))
        .find(|i| ok(&members[*i]));
    found
}

/// How long a key that no request used is remembered where it was placed.
pub const FORGET_AFTER: Duration = Duration::from_secs(600);

/// Where this gateway placed each prompt key, and how many keys each instance holds.
pub struct Placements {
    homes: moka::sync::Cache<u64, Arc<str>>,
    keys_held: Arc<Mutex<HashMap<Arc<str>, usize>>>,
}

/// The process's placements, shared by every thread that routes.
pub static PLACEMENTS: LazyLock<Placements> = LazyLock::new(Placements::new);

impl Placements {
    /// No key placed yet.
    pub fn new() -> Placements {
        let keys_held: Arc<Mutex<HashMap<Arc<str>, usize>>> = Arc::default();
        let held = keys_held.clone();
        let homes = moka::sync::Cache::builder()
            .max_capacity(1 << 16)
            .time_to_idle(FORGET_AFTER)
            // Forgotten or moved: the instance holds one key fewer.
            .eviction_listener(move |_key, home: Arc<str>, _cause| {
                let mut held = held.lock().unwrap();
                if let Some(n) = held.get_mut(&home) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        held.remove(&home);
                    }
                }
            })
            .build();
        Placements { homes, keys_held }
    }

    /// The index in `members` of the instance for `key`: its home if it has one among the
    /// members and that home is within both load bounds; the next on the ring from the key
    /// within them if the home is over one (the key comes home when the load passes); and
    /// for a key without a home, the instance within the bounds that holds the fewest keys,
    /// the first such on the ring, which becomes its home. `None` when every instance is over
    /// a bound.
    pub fn pick(&self, key: u64, members: &[Member<'_>], slack: f64) -> Option<usize> {
        if members.is_empty() {
            return None;
        }
        let bounds = Bounds::of(members, slack);
        if let Some(home) = self.homes.get(&key) {
            if let Some(i) = members.iter().position(|m| *m.id == *home) {
                if bounds.admit(&members[i]) {
                    return Some(i);
                }
                return first_on_ring(key, members, |m| bounds.admit(m));
            }
        }
        let home = {
            let mut held = self.keys_held.lock().unwrap();
            let count = |m: &Member<'_>| held.get(m.id).copied().unwrap_or(0);
            let fewest = members
                .iter()
                .filter(|m| bounds.admit(m))
                .map(count)
                .min()?;
            let i = first_on_ring(key, members, |m| bounds.admit(m) && count(m) == fewest)?;
            let id: Arc<str> = Arc::from(members[i].id);
            *held.entry(id.clone()).or_default() += 1;
            (i, id)
        };
        // Inserted after the count's lock is let go: the listener takes it.
        self.homes.insert(key, home.1);
        Some(home.0)
    }
}

impl Default for Placements {
    fn default() -> Self {
        Placements::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{}:8000", i + 1)).collect()
    }

    /// The first instance on the ring from each key.
    fn owners(keys: &[u64], ids: &[String]) -> Vec<String> {
        let members = idle(ids);
        keys.iter()
            .map(|k| ids[first_on_ring(*k, &members, |_| true).unwrap()].clone())
            .collect()
    }

    fn keys() -> Vec<u64> {
        let mut rng = fastrand::Rng::with_seed(7);
        (0..4000).map(|_| rng.u64(..)).collect()
    }

    #[test]
    fn keys_spread_over_every_instance() {
        let four = ids(4);
        let owners = owners(&keys(), &four);
        for id in &four {
            let share = owners.iter().filter(|o| *o == id).count();
            assert!((500..1500).contains(&share), "{id} got {share} of 4000");
        }
    }

    #[test]
    fn joining_and_leaving_move_only_that_instances_share() {
        let keys = keys();
        let four = ids(4);
        let five = ids(5);
        let before = owners(&keys, &four);
        let after = owners(&keys, &five);
        let mut moved = 0;
        for (b, a) in before.iter().zip(&after) {
            if a != b {
                assert_eq!(a, &five[4], "a key moved between two old instances");
                moved += 1;
            }
        }
        // About a fifth of the keys go to the new instance.
        assert!((500..1200).contains(&moved), "{moved} of 4000 moved");
        // The third instance leaves: only its keys move, and they spread over the others.
        let three: Vec<String> = four.iter().filter(|i| *i != &four[2]).cloned().collect();
        let left = owners(&keys, &three);
        for (b, a) in before.iter().zip(&left) {
            if b != &four[2] {
                assert_eq!(a, b, "a key of a remaining instance moved");
            }
        }
        // The order of the members does not matter.
        let mut shuffled = four.clone();
        shuffled.reverse();
        assert_eq!(owners(&keys, &shuffled), before);
    }

    #[test]
    fn an_instance_over_the_bound_or_queueing_well_above_the_others_is_passed_over() {
        let four = ids(4);
        let key = keys()[0];
        let members = |loads: [i64; 4], waiting: [i64; 4]| -> Vec<Member<'_>> {
            four.iter()
                .enumerate()
                .map(|(i, id)| Member {
                    id,
                    in_flight: loads[i],
                    waiting: waiting[i],
                })
                .collect()
        };
        let p = Placements::new();
        let pick = |key, members: &[Member<'_>], slack| p.pick(key, members, slack);
        let home = pick(key, &members([0; 4], [0; 4]), 0.5).unwrap();
        let with = |i: usize, v: i64, rest: i64| {
            let mut a = [rest; 4];
            a[i] = v;
            a
        };
        // Its next on the ring when it is busy.
        let next = pick(key, &members(with(home, 4, 0), [0; 4]), 0.5).unwrap();
        assert_ne!(next, home);
        // Below the bound it keeps the key: 2 in flight, the others 4 / 3 on average, bound
        // ⌈1.5 × (4 / 3 + 1)⌉ = 4.
        let mut loads = with(home, 2, 1);
        loads[(home + 1) % 4] = 2;
        assert_eq!(pick(key, &members(loads, [0; 4]), 0.5), Some(home));
        // A queue well above the others' sends the key on ...
        assert_ne!(
            pick(key, &members([0; 4], with(home, 4, 0)), 0.5),
            Some(home)
        );
        // ... one waiting request does not, nor a queue every instance has.
        assert_eq!(
            pick(key, &members([0; 4], with(home, 1, 0)), 0.5),
            Some(home)
        );
        assert_eq!(pick(key, &members([0; 4], [3; 4]), 0.5), Some(home));
        assert_eq!(
            pick(key, &members([0; 4], with(home, 4, 3)), 0.5),
            Some(home)
        );
        // The only instance takes the key however busy it is.
        let busy_one = [Member {
            id: &four[0],
            in_flight: 50,
            waiting: 50,
        }];
        assert_eq!(pick(key, &busy_one, 0.5), Some(0));
        // Every instance over one bound or the other: no pick (the caller falls back to least
        // in flight).
        assert_eq!(
            pick(key, &members([10, 10, 0, 0], [0, 0, 10, 10]), 0.5),
            None
        );
    }

    fn idle(ids: &[String]) -> Vec<Member<'_>> {
        ids.iter()
            .map(|id| Member {
                id,
                in_flight: 0,
                waiting: 0,
            })
            .collect()
    }

    #[test]
    fn new_keys_are_placed_evenly_and_stay() {
        let four = ids(4);
        let p = Placements::new();
        let keys = &keys()[..8];
        let homes: Vec<usize> = keys
            .iter()
            .map(|k| p.pick(*k, &idle(&four), 0.5).unwrap())
            .collect();
        for i in 0..4 {
            let held = homes.iter().filter(|h| **h == i).count();
            assert_eq!(held, 2, "two of eight keys on each of four: {homes:?}");
        }
        // Asked again, in another order, each key goes home.
        for (k, home) in keys.iter().zip(&homes).rev() {
            assert_eq!(p.pick(*k, &idle(&four), 0.5), Some(*home));
        }
    }

    #[test]
    fn a_busy_home_spills_the_key_until_its_load_passes_and_a_gone_one_loses_it() {
        let four = ids(4);
        let p = Placements::new();
        let key = keys()[0];
        let home = p.pick(key, &idle(&four), 0.5).unwrap();
        let mut busy = idle(&four);
        busy[home].in_flight = 4;
        let spill = p.pick(key, &busy, 0.5).unwrap();
        assert_ne!(spill, home);
        assert_eq!(p.pick(key, &idle(&four), 0.5), Some(home), "home again");
        // Its home gone, the key is placed again, and stays there.
        let three: Vec<String> = four.iter().filter(|i| **i != four[home]).cloned().collect();
        let new_home = three[p.pick(key, &idle(&three), 0.5).unwrap()].clone();
        for _ in 0..3 {
            assert_eq!(three[p.pick(key, &idle(&three), 0.5).unwrap()], new_home);
        }
        // A queue well above the others' is a bound too.
        let mut queued = idle(&three);
        let at = three.iter().position(|i| *i == new_home).unwrap();
        queued[at].waiting = 4;
        assert_ne!(p.pick(key, &queued, 0.5), Some(at));
    }
}
