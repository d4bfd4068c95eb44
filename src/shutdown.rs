//! A shutdown request that every task can observe: set once by the signal handler
//! (or a test), checked before each new batch and raced against every wait.

use tokio::sync::watch;

#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// The sending half: `trigger` requests shutdown.
pub struct Trigger {
    tx: watch::Sender<bool>,
}

pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger { tx }, Shutdown { rx })
}

impl Trigger {
    pub fn trigger(&self) {
        let _ = self.tx.send(true);
    }
}

impl Shutdown {
    /// A handle that is never triggered, for one-shot commands: its trigger is
    /// dropped at once, and [`Shutdown::requested`] never resolves without one.
    pub fn never() -> Shutdown {
        channel().1
    }

    pub fn is_requested(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once shutdown has been requested.
    pub async fn requested(&self) {
        let mut rx = self.rx.clone();
        while !*rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                // The trigger is gone: nobody can ask for shutdown any more.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Sleeps for `d`, waking early on shutdown, and keeps the watchdog fed
    /// meanwhile. Returns false if shutdown was requested.
    pub async fn sleep(&self, d: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            crate::notify::alive();
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return !self.is_requested();
            }
            let step = (deadline - now).min(crate::notify::ping_period());
            tokio::select! {
                _ = self.requested() => return false,
                _ = tokio::time::sleep(step) => {}
            }
        }
    }
}

/// Waits for SIGTERM or SIGINT, logs which, and requests shutdown. A second signal
/// exits at once: every batch is a single transaction, so the databases roll back
/// whatever was in flight and nothing is half-applied.
///
/// SIGHUP is logged and otherwise ignored, all along: its default action would end
/// the daemon without a word, and systemd counts a death by SIGHUP as clean, so
/// `Restart=on-failure` would not bring it back. There is nothing to reload: the
/// configuration is read at start, password files at every connection attempt
/// (docs/operating.md).
pub async fn on_signals(trigger: Trigger) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        log::error!("cannot install signal handlers");
        return;
    };
    let name = next_stop_signal(&mut term, &mut int, &mut hup).await;
    log::info!("{name} received; finishing the batch in flight, then stopping");
    // systemd learns at once that the stop has begun, not when it is done.
    crate::notify::stopping();
    crate::notify::status("stopping: finishing the batch in flight");
    trigger.trigger();
    let name = next_stop_signal(&mut term, &mut int, &mut hup).await;
    log::warn!("second signal ({name}); exiting now");
    crate::notify::stopping();
    std::process::exit(0);
}

/// The next SIGTERM or SIGINT; SIGHUPs meanwhile are said and passed over.
async fn next_stop_signal(
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
    hup: &mut tokio::signal::unix::Signal,
) -> &'static str {
    loop {
        tokio::select! {
            _ = term.recv() => return "SIGTERM",
            _ = int.recv() => return "SIGINT",
            _ = hup.recv() => log::info!(
                "SIGHUP received; ignored: the configuration is read at start only \
                 (restart to change it), password files at every connection attempt"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_interval_sleep_runs_its_full_length_when_nothing_asks_to_stop() {
        let (_trigger, shutdown) = channel();
        let t = Instant::now();
        assert!(shutdown.sleep(Duration::from_secs(60)).await);
        assert_eq!(t.elapsed(), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn a_shutdown_request_cuts_the_interval_sleep_short() {
        let (trigger, shutdown) = channel();
        let t = Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(7)).await;
            trigger.trigger();
        });
        assert!(!shutdown.sleep(Duration::from_secs(60)).await);
        assert_eq!(t.elapsed(), Duration::from_secs(7));
        assert!(shutdown.is_requested());
    }

    #[tokio::test(start_paused = true)]
    async fn never_is_never_requested() {
        let shutdown = Shutdown::never();
        assert!(shutdown.sleep(Duration::from_secs(3600)).await);
        let waited = tokio::time::timeout(Duration::from_secs(3600), shutdown.requested()).await;
        assert!(waited.is_err(), "a never-shutdown resolved");
    }
}
