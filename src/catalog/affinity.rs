//! Prefix affinity: requests whose prompts start alike go to the same instance, where vLLM's
//! prefix cache already holds that start, so it is not computed again.
//!
//! The instance is found by consistent hashing (a ketama ring, `pingora-ketama`) of the prompt
//! key, so an instance joining or leaving moves only its own share of the keys. Load is bounded
//! ("consistent hashing with bounded loads", Mirrokni et al.): an instance with
//! `⌈(1 + slack) × average⌉` requests in flight or more (the average counting the new one), or
//! whose vLLM reports a queue, is passed over for the next one on the ring, so a hot prefix
//! cannot overload one node.
//!
//! The key is a hash of the prompt's first bytes (see `openai::ControlFields::prefix_key`);
//! no prompt text is kept.

use pingora_ketama::{Bucket, Continuum};
use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::rc::Rc;

/// One instance as prefix affinity weighs it.
#[derive(Debug, Clone, Copy)]
pub struct Member<'a> {
    /// `host:port`: its place on the ring depends on this only.
    pub id: &'a str,
    /// Requests this gateway has in flight there.
    pub in_flight: i64,
    /// vLLM reports requests waiting in its own queue.
    pub queued: bool,
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
/// would otherwise be over ⌈(1 + slack) × average⌉ and move the prefix, while vLLM batches
/// far more than that at no cost.
const MIN_BOUND: f64 = 2.0;

/// The index in `members` of the instance for `key`: the first on the ring from the key that
/// has fewer than `⌈(1 + slack) × (in flight + 1) / members⌉` (at least 2) requests in flight
/// and no queue reported. `None` when every instance is over the bound (or there is none).
pub fn pick(key: u64, members: &[Member<'_>], slack: f64) -> Option<usize> {
    if members.is_empty() {
        return None;
    }
    let total: i64 = members.iter().map(|m| m.in_flight.max(0)).sum();
    let bound = ((1.0 + slack.max(0.0)) * (total + 1) as f64 / members.len() as f64)
        .ceil()
        .max(MIN_BOUND);
    let ring = ring_of(members);
    for id in ring.walk(key) {
        let Some(i) = members.iter().position(|m| m.id == id) else {
            continue;
        };
        let m = &members[i];
        if !m.queued && (m.in_flight as f64) < bound {
            return Some(i);
        }
    }
    None
}

/// The instance for `key` ignoring load: the first on the ring.
pub fn owner<'a>(key: u64, ids: &[&'a str]) -> Option<&'a str> {
    let members: Vec<Member<'_>> = ids
        .iter()
        .map(|id| Member {
            id,
            in_flight: 0,
            queued: false,
        })
        .collect();
    pick(key, &members, f64::INFINITY).map(|i| ids[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{}:8000", i + 1)).collect()
    }

    fn owners(keys: &[u64], ids: &[String]) -> Vec<String> {
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        keys.iter()
            .map(|k| owner(*k, &refs).unwrap().to_string())
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
    fn an_instance_over_the_bound_or_queueing_is_passed_over() {
        let four = ids(4);
        let key = keys()[0];
        let members = |loads: [i64; 4], queued: Option<usize>| -> Vec<Member<'_>> {
            four.iter()
                .enumerate()
                .map(|(i, id)| Member {
                    id,
                    in_flight: loads[i],
                    queued: queued == Some(i),
                })
                .collect()
        };
        let home = pick(key, &members([0; 4], None), 0.5).unwrap();
        // Its next on the ring when it is busy.
        let mut loads = [0; 4];
        loads[home] = 4;
        let next = pick(key, &members(loads, None), 0.5).unwrap();
        assert_ne!(next, home);
        // Below the bound it keeps the key: 2 in flight of 6 total, bound ⌈1.5 × 7 / 4⌉ = 3.
        let mut loads = [1; 4];
        loads[home] = 2;
        loads[(home + 1) % 4] = 2;
        assert_eq!(pick(key, &members(loads, None), 0.5), Some(home));
        // A reported queue sends the key on too.
        assert_ne!(pick(key, &members([0; 4], Some(home)), 0.5), Some(home));
        // Everyone queueing: no pick (the caller falls back to least in flight).
        let all: Vec<Member<'_>> = four
            .iter()
            .map(|id| Member {
                id,
                in_flight: 0,
                queued: true,
            })
            .collect();
        assert_eq!(pick(key, &all, 0.5), None);
    }
}
