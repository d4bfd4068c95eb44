//! Configuration: every `ENV_*` name, raw values as the operator wrote them, and
//! validation into a typed [`Config`]. Validation happens in one place and reports
//! every bad variable, so an operator fixes all mistakes in one go.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

pub const ENV_SYNC_HOST: &str = "POSTGRES_SYNC_HOST";
pub const ENV_SYNC_PORT: &str = "POSTGRES_SYNC_PORT";
pub const ENV_SYNC_DB: &str = "POSTGRES_SYNC_DB";
pub const ENV_SYNC_USER: &str = "POSTGRES_SYNC_USER";
pub const ENV_SYNC_PASSWORD: &str = "POSTGRES_SYNC_PASSWORD";
pub const ENV_SYNC_PASSWORD_FILE: &str = "POSTGRES_SYNC_PASSWORD_FILE";
pub const ENV_SYNC_SSLMODE: &str = "POSTGRES_SYNC_SSLMODE";
pub const ENV_CLIENT_HOST: &str = "POSTGRES_CLIENT_HOST";
pub const ENV_CLIENT_PORT: &str = "POSTGRES_CLIENT_PORT";
pub const ENV_CLIENT_DB: &str = "POSTGRES_CLIENT_DB";
pub const ENV_CLIENT_USER: &str = "POSTGRES_CLIENT_USER";
pub const ENV_CLIENT_PASSWORD: &str = "POSTGRES_CLIENT_PASSWORD";
pub const ENV_CLIENT_PASSWORD_FILE: &str = "POSTGRES_CLIENT_PASSWORD_FILE";
pub const ENV_CLIENT_SSLMODE: &str = "POSTGRES_CLIENT_SSLMODE";
pub const ENV_CLIENT_SSLROOTCERT: &str = "POSTGRES_CLIENT_SSLROOTCERT";
pub const ENV_CLIENT_SSLCERT: &str = "POSTGRES_CLIENT_SSLCERT";
pub const ENV_CLIENT_SSLKEY: &str = "POSTGRES_CLIENT_SSLKEY";
pub const ENV_SYNC_INTERVAL_SECONDS: &str = "SYNC_INTERVAL_SECONDS";
pub const ENV_BATCH_SIZE: &str = "BATCH_SIZE";
pub const ENV_MAX_CONNECTION_RETRIES: &str = "MAX_CONNECTION_RETRIES";
pub const ENV_MAX_QUERY_RETRIES: &str = "MAX_QUERY_RETRIES";
pub const ENV_DB_CONNECTION_TIMEOUT_MS: &str = "DB_CONNECTION_TIMEOUT_MS";
pub const ENV_DB_QUERY_TIMEOUT_MS: &str = "DB_QUERY_TIMEOUT_MS";
pub const ENV_LOG_LEVEL: &str = "LOG_LEVEL";
pub const ENV_LOG_TARGET: &str = "LOG_TARGET";
pub const ENV_LOG_SYSLOG_SOCKET: &str = "LOG_SYSLOG_SOCKET";
pub const ENV_UPLOAD_PIPELINE_DEPTH: &str = "UPLOAD_PIPELINE_DEPTH";
pub const ENV_UPLOAD_TIME_BUDGET_SECONDS: &str = "UPLOAD_TIME_BUDGET_SECONDS";
pub const ENV_METRICS_TEXTFILE: &str = "METRICS_TEXTFILE";

/// Every variable this program reads, for `check-config` and the README.
pub const ALL_VARS: &[&str] = &[
    ENV_SYNC_HOST,
    ENV_SYNC_PORT,
    ENV_SYNC_DB,
    ENV_SYNC_USER,
    ENV_SYNC_PASSWORD,
    ENV_SYNC_PASSWORD_FILE,
    ENV_SYNC_SSLMODE,
    ENV_CLIENT_HOST,
    ENV_CLIENT_PORT,
    ENV_CLIENT_DB,
    ENV_CLIENT_USER,
    ENV_CLIENT_PASSWORD,
    ENV_CLIENT_PASSWORD_FILE,
    ENV_CLIENT_SSLMODE,
    ENV_CLIENT_SSLROOTCERT,
    ENV_CLIENT_SSLCERT,
    ENV_CLIENT_SSLKEY,
    ENV_SYNC_INTERVAL_SECONDS,
    ENV_BATCH_SIZE,
    ENV_MAX_CONNECTION_RETRIES,
    ENV_MAX_QUERY_RETRIES,
    ENV_DB_CONNECTION_TIMEOUT_MS,
    ENV_DB_QUERY_TIMEOUT_MS,
    ENV_LOG_LEVEL,
    ENV_LOG_TARGET,
    ENV_LOG_SYSLOG_SOCKET,
    ENV_UPLOAD_PIPELINE_DEPTH,
    ENV_UPLOAD_TIME_BUDGET_SECONDS,
    ENV_METRICS_TEXTFILE,
];

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

/// libpq's `sslmode` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogTarget {
    Syslog,
    Stderr,
    Auto,
}

/// Which of the two databases; every error names one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Local,
    Central,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Local => "local",
            Side::Central => "central",
        })
    }
}

/// How to reach one database.
#[derive(Clone, Debug)]
pub struct DbConfig {
    pub side: Side,
    /// A host name, an IP address, or (starting with `/`) a Unix socket directory.
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub user: String,
    pub password: Secret,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
}

impl DbConfig {
    pub fn is_unix_socket(&self) -> bool {
        self.host.starts_with('/')
    }

    /// `host:port/db` (or `socket-dir/.s.PGSQL.port/db`) for messages: never the password.
    pub fn describe(&self) -> String {
        if self.is_unix_socket() {
            format!("{}/.s.PGSQL.{}/{}", self.host, self.port, self.dbname)
        } else {
            format!("{}:{}/{}", self.host, self.port, self.dbname)
        }
    }
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub local: DbConfig,
    pub central: DbConfig,
    pub sync_interval: Duration,
    pub batch_size: usize,
    pub max_connection_retries: u32,
    pub max_query_retries: u32,
    pub connect_timeout: Duration,
    pub query_timeout: Duration,
    pub log_level: log::LevelFilter,
    pub log_target: LogTarget,
    pub syslog_socket: Option<PathBuf>,
    pub upload_pipeline_depth: usize,
    pub upload_time_budget: Duration,
    pub metrics_textfile: Option<PathBuf>,
}

/// One bad variable: its name and what is wrong with it. Never carries the value of a
/// secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub var: &'static str,
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.var, self.problem)
    }
}

/// The raw environment, as strings, before any validation. Field names are the
/// variable names lower-cased (that is how `envy` maps them).
#[derive(Deserialize, Default, Debug)]
struct Raw {
    postgres_sync_host: Option<String>,
    postgres_sync_port: Option<String>,
    postgres_sync_db: Option<String>,
    postgres_sync_user: Option<String>,
    postgres_sync_password: Option<String>,
    postgres_sync_password_file: Option<String>,
    postgres_sync_sslmode: Option<String>,
    postgres_client_host: Option<String>,
    postgres_client_port: Option<String>,
    postgres_client_db: Option<String>,
    postgres_client_user: Option<String>,
    postgres_client_password: Option<String>,
    postgres_client_password_file: Option<String>,
    postgres_client_sslmode: Option<String>,
    postgres_client_sslrootcert: Option<String>,
    postgres_client_sslcert: Option<String>,
    postgres_client_sslkey: Option<String>,
    sync_interval_seconds: Option<String>,
    batch_size: Option<String>,
    max_connection_retries: Option<String>,
    max_query_retries: Option<String>,
    db_connection_timeout_ms: Option<String>,
    db_query_timeout_ms: Option<String>,
    log_level: Option<String>,
    log_target: Option<String>,
    log_syslog_socket: Option<String>,
    upload_pipeline_depth: Option<String>,
    upload_time_budget_seconds: Option<String>,
    metrics_textfile: Option<String>,
}

/// Collects every problem while validating.
struct Checker {
    errors: Vec<ConfigError>,
}

impl Checker {
    fn fail(&mut self, var: &'static str, problem: impl Into<String>) {
        self.errors.push(ConfigError {
            var,
            problem: problem.into(),
        });
    }

    /// An optional non-empty string; empty counts as unset, as libpq does.
    fn string(&self, v: &Option<String>, default: &str) -> String {
        match v.as_deref() {
            Some(s) if !s.is_empty() => s.to_string(),
            _ => default.to_string(),
        }
    }

    fn required(&mut self, var: &'static str, v: &Option<String>) -> String {
        match v.as_deref().map(str::trim) {
            Some(s) if !s.is_empty() => s.to_string(),
            _ => {
                self.fail(var, "is required but not set");
                String::new()
            }
        }
    }

    /// An integer within `min..=max`; the value is echoed because none of these is secret.
    fn int(
        &mut self,
        var: &'static str,
        v: &Option<String>,
        default: u64,
        min: u64,
        max: u64,
    ) -> u64 {
        let Some(s) = v.as_deref().map(str::trim).filter(|s| !s.is_empty()) else {
            return default;
        };
        match s.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => n,
            Ok(n) => {
                self.fail(var, format!("{n} is out of range {min}..={max}"));
                default
            }
            Err(_) => {
                self.fail(
                    var,
                    format!("{s:?} is not a whole number (expected {min}..={max})"),
                );
                default
            }
        }
    }

    fn sslmode(&mut self, var: &'static str, v: &Option<String>, default: SslMode) -> SslMode {
        let Some(s) = v.as_deref().map(str::trim).filter(|s| !s.is_empty()) else {
            return default;
        };
        SslMode::parse(s).unwrap_or_else(|| {
            self.fail(
                var,
                format!("{s:?} is not one of disable, prefer, require, verify-ca, verify-full"),
            );
            default
        })
    }

    /// The plain password or the content of the `_FILE` variant, never both. The
    /// file's content is trimmed of one trailing newline, as `echo secret > file` leaves one.
    fn password(
        &mut self,
        var: &'static str,
        file_var: &'static str,
        plain: &Option<String>,
        file: &Option<String>,
    ) -> Secret {
        let plain = plain.as_deref().filter(|s| !s.is_empty());
        let file = file.as_deref().filter(|s| !s.is_empty());
        match (plain, file) {
            (Some(_), Some(_)) => {
                self.fail(
                    file_var,
                    format!("is set together with {var}; set only one"),
                );
                Secret::default()
            }
            (Some(p), None) => Secret::new(p),
            (None, Some(path)) => match std::fs::read_to_string(path) {
                Ok(s) => Secret::new(s.strip_suffix('\n').unwrap_or(&s).trim_end_matches('\r')),
                Err(e) => {
                    self.fail(file_var, format!("cannot read {path}: {}", io_reason(&e)));
                    Secret::default()
                }
            },
            (None, None) => Secret::default(),
        }
    }

    /// A path to a file that must be readable now, so that a typo is a configuration
    /// error at start rather than a TLS failure an hour later.
    fn readable_file(&mut self, var: &'static str, v: &Option<String>) -> Option<PathBuf> {
        let path = v.as_deref().map(str::trim).filter(|s| !s.is_empty())?;
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => match std::fs::File::open(path) {
                Ok(_) => Some(PathBuf::from(path)),
                Err(e) => {
                    self.fail(var, format!("cannot read {path}: {}", io_reason(&e)));
                    None
                }
            },
            Ok(_) => {
                self.fail(var, format!("{path} is not a regular file"));
                None
            }
            Err(e) => {
                self.fail(var, format!("cannot read {path}: {}", io_reason(&e)));
                None
            }
        }
    }
}

/// The OS error without Rust's "(os error 2)" decoration.
fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config, Vec<ConfigError>> {
        Config::from_vars(std::env::vars())
    }

    /// Reads any set of variables: tests hand in a map instead of mutating the
    /// process environment.
    pub fn from_vars<I: IntoIterator<Item = (String, String)>>(
        vars: I,
    ) -> Result<Config, Vec<ConfigError>> {
        let known: BTreeMap<String, String> = vars
            .into_iter()
            .filter(|(k, _)| ALL_VARS.contains(&k.as_str()))
            .collect();
        // Only strings are deserialized, so this cannot fail on a value: typed
        // parsing happens below, where the message can name the variable.
        let raw: Raw = envy::from_iter(known).unwrap_or_default();
        let mut c = Checker { errors: Vec::new() };

        let local = DbConfig {
            side: Side::Local,
            host: c.required(ENV_SYNC_HOST, &raw.postgres_sync_host),
            port: c.int(ENV_SYNC_PORT, &raw.postgres_sync_port, 5432, 1, 65535) as u16,
            dbname: c.string(&raw.postgres_sync_db, "postgres"),
            user: c.string(&raw.postgres_sync_user, "postgres"),
            password: c.password(
                ENV_SYNC_PASSWORD,
                ENV_SYNC_PASSWORD_FILE,
                &raw.postgres_sync_password,
                &raw.postgres_sync_password_file,
            ),
            sslmode: c.sslmode(
                ENV_SYNC_SSLMODE,
                &raw.postgres_sync_sslmode,
                SslMode::Disable,
            ),
            sslrootcert: None,
            sslcert: None,
            sslkey: None,
        };
        let central = DbConfig {
            side: Side::Central,
            host: c.required(ENV_CLIENT_HOST, &raw.postgres_client_host),
            port: c.int(ENV_CLIENT_PORT, &raw.postgres_client_port, 5432, 1, 65535) as u16,
            dbname: c.string(&raw.postgres_client_db, "postgres"),
            user: c.string(&raw.postgres_client_user, "postgres"),
            password: c.password(
                ENV_CLIENT_PASSWORD,
                ENV_CLIENT_PASSWORD_FILE,
                &raw.postgres_client_password,
                &raw.postgres_client_password_file,
            ),
            sslmode: c.sslmode(
                ENV_CLIENT_SSLMODE,
                &raw.postgres_client_sslmode,
                SslMode::VerifyFull,
            ),
            sslrootcert: c.readable_file(ENV_CLIENT_SSLROOTCERT, &raw.postgres_client_sslrootcert),
            sslcert: c.readable_file(ENV_CLIENT_SSLCERT, &raw.postgres_client_sslcert),
            sslkey: c.readable_file(ENV_CLIENT_SSLKEY, &raw.postgres_client_sslkey),
        };
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
        if central.is_unix_socket()
            && central.sslmode != SslMode::Disable
            && central.sslmode != SslMode::Prefer
        {
            c.fail(
                ENV_CLIENT_SSLMODE,
                format!(
                    "{} needs TCP, but the central host is a Unix socket directory",
                    central.sslmode.as_str()
                ),
            );
        }
        if local.is_unix_socket()
            && local.sslmode != SslMode::Disable
            && local.sslmode != SslMode::Prefer
        {
            c.fail(
                ENV_SYNC_SSLMODE,
                format!(
                    "{} needs TCP, but the local host is a Unix socket directory",
                    local.sslmode.as_str()
                ),
            );
        }

        let sync_interval = c.int(
            ENV_SYNC_INTERVAL_SECONDS,
            &raw.sync_interval_seconds,
            60,
            1,
            86_400,
        );
        let batch_size = c.int(ENV_BATCH_SIZE, &raw.batch_size, 100, 1, 100_000);
        let max_connection_retries = c.int(
            ENV_MAX_CONNECTION_RETRIES,
            &raw.max_connection_retries,
            5,
            1,
            100,
        );
        let max_query_retries = c.int(ENV_MAX_QUERY_RETRIES, &raw.max_query_retries, 3, 0, 100);
        let connect_timeout = c.int(
            ENV_DB_CONNECTION_TIMEOUT_MS,
            &raw.db_connection_timeout_ms,
            5000,
            100,
            600_000,
        );
        let query_timeout = c.int(
            ENV_DB_QUERY_TIMEOUT_MS,
            &raw.db_query_timeout_ms,
            30_000,
            100,
            3_600_000,
        );
        let upload_pipeline_depth = c.int(
            ENV_UPLOAD_PIPELINE_DEPTH,
            &raw.upload_pipeline_depth,
            8,
            1,
            256,
        );
        let upload_time_budget = c.int(
            ENV_UPLOAD_TIME_BUDGET_SECONDS,
            &raw.upload_time_budget_seconds,
            300,
            1,
            86_400,
        );

        let log_level = match raw.log_level.as_deref().map(str::trim).unwrap_or("") {
            "" | "info" => log::LevelFilter::Info,
            "error" => log::LevelFilter::Error,
            "warn" => log::LevelFilter::Warn,
            "debug" => log::LevelFilter::Debug,
            "trace" => log::LevelFilter::Trace,
            other => {
                c.fail(
                    ENV_LOG_LEVEL,
                    format!("{other:?} is not one of error, warn, info, debug, trace"),
                );
                log::LevelFilter::Info
            }
        };
        let log_target = match raw.log_target.as_deref().map(str::trim).unwrap_or("") {
            "" | "auto" => LogTarget::Auto,
            "syslog" => LogTarget::Syslog,
            "stderr" => LogTarget::Stderr,
            other => {
                c.fail(
                    ENV_LOG_TARGET,
                    format!("{other:?} is not one of syslog, stderr, auto"),
                );
                LogTarget::Auto
            }
        };
        let syslog_socket = raw
            .log_syslog_socket
            .as_deref()
            .filter(|s| !s.is_empty())
            .map(PathBuf::from);
        let metrics_textfile = match raw.metrics_textfile.as_deref().filter(|s| !s.is_empty()) {
            None => None,
            Some(p) => {
                let path = PathBuf::from(p);
                let dir_ok = path
                    .parent()
                    .map(|d| d.as_os_str().is_empty() || d.is_dir())
                    .unwrap_or(false);
                if !dir_ok || p.ends_with('/') {
                    c.fail(
                        ENV_METRICS_TEXTFILE,
                        format!("{p} is not a file path in an existing directory"),
                    );
                }
                Some(path)
            }
        };

        if !c.errors.is_empty() {
            return Err(c.errors);
        }
        Ok(Config {
            local,
            central,
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
            upload_time_budget: Duration::from_secs(upload_time_budget),
            metrics_textfile,
        })
    }

    /// The effective configuration as `NAME=value` lines, passwords redacted, for
    /// `check-config`.
    pub fn render(&self) -> String {
        let opt = |p: &Option<PathBuf>| {
            p.as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        };
        let pw = |s: &Secret| if s.is_empty() { "(empty)" } else { "***" };
        let lines: Vec<(&str, String)> = vec![
            (ENV_SYNC_HOST, self.local.host.clone()),
            (ENV_SYNC_PORT, self.local.port.to_string()),
            (ENV_SYNC_DB, self.local.dbname.clone()),
            (ENV_SYNC_USER, self.local.user.clone()),
            (ENV_SYNC_PASSWORD, pw(&self.local.password).into()),
            (ENV_SYNC_SSLMODE, self.local.sslmode.as_str().into()),
            (ENV_CLIENT_HOST, self.central.host.clone()),
            (ENV_CLIENT_PORT, self.central.port.to_string()),
            (ENV_CLIENT_DB, self.central.dbname.clone()),
            (ENV_CLIENT_USER, self.central.user.clone()),
            (ENV_CLIENT_PASSWORD, pw(&self.central.password).into()),
            (ENV_CLIENT_SSLMODE, self.central.sslmode.as_str().into()),
            (ENV_CLIENT_SSLROOTCERT, opt(&self.central.sslrootcert)),
            (ENV_CLIENT_SSLCERT, opt(&self.central.sslcert)),
            (ENV_CLIENT_SSLKEY, opt(&self.central.sslkey)),
            (
                ENV_SYNC_INTERVAL_SECONDS,
                self.sync_interval.as_secs().to_string(),
            ),
            (ENV_BATCH_SIZE, self.batch_size.to_string()),
            (
                ENV_MAX_CONNECTION_RETRIES,
                self.max_connection_retries.to_string(),
            ),
            (ENV_MAX_QUERY_RETRIES, self.max_query_retries.to_string()),
            (
                ENV_DB_CONNECTION_TIMEOUT_MS,
                self.connect_timeout.as_millis().to_string(),
            ),
            (
                ENV_DB_QUERY_TIMEOUT_MS,
                self.query_timeout.as_millis().to_string(),
            ),
            (ENV_LOG_LEVEL, self.log_level.as_str().to_ascii_lowercase()),
            (
                ENV_LOG_TARGET,
                match self.log_target {
                    LogTarget::Auto => "auto",
                    LogTarget::Syslog => "syslog",
                    LogTarget::Stderr => "stderr",
                }
                .into(),
            ),
            (ENV_LOG_SYSLOG_SOCKET, opt(&self.syslog_socket)),
            (
                ENV_UPLOAD_PIPELINE_DEPTH,
                self.upload_pipeline_depth.to_string(),
            ),
            (
                ENV_UPLOAD_TIME_BUDGET_SECONDS,
                self.upload_time_budget.as_secs().to_string(),
            ),
            (ENV_METRICS_TEXTFILE, opt(&self.metrics_textfile)),
        ];
        lines
            .into_iter()
            .map(|(k, v)| format!("{k}={v}\n"))
            .collect()
    }
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
        assert_eq!(c.local.port, 5432);
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
    }

    #[test]
    fn required_hosts_are_named_when_missing() {
        let errs = Config::from_vars(Vec::new()).unwrap_err();
        let names: Vec<_> = errs.iter().map(|e| e.var).collect();
        assert_eq!(names, vec![ENV_SYNC_HOST, ENV_CLIENT_HOST]);
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
        assert!(Config::from_vars(vars(&[(ENV_BATCH_SIZE, "100000")])).is_ok());
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
        for (s, m) in [
            ("disable", SslMode::Disable),
            ("prefer", SslMode::Prefer),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::VerifyCa),
            ("verify-full", SslMode::VerifyFull),
        ] {
            let c = Config::from_vars(vars(&[(ENV_CLIENT_SSLMODE, s)])).unwrap();
            assert_eq!(c.central.sslmode, m);
        }
        assert_eq!(
            err_vars(&[(ENV_CLIENT_SSLMODE, "verify_full")]),
            vec![ENV_CLIENT_SSLMODE]
        );
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
