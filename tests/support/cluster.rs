//! Real PostgreSQL servers in temporary directories, in the two roles the daemon
//! meets: a gateway's local database (trust) and central (TLS with the test CA,
//! SCRAM password).
//!
//! initdb runs once per test process into a template; every cluster is a copy of
//! it, which is what makes a cluster per test affordable. Most tests share one
//! local and one central cluster ([`shared`]) and get their own databases on them
//! (see [`super::Sandbox`]); tests that stop, restart, crash or reconfigure a
//! server start their own ([`Cluster::start`]).
//!
//! PostgreSQL refuses to run as root; when the tests do, the servers run as the
//! `postgres` user (or `nobody`), which is why files the server reads are chowned.
//!
//! Cleanup: each cluster has a reaper process that stops it and deletes its
//! directory as soon as the test process is gone, however it ended (panic,
//! `process::exit` after the harness, or SIGKILL). Dropping a [`Cluster`] does the
//! same at once.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use postgres::Client;

use super::certs::Certs;
use super::host::{free_port, is_root, reap_after_exit, run_ok, temp_dir, wait_until};

/// The password of the `postgres` role on every central cluster: tests check that
/// it never shows up in output.
pub const CENTRAL_PASSWORD: &str = "c3ntral-Pa55word";

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

/// The binaries a server of `role` runs: `CENTRAL_PG_BIN_DIR` for central when set
/// (another PostgreSQL version, for a benchmark against it: see bench/run), else
/// the same as every other server's.
fn bin_dir(role: Role) -> PathBuf {
    match (role, std::env::var_os("CENTRAL_PG_BIN_DIR")) {
        (Role::Central, Some(d)) => PathBuf::from(d),
        _ => pg_bin_dir(),
    }
}

/// Whether the server in `bin` was built with OpenSSL (and `CENTRAL_PG_TLS` is not
/// `0`): without, central serves plain TCP (SCRAM still) and sandboxes set
/// `POSTGRES_CLIENT_SSLMODE=disable`.
fn has_tls(bin: &Path) -> bool {
    if std::env::var("CENTRAL_PG_TLS").is_ok_and(|v| v == "0") {
        return false;
    }
    match Command::new(bin.join("pg_config"))
        .arg("--configure")
        .output()
    {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).contains("ssl"),
        _ => true,
    }
}

/// PostgreSQL refuses to run as root; when the tests do, the servers run as this user.
pub(super) fn server_user() -> Option<&'static str> {
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

/// Runs a server binary (initdb, pg_ctl) from `bin` as the server user.
pub(super) fn pg_cmd(bin: &Path, tool: &str) -> Command {
    let path = bin.join(tool);
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

/// The initdb'd template every cluster of `bin` is copied from.
fn template(bin: &Path) -> PathBuf {
    static T: Mutex<Vec<(PathBuf, PathBuf)>> = Mutex::new(Vec::new());
    let mut made = T.lock().unwrap();
    if let Some((_, data)) = made.iter().find(|(b, _)| b == bin) {
        return data.clone();
    }
    let data = {
        let root = temp_dir("template");
        chown_to_server(&root);
        let data = root.join("data");
        let mut c = pg_cmd(bin, "initdb");
        c.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        run_ok(c, "initdb");
        reaper(bin, &root, None);
        data
    };
    made.push((bin.to_path_buf(), data.clone()));
    data
}

/// Starts a background process that, once this test process is gone, stops the
/// server in `dir/data` (if any, run from `bin`) and removes `dir`.
pub(super) fn reaper(bin: &Path, dir: &Path, data: Option<&Path>) {
    let stop = match data {
        Some(d) => format!(
            "{} -D '{}' stop -m immediate -w >/dev/null 2>&1;",
            pg_cmd_string(bin, "pg_ctl"),
            d.display()
        ),
        None => String::new(),
    };
    reap_after_exit(&format!("{stop} rm -rf '{}'", dir.display()));
}

pub(super) fn pg_cmd_string(bin: &Path, tool: &str) -> String {
    let path = bin.join(tool);
    match server_user() {
        Some(u) => format!("runuser -u {u} -- {}", path.display()),
        None => path.display().to_string(),
    }
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
    /// The server binaries it runs (see [`bin_dir`]).
    pub bin: PathBuf,
    /// A central serving TLS: all but one whose binaries lack OpenSSL ([`has_tls`]).
    pub(super) tls: bool,
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
        let bin = bin_dir(role);
        run_ok(
            {
                let mut c = Command::new("cp");
                c.arg("-a").arg(template(&bin)).arg(&data);
                c
            },
            "copy template",
        );
        let socket_dir = root.join("sock");
        std::fs::create_dir_all(&socket_dir).unwrap();
        let tls = role == Role::Central && has_tls(&bin);
        let certs = tls.then(|| Certs::generate(&root.join("certs")));
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
            None if role == Role::Central => {
                conf.push_str("password_encryption = 'scram-sha-256'\n");
                "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
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
        reaper(&bin, &root, Some(&data));
        let mut cl = Cluster {
            role,
            root,
            data,
            socket_dir,
            port: 0,
            certs,
            bin,
            tls,
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

    /// Whether this is a central that serves TLS: all do but one whose binaries
    /// were built without OpenSSL ([`has_tls`]).
    pub fn serves_tls(&self) -> bool {
        self.tls
    }

    /// `pg_ctl start` on this cluster's port.
    pub(super) fn start_cmd(&self) -> Command {
        let mut c = pg_cmd(&self.bin, "pg_ctl");
        c.arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.root.join("server.log"))
            .arg("-o")
            .arg(format!("-p {}", self.port))
            .args(["-w", "-t", "60", "start"]);
        c
    }

    pub(super) fn pg_ctl_start(&mut self) {
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

    /// `pg_ctl stop` in shutdown `mode` (fast, immediate), waiting until it is down.
    pub(super) fn stop_cmd(&self, mode: &str) -> Command {
        let mut c = pg_cmd(&self.bin, "pg_ctl");
        c.arg("-D").arg(&self.data).args(["-m", mode, "-w", "stop"]);
        c
    }

    /// Stops the server (fast shutdown: sessions are ended, nothing is lost).
    pub fn stop(&self) {
        run_ok(self.stop_cmd("fast"), "pg_ctl stop");
    }

    /// Starts it again on the same port.
    pub fn restart(&self) {
        run_ok(self.start_cmd(), "pg_ctl start (restart)");
    }

    /// A superuser connection to database `db` over the Unix socket.
    pub fn connect(&self, db: &str) -> Client {
        self.connect_as("postgres", db)
    }

    /// A connection as `role` to database `db` over the Unix socket (which trusts
    /// every role): what a role may see, without its password.
    pub fn connect_as(&self, role: &str, db: &str) -> Client {
        let mut cfg = postgres::Config::new();
        cfg.host_path(&self.socket_dir)
            .port(self.port)
            .user(role)
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
        let _ = self
            .stop_cmd("immediate")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The local and central clusters shared by every test of this process.
pub fn shared() -> &'static (Cluster, Cluster) {
    static S: OnceLock<(Cluster, Cluster)> = OnceLock::new();
    S.get_or_init(|| (Cluster::start(Role::Local), Cluster::start(Role::Central)))
}

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
