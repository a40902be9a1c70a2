//! kiln-agent: the host agent of a Kiln node, and the library behind
//! `kilnctl`.
//!
//! The agent owns the node's desired state (images, networks, volumes, VMs,
//! API tokens) in a redb database, serves it as HTTP/JSON under `/v1` on a
//! root-only unix socket and on TCP with TLS and bearer tokens, and closes
//! the gap between desired and observed state: it starts one `kiln-vmm`
//! process per VM (never as a child that dies with it), re-adopts running
//! VMs after its own restart, and records every state change as an event.
//!
//! Resources have the shape the cluster will later replicate unchanged: a
//! stable id, a name unique per kind, a generation bumped by every change
//! of desired state, timestamps, a spec and an observed status.

pub mod api;
/// The evidence and its verifier live in their own crate (kilnctl and the
/// fuzzer use them without the agent); here under their old name.
pub use kiln_attest as attest;
pub mod auth;
pub mod cgroup;
pub mod client;
pub mod db;
pub mod error;
pub mod image_policy;
pub mod images;
pub mod model;
pub mod netdev;
pub mod node;
pub mod paths;
pub mod pki;
pub mod server;
pub mod store;
pub mod supervisor;
pub mod tpm;
pub mod trust;
pub mod validate;
pub mod vmm_client;
pub mod volume_keys;
