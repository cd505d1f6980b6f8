//! The fallback CPU source for when the kernel refuses the programs (no BTF,
//! no CAP_BPF, a verifier rejection): samples `/proc/<pid>/stat` and
//! `/proc/stat`. Clock-tick resolution (10 ms at USER_HZ=100), and a process
//! that exits between two samples loses the time since the last sample:
//! every figure from here is marked `procfs`.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use agent_common::MAX_SOCKETS;

use super::{Comm, CpuReading, CpuSourceError, CpuTimeSource, Method, ProcessKey, ProcessUsage};
use crate::{procinfo, topology::Topology};

#[derive(Clone, Debug)]
struct Seen {
    total_ticks: u64,
    cgroup_id: u64,
    reads_since_cgroup_check: u32,
}

pub struct ProcfsCpuSource {
    procfs_root: PathBuf,
    cgroup_root: PathBuf,
    topology: Topology,
    ticks_per_second: u64,
    seen: HashMap<ProcessKey, Seen>,
    cgroup_ids: HashMap<String, u64>,
    /// The real path of the agent's cgroup namespace root, when it has one
    /// (inside a pod): `/proc/<pid>/cgroup` is then relative to it.
    namespace_root: Option<String>,
    last_busy_ticks: Vec<u64>,
    first_read: bool,
}

/// A process's cgroup is re-read every this many samples (processes rarely
/// move, and reading it for every process every second doubles the cost).
const CGROUP_RECHECK_EVERY: u32 = 30;

impl ProcfsCpuSource {
    pub fn new(
        procfs_root: impl Into<PathBuf>,
        cgroup_root: impl Into<PathBuf>,
        topology: Topology,
    ) -> Self {
        let procfs_root = procfs_root.into();
        let last_busy_ticks = read_busy_ticks(&procfs_root).unwrap_or_default();
        let cgroup_root = cgroup_root.into();
        let namespace_root = procinfo::cgroup_namespace_root(&procfs_root, &cgroup_root);
        if let Some(root) = &namespace_root {
            tracing::info!(
                namespace_root = root.as_str(),
                "in a cgroup namespace: /proc/<pid>/cgroup paths are resolved against its root"
            );
        }
        Self {
            procfs_root,
            cgroup_root,
            namespace_root,
            topology,
            ticks_per_second: procinfo::clock_ticks_per_second(),
            seen: HashMap::new(),
            cgroup_ids: HashMap::new(),
            last_busy_ticks,
            first_read: true,
        }
    }

    fn cgroup_id(&mut self, pid: u32) -> u64 {
        let Some(path) = procinfo::read_v2_cgroup_path(&self.procfs_root, pid) else {
            return 0;
        };
        if let Some(id) = self.cgroup_ids.get(&path) {
            return *id;
        }
        let real = match &self.namespace_root {
            Some(root) => procinfo::resolve_in_namespace(root, &path),
            None => Some(path.clone()),
        };
        let id = real.map_or(0, |real| {
            let full = self.cgroup_root.join(real.trim_start_matches('/'));
            std::fs::metadata(full).map(|m| m.ino()).unwrap_or(0)
        });
        self.cgroup_ids.insert(path, id);
        id
    }
}

impl CpuTimeSource for ProcfsCpuSource {
    fn method(&self) -> Method {
        Method::Procfs
    }

    fn read(&mut self) -> Result<CpuReading, CpuSourceError> {
        let mut reading = CpuReading::default();
        let pids = procinfo::list_pids(&self.procfs_root).map_err(|source| CpuSourceError::Io {
            what: self.procfs_root.display().to_string(),
            source,
        })?;
        let ns_per_tick = 1_000_000_000 / self.ticks_per_second;
        let mut current: HashMap<ProcessKey, Seen> = HashMap::with_capacity(pids.len());
        for pid in pids {
            let Some(stat) = procinfo::read_stat(&self.procfs_root, pid) else {
                continue; // exited while we listed
            };
            let key = ProcessKey {
                pid,
                start_ns: procinfo::ticks_to_ns(stat.starttime, self.ticks_per_second),
            };
            let total_ticks = stat.utime + stat.stime;
            let previous = self.seen.remove(&key);
            let cgroup_id = match &previous {
                Some(p) if p.reads_since_cgroup_check < CGROUP_RECHECK_EVERY => p.cgroup_id,
                _ => self.cgroup_id(pid),
            };
            let reads_since_cgroup_check = match &previous {
                Some(p)
                    if p.cgroup_id == cgroup_id
                        && p.reads_since_cgroup_check < CGROUP_RECHECK_EVERY =>
                {
                    p.reads_since_cgroup_check + 1
                }
                _ => 0,
            };
            // The first sample is the baseline: history before the agent
            // started is not reported, as with the kernel programs.
            let before = match &previous {
                Some(p) => p.total_ticks,
                None if self.first_read => total_ticks,
                None => 0,
            };
            let delta_ticks = total_ticks.saturating_sub(before);
            if delta_ticks > 0 {
                let mut runtime_ns_by_socket = [0u64; MAX_SOCKETS];
                let cpu = stat.processor.unwrap_or(0).max(0) as u32;
                runtime_ns_by_socket[self.topology.socket_of(cpu)] = delta_ticks * ns_per_tick;
                reading.usage.push(ProcessUsage {
                    key,
                    comm: Comm::from_str_lossy(&stat.comm),
                    cgroup_id,
                    runtime_ns_by_socket,
                });
            }
            current.insert(
                key,
                Seen {
                    total_ticks,
                    cgroup_id,
                    reads_since_cgroup_check,
                },
            );
        }
        // Whatever we saw last time and not now has exited.
        reading.exited.extend(self.seen.keys().copied());
        self.seen = current;
        // Paths of cgroups long gone would pile up: start the cache afresh
        // when it holds far more paths than there are processes.
        if self.cgroup_ids.len() > 4096 + 2 * self.seen.len() {
            self.cgroup_ids.clear();
        }
        self.first_read = false;

        let busy = read_busy_ticks(&self.procfs_root).map_err(|source| CpuSourceError::Io {
            what: self.procfs_root.join("stat").display().to_string(),
            source,
        })?;
        reading.busy_ns_by_cpu = busy
            .iter()
            .enumerate()
            .map(|(cpu, now)| {
                now.saturating_sub(self.last_busy_ticks.get(cpu).copied().unwrap_or(*now))
                    * ns_per_tick
            })
            .collect();
        self.last_busy_ticks = busy;
        Ok(reading)
    }
}

fn read_busy_ticks(procfs_root: &Path) -> std::io::Result<Vec<u64>> {
    Ok(parse_busy_ticks(&std::fs::read_to_string(
        procfs_root.join("stat"),
    )?))
}

/// Per-CPU busy ticks from `/proc/stat`: everything but idle and iowait.
pub fn parse_busy_ticks(text: &str) -> Vec<u64> {
    let mut busy = Vec::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let Some(name) = fields.next() else { continue };
        let Some(cpu) = name
            .strip_prefix("cpu")
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        let values: Vec<u64> = fields.map(|f| f.parse().unwrap_or(0)).collect();
        // user nice system idle iowait irq softirq steal guest guest_nice;
        // guest time is already inside user; steal is time the hypervisor
        // gave another guest, not work done here: stop before it.
        let total: u64 = values.iter().take(7).sum();
        let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
        if busy.len() <= cpu {
            busy.resize(cpu + 1, 0);
        }
        busy[cpu] = total.saturating_sub(idle);
    }
    busy
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_ticks_exclude_idle_iowait_steal_and_guest() {
        let text = "cpu  10 0 10 100 5 0 0 0 0 0\ncpu0 4 1 2 50 3 1 1 7 9 9\ncpu1 6 0 8 50 2 0 0 0 0 0\nintr 1 2 3\n";
        assert_eq!(parse_busy_ticks(text), vec![9, 14]);
    }

    #[test]
    fn sees_its_own_cpu_time() {
        let root = Path::new("/proc");
        let mut source = ProcfsCpuSource::new(root, "/nonexistent", Topology::uniform(1));
        source.read().unwrap();
        // Burn ~50 ms of CPU so at least a few ticks accrue.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(80) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let reading = source.read().unwrap();
        let own = reading
            .usage
            .iter()
            .find(|u| u.key.pid == std::process::id())
            .expect("this test process in the reading");
        assert!(own.runtime_ns_by_socket[0] > 0);
    }
}
