//! Types, wire contract and registry code shared by braid's coordinator, agent
//! and CLI. Nothing here knows about servers.
#![forbid(unsafe_code)]

pub mod beneath;
pub mod buildargs;
pub mod buildflags;
pub mod buildneeds;
pub mod cache;
pub mod capability;
pub mod codec;
pub mod compat;
pub mod compression;
pub mod context;
pub mod csv;
pub mod digest;
pub mod dockerfile;
pub mod dockerignore;
#[cfg(feature = "pki")]
pub mod dsse;
pub mod duration;
#[cfg(feature = "engine")]
pub mod engine;
pub mod health;
pub mod instructions;
pub mod limits;
pub mod oci;
#[cfg(feature = "pki")]
pub mod pki;
pub mod placement;
pub mod platform;
pub mod provenance;
pub mod reference;
pub mod secrets;
pub mod settings;
pub mod size;
pub mod slsa;
pub mod source;
pub mod ssh;
pub mod steps;
pub mod telemetry;

pub use digest::Digest;
pub use platform::Platform;
pub use reference::ImageRef;

/// Code generated from `proto/braid/v1/braid.proto`.
pub mod proto {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("braid.v1");

    impl std::fmt::Debug for RegistryCredential {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("RegistryCredential")
                .field("registry", &self.registry)
                .field("username", &self.username)
                .field("password", &"<redacted>")
                .finish()
        }
    }

    impl std::fmt::Debug for SecretValue {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("SecretValue")
                .field("id", &self.id)
                .field("value", &format_args!("<{} bytes redacted>", self.value.len()))
                .finish()
        }
    }

    /// The encoded descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/braid_descriptor.bin"));
}

/// This build of braid, as reported by agents and `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// At most `max` bytes of `s`, cut on a character boundary, for quoting
/// untrusted input in an error without echoing all of it.
pub fn shorten(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}
