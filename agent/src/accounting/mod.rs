//! The books: cumulative CPU time and energy per process, per workload and
//! for the node, built from each interval's [`CpuReading`] and
//! [`EnergyInterval`] by [`Accounting::apply_interval`]. Pure: the cgroup
//! lookups it needs come in as closures, so the bookkeeping is tested
//! without a kernel.
//!
//! - [`cpu`]: CPU deltas into processes, workloads and per-CPU busy/idle.
//! - [`energy`]: each domain's energy split between the active processes.
//! - [`retention`]: exited workloads, and forgetting what is old.
//! - [`slots`]: the workload slot allocator.
//! - [`shards`]: stable slots in shards that know whether they changed.
//! - [`table`]: the process table.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustc_hash::FxHashMap;

pub use self::{slots::WorkloadTable, table::ProcessTable};
use crate::{
    cgroup::Workload,
    cpu::{Comm, CpuReading, ProcessKey, SocketNs},
    energy::{
        Domain, DomainId, EnergyMethod,
        attribution::{IdleBaseline, IdlePolicy},
        collector::EnergyInterval,
    },
};

/// Everything one interval brings to the books.
pub struct Interval<'a> {
    /// The CPU source's reading (an empty one with `busy_missing` when the
    /// read failed: the meters still count, and their energy stays with
    /// the node).
    pub reading: &'a CpuReading,
    pub now: SystemTime,
    /// Wall time the reading covers.
    pub wall: Duration,
    pub online_cpus: &'a [u32],
    pub energy: &'a EnergyInterval,
    /// Seconds the energy covers.
    pub energy_seconds: f64,
    pub idle_policy: IdlePolicy,
}

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

/// Default bound on the exited processes kept (~250 bytes each).
pub const DEFAULT_MAX_EXITED_PROCESSES: usize = 20_000;

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
    /// Slot of the process's workload in `Accounting::workloads`.
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
    processes: ProcessTable,
    /// Workloads in stable slots, so a process refers to its workload by
    /// index.
    workloads: WorkloadTable,
    /// Workload slot of each cgroup id seen.
    cgroup_slots: FxHashMap<u64, (usize, Option<Arc<str>>)>,
    /// `cgroup_slots` changed since the last snapshot was built.
    cgroups_changed: bool,
    node: NodeCpu,
    node_energy: NodeEnergy,
    baselines: FxHashMap<DomainId, IdleBaseline>,
    retention: Duration,
    /// Most exited processes kept for queries, whatever their age: at
    /// 1,000 forks a second a 15-minute retention would keep 900,000.
    max_exited_processes: usize,
    /// Exited processes in the order they exited (with the time, so an
    /// entry of a process that ran again is recognised as stale).
    exit_order: std::collections::VecDeque<(SystemTime, ProcessKey)>,
    /// Exited processes forgotten before their retention ran out because
    /// of `max_exited_processes` (their time and energy stay in their
    /// workload's figures; only the per-process detail goes).
    evicted_processes: u64,
    /// How often a workload without live processes is checked for its
    /// cgroup still existing.
    existence_check_every: Duration,
    seq: u64,
    /// Wall time of readings that came without per-CPU busy figures, added
    /// to the node's window of the next reading that has them.
    node_wall_pending: Duration,
    /// The process slot of each usage of the last reading (`NO_SLOT` for
    /// one not charged), so the energy split finds them without a lookup.
    usage_slots: Vec<usize>,
}

/// A usage that has no process slot.
const NO_SLOT: usize = usize::MAX;

impl Accounting {
    pub fn new(retention: Duration) -> Self {
        Self::with_limits(retention, DEFAULT_MAX_EXITED_PROCESSES)
    }

    pub fn with_limits(retention: Duration, max_exited_processes: usize) -> Self {
        Self {
            processes: ProcessTable::default(),
            workloads: WorkloadTable::default(),
            cgroup_slots: FxHashMap::default(),
            cgroups_changed: true,
            node: NodeCpu::default(),
            node_energy: NodeEnergy::default(),
            baselines: FxHashMap::default(),
            retention,
            max_exited_processes,
            exit_order: std::collections::VecDeque::new(),
            evicted_processes: 0,
            existence_check_every: Duration::from_secs(5),
            seq: 0,
            node_wall_pending: Duration::ZERO,
            usage_slots: Vec::new(),
        }
    }

    /// Exited processes forgotten early to keep within the bound.
    pub fn evicted_processes(&self) -> u64 {
        self.evicted_processes
    }

    /// Whether the books still refer to the cgroup `id` (for the
    /// resolver's pruning).
    pub fn knows_cgroup(&self, id: u64) -> bool {
        self.cgroup_slots.contains_key(&id)
    }

    /// The number of the interval last applied.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn processes(&self) -> &ProcessTable {
        &self.processes
    }

    /// A snapshot was built: what it rebuilt is unchanged from now on.
    pub fn views_built(&mut self) {
        self.processes.views_built();
        self.workloads.views_built();
        self.cgroups_changed = false;
    }

    /// Whether a cgroup's path was learnt or forgotten since the last
    /// snapshot was built.
    pub fn cgroups_changed(&self) -> bool {
        self.cgroups_changed
    }

    /// Workloads by slot; a process's `workload` is its slot.
    pub fn workload_table(&self) -> &WorkloadTable {
        &self.workloads
    }

    pub fn workloads(&self) -> impl Iterator<Item = &WorkloadEntry> {
        self.workloads.iter()
    }

    pub fn cgroup_paths(&self) -> impl Iterator<Item = (u64, &Arc<str>)> {
        self.cgroup_slots
            .iter()
            .filter_map(|(id, (_, path))| path.as_ref().map(|p| (*id, p)))
    }

    pub fn workload(&self, key: &str) -> Option<&WorkloadEntry> {
        self.workloads.by_key(key)
    }

    /// Applies one interval: CPU time first (it creates the processes the
    /// energy is charged to), then energy, domain by domain.
    pub fn apply_interval(
        &mut self,
        interval: &Interval<'_>,
        resolve: &mut dyn FnMut(u64) -> Resolved,
        baseline_for: &dyn Fn(Domain) -> IdleBaseline,
    ) {
        self.apply_cpu(
            interval.reading,
            interval.now,
            interval.wall,
            interval.online_cpus,
            resolve,
        );
        let usage_slots = std::mem::take(&mut self.usage_slots);
        self.apply_energy(
            &interval.reading.usage,
            &usage_slots,
            interval.energy,
            interval.energy_seconds,
            interval.idle_policy,
            baseline_for,
        );
        self.usage_slots = usage_slots;
    }

    pub fn node(&self) -> &NodeCpu {
        &self.node
    }

    pub fn node_energy(&self) -> &NodeEnergy {
        &self.node_energy
    }
}

fn add_socket_ns(sum: &mut SocketNs, add: &SocketNs) {
    for (s, a) in sum.iter_mut().zip(add) {
        *s += a;
    }
}

mod cpu;
mod energy;
mod retention;
pub mod shards;
pub mod slots;
pub mod table;
#[cfg(test)]
mod tests;
