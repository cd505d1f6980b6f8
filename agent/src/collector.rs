//! The per-interval loop: read the CPU source, account, publish a snapshot.

use std::{
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use tracing::{info, warn};

use crate::{
    accounting::{Accounting, Interval, Resolved},
    cgroup::CgroupResolver,
    config::{Config, MethodChoice},
    cpu::{CpuReading, CpuTimeSource, Method, ProgramStats, procfs::ProcfsCpuSource},
    ebpf::{EbpfCpuSource, EbpfLoadError, EbpfOptions},
    energy::{
        DeviceEnergy, Domain, SourceState, add_interval,
        attribution::{IdleBaseline, IdlePolicy},
        collector::{EnergyCollector, EnergyInterval, EnergyOptions, SourceRoot},
        model::ModelCoefficients,
    },
    snapshot::{AgentUsage, EnergyView, SharedSnapshot, Snapshot, SnapshotBase, SourceStatus},
    topology::Topology,
};

/// The energy sources' options from the configuration.
pub fn energy_options(config: &Config) -> EnergyOptions {
    use crate::config::{DEFAULT_HWMON_ROOT, DEFAULT_POWERCAP_ROOT, DEFAULT_THERMAL_ROOT};
    let root = |configured: &Option<PathBuf>, default: &str| SourceRoot {
        path: configured.clone().unwrap_or_else(|| PathBuf::from(default)),
        configured: configured.is_some(),
    };
    EnergyOptions {
        sysfs_root: config.sysfs_root.clone(),
        powercap: root(&config.powercap_root, DEFAULT_POWERCAP_ROOT),
        hwmon: root(&config.hwmon_root, DEFAULT_HWMON_ROOT),
        thermal: root(&config.thermal_root, DEFAULT_THERMAL_ROOT),
        gpu: config.gpu,
        // A quarter of the interval, within 50 ms..2 s: long enough for a
        // healthy NVML call, short enough that the interval keeps its pace.
        source_deadline: (config.interval / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(2)),
        model: ModelCoefficients {
            idle_watts_per_socket: config.model_idle_watts_per_socket,
            max_watts_per_socket: config.model_max_watts_per_socket,
            ..ModelCoefficients::default()
        },
    }
}

/// CPU time of the calling thread in microseconds (for the per-interval
/// cost breakdown in debug logs: wall time would count waiting for a CPU).
fn thread_cpu_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer; this clock always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// Formats an error with its chain of causes, as one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Picks the CPU source the configuration asks for. With `auto`, a kernel
/// that refuses the programs is logged once, with its reason, and the
/// procfs fallback takes over.
pub fn select_source(
    config: &Config,
    topology: &Topology,
    cgroup_root: &std::path::Path,
) -> Result<(Box<dyn CpuTimeSource>, Vec<SourceStatus>), EbpfLoadError> {
    let procfs = || {
        Box::new(ProcfsCpuSource::new(
            &config.procfs_root,
            cgroup_root,
            topology.clone(),
        )) as Box<dyn CpuTimeSource>
    };
    let ok = |name: &str| SourceStatus {
        name: name.to_owned(),
        status: SourceState::Ok,
        reason: None,
    };
    match config.method {
        MethodChoice::Procfs => Ok((
            procfs(),
            vec![
                SourceStatus {
                    name: "cpu:ebpf".into(),
                    status: SourceState::Disabled,
                    reason: Some("method = procfs in the configuration".into()),
                },
                ok("cpu:procfs"),
            ],
        )),
        MethodChoice::Ebpf | MethodChoice::Auto => {
            let options = EbpfOptions::new(
                config.btf_path.clone(),
                config.procfs_root.clone(),
                config.switch_log_len,
                config.overflow_map_capacity,
            );
            match EbpfCpuSource::load(&options, topology.clone()) {
                Ok(source) => Ok((Box::new(source), vec![ok("cpu:ebpf")])),
                Err(error) if config.method == MethodChoice::Auto => {
                    let release =
                        std::fs::read_to_string(config.procfs_root.join("sys/kernel/osrelease"))
                            .unwrap_or_default();
                    let reason = match crate::ebpf::below_kernel_floor(release.trim()) {
                        Some(note) => format!("{note}: {}", error_chain(&error)),
                        None => error_chain(&error),
                    };
                    warn!(
                        "kernel programs could not be loaded, falling back to procfs sampling: {reason}"
                    );
                    Ok((
                        procfs(),
                        vec![
                            SourceStatus {
                                name: "cpu:ebpf".into(),
                                status: SourceState::Failing,
                                reason: Some(reason),
                            },
                            ok("cpu:procfs"),
                        ],
                    ))
                }
                Err(error) => Err(error),
            }
        }
    }
}

pub struct Collector {
    source: Box<dyn CpuTimeSource>,
    sources: Vec<SourceStatus>,
    resolver: CgroupResolver,
    accounting: Accounting,
    topology: Topology,
    shared: SharedSnapshot,
    interval: Duration,
    started_at: SystemTime,
    last_read: Instant,
    read_errors: u64,
    threads_read: u64,
    consecutive_errors: u32,
    losses: Vec<(&'static str, u64)>,
    procfs_root: PathBuf,
    energy: EnergyCollector,
    idle_policy: IdlePolicy,
    idle_watts: std::collections::BTreeMap<String, f64>,
    idle_window_samples: usize,
    idle_percentile: f64,
    last_energy: EnergyInterval,
    last_energy_read: Instant,
    /// Each domain instance's energy since start (for device series).
    devices: Vec<DeviceEnergy>,
    programs: Vec<ProgramStats>,
    retention: Duration,
    last_retired: Option<Instant>,
}

/// How often expired processes and removed cgroups are forgotten (at most
/// a tenth of the retention).
const RETIRE_EVERY: Duration = Duration::from_secs(10);

/// After this many failed reads in a row the eBPF source is replaced by
/// the procfs fallback (the totals so far are kept).
const FAILURES_BEFORE_FALLBACK: u32 = 5;

impl Collector {
    pub fn new(
        source: Box<dyn CpuTimeSource>,
        sources: Vec<SourceStatus>,
        cgroup_root: PathBuf,
        topology: Topology,
        config: &Config,
        energy: EnergyCollector,
        shared: SharedSnapshot,
    ) -> Self {
        Self {
            source,
            sources,
            // A walk is cheap next to an interval (1,000 cgroups: ~2 ms), and
            // a miss is a new cgroup that must be named in the interval it
            // first ran in; `new_round` limits walks to one per interval.
            resolver: CgroupResolver::new(cgroup_root, Duration::from_millis(50)),
            accounting: Accounting::with_limits(config.retention, config.max_exited_processes),
            topology,
            shared,
            interval: config.interval,
            started_at: SystemTime::now(),
            last_read: Instant::now(),
            read_errors: 0,
            threads_read: 0,
            consecutive_errors: 0,
            losses: Vec::new(),
            procfs_root: config.procfs_root.clone(),
            energy,
            idle_policy: config.idle_policy,
            idle_watts: config.idle_watts.clone(),
            idle_window_samples: (config.idle_window.as_secs_f64() / config.interval.as_secs_f64())
                .ceil()
                .max(1.0) as usize,
            idle_percentile: config.idle_percentile,
            last_energy: EnergyInterval::default(),
            last_energy_read: Instant::now(),
            devices: Vec::new(),
            programs: Vec::new(),
            retention: config.retention,
            last_retired: None,
        }
    }

    fn since_energy_read(&mut self) -> f64 {
        let now = Instant::now();
        let seconds = now.duration_since(self.last_energy_read).as_secs_f64();
        self.last_energy_read = now;
        seconds
    }

    /// How often the energy counters need a sample between intervals, when
    /// the interval is longer than that.
    pub fn counter_sample_period(&self) -> Option<Duration> {
        self.energy
            .counter_sample_period()
            .filter(|period| *period < self.interval)
    }

    /// How soon the CPU source needs a drain before the next interval.
    pub fn drain_period(&self) -> Option<Duration> {
        self.source
            .drain_period()
            .filter(|period| *period < self.interval)
    }

    /// Lets the CPU source empty its kernel buffers (between intervals).
    pub fn drain(&mut self) {
        self.source.drain();
    }

    /// Samples the energy counters (between intervals).
    pub fn sample_counters(&mut self) {
        self.energy.sample_counters();
    }

    pub fn method(&self) -> Method {
        self.source.method()
    }

    /// One interval: read, account, publish. Never fails: a failed read is
    /// logged, counted and visible in the snapshot; what was measured stays.
    pub fn tick(&mut self) {
        let read_at = Instant::now();
        let wall = read_at.duration_since(self.last_read);
        let now = SystemTime::now();
        let cpu_start = thread_cpu_us();
        let result = self.source.read();
        let cpu_read = thread_cpu_us();
        let (reading, wall) = match result {
            Ok(reading) => {
                self.last_read = read_at;
                if reading.errors.is_empty() {
                    self.consecutive_errors = 0;
                    self.set_status(self.source_name(), SourceState::Ok, None);
                } else {
                    // Part of the read failed; what was read is applied
                    // below. Counted and shown like a failed read, but it
                    // does not push the source towards the fallback: it
                    // still delivers.
                    self.read_errors += reading.errors.len() as u64;
                    let reason = reading.errors.join("; ");
                    warn!(source = self.source_name(), "read partly failed: {reason}");
                    self.set_status(self.source_name(), SourceState::Failing, Some(reason));
                }
                if !reading.losses.is_empty() {
                    self.losses = reading.losses.clone();
                }
                self.programs = reading.programs.clone();
                self.threads_read += reading.threads_read;
                (reading, wall)
            }
            Err(error) => {
                self.read_errors += 1;
                self.consecutive_errors += 1;
                let reason = error_chain(&error);
                warn!(source = self.source_name(), "read failed: {reason}");
                self.set_status(self.source_name(), SourceState::Failing, Some(reason));
                if self.source.method() == Method::Ebpf
                    && self.consecutive_errors >= FAILURES_BEFORE_FALLBACK
                {
                    self.fall_back_to_procfs();
                }
                // Nothing read: the next reading covers this window (the
                // sources keep their marks). The meters still count: their
                // energy goes to the node's unattributed bucket.
                let nothing = CpuReading {
                    busy_missing: true,
                    ..CpuReading::default()
                };
                (nothing, Duration::ZERO)
            }
        };
        self.resolver.new_round();
        for (id, path, creator_uid) in &reading.cgroups_created {
            self.resolver.learn(*id, path, *creator_uid);
        }
        let energy_seconds = self.since_energy_read();
        let energy = self
            .energy
            .read(energy_seconds, &reading.busy_ns_by_cpu, &self.topology);
        let idle_watts = &self.idle_watts;
        let (window, percentile) = (self.idle_window_samples, self.idle_percentile);
        let baseline_for = |domain: Domain| match idle_watts.get(domain.as_str()) {
            Some(watts) => IdleBaseline::configured(*watts),
            None => IdleBaseline::learned(window, percentile),
        };
        let resolver = &mut self.resolver;
        self.accounting.apply_interval(
            &Interval {
                reading: &reading,
                now,
                wall,
                online_cpus: self.topology.online_cpus(),
                energy: &energy,
                energy_seconds,
                idle_policy: self.idle_policy,
            },
            &mut |cgroup_id| {
                let (workload, path) = resolver.workload_and_path(cgroup_id);
                Resolved { workload, path }
            },
            &baseline_for,
        );
        add_interval(&mut self.devices, &energy.energies);
        self.last_energy = energy;
        let cpu_accounted = thread_cpu_us();
        let resolver = &self.resolver;
        self.accounting
            .mark_gone_workloads(now, &mut |id| resolver.still_exists(id));
        // Retention works in minutes: a pass over every process and cgroup
        // every few seconds is enough, and keeps a quiet interval cheap.
        let retire_every = RETIRE_EVERY.min(self.retention / 10);
        if self
            .last_retired
            .is_none_or(|at| at.elapsed() >= retire_every)
        {
            self.last_retired = Some(Instant::now());
            self.accounting.forget_expired(now);
            let accounting = &self.accounting;
            self.resolver
                .forget_removed(|id| accounting.knows_cgroup(id));
        }
        let cpu_retired = thread_cpu_us();
        let previous = self.shared.latest();
        let snapshot = Snapshot::build(
            &self.accounting,
            SnapshotBase {
                generated_at: now,
                started_at: self.started_at,
                interval: if wall.is_zero() { self.interval } else { wall },
                method: self.source.method(),
                sockets: self.topology.sockets(),
                losses: {
                    let mut losses = self.losses.clone();
                    losses.push((
                        "exited_processes_evicted",
                        self.accounting.evicted_processes(),
                    ));
                    losses
                },
                sources: self.sources.clone(),
                read_errors: self.read_errors,
                threads_read: self.threads_read,
                energy: EnergyView {
                    temperatures: self.last_energy.temperatures.clone(),
                    gpus: self.last_energy.gpus.clone(),
                    sources: self.last_energy.health.clone(),
                    model_fits: self.last_energy.model_fits.clone(),
                    model: Some(self.energy.coefficients()),
                    estimated: !self.energy.metered(),
                    devices: self.devices.clone(),
                    ..EnergyView::default()
                },
                agent: AgentUsage::measure(),
                programs: self.programs.clone(),
            },
            Some(&previous),
        );
        drop(previous);
        self.shared.publish(snapshot);
        self.accounting.views_built();
        let cpu_done = thread_cpu_us();
        tracing::debug!(
            read_cpu_us = cpu_read - cpu_start,
            account_cpu_us = cpu_accounted - cpu_read,
            retire_cpu_us = cpu_retired - cpu_accounted,
            snapshot_cpu_us = cpu_done - cpu_retired,
            processes = self.accounting.processes().len(),
            "interval done"
        );
    }

    /// Replaces the eBPF source by procfs sampling after repeated failures
    /// (the totals so far are kept).
    fn fall_back_to_procfs(&mut self) {
        warn!("{FAILURES_BEFORE_FALLBACK} failed reads in a row: switching to procfs sampling");
        self.source = Box::new(ProcfsCpuSource::new(
            &self.procfs_root,
            self.resolver.root(),
            self.topology.clone(),
        ));
        self.sources.push(SourceStatus {
            name: "cpu:procfs".into(),
            status: SourceState::Ok,
            reason: None,
        });
        self.consecutive_errors = 0;
        // Sample once now so the next interval has a baseline.
        let _ = self.source.read();
        self.last_read = Instant::now();
    }

    fn source_name(&self) -> &'static str {
        match self.source.method() {
            Method::Ebpf => "cpu:ebpf",
            Method::Procfs => "cpu:procfs",
        }
    }

    fn set_status(&mut self, name: &str, status: SourceState, reason: Option<String>) {
        if let Some(entry) = self.sources.iter_mut().find(|s| s.name == name) {
            if entry.status != status {
                info!(source = name, "source is now {}", status.as_str());
            }
            entry.status = status;
            entry.reason = reason;
        }
    }
}
