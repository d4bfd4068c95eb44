//! A real PgBouncer (Debian's package) in front of a central [`Cluster`], as a fleet
//! runs it: transaction pooling, TLS towards the gateways with the central's own
//! certificate (so `verify-full` against `localhost` still holds), TLS towards
//! the server, SCRAM both ways with the central password from its userlist. Every
//! other setting is PgBouncer's stock one, above all no `ignore_startup_parameters`
//! and no `max_prepared_statements`: what a client may not rely on stays forbidden.
//!
//! It runs as the server user (PgBouncer refuses root), in its own directory,
//! killed on drop, or by a reaper once the test process is gone.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::cluster::{chown_to_server, server_user, Cluster, CENTRAL_PASSWORD};
use super::host::{free_port, reap_after_exit, temp_dir};

/// The PgBouncer binary, or None when the package is not installed (`.ci/setup`
/// installs it).
pub fn binary() -> Option<PathBuf> {
    ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Settings a test may change; the defaults are the issue's.
#[derive(Clone, Debug)]
pub struct Settings {
    pub pool_mode: &'static str,
    /// Server connections per (database, user) pair.
    pub default_pool_size: u32,
    /// Client connections PgBouncer accepts in all (stock: 100).
    pub max_client_conn: u32,
    /// Extra `[pgbouncer]` lines, appended as they are.
    pub extra: String,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            pool_mode: "transaction",
            default_pool_size: 2,
            max_client_conn: 100,
            extra: String::new(),
        }
    }
}

pub struct PgBouncer {
    pub port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
}

impl PgBouncer {
    /// Starts PgBouncer for every database of `central` (a wildcard entry).
    pub fn start(central: &Cluster, s: &Settings) -> PgBouncer {
        let bin = binary().expect("pgbouncer is not installed (.ci/setup installs it)");
        let certs = central
            .certs
            .as_ref()
            .expect("a central cluster has certificates");
        let dir = temp_dir("pgbouncer");
        // PgBouncer reads its key as the server user: its own copy, mode 600.
        let key = dir.join("server.key");
        let cert = dir.join("server.crt");
        std::fs::copy(&certs.server_key, &key).unwrap();
        std::fs::copy(&certs.server_cert, &cert).unwrap();
        std::fs::write(
            dir.join("userlist.txt"),
            format!("\"postgres\" \"{CENTRAL_PASSWORD}\"\n"),
        )
        .unwrap();
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            let ini = dir.join("pgbouncer.ini");
            std::fs::write(
                &ini,
                format!(
                    "[databases]\n* = host=127.0.0.1 port={cport}\n\n[pgbouncer]\n\
                     listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir = {dir}\n\
                     auth_type = scram-sha-256\nauth_file = {dir}/userlist.txt\n\
                     admin_users = postgres\nstats_users = postgres\n\
                     pool_mode = {mode}\ndefault_pool_size = {pool}\nmax_client_conn = {maxc}\n\
                     logfile = {dir}/pgbouncer.log\npidfile = {dir}/pgbouncer.pid\n\
                     client_tls_sslmode = require\nclient_tls_key_file = {key}\n\
                     client_tls_cert_file = {cert}\nclient_tls_ca_file = {ca}\n\
                     server_tls_sslmode = require\n{extra}\n",
                    cport = central.port,
                    dir = dir.display(),
                    mode = s.pool_mode,
                    pool = s.default_pool_size,
                    maxc = s.max_client_conn,
                    key = key.display(),
                    cert = cert.display(),
                    ca = certs.ca.display(),
                    extra = s.extra,
                ),
            )
            .unwrap();
            chown_to_server(&dir);
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
            let mut pb = PgBouncer {
                port,
                dir: dir.clone(),
                child: Some(spawn(&bin, &ini)),
            };
            if pb.wait_listening(Duration::from_secs(10)) {
                pb.reaper();
                return pb;
            }
            last = pb.log_text();
            pb.stop();
        }
        panic!("pgbouncer did not start:\n{last}");
    }

    fn wait_listening(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if c.try_wait().unwrap().is_some() {
                    return false;
                }
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Kills PgBouncer once this test process is gone, however it ended.
    fn reaper(&self) {
        let pid = self.child.as_ref().map(|c| c.id()).unwrap_or(0);
        reap_after_exit(&format!(
            "kill $(cat '{dir}/pgbouncer.pid' 2>/dev/null) {pid} 2>/dev/null; \
             sleep 1; rm -rf '{dir}'",
            dir = self.dir.display()
        ));
    }

    /// Its log (connections, errors it saw from either side).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }

    /// A session on PgBouncer's admin console, over its Unix socket, where TLS is
    /// not required; for what must be undone on the same session (`SUSPEND`
    /// refuses new connections until its `RESUME`).
    pub fn console(&self) -> postgres::Client {
        let mut cfg = postgres::Config::new();
        cfg.host_path(&self.dir)
            .port(self.port)
            .user("postgres")
            .password(CENTRAL_PASSWORD)
            .dbname("pgbouncer");
        cfg.connect(postgres::NoTls)
            .expect("connect to the pgbouncer console")
    }

    /// A query on PgBouncer's admin console (`SHOW POOLS`, `SHOW STATS`, `PAUSE`)
    /// in a session of its own: every value as text.
    pub fn admin_query(&self, sql: &str) -> Vec<Vec<String>> {
        self.console()
            .simple_query(sql)
            .expect("pgbouncer console query")
            .into_iter()
            .filter_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) => Some(
                    (0..r.len())
                        .map(|i| r.get(i).unwrap_or("").to_string())
                        .collect(),
                ),
                _ => None,
            })
            .collect()
    }

    /// The pid PgBouncer wrote (the child may be runuser around it).
    fn daemon_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.join("pgbouncer.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// Stops it (SIGTERM, then SIGKILL).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            for pid in [self.daemon_pid(), Some(c.id() as i32)]
                .into_iter()
                .flatten()
            {
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if c.try_wait().unwrap().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// PgBouncer on `ini`, as the server user when we are root.
fn spawn(bin: &std::path::Path, ini: &std::path::Path) -> Child {
    let mut c = match server_user() {
        Some(u) => {
            let mut c = Command::new("runuser");
            c.arg("-u").arg(u).arg("--").arg(bin);
            c
        }
        None => Command::new(bin),
    };
    c.arg(ini)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn pgbouncer")
}
