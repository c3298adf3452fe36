//! `kiln-scheduler init` and `kiln-scheduler token`: everything a small farm needs to run
//! securely, so that the secure setup is also the easy one.
//!
//! `init DIR` writes a CA, a server certificate for the scheduler and kiln-cache, a certificate
//! builders present to the scheduler (mutual TLS), one client token and one builder token, and
//! the tokens files the scheduler checks them against. Secrets are written `0600`, never over an
//! existing file; `init DIR --reissue-server` replaces only the server certificate, for new
//! names, signing it with the farm's existing CA.
//!
//! Roles cannot be swapped: the server certificate may only serve (serverAuth), the builder
//! certificate may only authenticate a client (clientAuth) and names no host, so a builder's key
//! can neither pose as the scheduler or the cache to collect tokens, nor a server's as a builder.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// The files `init` writes, by name within its directory.
pub const CA: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const SERVER_CERT: &str = "server.pem";
pub const SERVER_KEY: &str = "server.key";
pub const BUILDER_CERT: &str = "builder.pem";
pub const BUILDER_KEY: &str = "builder.key";
pub const CLIENT_TOKEN: &str = "client.token";
pub const BUILDER_TOKEN: &str = "builder.token";
pub const CLIENT_TOKENS: &str = "client-tokens";
pub const BUILDER_TOKENS: &str = "builder-tokens";

/// The certificates `init` makes expire at the start of the year this many years ahead.
const YEARS: i32 = 3;

/// Creates `path` with `text`, readable by its owner only when `secret`; an existing file is an
/// error, so `init` never replaces a farm's keys.
fn create(path: &Path, text: &str, secret: bool) -> anyhow::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn params(common_name: &str, names: &[String]) -> anyhow::Result<CertificateParams> {
    let mut p = CertificateParams::new(names.to_vec())
        .with_context(|| format!("a certificate for {names:?}"))?;
    p.distinguished_name.push(DnType::CommonName, common_name);
    p.distinguished_name
        .push(DnType::OrganizationName, "kiln farm");
    // Valid from last year, for clocks that lag, until three years from now.
    let year = 1970
        + (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            / 31_556_952) as i32;
    p.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    p.not_after = rcgen::date_time_ymd(year + YEARS, 1, 1);
    Ok(p)
}

/// The host names and addresses the server certificate covers: loopback, this host's name, and
/// `extra` (the names clients and builders will dial).
pub fn server_names(extra: &[String]) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    if let Ok(host) = nix::unistd::gethostname() {
        if let Some(host) = host.to_str().filter(|h| !h.is_empty()) {
            names.push(host.to_string());
        }
    }
    names.extend(extra.iter().cloned());
    names.dedup();
    names
}

/// Every file `init` writes.
const FILES: [&str; 10] = [
    CA,
    CA_KEY,
    SERVER_CERT,
    SERVER_KEY,
    BUILDER_CERT,
    BUILDER_KEY,
    CLIENT_TOKEN,
    BUILDER_TOKEN,
    CLIENT_TOKENS,
    BUILDER_TOKENS,
];

/// The CA's parameters. A reissue rebuilds them to sign with the CA's key: a certificate chains
/// to the CA through its issuer name and key identifier, both of which these and the key fix.
fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut ca = params("kiln farm CA", &[])?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(ca)
}

/// A leaf certificate for `names` with `usages`, signed by `ca`: its PEM and its key's.
fn leaf(
    ca: &Issuer<'_, KeyPair>,
    cn: &str,
    names: &[String],
    usages: Vec<ExtendedKeyUsagePurpose>,
) -> anyhow::Result<(String, String)> {
    let mut p = params(cn, names)?;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = usages;
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, ca)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The server certificate: it may only serve (serverAuth), for `names`.
fn server_leaf(ca: &Issuer<'_, KeyPair>, names: &[String]) -> anyhow::Result<(String, String)> {
    leaf(
        ca,
        "kiln scheduler and cache",
        names,
        vec![ExtendedKeyUsagePurpose::ServerAuth],
    )
}

/// Writes a new farm's CA, certificates and tokens into `dir` (created if missing).
pub fn farm(dir: &Path, extra_names: &[String]) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let existing: Vec<&str> = FILES
        .into_iter()
        .filter(|name| dir.join(name).exists())
        .collect();
    if !existing.is_empty() {
        anyhow::bail!(
            "{} already holds a farm's files ({}); init never replaces them, since every \
             builder and client holds copies.\n\
             For a server certificate with other names, keeping the CA and tokens:\n\
             \x20   kiln-scheduler init {} --reissue-server --name HOST...\n\
             To start a new farm (a new CA, certificates and tokens for every machine), move \
             the old files away first:\n\
             \x20   cd {} && mkdir old && mv {} old/",
            dir.display(),
            existing.join(", "),
            dir.display(),
            dir.display(),
            existing.join(" "),
        );
    }
    let ca_key = KeyPair::generate()?;
    let ca_pem_key = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params()?, ca_key)?;

    let (server, server_key) = server_leaf(&ca, &server_names(extra_names))?;
    // Builders present it to the scheduler and nothing else: clientAuth only, and no host
    // names, since the scheduler's --builder-ca check verifies the chain and the usage, never a
    // name. A builder's key must not be able to serve as the scheduler or the cache.
    let (builder, builder_key) = leaf(
        &ca,
        "kiln builder",
        &[],
        vec![ExtendedKeyUsagePurpose::ClientAuth],
    )?;
    let client_token = kiln_net::auth::generate();
    let builder_token = kiln_net::auth::generate();
    create(&dir.join(CA), &ca.pem(), false)?;
    create(&dir.join(CA_KEY), &ca_pem_key, true)?;
    create(&dir.join(SERVER_CERT), &server, false)?;
    create(&dir.join(SERVER_KEY), &server_key, true)?;
    create(&dir.join(BUILDER_CERT), &builder, false)?;
    create(&dir.join(BUILDER_KEY), &builder_key, true)?;
    create(&dir.join(CLIENT_TOKEN), &format!("{client_token}\n"), true)?;
    create(
        &dir.join(BUILDER_TOKEN),
        &format!("{builder_token}\n"),
        true,
    )?;
    create(
        &dir.join(CLIENT_TOKENS),
        &format!(
            "{}clients {}\n",
            TOKENS_HEADER,
            kiln_net::auth::hash(&client_token)
        ),
        false,
    )?;
    create(
        &dir.join(BUILDER_TOKENS),
        &format!(
            "{}builders {}\n",
            TOKENS_HEADER,
            kiln_net::auth::hash(&builder_token)
        ),
        false,
    )?;
    Ok(())
}

const TOKENS_HEADER: &str = "# NAME HASH [jobs=N]: a token's BLAKE3 hash, never the token.\n\
# Add one with `kiln-scheduler token`; delete a line to revoke. Read again on change.\n";

/// `kiln-scheduler token`: makes a new token, writes it to `out` (`0600`, not replacing a file)
/// and appends its line to `tokens`, so the scheduler accepts it from its next call on.
pub fn add_token(tokens: &Path, name: &str, jobs: Option<u32>, out: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        !name.is_empty() && !name.contains(char::is_whitespace) && !name.contains('#'),
        "a token's name is one word without '#', like ci or alice-laptop"
    );
    // The file must already parse, so a typo in it is not buried under a new line.
    kiln_net::auth::Tokens::open(tokens)?;
    let token = kiln_net::auth::generate();
    create(out, &format!("{token}\n"), true)?;
    let mut line = format!("{name} {}", kiln_net::auth::hash(&token));
    if let Some(jobs) = jobs {
        line.push_str(&format!(" jobs={jobs}"));
    }
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(tokens)
        .with_context(|| format!("cannot append to {}", tokens.display()))?;
    writeln!(file, "{line}").with_context(|| format!("cannot append to {}", tokens.display()))
}

/// `init DIR --reissue-server`: a new server certificate and key for `names` (beside loopback
/// and this host), signed by the farm's CA from `DIR/ca.key`, replacing `server.pem` and
/// `server.key`. Tokens, the CA and the builder certificate stay as they are, so no other
/// machine needs new files; the servers need the new pair and a restart.
pub fn reissue_server(dir: &Path, extra_names: &[String]) -> anyhow::Result<()> {
    let key_path = dir.join(CA_KEY);
    let ca_key = fs::read_to_string(&key_path).with_context(|| {
        format!(
            "cannot read {}: a server certificate the farm trusts is signed with the CA's key; \
             put the ca.key that init wrote (kept offline) back for the reissue",
            key_path.display()
        )
    })?;
    let ca_key = KeyPair::from_pem(&ca_key)
        .with_context(|| format!("{} is not a private key in PEM", key_path.display()))?;
    anyhow::ensure!(
        dir.join(CA).exists(),
        "{} is missing: a reissue signs with the farm's CA, which clients know as ca.pem",
        dir.join(CA).display()
    );
    let ca = Issuer::new(ca_params()?, ca_key);
    let (server, server_key) = server_leaf(&ca, &server_names(extra_names))?;
    replace(&dir.join(SERVER_CERT), &server, false)?;
    replace(&dir.join(SERVER_KEY), &server_key, true)
}

/// Writes `text` to a new file beside `path` and renames it over `path`, so a reader sees the
/// old file or the new one, never half of one.
fn replace(path: &Path, text: &str, secret: bool) -> anyhow::Result<()> {
    let mut fresh = path.as_os_str().to_owned();
    fresh.push(".new");
    let fresh = PathBuf::from(fresh);
    // A leftover of an interrupted reissue is ours to replace.
    let _ = fs::remove_file(&fresh);
    create(&fresh, text, secret)?;
    fs::rename(&fresh, path)
        .with_context(|| format!("cannot replace {} with {}", path.display(), fresh.display()))
}

/// What to run next, printed by `init` given `names` (its `--name`s): the addresses use the
/// first of them, and the servers listen beyond loopback when there is one.
pub fn next_steps(dir: &Path, names: &[String]) -> String {
    let f = |name: &str| -> PathBuf { dir.join(name) };
    // Without a --name the certificate covers only this machine: a one-machine farm.
    let (host, listen) = match names.first() {
        Some(name) if name.contains(':') => (format!("[{name}]"), "--listen [::]:7878 "),
        Some(name) => (name.clone(), "--listen 0.0.0.0:7878 "),
        None => ("localhost".to_string(), ""),
    };
    let cache_listen = if names.is_empty() {
        "127.0.0.1:8080"
    } else {
        "0.0.0.0:8080"
    };
    let renames: String = names
        .iter()
        .map(|n| format!(" --name {n}"))
        .collect::<String>();
    let other_names = if names.is_empty() {
        ": this machine only. For other machines, add the name they dial\n\
         \x20 kiln-scheduler init {dir} --reissue-server --name HOST\n\
         and have the servers listen beyond loopback (--listen 0.0.0.0:7878)."
            .to_string()
    } else {
        ". For more names, keeping everything else:\n\
         \x20 kiln-scheduler init {dir} --reissue-server{renames} --name HOST"
            .to_string()
    };
    let other_names = other_names
        .replace("{dir}", &dir.display().to_string())
        .replace("{renames}", &renames);
    format!(
        "wrote a CA, certificates and tokens to {dir}\n\n\
         scheduler:  kiln-scheduler {listen}--tls-cert {sc} --tls-key {sk} --builder-ca {ca} \\\n\
         \x20             --client-tokens {ct} --builder-tokens {bt}\n\
         builder:    kiln-builder --scheduler https://{host}:7878 --ca {ca} --token-file {btk} --work-dir DIR\n\
         \x20             (or --tls-cert {bc} --tls-key {bk} instead of --token-file)\n\
         cache:      kiln-cache --tls-cert {sc} --tls-key {sk} --tokens {ct} --listen {cache_listen} --dir DIR\n\
         clients:    KILN_SCHEDULER=https://{host}:7878 KILN_CA_FILE={ca} KILN_TOKEN_FILE={ctk}\n\
         \x20           KILN_REMOTE_CACHE=https://{host}:8080 (where the cache runs)\n\n\
         Copy client.token, builder.token and the keys only to the machines that need them. ca.key\n\
         signs nothing at run time: keep it offline.\n\
         The server certificate names {all}{other_names}",
        dir = dir.display(),
        sc = f(SERVER_CERT).display(),
        sk = f(SERVER_KEY).display(),
        ca = f(CA).display(),
        ct = f(CLIENT_TOKENS).display(),
        bt = f(BUILDER_TOKENS).display(),
        btk = f(BUILDER_TOKEN).display(),
        bc = f(BUILDER_CERT).display(),
        bk = f(BUILDER_KEY).display(),
        ctk = f(CLIENT_TOKEN).display(),
        all = server_names(names).join(", "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_steps_name_the_hosts_given_or_this_machine_alone() {
        let dir = Path::new("/etc/kiln/farm");
        let alone = next_steps(dir, &[]);
        assert!(
            alone.contains("KILN_SCHEDULER=https://localhost:7878"),
            "{alone}"
        );
        assert!(!alone.contains("kiln-scheduler --listen"), "{alone}");
        assert!(
            alone.contains("init /etc/kiln/farm --reissue-server --name HOST"),
            "{alone}"
        );

        let names = ["sched.example".to_string(), "10.0.0.5".to_string()];
        let farm = next_steps(dir, &names);
        assert!(
            farm.contains("--scheduler https://sched.example:7878"),
            "{farm}"
        );
        assert!(
            farm.contains("kiln-scheduler --listen 0.0.0.0:7878"),
            "{farm}"
        );
        assert!(
            farm.contains("sched.example, 10.0.0.5. For more names"),
            "{farm}"
        );
        assert!(
            farm.contains(
                "init /etc/kiln/farm --reissue-server --name sched.example --name 10.0.0.5 --name HOST"
            ),
            "{farm}"
        );
        // An IPv6 address is bracketed in a URL.
        let v6 = next_steps(dir, &["fd00::1".to_string()]);
        assert!(v6.contains("https://[fd00::1]:7878"), "{v6}");
    }
}
