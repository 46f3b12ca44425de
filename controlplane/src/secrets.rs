//! Secrets given as files: the `*-file` forms of `--admin-token`, `--static-auth-secret`,
//! `--user` and `uturn admin --password` (and their config keys). A secret on the command line
//! shows in `/proc/PID/cmdline` to every local user and is passed again to the new process of a
//! hot upgrade; a file (mode 0600, or 0400) or an environment variable (`UTURN_*`, readable
//! only by the process's user and root in `/proc/PID/environ`) is not.
//!
//! Each file is read when the configuration is (at start and on SIGHUP), so rotating a secret is
//! rewriting its file and sending SIGHUP.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// The environment variable of `--admin-token` (relay and `uturn admin`).
pub const ENV_ADMIN_TOKEN: &str = "UTURN_ADMIN_TOKEN";
/// The environment variable of `--static-auth-secret` (one secret) and `uturn credential --secret`.
pub const ENV_STATIC_AUTH_SECRET: &str = "UTURN_STATIC_AUTH_SECRET";
/// The environment variable of `--user` (one NAME:PASSWORD).
pub const ENV_USER: &str = "UTURN_USER";
/// The environment variable of `uturn admin ... --password`.
pub const ENV_PASSWORD: &str = "UTURN_PASSWORD";

/// The file's text without its trailing line break(s): one secret (a token, a password).
/// Errors: unreadable, or empty after trimming.
pub fn read_one(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let s = text.trim_end_matches(['\n', '\r']);
    if s.is_empty() {
        bail!("{} is empty", path.display());
    }
    Ok(s.to_owned())
}

/// The file's lines that are neither empty nor comments (`#` first), each without its line
/// break: one secret per line, in order. Errors: unreadable, or no such line.
pub fn read_lines(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let lines: Vec<String> = text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    if lines.is_empty() {
        bail!("{} holds no entry", path.display());
    }
    Ok(lines)
}

/// `NAME:PASSWORD` lines of `path` ([`read_lines`]) as users. Errors: a line without ':' (its
/// number is given, never its text), or a name twice.
pub fn read_users(path: &Path) -> Result<BTreeMap<String, String>> {
    let mut users = BTreeMap::new();
    for (i, line) in read_lines(path)?.iter().enumerate() {
        let Some((name, pass)) = line.split_once(':') else {
            bail!("{}: entry {}: expected NAME:PASSWORD", path.display(), i + 1);
        };
        if users.insert(name.to_owned(), pass.to_owned()).is_some() {
            bail!("{}: user {name:?} given twice", path.display());
        }
    }
    Ok(users)
}

/// One of a value and a file naming it, from `what` (a flag or key name): the value, the file's
/// secret, or none. Errors: both given, or the file unreadable.
pub fn one_of(what: &str, value: Option<String>, file: Option<&Path>) -> Result<Option<String>> {
    match (value, file) {
        (Some(_), Some(_)) => bail!("give {what} or {what}-file, not both"),
        (Some(v), None) => Ok(Some(v)),
        (None, Some(p)) => read_one(p).map(Some).with_context(|| format!("{what}-file")),
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(tag: &str, text: &str) -> std::path::PathBuf {
        let p =
            std::env::temp_dir().join(format!("uturn-secret-{tag}-{}-{}", std::process::id(), rand::random::<u32>()));
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn files_of_secrets() {
        let p = file("one", "tok en\r\n\n");
        assert_eq!(read_one(&p).unwrap(), "tok en");
        assert_eq!(one_of("admin-token", None, Some(&p)).unwrap().as_deref(), Some("tok en"));
        assert!(one_of("admin-token", Some("x".into()), Some(&p)).is_err());
        assert_eq!(one_of("admin-token", Some("x".into()), None).unwrap().as_deref(), Some("x"));
        let empty = file("empty", "\n");
        assert!(read_one(&empty).is_err());
        let lines = file("lines", "# rotation: new first\nnew\n\nold\r\n");
        assert_eq!(read_lines(&lines).unwrap(), ["new", "old"]);
        let users = file("users", "alice:pa:ss\nbob:x\n");
        let u = read_users(&users).unwrap();
        assert_eq!((u["alice"].as_str(), u["bob"].as_str()), ("pa:ss", "x"));
        let bad = file("bad", "alice:1\nno-colon-secret\n");
        let e = format!("{:#}", read_users(&bad).unwrap_err());
        assert!(e.contains("entry 2") && !e.contains("no-colon-secret"), "{e}");
        let twice = file("twice", "a:1\na:2\n");
        assert!(read_users(&twice).is_err());
        assert!(read_one(Path::new("/nonexistent/uturn-token")).is_err());
        for p in [p, empty, lines, users, bad, twice] {
            let _ = std::fs::remove_file(p);
        }
    }
}
