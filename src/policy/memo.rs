//! Route decisions reused. A route script that reads nothing that changes from one request to
//! the next (no loads, times, headers or prompt sizes) decides alike for requests that are
//! alike in everything it can see: the situation. Its decision is kept per situation (the
//! request's model, endpoint, stream and batch flags and URL cluster; the user, if the script
//! reads who it is; each candidate's cluster, framework, state, compute fallback and instance
//! counts) and reused; a reused `direct(...)` chooses again among the same candidates on the
//! loads of the moment, as the script's own call would have. Running the interpreter and
//! copying the candidates cost a request some 20,000 instructions; recalling a decision, some
//! 3,700 (docs/benchmarks.md). Models routed by prompt prefix always run the script.
//!
//! Whether a script qualifies is read from its words when it is compiled, comments and
//! string literals left out: one that names anything volatile ([`VOLATILE`]) runs for every
//! request, as does a decision it turned into text (that text names the instance).

use super::service::state_of;
use super::view::Decision;
use crate::catalog::{Deployment, Instance, Loaded};
use moka::sync::Cache;
use std::sync::Arc;

/// Words that tie a route script's decision to its moment: loads and what the backends report,
/// instance-level narrowing (a situation counts instances, it does not name them), the
/// request's headers, size and prompt, and Rhai's clock, sleep, output and calls by a name
/// built at run time.
const VOLATILE: &[&str] = &[
    "in_flight",
    "waiting",
    "running",
    "kv_cache",
    "prefix_hit_rate",
    "metrics_age_ms",
    "avoid_ending_within",
    "without_queue",
    "max_waiting",
    "with_instance",
    "without_instance",
    "header",
    "prompt_bytes",
    "direct_by_prefix",
    "timestamp",
    "sleep",
    "print",
    "debug",
    "Fn",
    "call",
    "curry",
];

/// Words that read who the user is: the situation then includes the user.
const USER: &[&str] = &["username", "user_id", "domain", "groups", "in_group"];

/// The rest of the route vocabulary: what it reads is part of every situation.
#[cfg(test)]
const STABLE: &[&str] = &[
    "model",
    "endpoint",
    "stream",
    "batch",
    "cluster",
    "framework",
    "len",
    "is_empty",
    "hot",
    "in_state",
    "in_cluster",
    "requested",
    "with_compute",
    "prefer",
    "first",
    "state",
    "compute",
    "instances",
    "healthy",
    "routing",
    "direct",
    "reject",
    "to_string",
];

/// The request, as far as a situation holds it.
pub struct Situation<'a> {
    pub model: &'a str,
    pub endpoint: &'a str,
    pub stream: bool,
    pub batch: bool,
    /// FIRST's URL layout's cluster and framework (empty on the federated routes).
    pub cluster: &'a str,
    pub framework: &'a str,
    pub user_id: &'a str,
    pub username: &'a str,
    pub domain: &'a str,
    pub groups: &'a [String],
}

/// A request's situation, written out as bytes, and what its candidates' pools were found
/// doing when it was read.
pub struct SituationKey {
    bytes: Vec<u8>,
    /// Each candidate's least-loaded serving instance, and its load.
    least: Vec<Option<Loaded>>,
}

/// The decisions of one route script, by situation.
pub struct RouteMemo {
    /// The situation includes the user.
    reads_user: bool,
    decisions: Cache<Box<[u8]>, Kept, ahash::RandomState>,
}

/// A decision as kept: `direct(...)` by the candidates it chose among.
#[derive(Clone)]
enum Kept {
    Direct(Arc<[usize]>),
    Compute(usize),
    Reject(u16, Arc<str>),
}

/// A decision recalled for a request.
pub enum Recalled {
    /// The deployment `index` of the candidates, on `instance`: of the remembered candidates'
    /// instances, the one with the fewest requests in flight now (`None`: none serves).
    Direct {
        index: usize,
        instance: Option<Arc<Instance>>,
    },
    /// Globus Compute on the deployment `index`.
    Compute {
        index: usize,
    },
    Reject {
        status: u16,
        message: String,
    },
}

/// Situations kept per script (beyond, the least used are forgotten).
const CAPACITY: u64 = 10_000;

impl RouteMemo {
    /// A memo for a route script's decisions if its source qualifies, else the first volatile
    /// word it names.
    pub fn for_source(source: &str) -> Result<RouteMemo, &'static str> {
        let mut reads_user = false;
        for word in code_words(source) {
            if let Some(volatile) = VOLATILE.iter().find(|v| **v == word) {
                return Err(volatile);
            }
            reads_user |= USER.contains(&word);
        }
        Ok(RouteMemo {
            reads_user,
            // A situation is some 100 bytes: SipHash, the default, costs more than the lookup.
            decisions: Cache::builder()
                .max_capacity(CAPACITY)
                .build_with_hasher(ahash::RandomState::new()),
        })
    }

    /// The situation of a request among `candidates` (the deployments it may use, in the
    /// order the script sees them); `None` where decisions are not reused: a candidate routes
    /// by prompt prefix.
    pub fn situation(
        &self,
        s: &Situation<'_>,
        candidates: &[Arc<Deployment>],
    ) -> Option<SituationKey> {
        // Room for a few candidates without growing; kept whole only when a decision is.
        let mut key = Vec::with_capacity(256);
        let mut least = Vec::with_capacity(candidates.len());
        let mut put = |bytes: &[u8]| {
            key.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            key.extend_from_slice(bytes);
        };
        put(s.model.as_bytes());
        put(s.endpoint.as_bytes());
        put(&[u8::from(s.stream), u8::from(s.batch)]);
        put(s.cluster.as_bytes());
        put(s.framework.as_bytes());
        if self.reads_user {
            put(s.user_id.as_bytes());
            put(s.username.as_bytes());
            put(s.domain.as_bytes());
            for g in s.groups {
                put(g.as_bytes());
            }
        }
        for d in candidates {
            if d.pool.settings.routing != crate::config::Routing::LeastInFlight {
                return None;
            }
            let pool = d.pool.survey();
            let compute = d.compute.is_some() && d.live.load().endpoint_online != Some(false);
            put(d.cluster.as_bytes());
            put(d.framework.as_bytes());
            put(&[state_of(d, pool.serving > 0) as u8, u8::from(compute)]);
            put(&(pool.instances as u64).to_le_bytes());
            put(&(pool.serving as u64).to_le_bytes());
            least.push(pool.least);
        }
        Some(SituationKey { bytes: key, least })
    }

    /// The decision made for `situation` before, chosen again on the loads the situation was
    /// read with.
    pub fn recall(&self, situation: &SituationKey) -> Option<Recalled> {
        Some(match self.decisions.get(situation.bytes.as_slice())? {
            Kept::Direct(among) => {
                let least = among
                    .iter()
                    .filter_map(|&index| {
                        let (load, instance) = situation.least.get(index)?.as_ref()?;
                        Some((*load, index, instance))
                    })
                    .min_by_key(|(load, ..)| *load);
                match least {
                    Some((_, index, instance)) => Recalled::Direct {
                        index,
                        instance: Some(instance.clone()),
                    },
                    None => Recalled::Direct {
                        index: among[0],
                        instance: None,
                    },
                }
            }
            Kept::Compute(index) => Recalled::Compute { index },
            Kept::Reject(status, message) => Recalled::Reject {
                status,
                message: message.to_string(),
            },
        })
    }

    /// Keeps the script's `decision` for `situation`.
    pub fn remember(&self, situation: SituationKey, decision: &Decision) {
        let kept = match decision {
            Decision::Direct {
                by_prefix: false,
                among,
                ..
            } if !among.is_empty() => Kept::Direct(among.as_slice().into()),
            Decision::Direct { .. } => return,
            Decision::Compute { index, .. } => Kept::Compute(*index),
            Decision::Reject { status, message } => Kept::Reject(*status, message.as_str().into()),
        };
        self.decisions
            .insert(situation.bytes.into_boxed_slice(), kept);
    }
}

/// The identifiers of a Rhai source, leaving out comments and the text of string and
/// character literals (an interpolated string's text is kept: its `${...}` is code).
fn code_words(source: &str) -> impl Iterator<Item = &str> {
    let bytes = source.as_bytes();
    let mut at = 0;
    std::iter::from_fn(move || {
        while at < bytes.len() {
            let rest = &bytes[at..];
            if rest.starts_with(b"//") {
                at += rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
            } else if rest.starts_with(b"/*") {
                // Rhai's block comments nest.
                let mut depth = 0;
                while at < bytes.len() {
                    if bytes[at..].starts_with(b"/*") {
                        depth += 1;
                        at += 2;
                    } else if bytes[at..].starts_with(b"*/") {
                        depth -= 1;
                        at += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        at += 1;
                    }
                }
            } else if rest[0] == b'"' || rest[0] == b'\'' {
                let quote = rest[0];
                at += 1;
                while at < bytes.len() && bytes[at] != quote {
                    at += if bytes[at] == b'\\' { 2 } else { 1 };
                }
                at += 1;
            } else if rest[0].is_ascii_alphabetic() || rest[0] == b'_' {
                let len = rest
                    .iter()
                    .position(|&b| !(b.is_ascii_alphanumeric() || b == b'_'))
                    .unwrap_or(rest.len());
                at += len;
                return Some(&source[at - len..at]);
            } else {
                at += 1;
            }
        }
        None
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::tests::deployments;

    #[test]
    fn words_are_read_from_code_only() {
        let src = "// in_flight\nfn route(req, c) { /* a /* nested */ print */ \
                   let m = \"timestamp \\\" header\"; let q = '\"'; `${c.hot()} waiting` }";
        let words: Vec<&str> = code_words(src).collect();
        assert_eq!(
            words,
            ["fn", "route", "req", "c", "let", "m", "let", "q", "c", "hot", "waiting"]
        );
    }

    #[test]
    fn scripts_that_read_volatile_inputs_are_not_memoized() {
        let reused = [
            include_str!("../../conf/policies/prefer-hot.rhai"),
            include_str!("../../conf/policies/federated-order.rhai"),
        ];
        for src in reused {
            assert!(RouteMemo::for_source(src).is_ok(), "{src}");
        }
        let run_each_time = [
            include_str!("../../conf/policies/avoid-ending-jobs.rhai"),
            include_str!("../../conf/policies/prefix-affinity.rhai"),
            include_str!("../../conf/policies/reserved-group.rhai"),
        ];
        for src in run_each_time {
            assert!(RouteMemo::for_source(src).is_err(), "{src}");
        }
        for word in VOLATILE {
            let src = format!("fn route(req, c) {{ let x = c.{word}; direct(c) }}");
            assert_eq!(RouteMemo::for_source(&src).err(), Some(*word));
        }
        let by_user = RouteMemo::for_source("fn route(req, c) { if req.in_group(\"g\") {} }");
        assert!(by_user.is_ok_and(|m| m.reads_user));
        let anyone = RouteMemo::for_source("fn route(req, c) { direct(c.hot()) }");
        assert!(anyone.is_ok_and(|m| !m.reads_user));
    }

    fn situation<'a>(user: &'a str, groups: &'a [String]) -> Situation<'a> {
        Situation {
            model: "m",
            endpoint: "chat/completions",
            stream: false,
            batch: false,
            cluster: "",
            framework: "",
            user_id: user,
            username: user,
            domain: "anl.gov",
            groups,
        }
    }

    fn script(source: &str) -> crate::policy::Script {
        crate::policy::Script::compile(std::path::Path::new("t.rhai"), source, super::super::ROUTE)
            .unwrap()
    }

    fn request() -> Arc<crate::policy::RouteRequest> {
        Arc::new(crate::policy::RouteRequest {
            model: "m".into(),
            endpoint: "chat/completions".into(),
            ..Default::default()
        })
    }

    /// The instance a decision names: the script's, run now, or the recalled one.
    fn chosen(all: &[Arc<Deployment>], d: &Decision) -> Option<std::net::SocketAddr> {
        match d {
            Decision::Direct {
                index,
                instance: Some(id),
                ..
            } => all[*index]
                .pool
                .instances()
                .into_iter()
                .find(|(i, _)| i.id() == id)
                .map(|(i, _)| i.socket),
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_reused_decision_chooses_as_the_script_would_on_the_loads_of_its_moment() {
        let all = deployments().await;
        let script = script(include_str!("../../conf/policies/prefer-hot.rhai"));
        let memo = script.memo().unwrap();
        let key = || memo.situation(&situation("u", &[]), &all).unwrap();
        assert!(memo.recall(&key()).is_none(), "nothing decided yet");
        let candidates = crate::policy::candidates_of(&all);
        script
            .route_in(&request(), &candidates, Some(key()))
            .unwrap();
        let mut held = Vec::new();
        let instances: Vec<_> = all.iter().flat_map(|d| d.pool.instances()).collect();
        for step in [0, 1, 2, 0, 1, 3, 4, 0, 2] {
            let fresh = script
                .route(&request(), &crate::policy::candidates_of(&all))
                .unwrap();
            let recalled = match memo.recall(&key()) {
                Some(Recalled::Direct {
                    instance: Some(i), ..
                }) => i.socket,
                _ => panic!("a direct decision was kept"),
            };
            assert_eq!(
                Some(recalled),
                chosen(&all, &fresh),
                "before load step {step}"
            );
            let (i, _) = &instances[step];
            held.push(
                all.iter()
                    .find_map(|d| d.pool.try_acquire_at(i.socket))
                    .unwrap(),
            );
        }
        // The loads moved; the situation did not.
        let loaded = key();
        assert!(memo.recall(&loaded).is_some());
        // An instance that stops serving is a new situation, decided by the script again.
        instances[0].0.set_draining(true);
        let drained = key();
        assert_ne!(drained.bytes, loaded.bytes);
        assert!(memo.recall(&drained).is_none());
    }

    #[tokio::test]
    async fn the_user_is_part_of_the_situation_only_when_the_script_reads_it() {
        let all = deployments().await;
        let groups = ["g".to_string()];
        let by_group = script(
            "fn route(req, c) { if req.in_group(\"g\") { direct(c.in_cluster(\"sophia\")) } else { direct(c) } }",
        );
        let memo = by_group.memo().unwrap();
        let (member, outsider) = (situation("a", &groups), situation("b", &[]));
        let bytes = |memo: &RouteMemo, s| memo.situation(s, &all).unwrap().bytes;
        assert_ne!(bytes(memo, &member), bytes(memo, &outsider));
        let anyone = script("fn route(req, c) { direct(c) }");
        let memo = anyone.memo().unwrap();
        assert_eq!(bytes(memo, &member), bytes(memo, &outsider));
    }

    #[tokio::test]
    async fn a_decision_the_script_turned_into_text_is_not_kept() {
        let all = deployments().await;
        let candidates = crate::policy::candidates_of(&all);
        let shows = script(
            "fn route(req, c) { let d = direct(c); if (\"\" + d).contains(\"127.0.0.1:1\") { reject(503, \"no\") } else { d } }",
        );
        let memo = shows.memo().unwrap();
        let key = || memo.situation(&situation("u", &[]), &all).unwrap();
        shows
            .route_in(&request(), &candidates, Some(key()))
            .unwrap();
        assert!(memo.recall(&key()).is_none());
        // Compute and reject decisions are kept as they are.
        let refuses = script("fn route(req, c) { reject(429, \"later\") }");
        let memo = refuses.memo().unwrap();
        let key = || memo.situation(&situation("u", &[]), &all).unwrap();
        refuses
            .route_in(&request(), &candidates, Some(key()))
            .unwrap();
        assert!(matches!(
            memo.recall(&key()),
            Some(Recalled::Reject { status: 429, .. })
        ));
    }

    /// A name added to the route vocabulary must be classed here: reused decisions would
    /// otherwise ignore what it reads.
    #[test]
    fn every_route_word_is_classed() {
        let engine = include_str!("engine.rs");
        let route_part = &engine[..engine.find("fn register_scale").unwrap()];
        let mut found = 0;
        for call in ["register_get(", "register_fn("] {
            for (at, _) in route_part.match_indices(call) {
                let name = route_part[at + call.len()..].trim_start();
                let name = &name[1..name[1..].find('"').unwrap() + 1];
                found += 1;
                assert!(
                    VOLATILE.contains(&name) || USER.contains(&name) || STABLE.contains(&name),
                    "`{name}` is in the route vocabulary but not classed in policy/memo.rs"
                );
            }
        }
        assert!(found > 30, "found {found} route words in engine.rs");
    }
}
