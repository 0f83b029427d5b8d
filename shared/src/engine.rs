//! Reaching a Docker Engine's API: the agent's docker backend builds
//! through it, and `braid build --load` loads images into it.

use std::time::Duration;

use bollard::Docker;

/// Where the Engine is when neither a setting nor `DOCKER_HOST` says.
pub const DEFAULT_HOST: &str = "unix:///var/run/docker.sock";

/// Bounds the wait for response headers; build output streams after them.
const REQUEST_TIMEOUT_SECS: u64 = 600;

#[derive(Debug, thiserror::Error)]
#[error("Docker Engine at {host}: {message}")]
pub struct EngineError {
    pub host: String,
    pub message: String,
}

/// The Engine host to use: `setting` if given, else `DOCKER_HOST`, else
/// the default socket.
pub fn resolve_host(setting: &str) -> String {
    if !setting.is_empty() {
        return setting.to_owned();
    }
    std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| DEFAULT_HOST.to_owned())
}

/// A client for `host` (`unix://PATH` or `tcp://HOST:PORT`), speaking the
/// Engine's own API version, which may be older than bollard's.
pub async fn connect(host: &str) -> Result<Docker, EngineError> {
    let err = |message: String| EngineError { host: host.to_owned(), message };
    let docker = if let Some(path) = host.strip_prefix("unix://") {
        Docker::connect_with_unix(path, REQUEST_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
    } else if host.starts_with("tcp://") || host.starts_with("http://") {
        Docker::connect_with_http(host, REQUEST_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
    } else {
        return Err(err("expected unix://PATH or tcp://HOST:PORT".into()));
    }
    .map_err(|e| err(e.to_string()))?;
    match tokio::time::timeout(Duration::from_secs(10), docker.negotiate_version()).await {
        Ok(Ok(docker)) => Ok(docker),
        Ok(Err(e)) => Err(err(e.to_string())),
        Err(_) => Err(err("no answer within 10 s".into())),
    }
}
