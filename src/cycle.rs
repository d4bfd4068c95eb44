//! One cycle: the upload drain, then meters, then tenants. Each phase is isolated
//! (a failure is logged and recorded, and the next phase still runs) and writes one
//! `sync_logs` row.

use std::time::Instant;

use crate::config::{Config, Side};
use crate::db::Db;
use crate::download::{self, Downloaded};
use crate::error::{Error, Kind, Result};
use crate::lock::{self, Acquired, LockHolder, LockedLocal};
use crate::report::{CycleReport, Phase, PhaseFailed, PhaseOutcome, PhaseResult};
use crate::shutdown::Shutdown;

/// The two connections, opened lazily and reopened after they are lost. The local
/// one always holds the cycle lock: it can only be a [`LockedLocal`].
#[derive(Default)]
pub struct Connections {
    local: Option<LockedLocal>,
    central: Option<Db>,
    /// Sides whose connection attempts already failed in this cycle: the
    /// `MAX_CONNECTION_RETRIES` attempts are per cycle (P13), so later phases fail
    /// at once instead of spending another round of backoff each.
    unreachable: Vec<Side>,
}

/// Why there is no locked local connection.
pub enum NoLocal {
    Down(Error),
    Busy(Option<LockHolder>),
    /// The local schema is newer than this release can work with
    /// ([`crate::migrate::applied`]): the process must stop.
    Refused(Error),
}

impl Connections {
    /// The locked local connection, if one is open and alive.
    pub fn local(&self) -> Option<&LockedLocal> {
        self.local.as_ref().filter(|db| !db.is_closed())
    }

    /// Makes sure a local connection holding the cycle lock is open, reconnecting
    /// (see [`lock::acquire`]) if it is absent or was lost. A reconnect in the
    /// middle of a cycle goes through the same lock, so it cannot slip past another
    /// process that took the lock meanwhile.
    pub async fn ensure_local(&mut self, cfg: &Config, shutdown: &Shutdown) -> Result<(), NoLocal> {
        if still_open(&mut self.local, |db| db.closed_reason()) {
            return Ok(());
        }
        if self.unreachable.contains(&Side::Local) {
            return Err(NoLocal::Down(unreachable_now(Side::Local)));
        }
        match lock::acquire(cfg, shutdown).await {
            Ok(Acquired::Locked(mut db)) => {
                log::info!(
                    "local: holding the cycle lock (no other meter-sync cycles on this database)"
                );
                // Before any phase touches a reading: a release rolled back below
                // what the schema allows must not upload or delete by old rules.
                match crate::migrate::check_local(&mut db).await {
                    Err(e) if e.kind() == Kind::SchemaTooNew => {
                        db.release().await;
                        return Err(NoLocal::Refused(e));
                    }
                    Err(e) => {
                        self.unreachable.push(Side::Local);
                        return Err(NoLocal::Down(e));
                    }
                    Ok(()) => {}
                }
                self.local = Some(db);
                Ok(())
            }
            Ok(Acquired::Busy(holder)) => Err(NoLocal::Busy(holder)),
            Err(e) => {
                self.unreachable.push(Side::Local);
                Err(NoLocal::Down(e))
            }
        }
    }

    /// Makes sure the central connection is open, reconnecting with backoff (see
    /// [`Db::connect_with_retry`]) if it is absent or was lost.
    async fn ensure_central(&mut self, cfg: &Config, shutdown: &Shutdown) -> Result<()> {
        if still_open(&mut self.central, Db::closed_reason) {
            return Ok(());
        }
        if self.unreachable.contains(&Side::Central) {
            return Err(unreachable_now(Side::Central));
        }
        match Db::connect_with_retry(&cfg.central, cfg, shutdown).await {
            Ok(db) => {
                self.central = Some(db);
                Ok(())
            }
            Err(e) => {
                self.unreachable.push(Side::Central);
                Err(e)
            }
        }
    }

    /// Starts a new cycle's connection attempts: a side that was unreachable in the
    /// last one gets its `MAX_CONNECTION_RETRIES` attempts again. Called before the
    /// cycle lock is (re)taken, so a local database that was down is retried.
    pub fn begin_cycle(&mut self) {
        self.unreachable.clear();
    }

    /// The central connection for what follows the phases (the heartbeat), opened
    /// if needed; a central already found unreachable in this cycle is not tried
    /// again.
    pub async fn central(&mut self, cfg: &Config, shutdown: &Shutdown) -> Result<&Db> {
        self.ensure_central(cfg, shutdown).await?;
        Ok(self
            .central
            .as_ref()
            .expect("central connection was just ensured"))
    }

    /// Forgets a connection that failed so the next use reconnects.
    pub fn drop_if_lost(&mut self, err: &Error) {
        if err.is_connection_lost() {
            match err.side() {
                Some(Side::Local) => self.local = None,
                Some(Side::Central) => self.central = None,
                None => {}
            }
        }
    }

    /// Forgets the central connection (a round trip on it was abandoned, so its
    /// answer may still arrive): the next use reconnects.
    pub fn forget_central(&mut self) {
        self.central = None;
    }

    /// Closes both connections, the local one after giving the cycle lock back.
    pub async fn close(&mut self) {
        if let Some(local) = self.local.take() {
            local.release().await;
        }
        self.central = None;
    }
}

/// Whether the connection in `slot` is still open; a lost one is forgotten (and
/// said, with why), so that the caller reconnects.
///
/// Said at info, not warn: a connection found closed here ended while it was not
/// in use, between cycles or phases, which is what a server's
/// `idle_session_timeout`, a pooler's `client_idle_timeout` or a NAT's idle
/// timer do every time; a reconnect that then fails is logged at error by the
/// phase, and a connection lost in the middle of a round trip by that round trip.
fn still_open<T>(slot: &mut Option<T>, closed: impl Fn(&T) -> Option<String>) -> bool {
    if let Some(why) = slot.as_ref().and_then(&closed) {
        log::info!("{why}; reconnecting");
        *slot = None;
    }
    slot.is_some()
}

fn unreachable_now(side: Side) -> Error {
    Error::new(
        Kind::Db,
        "unreachable in this cycle (see above); next attempt in the next cycle",
    )
    .with_side(side)
}

/// Runs the three phases in order. Never fails as a whole: each phase's error is
/// in its outcome. The caller began the cycle ([`Connections::begin_cycle`]) and
/// passes the queue's size if it counted it just before, so that the upload does
/// not count it again (on a week's backlog a count is a scan of the whole queue).
pub async fn run(
    cfg: &Config,
    conns: &mut Connections,
    shutdown: &Shutdown,
    queued: Option<i64>,
) -> CycleReport {
    let start = Instant::now();
    let mut phases = Vec::with_capacity(Phase::ALL.len());
    for phase in Phase::ALL {
        if shutdown.is_requested() {
            break;
        }
        crate::notify::alive();
        let t = Instant::now();
        let counted = queued.filter(|_| matches!(phase, Phase::Upload));
        let result = run_phase(phase, cfg, conns, shutdown, counted).await;
        let duration = t.elapsed();
        let outcome = match result {
            Ok(r) => {
                // A phase that did nothing is in the cycle's result line only (P14:
                // an idle cycle logs its start and its result, two info lines).
                let level = if r.records > 0 {
                    log::Level::Info
                } else {
                    log::Level::Debug
                };
                log::log!(
                    level,
                    "{}: {} ({} ms)",
                    phase.as_str(),
                    r.summary,
                    duration.as_millis()
                );
                PhaseOutcome {
                    phase,
                    records: r.records,
                    duration,
                    error: None,
                    summary: r.summary,
                }
            }
            Err(PhaseFailed { records, error: e }) => {
                log::error!("{} phase failed: {e}", phase.as_str());
                conns.drop_if_lost(&e);
                PhaseOutcome {
                    phase,
                    records,
                    duration,
                    error: Some(e.to_string()),
                    summary: String::new(),
                }
            }
        };
        record(conns, &outcome).await;
        phases.push(outcome);
    }
    let report = CycleReport {
        phases,
        duration: start.elapsed(),
    };
    log::info!("cycle finished: {}", report.summary());
    report
}

async fn run_phase(
    phase: Phase,
    cfg: &Config,
    conns: &mut Connections,
    shutdown: &Shutdown,
    queued: Option<i64>,
) -> Result<PhaseResult, PhaseFailed> {
    conns
        .ensure_local(cfg, shutdown)
        .await
        .map_err(|e| match e {
            NoLocal::Down(e) | NoLocal::Refused(e) => e,
            NoLocal::Busy(_) => Error::new(
                Kind::Other,
                "local: another meter-sync took the cycle lock while this one reconnected; \
             this cycle stops here",
            ),
        })?;
    conns.ensure_central(cfg, shutdown).await?;
    let (Some(local), Some(central)) = (conns.local.as_mut(), conns.central.as_mut()) else {
        unreachable!("both connections were just ensured");
    };
    match phase {
        Phase::Upload => crate::upload::drain(cfg, local, central, shutdown, queued).await,
        Phase::Meters => Ok(download::sync_table(Downloaded::Meters, cfg, local, central).await?),
        Phase::Tenant => Ok(download::sync_table(Downloaded::Tenants, cfg, local, central).await?),
    }
}

/// Writes the phase's `sync_logs` row. When local itself is what failed there is
/// nowhere to write it; the log line above is then the only record.
async fn record(conns: &mut Connections, o: &PhaseOutcome) {
    let Some(local) = conns.local() else {
        return;
    };
    let records = i32::try_from(o.records).unwrap_or(i32::MAX);
    let ms = i64::try_from(o.duration.as_millis()).unwrap_or(i64::MAX);
    if let Err(e) = local
        .execute(
            "write sync_logs",
            "INSERT INTO sync_logs (sync_type, success, records_processed, error_message, duration_ms) \
             VALUES ($1, $2, $3, $4, $5)",
            &[&o.phase.as_str(), &o.ok(), &records, &o.error, &ms],
        )
        .await
    {
        log::warn!("{e}");
        conns.drop_if_lost(&e);
    }
}
