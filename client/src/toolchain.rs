//! Toolchain packaging for the farm (being built).
