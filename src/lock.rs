//! The cycle lock (P11): at most one cycle runs at a time on a local database, in
//! this process and across processes. [`LockedLocal`] is a local connection that
//! holds the lock, and [`acquire`] is the only way to make one, so "no phase runs
//! on an unlocked local connection" is checked by the compiler: every phase takes
//! a `&mut LockedLocal`.

use std::ops::{Deref, DerefMut};
use std::time::Duration;

use crate::config::Config;
use crate::db::Db;
use crate::error::{Result, Side};
use crate::shutdown::Shutdown;

/// The key of the session-level advisory lock: "metersyn" in ASCII. Advisory locks
/// are scoped to one database, so gateways sharing a server but not a database do
/// not meet.
const CYCLE_LOCK_KEY: i64 = 0x6d65_7465_7273_796e;

/// A local connection whose session holds the cycle lock. The lock is held for as
/// long as this connection lives (the daemon keeps it between cycles; `status`
/// calls that "running"). A process that ends on purpose gives it back
/// ([`LockedLocal::release`]); for one that dies, the server releases it once its
/// backend has noticed the closed connection.
pub struct LockedLocal(Db);

/// How long a process on its way out waits for the lock's release to be confirmed:
/// a silent link must not hold up a stop for a whole `DB_QUERY_TIMEOUT_MS`, and the
/// server releases the lock by itself once it notices the connection gone.
const RELEASE_WAIT: Duration = Duration::from_secs(1);

impl LockedLocal {
    /// Gives the cycle lock back and closes the connection. Closing alone leaves the
    /// release to the server's backend, which notices the closed socket only after
    /// this process may have exited: a `meter-sync once` started right after this
    /// one ended would find the lock still held and refuse to run.
    pub async fn release(self) {
        // A simple query: one round trip, where a parameter would take two.
        let sql = format!("SELECT pg_advisory_unlock({CYCLE_LOCK_KEY})");
        let unlock = self.client().batch_execute(&sql);
        if let Err(e) = crate::db::timed(
            Side::Local,
            RELEASE_WAIT,
            "give the cycle lock back",
            unlock,
        )
        .await
        {
            log::debug!("{e}; the server releases the lock when the connection closes");
        }
    }
}

impl Deref for LockedLocal {
    type Target = Db;
    fn deref(&self) -> &Db {
        &self.0
    }
}

impl DerefMut for LockedLocal {
    fn deref_mut(&mut self) -> &mut Db {
        &mut self.0
    }
}

/// How taking the lock went.
pub enum Acquired {
    Locked(LockedLocal),
    /// Another session holds it (who, if it could be found out).
    Busy(Option<LockHolder>),
}

/// Opens the local connection (with the backoff of [`Db::connect_with_retry`]) and
/// takes the cycle lock without waiting. On success the session also names itself
/// `meter-sync[PID]`, so that `status` and an operator looking at pg_stat_activity
/// can tell which process holds it.
///
/// In the same statement the session stops waiting for the WAL flush at each commit
/// (`synchronous_commit = off`): whatever the daemon writes locally is redone if a
/// crash of the gateway's PostgreSQL loses it. A lost delete (or mark) of an
/// uploaded batch leaves the batch queued, and sending it again is a no-op central
/// counts as delivered (P4); a lost download goes with its watermark (one
/// transaction) and is downloaded again; a lost quarantine is isolated again. It
/// spares the gateway's flash storage a flush per batch beside the collector's own.
/// The operator's commands (`migrate`, `resend`, `requeue`) do not come through
/// here and keep the server's setting.
///
/// It also sets the session's `lock_timeout` ([`Db::lock_wait`]).
/// Without one, a delete waiting for the collector's `ACCESS EXCLUSIVE` lock ran
/// into the statement timeout (57014, retried three times), and the deletes
/// pipelined behind it into our round-trip timeout: the connection was given up
/// while its backend still waited, still holding the cycle lock, so the reconnect
/// found the lock "taken by another meter-sync" and the cycle's downloads failed.
pub async fn acquire(cfg: &Config, shutdown: &Shutdown) -> Result<Acquired> {
    let db = Db::connect_with_retry(&cfg.local, cfg, shutdown).await?;
    let name = format!("meter-sync[{}]", std::process::id());
    let lock_wait = format!("{}ms", db.lock_wait().as_millis());
    let row = db
        .query_one(
            "take the cycle lock",
            "SELECT pg_try_advisory_lock($1), set_config('application_name', $2, false), \
                    set_config('synchronous_commit', 'off', false), \
                    set_config('lock_timeout', $3, false)",
            &[&CYCLE_LOCK_KEY, &name, &lock_wait],
        )
        .await?;
    if row.get::<_, bool>(0) {
        Ok(Acquired::Locked(LockedLocal(db)))
    } else {
        Ok(Acquired::Busy(holder(&db).await.ok().flatten()))
    }
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
pub async fn holder(local: &Db) -> Result<Option<LockHolder>> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holder_names_a_meter_sync_by_pid() {
        let h = LockHolder {
            backend_pid: 77,
            application_name: Some("meter-sync[4242]".into()),
        };
        assert_eq!(h.daemon_pid(), Some(4242));
        assert_eq!(h.describe(), "meter-sync pid 4242");
        let other = LockHolder {
            backend_pid: 77,
            application_name: Some("psql".into()),
        };
        assert_eq!(other.describe(), "database backend pid 77");
    }
}
