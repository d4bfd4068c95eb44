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
