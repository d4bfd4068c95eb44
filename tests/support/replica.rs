//! Streaming replication between the tests' own clusters: a standby made with
//! `pg_basebackup -R` from a running [`Cluster`], and its promotion.

use std::time::Duration;

use super::cluster::{chown_to_server, pg_cmd, reaper, Cluster, Role};
use super::host::{free_port, run_ok, temp_dir, wait_until};

/// pg_hba.conf for a central primary that standbys may replicate from over its
/// Unix socket.
pub const REPLICATING_CENTRAL_HBA: &str = "local all all trust\nlocal replication all trust\n\
     hostssl all all 127.0.0.1/32 scram-sha-256\n";

impl Cluster {
    /// A streaming standby of this cluster (which must allow replication, see
    /// [`REPLICATING_CENTRAL_HBA`]), started on a port of its own, connected
    /// as `application_name` (what `synchronous_standby_names` names). It serves
    /// TLS with the primary's certificate, so a gateway verifies it the same way.
    pub fn standby(&self, application_name: &str) -> Cluster {
        let root = temp_dir("standby");
        chown_to_server(&root);
        let data = root.join("data");
        let socket_dir = root.join("sock");
        std::fs::create_dir_all(&socket_dir).unwrap();
        chown_to_server(&root);
        let mut c = pg_cmd(&self.bin, "pg_basebackup");
        c.arg("-D")
            .arg(&data)
            .arg("-h")
            .arg(&self.socket_dir)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", "postgres", "-R", "-X", "stream", "--no-sync"]);
        run_ok(c, "pg_basebackup");
        // Later lines win: its own socket directory, and its name towards the primary.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.auto.conf"))
            .unwrap();
        use std::io::Write;
        writeln!(
            f,
            "unix_socket_directories = '{}'\ncluster_name = '{application_name}'\n\
             primary_conninfo = 'host={} port={} user=postgres application_name={application_name}'",
            socket_dir.display(),
            self.socket_dir.display(),
            self.port
        )
        .unwrap();
        drop(f);
        chown_to_server(&root);
        reaper(&self.bin, &root, Some(&data));
        let mut standby = Cluster {
            role: Role::Central,
            root,
            data,
            socket_dir,
            port: free_port(),
            certs: None,
            bin: self.bin.clone(),
            // Its configuration is the primary's copy, TLS included.
            tls: self.serves_tls(),
        };
        standby.pg_ctl_start();
        let mut s = standby.admin();
        assert!(
            wait_until(Duration::from_secs(20), || {
                s.query_one("SELECT pg_is_in_recovery()", &[])
                    .map(|r| r.get::<_, bool>(0))
                    .unwrap_or(false)
            }),
            "standby is not in recovery"
        );
        standby
    }

    /// Waits until the standby `application_name` has replayed everything this
    /// primary has written so far.
    pub fn wait_replayed(&self, application_name: &str) {
        let mut a = self.admin();
        let ok = wait_until(Duration::from_secs(30), || {
            a.query_opt(
                "SELECT 1 FROM pg_stat_replication WHERE application_name = $1 \
                 AND replay_lsn >= pg_current_wal_lsn()",
                &[&application_name],
            )
            .unwrap()
            .is_some()
        });
        assert!(ok, "standby {application_name} did not catch up");
    }

    /// `pg_ctl promote`: this standby becomes a primary that accepts writes.
    pub fn promote(&self) {
        let mut c = pg_cmd(&self.bin, "pg_ctl");
        c.arg("-D").arg(&self.data).args(["-w", "promote"]);
        run_ok(c, "pg_ctl promote");
    }

    /// Sets a server parameter with ALTER SYSTEM and reloads.
    pub fn set_and_reload(&self, name: &str, value: &str) {
        let mut a = self.admin();
        a.batch_execute(&format!("ALTER SYSTEM SET {name} = '{value}'"))
            .unwrap();
        a.batch_execute("SELECT pg_reload_conf()").unwrap();
    }
}

impl Cluster {
    /// Stops the server as a crash would (`-m immediate`: no shutdown checkpoint,
    /// no last WAL sent to standbys).
    pub fn crash(&self) {
        run_ok(self.stop_cmd("immediate"), "pg_ctl stop -m immediate");
    }
}
