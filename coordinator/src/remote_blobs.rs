//! Export blobs (the images agents upload for `--output type=oci|docker`,
//! and the index the coordinator makes) kept in the `blob_store` registry
//! repository too, so that a coordinator that leads after another one died
//! serves exports without a shared disk: every stored blob is pushed there
//! under its digest, and one missing locally is pulled back, verified
//! against its digest, before an export is planned.

use braid_shared::Digest;

use crate::error::{CoordinatorError, Result};
use crate::state::Coordinator;

/// The largest blob pushed or pulled: the local store's own bound.
fn limit(coordinator: &Coordinator) -> usize {
    usize::try_from(coordinator.settings.blob_store_bytes).unwrap_or(usize::MAX)
}

/// Pushes a stored blob to the `blob_store` repository, when one is set.
pub async fn push(coordinator: &Coordinator, digest: &Digest) -> Result<()> {
    let Some(remote) = &coordinator.remote_blobs else {
        return Ok(());
    };
    let (blobs, d, max) = (coordinator.blobs.clone(), digest.clone(), limit(coordinator));
    let bytes =
        crate::blocking::run(move || blobs.read(&d, max).map_err(|e| CoordinatorError::Internal(e.to_string())))
            .await?;
    remote.push_blob(&bytes).await?;
    tracing::debug!(%digest, "blob pushed to the blob_store registry");
    Ok(())
}

/// Makes sure `roots` (manifests and indexes) and every blob they name are
/// stored locally, pulling what is missing from the `blob_store` repository
/// (best effort: the export's plan names whatever is still missing).
pub async fn fill(coordinator: &Coordinator, roots: &[Digest]) -> Result<()> {
    if coordinator.remote_blobs.is_none() {
        return Ok(());
    }
    let mut todo: Vec<(Digest, bool)> = roots.iter().map(|d| (d.clone(), true)).collect();
    let mut seen = std::collections::HashSet::new();
    while let Some((digest, is_manifest)) = todo.pop() {
        if !seen.insert(digest.clone()) || seen.len() > braid_shared::limits::BLOBS_PER_IMAGE * 4 {
            continue;
        }
        if !coordinator.blobs.has(&digest) {
            // What cannot be read back is left to the export's plan to name.
            if let Err(e) = fill_blob(coordinator, &digest).await {
                tracing::warn!(%digest, error = %e, "an export blob is neither here nor in the blob_store registry");
                continue;
            }
        }
        if !is_manifest {
            continue;
        }
        let (c, d) = (coordinator.blobs.clone(), digest.clone());
        let bytes = crate::blocking::run(move || {
            c.read(&d, braid_shared::limits::GRPC_MESSAGE_BYTES).map_err(|e| CoordinatorError::Internal(e.to_string()))
        })
        .await?;
        let Ok(doc) = serde_json::from_slice::<serde_json::Value>(&bytes) else { continue };
        let named = |v: &serde_json::Value| v["digest"].as_str().and_then(|d| d.parse::<Digest>().ok());
        for m in doc["manifests"].as_array().into_iter().flatten() {
            if let Some(d) = named(m) {
                todo.push((d, true));
            }
        }
        if let Some(d) = named(&doc["config"]) {
            todo.push((d, false));
        }
        for l in doc["layers"].as_array().into_iter().flatten() {
            if let Some(d) = named(l) {
                todo.push((d, false));
            }
        }
    }
    Ok(())
}

/// Whether `digest`, missing here, could be read back from the
/// `blob_store` repository (and is now stored): an agent need not upload it.
pub async fn pull(coordinator: &Coordinator, digest: &Digest) -> bool {
    if coordinator.remote_blobs.is_none() {
        return false;
    }
    let _ = fill_blob(coordinator, digest).await;
    coordinator.blobs.has(digest)
}

async fn fill_blob(coordinator: &Coordinator, digest: &Digest) -> Result<()> {
    let Some(remote) = &coordinator.remote_blobs else {
        return Ok(());
    };
    let bytes = remote.pull_blob(digest, limit(coordinator)).await?;
    let c = coordinator.blobs.clone();
    let stored = crate::blocking::run(move || c.put_bytes(&bytes, Default::default)).await?;
    if stored != *digest {
        return Err(CoordinatorError::Internal(format!("blob_store: blob {digest} stored as {stored}")));
    }
    tracing::info!(%digest, "export blob read from the blob_store registry");
    Ok(())
}
