//! Loads the kernel programs and reads them: the eBPF [`CpuTimeSource`].
//!
//! Start-up order matters for exactness: the baseline iterator first gives
//! every existing thread a slot with its past run time marked as seen, then
//! `sched_switch` is attached; each read then visits the slots of threads
//! that ran ([`threads`]) and drains `EXITED`.

pub mod btf;
pub mod threads;

use std::{collections::HashSet, os::fd::AsFd as _, path::PathBuf};

use agent_common::{
    CgroupCreated, ExitedKey, ExitedValue, KernelOffsets, LossCounter, LossCounts, MAX_SOCKETS,
    names::{self, GLOBAL_CPU_TO_SOCKET, GLOBAL_OFFSETS},
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

use self::threads::{SharedArray, SharedMaps, SlotReader};
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
    /// Slots of `THREADS`: threads alive at once plus those ended since the
    /// last read.
    pub thread_slots: u32,
    /// Entries of each ran list, when a diagnostic run sets
    /// `POWERLENS_RAN_LIST_LEN` (e.g. to exercise the agent's read of every
    /// slot when a list fills up); else from the slots and CPUs.
    pub ran_list_len: Option<u32>,
}

impl EbpfOptions {
    pub fn new(
        btf_path: PathBuf,
        procfs_root: PathBuf,
        exited_map_capacity: u32,
        thread_slots: u32,
    ) -> Self {
        let ran_list_len = std::env::var("POWERLENS_RAN_LIST_LEN")
            .ok()
            .and_then(|text| text.parse::<u32>().ok())
            .filter(|len| *len > 0);
        Self {
            btf_path,
            procfs_root,
            exited_map_capacity,
            thread_slots,
            ran_list_len,
        }
    }
}

/// Sizes of the shared arrays for `slots` thread slots on `cpus` CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedSizes {
    pub slots: u32,
    /// A power of two, at least `slots`.
    pub free_ring: u32,
    /// Entries per CPU and generation parity: twice a fair share of the
    /// slots, within 1,024..=65,536. A CPU that lists more threads in one
    /// generation makes the agent read every slot once (correct, slower).
    pub ran_list_len: u32,
    pub cpus: u32,
}

impl SharedSizes {
    pub fn new(slots: u32, cpus: usize) -> Self {
        let cpus = cpus.max(1) as u32;
        let slots = slots.max(1);
        Self {
            slots,
            free_ring: slots.next_power_of_two(),
            ran_list_len: (slots.saturating_mul(2) / cpus).clamp(1024, 65_536),
            cpus,
        }
    }

    pub fn ran_lists(&self) -> u32 {
        self.cpus * 2 * self.ran_list_len
    }
}

pub struct EbpfCpuSource {
    ebpf: Ebpf,
    cgroup_events: Option<aya::maps::RingBuf<MapData>>,
    slots: SlotReader,
    loss_counts: SharedArray<LossCounts>,
    procfs_root: PathBuf,
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
/// processes whose end left no trace (every thread's last switch lists its
/// slot, or adds to `EXITED`; only a full `EXITED` loses that). Listing
/// /proc costs ~15 ms of CPU with 10,000 processes, hence the long period.
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
        let mut sizes = SharedSizes::new(options.thread_slots, topology.possible_cpus());
        if let Some(len) = options.ran_list_len {
            sizes.ran_list_len = len;
        }
        let mut ebpf = loader
            // aya has no user-space wrapper for task storage; we only ever
            // reach it from the programs, so let aya create it as is.
            .allow_unsupported_maps()
            .override_global(GLOBAL_OFFSETS, &offsets, true)
            .override_global(GLOBAL_CPU_TO_SOCKET, &cpu_table, true)
            .override_global(names::GLOBAL_SOCKETS, &(topology.sockets() as u32), true)
            .override_global(names::GLOBAL_AGENT_START_BOOTTIME_NS, &boottime_ns(), true)
            .override_global(names::GLOBAL_WEAKLY_ORDERED, &WEAKLY_ORDERED, true)
            .override_global(names::GLOBAL_THREAD_SLOTS, &sizes.slots, true)
            .override_global(
                names::GLOBAL_FREE_RING_MASK,
                &(u64::from(sizes.free_ring) - 1),
                true,
            )
            .override_global(names::GLOBAL_RAN_LIST_LEN, &sizes.ran_list_len, true)
            .map_max_entries(names::EXITED, options.exited_map_capacity)
            .map_max_entries(names::THREADS, sizes.slots)
            .map_max_entries(names::FREE_SLOTS, sizes.free_ring)
            .map_max_entries(names::RAN_LISTS, sizes.ran_lists())
            .map_max_entries(names::CPU_LOG, sizes.cpus)
            .map_max_entries(names::RUNNING, sizes.cpus)
            .map_max_entries(names::CONTROL, 1)
            .map_max_entries(names::LOSS_COUNTERS, sizes.cpus)
            .load(KERNEL_OBJECT)?;
        let shared = map_shared(&ebpf, sizes)?;
        let loss_counts = map_array(&ebpf, names::LOSS_COUNTERS, sizes.cpus)?;

        // 1. Baseline: past run time of existing threads is not ours to report.
        load_iter(&mut ebpf, names::BASELINE_TASKS, &aya_btf)?;
        run_iter(&mut ebpf, names::BASELINE_TASKS)?;
        // 2. The switch path.
        attach_tp_btf(&mut ebpf, names::SCHED_SWITCH, "sched_switch", &aya_btf)?;
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
        let cgroup_events = match attach_cgroup_mkdir(&mut ebpf, &aya_btf) {
            Ok(ring) => Some(ring),
            Err(error) => {
                tracing::warn!(
                    "cgroup_mkdir not attached ({error}): containers that live less than one interval will be charged to the host"
                );
                None
            }
        };

        let clock_ticks_per_second = procinfo::clock_ticks_per_second();
        let slots = SlotReader::new(
            shared,
            sizes.cpus as usize,
            topology.sockets(),
            clock_ticks_per_second,
        );
        drop(aya_btf);
        release_free_memory();
        info!(
            thread_slots = sizes.slots,
            ran_list_len = sizes.ran_list_len,
            "kernel programs loaded and attached (sched_switch, cgroup_mkdir)"
        );
        Ok(Self {
            ebpf,
            cgroup_events,
            slots,
            loss_counts,
            procfs_root: options.procfs_root.clone(),
            exited: FxHashMap::default(),
            // The kernel's busy counters start at zero when sched_switch is
            // attached: the first read's busy time is all since then.
            last_busy_ns: vec![0; sizes.cpus as usize],
            last_in_progress_ns: vec![0; sizes.cpus as usize],
            live: FxHashMap::default(),
            reads: 0,
            clock_ticks_per_second,
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
            .map(|counter| {
                let total = (0..self.loss_counts.len())
                    .filter_map(|cpu| self.loss_counts.at(cpu))
                    // SAFETY: an aligned u64 of a CPU's entry, which the
                    // kernel only adds to atomically.
                    .map(|counts| unsafe {
                        std::sync::atomic::AtomicU64::from_ptr(
                            &raw mut (*counts).counts[counter as usize],
                        )
                        .load(std::sync::atomic::Ordering::Relaxed)
                    })
                    .sum();
                (counter.name(), total)
            })
            .collect()
    }

    /// Reads `EXITED` (the time of threads that had no slot, keyed by
    /// process): reports what grew since the last read, confirms which
    /// processes are gone, and deletes entries that can no longer grow.
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
        let running = self
            .ebpf
            .program(names::READ_RUNNING)
            .and_then(|program| <&RawTracePoint>::try_from(program).ok());
        let slots = self.slots.read(&mut |cpu| {
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
        });
        reading.errors.extend(slots.errors);
        reading.threads_read = slots.visited as u64;
        // A PID is checked for reuse when a thread of it is first seen, not
        // at every report.
        for process in slots.threads_new {
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
        reading.usage = slots.usage;
        // A thread ended: is it the whole process?
        for process in slots.threads_ended {
            let alive = procinfo::process_alive(
                &self.procfs_root,
                process.pid,
                process.start_ns,
                self.clock_ticks_per_second,
            );
            if !alive {
                reading.exited.push(process);
                if self.live.get(&process.pid) == Some(&process.start_ns) {
                    self.live.remove(&process.pid);
                }
            }
        }

        if let Err(error) = self.drain_exited(&mut reading) {
            reading.errors.push(error.to_string());
        }
        if self.reads.is_multiple_of(LIVENESS_SWEEP_EVERY) {
            self.sweep_liveness(&mut reading);
        }
        reading.busy_ns_by_cpu = busy_deltas(
            &self.last_busy_ns,
            &slots.busy_ns_by_cpu,
            &self.last_in_progress_ns,
            &slots.in_progress_by_cpu,
        );
        self.last_busy_ns = slots.busy_ns_by_cpu;
        self.last_in_progress_ns = slots.in_progress_by_cpu;
        reading.losses = self.read_losses();
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
    attach_tp_btf(ebpf, names::CGROUP_MKDIR, "cgroup_mkdir", btf)?;
    let map = ebpf
        .take_map(names::CGROUP_EVENTS)
        .ok_or(EbpfLoadError::MissingProgram(names::CGROUP_EVENTS))?;
    aya::maps::RingBuf::try_from(map).map_err(|e| EbpfLoadError::Map {
        map: names::CGROUP_EVENTS,
        message: e.to_string(),
    })
}

/// The task iterator program `name` of the object.
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

/// Runs a loaded task iterator once to its end (its programs write
/// nothing, so the output is only drained).
fn run_iter(ebpf: &mut Ebpf, name: &'static str) -> Result<(), EbpfLoadError> {
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
    std::io::copy(&mut file, &mut std::io::sink())
        .map(drop)
        .map_err(|e| EbpfLoadError::Iterator(format!("reading {name}: {e}")))
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

/// Maps the arrays the kernel programs share with the agent.
fn map_shared(ebpf: &Ebpf, sizes: SharedSizes) -> Result<SharedMaps, EbpfLoadError> {
    Ok(SharedMaps {
        threads: map_array(ebpf, names::THREADS, sizes.slots)?,
        free_ring: map_array(ebpf, names::FREE_SLOTS, sizes.free_ring)?,
        ran_lists: map_array(ebpf, names::RAN_LISTS, sizes.ran_lists())?,
        cpu_log: map_array(ebpf, names::CPU_LOG, sizes.cpus)?,
        control: map_array(ebpf, names::CONTROL, 1)?,
        running: map_array(ebpf, names::RUNNING, sizes.cpus)?,
        ran_list_len: sizes.ran_list_len as usize,
    })
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

    #[test]
    fn shared_sizes_follow_the_slots_and_cpus() {
        let sizes = SharedSizes::new(131_072, 2);
        assert_eq!(sizes.free_ring, 131_072);
        assert_eq!(sizes.ran_list_len, 65_536);
        assert_eq!(sizes.ran_lists(), 2 * 2 * 65_536);
        let big = SharedSizes::new(100_000, 256);
        assert_eq!(big.free_ring, 131_072, "a power of two at least the slots");
        assert_eq!(big.ran_list_len, 1024, "never under 1,024 per CPU");
        assert_eq!(SharedSizes::new(0, 0).slots, 1);
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
