//! Types and names shared by the kernel programs (`agent-ebpf`) and the agent.
//!
//! Everything here is `#[repr(C)]` and `Copy`: the same bytes are written by
//! the kernel and read by user space, so layouts are defined once, here.
#![no_std]

/// Most CPU sockets (physical packages) the kernel side keeps apart.
///
/// A CPU whose package id is at or above this is charged to the last slot and
/// the agent logs a warning; eight covers every x86 server board shipped today.
pub const MAX_SOCKETS: usize = 8;

/// Size of the read-only CPU → socket table handed to the kernel programs.
/// Must be a power of two: the programs mask the CPU number with `MAX_CPUS - 1`
/// so the verifier can prove the index is in bounds.
pub const MAX_CPUS: usize = 4096;

/// Length of `task_struct.comm` (TASK_COMM_LEN).
pub const COMM_LEN: usize = 16;

/// `TASK_DEAD` bit of `task_struct.__state` / the `prev_state` argument of
/// `sched_switch`: the task is doing its last context switch.
pub const TASK_DEAD: u32 = 0x80;

/// Capacity of `OVERFLOW`: threads whose switches found their CPU's log
/// full since the agent's last read (newest record per thread).
pub const OVERFLOW_MAP_CAPACITY: u32 = 16_384;

/// Records per CPU log (`SWITCH_LOG`) when the configuration leaves it to
/// the agent: 8 MiB over all logs (40 bytes a record), within
/// 2,048..=8,192 per CPU (8,192 up to 25 CPUs, 2,048 from 103). The
/// agent drains a log between reads at the pace its CPU fills it, so the
/// length sets how often a busy CPU wakes the agent, not what it can hold.
pub const fn default_switch_log_len(cpus: u32) -> u32 {
    let share = (8 << 20) / 40 / if cpus == 0 { 1 } else { cpus };
    if share >= 8_192 {
        8_192
    } else if share <= 2_048 {
        2_048
    } else {
        // The largest power of two within the share.
        1 << (31 - share.leading_zeros())
    }
}

/// Map and program names, defined once for both sides.
pub mod names {
    pub const SWITCH_LOG: &str = "SWITCH_LOG";
    pub const CPU_LOG: &str = "CPU_LOG";
    pub const OVERFLOW: &str = "OVERFLOW";
    pub const CONTROL: &str = "CONTROL";
    pub const RUNNING: &str = "RUNNING";
    pub const READ_RUNNING: &str = "read_running";
    pub const GLOBAL_SWITCH_LOG_LEN: &str = "SWITCH_LOG_LEN";
    pub const LOSS_COUNTERS: &str = "LOSS_COUNTERS";
    pub const SCHED_SWITCH: &str = "sched_switch";
    pub const BASELINE_TASKS: &str = "baseline_tasks";
    pub const EMPTY_SCHED_SWITCH: &str = "empty_sched_switch";
    /// Global (`.rodata`) variables the agent sets before loading.
    pub const GLOBAL_OFFSETS: &str = "OFFSETS";
    pub const CGROUP_EVENTS: &str = "CGROUP_EVENTS";
    pub const CGROUP_MKDIR: &str = "cgroup_mkdir";
    pub const PROCESS_EVENTS: &str = "PROCESS_EVENTS";
    pub const PROCESS_FORK: &str = "process_fork";
    pub const PROCESS_EXEC: &str = "process_exec";
    pub const GLOBAL_WEAKLY_ORDERED: &str = "WEAKLY_ORDERED";
}

/// Byte offsets inside kernel structures, read from the running kernel's BTF
/// by the agent and handed to the programs as a read-only global, so the same
/// object loads on any kernel layout without CO-RE relocations.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `task_struct.se.sum_exec_runtime`: the scheduler's own run time (ns),
    /// the figure `/proc/<pid>/schedstat` reports.
    pub task_sum_exec_runtime: u32,
    pub task_pid: u32,
    pub task_tgid: u32,
    /// `task_struct.start_boottime` (ns since boot, CLOCK_BOOTTIME): the
    /// figure `/proc/<pid>/stat` reports, in clock ticks, as `starttime`.
    pub task_start_boottime: u32,
    pub task_group_leader: u32,
    pub task_comm: u32,
    /// `task_struct.mm` (changes at `execve`).
    pub task_mm: u32,
    /// `task_struct.cgroups` (a `css_set *`).
    pub task_cgroups: u32,
    /// `css_set.dfl_cgrp` (the task's cgroup on the v2 hierarchy).
    pub css_set_dfl_cgrp: u32,
    /// `cgroup.kn`.
    pub cgroup_kn: u32,
    /// `kernfs_node.id`: the cgroup id, also the cgroup directory's inode number.
    pub kernfs_node_id: u32,
    /// `task_struct.__state` (an `unsigned int` since 5.14) or, before,
    /// `task_struct.state` (a `long`): read at a switch for `TASK_DEAD`, so
    /// the programs do not need `sched_switch`'s `prev_state` argument,
    /// which only exists from 5.18.
    pub task_state: u32,
    /// 4 for `__state`, 8 for the older `long state`.
    pub task_state_size: u32,
}

/// Top bit of `SwitchRecord::tgid_pid`: the thread's last switch (a tgid
/// never reaches it: PIDs stay below 2^22).
pub const RECORD_ENDED: u64 = 1 << 63;

/// One context switch (or one read of a running thread): who, and its run
/// time so far. Written by the kernel into its CPU's log, read by the agent
/// from the mapping.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SwitchRecord {
    /// Address of the thread's `task_struct`.
    pub task: u64,
    /// The thread's `start_boottime`: with the address it names the thread
    /// for good (an address reused by a later thread comes with a later
    /// start), and neither changes when a thread's `execve` takes over its
    /// leader's PID.
    pub thread_start_ns: u64,
    /// `se.sum_exec_runtime` at the switch: absolute, so the agent charges
    /// the growth since the thread's previous record, wherever it was.
    pub runtime_ns: u64,
    /// The thread's cgroup on the v2 hierarchy at the switch.
    pub cgroup_id: u64,
    /// tgid in the high half, thread id in the low; `RECORD_ENDED` set on
    /// the thread's last switch.
    pub tgid_pid: u64,
}

impl SwitchRecord {
    pub const fn ended(&self) -> bool {
        self.tgid_pid & RECORD_ENDED != 0
    }

    /// The thread, whatever the record says of it.
    pub const fn thread(&self) -> (u64, u64) {
        (self.task, self.thread_start_ns)
    }

    pub const fn tgid(&self) -> u32 {
        ((self.tgid_pid & !RECORD_ENDED) >> 32) as u32
    }

    pub const fn tid(&self) -> u32 {
        self.tgid_pid as u32
    }
}

/// One CPU's log header, in `CPU_LOG` (one cache line per CPU, so CPUs
/// never write a shared line on the switch path).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuLog {
    /// Records written to this CPU's log (only grows; the record of number
    /// n is at n mod the log's length).
    pub written: u64,
    /// The task switched in last, and this CPU's idle task (seen when it
    /// switches out): equal when the CPU is idle, so the agent asks only
    /// busy CPUs for their running thread.
    pub current_task: u64,
    pub idle_task: u64,
    /// Records the agent has read (written by the agent only, once per
    /// drain: sharing the line costs the switch path one miss per drain,
    /// where a map of its own would cost a lookup per switch).
    pub consumed: u64,
    pub _pad: [u64; 4],
}

/// The single entry of `CONTROL`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Control {
    /// Number of the agent's current read: `read_running` stamps its answer
    /// with it, so a stale answer is never taken for a fresh one.
    pub read: u64,
    pub _pad: [u64; 7],
}

/// What `read_running` found on one CPU (`RUNNING`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RunningThread {
    /// `Control::read` when it ran.
    pub read: u64,
    /// The running thread (all zero when the CPU was idle).
    pub record: SwitchRecord,
    pub _pad: [u64; 2],
}

/// Key of `OVERFLOW`: the thread (`SwitchRecord::thread`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OverflowKey {
    pub task: u64,
    pub thread_start_ns: u64,
}

/// The newest record of a thread whose switch found its CPU's log full.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct OverflowValue {
    pub record: SwitchRecord,
    /// The CPU it switched out of.
    pub cpu: u32,
    pub _pad: u32,
}

/// One existing thread at start, written by `baseline_tasks`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BaselineThread {
    pub record: SwitchRecord,
    /// Start time of its thread-group leader (ns, CLOCK_BOOTTIME).
    pub process_start_ns: u64,
    /// The leader's name.
    pub comm: [u8; COMM_LEN],
}

/// A process that started, or ran `execve`: the start time that, with its
/// tgid, names it, and its (leader's) name.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessStarted {
    pub tgid: u32,
    pub _pad: u32,
    pub start_ns: u64,
    pub comm: [u8; COMM_LEN],
}

/// One CPU's loss counters (`LOSS_COUNTERS`, indexed by CPU and mapped
/// by the agent), on lines of their own.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LossCounts {
    pub counts: [u64; LossCounter::COUNT as usize],
    pub _pad: [u64; 16 - LossCounter::COUNT as usize],
}

/// Longest cgroup path (bytes, NUL included) the `cgroup_mkdir` program
/// hands over; longer ones are cut.
pub const CGROUP_PATH_LEN: usize = 512;

/// A cgroup the kernel just created: its id and path, so that a container
/// that lives less than one interval still has a name.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CgroupCreated {
    /// The cgroup id (`kernfs_node.id`, the directory's inode number).
    pub id: u64,
    /// The uid of the process that made it: not root means a delegated
    /// subtree, where that user names cgroups.
    pub creator_uid: u32,
    pub _pad: u32,
    /// The path from the hierarchy's root, NUL-terminated.
    pub path: [u8; CGROUP_PATH_LEN],
}

/// Indexes of the per-CPU loss counters. Every place the kernel side can drop
/// data increments one of these; the agent exports them.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossCounter {
    /// A switch found its CPU's log full (the agent had not caught up): not
    /// a loss, the record went to `OVERFLOW`.
    SwitchLogFull = 0,
    /// ... and `OVERFLOW` was full too: the record is dropped. A live
    /// thread's slice is then charged at its next record (later, and to the
    /// CPU of that record); a thread's last slice is lost.
    OverflowMapFull = 1,
    /// Reading a kernel field failed.
    KernelReadFailed = 2,
    /// A started process did not fit the ring buffer (its name and start
    /// time are then read from procfs, if it is still there).
    ProcessEventsDropped = 3,
    /// A created cgroup that did not fit the ring buffer (its name is then
    /// learnt by the next walk of the hierarchy, if it is still there).
    CgroupEventsDropped = 4,
}

impl LossCounter {
    pub const COUNT: u32 = 5;
    pub const ALL: [LossCounter; Self::COUNT as usize] = [
        LossCounter::SwitchLogFull,
        LossCounter::OverflowMapFull,
        LossCounter::KernelReadFailed,
        LossCounter::ProcessEventsDropped,
        LossCounter::CgroupEventsDropped,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            LossCounter::SwitchLogFull => "switch_log_full",
            LossCounter::OverflowMapFull => "overflow_map_full",
            LossCounter::KernelReadFailed => "kernel_read_failed",
            LossCounter::ProcessEventsDropped => "process_events_dropped",
            LossCounter::CgroupEventsDropped => "cgroup_events_dropped",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, made of integers only,
    // with explicit padding fields, so every bit pattern is valid.
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::SwitchRecord {}
    unsafe impl aya::Pod for super::CpuLog {}
    unsafe impl aya::Pod for super::Control {}
    unsafe impl aya::Pod for super::RunningThread {}
    unsafe impl aya::Pod for super::LossCounts {}
    unsafe impl aya::Pod for super::OverflowKey {}
    unsafe impl aya::Pod for super::OverflowValue {}
    unsafe impl aya::Pod for super::BaselineThread {}
    unsafe impl aya::Pod for super::ProcessStarted {}
    unsafe impl aya::Pod for super::CgroupCreated {}
}
