//! Cumulative CPU time per process, per workload and per CPU, built from the
//! deltas of each [`CpuReading`]. Pure: the cgroup lookups it needs come in
//! as closures, so the bookkeeping is tested without a kernel.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustc_hash::FxHashMap;

use crate::{
    cgroup::Workload,
    cpu::{Comm, CpuReading, ProcessKey, ProcessUsage, SocketNs, total_ns},
    energy::{
        Domain, DomainId, EnergyMethod,
        attribution::{IdleBaseline, IdlePolicy, split},
        collector::EnergyInterval,
    },
};

/// Joules per domain, indexed by `Domain as usize` (the order of `Domain::ALL`).
pub type DomainJoules = [f64; Domain::ALL.len()];

/// Energy charged to a process or workload: cumulative, and in the last
/// interval that charged anything (`seq`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Energy {
    pub joules: DomainJoules,
    pub interval_joules: DomainJoules,
    pub interval_seq: u64,
}

impl Energy {
    fn charge(&mut self, domain: Domain, joules: f64, seq: u64) {
        if self.interval_seq != seq {
            self.interval_seq = seq;
            self.interval_joules = [0.0; Domain::ALL.len()];
        }
        self.joules[domain as usize] += joules;
        self.interval_joules[domain as usize] += joules;
    }

    /// The last interval's joules if it was interval `seq`, else zeros.
    pub fn interval(&self, seq: u64) -> DomainJoules {
        if self.interval_seq == seq {
            self.interval_joules
        } else {
            [0.0; Domain::ALL.len()]
        }
    }
}

/// The node's books per domain: measured = attributed + idle + unattributed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeEnergy {
    pub measured: DomainJoules,
    pub attributed: DomainJoules,
    pub idle: DomainJoules,
    pub unattributed: DomainJoules,
    pub interval_measured: DomainJoules,
    pub interval_attributed: DomainJoules,
    pub interval_idle: DomainJoules,
    pub interval_unattributed: DomainJoules,
    /// One standard deviation of the last interval's estimates.
    pub interval_uncertainty: DomainJoules,
    pub interval_seconds: f64,
    pub methods: [Option<EnergyMethod>; Domain::ALL.len()],
    /// Idle power used for each domain in the last interval (watts).
    pub idle_watts: DomainJoules,
}

/// How a cgroup id resolves: its workload and path (`None` when the cgroup
/// vanished before it could be looked up).
pub struct Resolved {
    pub workload: Arc<Workload>,
    pub path: Option<Arc<str>>,
}

/// A stable key for a workload: `container:<id>`, `pod:<uid>`,
/// `service:<unit>` or `host`.
pub fn workload_key(workload: &Workload) -> String {
    match workload {
        Workload::Host => "host".to_owned(),
        other => format!("{}:{}", other.kind(), other.name()),
    }
}

#[derive(Clone, Debug)]
pub struct ProcessEntry {
    pub comm: Comm,
    pub cgroup_id: u64,
    /// Slot of the process's workload in `Accounting::workload_slots`.
    pub workload: usize,
    pub cpu_ns_by_socket: SocketNs,
    /// CPU time in the interval numbered `interval_seq`.
    pub interval_ns: u64,
    pub interval_seq: u64,
    pub energy: Energy,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
    pub exited_at: Option<SystemTime>,
}

#[derive(Clone, Debug)]
pub struct WorkloadEntry {
    pub key: Arc<str>,
    pub workload: Arc<Workload>,
    pub cgroup_path: Option<Arc<str>>,
    pub cgroup_ids: Vec<u64>,
    pub cpu_ns_by_socket: SocketNs,
    pub interval_ns: u64,
    pub interval_seq: u64,
    pub energy: Energy,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
    pub exited_at: Option<SystemTime>,
    pub live_processes: u32,
    last_existence_check: Option<SystemTime>,
}

/// Per-CPU time, cumulative since the agent started.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeCpu {
    pub busy_ns_by_cpu: Vec<u64>,
    pub idle_ns_by_cpu: Vec<u64>,
    /// Busy time of the last interval, summed over CPUs.
    pub interval_busy_ns: u64,
    /// Wall time of the last interval times the number of CPUs.
    pub interval_capacity_ns: u64,
}

pub struct Accounting {
    processes: FxHashMap<ProcessKey, ProcessEntry>,
    /// Workloads in stable slots, so a process refers to its workload by
    /// index; freed slots (`None`) are reused.
    workload_slots: Vec<Option<WorkloadEntry>>,
    workload_index: FxHashMap<Arc<str>, usize>,
    free_slots: Vec<usize>,
    /// Workload slot of each cgroup id seen.
    cgroup_slots: FxHashMap<u64, (usize, Option<Arc<str>>)>,
    node: NodeCpu,
    node_energy: NodeEnergy,
    baselines: FxHashMap<DomainId, IdleBaseline>,
    retention: Duration,
    /// How often a workload without live processes is checked for its
    /// cgroup still existing.
    existence_check_every: Duration,
    seq: u64,
    /// Wall time of readings that came without per-CPU busy figures, added
    /// to the node's window of the next reading that has them.
    node_wall_pending: Duration,
}

impl Accounting {
    pub fn new(retention: Duration) -> Self {
        Self {
            processes: FxHashMap::default(),
            workload_slots: Vec::new(),
            workload_index: FxHashMap::default(),
            free_slots: Vec::new(),
            cgroup_slots: FxHashMap::default(),
            node: NodeCpu::default(),
            node_energy: NodeEnergy::default(),
            baselines: FxHashMap::default(),
            retention,
            existence_check_every: Duration::from_secs(5),
            seq: 0,
            node_wall_pending: Duration::ZERO,
        }
    }

    /// The number of the interval last applied.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn processes(&self) -> &FxHashMap<ProcessKey, ProcessEntry> {
        &self.processes
    }

    /// Workload slots; a process's `workload` indexes this.
    pub fn workload_slots(&self) -> &[Option<WorkloadEntry>] {
        &self.workload_slots
    }

    pub fn workloads(&self) -> impl Iterator<Item = &WorkloadEntry> {
        self.workload_slots.iter().flatten()
    }

    pub fn cgroup_paths(&self) -> impl Iterator<Item = (u64, &Arc<str>)> {
        self.cgroup_slots
            .iter()
            .filter_map(|(id, (_, path))| path.as_ref().map(|p| (*id, p)))
    }

    pub fn workload(&self, key: &str) -> Option<&WorkloadEntry> {
        self.workload_index
            .get(key)
            .and_then(|slot| self.workload_slots[*slot].as_ref())
    }

    /// The slot of the workload with `key`, created if new.
    fn workload_slot(&mut self, key: Arc<str>, workload: Arc<Workload>, now: SystemTime) -> usize {
        if let Some(slot) = self.workload_index.get(&key) {
            return *slot;
        }
        let entry = WorkloadEntry {
            key: Arc::clone(&key),
            workload,
            cgroup_path: None,
            cgroup_ids: Vec::new(),
            cpu_ns_by_socket: [0; agent_common::MAX_SOCKETS],
            interval_ns: 0,
            interval_seq: 0,
            energy: Energy::default(),
            first_seen: now,
            last_seen: now,
            exited_at: None,
            live_processes: 0,
            last_existence_check: None,
        };
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                self.workload_slots[slot] = Some(entry);
                slot
            }
            None => {
                self.workload_slots.push(Some(entry));
                self.workload_slots.len() - 1
            }
        };
        self.workload_index.insert(key, slot);
        slot
    }

    pub fn node(&self) -> &NodeCpu {
        &self.node
    }

    pub fn node_energy(&self) -> &NodeEnergy {
        &self.node_energy
    }

    /// Splits one interval's energy, domain by domain, between the processes
    /// (and so workloads) active on it: CPU domains by CPU time on the
    /// domain's socket (`psys` by CPU time anywhere), GPUs by each process's
    /// use of that GPU. Call after `apply` with the same reading.
    pub fn apply_energy(
        &mut self,
        usage: &[ProcessUsage],
        interval: &EnergyInterval,
        seconds: f64,
        policy: IdlePolicy,
        baseline_for: &dyn Fn(Domain) -> IdleBaseline,
    ) {
        let seq = self.seq;
        let node = &mut self.node_energy;
        node.interval_measured = [0.0; Domain::ALL.len()];
        node.interval_attributed = [0.0; Domain::ALL.len()];
        node.interval_idle = [0.0; Domain::ALL.len()];
        node.interval_unattributed = [0.0; Domain::ALL.len()];
        node.interval_uncertainty = [0.0; Domain::ALL.len()];
        node.interval_seconds = seconds;
        let pids: FxHashMap<u32, ProcessKey> = if interval.gpu_activity.is_empty() {
            FxHashMap::default()
        } else {
            self.processes
                .iter()
                .filter(|(_, p)| p.exited_at.is_none())
                .map(|(key, _)| (key.pid, *key))
                .collect()
        };
        for energy in &interval.energies {
            let domain = energy.id.domain;
            let d = domain as usize;
            let baseline = self
                .baselines
                .entry(energy.id)
                .or_insert_with(|| baseline_for(domain));
            if seconds > 0.0 {
                baseline.observe(energy.joules / seconds);
            }
            // A configured figure wins; then what the sources know; then
            // the learned percentile.
            let hint = interval
                .idle_watts_hints
                .iter()
                .find(|(id, _)| *id == energy.id)
                .map(|(_, watts)| *watts);
            let idle_watts = match hint {
                Some(watts) if !baseline.is_configured() => watts,
                _ => baseline.watts(),
            };
            let activity: Vec<(Option<ProcessKey>, f64)> = match domain {
                Domain::Gpu => interval
                    .gpu_activity
                    .iter()
                    .filter(|(gpu, _, _)| *gpu == energy.id.index)
                    .map(|(_, pid, weight)| (pids.get(pid).copied(), *weight))
                    .collect(),
                Domain::Psys => usage
                    .iter()
                    .map(|u| (Some(u.key), total_ns(&u.runtime_ns_by_socket) as f64))
                    .collect(),
                _ => usage
                    .iter()
                    .map(|u| {
                        let ns = u
                            .runtime_ns_by_socket
                            .get(energy.id.index as usize)
                            .copied()
                            .unwrap_or(0);
                        (Some(u.key), ns as f64)
                    })
                    .collect(),
            };
            // `even` shares idle energy between workloads, not processes (a
            // container of 100 processes is one workload): split without
            // idle first, then hand the idle part out per workload below.
            let split_policy = if policy == IdlePolicy::Even {
                IdlePolicy::Unattributed
            } else {
                policy
            };
            let mut result = split(energy.joules, idle_watts * seconds, &activity, split_policy);
            let mut attributed = 0.0;
            let mut unattributed = result.unattributed;
            // Per workload slot: its charged processes and their weights.
            let mut active_workloads: FxHashMap<usize, Vec<(ProcessKey, f64)>> =
                FxHashMap::default();
            for (key, dynamic, idle) in std::mem::take(&mut result.shares) {
                let joules = dynamic + idle;
                let charged = key
                    .and_then(|key| self.processes.get_mut(&key))
                    .map(|process| {
                        process.energy.charge(domain, joules, seq);
                        process.workload
                    });
                match (charged, key) {
                    (Some(slot), Some(key)) => {
                        if let Some(workload) = self.workload_slots[slot].as_mut() {
                            workload.energy.charge(domain, joules, seq);
                        }
                        attributed += joules;
                        // Dynamic shares are proportional to activity, so
                        // they weigh the processes within a workload.
                        active_workloads
                            .entry(slot)
                            .or_default()
                            .push((key, dynamic));
                    }
                    // A GPU user the CPU accounting has not seen (another
                    // PID namespace, or gone): the node keeps its energy.
                    _ => unattributed += joules,
                }
            }
            if policy == IdlePolicy::Even && !active_workloads.is_empty() && result.idle > 0.0 {
                let per_workload = result.idle / active_workloads.len() as f64;
                let mut given = 0.0;
                for (slot, members) in &active_workloads {
                    if let Some(workload) = self.workload_slots[*slot].as_mut() {
                        workload.energy.charge(domain, per_workload, seq);
                    }
                    let total: f64 = members.iter().map(|(_, w)| w).sum();
                    for (key, weight) in members {
                        let share = if total > 0.0 {
                            per_workload * weight / total
                        } else {
                            per_workload / members.len() as f64
                        };
                        if let Some(process) = self.processes.get_mut(key) {
                            process.energy.charge(domain, share, seq);
                        }
                    }
                    given += per_workload;
                }
                attributed += given;
                result.idle -= given;
            }
            let node = &mut self.node_energy;
            node.measured[d] += energy.joules;
            node.attributed[d] += attributed;
            node.idle[d] += result.idle;
            node.unattributed[d] += unattributed;
            node.interval_measured[d] += energy.joules;
            node.interval_attributed[d] += attributed;
            node.interval_idle[d] += result.idle;
            node.interval_unattributed[d] += unattributed;
            if let Some(sigma) = energy.uncertainty_joules {
                // Independent per-instance errors add in quadrature.
                let previous = node.interval_uncertainty[d];
                node.interval_uncertainty[d] = (previous * previous + sigma * sigma).sqrt();
            }
            node.methods[d] = Some(energy.method);
            node.idle_watts[d] = idle_watts;
        }
    }

    /// Applies one reading that covers `wall` of time on `cpus` online CPUs.
    pub fn apply(
        &mut self,
        reading: &CpuReading,
        now: SystemTime,
        wall: Duration,
        online_cpus: &[u32],
        resolve: &mut dyn FnMut(u64) -> Resolved,
    ) {
        self.seq += 1;
        let seq = self.seq;
        for usage in &reading.usage {
            // Each cgroup is resolved once, when first seen.
            let (slot, path) = match self.cgroup_slots.get(&usage.cgroup_id) {
                Some((slot, path)) if self.workload_slots[*slot].is_some() => (*slot, path.clone()),
                _ => {
                    let resolved = resolve(usage.cgroup_id);
                    let key = Arc::from(workload_key(&resolved.workload));
                    let slot = self.workload_slot(key, resolved.workload, now);
                    // An unresolved cgroup is looked up again next time.
                    if resolved.path.is_some() {
                        self.cgroup_slots
                            .insert(usage.cgroup_id, (slot, resolved.path.clone()));
                    }
                    (slot, resolved.path)
                }
            };
            let delta = total_ns(&usage.runtime_ns_by_socket);

            let Some(workload_entry) = self.workload_slots[slot].as_mut() else {
                continue;
            };
            add_socket_ns(
                &mut workload_entry.cpu_ns_by_socket,
                &usage.runtime_ns_by_socket,
            );
            if workload_entry.interval_seq != seq {
                workload_entry.interval_seq = seq;
                workload_entry.interval_ns = 0;
            }
            workload_entry.interval_ns += delta;
            workload_entry.last_seen = now;
            // A workload that runs again (a restarted unit, a reused cgroup
            // name) is alive again.
            workload_entry.exited_at = None;
            if path.is_some() && workload_entry.cgroup_path != path {
                workload_entry.cgroup_path.clone_from(&path);
            }
            if !workload_entry.cgroup_ids.contains(&usage.cgroup_id) {
                workload_entry.cgroup_ids.push(usage.cgroup_id);
            }

            let mut moved_from = None;
            let mut is_new = false;
            let process = self.processes.entry(usage.key).or_insert_with(|| {
                is_new = true;
                ProcessEntry {
                    comm: usage.comm,
                    cgroup_id: usage.cgroup_id,
                    workload: slot,
                    cpu_ns_by_socket: [0; agent_common::MAX_SOCKETS],
                    interval_ns: 0,
                    interval_seq: 0,
                    energy: Energy::default(),
                    first_seen: now,
                    last_seen: now,
                    exited_at: None,
                }
            });
            if process.workload != slot {
                if process.exited_at.is_none() {
                    moved_from = Some(process.workload);
                }
                process.workload = slot;
            }
            add_socket_ns(&mut process.cpu_ns_by_socket, &usage.runtime_ns_by_socket);
            if process.interval_seq != seq {
                process.interval_seq = seq;
                process.interval_ns = 0;
            }
            process.interval_ns += delta;
            process.cgroup_id = usage.cgroup_id;
            if usage.comm != Comm::default() {
                process.comm = usage.comm;
            }
            process.last_seen = now;
            // Run time after it was marked exited means the mark was wrong
            // (a liveness check that raced, a zombie leader whose threads
            // still run): it is alive again, and counted live again below.
            let revived = !is_new && process.exited_at.take().is_some();
            let alive = process.exited_at.is_none();

            // The live count follows the process (new, or moved cgroups).
            if is_new || moved_from.is_some() || revived {
                if let Some(old) = moved_from.and_then(|s| self.workload_slots[s].as_mut()) {
                    old.live_processes = old.live_processes.saturating_sub(1);
                }
                if alive && let Some(new) = self.workload_slots[slot].as_mut() {
                    new.live_processes += 1;
                }
            }
        }

        for key in &reading.exited {
            if let Some(process) = self.processes.get_mut(key)
                && process.exited_at.is_none()
            {
                process.exited_at = Some(now);
                if let Some(w) = self.workload_slots[process.workload].as_mut() {
                    w.live_processes = w.live_processes.saturating_sub(1);
                }
            }
        }

        if reading.busy_missing {
            self.node_wall_pending += wall;
            self.node.interval_busy_ns = 0;
            self.node.interval_capacity_ns = 0;
        } else {
            let wall = wall + std::mem::take(&mut self.node_wall_pending);
            self.apply_node(&reading.busy_ns_by_cpu, wall, online_cpus);
        }
    }

    fn apply_node(&mut self, busy_ns_by_cpu: &[u64], wall: Duration, online_cpus: &[u32]) {
        let cpus = busy_ns_by_cpu.len().max(
            online_cpus
                .iter()
                .map(|c| *c as usize + 1)
                .max()
                .unwrap_or(0),
        );
        self.node.busy_ns_by_cpu.resize(cpus, 0);
        self.node.idle_ns_by_cpu.resize(cpus, 0);
        let wall_ns = wall.as_nanos() as u64;
        let mut interval_busy = 0;
        for &cpu in online_cpus {
            let cpu = cpu as usize;
            // Busy can exceed wall by a tick's worth of skew between the
            // programs' clock and ours; clamp so idle never goes negative.
            let busy = busy_ns_by_cpu.get(cpu).copied().unwrap_or(0).min(wall_ns);
            self.node.busy_ns_by_cpu[cpu] += busy;
            self.node.idle_ns_by_cpu[cpu] += wall_ns - busy;
            interval_busy += busy;
        }
        self.node.interval_busy_ns = interval_busy;
        self.node.interval_capacity_ns = wall_ns * online_cpus.len() as u64;
    }

    /// Marks workloads whose cgroups are gone and that have no live process
    /// as exited, and forgets what exited longer than the retention ago.
    pub fn retire(&mut self, now: SystemTime, cgroup_exists: &mut dyn FnMut(u64) -> bool) {
        for entry in self.workload_slots.iter_mut().flatten() {
            if entry.exited_at.is_some()
                || entry.live_processes > 0
                || matches!(*entry.workload, Workload::Host)
            {
                continue;
            }
            let due = entry.last_existence_check.is_none_or(|at| {
                now.duration_since(at).unwrap_or_default() >= self.existence_check_every
            });
            if !due {
                continue;
            }
            entry.last_existence_check = Some(now);
            if !entry.cgroup_ids.iter().any(|id| cgroup_exists(*id)) {
                entry.exited_at = Some(now);
            }
        }
        let retention = self.retention;
        let expired = |exited_at: Option<SystemTime>| {
            exited_at.is_some_and(|at| now.duration_since(at).unwrap_or_default() > retention)
        };
        self.processes.retain(|_, p| !expired(p.exited_at));
        for slot in 0..self.workload_slots.len() {
            if self.workload_slots[slot]
                .as_ref()
                .is_some_and(|w| expired(w.exited_at))
            {
                if let Some(entry) = self.workload_slots[slot].take() {
                    self.workload_index.remove(&entry.key);
                }
                self.free_slots.push(slot);
            }
        }
        let slots = &self.workload_slots;
        self.cgroup_slots
            .retain(|_, (slot, _)| slots[*slot].is_some());
    }
}

fn add_socket_ns(sum: &mut SocketNs, add: &SocketNs) {
    for (s, a) in sum.iter_mut().zip(add) {
        *s += a;
    }
}

#[cfg(test)]
mod tests {
    use agent_common::MAX_SOCKETS;
    use proptest::prelude::*;

    use super::*;
    use crate::cpu::ProcessUsage;

    const CONTAINER: &str = "0000000000000000000000000000000000000000000000000000000000000001";

    fn usage(pid: u32, cgroup_id: u64, ns: u64) -> ProcessUsage {
        let mut runtime_ns_by_socket = [0; MAX_SOCKETS];
        runtime_ns_by_socket[0] = ns;
        ProcessUsage {
            key: ProcessKey { pid, start_ns: 1 },
            comm: Comm::from_str_lossy("burn"),
            cgroup_id,
            runtime_ns_by_socket,
        }
    }

    fn resolver(id: u64) -> Resolved {
        let path = match id {
            1 => format!("/system.slice/docker-{CONTAINER}.scope"),
            2 => "/system.slice/sshd.service".to_owned(),
            _ => "/".to_owned(),
        };
        Resolved {
            workload: Arc::new(crate::cgroup::parse_cgroup_path(&path)),
            path: Some(Arc::from(path)),
        }
    }

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + seconds)
    }

    #[test]
    fn sums_processes_into_workloads_and_keeps_per_interval_figures() {
        let mut accounting = Accounting::new(Duration::from_secs(900));
        let reading = CpuReading {
            usage: vec![usage(10, 1, 300), usage(11, 1, 100), usage(12, 2, 50)],
            ..Default::default()
        };
        accounting.apply(&reading, at(1), Duration::from_secs(1), &[0], &mut resolver);
        let second = CpuReading {
            usage: vec![usage(10, 1, 200)],
            ..Default::default()
        };
        accounting.apply(&second, at(2), Duration::from_secs(1), &[0], &mut resolver);

        let container = accounting
            .workload(&format!("container:{CONTAINER}"))
            .unwrap();
        assert_eq!(total_ns(&container.cpu_ns_by_socket), 600);
        assert_eq!(container.interval_ns, 200);
        assert_eq!(container.interval_seq, 2);
        assert_eq!(container.live_processes, 2);
        let process = &accounting.processes()[&ProcessKey {
            pid: 11,
            start_ns: 1,
        }];
        assert_eq!(total_ns(&process.cpu_ns_by_socket), 100);
        assert_eq!(process.interval_seq, 1, "did not run in interval 2");
    }

    #[test]
    fn exited_processes_and_containers_are_kept_for_the_retention_then_dropped() {
        let mut accounting = Accounting::new(Duration::from_secs(60));
        let reading = CpuReading {
            usage: vec![usage(10, 1, 300)],
            ..Default::default()
        };
        accounting.apply(&reading, at(0), Duration::from_secs(1), &[0], &mut resolver);
        let exit = CpuReading {
            exited: vec![ProcessKey {
                pid: 10,
                start_ns: 1,
            }],
            ..Default::default()
        };
        accounting.apply(&exit, at(1), Duration::from_secs(1), &[0], &mut resolver);
        accounting.retire(at(1), &mut |_| false);
        let key = format!("container:{CONTAINER}");
        assert_eq!(accounting.workload(&key).unwrap().exited_at, Some(at(1)));
        assert_eq!(accounting.processes().len(), 1);

        accounting.retire(at(30), &mut |_| false);
        assert!(accounting.workload(&key).is_some());
        accounting.retire(at(62), &mut |_| false);
        assert!(accounting.workload(&key).is_none());
        assert!(accounting.processes().is_empty());
    }

    #[test]
    fn a_container_whose_cgroup_remains_is_not_exited() {
        let mut accounting = Accounting::new(Duration::from_secs(60));
        let reading = CpuReading {
            usage: vec![usage(10, 1, 300)],
            exited: vec![ProcessKey {
                pid: 10,
                start_ns: 1,
            }],
            ..Default::default()
        };
        accounting.apply(&reading, at(0), Duration::from_secs(1), &[0], &mut resolver);
        accounting.retire(at(1), &mut |_| true);
        let key = format!("container:{CONTAINER}");
        assert_eq!(accounting.workload(&key).unwrap().exited_at, None);
    }

    #[test]
    fn node_idle_is_wall_minus_busy_per_cpu() {
        let mut accounting = Accounting::new(Duration::from_secs(60));
        let reading = CpuReading {
            busy_ns_by_cpu: vec![250_000_000, 1_200_000_000],
            ..Default::default()
        };
        accounting.apply(
            &reading,
            at(0),
            Duration::from_secs(1),
            &[0, 1],
            &mut resolver,
        );
        assert_eq!(
            accounting.node().busy_ns_by_cpu,
            vec![250_000_000, 1_000_000_000]
        );
        assert_eq!(accounting.node().idle_ns_by_cpu, vec![750_000_000, 0]);
        assert_eq!(accounting.node().interval_capacity_ns, 2_000_000_000);
    }

    #[test]
    fn a_window_without_busy_figures_is_carried_to_the_next() {
        let mut accounting = Accounting::new(Duration::from_secs(60));
        let missing = CpuReading {
            usage: vec![usage(10, 1, 300)],
            busy_missing: true,
            ..Default::default()
        };
        accounting.apply(&missing, at(0), Duration::from_secs(1), &[0], &mut resolver);
        assert_eq!(accounting.node().idle_ns_by_cpu, vec![0; 0]);
        assert_eq!(accounting.node().interval_capacity_ns, 0);
        // The next deltas cover both windows (the source kept its marks).
        let next = CpuReading {
            busy_ns_by_cpu: vec![1_500_000_000],
            ..Default::default()
        };
        accounting.apply(&next, at(1), Duration::from_secs(1), &[0], &mut resolver);
        assert_eq!(accounting.node().busy_ns_by_cpu, vec![1_500_000_000]);
        assert_eq!(accounting.node().idle_ns_by_cpu, vec![500_000_000]);
        // The process's time was applied even though the node's was not.
        let key = format!("container:{CONTAINER}");
        assert_eq!(accounting.workload(&key).unwrap().live_processes, 1);
    }

    #[test]
    fn a_process_that_runs_after_being_marked_exited_is_alive_again() {
        let mut accounting = Accounting::new(Duration::from_secs(60));
        let key = ProcessKey {
            pid: 10,
            start_ns: 1,
        };
        let exit = CpuReading {
            usage: vec![usage(10, 1, 300)],
            exited: vec![key],
            ..Default::default()
        };
        accounting.apply(&exit, at(0), Duration::from_secs(1), &[0], &mut resolver);
        let workload = format!("container:{CONTAINER}");
        assert_eq!(accounting.workload(&workload).unwrap().live_processes, 0);
        assert!(accounting.processes()[&key].exited_at.is_some());
        let again = CpuReading {
            usage: vec![usage(10, 1, 200)],
            ..Default::default()
        };
        accounting.apply(&again, at(1), Duration::from_secs(1), &[0], &mut resolver);
        assert_eq!(accounting.processes()[&key].exited_at, None);
        assert_eq!(accounting.workload(&workload).unwrap().live_processes, 1);
    }

    fn energy(domain: Domain, index: u32, joules: f64) -> crate::energy::DomainEnergy {
        crate::energy::DomainEnergy {
            id: DomainId { domain, index },
            joules,
            method: EnergyMethod::Rapl,
            uncertainty_joules: None,
        }
    }

    fn on_socket(pid: u32, cgroup_id: u64, socket: usize, ns: u64) -> ProcessUsage {
        let mut u = usage(pid, cgroup_id, 0);
        u.runtime_ns_by_socket = [0; MAX_SOCKETS];
        u.runtime_ns_by_socket[socket] = ns;
        u
    }

    fn no_idle(_: Domain) -> IdleBaseline {
        IdleBaseline::configured(0.0)
    }

    #[test]
    fn a_process_on_socket_1_is_never_charged_socket_0() {
        let mut accounting = Accounting::new(Duration::from_secs(60));
        let usage = vec![on_socket(10, 1, 0, 300), on_socket(11, 2, 1, 100)];
        let reading = CpuReading {
            usage: usage.clone(),
            ..Default::default()
        };
        accounting.apply(
            &reading,
            at(0),
            Duration::from_secs(1),
            &[0, 1],
            &mut resolver,
        );
        let interval = EnergyInterval {
            energies: vec![
                energy(Domain::Package, 0, 50.0),
                energy(Domain::Package, 1, 20.0),
                energy(Domain::Psys, 0, 80.0),
            ],
            ..Default::default()
        };
        accounting.apply_energy(&usage, &interval, 1.0, IdlePolicy::Unattributed, &no_idle);
        let p10 = &accounting.processes()[&ProcessKey {
            pid: 10,
            start_ns: 1,
        }]
            .energy;
        let p11 = &accounting.processes()[&ProcessKey {
            pid: 11,
            start_ns: 1,
        }]
            .energy;
        assert_eq!(p10.joules[Domain::Package as usize], 50.0);
        assert_eq!(p11.joules[Domain::Package as usize], 20.0);
        // psys follows CPU time anywhere: 300:100.
        assert_eq!(p10.joules[Domain::Psys as usize], 60.0);
        assert_eq!(p11.joules[Domain::Psys as usize], 20.0);
        let node = accounting.node_energy();
        assert_eq!(node.measured[Domain::Package as usize], 70.0);
        assert_eq!(node.attributed[Domain::Package as usize], 70.0);
    }

    #[test]
    fn even_idle_is_shared_by_workloads_not_processes() {
        let mut accounting = Accounting::new(Duration::from_secs(60));
        // Three processes in the container (cgroup 1), one in sshd (cgroup 2).
        let usage = vec![
            usage(10, 1, 100),
            usage(11, 1, 100),
            usage(12, 1, 100),
            usage(13, 2, 100),
        ];
        let reading = CpuReading {
            usage: usage.clone(),
            ..Default::default()
        };
        accounting.apply(&reading, at(0), Duration::from_secs(1), &[0], &mut resolver);
        let interval = EnergyInterval {
            energies: vec![energy(Domain::Package, 0, 100.0)],
            ..Default::default()
        };
        accounting.apply_energy(&usage, &interval, 1.0, IdlePolicy::Even, &|_| {
            IdleBaseline::configured(20.0)
        });
        let d = Domain::Package as usize;
        let container = accounting
            .workload(&format!("container:{CONTAINER}"))
            .unwrap();
        let sshd = accounting.workload("service:sshd.service").unwrap();
        // Dynamic 80 J by CPU time (3:1), idle 20 J half each.
        assert!((container.energy.joules[d] - (60.0 + 10.0)).abs() < 1e-9);
        assert!((sshd.energy.joules[d] - (20.0 + 10.0)).abs() < 1e-9);
        let p10 = accounting.processes()[&ProcessKey {
            pid: 10,
            start_ns: 1,
        }]
            .energy
            .joules[d];
        assert!((p10 - (20.0 + 10.0 / 3.0)).abs() < 1e-9);
        let node = accounting.node_energy();
        assert!(node.idle[d].abs() < 1e-9);
        assert!((node.attributed[d] - 100.0).abs() < 1e-9);
    }

    #[test]
    fn gpu_energy_goes_to_the_processes_that_used_the_gpu() {
        use crate::energy::gpu::{FakeGpuBackend, GpuSource, tests::gpu};
        let mut accounting = Accounting::new(Duration::from_secs(60));
        let usage = vec![usage(10, 1, 100), usage(11, 2, 100), usage(12, 2, 100)];
        let reading = CpuReading {
            usage: usage.clone(),
            ..Default::default()
        };
        accounting.apply(&reading, at(0), Duration::from_secs(1), &[0], &mut resolver);
        // Two GPUs, three processes: 10 and 11 share GPU 0 at 60%/20% SM,
        // 12 alone on GPU 1, and pid 99 (not seen on CPU) on GPU 1 too.
        let frames = vec![vec![
            gpu(0, None, 400_000, &[(10, Some(60)), (11, Some(20))]),
            gpu(1, None, 100_000, &[(12, Some(50)), (99, Some(50))]),
        ]];
        let mut source = GpuSource::new(Box::new(FakeGpuBackend::new(frames)));
        let reading = source.read(1.0).unwrap();
        let interval = EnergyInterval {
            energies: reading.energies,
            gpu_activity: reading.activity,
            ..Default::default()
        };
        accounting.apply_energy(&usage, &interval, 1.0, IdlePolicy::Unattributed, &no_idle);
        let gpu_joules = |pid| {
            accounting.processes()[&ProcessKey { pid, start_ns: 1 }]
                .energy
                .joules[Domain::Gpu as usize]
        };
        assert_eq!(gpu_joules(10), 300.0);
        assert_eq!(gpu_joules(11), 100.0);
        assert_eq!(gpu_joules(12), 50.0);
        let node = accounting.node_energy();
        assert_eq!(node.measured[Domain::Gpu as usize], 500.0);
        assert_eq!(
            node.unattributed[Domain::Gpu as usize],
            50.0,
            "pid 99's share stays on the node"
        );
        let container = accounting
            .workload(&format!("container:{CONTAINER}"))
            .unwrap();
        assert_eq!(container.energy.joules[Domain::Gpu as usize], 300.0);
    }

    proptest! {
        /// Whatever the readings, the workloads' time adds up to the
        /// processes' time, and both to what the readings reported.
        #[test]
        fn workloads_add_up_to_processes(
            readings in proptest::collection::vec(
                proptest::collection::vec((0u32..20, 0u64..4, 0u64..1_000_000), 0..30),
                1..10,
            )
        ) {
            let mut accounting = Accounting::new(Duration::from_secs(3600));
            let mut reported = 0u64;
            for (i, reading) in readings.iter().enumerate() {
                let reading = CpuReading {
                    usage: reading.iter().map(|(pid, cgroup, ns)| usage(*pid, *cgroup, *ns)).collect(),
                    ..Default::default()
                };
                reported += reading.usage.iter().map(|u| total_ns(&u.runtime_ns_by_socket)).sum::<u64>();
                accounting.apply(&reading, at(i as u64), Duration::from_secs(1), &[0], &mut resolver);
            }
            let processes: u64 = accounting.processes().values().map(|p| total_ns(&p.cpu_ns_by_socket)).sum();
            let workloads: u64 = accounting.workloads().map(|w| total_ns(&w.cpu_ns_by_socket)).sum();
            prop_assert_eq!(processes, reported);
            prop_assert_eq!(workloads, reported);
        }

        /// Per domain, the processes' energy plus the node's idle and
        /// unattributed buckets is what was measured; workloads sum to the
        /// same as processes.
        #[test]
        fn energy_books_balance(
            usage_spec in proptest::collection::vec((0u32..30, 0u64..4, 0usize..2, 0u64..1_000_000_000), 0..40),
            joules in proptest::collection::vec(0.0f64..500.0, 2),
            idle_watts in 0.0f64..300.0,
            policy in prop_oneof![Just(IdlePolicy::Unattributed), Just(IdlePolicy::Even), Just(IdlePolicy::Proportional)],
        ) {
            let mut accounting = Accounting::new(Duration::from_secs(3600));
            let usage: Vec<ProcessUsage> = usage_spec.iter().map(|(pid, cgroup, socket, ns)| on_socket(*pid, *cgroup, *socket, *ns)).collect();
            let reading = CpuReading { usage: usage.clone(), ..Default::default() };
            accounting.apply(&reading, at(0), Duration::from_secs(1), &[0, 1], &mut resolver);
            let interval = EnergyInterval {
                energies: vec![energy(Domain::Package, 0, joules[0]), energy(Domain::Package, 1, joules[1])],
                ..Default::default()
            };
            accounting.apply_energy(&usage, &interval, 1.0, policy, &|_| IdleBaseline::configured(idle_watts));
            let d = Domain::Package as usize;
            let processes: f64 = accounting.processes().values().map(|p| p.energy.joules[d]).sum();
            let workloads: f64 = accounting.workloads().map(|w| w.energy.joules[d]).sum();
            let node = accounting.node_energy();
            let measured = joules[0] + joules[1];
            prop_assert!((node.measured[d] - measured).abs() < 1e-9);
            prop_assert!((processes + node.idle[d] + node.unattributed[d] - measured).abs() < 1e-6);
            prop_assert!((workloads - processes).abs() < 1e-6);
            prop_assert!((node.attributed[d] - processes).abs() < 1e-6);
        }
    }
}
