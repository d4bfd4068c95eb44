//! Test support: real PostgreSQL 15 clusters in temporary directories, a test CA,
//! the real `meter-sync` binary, and helpers named like the spec.
//!
//! initdb runs once per test process into a template; every cluster is a copy of
//! it. Most tests share one local and one central cluster and get their own
//! databases ([`Sandbox::new`]); tests that stop, restart or reconfigure a server
//! start their own ([`Cluster::start`]).
//!
//! Cleanup: each cluster has a reaper process that stops it and deletes its
//! directory as soon as the test process is gone, however it ended (panic,
//! `process::exit` after the harness, or SIGKILL). Dropping a [`Cluster`] does the
//! same at once.

#![allow(dead_code)]

pub mod proxy;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use postgres::Client;

/// The password of the `postgres` role on every central cluster: tests check that
/// it never shows up in output.
pub const CENTRAL_PASSWORD: &str = "c3ntral-Pa55word";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_meter-sync")
}

fn pg_bin_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Ok(d) = std::env::var("PG_BIN_DIR") {
            return PathBuf::from(d);
        }
        for v in ["15", "16", "17", "14", "13"] {
            let d = PathBuf::from(format!("/usr/lib/postgresql/{v}/bin"));
            if d.join("initdb").exists() {
                return d;
            }
        }
        panic!("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin (set PG_BIN_DIR); .ci/run installs them");
    })
    .clone()
}

fn is_root() -> bool {
    // SAFETY-free: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// PostgreSQL refuses to run as root; when the tests do, the servers run as this user.
fn server_user() -> Option<&'static str> {
    if !is_root() {
        return None;
    }
    let exists = |u: &str| {
        Command::new("id")
            .arg("-u")
            .arg(u)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    Some(if exists("postgres") {
        "postgres"
    } else {
        "nobody"
    })
}

/// Runs a server binary (initdb, pg_ctl) as the server user.
fn pg_cmd(tool: &str) -> Command {
    let path = pg_bin_dir().join(tool);
    match server_user() {
        Some(u) => {
            let mut c = Command::new("runuser");
            c.arg("-u").arg(u).arg("--").arg(path);
            c
        }
        None => Command::new(path),
    }
}

pub fn chown_to_server(path: &Path) {
    if let Some(u) = server_user() {
        let st = Command::new("chown")
            .arg("-R")
            .arg(u)
            .arg(path)
            .status()
            .unwrap();
        assert!(st.success(), "chown {}", path.display());
    }
}

fn run_ok(mut c: Command, what: &str) -> Output {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A directory under /tmp that the server user can enter.
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "meter-sync-test-{}-{}-{tag}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The initdb'd template every cluster is copied from.
fn template() -> &'static Path {
    static T: OnceLock<PathBuf> = OnceLock::new();
    T.get_or_init(|| {
        let root = temp_dir("template");
        chown_to_server(&root);
        let data = root.join("data");
        let mut c = pg_cmd("initdb");
        c.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        run_ok(c, "initdb");
        reaper(&root, None);
        data
    })
}

/// Starts a background process that, once this test process is gone, stops the
/// server in `dir/data` (if any) and removes `dir`.
fn reaper(dir: &Path, data: Option<&Path>) {
    let stop = match data {
        Some(d) => format!(
            "{} -D '{}' stop -m immediate -w >/dev/null 2>&1;",
            pg_cmd_string("pg_ctl"),
            d.display()
        ),
        None => String::new(),
    };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stop} rm -rf '{dir}'",
        pid = std::process::id(),
        dir = dir.display()
    );
    // The reaper outlives us by design; nobody waits for it.
    #[allow(clippy::zombie_processes)]
    Command::new("setsid")
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn reaper");
}

fn pg_cmd_string(tool: &str) -> String {
    let path = pg_bin_dir().join(tool);
    match server_user() {
        Some(u) => format!("runuser -u {u} -- {}", path.display()),
        None => path.display().to_string(),
    }
}

/// The test CA and the certificates it signs, made with the openssl CLI.
pub struct Certs {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl Certs {
    pub fn generate(dir: &Path) -> Certs {
        std::fs::create_dir_all(dir).unwrap();
        let ca = make_ca(dir, "ca", "meter-sync test CA");
        let (server_cert, server_key) = issue(
            dir,
            "server",
            &ca,
            "localhost",
            "DNS:localhost,IP:127.0.0.1",
            825,
        );
        Certs {
            dir: dir.to_path_buf(),
            ca: ca.0,
            server_cert,
            server_key,
        }
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let mut c = Command::new("openssl");
    c.current_dir(dir).args(args);
    run_ok(c, &format!("openssl {}", args.join(" ")));
}

/// A self-signed CA: returns (cert path, key path).
pub fn make_ca(dir: &Path, name: &str, cn: &str) -> (PathBuf, PathBuf) {
    let (crt, key) = (format!("{name}.crt"), format!("{name}.key"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &crt,
            "-days",
            "3650",
            "-subj",
            &format!("/CN={cn}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    (dir.join(crt), dir.join(key))
}

/// A leaf certificate for `cn` with subjectAltName `san`, signed by `ca`, valid for
/// `days` (negative: already expired). Returns (cert path, PKCS#8 key path).
pub fn issue(
    dir: &Path,
    name: &str,
    ca: &(PathBuf, PathBuf),
    cn: &str,
    san: &str,
    days: i64,
) -> (PathBuf, PathBuf) {
    let (crt, key, csr, ext) = (
        format!("{name}.crt"),
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.ext"),
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={cn}"),
        ],
    );
    let mut ext_text = String::from("basicConstraints=CA:FALSE\n");
    if !san.is_empty() {
        ext_text.push_str(&format!("subjectAltName={san}\n"));
    }
    std::fs::write(dir.join(&ext), ext_text).unwrap();
    let ca_crt = ca.0.to_str().unwrap().to_string();
    let ca_key = ca.1.to_str().unwrap().to_string();
    if days >= 0 {
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_crt,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                &days.to_string(),
                "-extfile",
                &ext,
            ],
        );
    } else {
        // An expired certificate: openssl x509 cannot back-date, `openssl ca` can.
        let db = dir.join(format!("{name}-ca"));
        std::fs::create_dir_all(&db).unwrap();
        std::fs::write(db.join("index.txt"), "").unwrap();
        std::fs::write(db.join("serial"), "1000\n").unwrap();
        let conf = format!(
            "[ca]\ndefault_ca=t\n[t]\ndatabase={d}/index.txt\nserial={d}/serial\nnew_certs_dir={d}\n\
             default_md=sha256\npolicy=p\ncopy_extensions=copy\n[p]\ncommonName=supplied\n",
            d = db.display()
        );
        std::fs::write(db.join("ca.conf"), conf).unwrap();
        let conf_path = db.join("ca.conf");
        openssl(
            dir,
            &[
                "ca",
                "-batch",
                "-config",
                conf_path.to_str().unwrap(),
                "-cert",
                &ca_crt,
                "-keyfile",
                &ca_key,
                "-in",
                &csr,
                "-out",
                &crt,
                "-startdate",
                "20200101000000Z",
                "-enddate",
                "20210101000000Z",
                "-extfile",
                &ext,
                "-notext",
            ],
        );
    }
    (dir.join(crt), dir.join(key))
}

/// What kind of server to start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The gateway's database: trust on TCP and its Unix socket.
    Local,
    /// The central database: TLS with the test CA, password (scram) over TCP.
    Central,
}

/// One running PostgreSQL server.
pub struct Cluster {
    pub role: Role,
    pub root: PathBuf,
    pub data: PathBuf,
    /// The Unix socket directory (trust for tests on both roles).
    pub socket_dir: PathBuf,
    pub port: u16,
    pub certs: Option<Certs>,
}

impl Cluster {
    /// Copies the template, configures it for `role` and starts it.
    pub fn start(role: Role) -> Cluster {
        Cluster::start_with(role, "")
    }

    /// As [`Cluster::start`], with extra lines for postgresql.conf and, for
    /// central, an alternative pg_hba.conf (`hba` non-empty replaces the default).
    pub fn start_with(role: Role, hba: &str) -> Cluster {
        let root = temp_dir(match role {
            Role::Local => "local",
            Role::Central => "central",
        });
        let data = root.join("data");
        run_ok(
            {
                let mut c = Command::new("cp");
                c.arg("-a").arg(template()).arg(&data);
                c
            },
            "copy template",
        );
        let socket_dir = root.join("sock");
        std::fs::create_dir_all(&socket_dir).unwrap();
        let certs = (role == Role::Central).then(|| Certs::generate(&root.join("certs")));
        let mut conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nfsync = off\n\
             synchronous_commit = off\nfull_page_writes = off\nmax_connections = 300\nshared_buffers = 32MB\n\
             logging_collector = off\nlog_min_messages = warning\n",
            socket_dir.display()
        );
        let default_hba = match &certs {
            Some(c) => {
                conf.push_str(&format!(
                    "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\nssl_ca_file = '{}'\npassword_encryption = 'scram-sha-256'\n",
                    c.server_cert.display(),
                    c.server_key.display(),
                    c.ca.display()
                ));
                "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n"
            }
            None => "local all all trust\nhost all all 127.0.0.1/32 trust\n",
        };
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        use std::io::Write;
        f.write_all(conf.as_bytes()).unwrap();
        std::fs::write(
            data.join("pg_hba.conf"),
            if hba.is_empty() { default_hba } else { hba },
        )
        .unwrap();
        chown_to_server(&root);
        if let Some(c) = &certs {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&c.server_key, std::fs::Permissions::from_mode(0o600))
                .unwrap();
        }
        reaper(&root, Some(&data));
        let mut cl = Cluster {
            role,
            root,
            data,
            socket_dir,
            port: 0,
            certs,
        };
        cl.port = free_port();
        cl.pg_ctl_start();
        if role == Role::Central {
            let mut c = cl.admin();
            c.batch_execute(&format!(
                "ALTER ROLE postgres PASSWORD '{CENTRAL_PASSWORD}'"
            ))
            .unwrap();
        }
        cl
    }

    /// `pg_ctl start` on this cluster's port.
    fn start_cmd(&self) -> Command {
        let mut c = pg_cmd("pg_ctl");
        c.arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.root.join("server.log"))
            .arg("-o")
            .arg(format!("-p {}", self.port))
            .args(["-w", "-t", "60", "start"]);
        c
    }

    fn pg_ctl_start(&mut self) {
        for attempt in 0..5 {
            let out = self.start_cmd().output().unwrap();
            if out.status.success() {
                return;
            }
            // Most likely the port was taken between free_port() and now.
            if attempt == 4 {
                let log = std::fs::read_to_string(self.root.join("server.log")).unwrap_or_default();
                panic!(
                    "pg_ctl start failed: {}\n{log}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            self.port = free_port();
        }
    }

    /// Stops the server (fast shutdown: sessions are ended, nothing is lost).
    pub fn stop(&self) {
        let mut c = pg_cmd("pg_ctl");
        c.arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w", "stop"]);
        run_ok(c, "pg_ctl stop");
    }

    /// Starts it again on the same port.
    pub fn restart(&self) {
        run_ok(self.start_cmd(), "pg_ctl start (restart)");
    }

    /// A superuser connection to database `db` over the Unix socket.
    pub fn connect(&self, db: &str) -> Client {
        let mut cfg = postgres::Config::new();
        cfg.host_path(&self.socket_dir)
            .port(self.port)
            .user("postgres")
            .dbname(db);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match cfg.connect(postgres::NoTls) {
                Ok(c) => return c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("connect to {:?} test server db {db}: {e}", self.role),
            }
        }
    }

    pub fn admin(&self) -> Client {
        self.connect("postgres")
    }

    pub fn create_db(&self, name: &str) {
        self.admin()
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .unwrap();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut c = pg_cmd("pg_ctl");
        c.arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"]);
        let _ = c.stdout(Stdio::null()).stderr(Stdio::null()).status();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The local and central clusters shared by every test of this process.
pub fn shared() -> &'static (Cluster, Cluster) {
    static S: OnceLock<(Cluster, Cluster)> = OnceLock::new();
    S.get_or_init(|| (Cluster::start(Role::Local), Cluster::start(Role::Central)))
}

/// A test's own pair of databases, one on a local and one on a central cluster,
/// plus everything needed to run the binary against them.
pub struct Sandbox {
    pub local_db: String,
    pub central_db: String,
    local: &'static Cluster,
    central: &'static Cluster,
    /// Extra or overriding environment for every run of the binary.
    pub env: BTreeMap<String, String>,
    pub dir: PathBuf,
}

impl Sandbox {
    /// New, empty databases on the shared clusters (not migrated).
    pub fn empty() -> Sandbox {
        static N: AtomicUsize = AtomicUsize::new(0);
        let (local, central) = shared();
        let n = N.fetch_add(1, Ordering::SeqCst);
        let name = format!("t{}_{n}", std::process::id());
        local.create_db(&name);
        central.create_db(&name);
        Sandbox::on(local, central, &name, &name)
    }

    /// New databases on the shared clusters, migrated with `meter-sync migrate`.
    pub fn new() -> Sandbox {
        let s = Sandbox::empty();
        s.migrate();
        s
    }

    /// A sandbox on clusters the test owns (for stopping or reconfiguring them).
    /// The clusters must outlive the sandbox: leak them with `Box::leak` or keep them in a static.
    pub fn on(
        local: &'static Cluster,
        central: &'static Cluster,
        local_db: &str,
        central_db: &str,
    ) -> Sandbox {
        let dir = temp_dir("sandbox");
        let mut env = BTreeMap::new();
        let mut set = |k: &str, v: String| {
            env.insert(k.to_string(), v);
        };
        set("POSTGRES_SYNC_HOST", "127.0.0.1".into());
        set("POSTGRES_SYNC_PORT", local.port.to_string());
        set("POSTGRES_SYNC_DB", local_db.into());
        set("POSTGRES_SYNC_USER", "postgres".into());
        set("POSTGRES_CLIENT_HOST", "localhost".into());
        set("POSTGRES_CLIENT_PORT", central.port.to_string());
        set("POSTGRES_CLIENT_DB", central_db.into());
        set("POSTGRES_CLIENT_USER", "postgres".into());
        set("POSTGRES_CLIENT_PASSWORD", CENTRAL_PASSWORD.into());
        if let Some(c) = &central.certs {
            set("POSTGRES_CLIENT_SSLROOTCERT", c.ca.display().to_string());
        }
        set("LOG_TARGET", "stderr".into());
        set("LOG_LEVEL", "info".into());
        set("SYNC_INTERVAL_SECONDS", "1".into());
        set("MAX_CONNECTION_RETRIES", "2".into());
        set("DB_CONNECTION_TIMEOUT_MS", "3000".into());
        Sandbox {
            local_db: local_db.into(),
            central_db: central_db.into(),
            local,
            central,
            env,
            dir,
        }
    }

    pub fn set(&mut self, k: &str, v: impl ToString) -> &mut Self {
        self.env.insert(k.into(), v.to_string());
        self
    }

    pub fn unset(&mut self, k: &str) -> &mut Self {
        self.env.remove(k);
        self
    }

    pub fn local_cluster(&self) -> &'static Cluster {
        self.local
    }

    pub fn central_cluster(&self) -> &'static Cluster {
        self.central
    }

    /// A test-side connection to the local database.
    pub fn local(&self) -> Client {
        self.local.connect(&self.local_db)
    }

    /// A test-side connection to the central database.
    pub fn central(&self) -> Client {
        self.central.connect(&self.central_db)
    }

    /// The binary with only this sandbox's environment (and PATH), run from a
    /// directory that is not the repository: it must not depend on either.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(&self.env)
            .current_dir(&self.dir)
            .stdin(Stdio::null());
        c
    }

    /// Runs the binary to completion (killed after 120 s).
    pub fn run(&self, args: &[&str]) -> Run {
        let child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn meter-sync");
        let out = wait_output(child, Duration::from_secs(120));
        Run::from(out)
    }

    /// Starts the binary in the background; killed when the returned handle drops.
    pub fn spawn(&self, args: &[&str]) -> Daemon {
        let log = self.dir.join(format!(
            "daemon-{}.log",
            DAEMONS.fetch_add(1, Ordering::SeqCst)
        ));
        let f = std::fs::File::create(&log).unwrap();
        let child = self
            .command(args)
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("spawn meter-sync");
        Daemon {
            child: Some(child),
            log,
        }
    }

    pub fn migrate(&self) {
        self.run(&["migrate"]).assert_ok();
    }

    /// Inserts `n` readings as the collector would (only its five columns), with
    /// distinct timestamps one second apart starting at 2026-01-01.
    pub fn insert_readings(&self, n: usize) {
        insert_readings(&mut self.local(), n, 0);
    }

    /// Count of rows in a table of the local database.
    pub fn local_count(&self, table: &str) -> i64 {
        self.local()
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .unwrap()
            .get(0)
    }

    pub fn central_count(&self, table: &str) -> i64 {
        self.central()
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .unwrap()
            .get(0)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

static DAEMONS: AtomicUsize = AtomicUsize::new(0);

/// Inserts `n` collector-style readings; `offset` shifts their timestamps so that
/// successive calls never collide.
pub fn insert_readings(c: &mut Client, n: usize, offset: i64) {
    c.execute(
        "INSERT INTO meter_readings (meter_id, \"timestamp\", value, unit, metadata)
         SELECT 'meter-' || (g % 200), timestamptz '2026-01-01 00:00:00+00' + make_interval(secs => (g + $2::bigint)::float8),
                (g * 1.5)::numeric, 'kWh',
                CASE WHEN g % 10 = 0 THEN jsonb_build_object('seq', g, 'src', 'collector') END
         FROM generate_series(1, $1::bigint) g",
        &[&(n as i64), &offset],
    )
    .unwrap();
}

/// A finished run of the binary.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Run {
    pub fn assert_ok(&self) -> &Run {
        assert_eq!(
            self.code,
            Some(0),
            "meter-sync failed:\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    pub fn assert_code(&self, code: i32) -> &Run {
        assert_eq!(
            self.code,
            Some(code),
            "unexpected exit:\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    /// Everything it printed.
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

fn wait_output(mut child: Child, limit: Duration) -> Output {
    // The pipes are read while the child runs: a child that writes more than a pipe
    // holds (64 KiB of log lines) would otherwise block on its write forever.
    fn drain(r: Option<impl std::io::Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    }
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Output {
                status,
                stdout: out.join().unwrap(),
                stderr: err.join().unwrap(),
            };
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "meter-sync did not finish within {limit:?}:\n{}\n{}",
                String::from_utf8_lossy(&out.join().unwrap()),
                String::from_utf8_lossy(&err.join().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A background `meter-sync` process, killed (SIGKILL) on drop.
pub struct Daemon {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits up to `limit` for exit; returns the exit code (None if killed by a signal).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<Option<i32>> {
        let deadline = Instant::now() + limit;
        let c = self.child.as_mut()?;
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                self.child = None;
                return Some(st.code());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What it has logged to stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until its log contains `needle`; panics with the log after `limit`.
    pub fn wait_log(&self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.log_text().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "daemon log never showed {needle:?} within {limit:?}:\n{}",
            self.log_text()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Polls `f` until it returns true or `limit` passes.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// Serializes tests inside one process that would otherwise compete for the two
/// cores in a way that distorts timing (kill/cut tests).
pub fn heavy_lock() -> std::sync::MutexGuard<'static, ()> {
    static L: Mutex<()> = Mutex::new(());
    L.lock().unwrap_or_else(|e| e.into_inner())
}

pub mod notify;
/// Booted systemd containers for tests/systemd.rs and tests/ansible.rs (issue 15b).
pub mod nspawn;

/// PgBouncer in front of central, and streaming standbys (issue 13a).
pub mod pgbouncer;
pub mod replica;

/// Crashes and restarts, for soak tests (SIGKILL of the postmaster, as the OOM
/// killer or a power cut of the server process would).
impl Cluster {
    /// SIGKILLs the postmaster and waits until it is gone. Its backends notice and
    /// exit by themselves; nothing is flushed or shut down cleanly.
    pub fn kill_postmaster(&self) {
        let pid_file =
            std::fs::read_to_string(self.data.join("postmaster.pid")).unwrap_or_default();
        let Some(pid) = pid_file
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<i32>().ok())
        else {
            return;
        };
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
        wait_until(
            Duration::from_secs(10),
            || unsafe { libc::kill(pid, 0) } != 0,
        );
    }

    /// Starts the server after [`Cluster::kill_postmaster`]: crash recovery runs
    /// first; the start is retried while the dead server's backends still hold its
    /// shared memory.
    pub fn start_after_crash(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = self.start_cmd().output().unwrap();
            if out.status.success() {
                return;
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(self.root.join("server.log")).unwrap_or_default();
                panic!(
                    "pg_ctl start after a crash failed: {}\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    &log[log.len().saturating_sub(3000)..]
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
