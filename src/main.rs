//! Parses the command line, loads the configuration, starts logging and dispatches.
//! Maps outcomes to exit codes: 0 success, 1 failure, 64 usage, 78 configuration.

use std::process::ExitCode;

use meter_sync::cli::{self, Command, Requeue};
use meter_sync::config::{Config, Side};
use meter_sync::db::Db;
use meter_sync::error::{Error, Kind};
use meter_sync::shutdown::{self, Shutdown};
use meter_sync::{daemon, logging, migrate, status, upload};

const EX_USAGE: u8 = 64;
const EX_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let cmd = match cli::parse(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("meter-sync: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    match cmd {
        Command::Help => {
            print!("{}", cli::HELP);
            return ExitCode::SUCCESS;
        }
        Command::Version => {
            println!(
                "meter-sync {} (TLS: {})",
                env!("CARGO_PKG_VERSION"),
                meter_sync::tls::BACKEND
            );
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    let cfg = match Config::from_env() {
        Ok(c) => c,
        Err(errs) => {
            for e in errs {
                eprintln!("meter-sync: configuration error: {e}");
            }
            return ExitCode::from(EX_CONFIG);
        }
    };
    // Certificate and key files must also parse, not just exist: checked before any
    // command so that a malformed one exits 78 everywhere, not at the first cycle.
    if let Err(e) = meter_sync::tls::validate(&cfg) {
        if e.kind() == Kind::Config {
            eprintln!("meter-sync: configuration error: {e}");
            return ExitCode::from(EX_CONFIG);
        }
        eprintln!("meter-sync: {e}");
        return ExitCode::FAILURE;
    }
    if cmd == Command::CheckConfig {
        print!("{}", cfg.render());
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }
    logging::init(&cfg);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meter-sync: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cmd, &cfg)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            log::error!("{e}");
            // The log may go to syslog: an interactive operator still sees why.
            eprintln!("meter-sync: {e}");
            ExitCode::from(if e.kind() == Kind::Config {
                EX_CONFIG
            } else {
                1
            })
        }
    }
}

async fn dispatch(cmd: Command, cfg: &Config) -> Result<u8, Error> {
    match cmd {
        Command::Run => {
            let (trigger, shutdown) = shutdown::channel();
            tokio::spawn(meter_sync::shutdown::on_signals(trigger));
            daemon::run(cfg, shutdown).await?;
            Ok(0)
        }
        Command::Once => {
            let (trigger, shutdown) = shutdown::channel();
            tokio::spawn(meter_sync::shutdown::on_signals(trigger));
            daemon::once(cfg, shutdown).await
        }
        Command::Migrate(sides) => {
            for side in sides {
                let dbcfg = match side {
                    Side::Local => &cfg.local,
                    Side::Central => &cfg.central,
                };
                let mut db = Db::connect_with_retry(dbcfg, cfg, &Shutdown::never()).await?;
                let n = migrate::run(&mut db, migrate::for_side(side)).await?;
                log::info!("{side}: {n} migration(s) applied");
            }
            Ok(0)
        }
        Command::Status { json } => status::print(cfg, json).await,
        Command::Requeue(which) => {
            let db = Db::connect_with_retry(&cfg.local, cfg, &Shutdown::never()).await?;
            let ids = match &which {
                Requeue::All => None,
                Requeue::Ids(ids) => Some(ids.as_slice()),
            };
            let n = upload::requeue(&db, ids).await?;
            println!("requeued {n} reading(s)");
            Ok(0)
        }
        Command::CheckConfig | Command::Help | Command::Version => Ok(0),
    }
}
