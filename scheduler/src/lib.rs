//! `kiln-scheduler`: the builder registry, job placement and relay.
//!
//! Builders dial in and keep one `Join` stream each; clients open one `Compile` stream per job.
//! The scheduler places a job ([`placement::place`], a pure function), relays the client's
//! chunks to the chosen builder and the builder's answers back, and never looks inside a
//! payload: chunk bytes move from one message to the next without a copy. The one exception is
//! toolchains, which it keeps in a small content-addressed cache so that a builder that lacks one
//! gets it from here instead of from the client.
//!
//! A builder lost mid-job (its stream ends, or it stays silent for three heartbeats) has its jobs
//! placed again elsewhere; after [`Config::max_attempts`] builders have failed a job, the client
//! is told to compile locally. "No capacity" is an immediate answer, never a queue.

pub mod auth;
mod fallbacks;
pub mod init;
pub mod jobs;
mod metrics;
pub mod placement;
mod service;
mod toolchains;

pub use service::{serve, serve_listeners, Config, Scheduler};
