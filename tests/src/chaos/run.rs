//! Plays one schedule against real processes and checks the invariants afterwards.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use infermesh_operator::store::testing::PrivatePostgres;

use super::check::{self, Timeline};
use super::net::{Net, sh};
use super::{Fault, Schedule, StoreKind};

/// What every run of one harness invocation shares.
pub struct Env {
    /// Folder of the `infermesh` and `infermesh-agent` binaries.
    pub bin_dir: PathBuf,
    /// Folder under which each run gets its own.
    pub root: PathBuf,
    /// The generated tensor model.
    pub model: PathBuf,
    /// The harness's Postgres (one cluster; a database per run).
    pub pg: Option<PrivatePostgres>,
    /// Whether network namespaces can be made (root).
    pub namespaces: bool,
    /// Whether a tmpfs can be mounted (root).
    pub tmpfs: bool,
    /// Keep every run's folder, not only those of failing runs.
    pub keep: bool,
}

/// One run's outcome.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RunReport {
    /// Seed.
    pub seed: u64,
    /// Scenario.
    pub scenario: String,
    /// `postgres` or `sqlite`.
    pub store: String,
    /// Agents.
    pub agents: usize,
    /// Records.
    pub records: usize,
    /// The faults as played (`kind@start+hold`), or why one was not.
    pub faults: Vec<String>,
    /// `Succeeded`, `Failed: reason`, `skipped: why`, or `no terminal phase`.
    pub outcome: String,
    /// Invariants that did not hold.
    pub violations: Vec<String>,
    /// Recovery times (kind, seconds).
    pub recoveries: Vec<(String, f64)>,
    /// Wall time of the run, s.
    pub wall_s: f64,
    /// The run's folder (kept when something did not hold).
    pub dir: String,
}

impl RunReport {
    /// Whether the run was played (not skipped for want of root or Postgres).
    pub fn played(&self) -> bool {
        !self.outcome.starts_with("skipped")
    }
}

/// Processes of the run, shared with the fault threads.
struct Procs {
    operator: Option<Child>,
    /// Operator starts so far (the next log's number).
    operator_starts: usize,
    /// The operator was killed on purpose and a fault thread starts it again.
    operator_down: bool,
    agents: Vec<Option<Child>>,
    agent_starts: Vec<usize>,
}

struct Run<'a> {
    env: &'a Env,
    s: &'a Schedule,
    dir: PathBuf,
    net: Net,
    url: String,
    admin_url: String,
    manifest: PathBuf,
    input: PathBuf,
    out: PathBuf,
    mnt: Option<PathBuf>,
    port: u16,
    procs: Mutex<Procs>,
    timeline: Mutex<Timeline>,
    done: std::sync::atomic::AtomicBool,
    /// One fault at a time per target (an agent, Postgres, the operator, the disk): a mix
    /// may draw two for the same one, and they play one after the other.
    targets: Vec<Mutex<()>>,
    /// The S3 server and its proxy, when the input and output are on S3.
    objects: Option<Objects>,
}

/// moto's S3 server and the delaying proxy in front of it, in the operator's namespace.
struct Objects {
    /// The two processes (killed at the tear-down).
    servers: Mutex<Vec<Child>>,
    /// The server's endpoint, for the harness's own reads (in the operator's namespace).
    direct: String,
    /// The proxy's port: the operator dials it on loopback, agents on their link.
    proxy_port: u16,
    /// The file whose number (ms) the proxy holds each request for.
    delay_file: PathBuf,
}

/// The input and output of a run on S3.
const S3_INPUT: &str = "s3://chaos/in.jsonl";
const S3_OUTPUT: &str = "s3://chaos/out/";

/// Sets the `AWS_*` of a process that reaches the S3 server at `endpoint` (and only those:
/// the harness's own are not passed on).
fn aws(cmd: &mut Command, endpoint: &str) {
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("AWS_")) {
        cmd.env_remove(k);
    }
    cmd.env("AWS_ENDPOINT", endpoint)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ALLOW_HTTP", "true");
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

/// The bound on a run: the workload must reach a terminal phase within it.
pub const BOUND: Duration = Duration::from_secs(150);

/// Plays `schedule` and checks the invariants.
pub fn run_seed(env: &Env, s: &Schedule) -> RunReport {
    let started = Instant::now();
    let dir = env.root.join(format!("seed-{}", s.seed));
    let mut report = RunReport {
        seed: s.seed,
        scenario: s.scenario.clone(),
        store: match s.store {
            StoreKind::Postgres => "postgres".into(),
            StoreKind::Sqlite => "sqlite".into(),
        },
        agents: s.agents,
        records: s.records,
        faults: Vec::new(),
        outcome: String::new(),
        violations: Vec::new(),
        recoveries: Vec::new(),
        wall_s: 0.0,
        dir: dir.display().to_string(),
    };
    if let Some(why) = unplayable(env, s) {
        report.outcome = format!("skipped: {why}");
        return report;
    }
    match Run::prepare(env, s, dir.clone()) {
        Ok(run) => {
            run.play(&mut report);
            run.teardown();
            if report.violations.is_empty() {
                run.drop_database();
            }
        }
        Err(e) => report.violations.push(format!("set-up: {e}")),
    }
    report.wall_s = started.elapsed().as_secs_f64();
    if report.violations.is_empty() && !env.keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    report
}

fn unplayable(env: &Env, s: &Schedule) -> Option<&'static str> {
    for t in &s.faults {
        if t.fault.needs_namespaces() && !env.namespaces {
            return Some("network faults need root (network namespaces)");
        }
        if t.fault.needs_tmpfs() && !env.tmpfs {
            return Some("disk faults need root (a tmpfs)");
        }
    }
    if s.store == StoreKind::Postgres && env.pg.is_none() {
        return Some("no Postgres");
    }
    None
}

fn tensor_input(path: &Path, n: usize, salt: u32) -> std::io::Result<()> {
    let mut text = String::with_capacity(n * 64);
    for i in 0..n {
        let x = [i as f32 / 100.0, salt as f32, -((i % 7) as f32), 0.5];
        text.push_str(&serde_json::json!({"id": i, "x": x}).to_string());
        text.push('\n');
    }
    std::fs::write(path, text)
}

impl<'a> Run<'a> {
    fn prepare(env: &'a Env, s: &'a Schedule, dir: PathBuf) -> Result<Self, String> {
        let _ = unmount(&dir.join("mnt"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let input = dir.join("in.jsonl");
        tensor_input(&input, s.records, 1).map_err(|e| e.to_string())?;
        let mnt = s
            .faults
            .iter()
            .any(|t| t.fault.needs_tmpfs())
            .then(|| dir.join("mnt"));
        let out = match &mnt {
            Some(m) => {
                std::fs::create_dir_all(m).map_err(|e| e.to_string())?;
                sh(Command::new("mount")
                    .args(["-t", "tmpfs", "-o", "size=128m", "chaos"])
                    .arg(m))?;
                m.join("out")
            }
            None => dir.join("out"),
        };
        let manifest = dir.join("mesh.yaml");
        let sha = crate::sha256_file(&env.model);
        std::fs::write(
            &manifest,
            format!(
                "apiVersion: infermesh.dev/v1alpha1\nkind: Mesh\nmetadata: {{name: chaos}}\nspec:\n  nodeSelector: {{}}\n  \
                 agent: {{slots: 1, executionProviders: [cpu]}}\n  leaseSeconds: {lease}\n  heartbeatSeconds: 1\n  \
                 pricing: {{perCpuSecond: 0.05, perThousandRecords: 0.2}}\n---\n\
                 apiVersion: infermesh.dev/v1alpha1\nkind: Workload\nmetadata: {{name: job, namespace: team-a}}\nspec:\n  mesh: chaos\n  \
                 model: {{uri: \"{model}\", sha256: \"{sha}\"}}\n  task:\n    tensor:\n      inputs: [{{name: x}}]\n      outputs: [y, s]\n  \
                 input: {{uri: \"{input}\"}}\n  output: {{uri: \"{out}\"}}\n  batchSize: 1\n  shardBytes: {shard_bytes}\n  maxAttempts: 10\n",
                shard_bytes = s.shard_bytes,
                lease = super::LEASE.as_secs(),
                model = env.model.display(),
                input = if s.object_store() {
                    S3_INPUT.to_string()
                } else {
                    input.display().to_string()
                },
                out = if s.object_store() {
                    S3_OUTPUT.to_string()
                } else {
                    format!("{}/", out.display())
                },
            ),
        )
        .map_err(|e| e.to_string())?;
        let tag = format!("{}-{}", std::process::id() % 100_000, s.seed);
        let (url, admin_url) = match s.store {
            StoreKind::Sqlite => {
                let u = format!("sqlite://{}", dir.join("store.db").display());
                (u.clone(), u)
            }
            StoreKind::Postgres => {
                let pg = env.pg.as_ref().ok_or("no Postgres")?;
                let db = format!("chaos_{}", tag.replace('-', "_"));
                let admin = pg.admin_url();
                sh(Command::new("psql").arg(&admin).args([
                    "-q",
                    "-c",
                    &format!("DROP DATABASE IF EXISTS {db}"),
                ]))?;
                sh(Command::new("psql").arg(&admin).args([
                    "-q",
                    "-c",
                    &format!("CREATE DATABASE {db}"),
                ]))?;
                let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
                (pg.socket_url(&db), format!("{base}/{db}"))
            }
        };
        let net = Net::up(&tag, s.agents, env.namespaces)?;
        let port = if net.faults_possible() {
            7070
        } else {
            free_port()?
        };
        let objects = if s.object_store() {
            match Self::start_objects(env, &net, &dir, &input) {
                Ok(o) => Some(o),
                Err(e) => {
                    net.down();
                    return Err(e);
                }
            }
        } else {
            None
        };
        Ok(Self {
            env,
            s,
            dir,
            net,
            url,
            admin_url,
            manifest,
            input,
            out,
            mnt,
            port,
            procs: Mutex::new(Procs {
                operator: None,
                operator_starts: 0,
                operator_down: false,
                agents: (0..s.agents).map(|_| None).collect(),
                agent_starts: vec![0; s.agents],
            }),
            timeline: Mutex::new(Timeline::default()),
            done: std::sync::atomic::AtomicBool::new(false),
            targets: (0..s.agents + 3).map(|_| Mutex::new(())).collect(),
            objects,
        })
    }

    /// Starts moto and the proxy in the operator's namespace, makes the bucket and uploads
    /// the input.
    fn start_objects(env: &Env, net: &Net, dir: &Path, input: &Path) -> Result<Objects, String> {
        let (moto_port, proxy_port) = if net.faults_possible() {
            (9100, 9101)
        } else {
            (free_port()?, free_port()?)
        };
        let direct = format!("http://127.0.0.1:{moto_port}");
        let delay_file = dir.join("store-delay");
        std::fs::write(&delay_file, "0").map_err(|e| e.to_string())?;
        let log = |name: &str| {
            std::fs::File::create(dir.join(name))
                .map(Stdio::from)
                .map_err(|e| e.to_string())
        };
        let moto = net
            .in_operator(&crate::python())
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
            .arg(moto_port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log("moto.txt")?)
            .spawn()
            .map_err(|e| format!("moto: {e}"))?;
        let objects = Objects {
            servers: Mutex::new(vec![moto]),
            direct,
            proxy_port,
            delay_file,
        };
        let listen = if net.faults_possible() {
            format!("0.0.0.0:{proxy_port}")
        } else {
            format!("127.0.0.1:{proxy_port}")
        };
        let proxy = net
            .in_operator(&env.bin_dir.join("infermesh-chaos"))
            .arg("proxy")
            .arg("--listen")
            .arg(listen)
            .arg("--upstream")
            .arg(format!("127.0.0.1:{moto_port}"))
            .arg("--delay-file")
            .arg(&objects.delay_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log("proxy.txt")?)
            .spawn()
            .map_err(|e| format!("the proxy: {e}"));
        match proxy {
            Ok(p) => objects
                .servers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(p),
            Err(e) => {
                objects.stop();
                return Err(e);
            }
        }
        let chaos = env.bin_dir.join("infermesh-chaos");
        let mut bucket = net.in_operator(&chaos);
        bucket.args(["s3", "bucket", super::s3::BUCKET]);
        let mut put = net.in_operator(&chaos);
        put.args(["s3", "put"]).arg(input).arg(S3_INPUT);
        for cmd in [&mut bucket, &mut put] {
            aws(cmd, &objects.direct);
            if let Err(e) = sh(cmd) {
                objects.stop();
                return Err(e);
            }
        }
        Ok(objects)
    }

    /// An `infermesh-chaos s3 …` command against the S3 server directly.
    fn s3(&self, args: &[&str]) -> Option<Command> {
        let o = self.objects.as_ref()?;
        let mut cmd = self
            .net
            .in_operator(&self.env.bin_dir.join("infermesh-chaos"));
        cmd.arg("s3").args(args);
        aws(&mut cmd, &o.direct);
        Some(cmd)
    }

    fn procs(&self) -> std::sync::MutexGuard<'_, Procs> {
        self.procs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn start_operator(&self, resume: bool) -> Result<(), String> {
        let mut p = self.procs();
        let n = p.operator_starts;
        let log = std::fs::File::create(self.dir.join(format!("operator-{n}.log")))
            .map_err(|e| e.to_string())?;
        let mut cmd = self.net.in_operator(&self.env.bin_dir.join("infermesh"));
        cmd.arg("local")
            .arg("-f")
            .arg(&self.manifest)
            .args(["--agents", "0", "--external-agents"])
            .arg(self.s.agents.to_string())
            .arg("--credentials")
            .arg(self.dir.join("credentials.json"))
            .arg("--listen")
            .arg(self.net.operator_listen(self.port))
            .arg("--database-url")
            .arg(&self.url)
            .args(["--no-progress", "--timeout"])
            .arg(BOUND.as_secs().to_string())
            .arg("--work-dir")
            .arg(self.dir.join("work"))
            // sqlx's pool logs every failed ping while Postgres is down: not what a failing
            // run's log tail is read for.
            .env("INFERMESH_LOG", "info,sqlx=error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if resume {
            cmd.arg("--resume");
        }
        if let Some(o) = &self.objects {
            aws(&mut cmd, &format!("http://127.0.0.1:{}", o.proxy_port));
        }
        let child = cmd.spawn().map_err(|e| format!("infermesh local: {e}"))?;
        p.operator = Some(child);
        p.operator_starts += 1;
        p.operator_down = false;
        Ok(())
    }

    fn token(&self, i: usize) -> Result<String, String> {
        let path = self.dir.join("credentials.json");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(text) = std::fs::read_to_string(&path)
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            {
                let id = format!("chaos-external-{i}");
                if let Some(t) = v["agents"]
                    .as_array()
                    .and_then(|a| a.iter().find(|a| a["id"] == id.as_str()))
                    .and_then(|a| a["token"].as_str())
                {
                    return Ok(t.to_string());
                }
                return Err(format!("no token for {id} in {}", path.display()));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the operator wrote no credentials within 60 s:\n{}",
                    self.log_tail("operator-0.log")
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn start_agent(&self, i: usize) -> Result<(), String> {
        let token = self.token(i)?;
        let mut p = self.procs();
        let n = p.agent_starts[i];
        let log = std::fs::File::create(self.dir.join(format!("agent-{i}.{n}.log")))
            .map_err(|e| e.to_string())?;
        let mut cmd = self
            .net
            .in_agent(i, &self.env.bin_dir.join("infermesh-agent"));
        if let Some(o) = &self.objects {
            let host = self.net.operator_host(i);
            aws(&mut cmd, &format!("http://{host}:{}", o.proxy_port));
        }
        let child = cmd
            .arg("--operator")
            .arg(self.net.operator_url(i, self.port))
            .args(["--mesh", "chaos", "--node"])
            .arg(format!("external-{i}"))
            .arg("--agent-id")
            .arg(format!("chaos-external-{i}"))
            .args(["--slots", "1", "--intra-op-threads", "1"])
            .args(["--execution-providers", "cpu"])
            .arg("--model-cache")
            .arg(self.dir.join(format!("cache-{i}")))
            .env("INFERMESH_TOKEN", token)
            .env("INFERMESH_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("infermesh-agent: {e}"))?;
        p.agents[i] = Some(child);
        p.agent_starts[i] += 1;
        Ok(())
    }

    fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn committed_parts(&self) -> usize {
        if let Some(mut cmd) = self.s3(&["count", S3_OUTPUT]) {
            return cmd
                .output()
                .ok()
                .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
                .unwrap_or(0);
        }
        std::fs::read_dir(&self.out)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("part-"))
                    .count()
            })
            .unwrap_or(0)
    }

    /// Whether the current operator process is running.
    fn operator_running(&self) -> bool {
        let mut p = self.procs();
        match p.operator.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    fn signal(pid: u32, sig: &str) -> Result<(), String> {
        sh(Command::new("kill").args([sig, &pid.to_string()]))
    }

    fn agent_pid(&self, i: usize) -> Option<u32> {
        let mut p = self.procs();
        let c = p.agents[i].as_mut()?;
        matches!(c.try_wait(), Ok(None)).then(|| c.id())
    }

    /// Plays one fault from start to heal; returns what was played.
    fn play_fault(&self, fault: &Fault) -> Result<String, String> {
        let n = self.s.agents;
        let target = match fault {
            Fault::AgentKill { agent, .. }
            | Fault::AgentFreeze { agent, .. }
            | Fault::Partition { agent, .. }
            | Fault::Loss { agent, .. }
            | Fault::Duplicate { agent, .. }
            | Fault::Slow { agent, .. } => *agent,
            Fault::PostgresKill { .. } | Fault::PostgresRestart => n,
            // The disk, the input and the object store: a third target.
            Fault::OperatorKill { .. } => n + 1,
            _ => n + 2,
        };
        let _one_at_a_time = self.targets[target]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if self.done.load(std::sync::atomic::Ordering::SeqCst) {
            return Err("the run had ended".into());
        }
        let t0 = SystemTime::now();
        let mark = |s: &Self, heal: Option<SystemTime>, agent: Option<usize>| {
            s.timeline.lock().unwrap_or_else(|e| e.into_inner()).push(
                fault.kind(),
                t0,
                heal,
                agent,
            );
        };
        let pg = || self.env.pg.as_ref().ok_or("no Postgres".to_string());
        // A fault on an agent's link: applied, held, healed, and the heal marked.
        let on_link = |agent: usize,
                       hold: Duration,
                       apply: &dyn Fn() -> Result<(), String>,
                       heal: &dyn Fn() -> Result<(), String>|
         -> Result<(), String> {
            apply()?;
            std::thread::sleep(hold);
            heal()?;
            mark(self, Some(SystemTime::now()), Some(agent));
            Ok(())
        };
        match fault {
            Fault::AgentKill { agent, restart } => {
                let pid = self.agent_pid(*agent).ok_or("the agent is not running")?;
                Self::signal(pid, "-KILL")?;
                mark(self, None, Some(*agent));
                if let Some(after) = restart {
                    std::thread::sleep(*after);
                    if let Some(c) = self.procs().agents[*agent].as_mut() {
                        let _ = c.wait();
                    }
                    self.start_agent(*agent)?;
                    mark_back(self, "agent-back", *agent);
                }
                Ok(format!("agent-kill a{agent} restart {restart:?}"))
            }
            Fault::AgentFreeze { agent, hold } => {
                let pid = self.agent_pid(*agent).ok_or("the agent is not running")?;
                Self::signal(pid, "-STOP")?;
                std::thread::sleep(*hold);
                Self::signal(pid, "-CONT")?;
                mark(self, Some(SystemTime::now()), Some(*agent));
                Ok(format!("agent-freeze a{agent} {hold:?}"))
            }
            Fault::Partition { agent, hold } => {
                let (a, net) = (*agent, &self.net);
                on_link(a, *hold, &|| net.link(a, false), &|| net.link(a, true))?;
                Ok(format!("partition a{agent} {hold:?}"))
            }
            Fault::Loss {
                agent,
                percent,
                hold,
            } => {
                let (a, net) = (*agent, &self.net);
                on_link(a, *hold, &|| net.loss(a, *percent), &|| net.heal(a))?;
                Ok(format!("net-loss a{agent} {percent}% {hold:?}"))
            }
            Fault::Duplicate {
                agent,
                percent,
                hold,
            } => {
                let (a, net) = (*agent, &self.net);
                on_link(a, *hold, &|| net.duplicate(a, *percent), &|| net.heal(a))?;
                Ok(format!("net-dup a{agent} {percent}% {hold:?}"))
            }
            Fault::Slow { agent, kbit, hold } => {
                let (a, net) = (*agent, &self.net);
                on_link(a, *hold, &|| net.slow(a, *kbit), &|| net.heal(a))?;
                Ok(format!("net-slow a{agent} {kbit}kbit {hold:?}"))
            }
            Fault::PostgresKill { down } => {
                let pg = pg()?;
                let pid = pg.postmaster_pid().ok_or("Postgres is not running")?;
                Self::signal(pid, "-KILL")?;
                std::thread::sleep(*down);
                // The killed postmaster's backends go a moment later; until then a start
                // finds its shared memory in use.
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    match pg.start_again() {
                        Ok(()) => break,
                        Err(e) if Instant::now() > deadline => return Err(e),
                        Err(_) => std::thread::sleep(Duration::from_millis(200)),
                    }
                }
                mark(self, Some(SystemTime::now()), None);
                Ok(format!("pg-kill {down:?}"))
            }
            Fault::PostgresRestart => {
                pg()?.restart()?;
                mark(self, Some(SystemTime::now()), None);
                Ok("pg-restart".into())
            }
            Fault::OperatorKill { down } => {
                let pid = {
                    let mut p = self.procs();
                    let c = p.operator.as_mut().ok_or("no operator")?;
                    if !matches!(c.try_wait(), Ok(None)) {
                        return Err("the operator had already exited".into());
                    }
                    let pid = c.id();
                    p.operator_down = true;
                    pid
                };
                Self::signal(pid, "-KILL")?;
                if let Some(c) = self.procs().operator.as_mut() {
                    let _ = c.wait();
                }
                std::thread::sleep(*down);
                self.start_operator(true)?;
                mark(self, Some(SystemTime::now()), None);
                Ok(format!("operator-kill {down:?}"))
            }
            Fault::DiskFull { hold } => {
                let mnt = self.mnt.as_ref().ok_or("no tmpfs")?;
                let filler = mnt.join("filler");
                // dd stops at ENOSPC (exit 1): the file system is then full.
                let _ = Command::new("dd")
                    .arg("if=/dev/zero")
                    .arg(format!("of={}", filler.display()))
                    .args(["bs=64k", "status=none"])
                    .stderr(Stdio::null())
                    .status();
                std::thread::sleep(*hold);
                std::fs::remove_file(&filler).map_err(|e| e.to_string())?;
                mark(self, Some(SystemTime::now()), None);
                Ok(format!("disk-full {hold:?}"))
            }
            Fault::ReadOnly { hold } => {
                let mnt = self.mnt.as_ref().ok_or("no tmpfs")?;
                sh(Command::new("mount").args(["-o", "remount,ro"]).arg(mnt))?;
                std::thread::sleep(*hold);
                sh(Command::new("mount").args(["-o", "remount,rw"]).arg(mnt))?;
                mark(self, Some(SystemTime::now()), None);
                Ok(format!("read-only {hold:?}"))
            }
            Fault::InputTruncated { keep_percent } => {
                let len = std::fs::metadata(&self.input)
                    .map_err(|e| e.to_string())?
                    .len();
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&self.input)
                    .map_err(|e| e.to_string())?;
                f.set_len(len * u64::from(*keep_percent) / 100)
                    .map_err(|e| e.to_string())?;
                mark(self, None, None);
                Ok(format!("input-truncated to {keep_percent}%"))
            }
            Fault::StoreSlow { delay, hold } => {
                let o = self.objects.as_ref().ok_or("no object store")?;
                let set = |ms: u128| {
                    std::fs::write(&o.delay_file, ms.to_string())
                        .map_err(|e| format!("{}: {e}", o.delay_file.display()))
                };
                set(delay.as_millis())?;
                std::thread::sleep(*hold);
                set(0)?;
                mark(self, Some(SystemTime::now()), None);
                Ok(format!("store-slow {delay:?} a request {hold:?}"))
            }
            Fault::InputReplaced { same_size } => {
                // Same size: every record's second value 2 instead of 1, byte for byte as
                // long (only the input's version tells); longer: 500 records more.
                let next = self.dir.join("in.next.jsonl");
                let n = self.s.records + if *same_size { 0 } else { 500 };
                tensor_input(&next, n, 2).map_err(|e| e.to_string())?;
                std::fs::rename(&next, &self.input).map_err(|e| e.to_string())?;
                mark(self, None, None);
                Ok(format!(
                    "input-replaced ({})",
                    if *same_size { "same size" } else { "longer" }
                ))
            }
        }
    }

    fn play(&self, report: &mut RunReport) {
        let started = Instant::now();
        if let Err(e) = self.start_operator(false) {
            report.violations.push(e);
            return;
        }
        for i in 0..self.s.agents {
            if let Err(e) = self.start_agent(i) {
                report.violations.push(e);
                return;
            }
        }
        // Faults are timed from the first committed part: the run is under way.
        // On S3 each look is a process in the operator's namespace: look less often.
        let every = Duration::from_millis(if self.objects.is_some() { 200 } else { 20 });
        while self.committed_parts() == 0 && self.operator_running() {
            if started.elapsed() > BOUND {
                break;
            }
            std::thread::sleep(every);
        }
        let zero = Instant::now();
        let mut timed_out = false;
        std::thread::scope(|scope| {
            let threads: Vec<_> = self
                .s
                .faults
                .iter()
                .map(|t| {
                    scope.spawn(move || {
                        std::thread::sleep(t.at.saturating_sub(zero.elapsed()));
                        if self.done.load(std::sync::atomic::Ordering::SeqCst)
                            || !self.operator_alive()
                        {
                            return format!("{} not played: the run had ended", t.fault.kind());
                        }
                        match self.play_fault(&t.fault) {
                            Ok(s) => format!("{s} at +{:.1}s", t.at.as_secs_f64()),
                            Err(e) => format!("{} not played: {e}", t.fault.kind()),
                        }
                    })
                })
                .collect();

            // The run ends when the operator exits and no fault is about to start it again.
            loop {
                let ended = {
                    let mut p = self.procs();
                    let down = p.operator_down;
                    match p.operator.as_mut() {
                        Some(c) => !down && !matches!(c.try_wait(), Ok(None)),
                        None => true,
                    }
                };
                if ended {
                    break;
                }
                if started.elapsed() > BOUND + Duration::from_secs(30) {
                    timed_out = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            self.done.store(true, std::sync::atomic::Ordering::SeqCst);
            for t in threads {
                report
                    .faults
                    .push(t.join().unwrap_or_else(|_| "fault thread panicked".into()));
            }
        });
        // A fault thread may have started the operator again meanwhile (it was killed just
        // as the run ended): wait for that one too.
        loop {
            let ended = {
                let mut p = self.procs();
                match p.operator.as_mut() {
                    Some(c) => !matches!(c.try_wait(), Ok(None)),
                    None => true,
                }
            };
            if ended || started.elapsed() > BOUND + Duration::from_secs(40) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let exit = {
            let mut p = self.procs();
            p.operator.as_mut().and_then(|c| {
                if matches!(c.try_wait(), Ok(None)) {
                    let _ = c.kill();
                }
                c.wait().ok()
            })
        };
        // Drained agents exit by themselves; the rest are stopped.
        let deadline = Instant::now() + Duration::from_secs(10);
        for i in 0..self.s.agents {
            loop {
                let mut p = self.procs();
                let Some(c) = p.agents[i].as_mut() else { break };
                if !matches!(c.try_wait(), Ok(None)) {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = Self::signal(c.id(), "-CONT");
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                drop(p);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let timeline = self
            .timeline
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // A run on S3: the harness's copy of the outputs, and the checks' `infermesh` where
        // the server is.
        if let Some(mut cmd) = self.s3(&["get", S3_OUTPUT]) {
            let _ = std::fs::remove_dir_all(&self.out);
            if let Err(e) = sh(cmd.arg(&self.out)) {
                report
                    .violations
                    .push(format!("reading the outputs back: {e}"));
            }
        }
        let infermesh = self.env.bin_dir.join("infermesh");
        let facts = check::Facts {
            infermesh: match &self.objects {
                Some(o) => Box::new(move || {
                    let mut cmd = self.net.in_operator(&infermesh);
                    aws(&mut cmd, &o.direct);
                    cmd
                }),
                None => Box::new(move || Command::new(&infermesh)),
            },
            url: if self.objects.is_some() {
                self.url.clone()
            } else {
                self.admin_url.clone()
            },
            dir: self.dir.clone(),
            out: self.out.clone(),
            records: self.s.records,
            agents: self.s.agents,
            faults: self.s.faults.iter().map(|t| t.fault.clone()).collect(),
            exit: exit.and_then(|e| e.code()),
            timed_out,
        };
        let verdict = check::check(&facts, &timeline);
        report.outcome = verdict.outcome;
        report.violations.extend(verdict.violations);
        report.recoveries = verdict.recoveries;
    }

    fn operator_alive(&self) -> bool {
        let mut p = self.procs();
        p.operator_down
            || p.operator
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn teardown(&self) {
        {
            let mut p = self.procs();
            if let Some(c) = p.operator.as_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
            for c in p.agents.iter_mut().flatten() {
                let _ = Self::signal(c.id(), "-CONT");
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if let Some(o) = &self.objects {
            o.stop();
        }
        self.net.down();
        if let Some(m) = &self.mnt {
            let _ = sh(Command::new("mount").args(["-o", "remount,rw"]).arg(m));
            let _ = unmount(m);
        }
    }

    /// Drops the run's database (a failing run's is kept for a look).
    fn drop_database(&self) {
        if self.s.store == StoreKind::Postgres
            && let Some(pg) = &self.env.pg
            && let Some(db) = self.admin_url.rsplit_once('/').map(|(_, d)| d)
        {
            let _ = sh(Command::new("psql").arg(pg.admin_url()).args([
                "-q",
                "-c",
                &format!("DROP DATABASE IF EXISTS {db}"),
            ]));
        }
    }
}

impl Objects {
    fn stop(&self) {
        for c in self
            .servers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter_mut()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn mark_back(run: &Run<'_>, kind: &'static str, agent: usize) {
    run.timeline.lock().unwrap_or_else(|e| e.into_inner()).push(
        kind,
        SystemTime::now(),
        None,
        Some(agent),
    );
}

fn unmount(path: &Path) -> Result<(), String> {
    if !path.exists() {
        return Ok(());
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let p = path.display().to_string();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(&p))
    {
        sh(Command::new("umount").arg(path))?;
    }
    Ok(())
}
