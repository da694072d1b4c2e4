//! The stream relay across replicas (`state.redis`), as FIRST keeps relayed lines in Redis: a
//! compute node posts a stream's lines to the advertised host, which may send them to any
//! replica. The replica holding the client registers the task's token (its SHA-256, never the
//! token) under `{prefix}stream:{task}:token`; a replica that gets a post for a task not
//! waiting there checks the token against it and appends the event to the list
//! `{prefix}stream:{task}:events`; the holder drains its tasks' lists, all in one pipelined
//! call per tick (FIRST polls every 25 ms). Keys expire like the shared limits' (set with a
//! time to live on every write), so a replica that dies leaves nothing behind for long. The
//! token check and the append are one script, so a post that arrives after the holder forgot
//! the task is refused instead of making its list again.

use super::relay::{RelayEvent, RelayRefusal};
use crate::state::{SharedState, Unavailable};
use redis::Script;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

/// Events taken from one task's list per tick.
const DRAIN: usize = 64;

/// Appends ARGV[2] to the list KEYS[2] (its time to live renewed to ARGV[3] ms) if the task's
/// token key KEYS[1] holds the digest ARGV[1]: 1 when appended, 0 when the task is gone, -1
/// when the digest differs. (Lua's strings are interned: `~=` compares references, not bytes.)
static PUSH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local stored = redis.call('GET', KEYS[1])
if not stored then return 0 end
if stored ~= ARGV[1] then return -1 end
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
",
    )
});

/// A relay's view of the replicas' Redis.
pub struct RedisRelay {
    state: Arc<SharedState>,
    /// How long a task's keys live (renewed on each write): the longest a stream can wait.
    ttl: Duration,
}

/// The SHA-256 of a task token, as stored.
pub fn token_digest(token: &[u8]) -> String {
    hex::encode(Sha256::digest(token))
}

fn encode(event: &RelayEvent) -> String {
    match event {
        RelayEvent::Data(lines) => json!({"data": lines}),
        RelayEvent::Error(message) => json!({"error": message}),
        RelayEvent::Done => json!({"done": true}),
    }
    .to_string()
}

fn decode(text: &str) -> Option<RelayEvent> {
    let v: Value = serde_json::from_str(text).ok()?;
    if let Some(d) = v["data"].as_str() {
        Some(RelayEvent::Data(d.to_string()))
    } else if let Some(e) = v["error"].as_str() {
        Some(RelayEvent::Error(e.to_string()))
    } else {
        v.get("done").map(|_| RelayEvent::Done)
    }
}

impl RedisRelay {
    pub fn new(state: Arc<SharedState>, ttl: Duration) -> RedisRelay {
        RedisRelay { state, ttl }
    }

    fn token_key(&self, task: &str) -> String {
        self.state.key(&format!("stream:{task}:token"))
    }

    fn events_key(&self, task: &str) -> String {
        self.state.key(&format!("stream:{task}:events"))
    }

    fn ttl_ms(&self) -> u64 {
        self.ttl.as_millis() as u64
    }

    /// Registers a task waiting on this replica, by its token's digest.
    pub async fn register(&self, task: &str, digest: &str) -> Result<(), Unavailable> {
        let (key, digest, ttl) = (self.token_key(task), digest.to_string(), self.ttl_ms());
        self.state
            .call("relay_register", |mut conn| async move {
                redis::cmd("SET")
                    .arg(&key)
                    .arg(&digest)
                    .arg("PX")
                    .arg(ttl)
                    .query_async::<()>(&mut conn)
                    .await
            })
            .await
    }

    /// Appends an event for the replica holding the task, if `digest` is its token's: refused
    /// as an unknown task when it is no longer registered (it ended, or its keys expired), and
    /// then nothing is stored.
    pub async fn push(
        &self,
        task: &str,
        digest: &str,
        event: &RelayEvent,
    ) -> Result<(), RelayRefusal> {
        let (token, events) = (self.token_key(task), self.events_key(task));
        let (text, ttl) = (encode(event), self.ttl_ms());
        let pushed = self
            .state
            .call("relay_push", |mut conn| async move {
                PUSH.key(&token)
                    .key(&events)
                    .arg(digest)
                    .arg(&text)
                    .arg(ttl)
                    .invoke_async::<i64>(&mut conn)
                    .await
            })
            .await
            .map_err(|_| RelayRefusal::Unavailable)?;
        match pushed {
            1 => Ok(()),
            0 => Err(RelayRefusal::UnknownTask),
            _ => Err(RelayRefusal::Token),
        }
    }

    /// The events posted for `tasks`, oldest first: at most the room given for each.
    pub async fn drain(
        &self,
        tasks: &[(String, usize)],
    ) -> Result<Vec<(String, Vec<RelayEvent>)>, Unavailable> {
        // A task with no room takes nothing this round (its events wait in Redis).
        let tasks: Vec<(&String, usize)> = tasks
            .iter()
            .filter(|(_, room)| *room > 0)
            .map(|(t, room)| (t, (*room).min(DRAIN)))
            .collect();
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        let pops: Vec<(String, usize)> = tasks
            .iter()
            .map(|(t, n)| (self.events_key(t), *n))
            .collect();
        let lists = self
            .state
            .call("relay_poll", |mut conn| async move {
                let mut pipe = redis::pipe();
                for (k, n) in &pops {
                    pipe.cmd("LPOP").arg(k).arg(*n);
                }
                pipe.query_async::<Vec<Option<Vec<String>>>>(&mut conn)
                    .await
            })
            .await?;
        Ok(tasks
            .iter()
            .zip(lists)
            .filter_map(|((task, _), list)| {
                let events: Vec<RelayEvent> = list?.iter().filter_map(|e| decode(e)).collect();
                (!events.is_empty()).then(|| ((*task).clone(), events))
            })
            .collect())
    }

    /// Removes a finished task's keys.
    pub async fn forget(&self, task: &str) {
        let keys = [self.token_key(task), self.events_key(task)];
        let _ = self
            .state
            .call("relay_forget", |mut conn| async move {
                redis::cmd("DEL")
                    .arg(&keys[..])
                    .query_async::<i64>(&mut conn)
                    .await
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_survive_the_list() {
        for e in [
            RelayEvent::Data("data: {}\ndata: {\"a\":1}".into()),
            RelayEvent::Error("API request failed".into()),
            RelayEvent::Done,
        ] {
            assert_eq!(decode(&encode(&e)), Some(e));
        }
        assert_ne!(token_digest(b"a"), token_digest(b"b"));
    }
}
