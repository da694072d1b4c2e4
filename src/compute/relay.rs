//! True token streaming for cold models, as FIRST does it: the gateway hands FIRST's inference
//! function a task id, a random per-task token and its own address; the function streams from
//! vLLM on the compute node and POSTs the lines back to `/resource_server/api/streaming/
//! {data,error,done}/` with the shared secret (`X-Internal-Secret`) and the task's token
//! (`X-Stream-Task-Token`). This is the registry those posts are delivered through, to the
//! client waiting for that task. Secrets and tokens are compared in constant time; a wrong
//! token is refused and never reaches another task.
//!
//! With `state.redis`, a post for a task that waits on another replica goes through Redis
//! (`relay_redis`); without it, one process holds every stream, in memory.

use super::relay_redis::{token_digest, RedisRelay};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, Notify};

/// How often a replica looks in Redis for lines posted to others (FIRST polls every 25 ms).
const POLL: Duration = Duration::from_millis(25);

/// Largest `data/` body accepted (FIRST's own cap), and of `error/` and `done/`.
pub const MAX_DATA_BODY: usize = 150 * 1024;
pub const MAX_CONTROL_BODY: usize = 15 * 1024;

/// Posts a waiting client may fall behind by before more are refused (the function counts a
/// refused post as failed and goes on).
const QUEUE: usize = 1024;

/// Which of the three routes a post came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayKind {
    Data,
    Error,
    Done,
}

impl RelayKind {
    /// The last path segment (`data`, `error`, `done`).
    pub fn from_segment(s: &str) -> Option<RelayKind> {
        match s {
            "data" => Some(RelayKind::Data),
            "error" => Some(RelayKind::Error),
            "done" => Some(RelayKind::Done),
            _ => None,
        }
    }

    /// Largest body this route accepts.
    pub fn max_body(self) -> usize {
        match self {
            RelayKind::Data => MAX_DATA_BODY,
            _ => MAX_CONTROL_BODY,
        }
    }
}

/// What the function sent for a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEvent {
    /// Raw SSE lines from vLLM, joined by `\n` (blank lines dropped).
    Data(String),
    Error(String),
    Done,
}

/// Why a post was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayRefusal {
    /// No or a wrong `X-Internal-Secret` (401).
    Secret,
    /// No or a wrong `X-Stream-Task-Token` for this task (403).
    Token,
    /// No client waits for this task (any more) (404).
    UnknownTask,
    /// The waiting client is too far behind (503).
    Behind,
    /// The body is not what the function sends (400).
    Body(String),
    /// The task is not here and the replicas' Redis cannot say where it is (503).
    Unavailable,
}

/// Tasks whose clients wait for their lines.
pub struct StreamRelay {
    secret: String,
    tasks: Mutex<HashMap<String, Waiting>>,
    /// The replicas' Redis, when they share streams.
    shared: Option<RedisRelay>,
    /// Whether the poller of Redis runs, and what wakes it when a task starts waiting.
    polling: AtomicBool,
    wake: Notify,
}

struct Waiting {
    token: String,
    tx: mpsc::Sender<RelayEvent>,
    /// Registered in Redis: every post for it, to this replica too, goes through the task's
    /// list there, so that posts landing on different replicas stay in order and `done`
    /// cannot overtake lines still on their way through another replica.
    shared: bool,
}

/// One task's place in the relay; leaving it (dropping) refuses later posts for the task.
pub struct RelayTicket {
    pub task_id: String,
    pub token: String,
    pub events: mpsc::Receiver<RelayEvent>,
    relay: Arc<StreamRelay>,
}

impl Drop for RelayTicket {
    fn drop(&mut self) {
        self.relay.lock().remove(&self.task_id);
        if self.relay.shared.is_some() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let (relay, task) = (self.relay.clone(), self.task_id.clone());
                rt.spawn(async move {
                    if let Some(shared) = &relay.shared {
                        shared.forget(&task).await;
                    }
                });
            }
        }
    }
}

impl StreamRelay {
    /// A relay checking posts against the shared `secret` (the compute endpoints'
    /// `INTERNAL_STREAMING_SECRET`).
    pub fn new(secret: String) -> Arc<StreamRelay> {
        Self::with_shared(secret, None)
    }

    /// A relay whose tasks may be posted to any replica sharing `shared`'s Redis.
    pub fn with_shared(secret: String, shared: Option<RedisRelay>) -> Arc<StreamRelay> {
        Arc::new(StreamRelay {
            secret,
            tasks: Mutex::new(HashMap::new()),
            shared,
            polling: AtomicBool::new(false),
            wake: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Waiting>> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new task id and token, and the receiver of its events; with Redis, registered there
    /// before the task is submitted, so a post to another replica finds it.
    pub async fn open(self: &Arc<Self>) -> RelayTicket {
        let ticket = self.open_here();
        if let Some(shared) = &self.shared {
            match shared
                .register(&ticket.task_id, &token_digest(ticket.token.as_bytes()))
                .await
            {
                Ok(()) => {
                    if let Some(w) = self.lock().get_mut(&ticket.task_id) {
                        w.shared = true;
                    }
                }
                Err(_) => log::warn!(
                    "cold stream {}: not registered in Redis; only posts to this replica reach it",
                    ticket.task_id
                ),
            }
            if !self.polling.swap(true, Ordering::SeqCst) {
                tokio::spawn(self.clone().poll_forever());
            }
            self.wake.notify_one();
        }
        ticket
    }

    /// Moves the events other replicas received for this one's tasks to their clients.
    async fn poll_forever(self: Arc<Self>) {
        let Some(shared) = &self.shared else { return };
        loop {
            // Only as many events as each client's queue has room for: the rest stay in Redis
            // until it reads (the poller is the only sender of a shared task's events).
            let tasks: Vec<(String, usize)> = self
                .lock()
                .iter()
                .filter(|(_, w)| w.shared)
                .map(|(task, w)| (task.clone(), w.tx.capacity()))
                .collect();
            if tasks.is_empty() {
                self.wake.notified().await;
                continue;
            }
            if let Ok(found) = shared.drain(&tasks).await {
                let waiting = self.lock();
                for (task, events) in found {
                    let Some(w) = waiting.get(&task) else {
                        continue;
                    };
                    for e in events {
                        if w.tx.try_send(e).is_err() {
                            log::warn!("cold stream {task}: a relayed batch found no room");
                        }
                    }
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// A task registered in this process only.
    fn open_here(self: &Arc<Self>) -> RelayTicket {
        let task_id = super::uuid();
        // The token is a credential: from the operating system's CSPRNG.
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).expect("the operating system's random source");
        let token = hex::encode(secret);
        let (tx, events) = mpsc::channel(QUEUE);
        self.lock().insert(
            task_id.clone(),
            Waiting {
                token: token.clone(),
                tx,
                shared: false,
            },
        );
        RelayTicket {
            task_id,
            token,
            events,
            relay: self.clone(),
        }
    }

    /// Tasks waiting now.
    pub fn waiting(&self) -> usize {
        self.lock().len()
    }

    /// Whether `given` is the shared secret.
    pub fn secret_matches(&self, given: Option<&[u8]>) -> bool {
        given.is_some_and(|g| bool::from(g.ct_eq(self.secret.as_bytes())))
    }

    /// Delivers a post's body (`{"task_id", "data"|"error", "type"}`) to its task: here if
    /// it waits here, else through Redis to the replica where it waits.
    pub async fn deliver(
        &self,
        kind: RelayKind,
        token: Option<&[u8]>,
        body: &[u8],
    ) -> Result<(), RelayRefusal> {
        #[derive(Deserialize)]
        struct Post {
            task_id: String,
            #[serde(default)]
            data: Option<String>,
            #[serde(default)]
            error: Option<String>,
        }
        let post: Post =
            serde_json::from_slice(body).map_err(|e| RelayRefusal::Body(e.to_string()))?;
        let event = match kind {
            RelayKind::Data => RelayEvent::Data(
                post.data
                    .ok_or_else(|| RelayRefusal::Body("`data` is missing".into()))?,
            ),
            RelayKind::Error => RelayEvent::Error(post.error.unwrap_or_default()),
            RelayKind::Done => RelayEvent::Done,
        };
        if let Some(waiting) = self.lock().get(&post.task_id) {
            let token_ok = token.is_some_and(|t| bool::from(t.ct_eq(waiting.token.as_bytes())));
            if !token_ok {
                return Err(RelayRefusal::Token);
            }
            if !waiting.shared {
                return waiting.tx.try_send(event).map_err(|e| match e {
                    mpsc::error::TrySendError::Full(_) => RelayRefusal::Behind,
                    mpsc::error::TrySendError::Closed(_) => RelayRefusal::UnknownTask,
                });
            }
        }
        let Some(shared) = &self.shared else {
            return Err(RelayRefusal::UnknownTask);
        };
        // Redis checks the token (its digest) where it appends, in one step: a task that ended
        // meanwhile takes nothing.
        let digest = token.map(token_digest).unwrap_or_default();
        shared.push(&post.task_id, &digest, &event).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(task: &str, data: &str) -> Vec<u8> {
        serde_json::json!({"task_id": task, "data": data, "type": "data"})
            .to_string()
            .into_bytes()
    }

    #[tokio::test]
    async fn lines_reach_their_task_and_a_wrong_token_reaches_nothing() {
        let relay = StreamRelay::new("s3cret".into());
        let mut a = relay.open().await;
        let mut b = relay.open().await;
        assert!(relay.secret_matches(Some(b"s3cret")));
        assert!(!relay.secret_matches(Some(b"s3cre")));
        assert!(!relay.secret_matches(None));

        let ok = relay
            .deliver(
                RelayKind::Data,
                Some(a.token.as_bytes()),
                &post(&a.task_id, "x"),
            )
            .await;
        assert_eq!(ok, Ok(()));
        assert_eq!(a.events.try_recv().unwrap(), RelayEvent::Data("x".into()));
        // B's token for A's task, and no token: refused, and A receives nothing.
        let wrong = relay
            .deliver(
                RelayKind::Data,
                Some(b.token.as_bytes()),
                &post(&a.task_id, "y"),
            )
            .await;
        assert_eq!(wrong, Err(RelayRefusal::Token));
        let none = relay
            .deliver(RelayKind::Data, None, &post(&a.task_id, "y"))
            .await;
        assert_eq!(none, Err(RelayRefusal::Token));
        assert!(a.events.try_recv().is_err());
        assert!(b.events.try_recv().is_err());

        let done = serde_json::json!({"task_id": b.task_id, "type": "done"}).to_string();
        relay
            .deliver(RelayKind::Done, Some(b.token.as_bytes()), done.as_bytes())
            .await
            .unwrap();
        assert_eq!(b.events.try_recv().unwrap(), RelayEvent::Done);

        // A client gone: its task is unknown from then on.
        let id = a.task_id.clone();
        let token = a.token.clone();
        drop(a);
        assert_eq!(
            relay
                .deliver(RelayKind::Data, Some(token.as_bytes()), &post(&id, "z"))
                .await,
            Err(RelayRefusal::UnknownTask)
        );
        assert_eq!(relay.waiting(), 1);
        assert!(matches!(
            relay.deliver(RelayKind::Data, None, b"{}").await,
            Err(RelayRefusal::Body(_))
        ));
    }
}
