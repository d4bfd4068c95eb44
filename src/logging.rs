//! Logging to syslog (facility daemon, ident `meter-sync`) or stderr per
//! `LOG_TARGET`. The stderr logger is a few lines rather than a framework.

use std::io::Write;
use std::path::Path;

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

/// Installs the logger. Syslog that cannot be reached falls back to stderr with a
/// warning rather than losing the daemon's logs.
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
        let formatter = syslog::Formatter3164 {
            facility: syslog::Facility::LOG_DAEMON,
            hostname: None,
            process: "meter-sync".into(),
            pid: std::process::id(),
        };
        match syslog::unix_custom(formatter, socket) {
            Ok(logger) => {
                let _ = log::set_boxed_logger(Box::new(syslog::BasicLogger::new(logger)));
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

/// Logging for commands that run before or without a valid configuration.
pub fn init_stderr(level: log::LevelFilter) {
    log::set_max_level(level);
    let _ = log::set_boxed_logger(Box::new(Stderr { level }));
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` without a date crate.
fn utc_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_millis()
    )
}
