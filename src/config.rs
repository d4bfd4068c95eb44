//! Configuration: every variable in one list ([`ALL_VARS`], made by `variables!`),
//! raw values as the operator wrote them, and one validation pass into a typed
//! [`Config`] that reports every bad variable at once (certificate and key files
//! included), so an operator fixes all mistakes in one go.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::error::Side;

/// Declares each variable's constant once and the list of all of them from it.
macro_rules! variables {
    ($($konst:ident = $name:literal,)*) => {
        $(pub const $konst: &str = $name;)*
        /// Every variable this program reads, in the order `check-config` prints them.
        pub const ALL_VARS: &[&str] = &[$($konst),*];
    };
}

variables! {
    ENV_SYNC_HOST = "POSTGRES_SYNC_HOST",
    ENV_SYNC_PORT = "POSTGRES_SYNC_PORT",
    ENV_SYNC_DB = "POSTGRES_SYNC_DB",
    ENV_SYNC_USER = "POSTGRES_SYNC_USER",
    ENV_SYNC_PASSWORD = "POSTGRES_SYNC_PASSWORD",
    ENV_SYNC_PASSWORD_FILE = "POSTGRES_SYNC_PASSWORD_FILE",
    ENV_SYNC_SSLMODE = "POSTGRES_SYNC_SSLMODE",
    ENV_CLIENT_HOST = "POSTGRES_CLIENT_HOST",
    ENV_CLIENT_PORT = "POSTGRES_CLIENT_PORT",
    ENV_CLIENT_DB = "POSTGRES_CLIENT_DB",
    ENV_CLIENT_USER = "POSTGRES_CLIENT_USER",
    ENV_CLIENT_PASSWORD = "POSTGRES_CLIENT_PASSWORD",
    ENV_CLIENT_PASSWORD_FILE = "POSTGRES_CLIENT_PASSWORD_FILE",
    ENV_CLIENT_SSLMODE = "POSTGRES_CLIENT_SSLMODE",
    ENV_CLIENT_SSLROOTCERT = "POSTGRES_CLIENT_SSLROOTCERT",
    ENV_CLIENT_SSLCERT = "POSTGRES_CLIENT_SSLCERT",
    ENV_CLIENT_SSLKEY = "POSTGRES_CLIENT_SSLKEY",
    ENV_CLIENT_CHANNEL_BINDING = "POSTGRES_CLIENT_CHANNEL_BINDING",
    ENV_GATEWAY_ID = "METER_SYNC_GATEWAY_ID",
    ENV_SYNC_INTERVAL_SECONDS = "SYNC_INTERVAL_SECONDS",
    ENV_BATCH_SIZE = "BATCH_SIZE",
    ENV_MAX_CONNECTION_RETRIES = "MAX_CONNECTION_RETRIES",
    ENV_MAX_QUERY_RETRIES = "MAX_QUERY_RETRIES",
    ENV_DB_CONNECTION_TIMEOUT_MS = "DB_CONNECTION_TIMEOUT_MS",
    ENV_DB_QUERY_TIMEOUT_MS = "DB_QUERY_TIMEOUT_MS",
    ENV_LOG_LEVEL = "LOG_LEVEL",
    ENV_LOG_TARGET = "LOG_TARGET",
    ENV_LOG_SYSLOG_SOCKET = "LOG_SYSLOG_SOCKET",
    ENV_UPLOAD_PIPELINE_DEPTH = "UPLOAD_PIPELINE_DEPTH",
    ENV_UPLOAD_METHOD = "UPLOAD_METHOD",
    ENV_UPLOAD_TIME_BUDGET_SECONDS = "UPLOAD_TIME_BUDGET_SECONDS",
    ENV_UPLOAD_RETAIN_HOURS = "UPLOAD_RETAIN_HOURS",
    ENV_DOWNLOAD_FULL_EVERY_SECONDS = "DOWNLOAD_FULL_EVERY_SECONDS",
    ENV_DOWNLOAD_MAX_ROWS = "DOWNLOAD_MAX_ROWS",
    ENV_DOWNLOAD_MAX_BYTES = "DOWNLOAD_MAX_BYTES",
    ENV_SYNC_LOGS_RETAIN_DAYS = "SYNC_LOGS_RETAIN_DAYS",
    ENV_METRICS_TEXTFILE = "METRICS_TEXTFILE",
}

/// Where syslog listens unless `LOG_SYSLOG_SOCKET` says otherwise; `LOG_TARGET=auto`
/// picks syslog when it exists.
pub const DEFAULT_SYSLOG_SOCKET: &str = "/dev/log";

/// Set by systemd (≥ 247) for a unit with `LoadCredential=`: the directory holding
/// `client-password` and `sync-password`. Not ours to set, so not in [`ALL_VARS`].
pub const ENV_CREDENTIALS_DIRECTORY: &str = "CREDENTIALS_DIRECTORY";

/// A variable's closed set of values: `ALL` in the order errors list them, and
/// each value's spelling in the environment.
trait Choice: Copy + 'static {
    const ALL: &'static [Self];
    fn name(self) -> &'static str;
}

/// An enum whose values are spelled as given, with its [`Choice`].
macro_rules! choices {
    ($(#[$m:meta])* pub enum $name:ident { $($(#[$vm:meta])* $v:ident = $s:literal,)+ }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vm])* $v,)+
        }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$v => $s,)+
                }
            }
        }

        impl Choice for $name {
            const ALL: &'static [$name] = &[$($name::$v),+];

            fn name(self) -> &'static str {
                self.as_str()
            }
        }
    };
}

/// A password: its `Debug` and `Display` print `***`, so it cannot leak through a
/// log line, an error or a panic message by accident.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

choices! {
    /// libpq's `sslmode` names.
    pub enum SslMode {
        Disable = "disable",
        Prefer = "prefer",
        Require = "require",
        VerifyCa = "verify-ca",
        VerifyFull = "verify-full",
    }
}

choices! {
    /// libpq's `channel_binding`: whether SCRAM authentication binds itself to the
    /// TLS connection (SCRAM-SHA-256-PLUS with `tls-server-end-point`), so that a
    /// man in the middle can neither relay the login nor ask for the password in clear.
    pub enum ChannelBinding {
        /// Never bind.
        Disable = "disable",
        /// Bind when the server offers SCRAM-SHA-256-PLUS over TLS; else any method.
        Prefer = "prefer",
        /// Only SCRAM-SHA-256-PLUS: no cleartext or md5 password, no SCRAM without
        /// binding, no login without authentication, no plaintext connection.
        Require = "require",
    }
}

choices! {
    pub enum LogTarget {
        Syslog = "syslog",
        Stderr = "stderr",
        Auto = "auto",
    }
}

choices! {
    /// How each batch goes to central (`UPLOAD_METHOD`, docs/upload.md).
    pub enum UploadMethod {
        /// COPY on a direct connection, INSERT through a connection pooler, which
        /// cannot carry batches pipelined behind a COPY (PgBouncer before 1.21).
        Auto = "auto",
        /// Binary COPY per batch, falling back to `INSERT … ON CONFLICT` for a
        /// batch central partly has.
        Copy = "copy",
        /// Always the INSERT (the same bytes, as binary arrays).
        Insert = "insert",
    }
}

/// One host to try, with its port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// A host name, an IP address, or (starting with `/`) a Unix socket directory.
    pub host: String,
    pub port: u16,
}

/// How to reach one database.
#[derive(Clone, Debug)]
pub struct DbConfig {
    pub side: Side,
    /// In the order to try them (libpq's host list); local has exactly one.
    pub hosts: Vec<Endpoint>,
    pub dbname: String,
    pub user: String,
    /// The password as read at start; see [`DbConfig::password_now`].
    pub password: Secret,
    /// The file the password came from (`*_PASSWORD_FILE` or the systemd
    /// credential), read again at every connection attempt.
    pub password_file: Option<PathBuf>,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
    pub channel_binding: ChannelBinding,
}

impl DbConfig {
    /// The password for a connection attempt now: the password file's content as
    /// it is now, so that a password rotated in the file is used from the next
    /// (re)connection on, without a restart. A file that cannot be read any more
    /// (being replaced, say) leaves the password read at start, with a warning.
    pub fn password_now(&self) -> Secret {
        let Some(path) = &self.password_file else {
            return self.password.clone();
        };
        match std::fs::read_to_string(path) {
            Ok(s) => password_from_file(&s),
            Err(e) => {
                log::warn!(
                    "{}: cannot read the password file {} ({}); using the password read at start",
                    self.side,
                    path.display(),
                    io_reason(&e)
                );
                self.password.clone()
            }
        }
    }

    /// The (first) host is a Unix socket directory.
    pub fn is_unix_socket(&self) -> bool {
        self.hosts.first().is_some_and(|e| e.host.starts_with('/'))
    }

    /// `host:port/db` (or `socket-dir/.s.PGSQL.port/db`; hosts joined by commas) for
    /// messages: never the password.
    pub fn describe(&self) -> String {
        let hosts: Vec<String> = self
            .hosts
            .iter()
            .map(|e| {
                if e.host.starts_with('/') {
                    format!("{}/.s.PGSQL.{}", e.host, e.port)
                } else {
                    format!("{}:{}", e.host, e.port)
                }
            })
            .collect();
        format!("{}/{}", hosts.join(","), self.dbname)
    }
}

/// A password file's content as the password: trimmed of one trailing newline, as
/// `echo secret > file` leaves one.
fn password_from_file(s: &str) -> Secret {
    Secret::new(s.strip_suffix('\n').unwrap_or(s).trim_end_matches('\r'))
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub local: DbConfig,
    pub central: DbConfig,
    /// This gateway's name in central's `gateway_status`.
    pub gateway_id: String,
    pub sync_interval: Duration,
    pub batch_size: usize,
    pub max_connection_retries: u32,
    pub max_query_retries: u32,
    pub connect_timeout: Duration,
    pub query_timeout: Duration,
    pub log_level: log::LevelFilter,
    pub log_target: LogTarget,
    /// `LOG_SYSLOG_SOCKET`, else [`DEFAULT_SYSLOG_SOCKET`].
    pub syslog_socket: PathBuf,
    pub upload_pipeline_depth: usize,
    pub upload_method: UploadMethod,
    pub upload_time_budget: Duration,
    /// Zero: delete readings once uploaded. Otherwise keep them (marked
    /// synchronized) this long for `resend`.
    pub upload_retain: Duration,
    pub download_full_every: Duration,
    pub download_max_rows: u64,
    pub download_max_bytes: u64,
    /// Zero keeps `sync_logs` forever.
    pub sync_logs_retain_days: u32,
    pub metrics_textfile: Option<PathBuf>,
    /// Every variable's effective value as `check-config` prints it (secrets as
    /// `***`), filled by the validation pass itself.
    shown: BTreeMap<&'static str, String>,
}

/// One bad variable: its name and what is wrong with it. Never carries the value of a
/// secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub var: &'static str,
    pub problem: String,
}

/// The most readings the upload may hold in memory at once,
/// `BATCH_SIZE × UPLOAD_PIPELINE_DEPTH`: about 11 MiB of batches at the 110 bytes a
/// typical reading takes (docs/upload.md), so a peak RSS of about 25 MiB. It lets
/// every valid `BATCH_SIZE` run at depth 1, and the default depth 8 up to 12,500.
pub const MAX_READINGS_IN_FLIGHT: u64 = 100_000;

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.var, self.problem)
    }
}

/// The raw environment (our variables only, as strings) and every problem found
/// while validating it. Each accessor records the effective value it settled on
/// for `check-config`, so the list of what is printed cannot drift from what is read.
struct Checker {
    raw: BTreeMap<String, String>,
    errors: Vec<ConfigError>,
    shown: BTreeMap<&'static str, String>,
    /// Variables whose value is not UTF-8: reported once, then treated as unset
    /// without a second error for the same mistake.
    unreadable: Vec<&'static str>,
}

impl Checker {
    fn fail(&mut self, var: &'static str, problem: impl Into<String>) {
        if self.unreadable.contains(&var) {
            return;
        }
        self.errors.push(ConfigError {
            var,
            problem: problem.into(),
        });
    }

    /// The raw value, trimmed; empty counts as unset, as libpq does. envy lower-cases
    /// the names it reads.
    fn get(&self, var: &'static str) -> Option<&str> {
        self.raw
            .get(&var.to_ascii_lowercase())
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
    }

    /// The raw value untrimmed (a password may begin or end with a space).
    fn get_raw(&self, var: &'static str) -> Option<&str> {
        self.raw
            .get(&var.to_ascii_lowercase())
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }

    fn show(&mut self, var: &'static str, value: impl fmt::Display) {
        self.shown.insert(var, value.to_string());
    }

    fn string(&mut self, var: &'static str, default: &str) -> String {
        let v = self.get(var).unwrap_or(default).to_string();
        self.show(var, &v);
        v
    }

    fn required(&mut self, var: &'static str) -> String {
        let v = self.get(var).unwrap_or_default().to_string();
        if v.is_empty() {
            self.fail(var, "is required but not set");
        }
        self.show(var, &v);
        v
    }

    /// An integer within `min..=max`; the value is echoed because none of these is secret.
    fn int(&mut self, var: &'static str, default: u64, min: u64, max: u64) -> u64 {
        let n = match self.get(var).map(|s| (s.to_string(), s.parse::<u64>())) {
            None => default,
            Some((_, Ok(n))) if (min..=max).contains(&n) => n,
            Some((_, Ok(n))) => {
                self.fail(var, format!("{n} is out of range {min}..={max}"));
                default
            }
            Some((s, Err(_))) => {
                self.fail(
                    var,
                    format!("{s:?} is not a whole number (expected {min}..={max})"),
                );
                default
            }
        };
        self.show(var, n);
        n
    }

    /// The upload holds up to `BATCH_SIZE × UPLOAD_PIPELINE_DEPTH` readings in
    /// memory at once (every batch in flight is kept until central has acknowledged
    /// it). Refused above [`MAX_READINGS_IN_FLIGHT`]; checked only when both values
    /// are themselves valid, so that one mistake gives one error.
    fn readings_in_flight(&mut self, batch_size: u64, depth: u64) {
        let valid = |c: &Self, var| !c.errors.iter().any(|e| e.var == var);
        if !valid(self, ENV_BATCH_SIZE) || !valid(self, ENV_UPLOAD_PIPELINE_DEPTH) {
            return;
        }
        let n = batch_size * depth;
        if n > MAX_READINGS_IN_FLIGHT {
            self.fail(
                ENV_BATCH_SIZE,
                format!(
                    "{batch_size} × {ENV_UPLOAD_PIPELINE_DEPTH} {depth} = {n} readings in flight at once, \
                     more than the {MAX_READINGS_IN_FLIGHT} a gateway's memory is sized for \
                     (docs/upload.md); lower {ENV_BATCH_SIZE} or {ENV_UPLOAD_PIPELINE_DEPTH}"
                ),
            );
        }
    }

    /// One of `choices` by its name.
    fn pick<T: Choice>(&mut self, var: &'static str, default: T) -> T {
        self.choice(var, default, T::ALL, T::name)
    }

    fn choice<T: Copy>(
        &mut self,
        var: &'static str,
        default: T,
        choices: &[T],
        name: fn(T) -> &'static str,
    ) -> T {
        let v = match self.get(var).map(str::to_string) {
            None => default,
            Some(s) => choices
                .iter()
                .copied()
                .find(|c| name(*c) == s)
                .unwrap_or_else(|| {
                    let names: Vec<_> = choices.iter().map(|c| name(*c)).collect();
                    self.fail(var, format!("{s:?} is not one of {}", names.join(", ")));
                    default
                }),
        };
        self.show(var, name(v));
        v
    }

    /// The plain password, the content of the `_FILE` variant (never both), or else
    /// systemd's credential `credential` in `$CREDENTIALS_DIRECTORY`. A file's content
    /// is trimmed of one trailing newline, as `echo secret > file` leaves one.
    fn password(
        &mut self,
        var: &'static str,
        file_var: &'static str,
        credential: &str,
    ) -> (Secret, Option<PathBuf>) {
        let plain = self.get_raw(var).map(str::to_string);
        let file = self.get(file_var).map(str::to_string);
        let from_credentials = || {
            let dir = self.get(ENV_CREDENTIALS_DIRECTORY)?;
            let path = Path::new(dir).join(credential);
            path.is_file().then_some(path)
        };
        let read =
            |c: &mut Checker, culprit: &'static str, path: &Path| match std::fs::read_to_string(
                path,
            ) {
                Ok(s) => password_from_file(&s),
                Err(e) => {
                    c.fail(
                        culprit,
                        format!("cannot read {}: {}", path.display(), io_reason(&e)),
                    );
                    Secret::default()
                }
            };
        let (secret, source) = match (plain, file) {
            (Some(_), Some(_)) => {
                self.fail(
                    file_var,
                    format!("is set together with {var}; set only one"),
                );
                (Secret::default(), None)
            }
            (Some(p), None) => (Secret::new(p), None),
            (None, Some(path)) => {
                let path = PathBuf::from(path);
                (read(self, file_var, &path), Some(path))
            }
            (None, None) => match from_credentials() {
                Some(path) => (read(self, ENV_CREDENTIALS_DIRECTORY, &path), Some(path)),
                None => (Secret::default(), None),
            },
        };
        self.show(var, if secret.is_empty() { "(empty)" } else { "***" });
        let file_shown = self.get(file_var).unwrap_or_default().to_string();
        self.show(file_var, file_shown);
        (secret, source)
    }

    /// A path to a file that must be readable now, so that a typo is a configuration
    /// error at start rather than a TLS failure an hour later.
    fn readable_file(&mut self, var: &'static str) -> Option<PathBuf> {
        let path = self.get(var)?.to_string();
        self.show(var, &path);
        let problem = match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => match std::fs::File::open(&path) {
                Ok(_) => return Some(PathBuf::from(path)),
                Err(e) => format!("cannot read {path}: {}", io_reason(&e)),
            },
            Ok(_) => format!("{path} is not a regular file"),
            Err(e) => format!("cannot read {path}: {}", io_reason(&e)),
        };
        self.fail(var, problem);
        None
    }

    /// `HOST` or `HOST1,HOST2,…` with `PORT` or as many ports, libpq's way.
    fn endpoints(
        &mut self,
        host_var: &'static str,
        port_var: &'static str,
        many: bool,
    ) -> Vec<Endpoint> {
        let hosts: Vec<String> = self
            .required(host_var)
            .split(',')
            .map(|h| h.trim().to_string())
            .collect();
        if hosts.iter().any(String::is_empty) && hosts.len() > 1 {
            self.fail(host_var, "has an empty entry in its list");
        }
        // Not echoed: what does not look like a host is often a connection string
        // or URL with its password in it, and this line goes to the journal.
        if let Some(i) = hosts
            .iter()
            .position(|h| !h.is_empty() && !plausible_host(h))
        {
            let which = if hosts.len() > 1 {
                format!("entry {} of its list", i + 1)
            } else {
                "its value".to_string()
            };
            self.fail(
                host_var,
                format!(
                    "{which} is not a host name, IP address or socket directory (value not shown); \
                     give the host alone: a connection string or URL does not go here, and the \
                     password has its own variable"
                ),
            );
        }
        if !many && hosts.len() > 1 {
            self.fail(host_var, "takes one host (a list is for central only)");
        }
        let raw_ports = self.get(port_var).unwrap_or("5432").to_string();
        let mut ports = Vec::new();
        for p in raw_ports.split(',').map(str::trim) {
            match p.parse::<u16>() {
                Ok(n) if n >= 1 => ports.push(n),
                _ => {
                    self.fail(port_var, format!("{p:?} is not a port (1..=65535)"));
                    ports.push(5432);
                }
            }
        }
        self.show(port_var, &raw_ports);
        if ports.len() == 1 {
            ports = vec![ports[0]; hosts.len()];
        } else if ports.len() != hosts.len() {
            self.fail(
                port_var,
                format!(
                    "lists {} ports for {} hosts (give one port, or one per host)",
                    ports.len(),
                    hosts.len()
                ),
            );
            ports.resize(hosts.len(), 5432);
        }
        hosts
            .into_iter()
            .zip(ports)
            .map(|(host, port)| Endpoint { host, port })
            .collect()
    }

    /// A sslmode that needs TCP cannot be used with a Unix socket directory.
    fn tcp_for_tls(&mut self, var: &'static str, db: &DbConfig) {
        if db.is_unix_socket() && !matches!(db.sslmode, SslMode::Disable | SslMode::Prefer) {
            self.fail(
                var,
                format!(
                    "{} needs TCP, but the {} host is a Unix socket directory",
                    db.sslmode.as_str(),
                    db.side
                ),
            );
        }
    }

    /// `METER_SYNC_GATEWAY_ID`, else /etc/machine-id, else the host name (the
    /// kernel's, else /etc/hostname). Letters, digits and `.-_:` only, at most 128,
    /// so the id is safe in SQL, logs and file names alike.
    fn gateway_id(&mut self, machine_id: Option<String>, hostname: Option<String>) -> String {
        let given = self.get(ENV_GATEWAY_ID).map(str::to_string);
        let explicit = given.is_some();
        let id = given.or(machine_id).or(hostname).unwrap_or_default();
        let ok = !id.is_empty()
            && id.len() <= 128
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-_:".contains(c));
        if !ok {
            let problem = if explicit {
                format!("{id:?} is not a gateway id (1 to 128 of A-Z a-z 0-9 . - _ :)")
            } else {
                "is not set, and neither /etc/machine-id nor the host name gives a usable id; set it"
                    .to_string()
            };
            self.fail(ENV_GATEWAY_ID, problem);
        }
        self.show(ENV_GATEWAY_ID, &id);
        id
    }
}

/// The variable's name as this module spells it, if it is one the configuration reads.
fn known_var(name: &str) -> Option<&'static str> {
    ALL_VARS
        .iter()
        .chain([&ENV_CREDENTIALS_DIRECTORY])
        .find(|v| **v == name)
        .copied()
}

/// A host name, an IPv4 or IPv6 address (with a `%zone`), or an absolute socket
/// directory. A directory may hold spaces, but not `=`: "/run/postgresql
/// password=…" is libpq's keyword form, not a path.
fn plausible_host(h: &str) -> bool {
    if h.starts_with('/') {
        return !h.contains('=');
    }
    h.chars()
        .all(|c| c.is_ascii_alphanumeric() || ".-_:%".contains(c))
}

/// The OS error without Rust's "(os error 2)" decoration.
fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

/// A first line of a file, trimmed, if it has one.
fn first_line(path: &str) -> Option<String> {
    let s = std::fs::read_to_string(path).ok()?;
    let line = s.lines().next()?.trim().to_string();
    (!line.is_empty()).then_some(line)
}

/// What checks certificate and key files: the TLS backend's parser, handed in so
/// that this module stays below the TLS module.
pub type FileCheck<'a> = &'a dyn Fn(&DbConfig) -> Vec<ConfigError>;

impl Config {
    /// Reads the process environment; `check_files` parses certificate and key files.
    pub fn from_env(check_files: FileCheck<'_>) -> Result<Config, Vec<ConfigError>> {
        // `std::env::vars` panics on a value that is not UTF-8, printing the value:
        // one of ours is refused by name instead, anybody else's is none of ours.
        let mut unreadable = Vec::new();
        let vars: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| {
                let k = k.into_string().ok()?;
                match v.into_string() {
                    Ok(v) => Some((k, v)),
                    Err(_) => {
                        unreadable.extend(known_var(&k));
                        None
                    }
                }
            })
            .collect();
        Config::load_checked(vars, unreadable, check_files)
    }

    /// Reads any set of variables (tests hand in a map instead of mutating the process
    /// environment), without parsing certificate files.
    pub fn from_vars<I: IntoIterator<Item = (String, String)>>(
        vars: I,
    ) -> Result<Config, Vec<ConfigError>> {
        Config::load(vars, &|_| Vec::new())
    }

    /// The one validation pass.
    pub fn load<I: IntoIterator<Item = (String, String)>>(
        vars: I,
        check_files: FileCheck<'_>,
    ) -> Result<Config, Vec<ConfigError>> {
        Config::load_checked(vars, Vec::new(), check_files)
    }

    /// [`Config::load`], with the variables whose value could not be read as UTF-8.
    fn load_checked<I: IntoIterator<Item = (String, String)>>(
        vars: I,
        unreadable: Vec<&'static str>,
        check_files: FileCheck<'_>,
    ) -> Result<Config, Vec<ConfigError>> {
        let known: BTreeMap<String, String> = vars
            .into_iter()
            .filter(|(k, _)| known_var(k).is_some())
            .collect();
        let mut c = Checker {
            raw: BTreeMap::new(),
            errors: unreadable
                .iter()
                .map(|&var| ConfigError {
                    var,
                    problem: "is not valid UTF-8 (value not shown)".into(),
                })
                .collect(),
            shown: BTreeMap::new(),
            unreadable,
        };
        // Only strings are deserialized, so envy can fail only on input that is not
        // a variable list at all; should it, say so rather than run on defaults.
        match envy::from_iter::<_, BTreeMap<String, String>>(known) {
            Ok(raw) => c.raw = raw,
            Err(e) => c.fail("environment", format!("cannot be read: {e}")),
        }

        let (local_password, local_password_file) =
            c.password(ENV_SYNC_PASSWORD, ENV_SYNC_PASSWORD_FILE, "sync-password");
        let mut local = DbConfig {
            side: Side::Local,
            hosts: c.endpoints(ENV_SYNC_HOST, ENV_SYNC_PORT, false),
            dbname: c.string(ENV_SYNC_DB, "postgres"),
            user: c.string(ENV_SYNC_USER, "postgres"),
            password: local_password,
            password_file: local_password_file,
            sslmode: c.pick(ENV_SYNC_SSLMODE, SslMode::Disable),
            sslrootcert: None,
            sslcert: None,
            sslkey: None,
            // libpq's default; the local side has no variable for it.
            channel_binding: ChannelBinding::Prefer,
        };
        local.hosts.truncate(1);
        let (central_password, central_password_file) = c.password(
            ENV_CLIENT_PASSWORD,
            ENV_CLIENT_PASSWORD_FILE,
            "client-password",
        );
        let central = DbConfig {
            side: Side::Central,
            hosts: c.endpoints(ENV_CLIENT_HOST, ENV_CLIENT_PORT, true),
            dbname: c.string(ENV_CLIENT_DB, "postgres"),
            user: c.string(ENV_CLIENT_USER, "postgres"),
            password: central_password,
            password_file: central_password_file,
            sslmode: c.pick(ENV_CLIENT_SSLMODE, SslMode::VerifyFull),
            sslrootcert: c.readable_file(ENV_CLIENT_SSLROOTCERT),
            sslcert: c.readable_file(ENV_CLIENT_SSLCERT),
            sslkey: c.readable_file(ENV_CLIENT_SSLKEY),
            // libpq's default, and the one that works through PgBouncer, which does
            // not offer SCRAM-SHA-256-PLUS (docs/security.md).
            channel_binding: c.pick(ENV_CLIENT_CHANNEL_BINDING, ChannelBinding::Prefer),
        };
        if central.channel_binding == ChannelBinding::Require && central.sslmode == SslMode::Disable
        {
            c.fail(
                ENV_CLIENT_CHANNEL_BINDING,
                "require binds the login to TLS, but POSTGRES_CLIENT_SSLMODE=disable never uses TLS",
            );
        }
        if central.sslcert.is_some() != central.sslkey.is_some() {
            let missing = if central.sslcert.is_some() {
                ENV_CLIENT_SSLKEY
            } else {
                ENV_CLIENT_SSLCERT
            };
            c.fail(
                missing,
                "must be set together with its pair (client certificate and key)",
            );
        }
        c.tcp_for_tls(ENV_CLIENT_SSLMODE, &central);
        c.tcp_for_tls(ENV_SYNC_SSLMODE, &local);
        // Parsed only when they could be read: a missing file is reported once.
        let file_problems = check_files(&central);
        c.errors.extend(file_problems);

        // The kernel's host name, else the static one: the unit's ProcSubset=pid
        // hides /proc/sys, /etc stays readable.
        let gateway_id = c.gateway_id(
            first_line("/etc/machine-id"),
            first_line("/proc/sys/kernel/hostname").or_else(|| first_line("/etc/hostname")),
        );
        let sync_interval = c.int(ENV_SYNC_INTERVAL_SECONDS, 60, 1, 86_400);
        let batch_size = c.int(ENV_BATCH_SIZE, 100, 1, 100_000);
        let max_connection_retries = c.int(ENV_MAX_CONNECTION_RETRIES, 5, 1, 100);
        let max_query_retries = c.int(ENV_MAX_QUERY_RETRIES, 3, 0, 100);
        let connect_timeout = c.int(ENV_DB_CONNECTION_TIMEOUT_MS, 5000, 100, 600_000);
        let query_timeout = c.int(ENV_DB_QUERY_TIMEOUT_MS, 30_000, 100, 3_600_000);
        let log_level = c.choice(
            ENV_LOG_LEVEL,
            log::LevelFilter::Info,
            &[
                log::LevelFilter::Error,
                log::LevelFilter::Warn,
                log::LevelFilter::Info,
                log::LevelFilter::Debug,
                log::LevelFilter::Trace,
            ],
            level_name,
        );
        let log_target = c.pick(ENV_LOG_TARGET, LogTarget::Auto);
        let syslog_socket = PathBuf::from(c.string(ENV_LOG_SYSLOG_SOCKET, DEFAULT_SYSLOG_SOCKET));
        // Unset, the depth is 8, or as many batches as fit in flight: every BATCH_SIZE
        // of the range runs with the defaults. Set, it is taken as given or refused.
        let fitting_depth = (MAX_READINGS_IN_FLIGHT / batch_size).clamp(1, 8);
        let upload_pipeline_depth = c.int(ENV_UPLOAD_PIPELINE_DEPTH, fitting_depth, 1, 256);
        c.readings_in_flight(batch_size, upload_pipeline_depth);
        let upload_method = c.pick(ENV_UPLOAD_METHOD, UploadMethod::Auto);
        let upload_time_budget = c.int(ENV_UPLOAD_TIME_BUDGET_SECONDS, 300, 1, 86_400);
        let upload_retain_hours = c.int(ENV_UPLOAD_RETAIN_HOURS, 0, 0, 8_760);
        let download_full_every = c.int(ENV_DOWNLOAD_FULL_EVERY_SECONDS, 86_400, 1, 31_536_000);
        let download_max_rows = c.int(ENV_DOWNLOAD_MAX_ROWS, 100_000, 1, 100_000_000);
        let download_max_bytes = c.int(ENV_DOWNLOAD_MAX_BYTES, 64 * 1024 * 1024, 1024, 1 << 40);
        let sync_logs_retain_days = c.int(ENV_SYNC_LOGS_RETAIN_DAYS, 30, 0, 36_500);
        // Its directory is checked by the commands that write it
        // ([`Config::metrics_directory_problem`]): /run/meter-sync exists only while
        // the unit runs, and `status` is wanted most when it does not.
        let metrics_textfile = c.get(ENV_METRICS_TEXTFILE).map(str::to_string).map(|p| {
            if p.ends_with('/') || PathBuf::from(&p).file_name().is_none() {
                c.fail(ENV_METRICS_TEXTFILE, format!("{p} is not a file path"));
            }
            PathBuf::from(p)
        });
        c.show(ENV_METRICS_TEXTFILE, shown_path(&metrics_textfile));

        if !c.errors.is_empty() {
            return Err(c.errors);
        }
        Ok(Config {
            local,
            central,
            gateway_id,
            sync_interval: Duration::from_secs(sync_interval),
            batch_size: batch_size as usize,
            max_connection_retries: max_connection_retries as u32,
            max_query_retries: max_query_retries as u32,
            connect_timeout: Duration::from_millis(connect_timeout),
            query_timeout: Duration::from_millis(query_timeout),
            log_level,
            log_target,
            syslog_socket,
            upload_pipeline_depth: upload_pipeline_depth as usize,
            upload_method,
            upload_time_budget: Duration::from_secs(upload_time_budget),
            upload_retain: Duration::from_secs(upload_retain_hours * 3600),
            download_full_every: Duration::from_secs(download_full_every),
            download_max_rows,
            download_max_bytes,
            sync_logs_retain_days: sync_logs_retain_days as u32,
            metrics_textfile,
            shown: c.shown,
        })
    }

    /// `METRICS_TEXTFILE` in a directory that does not exist (now): `run` and `once`
    /// refuse to start on it, `check-config` only says so.
    pub fn metrics_directory_problem(&self) -> Option<ConfigError> {
        let path = self.metrics_textfile.as_ref()?;
        let dir = path.parent()?;
        if dir.as_os_str().is_empty() || dir.is_dir() {
            return None;
        }
        Some(ConfigError {
            var: ENV_METRICS_TEXTFILE,
            problem: format!(
                "{}: the directory {} does not exist",
                path.display(),
                dir.display()
            ),
        })
    }

    /// The effective configuration as `NAME=value` lines, one per variable in
    /// [`ALL_VARS`], passwords redacted, for `check-config`.
    pub fn render(&self) -> String {
        ALL_VARS
            .iter()
            .map(|k| {
                let v = self.shown.get(k).map(String::as_str).unwrap_or_default();
                format!("{k}={v}\n")
            })
            .collect()
    }
}

fn level_name(l: log::LevelFilter) -> &'static str {
    match l {
        log::LevelFilter::Off => "off",
        log::LevelFilter::Error => "error",
        log::LevelFilter::Warn => "warn",
        log::LevelFilter::Info => "info",
        log::LevelFilter::Debug => "debug",
        log::LevelFilter::Trace => "trace",
    }
}

fn shown_path(p: &Option<PathBuf>) -> String {
    p.as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = vec![
            (ENV_SYNC_HOST.into(), "/run/postgresql".into()),
            (ENV_CLIENT_HOST.into(), "central.example".into()),
        ];
        for (k, val) in pairs {
            v.retain(|(existing, _)| existing != k);
            v.push((k.to_string(), val.to_string()));
        }
        v
    }

    fn err_vars(pairs: &[(&str, &str)]) -> Vec<&'static str> {
        Config::from_vars(vars(pairs))
            .unwrap_err()
            .into_iter()
            .map(|e| e.var)
            .collect()
    }

    #[test]
    fn defaults_follow_the_spec() {
        let c = Config::from_vars(vars(&[])).unwrap();
        assert_eq!(c.local.hosts[0].port, 5432);
        assert_eq!(c.local.dbname, "postgres");
        assert_eq!(c.local.user, "postgres");
        assert!(c.local.password.is_empty());
        assert!(c.local.is_unix_socket());
        assert_eq!(c.local.sslmode, SslMode::Disable);
        assert_eq!(c.central.sslmode, SslMode::VerifyFull);
        assert_eq!(c.sync_interval, Duration::from_secs(60));
        assert_eq!(c.batch_size, 100);
        assert_eq!(c.max_connection_retries, 5);
        assert_eq!(c.max_query_retries, 3);
        assert_eq!(c.connect_timeout, Duration::from_millis(5000));
        assert_eq!(c.query_timeout, Duration::from_millis(30_000));
        assert_eq!(c.upload_pipeline_depth, 8);
        assert_eq!(c.upload_time_budget, Duration::from_secs(300));
        assert_eq!(c.log_level, log::LevelFilter::Info);
        assert_eq!(c.log_target, LogTarget::Auto);
        assert!(c.metrics_textfile.is_none());
        assert_eq!(c.upload_retain, Duration::ZERO);
        assert_eq!(c.download_full_every, Duration::from_secs(86_400));
        assert_eq!(c.sync_logs_retain_days, 30);
        assert!(!c.gateway_id.is_empty());
        assert_eq!(c.upload_method, UploadMethod::Auto);
    }

    /// Sets `var` to each of `T`'s values in turn and reads it back through `get`;
    /// a near miss is refused naming `var`. Returns the spellings, for the caller
    /// to compare with the documented ones.
    fn takes_every<T: Choice + PartialEq + fmt::Debug>(
        var: &'static str,
        get: fn(&Config) -> T,
        near_miss: &str,
    ) -> Vec<&'static str> {
        for &v in T::ALL {
            let c = Config::from_vars(vars(&[(var, v.name())])).unwrap();
            assert_eq!(get(&c), v, "{var}={}", v.name());
        }
        assert_eq!(err_vars(&[(var, near_miss)]), vec![var]);
        T::ALL.iter().map(|v| v.name()).collect()
    }

    #[test]
    fn upload_method_is_auto_copy_or_insert() {
        let names = takes_every(ENV_UPLOAD_METHOD, |c| c.upload_method, "binary");
        assert_eq!(names, ["auto", "copy", "insert"]);
    }

    #[test]
    fn check_config_prints_every_variable_once() {
        let c = Config::from_vars(vars(&[(ENV_BATCH_SIZE, "250")])).unwrap();
        let out = c.render();
        let names: Vec<&str> = out.lines().map(|l| l.split('=').next().unwrap()).collect();
        assert_eq!(names, ALL_VARS);
        assert!(out.contains("BATCH_SIZE=250\n"), "{out}");
        assert!(out.contains("POSTGRES_CLIENT_PORT=5432\n"), "{out}");
        assert!(out.contains("DOWNLOAD_FULL_EVERY_SECONDS=86400\n"), "{out}");
    }

    #[test]
    fn central_takes_a_host_list_with_one_port_or_one_each() {
        let c = Config::from_vars(vars(&[(ENV_CLIENT_HOST, "a.example, b.example")])).unwrap();
        let hosts: Vec<(&str, u16)> = c
            .central
            .hosts
            .iter()
            .map(|e| (e.host.as_str(), e.port))
            .collect();
        assert_eq!(hosts, vec![("a.example", 5432), ("b.example", 5432)]);
        let c = Config::from_vars(vars(&[
            (ENV_CLIENT_HOST, "a.example,b.example"),
            (ENV_CLIENT_PORT, "5433,5434"),
        ]))
        .unwrap();
        assert_eq!(c.central.hosts[1].port, 5434);
        assert_eq!(
            c.central.describe(),
            "a.example:5433,b.example:5434/postgres"
        );
        assert_eq!(
            err_vars(&[(ENV_CLIENT_HOST, "a,b"), (ENV_CLIENT_PORT, "1,2,3")]),
            vec![ENV_CLIENT_PORT]
        );
        assert_eq!(
            err_vars(&[(ENV_CLIENT_HOST, "a,,b")]),
            vec![ENV_CLIENT_HOST]
        );
        assert_eq!(err_vars(&[(ENV_SYNC_HOST, "a,b")]), vec![ENV_SYNC_HOST]);
    }

    #[test]
    fn gateway_id_is_validated_and_defaults_to_the_machine() {
        let c = Config::from_vars(vars(&[(ENV_GATEWAY_ID, "gw-0042.site_7")])).unwrap();
        assert_eq!(c.gateway_id, "gw-0042.site_7");
        assert_eq!(err_vars(&[(ENV_GATEWAY_ID, "gw 1")]), vec![ENV_GATEWAY_ID]);
        assert_eq!(
            err_vars(&[(ENV_GATEWAY_ID, "a'; DROP")]),
            vec![ENV_GATEWAY_ID]
        );
        let mut c = Checker {
            raw: BTreeMap::new(),
            errors: Vec::new(),
            shown: BTreeMap::new(),
            unreadable: Vec::new(),
        };
        assert_eq!(
            c.gateway_id(Some("0123abcd".into()), Some("host".into())),
            "0123abcd"
        );
        assert_eq!(c.gateway_id(None, Some("host".into())), "host");
        assert!(c.errors.is_empty());
        c.gateway_id(None, None);
        assert_eq!(c.errors[0].var, ENV_GATEWAY_ID);
    }

    #[test]
    fn password_comes_from_systemd_credentials_when_unset() {
        let dir = std::env::temp_dir().join(format!("meter-sync-cred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("client-password"), "fr0m-cred\n").unwrap();
        let d = dir.to_str().unwrap();
        let c = Config::from_vars(vars(&[(ENV_CREDENTIALS_DIRECTORY, d)])).unwrap();
        assert_eq!(c.central.password.expose(), "fr0m-cred");
        assert!(c.local.password.is_empty(), "no sync-password credential");
        let c = Config::from_vars(vars(&[
            (ENV_CREDENTIALS_DIRECTORY, d),
            (ENV_CLIENT_PASSWORD, "plain"),
        ]))
        .unwrap();
        assert_eq!(c.central.password.expose(), "plain", "the variable wins");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn file_check_problems_join_the_others() {
        let errs = Config::load(vars(&[(ENV_BATCH_SIZE, "0")]), &|_| {
            vec![ConfigError {
                var: ENV_CLIENT_SSLROOTCERT,
                problem: "is not PEM".into(),
            }]
        })
        .unwrap_err();
        let names: Vec<_> = errs.iter().map(|e| e.var).collect();
        assert_eq!(names, vec![ENV_CLIENT_SSLROOTCERT, ENV_BATCH_SIZE]);
    }

    #[test]
    fn required_hosts_are_named_when_missing() {
        let errs = Config::from_vars(Vec::new()).unwrap_err();
        let names: Vec<_> = errs.iter().map(|e| e.var).collect();
        assert_eq!(names, vec![ENV_SYNC_HOST, ENV_CLIENT_HOST]);
    }

    #[test]
    fn batches_in_flight_that_cannot_fit_are_refused_naming_both_variables() {
        assert!(Config::from_vars(vars(&[(ENV_BATCH_SIZE, "12500")])).is_ok());
        assert!(Config::from_vars(vars(&[
            (ENV_BATCH_SIZE, "100000"),
            (ENV_UPLOAD_PIPELINE_DEPTH, "1")
        ]))
        .is_ok());
        // Unset, the depth fits the batch size (SPEC §3 allows it up to 100000).
        let c = Config::from_vars(vars(&[(ENV_BATCH_SIZE, "12501")])).unwrap();
        assert_eq!(c.upload_pipeline_depth, 7);
        let errs = Config::from_vars(vars(&[
            (ENV_BATCH_SIZE, "12501"),
            (ENV_UPLOAD_PIPELINE_DEPTH, "8"),
        ]))
        .unwrap_err();
        assert_eq!(errs.len(), 1);
        let msg = errs[0].to_string();
        assert!(
            msg.starts_with("BATCH_SIZE: 12501 × UPLOAD_PIPELINE_DEPTH 8 = 100008 readings"),
            "{msg}"
        );
        assert!(
            msg.contains("lower BATCH_SIZE or UPLOAD_PIPELINE_DEPTH"),
            "{msg}"
        );
        // One mistake, one error: an invalid depth is not also a product too large.
        assert_eq!(
            err_vars(&[
                (ENV_BATCH_SIZE, "50000"),
                (ENV_UPLOAD_PIPELINE_DEPTH, "900")
            ]),
            vec![ENV_UPLOAD_PIPELINE_DEPTH]
        );
    }

    #[test]
    fn ranges_are_enforced() {
        assert_eq!(
            err_vars(&[(ENV_SYNC_INTERVAL_SECONDS, "0")]),
            vec![ENV_SYNC_INTERVAL_SECONDS]
        );
        assert_eq!(err_vars(&[(ENV_BATCH_SIZE, "0")]), vec![ENV_BATCH_SIZE]);
        assert_eq!(
            err_vars(&[(ENV_BATCH_SIZE, "100001")]),
            vec![ENV_BATCH_SIZE]
        );
        assert_eq!(err_vars(&[(ENV_BATCH_SIZE, "ten")]), vec![ENV_BATCH_SIZE]);
        assert_eq!(err_vars(&[(ENV_SYNC_PORT, "70000")]), vec![ENV_SYNC_PORT]);
        assert_eq!(err_vars(&[(ENV_CLIENT_PORT, "-1")]), vec![ENV_CLIENT_PORT]);
        assert_eq!(
            err_vars(&[(ENV_UPLOAD_PIPELINE_DEPTH, "0")]),
            vec![ENV_UPLOAD_PIPELINE_DEPTH]
        );
        assert_eq!(
            err_vars(&[(ENV_DB_QUERY_TIMEOUT_MS, "5")]),
            vec![ENV_DB_QUERY_TIMEOUT_MS]
        );
        // The top of the range, at a depth where it fits (MAX_READINGS_IN_FLIGHT).
        assert!(Config::from_vars(vars(&[
            (ENV_BATCH_SIZE, "100000"),
            (ENV_UPLOAD_PIPELINE_DEPTH, "1")
        ]))
        .is_ok());
        assert!(Config::from_vars(vars(&[(ENV_SYNC_INTERVAL_SECONDS, "1")])).is_ok());
    }

    #[test]
    fn every_bad_variable_is_reported_at_once() {
        let names = err_vars(&[
            (ENV_BATCH_SIZE, "x"),
            (ENV_LOG_LEVEL, "loud"),
            (ENV_LOG_TARGET, "file"),
        ]);
        assert_eq!(names, vec![ENV_BATCH_SIZE, ENV_LOG_LEVEL, ENV_LOG_TARGET]);
    }

    #[test]
    fn sslmodes_use_libpq_names() {
        let names = takes_every(ENV_CLIENT_SSLMODE, |c| c.central.sslmode, "verify_full");
        assert_eq!(
            names,
            ["disable", "prefer", "require", "verify-ca", "verify-full"]
        );
    }

    #[test]
    fn channel_binding_uses_libpq_names_and_needs_tls_to_be_required() {
        let c = Config::from_vars(vars(&[])).unwrap();
        assert_eq!(c.central.channel_binding, ChannelBinding::Prefer);
        let names = takes_every(
            ENV_CLIENT_CHANNEL_BINDING,
            |c| c.central.channel_binding,
            "required",
        );
        assert_eq!(names, ["disable", "prefer", "require"]);
        assert_eq!(
            err_vars(&[
                (ENV_CLIENT_CHANNEL_BINDING, "require"),
                (ENV_CLIENT_SSLMODE, "disable")
            ]),
            vec![ENV_CLIENT_CHANNEL_BINDING]
        );
        // prefer falls back to plaintext, which channel binding then refuses: valid,
        // as with libpq.
        assert!(Config::from_vars(vars(&[
            (ENV_CLIENT_CHANNEL_BINDING, "require"),
            (ENV_CLIENT_SSLMODE, "prefer")
        ]))
        .is_ok());
    }

    #[test]
    fn a_password_file_is_read_again_for_each_connection() {
        let dir = std::env::temp_dir().join(format!("meter-sync-rot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pw");
        std::fs::write(&file, "old\n").unwrap();
        let c =
            Config::from_vars(vars(&[(ENV_CLIENT_PASSWORD_FILE, file.to_str().unwrap())])).unwrap();
        assert_eq!(c.central.password_now().expose(), "old");
        std::fs::write(&file, "new\r\n").unwrap();
        assert_eq!(c.central.password_now().expose(), "new");
        // Gone for a moment (being replaced): the password read at start.
        std::fs::remove_file(&file).unwrap();
        assert_eq!(c.central.password_now().expose(), "old");
        // A plain variable has no file to read again.
        let p = Config::from_vars(vars(&[(ENV_CLIENT_PASSWORD, "plain")])).unwrap();
        assert_eq!(p.central.password_file, None);
        assert_eq!(p.central.password_now().expose(), "plain");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn password_file_is_read_and_exclusive_with_plain() {
        let dir = std::env::temp_dir().join(format!("meter-sync-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let f = file.to_str().unwrap();
        let c = Config::from_vars(vars(&[(ENV_CLIENT_PASSWORD_FILE, f)])).unwrap();
        assert_eq!(c.central.password.expose(), "s3cret");

        let errs = Config::from_vars(vars(&[
            (ENV_CLIENT_PASSWORD_FILE, f),
            (ENV_CLIENT_PASSWORD, "hunter2"),
        ]))
        .unwrap_err();
        assert_eq!(errs[0].var, ENV_CLIENT_PASSWORD_FILE);
        assert!(!errs[0].to_string().contains("hunter2"));

        let missing = dir.join("absent");
        assert_eq!(
            err_vars(&[(ENV_SYNC_PASSWORD_FILE, missing.to_str().unwrap())]),
            vec![ENV_SYNC_PASSWORD_FILE]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn secrets_never_print() {
        let c = Config::from_vars(vars(&[
            (ENV_SYNC_PASSWORD, "hunter2"),
            (ENV_CLIENT_PASSWORD, "swordfish"),
        ]))
        .unwrap();
        let all = format!("{c:?}\n{}", c.render());
        assert!(!all.contains("hunter2"), "{all}");
        assert!(!all.contains("swordfish"), "{all}");
        assert!(c.render().contains("POSTGRES_CLIENT_PASSWORD=***"));
    }

    #[test]
    fn client_cert_and_key_come_in_pairs() {
        let cert = std::env::current_exe().unwrap();
        assert_eq!(
            err_vars(&[(ENV_CLIENT_SSLCERT, cert.to_str().unwrap())]),
            vec![ENV_CLIENT_SSLKEY]
        );
    }
}
