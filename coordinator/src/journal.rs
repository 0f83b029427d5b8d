//! The farm's writes to the store, made off the farm's lock by one thread,
//! in the order the farm made them, many to a transaction. A build's events
//! are shown to its watchers only once they are written, so a watcher never
//! sees an event that a restart would lose.

use std::sync::Arc;
use std::sync::mpsc;

use tokio::sync::{broadcast, oneshot};

use braid_shared::proto;

use crate::model::{BuildRecord, Delivered};
use crate::store::{Store, Write};

/// Entries written together at most.
const BATCH: usize = 4096;

/// One thing to write (and, for events, then to show).
pub enum Entry {
    Insert {
        record: Box<BuildRecord>,
        spec: Box<proto::BuildSpec>,
    },
    Record(Box<BuildRecord>),
    Events {
        events: Vec<proto::BuildEvent>,
        live: broadcast::Sender<proto::BuildEvent>,
        /// The agent message that made them, stored in the same transaction.
        delivered: Option<(String, Delivered)>,
    },
    Cordon {
        agent: String,
        cordoned: bool,
    },
    /// Answered once everything queued before it is written.
    Flush(oneshot::Sender<()>),
    /// Run once everything queued before it is written (an agent's ack).
    Then(Box<dyn FnOnce() + Send>),
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Entry::Insert { record, .. } => write!(f, "Insert({})", record.id),
            Entry::Record(record) => write!(f, "Record({})", record.id),
            Entry::Events { events, delivered, .. } => write!(f, "Events({}, {delivered:?})", events.len()),
            Entry::Cordon { agent, cordoned } => write!(f, "Cordon({agent}, {cordoned})"),
            Entry::Flush(_) => write!(f, "Flush"),
            Entry::Then(_) => write!(f, "Then"),
        }
    }
}

impl Entry {
    /// What the entry writes, in one transaction.
    fn writes(&self) -> Vec<Write<'_>> {
        match self {
            Entry::Insert { record, spec } => vec![Write::Insert(record, spec)],
            Entry::Record(record) => vec![Write::Record(record)],
            Entry::Events { events, delivered, .. } => {
                let mut writes = vec![Write::Events(events)];
                if let Some((agent, d)) = delivered {
                    writes.push(Write::Delivered(agent, d));
                }
                writes
            }
            Entry::Cordon { agent, cordoned } => vec![Write::Cordon(agent, *cordoned)],
            Entry::Flush(_) | Entry::Then(_) => Vec::new(),
        }
    }
}

/// The queue to the writer thread; the thread ends when this is dropped.
pub struct Journal {
    tx: mpsc::Sender<Entry>,
}

impl Journal {
    pub fn start(store: Arc<Store>) -> std::io::Result<Journal> {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new().name("braid-journal".into()).spawn(move || run(&store, &rx))?;
        Ok(Journal { tx })
    }

    pub fn push(&self, entry: Entry) {
        if self.tx.send(entry).is_err() {
            tracing::error!("the journal's writer is gone; a change was not stored");
        }
    }

    /// Waits until everything queued so far is written (or failed to be).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        self.push(Entry::Flush(tx));
        let _ = rx.await;
    }
}

fn run(store: &Store, rx: &mpsc::Receiver<Entry>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(entry) => batch.push(entry),
                Err(_) => break,
            }
        }
        let writes: Vec<Write<'_>> = batch.iter().flat_map(Entry::writes).collect();
        let written: Vec<bool> = match store.write(&writes) {
            Ok(()) => vec![true; batch.len()],
            // One bad write does not sink the rest of its batch.
            Err(e) => {
                tracing::warn!(error = %e, entries = batch.len(), "writing a batch failed; writing one by one");
                batch.iter().map(|entry| write_one(store, entry)).collect()
            }
        };
        for (entry, written) in batch.into_iter().zip(written) {
            match entry {
                Entry::Events { events, live, .. } if written => {
                    for event in events {
                        // No receiver is fine: nobody is watching.
                        let _ = live.send(event);
                    }
                }
                Entry::Flush(done) => {
                    let _ = done.send(());
                }
                Entry::Then(then) => then(),
                _ => {}
            }
        }
    }
}

fn write_one(store: &Store, entry: &Entry) -> bool {
    let writes = entry.writes();
    if writes.is_empty() {
        return true;
    }
    match store.write(&writes) {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(error = %e, "storing a change of the farm failed; it is not shown to watchers");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64) -> proto::BuildEvent {
        let notice = proto::Notice { platform: String::new(), text: format!("event {seq}") };
        proto::BuildEvent {
            seq,
            build_id: "b1".into(),
            time: None,
            kind: Some(proto::build_event::Kind::Notice(notice)),
        }
    }

    #[tokio::test]
    async fn events_are_shown_once_written_and_a_failed_write_shows_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("braid.db")).unwrap());
        let journal = Journal::start(store.clone()).unwrap();
        let (live, mut watcher) = broadcast::channel(16);
        journal.push(Entry::Events { events: vec![event(1), event(2)], live: live.clone(), delivered: None });
        journal.flush().await;
        let stored: Vec<u64> = store.events_after("b1", 0, 10).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(stored, [1, 2]);
        assert_eq!((watcher.try_recv().unwrap().seq, watcher.try_recv().unwrap().seq), (1, 2));

        // Seq 2 again cannot be stored (one event per number): it is not
        // shown, and a good write queued after it (batched with it or not) is.
        journal.push(Entry::Events { events: vec![event(2)], live: live.clone(), delivered: None });
        journal.push(Entry::Events { events: vec![event(3)], live, delivered: None });
        journal.flush().await;
        assert_eq!(watcher.try_recv().unwrap().seq, 3);
        assert!(watcher.try_recv().is_err(), "the refused event was not shown");
        assert_eq!(store.events_after("b1", 0, 10).unwrap().len(), 3);
    }
}
