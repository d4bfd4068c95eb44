//! Logging to syslog (facility daemon, ident `meter-sync`) or stderr per
//! `LOG_TARGET`. Both loggers are a few lines rather than a framework.
//!
//! Syslog is spoken directly, as glibc's syslog(3) does: one datagram per line,
//! `<PRI>Mmm dd hh:mm:ss meter-sync[pid]: message` (RFC 3164) on the local
//! socket. Written here rather than taken from the syslog crate because a
//! daemon that runs for months must survive the syslog daemon restarting (the
//! crate keeps the dead socket and drops every later line), and because the
//! crate's date dependency alone weighs more than this module.

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::config::{Config, LogTarget};

struct Stderr {
    level: log::LevelFilter,
}

impl log::Log for Stderr {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= self.level
    }

    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            let line = format!("{} {:<5} {}\n", utc_now(), r.level(), r.args());
            // One write per line so that concurrent lines do not interleave.
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
    }

    fn flush(&self) {}
}

/// syslog facility daemon (3): PRI = 3 × 8 + severity.
const FACILITY_DAEMON: u8 = 3;
/// Longer messages are cut (at a character boundary): some syslog daemons drop
/// oversized datagrams whole.
const MAX_MESSAGE: usize = 8 * 1024;

struct Syslog {
    level: log::LevelFilter,
    path: PathBuf,
    socket: Mutex<Option<UnixDatagram>>,
}

impl Syslog {
    fn connect(path: &Path) -> std::io::Result<UnixDatagram> {
        let s = UnixDatagram::unbound()?;
        s.connect(path)?;
        Ok(s)
    }

    /// The severity of RFC 5424 section 6.2.1 for a log level.
    fn severity(level: log::Level) -> u8 {
        match level {
            log::Level::Error => 3,
            log::Level::Warn => 4,
            log::Level::Info => 6,
            log::Level::Debug | log::Level::Trace => 7,
        }
    }
}

impl log::Log for Syslog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= self.level
    }

    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let mut msg = r.args().to_string();
        if msg.len() > MAX_MESSAGE {
            let mut cut = MAX_MESSAGE;
            while !msg.is_char_boundary(cut) {
                cut -= 1;
            }
            msg.truncate(cut);
        }
        let line = format!(
            "<{}>{} meter-sync[{}]: {msg}",
            FACILITY_DAEMON * 8 + Syslog::severity(r.level()),
            rfc3164_now(),
            std::process::id()
        );
        let mut sock = self.socket.lock().unwrap_or_else(|e| e.into_inner());
        let sent = sock
            .as_ref()
            .is_some_and(|s| s.send(line.as_bytes()).is_ok());
        if !sent {
            // The syslog daemon restarted (the old socket is gone) or was busy:
            // reconnect once and retry, like syslog(3); otherwise the line goes to
            // stderr, which systemd still collects.
            *sock = Syslog::connect(&self.path).ok();
            let resent = sock
                .as_ref()
                .is_some_and(|s| s.send(line.as_bytes()).is_ok());
            if !resent {
                let _ = writeln!(std::io::stderr().lock(), "{line}");
            }
        }
    }

    fn flush(&self) {}
}

/// Installs the logger. Syslog that cannot be reached at start falls back to
/// stderr with a warning rather than losing the daemon's logs.
pub fn init(cfg: &Config) {
    let socket = cfg
        .syslog_socket
        .as_deref()
        .unwrap_or(Path::new("/dev/log"));
    let want_syslog = match cfg.log_target {
        LogTarget::Syslog => true,
        LogTarget::Stderr => false,
        LogTarget::Auto => socket.exists(),
    };
    log::set_max_level(cfg.log_level);
    if want_syslog {
        match Syslog::connect(socket) {
            Ok(s) => {
                let _ = log::set_boxed_logger(Box::new(Syslog {
                    level: cfg.log_level,
                    path: socket.to_path_buf(),
                    socket: Mutex::new(Some(s)),
                }));
                return;
            }
            Err(e) => {
                let _ = log::set_boxed_logger(Box::new(Stderr {
                    level: cfg.log_level,
                }));
                log::warn!(
                    "syslog at {} unavailable ({e}); logging to stderr",
                    socket.display()
                );
                return;
            }
        }
    }
    let _ = log::set_boxed_logger(Box::new(Stderr {
        level: cfg.log_level,
    }));
}

/// Seconds since the epoch, split into (year, month, day, seconds of the day,
/// milliseconds) in UTC, without a date crate (Howard Hinnant's civil_from_days).
fn civil_now() -> (i64, i64, i64, i64, u32) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, rem, now.subsec_millis())
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn utc_now() -> String {
    let (y, m, d, rem, ms) = civil_now();
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// RFC 3164's `Mmm dd hh:mm:ss` (day padded with a space). UTC: the gateway
/// has no time zone database to speak of, and journald stamps lines itself.
fn rfc3164_now() -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (_, m, d, rem, _) = civil_now();
    format!(
        "{} {d:>2} {:02}:{:02}:{:02}",
        MONTHS[(m - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
