//! `kiln`, the compiler wrapper: argument classification, cache keys, the local cache flow and
//! statistics. The binary (`main.rs`) only parses kiln's own command line and calls in here.

pub mod agent;
pub mod args;
pub mod closure;
mod codec;
pub mod compile;
pub mod compiler;
pub mod config;
pub mod depfile;
pub mod dist;
pub mod env;
pub mod files;
pub mod gocache;
pub mod log;
pub mod manifest;
pub mod masquerade;
mod names;
pub mod process;
mod progress;
pub mod remote;
pub mod result;
pub mod search_path;
pub mod stats;
#[cfg(test)]
mod testing;
pub mod toolchain;
