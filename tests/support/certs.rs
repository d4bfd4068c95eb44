//! The test CA and the certificates it signs, made with the openssl CLI: the
//! central cluster's server certificate, and whatever CAs and leaf certificates
//! (client certificates, wrong names, expired ones) the TLS tests need.
//!
//! Real files from the real tool, so the binary reads them as an operator's
//! would; nothing here knows about clusters.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::host::run_ok;

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

/// `openssl req` with a new unencrypted RSA key in `key` and the request for
/// `/CN=cn` in `out` (with `-x509` among `extra`: a self-signed certificate).
fn new_key_and_request(dir: &Path, key: &str, out: &str, cn: &str, extra: &[&str]) {
    let subj = format!("/CN={cn}");
    let mut args = vec![
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", out, "-subj", &subj,
    ];
    args.extend_from_slice(extra);
    openssl(dir, &args);
}

/// A self-signed CA: returns (cert path, key path).
pub fn make_ca(dir: &Path, name: &str, cn: &str) -> (PathBuf, PathBuf) {
    let (crt, key) = (format!("{name}.crt"), format!("{name}.key"));
    new_key_and_request(
        dir,
        &key,
        &crt,
        cn,
        &[
            "-x509",
            "-days",
            "3650",
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
    if days < 0 {
        return issue_dated(dir, name, ca, cn, san, "20200101000000Z", "20210101000000Z");
    }
    let Request {
        crt,
        key,
        csr,
        ext,
        ca_crt,
        ca_key,
    } = request(dir, name, ca, cn, san);
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
    (dir.join(crt), dir.join(key))
}

/// File names of a server certificate being issued, its key and request written,
/// its extensions file (not a CA; `san` as the subjectAltName when not empty).
struct Request {
    crt: String,
    key: String,
    csr: String,
    ext: String,
    ca_crt: String,
    ca_key: String,
}

fn request(dir: &Path, name: &str, ca: &(PathBuf, PathBuf), cn: &str, san: &str) -> Request {
    let (crt, key, csr, ext) = (
        format!("{name}.crt"),
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.ext"),
    );
    new_key_and_request(dir, &key, &csr, cn, &[]);
    let mut ext_text = String::from("basicConstraints=CA:FALSE\n");
    if !san.is_empty() {
        ext_text.push_str(&format!("subjectAltName={san}\n"));
    }
    std::fs::write(dir.join(&ext), ext_text).unwrap();
    Request {
        crt,
        key,
        csr,
        ext,
        ca_crt: ca.0.to_str().unwrap().to_string(),
        ca_key: ca.1.to_str().unwrap().to_string(),
    }
}

/// As [`issue`], valid from `start` to `end` (`YYYYMMDDHHMMSSZ`): an expired
/// certificate, or one not valid yet (as a gateway whose clock is behind sees any).
pub fn issue_dated(
    dir: &Path,
    name: &str,
    ca: &(PathBuf, PathBuf),
    cn: &str,
    san: &str,
    start: &str,
    end: &str,
) -> (PathBuf, PathBuf) {
    let Request {
        crt,
        key,
        csr,
        ext,
        ca_crt,
        ca_key,
    } = request(dir, name, ca, cn, san);
    // openssl x509 cannot set the validity's start, `openssl ca` can.
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
            start,
            "-enddate",
            end,
            "-extfile",
            &ext,
            "-notext",
        ],
    );
    (dir.join(crt), dir.join(key))
}
