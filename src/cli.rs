//! The command line: parsing, and [`HELP`], the one help text (`--help` prints it;
//! its list of variables, defaults and ranges is held to what the configuration
//! applies by tests/config.rs, like the README's table and the example file).

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
    /// `resend --since TIMESTAMP`: queue again the retained readings uploaded since
    /// then (the resend window, `UPLOAD_RETAIN_HOURS`). `since` is normalized to
    /// `YYYY-MM-DD HH:MM:SS[.ffffff]+HH:MM`.
    Resend {
        since: String,
    },
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
  resend --since TIMESTAMP   queue again the retained readings uploaded at or after TIMESTAMP
                             (UPLOAD_RETAIN_HOURS > 0); TIMESTAMP like 2026-11-30T18:00:00Z,
                             2026-11-30 18:00+01:00 or 2026-11-30 (no offset: UTC)
  --version                  print the version
  --help                     print this help

Environment:
  Each variable with its default, then its range or values; empty counts as unset.
  Under systemd: /etc/meter-sync/meter-sync.env. `check-config` prints the values in force.
  POSTGRES_SYNC_HOST              required; host, IP address or socket directory (/run/postgresql)
  POSTGRES_SYNC_PORT              5432; 1..=65535
  POSTGRES_SYNC_DB                postgres
  POSTGRES_SYNC_USER              postgres
  POSTGRES_SYNC_PASSWORD          empty; else POSTGRES_SYNC_PASSWORD_FILE,
                                  else $CREDENTIALS_DIRECTORY/sync-password
  POSTGRES_SYNC_PASSWORD_FILE     unset; a file holding the password (not with the plain one)
  POSTGRES_SYNC_SSLMODE           disable; disable, prefer, require, verify-ca, verify-full
  POSTGRES_CLIENT_HOST            required; central host, or a comma-separated list
  POSTGRES_CLIENT_PORT            5432; 1..=65535, one port or one per host
  POSTGRES_CLIENT_DB              postgres
  POSTGRES_CLIENT_USER            postgres
  POSTGRES_CLIENT_PASSWORD        empty; else POSTGRES_CLIENT_PASSWORD_FILE,
                                  else $CREDENTIALS_DIRECTORY/client-password
  POSTGRES_CLIENT_PASSWORD_FILE   unset; a file holding the password (not with the plain one)
  POSTGRES_CLIENT_SSLMODE         verify-full; disable, prefer, require, verify-ca, verify-full
  POSTGRES_CLIENT_SSLROOTCERT     system roots; PEM bundle of central's CA(s)
  POSTGRES_CLIENT_SSLCERT         unset; client certificate (PEM), with POSTGRES_CLIENT_SSLKEY
  POSTGRES_CLIENT_SSLKEY          unset; its unencrypted key (PEM)
  POSTGRES_CLIENT_CHANNEL_BINDING prefer; disable, prefer, require
  METER_SYNC_GATEWAY_ID           /etc/machine-id, else the host name; A-Z a-z 0-9 . - _ :
  SYNC_INTERVAL_SECONDS           60; 1..=86400
  BATCH_SIZE                      100; 1..=100000
  MAX_CONNECTION_RETRIES          5; 1..=100 (per database per cycle)
  MAX_QUERY_RETRIES               3; 0..=100
  DB_CONNECTION_TIMEOUT_MS        5000; 100..=600000
  DB_QUERY_TIMEOUT_MS             30000; 100..=3600000
  LOG_LEVEL                       info; error, warn, info, debug, trace
  LOG_TARGET                      auto; syslog, stderr, auto (syslog where /dev/log exists)
  LOG_SYSLOG_SOCKET               /dev/log
  UPLOAD_PIPELINE_DEPTH           8 (fewer above BATCH_SIZE 12500); 1..=256
  UPLOAD_METHOD                   auto; auto, copy, insert
  UPLOAD_TIME_BUDGET_SECONDS      300; 1..=86400
  UPLOAD_RETAIN_HOURS             0; 0..=8760 (0: delete once uploaded)
  DOWNLOAD_FULL_EVERY_SECONDS     86400; 1..=31536000
  DOWNLOAD_MAX_ROWS               100000; 1..=100000000
  DOWNLOAD_MAX_BYTES              67108864; 1024..=1099511627776
  SYNC_LOGS_RETAIN_DAYS           30; 0..=36500 (0 keeps them)
  METRICS_TEXTFILE                unset; Prometheus textfile written after every cycle

Exit status:
  0 ok; 1 failed (once: a phase failed; migrate: a migration or a database; status,
  requeue, resend: the local database unreachable); 64 bad usage or TIMESTAMP;
  78 invalid configuration, or a local schema migrated by a newer release that says
  this one cannot run against it (systemd: RestartPreventExitStatus=78). More: the README.
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
        "resend" => match rest {
            [flag, ts] if flag == "--since" => parse_since(ts)
                .map(|since| Command::Resend { since })
                .map_err(|e| format!("resend: --since {ts:?}: {e}")),
            [flag] if flag.starts_with("--since=") => {
                let ts = &flag["--since=".len()..];
                parse_since(ts)
                    .map(|since| Command::Resend { since })
                    .map_err(|e| format!("resend: --since {ts:?}: {e}"))
            }
            _ => Err("resend: give --since TIMESTAMP (for example 2026-11-30T18:00:00Z)".into()),
        },
        other => Err(format!("unknown command {other:?} (try --help)")),
    }
}

/// Reads `YYYY-MM-DD[( |T)HH:MM[:SS[.f…]]][Z|±HH[:MM]]` (ISO 8601 / RFC 3339, and
/// PostgreSQL's own output), checking the calendar, and returns it in one form
/// PostgreSQL reads the same whatever its DateStyle. No offset means UTC, the
/// daemon's session time zone. Checked here so that a typo is a usage error
/// naming the argument, not a database error.
pub fn parse_since(s: &str) -> Result<String, &'static str> {
    const SHAPE: &str = "expected YYYY-MM-DD[THH:MM[:SS[.ffffff]]][Z|+HH:MM]";
    let b = s.trim().as_bytes();
    let num = |from: usize, len: usize| -> Result<u32, &'static str> {
        let d = b.get(from..from + len).ok_or(SHAPE)?;
        if !d.iter().all(u8::is_ascii_digit) {
            return Err(SHAPE);
        }
        Ok(d.iter().fold(0, |n, c| n * 10 + u32::from(c - b'0')))
    };
    let sep = |at: usize, c: u8| -> Result<(), &'static str> {
        (b.get(at) == Some(&c)).then_some(()).ok_or(SHAPE)
    };
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    sep(4, b'-')?;
    sep(7, b'-')?;
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    // PostgreSQL counts 1 BC before 0001: there is no year 0000.
    if year == 0 || !(1..=12).contains(&month) || day < 1 || day > days[month as usize - 1] {
        return Err("no such date");
    }
    let mut i = 10;
    let (mut hour, mut minute, mut second, mut frac) = (0, 0, 0, String::new());
    if matches!(b.get(i), Some(b'T' | b't' | b' ')) {
        hour = num(i + 1, 2)?;
        sep(i + 3, b':')?;
        minute = num(i + 4, 2)?;
        i += 6;
        if b.get(i) == Some(&b':') {
            second = num(i + 1, 2)?;
            i += 3;
            if b.get(i) == Some(&b'.') {
                let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
                if digits == 0 || digits > 6 {
                    return Err("at most 6 digits after the seconds' point");
                }
                frac = format!(".{}", &s.trim()[i + 1..i + 1 + digits]);
                i += 1 + digits;
            }
        }
        if hour > 23 || minute > 59 || second > 59 {
            return Err("no such time of day");
        }
    }
    let zone = match &b[i..] {
        [] | [b'Z'] | [b'z'] => "+00:00".to_string(),
        [sign @ (b'+' | b'-'), rest @ ..] => {
            let (h, m) = match rest.len() {
                2 => (num(i + 1, 2)?, 0),
                4 => (num(i + 1, 2)?, num(i + 3, 2)?),
                5 if rest[2] == b':' => (num(i + 1, 2)?, num(i + 4, 2)?),
                _ => return Err(SHAPE),
            };
            if h > 15 || m > 59 {
                return Err("no such UTC offset");
            }
            format!("{}{h:02}:{m:02}", *sign as char)
        }
        _ => return Err(SHAPE),
    };
    Ok(format!(
        "{year:04}-{month:02}-{day:02} {hour:02}:{minute:02}:{second:02}{frac}{zone}"
    ))
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
    fn resend_takes_a_timestamp() {
        let since = |s: &str| match p(&["resend", "--since", s]) {
            Ok(Command::Resend { since }) => Ok(since),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e),
        };
        for (given, normalised) in [
            ("2026-11-30T18:00:00Z", "2026-11-30 18:00:00+00:00"),
            ("2026-11-30 18:00+01:00", "2026-11-30 18:00:00+01:00"),
            ("2026-11-30", "2026-11-30 00:00:00+00:00"),
            (
                "2024-02-29T23:59:59.123456-0530",
                "2024-02-29 23:59:59.123456-05:30",
            ),
            ("2026-12-01 09:30:00.5+00", "2026-12-01 09:30:00.5+00:00"),
        ] {
            assert_eq!(since(given), Ok(normalised.into()), "{given}");
        }
        assert_eq!(
            p(&["resend", "--since=2026-11-30T18:00:00Z"]),
            Ok(Command::Resend {
                since: "2026-11-30 18:00:00+00:00".into()
            })
        );
        for bad in [
            "yesterday",
            "2026-13-01",
            "2026-02-29",
            "2026-11-31",
            "2026-11-30T24:00",
            "2026-11-30T18:00:00.1234567Z",
            "2026-11-30T18:00:00+1",
            "2026-11-30T18:00:00 UTC",
            "",
        ] {
            let e = since(bad).unwrap_err();
            assert!(
                e.starts_with("resend: --since") && !e.contains('\n'),
                "{bad}: {e}"
            );
        }
        assert!(p(&["resend"]).unwrap_err().contains("--since"));
        assert!(p(&["resend", "2026-11-30"]).is_err());
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
