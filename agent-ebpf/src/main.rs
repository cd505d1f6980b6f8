//! powerlens kernel programs.
//!
//! The context-switch path is the cost that matters, so it does the least
//! that keeps the figures exact:
//!
//! * `sched_switch` (tp_btf) reads the outgoing thread's own scheduler run
//!   time (`se.sum_exec_runtime`, what `/proc/<pid>/schedstat` reports) with
//!   one kernel read, and claims the run time since its last claim into the
//!   thread's task-local storage, on the socket of the CPU it ran on. No
//!   clock read, no hash map on the common path, no lock shared across CPUs.
//! * `dump_tasks` (a task iterator) runs when the agent reads: it drains each
//!   thread's claimed run time and claims the slice in progress, so a busy
//!   loop that never switches out is counted too.
//! * A thread's last switch (`TASK_DEAD`) moves what it has left into the
//!   `EXITED` hash map, so short-lived processes are never lost.
//!
//! Offsets into kernel structures come from the running kernel's BTF, read
//! by the agent and set as read-only globals before the programs load.
#![no_std]
#![no_main]
// The bpf target reports no compare-and-swap, so `core::sync::atomic` offers
// only loads and stores; the kernel (BPF ISA v3, Linux 5.12+) has atomic
// add, exchange and compare-exchange, which these intrinsics reach.
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::{
    ffi::c_void,
    intrinsics::{self, AtomicOrdering::Relaxed},
    mem::{MaybeUninit, size_of},
    ptr,
};

use agent_common::{
    COMM_LEN, EXITED_MAP_CAPACITY, ExitedKey, ExitedValue, KernelOffsets, LossCounter, MAX_CPUS,
    MAX_SOCKETS, TASK_DEAD, TaskRecord, TaskRuntime,
};
use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_LOCAL_STORAGE_GET_F_CREATE, BPF_NOEXIST, bpf_map_type},
    btf_maps::{HashMap, PerCpuArray},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_smp_processor_id,
        bpf_probe_read_kernel,
        generated::{bpf_seq_write, bpf_task_storage_get},
    },
    macros::{btf_map, btf_tracepoint},
    programs::BtfTracePointContext,
};

// ---------------------------------------------------------------------------
// Globals set by the agent before loading (kept in .rodata, so the verifier
// sees them as constants).

#[unsafe(no_mangle)]
static OFFSETS: KernelOffsets = KernelOffsets {
    task_sum_exec_runtime: 0,
    task_pid: 0,
    task_tgid: 0,
    task_start_boottime: 0,
    task_group_leader: 0,
    task_comm: 0,
    task_cgroups: 0,
    task_cpu: 0,
    css_set_dfl_cgrp: 0,
    cgroup_kn: 0,
    kernfs_node_id: 0,
    _reserved: 0,
};

/// Physical package of each CPU, from sysfs topology.
#[unsafe(no_mangle)]
static CPU_TO_SOCKET: [u8; MAX_CPUS] = [0; MAX_CPUS];

// ---------------------------------------------------------------------------
// Maps.

/// A BTF map definition for `BPF_MAP_TYPE_TASK_STORAGE`, which aya-ebpf does
/// not wrap yet. The layout is the one libbpf and aya parse from `.maps`.
#[repr(C)]
pub struct TaskStorage<T> {
    r#type: *const [i32; bpf_map_type::BPF_MAP_TYPE_TASK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
}

// SAFETY: the fields are placeholders the loader reads from BTF; they are
// never dereferenced.
unsafe impl<T> Sync for TaskStorage<T> {}

impl<T> Default for TaskStorage<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> TaskStorage<T> {
    pub const fn new() -> Self {
        Self {
            r#type: ptr::null(),
            key: ptr::null(),
            value: ptr::null(),
            max_entries: ptr::null(),
            map_flags: ptr::null(),
        }
    }

    /// The thread's entry, created zeroed if `create` and it has none.
    #[inline(always)]
    fn get(&self, task: *mut c_void, create: bool) -> Option<*mut T> {
        let flags = if create {
            BPF_LOCAL_STORAGE_GET_F_CREATE as u64
        } else {
            0
        };
        // SAFETY: `task` is a trusted task_struct pointer handed to us by
        // the kernel (the verifier checks it); a null value means "zeroed".
        let value = unsafe {
            bpf_task_storage_get(
                ptr::from_ref(self).cast_mut().cast(),
                task.cast(),
                ptr::null_mut(),
                flags,
            )
        };
        if value.is_null() {
            None
        } else {
            Some(value.cast())
        }
    }
}

#[unsafe(link_section = ".maps")]
#[unsafe(export_name = "TASK_RUNTIME")]
static TASK_RUNTIME: TaskStorage<TaskRuntime> = TaskStorage::new();

#[btf_map]
static EXITED: HashMap<ExitedKey, ExitedValue, { EXITED_MAP_CAPACITY as usize }> = HashMap::new();

/// Run time of tasks per CPU (index 0 of a per-CPU array): the agent derives
/// each CPU's idle time as wall time minus this.
#[btf_map]
static CPU_BUSY_NS: PerCpuArray<u64, 1> = PerCpuArray::new();

#[btf_map]
static LOSS_COUNTERS: PerCpuArray<u64, { LossCounter::COUNT as usize }> = PerCpuArray::new();

// ---------------------------------------------------------------------------
// Small helpers.

#[inline(always)]
fn offsets() -> KernelOffsets {
    // SAFETY: a plain read of our own static; volatile so the compiler does
    // not fold the zeroes above into the code (the agent rewrites them).
    unsafe { ptr::read_volatile(&OFFSETS) }
}

#[inline(always)]
fn socket_of(cpu: u32) -> usize {
    let index = (cpu as usize) & (MAX_CPUS - 1);
    // SAFETY: index is masked into bounds.
    let socket = unsafe { ptr::read_volatile(CPU_TO_SOCKET.as_ptr().add(index)) } as usize;
    if socket >= MAX_SOCKETS {
        count_loss(LossCounter::SocketOverflow, 1);
        MAX_SOCKETS - 1
    } else {
        socket
    }
}

#[inline(always)]
fn count_loss(counter: LossCounter, amount: u64) {
    if let Some(slot) = LOSS_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot of this CPU; programs do not nest on a CPU
        // for these attach points.
        unsafe { *slot += amount };
    }
}

/// Reads a `T` at `base + offset` in kernel memory.
#[inline(always)]
fn read_kernel<T>(base: *const u8, offset: u32) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel checks the address; a fault is an error.
    let value = unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize).cast::<T>()) };
    match value {
        Ok(value) => Some(value),
        Err(_) => {
            count_loss(LossCounter::KernelReadFailed, 1);
            None
        }
    }
}

/// Atomic operations on a u64 inside a map value (8-byte aligned, alive for
/// the program's run: the only callers pass such slots).
#[derive(Clone, Copy)]
struct AtomicSlot(*mut u64);

impl AtomicSlot {
    #[inline(always)]
    fn load(self) -> u64 {
        // An aligned 8-byte load is single-copy atomic on BPF; LLVM's BPF
        // backend cannot select an `atomic load` instruction itself.
        // SAFETY: see the type's comment.
        unsafe { ptr::read_volatile(self.0) }
    }

    #[inline(always)]
    fn swap(self, value: u64) -> u64 {
        // SAFETY: see the type's comment.
        unsafe { intrinsics::atomic_xchg::<u64, { Relaxed }>(self.0, value) }
    }

    #[inline(always)]
    fn fetch_add(self, value: u64) {
        // SAFETY: see the type's comment.
        unsafe { intrinsics::atomic_xadd::<u64, u64, { Relaxed }>(self.0, value) };
    }

    /// True when the slot held `current` and now holds `new`.
    #[inline(always)]
    fn compare_exchange(self, current: u64, new: u64) -> bool {
        // SAFETY: see the type's comment.
        unsafe { intrinsics::atomic_cxchg::<u64, { Relaxed }, { Relaxed }>(self.0, current, new) }.1
    }
}

#[inline(always)]
fn atomic(slot: *mut u64) -> AtomicSlot {
    AtomicSlot(slot)
}

/// The thread-group leader of `task` (the task itself when it leads).
#[inline(always)]
fn group_leader(task: *const u8, offsets: &KernelOffsets) -> *const u8 {
    read_kernel(task, offsets.task_group_leader).unwrap_or(task)
}

/// The leader's start time (boot-based, like `/proc/<pid>/stat`): with the
/// tgid it names a process, so a reused PID never merges two processes.
#[inline(always)]
fn process_start_ns(leader: *const u8, offsets: &KernelOffsets) -> u64 {
    read_kernel(leader, offsets.task_start_boottime).unwrap_or(0)
}

// ---------------------------------------------------------------------------
// The context-switch path.

#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next,
    //          unsigned int prev_state)
    let prev: *mut c_void = ctx.arg(1);
    let prev_state: u64 = ctx.arg(3);
    on_switch_out(prev, prev_state as u32);
    0
}

#[inline(always)]
fn on_switch_out(prev: *mut c_void, prev_state: u32) {
    let offsets = offsets();
    let Some(runtime) = read_kernel::<u64>(prev.cast(), offsets.task_sum_exec_runtime) else {
        return;
    };
    // The idle threads keep no run time of their own; nothing to charge.
    if runtime == 0 {
        return;
    }
    let Some(entry) = TASK_RUNTIME.get(prev, true) else {
        count_loss(LossCounter::TaskStorageFull, 1);
        return;
    };
    // SAFETY: entry is this thread's storage; fields are 8-byte aligned.
    let claimed = atomic(unsafe { &raw mut (*entry).claimed_runtime_ns });
    // Exchange, not store: a reader may have claimed part of this slice
    // concurrently (compare-and-swap on the same word); each side charges
    // only the interval it moved the mark over.
    let previous = claimed.swap(runtime);
    if runtime > previous {
        let slice = runtime - previous;
        // SAFETY: a plain helper without arguments.
        let cpu = unsafe { bpf_get_smp_processor_id() };
        let socket = socket_of(cpu);
        // SAFETY: socket < MAX_SOCKETS.
        let undrained = unsafe { &raw mut (*entry).undrained_ns_by_socket[socket] };
        atomic(undrained).fetch_add(slice);
        if let Some(busy) = CPU_BUSY_NS.get_ptr_mut(0) {
            // SAFETY: this CPU's slot.
            unsafe { *busy += slice };
        }
    }
    if prev_state & TASK_DEAD != 0 {
        flush_exited(prev, entry, &offsets);
    }
}

/// The thread is switching out for the last time: move what it has not
/// handed to the agent into `EXITED` before its storage is freed.
/// `current` is still `prev` here (the tracepoint fires before the switch).
#[inline(never)]
fn flush_exited(prev: *mut c_void, entry: *mut TaskRuntime, offsets: &KernelOffsets) {
    let mut runtime_ns_by_socket = [0u64; MAX_SOCKETS];
    let mut total = 0u64;
    for (socket, out) in runtime_ns_by_socket.iter_mut().enumerate() {
        // SAFETY: socket < MAX_SOCKETS.
        let undrained = unsafe { &raw mut (*entry).undrained_ns_by_socket[socket] };
        *out = atomic(undrained).swap(0);
        total += *out;
    }
    if total == 0 {
        return;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let leader = group_leader(prev.cast(), offsets);
    let key = ExitedKey {
        tgid,
        _pad: 0,
        process_start_ns: process_start_ns(leader, offsets),
    };
    if let Some(existing) = EXITED.get_ptr_mut(key) {
        add_exited(existing, &runtime_ns_by_socket);
        return;
    }
    let value = ExitedValue {
        // SAFETY: plain helper calls about `current`.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        comm: read_kernel(leader, offsets.task_comm).unwrap_or([0; COMM_LEN]),
        runtime_ns_by_socket,
    };
    if EXITED.insert(key, value, BPF_NOEXIST as u64).is_ok() {
        return;
    }
    // Another thread of the process inserted first, or the map is full.
    if let Some(existing) = EXITED.get_ptr_mut(key) {
        add_exited(existing, &runtime_ns_by_socket);
    } else {
        count_loss(LossCounter::ExitedMapFull, 1);
        count_loss(LossCounter::ExitedMapFullNs, total);
    }
}

#[inline(always)]
fn add_exited(existing: *mut ExitedValue, runtime_ns_by_socket: &[u64; MAX_SOCKETS]) {
    for (socket, amount) in runtime_ns_by_socket.iter().enumerate() {
        if *amount > 0 {
            // SAFETY: existing is a live map value; socket < MAX_SOCKETS.
            let slot = unsafe { &raw mut (*existing).runtime_ns_by_socket[socket] };
            atomic(slot).fetch_add(*amount);
        }
    }
}

// ---------------------------------------------------------------------------
// The reader: a task iterator the agent runs once per interval.

#[repr(C)]
pub struct BpfIterMeta {
    seq: *mut c_void,
    session_id: u64,
    seq_num: u64,
}

#[repr(C)]
pub struct BpfIterTask {
    meta: *mut BpfIterMeta,
    task: *mut c_void,
}

/// Drains every thread's claimed run time, and claims the slice in progress
/// of threads on a CPU now. Writes one `TaskRecord` per thread with anything
/// to report.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task")]
extern "C" fn dump_tasks(ctx: *mut BpfIterTask) -> i32 {
    // SAFETY: the kernel hands us a valid bpf_iter__task context.
    let (meta, task) = unsafe {
        (
            ptr::read_volatile(&(*ctx).meta),
            ptr::read_volatile(&(*ctx).task),
        )
    };
    if task.is_null() {
        return 0;
    }
    let offsets = offsets();
    // A thread without storage has not switched out since the agent started
    // (or was created since): its whole run time is new, so a zeroed entry
    // is right.
    let Some(entry) = TASK_RUNTIME.get(task, true) else {
        count_loss(LossCounter::TaskStorageFull, 1);
        return 0;
    };
    let mut record: TaskRecord = unsafe { MaybeUninit::zeroed().assume_init() };
    let mut anything = false;

    if let Some(runtime) = read_kernel::<u64>(task.cast(), offsets.task_sum_exec_runtime) {
        // SAFETY: entry is a live storage value.
        let claimed = atomic(unsafe { &raw mut (*entry).claimed_runtime_ns });
        let seen = claimed.load();
        if runtime > seen && claimed.compare_exchange(seen, runtime) {
            record.in_progress_ns = runtime - seen;
            record.cpu = read_kernel::<u32>(task.cast(), offsets.task_cpu).unwrap_or(0);
            anything = true;
        }
    }
    for socket in 0..MAX_SOCKETS {
        // SAFETY: entry is a live storage value; socket < MAX_SOCKETS.
        let undrained = unsafe { &raw mut (*entry).undrained_ns_by_socket[socket] };
        let drained = atomic(undrained).swap(0);
        record.drained_ns_by_socket[socket] = drained;
        anything |= drained != 0;
    }
    if !anything {
        return 0;
    }
    let task_ptr: *const u8 = task.cast();
    record.tid = read_kernel(task_ptr, offsets.task_pid).unwrap_or(0);
    record.tgid = read_kernel(task_ptr, offsets.task_tgid).unwrap_or(0);
    let leader = group_leader(task_ptr, &offsets);
    record.process_start_ns = process_start_ns(leader, &offsets);
    // The leader's name: thread names ("tokio-runtime-w") would hide the
    // program.
    record.comm = read_kernel(leader, offsets.task_comm).unwrap_or([0; COMM_LEN]);
    record.cgroup_id = cgroup_id_of(task_ptr, &offsets);
    // SAFETY: meta is valid for this call; the record lives on our stack.
    unsafe {
        let seq = ptr::read_volatile(&(*meta).seq);
        bpf_seq_write(
            seq.cast(),
            ptr::from_ref(&record).cast(),
            size_of::<TaskRecord>() as u32,
        );
    }
    0
}

/// task->cgroups->dfl_cgrp->kn->id: the thread's cgroup on the v2 hierarchy.
#[inline(always)]
fn cgroup_id_of(task: *const u8, offsets: &KernelOffsets) -> u64 {
    let Some(css_set) = read_kernel::<*const u8>(task, offsets.task_cgroups) else {
        return 0;
    };
    let Some(cgroup) = read_kernel::<*const u8>(css_set, offsets.css_set_dfl_cgrp) else {
        return 0;
    };
    let Some(kernfs_node) = read_kernel::<*const u8>(cgroup, offsets.cgroup_kn) else {
        return 0;
    };
    read_kernel(kernfs_node, offsets.kernfs_node_id).unwrap_or(0)
}

/// Runs once before `sched_switch` is attached: marks every existing
/// thread's run time so far as claimed, so powerlens charges only what runs
/// after it started (a daemon's hour of history is not one interval's work).
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task")]
extern "C" fn baseline_tasks(ctx: *mut BpfIterTask) -> i32 {
    // SAFETY: the kernel hands us a valid bpf_iter__task context.
    let task = unsafe { ptr::read_volatile(&(*ctx).task) };
    if task.is_null() {
        return 0;
    }
    let offsets = offsets();
    let Some(runtime) = read_kernel::<u64>(task.cast(), offsets.task_sum_exec_runtime) else {
        return 0;
    };
    let Some(entry) = TASK_RUNTIME.get(task, true) else {
        count_loss(LossCounter::TaskStorageFull, 1);
        return 0;
    };
    // SAFETY: entry is a live storage value.
    let claimed = atomic(unsafe { &raw mut (*entry).claimed_runtime_ns });
    claimed.compare_exchange(0, runtime);
    0
}

// ---------------------------------------------------------------------------
// Benchmark baseline: the cheapest program the switch path can run.

#[btf_tracepoint(function = "sched_switch")]
pub fn empty_sched_switch(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
