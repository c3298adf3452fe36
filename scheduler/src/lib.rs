//! kiln-scheduler (being built).
