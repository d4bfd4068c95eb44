//! One cycle: the upload drain, then meters, then tenants. Each phase is isolated
//! (a failure is logged and recorded, and the next phase still runs) and writes one
//! `sync_logs` row.

use std::time::{Duration, Instant};

use crate::config::{Config, Side};
use crate::db::Db;
use crate::error::Result;
use crate::shutdown::Shutdown;

/// The two connections, opened lazily and reopened after they are lost.
#[derive(Default)]
pub struct Connections {
    pub local: Option<Db>,
    pub central: Option<Db>,
    /// Set by `run` and `once`: every local connection they open must take the
    /// cycle lock (P11, see [`crate::daemon::try_cycle_lock`]) before it is used,
    /// so a reconnect in the middle of a cycle cannot slip past another process.
    pub cycle_lock: bool,
    /// Sides whose connection attempts already failed in this cycle: the
    /// `MAX_CONNECTION_RETRIES` attempts are per cycle (P13), so later phases fail
    /// at once instead of spending another round of backoff each.
    unreachable: Vec<Side>,
}

impl Connections {
    /// Makes sure the connection to `side` is open, reconnecting with backoff
    /// (see [`Db::connect_with_retry`]) if it is absent or was lost.
    pub async fn ensure(
        &mut self,
        side: Side,
        cfg: &Config,
        shutdown: &Shutdown,
    ) -> Result<&mut Db> {
        let needs_lock = side == Side::Local && self.cycle_lock;
        let (slot, dbcfg) = match side {
            Side::Local => (&mut self.local, &cfg.local),
            Side::Central => (&mut self.central, &cfg.central),
        };
        if slot.as_ref().is_some_and(|db| db.is_closed()) {
            log::warn!("{side}: connection lost; reconnecting");
            *slot = None;
        }
        if slot.is_none() {
            if self.unreachable.contains(&side) {
                return Err(crate::error::Error::new(
                    crate::error::Kind::Db,
                    format!("{side}: unreachable in this cycle (see above); next attempt in the next cycle"),
                )
                .with_side(side));
            }
            let db = match Db::connect_with_retry(dbcfg, cfg, shutdown).await {
                Ok(db) => db,
                Err(e) => {
                    self.unreachable.push(side);
                    return Err(e);
                }
            };
            if needs_lock && !crate::daemon::try_cycle_lock(&db).await? {
                return Err(crate::error::Error::new(
                    crate::error::Kind::Other,
                    "local: another meter-sync took the cycle lock while this one reconnected; \
                     this cycle stops here",
                ));
            }
            *slot = Some(db);
        }
        Ok(slot.as_mut().expect("connection was just opened"))
    }

    /// Forgets a connection that failed so the next use reconnects.
    pub fn drop_if_lost(&mut self, err: &crate::error::Error) {
        if err.is_connection_lost() {
            match err.side() {
                Some(Side::Local) => self.local = None,
                Some(Side::Central) => self.central = None,
                None => {}
            }
        }
    }

    /// Closes both connections (dropping a client sends Terminate).
    pub fn close(&mut self) {
        self.local = None;
        self.central = None;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Upload,
    Meters,
    Tenant,
}

impl Phase {
    /// The `sync_logs.sync_type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Upload => "upload",
            Phase::Meters => "meters",
            Phase::Tenant => "tenant",
        }
    }
}

/// What one phase did.
#[derive(Clone, Debug)]
pub struct PhaseOutcome {
    pub phase: Phase,
    pub records: u64,
    pub duration: Duration,
    pub error: Option<String>,
    /// A human summary of the counts ("uploaded 300 in 3 batches, 0 quarantined").
    pub summary: String,
}

impl PhaseOutcome {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
}

/// What one cycle did.
#[derive(Clone, Debug)]
pub struct CycleReport {
    pub phases: Vec<PhaseOutcome>,
    pub duration: Duration,
}

impl CycleReport {
    pub fn ok(&self) -> bool {
        self.phases.iter().all(PhaseOutcome::ok)
    }

    /// One line for logs and systemd's STATUS=.
    pub fn summary(&self) -> String {
        let parts: Vec<String> = self
            .phases
            .iter()
            .map(|p| match &p.error {
                None => format!("{}: {}", p.phase.as_str(), p.summary),
                Some(_) => format!("{}: FAILED", p.phase.as_str()),
            })
            .collect();
        format!("{} ({} ms)", parts.join("; "), self.duration.as_millis())
    }
}

/// The counts a phase reports back.
pub struct PhaseResult {
    pub records: u64,
    pub summary: String,
}

/// Runs the three phases in order. Never fails as a whole: each phase's error is
/// in its outcome.
pub async fn run(cfg: &Config, conns: &mut Connections, shutdown: &Shutdown) -> CycleReport {
    let start = Instant::now();
    conns.unreachable.clear();
    let mut phases = Vec::with_capacity(3);
    for phase in [Phase::Upload, Phase::Meters, Phase::Tenant] {
        if shutdown.is_requested() {
            break;
        }
        crate::notify::alive();
        let t = Instant::now();
        let result = run_phase(phase, cfg, conns, shutdown).await;
        let duration = t.elapsed();
        let outcome = match result {
            Ok(r) => {
                log::info!(
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
            Err(e) => {
                log::error!("{} phase failed: {e}", phase.as_str());
                conns.drop_if_lost(&e);
                PhaseOutcome {
                    phase,
                    records: 0,
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
) -> Result<PhaseResult> {
    conns.ensure(Side::Local, cfg, shutdown).await?;
    conns.ensure(Side::Central, cfg, shutdown).await?;
    let (Some(local), Some(central)) = (conns.local.as_mut(), conns.central.as_mut()) else {
        unreachable!("both connections were just ensured");
    };
    match phase {
        Phase::Upload => crate::upload::drain(cfg, local, central, shutdown).await,
        Phase::Meters => crate::download::sync_meters(local, central).await,
        Phase::Tenant => crate::download::sync_tenants(local, central).await,
    }
}

/// Writes the phase's `sync_logs` row. When local itself is what failed there is
/// nowhere to write it; the log line above is then the only record.
async fn record(conns: &mut Connections, o: &PhaseOutcome) {
    let Some(local) = conns.local.as_ref().filter(|db| !db.is_closed()) else {
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
