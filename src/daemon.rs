//! The run loop: take the cycle lock, cycle, report (log, systemd STATUS=, metrics
//! file), pause `SYNC_INTERVAL_SECONDS`, until shutdown. Also `once`, which is one
//! turn of the same loop.

use std::time::Duration;

use crate::config::Config;
use crate::cycle::{self, Connections, CycleReport};
use crate::db::Db;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// The key of the session-level advisory lock that a running daemon (or `once`)
/// holds on its local connection: "metersyn" in ASCII. Advisory locks are scoped
/// to one database, so gateways sharing a server but not a database do not meet.
pub const CYCLE_LOCK_KEY: i64 = 0x6d65_7465_7273_796e;

/// Takes the cycle lock on `local` without waiting. On success the session also
/// names itself `meter-sync[PID]`, so that `status` and an operator looking at
/// pg_stat_activity can tell which process holds it.
///
/// The lock is session-level: it is held for as long as this connection lives
/// (the daemon keeps it between cycles; `status` calls that "running") and the
/// server releases it the moment the connection dies, however the process ended.
pub async fn try_cycle_lock(local: &Db) -> Result<bool> {
    let name = format!("meter-sync[{}]", std::process::id());
    let row = local
        .query_one(
            "take the cycle lock",
            "SELECT pg_try_advisory_lock($1), set_config('application_name', $2, false)",
            &[&CYCLE_LOCK_KEY, &name],
        )
        .await?;
    Ok(row.get(0))
}

/// The session that holds the cycle lock on this database, other than `local`'s own.
#[derive(Clone, Debug)]
pub struct LockHolder {
    pub backend_pid: i32,
    pub application_name: Option<String>,
}

impl LockHolder {
    /// The holder's process id, when it is a meter-sync that named its session.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.application_name
            .as_deref()?
            .strip_prefix("meter-sync[")?
            .strip_suffix(']')?
            .parse()
            .ok()
    }

    pub fn describe(&self) -> String {
        match self.daemon_pid() {
            Some(pid) => format!("meter-sync pid {pid}"),
            None => format!("database backend pid {}", self.backend_pid),
        }
    }
}

/// Looks the lock up in pg_locks. A bigint advisory key appears there split into
/// classid (high half) and objid (low half) with objsubid 1.
pub async fn cycle_lock_holder(local: &Db) -> Result<Option<LockHolder>> {
    let hi = (CYCLE_LOCK_KEY >> 32) as u32;
    let lo = (CYCLE_LOCK_KEY & 0xffff_ffff) as u32;
    let rows = local
        .query(
            "look up the cycle lock",
            &format!(
                "SELECT l.pid, a.application_name FROM pg_locks l \
                 LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE l.locktype = 'advisory' AND l.granted \
                   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                   AND l.classid = {hi} AND l.objid = {lo} AND l.objsubid = 1 \
                   AND l.pid <> pg_backend_pid()"
            ),
            &[],
        )
        .await?;
    Ok(rows.first().map(|r| LockHolder {
        backend_pid: r.get(0),
        application_name: r.get(1),
    }))
}

/// Readings waiting for upload and readings in quarantine (P7).
pub async fn queue_counts(local: &Db) -> Result<(i64, i64)> {
    let row = local
        .query_one(
            "count the queue",
            "SELECT count(*) FILTER (WHERE sync_error IS NULL), \
                    count(*) FILTER (WHERE sync_error IS NOT NULL) \
             FROM meter_readings WHERE NOT is_synchronized",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// How long a cycle may go on after SIGTERM: the round trip in flight gets
/// `DB_QUERY_TIMEOUT_MS` to answer (a batch then commits or rolls back whole), a
/// connection attempt in progress `DB_CONNECTION_TIMEOUT_MS`. Past that the cycle
/// is abandoned: dropping its connections rolls back whatever transaction was open.
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

/// Takes the lock (unless this process already holds it), logs the queue, and runs
/// one cycle bounded by the shutdown grace. Shutdown during the steps before the
/// cycle ends the turn at once: no batch is in flight there.
async fn turn(cfg: &Config, conns: &mut Connections, shutdown: &Shutdown) -> Turn {
    conns.cycle_lock = true;
    tokio::select! {
        ready = prepare(cfg, conns, shutdown) => {
            if let Err(t) = ready {
                return t;
            }
        }
        _ = shutdown.requested() => return Turn::Abandoned,
    }
    tokio::select! {
        report = cycle::run(cfg, conns, shutdown) => Turn::Ran(report),
        _ = grace_expired(shutdown, shutdown_grace(cfg)) => Turn::Abandoned,
    }
}

/// Opens the local connection with the cycle lock and logs the queue size.
async fn prepare(
    cfg: &Config,
    conns: &mut Connections,
    shutdown: &Shutdown,
) -> std::result::Result<(), Turn> {
    if conns.local.as_ref().is_some_and(|db| db.is_closed()) {
        log::warn!("local: connection lost; reconnecting");
        conns.local = None;
    }
    if conns.local.is_none() {
        let db = Db::connect_with_retry(&cfg.local, cfg, shutdown)
            .await
            .map_err(Turn::LocalDown)?;
        match try_cycle_lock(&db).await {
            Ok(true) => {
                log::info!(
                    "local: holding the cycle lock (no other meter-sync cycles on this database)"
                );
                conns.local = Some(db);
            }
            Ok(false) => return Err(Turn::Busy(cycle_lock_holder(&db).await.ok().flatten())),
            Err(e) => return Err(Turn::LocalDown(e)),
        }
    }
    let local = conns
        .local
        .as_ref()
        .expect("local connection was just ensured");
    match queue_counts(local).await {
        Ok((pending, quarantined)) => log::info!(
            "cycle started; queue: {pending} reading(s) waiting, {quarantined} quarantined"
        ),
        Err(e) => {
            log::warn!("cycle started; queue size unknown: {e}");
            conns.drop_if_lost(&e);
        }
    }
    Ok(())
}

/// After a cycle: count the queue again for the metrics file and write it. Skipped
/// queries once shutdown is requested keep the stop within its bound.
async fn report_metrics(cfg: &Config, conns: &Connections, shutdown: &Shutdown, m: &mut Metrics) {
    let Some(path) = &cfg.metrics_textfile else {
        return;
    };
    if !shutdown.is_requested() {
        let queue = match conns.local.as_ref().filter(|db| !db.is_closed()) {
            Some(local) => queue_counts(local).await.ok(),
            None => None,
        };
        m.set_queue(queue);
    }
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
    let mut conns = Connections::default();
    let mut metrics = Metrics::default();
    let mut was_busy = false;
    loop {
        match turn(cfg, &mut conns, &shutdown).await {
            Turn::Ran(report) => {
                was_busy = false;
                let verdict = if report.ok() { "ok" } else { "with errors" };
                crate::notify::status(&format!("last cycle {verdict}: {}", report.summary()));
                metrics.record_cycle(&report);
            }
            Turn::Busy(holder) => {
                let who = holder.map_or_else(|| "another session".into(), |h| h.describe());
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
                    metrics.record_failed_start();
                }
            }
            Turn::Abandoned => log::info!("cycle abandoned for shutdown"),
        }
        report_metrics(cfg, &conns, &shutdown, &mut metrics).await;
        if !shutdown.sleep(cfg.sync_interval).await {
            break;
        }
    }
    crate::notify::stopping();
    conns.close();
    log::info!("meter-sync stopped");
    Ok(())
}

/// `meter-sync once`: one cycle under the same lock; exit 0 only if every phase ran
/// and succeeded.
pub async fn once(cfg: &Config, shutdown: Shutdown) -> Result<u8> {
    let mut conns = Connections::default();
    let mut metrics = Metrics::default();
    let code = match turn(cfg, &mut conns, &shutdown).await {
        Turn::Ran(report) => {
            metrics.record_cycle(&report);
            u8::from(!(report.ok() && report.phases.len() == 3))
        }
        Turn::Busy(holder) => {
            let who = holder.map_or_else(|| "another session".into(), |h| h.describe());
            let msg = format!(
                "another meter-sync ({who}) is running on this local database; not starting a second cycle"
            );
            log::error!("{msg}");
            eprintln!("meter-sync: {msg}");
            return Ok(1);
        }
        Turn::LocalDown(e) => return Err(e),
        Turn::Abandoned => 1,
    };
    report_metrics(cfg, &conns, &shutdown, &mut metrics).await;
    conns.close();
    Ok(code)
}
