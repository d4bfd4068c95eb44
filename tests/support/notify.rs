//! What systemd would receive on NOTIFY_SOCKET, with arrival times: a Unix datagram socket
//! the daemon under test sends to (the same protocol as tests/lifecycle.rs exercises).
#![allow(dead_code)]

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub struct Notifications {
    msgs: Arc<Mutex<Vec<(Instant, String)>>>,
    pub path: PathBuf,
}

impl Notifications {
    pub fn bind(dir: &Path) -> Notifications {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        Notifications::listen(sock, path)
    }

    /// Records what arrives on an already bound socket (an abstract one, say).
    pub fn listen(sock: UnixDatagram, path: PathBuf) -> Notifications {
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let msgs = Arc::new(Mutex::new(Vec::new()));
        let m = Arc::downgrade(&msgs);
        thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            // Ends when the test drops its Notifications.
            while let Some(m) = m.upgrade() {
                if let Ok(n) = sock.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    for line in text.lines() {
                        m.lock().unwrap().push((Instant::now(), line.to_string()));
                    }
                }
            }
        });
        Notifications { msgs, path }
    }

    pub fn all(&self) -> Vec<(Instant, String)> {
        self.msgs.lock().unwrap().clone()
    }

    pub fn has(&self, pred: impl Fn(&str) -> bool) -> bool {
        self.all().iter().any(|(_, l)| pred(l))
    }

    pub fn wait_for(&self, what: &str, limit: Duration, pred: impl Fn(&str) -> bool) {
        assert!(
            super::host::wait_until(limit, || self.has(&pred)),
            "no {what} within {limit:?}; got {:?}",
            self.lines()
        );
    }

    pub fn lines(&self) -> Vec<String> {
        self.all().into_iter().map(|(_, l)| l).collect()
    }

    /// When `line` first arrived.
    pub fn first(&self, line: &str) -> Option<Instant> {
        self.all()
            .into_iter()
            .find(|(_, l)| l == line)
            .map(|(t, _)| t)
    }

    /// The longest silence between WATCHDOG=1 pings in [from, to], counting the edges of
    /// the window.
    pub fn max_watchdog_gap(&self, from: Instant, to: Instant) -> Duration {
        let mut last = from;
        let mut max = Duration::ZERO;
        for (t, l) in self.all() {
            if l == "WATCHDOG=1" && t >= from && t <= to {
                max = max.max(t - last);
                last = t;
            }
        }
        max.max(to.saturating_duration_since(last))
    }
}
