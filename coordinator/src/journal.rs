//! The farm's writes to the store, made off the farm's lock by one thread,
//! in the order the farm made them, many to a transaction. A build's events
//! are shown to its watchers only once they are written, so a watcher never
//! sees an event that a restart would lose.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, oneshot};

use braid_shared::proto;

use crate::disk::DataDir;
use crate::error::CoordinatorError;
use crate::model::{BuildRecord, Delivered};
use crate::store::Write;
use crate::stores::{self as store, Store};

/// Entries written together at most.
const BATCH: usize = 4096;

/// Waits between tries of a write the disk refused: from the first to the
/// last, doubling.
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// One write of a change.
#[derive(Debug)]
pub enum Item {
    /// A build's record as it now is.
    Record(Box<BuildRecord>),
    /// A build's events, shown to its watchers once written.
    Events {
        events: Vec<proto::BuildEvent>,
        live: broadcast::Sender<proto::BuildEvent>,
        /// The agent message that made them, stored in the same transaction
        /// so a restart neither loses nor repeats them.
        delivered: Option<(String, Delivered)>,
    },
    Cordon {
        agent: String,
        cordoned: bool,
    },
    Builder {
        agent: String,
        builder: Option<crate::model::Builder>,
    },
    Declared {
        agent: String,
        declared: Option<crate::model::Declared>,
    },
    Footprint {
        key: String,
        footprint: crate::model::Footprint,
        now_ms: i64,
    },
}

/// One thing to write (and, for events, then to show).
pub enum Entry {
    /// What one transition of the farm changed: written in one
    /// transaction, so a build's record and its events never part.
    Change(Vec<Item>),
    /// Answered once everything queued before it is written.
    Flush(oneshot::Sender<()>),
    /// Run once everything queued before it is written (an agent's ack).
    Then(Box<dyn FnOnce() + Send>),
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Entry::Change(items) => f.debug_tuple("Change").field(items).finish(),
            Entry::Flush(_) => f.write_str("Flush"),
            Entry::Then(_) => f.write_str("Then"),
        }
    }
}

impl Entry {
    fn writes(&self) -> Vec<Write<'_>> {
        let Entry::Change(items) = self else { return Vec::new() };
        let mut writes = Vec::with_capacity(items.len());
        for item in items {
            match item {
                Item::Record(record) => writes.push(Write::Record(record)),
                Item::Events { events, delivered, .. } => {
                    writes.push(Write::Events(events));
                    if let Some((agent, d)) = delivered {
                        writes.push(Write::Delivered(agent, d));
                    }
                }
                Item::Cordon { agent, cordoned } => writes.push(Write::Cordon(agent, *cordoned)),
                Item::Builder { agent, builder } => writes.push(Write::Builder(agent, builder.as_ref())),
                Item::Declared { agent, declared } => writes.push(Write::Declared(agent, declared.as_ref())),
                Item::Footprint { key, footprint, now_ms } => writes.push(Write::Footprint(key, footprint, *now_ms)),
            }
        }
        writes
    }
}

/// The records of unfinished builds as last stored: what `Get` and `List`
/// show, so while the disk is full no client sees a state that a restart
/// would take back. Finished builds leave it (their record no longer
/// changes), so it holds at most the unfinished ones.
#[derive(Default)]
pub struct Stored(Mutex<HashMap<String, BuildRecord>>);

impl Stored {
    /// `record` is stored.
    pub fn note(&self, record: &BuildRecord) {
        let mut map = self.lock();
        if record.status.is_terminal() {
            map.remove(&record.id);
        } else {
            map.insert(record.id.clone(), record.clone());
        }
    }

    /// Stored records by build id; a build not in it is stored as it is in
    /// memory (finished, or unchanged since it was stored).
    pub fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, BuildRecord>> {
        // A map of clones: whole after any panic.
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The queue to the writer thread; the thread ends when this is dropped.
///
/// Memory runs ahead of the database here, by design: the farm changes
/// under its lock and the writes follow on this thread, so no transition
/// waits for a disk. What keeps the two from disagreeing in a way a restart
/// could show is that nothing leaves the coordinator before it is written
/// (events reach watchers after their commit; `Get` and `List` show the
/// last stored records, `Stored`; a build id is handed out after its row is
/// stored, `Coordinator::submit`; cancels and cordons are answered after
/// `Coordinator::stored`), and that a write the disk refuses (full, failing) is retried until
/// it commits, never skipped: the database gets every change, in order,
/// whole, so event numbers stay contiguous and a record always matches its
/// events. Only a change SQLite refuses for itself (a constraint, which is
/// a bug) is dropped, loudly.
pub struct Journal {
    tx: mpsc::Sender<Entry>,
}

impl Journal {
    pub fn start(store: Arc<Store>, disk: Arc<DataDir>, stored: Arc<Stored>) -> std::io::Result<Journal> {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new().name("braid-journal".into()).spawn(move || run(&store, &disk, &stored, &rx))?;
        Ok(Journal { tx })
    }

    pub fn push(&self, entry: Entry) {
        if self.tx.send(entry).is_err() {
            tracing::error!("the journal's writer is gone; a change was not stored");
        }
    }

    /// Waits until everything queued so far is written (or refused as bad).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        self.push(Entry::Flush(tx));
        let _ = rx.await;
    }
}

fn run(store: &Store, disk: &DataDir, stored: &Stored, rx: &mpsc::Receiver<Entry>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(entry) => batch.push(entry),
                Err(_) => break,
            }
        }
        let writes: Vec<Write<'_>> = batch.iter().flat_map(Entry::writes).collect();
        let written: Vec<bool> = match retrying(store, disk, &writes) {
            Ok(()) => vec![true; batch.len()],
            // One bad change does not sink the rest of its batch.
            Err(e) => {
                tracing::warn!(error = %e, entries = batch.len(), "writing a batch failed; writing one by one");
                batch.iter().map(|entry| write_one(store, disk, entry)).collect()
            }
        };
        for (entry, written) in batch.into_iter().zip(written) {
            match entry {
                Entry::Change(items) if written => {
                    // Records first: a client that sees an event and asks
                    // for its build finds at least that state.
                    for item in &items {
                        if let Item::Record(record) = item {
                            stored.note(record);
                        }
                    }
                    for item in items {
                        if let Item::Events { events, live, .. } = item {
                            for event in events {
                                // No receiver is fine: nobody is watching.
                                let _ = live.send(event);
                            }
                        }
                    }
                }
                Entry::Flush(done) => {
                    let _ = done.send(());
                }
                Entry::Then(then) => then(),
                Entry::Change(_) => {}
            }
        }
    }
}

fn write_one(store: &Store, disk: &DataDir, entry: &Entry) -> bool {
    match retrying(store, disk, &entry.writes()) {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(error = %e, "the store refused a change of the farm; it is not shown to watchers");
            false
        }
    }
}

/// Writes in one transaction, waiting out what is the disk's fault (full,
/// failing, locked) for as long as it lasts; returns only once written, or
/// with an error that is the change's own.
fn retrying(store: &Store, disk: &DataDir, writes: &[Write<'_>]) -> Result<(), CoordinatorError> {
    if writes.is_empty() {
        return Ok(());
    }
    let mut wait = RETRY_FIRST;
    let mut failures: u64 = 0;
    loop {
        match store.write(writes) {
            Ok(()) => {
                if failures > 0 {
                    tracing::warn!(failures, "the journal writes again; what waited is stored and shown");
                }
                disk.journal_written();
                return Ok(());
            }
            Err(e) if !store::is_transient(&e) => return Err(e),
            Err(e) => {
                disk.journal_failed();
                if failures == 0 {
                    tracing::error!(
                        error = %e,
                        free = disk.free_bytes(),
                        "the journal cannot write to the data directory; retrying until it can \
                         (nothing more is shown to watchers until then)"
                    );
                }
                failures += 1;
                std::thread::sleep(wait);
                wait = (wait * 2).min(RETRY_MAX);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::BuildStatus;
    use std::time::Instant;

    fn event(seq: u64, text: &str) -> proto::BuildEvent {
        let notice = proto::Notice { platform: String::new(), text: format!("{text} {seq}") };
        proto::BuildEvent {
            seq,
            build_id: "b1".into(),
            time: None,
            kind: Some(proto::build_event::Kind::Notice(notice)),
        }
    }

    fn events(seqs: std::ops::RangeInclusive<u64>, live: &broadcast::Sender<proto::BuildEvent>) -> Item {
        Item::Events { events: seqs.map(|s| event(s, "event")).collect(), live: live.clone(), delivered: None }
    }

    fn record(status: BuildStatus, last_seq: u64) -> BuildRecord {
        BuildRecord {
            id: "b1".into(),
            order: 1,
            created_ms: 0,
            finished_ms: None,
            status,
            message: String::new(),
            jobs: Vec::new(),
            index: None,
            last_seq,
            owner: None,
            merge_started_ms: None,
        }
    }

    /// A store holding build b1 (queued, no events), its journal and data dir.
    fn setup(dir: &std::path::Path) -> (Arc<Store>, Arc<DataDir>, Journal) {
        let store = Arc::new(Store::open(&dir.join("braid.db")).unwrap());
        let spec = proto::BuildSpec::default();
        store.write(&[Write::Insert(&record(BuildStatus::Queued, 0), &spec)]).unwrap();
        let disk = Arc::new(DataDir::new(dir, Default::default()));
        let journal = Journal::start(store.clone(), disk.clone(), Default::default()).unwrap();
        (store, disk, journal)
    }

    fn stored_seqs(store: &Store) -> Vec<u64> {
        store.events_after("b1", 0, 100_000).unwrap().iter().map(|e| e.seq).collect()
    }

    fn stored_status(store: &Store) -> BuildStatus {
        store.load_builds().unwrap()[0].0.status
    }

    #[tokio::test]
    async fn events_are_shown_once_written_and_a_refused_change_shows_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _disk, journal) = setup(dir.path());
        let (live, mut watcher) = broadcast::channel(16);
        journal.push(Entry::Change(vec![events(1..=2, &live)]));
        journal.flush().await;
        assert_eq!(stored_seqs(&store), [1, 2]);
        assert_eq!((watcher.try_recv().unwrap().seq, watcher.try_recv().unwrap().seq), (1, 2));

        // Seq 2 again cannot be stored (one event per number): the change
        // it is part of is refused whole (its record too) and not shown,
        // and a good change queued after it (batched with it or not) is.
        let failed = Item::Record(Box::new(record(BuildStatus::Failed, 2)));
        journal.push(Entry::Change(vec![failed, events(2..=2, &live)]));
        journal.push(Entry::Change(vec![events(3..=3, &live)]));
        journal.flush().await;
        assert_eq!(watcher.try_recv().unwrap().seq, 3);
        assert!(watcher.try_recv().is_err(), "the refused event was not shown");
        assert_eq!(stored_seqs(&store), [1, 2, 3]);
        assert_eq!(stored_status(&store), BuildStatus::Queued, "the refused change's record was not written");
    }

    #[tokio::test]
    async fn a_full_disk_holds_changes_back_whole_and_writes_them_when_room_returns() {
        let dir = tempfile::tempdir().unwrap();
        let (store, disk, journal) = setup(dir.path());
        let (live, mut watcher) = broadcast::channel(4096);
        journal.push(Entry::Change(vec![events(1..=1, &live)]));
        journal.flush().await;
        assert_eq!(watcher.try_recv().unwrap().seq, 1);

        // The database may not grow: SQLITE_FULL, as on a full disk.
        store.limit_pages(1);
        let big = |seqs: std::ops::RangeInclusive<u64>| Item::Events {
            events: seqs.map(|s| event(s, &"x".repeat(2000))).collect(),
            live: live.clone(),
            delivered: None,
        };
        let succeeded = Item::Record(Box::new(record(BuildStatus::Succeeded, 400)));
        journal.push(Entry::Change(vec![big(2..=200)]));
        journal.push(Entry::Change(vec![big(201..=399), big(400..=400), succeeded]));
        let waited = tokio::time::timeout(Duration::from_millis(600), journal.flush()).await;
        assert!(waited.is_err(), "a flush waits while the disk is full");
        assert!(disk.journal_stuck() && !disk.writable(), "the data dir is reported not writable");
        assert!(watcher.try_recv().is_err(), "nothing unwritten is shown");
        assert_eq!(stored_seqs(&store), [1], "nothing is half written");
        assert_eq!(stored_status(&store), BuildStatus::Queued);
        assert!(disk_errors(&disk) >= 2, "each try counts: {}", disk_errors(&disk));

        // Room again: every change is written, in order, and shown.
        store.limit_pages(1 << 30);
        let start = Instant::now();
        journal.flush().await;
        assert!(start.elapsed() < Duration::from_secs(5), "retried within the backoff's bound");
        assert_eq!(stored_seqs(&store), (1..=400).collect::<Vec<_>>(), "contiguous, none lost");
        assert_eq!(stored_status(&store), BuildStatus::Succeeded);
        let shown: Vec<u64> = std::iter::from_fn(|| watcher.try_recv().ok()).map(|e| e.seq).collect();
        assert_eq!(shown, (2..=400).collect::<Vec<_>>());
        assert!(!disk.journal_stuck() && disk.known_writable());
    }

    fn disk_errors(disk: &DataDir) -> u64 {
        disk.write_errors()
    }
}
