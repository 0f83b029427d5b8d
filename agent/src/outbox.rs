//! What jobs say to the coordinator (logs, progress, results), kept until
//! the coordinator acknowledges it.
//!
//! Invariant: a message leaves the outbox only when the coordinator has
//! acknowledged its number (`Ack { up_to }`, sent once what the message
//! changed is stored). A connection only reads the outbox from its own
//! cursor, so what a dying connection had queued is still here and the next
//! session sends it again, in order; the coordinator applies each number
//! once. Numbers count within this agent process (`incarnation`).
//!
//! Log messages carry a permit of the agent's log budget (`joblog`), given
//! back when they are acknowledged, so the outbox stays bounded however long
//! the coordinator is away; results and progress are a few per job.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::{Notify, OwnedSemaphorePermit};

use braid_shared::proto::{self, agent_message::Kind as ToCoordinator};

struct Entry {
    message: proto::AgentMessage,
    /// Held, not read: dropping it gives the bytes back to the log budget.
    _permit: Option<OwnedSemaphorePermit>,
}

#[derive(Default)]
struct Inner {
    /// The number the last pushed message got.
    last_seq: u64,
    /// Unacknowledged messages, oldest first, numbered consecutively.
    queue: VecDeque<Entry>,
}

/// The agent's outbox, shared by its jobs and its sessions.
#[derive(Default)]
pub struct Outbox {
    inner: Mutex<Inner>,
    pushed: Notify,
}

impl Outbox {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every change below is one push or pop: nothing is half-done on a panic.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a message; returns its number.
    pub fn push(&self, message: proto::AgentMessage) -> u64 {
        self.push_with(message, None)
    }

    /// Queues a message holding `permit` until it is acknowledged.
    pub fn push_with(&self, mut message: proto::AgentMessage, permit: Option<OwnedSemaphorePermit>) -> u64 {
        let seq = {
            let mut inner = self.inner();
            inner.last_seq += 1;
            message.seq = inner.last_seq;
            inner.queue.push_back(Entry { message, _permit: permit });
            inner.last_seq
        };
        self.pushed.notify_one();
        seq
    }

    /// Copies of the queued messages numbered after `sent`, in order.
    pub fn after(&self, sent: u64) -> Vec<proto::AgentMessage> {
        let inner = self.inner();
        inner.queue.iter().filter(|e| e.message.seq > sent).map(|e| e.message.clone()).collect()
    }

    /// Forgets the messages numbered up to `up_to`; returns how many.
    pub fn ack(&self, up_to: u64) -> usize {
        let mut inner = self.inner();
        let before = inner.queue.len();
        while inner.queue.front().is_some_and(|e| e.message.seq <= up_to) {
            inner.queue.pop_front();
        }
        before - inner.queue.len()
    }

    /// Waits until a message is pushed (returns at once if one was pushed
    /// since the last wait).
    pub async fn pushed(&self) {
        self.pushed.notified().await;
    }

    /// Jobs whose results are not acknowledged yet: the coordinator keeps
    /// their leases.
    pub fn unacknowledged_results(&self) -> Vec<proto::RunningJob> {
        self.inner()
            .queue
            .iter()
            .filter_map(|e| match &e.message.kind {
                Some(ToCoordinator::Result(r)) => Some(proto::RunningJob {
                    job_id: r.job_id.clone(),
                    attempt: r.attempt,
                    lease_id: r.lease_id.clone(),
                }),
                _ => None,
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.inner().queue.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Arc;

    use super::*;

    fn log(line: &str) -> proto::AgentMessage {
        let log = proto::JobLog { job_id: "j".into(), attempt: 1, lines: vec![line.into()] };
        proto::AgentMessage { kind: Some(ToCoordinator::Log(log)), seq: 0 }
    }

    fn lines(messages: &[proto::AgentMessage]) -> Vec<String> {
        messages
            .iter()
            .flat_map(|m| match &m.kind {
                Some(ToCoordinator::Log(l)) => l.lines.clone(),
                _ => Vec::new(),
            })
            .collect()
    }

    #[tokio::test]
    async fn messages_stay_until_acknowledged_and_are_resent_in_order() {
        let outbox = Outbox::default();
        let budget = Arc::new(tokio::sync::Semaphore::new(10));
        for n in 1..=5 {
            let permit = budget.clone().try_acquire_many_owned(2).unwrap();
            assert_eq!(outbox.push_with(log(&n.to_string()), Some(permit)), n);
        }
        assert_eq!(budget.available_permits(), 0);
        // A first connection sends all five and dies with only two acknowledged.
        let first = outbox.after(0);
        assert_eq!(first.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
        assert_eq!(outbox.ack(2), 2);
        assert_eq!(budget.available_permits(), 4, "the budget comes back on ack");
        // The next connection starts from its own cursor: 3, 4, 5 again.
        outbox.push(proto::AgentMessage {
            kind: Some(ToCoordinator::Result(proto::JobResult { job_id: "j".into(), ..Default::default() })),
            seq: 0,
        });
        let second = outbox.after(0);
        assert_eq!(lines(&second), ["3", "4", "5"]);
        assert_eq!(second.last().unwrap().seq, 6);
        assert_eq!(outbox.unacknowledged_results().len(), 1);
        // A stale or repeated ack changes nothing; one past everything empties it.
        assert_eq!(outbox.ack(1), 0);
        assert_eq!(outbox.ack(6), 4);
        assert_eq!(outbox.len(), 0);
        assert!(outbox.unacknowledged_results().is_empty());
        assert_eq!(budget.available_permits(), 10);
        // The pushes left a wake-up for the session.
        tokio::time::timeout(std::time::Duration::from_secs(1), outbox.pushed()).await.unwrap();
    }
}
