//! A real, throwaway PostgreSQL server for the usage store's `backend: postgres` tests (and
//! its benchmark): Debian's `postgresql` package, a cluster made by `initdb` in a temporary
//! folder, the server listening on 127.0.0.1 on a free port, run as the `postgres` user when
//! the tests run as root (PostgreSQL refuses to run as root). Stopped by its PID on drop.

#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The folder of Debian's PostgreSQL programs (`/usr/lib/postgresql/<version>/bin`), the newest
/// installed.
pub fn bin_dir() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b)
}

/// Whether PostgreSQL is installed; when it is not, the tests say so and pass, unless
/// `KEYGATE_REQUIRE_PG` is set (CI sets it: `scripts/setup-test.sh` installs `postgresql`).
pub fn available() -> bool {
    let found = bin_dir().is_some();
    if !found {
        assert!(
            std::env::var_os("KEYGATE_REQUIRE_PG").is_none(),
            "PostgreSQL is not installed (scripts/setup-test.sh installs Debian's postgresql)"
        );
        eprintln!("skipped: PostgreSQL is not installed");
    }
    found
}

/// A port nobody listens on now, for a server that cannot listen on port 0 and say which port
/// it got (PostgreSQL, redis-server). Another process may take it before the server does.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The `postgres` user's uid and gid, when the tests run as root (else `None`: run as
/// ourselves).
fn run_as() -> Option<(u32, u32)> {
    let me = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Uid:")
                .map(|v| v.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false);
    if !me {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .expect("the postgres user (made by Debian's postgresql package)");
    let f: Vec<&str> = line.split(':').collect();
    Some((f[2].parse().unwrap(), f[3].parse().unwrap()))
}

fn as_postgres(cmd: &mut Command) -> &mut Command {
    if let Some((uid, gid)) = run_as() {
        cmd.uid(uid).gid(gid).env("HOME", "/var/lib/postgresql");
    }
    cmd
}

/// One PostgreSQL cluster in a temporary folder; the server runs between [`PgServer::start`]
/// and [`PgServer::stop`].
pub struct PgServer {
    child: Option<Child>,
    pub port: u16,
    bin: PathBuf,
    data: PathBuf,
    socket_dir: PathBuf,
    durable: bool,
    _dir: tempfile::TempDir,
}

impl PgServer {
    /// A new cluster (`initdb`, trust authentication for `postgres`), not started.
    pub fn init() -> PgServer {
        PgServer::init_with(false)
    }

    /// `durable`: PostgreSQL's own settings (fsync on); else fsync off, for the tests' speed.
    pub fn init_with(durable: bool) -> PgServer {
        let bin = bin_dir().expect("PostgreSQL is installed");
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let socket_dir = dir.path().join("sock");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(&socket_dir).unwrap();
        if let Some((uid, gid)) = run_as() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            for d in [&data, &socket_dir] {
                std::os::unix::fs::chown(d, Some(uid), Some(gid)).unwrap();
            }
        }
        let out = as_postgres(Command::new(bin.join("initdb")).args([
            "-D",
            data.to_str().unwrap(),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        ]))
        .output()
        .expect("initdb runs");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PgServer {
            child: None,
            port: free_port(),
            bin,
            data,
            socket_dir,
            durable,
            _dir: dir,
        }
    }

    /// A new cluster, started, with database `keygate`.
    pub fn start_new() -> PgServer {
        let mut s = PgServer::init();
        s.start();
        s.create_db("keygate");
        s
    }

    /// Start the server (on the same port and data as before) and wait until it answers.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "already started");
        let log = std::fs::File::create(self.data.with_file_name("server.log")).unwrap();
        let mut args = vec![
            "-D".to_string(),
            self.data.display().to_string(),
            "-p".into(),
            self.port.to_string(),
            "-k".into(),
            self.socket_dir.display().to_string(),
            "-c".into(),
            "listen_addresses=127.0.0.1".into(),
            "-c".into(),
            "max_connections=50".into(),
        ];
        if !self.durable {
            for s in [
                "fsync=off",
                "synchronous_commit=off",
                "full_page_writes=off",
            ] {
                args.extend(["-c".to_string(), s.to_string()]);
            }
        }
        let child = as_postgres(Command::new(self.bin.join("postgres")).args(&args))
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("postgres starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.with_client("postgres", |_| ()).is_err() {
            assert!(
                Instant::now() < deadline,
                "postgres did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stop the server by its PID (SIGINT: PostgreSQL's fast shutdown) and wait for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while c.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.wait();
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.with_file_name("server.log")).unwrap_or_default()
    }

    /// The URL of database `db` (user `postgres`, no password: trust).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Run `f` on a connection to database `db`, on a thread of its own (the blocking client
    /// may not run on an async test's runtime).
    pub fn with_client<T: Send>(
        &self,
        db: &str,
        f: impl FnOnce(&mut postgres::Client) -> T + Send,
    ) -> Result<T, postgres::Error> {
        let url = self.url(db);
        std::thread::scope(|s| {
            s.spawn(move || {
                let mut c = postgres::Client::connect(&url, postgres::NoTls)?;
                Ok(f(&mut c))
            })
            .join()
            .expect("the client thread")
        })
    }

    /// One number: the first column of the first row of `sql` on database `db`.
    pub fn number(&self, db: &str, sql: &str) -> i64 {
        self.with_client(db, |c| c.query_one(sql, &[]).map(|r| r.get::<_, i64>(0)))
            .and_then(|r| r)
            .unwrap()
    }

    /// `CREATE DATABASE name`.
    pub fn create_db(&self, name: &str) {
        self.with_client("postgres", |c| {
            c.batch_execute(&format!("CREATE DATABASE {name}"))
        })
        .and_then(|r| r)
        .unwrap();
    }

    /// The data folder.
    pub fn data(&self) -> &Path {
        &self.data
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}
