//! Uploads a job's image to the coordinator for an exporting build
//! (`--output type=oci`, `--load`): only the blobs it does not hold yet.

use std::path::Path;

use tokio::io::AsyncReadExt;

use braid_shared::oci;
use braid_shared::proto::{self, agents_client::AgentsClient};

use crate::settings::Valid;

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("reading the image: {0}")]
    Layout(#[from] oci::OciError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("coordinator: {0}")]
    Coordinator(#[from] tonic::Status),
    #[error("connecting: {0}")]
    Connect(#[from] tonic::transport::Error),
}

/// Bytes per PutBlob message.
const CHUNK: usize = 1 << 20;

/// Uploads every blob of the layout's image the coordinator lacks;
/// returns the bytes sent.
pub async fn upload_layout(settings: &Valid, a: &proto::Assignment, layout: &Path) -> Result<u64, UploadError> {
    let blobs = oci::layout_blobs(layout).await?;
    let mut client = AgentsClient::new(settings.connect().await?);
    let missing = client
        .missing_blobs(proto::MissingBlobsRequest {
            job_id: a.job_id.clone(),
            attempt: a.attempt,
            lease_id: a.lease_id.clone(),
            digests: blobs.iter().map(|(d, _, _)| d.to_string()).collect(),
        })
        .await?
        .into_inner()
        .missing;
    let mut sent = 0;
    for (digest, size, path) in blobs.into_iter().filter(|(d, _, _)| missing.contains(&d.to_string())) {
        let mut file = tokio::fs::File::open(&path).await?;
        let header = proto::PutBlobRequest {
            job_id: a.job_id.clone(),
            attempt: a.attempt,
            lease_id: a.lease_id.clone(),
            digest: digest.to_string(),
            size,
            chunk: Vec::new(),
        };
        // A read error ends the stream (the coordinator then refuses the
        // short blob) and is reported as the cause.
        let read_error: std::sync::Arc<std::sync::Mutex<Option<std::io::Error>>> = Default::default();
        let seen = read_error.clone();
        let body = async_stream::stream! {
            yield header;
            loop {
                let mut chunk = vec![0u8; CHUNK];
                match file.read(&mut chunk).await {
                    Ok(0) => break,
                    Ok(n) => {
                        chunk.truncate(n);
                        yield proto::PutBlobRequest { chunk, ..Default::default() };
                    }
                    Err(e) => {
                        *seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e);
                        break;
                    }
                }
            }
        };
        let put = client.put_blob(body).await;
        if let Some(e) = read_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            return Err(UploadError::Io(std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))));
        }
        put?;
        sent += size;
    }
    Ok(sent)
}
