//! What each command does once the configuration is valid and logging runs:
//! the daemon, one cycle, migrations, status, requeue, resend.

use crate::cli::{Command, Requeue};
use crate::config::{Config, Side};
use crate::db::Db;
use crate::error::{Error, Kind, Result};
use crate::shutdown::{self, Shutdown};
use crate::{daemon, migrate, status, upload};

/// Runs `cmd` to its end; the number is the exit status (0, or 1 when a cycle or a
/// probe failed in a way the command reports that way).
pub async fn execute(cmd: Command, cfg: &Config) -> Result<u8> {
    match cmd {
        Command::Run => {
            let (trigger, shutdown) = shutdown::channel();
            tokio::spawn(shutdown::on_signals(trigger));
            daemon::run(cfg, shutdown).await?;
            Ok(0)
        }
        Command::Once => {
            let (trigger, shutdown) = shutdown::channel();
            tokio::spawn(shutdown::on_signals(trigger));
            daemon::once(cfg, shutdown).await
        }
        Command::Migrate(sides) => {
            for side in sides {
                let dbcfg = match side {
                    Side::Local => &cfg.local,
                    Side::Central => &cfg.central,
                };
                let mut db = Db::connect_with_retry(dbcfg, cfg, &Shutdown::never()).await?;
                let n = migrate::run(&mut db, migrate::for_side(side))
                    .await
                    .map_err(|e| who_migrates_central(side, e))?;
                log::info!("{side}: {n} migration(s) applied");
            }
            Ok(0)
        }
        Command::Status { json } => status::print(cfg, json).await,
        Command::Requeue(which) => {
            let db = Db::connect_with_retry(&cfg.local, cfg, &Shutdown::never()).await?;
            migrate::newer_than_known(&db, migrate::LOCAL).await?;
            let ids = match &which {
                Requeue::All => None,
                Requeue::Ids(ids) => Some(ids.as_slice()),
            };
            let n = upload::requeue(&db, ids).await?;
            println!("requeued {n} reading(s)");
            Ok(0)
        }
        Command::Resend { since } => {
            let db = Db::connect_with_retry(&cfg.local, cfg, &Shutdown::never()).await?;
            migrate::newer_than_known(&db, migrate::LOCAL).await?;
            let n = upload::resend(&db, &since).await?;
            println!("queued {n} retained reading(s) uploaded since {since} again");
            if cfg.upload_retain.is_zero() {
                println!(
                    "note: UPLOAD_RETAIN_HOURS is 0, so uploaded readings are deleted, not retained"
                );
            }
            Ok(0)
        }
        // Answered before the configuration is even read.
        Command::CheckConfig | Command::Help | Command::Version => Ok(0),
    }
}

/// SQLSTATE insufficient_privilege.
const INSUFFICIENT_PRIVILEGE: &str = "42501";

/// A gateway's least-privilege central role may not create central's tables: that is
/// by design (docs/central.md), and the error says so, and what to run instead.
fn who_migrates_central(side: Side, e: Error) -> Error {
    if side != Side::Central || e.code() != Some(INSUFFICIENT_PRIVILEGE) {
        return e;
    }
    Error::new(
        Kind::Migration,
        format!(
            "{e}; central's migrations are applied by its administrator with a role that owns \
             its tables (`meter-sync migrate remote`, docs/central.md); on a gateway run \
             `meter-sync migrate local`"
        ),
    )
}
