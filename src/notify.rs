//! systemd notifications over `NOTIFY_SOCKET`: READY, WATCHDOG, STATUS, STOPPING.
//!
//! The watchdog is fed only by [`alive`], which the cycle loop calls as it makes
//! progress (between batches, during backoff and interval waits). A free-running
//! timer would keep a hung loop alive; this way a hang stops the pings and systemd
//! restarts the daemon.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

struct Watchdog {
    period: Option<Duration>,
    last: Option<Instant>,
}

static WATCHDOG: Mutex<Watchdog> = Mutex::new(Watchdog {
    period: None,
    last: None,
});

/// Reads `WATCHDOG_USEC` once; pings are then sent every quarter of it, which leaves
/// room for a slow step between two calls to [`alive`] within systemd's half-period rule.
pub fn init() {
    let mut usec = 0;
    let enabled = sd_notify::watchdog_enabled(false, &mut usec);
    let mut w = WATCHDOG.lock().unwrap_or_else(|e| e.into_inner());
    w.period = (enabled && usec > 0).then(|| Duration::from_micros(usec / 4));
}

/// How often the loop should call [`alive`] while it waits.
pub fn ping_period() -> Duration {
    let w = WATCHDOG.lock().unwrap_or_else(|e| e.into_inner());
    w.period
        .unwrap_or(Duration::from_secs(1))
        .min(Duration::from_secs(1))
}

/// The loop is making progress: send WATCHDOG=1 if one is due.
pub fn alive() {
    let mut w = WATCHDOG.lock().unwrap_or_else(|e| e.into_inner());
    let Some(period) = w.period else { return };
    let now = Instant::now();
    if w.last.is_none_or(|l| now.duration_since(l) >= period) {
        w.last = Some(now);
        let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
    }
}

pub fn ready() {
    let _ = sd_notify::notify(false, &[NotifyState::Ready]);
    alive();
}

/// STATUS= line shown by `systemctl status`.
pub fn status(text: &str) {
    let _ = sd_notify::notify(false, &[NotifyState::Status(text)]);
}

pub fn stopping() {
    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
}
