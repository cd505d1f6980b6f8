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

/// Capacity of the map that keeps the CPU time of exited threads and
/// processes until the agent has read it.
pub const EXITED_MAP_CAPACITY: u32 = 65_536;

/// Map and program names, defined once for both sides.
pub mod names {
    pub const TASK_RUNTIME: &str = "TASK_RUNTIME";
    pub const EXITED: &str = "EXITED";
    pub const CPU_BUSY_NS: &str = "CPU_BUSY_NS";
    pub const LOSS_COUNTERS: &str = "LOSS_COUNTERS";
    pub const SCHED_SWITCH: &str = "sched_switch";
    pub const DUMP_TASKS: &str = "dump_tasks";
    pub const BASELINE_TASKS: &str = "baseline_tasks";
    pub const EMPTY_SCHED_SWITCH: &str = "empty_sched_switch";
    /// Global (`.rodata`) variables the agent sets before loading.
    pub const GLOBAL_OFFSETS: &str = "OFFSETS";
    pub const GLOBAL_CPU_TO_SOCKET: &str = "CPU_TO_SOCKET";
    pub const GLOBAL_SOCKETS: &str = "SOCKETS";
    pub const GLOBAL_AGENT_START_BOOTTIME_NS: &str = "AGENT_START_BOOTTIME_NS";
    pub const CGROUP_EVENTS: &str = "CGROUP_EVENTS";
    pub const CGROUP_MKDIR: &str = "cgroup_mkdir";
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
    /// `task_struct.cgroups` (a `css_set *`).
    pub task_cgroups: u32,
    /// `task_struct.cpu` (or `thread_info.cpu` on kernels that keep it there).
    pub task_cpu: u32,
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
    /// `task_struct.nvcsw` and `nivcsw`: the thread's voluntary and
    /// involuntary switch counts, bumped before `sched_switch` fires. The
    /// reader compares their sum before and after reading a thread, to see
    /// whether a switch-out ran while it read.
    pub task_nvcsw: u32,
    pub task_nivcsw: u32,
}

/// Run time of one thread on one socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SocketRuntime {
    /// Charged at switches since the agent started (written only by the
    /// `sched_switch` program on the CPU the thread is leaving).
    pub cumulative_ns: u64,
    /// Already handed to the agent (moved forward with compare-and-swap by
    /// the task iterator and by the thread's last switch).
    pub reported_ns: u64,
}

/// Per-thread state kept in task-local storage.
///
/// Laid out for the cache: the switch path touches only the first line on
/// machines with up to three sockets; the identity the iterator caches sits
/// apart, so a read touches it only for threads that ran.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TaskRuntime {
    /// The thread's `sum_exec_runtime` at its last switch out.
    pub last_runtime_ns: u64,
    pub by_socket: [SocketRuntime; MAX_SOCKETS],
    /// Identity cached by the task iterator (it never changes for a thread
    /// but for `comm` at exec and the cgroup at migration, both re-read).
    pub css_set: u64,
    pub cgroup_id: u64,
    pub process_start_ns: u64,
    pub tgid: u32,
    pub tid: u32,
    pub comm: [u8; COMM_LEN],
    /// Reads that reported something for this thread.
    pub reports: u32,
    pub _pad: u32,
    /// Target of the reader's fully ordered atomic operations on weakly
    /// ordered CPUs (arm64): they order its loads, nothing reads the value.
    pub reader_fence: u64,
}

/// One record written by the task iterator per thread that ran since the last
/// read or is running now.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskRecord {
    pub tgid: u32,
    pub tid: u32,
    /// Start time of the thread-group leader (ns, CLOCK_BOOTTIME): with `tgid` it
    /// names a process uniquely, so a reused PID never merges two processes.
    pub process_start_ns: u64,
    pub cgroup_id: u64,
    pub comm: [u8; COMM_LEN],
    /// The thread is on `cpu` and has run this long since it was switched
    /// in (already included in `runtime_ns_by_socket`).
    pub in_progress_ns: u64,
    pub cpu: u32,
    pub _pad: u32,
    /// Run time not reported before, per socket.
    pub runtime_ns_by_socket: [u64; MAX_SOCKETS],
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

/// Key of the map of exited threads' last run time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExitedKey {
    pub tgid: u32,
    pub _pad: u32,
    pub process_start_ns: u64,
}

/// Run time of a process's exited threads not yet seen by the agent.
/// Cumulative while the entry lives: the agent reads deltas and deletes the
/// entry once the process is gone.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ExitedValue {
    pub cgroup_id: u64,
    /// Threads of the process that have ended: the agent checks whether the
    /// process is gone when this changes.
    pub threads_exited: u64,
    pub comm: [u8; COMM_LEN],
    pub runtime_ns_by_socket: [u64; MAX_SOCKETS],
}

/// Indexes of the per-CPU loss counters. Every place the kernel side can drop
/// data increments one of these; the agent exports them.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossCounter {
    /// `bpf_task_storage_get` could not create a thread's entry (out of
    /// memory, or the CPU was inside another task-storage call). Not a loss
    /// by itself: the thread's `sum_exec_runtime` keeps counting, and the
    /// next switch or read that gets the entry charges the time.
    TaskStorageFull = 0,
    /// Run time (ns) lost because a thread ended without ever getting an
    /// entry while it had run before the agent started (a thread born
    /// after the start is charged whole, so it loses nothing).
    TaskStorageFullNs = 1,
    /// An exited thread's run time did not fit in the exited map.
    ExitedMapFull = 2,
    /// Run time (ns) dropped because of `ExitedMapFull`.
    ExitedMapFullNs = 3,
    /// Reading a kernel field failed.
    KernelReadFailed = 4,
    /// A CPU whose socket is at or past `MAX_SOCKETS` ran a slice (not a
    /// loss of time: it is charged to the last socket slot).
    SocketOverflow = 5,
    /// A task iterator record did not fit the kernel's buffer: its claim was
    /// undone and the kernel runs the program for that thread again on the
    /// next `read()` (not a loss; the agent reads in whole-record chunks
    /// that make this rare).
    IteratorRecordRewound = 6,
    /// Run time (ns) of such a record whose claim could not be undone
    /// because the thread's last switch moved the mark in between.
    IteratorRecordLostNs = 7,
    /// A created cgroup that did not fit the ring buffer (its name is then
    /// learnt by the next walk of the hierarchy, if it is still there).
    CgroupEventsDropped = 8,
}

impl LossCounter {
    pub const COUNT: u32 = 9;
    pub const ALL: [LossCounter; Self::COUNT as usize] = [
        LossCounter::TaskStorageFull,
        LossCounter::TaskStorageFullNs,
        LossCounter::ExitedMapFull,
        LossCounter::ExitedMapFullNs,
        LossCounter::KernelReadFailed,
        LossCounter::SocketOverflow,
        LossCounter::IteratorRecordRewound,
        LossCounter::IteratorRecordLostNs,
        LossCounter::CgroupEventsDropped,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            LossCounter::TaskStorageFull => "task_storage_full",
            LossCounter::TaskStorageFullNs => "task_storage_full_ns",
            LossCounter::ExitedMapFull => "exited_map_full",
            LossCounter::ExitedMapFullNs => "exited_map_full_ns",
            LossCounter::KernelReadFailed => "kernel_read_failed",
            LossCounter::SocketOverflow => "socket_overflow",
            LossCounter::IteratorRecordRewound => "iterator_record_rewound",
            LossCounter::IteratorRecordLostNs => "iterator_record_lost_ns",
            LossCounter::CgroupEventsDropped => "cgroup_events_dropped",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, made of integers only,
    // with explicit padding fields, so every bit pattern is valid.
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::TaskRuntime {}
    unsafe impl aya::Pod for super::SocketRuntime {}
    unsafe impl aya::Pod for super::TaskRecord {}
    unsafe impl aya::Pod for super::ExitedKey {}
    unsafe impl aya::Pod for super::ExitedValue {}
    unsafe impl aya::Pod for super::CgroupCreated {}
}
