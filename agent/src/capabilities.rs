//! What this node offers: CPUs, memory, GPUs.

use infermesh_proto::Gpu;

/// Logical CPUs available to this process.
pub fn cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

/// Total host memory in bytes, from /proc/meminfo.
pub fn memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// GPUs as `nvidia-smi` reports them; none when it is absent or fails.
pub fn gpus() -> Vec<Gpu> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,memory.total",
            "--format=csv,noheader,nounits",
        ])
        .output();
    match out {
        Ok(o) if o.status.success() => parse_nvidia_smi(&String::from_utf8_lossy(&o.stdout)),
        _ => Vec::new(),
    }
}

/// Parses `name, memory MiB` lines.
pub fn parse_nvidia_smi(text: &str) -> Vec<Gpu> {
    text.lines()
        .filter_map(|l| {
            let (name, mem) = l.rsplit_once(',')?;
            let mib: u64 = mem.trim().parse().ok()?;
            Some(Gpu {
                product: name.trim().to_string(),
                memory_bytes: mib * 1024 * 1024,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvidia_smi_lines_parse() {
        let gpus = parse_nvidia_smi("NVIDIA H100 80GB HBM3, 81559\nNVIDIA A10, 23028\n");
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[0].product, "NVIDIA H100 80GB HBM3");
        assert_eq!(gpus[1].memory_bytes, 23028 * 1024 * 1024);
    }
}
