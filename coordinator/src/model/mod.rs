//! The coordinator's records and states: builds, jobs, phases, images,
//! agents, tokens, roles and callers. Everyone in the crate may use them;
//! they use nothing of the crate.

mod access;
mod agent;
mod build;
mod time;

pub use access::{Caller, Role, TokenRecord};
pub use agent::{AgentState, Builder, CertStamp, Declared, Delivered, Delivery, valid_agent_name};
pub use build::{
    AnnotationLevel, BuildRecord, BuildStatus, FailedStep, Footprint, Image, IndexFormat, JobProvenance, JobRecord,
    JobStatus, Phase, PhaseRecord,
};
pub use time::{Clock, ManualClock, SystemClock, from_timestamp, now_ms, timestamp};
