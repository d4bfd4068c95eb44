//! Embedded, checksummed schema migrations for the local and the central database.
//!
//! Hand-written rather than `refinery`: the runner is ~100 lines, while refinery
//! brings its own macro crate, regex and TOML parsing onto every gateway for the
//! same three behaviours (order, one transaction each, checksums).

use crate::config::Side;
use crate::db::Db;
use crate::error::{Error, Kind, Result};

pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// One migration file: its version, its name, and its text compiled in.
macro_rules! migration {
    ($side:literal, $version:literal, $name:literal) => {
        Migration {
            version: $version,
            name: $name,
            sql: include_str!(concat!("../migrations/", $side, "/", $name)),
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
    let dir = match side {
        Side::Local => "migrations/local",
        Side::Central => "migrations/remote",
    };
    db.batch(
        "create migration table",
        &format!(
            "CREATE TABLE IF NOT EXISTS {TABLE} (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                checksum   text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )"
        ),
    )
    .await?;
    let timeout = db.timeout();
    let mut applied = 0;
    for m in migrations {
        let what = format!("migration {dir}/{}", m.name);
        let tx = crate::db::timed(side, timeout, &what, db.client_mut().transaction()).await?;
        crate::db::timed(
            side,
            timeout,
            &what,
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY]),
        )
        .await?;
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
                &format!("INSERT INTO {TABLE} (version, name, checksum) VALUES ($1, $2, $3)"),
                &[&m.version, &m.name, &sum],
            ),
        )
        .await?;
        crate::db::timed(side, timeout, &what, tx.commit()).await?;
        log::info!("{side}: applied {dir}/{}", m.name);
        applied += 1;
    }
    Ok(applied)
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
