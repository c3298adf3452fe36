//! Configuration: a TOML file, overridden by `KILN_*` variables, overridden by flags.
//!
//! [`Config::load`] is the one place that merges the three; the result is plain data passed
//! explicitly to whatever needs it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::env::Env;

/// Settings in effect for one invocation.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The local cache directory (`dir`, `KILN_DIR`).
    pub dir: PathBuf,
    /// Size cap of the local cache in bytes (`max_size`, `KILN_CACHE_SIZE`; "10G", "500M").
    pub max_size: u64,
    /// Entry-count cap of the local cache, 0 for none (`max_files`, `KILN_CACHE_FILES`).
    pub max_files: u64,
    /// Absolute paths under this directory are made relative to the working directory before
    /// they are hashed, so checkouts in different places share results (`base_dir`,
    /// `KILN_BASE_DIR`).
    pub base_dir: Option<PathBuf>,
    /// Hash the working directory when debug info records it (`hash_dir`, `KILN_HASH_DIR`).
    /// Turning this off shares results between directories at the price of a wrong
    /// `DW_AT_comp_dir`.
    pub hash_dir: bool,
    /// Run every compile directly, without the cache (`disable`, `KILN_DISABLE`).
    pub disable: bool,
    /// Use hits but store nothing (`read_only`, `KILN_READONLY`).
    pub read_only: bool,
    /// Ignore hits and store fresh results (`recache`, `KILN_RECACHE`).
    pub recache: bool,
    /// Keep statistics (`stats`, `KILN_STATS`).
    pub stats: bool,
    /// The shared cache used as a second tier (`remote_cache`, `KILN_REMOTE_CACHE`): a
    /// `kiln-cache` at `https://HOST:PORT` (`http://` for one run `--insecure`), or any Remote
    /// Execution API cache at `grpcs://HOST:PORT` (`grpc://` without TLS).
    pub remote_cache: Option<String>,
    /// The REAPI instance name kiln's entries go in, for a `grpc(s)://` remote cache
    /// (`remote_instance`, `KILN_REMOTE_INSTANCE`); none is the server's default instance.
    pub remote_instance: Option<String>,
    /// Read from the remote tier but never write to it (`no_push`, `KILN_NO_PUSH`).
    pub no_push: bool,
    /// Upload to the remote tier from a process of its own, so a compile does not wait for
    /// the network (`remote_async`, `KILN_REMOTE_ASYNC`).
    pub remote_async: bool,
    /// Send misses to the compile farm (`dist`, `KILN_DIST`, `kiln --dist`).
    pub dist: bool,
    /// Share one warm connection to the scheduler between compiles through a per-user agent
    /// that kiln starts on demand (`agent`, `KILN_AGENT`; on by default).
    pub agent: bool,
    /// The farm's scheduler (`scheduler`, `KILN_SCHEDULER`, `https://HOST:PORT`, or
    /// `http://` for one run `--insecure`).
    pub scheduler: Option<String>,
    /// The CA that the scheduler's and the remote cache's certificates chain to (`ca_file`,
    /// `KILN_CA_FILE`); without it, the system's roots.
    pub ca_file: Option<PathBuf>,
    /// A file holding the client token presented to the scheduler and the remote cache
    /// (`token_file`, `KILN_TOKEN_FILE`).
    pub token_file: Option<PathBuf>,
    /// The share of farm results compiled a second time here and compared, from 0 to 1
    /// (`cross_check`, `KILN_CROSS_CHECK`): a builder whose outputs differ is reported suspect.
    pub cross_check: f64,
    /// Toolchain archives that stand in for compilers on the farm, by the compiler's absolute
    /// path (`[dist_toolchains]` in the file: `"/usr/bin/arm-linux-gnueabihf-gcc" = "/opt/arm.tar.gz"`).
    pub dist_toolchains: std::collections::BTreeMap<PathBuf, PathBuf>,
    /// Where the file came from, for `kiln config`.
    pub source: Option<PathBuf>,
    /// Where each setting came from, by its name in the file, for `kiln config`.
    pub origins: Vec<(&'static str, Origin)>,
}

/// Which layer of the configuration gave a setting its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Default,
    File,
    /// The environment variable that set it.
    Env(&'static str),
    /// A flag on kiln's command line.
    Flag,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::File => f.write_str("file"),
            Origin::Env(var) => write!(f, "env {var}"),
            Origin::Flag => f.write_str("flag"),
        }
    }
}

impl Config {
    /// Where the setting named `name` (as in the file) came from.
    pub fn origin(&self, name: &str) -> Origin {
        self.origins
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(Origin::Default, |(_, o)| *o)
    }
}

/// The TOML file's shape: every field optional, unknown fields refused with their name.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    dir: Option<PathBuf>,
    max_size: Option<SizeValue>,
    max_files: Option<u64>,
    base_dir: Option<PathBuf>,
    hash_dir: Option<bool>,
    disable: Option<bool>,
    read_only: Option<bool>,
    recache: Option<bool>,
    stats: Option<bool>,
    remote_cache: Option<String>,
    remote_instance: Option<String>,
    no_push: Option<bool>,
    remote_async: Option<bool>,
    dist: Option<bool>,
    agent: Option<bool>,
    scheduler: Option<String>,
    ca_file: Option<PathBuf>,
    token_file: Option<PathBuf>,
    cross_check: Option<f64>,
    dist_toolchains: Option<std::collections::BTreeMap<PathBuf, PathBuf>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Bytes(u64),
    Text(String),
}

/// Flags given on kiln's own command line (before the compiler).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub dir: Option<PathBuf>,
    pub disable: Option<bool>,
    pub recache: Option<bool>,
    pub dist: Option<bool>,
}

impl Config {
    /// Merges the configuration file (`KILN_CONFIG` or `<config dir>/kiln/kiln.toml`, absent is
    /// fine), the environment and `flags`.
    pub fn load(env: &Env, flags: &Overrides) -> anyhow::Result<Config> {
        let (path, explicit) = match env.get("KILN_CONFIG") {
            Some(p) => (Some(PathBuf::from(p)), true),
            None => (
                config_home(env).map(|d| d.join("kiln").join("kiln.toml")),
                false,
            ),
        };
        let mut file = FileConfig::default();
        let mut source = None;
        if let Some(path) = &path {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    file = toml::from_str(&text).with_context(|| {
                        format!("invalid configuration file {}", path.display())
                    })?;
                    source = Some(path.clone());
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {}
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "cannot read configuration file {} (KILN_CONFIG)",
                            path.display()
                        )
                    })
                }
            }
        }

        // Where each setting comes from, decided before the layers are merged (and consumed).
        let origin = |flag: bool, var: &'static str, in_file: bool| {
            if flag {
                Origin::Flag
            } else if env.get(var).is_some() {
                Origin::Env(var)
            } else if in_file {
                Origin::File
            } else {
                Origin::Default
            }
        };
        let f = &file;
        let origins = vec![
            (
                "dir",
                origin(flags.dir.is_some(), "KILN_DIR", f.dir.is_some()),
            ),
            (
                "max_size",
                origin(false, "KILN_CACHE_SIZE", f.max_size.is_some()),
            ),
            (
                "max_files",
                origin(false, "KILN_CACHE_FILES", f.max_files.is_some()),
            ),
            (
                "base_dir",
                origin(false, "KILN_BASE_DIR", f.base_dir.is_some()),
            ),
            (
                "hash_dir",
                origin(false, "KILN_HASH_DIR", f.hash_dir.is_some()),
            ),
            (
                "read_only",
                origin(false, "KILN_READONLY", f.read_only.is_some()),
            ),
            (
                "recache",
                origin(flags.recache.is_some(), "KILN_RECACHE", f.recache.is_some()),
            ),
            (
                "disable",
                origin(flags.disable.is_some(), "KILN_DISABLE", f.disable.is_some()),
            ),
            ("stats", origin(false, "KILN_STATS", f.stats.is_some())),
            (
                "remote_cache",
                origin(false, "KILN_REMOTE_CACHE", f.remote_cache.is_some()),
            ),
            (
                "remote_instance",
                origin(false, "KILN_REMOTE_INSTANCE", f.remote_instance.is_some()),
            ),
            (
                "no_push",
                origin(false, "KILN_NO_PUSH", f.no_push.is_some()),
            ),
            (
                "remote_async",
                origin(false, "KILN_REMOTE_ASYNC", f.remote_async.is_some()),
            ),
            (
                "dist",
                origin(flags.dist.is_some(), "KILN_DIST", f.dist.is_some()),
            ),
            ("agent", origin(false, "KILN_AGENT", f.agent.is_some())),
            (
                "scheduler",
                origin(false, "KILN_SCHEDULER", f.scheduler.is_some()),
            ),
            (
                "ca_file",
                origin(false, "KILN_CA_FILE", f.ca_file.is_some()),
            ),
            (
                "token_file",
                origin(false, "KILN_TOKEN_FILE", f.token_file.is_some()),
            ),
            (
                "cross_check",
                origin(false, "KILN_CROSS_CHECK", f.cross_check.is_some()),
            ),
        ];
        let dir = match flags.dir.clone().or_else(|| env.get("KILN_DIR").map(PathBuf::from)).or(file.dir) {
            Some(d) => d,
            None => match cache_home(env) {
                Some(home) => home.join("kiln"),
                None => bail!("cannot find a cache directory: set KILN_DIR (neither XDG_CACHE_HOME nor HOME is set)"),
            },
        };
        let max_size = match env.get("KILN_CACHE_SIZE") {
            Some(text) => parse_size(text).context("invalid KILN_CACHE_SIZE")?,
            None => match file.max_size {
                Some(SizeValue::Bytes(b)) => b,
                Some(SizeValue::Text(t)) => {
                    parse_size(&t).context("invalid max_size in the configuration file")?
                }
                None => 10 << 30,
            },
        };
        let max_files = match env.get("KILN_CACHE_FILES") {
            Some(t) => t
                .parse()
                .with_context(|| format!("invalid KILN_CACHE_FILES {t:?}: want a whole number"))?,
            None => file.max_files.unwrap_or(0),
        };
        let flag = |name: &str, file_value: Option<bool>, default: bool| -> anyhow::Result<bool> {
            match env.get(name) {
                Some(text) => env.flag(name).with_context(|| {
                    format!("invalid {name}={text:?}: want 1/0, true/false, yes/no or on/off")
                }),
                None => Ok(file_value.unwrap_or(default)),
            }
        };
        let base_dir = env
            .get("KILN_BASE_DIR")
            .map(PathBuf::from)
            .or(file.base_dir);
        if let Some(b) = &base_dir {
            if !b.is_absolute() {
                bail!("base_dir must be an absolute path, not {}", b.display());
            }
        }
        Ok(Config {
            dir,
            max_size,
            max_files,
            base_dir,
            hash_dir: flag("KILN_HASH_DIR", file.hash_dir, true)?,
            disable: flags
                .disable
                .map_or_else(|| flag("KILN_DISABLE", file.disable, false), Ok)?,
            read_only: flag("KILN_READONLY", file.read_only, false)?,
            recache: flags
                .recache
                .map_or_else(|| flag("KILN_RECACHE", file.recache, false), Ok)?,
            stats: flag("KILN_STATS", file.stats, true)?,
            remote_cache: match env
                .get("KILN_REMOTE_CACHE")
                .map(str::to_owned)
                .or(file.remote_cache)
            {
                Some(url) => {
                    crate::remote::Protocol::of(&url).map_err(anyhow::Error::msg)?;
                    Some(url)
                }
                None => None,
            },
            remote_instance: match env
                .get("KILN_REMOTE_INSTANCE")
                .map(str::to_owned)
                .or(file.remote_instance)
            {
                Some(name)
                    if name.starts_with('/') || name.ends_with('/') || name.contains("//") =>
                {
                    bail!("invalid remote_instance {name:?} (KILN_REMOTE_INSTANCE): a REAPI instance name is path segments joined by '/', like \"main\" or \"team/ci\"")
                }
                other => other.filter(|n| !n.is_empty()),
            },
            no_push: flag("KILN_NO_PUSH", file.no_push, false)?,
            remote_async: flag("KILN_REMOTE_ASYNC", file.remote_async, false)?,
            dist: flags
                .dist
                .map_or_else(|| flag("KILN_DIST", file.dist, false), Ok)?,
            agent: flag("KILN_AGENT", file.agent, true)?,
            scheduler: match env
                .get("KILN_SCHEDULER")
                .map(str::to_owned)
                .or(file.scheduler)
            {
                Some(url) if !is_url(&url) => {
                    bail!(
                        "scheduler {url:?} is not an https:// or http:// URL (KILN_SCHEDULER=https://HOST:PORT)"
                    )
                }
                other => other,
            },
            ca_file: env.get("KILN_CA_FILE").map(PathBuf::from).or(file.ca_file),
            token_file: env
                .get("KILN_TOKEN_FILE")
                .map(PathBuf::from)
                .or(file.token_file),
            cross_check: match env.get("KILN_CROSS_CHECK") {
                Some(text) => text.trim().parse::<f64>().ok(),
                None => file.cross_check.or(Some(0.0)),
            }
            .filter(|r| (0.0..=1.0).contains(r))
            .with_context(|| {
                "invalid cross_check (KILN_CROSS_CHECK): want a share from 0 to 1, like 0.01"
            })?,
            dist_toolchains: file.dist_toolchains.unwrap_or_default(),
            source,
            origins,
        })
    }
}

fn is_url(text: &str) -> bool {
    text.starts_with("https://") || text.starts_with("http://")
}

impl Config {
    /// The TLS files for the farm's and remote cache's `https://` URLs.
    pub fn tls(&self) -> kiln_net::tls::ClientFiles {
        kiln_net::tls::ClientFiles {
            ca: self.ca_file.clone(),
            identity: None,
        }
    }

    /// The token presented to the scheduler and the remote cache.
    pub fn credential(&self) -> kiln_net::auth::Credential {
        match &self.token_file {
            Some(path) => kiln_net::auth::Credential::File(path.clone()),
            None => kiln_net::auth::Credential::None,
        }
    }
}

fn config_home(env: &Env) -> Option<PathBuf> {
    env.get("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| env.get("HOME").map(|h| Path::new(h).join(".config")))
}

fn cache_home(env: &Env) -> Option<PathBuf> {
    env.get("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env.get("HOME").map(|h| Path::new(h).join(".cache")))
}

/// Parses a size for the configuration: see [`kiln_cache::parse_size`].
pub fn parse_size(text: &str) -> anyhow::Result<u64> {
    kiln_cache::parse_size(text).map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        for (text, want) in [
            ("4096", 4096),
            ("10G", 10 << 30),
            ("500M", 500 << 20),
            ("1.5GiB", 3 << 29),
            ("2k", 2048),
            ("1TB", 1 << 40),
        ] {
            assert_eq!(parse_size(text).unwrap(), want, "{text}");
        }
        for bad in ["", "G", "-1G", "ten", "1X"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn file_then_env_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kiln.toml");
        std::fs::write(
            &file,
            "dir = \"/from/file\"\nmax_size = \"2G\"\nhash_dir = false\n",
        )
        .unwrap();
        let cfg = |pairs: &[(&str, &str)], flags: &Overrides| {
            let mut all = vec![("KILN_CONFIG", file.to_str().unwrap())];
            all.extend_from_slice(pairs);
            Config::load(&Env::from_pairs(all.iter().copied()), flags).unwrap()
        };
        let c = cfg(&[], &Overrides::default());
        assert_eq!(
            (c.dir.as_path(), c.max_size, c.hash_dir),
            (Path::new("/from/file"), 2 << 30, false)
        );
        let c = cfg(
            &[("KILN_DIR", "/from/env"), ("KILN_CACHE_SIZE", "1M")],
            &Overrides::default(),
        );
        assert_eq!(
            (c.dir.as_path(), c.max_size),
            (Path::new("/from/env"), 1 << 20)
        );
        let flags = Overrides {
            dir: Some("/from/flag".into()),
            ..Overrides::default()
        };
        let c = cfg(&[("KILN_DIR", "/from/env")], &flags);
        assert_eq!(c.dir, Path::new("/from/flag"));
    }

    #[test]
    fn each_setting_says_where_it_came_from() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kiln.toml");
        std::fs::write(&file, "max_size = \"2G\"\nhash_dir = false\ndist = true\n").unwrap();
        let env = Env::from_pairs([
            ("KILN_CONFIG", file.to_str().unwrap()),
            ("KILN_DIR", "/from/env"),
            ("KILN_HASH_DIR", "1"),
        ]);
        let flags = Overrides {
            dist: Some(true),
            ..Overrides::default()
        };
        let c = Config::load(&env, &flags).unwrap();
        for (name, want) in [
            ("dir", Origin::Env("KILN_DIR")),
            ("max_size", Origin::File),
            ("hash_dir", Origin::Env("KILN_HASH_DIR")),
            ("dist", Origin::Flag),
            ("stats", Origin::Default),
            ("scheduler", Origin::Default),
        ] {
            assert_eq!(c.origin(name), want, "{name}");
        }
        assert_eq!(c.origin("max_size").to_string(), "file");
        assert_eq!(c.origin("dir").to_string(), "env KILN_DIR");
    }

    #[test]
    fn bad_settings_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kiln.toml");
        std::fs::write(&file, "max_sise = 3\n").unwrap();
        let env = Env::from_pairs([("KILN_CONFIG", file.to_str().unwrap())]);
        let err = format!(
            "{:#}",
            Config::load(&env, &Overrides::default()).unwrap_err()
        );
        assert!(err.contains("max_sise"), "{err}");
        let env = Env::from_pairs([("KILN_DIR", "/x"), ("KILN_DISABLE", "maybe")]);
        let err = format!(
            "{:#}",
            Config::load(&env, &Overrides::default()).unwrap_err()
        );
        assert!(err.contains("KILN_DISABLE"), "{err}");
        let env = Env::from_pairs([("KILN_CONFIG", "/nonexistent/kiln.toml")]);
        assert!(Config::load(&env, &Overrides::default()).is_err());
        // A remote cache kiln cannot speak to says which forms it can.
        let env = Env::from_pairs([("KILN_DIR", "/x"), ("KILN_REMOTE_CACHE", "cache:9092")]);
        let err = format!(
            "{:#}",
            Config::load(&env, &Overrides::default()).unwrap_err()
        );
        assert!(
            err.contains("grpcs://HOST:PORT") && err.contains("https://HOST:PORT"),
            "{err}"
        );
        let env = Env::from_pairs([
            ("KILN_DIR", "/x"),
            ("KILN_REMOTE_CACHE", "grpc://cache:9092"),
            ("KILN_REMOTE_INSTANCE", "/main"),
        ]);
        let err = format!(
            "{:#}",
            Config::load(&env, &Overrides::default()).unwrap_err()
        );
        assert!(err.contains("KILN_REMOTE_INSTANCE"), "{err}");
        let env = Env::from_pairs([
            ("KILN_DIR", "/x"),
            ("KILN_REMOTE_CACHE", "grpcs://cache:443"),
            ("KILN_REMOTE_INSTANCE", "team/ci"),
        ]);
        let c = Config::load(&env, &Overrides::default()).unwrap();
        assert_eq!(c.remote_instance.as_deref(), Some("team/ci"));
    }
}
