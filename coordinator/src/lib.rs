//! braid's coordinator: takes multi-platform builds, hands one job per platform
//! to agents that build it natively, verifies what they push and merges the
//! results into one OCI image index.
#![forbid(unsafe_code)]

pub mod api;
pub mod attest;
pub mod auth;
pub mod blobs;
pub mod blocking;
pub mod cachecmd;
pub mod contexts;
pub mod dashboard_api;
pub mod decode_status;
pub mod disk;
pub mod enroll;
pub mod error;
pub mod export;
pub mod farm;
#[cfg(test)]
mod farm_tests;
pub mod http;
pub mod http_auth;
pub mod journal;
pub mod leader;
pub mod listener;
pub mod merge;
pub mod metrics;
pub mod model;
pub mod needs;
pub mod pgstore;
mod pgstore_placement;
mod pgstore_results;
pub mod process;
pub mod redirect;
pub mod remote_blobs;
pub mod remote_contexts;
pub mod resultcache;
pub mod scheduler;
pub mod server;
pub mod settings;
pub mod space;
pub mod ssh;
pub mod state;
pub mod store;
mod store_results;
pub mod stores;
pub mod validate;
