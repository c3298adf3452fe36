//! kiln jails (being built).
