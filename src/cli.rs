//! The command line: parsing, and [`HELP`], the one help text (`--help` prints it;
//! the README points to it rather than copying it).

use crate::config::Side;

/// What the operator asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// `run` (or no command): cycle until SIGTERM or SIGINT.
    Run,
    /// `once`: exactly one full cycle, exit 0 if every phase succeeded, 1 otherwise.
    Once,
    /// `migrate [local|remote|all]`: apply the embedded migrations and exit.
    Migrate(Vec<Side>),
    /// `status [--json]`: what the daemon and both databases look like now.
    Status {
        json: bool,
    },
    /// `check-config`: validate, print with secrets redacted, exit 0 or 78.
    CheckConfig,
    /// `requeue [--all | ID...]`: release quarantined readings for the next cycle.
    Requeue(Requeue),
    Version,
    Help,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Requeue {
    All,
    Ids(Vec<i64>),
}

pub const HELP: &str = "\
meter-sync: store-and-forward sync of meter readings from a gateway's local
PostgreSQL to a central PostgreSQL, and of meters and tenants back.

Usage: meter-sync [COMMAND]

Commands:
  run                        cycle until SIGTERM or SIGINT (the default)
  once                       one full cycle (upload drain, meters, tenants); exit 1 if a phase failed
  migrate [local|remote|all] apply the embedded schema migrations (default: all)
  status [--json]            daemon, queue, quarantine and connection status; exit 1 if local is unreachable
  check-config               validate the configuration and print it with secrets redacted
  requeue [--all | ID...]    retry quarantined readings (all, or these local ids) in the next cycle
  --version                  print the version
  --help                     print this help

Configuration comes from the environment (POSTGRES_SYNC_*, POSTGRES_CLIENT_*, BATCH_SIZE, ...);
see the README. Exit status 78 means the configuration is invalid.
";

/// Parses the arguments after the program name. The error is one line for stderr.
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Command, String> {
    let args: Vec<String> = args.into_iter().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        return Ok(Command::Help);
    }
    if args.iter().any(|a| a == "--version" || a == "-V") {
        return Ok(Command::Version);
    }
    let Some((cmd, rest)) = args.split_first() else {
        return Ok(Command::Run);
    };
    let no_args = |c: Command| {
        if let Some(extra) = rest.first() {
            Err(format!("{cmd}: unexpected argument {extra:?}"))
        } else {
            Ok(c)
        }
    };
    match cmd.as_str() {
        "run" => no_args(Command::Run),
        "once" => no_args(Command::Once),
        "check-config" => no_args(Command::CheckConfig),
        "help" => no_args(Command::Help),
        "migrate" => match rest {
            [] => Ok(Command::Migrate(vec![Side::Local, Side::Central])),
            [t] => match t.as_str() {
                "all" => Ok(Command::Migrate(vec![Side::Local, Side::Central])),
                "local" => Ok(Command::Migrate(vec![Side::Local])),
                "remote" | "central" => Ok(Command::Migrate(vec![Side::Central])),
                other => Err(format!(
                    "migrate: unknown target {other:?} (expected local, remote or all)"
                )),
            },
            [_, extra, ..] => Err(format!("migrate: unexpected argument {extra:?}")),
        },
        "status" => match rest {
            [] => Ok(Command::Status { json: false }),
            [j] if j == "--json" => Ok(Command::Status { json: true }),
            [other, ..] => Err(format!("status: unexpected argument {other:?}")),
        },
        "requeue" => {
            if rest.is_empty() {
                return Err("requeue: give --all or one or more reading ids".into());
            }
            if rest.iter().any(|a| a == "--all") {
                return if rest.len() == 1 {
                    Ok(Command::Requeue(Requeue::All))
                } else {
                    Err("requeue: --all takes no ids".into())
                };
            }
            rest.iter()
                .map(|a| {
                    a.parse::<i64>()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| format!("requeue: {a:?} is not a reading id"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|ids| Command::Requeue(Requeue::Ids(ids)))
        }
        other => Err(format!("unknown command {other:?} (try --help)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, String> {
        parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn commands_parse() {
        assert_eq!(p(&[]), Ok(Command::Run));
        assert_eq!(p(&["run"]), Ok(Command::Run));
        assert_eq!(p(&["once"]), Ok(Command::Once));
        assert_eq!(
            p(&["migrate"]),
            Ok(Command::Migrate(vec![Side::Local, Side::Central]))
        );
        assert_eq!(
            p(&["migrate", "remote"]),
            Ok(Command::Migrate(vec![Side::Central]))
        );
        assert_eq!(
            p(&["migrate", "local"]),
            Ok(Command::Migrate(vec![Side::Local]))
        );
        assert_eq!(p(&["status", "--json"]), Ok(Command::Status { json: true }));
        assert_eq!(p(&["requeue", "--all"]), Ok(Command::Requeue(Requeue::All)));
        assert_eq!(
            p(&["requeue", "3", "7"]),
            Ok(Command::Requeue(Requeue::Ids(vec![3, 7])))
        );
        assert_eq!(p(&["--version"]), Ok(Command::Version));
        assert_eq!(p(&["once", "--help"]), Ok(Command::Help));
    }

    #[test]
    fn bad_arguments_are_named() {
        assert!(p(&["migrate", "both"]).unwrap_err().contains("both"));
        assert!(p(&["requeue"]).is_err());
        assert!(p(&["requeue", "x1"]).unwrap_err().contains("x1"));
        assert!(p(&["frobnicate"]).unwrap_err().contains("frobnicate"));
        assert!(p(&["once", "extra"]).is_err());
    }
}
