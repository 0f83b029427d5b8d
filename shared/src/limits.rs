//! Every size braid accepts has a limit; they are all here.

/// Largest gRPC message either side decodes.
pub const GRPC_MESSAGE_BYTES: usize = 8 << 20;
/// Chunk size for streamed contexts.
pub const CONTEXT_CHUNK_BYTES: usize = 1 << 20;
/// Default bound on a context's file contents (coordinator-configurable).
pub const CONTEXT_BYTES: u64 = 4 << 30;
/// Bound on a context's entries.
pub const CONTEXT_ENTRIES: u64 = 1_000_000;
/// Longest fetch of a remote context (a git clone, an http(s) download), in seconds.
pub const REMOTE_CONTEXT_SECONDS: u64 = 600;
/// Longest path inside a context.
pub const CONTEXT_PATH_BYTES: usize = 4096;
/// Platforms in one build.
pub const PLATFORMS: usize = 32;
/// Tags in one build.
pub const TAGS: usize = 64;
/// Build args, and labels, in one build.
pub const BUILD_ARGS: usize = 256;
/// Bytes of one build-arg or label key.
pub const ARG_KEY_BYTES: usize = 256;
/// Bytes of one build-arg or label value.
pub const ARG_VALUE_BYTES: usize = 16 << 10;
/// Size of an inline Dockerfile.
pub const DOCKERFILE_BYTES: usize = 1 << 20;
/// Bytes of one log line; longer lines are cut.
pub const LOG_LINE_BYTES: usize = 8 << 10;
/// Log bytes kept per job; past that a single notice says the log was cut.
pub const JOB_LOG_BYTES: usize = 16 << 20;
/// Log lines kept per job (one-byte lines count too); past that the same
/// notice. Below `BUILD_EVENTS`, so the coordinator keeps the notice.
pub const JOB_LOG_LINES: usize = 200_000;
/// Log bytes (with a per-line overhead) an agent holds for the coordinator
/// at once, over all its jobs; past that jobs hold their lines back.
pub const AGENT_LOG_IN_FLIGHT_BYTES: usize = 8 << 20;
/// Log bytes one job holds back while the agent's in-flight budget is used
/// up; past that its lines are dropped and counted.
pub const JOB_LOG_PENDING_BYTES: usize = 1 << 20;
/// Events kept per build; past that log lines are dropped (state changes
/// are always kept).
pub const BUILD_EVENTS: u64 = 250_000;
/// Bytes of an image manifest or config the coordinator reads back.
pub const MANIFEST_BYTES: usize = 4 << 20;
/// Length of an agent name.
pub const AGENT_NAME_BYTES: usize = 128;
/// Slots one agent may declare.
pub const AGENT_SLOTS: u32 = 256;
/// Builds one List call returns.
pub const LIST_BUILDS: u32 = 500;
/// Blobs (manifest, config, layers) of one image an agent uploads.
pub const BLOBS_PER_IMAGE: usize = 1000;
/// Manifests one index may list (`braid imagetools` reads and writes them).
pub const INDEX_MANIFESTS: usize = 1000;
/// Sources (arguments and `-f` files) of one `braid imagetools create`.
pub const IMAGETOOLS_SOURCES: usize = 256;
/// Largest zstd window braid decodes, as a power of two (16 MiB). A decoder
/// holds a buffer the size of its frame's window, so this bounds what one
/// upload can make the coordinator allocate; `zstd -19` needs at most 2^23
/// and braid's CLI (level 3) 2^21.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 24;
/// Decompressed bytes per decoding step: a size limit is checked after each,
/// so decoding stops within this many bytes past it.
pub const ZSTD_STEP_BYTES: usize = 128 << 10;
/// Longest `--timeout` of a build: 7 days.
pub const BUILD_TIMEOUT_SECONDS: u64 = 7 * 24 * 3600;
/// Longest lifetime of a token: 10 years (fits a u32 of seconds).
pub const TOKEN_TTL_SECONDS: u64 = 10 * 365 * 24 * 3600;
/// Distinct platforms that get their own metric label; past that (and for
/// any platform neither well known nor declared by an agent) `other`.
pub const METRIC_PLATFORMS: usize = 256;
/// Agents that get per-agent health series in `/metrics`, by name; past
/// that, the rest have none (their health is still in `braid agents`).
pub const METRIC_AGENTS: usize = 1024;
/// Dashboard login sessions held at once; the oldest goes first.
pub const HTTP_SESSIONS: usize = 1024;
/// Lifetime of a dashboard login session: 12 hours.
pub const HTTP_SESSION_SECONDS: u64 = 12 * 3600;
/// How long `braid build` and `braid logs --follow` keep reconnecting to an
/// unreachable coordinator when the build has no `--timeout` of its own.
pub const RECONNECT_SECONDS: u64 = 600;
/// Longest `push_retry_seconds` of an agent: a day.
pub const PUSH_RETRY_SECONDS: u64 = 24 * 3600;
/// `--add-host` entries in one build.
pub const ADD_HOSTS: usize = 64;
/// Largest `--shm-size`: 64 GiB.
pub const SHM_SIZE_BYTES: u64 = 64 << 30;
/// `--ssh` ids in one build.
pub const SSH_IDS: usize = 16;
/// Bytes of one `--ssh` id.
pub const SSH_ID_BYTES: usize = 64;
/// Bytes of one relayed SSH-agent frame; also the longest ssh-agent
/// protocol message the client passes on (OpenSSH's own bound).
pub const SSH_FRAME_BYTES: usize = 256 << 10;
/// SSH-agent connections open at once per job; past that a new one is
/// closed at once.
pub const SSH_CONNECTIONS: usize = 32;
/// Frames the coordinator buffers per direction of one SSH stream.
pub const SSH_BUFFERED_FRAMES: usize = 16;
/// `--secret` entries in one build.
pub const SECRETS: usize = 64;
/// Bytes of one secret's value: BuildKit's own limit (500 KiB).
pub const SECRET_BYTES: usize = 500 << 10;
/// Bytes of all of a build's secret values together, so a submit or an
/// assignment stays well inside `GRPC_MESSAGE_BYTES`.
pub const SECRETS_TOTAL_BYTES: usize = 4 << 20;
/// Bytes of a secret's id.
pub const SECRET_ID_BYTES: usize = 128;
/// `--build-context` entries per build.
pub const BUILD_CONTEXTS: usize = 16;
/// `--no-cache-filter` stages per build.
pub const NO_CACHE_FILTER: usize = 64;
/// Bytes of a builder's name and of its version in an agent's hello.
pub const BUILDER_NAME_BYTES: usize = 32;
pub const BUILDER_VERSION_BYTES: usize = 128;
/// Secret and SSH ids a Dockerfile's mounts may name (the scan keeps no more).
pub const DOCKERFILE_MOUNT_IDS: usize = 256;
/// `--cache-from` entries, and `--cache-to` entries, in one build.
pub const CACHE_ENTRIES: usize = 16;
/// Bytes of one `--cache-from`/`--cache-to` value as typed.
pub const CACHE_FLAG_BYTES: usize = 4096;
/// Attributes of one cache entry.
pub const CACHE_ATTRS: usize = 16;
/// Bytes of a cache entry attribute's key.
pub const CACHE_ATTR_KEY_BYTES: usize = 64;
/// Bytes of a cache entry attribute's value.
pub const CACHE_ATTR_VALUE_BYTES: usize = 1024;
/// Base images an agent reports for one platform's provenance.
pub const PROVENANCE_BASE_IMAGES: usize = 64;
/// Bytes of one base image reference or digest in a provenance report.
pub const PROVENANCE_REF_BYTES: usize = 512;
/// Bytes of a provenance statement or DSSE envelope read back.
pub const ATTESTATION_BYTES: usize = 4 << 20;
/// Lines of a failed step's Dockerfile excerpt, and bytes of each line and
/// of the step's text (`FailedStep`).
pub const EXCERPT_LINES: usize = 40;
pub const EXCERPT_LINE_BYTES: usize = 512;
pub const FAILED_STEP_BYTES: usize = 1024;
/// Storages one agent may list in a cache report (`braid cache du`).
pub const CACHE_STORAGES: usize = 256;
/// How long `braid cache du` waits for an agent to measure its storages.
pub const CACHE_DU_SECONDS: u64 = 120;
/// How long `braid cache prune` waits for an agent to clear its storages.
pub const CACHE_PRUNE_SECONDS: u64 = 600;
/// Labels one agent may carry (operator-set and detected together).
pub const AGENT_LABELS: usize = 64;
/// Bytes of an agent label's key.
pub const LABEL_KEY_BYTES: usize = 63;
/// Bytes of an agent label's value.
pub const LABEL_VALUE_BYTES: usize = 256;
/// `--require` entries in one build.
pub const REQUIREMENTS: usize = 32;
/// Bytes of one `--require` as typed.
pub const REQUIREMENT_BYTES: usize = 512;
/// Largest `--memory` of a job: 16 TiB.
pub const JOB_MEMORY_BYTES: u64 = 16 << 40;
/// Smallest `--memory` of a job: 6 MiB (docker's own floor).
pub const JOB_MEMORY_MIN_BYTES: u64 = 6 << 20;
/// Largest `--cpus` of a job, in thousandths of a CPU.
pub const JOB_CPU_MILLIS: u32 = 1024 * 1000;
/// Footprints (repository and platform) the coordinator keeps; past that
/// the least recently updated go.
pub const FOOTPRINTS: usize = 100_000;
/// Entries of the coordinator's result cache (one per platform of a
/// distinct build); past that the oldest go.
pub const RESULT_CACHE_ENTRIES: usize = 100_000;
