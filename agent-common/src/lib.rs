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
    pub const THREADS: &str = "THREADS";
    pub const CPU_LOG: &str = "CPU_LOG";
    pub const RAN_LISTS: &str = "RAN_LISTS";
    pub const FREE_SLOTS: &str = "FREE_SLOTS";
    pub const CONTROL: &str = "CONTROL";
    pub const RUNNING: &str = "RUNNING";
    pub const READ_RUNNING: &str = "read_running";
    pub const GLOBAL_RAN_LIST_LEN: &str = "RAN_LIST_LEN";
    pub const GLOBAL_THREAD_SLOTS: &str = "THREAD_SLOTS";
    pub const GLOBAL_FREE_RING_MASK: &str = "FREE_RING_MASK";
    pub const LOSS_COUNTERS: &str = "LOSS_COUNTERS";
    pub const SCHED_SWITCH: &str = "sched_switch";
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

/// Default number of thread slots (`THREADS`): threads alive at once plus
/// those that ended since the last read. A thread that finds none free is
/// still counted exactly, through `EXITED`, at a hash update per switch.
pub const DEFAULT_THREAD_SLOTS: u32 = 131_072;

/// `ThreadSlot::state`: free (on the agent's free ring or never used).
pub const SLOT_FREE: u64 = 0;
/// `ThreadSlot::state`: a live thread's.
pub const SLOT_LIVE: u64 = 1;
/// `ThreadSlot::state`: the thread made its last switch; the agent reads the
/// final figures and frees the slot.
pub const SLOT_EXITED: u64 = 2;

/// Everything powerlens keeps about one thread, in a slot of the `THREADS`
/// array, which the agent maps into its memory and reads without a system
/// call.
///
/// Only the kernel writes a slot while it is live (the switch path on the
/// CPU the thread leaves, or the running-thread reader on the CPU it runs
/// on: never both at once for one thread); the agent only reads it, and
/// zeroes it before handing it back through the free ring. The first cache
/// line holds what a switch touches on machines with up to six sockets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadSlot {
    /// The thread's `sum_exec_runtime` at its last switch out.
    pub last_runtime_ns: u64,
    /// The read generation in which the thread was last put on its CPU's
    /// ran list.
    pub listed_generation: u64,
    /// Run time charged at switches since the slot was claimed, per socket.
    /// Only grows; the agent reports the growth.
    pub cumulative_ns: [u64; MAX_SOCKETS],
    /// `SLOT_FREE`, `SLOT_LIVE` or `SLOT_EXITED`.
    pub state: u64,
    pub tid: u32,
    pub tgid: u32,
    /// `task_struct.mm` when the identity was read: a different one at a
    /// listing means the thread ran `execve`, so its name is read again.
    pub mm: u64,
    /// Start time of the thread-group leader (ns, CLOCK_BOOTTIME): with
    /// `tgid` it names a process uniquely, so a reused PID never merges two
    /// processes.
    pub process_start_ns: u64,
    /// The `css_set` the cgroup id was read from (re-read when it changes).
    pub css_set: u64,
    pub cgroup_id: u64,
    /// The leader's name.
    pub comm: [u8; COMM_LEN],
}

/// Per-thread state kept in task-local storage: which slot is the thread's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TaskRuntime {
    /// Index of the thread's `ThreadSlot` plus one (0: none yet).
    pub slot_plus_one: u32,
    pub _pad: u32,
    /// `sum_exec_runtime` at the last switch while the thread had no slot
    /// (all slots taken): its time then goes through `EXITED`.
    pub unslotted_last_ns: u64,
}

/// One CPU's state, in the `CPU_LOG` array (one cache line per CPU, so
/// CPUs never write a shared line on the switch path).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuLog {
    /// Run time of tasks on this CPU, charged at switches: the agent derives
    /// the CPU's idle time as wall time minus this.
    pub busy_ns: u64,
    /// Entries in this CPU's two ran lists (one per generation parity).
    pub listed: [u64; 2],
    /// A ran list filled up in that generation: the agent then reads every
    /// slot instead.
    pub overflowed: [u32; 2],
    /// The task switched in last, and this CPU's idle task (seen when it
    /// switches out): equal when the CPU is idle, so the agent asks only
    /// busy CPUs for their running thread.
    pub current_task: u64,
    pub idle_task: u64,
    pub _pad: [u64; 2],
}

/// Generation counter and slot allocation, the single entry of `CONTROL`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Control {
    /// Written by the agent at each read: a thread is listed on its first
    /// switch of a generation, into the ran list of the generation's parity.
    pub generation: u64,
    pub _pad0: [u64; 7],
    /// Slots never used yet start here (moved with atomic add).
    pub next_unused_slot: u64,
    /// The free ring (`FREE_SLOTS`): the agent pushes at `free_head`, the
    /// kernel takes at `free_tail` (compare-and-swap). Both only grow.
    pub free_tail: u64,
    pub free_head: u64,
    pub _pad1: [u64; 5],
}

/// One CPU's loss counters (`LOSS_COUNTERS`, indexed by CPU and mapped
/// by the agent), on lines of their own.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LossCounts {
    pub counts: [u64; LossCounter::COUNT as usize],
    pub _pad: [u64; 16 - LossCounter::COUNT as usize],
}

/// What the running-thread reader found on one CPU (`RUNNING`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RunningThread {
    /// The generation the agent was reading when it asked.
    pub generation: u64,
    /// Slot of the thread on the CPU plus one (0: idle, or no slot).
    pub slot_plus_one: u32,
    pub socket: u32,
    /// Run time since its last switch out (on `socket`).
    pub in_progress_ns: u64,
    /// The slot's cumulative figures at the same moment.
    pub cumulative_ns: [u64; MAX_SOCKETS],
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
    /// An exited (or slotless) thread's run time did not fit in the exited map.
    ExitedMapFull = 2,
    /// Run time (ns) dropped because of `ExitedMapFull`.
    ExitedMapFullNs = 3,
    /// Reading a kernel field failed.
    KernelReadFailed = 4,
    /// A CPU whose socket is at or past `MAX_SOCKETS` ran a slice (not a
    /// loss of time: it is charged to the last socket slot).
    SocketOverflow = 5,
    /// A switch found no free thread slot (all `THREADS` taken): not a loss,
    /// the thread's time then goes through `EXITED` at every switch until a
    /// slot frees up (raise `thread_slots` if this keeps counting).
    ThreadSlotsFull = 6,
    /// A thread could not be put on its CPU's ran list (full for this
    /// generation): not a loss, the agent then reads every slot once.
    RanListOverflow = 7,
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
        LossCounter::ThreadSlotsFull,
        LossCounter::RanListOverflow,
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
            LossCounter::ThreadSlotsFull => "thread_slots_full",
            LossCounter::RanListOverflow => "ran_list_overflow",
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
    unsafe impl aya::Pod for super::ThreadSlot {}
    unsafe impl aya::Pod for super::CpuLog {}
    unsafe impl aya::Pod for super::Control {}
    unsafe impl aya::Pod for super::RunningThread {}
    unsafe impl aya::Pod for super::LossCounts {}
    unsafe impl aya::Pod for super::ExitedKey {}
    unsafe impl aya::Pod for super::ExitedValue {}
    unsafe impl aya::Pod for super::CgroupCreated {}
}
