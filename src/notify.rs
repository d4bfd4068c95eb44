//! systemd notifications over `NOTIFY_SOCKET`: READY, WATCHDOG, STATUS, STOPPING.
//!
//! The watchdog is fed only by [`alive`], which the cycle loop calls as it makes
//! progress (between batches, during backoff and interval waits) and which
//! [`while_bounded`] calls while the loop awaits a round trip that has a timeout.
//! A free-running timer would keep a hung loop alive; this way a hang stops the
//! pings and systemd restarts the daemon.
//!
//! The protocol (one datagram of `KEY=value` lines) is written here rather than
//! taken from the sd-notify crate: its 0.4 releases treat an abstract socket name
//! (`@…`, which systemd hands to services in containers and user managers) as a
//! file path, and enable the watchdog only when `WATCHDOG_PID` is set, where
//! sd_watchdog_enabled(3) also accepts it unset.

use std::ffi::OsStr;
use std::future::Future;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Mutex;
use std::time::{Duration, Instant};

struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    /// How often to send WATCHDOG=1: a quarter of `WATCHDOG_USEC`, which leaves
    /// room for a slow step between two calls to [`alive`] within systemd's
    /// "at least every half" rule.
    period: Option<Duration>,
    last: Option<Instant>,
}

static NOTIFIER: Mutex<Notifier> = Mutex::new(Notifier {
    target: None,
    period: None,
    last: None,
});

fn notifier() -> std::sync::MutexGuard<'static, Notifier> {
    NOTIFIER.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` once. Without
/// `NOTIFY_SOCKET` every notification is a no-op.
pub fn init() {
    let socket = std::env::var_os("NOTIFY_SOCKET");
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    let mut n = notifier();
    n.target = socket.as_deref().and_then(|s| match open(s) {
        Ok(t) => Some(t),
        Err(e) => {
            log::warn!(
                "NOTIFY_SOCKET {}: {e}; not notifying systemd",
                s.to_string_lossy()
            );
            None
        }
    });
    n.period = watchdog_usec(usec.as_deref(), pid.as_deref(), std::process::id())
        .map(|usec| Duration::from_micros(usec) / 4);
    n.last = None;
}

/// An unbound datagram socket and the address to send to. A leading `@` names a
/// socket in Linux's abstract namespace, as in sd_notify(3).
fn open(name: &OsStr) -> std::io::Result<(UnixDatagram, SocketAddr)> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = name.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(abstract_name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(abstract_name)?
        }
        None => SocketAddr::from_pathname(name)?,
    };
    Ok((UnixDatagram::unbound()?, addr))
}

/// sd_watchdog_enabled(3): the watchdog is on when `WATCHDOG_USEC` is a positive
/// number and `WATCHDOG_PID` is either unset or this process's id (a child that
/// inherited the variables must not feed its parent's watchdog).
fn watchdog_usec(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<u64> {
    let usec = usec?.trim().parse::<u64>().ok().filter(|u| *u > 0)?;
    match pid {
        None => Some(usec),
        Some(p) => (p.trim().parse::<u32>().ok()? == me).then_some(usec),
    }
}

fn send(n: &Notifier, msg: &str) {
    if let Some((sock, addr)) = &n.target {
        // systemd may be gone or busy; a lost notification must not stop the daemon.
        let _ = sock.send_to_addr(msg.as_bytes(), addr);
    }
}

/// True when systemd expects watchdog pings.
pub fn watchdog_enabled() -> bool {
    let n = notifier();
    n.target.is_some() && n.period.is_some()
}

/// How often the loop should call [`alive`] while it waits: half the ping
/// period, so that a call landing just before a ping is due is followed by one
/// soon after it is due, and pings stay at most 1.5 periods (3/8 of
/// `WATCHDOG_USEC`) apart.
pub fn ping_period() -> Duration {
    notifier()
        .period
        .map_or(Duration::from_secs(1), |p| p / 2)
        .min(Duration::from_secs(1))
}

/// The loop is making progress: send WATCHDOG=1 if one is due.
pub fn alive() {
    let mut n = notifier();
    let Some(period) = n.period else { return };
    let now = Instant::now();
    if n.last.is_none_or(|l| now.duration_since(l) >= period) {
        n.last = Some(now);
        send(&n, "WATCHDOG=1\n");
    }
}

/// Awaits `fut`, feeding the watchdog while it is pending. Only for futures that
/// are themselves bounded (a round trip under `DB_QUERY_TIMEOUT_MS`, a connect
/// under `DB_CONNECTION_TIMEOUT_MS`): the loop is then waiting for a deadline, not
/// hung, and a watchdog shorter than the query timeout must not kill it.
pub async fn while_bounded<F: Future>(fut: F) -> F::Output {
    if !watchdog_enabled() {
        return fut.await;
    }
    let mut fut = std::pin::pin!(fut);
    loop {
        tokio::select! {
            biased;
            out = &mut fut => return out,
            _ = tokio::time::sleep(ping_period()) => alive(),
        }
    }
}

pub fn ready() {
    send(&notifier(), "READY=1\n");
    alive();
}

/// STATUS= line shown by `systemctl status`; one line, so newlines become spaces.
pub fn status(text: &str) {
    let line: String = text
        .chars()
        .map(|c| if c == '\n' { ' ' } else { c })
        .collect();
    send(&notifier(), &format!("STATUS={line}\n"));
}

pub fn stopping() {
    send(&notifier(), "STOPPING=1\n");
}

#[cfg(test)]
mod tests {
    use super::watchdog_usec;

    #[test]
    fn watchdog_follows_sd_watchdog_enabled() {
        assert_eq!(watchdog_usec(Some("2000000"), None, 7), Some(2_000_000));
        assert_eq!(
            watchdog_usec(Some("2000000"), Some("7"), 7),
            Some(2_000_000)
        );
        assert_eq!(watchdog_usec(Some("2000000"), Some("8"), 7), None);
        assert_eq!(watchdog_usec(Some("2000000"), Some("x"), 7), None);
        assert_eq!(watchdog_usec(Some("0"), None, 7), None);
        assert_eq!(watchdog_usec(Some("soon"), None, 7), None);
        assert_eq!(watchdog_usec(None, Some("7"), 7), None);
    }
}
