//! The state every service shares: the farm behind its lock, the stores,
//! settings and metrics, and the work a change of the farm asks for
//! (verifying images, merging indexes), run in the background.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};

use braid_shared::oci::{ImageDescriptor, Registry};
use braid_shared::pki::{self, Pem};
use braid_shared::proto::{self, coordinator_message::Kind as ToAgent};
use braid_shared::{Digest, ImageRef, Platform};

use crate::auth::Tokens;
use crate::blobs::{BlobError, BlobStore};
use crate::contexts::ContextStore;
use crate::disk::DataDir;
use crate::error::{CoordinatorError, Result};
use crate::farm::{Effect, Effects, Farm, FarmConfig, NewBuild, VerifyIn};
use crate::journal::{Entry, Item, Journal, Stored};
use crate::merge;
use crate::metrics::Metrics;
use crate::model::SystemClock;
use crate::settings::Settings;
use crate::stores::Store;

/// How long an acknowledging answer waits for a journal that cannot write.
const STORED_WAIT: Duration = Duration::from_secs(5);

/// A session's outbound stream: what the coordinator sends an agent.
pub type AgentSender = mpsc::UnboundedSender<std::result::Result<proto::CoordinatorMessage, tonic::Status>>;

/// Everything the services share.
pub struct Coordinator {
    farm: Mutex<Farm>,
    /// Open agent sessions by id; locked only with the farm locked first.
    sessions: Mutex<HashMap<u64, AgentSender>>,
    /// The farm's writes, made off its lock.
    journal: Journal,
    /// Unfinished builds' records as stored: what clients are shown.
    pub stored: Arc<Stored>,
    pub contexts: ContextStore,
    pub blobs: Arc<BlobStore>,
    /// The `blob_store` registry repository export blobs are also kept in.
    pub remote_blobs: Option<Arc<crate::remote_contexts::RemoteContexts>>,
    pub store: Arc<Store>,
    /// Whether the data directory takes writes.
    pub disk: Arc<DataDir>,
    pub settings: Settings,
    /// Wakes the scheduler after anything that may let a job be placed.
    pub wake: Notify,
    pub metrics: Arc<Metrics>,
    pub tokens: Tokens,
    /// The cluster CA and its key, when this coordinator signs joining agents.
    pub ca: Option<Pem>,
    /// `--ssh` streams: agents' job tunnels and the clients serving them.
    pub ssh: crate::ssh::SshRelay,
    /// The key that signs provenance statements, when configured.
    pub provenance_signer: Option<Arc<braid_shared::dsse::Signer>>,
    /// `braid cache du/prune` requests waiting for agents' answers.
    pub cache_requests: crate::cachecmd::Pending,
    /// Whether this coordinator leads (always, on SQLite), and its term.
    pub leadership: Arc<crate::leader::Leadership>,
    /// One client for every build without registry credentials: its
    /// connections and anonymous tokens are reused (a new client loads the
    /// TLS roots and connects afresh). A build with credentials gets a
    /// client of its own, so no token outlives or crosses builds.
    anonymous_registry: Registry,
}

impl Coordinator {
    pub fn open(settings: Settings) -> Result<Arc<Coordinator>> {
        let store = Arc::new(Store::open_settings(&settings)?);
        let leadership = crate::leader::Leadership::alone(settings.advertised());
        Coordinator::open_with(settings, store, leadership)
    }

    /// Opens the farm on `store` (already open; for PostgreSQL, once this
    /// coordinator leads): loads every build, agent and cordon it holds.
    pub fn open_with(
        settings: Settings,
        store: Arc<Store>,
        leadership: Arc<crate::leader::Leadership>,
    ) -> Result<Arc<Coordinator>> {
        std::fs::create_dir_all(&settings.data_dir)?;
        let metrics = Arc::new(Metrics::default());
        let disk = Arc::new(DataDir::new(&settings.data_dir, metrics.clone()));
        let contexts = ContextStore::open(
            &settings.data_dir.join("contexts"),
            store.clone(),
            disk.clone(),
            settings.max_context_bytes,
            settings.context_store_bytes,
        )?
        .with_remote(crate::remote_contexts::from_settings(&settings)?);
        let blobs = Arc::new(BlobStore::open(&settings.data_dir.join("blobs/sha256"), settings.blob_store_bytes)?);
        let remote_blobs = crate::remote_contexts::from_settings(&settings)?.map(Arc::new);
        let config = FarmConfig {
            max_attempts: settings.max_attempts,
            insecure_registries: settings.insecure_registries.clone(),
            configured: settings.credentials(),
            secrets_grace_ms: i64::from(settings.secrets_grace_seconds) * 1000,
        };
        let mut farm = Farm::new(config, Arc::new(SystemClock::default()), metrics.clone());
        let builds = store.load_builds()?;
        let stored = Arc::new(Stored::default());
        builds.iter().for_each(|(record, _)| stored.note(record));
        farm.restore(builds, store.cordons()?);
        farm.restore_deliveries(store.deliveries()?);
        farm.restore_builders(store.builders()?);
        farm.restore_declared(store.declared()?);
        farm.restore_footprints(store.footprints()?);
        let journal = Journal::start(store.clone(), disk.clone(), stored.clone())?;
        let tokens = Tokens::new(store.clone(), settings.tls());
        let ca = match (&settings.tls_ca, &settings.tls_ca_key) {
            (Some(cert), Some(key)) => Some(Pem {
                cert: pki::read(cert).map_err(|e| CoordinatorError::Internal(e.to_string()))?,
                key: pki::read(key).map_err(|e| CoordinatorError::Internal(e.to_string()))?.into(),
            }),
            _ => None,
        };
        let provenance_signer = match (&settings.provenance_key, &settings.provenance_cert) {
            (Some(key), Some(cert)) => Some(Arc::new(
                braid_shared::dsse::Signer::load(key, cert)
                    .map_err(|e| CoordinatorError::Internal(format!("provenance_key/provenance_cert: {e}")))?,
            )),
            _ => None,
        };
        let anonymous_registry = Registry::new(&settings.insecure_registries);
        Ok(Arc::new(Coordinator {
            farm: Mutex::new(farm),
            sessions: Mutex::new(HashMap::new()),
            journal,
            stored,
            contexts,
            blobs,
            remote_blobs,
            store,
            disk,
            settings,
            wake: Notify::new(),
            metrics,
            tokens,
            ca,
            ssh: crate::ssh::SshRelay::default(),
            provenance_signer,
            cache_requests: crate::cachecmd::Pending::default(),
            leadership,
            anonymous_registry,
        }))
    }

    /// The farm, locked. Never held across an await.
    pub fn farm(&self) -> MutexGuard<'_, Farm> {
        // A panic while holding the lock leaves the farm as the last
        // completed change wrote it; keep serving rather than fail forever.
        self.farm.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sessions(&self) -> MutexGuard<'_, HashMap<u64, AgentSender>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Performs what a transition of `farm` asked for; called with the farm
    /// still locked (hence the `_farm` borrow), so messages to agents and
    /// writes keep the farm's order. Sends and queued writes do not block;
    /// verifications and merges run in the background. The store writes of
    /// one call go to the journal as one change, written in one transaction.
    pub fn perform(self: &Arc<Self>, _farm: &Farm, effects: Effects) {
        let mut change = Vec::new();
        for effect in effects {
            match effect {
                Effect::Assign { session, assignment } => self.send(session, ToAgent::Assign(*assignment)),
                Effect::Cancel { session, cancel } => self.send(session, ToAgent::Cancel(cancel)),
                Effect::Disconnect { session, agent, why } => {
                    if let Some(tx) = self.sessions().remove(&session) {
                        let _ = tx.send(Err(crate::error::disconnect_status(&agent, why)));
                    }
                }
                Effect::Persist(record) => change.push(Item::Record(record)),
                Effect::Append { events, live, delivered } => change.push(Item::Events { events, live, delivered }),
                Effect::Cordon { agent, cordoned } => change.push(Item::Cordon { agent, cordoned }),
                Effect::Builder { agent, builder } => change.push(Item::Builder { agent, builder }),
                Effect::Declared { agent, declared } => change.push(Item::Declared { agent, declared }),
                Effect::Footprint { key, footprint, now_ms } => change.push(Item::Footprint { key, footprint, now_ms }),
                follow @ (Effect::Verify { .. } | Effect::Merge { .. }) => {
                    tokio::spawn(self.clone().follow(follow));
                }
            }
        }
        if !change.is_empty() {
            self.journal.push(Entry::Change(change));
        }
    }

    /// Takes a validated build: stored first (its record and first event,
    /// in one transaction, outside the farm's lock), then put in the farm,
    /// so a build exists in memory, and its id is handed out, only once it
    /// is stored. A full disk refuses it with `DataDirFull`.
    pub async fn submit(self: &Arc<Self>, new: NewBuild) -> Result<String> {
        let this = self.clone();
        let new = crate::blocking::run(move || {
            let (record, spec, event) = new.parts();
            let written = this.store.write(&[
                crate::store::Write::Insert(record, spec),
                crate::store::Write::Events(std::slice::from_ref(event)),
            ]);
            written.map_err(|e| this.disk.check(e))?;
            this.stored.note(record);
            Ok(new)
        })
        .await?;
        Ok(self.change(|farm| farm.admit(new)))
    }

    /// Runs a transition on the locked farm and performs its effects.
    pub fn change<T>(self: &Arc<Self>, transition: impl FnOnce(&mut Farm) -> (T, Effects)) -> T {
        let mut farm = self.farm();
        let (value, effects) = transition(&mut farm);
        self.perform(&farm, effects);
        value
    }

    pub(crate) fn send(&self, session: u64, kind: ToAgent) {
        if let Some(tx) = self.sessions().get(&session) {
            let _ = tx.send(Ok(proto::CoordinatorMessage { kind: Some(kind) }));
        }
    }

    /// Registers a new session's stream (before its transition's effects
    /// are performed, which may already send on it).
    pub fn open_session(&self, _farm: &Farm, session: u64, tx: AgentSender) {
        self.sessions().insert(session, tx);
    }

    /// Acknowledges an agent's messages up to `up_to` once everything the
    /// farm changed so far (theirs included) is stored.
    pub fn ack(&self, session: u64, up_to: u64) {
        let Some(tx) = self.sessions().get(&session).cloned() else { return };
        let ack = proto::CoordinatorMessage { kind: Some(ToAgent::Ack(proto::Ack { up_to })) };
        self.journal.push(Entry::Then(Box::new(move || {
            // A closed session is fine: the agent resends on its next one.
            let _ = tx.send(Ok(ack));
        })));
    }

    /// Ends every agent session (the coordinator is stopping); the agents
    /// reconnect, keeping their jobs and unacknowledged messages.
    pub fn close_all_sessions(&self) {
        for (_, tx) in self.sessions().drain() {
            let _ = tx.send(Err(tonic::Status::unavailable("the coordinator is stopping; reconnect later")));
        }
    }

    /// Forgets a session whose stream ended.
    pub fn close_session(&self, session: u64) {
        self.sessions().remove(&session);
    }

    /// Waits until every change made so far is stored (while the disk is
    /// full, until there is room again).
    pub async fn flush(&self) {
        self.journal.flush().await;
    }

    /// Waits until every change made so far is stored, before an answer
    /// that acknowledges one. While the journal waits for room on a full
    /// disk this gives up after `STORED_WAIT` with `DataDirFull`: the change
    /// is made and will be stored once there is room, but is not
    /// acknowledged (a restart before then would not show it).
    pub async fn stored(&self) -> Result<()> {
        if tokio::time::timeout(STORED_WAIT, self.journal.flush()).await.is_ok() {
            return Ok(());
        }
        if self.disk.journal_stuck() {
            return Err(CoordinatorError::DataDirFull { free: self.disk.free_bytes() });
        }
        // Slow, not stuck: the answer waits for it.
        self.journal.flush().await;
        Ok(())
    }

    /// Checks an image or merges an index, then records the outcome.
    async fn follow(self: Arc<Self>, effect: Effect) {
        match effect {
            Effect::Verify { build_id, job_id, at, digest, platform } => {
                let outcome = match at {
                    VerifyIn::Registry(repository) => {
                        self.verify_pushed(&build_id, &repository, &digest, &platform).await
                    }
                    VerifyIn::Blobs => self.verify_uploaded(digest, platform).await,
                    VerifyIn::RegistryAndBlobs(repository) => {
                        match self.verify_pushed(&build_id, &repository, &digest, &platform).await {
                            Ok(_) => self.verify_uploaded(digest, platform).await,
                            Err(e) => Err(e),
                        }
                    }
                };
                let mut farm = self.farm();
                let effects = farm.verified(&build_id, &job_id, outcome);
                self.perform(&farm, effects);
            }
            Effect::Merge { build_id } => {
                let inputs = self.farm().merge_inputs(&build_id);
                let outcome = match inputs {
                    Some(m) => self.merge(&build_id, &m).await,
                    None => Err("a platform has no image".to_owned()),
                };
                let (entries, now) = {
                    let mut farm = self.farm();
                    let effects = farm.merged(&build_id, outcome);
                    self.perform(&farm, effects);
                    (farm.result_entries(&build_id), farm.now())
                };
                crate::resultcache::store_results(&self.store, entries, now).await;
            }
            _ => {}
        }
    }

    /// Checks a pushed image in the registry.
    async fn verify_pushed(
        &self,
        build_id: &str,
        repository: &ImageRef,
        digest: &Digest,
        platform: &Platform,
    ) -> std::result::Result<ImageDescriptor, String> {
        merge::verify(&self.registry_for(build_id), repository, digest, platform).await
    }

    /// Checks an uploaded image in the blob store; reading and hashing the
    /// manifest and config is blocking work.
    async fn verify_uploaded(
        &self,
        digest: Digest,
        platform: Platform,
    ) -> std::result::Result<ImageDescriptor, String> {
        let blobs = self.blobs.clone();
        let check = tokio::task::spawn_blocking(move || blobs.verify_image(&digest, &platform).map(|(d, _)| d));
        check
            .await
            .unwrap_or_else(|e| Err(BlobError::Internal(e.to_string())))
            .map_err(|e| format!("uploaded image: {e}"))
    }

    /// Writes the index: into the blob store for an exporting build, and
    /// to the registry under every tag for a pushing one.
    async fn merge(
        self: &Arc<Self>,
        build_id: &str,
        m: &crate::farm::MergeInputs,
    ) -> std::result::Result<ImageDescriptor, String> {
        let (mut index, mut descriptor) = merge::index(&m.images, &m.annotations, m.format)?;
        // Both the attestations and the index go to the registry: one client.
        let registry = m.push.then(|| self.registry_for(build_id));
        if let Some(registry) = &registry
            && !m.provenance.is_empty()
        {
            let mut inputs = m.provenance.clone();
            for input in &mut inputs {
                input.metadata.coordinator = self.name();
            }
            index =
                crate::attest::attach(registry, self.provenance_signer.as_deref(), &m.tags, &inputs, &index).await?;
            descriptor = ImageDescriptor {
                digest: braid_shared::Digest::of(&index),
                size: index.len() as u64,
                media_type: descriptor.media_type,
            };
        }
        if m.export {
            let (this, bytes) = (self.clone(), index.clone());
            crate::blocking::run(move || {
                let needed = || this.blobs.referenced(&this.farm().exporting_images());
                this.blobs.put_bytes(&bytes, needed)
            })
            .await
            .map_err(|e| format!("storing the index: {}", self.disk.check(e)))?;
            crate::remote_blobs::push(self, &braid_shared::Digest::of(&index)).await.map_err(|e| e.to_string())?;
        }
        if let Some(registry) = &registry {
            merge::push(registry, &m.tags, &m.pushed_to, &m.images, &index, &descriptor).await?;
        }
        Ok(descriptor)
    }

    /// The name provenance gives this coordinator: its host name and
    /// gRPC address.
    fn name(&self) -> String {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let host = host.trim();
        format!("{host} ({})", self.settings.listen)
    }

    /// A registry client with the build's credentials.
    fn registry_for(&self, build_id: &str) -> Registry {
        let credentials = self.farm().credentials_for(build_id);
        self.registry_with(credentials)
    }

    /// A registry client with `credentials`: the shared one when there are none.
    pub fn registry_with(&self, credentials: Vec<braid_shared::oci::Credential>) -> Registry {
        if credentials.is_empty() {
            return self.anonymous_registry.clone();
        }
        Registry::with_credentials(&self.settings.insecure_registries, credentials)
    }

    /// Places queued jobs whenever woken, and at least every second; looks
    /// for lost agents and timed-out builds a few times a second (each
    /// looks at every agent or build, too much for every wake-up).
    pub(crate) async fn schedule_loop(self: Arc<Self>) {
        let mut last_sweep = std::time::Instant::now();
        loop {
            let _ = tokio::time::timeout(Duration::from_secs(1), self.wake.notified()).await;
            let sweep = last_sweep.elapsed() >= Duration::from_millis(200);
            {
                let mut farm = self.farm();
                let mut effects = Vec::new();
                if sweep {
                    last_sweep = std::time::Instant::now();
                    effects.extend(farm.reap(self.settings.agent_lost_after()));
                    effects.extend(farm.check_timeouts(self.settings.queue_timeout()));
                }
                effects.extend(farm.schedule());
                self.perform(&farm, effects);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::BuildStatus;

    fn new_build(c: &Coordinator) -> NewBuild {
        let spec = proto::BuildSpec {
            platforms: vec!["linux/amd64".into()],
            tags: vec!["127.0.0.1:5000/app:1".into()],
            context_digest: format!("sha256:{}", "0".repeat(64)),
            push: true,
            ..Default::default()
        };
        let v = crate::validate::spec(spec).unwrap();
        c.farm().new_build(v.spec, v.platforms, v.tags, None, vec![], vec![])
    }

    #[tokio::test]
    async fn a_full_store_refuses_builds_and_acknowledges_only_what_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings { data_dir: dir.path().to_owned(), ..Settings::default() };
        let c = Coordinator::open(settings).unwrap();

        // The database may not grow: builds are taken while they fit, then
        // refused with the reason; memory holds exactly what is stored.
        c.store.limit_pages(1);
        let mut accepted = Vec::new();
        let e = loop {
            match c.submit(new_build(&c)).await {
                Ok(id) => accepted.push(id),
                Err(e) => break e,
            }
            assert!(accepted.len() < 1000, "the database never filled up");
        };
        assert!(matches!(e, CoordinatorError::DataDirFull { .. }), "{e}");
        let status = tonic::Status::from(e);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().starts_with("coordinator data dir full ("), "{}", status.message());
        assert_eq!(c.farm().builds.len(), accepted.len());
        assert_eq!(c.store.load_builds().unwrap().len(), accepted.len());

        // Room: stored with its first event, then in the farm.
        c.store.limit_pages(1 << 30);
        let id = c.submit(new_build(&c)).await.unwrap();
        assert!(c.farm().builds.contains_key(&id));
        assert_eq!(c.store.events_after(&id, 0, 10).unwrap().len(), 1);

        // Failing writes: a cancel is made but not acknowledged, and stored
        // (record and events together) once the store writes again.
        c.store.refuse_writes(true);
        let effects = c.farm().cancel(&id, "cancelled by request").unwrap();
        c.perform(&c.farm(), effects);
        let e = c.stored().await.unwrap_err();
        assert!(matches!(e, CoordinatorError::DataDirFull { .. }), "{e}");
        let stored = |c: &Coordinator| c.store.load_builds().unwrap().into_iter().find(|(r, _)| r.id == id).unwrap().0;
        assert_eq!(stored(&c).status, BuildStatus::Queued);
        assert_eq!(c.store.events_after(&id, 0, 10).unwrap().len(), 1);
        // Clients are shown the stored state, not memory's.
        assert_eq!(c.farm().builds[&id].record.status, BuildStatus::Cancelled);
        assert_eq!(c.stored.lock()[&id].status, BuildStatus::Queued);
        c.store.refuse_writes(false);
        c.stored().await.unwrap();
        let record = stored(&c);
        assert!(!c.stored.lock().contains_key(&id), "a finished build is shown as memory has it");
        assert_eq!(record.status, BuildStatus::Cancelled);
        let seqs: Vec<u64> = c.store.events_after(&id, 0, 10).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=record.last_seq).collect::<Vec<_>>());
    }
}
