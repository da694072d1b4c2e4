//! State shared by the gateway's replicas, in Redis (`state.redis`): the rate limits and the
//! token verdicts. One multiplexed connection per process (the `redis` crate's
//! `ConnectionManager`, which reconnects with back-off by itself); every call is bounded by
//! `state.redis.timeout`, timed in `firstgate_redis_seconds`, and a failure is counted in
//! `firstgate_redis_errors_total` and logged at most once per interval.

use crate::config::{OnRedisError, RedisConfig};
use crate::metrics::Metrics;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a Redis failure is logged while it lasts (the metric counts every one).
const LOG_INTERVAL: Duration = Duration::from_secs(30);

/// A failed call: Redis refused, the connection is down, or the call timed out.
#[derive(Debug)]
pub struct Unavailable;

/// The shared Redis of the replicas.
pub struct SharedState {
    client: redis::Client,
    /// Made on first use, inside the runtime that serves it (the manager spawns its driver).
    conn: tokio::sync::OnceCell<ConnectionManager>,
    timeout: Duration,
    prefix: String,
    /// What the limits do while Redis cannot answer.
    pub on_error: OnRedisError,
    /// Whether token verdicts are shared too.
    pub auth_verdicts: bool,
    /// How long a request-in-flight slot outlives its replica.
    pub slot_ttl: Duration,
    metrics: Arc<Metrics>,
    started: Instant,
    /// Milliseconds after `started` of the last logged failure (0: never).
    last_logged: AtomicU64,
}

impl SharedState {
    /// Reads the settings; nothing connects until the first call.
    pub fn new(cfg: &RedisConfig, metrics: Arc<Metrics>) -> anyhow::Result<SharedState> {
        let mut info: redis::ConnectionInfo =
            redis::IntoConnectionInfo::into_connection_info(cfg.url.as_str())
                .map_err(|e| anyhow::anyhow!("state.redis.url: {e}"))?;
        if let Some(var) = &cfg.password_env {
            let password = std::env::var(var).map_err(|_| {
                anyhow::anyhow!(
                    "state.redis.password_env: the environment variable {var} is not set; \
                     export Redis's password in it"
                )
            })?;
            let redis = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(redis);
        }
        Ok(SharedState {
            client: redis::Client::open(info)
                .map_err(|e| anyhow::anyhow!("state.redis.url: {e}"))?,
            conn: tokio::sync::OnceCell::new(),
            timeout: cfg.timeout,
            prefix: cfg.prefix.clone(),
            on_error: cfg.on_error,
            auth_verdicts: cfg.auth_verdicts,
            slot_ttl: cfg.slot_ttl,
            metrics,
            started: Instant::now(),
            last_logged: AtomicU64::new(0),
        })
    }

    /// A key under the configured prefix.
    pub fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    async fn connection(&self) -> Result<ConnectionManager, redis::RedisError> {
        let conn = self
            .conn
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout.max(Duration::from_millis(500))))
                    .set_response_timeout(Some(self.timeout))
                    .set_min_delay(Duration::from_millis(100))
                    .set_max_delay(Duration::from_secs(5));
                ConnectionManager::new_lazy_with_config(self.client.clone(), config)
            })
            .await?;
        Ok(conn.clone())
    }

    /// Runs one call (`op` names it in metrics and logs) within the timeout.
    pub async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, Unavailable>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let start = Instant::now();
        let result = tokio::time::timeout(self.timeout, async {
            let conn = self.connection().await?;
            f(conn).await
        })
        .await;
        self.metrics
            .redis_seconds
            .with_label_values(&[op])
            .observe(start.elapsed().as_secs_f64());
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.failed(op, &e.to_string())),
            Err(_) => Err(self.failed(
                op,
                &format!("no answer within {:?} (state.redis.timeout)", self.timeout),
            )),
        }
    }

    fn failed(&self, op: &'static str, why: &str) -> Unavailable {
        self.metrics.redis_errors.with_label_values(&[op]).inc();
        let now = self.started.elapsed().as_millis() as u64 + 1;
        let last = self.last_logged.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= LOG_INTERVAL.as_millis() as u64)
            && self
                .last_logged
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let then = match self.on_error {
                OnRedisError::Open => "limits are counted in this process meanwhile",
                OnRedisError::Closed => "requests under a limit are refused meanwhile",
            };
            log::error!(
                "state.redis: {op} failed: {why}; {then} (state.redis.on_error); tokens are \
                 verified with the identity provider. See firstgate_redis_errors_total; logged \
                 at most every {}s while it lasts",
                LOG_INTERVAL.as_secs()
            );
        }
        Unavailable
    }
}
