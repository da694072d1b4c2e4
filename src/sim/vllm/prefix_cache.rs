//! The simulator's prefix cache, after vLLM's automatic prefix caching (vLLM v1,
//! `vllm/v1/core/kv_cache_manager.py`): the prompt is cut into blocks of 16 tokens, each full
//! block named by a hash chained over every token before it, so a block is found only when the
//! whole prompt up to its end was seen before. Blocks are evicted least recently used. A lookup
//! counts the prompt's tokens as queries and the tokens of the leading blocks found as hits,
//! as `vllm:prefix_cache_queries` and `vllm:prefix_cache_hits` do; like vLLM, the last token is
//! always computed, so a prompt never hits in full.

use std::collections::{BTreeMap, HashMap};

/// Tokens per KV-cache block (vLLM's default `--block-size` on GPUs).
pub const BLOCK_TOKENS: usize = 16;

/// An LRU set of block hashes.
#[derive(Debug)]
pub struct PrefixCache {
    capacity: usize,
    /// Block hash → when last used.
    blocks: HashMap<u64, u64>,
    /// When last used → block hash (the oldest first).
    by_use: BTreeMap<u64, u64>,
    clock: u64,
}

impl PrefixCache {
    /// A cache of at most `capacity` blocks (0: caching off).
    pub fn new(capacity: usize) -> Self {
        PrefixCache {
            capacity,
            blocks: HashMap::new(),
            by_use: BTreeMap::new(),
            clock: 0,
        }
    }

    /// Looks the prompt's blocks up and caches them; returns how many of its tokens were
    /// found (at most all but the last).
    pub fn lookup_and_insert<'a>(&mut self, tokens: impl Iterator<Item = &'a str>) -> usize {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let mut in_block = 0;
        let mut total: usize = 0;
        let mut hit_blocks = 0;
        let mut missed = false;
        for t in tokens {
            for b in t.bytes().chain(std::iter::once(b' ')) {
                hash = (hash ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
            }
            in_block += 1;
            total += 1;
            if in_block == BLOCK_TOKENS {
                in_block = 0;
                if !missed && self.blocks.contains_key(&hash) {
                    hit_blocks += 1;
                } else {
                    missed = true;
                }
                self.touch(hash);
            }
        }
        (hit_blocks * BLOCK_TOKENS).min(total.saturating_sub(1))
    }

    fn touch(&mut self, hash: u64) {
        if self.capacity == 0 {
            return;
        }
        self.clock += 1;
        if let Some(old) = self.blocks.insert(hash, self.clock) {
            self.by_use.remove(&old);
        }
        self.by_use.insert(self.clock, hash);
        while self.blocks.len() > self.capacity {
            let Some((_, oldest)) = self.by_use.pop_first() else {
                break;
            };
            self.blocks.remove(&oldest);
        }
    }

    /// Blocks held now.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i}")).collect()
    }

    fn lookup(c: &mut PrefixCache, w: &[String]) -> usize {
        c.lookup_and_insert(w.iter().map(String::as_str))
    }

    #[test]
    fn shared_leading_blocks_hit_and_the_rest_misses() {
        let mut c = PrefixCache::new(100);
        let system = words("s", 64);
        let mut a = system.clone();
        a.extend(words("a", 10));
        let mut b = system.clone();
        b.extend(words("b", 10));
        assert_eq!(lookup(&mut c, &a), 0);
        assert_eq!(
            lookup(&mut c, &b),
            64,
            "the four blocks of the system prompt"
        );
        // The same prompt again: all its full blocks, and never the last token.
        assert_eq!(lookup(&mut c, &system), 63);
        // A different first token changes every block after it.
        let mut other = words("x", 1);
        other.extend(system.iter().skip(1).cloned());
        assert_eq!(lookup(&mut c, &other), 0);
    }

    #[test]
    fn the_least_recently_used_blocks_go_first() {
        let mut c = PrefixCache::new(4);
        let a = words("a", 64);
        let b = words("b", 64);
        lookup(&mut c, &a);
        assert_eq!(c.len(), 4);
        lookup(&mut c, &b);
        assert_eq!(c.len(), 4);
        assert_eq!(lookup(&mut c, &a), 0, "evicted by b");
        assert_eq!(
            PrefixCache::new(0).lookup_and_insert(["t"; 40].into_iter()),
            0
        );
    }
}
