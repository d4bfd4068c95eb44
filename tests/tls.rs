//! SPEC §3 (the SSL variables) and P17: libpq's sslmodes against real TLS-enabled
//! central servers whose certificates the tests make; refusals are one line naming
//! the cause and leave the readings local; malformed files exit 78.
//!
//! Runs against whichever TLS backend the binary was built with:
//! `cargo test --test tls` (OpenSSL) and
//! `cargo test --no-default-features --features rustls --test tls`.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use support::{
    bin, chown_to_server, issue, make_ca, shared, temp_dir, Cluster, Role, Run, Sandbox,
    CENTRAL_PASSWORD,
};

/// Certificates made by this test process that belong to no server.
fn pki() -> &'static Path {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| temp_dir("pki"))
}

/// A CA that signed nothing any server here presents.
fn unrelated_ca() -> &'static (PathBuf, PathBuf) {
    static CA: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    CA.get_or_init(|| make_ca(pki(), "unrelated", "some other CA"))
}

/// The key of a cluster's own test CA (Certs keeps only the certificate's path).
fn ca_of(c: &Cluster) -> (PathBuf, PathBuf) {
    let certs = c
        .certs
        .as_ref()
        .expect("a central cluster has certificates");
    (certs.ca.clone(), certs.dir.join("ca.key"))
}

/// Makes a running central cluster present `cert`/`key` from now on: the files
/// are given to the server user, named in postgresql.auto.conf, and the
/// configuration reloaded; returns once a new session sees the new file.
fn serve(c: &Cluster, cert: &Path, key: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o600)).unwrap();
    chown_to_server(cert);
    chown_to_server(key);
    let mut admin = c.admin();
    // One statement per call: ALTER SYSTEM refuses the implicit transaction of a batch.
    for sql in [
        format!("ALTER SYSTEM SET ssl_cert_file = '{}'", cert.display()),
        format!("ALTER SYSTEM SET ssl_key_file = '{}'", key.display()),
        "SELECT pg_reload_conf()".to_string(),
    ] {
        admin.batch_execute(&sql).unwrap();
    }
    let want = cert.display().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now: String = c
            .admin()
            .query_one("SHOW ssl_cert_file", &[])
            .unwrap()
            .get(0);
        if now == want {
            return;
        }
        assert!(Instant::now() < deadline, "server never took {want}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A private central cluster whose certificate `make` chooses (given the cluster,
/// whose own CA may sign it). Leaked: statics hold one per kind for the process.
fn central_with(hba: &str, make: impl FnOnce(&Cluster) -> (PathBuf, PathBuf)) -> &'static Cluster {
    let c: &'static Cluster = Box::leak(Box::new(Cluster::start_with(Role::Central, hba)));
    let (cert, key) = make(c);
    serve(c, &cert, &key);
    c
}

/// Valid, signed by the cluster's CA, but for central.example only.
fn wrong_host_central() -> &'static Cluster {
    static C: OnceLock<&'static Cluster> = OnceLock::new();
    C.get_or_init(|| {
        central_with("", |c| {
            let dir = &c.certs.as_ref().unwrap().dir;
            issue(
                dir,
                "elsewhere",
                &ca_of(c),
                "central.example",
                "DNS:central.example",
                30,
            )
        })
    })
}

/// Self-signed for localhost (no CA at all).
fn self_signed_central() -> &'static Cluster {
    static C: OnceLock<&'static Cluster> = OnceLock::new();
    C.get_or_init(|| {
        central_with("", |c| {
            // As an administrator makes one: OpenSSL 3 marks it CA:TRUE by default.
            let dir = &c.certs.as_ref().unwrap().dir;
            let st = Command::new("openssl")
                .current_dir(dir)
                .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes"])
                .args(["-keyout", "selfsigned.key", "-out", "selfsigned.crt"])
                .args(["-days", "30", "-subj", "/CN=localhost"])
                .args(["-addext", "subjectAltName=DNS:localhost"])
                .output()
                .unwrap();
            assert!(st.status.success(), "{st:?}");
            (dir.join("selfsigned.crt"), dir.join("selfsigned.key"))
        })
    })
}

/// Signed by the cluster's CA for localhost, but expired in 2021.
fn expired_central() -> &'static Cluster {
    static C: OnceLock<&'static Cluster> = OnceLock::new();
    C.get_or_init(|| {
        central_with("", |c| {
            let dir = &c.certs.as_ref().unwrap().dir;
            issue(
                dir,
                "expired",
                &ca_of(c),
                "localhost",
                "DNS:localhost,IP:127.0.0.1",
                -1,
            )
        })
    })
}

/// Signed by the cluster's CA for localhost, valid only from 2099: what every
/// certificate is to a gateway whose clock is behind (booted at 1970, at 2000, at
/// its image's build date, before NTP has set it).
fn not_yet_valid_central() -> &'static Cluster {
    static C: OnceLock<&'static Cluster> = OnceLock::new();
    C.get_or_init(|| {
        central_with("", |c| {
            let dir = &c.certs.as_ref().unwrap().dir;
            support::certs::issue_dated(
                dir,
                "future",
                &ca_of(c),
                "localhost",
                "DNS:localhost,IP:127.0.0.1",
                "20990101000000Z",
                "21000101000000Z",
            )
        })
    })
}

/// Password and a client certificate signed by its CA whose CN is the user.
fn client_cert_central() -> &'static Cluster {
    static C: OnceLock<&'static Cluster> = OnceLock::new();
    C.get_or_init(|| {
        let c: &'static Cluster = Box::leak(Box::new(Cluster::start_with(
            Role::Central,
            "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256 clientcert=verify-full\n",
        )));
        c
    })
}

/// A fresh database on `c`, so that tests sharing a cluster do not migrate into
/// each other.
fn fresh_db(c: &Cluster) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let name = format!(
        "tls{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    );
    c.create_db(&name);
    name
}

/// A migrated sandbox whose central connection points at `c` (a fresh database
/// there, trusting `c`'s own CA).
fn sandbox_against(c: &'static Cluster) -> Sandbox {
    let mut s = Sandbox::new();
    let (ca, _) = ca_of(c);
    s.set("POSTGRES_CLIENT_PORT", c.port)
        .set("POSTGRES_CLIENT_DB", fresh_db(c))
        .set("POSTGRES_CLIENT_SSLROOTCERT", ca.display());
    s
}

/// A failed run: exit 1, the expected words in its output, never the password.
fn assert_refused(r: &Run, words: &[&str]) {
    if std::env::var_os("TLS_TEST_SHOW").is_some() {
        eprintln!("=== {words:?}\n{}", r.all());
    }
    r.assert_code(1);
    let all = r.all();
    for w in words {
        assert!(all.contains(w), "expected {w:?} in:\n{all}");
    }
    assert!(
        !all.contains(CENTRAL_PASSWORD),
        "password in output:\n{all}"
    );
    assert!(
        !all.contains("PRIVATE KEY"),
        "key material in output:\n{all}"
    );
}

fn migrate_remote(s: &Sandbox) -> Run {
    s.run(&["migrate", "remote"])
}

#[test]
fn verify_full_with_the_right_ca_connects_and_uploads() {
    let mut s = Sandbox::new();
    s.set("POSTGRES_CLIENT_SSLMODE", "verify-full");
    migrate_remote(&s).assert_ok();
    // The shared central only has hostssl lines: the session was encrypted.
    s.insert_readings(25);
    // The exit code also reflects the download phases; the upload is what
    // crosses the TLS connection here.
    let r = s.run(&["once"]);
    assert!(r.all().contains("uploaded 25"), "{}", r.all());
    assert_eq!(s.central_count("meter_readings"), 25);
    assert_eq!(s.local_count("meter_readings"), 0);
}

#[test]
fn an_unrelated_ca_is_refused_and_the_readings_stay_local() {
    let mut s = Sandbox::new();
    s.set("POSTGRES_CLIENT_SSLROOTCERT", unrelated_ca().0.display());
    s.insert_readings(10);
    let r = s.run(&["once"]);
    assert_refused(
        &r,
        &["server certificate refused: not signed by a CA in POSTGRES_CLIENT_SSLROOTCERT"],
    );
    assert_eq!(s.local_count("meter_readings"), 10);
    assert_eq!(s.central_count("meter_readings"), 0);
    // Without a bundle the system's roots are the trust store; they do not know
    // the test CA either.
    s.unset("POSTGRES_CLIENT_SSLROOTCERT");
    let r = migrate_remote(&s);
    // rustls refuses at start when the machine has no CA certificates at all.
    if r.code != Some(78) {
        assert_refused(&r, &["not signed by a CA in the system's trusted roots"]);
    }
    // verify-ca checks the chain just as well.
    s.set("POSTGRES_CLIENT_SSLMODE", "verify-ca")
        .set("POSTGRES_CLIENT_SSLROOTCERT", unrelated_ca().0.display());
    assert_refused(&migrate_remote(&s), &["not signed by a CA"]);
    assert_eq!(s.local_count("meter_readings"), 10);
}

#[test]
fn a_certificate_for_another_host_is_refused_under_verify_full_and_accepted_under_verify_ca() {
    let mut s = sandbox_against(wrong_host_central());
    assert_refused(
        &migrate_remote(&s),
        &["server certificate refused: it is not issued for the host name localhost"],
    );
    s.set("POSTGRES_CLIENT_HOST", "127.0.0.1");
    assert_refused(
        &migrate_remote(&s),
        &["server certificate refused: it is not issued for the address 127.0.0.1"],
    );
    s.set("POSTGRES_CLIENT_SSLMODE", "verify-ca");
    migrate_remote(&s).assert_ok();
    s.set("POSTGRES_CLIENT_HOST", "localhost");
    migrate_remote(&s).assert_ok();
}

#[test]
fn an_ip_address_host_matches_the_ip_san_under_verify_full() {
    let mut s = Sandbox::new();
    s.set("POSTGRES_CLIENT_HOST", "127.0.0.1")
        .set("POSTGRES_CLIENT_SSLMODE", "verify-full");
    migrate_remote(&s).assert_ok();
}

#[test]
fn require_accepts_a_self_signed_certificate_only_without_a_root_file() {
    let c = self_signed_central();
    let mut s = sandbox_against(c);
    s.set("POSTGRES_CLIENT_SSLMODE", "require");
    // As in libpq, a root file makes require check the chain like verify-ca.
    if cfg!(feature = "rustls") {
        assert_refused(&migrate_remote(&s), &["it is a CA certificate"]);
    } else {
        assert_refused(
            &migrate_remote(&s),
            &[
                "not signed by a CA in POSTGRES_CLIENT_SSLROOTCERT",
                "sslmode=prefer and require verify the chain, as libpq does",
            ],
        );
    }
    // Without one, require is encryption only.
    s.unset("POSTGRES_CLIENT_SSLROOTCERT");
    migrate_remote(&s).assert_ok();
    s.set("POSTGRES_CLIENT_SSLMODE", "verify-ca")
        .set("POSTGRES_CLIENT_SSLROOTCERT", ca_of(c).0.display());
    let self_signed = c.certs.as_ref().unwrap().dir.join("selfsigned.crt");
    if cfg!(feature = "rustls") {
        // webpki never takes a CA certificate (what `openssl req -x509` makes) as a
        // server's, even when it is the trusted root itself.
        assert_refused(&migrate_remote(&s), &["it is a CA certificate"]);
        s.set("POSTGRES_CLIENT_SSLROOTCERT", self_signed.display());
        assert_refused(&migrate_remote(&s), &["it is a CA certificate"]);
    } else {
        assert_refused(
            &migrate_remote(&s),
            &["not signed by a CA in POSTGRES_CLIENT_SSLROOTCERT"],
        );
        // As with libpq, trusting the self-signed certificate itself works, for
        // require as for verify-ca.
        s.set("POSTGRES_CLIENT_SSLROOTCERT", self_signed.display());
        migrate_remote(&s).assert_ok();
        s.set("POSTGRES_CLIENT_SSLMODE", "require");
        migrate_remote(&s).assert_ok();
    }
}

#[test]
fn disable_against_a_hostssl_only_server_fails_clearly_and_prefer_encrypts() {
    let mut s = Sandbox::new();
    s.set("POSTGRES_CLIENT_SSLMODE", "disable");
    let r = migrate_remote(&s);
    assert_refused(&r, &["pg_hba.conf", "no encryption", "28000"]);
    // A refusal by the server is not worth retrying within the cycle.
    assert!(!r.all().contains("retrying"), "{}", r.all());
    s.set("POSTGRES_CLIENT_SSLMODE", "prefer");
    migrate_remote(&s).assert_ok();
}

#[test]
fn a_server_without_tls_is_refused_while_tls_is_required() {
    // The shared local cluster has ssl = off.
    let local = &shared().0;
    let mut s = Sandbox::new();
    s.set("POSTGRES_CLIENT_PORT", local.port)
        .set("POSTGRES_CLIENT_DB", fresh_db(local));
    for mode in ["require", "verify-ca", "verify-full"] {
        s.set("POSTGRES_CLIENT_SSLMODE", mode);
        assert_refused(&migrate_remote(&s), &["server does not support TLS"]);
    }
    s.set("POSTGRES_CLIENT_SSLMODE", "prefer");
    migrate_remote(&s).assert_ok();
}

#[test]
fn clientcert_verify_full_refuses_a_gateway_without_a_certificate_and_accepts_one_with() {
    let c = client_cert_central();
    let mut s = sandbox_against(c);
    assert_refused(&migrate_remote(&s), &["certificate"]);

    let dir = temp_dir("gateway");
    let (cert, key) = issue(&dir, "gateway", &ca_of(c), "postgres", "", 30);
    s.set("POSTGRES_CLIENT_SSLCERT", cert.display())
        .set("POSTGRES_CLIENT_SSLKEY", key.display());
    migrate_remote(&s).assert_ok();

    // The traditional "BEGIN RSA PRIVATE KEY" form works as well.
    let rsa = dir.join("gateway.rsa.key");
    let st = Command::new("openssl")
        .args(["rsa", "-traditional", "-in"])
        .arg(&key)
        .arg("-out")
        .arg(&rsa)
        .output()
        .unwrap();
    assert!(st.status.success());
    assert!(std::fs::read_to_string(&rsa)
        .unwrap()
        .contains("BEGIN RSA PRIVATE KEY"));
    s.set("POSTGRES_CLIENT_SSLKEY", rsa.display());
    migrate_remote(&s).assert_ok();

    // A certificate from a CA the server does not trust is no better than none.
    // Its alert says "unknown CA" when read; when our first write meets the closed
    // connection before that (a race on a loaded machine), the message still names
    // the certificate's variable.
    let (cert, key) = issue(&dir, "stranger", unrelated_ca(), "postgres", "", 30);
    s.set("POSTGRES_CLIENT_SSLCERT", cert.display())
        .set("POSTGRES_CLIENT_SSLKEY", key.display());
    let r = migrate_remote(&s);
    assert_refused(
        &r,
        &["refused the gateway's client certificate in POSTGRES_CLIENT_SSLCERT"],
    );
    let all = r.all();
    assert!(
        all.contains("(TLS alert: unknown CA)")
            || all.contains("the server closed the connection right after the TLS handshake"),
        "{all}"
    );
}

#[test]
fn an_expired_certificate_is_refused() {
    let mut s = sandbox_against(expired_central());
    for mode in ["verify-full", "verify-ca"] {
        s.set("POSTGRES_CLIENT_SSLMODE", mode);
        assert_refused(
            &migrate_remote(&s),
            &["server certificate refused: it has expired"],
        );
    }
}

/// A gateway whose clock is behind (no battery-backed clock, NTP not through
/// yet) finds central's certificate not valid yet. The message must say so and
/// point at the clock, with the time the gateway believes: with the vendored
/// OpenSSL 3.6 ("certificate is not yet valid or the system clock is incorrect")
/// it was an unnamed "TLS handshake with localhost failed: error:0A000086…".
#[test]
fn a_certificate_not_valid_yet_is_refused_naming_the_gateways_clock() {
    let mut s = sandbox_against(not_yet_valid_central());
    for mode in ["verify-full", "verify-ca"] {
        s.set("POSTGRES_CLIENT_SSLMODE", mode);
        assert_refused(
            &migrate_remote(&s),
            &[
                "server certificate refused: it is not valid yet by this gateway's clock (",
                "is the clock right?",
            ],
        );
    }
}

#[test]
fn malformed_or_mismatched_tls_files_exit_78_naming_the_variable_from_every_command() {
    let dir = temp_dir("badfiles");
    let ca = make_ca(&dir, "ca", "files CA");
    let (cert, key) = issue(&dir, "gw", &ca, "postgres", "", 30);
    let (_, other_key) = issue(&dir, "gw2", &ca, "postgres", "", 30);
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "this is not PEM\n").unwrap();
    let encrypted = dir.join("encrypted.key");
    let st = Command::new("openssl")
        .args(["pkey", "-aes256", "-passout", "pass:secret", "-in"])
        .arg(&key)
        .arg("-out")
        .arg(&encrypted)
        .output()
        .unwrap();
    assert!(st.status.success());
    let key_text = std::fs::read_to_string(&key).unwrap();
    let p = |p: &Path| p.display().to_string();

    /// (the variable named, the environment, words of the message)
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "POSTGRES_CLIENT_SSLROOTCERT",
            vec![("POSTGRES_CLIENT_SSLROOTCERT", p(&garbage))],
            "certificate",
        ),
        (
            "POSTGRES_CLIENT_SSLROOTCERT",
            // A key where the CA bundle belongs: its content must not be echoed.
            vec![("POSTGRES_CLIENT_SSLROOTCERT", p(&key))],
            "certificate",
        ),
        (
            "POSTGRES_CLIENT_SSLCERT",
            vec![
                ("POSTGRES_CLIENT_SSLCERT", p(&garbage)),
                ("POSTGRES_CLIENT_SSLKEY", p(&key)),
            ],
            "not a PEM certificate",
        ),
        (
            "POSTGRES_CLIENT_SSLKEY",
            vec![
                ("POSTGRES_CLIENT_SSLCERT", p(&cert)),
                ("POSTGRES_CLIENT_SSLKEY", p(&garbage)),
            ],
            "PKCS#8",
        ),
        (
            "POSTGRES_CLIENT_SSLKEY",
            vec![
                ("POSTGRES_CLIENT_SSLCERT", p(&cert)),
                ("POSTGRES_CLIENT_SSLKEY", p(&encrypted)),
            ],
            "encrypted",
        ),
        (
            "POSTGRES_CLIENT_SSLKEY",
            vec![
                ("POSTGRES_CLIENT_SSLCERT", p(&cert)),
                ("POSTGRES_CLIENT_SSLKEY", p(&other_key)),
            ],
            "is not the private key of the certificate in POSTGRES_CLIENT_SSLCERT",
        ),
    ];
    for (var, vars, words) in &cases {
        for cmd in [
            &["once"][..],
            &["run"],
            &["migrate"],
            &["status"],
            &["check-config"],
        ] {
            // Nothing listens there: the file must be refused before any connection.
            let out = Command::new(bin())
                .args(cmd)
                .env_clear()
                .env("POSTGRES_SYNC_HOST", "127.0.0.1")
                .env("POSTGRES_SYNC_PORT", "1")
                .env("POSTGRES_CLIENT_HOST", "127.0.0.1")
                .env("POSTGRES_CLIENT_PORT", "1")
                .env("POSTGRES_CLIENT_PASSWORD", CENTRAL_PASSWORD)
                .env("LOG_TARGET", "stderr")
                .envs(vars.iter().map(|(k, v)| (*k, v.as_str())))
                .current_dir(&dir)
                .output()
                .unwrap();
            let r = Run::from(out);
            r.assert_code(78);
            let all = r.all();
            let lines: Vec<&str> = all.lines().collect();
            assert_eq!(lines.len(), 1, "{cmd:?} {var}: not one line:\n{all}");
            assert!(
                all.contains(var) && all.contains(words),
                "{cmd:?}: expected {var} and {words:?} in:\n{all}"
            );
            assert!(!all.contains(CENTRAL_PASSWORD), "{all}");
            for secret_line in key_text.lines().filter(|l| !l.starts_with("-----")) {
                assert!(!all.contains(secret_line), "key material in:\n{all}");
            }
        }
    }
}

/// Signed for localhost by a CA the gateway is not given.
fn unknown_ca_central() -> &'static Cluster {
    static C: OnceLock<&'static Cluster> = OnceLock::new();
    C.get_or_init(|| {
        central_with("", |c| {
            let dir = &c.certs.as_ref().unwrap().dir;
            issue(
                dir,
                "stranger",
                unrelated_ca(),
                "localhost",
                "DNS:localhost,IP:127.0.0.1",
                30,
            )
        })
    })
}

/// As [`unknown_ca_central`], and it also takes password logins without TLS.
fn unknown_ca_plaintext_too_central() -> &'static Cluster {
    static C: OnceLock<&'static Cluster> = OnceLock::new();
    C.get_or_init(|| {
        central_with(
            "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\nhost all all 127.0.0.1/32 scram-sha-256\n",
            |c| {
                let dir = &c.certs.as_ref().unwrap().dir;
                issue(
                    dir,
                    "stranger",
                    unrelated_ca(),
                    "localhost",
                    "DNS:localhost,IP:127.0.0.1",
                    30,
                )
            },
        )
    })
}

/// Whether `psql` (libpq) connects to localhost:`port` with `sslmode` and, if
/// given, `sslrootcert`; with its error text. HOME is an empty directory, so
/// libpq finds no ~/.postgresql/root.crt (nor a client certificate) of its own.
fn psql_connects(port: u16, sslmode: &str, root: Option<&Path>, home: &Path) -> (bool, String) {
    let mut c = Command::new("psql");
    c.args(["-X", "-w", "-A", "-t", "-c", "SELECT 1"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("PGHOST", "localhost")
        .env("PGPORT", port.to_string())
        .env("PGUSER", "postgres")
        .env("PGDATABASE", "postgres")
        .env("PGPASSWORD", CENTRAL_PASSWORD)
        .env("PGCONNECT_TIMEOUT", "10")
        .env("PGSSLMODE", sslmode);
    if let Some(r) = root {
        c.env("PGSSLROOTCERT", r);
    }
    let out = c
        .output()
        .expect("psql (postgresql-client; .ci/setup installs it)");
    let ok = out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "1";
    (ok, String::from_utf8_lossy(&out.stderr).trim().to_string())
}

/// Whether meter-sync connects to central with the same settings: `status
/// --json` makes one connection attempt and one round trip.
fn meter_sync_connects(
    s: &mut Sandbox,
    port: u16,
    sslmode: &str,
    root: Option<&Path>,
) -> (bool, String) {
    s.set("POSTGRES_CLIENT_HOST", "localhost")
        .set("POSTGRES_CLIENT_PORT", port)
        .set("POSTGRES_CLIENT_DB", "postgres")
        .set("POSTGRES_CLIENT_SSLMODE", sslmode);
    match root {
        Some(r) => s.set("POSTGRES_CLIENT_SSLROOTCERT", r.display()),
        None => s.unset("POSTGRES_CLIENT_SSLROOTCERT"),
    };
    let r = s.run(&["status", "--json"]);
    if r.code == Some(78) {
        // rustls without any system CA certificate refuses verify-* at start.
        return (false, r.all());
    }
    r.assert_ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("status --json");
    let central = &v["central"];
    (
        central["reachable"] == serde_json::Value::Bool(true),
        central["error"].as_str().unwrap_or("").to_string(),
    )
}

/// Issue 13 item 5: for five server set-ups (and a sixth for prefer's fallback)
/// and the five sslmodes, with and without a root file, meter-sync connects
/// exactly when libpq (psql) does.
#[test]
fn every_sslmode_against_every_server_connects_exactly_when_libpq_does() {
    type Setup = (&'static str, fn() -> &'static Cluster);
    let setups: [Setup; 6] = [
        ("no TLS", || &shared().0),
        ("trusted CA", || &shared().1),
        ("unknown CA", unknown_ca_central),
        ("other host name", wrong_host_central),
        ("expired", expired_central),
        // prefer's second chance: libpq retries without TLS when the handshake fails.
        (
            "unknown CA, plaintext too",
            unknown_ca_plaintext_too_central,
        ),
    ];
    // The root file is always the test CA of the set-up's own cluster: it signed
    // the served certificate except for the two unknown-CA servers. For "no TLS"
    // any file will do.
    let root_of = |c: &Cluster| -> PathBuf {
        match &c.certs {
            Some(_) => ca_of(c).0,
            None => shared().1.certs.as_ref().unwrap().ca.clone(),
        }
    };
    let home = temp_dir("libpq-home");
    // One thread per set-up: the cells wait on handshakes and process starts.
    /// (cell label, libpq connects, its error, meter-sync connects, its error)
    type Cell = (String, bool, String, bool, String);
    let rows: Vec<Vec<Cell>> = std::thread::scope(|scope| {
        let handles: Vec<_> = setups
            .iter()
            .map(|(name, cluster)| {
                let home = &home;
                scope.spawn(move || {
                    let c = cluster();
                    let mut s = Sandbox::new();
                    let mut cells = Vec::new();
                    for root in [Some(root_of(c)), None] {
                        for mode in ["disable", "prefer", "require", "verify-ca", "verify-full"] {
                            let (lib, lib_err) = psql_connects(c.port, mode, root.as_deref(), home);
                            let (ours, our_err) =
                                meter_sync_connects(&mut s, c.port, mode, root.as_deref());
                            let label = format!(
                                "{:16} {name:26} {mode:12}",
                                if root.is_some() {
                                    "sslrootcert set"
                                } else {
                                    "no sslrootcert"
                                }
                            );
                            cells.push((label, lib, lib_err, ours, our_err));
                        }
                    }
                    cells
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut table = String::new();
    let mut disagree = Vec::new();
    let mut libpq_connects = 0;
    let word = |b: bool| if b { "connects" } else { "refuses " };
    for (label, lib, lib_err, ours, our_err) in rows.iter().flatten() {
        libpq_connects += usize::from(*lib);
        table.push_str(&format!(
            "{label} libpq={} meter-sync={}\n",
            word(*lib),
            word(*ours)
        ));
        if lib != ours {
            disagree.push(format!(
                "{label}: libpq {} ({lib_err}), meter-sync {} ({our_err})",
                word(*lib),
                word(*ours)
            ));
        }
    }
    eprintln!("{table}");
    assert_eq!(rows.iter().flatten().count(), 60);
    assert!(disagree.is_empty(), "{}\n{table}", disagree.join("\n"));
    // Not a vacuous agreement: libpq itself both connects and refuses.
    assert!(libpq_connects > 5 && libpq_connects < 55, "{table}");
}

/// SCRAM over TLS with `POSTGRES_CLIENT_CHANNEL_BINDING=require` logs in only
/// with SCRAM-SHA-256-PLUS (tokio-postgres refuses anything else), and the server
/// checks the binding: so this succeeding proves the backend hands over the right
/// `tls-server-end-point` hash of the server's certificate.
#[test]
fn channel_binding_require_logs_in_with_scram_plus() {
    let mut s = Sandbox::new();
    s.set("POSTGRES_CLIENT_CHANNEL_BINDING", "require");
    migrate_remote(&s).assert_ok();
    s.insert_readings(5);
    let r = s.run(&["once"]);
    assert!(r.all().contains("uploaded 5"), "{}", r.all());
    // Under require with a root file, as under verify-full.
    s.set("POSTGRES_CLIENT_SSLMODE", "require");
    migrate_remote(&s).assert_ok();
}

/// A central that asks for the password in clear, as a man in the middle with a
/// certificate of its own would: only channel_binding=require refuses to answer.
fn cleartext_password_central() -> &'static Cluster {
    static C: OnceLock<&'static Cluster> = OnceLock::new();
    C.get_or_init(|| {
        Box::leak(Box::new(Cluster::start_with(
            Role::Central,
            "local all all trust\nhostssl all all 127.0.0.1/32 password\n",
        )))
    })
}

#[test]
fn channel_binding_require_never_answers_a_request_for_the_password_in_clear() {
    let mut s = sandbox_against(cleartext_password_central());
    s.set("POSTGRES_CLIENT_SSLMODE", "require")
        .unset("POSTGRES_CLIENT_SSLROOTCERT");
    // libpq's default: the password goes out (inside TLS, to whoever holds the key).
    migrate_remote(&s).assert_ok();
    s.set("POSTGRES_CLIENT_CHANNEL_BINDING", "require");
    assert_refused(&migrate_remote(&s), &["channel binding"]);
}

/// A man in the middle that terminates the gateway's TLS with a certificate of
/// its own and opens its own TLS session to the real server, relaying everything
/// and remembering what the gateway sent. Built with the openssl crate, so only in
/// the OpenSSL build (the rustls build's binding is proven by
/// `channel_binding_require_logs_in_with_scram_plus`).
#[cfg(feature = "native-tls")]
mod mitm {
    use std::io::{ErrorKind, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::path::Path;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use openssl::ssl::{
        SslAcceptor, SslConnector, SslFiletype, SslMethod, SslStream, SslVerifyMode,
    };

    /// PostgreSQL's SSLRequest: length 8, code 80877103.
    const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 4, 210, 22, 47];

    pub struct Mitm {
        pub port: u16,
        /// Everything the gateways sent through it, decrypted.
        pub from_gateway: Arc<Mutex<Vec<u8>>>,
    }

    pub fn start(upstream: u16, cert: &Path, key: &Path) -> Mitm {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut acceptor = SslAcceptor::mozilla_intermediate(SslMethod::tls()).unwrap();
        acceptor.set_certificate_chain_file(cert).unwrap();
        acceptor
            .set_private_key_file(key, SslFiletype::PEM)
            .unwrap();
        let acceptor = Arc::new(acceptor.build());
        let from_gateway = Arc::new(Mutex::new(Vec::new()));
        let log = from_gateway.clone();
        std::thread::spawn(move || {
            for gateway in listener.incoming().flatten() {
                let (acceptor, log) = (acceptor.clone(), log.clone());
                std::thread::spawn(move || {
                    let _ = relay(gateway, upstream, &acceptor, &log);
                });
            }
        });
        Mitm { port, from_gateway }
    }

    fn relay(
        mut gateway: TcpStream,
        upstream: u16,
        acceptor: &SslAcceptor,
        log: &Mutex<Vec<u8>>,
    ) -> std::io::Result<()> {
        let mut req = [0u8; 8];
        gateway.read_exact(&mut req)?;
        if req != SSL_REQUEST {
            return Ok(());
        }
        gateway.write_all(b"S")?;
        let mut down = acceptor.accept(gateway).map_err(std::io::Error::other)?;
        let mut server = TcpStream::connect(("127.0.0.1", upstream))?;
        server.write_all(&SSL_REQUEST)?;
        let mut answer = [0u8; 1];
        server.read_exact(&mut answer)?;
        let mut connector = SslConnector::builder(SslMethod::tls()).unwrap();
        connector.set_verify(SslVerifyMode::NONE);
        let mut up = connector
            .build()
            .configure()
            .unwrap()
            .verify_hostname(false)
            .connect("localhost", server)
            .map_err(std::io::Error::other)?;
        down.get_ref().set_nonblocking(true)?;
        up.get_ref().set_nonblocking(true)?;
        let mut buf = [0u8; 16 * 1024];
        loop {
            let a = pump(&mut down, &mut up, &mut buf, Some(log))?;
            let b = pump(&mut up, &mut down, &mut buf, None)?;
            if !a && !b {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Moves what `from` has to `to`; false when there was nothing.
    fn pump(
        from: &mut SslStream<TcpStream>,
        to: &mut SslStream<TcpStream>,
        buf: &mut [u8],
        log: Option<&Mutex<Vec<u8>>>,
    ) -> std::io::Result<bool> {
        let n = match from.read(buf) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        };
        if let Some(log) = log {
            log.lock().unwrap().extend_from_slice(&buf[..n]);
        }
        let mut sent = 0;
        while sent < n {
            match to.write(&buf[sent..n]) {
                Ok(k) => sent += k,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

/// Issue 13 item 5's attacker: an active man in the middle whose certificate the
/// gateway accepts (sslmode=require without a root file). Without channel binding
/// it relays the SCRAM login and holds an authenticated session as the gateway;
/// with it (prefer, libpq's default, when the server offers SCRAM-SHA-256-PLUS)
/// the server sees that the gateway bound its login to another certificate and
/// refuses. Against a server (or a middle) asking for the password in clear, only
/// `require` keeps the password from the middle.
#[cfg(feature = "native-tls")]
#[test]
fn a_man_in_the_middle_is_stopped_by_channel_binding() {
    let (cert, key) = issue(
        pki(),
        "mitm",
        unrelated_ca(),
        "localhost",
        "DNS:localhost,IP:127.0.0.1",
        30,
    );
    let mut s = Sandbox::new();
    let central_port = s.central_cluster().port;
    let m = mitm::start(central_port, &cert, &key);
    s.set("POSTGRES_CLIENT_PORT", m.port)
        .set("POSTGRES_CLIENT_SSLMODE", "require")
        .unset("POSTGRES_CLIENT_SSLROOTCERT");
    // Without binding the relayed login works: the middle is real.
    s.set("POSTGRES_CLIENT_CHANNEL_BINDING", "disable");
    migrate_remote(&s).assert_ok();
    // With it, the server refuses the login bound to the middle's certificate.
    for cb in ["prefer", "require"] {
        s.set("POSTGRES_CLIENT_CHANNEL_BINDING", cb);
        assert_refused(&migrate_remote(&s), &["channel binding"]);
    }
    // With a root file, require refuses the middle's certificate outright.
    s.set(
        "POSTGRES_CLIENT_SSLROOTCERT",
        s.central_cluster().certs.as_ref().unwrap().ca.display(),
    );
    assert_refused(&migrate_remote(&s), &["not signed by a CA"]);
    assert!(!String::from_utf8_lossy(&m.from_gateway.lock().unwrap()).contains(CENTRAL_PASSWORD));

    // A middle in front of a server that asks for the password in clear reads it
    // under prefer, and never sees it under require.
    let phisher = mitm::start(cleartext_password_central().port, &cert, &key);
    let mut s = sandbox_against(cleartext_password_central());
    s.set("POSTGRES_CLIENT_PORT", phisher.port)
        .set("POSTGRES_CLIENT_SSLMODE", "require")
        .unset("POSTGRES_CLIENT_SSLROOTCERT")
        .set("POSTGRES_CLIENT_CHANNEL_BINDING", "require");
    assert_refused(&migrate_remote(&s), &["channel binding"]);
    let seen = || String::from_utf8_lossy(&phisher.from_gateway.lock().unwrap()).into_owned();
    assert!(!seen().contains(CENTRAL_PASSWORD));
    s.set("POSTGRES_CLIENT_CHANNEL_BINDING", "prefer");
    migrate_remote(&s).assert_ok();
    assert!(
        seen().contains(CENTRAL_PASSWORD),
        "the middle read no password"
    );
}
