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
