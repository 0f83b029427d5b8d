//! The gRPC services (`Builds` for clients, `Agents` for agents, `Admin`
//! for operators) and the conversions between the wire and the model.

pub mod admin;
pub mod agents;
pub mod builds;
pub mod convert;
