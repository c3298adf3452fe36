//! kiln-builder (being built).
