//! The state every service shares: the farm behind its lock, the stores,
//! settings and metrics, and the work a change of the farm asks for
//! (verifying images, merging indexes), run in the background.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use braid_shared::oci::{ImageDescriptor, Registry};
use braid_shared::pki::{self, Pem};
use braid_shared::{Digest, ImageRef, Platform};

use crate::auth::Tokens;
use crate::blobs::{BlobError, BlobStore};
use crate::contexts::ContextStore;
use crate::error::{CoordinatorError, Result};
use crate::farm::{Farm, FollowUp, VerifyIn};
use crate::merge;
use crate::metrics::Metrics;
use crate::settings::Settings;
use crate::store::Store;

/// Everything the services share.
pub struct Coordinator {
    farm: Mutex<Farm>,
    pub contexts: ContextStore,
    pub blobs: Arc<BlobStore>,
    pub store: Arc<Store>,
    pub settings: Settings,
    /// Wakes the scheduler after anything that may let a job be placed.
    pub wake: Notify,
    pub metrics: Arc<Metrics>,
    pub tokens: Tokens,
    /// The cluster CA and its key, when this coordinator signs joining agents.
    pub ca: Option<Pem>,
}

impl Coordinator {
    pub fn open(settings: Settings) -> Result<Arc<Coordinator>> {
        std::fs::create_dir_all(&settings.data_dir)?;
        let store = Arc::new(Store::open(&settings.data_dir.join("braid.db"))?);
        let contexts = ContextStore::open(
            &settings.data_dir.join("contexts"),
            store.clone(),
            settings.max_context_bytes,
            settings.context_store_bytes,
        )?;
        let blobs = Arc::new(BlobStore::open(&settings.data_dir.join("blobs/sha256"), settings.blob_store_bytes)?);
        let metrics = Arc::new(Metrics::default());
        let mut farm =
            Farm::load(store.clone(), settings.max_attempts, settings.insecure_registries.clone(), metrics.clone())?;
        farm.adopt_orphans();
        farm.set_configured_credentials(settings.credentials());
        let tokens = Tokens::new(store.clone(), settings.tls());
        let ca = match (&settings.tls_ca, &settings.tls_ca_key) {
            (Some(cert), Some(key)) => Some(Pem {
                cert: pki::read(cert).map_err(|e| CoordinatorError::Internal(e.to_string()))?,
                key: pki::read(key).map_err(|e| CoordinatorError::Internal(e.to_string()))?.into(),
            }),
            _ => None,
        };
        Ok(Arc::new(Coordinator {
            farm: Mutex::new(farm),
            contexts,
            blobs,
            store,
            settings,
            wake: Notify::new(),
            metrics,
            tokens,
            ca,
        }))
    }

    /// The farm, locked. Never held across an await.
    pub fn farm(&self) -> MutexGuard<'_, Farm> {
        // A panic while holding the lock leaves the farm as the last
        // completed change wrote it; keep serving rather than fail forever.
        self.farm.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs work a state change asked for, in the background.
    pub fn follow_up(self: &Arc<Self>, follow: Option<FollowUp>) {
        let Some(follow) = follow else { return };
        let this = self.clone();
        tokio::spawn(async move {
            let mut next = Some(follow);
            while let Some(step) = next.take() {
                next = this.run_follow_up(step).await;
            }
        });
    }

    async fn run_follow_up(self: &Arc<Self>, step: FollowUp) -> Option<FollowUp> {
        match step {
            FollowUp::Verify { build_id, job_id, at, digest, platform } => {
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
                let result = self.farm().verified(&build_id, &job_id, outcome);
                result.unwrap_or_else(|e| {
                    tracing::error!(build_id, job_id, error = %e, "recording the verification failed");
                    None
                })
            }
            FollowUp::Merge { build_id } => {
                let inputs = self.farm().merge_inputs(&build_id);
                let outcome = match inputs {
                    Some(m) => self.merge(&build_id, &m).await,
                    None => Err("a platform has no image".to_owned()),
                };
                if let Err(e) = self.farm().merged(&build_id, outcome) {
                    tracing::error!(build_id, error = %e, "recording the merge failed");
                }
                None
            }
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
        let (index, descriptor) = merge::index(&m.images, &m.annotations, m.format)?;
        if m.export {
            let (this, bytes) = (self.clone(), index.clone());
            crate::blocking::run(move || {
                let needed = || this.blobs.referenced(&this.farm().exporting_images());
                this.blobs.put_bytes(&bytes, needed)
            })
            .await
            .map_err(|e| format!("storing the index: {e}"))?;
        }
        if m.push {
            merge::push(&self.registry_for(build_id), &m.tags, &m.pushed_to, &m.images, &index, &descriptor).await?;
        }
        Ok(descriptor)
    }

    /// A registry client with the build's credentials.
    fn registry_for(&self, build_id: &str) -> Registry {
        let credentials = self.farm().credentials_for(build_id);
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
            let result = {
                let mut farm = self.farm();
                let swept = if sweep {
                    last_sweep = std::time::Instant::now();
                    farm.reap(self.settings.agent_lost_after())
                        .and_then(|()| farm.check_timeouts(self.settings.queue_timeout()))
                } else {
                    Ok(())
                };
                swept.and_then(|()| farm.schedule())
            };
            if let Err(e) = result {
                tracing::error!(error = %e, "scheduling failed");
            }
        }
    }
}
