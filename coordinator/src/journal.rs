//! The farm's writes to the store, made off the farm's lock by one thread,
//! in the order the farm made them, many to a transaction. A build's events
//! are shown to its watchers only once they are written, so a watcher never
//! sees an event that a restart would lose.

use std::sync::Arc;
use std::sync::mpsc;

use tokio::sync::{broadcast, oneshot};

use braid_shared::proto;

use crate::model::BuildRecord;
use crate::store::{Store, Write};

/// Entries written together at most.
const BATCH: usize = 4096;

/// One thing to write (and, for events, then to show).
#[derive(Debug)]
pub enum Entry {
    Insert {
        record: Box<BuildRecord>,
        spec: Box<proto::BuildSpec>,
    },
    Record(Box<BuildRecord>),
    Events {
        events: Vec<proto::BuildEvent>,
        live: broadcast::Sender<proto::BuildEvent>,
    },
    Cordon {
        agent: String,
        cordoned: bool,
    },
    /// Answered once everything queued before it is written.
    Flush(oneshot::Sender<()>),
}

impl Entry {
    fn write(&self) -> Option<Write<'_>> {
        match self {
            Entry::Insert { record, spec } => Some(Write::Insert(record, spec)),
            Entry::Record(record) => Some(Write::Record(record)),
            Entry::Events { events, .. } => Some(Write::Events(events)),
            Entry::Cordon { agent, cordoned } => Some(Write::Cordon(agent, *cordoned)),
            Entry::Flush(_) => None,
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
        let writes: Vec<Write<'_>> = batch.iter().filter_map(Entry::write).collect();
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
                Entry::Events { events, live } if written => {
                    for event in events {
                        // No receiver is fine: nobody is watching.
                        let _ = live.send(event);
                    }
                }
                Entry::Flush(done) => {
                    let _ = done.send(());
                }
                _ => {}
            }
        }
    }
}

fn write_one(store: &Store, entry: &Entry) -> bool {
    let Some(write) = entry.write() else { return true };
    match store.write(std::slice::from_ref(&write)) {
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
        journal.push(Entry::Events { events: vec![event(1), event(2)], live: live.clone() });
        journal.flush().await;
        let stored: Vec<u64> = store.events_after("b1", 0, 10).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(stored, [1, 2]);
        assert_eq!((watcher.try_recv().unwrap().seq, watcher.try_recv().unwrap().seq), (1, 2));

        // Seq 2 again cannot be stored (one event per number): it is not
        // shown, and a good write queued after it (batched with it or not) is.
        journal.push(Entry::Events { events: vec![event(2)], live: live.clone() });
        journal.push(Entry::Events { events: vec![event(3)], live });
        journal.flush().await;
        assert_eq!(watcher.try_recv().unwrap().seq, 3);
        assert!(watcher.try_recv().is_err(), "the refused event was not shown");
        assert_eq!(store.events_after("b1", 0, 10).unwrap().len(), 3);
    }
}
