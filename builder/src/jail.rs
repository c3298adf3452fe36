//! The jail backends a builder can run jobs in, behind the one type its pool and jobs use.

use std::path::{Path, PathBuf};

use kiln_jails::linux::{self, LinuxJail};
use kiln_jails::pot::{self, PotConfig, PotJail};
use kiln_jails::{Backend, JailError, Outcome, RunSpec};

use crate::Config;

/// Which backend a builder uses, with its settings.
// One value per builder: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum JailKind {
    /// Namespaces over overlayfs, entered through the `kiln-jail` helper
    /// ([`Config::jail_helper`]); containers live under the work directory.
    #[default]
    Linux,
    /// FreeBSD jails managed by pot (docs/freebsd.md).
    Pot(PotConfig),
}

/// The builder's backend.
#[allow(clippy::large_enum_variant)] // one per builder
#[derive(Debug)]
pub enum Jail {
    Linux(LinuxJail),
    Pot(PotJail),
}

#[derive(Debug)]
pub enum Image {
    Linux(linux::Image),
    Pot(pot::Image),
}

#[derive(Debug)]
pub enum Container {
    Linux(linux::Container),
    Pot(pot::Container),
}

impl Jail {
    /// The backend `config` asks for.
    pub fn open(config: &Config) -> Result<Jail, JailError> {
        match &config.jail {
            JailKind::Linux => LinuxJail::new(
                &config.work_dir.join("jail"),
                &config.jail_helper,
                config.limits,
            )
            .map(Jail::Linux),
            JailKind::Pot(pot) => PotJail::new(pot.clone(), config.limits).map(Jail::Pot),
        }
    }

    /// How the builder names its jails to the scheduler.
    pub fn kind(&self) -> &'static str {
        match self {
            Jail::Linux(j) if j.rootless() => "linux-rootless",
            Jail::Linux(_) => "linux",
            Jail::Pot(_) => "pot",
        }
    }

    /// Who owns the directories the job in `uid` writes to ([`LinuxJail::owner`]).
    pub fn owner(&self, uid: u32) -> (u32, u32) {
        match self {
            Jail::Linux(j) => j.owner(uid),
            Jail::Pot(_) => (uid, uid),
        }
    }

    /// The uid (and gid) the job in `slot` runs as: one per slot in Linux jails; in pots, the
    /// template's jail user (each pot is a jail of its own, and jexec takes a user name).
    pub fn job_uid(&self, uid_base: u32, slot: u32) -> u32 {
        match self {
            Jail::Linux(_) => uid_base + slot,
            Jail::Pot(pot) => pot.user().uid,
        }
    }
}

fn mismatch() -> JailError {
    JailError::Setup("an image or container of another jail backend".into())
}

impl Backend for Jail {
    type Image = Image;
    type Container = Container;

    fn cleanup_leftovers(&self) -> Result<usize, JailError> {
        match self {
            Jail::Linux(j) => j.cleanup_leftovers(),
            Jail::Pot(j) => j.cleanup_leftovers(),
        }
    }

    fn make_image(&self, key: &str, archive: &Path) -> Result<Image, JailError> {
        match self {
            Jail::Linux(j) => j.make_image(key, archive).map(Image::Linux),
            Jail::Pot(j) => j.make_image(key, archive).map(Image::Pot),
        }
    }

    fn destroy_image(&self, image: &Image) -> Result<(), JailError> {
        match (self, image) {
            (Jail::Linux(j), Image::Linux(i)) => j.destroy_image(i),
            (Jail::Pot(j), Image::Pot(i)) => j.destroy_image(i),
            _ => Err(mismatch()),
        }
    }

    fn make_container(&self, image: &Image) -> Result<Container, JailError> {
        match (self, image) {
            (Jail::Linux(j), Image::Linux(i)) => j.make_container(i).map(Container::Linux),
            (Jail::Pot(j), Image::Pot(i)) => j.make_container(i).map(Container::Pot),
            _ => Err(mismatch()),
        }
    }

    fn root(&self, container: &Container) -> PathBuf {
        match (self, container) {
            (Jail::Linux(j), Container::Linux(c)) => j.root(c),
            (Jail::Pot(j), Container::Pot(c)) => j.root(c),
            // Never made: containers come from this backend. A root that resolves nothing.
            _ => PathBuf::from("/nonexistent"),
        }
    }

    fn outputs(&self, container: &Container) -> PathBuf {
        match (self, container) {
            (Jail::Linux(j), Container::Linux(c)) => j.outputs(c),
            (Jail::Pot(j), Container::Pot(c)) => j.outputs(c),
            _ => PathBuf::from("/nonexistent"),
        }
    }

    fn links_inputs(&self) -> bool {
        match self {
            Jail::Linux(j) => j.links_inputs(),
            Jail::Pot(j) => j.links_inputs(),
        }
    }

    fn keeps_inputs(&self) -> bool {
        match self {
            Jail::Linux(j) => j.keeps_inputs(),
            Jail::Pot(j) => j.keeps_inputs(),
        }
    }

    fn run(&self, container: &Container, spec: &RunSpec) -> Result<Outcome, JailError> {
        match (self, container) {
            (Jail::Linux(j), Container::Linux(c)) => j.run(c, spec),
            (Jail::Pot(j), Container::Pot(c)) => j.run(c, spec),
            _ => Err(mismatch()),
        }
    }

    fn reset(&self, container: &Container, image: &Image) -> Result<(), JailError> {
        match (self, container, image) {
            (Jail::Linux(j), Container::Linux(c), Image::Linux(i)) => j.reset(c, i),
            (Jail::Pot(j), Container::Pot(c), Image::Pot(i)) => j.reset(c, i),
            _ => Err(mismatch()),
        }
    }

    fn destroy_container(&self, container: &Container) -> Result<(), JailError> {
        match (self, container) {
            (Jail::Linux(j), Container::Linux(c)) => j.destroy_container(c),
            (Jail::Pot(j), Container::Pot(c)) => j.destroy_container(c),
            _ => Err(mismatch()),
        }
    }
}
