//! Embedded, checksummed schema migrations for the local and the central database.
//!
//! Hand-written rather than `refinery`: the runner is ~100 lines, while refinery
//! brings its own macro crate, regex and TOML parsing onto every gateway for the
//! same three behaviours (order, one transaction each, checksums).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_postgres::Transaction;

use crate::config::Side;
use crate::db::Db;
use crate::error::{Error, Kind, Result};

pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
    /// The oldest release that still works against a schema with this migration
    /// applied, named by the last migration that release knows (recorded with it
    /// as `oldest_compatible`). A release that meets an applied migration it does
    /// not know reads this to decide: run (the migration only added what it can
    /// ignore), or refuse (it dropped or redefined what that release relies on).
    /// 1 for every migration so far: all of them only add. docs/deploying.md,
    /// "Rolling back across a migration".
    pub oldest_compatible: i32,
}

/// One migration file: its version, its name, and its text compiled in;
/// `oldest_compatible = N` for one that releases before migration N cannot run against.
macro_rules! migration {
    ($side:literal, $version:literal, $name:literal) => {
        migration!($side, $version, $name, oldest_compatible = 1)
    };
    ($side:literal, $version:literal, $name:literal, oldest_compatible = $oldest:literal) => {
        Migration {
            version: $version,
            name: $name,
            sql: include_str!(concat!("../migrations/", $side, "/", $name)),
            oldest_compatible: $oldest,
        }
    };
}

pub const LOCAL: &[Migration] = &[
    migration!("local", 1, "0001_initial.sql"),
    migration!("local", 2, "0002_resend_window.sql"),
    migration!("local", 3, "0003_download_watermark.sql"),
    migration!("local", 4, "0004_download_watermark_central_started.sql"),
    migration!("local", 5, "0005_quarantined_index.sql"),
    migration!("local", 6, "0006_legacy_reading_columns.sql"),
    migration!("local", 7, "0007_legacy_nullable_is_synchronized.sql"),
];

pub const REMOTE: &[Migration] = &[
    migration!("remote", 1, "0001_initial.sql"),
    migration!("remote", 2, "0002_change_tracking.sql"),
    migration!("remote", 3, "0003_gateway_status.sql"),
];

/// The bookkeeping table, in the same schema as the tables it describes.
pub const TABLE: &str = "meter_sync_migrations";

/// Key of the advisory lock that serializes migration runs on one database, so two
/// processes started at once cannot both apply the same file.
const LOCK_KEY: i64 = 0x6d65_7465_725f_6d67; // "meter_mg"

/// FNV-1a, 64 bit: detects an edited file; this is not a security boundary.
pub fn checksum(sql: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in sql.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

pub fn for_side(side: Side) -> &'static [Migration] {
    match side {
        Side::Local => LOCAL,
        Side::Central => REMOTE,
    }
}

/// Applies every pending migration in version order, each in its own transaction
/// together with its bookkeeping row. An applied migration whose checksum no longer
/// matches is an error naming the file; nothing after it runs. Returns how many
/// were applied.
pub async fn run(db: &mut Db, migrations: &[Migration]) -> Result<usize> {
    let side = db.side();
    let dir = dir(side);
    let timeout = db.timeout();
    // Under the migration lock: two CREATE TABLE IF NOT EXISTS at the same moment
    // can both find no table, and the second then fails on the catalog's unique
    // index (23505 on pg_type), which a wave of gateways started at once hit.
    let what = "create migration table";
    let tx = crate::db::timed(side, timeout, what, db.client_mut().transaction()).await?;
    lock(&tx, side, timeout, what).await?;
    // A NOTICE that the table exists (every run but the first) is not news.
    let create = format!(
        "SET LOCAL client_min_messages = warning;
        CREATE TABLE IF NOT EXISTS {TABLE} (
            version    integer PRIMARY KEY,
            name       text NOT NULL,
            checksum   text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now(),
            oldest_compatible integer
        );
        DO $$
        BEGIN
            IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                           WHERE table_schema = current_schema() AND table_name = '{TABLE}'
                             AND column_name = 'oldest_compatible') THEN
                ALTER TABLE {TABLE} ADD COLUMN oldest_compatible integer;
            END IF;
        END
        $$"
    );
    crate::db::timed(side, timeout, what, tx.batch_execute(&create)).await?;
    crate::db::timed(side, timeout, what, tx.commit()).await?;
    let newer = newer_than_known(db, migrations).await?;
    if !newer.is_empty() {
        log::warn!(
            "{side}: {dir} has migration(s) newer than this release, applied by a newer meter-sync: {}; \
             they are compatible with this release and stay as they are",
            names(&newer)
        );
    }
    let mut applied = 0;
    for m in migrations {
        let what = format!("migration {dir}/{}", m.name);
        let tx = crate::db::timed(side, timeout, &what, db.client_mut().transaction()).await?;
        lock(&tx, side, timeout, &what).await?;
        let existing = crate::db::timed(
            side,
            timeout,
            &what,
            tx.query_opt(
                &format!("SELECT checksum FROM {TABLE} WHERE version = $1"),
                &[&m.version],
            ),
        )
        .await?;
        let sum = checksum(m.sql);
        if let Some(row) = existing {
            let recorded: String = row.get(0);
            if recorded != sum {
                return Err(Error::new(
                    Kind::Migration,
                    format!(
                        "{dir}/{} was changed after it was applied (recorded checksum {recorded}, embedded {sum}); \
                         add a new migration instead of editing an applied one",
                        m.name
                    ),
                )
                .with_side(side));
            }
            continue;
        }
        // Migrations run without the query timeout: a schema change on a large
        // table may legitimately take long, and nothing else waits on it.
        // IF NOT EXISTS clauses that skip raise NOTICEs: expected, not news.
        // The session's statement timeout is lifted for the same reason.
        let sql = format!(
            "SET LOCAL client_min_messages = warning; SET LOCAL statement_timeout = 0;\n{}",
            m.sql
        );
        tx.batch_execute(&sql)
            .await
            .map_err(|e| Error::db(side, what.clone(), e))?;
        crate::db::timed(
            side,
            timeout,
            &what,
            tx.execute(
                &format!(
                    "INSERT INTO {TABLE} (version, name, checksum, oldest_compatible) \
                     VALUES ($1, $2, $3, $4)"
                ),
                &[&m.version, &m.name, &sum, &m.oldest_compatible],
            ),
        )
        .await?;
        crate::db::timed(side, timeout, &what, tx.commit()).await?;
        log::info!("{side}: applied {dir}/{}", m.name);
        applied += 1;
    }
    Ok(applied)
}

/// Takes the migration lock for `tx`. Held by another migration, it is waited for
/// as long as that one runs, without the statement or round-trip timeout: a
/// migration of a large table may take minutes, and a `migrate` started meanwhile
/// (the unit's `ExecStartPre=` at a restart, another host of a wave) failed with
/// "canceling statement due to statement timeout" instead of finding it done.
async fn lock(tx: &Transaction<'_>, side: Side, timeout: Duration, what: &str) -> Result<()> {
    let got: bool = crate::db::timed(
        side,
        timeout,
        what,
        tx.query_one("SELECT pg_try_advisory_xact_lock($1)", &[&LOCK_KEY]),
    )
    .await?
    .get(0);
    if got {
        return Ok(());
    }
    log::info!(
        "{side}: another meter-sync migrate is migrating this database; waiting for it to finish"
    );
    tx.batch_execute(&format!(
        "SET LOCAL statement_timeout = 0; SELECT pg_advisory_xact_lock({LOCK_KEY})"
    ))
    .await
    .map_err(|e| Error::db(side, what, e))
}

/// An applied migration this release does not know.
pub struct Unknown {
    pub name: String,
    pub oldest_compatible: Option<i32>,
}

fn dir(side: Side) -> &'static str {
    match side {
        Side::Local => "migrations/local",
        Side::Central => "migrations/remote",
    }
}

fn names(newer: &[Unknown]) -> String {
    newer
        .iter()
        .map(|m| m.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// SQLSTATE of a bookkeeping table that is not there: never migrated.
const UNDEFINED_TABLE: &str = "42P01";

/// What the bookkeeping table says, against the migrations this release has.
pub struct Applied {
    /// Applied migrations this release does not know.
    pub newer: Vec<Unknown>,
    /// This release's migrations not applied yet, on a database that was migrated
    /// before (0 on one that never was).
    pub pending: usize,
}

/// Reads the bookkeeping table. A schema newer than this release can work with is
/// a [`Kind::SchemaTooNew`] error naming the first migration that says so. Run by
/// `migrate` and, on the local side, by every command that writes there, before it
/// does: a rollback to a release too old for the schema must stop with a reason,
/// not upload, quarantine or delete by rules the schema no longer has.
pub async fn applied(db: &Db, migrations: &[Migration]) -> Result<Applied> {
    let known = migrations.last().map_or(0, |m| m.version);
    // Through jsonb: a bookkeeping table written only by releases before
    // oldest_compatible existed has no such column (and no newer migration).
    let sql = format!(
        "SELECT version, name, (to_jsonb(m) ->> 'oldest_compatible')::integer \
         FROM {TABLE} m ORDER BY version"
    );
    let rows = match db.query("read the applied migrations", &sql, &[]).await {
        Ok(rows) => rows,
        Err(e) if e.code() == Some(UNDEFINED_TABLE) => {
            return Ok(Applied {
                newer: vec![],
                pending: 0,
            })
        }
        Err(e) => return Err(e),
    };
    let versions: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    let pending = migrations
        .iter()
        .filter(|m| !versions.contains(&m.version))
        .count();
    let newer: Vec<Unknown> = rows
        .iter()
        .filter(|r| r.get::<_, i32>(0) > known)
        .map(|r| Unknown {
            name: r.get(1),
            oldest_compatible: r.get(2),
        })
        .collect();
    if let Some(m) = newer
        .iter()
        .find(|m| m.oldest_compatible.is_some_and(|o| o > known))
    {
        let side = db.side();
        let dir = dir(side);
        return Err(Error::new(
            Kind::SchemaTooNew,
            format!(
                "the schema was migrated by a newer meter-sync ({dir}/{}) that releases before migration \
                 {:04} cannot run against; this release knows migrations up to {known:04}: install that \
                 release or a later one (docs/deploying.md, \"Rolling back across a migration\")",
                m.name,
                m.oldest_compatible.unwrap_or_default(),
            ),
        )
        .with_side(side));
    }
    Ok(Applied { newer, pending })
}

/// The daemon's check of the local schema at each connect, before any phase touches
/// a reading: a schema too new for this release is a [`Kind::SchemaTooNew`] error
/// and a lost connection is returned as such; this release's own migrations that a
/// migrated database lacks are applied. The unit's `ExecStartPre=-… migrate local`
/// is ignored when it fails, and it fails when the local database is not up yet (a
/// reboot, or unattended-upgrades restarting PostgreSQL in the same run that
/// upgrades this package): the daemon then ran on the previous release's schema and
/// failed every upload until a restart. Not on a database never migrated: creating
/// the tables is the first install's step.
pub async fn check_local(db: &mut Db) -> Result<()> {
    static SAID_NEWER: AtomicBool = AtomicBool::new(false);
    static SAID_UNCHECKED: AtomicBool = AtomicBool::new(false);
    let a = match applied(db, LOCAL).await {
        Ok(a) => a,
        Err(e) if e.kind() == Kind::SchemaTooNew || e.is_connection_lost() => return Err(e),
        // A role that may not read the bookkeeping (migrations applied by another
        // role) runs as before this check existed.
        Err(e) => {
            warn_once(&SAID_UNCHECKED, || {
                format!("{e}; not checked for a newer schema")
            });
            return Ok(());
        }
    };
    if !a.newer.is_empty() {
        warn_once(&SAID_NEWER, || {
            format!(
                "local: the schema has migration(s) newer than this release ({}); they are \
                 compatible with it, so it runs",
                names(&a.newer)
            )
        });
    }
    if a.pending > 0 {
        log::info!(
            "local: {} migration(s) of this release not applied yet; applying them",
            a.pending
        );
        if let Err(e) = run(db, LOCAL).await {
            log::warn!("{e}; run `meter-sync migrate local`");
        }
    }
    Ok(())
}

/// Said once per process, not at every reconnect.
fn warn_once(said: &AtomicBool, msg: impl FnOnce() -> String) {
    if !said.swap(true, Ordering::Relaxed) {
        log::warn!("{}", msg());
    }
}

/// [`applied`]'s newer migrations.
pub async fn newer_than_known(db: &Db, migrations: &[Migration]) -> Result<Vec<Unknown>> {
    Ok(applied(db, migrations).await?.newer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_strictly_increasing_and_named_after_their_files() {
        for set in [LOCAL, REMOTE] {
            for w in set.windows(2) {
                assert!(w[0].version < w[1].version);
            }
            for m in set {
                assert!(
                    m.name.starts_with(&format!("{:04}_", m.version)),
                    "{}",
                    m.name
                );
            }
        }
    }

    #[test]
    fn checksum_changes_with_content() {
        assert_ne!(checksum("a"), checksum("b"));
        assert_eq!(checksum("abc"), checksum("abc"));
    }
}
