//! The `linux` backend on a system that is not Linux: it cannot be made, and says so. Its types
//! have no values, so code written against the backend builds everywhere and the builder picks
//! the backend the host offers (`--jail pot` on FreeBSD).

use std::path::{Path, PathBuf};

use crate::{Backend, JailError, Limits, Outcome, RunSpec};

fn unavailable() -> JailError {
    JailError::Setup(format!(
        "the linux jail backend needs Linux, and this is {}; use --jail pot on FreeBSD",
        std::env::consts::OS
    ))
}

/// Never made off Linux.
#[derive(Debug)]
pub enum LinuxJail {}

#[derive(Debug)]
pub enum Image {}

#[derive(Debug)]
pub enum Container {}

impl LinuxJail {
    pub fn new(_work: &Path, _helper: &Path, _limits: Limits) -> Result<LinuxJail, JailError> {
        Err(unavailable())
    }

    pub fn rootless(&self) -> bool {
        match *self {}
    }

    pub fn owner(&self, _uid: u32) -> (u32, u32) {
        match *self {}
    }
}

/// Nothing to make private where the backend does not run.
pub fn private_mounts() -> Result<(), JailError> {
    Err(unavailable())
}

impl Backend for LinuxJail {
    type Image = Image;
    type Container = Container;

    fn cleanup_leftovers(&self) -> Result<usize, JailError> {
        match *self {}
    }
    fn make_image(&self, _key: &str, _archive: &Path) -> Result<Image, JailError> {
        match *self {}
    }
    fn destroy_image(&self, image: &Image) -> Result<(), JailError> {
        match *image {}
    }
    fn make_container(&self, image: &Image) -> Result<Container, JailError> {
        match *image {}
    }
    fn root(&self, container: &Container) -> PathBuf {
        match *container {}
    }
    fn run(&self, container: &Container, _spec: &RunSpec) -> Result<Outcome, JailError> {
        match *container {}
    }
    fn reset(&self, container: &Container, _image: &Image) -> Result<(), JailError> {
        match *container {}
    }
    fn destroy_container(&self, container: &Container) -> Result<(), JailError> {
        match *container {}
    }
}

pub mod helper {
    //! `kiln-jail` enters Linux jails; elsewhere it only explains itself.

    pub fn main() -> std::process::ExitCode {
        eprintln!(
            "kiln-jail: enters Linux jails for kiln-builder, and has nothing to do on {}",
            std::env::consts::OS
        );
        std::process::ExitCode::from(2)
    }
}
