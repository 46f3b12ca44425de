//! `uturn credential` and `uturn admin`: mint TURN REST API credentials, manage the users of a
//! store (like coturn's `turnadmin`), print long-term keys, and revoke a user's allocations on
//! a running relay. Exit codes are documented in docs/credentials.md: 0 ok, 1 other error,
//! 2 usage or bad store URL, 3 missing database, 4 duplicate user, 5 bad realm or name,
//! 6 store or relay unreachable, 7 no such user.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use uturn_proto::wire::integrity::PasswordAlgorithm;
use uturn_proto::wire::IntegrityKey;

use crate::credentials::{self, rest};
use crate::store::{self, StoreError, StoreUrl, UserRecord};

/// The subcommands beside running the relay.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mint a TURN REST API credential and print it with a WebRTC iceServers snippet.
    Credential(CredentialArgs),
    /// Manage users in a store, print keys, revoke a user's allocations.
    Admin(AdminArgs),
    /// Probe a TURN/STUN server step by step and say where it fails (exit codes below).
    Check(crate::check::CheckArgs),
    /// Follow a user's, a session's or a client's TURN exchanges on a running relay (its admin
    /// endpoint), with flags and an optional pcapng for Wireshark.
    Trace(crate::trace_cli::TraceArgs),
    /// Check the configuration the relay would load (the same flags before the subcommand, and
    /// --config) and exit: 0 with a summary, 1 with the reason (like `nginx -t`).
    CheckConfig(crate::check_config::CheckConfigArgs),
}

/// `uturn credential`.
#[derive(Debug, Args)]
pub struct CredentialArgs {
    /// The shared secret (the relay's first static-auth-secret). Prefer --secret-file or
    /// UTURN_STATIC_AUTH_SECRET: a flag shows in /proc/PID/cmdline.
    #[arg(long, env = crate::secrets::ENV_STATIC_AUTH_SECRET, hide_env_values = true)]
    pub secret: Option<String>,
    /// A file whose first entry is the shared secret (the relay's --static-auth-secret-file).
    #[arg(long)]
    pub secret_file: Option<std::path::PathBuf>,
    /// How long the credential lives: 8h, 30m, 90s, 1d or seconds.
    #[arg(long, default_value = "8h")]
    pub ttl: String,
    /// User id appended to the expiry.
    #[arg(long)]
    pub user: Option<String>,
    /// Separator between expiry and user id.
    #[arg(long, default_value_t = rest::DEFAULT_SEPARATOR)]
    pub separator: char,
    /// TURN server URL(s) for the iceServers snippet (repeatable).
    #[arg(long, default_value = "turn:127.0.0.1:3478?transport=udp")]
    pub url: Vec<String>,
}

/// `uturn admin`.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The user store: sqlite:///path/users.db or redis://host:port/db.
    #[arg(long)]
    pub store: Option<String>,
    /// The running relay's admin endpoint (for `revoke`).
    #[arg(long, default_value = "http://127.0.0.1:3480")]
    pub admin_url: String,
    /// Bearer token of the admin endpoint (or UTURN_ADMIN_TOKEN).
    #[arg(long, env = crate::secrets::ENV_ADMIN_TOKEN, hide_env_values = true)]
    pub admin_token: Option<String>,
    /// A file holding the bearer token of the admin endpoint.
    #[arg(long)]
    pub admin_token_file: Option<std::path::PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub action: AdminCommand,
}

/// `uturn admin` actions.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Users in the store.
    #[command(subcommand)]
    User(UserCommand),
    /// Print the long-term key of a user in hex (like turnadmin -k).
    Key {
        /// Username.
        #[arg(long)]
        user: String,
        /// Realm.
        #[arg(long)]
        realm: String,
        /// The password.
        #[command(flatten)]
        password: PasswordArg,
        /// Print the SHA-256 key instead of the MD5 one.
        #[arg(long)]
        sha256: bool,
    },
    /// End every allocation of a user, or one session, on the running relay (needs its
    /// --admin-listen).
    Revoke {
        /// Username, or the user id of REST credentials.
        #[arg(required_unless_present = "session")]
        user: Option<String>,
        /// End only the allocation with this session id.
        #[arg(long, conflicts_with = "user")]
        session: Option<u64>,
    },
    /// List the running relay's sessions (allocations) as JSON, or one of them.
    Sessions {
        /// Session id.
        id: Option<u64>,
    },
    /// Make the running relay drain: new allocations are refused, and it exits when the last
    /// one ends or drain-timeout passes.
    Drain,
}

/// `uturn admin user` actions.
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add a user (creates a SQLite file that does not exist yet).
    Add(UserPassword),
    /// Delete a user.
    Delete {
        /// Username.
        name: String,
        /// Realm.
        #[arg(long)]
        realm: String,
    },
    /// List users as REALM<TAB>NAME.
    List {
        /// Only this realm.
        #[arg(long)]
        realm: Option<String>,
    },
    /// Add many users from a file of NAME:PASSWORD lines (`-`: stdin), in batches of 10,000.
    Import {
        /// The file.
        file: std::path::PathBuf,
        /// Realm of every user.
        #[arg(long)]
        realm: String,
        /// Store only the MD5 keys.
        #[arg(long)]
        md5_only: bool,
    },
    /// Change a user's password.
    Passwd(UserPassword),
}

/// A password: `--password` (or UTURN_PASSWORD), or `--password-file`.
#[derive(Debug, Args)]
pub struct PasswordArg {
    /// Password. Prefer --password-file or UTURN_PASSWORD: a flag shows in /proc/PID/cmdline.
    #[arg(long, env = crate::secrets::ENV_PASSWORD, hide_env_values = true)]
    pub password: Option<String>,
    /// A file holding the password (its trailing line break is not part of it).
    #[arg(long)]
    pub password_file: Option<std::path::PathBuf>,
}

impl PasswordArg {
    /// The password. Errors (exit 2): none given, both given, or the file unreadable or empty.
    fn get(&self) -> Result<String, Failure> {
        secret("--password", self.password.clone(), self.password_file.as_deref())
    }
}

/// One of a value and a file naming it (crate::secrets::one_of); a usage failure when neither.
fn secret(what: &str, value: Option<String>, file: Option<&std::path::Path>) -> Result<String, Failure> {
    crate::secrets::one_of(what, value, file)
        .map_err(|e| usage(format!("{e:#}")))?
        .ok_or_else(|| usage(format!("{what} or {what}-file is required")))
}

/// A user and the password to store keys of (`user add`, `user passwd`).
#[derive(Debug, Args)]
pub struct UserPassword {
    /// Username.
    pub name: String,
    /// Realm.
    #[arg(long)]
    pub realm: String,
    /// The password (only its keys are stored).
    #[command(flatten)]
    pub password: PasswordArg,
    /// Store only the MD5 key (no SHA-256 key: PASSWORD-ALGORITHM SHA-256 then fails).
    #[arg(long)]
    pub md5_only: bool,
}

/// Runs a subcommand; returns the process exit code.
pub fn run(cmd: Command) -> ExitCode {
    let result = match cmd {
        Command::Credential(a) => credential(&a),
        Command::Admin(a) => admin(a),
        Command::Check(a) => return crate::check::run(a),
        Command::Trace(a) => return crate::trace_cli::run(a),
        // main runs it with the relay's flags (crate::check_config::run).
        Command::CheckConfig(_) => Err(usage("check-config needs the relay's flags: run `uturn [FLAGS] check-config`")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("uturn: {e}");
            ExitCode::from(e.code)
        }
    }
}

/// A failure with its exit code.
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure { code: e.exit_code(), message: e.to_string() }
    }
}

fn usage(message: impl Into<String>) -> Failure {
    Failure { code: 2, message: message.into() }
}

fn credential(a: &CredentialArgs) -> Result<(), Failure> {
    let ttl = rest::parse_ttl(&a.ttl).map_err(usage)?;
    let first = match &a.secret_file {
        Some(p) if a.secret.is_none() => {
            let lines = crate::secrets::read_lines(p).map_err(|e| usage(format!("--secret-file: {e:#}")))?;
            Some(lines[0].clone())
        }
        _ => None,
    };
    let secret = match first {
        Some(s) => s,
        None => secret("--secret", a.secret.clone(), a.secret_file.as_deref())?,
    };
    if secret.is_empty() {
        return Err(usage("--secret must not be empty"));
    }
    let m = rest::mint(secret.as_bytes(), credentials::unix_now(), ttl, a.user.as_deref(), a.separator);
    let snippet = serde_json::json!({
        "iceServers": [{ "urls": a.url, "username": m.username, "credential": m.password }]
    });
    let mut out = std::io::stdout().lock();
    let text = format!(
        "username: {}\npassword: {}\nexpires:  {} (unix seconds)\n{snippet:#}\n",
        m.username, m.password, m.expires_unix
    );
    out.write_all(text.as_bytes()).map_err(|e| Failure { code: 1, message: e.to_string() })
}

fn admin(a: AdminArgs) -> Result<(), Failure> {
    let token = crate::secrets::one_of("--admin-token", a.admin_token.clone(), a.admin_token_file.as_deref())
        .map_err(|e| usage(format!("{e:#}")))?;
    match a.action {
        AdminCommand::Key { user, realm, password, sha256 } => {
            let password = password.get()?;
            store::validate_realm(&realm)?;
            let alg = if sha256 { PasswordAlgorithm::Sha256 } else { PasswordAlgorithm::Md5 };
            println!("{}", hex(IntegrityKey::derive(alg, &user, &realm, &password).as_bytes()));
            Ok(())
        }
        AdminCommand::Revoke { user, session } => {
            let base = a.admin_url.trim_end_matches('/');
            let url = match (session, user) {
                (Some(id), _) => format!("{base}/sessions/{id}"),
                (None, Some(u)) => format!("{base}/users/{}/sessions", crate::admin_api::percent_encode(&u)),
                (None, None) => return Err(usage("a USER or --session ID is required")),
            };
            call(&url, "DELETE", token.as_deref())
        }
        AdminCommand::Sessions { id } => {
            let base = a.admin_url.trim_end_matches('/');
            let url = match id {
                Some(id) => format!("{base}/sessions/{id}"),
                None => format!("{base}/sessions"),
            };
            call(&url, "GET", token.as_deref())
        }
        AdminCommand::Drain => call(&format!("{}/drain", a.admin_url.trim_end_matches('/')), "POST", token.as_deref()),
        AdminCommand::User(cmd) => {
            let url: StoreUrl = a.store.as_deref().ok_or_else(|| usage("--store URL is required"))?.parse()?;
            let create = matches!(cmd, UserCommand::Add(_) | UserCommand::Import { .. });
            let mut s = store::open(&url, create)?;
            match cmd {
                UserCommand::Add(UserPassword { name, realm, password, md5_only }) => {
                    let password = password.get()?;
                    let keys = checked_keys(&name, &realm, &password, md5_only)?;
                    s.add(&UserRecord { realm: realm.clone(), name: name.clone(), keys })?;
                    eprintln!("added {name:?} to realm {realm:?} in {url}");
                }
                UserCommand::Delete { name, realm } => {
                    s.delete(&realm, &name)?;
                    eprintln!("deleted {name:?} from realm {realm:?}");
                }
                UserCommand::List { realm } => {
                    for (r, n) in s.list(realm.as_deref())? {
                        println!("{r}\t{n}");
                    }
                }
                UserCommand::Import { file, realm, md5_only } => {
                    let n = import(s.as_mut(), &file, &realm, md5_only)?;
                    eprintln!("imported {n} users into realm {realm:?} in {url}");
                }
                UserCommand::Passwd(UserPassword { name, realm, password, md5_only }) => {
                    let password = password.get()?;
                    let keys = checked_keys(&name, &realm, &password, md5_only)?;
                    s.set_keys(&realm, &name, &keys)?;
                    eprintln!("changed the password of {name:?} in realm {realm:?}");
                }
            }
            Ok(())
        }
    }
}

fn import(s: &mut dyn store::UserStore, file: &std::path::Path, realm: &str, md5_only: bool) -> Result<usize, Failure> {
    use std::io::BufRead;
    let io = |e: std::io::Error| Failure { code: 1, message: format!("{}: {e}", file.display()) };
    let reader: Box<dyn BufRead> = if file.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(std::fs::File::open(file).map_err(io)?))
    };
    let mut batch = Vec::with_capacity(10_000);
    let mut total = 0;
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(io)?;
        if line.trim().is_empty() {
            continue;
        }
        let (name, password) = line
            .split_once(':')
            .ok_or_else(|| usage(format!("{}:{}: expected NAME:PASSWORD", file.display(), i + 1)))?;
        let keys = checked_keys(name, realm, password, md5_only)?;
        batch.push(UserRecord { realm: realm.into(), name: name.into(), keys });
        if batch.len() == 10_000 {
            s.add_many(&batch)?;
            total += batch.len();
            batch.clear();
        }
    }
    s.add_many(&batch)?;
    Ok(total + batch.len())
}

fn checked_keys(name: &str, realm: &str, password: &str, md5_only: bool) -> Result<store::UserKeys, Failure> {
    store::validate_realm(realm)?;
    store::validate_name(name)?;
    Ok(store::UserKeys::derive(name, realm, password, !md5_only))
}

/// Calls the running relay's admin endpoint and prints its JSON answer.
fn call(url: &str, method: &str, token: Option<&str>) -> Result<(), Failure> {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(5)).build();
    let mut req = agent.request(method, url);
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    match req.call() {
        Ok(r) => {
            println!("{}", r.into_string().unwrap_or_default());
            Ok(())
        }
        Err(ureq::Error::Status(code, r)) => {
            Err(Failure { code: 1, message: format!("{url}: HTTP {code}: {}", r.into_string().unwrap_or_default()) })
        }
        Err(e) => Err(Failure { code: 6, message: format!("{url}: relay unreachable: {e}") }),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_matches_the_long_term_derivation() {
        assert_eq!(
            hex(IntegrityKey::long_term("1700000000:alice", "example.org", "Cd/49soE35ICqcJF/bCTn8Z4OyE=").as_bytes()),
            "d9a6a3d964467baeffd2fce41704a913"
        );
    }
}
