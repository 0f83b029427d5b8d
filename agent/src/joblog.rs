//! A job's log on its way to the coordinator, in bounded memory whatever
//! the builder prints.
//!
//! - A builder's output is read in lines of at most `LOG_LINE_BYTES` (the
//!   rest of a longer line is skipped, never buffered), handed over through
//!   a bounded channel (backpressure to the reader), and past the job's cap
//!   (`JOB_LOG_LINES` lines or `JOB_LOG_BYTES` bytes: one-byte lines count)
//!   only counted.
//! - Batches go into the agent's outbox only against a permit of the
//!   agent-wide in-flight budget (`AGENT_LOG_IN_FLIGHT_BYTES`), released
//!   when the coordinator acknowledges the message (`outbox`), so lines
//!   survive a dropped connection and the budget bounds what waits for the
//!   coordinator, however long it is away. Without a permit
//!   a batch waits, up to `JOB_LOG_PENDING_BYTES`; past that lines are
//!   dropped, so a slow or absent coordinator never blocks the builder.
//! - Whatever was dropped is said once, at the end, in a log line with the
//!   counts. Results never go through this budget: they are never dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::{AsyncBufRead, AsyncBufReadExt};
use tokio::sync::{Semaphore, mpsc};

use braid_shared::limits;
use braid_shared::proto::{self, agent_message::Kind as ToCoordinator};

use crate::outbox::Outbox;

/// The agent-wide budget of log bytes queued for the coordinator.
pub fn budget() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(limits::AGENT_LOG_IN_FLIGHT_BYTES))
}

/// What one line costs in memory besides its bytes (String, proto framing).
const LINE_OVERHEAD: usize = 32;
/// Room left under the coordinator's own byte cap for the notice lines,
/// so the coordinator keeps them.
const NOTICE_BYTES: usize = 1024;
/// Lines per message.
const BATCH_LINES: usize = 64;
/// Lines between a builder's output reader and its job's log.
pub const CHANNEL_LINES: usize = 1024;

/// Lines a reader dropped without handing them over (the job's log was
/// already full).
#[derive(Default)]
pub struct Shared {
    full: AtomicBool,
    dropped_lines: AtomicU64,
    dropped_bytes: AtomicU64,
}

/// One job's log.
pub struct JobLog {
    job_id: String,
    attempt: u32,
    outbox: Arc<Outbox>,
    budget: Arc<Semaphore>,
    shared: Arc<Shared>,
    lines: usize,
    bytes: usize,
    batch: Vec<String>,
    batch_cost: usize,
    /// Dropped past the job's cap.
    capped_lines: u64,
    capped_bytes: u64,
    /// Dropped because the coordinator did not take them fast enough.
    slow_lines: u64,
}

impl JobLog {
    pub fn new(a: &proto::Assignment, outbox: Arc<Outbox>, budget: Arc<Semaphore>) -> JobLog {
        JobLog {
            job_id: a.job_id.clone(),
            attempt: a.attempt,
            outbox,
            budget,
            shared: Arc::default(),
            lines: 0,
            bytes: 0,
            batch: Vec::new(),
            batch_cost: 0,
            capped_lines: 0,
            capped_bytes: 0,
            slow_lines: 0,
        }
    }

    /// The state a reader of this job's builder output shares with it.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// One line of the builder's output (already at most `LOG_LINE_BYTES`).
    pub fn push(&mut self, line: String) {
        if self.lines >= limits::JOB_LOG_LINES || self.bytes + line.len() > limits::JOB_LOG_BYTES - NOTICE_BYTES {
            self.shared.full.store(true, Ordering::Relaxed);
            self.capped_lines += 1;
            self.capped_bytes += line.len() as u64;
            return;
        }
        self.lines += 1;
        self.bytes += line.len();
        if self.batch_cost + line.len() + LINE_OVERHEAD > limits::JOB_LOG_PENDING_BYTES {
            // No budget for a while and the batch is as large as it may get.
            self.slow_lines += 1;
            return;
        }
        self.batch_cost += line.len() + LINE_OVERHEAD;
        self.batch.push(line);
        if self.batch.len() >= BATCH_LINES {
            self.flush();
        }
    }

    /// Sends the batch if the in-flight budget allows; else it waits for a
    /// later flush.
    pub fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let cost = u32::try_from(self.batch_cost).unwrap_or(u32::MAX);
        let Ok(permit) = self.budget.clone().try_acquire_many_owned(cost) else { return };
        let lines = std::mem::take(&mut self.batch);
        self.batch_cost = 0;
        let message = log_message(&self.job_id, self.attempt, lines);
        self.outbox.push_with(message, Some(permit));
        if self.batch.capacity() > BATCH_LINES * 2 {
            self.batch.shrink_to(BATCH_LINES);
        }
    }

    /// Sends what is left, and one line saying what was dropped, if
    /// anything was: these go past the budget (a bounded amount).
    pub fn finish(mut self) {
        let mut tail = std::mem::take(&mut self.batch);
        let capped_lines = self.capped_lines + self.shared.dropped_lines.load(Ordering::Relaxed);
        let capped_bytes = self.capped_bytes + self.shared.dropped_bytes.load(Ordering::Relaxed);
        if capped_lines > 0 {
            tail.push(format!(
                "braid: {capped_lines} more log lines ({capped_bytes} bytes) dropped: a job's log is limited to {} lines and {} bytes",
                limits::JOB_LOG_LINES,
                limits::JOB_LOG_BYTES
            ));
        }
        if self.slow_lines > 0 {
            tail.push(format!(
                "braid: {} log lines dropped: the coordinator did not take them as fast as the builder printed them",
                self.slow_lines
            ));
        }
        if !tail.is_empty() {
            self.outbox.push(log_message(&self.job_id, self.attempt, tail));
        }
    }
}

fn log_message(job_id: &str, attempt: u32, lines: Vec<String>) -> proto::AgentMessage {
    proto::AgentMessage {
        kind: Some(ToCoordinator::Log(proto::JobLog { job_id: job_id.to_owned(), attempt, lines })),
        seq: 0,
    }
}

/// Reads `reader` to its end in lines of at most `LOG_LINE_BYTES` (invalid
/// UTF-8 replaced), sending each to `tx`; once the job's log is full, lines
/// are only counted. Keeps reading after `tx` closes, so a writer is never
/// stuck on a full pipe.
pub async fn read_lines(mut reader: impl AsyncBufRead + Unpin, tx: mpsc::Sender<String>, shared: Arc<Shared>) {
    let mut line: Vec<u8> = Vec::new();
    // Inside a line longer than the limit: skip to its end.
    let mut skipping = false;
    loop {
        let chunk = match reader.fill_buf().await {
            Ok(c) if !c.is_empty() => c,
            _ => break,
        };
        let n = chunk.len();
        if shared.full.load(Ordering::Relaxed) {
            let newlines = chunk.iter().filter(|&&b| b == b'\n').count();
            shared.dropped_lines.fetch_add(newlines as u64, Ordering::Relaxed);
            shared.dropped_bytes.fetch_add(n as u64, Ordering::Relaxed);
            reader.consume(n);
            line.clear();
            continue;
        }
        let (taken, end) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i, Some(i + 1)),
            None => (n, None),
        };
        if !skipping {
            let room = limits::LOG_LINE_BYTES.saturating_sub(line.len());
            line.extend_from_slice(&chunk[..taken.min(room)]);
            skipping = taken > room;
        }
        reader.consume(end.unwrap_or(n));
        if end.is_some() {
            skipping = false;
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let text = String::from_utf8_lossy(&line).into_owned();
            line.clear();
            let _ = tx.send(text).await;
        }
    }
    if !line.is_empty() {
        let _ = tx.send(String::from_utf8_lossy(&line).into_owned()).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn assignment() -> proto::Assignment {
        proto::Assignment { job_id: "j".into(), attempt: 1, ..Default::default() }
    }

    /// The lines the outbox holds, acknowledging them.
    fn lines_of(outbox: &Outbox) -> Vec<String> {
        let mut out = Vec::new();
        for m in outbox.after(0) {
            outbox.ack(m.seq);
            if let Some(ToCoordinator::Log(l)) = m.kind {
                out.extend(l.lines);
            }
        }
        out
    }

    #[tokio::test]
    async fn lines_are_cut_and_long_ones_are_never_buffered_whole() {
        let (tx, mut rx) = mpsc::channel(CHANNEL_LINES);
        let long = vec![b'x'; limits::LOG_LINE_BYTES * 3];
        let mut input = b"one\r\n".to_vec();
        input.extend_from_slice(&long);
        input.extend_from_slice(b"\n\xff\nlast");
        let reader = tokio::io::BufReader::with_capacity(1000, &input[..]);
        read_lines(reader, tx, Arc::default()).await;
        let mut got = Vec::new();
        while let Ok(l) = rx.try_recv() {
            got.push(l);
        }
        assert_eq!(got.len(), 4, "{got:?}");
        assert_eq!(got[0], "one");
        assert_eq!(got[1].len(), limits::LOG_LINE_BYTES);
        assert_eq!(got[2], "\u{fffd}");
        assert_eq!(got[3], "last");
    }

    #[tokio::test]
    async fn one_byte_lines_count_against_the_cap_and_the_drop_is_said() {
        let outbox = Arc::new(Outbox::default());
        let mut log = JobLog::new(&assignment(), outbox.clone(), budget());
        let total = limits::JOB_LOG_LINES + 10;
        for _ in 0..total {
            log.push("y".into());
            // The coordinator acknowledges as it goes.
            outbox.ack(u64::MAX);
        }
        assert!(log.shared.full.load(Ordering::Relaxed));
        log.finish();
        let lines = lines_of(&outbox);
        let notice = lines.last().unwrap();
        assert!(notice.starts_with("braid: 10 more log lines (10 bytes) dropped"), "{notice}");
    }

    #[tokio::test]
    async fn without_budget_a_job_holds_a_bounded_batch_and_counts_the_rest() {
        let outbox = Arc::new(Outbox::default());
        let mut log = JobLog::new(&assignment(), outbox.clone(), Arc::new(Semaphore::new(0)));
        for _ in 0..100_000 {
            log.push("y".into());
        }
        assert!(log.batch_cost <= limits::JOB_LOG_PENDING_BYTES);
        assert!(lines_of(&outbox).is_empty(), "nothing is sent without budget");
        log.finish();
        let lines = lines_of(&outbox);
        assert!(lines.last().unwrap().contains("log lines dropped: the coordinator did not take them"), "{lines:?}");
    }
}
