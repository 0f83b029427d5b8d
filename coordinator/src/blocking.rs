//! CPU-heavy work (decompressing, hashing, reading blobs back) runs on
//! tokio's blocking threads, never on the async workers that answer every
//! other call; at most a few such tasks run at once, so a burst of uploads
//! queues instead of starting a thread each.

use std::sync::LazyLock;

use tokio::sync::Semaphore;

use crate::error::{CoordinatorError, Result};

/// Two per core: enough to keep every core busy while one waits on disk.
static PERMITS: LazyLock<Semaphore> = LazyLock::new(|| {
    let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
    Semaphore::new(cores * 2)
});

/// Runs `work` on a blocking thread once a permit is free.
pub async fn run<T: Send + 'static>(work: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    let _permit = PERMITS.acquire().await.map_err(|_| CoordinatorError::Internal("the work pool is closed".into()))?;
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| CoordinatorError::Internal(format!("a background task failed: {e}")))?
}
