//! `SYNC_LOGS_RETAIN_DAYS`: `sync_logs` rows older than that are deleted, so the
//! table stops growing by three rows a cycle forever (0 keeps everything).
//!
//! Pruning runs after a cycle, on the cycle's own locked local connection, at
//! most once an hour: an hour of rows at a time is one small delete rather than
//! three tiny ones a minute (each a transaction and WAL on the gateway's flash).
//! One pass deletes at most [`MAX_BATCHES`] batches of [`BATCH`] rows, each its
//! own short transaction, oldest first by the `timestamp` index, so a backlog
//! (retention switched on after a year of history: 1.6 million rows) never
//! holds locks or stalls a cycle; while a pass ends with a full batch, the next
//! cycle goes on with it instead of waiting an hour.

use std::time::{Duration, Instant};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::lock::LockedLocal;
use crate::shutdown::Shutdown;

/// Rows per delete statement.
pub const BATCH: i64 = 1000;
/// Delete statements per pass.
pub const MAX_BATCHES: u32 = 10;
/// Time between passes once the backlog is gone.
const EVERY: Duration = Duration::from_secs(3600);

/// When the next pass is due.
#[derive(Default)]
pub struct Schedule {
    last: Option<Instant>,
    /// The last pass stopped at its limit: rows older than the cutoff remain.
    backlog: bool,
}

impl Schedule {
    fn due(&self, now: Instant) -> bool {
        self.backlog || self.last.is_none_or(|t| now.duration_since(t) >= EVERY)
    }

    /// Runs a pass if one is due. Failures are logged (a warning: the cycle
    /// itself went fine) and retried an hour later, like a pass that succeeded (a
    /// lasting failure, say a revoked DELETE, warns hourly rather than every
    /// cycle); the error is returned so
    /// that the caller drops a connection it lost (a timed-out round trip leaves
    /// the connection unusable, and the next cycle would wait on it again).
    pub async fn maybe_prune(
        &mut self,
        cfg: &Config,
        local: &LockedLocal,
        shutdown: &Shutdown,
    ) -> Option<Error> {
        let now = Instant::now();
        if cfg.sync_logs_retain_days == 0 || !self.due(now) {
            return None;
        }
        match prune(local, cfg.sync_logs_retain_days, shutdown).await {
            Ok((deleted, backlog)) => {
                self.last = Some(now);
                self.backlog = backlog;
                log::debug!(
                    "sync_logs: deleted {deleted} row(s) older than {} days{}",
                    cfg.sync_logs_retain_days,
                    if backlog { "; more next cycle" } else { "" }
                );
                None
            }
            Err(e) => {
                self.last = Some(now);
                log::warn!("sync_logs retention: {e}");
                Some(e)
            }
        }
    }
}

/// One pass: returns the rows deleted and whether older rows remain.
async fn prune(local: &LockedLocal, days: u32, shutdown: &Shutdown) -> Result<(u64, bool)> {
    let days = i32::try_from(days).unwrap_or(i32::MAX);
    let mut deleted = 0;
    for _ in 0..MAX_BATCHES {
        if shutdown.is_requested() {
            return Ok((deleted, true));
        }
        let n = local
            .execute(
                "prune sync_logs",
                "DELETE FROM sync_logs WHERE id IN (\
                   SELECT id FROM sync_logs \
                   WHERE \"timestamp\" < now() - make_interval(days => $1) \
                   ORDER BY \"timestamp\" LIMIT $2)",
                &[&days, &BATCH],
            )
            .await?;
        deleted += n;
        if n < BATCH as u64 {
            return Ok((deleted, false));
        }
        crate::notify::alive();
    }
    Ok((deleted, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_is_due_at_start_hourly_and_while_a_backlog_lasts() {
        let t0 = Instant::now();
        let mut s = Schedule::default();
        assert!(s.due(t0), "the first cycle prunes");
        s.last = Some(t0);
        assert!(!s.due(t0 + Duration::from_secs(60)));
        assert!(!s.due(t0 + EVERY - Duration::from_secs(1)));
        assert!(s.due(t0 + EVERY));
        s.backlog = true;
        assert!(
            s.due(t0 + Duration::from_secs(60)),
            "a backlog goes on next cycle"
        );
    }
}
