//! The include closure of a compile, for the farm (being built).
