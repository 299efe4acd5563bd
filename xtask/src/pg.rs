//! A real PostgreSQL server for the tests and the benchmarks: a throwaway cluster (Debian's
//! `postgresql` binaries) in a temp dir on a loopback port, stopped when dropped. As root,
//! the server runs as the `postgres` user (PostgreSQL refuses to run as root).

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

/// The newest installed PostgreSQL's `bin` directory.
fn bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    dirs.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn run_as_server_user(program: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    cmd.args(args).output().expect("PostgreSQL tool runs")
}

impl PgServer {
    /// Starts a server, or `None` when PostgreSQL is not installed. Under `CI` a missing
    /// PostgreSQL fails instead (`.ci/run` installs it).
    pub fn start() -> Option<PgServer> {
        Self::start_with("")
    }

    /// As `start`, with more server options (`-c name=value …`).
    pub fn start_with(options: &str) -> Option<PgServer> {
        let Some(bin) = bin_dir() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "PostgreSQL is missing: .ci/run installs Debian's postgresql package"
            );
            eprintln!(
                "SKIPPED: PostgreSQL is not installed (apt-get install postgresql); the PostgreSQL \
                 store suite did not run"
            );
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("switchyard-pg-")
            .tempdir()
            .unwrap();
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown of the test cluster dir");
        }
        let data = dir.path().join("data");
        let out = run_as_server_user(
            &bin.join("initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "switchyard",
                "--no-sync",
            ],
        );
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200 {options}",
            dir.path().display()
        );
        let log = dir.path().join("server.log");
        let out = run_as_server_user(
            &bin.join("pg_ctl"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-o",
                &options,
                "-w",
                "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Some(PgServer { dir, bin, port })
    }

    /// Stops the server as a crash would (`-m immediate`: no shutdown checkpoint, clients
    /// cut off) and starts it again on the same port and data; returns once it accepts
    /// connections.
    pub fn crash_and_restart(&self) {
        let data = self.dir.path().join("data");
        let log = self.dir.path().join("server.log");
        // `restart` starts it with the options of the last start.
        let out = run_as_server_user(
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "restart",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl restart failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Stops (`SIGSTOP`) every process of the server, as a hung server would be: its
    /// connections stay open and its kernel acknowledges what is sent, but nothing answers
    /// until [`PgServer::resume`].
    pub fn pause(&self) {
        assert!(self.signal("STOP"), "kill -STOP of the server's processes");
    }

    /// Lets a paused server go on.
    pub fn resume(&self) {
        assert!(self.signal("CONT"), "kill -CONT of the server's processes");
    }

    /// Sends `signal` to the postmaster and to every process it started; whether it could.
    fn signal(&self, signal: &str) -> bool {
        let pid_file = self.dir.path().join("data/postmaster.pid");
        let Some(postmaster) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|pids| Some(pids.lines().next()?.trim().to_string()))
        else {
            return false;
        };
        let children = Command::new("pgrep").args(["-P", &postmaster]).output();
        let mut all: Vec<String> = children
            .map(|c| String::from_utf8_lossy(&c.stdout).into_owned())
            .unwrap_or_default()
            .split_whitespace()
            .map(String::from)
            .collect();
        all.push(postmaster);
        Command::new("kill")
            .arg(format!("-{signal}"))
            .args(&all)
            .status()
            .is_ok_and(|s| s.success())
    }

    /// A new, empty database on this server; its URL.
    pub fn database(&self, name: &str) -> String {
        let out = Command::new(self.bin.join("createdb"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "switchyard",
                name,
            ])
            .output()
            .expect("createdb runs");
        assert!(
            out.status.success(),
            "createdb {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.url(name)
    }

    /// The URL of a database on this server.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://switchyard@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // A paused server (a test that failed before resuming it) could not stop.
        self.signal("CONT");
        let data = self.dir.path().join("data");
        let _ = run_as_server_user(
            &self.bin.join("pg_ctl"),
            &["-D", data.to_str().unwrap(), "-m", "immediate", "stop"],
        );
    }
}
