//! A real single-member etcd (Debian's `etcd-server`) for the coordination tests
//! and the failover benchmark, on free loopback ports with a data folder of its
//! own: the system service the package may have installed is never used. It can
//! also require TLS with client certificates, from a CA the test makes.

// Shared by the tests and the failover benchmark, which use different parts.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pgwarden::cluster::free_port;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};

/// An etcd process that can be stopped and started again on the same data.
pub struct Etcd {
    child: Option<Child>,
    pub client_port: u16,
    peer_port: u16,
    /// its own folder (data, log, certificates), removed on drop
    pub dir: PathBuf,
    tls: Option<Pki>,
}

/// PEM files: a CA, the server certificate etcd presents (for 127.0.0.1) and a
/// client certificate, both signed by the CA.
pub struct Pki {
    pub ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Pki {
    fn write(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "pgwarden test etcd CA");
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca, ca_key);
        let pki = Pki {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        };
        std::fs::write(&pki.ca, ca_pem).unwrap();
        // etcd's gRPC gateway dials etcd itself with the server certificate, hence client auth too.
        for (names, usages, cert, key) in [
            (
                vec!["127.0.0.1".to_owned()],
                vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ],
                &pki.server_cert,
                &pki.server_key,
            ),
            (
                Vec::new(),
                vec![ExtendedKeyUsagePurpose::ClientAuth],
                &pki.client_cert,
                &pki.client_key,
            ),
        ] {
            let key_pair = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(names).unwrap();
            params
                .distinguished_name
                .push(DnType::CommonName, "pgwarden");
            params.extended_key_usages = usages;
            let signed = params.signed_by(&key_pair, &issuer).unwrap();
            std::fs::write(cert, signed.pem()).unwrap();
            std::fs::write(key, key_pair.serialize_pem()).unwrap();
        }
        pki
    }
}

impl Etcd {
    /// Starts etcd and waits until it answers.
    pub fn start() -> Etcd {
        Self::launch(false)
    }

    /// Starts etcd serving clients only over TLS, and only those with a
    /// certificate its CA signed ([`Etcd::tls`]).
    pub fn start_tls() -> Etcd {
        Self::launch(true)
    }

    fn launch(tls: bool) -> Etcd {
        let dir = std::env::temp_dir().join(format!(
            "pgwarden-etcd-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut etcd = Etcd {
            child: None,
            client_port: free_port().unwrap(),
            peer_port: free_port().unwrap(),
            tls: tls.then(|| Pki::write(&dir.join("tls"))),
            dir,
        };
        // A port found free can be taken before etcd binds it, by another test's
        // outgoing connection (both come from the ephemeral range): such a start is
        // tried again on other ports, from no data.
        for _ in 0..3 {
            match etcd.run() {
                Ok(()) => return etcd,
                Err(log) if log.contains("address already in use") => {
                    let _ = std::fs::remove_dir_all(etcd.dir.join("data"));
                    etcd.client_port = free_port().unwrap();
                    etcd.peer_port = free_port().unwrap();
                }
                Err(log) => panic!("etcd did not start:\n{log}"),
            }
        }
        panic!("etcd found its ports taken three times");
    }

    /// The endpoint for `[coordination] etcd`.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The certificates of an etcd started with [`Etcd::start_tls`].
    pub fn tls(&self) -> &Pki {
        self.tls.as_ref().expect("etcd was started without TLS")
    }

    /// Kills etcd (as a crash or a partition would look to the proxies).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same data and waits until it answers.
    pub fn resume(&mut self) {
        self.run()
            .unwrap_or_else(|log| panic!("etcd did not start:\n{log}"));
    }

    /// Starts etcd and waits until it answers; its log if it exits or stays silent.
    fn run(&mut self) -> Result<(), String> {
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::File::create(self.dir.join("etcd.log")).unwrap();
        let mut command = Command::new("etcd");
        command
            .args(["--name", "test", "--data-dir"])
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")]);
        if let Some(pki) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&pki.server_cert)
                .arg("--key-file")
                .arg(&pki.server_key)
                .arg("--trusted-ca-file")
                .arg(&pki.ca)
                .arg("--client-cert-auth");
        }
        let mut child = command
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd (Debian package etcd-server) must be installed; .ci/run installs it");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.healthy() {
                self.child = Some(child);
                return Ok(());
            }
            if child.try_wait().is_ok_and(|status| status.is_some()) {
                return Err(self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Killed on drop.
        self.child = Some(child);
        Err(self.log())
    }

    /// etcd answers its health check (over TLS, which the harness does not
    /// speak: it said it serves clients).
    fn healthy(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.client_port)) else {
            return false;
        };
        if self.tls.is_some() {
            return self.log().contains("ready to serve client requests");
        }
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut answer = String::new();
        s.write_all(b"GET /health HTTP/1.0\r\n\r\n").is_ok()
            && s.read_to_string(&mut answer).is_ok()
            && answer.starts_with("HTTP/1.0 200")
    }

    /// What etcd logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
