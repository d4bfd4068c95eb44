//! The run loop: take the cycle lock, cycle, report (log, systemd STATUS=, metrics
//! file), pause `SYNC_INTERVAL_SECONDS`, until shutdown. Also `once`, which is one
//! turn of the same loop.

use std::time::Duration;

use crate::config::Config;
use crate::cycle::{self, Connections, NoLocal};
use crate::error::{Error, Result};
use crate::heartbeat::{Beat, Heartbeat};
use crate::lock::LockHolder;
use crate::metrics::Metrics;
use crate::report::CycleReport;
use crate::retention::Schedule;
use crate::shutdown::Shutdown;

/// How long a cycle may go on after SIGTERM: the round trip in flight gets
/// `DB_QUERY_TIMEOUT_MS` to answer (a batch then commits or rolls back whole). A
/// connection attempt in progress is abandoned at once ([`Db::connect_with_retry`]);
/// `DB_CONNECTION_TIMEOUT_MS` stays in the bound as its margin, so that the stated
/// bound did not change. Past that the cycle is abandoned: dropping its
/// connections rolls back whatever transaction was open.
///
/// [`Db::connect_with_retry`]: crate::db::Db::connect_with_retry
pub fn shutdown_grace(cfg: &Config) -> Duration {
    cfg.query_timeout + cfg.connect_timeout
}

/// How one turn of the loop ended.
enum Turn {
    Ran(CycleReport),
    /// Another process holds the cycle lock.
    Busy(Option<LockHolder>),
    /// The local database could not be reached (or the lock not queried).
    LocalDown(Error),
    /// Shutdown's grace period ran out in the middle of the cycle.
    Abandoned,
    /// The local schema is too new for this release: the process stops (exit 78).
    Refused(Error),
}

/// Resolves `grace` after shutdown was requested.
async fn grace_expired(shutdown: &Shutdown, grace: Duration) {
    shutdown.requested().await;
    tokio::time::sleep(grace).await;
    log::warn!(
        "shutdown grace of {} ms passed; abandoning the cycle (open transactions roll back)",
        grace.as_millis()
    );
}

/// What the daemon keeps from one turn to the next: the connections, the metrics
/// since start, the heartbeat's state, the retention schedule.
struct Gateway {
    conns: Connections,
    metrics: Metrics,
    heartbeat: Heartbeat,
    retention: Schedule,
}

impl Gateway {
    fn new(cfg: &Config) -> Gateway {
        Gateway {
            conns: Connections::default(),
            metrics: Metrics::default(),
            heartbeat: Heartbeat::new(cfg.gateway_id.clone(), &cfg.central),
            retention: Schedule::default(),
        }
    }

    /// Takes the lock (unless this process already holds it), logs the queue, and
    /// runs one cycle bounded by the shutdown grace. Shutdown during the steps
    /// before the cycle ends the turn at once: no batch is in flight there.
    async fn turn(&mut self, cfg: &Config, shutdown: &Shutdown) -> Turn {
        self.conns.begin_cycle();
        self.heartbeat.cycle_started();
        let queued = tokio::select! {
            ready = prepare(cfg, &mut self.conns, shutdown) => match ready {
                Ok(queued) => queued,
                Err(t) => {
                    // A cycle that could not reach its local database is a cycle
                    // error, for `once` as for `run`.
                    if matches!(t, Turn::LocalDown(_)) && !shutdown.is_requested() {
                        self.metrics.record_failed_start();
                    }
                    return t;
                }
            },
            _ = shutdown.requested() => return Turn::Abandoned,
        };
        let turn = tokio::select! {
            report = cycle::run(cfg, &mut self.conns, shutdown, queued) => Turn::Ran(report),
            _ = grace_expired(shutdown, shutdown_grace(cfg)) => Turn::Abandoned,
        };
        if let Turn::Ran(report) = &turn {
            self.metrics.record_cycle(report);
        }
        turn
    }

    /// After a turn: count the queue again (for the heartbeat and the metrics
    /// file), send the heartbeat, write the metrics file, then housekeeping (which
    /// never delays the report). Skipped queries and the skipped heartbeat once
    /// shutdown is requested keep the stop within its bound.
    async fn after_turn(&mut self, cfg: &Config, shutdown: &Shutdown, turn: &Turn) {
        // The metrics file is the lock holder's: a second daemon started by hand
        // with the unit's environment would overwrite it with a process that never
        // cycled (no last cycle, counters at 0) every interval.
        if matches!(turn, Turn::Busy(_)) {
            return;
        }
        let (conns, m) = (&mut self.conns, &mut self.metrics);
        if shutdown.is_requested() {
            write_metrics(cfg, m);
            return;
        }
        let queue = match conns.local() {
            Some(local) => match crate::heartbeat::queue_state(local).await {
                Ok(q) => Some(q),
                Err(e) => {
                    // Said, not debug: a link that went silent right after the cycle
                    // shows here first, and the connection is dropped for it.
                    log::warn!("queue after the cycle unknown: {e}");
                    conns.drop_if_lost(&e);
                    None
                }
            },
            None => None,
        };
        m.set_queue(queue.map(|q| (q.pending, q.quarantined)));
        m.set_oldest_pending(queue.map(|q| (q.oldest_pending_at, q.oldest_pending_age)));
        let beat = match turn {
            Turn::Ran(report) => Some(Beat::of_report(report, queue)),
            Turn::LocalDown(e) => Some(Beat::not_started(&format!(
                "local database unreachable: {e}"
            ))),
            // Central's gateway_status is where a fleet's operator sees why.
            Turn::Refused(e) => Some(Beat::not_started(&e.to_string())),
            // Another daemon cycles this gateway and sends its heartbeat.
            Turn::Busy(_) | Turn::Abandoned => None,
        };
        if let Some(beat) = beat {
            send_heartbeat(cfg, conns, shutdown, &mut self.heartbeat, &beat).await;
        }
        write_metrics(cfg, m);
        if let (Turn::Ran(_), Some(local)) = (turn, conns.local()) {
            if let Some(e) = self.retention.maybe_prune(cfg, local, shutdown).await {
                conns.drop_if_lost(&e);
            }
        }
    }
}

/// Opens the local connection with the cycle lock (see [`Connections::ensure_local`])
/// and logs the queue size, which it returns for the upload (None if uncounted).
async fn prepare(
    cfg: &Config,
    conns: &mut Connections,
    shutdown: &Shutdown,
) -> std::result::Result<Option<i64>, Turn> {
    conns
        .ensure_local(cfg, shutdown)
        .await
        .map_err(|e| match e {
            NoLocal::Down(e) => Turn::LocalDown(e),
            NoLocal::Busy(holder) => Turn::Busy(holder),
            NoLocal::Refused(e) => Turn::Refused(e),
        })?;
    let Some(local) = conns.local() else {
        return Ok(None);
    };
    match crate::upload::queue_counts(local).await {
        Ok((pending, quarantined)) => {
            log::info!(
                "cycle started; queue: {pending} reading(s) waiting, {quarantined} quarantined"
            );
            Ok(Some(pending))
        }
        Err(e) => {
            log::warn!("cycle started; queue size unknown: {e}");
            conns.drop_if_lost(&e);
            Ok(None)
        }
    }
}

/// The heartbeat never fails the cycle (see heartbeat.rs): its errors end here.
///
/// Nor does it hold up a stop: it is no batch, so a shutdown requested while it
/// waits on central (a lock, a slow or silent link) abandons it at once, and the
/// central connection with it, since its answer may still be on the way.
async fn send_heartbeat(
    cfg: &Config,
    conns: &mut Connections,
    shutdown: &Shutdown,
    heartbeat: &mut Heartbeat,
    beat: &Beat,
) {
    let sent = match conns.central(cfg, shutdown).await {
        Ok(central) => tokio::select! {
            sent = heartbeat.send(central, beat) => Some(sent),
            _ = shutdown.requested() => None,
        },
        Err(e) => {
            log::debug!("heartbeat not sent: {e}");
            return;
        }
    };
    match sent {
        Some(Ok(())) => {}
        Some(Err(e)) => conns.drop_if_lost(&e),
        None => {
            log::debug!("heartbeat abandoned for shutdown");
            conns.forget_central();
        }
    }
}

fn describe_holder(holder: &Option<LockHolder>) -> String {
    holder
        .as_ref()
        .map_or_else(|| "another session".into(), |h| h.describe())
}

fn write_metrics(cfg: &Config, m: &Metrics) {
    let Some(path) = &cfg.metrics_textfile else {
        return;
    };
    if let Err(e) = m.write(path) {
        log::warn!("{e}");
    }
}

/// Cycles until `shutdown` is requested. The pause runs from the end of one cycle
/// to the start of the next, so a long drain never makes cycles overlap.
pub async fn run(cfg: &Config, shutdown: Shutdown) -> Result<()> {
    crate::notify::init();
    // READY before the first connection: the daemon is up and working even while
    // both databases are away (it then backs off, and says so in STATUS=).
    crate::notify::ready();
    crate::notify::status("starting");
    log::info!(
        "meter-sync {} running; cycle every {} s; stops within {} ms of SIGTERM",
        env!("CARGO_PKG_VERSION"),
        cfg.sync_interval.as_secs(),
        shutdown_grace(cfg).as_millis()
    );
    let mut gw = Gateway::new(cfg);
    let mut was_busy = false;
    loop {
        let turn = gw.turn(cfg, &shutdown).await;
        match &turn {
            Turn::Ran(report) => {
                was_busy = false;
                let verdict = if report.ok() { "ok" } else { "with errors" };
                crate::notify::status(&format!("last cycle {verdict}: {}", report.summary()));
            }
            Turn::Busy(holder) => {
                let who = describe_holder(holder);
                let msg = format!(
                    "another meter-sync ({who}) holds the cycle lock on this local database; \
                     skipping this cycle and trying again in {} s",
                    cfg.sync_interval.as_secs()
                );
                // Said once at warn; repeating it every interval would flood the log.
                if was_busy {
                    log::debug!("{msg}");
                } else {
                    log::warn!("{msg}");
                }
                was_busy = true;
                crate::notify::status(&format!("waiting: {who} holds the cycle lock"));
            }
            Turn::LocalDown(e) => {
                if !shutdown.is_requested() {
                    log::error!("cycle skipped, local database unreachable: {e}");
                    crate::notify::status(&format!("cycle skipped: {e}"));
                }
            }
            Turn::Abandoned => log::info!("cycle abandoned for shutdown"),
            Turn::Refused(e) => crate::notify::status(&format!("stopped: {e}")),
        }
        gw.after_turn(cfg, &shutdown, &turn).await;
        if let Turn::Refused(e) = turn {
            crate::notify::stopping();
            gw.conns.close().await;
            return Err(e);
        }
        if !shutdown.sleep(cfg.sync_interval).await {
            break;
        }
    }
    crate::notify::stopping();
    gw.conns.close().await;
    log::info!("meter-sync stopped");
    Ok(())
}

/// `meter-sync once`: one cycle under the same lock; exit 0 only if every phase ran
/// and succeeded.
pub async fn once(cfg: &Config, shutdown: Shutdown) -> Result<u8> {
    let mut gw = Gateway::new(cfg);
    let turn = gw.turn(cfg, &shutdown).await;
    match &turn {
        Turn::Busy(holder) => {
            let who = describe_holder(holder);
            let msg = format!(
                "another meter-sync ({who}) is running on this local database; not starting a second cycle"
            );
            log::error!("{msg}");
            crate::logging::repeat_error(&msg);
            return Ok(1);
        }
        Turn::Ran(_) | Turn::LocalDown(_) | Turn::Abandoned | Turn::Refused(_) => {}
    }
    gw.after_turn(cfg, &shutdown, &turn).await;
    gw.conns.close().await;
    match turn {
        Turn::Ran(report) => Ok(u8::from(!report.complete_and_ok())),
        Turn::LocalDown(e) | Turn::Refused(e) => Err(e),
        Turn::Busy(_) | Turn::Abandoned => Ok(1),
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::*;
    use crate::shutdown;

    #[tokio::test(start_paused = true)]
    async fn the_grace_starts_at_the_shutdown_request_not_before() {
        let (trigger, shutdown) = shutdown::channel();
        let t = Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(100)).await;
            trigger.trigger();
        });
        grace_expired(&shutdown, Duration::from_millis(35_000)).await;
        assert_eq!(t.elapsed(), Duration::from_millis(135_000));
    }

    #[test]
    fn the_grace_covers_a_round_trip_and_a_connect() {
        let cfg = crate::config::Config::from_vars([
            (
                "POSTGRES_SYNC_HOST".to_string(),
                "/run/postgresql".to_string(),
            ),
            ("POSTGRES_CLIENT_HOST".to_string(), "c.example".to_string()),
            ("DB_QUERY_TIMEOUT_MS".to_string(), "1500".to_string()),
            ("DB_CONNECTION_TIMEOUT_MS".to_string(), "700".to_string()),
        ])
        .unwrap();
        assert_eq!(shutdown_grace(&cfg), Duration::from_millis(2200));
    }
}
