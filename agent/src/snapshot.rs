//! One immutable snapshot per interval, shared by `Arc` with every reader
//! (the API, the table, the sinks), which never block the collector.

use std::{
    sync::{Arc, OnceLock},
    time::{Duration, SystemTime},
};

use tokio::sync::watch;

use rustc_hash::FxHashMap;

use crate::{
    accounting::{Accounting, DomainJoules, NodeEnergy, shards::SHARD_SLOTS},
    cgroup::Workload,
    cpu::{Comm, Method, ProcessKey, ProgramStats, SocketNs, total_ns},
    energy::{
        DeviceEnergy, SourceHealth,
        gpu::GpuDevice,
        model::{ModelCoefficients, ModelFit},
        thermal::Temperature,
    },
    sinks::ExportStats,
    view::Figures,
};

#[derive(Clone, Debug)]
pub struct ProcessView {
    pub key: ProcessKey,
    pub comm: Comm,
    pub cgroup_id: u64,
    /// The workload's slot (`Snapshot::workload_of` finds it).
    pub workload_slot: usize,
    pub cpu_ns_by_socket: SocketNs,
    /// CPU time in the last interval (0 if it did not run).
    pub interval_ns: u64,
    pub energy_joules: DomainJoules,
    pub interval_energy_joules: DomainJoules,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
    pub exited: bool,
}

#[derive(Clone, Debug)]
pub struct WorkloadView {
    pub key: Arc<str>,
    pub workload: Arc<Workload>,
    pub cgroup_path: Option<Arc<str>>,
    pub cpu_ns_by_socket: SocketNs,
    pub interval_ns: u64,
    pub energy_joules: DomainJoules,
    pub interval_energy_joules: DomainJoules,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
    pub exited_at: Option<SystemTime>,
    pub live_processes: u32,
}

/// The energy side of a snapshot.
#[derive(Clone, Debug, Default)]
pub struct EnergyView {
    pub node: NodeEnergy,
    pub temperatures: Vec<Temperature>,
    pub gpus: Vec<GpuDevice>,
    pub sources: Vec<SourceHealth>,
    pub model_fits: Vec<ModelFit>,
    pub model: Option<ModelCoefficients>,
    /// True when no meter exists and figures come from the model.
    pub estimated: bool,
    /// Each domain instance's energy since the agent started.
    pub devices: Vec<DeviceEnergy>,
}

/// The agent's own resource use, read once per interval.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AgentUsage {
    /// User + system CPU time since the agent started.
    pub cpu_seconds: f64,
    pub memory_bytes: u64,
}

impl AgentUsage {
    /// `getrusage` for CPU, `/proc/self/statm` for resident memory (0 when
    /// unreadable: the figure is informative, never worth failing over).
    pub fn measure() -> Self {
        // SAFETY: getrusage writes into the zeroed struct we pass.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer, RUSAGE_SELF always exists.
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        let pages = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|text| text.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap_or(0);
        // SAFETY: sysconf has no preconditions.
        let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(0) as u64;
        Self {
            cpu_seconds: tv(usage.ru_utime) + tv(usage.ru_stime),
            memory_bytes: pages * page_size,
        }
    }
}

/// State of an input (the CPU source's; energy sources report the same).
pub use crate::energy::SourceHealth as SourceStatus;

#[derive(Clone, Debug, Default)]
pub struct NodeView {
    pub busy_ns_by_cpu: Vec<u64>,
    pub idle_ns_by_cpu: Vec<u64>,
    pub interval_busy_ns: u64,
    pub interval_capacity_ns: u64,
}

#[derive(Clone, Debug)]
pub struct Snapshot {
    pub sequence: u64,
    pub generated_at: SystemTime,
    pub started_at: SystemTime,
    pub interval: Duration,
    pub method: Method,
    /// CPU sockets of this machine.
    pub sockets: usize,
    pub processes: ProcessViews,
    pub workloads: WorkloadViews,
    /// Paths of the cgroups processes are in, by cgroup id.
    pub cgroup_paths: Arc<FxHashMap<u64, Arc<str>>>,
    pub node: NodeView,
    pub losses: Vec<(&'static str, u64)>,
    pub sources: Vec<SourceStatus>,
    /// Failed reads of the CPU source since start.
    pub read_errors: u64,
    /// Records (eBPF: switch records and running threads) the CPU source's
    /// reads looked at since start.
    pub threads_read: u64,
    pub energy: EnergyView,
    pub agent: AgentUsage,
    pub programs: Vec<ProgramStats>,
    /// The view every reader shows, computed by the first reader that asks.
    figures: OnceLock<Arc<Figures>>,
}

impl Snapshot {
    /// The typed view of this snapshot (computed once, on first use, by a
    /// reader: never on the collector's path).
    pub fn figures(&self) -> Arc<Figures> {
        Arc::clone(self.figures.get_or_init(|| Arc::new(Figures::build(self))))
    }

    pub fn empty(method: Method, interval: Duration) -> Self {
        let now = SystemTime::now();
        Self {
            sequence: 0,
            generated_at: now,
            started_at: now,
            interval,
            method,
            sockets: 1,
            processes: ProcessViews::default(),
            workloads: WorkloadViews::default(),
            cgroup_paths: Arc::default(),
            node: NodeView::default(),
            losses: Vec::new(),
            sources: Vec::new(),
            read_errors: 0,
            threads_read: 0,
            energy: EnergyView::default(),
            agent: AgentUsage::default(),
            programs: Vec::new(),
            figures: OnceLock::new(),
        }
    }

    /// Builds the snapshot of the accounting's current state, with no
    /// sorting or string comparison per process: readers sort what they
    /// show.
    ///
    /// Shares with `previous` (the snapshot built last) the views of every
    /// shard of processes that did not change since, and the cgroup paths
    /// unless one came or went: an interval in which 1% of 10,000 processes
    /// ran copies a few hundred views, not all 10,000.
    pub fn build(accounting: &Accounting, base: SnapshotBase, previous: Option<&Snapshot>) -> Self {
        let seq = accounting.seq();
        // Only shards with a workload that changed are built again (a view
        // holds three shared pointers, each a cold cache line to count:
        // 1,000 workloads cost more than their figures).
        let workloads = WorkloadViews {
            shards: shard_views(
                accounting.workload_table().shards(),
                previous.map(|p| p.workloads.shards.as_slice()),
                |shard| {
                    shard
                        .iter()
                        .map(|entry| {
                            entry.as_ref().map(|w| WorkloadView {
                                key: Arc::clone(&w.key),
                                workload: Arc::clone(&w.workload),
                                cgroup_path: w.cgroup_path.clone(),
                                cpu_ns_by_socket: w.cpu_ns_by_socket,
                                interval_ns: current(w.interval_seq, seq, w.interval_ns),
                                energy_joules: w.energy.joules,
                                interval_energy_joules: w.energy.interval(seq),
                                first_seen: w.first_seen,
                                last_seen: w.last_seen,
                                exited_at: w.exited_at,
                                live_processes: w.live_processes,
                            })
                        })
                        .collect()
                },
            ),
            len: accounting.workload_table().len(),
        };
        let shards = shard_views(
            accounting.processes().shards(),
            previous.map(|p| p.processes.shards.as_slice()),
            |shard| {
                shard
                    .iter()
                    .flatten()
                    .map(|(key, p)| ProcessView {
                        key: *key,
                        comm: p.comm,
                        cgroup_id: p.cgroup_id,
                        workload_slot: p.workload,
                        cpu_ns_by_socket: p.cpu_ns_by_socket,
                        interval_ns: current(p.interval_seq, seq, p.interval_ns),
                        energy_joules: p.energy.joules,
                        interval_energy_joules: p.energy.interval(seq),
                        first_seen: p.first_seen,
                        last_seen: p.last_seen,
                        exited: p.exited_at.is_some(),
                    })
                    .collect()
            },
        );
        let processes = ProcessViews {
            len: shards.iter().map(|shard| shard.len()).sum(),
            shards,
        };
        let node = accounting.node();
        Self {
            sequence: seq,
            generated_at: base.generated_at,
            started_at: base.started_at,
            interval: base.interval,
            method: base.method,
            sockets: base.sockets,
            processes,
            workloads,
            // Shared with the previous snapshot unless a cgroup came or went.
            cgroup_paths: match previous {
                Some(previous) if !accounting.cgroups_changed() => {
                    Arc::clone(&previous.cgroup_paths)
                }
                _ => Arc::new(
                    accounting
                        .cgroup_paths()
                        .map(|(id, path)| (id, Arc::clone(path)))
                        .collect(),
                ),
            },
            node: NodeView {
                busy_ns_by_cpu: node.busy_ns_by_cpu.clone(),
                idle_ns_by_cpu: node.idle_ns_by_cpu.clone(),
                interval_busy_ns: node.interval_busy_ns,
                interval_capacity_ns: node.interval_capacity_ns,
            },
            losses: base.losses,
            sources: base.sources,
            read_errors: base.read_errors,
            threads_read: base.threads_read,
            energy: EnergyView {
                node: accounting.node_energy().clone(),
                ..base.energy
            },
            agent: base.agent,
            programs: base.programs,
            figures: OnceLock::new(),
        }
    }

    /// The workload `process` belongs to.
    pub fn workload_of(&self, process: &ProcessView) -> Option<&WorkloadView> {
        self.workloads.get(process.workload_slot)
    }

    pub fn containers(&self) -> impl Iterator<Item = &WorkloadView> {
        self.workloads
            .iter()
            .filter(|w| matches!(*w.workload, Workload::Container { .. }))
    }
}

/// The views of each shard of a table: the previous snapshot's where the
/// shard did not change, else built by `build`. A table's shards only grow
/// in number, and a new one is marked changed, so an unchanged shard has
/// its views in the previous snapshot at the same index.
fn shard_views<'a, T: 'a, V>(
    shards: impl Iterator<Item = (&'a [Option<T>], bool)>,
    previous: Option<&[Arc<[V]>]>,
    build: impl Fn(&'a [Option<T>]) -> Arc<[V]>,
) -> Vec<Arc<[V]>> {
    shards
        .enumerate()
        .map(
            |(index, (shard, changed))| match previous.and_then(|old| old.get(index)) {
                Some(old) if !changed => Arc::clone(old),
                _ => build(shard),
            },
        )
        .collect()
}

/// The workloads of a snapshot, by slot, in the shards of the accounting's
/// table (shared between snapshots while unchanged).
#[derive(Clone, Debug, Default)]
pub struct WorkloadViews {
    shards: Vec<Arc<[Option<WorkloadView>]>>,
    len: usize,
}

impl WorkloadViews {
    pub fn iter(&self) -> impl Iterator<Item = &WorkloadView> {
        self.iter_slots().map(|(_, view)| view)
    }

    /// The workloads with their slots (`ProcessView::workload_slot`).
    pub fn iter_slots(&self) -> impl Iterator<Item = (usize, &WorkloadView)> {
        self.shards
            .iter()
            .flat_map(|shard| shard.iter())
            .enumerate()
            .filter_map(|(slot, view)| Some((slot, view.as_ref()?)))
    }

    /// The workload in `slot`.
    pub fn get(&self, slot: usize) -> Option<&WorkloadView> {
        self.shards
            .get(slot / SHARD_SLOTS)?
            .get(slot % SHARD_SLOTS)?
            .as_ref()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Tests write workloads by hand: the Nth is in slot N.
impl From<Vec<WorkloadView>> for WorkloadViews {
    fn from(views: Vec<WorkloadView>) -> Self {
        let len = views.len();
        let slots: Vec<Option<WorkloadView>> = views.into_iter().map(Some).collect();
        Self {
            shards: slots.chunks(SHARD_SLOTS).map(Arc::from).collect(),
            len,
        }
    }
}

impl std::ops::Index<usize> for WorkloadViews {
    type Output = WorkloadView;

    fn index(&self, slot: usize) -> &WorkloadView {
        self.get(slot).expect("no workload in this slot")
    }
}

/// The processes of a snapshot, in the shards of the accounting's table
/// (shared between snapshots while unchanged).
#[derive(Clone, Debug, Default)]
pub struct ProcessViews {
    shards: Vec<Arc<[ProcessView]>>,
    len: usize,
}

impl ProcessViews {
    pub fn iter(&self) -> impl Iterator<Item = &ProcessView> {
        self.shards.iter().flat_map(|shard| shard.iter())
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl From<Vec<ProcessView>> for ProcessViews {
    fn from(views: Vec<ProcessView>) -> Self {
        Self {
            len: views.len(),
            shards: vec![views.into()],
        }
    }
}

/// What the collector adds to a snapshot beyond the accounting.
pub struct SnapshotBase {
    pub generated_at: SystemTime,
    pub started_at: SystemTime,
    pub interval: Duration,
    pub method: Method,
    pub sockets: usize,
    pub losses: Vec<(&'static str, u64)>,
    pub sources: Vec<SourceStatus>,
    pub read_errors: u64,
    pub threads_read: u64,
    /// Temperatures, GPUs, source health and model state of the interval
    /// (the node's books come from the accounting).
    pub energy: EnergyView,
    pub agent: AgentUsage,
    pub programs: Vec<ProgramStats>,
}

/// A per-interval figure if it was set in interval `seq`, else 0.
fn current(set_in: u64, seq: u64, value: u64) -> u64 {
    if set_in == seq { value } else { 0 }
}

/// Seconds from nanoseconds.
pub fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

pub fn total_seconds(by_socket: &SocketNs) -> f64 {
    seconds(total_ns(by_socket))
}

/// The latest snapshot, swapped in whole by the collector: the one seam
/// between the collector and every reader. Readers clone the `Arc` and let
/// go at once, so publishing never waits on a slow reader; sinks that act on
/// each new snapshot `subscribe` and are woken when one is published.
#[derive(Clone)]
pub struct SharedSnapshot {
    sender: Arc<watch::Sender<Arc<Snapshot>>>,
    exports: Arc<ExportStats>,
}

impl SharedSnapshot {
    pub fn new(initial: Snapshot) -> Self {
        let (sender, _) = watch::channel(Arc::new(initial));
        Self {
            sender: Arc::new(sender),
            exports: Arc::new(ExportStats::default()),
        }
    }

    pub fn latest(&self) -> Arc<Snapshot> {
        Arc::clone(&self.sender.borrow())
    }

    pub fn publish(&self, snapshot: Snapshot) {
        self.sender.send_replace(Arc::new(snapshot));
    }

    /// A receiver that sees every snapshot published from now on (at least
    /// the latest one, if it reads slower than they come).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.sender.subscribe()
    }

    /// Counters the sinks keep about themselves (exports, scrapes).
    pub fn exports(&self) -> &Arc<ExportStats> {
        &self.exports
    }
}
