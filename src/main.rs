//! Wires the command line, the configuration, logging and the runtime together,
//! and maps every outcome to an exit status in one place.

use std::process::ExitCode;

use meter_sync::{Command, Config, ConfigError, Error, Kind};

/// Why the program did not succeed, one variant per exit status it implies.
enum Failure {
    /// Bad command-line arguments: EX_USAGE.
    Usage(String),
    /// Bad configuration, every problem found: EX_CONFIG.
    Config(Vec<ConfigError>),
    /// A command that failed while running.
    Run(Error),
}

const EX_USAGE: u8 = 64;
const EX_CONFIG: u8 = 78;

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(Failure::Usage(msg)) => {
            meter_sync::print_error(&msg);
            ExitCode::from(EX_USAGE)
        }
        Err(Failure::Config(errors)) => {
            // Before logging starts; at error priority on the journal, so that
            // `journalctl -p err` shows why the daemon stopped.
            for e in errors {
                meter_sync::print_error(&format!("configuration error: {e}"));
            }
            ExitCode::from(EX_CONFIG)
        }
        Err(Failure::Run(e)) => {
            log::error!("{e}");
            // The log may go to syslog: an interactive operator still sees why.
            meter_sync::repeat_error(&e.to_string());
            ExitCode::from(if matches!(e.kind(), Kind::Config | Kind::SchemaTooNew) {
                EX_CONFIG
            } else {
                1
            })
        }
    }
}

fn run() -> Result<ExitCode, Failure> {
    // `std::env::args` panics on an argument that is not UTF-8.
    let args = std::env::args_os()
        .skip(1)
        .enumerate()
        .map(|(i, a)| {
            a.into_string()
                .map_err(|_| format!("argument {} is not valid UTF-8", i + 1))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(Failure::Usage)?;
    let cmd = meter_sync::parse_args(args).map_err(Failure::Usage)?;
    match cmd {
        Command::Help => {
            print!("{}", meter_sync::HELP);
            return Ok(ExitCode::SUCCESS);
        }
        Command::Version => {
            println!(
                "meter-sync {} (TLS: {})",
                env!("CARGO_PKG_VERSION"),
                meter_sync::TLS_BACKEND
            );
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    let cfg = Config::from_env(&meter_sync::check_files).map_err(Failure::Config)?;
    let metrics_dir = cfg.metrics_directory_problem();
    if cmd == Command::CheckConfig {
        print!("{}", cfg.render());
        println!("configuration is valid");
        if let Some(e) = metrics_dir {
            meter_sync::print_error(&format!(
                "note: {e}; `run` and `once` refuse to start until it does \
                 (the unit's RuntimeDirectory= creates /run/meter-sync)"
            ));
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let (Command::Run | Command::Once, Some(e)) = (&cmd, metrics_dir) {
        return Err(Failure::Config(vec![e]));
    }
    meter_sync::init_logging(&cfg);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            Failure::Run(Error::new(
                Kind::Other,
                format!("cannot start the runtime: {e}"),
            ))
        })?;
    let code = rt
        .block_on(meter_sync::execute(cmd, &cfg))
        .map_err(Failure::Run)?;
    Ok(ExitCode::from(code))
}
