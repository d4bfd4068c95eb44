//! SPEC §2–3: configuration errors exit 78 naming the variable, never print a
//! secret; check-config redacts; --help and --version need no configuration.

mod support;

use std::process::Command;

use support::bin;

/// Runs the binary with exactly `vars` in its environment.
fn run_with(args: &[&str], vars: &[(&str, &str)]) -> support::Run {
    let out = Command::new(bin())
        .args(args)
        .env_clear()
        .envs(vars.iter().copied())
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    support::Run::from(out)
}

const BASE: &[(&str, &str)] = &[
    ("POSTGRES_SYNC_HOST", "/run/postgresql"),
    ("POSTGRES_CLIENT_HOST", "central.invalid"),
];

fn with(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    let mut v: Vec<_> = BASE.to_vec();
    for (k, val) in extra {
        v.retain(|(e, _)| e != k);
        v.push((k, val));
    }
    v
}

#[test]
fn every_config_error_exits_78_naming_the_variable_from_every_command() {
    let cases: &[(&str, &[(&str, &str)])] = &[
        ("POSTGRES_SYNC_HOST", &[("POSTGRES_CLIENT_HOST", "c")]),
        ("POSTGRES_CLIENT_HOST", &[("POSTGRES_SYNC_HOST", "l")]),
        ("BATCH_SIZE", &[("BATCH_SIZE", "0")]),
        ("BATCH_SIZE", &[("BATCH_SIZE", "lots")]),
        ("SYNC_INTERVAL_SECONDS", &[("SYNC_INTERVAL_SECONDS", "0")]),
        ("POSTGRES_SYNC_PORT", &[("POSTGRES_SYNC_PORT", "99999")]),
        ("MAX_CONNECTION_RETRIES", &[("MAX_CONNECTION_RETRIES", "x")]),
        (
            "DB_CONNECTION_TIMEOUT_MS",
            &[("DB_CONNECTION_TIMEOUT_MS", "-5")],
        ),
        (
            "POSTGRES_CLIENT_SSLMODE",
            &[("POSTGRES_CLIENT_SSLMODE", "paranoid")],
        ),
        ("LOG_LEVEL", &[("LOG_LEVEL", "chatty")]),
        ("LOG_TARGET", &[("LOG_TARGET", "file")]),
        ("UPLOAD_PIPELINE_DEPTH", &[("UPLOAD_PIPELINE_DEPTH", "0")]),
        (
            "POSTGRES_CLIENT_SSLROOTCERT",
            &[("POSTGRES_CLIENT_SSLROOTCERT", "/nonexistent/ca.pem")],
        ),
        (
            "POSTGRES_SYNC_PASSWORD_FILE",
            &[("POSTGRES_SYNC_PASSWORD_FILE", "/nonexistent/pw")],
        ),
    ];
    for (var, extra) in cases {
        let mut vars: Vec<(&str, &str)> = BASE
            .iter()
            .copied()
            .filter(|(k, _)| extra.iter().all(|(e, _)| e != k))
            .collect();
        // The two "required" cases remove the variable instead of overriding it.
        if *var == "POSTGRES_SYNC_HOST" || *var == "POSTGRES_CLIENT_HOST" {
            vars = extra.to_vec();
        } else {
            vars.extend_from_slice(extra);
        }
        for cmd in [
            &["once"][..],
            &["run"],
            &["migrate"],
            &["status", "--json"],
            &["check-config"],
            &["requeue", "--all"],
            &[],
        ] {
            let r = run_with(cmd, &vars);
            r.assert_code(78);
            let line = r.stderr.lines().next().unwrap_or_default();
            assert!(
                line.contains(var),
                "{cmd:?} with bad {var}: first line {line:?} does not name it"
            );
            assert!(
                r.stdout.is_empty(),
                "{cmd:?}: printed to stdout: {}",
                r.stdout
            );
        }
    }
}

#[test]
fn a_bad_value_never_echoes_a_password() {
    let dir = support::temp_dir("pw");
    let pw = dir.join("pw");
    std::fs::write(&pw, "file-secret-123\n").unwrap();
    let pw = pw.to_str().unwrap().to_string();
    let pw: &'static str = Box::leak(pw.into_boxed_str());
    let r = run_with(
        &["once"],
        &with(&[
            ("POSTGRES_CLIENT_PASSWORD", "plain-secret-456"),
            ("POSTGRES_CLIENT_PASSWORD_FILE", pw),
        ]),
    );
    r.assert_code(78);
    assert!(
        r.stderr.contains("POSTGRES_CLIENT_PASSWORD_FILE"),
        "{}",
        r.stderr
    );
    assert!(
        !r.all().contains("plain-secret-456") && !r.all().contains("file-secret-123"),
        "{}",
        r.all()
    );
}

#[test]
fn check_config_prints_the_configuration_with_passwords_redacted() {
    let r = run_with(
        &["check-config"],
        &with(&[
            ("POSTGRES_SYNC_PASSWORD", "local-secret-789"),
            ("POSTGRES_CLIENT_PASSWORD", "central-secret-012"),
            ("BATCH_SIZE", "250"),
        ]),
    );
    r.assert_ok();
    assert!(r.stdout.contains("BATCH_SIZE=250"), "{}", r.stdout);
    assert!(
        r.stdout.contains("POSTGRES_CLIENT_SSLMODE=verify-full"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("POSTGRES_SYNC_PASSWORD=***"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("POSTGRES_CLIENT_PASSWORD=***"),
        "{}",
        r.stdout
    );
    assert!(
        !r.all().contains("local-secret-789") && !r.all().contains("central-secret-012"),
        "{}",
        r.all()
    );
}

#[test]
fn help_and_version_need_no_configuration() {
    let r = run_with(&["--version"], &[]);
    r.assert_ok();
    assert!(r.stdout.starts_with("meter-sync "), "{}", r.stdout);
    let r = run_with(&["--help"], &[]);
    r.assert_ok();
    for cmd in [
        "run",
        "once",
        "migrate",
        "status",
        "check-config",
        "requeue",
    ] {
        assert!(r.stdout.contains(cmd), "help lacks {cmd}");
    }
}

#[test]
fn unknown_commands_are_usage_errors() {
    let r = run_with(&["frobnicate"], BASE);
    r.assert_code(64);
    assert!(r.stderr.contains("frobnicate"));
}

#[test]
fn status_exits_1_when_the_local_database_is_unreachable() {
    let port = support::free_port().to_string();
    let port: &'static str = Box::leak(port.into_boxed_str());
    let r = run_with(
        &["status", "--json"],
        &with(&[
            ("POSTGRES_SYNC_HOST", "127.0.0.1"),
            ("POSTGRES_SYNC_PORT", port),
            ("MAX_CONNECTION_RETRIES", "1"),
            ("LOG_TARGET", "stderr"),
        ]),
    );
    r.assert_code(1);
}

#[test]
fn a_database_password_never_appears_when_the_connection_fails() {
    let port = support::free_port().to_string();
    let port: &'static str = Box::leak(port.into_boxed_str());
    let r = run_with(
        &["once"],
        &with(&[
            ("POSTGRES_SYNC_HOST", "127.0.0.1"),
            ("POSTGRES_SYNC_PORT", port),
            ("POSTGRES_SYNC_PASSWORD", "gateway-pw-345"),
            ("POSTGRES_CLIENT_PASSWORD", "central-pw-678"),
            ("MAX_CONNECTION_RETRIES", "1"),
            ("LOG_TARGET", "stderr"),
        ]),
    );
    r.assert_code(1);
    assert!(r.stderr.contains("local"), "{}", r.stderr);
    assert!(
        !r.all().contains("gateway-pw-345") && !r.all().contains("central-pw-678"),
        "{}",
        r.all()
    );
}

/// Runs the binary with `vars` and one raw (possibly not UTF-8) variable or argument.
fn run_raw(args: &[&[u8]], vars: &[(&str, &str)], raw: Option<(&str, &[u8])>) -> support::Run {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let mut cmd = Command::new(bin());
    cmd.args(args.iter().map(|a| OsStr::from_bytes(a)))
        .env_clear()
        .envs(vars.iter().copied())
        .current_dir(std::env::temp_dir());
    if let Some((k, v)) = raw {
        cmd.env(k, OsStr::from_bytes(v));
    }
    support::Run::from(cmd.output().unwrap())
}

/// A value that is not UTF-8 used to abort every command (exit 134) with a panic
/// that printed it, password included. Ours is refused by name, without the value;
/// anybody else's variable is ignored; an argument that is not UTF-8 is a usage error.
#[test]
fn a_value_that_is_not_utf8_is_refused_by_name_and_never_printed() {
    let secret: &[u8] = b"S3cr\xe9t-gw42";
    for cmd in [
        &[&b"check-config"[..]][..],
        &[b"once"],
        &[b"status", b"--json"],
    ] {
        let r = run_raw(cmd, BASE, Some(("POSTGRES_CLIENT_PASSWORD", secret)));
        r.assert_code(78);
        let lines: Vec<&str> = r.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{cmd:?}: {}", r.stderr);
        assert!(
            lines[0].contains("POSTGRES_CLIENT_PASSWORD") && lines[0].contains("UTF-8"),
            "{}",
            lines[0]
        );
        assert!(!r.all().contains("S3cr"), "{cmd:?}: {}", r.all());
    }
    // A required variable that cannot be read is one error, not two.
    let r = run_raw(
        &[b"check-config"],
        &[("POSTGRES_SYNC_HOST", "/run/postgresql")],
        Some(("POSTGRES_CLIENT_HOST", b"h\xffst")),
    );
    r.assert_code(78);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    // Somebody else's variable is none of ours.
    let r = run_raw(&[b"check-config"], BASE, Some(("LANGNOTE", b"caf\xe9")));
    r.assert_code(0);
    // An argument.
    let r = run_raw(&[b"requeue", b"\xff1"], BASE, None);
    r.assert_code(64);
    assert!(
        r.stderr.contains("argument 2 is not valid UTF-8"),
        "{}",
        r.stderr
    );
}

/// A connection string or URL in a host variable (a DATABASE_URL habit) was taken as
/// a host name and then printed in every connect error, in `status` and in central's
/// `gateway_status`, password and all. It is refused, naming the variable only.
#[test]
fn a_connection_string_in_a_host_variable_is_refused_without_echoing_it() {
    let bad: &[(&str, &str)] = &[
        (
            "POSTGRES_CLIENT_HOST",
            "postgresql://postgres:Sup3rSecretPW@127.0.0.1:5433/postgres",
        ),
        (
            "POSTGRES_CLIENT_HOST",
            "db1.example.net,user:Sup3rSecretPW@db2",
        ),
        (
            "POSTGRES_SYNC_HOST",
            "host=/run/postgresql password=Sup3rSecretPW",
        ),
        (
            "POSTGRES_SYNC_HOST",
            "/run/postgresql password=Sup3rSecretPW",
        ),
    ];
    for (var, value) in bad {
        for cmd in [&["check-config"][..], &["once"], &["status", "--json"]] {
            let r = run_with(cmd, &with(&[(var, value)]));
            r.assert_code(78);
            let line = r.stderr.lines().next().unwrap_or_default();
            assert!(line.contains(var), "{var}={value}: {line}");
            assert!(!r.all().contains("Sup3rSecretPW"), "{cmd:?}: {}", r.all());
        }
    }
    for good in [
        "central.example.net",
        "10.0.0.7",
        "::1",
        "fe80::1%eth0",
        "db-1.example.net,db_2.example.net",
    ] {
        run_with(&["check-config"], &with(&[("POSTGRES_CLIENT_HOST", good)])).assert_code(0);
    }
    run_with(
        &["check-config"],
        &with(&[("POSTGRES_SYNC_HOST", "/var/run/my postgres")]),
    )
    .assert_code(0);
}

/// SPEC §3: BATCH_SIZE 1–100000. The default depth (8) used to refuse anything above
/// 12,500; unset, the depth now shrinks to what fits in flight, while a depth given
/// explicitly is refused when the two do not fit together.
#[test]
fn the_whole_batch_size_range_runs_with_the_default_depth() {
    for (batch, depth) in [
        ("100000", "1"),
        ("20000", "5"),
        ("12500", "8"),
        ("100", "8"),
    ] {
        let r = run_with(&["check-config"], &with(&[("BATCH_SIZE", batch)]));
        r.assert_code(0);
        assert!(
            r.stdout
                .contains(&format!("\nUPLOAD_PIPELINE_DEPTH={depth}\n")),
            "BATCH_SIZE={batch}: {}",
            r.stdout
        );
    }
    let r = run_with(
        &["check-config"],
        &with(&[("BATCH_SIZE", "20000"), ("UPLOAD_PIPELINE_DEPTH", "8")]),
    );
    r.assert_code(78);
    assert!(r.stderr.contains("BATCH_SIZE"), "{}", r.stderr);
}

/// `METRICS_TEXTFILE` in /run/meter-sync (the env example's value) exists only while
/// the unit runs: `status`, `requeue` and `check-config` used to refuse to work
/// without it (exit 78), just when the daemon is down. Only the commands that write
/// the file refuse.
#[test]
fn a_metrics_directory_that_is_missing_stops_only_the_commands_that_write_it() {
    let vars = with(&[
        (
            "METRICS_TEXTFILE",
            "/nonexistent-meter-sync/meter-sync.prom",
        ),
        ("MAX_CONNECTION_RETRIES", "1"),
        ("DB_CONNECTION_TIMEOUT_MS", "200"),
        ("LOG_TARGET", "stderr"),
    ]);
    for cmd in [&["once"][..], &["run"]] {
        let r = run_with(cmd, &vars);
        r.assert_code(78);
        let line = r.stderr.lines().next().unwrap_or_default();
        assert!(
            line.contains("METRICS_TEXTFILE") && line.contains("does not exist"),
            "{cmd:?}: {line}"
        );
    }
    let r = run_with(&["check-config"], &vars);
    r.assert_code(0);
    assert!(r.stderr.contains("note: METRICS_TEXTFILE"), "{}", r.stderr);
    // The local database is not there either: status reports it (1), not a config error.
    let r = run_with(&["status", "--json"], &vars);
    r.assert_code(1);
    assert!(r.stdout.contains("\"local\""), "{}", r.all());
    run_with(&["requeue", "--all"], &vars).assert_code(1);
    // A directory for a file name is still a configuration error for everyone.
    let r = run_with(&["status"], &with(&[("METRICS_TEXTFILE", "/tmp/")]));
    r.assert_code(78);
}

/// SPEC.md §3 and §8 (the contract, kept outside this repository): the variables it
/// names. Every other variable the binary reads is an extension, and the README says so.
const SPEC_VARS: &[&str] = &[
    "POSTGRES_SYNC_HOST",
    "POSTGRES_SYNC_PORT",
    "POSTGRES_SYNC_DB",
    "POSTGRES_SYNC_USER",
    "POSTGRES_SYNC_PASSWORD",
    "POSTGRES_CLIENT_HOST",
    "POSTGRES_CLIENT_PORT",
    "POSTGRES_CLIENT_DB",
    "POSTGRES_CLIENT_USER",
    "POSTGRES_CLIENT_PASSWORD",
    "SYNC_INTERVAL_SECONDS",
    "BATCH_SIZE",
    "MAX_CONNECTION_RETRIES",
    "MAX_QUERY_RETRIES",
    "DB_CONNECTION_TIMEOUT_MS",
    "LOG_LEVEL",
    "POSTGRES_SYNC_PASSWORD_FILE",
    "POSTGRES_CLIENT_PASSWORD_FILE",
    "POSTGRES_SYNC_SSLMODE",
    "POSTGRES_CLIENT_SSLMODE",
    "POSTGRES_CLIENT_SSLROOTCERT",
    "POSTGRES_CLIENT_SSLCERT",
    "POSTGRES_CLIENT_SSLKEY",
    "LOG_TARGET",
    "DB_QUERY_TIMEOUT_MS",
    "UPLOAD_PIPELINE_DEPTH",
    "UPLOAD_TIME_BUDGET_SECONDS",
    "METRICS_TEXTFILE",
    "METER_SYNC_GATEWAY_ID",
    "DOWNLOAD_FULL_EVERY_SECONDS",
    "DOWNLOAD_MAX_ROWS",
    "DOWNLOAD_MAX_BYTES",
    "UPLOAD_RETAIN_HOURS",
    "SYNC_LOGS_RETAIN_DAYS",
];

/// Upper-case names in the documentation that look like ours but are not variables of
/// the daemon: systemd's, the test and install knobs, constants of the code.
const NOT_CONFIG: &[&str] = &[
    "CREDENTIALS_DIRECTORY",
    "METER_SYNC_SYSTEMD",
    "METER_SYNC_OLD_RELEASE",
    "MAX_BINARY_BYTES",
    "MAX_QUARANTINED_PER_CYCLE",
    "MAX_READINGS_IN_FLIGHT",
    "MAX_ROW_BYTES",
];

/// What the binary itself applies to one variable.
#[derive(Debug)]
enum Accepts {
    /// A whole number in `min..=max`.
    Range(u64, u64),
    /// One of these names.
    OneOf(Vec<String>),
    /// Anything else (a name, a path, a host).
    Text,
}

/// Each variable's default (as `check-config` prints it) and what it accepts (as its
/// error message for an absurd value says), asked of the binary, not of the docs.
fn what_the_binary_applies() -> Vec<(&'static str, String, Accepts)> {
    let defaults = run_with(&["check-config"], BASE);
    defaults.assert_ok();
    meter_sync::ALL_VARS
        .iter()
        .map(|&var| {
            let default = defaults
                .stdout
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{var}=")))
                .unwrap_or_else(|| panic!("check-config does not print {var}"))
                .to_string();
            let r = run_with(&["check-config"], &with(&[(var, "18446744073709551615")]));
            let line = r.stderr.lines().next().unwrap_or_default().to_string();
            let accepts = if let Some(names) = line.split("is not one of ").nth(1) {
                Accepts::OneOf(names.split(", ").map(str::to_string).collect())
            } else if let Some((a, b)) = line.split_once("..=") {
                let min = a.rsplit(|c: char| !c.is_ascii_digit()).next().unwrap();
                let max = b.split(|c: char| !c.is_ascii_digit()).next().unwrap();
                Accepts::Range(min.parse().unwrap(), max.parse().unwrap())
            } else {
                Accepts::Text
            };
            (var, default, accepts)
        })
        .collect()
}

/// The names in `text` that look like one of ours (a known prefix, upper case).
fn names_like_ours(text: &str) -> Vec<String> {
    const PREFIXES: &[&str] = &[
        "POSTGRES_",
        "SYNC_",
        "UPLOAD_",
        "DOWNLOAD_",
        "LOG_",
        "DB_",
        "MAX_",
        "METER_SYNC_",
        "METRICS_",
        "BATCH_",
    ];
    text.split(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
        .filter(|w| PREFIXES.iter().any(|p| w.starts_with(p)) && !w.ends_with('_'))
        .map(str::to_string)
        .collect()
}

/// `var`'s row in the README's configuration table.
fn readme_row<'a>(readme: &'a str, var: &str) -> Option<&'a str> {
    let section = readme
        .split("\n## Configuration")
        .nth(1)?
        .split("\n## ")
        .next()?;
    section.lines().filter(|l| l.starts_with("| `")).find(|l| {
        l.split('|')
            .nth(1)
            .unwrap_or_default()
            .contains(&format!("`{var}`"))
    })
}

/// `var`'s entry in `--help`: the text after its name, with the indented lines that
/// continue it.
fn help_entry(help: &str, var: &str) -> Option<String> {
    let lines: Vec<&str> = help.lines().collect();
    let i = lines
        .iter()
        .position(|l| l.split_whitespace().next() == Some(var))?;
    let mut entry = lines[i].trim_start()[var.len()..].trim().to_string();
    for l in &lines[i + 1..] {
        if !l.starts_with("      ") {
            break;
        }
        entry.push(' ');
        entry.push_str(l.trim());
    }
    Some(entry)
}

/// The comment above `var` in the example file (shared by variables listed one under
/// the other).
fn example_comment(example: &str, var: &str) -> Option<String> {
    let lines: Vec<&str> = example.lines().collect();
    let is_var_line = |l: &str| {
        let l = l.strip_prefix('#').unwrap_or(l);
        l.split_once('=').is_some_and(|(k, _)| {
            !k.is_empty() && k.chars().all(|c| c.is_ascii_uppercase() || c == '_')
        })
    };
    let i = lines.iter().position(|l| {
        l.strip_prefix('#')
            .unwrap_or(l)
            .starts_with(&format!("{var}="))
    })?;
    let mut j = i;
    while j > 0 && is_var_line(lines[j - 1]) {
        j -= 1;
    }
    let mut k = j;
    while k > 0 && lines[k - 1].starts_with("# ") {
        k -= 1;
    }
    Some(lines[k..j].join(" "))
}

/// One list of variables: every variable the binary reads is in the README's table,
/// `--help` and deploy/meter-sync.env.example, with the default the binary applies and
/// its range (or its values); the README names the ones SPEC.md does not; and no
/// document names a variable the binary does not read. LOG_SYSLOG_SOCKET's default used
/// to print as empty in `check-config` while every document said /dev/log.
#[test]
fn every_variable_is_listed_alike_everywhere() {
    let readme = std::fs::read_to_string(support::host::repo("README.md")).unwrap();
    let example =
        std::fs::read_to_string(support::host::repo("deploy/meter-sync.env.example")).unwrap();
    let help = run_with(&["--help"], &[]);
    help.assert_ok();
    let help = help.stdout;
    let mut wrong = Vec::new();
    for (var, default, accepts) in what_the_binary_applies() {
        let Some(row) = readme_row(&readme, var) else {
            wrong.push(format!("README's table lacks {var}"));
            continue;
        };
        let Some(entry) = help_entry(&help, var) else {
            wrong.push(format!("--help lacks {var}"));
            continue;
        };
        let Some(comment) = example_comment(&example, var) else {
            wrong.push(format!("the example file lacks {var}"));
            continue;
        };
        // The machine's own values are not defaults.
        let machine = var.ends_with("_HOST") || var == "METER_SYNC_GATEWAY_ID";
        let readme_default = row
            .split('|')
            .nth(2)
            .unwrap_or_default()
            .trim()
            .replace('`', "");
        if !machine {
            if default.is_empty() || default == "(empty)" {
                if !["empty", "unset", "system roots"].contains(&readme_default.as_str()) {
                    wrong.push(format!(
                        "README: {var} defaults to {readme_default:?}, the binary to nothing"
                    ));
                }
                if !(entry.starts_with("empty")
                    || entry.starts_with("unset")
                    || entry.starts_with("system roots"))
                {
                    wrong.push(format!(
                        "--help: {var} {entry:?}, the binary's default is nothing"
                    ));
                }
            } else {
                if readme_default != default {
                    wrong.push(format!(
                        "README: {var} defaults to {readme_default:?}, the binary to {default:?}"
                    ));
                }
                let after = entry.strip_prefix(default.as_str());
                if !after.is_some_and(|a| a.is_empty() || a.starts_with([';', ' '])) {
                    wrong.push(format!(
                        "--help: {var} {entry:?}, the binary's default is {default:?}"
                    ));
                }
            }
        }
        match &accepts {
            Accepts::Range(min, max) => {
                if !row.contains(&format!("{min}–{max}")) {
                    wrong.push(format!("README: {var} lacks its range {min}–{max}"));
                }
                if !entry.contains(&format!("{min}..={max}")) {
                    wrong.push(format!("--help: {var} lacks its range {min}..={max}"));
                }
                if !comment.contains(&format!("{min}..={max}")) {
                    wrong.push(format!(
                        "the example file: {var} lacks its range {min}..={max}"
                    ));
                }
            }
            Accepts::OneOf(names) => {
                for n in names {
                    for (doc, text) in [
                        ("README", row),
                        ("--help", &entry),
                        ("the example file", &comment),
                    ] {
                        if !text.contains(n.as_str()) {
                            wrong.push(format!("{doc}: {var} does not list its value {n}"));
                        }
                    }
                }
            }
            Accepts::Text => {}
        }
    }
    // The README names the extensions, exactly.
    let ours: Vec<String> = readme
        .split("Beyond SPEC.md §3 and §8, ours:")
        .nth(1)
        .map(|s| names_like_ours(s.split('.').next().unwrap_or_default()))
        .unwrap_or_default();
    let extensions: Vec<String> = meter_sync::ALL_VARS
        .iter()
        .filter(|v| !SPEC_VARS.contains(v))
        .map(|v| v.to_string())
        .collect();
    if ours != extensions {
        wrong.push(format!(
            "README names {ours:?} as beyond SPEC.md, the binary reads {extensions:?} beyond it"
        ));
    }
    // No document names a variable that is not read.
    let mut docs = vec![
        ("README.md".to_string(), readme.clone()),
        ("--help".to_string(), help.clone()),
        ("deploy/meter-sync.env.example".to_string(), example.clone()),
    ];
    for dir in [
        "docs",
        "deploy/ansible/roles/meter_sync/defaults",
        "systemd",
    ] {
        for e in std::fs::read_dir(support::host::repo(dir)).unwrap() {
            let p = e.unwrap().path();
            docs.push((
                p.display().to_string(),
                std::fs::read_to_string(&p).unwrap(),
            ));
        }
    }
    docs.push((
        "ARCHITECTURE.md".into(),
        std::fs::read_to_string(support::host::repo("ARCHITECTURE.md")).unwrap(),
    ));
    for (doc, text) in &docs {
        for name in names_like_ours(text) {
            if !meter_sync::ALL_VARS.contains(&name.as_str())
                && !NOT_CONFIG.contains(&name.as_str())
            {
                wrong.push(format!(
                    "{doc} names {name}, which the binary does not read"
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} mismatches:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// The unit's `ProcSubset=pid` hides /proc/sys, where the host name used to be read
/// from: on a gateway without /etc/machine-id the daemon exited 78 under the unit
/// while `check-config` in a shell said the configuration was valid. /etc/hostname
/// names the host there too. Needs root (a mount namespace with such a /proc).
#[test]
fn the_gateway_id_falls_back_to_the_host_name_under_the_units_proc_subset() {
    if !support::host::is_root()
        || std::process::Command::new("unshare")
            .arg("--version")
            .output()
            .is_err()
    {
        eprintln!("skipped: needs root and unshare");
        return;
    }
    let Some(hostname) = std::fs::read_to_string("/etc/hostname")
        .ok()
        .and_then(|s| s.lines().next().map(|l| l.trim().to_string()))
        .filter(|h| !h.is_empty())
    else {
        eprintln!("skipped: this machine has no /etc/hostname");
        return;
    };
    // What ProcSubset=pid mounts, and no machine id.
    let script = "mount -t proc -o subset=pid proc /proc && \
                  if [ -e /etc/machine-id ]; then mount --bind /dev/null /etc/machine-id; fi && \
                  exec \"$0\" check-config";
    let out = Command::new("unshare")
        .args(["--mount", "--pid", "--fork", "sh", "-c", script])
        .arg(bin())
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(BASE.iter().copied())
        .output()
        .unwrap();
    let r = support::Run::from(out);
    r.assert_ok();
    assert!(
        r.stdout
            .contains(&format!("\nMETER_SYNC_GATEWAY_ID={hostname}\n")),
        "{}",
        r.all()
    );
}
