//! Loads the kernel programs and reads them: the eBPF [`CpuTimeSource`].
//!
//! Start-up order matters for exactness: `sched_switch` and the process
//! events are attached first, then the baseline iterator writes every
//! existing thread's run time so far, which the reader marks as seen (a
//! record older than that adds nothing; a thread missing from it was born
//! after the attach, so all its time is new). Each read then reads the
//! switch logs ([`threads`]) and, when a log was full, `OVERFLOW`.

pub mod btf;
mod shared;
pub mod threads;
mod usage;

use std::{
    collections::HashSet,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use agent_common::{
    BaselineThread, CgroupCreated, KernelOffsets, LossCounter, LossCounts, OverflowKey,
    OverflowValue, ProcessStarted, SwitchRecord,
    names::{self, GLOBAL_OFFSETS},
};
use aya::{
    Btf, Ebpf, EbpfLoader, Endianness,
    maps::{HashMap as BpfHashMap, MapData},
    programs::{
        BtfTracePoint, Iter, ProgramError, RawTracePoint, RawTracePointRunOptions, TestRun as _,
    },
};
use rustc_hash::FxHashMap;
use thiserror::Error;
use tracing::{debug, info};

use self::threads::{LogReader, ProcessName, SharedArray, SharedMaps};
use crate::{
    cpu::{Comm, CpuReading, CpuSourceError, CpuTimeSource, Method, ProcessKey, ProgramStats},
    procinfo,
    topology::Topology,
};

/// The compiled kernel programs, embedded at build time by `build.rs`.
pub static KERNEL_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent"));

#[derive(Debug, Error)]
pub enum EbpfLoadError {
    #[error(
        "reading kernel BTF from {path}: {source} (a kernel built with CONFIG_DEBUG_INFO_BTF=y provides /sys/kernel/btf/vmlinux)"
    )]
    BtfRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel BTF at {path}: {source}")]
    BtfParse {
        path: PathBuf,
        #[source]
        source: btf::BtfError,
    },
    #[error("kernel BTF at {path}: {source}")]
    AyaBtf {
        path: PathBuf,
        #[source]
        source: aya::BtfError,
    },
    #[error("loading the eBPF object: {0}")]
    Object(#[from] aya::EbpfError),
    #[error("program `{program}`: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("program `{0}` missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("map `{map}`: {message}")]
    Map { map: &'static str, message: String },
    #[error("task iterator: {0}")]
    Iterator(String),
    #[error(
        "the agent runs in a PID namespace of its own: the kernel's task iterator would see only that namespace's tasks (run it with the host's PID namespace: `hostPID: true` in a pod)"
    )]
    ChildPidNamespace,
}

/// The oldest kernel the programs load on (verified by booting Ubuntu
/// 22.04's 5.15 and Debian 12's 6.1, and Debian 11's 5.10 below it:
/// `tests/tests/kernels.rs`): BPF atomic exchange (the switch path's
/// release store on arm64, still in the program the verifier checks on
/// x86) arrived in 5.12; 5.10's verifier refuses it ("BPF_STX uses
/// reserved fields").
pub const KERNEL_FLOOR: (u32, u32) = (5, 12);

/// When `release` (as `uname -r` prints it) is older than the floor, a
/// sentence that says so, to put before the loader's own error.
pub fn below_kernel_floor(release: &str) -> Option<String> {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|part| !part.is_empty())
        .map(|part| part.parse::<u32>().ok());
    let version = (numbers.next()??, numbers.next()??);
    (version < KERNEL_FLOOR).then(|| {
        format!(
            "Linux {release} is older than {}.{}, the oldest kernel powerlens's programs run on (BPF atomic exchange: 5.12)",
            KERNEL_FLOOR.0, KERNEL_FLOOR.1
        )
    })
}

/// Reads the offsets the programs need from the kernel's BTF.
pub fn kernel_offsets(btf: &btf::Btf) -> Result<KernelOffsets, btf::BtfError> {
    let task = |path: &[&str]| btf.member_offset("task_struct", path);
    // 5.14 renamed `volatile long state` to `unsigned int __state`.
    let (task_state, task_state_size) = match task(&["__state"]) {
        Ok(offset) => (offset, 4),
        Err(_) => (task(&["state"])?, 8),
    };
    Ok(KernelOffsets {
        task_sum_exec_runtime: task(&["se", "sum_exec_runtime"])?,
        task_pid: task(&["pid"])?,
        task_tgid: task(&["tgid"])?,
        task_start_boottime: task(&["start_boottime"])?,
        task_group_leader: task(&["group_leader"])?,
        task_comm: task(&["comm"])?,
        task_mm: task(&["mm"])?,
        task_cgroups: task(&["cgroups"])?,
        css_set_dfl_cgrp: btf.member_offset("css_set", &["dfl_cgrp"])?,
        cgroup_kn: btf.member_offset("cgroup", &["kn"])?,
        kernfs_node_id: btf.member_offset("kernfs_node", &["id"])?,
        task_state,
        task_state_size,
    })
}

/// Options for the kernel programs.
#[derive(Clone, Debug)]
pub struct EbpfOptions {
    pub btf_path: PathBuf,
    pub procfs_root: PathBuf,
    /// Records per CPU log (a power of two; 0: sized for the CPUs).
    pub switch_log_len: u32,
    /// Entries of `OVERFLOW`.
    pub overflow_map_capacity: u32,
}

impl EbpfOptions {
    pub fn new(
        btf_path: PathBuf,
        procfs_root: PathBuf,
        switch_log_len: u32,
        overflow_map_capacity: u32,
    ) -> Self {
        Self {
            btf_path,
            procfs_root,
            switch_log_len,
            overflow_map_capacity,
        }
    }
}

pub struct EbpfCpuSource {
    ebpf: Ebpf,
    cgroup_events: Option<aya::maps::RingBuf<MapData>>,
    process_events: aya::maps::RingBuf<MapData>,
    log: LogReader,
    loss_counts: SharedArray<LossCounts>,
    procfs_root: PathBuf,
    /// Processes seen running and not yet known to have exited, by PID.
    live: FxHashMap<u32, u64>,
    reads: u64,
    clock_ticks_per_second: u64,
    /// `switch_log_full` when `OVERFLOW` was last read.
    switch_log_full_seen: u64,
    /// `overflow_map_full`, and the read, at the last liveness sweep.
    overflow_lost_swept: u64,
    swept_at_read: u64,
    /// When the logs were last drained or read, and how far the fullest
    /// had filled since: sets the pace of drains between reads.
    last_drain: Instant,
    drain_period: Option<Duration>,
}

/// x86 keeps stores and loads in program order (TSO); every other CPU
/// powerlens builds for (arm64, riscv64, ...) may reorder them, and the
/// kernel programs then order their accesses with atomics.
const WEAKLY_ORDERED: u32 = if cfg!(any(target_arch = "x86_64", target_arch = "x86")) {
    0
} else {
    1
};

/// The live set is checked against `/proc` to retire processes whose end
/// left no trace. Every thread's last switch writes a record marked as its
/// last; only a full `OVERFLOW` loses one (`overflow_map_full`), so a sweep
/// runs when that counter grew (at most every `LIVENESS_SWEEP_SOONEST`
/// reads), and otherwise only every `LIVENESS_SWEEP_EVERY` as a safety net.
/// Listing /proc costs ~15 ms of CPU with 10,000 processes: a sweep every
/// minute was a quarter of a quiet interval's cost, on average.
const LIVENESS_SWEEP_EVERY: u64 = 3_600;
const LIVENESS_SWEEP_SOONEST: u64 = 60;

impl EbpfCpuSource {
    pub fn load(options: &EbpfOptions, topology: Topology) -> Result<Self, EbpfLoadError> {
        // The iterator walks the reader's PID namespace while the switch
        // path and `EXITED` see every task with host PIDs: in a child
        // namespace the two would not meet.
        if procinfo::in_child_pid_namespace(&options.procfs_root).unwrap_or(false) {
            return Err(EbpfLoadError::ChildPidNamespace);
        }
        raise_memlock_limit();
        // aya's EbpfLoader::new() parses the whole vmlinux BTF (~17 MiB of
        // heap) whether or not it is used; our programs carry no CO-RE
        // relocations, so drop it at once, before we allocate our own.
        let mut loader = EbpfLoader::new();
        loader.btf(None);
        let btf_bytes =
            std::fs::read(&options.btf_path).map_err(|source| EbpfLoadError::BtfRead {
                path: options.btf_path.clone(),
                source,
            })?;
        let (offsets, attach_btf) = btf::Btf::parse(&btf_bytes)
            .and_then(|parsed| {
                let offsets = kernel_offsets(&parsed)?;
                let attach = parsed.attach_points_only(&[
                    (btf::KIND_FUNC, "bpf_iter_task"),
                    (btf::KIND_TYPEDEF, "btf_trace_sched_switch"),
                    (btf::KIND_TYPEDEF, "btf_trace_cgroup_mkdir"),
                    (btf::KIND_TYPEDEF, "btf_trace_sched_process_fork"),
                    (btf::KIND_TYPEDEF, "btf_trace_sched_process_exec"),
                ]);
                Ok((offsets, attach))
            })
            .map_err(|source| EbpfLoadError::BtfParse {
                path: options.btf_path.clone(),
                source,
            })?;
        debug!(?offsets, "kernel structure offsets from BTF");
        let aya_btf = Btf::parse(&attach_btf, Endianness::default()).map_err(|source| {
            EbpfLoadError::AyaBtf {
                path: options.btf_path.clone(),
                source,
            }
        })?;
        drop((btf_bytes, attach_btf));
        let cpus = topology.possible_cpus().max(1) as u32;
        let log_len = match options.switch_log_len {
            0 => agent_common::default_switch_log_len(cpus),
            len => len.max(64).next_power_of_two(),
        };
        let mut ebpf = loader
            .override_global(GLOBAL_OFFSETS, &offsets, true)
            .override_global(names::GLOBAL_WEAKLY_ORDERED, &WEAKLY_ORDERED, true)
            .override_global(names::GLOBAL_SWITCH_LOG_LEN, &log_len, true)
            .map_max_entries(names::SWITCH_LOG, cpus * log_len)
            .map_max_entries(names::CPU_LOG, cpus)
            .map_max_entries(names::RUNNING, cpus)
            .map_max_entries(names::CONTROL, 1)
            .map_max_entries(names::LOSS_COUNTERS, cpus)
            .map_max_entries(names::OVERFLOW, options.overflow_map_capacity.max(1))
            .load(KERNEL_OBJECT)?;
        let shared = SharedMaps {
            log: map_array(&ebpf, names::SWITCH_LOG, cpus * log_len)?,
            cpu_log: map_array(&ebpf, names::CPU_LOG, cpus)?,
            control: map_array(&ebpf, names::CONTROL, 1)?,
            running: map_array(&ebpf, names::RUNNING, cpus)?,
            log_len: log_len as usize,
        };
        let loss_counts = map_array(&ebpf, names::LOSS_COUNTERS, cpus)?;

        // 1. The switch path and the names of processes as they start.
        attach_tp_btf(&mut ebpf, names::SCHED_SWITCH, "sched_switch", &aya_btf)?;
        attach_tp_btf(
            &mut ebpf,
            names::PROCESS_FORK,
            "sched_process_fork",
            &aya_btf,
        )?;
        attach_tp_btf(
            &mut ebpf,
            names::PROCESS_EXEC,
            "sched_process_exec",
            &aya_btf,
        )?;
        let process_events = take_ring(&mut ebpf, names::PROCESS_EVENTS)?;
        // 2. Baseline: past run time of existing threads is not ours to report.
        load_iter(&mut ebpf, names::BASELINE_TASKS, &aya_btf)?;
        let baseline = run_iter(&mut ebpf, names::BASELINE_TASKS)?;
        // 3. The reader of running threads (run on demand, never attached).
        program::<RawTracePoint>(&mut ebpf, names::READ_RUNNING)?
            .load()
            .map_err(|source| EbpfLoadError::Program {
                program: names::READ_RUNNING,
                source,
            })?;
        // 4. Cgroup names as they are made. Optional: without it, a
        //    container that lives less than an interval is charged to the
        //    host, as before.
        let cgroup_events = match attach_tp_btf(
            &mut ebpf,
            names::CGROUP_MKDIR,
            "cgroup_mkdir",
            &aya_btf,
        )
        .and_then(|()| take_ring(&mut ebpf, names::CGROUP_EVENTS))
        {
            Ok(ring) => Some(ring),
            Err(error) => {
                tracing::warn!(
                    "cgroup_mkdir not attached ({error}): containers that live less than one interval will be charged to the host"
                );
                None
            }
        };

        let clock_ticks_per_second = procinfo::clock_ticks_per_second();
        let procfs_root = options.procfs_root.clone();
        let resolve_root = procfs_root.clone();
        let mut log = LogReader::new(
            shared,
            cpus as usize,
            (0..cpus as usize)
                .map(|cpu| topology.socket_of(cpu as u32))
                .collect(),
            clock_ticks_per_second,
            Box::new(move |tgid| {
                process_name_from_procfs(&resolve_root, tgid, clock_ticks_per_second)
            }),
        );
        log.baseline(&baseline);
        let baseline_threads = baseline.len();
        drop((aya_btf, baseline));
        release_free_memory();
        info!(
            baseline_threads,
            switch_log_len = log_len,
            "kernel programs loaded and attached (sched_switch, sched_process_fork, sched_process_exec, cgroup_mkdir)"
        );
        Ok(Self {
            ebpf,
            cgroup_events,
            process_events,
            log,
            loss_counts,
            procfs_root,
            live: FxHashMap::default(),
            reads: 0,
            clock_ticks_per_second,
            switch_log_full_seen: 0,
            overflow_lost_swept: 0,
            swept_at_read: 0,
            last_drain: Instant::now(),
            // Until the first read has measured the pace of switches.
            drain_period: Some(Duration::from_millis(100)),
        })
    }

    /// The loaded object, for benchmarks that attach the empty baseline.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// The switch path's and the reader's run-time statistics (one
    /// `bpf_obj_get_info_by_fd` each). A failure only leaves a program out.
    fn program_stats(&self) -> Vec<ProgramStats> {
        [names::SCHED_SWITCH, names::READ_RUNNING]
            .into_iter()
            .filter_map(|name| {
                let info = self.ebpf.program(name)?.info().ok()?;
                Some(ProgramStats {
                    name,
                    run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
                    run_count: info.run_count(),
                })
            })
            .collect()
    }

    /// The kernel's loss counters, summed over CPUs (read from memory).
    fn read_losses(&self) -> Vec<(&'static str, u64)> {
        LossCounter::ALL
            .into_iter()
            .map(|counter| (counter.name(), self.loss_count(counter)))
            .collect()
    }

    /// What `OVERFLOW` holds, when a switch found its log full since the
    /// last look. Entries are deleted once read, unless switches went on
    /// overflowing meanwhile (a delete could then take a newer record than
    /// the one read): those are read again next time, which adds nothing
    /// twice (records are absolute). A thread's last record is deleted in
    /// any case: nothing can follow it.
    fn drain_overflow(&mut self) -> Result<Vec<(SwitchRecord, u32)>, CpuSourceError> {
        let full_now = self.loss_count(LossCounter::SwitchLogFull);
        if full_now == self.switch_log_full_seen {
            return Ok(Vec::new());
        }
        let entries: Vec<(OverflowKey, OverflowValue)> =
            self.overflow_map()?.iter().filter_map(Result::ok).collect();
        let full_after = self.loss_count(LossCounter::SwitchLogFull);
        let quiet = full_after == full_now;
        let mut overflow = self.overflow_map()?;
        for (key, value) in &entries {
            if quiet || value.record.ended() {
                let _ = overflow.remove(key);
            }
        }
        if quiet {
            self.switch_log_full_seen = full_after;
        }
        Ok(entries
            .into_iter()
            .map(|(_, value)| (value.record, value.cpu))
            .collect())
    }

    fn overflow_map(
        &mut self,
    ) -> Result<BpfHashMap<&mut MapData, OverflowKey, OverflowValue>, CpuSourceError> {
        let map = self
            .ebpf
            .map_mut(names::OVERFLOW)
            .ok_or(CpuSourceError::Map {
                map: names::OVERFLOW,
                message: "missing".into(),
            })?;
        BpfHashMap::try_from(map).map_err(|e| map_error(names::OVERFLOW, e))
    }

    fn loss_count(&self, counter: LossCounter) -> u64 {
        (0..self.loss_counts.len())
            .filter_map(|cpu| self.loss_counts.at(cpu))
            // SAFETY: an aligned u64 of a CPU's entry, which the kernel only
            // adds to atomically.
            .map(|counts| unsafe {
                std::sync::atomic::AtomicU64::from_ptr(&raw mut (*counts).counts[counter as usize])
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
            .sum()
    }

    /// New processes' names, from `PROCESS_EVENTS`.
    fn drain_process_events(&mut self) {
        while let Some(item) = self.process_events.next() {
            if item.len() < size_of::<ProcessStarted>() {
                continue;
            }
            // SAFETY: the programs write whole ProcessStarted records.
            let event: ProcessStarted = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            self.log.name_process(
                event.tgid,
                ProcessName {
                    start_ns: event.start_ns,
                    comm: Comm(event.comm),
                },
            );
        }
    }

    /// Sets when the logs next need a drain before the next read.
    fn pace_drains(&mut self, fullest: usize) {
        let elapsed = self.last_drain.elapsed();
        self.last_drain = Instant::now();
        self.drain_period = drain_period(fullest, self.log.log_len(), elapsed);
    }

    fn sweep_liveness(&mut self, reading: &mut CpuReading) {
        let Ok(pids) = procinfo::list_pids(&self.procfs_root) else {
            return;
        };
        let pids: HashSet<u32> = pids.into_iter().collect();
        self.log.retain_processes(|pid| pids.contains(&pid));
        self.live.retain(|pid, start_ns| {
            let alive = pids.contains(pid);
            if !alive {
                reading.exited.push(ProcessKey {
                    pid: *pid,
                    start_ns: *start_ns,
                });
            }
            alive
        });
    }
}

impl CpuTimeSource for EbpfCpuSource {
    fn method(&self) -> Method {
        Method::Ebpf
    }

    fn drain_period(&self) -> Option<Duration> {
        self.drain_period
    }

    fn drain(&mut self) {
        let fullest = self.log.fullest_log();
        self.drain_process_events();
        self.log.drain();
        self.pace_drains(fullest);
    }

    fn read(&mut self) -> Result<CpuReading, CpuSourceError> {
        self.reads += 1;
        let mut reading = CpuReading::default();
        self.drain_process_events();
        let overflow = self.drain_overflow().unwrap_or_else(|error| {
            reading.errors.push(error.to_string());
            Vec::new()
        });
        let fullest = self.log.fullest_log();
        let running = self
            .ebpf
            .program(names::READ_RUNNING)
            .and_then(|program| <&RawTracePoint>::try_from(program).ok());
        let log = self.log.read(
            &mut |cpu| {
                let program =
                    running.ok_or_else(|| std::io::Error::other("read_running not loaded"))?;
                program
                    .test_run(RawTracePointRunOptions {
                        cpu: Some(cpu),
                        ..RawTracePointRunOptions::new()
                    })
                    .map(drop)
                    .map_err(|error| match error {
                        ProgramError::SyscallError(error) => error.io_error,
                        other => std::io::Error::other(other.to_string()),
                    })
            },
            &overflow,
        );
        self.pace_drains(fullest);
        reading.errors.extend(log.errors);
        reading.threads_read = log.records as u64;
        // A PID is checked for reuse when a thread of it is first seen, not
        // at every report.
        for process in log.threads_new {
            match self.live.insert(process.pid, process.start_ns) {
                // The PID was reused: the old process is gone.
                Some(old_start) if old_start != process.start_ns => {
                    reading.exited.push(ProcessKey {
                        pid: process.pid,
                        start_ns: old_start,
                    });
                }
                _ => {}
            }
        }
        reading.usage = log.usage;
        // A thread ended: is it the whole process?
        for process in log.threads_ended {
            let alive = procinfo::process_alive(
                &self.procfs_root,
                process.pid,
                process.start_ns,
                self.clock_ticks_per_second,
            );
            if !alive {
                reading.exited.push(process);
                self.log.forget_process(process.pid, process.start_ns);
                if self.live.get(&process.pid) == Some(&process.start_ns) {
                    self.live.remove(&process.pid);
                }
            }
        }
        let lost = self.loss_count(LossCounter::OverflowMapFull);
        if self.reads.is_multiple_of(LIVENESS_SWEEP_EVERY)
            || (lost != self.overflow_lost_swept
                && self.reads - self.swept_at_read >= LIVENESS_SWEEP_SOONEST)
        {
            self.overflow_lost_swept = lost;
            self.swept_at_read = self.reads;
            self.sweep_liveness(&mut reading);
        }
        debug!(busy = ?log.busy_ns_by_cpu, records = log.records, "switch logs read");
        reading.busy_ns_by_cpu = log.busy_ns_by_cpu;
        reading.losses = self.read_losses();
        reading
            .losses
            .push(("processes_named_from_procfs", log.unnamed as u64));
        reading.programs = self.program_stats();
        if let Some(ring) = &mut self.cgroup_events {
            while let Some(item) = ring.next() {
                if item.len() < size_of::<CgroupCreated>() {
                    continue;
                }
                // SAFETY: the program writes whole CgroupCreated records.
                let record: CgroupCreated =
                    unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                let end = record
                    .path
                    .iter()
                    .position(|b| *b == 0)
                    .unwrap_or(record.path.len());
                let path = String::from_utf8_lossy(&record.path[..end]).into_owned();
                reading
                    .cgroups_created
                    .push((record.id, path, record.creator_uid));
            }
        }
        Ok(reading)
    }
}

/// A process's start and name from `/proc/<tgid>/stat`, for one no event
/// named (its event was dropped, or it started while the programs were
/// being attached).
fn process_name_from_procfs(root: &Path, tgid: u32, ticks_per_second: u64) -> Option<ProcessName> {
    let stat = procinfo::read_stat(root, tgid)?;
    Some(ProcessName {
        start_ns: procinfo::ticks_to_ns(stat.starttime, ticks_per_second),
        comm: Comm::from_str_lossy(&stat.comm),
    })
}

fn map_error(map: &'static str, error: impl std::fmt::Display) -> CpuSourceError {
    CpuSourceError::Map {
        map,
        message: error.to_string(),
    }
}

/// Takes the ring buffer `name` out of the object.
fn take_ring(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<aya::maps::RingBuf<MapData>, EbpfLoadError> {
    let map = ebpf.take_map(name).ok_or(EbpfLoadError::Map {
        map: name,
        message: "missing from the object".into(),
    })?;
    aya::maps::RingBuf::try_from(map).map_err(|e| EbpfLoadError::Map {
        map: name,
        message: e.to_string(),
    })
}

/// The program `name` of the object, as the kind `T` it must be.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, EbpfLoadError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(EbpfLoadError::MissingProgram(name))?
        .try_into()
        .map_err(|source| EbpfLoadError::Program {
            program: name,
            source,
        })
}

/// Loads the `tp_btf` program `name` for the kernel's tracepoint
/// `tracepoint` and attaches it.
fn attach_tp_btf(
    ebpf: &mut Ebpf,
    name: &'static str,
    tracepoint: &str,
    btf: &Btf,
) -> Result<(), EbpfLoadError> {
    let program: &mut BtfTracePoint = program(ebpf, name)?;
    program
        .load(tracepoint, btf)
        .and_then(|()| program.attach().map(drop))
        .map_err(|source| EbpfLoadError::Program {
            program: name,
            source,
        })
}

fn load_iter(ebpf: &mut Ebpf, name: &'static str, btf: &Btf) -> Result<(), EbpfLoadError> {
    program::<Iter>(ebpf, name)?
        .load("task", btf)
        .map_err(|source| EbpfLoadError::Program {
            program: name,
            source,
        })
}

/// Runs the loaded baseline iterator once and returns what it wrote.
fn run_iter(ebpf: &mut Ebpf, name: &'static str) -> Result<Vec<BaselineThread>, EbpfLoadError> {
    let program = program::<Iter>(ebpf, name)?;
    let link_id = program.attach().map_err(|source| EbpfLoadError::Program {
        program: name,
        source,
    })?;
    let link = program
        .take_link(link_id)
        .map_err(|source| EbpfLoadError::Program {
            program: name,
            source,
        })?;
    let mut file = link
        .into_file()
        .map_err(|e| EbpfLoadError::Iterator(e.to_string()))?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut bytes)
        .map_err(|e| EbpfLoadError::Iterator(format!("reading {name}: {e}")))?;
    Ok(bytes
        .chunks_exact(size_of::<BaselineThread>())
        // SAFETY: the program writes whole BaselineThread records.
        .map(|chunk| unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast()) })
        .collect())
}

/// The first `len` elements of the object's mmapable array `name`.
fn map_array<T: Copy + Default>(
    ebpf: &Ebpf,
    name: &'static str,
    len: u32,
) -> Result<SharedArray<T>, EbpfLoadError> {
    let error = |message: String| EbpfLoadError::Map { map: name, message };
    let data = match ebpf.map(name) {
        Some(aya::maps::Map::Array(data)) => data,
        Some(_) => return Err(error("not an array".into())),
        None => return Err(error("missing from the object".into())),
    };
    SharedArray::map(data.fd().as_fd(), len as usize)
        .map_err(|e| error(format!("mapping it into memory: {e}")))
}

/// Hands memory freed after loading back to the kernel, so the resident
/// size reflects what the agent uses while it runs.
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it so a
/// default limit of 64 KiB does not make loading fail. Harmless later.
fn raise_memlock_limit() {
    let limit = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    let result = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) };
    if result != 0 {
        debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// How long the fullest log takes to fill a quarter of `log_len` at the
/// pace it filled (`fullest` records in `elapsed`); `None` when that is so
/// long that the next read comes first. A log found full filled faster
/// than its count shows: an eighth of the time then, until the pace is
/// measured. (The pace is kept while the logs stay busy: a first version
/// stopped draining once a drain found a log under a quarter full, so a
/// busy log filled up before the next read and a fifth of a ping-pong's
/// switches went to the overflow map.)
fn drain_period(fullest: usize, log_len: usize, elapsed: Duration) -> Option<Duration> {
    const SHORTEST: Duration = Duration::from_millis(5);
    const LONGEST: Duration = Duration::from_secs(10);
    if fullest == 0 {
        return None;
    }
    let period = if fullest >= log_len {
        elapsed / 8
    } else {
        elapsed.mul_f64((log_len / 4).max(1) as f64 / fullest as f64)
    };
    let period = period.max(SHORTEST);
    (period < LONGEST).then_some(period)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drains_keep_a_busy_log_under_a_quarter_full() {
        let second = Duration::from_secs(1);
        // 43,000 records a second into logs of 8,192: a quarter in 48 ms.
        let period = drain_period(43_000 / 20, 8_192, second / 20).unwrap();
        assert!((47..=48).contains(&period.as_millis()), "{period:?}");
        // Drained often enough to stay under a quarter: keep that pace.
        let again = drain_period(2_000, 8_192, period).unwrap();
        assert!(again >= period, "{again:?}");
        assert!(again.as_millis() <= 50, "{again:?}");
        // Found full: the pace is unknown, so much sooner.
        assert_eq!(
            drain_period(8_192, 8_192, second),
            Some(Duration::from_millis(125))
        );
        // Never faster than 5 ms; never for a quiet log.
        assert_eq!(
            drain_period(8_000, 8_192, Duration::from_millis(1)),
            Some(Duration::from_millis(5))
        );
        assert_eq!(drain_period(0, 8_192, second), None);
        assert_eq!(drain_period(100, 8_192, second), None, "20 s away");
    }

    #[test]
    fn kernels_below_the_floor_are_named() {
        assert!(
            below_kernel_floor("5.10.0-32-cloud-amd64")
                .unwrap()
                .contains("older than 5.12")
        );
        assert_eq!(below_kernel_floor("5.15.0-204-generic"), None);
        assert_eq!(below_kernel_floor("6.18.0"), None);
        assert!(below_kernel_floor("4.18.0-553.el8_10.x86_64").is_some());
        assert_eq!(below_kernel_floor("garbage"), None);
    }

    #[test]
    fn switch_logs_are_sized_to_8_mib_within_bounds() {
        let len = agent_common::default_switch_log_len;
        assert_eq!(len(0), 8_192);
        assert_eq!(len(2), 8_192);
        assert_eq!(len(25), 8_192);
        assert_eq!(len(32), 4_096);
        assert_eq!(len(64), 2_048);
        assert_eq!(len(128), 2_048);
        assert_eq!(len(1_024), 2_048, "never under 2,048");
        for cpus in [1, 3, 24, 48, 96, 100] {
            assert!(len(cpus).is_power_of_two());
            assert!(u64::from(len(cpus)) * 40 * u64::from(cpus) <= 8 << 20 || len(cpus) == 2_048);
        }
    }

    #[test]
    fn offsets_of_the_running_kernel() {
        let Ok(data) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            eprintln!("skipping: no kernel BTF readable here");
            return;
        };
        let btf = btf::Btf::parse(&data).unwrap();
        let offsets = kernel_offsets(&btf).unwrap();
        assert!(offsets.task_sum_exec_runtime > 0);
        assert_ne!(offsets.task_pid, offsets.task_tgid);
    }
}
