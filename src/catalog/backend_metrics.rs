//! What a backend instance says about itself: vLLM's own `/metrics` (requests running and
//! waiting in its scheduler, KV-cache use, prefix-cache queries and hits), read by the backend
//! monitor on an interval, never on the request path. A failed read keeps the last values; their
//! age says how stale they are.
//!
//! vLLM counts every request it holds, including those sent by other gateway replicas, batch
//! jobs or users on the node itself, which this gateway's in-flight counts cannot see.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The figures read from one scrape.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Reported {
    /// `vllm:num_requests_waiting`: requests queued in vLLM's scheduler.
    pub waiting: f64,
    /// `vllm:num_requests_running`: requests in model execution batches.
    pub running: f64,
    /// `vllm:kv_cache_usage_perc` (0..1; `gpu_cache_usage_perc` before vLLM 0.10).
    pub kv_cache: Option<f64>,
    /// `vllm:prefix_cache_queries_total` and `vllm:prefix_cache_hits_total` (prompt tokens
    /// looked up in the prefix cache, and found), counters since the server started.
    pub prefix_queries: Option<f64>,
    pub prefix_hits: Option<f64>,
}

/// Parses Prometheus text exposition (with the `prometheus-parse` crate) into the figures a
/// router uses, summed over vLLM's engines. vLLM's names contain `:`, which the crate does
/// not accept in metric names: they are read as `vllm_...`.
pub fn parse(text: &str) -> Result<Reported, String> {
    let lines = text.lines().map(|l| Ok(l.replace("vllm:", "vllm_")));
    let scrape = prometheus_parse::Scrape::parse(lines).map_err(|e| e.to_string())?;
    let mut out = Reported::default();
    let mut seen = false;
    let (mut kv_sum, mut kv_n) = (0.0, 0u32);
    let (mut old_kv_sum, mut old_kv_n) = (0.0, 0u32);
    for s in &scrape.samples {
        let v = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => continue,
        };
        if !v.is_finite() {
            continue;
        }
        let add = |slot: &mut Option<f64>| *slot = Some(slot.unwrap_or(0.0) + v);
        match s.metric.as_str() {
            "vllm_num_requests_waiting" => {
                out.waiting += v;
                seen = true;
            }
            "vllm_num_requests_running" => {
                out.running += v;
                seen = true;
            }
            "vllm_kv_cache_usage_perc" => {
                kv_sum += v;
                kv_n += 1;
            }
            "vllm_gpu_cache_usage_perc" => {
                old_kv_sum += v;
                old_kv_n += 1;
            }
            "vllm_prefix_cache_queries_total" | "vllm_gpu_prefix_cache_queries_total" => {
                add(&mut out.prefix_queries)
            }
            "vllm_prefix_cache_hits_total" | "vllm_gpu_prefix_cache_hits_total" => {
                add(&mut out.prefix_hits)
            }
            _ => {}
        }
    }
    if !seen {
        return Err("no vllm:num_requests_running or vllm:num_requests_waiting series".into());
    }
    out.kv_cache = match (kv_n, old_kv_n) {
        (0, 0) => None,
        (0, n) => Some(old_kv_sum / f64::from(n)),
        (n, _) => Some(kv_sum / f64::from(n)),
    };
    Ok(out)
}

/// The last figures of an instance, as the policies see them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackendLoad {
    pub waiting: i64,
    pub running: i64,
    /// KV-cache use, 0..1 (absent: not reported).
    pub kv_cache: Option<f64>,
    /// Share of queried prompt tokens found in the prefix cache between the last two scrapes
    /// (absent: no query in between, or not reported).
    pub prefix_hit_rate: Option<f64>,
    /// Time since the last successful scrape.
    pub age: Duration,
}

/// An instance's scraped state: the last good figures and when they were read.
#[derive(Debug, Default)]
pub struct BackendMetrics {
    state: Mutex<ScrapeState>,
}

#[derive(Debug, Default)]
struct ScrapeState {
    last: Option<(Reported, Instant)>,
    hit_rate: Option<f64>,
    /// The last scrape failed (logged once per failure streak).
    failing: bool,
}

impl BackendMetrics {
    /// Records a successful scrape; the prefix hit rate is the delta of the counters since the
    /// previous one (a counter that went back means the server restarted: no rate this time).
    pub fn record(&self, r: Reported) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let previous = st.last.map(|(p, _)| p);
        let delta = |now: Option<f64>, before: Option<f64>| match (now, before) {
            (Some(a), Some(b)) if a >= b => Some(a - b),
            _ => None,
        };
        let queries = delta(r.prefix_queries, previous.and_then(|p| p.prefix_queries));
        let hits = delta(r.prefix_hits, previous.and_then(|p| p.prefix_hits));
        if let (Some(q), Some(h)) = (queries, hits) {
            if q > 0.0 {
                st.hit_rate = Some((h / q).clamp(0.0, 1.0));
            }
        } else if previous.is_some() {
            st.hit_rate = None;
        }
        st.last = Some((r, Instant::now()));
        st.failing = false;
    }

    /// Records a failed scrape (the last figures stay, ageing); returns whether this starts a
    /// streak of failures.
    pub fn failed(&self) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        !std::mem::replace(&mut st.failing, true)
    }

    /// The last figures, if a scrape ever succeeded.
    pub fn load(&self) -> Option<BackendLoad> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (r, at) = st.last?;
        Some(BackendLoad {
            waiting: r.waiting.round() as i64,
            running: r.running.round() as i64,
            kv_cache: r.kv_cache,
            prefix_hit_rate: st.hit_rate,
            age: at.elapsed(),
        })
    }
}

/// Reads `url` within `timeout` and parses it.
pub async fn scrape(
    client: &reqwest::Client,
    url: &str,
    timeout: Duration,
) -> Result<Reported, String> {
    let read = async {
        let resp = client.get(url).send().await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status()));
        }
        resp.text().await.map_err(|e| e.to_string())
    };
    let text = tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))??;
    parse(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape vLLM 0.11 serves (see reference/vllm-transcripts/metrics-excerpt.txt).
    const VLLM: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny"} 2.0
# HELP vllm:num_requests_waiting_by_reason Number of waiting requests by reason.
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny",reason="capacity"} 2.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.25
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="tiny"} 1000.0
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="tiny"} 600.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="tiny"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="tiny"} 4.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="tiny"} 4.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="tiny"} 0.5
"#;

    #[test]
    fn reads_vllms_series() {
        let r = parse(VLLM).unwrap();
        assert_eq!((r.running, r.waiting), (3.0, 2.0));
        assert_eq!(r.kv_cache, Some(0.25));
        assert_eq!(
            (r.prefix_queries, r.prefix_hits),
            (Some(1000.0), Some(600.0))
        );
    }

    #[test]
    fn sums_engines_and_reads_older_names() {
        let text = "vllm:num_requests_waiting{engine=\"0\"} 1\n\
                    vllm:num_requests_waiting{engine=\"1\"} 4\n\
                    vllm:num_requests_running{engine=\"0\"} 0\n\
                    vllm:gpu_cache_usage_perc{engine=\"0\"} 0.5\n";
        let r = parse(text).unwrap();
        assert_eq!(r.waiting, 5.0);
        assert_eq!(r.kv_cache, Some(0.5));
        assert_eq!(r.prefix_queries, None);
    }

    #[test]
    fn text_without_vllms_series_is_an_error() {
        assert!(parse("up 1\n").is_err());
        assert!(parse("<html>not found</html>").is_err());
    }

    #[test]
    fn the_hit_rate_is_over_the_last_interval_and_failures_keep_values() {
        let m = BackendMetrics::default();
        assert!(m.load().is_none());
        let at = |q: f64, h: f64| Reported {
            prefix_queries: Some(q),
            prefix_hits: Some(h),
            waiting: 1.0,
            ..Reported::default()
        };
        m.record(at(100.0, 10.0));
        assert_eq!(m.load().unwrap().prefix_hit_rate, None);
        m.record(at(300.0, 190.0));
        assert_eq!(m.load().unwrap().prefix_hit_rate, Some(0.9));
        // No query in between: the last rate stands.
        m.record(at(300.0, 190.0));
        assert_eq!(m.load().unwrap().prefix_hit_rate, Some(0.9));
        assert!(m.failed(), "the first failure starts a streak");
        assert!(!m.failed());
        let kept = m.load().unwrap();
        assert_eq!(kept.waiting, 1);
        std::thread::sleep(Duration::from_millis(5));
        assert!(m.load().unwrap().age > kept.age);
        // A restarted server's counters start again: no rate from that pair.
        m.record(at(5.0, 0.0));
        assert_eq!(m.load().unwrap().prefix_hit_rate, None);
    }
}
