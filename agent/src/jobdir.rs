//! A job's directory on the agent, and its secrets directory: made afresh
//! for each attempt, removed when the last writer under them is done.

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A job's directory, removed when the last holder lets go: the job
/// itself, and any blocking task or builder process still writing under it
/// after the job was cancelled (removing it under such a writer would leave
/// what it wrote behind).
#[derive(Clone)]
pub struct JobDir(Arc<RemoveOnDrop>);

impl JobDir {
    /// Makes `path` and its `context` directory afresh (what a crashed
    /// agent left there is removed), and `secrets` (0700, on the agent's
    /// tmpfs) for the job's secret files; both go with the job. Synchronous
    /// on purpose: no await lies between holding them and having made them.
    pub fn create(path: PathBuf, secrets: PathBuf) -> Result<JobDir, String> {
        let dir = JobDir(Arc::new(RemoveOnDrop(path, secrets)));
        for stale in [dir.path(), dir.secrets()] {
            match std::fs::remove_dir_all(stale) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(format!("clearing {}: {e}", stale.display()));
                }
                _ => {}
            }
        }
        let path = dir.path();
        std::fs::create_dir_all(path.join("context")).map_err(|e| format!("creating {}: {e}", path.display()))?;
        let secrets = dir.secrets();
        secrets
            .parent()
            .map_or(Ok(()), crate::secrets::private_dir)
            .and_then(|()| crate::secrets::private_dir(secrets))
            .map_err(|e| format!("creating {}: {e}", secrets.display()))?;
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0.0
    }

    /// The job's directory for secret files: never under the work dir.
    pub fn secrets(&self) -> &Path {
        &self.0.1
    }

    /// Runs `f` on a blocking thread; the directory outlives it, even when
    /// the job is dropped first.
    pub async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, tokio::task::JoinError> {
        let keep = self.clone();
        tokio::task::spawn_blocking(move || {
            let result = f();
            drop(keep);
            result
        })
        .await
    }

    /// Runs `work` to its end even if the job is dropped meanwhile (for
    /// short local file work only); the directory outlives it.
    pub async fn detached<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T, tokio::task::JoinError> {
        let keep = self.clone();
        tokio::spawn(async move {
            let result = work.await;
            drop(keep);
            result
        })
        .await
    }
}

/// Removes a job's directory and its secrets directory when dropped.
struct RemoveOnDrop(PathBuf, PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.1);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use super::*;

    async fn gone(path: &Path) -> bool {
        for _ in 0..500 {
            if !path.exists() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn a_cancelled_job_leaves_no_directory_even_behind_a_late_writer() {
        let work = tempfile::tempdir().unwrap();
        let path = work.path().join("jobs/j-1");
        std::fs::create_dir_all(path.join("stale")).unwrap();
        let secrets = work.path().join("secrets/j-1");
        let dir = JobDir::create(path.clone(), secrets.clone()).unwrap();
        assert!(path.join("context").is_dir());
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&secrets).unwrap().permissions().mode() & 0o777, 0o700);
        assert!(!path.join("stale").exists(), "what a crashed agent left is cleared");

        // A blocking writer that is still running when its job is dropped,
        // as a cancel drops it: it makes directories under the job's.
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let late = path.join("context/late/deeper");
        let mut job = Box::pin(dir.blocking(move || {
            let _ = wait.recv();
            std::fs::create_dir_all(&late)
        }));
        assert!(futures::poll!(&mut job).is_pending());
        drop(job);
        drop(dir);
        assert!(path.is_dir(), "the writer still holds the directory");
        go.send(()).unwrap();
        assert!(gone(&path).await, "removed once the last writer is done");
        assert!(!secrets.exists(), "and its secrets with it");
        assert!(std::fs::read_dir(work.path().join("jobs")).unwrap().next().is_none());
    }

    #[tokio::test]
    async fn detached_work_finishes_before_the_directory_goes() {
        let work = tempfile::tempdir().unwrap();
        let path = work.path().join("jobs/j-2");
        let dir = JobDir::create(path.clone(), work.path().join("secrets/j-2")).unwrap();
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let file = path.join("layout-file");
        let mut job = Box::pin(dir.detached(async move {
            let _ = wait.await;
            tokio::fs::write(&file, "x").await
        }));
        assert!(futures::poll!(&mut job).is_pending());
        drop(job);
        drop(dir);
        assert!(path.is_dir());
        go.send(()).unwrap();
        assert!(gone(&path).await);
        crate::leftovers::sweep(work.path(), &work.path().join("secrets"));
        assert!(!work.path().join("jobs").exists());
        assert!(work.path().join("secrets").is_dir(), "an empty secrets directory is ready");
    }
}
