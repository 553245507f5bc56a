//! A throwaway Postgres for tests: when `DATABASE_URL` is not set, the first caller starts a
//! private cluster (initdb + pg_ctl, as the `postgres` user when running as root, on a free
//! loopback port, in a temporary directory) that stops and is removed when the test process
//! exits. Each caller gets a fresh empty database in it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::Connection;

struct Cluster {
    /// URL of the maintenance database; fresh databases are made next to it.
    admin_url: String,
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
static NEXT: AtomicU32 = AtomicU32::new(0);

fn bindir() -> Result<PathBuf, String> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").is_file() {
            return Ok(dir);
        }
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs.into_iter()
        .rev()
        .find(|d| d.join("initdb").is_file())
        .ok_or_else(|| {
            "no PostgreSQL server binaries (initdb): run scripts/setup.sh or set DATABASE_URL"
                .into()
        })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

/// Runs a server binary, as `postgres` when we are root (Postgres refuses to run as root).
fn pg(bin: &Path, args: &[&str]) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin).args(args);
        c
    } else {
        let mut c = Command::new(bin);
        c.args(args);
        c
    }
}

fn run(mut cmd: Command, what: &str) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn start() -> Result<Cluster, String> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        return Ok(Cluster { admin_url: url });
    }
    let pg = PrivatePostgres::launch("shared")?;
    Ok(Cluster {
        admin_url: pg.admin_url(),
    })
}

/// A Postgres cluster a test has to itself, to stop and start again (a store outage). It is
/// stopped and removed when the test process exits, however it ends.
pub struct PrivatePostgres {
    bin: PathBuf,
    data: String,
    log: String,
    opts: String,
    port: u16,
}

static PRIVATE: AtomicU32 = AtomicU32::new(0);

impl PrivatePostgres {
    /// A new cluster, started.
    pub fn start() -> Result<Self, String> {
        Self::launch(&format!(
            "private-{}",
            PRIVATE.fetch_add(1, Ordering::Relaxed)
        ))
    }

    fn launch(tag: &str) -> Result<Self, String> {
        let bin = bindir()?;
        let dir = std::env::temp_dir().join(format!("infermesh-pg-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if is_root() {
            let mut chown = Command::new("chown");
            chown.args(["-R", "postgres:"]).arg(&dir);
            run(chown, "chown")?;
        }
        let data = dir.join("data").display().to_string();
        let dir_s = dir.display().to_string();
        run(
            pg(
                &bin.join("initdb"),
                &[
                    "-D",
                    &data,
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ],
            ),
            "initdb",
        )?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| format!("no free port: {e}"))?;
        let me = Self {
            opts: format!(
                "-p {port} -k {dir_s} -c listen_addresses=127.0.0.1 -c max_connections=300"
            ),
            log: dir.join("postgres.log").display().to_string(),
            bin,
            data,
            port,
        };
        me.start_again()?;
        // A watchdog in its own process group stops the cluster and removes it once this
        // test process is gone, however it ends. It polls /proc: `kill -0` would fail as
        // `postgres` on a root process and stop the cluster at once.
        let script = format!(
            "while [ -d /proc/{pid} ]; do sleep 1; done; {ctl} -D {data} stop -m immediate >/dev/null 2>&1; rm -rf {dir_s}",
            pid = std::process::id(),
            ctl = me.bin.join("pg_ctl").display(),
            data = me.data,
        );
        let mut watchdog = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", "sh", "-c", &script]);
            c
        } else {
            let mut c = Command::new("sh");
            c.args(["-c", &script]);
            c
        };
        {
            use std::os::unix::process::CommandExt;
            watchdog.process_group(0);
        }
        watchdog
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("watchdog: {e}"))?;
        Ok(me)
    }

    /// The URL of its maintenance database.
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The URL of database `db` over its Unix socket (the socket directory is shared by every
    /// network namespace of the machine, so a process in one of its own reaches it).
    pub fn socket_url(&self, db: &str) -> String {
        let dir = std::path::Path::new(&self.data)
            .parent()
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        format!(
            "postgres://postgres@localhost/{db}?host={dir}&port={}",
            self.port
        )
    }

    /// The postmaster's pid, from `postmaster.pid` (`None` while it is not running).
    pub fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(Path::new(&self.data).join("postmaster.pid")).ok()?;
        let pid: u32 = text.lines().next()?.trim().parse().ok()?;
        Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }

    /// `pg_ctl restart -m fast`: a clean restart, as an upgrade or a config change does.
    pub fn restart(&self) -> Result<(), String> {
        run(
            pg(
                &self.bin.join("pg_ctl"),
                &[
                    "-D", &self.data, "-l", &self.log, "-o", &self.opts, "-m", "fast", "-w", "-t",
                    "60", "restart",
                ],
            ),
            "pg_ctl restart",
        )
    }

    /// Stops it at once (`pg_ctl stop -m immediate`: no checkpoint, as a crash would).
    pub fn stop(&self) -> Result<(), String> {
        run(
            pg(
                &self.bin.join("pg_ctl"),
                &["-D", &self.data, "stop", "-m", "immediate", "-w"],
            ),
            "pg_ctl stop",
        )
    }

    /// Starts it (again), on the same port, and waits until it accepts connections.
    pub fn start_again(&self) -> Result<(), String> {
        run(
            pg(
                &self.bin.join("pg_ctl"),
                &[
                    "-D", &self.data, "-l", &self.log, "-o", &self.opts, "-w", "-t", "60", "start",
                ],
            ),
            "pg_ctl start",
        )
    }
}

/// The URL of the test cluster's maintenance database (starting the cluster on first use).
pub fn cluster_url() -> Result<String, String> {
    CLUSTER
        .get_or_init(start)
        .as_ref()
        .map(|c| c.admin_url.clone())
        .map_err(Clone::clone)
}

/// The URL of a new, empty database on the test cluster (started on first use).
pub async fn fresh_database() -> Result<String, String> {
    let cluster = CLUSTER.get_or_init(start).as_ref().map_err(Clone::clone)?;
    let name = format!(
        "t_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let mut admin = sqlx::PgConnection::connect(&cluster.admin_url)
        .await
        .map_err(|e| format!("{}: {e}", cluster.admin_url))?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .map_err(|e| e.to_string())?;
    let base = cluster
        .admin_url
        .rsplit_once('/')
        .map(|(b, _)| b)
        .unwrap_or(&cluster.admin_url);
    Ok(format!("{base}/{name}"))
}

/// A backend to run a contract test against.
#[derive(Clone, Copy, Debug)]
pub enum Backend {
    /// SQLite in memory.
    Sqlite,
    /// A fresh database on the test Postgres.
    Postgres,
}

impl Backend {
    /// The URL of a new, empty database of this backend (SQLite: a file under the temporary
    /// directory, so that several stores can share it).
    pub async fn fresh_url(self) -> String {
        match self {
            Self::Sqlite => {
                let n = NEXT.fetch_add(1, Ordering::Relaxed);
                let path = std::env::temp_dir()
                    .join(format!("infermesh-test-{}-{n}.db", std::process::id()));
                let _ = std::fs::remove_file(&path);
                format!("sqlite://{}", path.display())
            }
            Self::Postgres => fresh_database()
                .await
                .unwrap_or_else(|e| panic!("test Postgres: {e}")),
        }
    }

    /// A new, empty, migrated store of this backend.
    pub async fn open(self) -> super::AnyStore {
        let url = match self {
            Self::Sqlite => "sqlite::memory:".to_string(),
            Self::Postgres => self.fresh_url().await,
        };
        super::open(&url)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"))
    }
}

/// Runs SQL behind a store's back, written for each database: `sqlite` on SQLite, `postgres`
/// on Postgres (several statements allowed). For tests that rig, backdate or corrupt what the
/// store holds.
pub async fn raw_sql(
    store: &super::AnyStore,
    sqlite: &str,
    postgres: &str,
) -> Result<(), sqlx::Error> {
    match store {
        super::AnyStore::Sqlite(s) => sqlx::raw_sql(sqlite)
            .execute(&mut *s.conn().await)
            .await
            .map(|_| ()),
        super::AnyStore::Postgres(s) => sqlx::raw_sql(postgres).execute(s.pool()).await.map(|_| ()),
    }
}

/// Runs the async test function `$name(backend: Backend)` once per backend, as
/// `$name::sqlite` and `$name::postgres`.
#[macro_export]
macro_rules! both {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::store::testing::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name($crate::store::testing::Backend::Postgres).await
            }
        }
    };
}
pub use both;
