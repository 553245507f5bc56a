//! The run's hosts: the operator in a network namespace of its own and each agent in another,
//! joined by a veth pair (operator side `aI`, agent side `eth0`, subnet 10.213.I.0/30). Nothing
//! is added to the machine's own namespace, and nothing leaves the machine. Without root the
//! run falls back to loopback, and the network faults are not available.

use std::process::Command;

/// Where the processes of a run live.
pub enum Net {
    /// Network namespaces (root only).
    Namespaces {
        /// Prefix of this run's namespaces.
        prefix: String,
        /// Agents.
        agents: usize,
    },
    /// Everything on loopback.
    Loopback,
}

pub(crate) fn sh(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    sh(Command::new("ip").args(args))
}

/// Removes every `imc-*` network namespace (a harness's), ending the processes in it; returns
/// how many. For what an interrupted harness left behind.
pub fn clean_all() -> usize {
    let list = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut n = 0;
    for ns in list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|ns| ns.starts_with("imc-"))
    {
        let pids = Command::new("ip")
            .args(["netns", "pids", ns])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for pid in pids.split_whitespace() {
            let _ = sh(Command::new("kill").args(["-KILL", pid]));
        }
        if ip(&["netns", "del", ns]).is_ok() {
            n += 1;
        }
    }
    n
}

/// Whether network namespaces can be made here (root, `ip netns`).
pub fn namespaces_available() -> bool {
    let probe = format!("imc-probe-{}", std::process::id());
    let ok = ip(&["netns", "add", &probe]).is_ok();
    if ok {
        let _ = ip(&["netns", "del", &probe]);
    }
    ok
}

impl Net {
    /// Makes the namespaces and links of a run with `agents` agents (`tag` keeps concurrent
    /// runs apart), or loopback when namespaces cannot be made.
    pub fn up(tag: &str, agents: usize, want_namespaces: bool) -> Result<Self, String> {
        if !want_namespaces {
            return Ok(Self::Loopback);
        }
        let net = Self::Namespaces {
            prefix: format!("imc-{tag}"),
            agents,
        };
        if let Err(e) = net.build() {
            net.down();
            return Err(e);
        }
        Ok(net)
    }

    fn build(&self) -> Result<(), String> {
        let Self::Namespaces { prefix, agents } = self else {
            return Ok(());
        };
        let op = format!("{prefix}-op");
        ip(&["netns", "add", &op])?;
        ip(&["-n", &op, "link", "set", "lo", "up"])?;
        for i in 0..*agents {
            let ag = format!("{prefix}-a{i}");
            ip(&["netns", "add", &ag])?;
            ip(&["-n", &ag, "link", "set", "lo", "up"])?;
            let side = format!("a{i}");
            ip(&[
                "link", "add", "name", &side, "netns", &op, "type", "veth", "peer", "name", "eth0",
                "netns", &ag,
            ])?;
            ip(&[
                "-n",
                &op,
                "addr",
                "add",
                &format!("10.213.{i}.1/30"),
                "dev",
                &side,
            ])?;
            ip(&["-n", &op, "link", "set", &side, "up"])?;
            ip(&[
                "-n",
                &ag,
                "addr",
                "add",
                &format!("10.213.{i}.2/30"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ag, "link", "set", "eth0", "up"])?;
        }
        Ok(())
    }

    /// Removes the namespaces (their links go with them).
    pub fn down(&self) {
        if let Self::Namespaces { prefix, agents } = self {
            for i in 0..*agents {
                let _ = ip(&["netns", "del", &format!("{prefix}-a{i}")]);
            }
            let _ = ip(&["netns", "del", &format!("{prefix}-op")]);
        }
    }

    /// Whether network faults can be injected.
    pub fn faults_possible(&self) -> bool {
        matches!(self, Self::Namespaces { .. })
    }

    /// The operator's listen address and, per agent, the URL it dials.
    pub fn operator_listen(&self, port: u16) -> String {
        match self {
            Self::Namespaces { .. } => format!("0.0.0.0:{port}"),
            Self::Loopback => format!("127.0.0.1:{port}"),
        }
    }

    /// The operator URL agent `i` dials.
    pub fn operator_url(&self, i: usize, port: u16) -> String {
        format!("http://{}:{port}", self.operator_host(i))
    }

    /// The address at which agent `i` reaches the operator's host (its end of the link).
    pub fn operator_host(&self, i: usize) -> String {
        match self {
            Self::Namespaces { .. } => format!("10.213.{i}.1"),
            Self::Loopback => "127.0.0.1".into(),
        }
    }

    /// A command run in the operator's namespace.
    pub fn in_operator(&self, program: &std::path::Path) -> Command {
        self.wrap(program, "op")
    }

    /// A command run in agent `i`'s namespace.
    pub fn in_agent(&self, i: usize, program: &std::path::Path) -> Command {
        self.wrap(program, &format!("a{i}"))
    }

    fn wrap(&self, program: &std::path::Path, host: &str) -> Command {
        match self {
            Self::Namespaces { prefix, .. } => {
                // `ip netns exec` sets the namespace and execs the program: the child's pid is
                // the program's, so signals reach it directly.
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &format!("{prefix}-{host}")])
                    .arg(program);
                c
            }
            Self::Loopback => Command::new(program),
        }
    }

    fn agent_ns(&self, i: usize) -> Result<String, String> {
        match self {
            Self::Namespaces { prefix, .. } => Ok(format!("{prefix}-a{i}")),
            Self::Loopback => Err("network faults need network namespaces (root)".into()),
        }
    }

    fn op_ns(&self) -> Result<String, String> {
        match self {
            Self::Namespaces { prefix, .. } => Ok(format!("{prefix}-op")),
            Self::Loopback => Err("network faults need network namespaces (root)".into()),
        }
    }

    /// Takes agent `i`'s link down (`up == false`) or up again.
    pub fn link(&self, i: usize, up: bool) -> Result<(), String> {
        let ns = self.agent_ns(i)?;
        ip(&[
            "-n",
            &ns,
            "link",
            "set",
            "eth0",
            if up { "up" } else { "down" },
        ])
    }

    /// Drops `percent` % of agent `i`'s packets, both ways, at random (nftables `numgen`).
    pub fn loss(&self, i: usize, percent: u32) -> Result<(), String> {
        let ns = self.agent_ns(i)?;
        let rules = format!(
            "table inet chaos_loss {{\n\
             chain o {{ type filter hook output priority 0; oifname \"eth0\" numgen random mod 100 < {percent} drop; }}\n\
             chain i {{ type filter hook input priority 0; iifname \"eth0\" numgen random mod 100 < {percent} drop; }}\n}}\n"
        );
        nft(&ns, &rules)
    }

    /// Sends `percent` % of agent `i`'s packets to the operator twice (nftables `dup`).
    pub fn duplicate(&self, i: usize, percent: u32) -> Result<(), String> {
        let ns = self.agent_ns(i)?;
        let rules = format!(
            "table ip chaos_dup {{\n\
             chain o {{ type filter hook output priority 0; oifname \"eth0\" numgen random mod 100 < {percent} dup to 10.213.{i}.1 device \"eth0\"; }}\n}}\n"
        );
        nft(&ns, &rules)
    }

    /// A slow link both ways: a token bucket of `kbit` kbit/s (queueing delay up to 2 s).
    pub fn slow(&self, i: usize, kbit: u32) -> Result<(), String> {
        let ns = self.agent_ns(i)?;
        let op = self.op_ns()?;
        let rate = format!("{kbit}kbit");
        for (ns, dev) in [
            (ns.as_str(), "eth0".to_string()),
            (op.as_str(), format!("a{i}")),
        ] {
            sh(Command::new("tc").args([
                "-n", ns, "qdisc", "replace", "dev", &dev, "root", "tbf", "rate", &rate, "burst",
                "4kb", "latency", "2s",
            ]))?;
        }
        Ok(())
    }

    /// Removes the loss, duplication and shaping of agent `i`'s link.
    pub fn heal(&self, i: usize) -> Result<(), String> {
        let ns = self.agent_ns(i)?;
        let op = self.op_ns()?;
        let _ = sh(Command::new("ip").args([
            "netns",
            "exec",
            &ns,
            "nft",
            "delete",
            "table",
            "inet",
            "chaos_loss",
        ]));
        let _ = sh(Command::new("ip").args([
            "netns",
            "exec",
            &ns,
            "nft",
            "delete",
            "table",
            "ip",
            "chaos_dup",
        ]));
        let _ = sh(Command::new("tc").args(["-n", &ns, "qdisc", "del", "dev", "eth0", "root"]));
        let _ = sh(Command::new("tc").args([
            "-n",
            &op,
            "qdisc",
            "del",
            "dev",
            &format!("a{i}"),
            "root",
        ]));
        Ok(())
    }
}

fn nft(ns: &str, rules: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("nft: {e} (install nftables)"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(rules.as_bytes())
            .map_err(|e| format!("nft: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft failed: {}\n{rules}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
