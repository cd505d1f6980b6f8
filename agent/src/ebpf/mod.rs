//! Loads the kernel programs and reads them: the eBPF [`CpuTimeSource`].
//!
//! Start-up order matters for exactness: the baseline iterator first marks
//! every existing thread's past run time as claimed, then `sched_switch` is
//! attached, then each read runs `dump_tasks` and drains `EXITED`.

pub mod btf;

use std::{collections::HashSet, path::PathBuf};

use agent_common::{
    CgroupCreated, ExitedKey, ExitedValue, KernelOffsets, LossCounter, MAX_SOCKETS, TaskRecord,
    names::{self, GLOBAL_CPU_TO_SOCKET, GLOBAL_OFFSETS},
};
use aya::{
    Btf, Ebpf, EbpfLoader, Endianness,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray},
    programs::{BtfTracePoint, Iter, ProgramError},
};
use rustc_hash::FxHashMap;
use thiserror::Error;
use tracing::{debug, info};

use crate::{
    cpu::{
        Comm, CpuReading, CpuSourceError, CpuTimeSource, Method, ProcessKey, ProcessUsage,
        ProgramStats,
    },
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

/// The oldest kernel the programs load on: task storage for tracing
/// programs arrived in 5.11, BPF compare-and-exchange in 5.12. (Verified by
/// booting Ubuntu 22.04's 5.15 and Debian 12's 6.1, and Debian 11's 5.10
/// below it: `tests/tests/kernels.rs`.)
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
            "Linux {release} is older than {}.{}, the oldest kernel powerlens's programs run on (task storage for tracing programs: 5.11; BPF compare-and-exchange: 5.12)",
            KERNEL_FLOOR.0, KERNEL_FLOOR.1
        )
    })
}

/// Reads the offsets the programs need from the kernel's BTF.
pub fn kernel_offsets(btf: &btf::Btf) -> Result<KernelOffsets, btf::BtfError> {
    let task = |path: &[&str]| btf.member_offset("task_struct", path);
    // Since 5.16 `cpu` lives in task_struct; before, in thread_info.
    let task_cpu = task(&["cpu"]).or_else(|_| task(&["thread_info", "cpu"]))?;
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
        task_cgroups: task(&["cgroups"])?,
        task_cpu,
        css_set_dfl_cgrp: btf.member_offset("css_set", &["dfl_cgrp"])?,
        cgroup_kn: btf.member_offset("cgroup", &["kn"])?,
        kernfs_node_id: btf.member_offset("kernfs_node", &["id"])?,
        task_state,
        task_state_size,
        task_nvcsw: task(&["nvcsw"])?,
        task_nivcsw: task(&["nivcsw"])?,
    })
}

/// Parses the iterator's output: a sequence of `TaskRecord`s. A trailing
/// partial record (which the kernel never writes) is ignored.
pub fn parse_records(bytes: &[u8]) -> impl Iterator<Item = TaskRecord> + '_ {
    bytes
        .chunks_exact(size_of::<TaskRecord>())
        // SAFETY: TaskRecord is repr(C) plain integers; any bytes are valid;
        // read_unaligned copes with the Vec's alignment.
        .map(|chunk| unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast::<TaskRecord>()) })
}

/// Turns one record into usage (the kernel side already put the slice in
/// progress on the socket of the CPU it runs on).
pub fn record_usage(record: &TaskRecord, ticks_per_second: u64) -> ProcessUsage {
    ProcessUsage {
        key: ProcessKey::at_tick(record.tgid, record.process_start_ns, ticks_per_second),
        comm: Comm(record.comm),
        cgroup_id: record.cgroup_id,
        runtime_ns_by_socket: record.runtime_ns_by_socket,
    }
}

/// What the agent remembers of an `EXITED` entry between reads.
#[derive(Clone, Debug, Default)]
struct ExitedTrack {
    /// Cumulative values already reported.
    reported: [u64; MAX_SOCKETS],
    /// `threads_exited` when the process was last checked for being alive.
    threads_exited_checked: u64,
    /// The process is confirmed gone; the entry is deleted on the next read
    /// that finds it unchanged.
    process_gone: bool,
    /// Reads since the entry was deleted (the track is then forgotten).
    deleted_reads: u32,
    deleted: bool,
}

/// Options for the kernel programs.
#[derive(Clone, Debug)]
pub struct EbpfOptions {
    pub btf_path: PathBuf,
    pub procfs_root: PathBuf,
    /// Entries of the `EXITED` map.
    pub exited_map_capacity: u32,
    /// Bytes asked of the task iterator per `read()` (`ITER_READ_BYTES`
    /// unless a diagnostic run sets `POWERLENS_ITERATOR_READ_BYTES`, e.g.
    /// to exercise the programs' undo of records dropped at the kernel
    /// buffer's edge).
    pub iterator_read_bytes: usize,
}

impl EbpfOptions {
    pub fn new(btf_path: PathBuf, procfs_root: PathBuf, exited_map_capacity: u32) -> Self {
        let iterator_read_bytes = std::env::var("POWERLENS_ITERATOR_READ_BYTES")
            .ok()
            .and_then(|text| text.parse::<usize>().ok())
            .filter(|bytes| *bytes >= size_of::<TaskRecord>())
            .unwrap_or(ITER_READ_BYTES);
        Self {
            btf_path,
            procfs_root,
            exited_map_capacity,
            iterator_read_bytes,
        }
    }
}

pub struct EbpfCpuSource {
    ebpf: Ebpf,
    cgroup_events: Option<aya::maps::RingBuf<MapData>>,
    iterator_read_bytes: usize,
    topology: Topology,
    procfs_root: PathBuf,
    buffer: Vec<u8>,
    exited: FxHashMap<ExitedKey, ExitedTrack>,
    last_busy_ns: Vec<u64>,
    /// In-progress slices per CPU at the previous read: already reported as
    /// busy, and added to the kernel's per-CPU busy counter only when they
    /// end.
    last_in_progress_ns: Vec<u64>,
    /// Processes seen running and not yet known to have exited, by PID.
    live: FxHashMap<u32, u64>,
    reads: u64,
    clock_ticks_per_second: u64,
}

/// x86 keeps stores and loads in program order (TSO); every other CPU
/// powerlens builds for (arm64, riscv64, ...) may reorder them, and the
/// kernel programs then order their accesses with atomics.
const WEAKLY_ORDERED: u32 = if cfg!(any(target_arch = "x86_64", target_arch = "x86")) {
    0
} else {
    1
};

/// CLOCK_BOOTTIME now, in ns (the clock of `task_struct.start_boottime`).
fn boottime_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer; CLOCK_BOOTTIME exists since 2.6.39.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Every this many reads, the live set is checked against `/proc` to retire
/// processes that left no trace in `EXITED` (only when that map was full:
/// every thread's last switch leaves an entry). Listing /proc costs ~15 ms
/// of CPU with 10,000 processes, hence the long period.
const LIVENESS_SWEEP_EVERY: u64 = 60;

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
        let cpu_table = topology.kernel_table();
        let mut ebpf = loader
            // aya has no user-space wrapper for task storage; we only ever
            // reach it from the programs, so let aya create it as is.
            .allow_unsupported_maps()
            .override_global(GLOBAL_OFFSETS, &offsets, true)
            .override_global(GLOBAL_CPU_TO_SOCKET, &cpu_table, true)
            .override_global(names::GLOBAL_SOCKETS, &(topology.sockets() as u32), true)
            .override_global(names::GLOBAL_AGENT_START_BOOTTIME_NS, &boottime_ns(), true)
            .override_global(names::GLOBAL_WEAKLY_ORDERED, &WEAKLY_ORDERED, true)
            .map_max_entries(names::EXITED, options.exited_map_capacity)
            .load(KERNEL_OBJECT)?;

        // 1. Baseline: past run time of existing threads is not ours to report.
        load_iter(&mut ebpf, names::BASELINE_TASKS, &aya_btf)?;
        let mut sink = Vec::new();
        run_iter(&mut ebpf, names::BASELINE_TASKS, &mut sink, ITER_READ_BYTES)?;
        // 2. The switch path.
        let switch: &mut BtfTracePoint = ebpf
            .program_mut(names::SCHED_SWITCH)
            .ok_or(EbpfLoadError::MissingProgram(names::SCHED_SWITCH))?
            .try_into()
            .map_err(|source| EbpfLoadError::Program {
                program: names::SCHED_SWITCH,
                source,
            })?;
        switch
            .load("sched_switch", &aya_btf)
            .and_then(|()| switch.attach().map(drop))
            .map_err(|source| EbpfLoadError::Program {
                program: names::SCHED_SWITCH,
                source,
            })?;
        // 3. The reader.
        load_iter(&mut ebpf, names::DUMP_TASKS, &aya_btf)?;
        // 4. Cgroup names as they are made. Optional: without it, a
        //    container that lives less than an interval is charged to the
        //    host, as before.
        let cgroup_events = match attach_cgroup_mkdir(&mut ebpf, &aya_btf) {
            Ok(ring) => Some(ring),
            Err(error) => {
                tracing::warn!(
                    "cgroup_mkdir not attached ({error}): containers that live less than one interval will be charged to the host"
                );
                None
            }
        };

        let mut source = Self {
            ebpf,
            cgroup_events,
            topology,
            procfs_root: options.procfs_root.clone(),
            iterator_read_bytes: options.iterator_read_bytes,
            buffer: Vec::with_capacity(1 << 16),
            exited: FxHashMap::default(),
            last_busy_ns: Vec::new(),
            last_in_progress_ns: Vec::new(),
            live: FxHashMap::default(),
            reads: 0,
            clock_ticks_per_second: procinfo::clock_ticks_per_second(),
        };
        // Start the busy counters from here, not from the baseline.
        source.last_busy_ns = source.read_busy_ns().map_err(|e| EbpfLoadError::Map {
            map: names::CPU_BUSY_NS,
            message: e.to_string(),
        })?;
        drop(aya_btf);
        release_free_memory();
        info!("kernel programs loaded and attached (sched_switch, task iterator)");
        Ok(source)
    }

    /// The loaded object, for benchmarks that attach the empty baseline.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// A per-CPU array of u64 counters of the object, by name.
    fn per_cpu_counters(
        &self,
        name: &'static str,
    ) -> Result<PerCpuArray<&MapData, u64>, CpuSourceError> {
        let map = self.ebpf.map(name).ok_or(CpuSourceError::Map {
            map: name,
            message: "missing from the object".into(),
        })?;
        PerCpuArray::try_from(map).map_err(|e| map_error(name, e))
    }

    fn read_busy_ns(&self) -> Result<Vec<u64>, CpuSourceError> {
        let busy = self.per_cpu_counters(names::CPU_BUSY_NS)?;
        let values = busy
            .get(&0, 0)
            .map_err(|e| map_error(names::CPU_BUSY_NS, e))?;
        Ok(values.iter().copied().collect())
    }

    /// The switch path's and the reader's run-time statistics (one
    /// `bpf_obj_get_info_by_fd` each). A failure only leaves a program out.
    fn program_stats(&self) -> Vec<ProgramStats> {
        [names::SCHED_SWITCH, names::DUMP_TASKS]
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

    fn read_losses(&self) -> Result<Vec<(&'static str, u64)>, CpuSourceError> {
        let counters = self.per_cpu_counters(names::LOSS_COUNTERS)?;
        let mut losses = Vec::with_capacity(LossCounter::ALL.len());
        for counter in LossCounter::ALL {
            let values = counters
                .get(&(counter as u32), 0)
                .map_err(|e| map_error(names::LOSS_COUNTERS, e))?;
            losses.push((counter.name(), values.iter().sum()));
        }
        Ok(losses)
    }

    /// Reads `EXITED`: reports what grew since the last read, confirms
    /// which processes are gone, and deletes entries that can no longer grow.
    fn drain_exited(&mut self, reading: &mut CpuReading) -> Result<(), CpuSourceError> {
        let map = self
            .ebpf
            .map_mut(names::EXITED)
            .ok_or(CpuSourceError::Map {
                map: names::EXITED,
                message: "missing".into(),
            })?;
        let mut exited: BpfHashMap<&mut MapData, ExitedKey, ExitedValue> =
            BpfHashMap::try_from(map).map_err(|e| map_error(names::EXITED, e))?;
        let entries: Vec<(ExitedKey, ExitedValue)> = exited.iter().filter_map(Result::ok).collect();
        let mut present = HashSet::with_capacity(entries.len());
        for (key, value) in entries {
            present.insert(key);
            let track = self.exited.entry(key).or_default();
            if track.deleted {
                // The entry came back after we deleted it (a thread's last
                // flush raced our delete): everything in it is new.
                *track = ExitedTrack::default();
            }
            let mut delta = [0u64; MAX_SOCKETS];
            for ((delta, reported), now) in delta
                .iter_mut()
                .zip(track.reported.iter_mut())
                .zip(value.runtime_ns_by_socket)
            {
                *delta = now.saturating_sub(*reported);
                *reported = (*reported).max(now);
            }
            let grew = delta.iter().any(|d| *d > 0);
            let process =
                ProcessKey::at_tick(key.tgid, key.process_start_ns, self.clock_ticks_per_second);
            if grew {
                reading.usage.push(ProcessUsage {
                    key: process,
                    comm: Comm(value.comm),
                    cgroup_id: value.cgroup_id,
                    runtime_ns_by_socket: delta,
                });
            }
            if track.process_gone && !grew {
                // Gone a full read ago and unchanged since: nothing can add
                // to it any more.
                if exited.remove(&key).is_ok() {
                    track.deleted = true;
                }
            } else if !track.process_gone && value.threads_exited != track.threads_exited_checked {
                // A thread ended since we last looked: is it the whole process?
                track.threads_exited_checked = value.threads_exited;
                let alive = procinfo::process_alive(
                    &self.procfs_root,
                    key.tgid,
                    key.process_start_ns,
                    self.clock_ticks_per_second,
                );
                if !alive {
                    track.process_gone = true;
                    reading.exited.push(process);
                    self.live.remove(&key.tgid);
                }
            }
        }
        // Forget deleted tracks after a few reads.
        self.exited.retain(|key, track| {
            if track.deleted && !present.contains(key) {
                track.deleted_reads += 1;
                track.deleted_reads < 60
            } else {
                true
            }
        });
        Ok(())
    }

    fn sweep_liveness(&mut self, reading: &mut CpuReading) {
        let Ok(pids) = procinfo::list_pids(&self.procfs_root) else {
            return;
        };
        let pids: HashSet<u32> = pids.into_iter().collect();
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

    fn read(&mut self) -> Result<CpuReading, CpuSourceError> {
        self.reads += 1;
        let mut reading = CpuReading::default();
        let mut buffer = std::mem::take(&mut self.buffer);
        buffer.clear();
        // A read that fails part-way has already moved the kernel's marks
        // for the records it returned: keep them, and report the error with
        // the reading rather than instead of it.
        if let Err(error) = run_iter(
            &mut self.ebpf,
            names::DUMP_TASKS,
            &mut buffer,
            self.iterator_read_bytes,
        ) {
            reading.errors.push(error.to_string());
        }
        let mut in_progress_by_cpu = vec![0u64; self.topology.possible_cpus().max(1)];
        {
            for record in parse_records(&buffer) {
                if record.in_progress_ns > 0
                    && let Some(slot) = in_progress_by_cpu.get_mut(record.cpu as usize)
                {
                    *slot += record.in_progress_ns;
                }
                let usage = record_usage(&record, self.clock_ticks_per_second);
                match self.live.insert(usage.key.pid, usage.key.start_ns) {
                    // The PID was reused: the old process is gone.
                    Some(old_start) if old_start != usage.key.start_ns => {
                        reading.exited.push(ProcessKey {
                            pid: usage.key.pid,
                            start_ns: old_start,
                        });
                    }
                    _ => {}
                }
                reading.usage.push(usage);
            }
        }
        self.buffer = buffer;

        if let Err(error) = self.drain_exited(&mut reading) {
            reading.errors.push(error.to_string());
        }
        if self.reads.is_multiple_of(LIVENESS_SWEEP_EVERY) {
            self.sweep_liveness(&mut reading);
        }

        match self.read_busy_ns() {
            Ok(busy) => {
                reading.busy_ns_by_cpu = busy_deltas(
                    &self.last_busy_ns,
                    &busy,
                    &self.last_in_progress_ns,
                    &in_progress_by_cpu,
                );
                self.last_busy_ns = busy;
                self.last_in_progress_ns = in_progress_by_cpu;
            }
            // Both "last" figures stay as they were, so the next deltas
            // cover this window too (the accounting carries its wall time).
            Err(error) => {
                reading.busy_missing = true;
                reading.errors.push(error.to_string());
            }
        }
        match self.read_losses() {
            Ok(losses) => reading.losses = losses,
            Err(error) => reading.errors.push(error.to_string()),
        }
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

/// Busy time per CPU since the previous read: what the kernel counted at
/// switches, plus the slices running now, minus the slices that were running
/// at the previous read (reported then, counted by the kernel when they end).
pub fn busy_deltas(
    busy_before: &[u64],
    busy_now: &[u64],
    in_progress_before: &[u64],
    in_progress_now: &[u64],
) -> Vec<u64> {
    busy_now
        .iter()
        .enumerate()
        .map(|(cpu, now)| {
            let at = |v: &[u64]| v.get(cpu).copied().unwrap_or(0);
            (now + at(in_progress_now)).saturating_sub(at(busy_before) + at(in_progress_before))
        })
        .collect()
}

fn map_error(map: &'static str, error: impl std::fmt::Display) -> CpuSourceError {
    CpuSourceError::Map {
        map,
        message: error.to_string(),
    }
}

/// Loads and attaches the `cgroup_mkdir` program and takes its ring buffer.
fn attach_cgroup_mkdir(
    ebpf: &mut Ebpf,
    btf: &Btf,
) -> Result<aya::maps::RingBuf<MapData>, EbpfLoadError> {
    let program: &mut BtfTracePoint = ebpf
        .program_mut(names::CGROUP_MKDIR)
        .ok_or(EbpfLoadError::MissingProgram(names::CGROUP_MKDIR))?
        .try_into()
        .map_err(|source| EbpfLoadError::Program {
            program: names::CGROUP_MKDIR,
            source,
        })?;
    program
        .load("cgroup_mkdir", btf)
        .and_then(|()| program.attach().map(drop))
        .map_err(|source| EbpfLoadError::Program {
            program: names::CGROUP_MKDIR,
            source,
        })?;
    let map = ebpf
        .take_map(names::CGROUP_EVENTS)
        .ok_or(EbpfLoadError::MissingProgram(names::CGROUP_EVENTS))?;
    aya::maps::RingBuf::try_from(map).map_err(|e| EbpfLoadError::Map {
        map: names::CGROUP_EVENTS,
        message: e.to_string(),
    })
}

/// The task iterator program `name` of the object.
fn iter_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Iter, EbpfLoadError> {
    ebpf.program_mut(name)
        .ok_or(EbpfLoadError::MissingProgram(name))?
        .try_into()
        .map_err(|source| EbpfLoadError::Program {
            program: name,
            source,
        })
}

fn load_iter(ebpf: &mut Ebpf, name: &'static str, btf: &Btf) -> Result<(), EbpfLoadError> {
    iter_program(ebpf, name)?
        .load("task", btf)
        .map_err(|source| EbpfLoadError::Program {
            program: name,
            source,
        })
}

/// Bytes asked of the iterator per `read()`: a whole number of records,
/// below the kernel's seq_file buffer (`PAGE_SIZE << 3`, at least 32 KiB).
/// `bpf_seq_read` stops filling once it holds what was asked, so with this
/// size every record it starts fits, and the kernel never has to drop a
/// record at the buffer's edge and run the program again for that thread
/// (the programs undo their claim if it ever does).
pub const ITER_READ_BYTES: usize =
    (32 * 1024 - 1) / size_of::<TaskRecord>() * size_of::<TaskRecord>();

const _: () = {
    assert!(ITER_READ_BYTES.is_multiple_of(size_of::<TaskRecord>()));
    assert!(ITER_READ_BYTES < 32 * 1024);
    assert!(ITER_READ_BYTES + size_of::<TaskRecord>() >= 32 * 1024);
};

/// Runs a loaded task iterator once, appending its output to `out`. On an
/// error part-way, what was read before it stays in `out`: the kernel has
/// already moved its marks for those records.
fn run_iter(
    ebpf: &mut Ebpf,
    name: &'static str,
    out: &mut Vec<u8>,
    read_bytes: usize,
) -> Result<(), EbpfLoadError> {
    let program = iter_program(ebpf, name)?;
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
    read_in_chunks(&mut file, out, read_bytes)
        .map_err(|e| EbpfLoadError::Iterator(format!("reading {name}: {e}")))
}

/// Reads `reader` to its end, `chunk` bytes per `read()`, appending to
/// `out`; on an error, `out` keeps what was read before it.
pub fn read_in_chunks(
    reader: &mut impl std::io::Read,
    out: &mut Vec<u8>,
    chunk: usize,
) -> std::io::Result<()> {
    loop {
        let start = out.len();
        out.resize(start + chunk, 0);
        let result = reader.read(&mut out[start..]);
        let read = *result.as_ref().unwrap_or(&0);
        out.truncate(start + read);
        match result {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(tgid: u32, runtime: [u64; MAX_SOCKETS], in_progress: u64, cpu: u32) -> TaskRecord {
        TaskRecord {
            tgid,
            tid: tgid,
            process_start_ns: 42,
            cgroup_id: 9,
            comm: *b"burn\0\0\0\0\0\0\0\0\0\0\0\0",
            in_progress_ns: in_progress,
            cpu,
            _pad: 0,
            runtime_ns_by_socket: runtime,
        }
    }

    fn as_bytes(records: &[TaskRecord]) -> Vec<u8> {
        let mut out = Vec::new();
        for r in records {
            // SAFETY: plain-old-data struct.
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    std::ptr::from_ref(r).cast::<u8>(),
                    size_of::<TaskRecord>(),
                )
            };
            out.extend_from_slice(bytes);
        }
        out
    }

    #[test]
    fn parses_records_and_ignores_a_partial_tail() {
        let records = [
            record(1, [5; MAX_SOCKETS], 0, 0),
            record(2, [0; MAX_SOCKETS], 7, 1),
        ];
        let mut bytes = as_bytes(&records);
        bytes.extend_from_slice(&[1, 2, 3]);
        let parsed: Vec<TaskRecord> = parse_records(&bytes).collect();
        assert_eq!(parsed, records);
    }

    #[test]
    fn records_become_usage_keyed_by_process() {
        let mut runtime = [0; MAX_SOCKETS];
        runtime[1] = 100;
        let usage = record_usage(&record(3, runtime, 50, 2), 100);
        assert_eq!(usage.runtime_ns_by_socket, runtime);
        assert_eq!(usage.comm.as_str(), "burn");
        assert_eq!(
            usage.key,
            ProcessKey {
                pid: 3,
                start_ns: 0
            },
            "42 ns after boot is in the first clock tick"
        );
    }

    /// Hands out `chunks` one per read, then fails with `error`.
    struct ScriptedReader {
        chunks: Vec<Vec<u8>>,
        asked: Vec<usize>,
        error: Option<std::io::ErrorKind>,
    }

    impl std::io::Read for ScriptedReader {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.asked.push(buf.len());
            if self.chunks.is_empty() {
                return match self.error.take() {
                    Some(kind) => Err(kind.into()),
                    None => Ok(0),
                };
            }
            let chunk = self.chunks.remove(0);
            buf[..chunk.len()].copy_from_slice(&chunk);
            Ok(chunk.len())
        }
    }

    #[test]
    fn reads_whole_records_below_the_kernel_buffer() {
        let mut reader = ScriptedReader {
            chunks: vec![vec![1; 240], vec![2; 120]],
            asked: Vec::new(),
            error: None,
        };
        let mut out = Vec::new();
        read_in_chunks(&mut reader, &mut out, ITER_READ_BYTES).unwrap();
        assert_eq!(out.len(), 360);
        assert!(reader.asked.iter().all(|asked| *asked == ITER_READ_BYTES));
    }

    #[test]
    fn a_read_that_fails_part_way_keeps_what_came_before() {
        let mut reader = ScriptedReader {
            chunks: vec![vec![1; 240]],
            asked: Vec::new(),
            error: Some(std::io::ErrorKind::Interrupted),
        };
        let mut out = Vec::new();
        // Interrupted is retried, then the end arrives.
        read_in_chunks(&mut reader, &mut out, 1024).unwrap();
        assert_eq!(out.len(), 240);
        let mut reader = ScriptedReader {
            chunks: vec![vec![7; 240]],
            asked: Vec::new(),
            error: Some(std::io::ErrorKind::InvalidData),
        };
        let mut out = Vec::new();
        assert!(read_in_chunks(&mut reader, &mut out, 1024).is_err());
        assert_eq!(out, vec![7; 240], "what was read before the error stays");
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
    fn busy_counts_a_running_slice_once() {
        // Read 1: CPU 0 ran 10 ms at switches and has a 5 ms slice running.
        assert_eq!(busy_deltas(&[0], &[10], &[0], &[5]), vec![15]);
        // Read 2: that slice ended at 8 ms (the kernel counted 8) and nothing
        // runs now: only the 3 ms not reported before are new.
        assert_eq!(busy_deltas(&[10], &[18], &[5], &[0]), vec![3]);
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
