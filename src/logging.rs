//! Logging to syslog (facility daemon, ident `meter-sync`) or stderr per
//! `LOG_TARGET`. Both loggers are a few lines rather than a framework.
//!
//! Syslog is spoken directly, as glibc's syslog(3) does: one datagram per line,
//! `<PRI>Mmm dd hh:mm:ss meter-sync[pid]: message` (RFC 3164) on the local
//! socket. Written here rather than taken from the syslog crate because a
//! daemon that runs for months must survive the syslog daemon restarting (the
//! crate keeps the dead socket and drops every later line), and because the
//! crate's date dependency alone weighs more than this module.
//!
//! Stderr that is the journal (systemd sets `JOURNAL_STREAM` to the device and
//! inode of the stream it connected, sd-daemon(3)) gets each line as
//! `<N>message`, N the syslog severity, which journald turns into the entry's
//! priority; it stamps the time itself. Any other stderr (a terminal, a file, a
//! pipe, or a child that inherited the variable but not the stream) gets
//! `timestamp LEVEL message`.
//!
//! Every line is one line: control characters in the message (a newline in a
//! meter name central sent, an escape sequence in an error message) are escaped
//! here, for every target, so that no text from outside can forge a log line.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::config::{Config, LogTarget};

/// The syslog severity of RFC 5424 section 6.2.1 (also sd-daemon(3)'s prefix).
fn severity(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

/// Characters that would end a line, rewrite it on a terminal, or reorder what a
/// reader sees: C0 and C1 controls and DEL (`char::is_control`), the Unicode line
/// and paragraph separators, and the bidirectional overrides and isolates.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every character of [`needs_escape`] written as Rust writes it in a
/// string literal (`\n`, `\r`, `\t`, `\u{1b}`). Backslashes are left alone: the
/// point is that one record stays one line, not a reversible encoding.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut o = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if needs_escape(c) => {
                let _ = write!(o, "\\u{{{:x}}}", u32::from(c));
            }
            c => o.push(c),
        }
    }
    Cow::Owned(o)
}

/// Whether `JOURNAL_STREAM` ("DEVICE:INODE", both decimal) names this stream.
fn journal_stream_matches(var: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = var.trim().split_once(':') else {
        return false;
    };
    d.parse::<u64>().ok() == Some(dev) && i.parse::<u64>().ok() == Some(ino)
}

/// Whether stderr is connected to the journal, as sd-daemon(3) says to find
/// out: `JOURNAL_STREAM` set and equal to stderr's device and inode. Checked
/// once: neither changes while the process runs.
pub fn stderr_is_journal() -> bool {
    static JOURNAL: OnceLock<bool> = OnceLock::new();
    *JOURNAL.get_or_init(|| {
        use std::os::fd::AsFd;
        let Some(var) = std::env::var_os("JOURNAL_STREAM") else {
            return false;
        };
        // fstat(2) on a duplicate of fd 2: std's safe way to stat a descriptor.
        let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
            return false;
        };
        match std::fs::File::from(fd).metadata() {
            Ok(md) => journal_stream_matches(&var.to_string_lossy(), md.dev(), md.ino()),
            Err(_) => false,
        }
    })
}

/// One stderr line for `level`, escaped, newline-terminated.
fn stderr_line(level: log::Level, msg: &str) -> String {
    let msg = escape(msg);
    if stderr_is_journal() {
        format!("<{}>{msg}\n", severity(level))
    } else {
        format!("{} {:<5} {msg}\n", crate::utc::Utc::now().rfc3339(), level)
    }
}

/// Set when the installed logger writes to stderr (see [`repeat_error`]).
static LOGGER_ON_STDERR: AtomicBool = AtomicBool::new(false);

/// Prints `meter-sync: MESSAGE` on stderr, at error priority when stderr is the
/// journal (so that `journalctl -p err` shows why the daemon stopped). For what
/// is said before logging starts: configuration and usage errors.
pub fn print_error(msg: &str) {
    let msg = escape(msg);
    let line = if stderr_is_journal() {
        format!("<3>meter-sync: {msg}\n")
    } else {
        format!("meter-sync: {msg}\n")
    };
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// After a fatal error was logged: repeats it on stderr for an operator at a
/// terminal when the log went to syslog. Not when the log is on stderr already,
/// nor when stderr is the journal (syslog's socket is then the journal's too).
pub fn repeat_error(msg: &str) {
    if !LOGGER_ON_STDERR.load(Ordering::Relaxed) && !stderr_is_journal() {
        print_error(msg);
    }
}

struct Stderr {
    level: log::LevelFilter,
}

impl log::Log for Stderr {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= self.level
    }

    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            let line = stderr_line(r.level(), &r.args().to_string());
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
}

impl log::Log for Syslog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= self.level
    }

    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let mut msg = escape(&r.args().to_string()).into_owned();
        if msg.len() > MAX_MESSAGE {
            let mut cut = MAX_MESSAGE;
            while !msg.is_char_boundary(cut) {
                cut -= 1;
            }
            msg.truncate(cut);
        }
        let line = format!(
            "<{}>{} meter-sync[{}]: {msg}",
            FACILITY_DAEMON * 8 + severity(r.level()),
            crate::utc::Utc::now().rfc3164(),
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
                let line = stderr_line(r.level(), &msg);
                let _ = std::io::stderr().lock().write_all(line.as_bytes());
            }
        }
    }

    fn flush(&self) {}
}

/// Installs the logger. Syslog that cannot be reached at start falls back to
/// stderr with a warning rather than losing the daemon's logs.
pub fn init(cfg: &Config) {
    let socket = cfg.syslog_socket.as_path();
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
                init_stderr(cfg.log_level);
                log::warn!(
                    "syslog at {} unavailable ({e}); logging to stderr",
                    socket.display()
                );
                return;
            }
        }
    }
    init_stderr(cfg.log_level);
}

/// Logging to stderr; also for commands that run before or without a valid
/// configuration.
pub fn init_stderr(level: log::LevelFilter) {
    log::set_max_level(level);
    if log::set_boxed_logger(Box::new(Stderr { level })).is_ok() {
        LOGGER_ON_STDERR.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newline_from_outside_cannot_start_a_line() {
        let forged =
            "Hall\n2026-01-01T00:00:00.000Z ERROR forged\r\u{1b}[2K\u{85}x\u{2028}y\u{202e}z\u{7f}";
        let e = escape(forged);
        assert_eq!(
            e,
            "Hall\\n2026-01-01T00:00:00.000Z ERROR forged\\r\\u{1b}[2K\\u{85}x\\u{2028}y\\u{202e}z\\u{7f}"
        );
        assert!(!e.chars().any(needs_escape));
        let line = stderr_line(log::Level::Info, forged);
        assert_eq!(line.matches('\n').count(), 1, "{line:?}");
        assert!(line.ends_with('\n'));
    }

    #[test]
    fn plain_text_is_borrowed_untouched() {
        let s = "meters: 1 new (Zähler Süd), tab-free, back\\slash kept";
        assert!(matches!(escape(s), Cow::Borrowed(t) if t == s));
    }

    #[test]
    fn journal_stream_is_device_colon_inode() {
        assert!(journal_stream_matches("2049:123456", 2049, 123456));
        assert!(journal_stream_matches("2049:123456\n", 2049, 123456));
        assert!(!journal_stream_matches("2049:123457", 2049, 123456));
        assert!(!journal_stream_matches("2050:123456", 2049, 123456));
        for bad in ["", ":", "2049", "2049:", "x:1", "2049:123456:7"] {
            assert!(!journal_stream_matches(bad, 2049, 123456), "{bad:?}");
        }
    }

    #[test]
    fn severities_are_sd_daemon_prefixes() {
        assert_eq!(severity(log::Level::Error), 3);
        assert_eq!(severity(log::Level::Warn), 4);
        assert_eq!(severity(log::Level::Info), 6);
        assert_eq!(severity(log::Level::Debug), 7);
        assert_eq!(severity(log::Level::Trace), 7);
    }
}
