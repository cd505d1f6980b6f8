//! powerlens kernel programs.
//!
//! The context-switch path is the cost that matters, so it does the least
//! that keeps the figures exact:
//!
//! * `sched_switch` (tp_btf) reads the outgoing thread's own scheduler run
//!   time (`se.sum_exec_runtime`, what `/proc/<pid>/schedstat` reports) with
//!   one direct load, and adds the slice since its last switch to the
//!   thread's task-local storage, on the socket of the CPU it ran on. No
//!   clock read, no hash map, no atomic instruction, no lock shared across
//!   CPUs: only the thread's own CPU writes those fields.
//! * `dump_tasks` (a task iterator) runs when the agent reads: it reports
//!   each thread's run time (the slice in progress included, so a busy loop
//!   that never switches out is counted) beyond what it reported before,
//!   moving the per-thread "reported" mark with compare-and-swap.
//! * A thread's last switch (`TASK_DEAD`) moves what was never reported into
//!   the `EXITED` hash map, so short-lived processes are never lost.
//!
//! Kernel floor: 5.12 (task storage for tracing programs arrived in 5.11,
//! atomic compare-and-exchange in 5.12). Nothing else is newer: the task
//! state is read through a BTF offset rather than `sched_switch`'s
//! `prev_state` argument (5.18).
//!
//! Memory ordering. The switch path writes a thread's `last_runtime_ns`,
//! then its cumulative figure; the reader, on another CPU, loads them in the
//! opposite order, so a half-done update can only look like less run time,
//! never more. x86 keeps stores and loads in program order; on weakly
//! ordered CPUs (arm64) `WEAKLY_ORDERED` makes the cumulative update a fully
//! ordered atomic (release for the store before it) and puts fully ordered
//! atomics between the reader's loads (acquire), which the JITs turn into
//! `ldaddal` / `dmb ish`. On x86 the flag is a constant false and the
//! verifier removes those branches.
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
    intrinsics::{
        self,
        AtomicOrdering::{Relaxed, SeqCst},
    },
    mem::{MaybeUninit, size_of},
    ptr,
};

use agent_common::{
    COMM_LEN, CgroupCreated, EXITED_MAP_CAPACITY, ExitedKey, ExitedValue, KernelOffsets,
    LossCounter, MAX_CPUS, MAX_SOCKETS, TASK_DEAD, TaskRecord, TaskRuntime,
};
use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_LOCAL_STORAGE_GET_F_CREATE, BPF_NOEXIST, bpf_map_type},
    btf_maps::{HashMap, PerCpuArray, RingBuf},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_get_smp_processor_id, bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes,
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
    task_state: 0,
    task_state_size: 4,
    task_nvcsw: 0,
    task_nivcsw: 0,
};

/// CLOCK_BOOTTIME when the agent loaded the programs: a thread that started
/// later has run only while they were attached.
#[unsafe(no_mangle)]
static AGENT_START_BOOTTIME_NS: u64 = 0;

/// 1 on CPUs that may reorder stores or loads (anything but x86).
#[unsafe(no_mangle)]
static WEAKLY_ORDERED: u32 = 1;

/// Physical package of each CPU, from sysfs topology.
#[unsafe(no_mangle)]
static CPU_TO_SOCKET: [u8; MAX_CPUS] = [0; MAX_CPUS];

/// Sockets of this machine (1..=MAX_SOCKETS): loops over sockets stop here.
#[unsafe(no_mangle)]
static SOCKETS: u32 = MAX_SOCKETS as u32;

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

/// Cgroups as the kernel creates them (id, path): a container that lives
/// less than one interval is gone before the agent's walk of the
/// hierarchy could see its name.
#[btf_map]
static CGROUP_EVENTS: RingBuf<CgroupCreated, { 256 * 1024 }> = RingBuf::new();

// ---------------------------------------------------------------------------
// Small helpers.

/// One offset from `OFFSETS`, loaded from the read-only map at the point of
/// use: the verifier then knows its value, which direct loads through BTF
/// pointers need (a copy on the stack would lose that). Volatile so the
/// compiler does not fold the zeroes above into the code (the agent rewrites
/// them before loading).
macro_rules! offset {
    ($field:ident) => {
        // SAFETY: a plain read of our own static.
        unsafe { ptr::read_volatile(&raw const OFFSETS.$field) }
    };
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
fn sockets() -> usize {
    // SAFETY: a plain read of our own static.
    let sockets = unsafe { ptr::read_volatile(&raw const SOCKETS) } as usize;
    sockets.clamp(1, MAX_SOCKETS)
}

#[inline(always)]
fn count_loss(counter: LossCounter, amount: u64) {
    if let Some(slot) = LOSS_COUNTERS.get_ptr_mut(counter as u32) {
        // Atomic even though the slot is this CPU's: the iterator runs
        // preemptibly, so `sched_switch` can count on the same CPU in the
        // middle of its read-modify-write. Rare, so the cost does not matter.
        atomic(slot).fetch_add(amount);
    }
}

#[inline(always)]
fn weakly_ordered() -> bool {
    // SAFETY: a plain read of our own static.
    unsafe { ptr::read_volatile(&raw const WEAKLY_ORDERED) != 0 }
}

/// A full memory barrier on weakly ordered CPUs, nothing on x86: a
/// compare-and-exchange (always a fetching, fully ordered atomic in eBPF)
/// that succeeds on a slot only the reader uses and that stays 0. eBPF has
/// no barrier instruction; the kernel treats fetching atomics as fully
/// ordered, and the arm64 JIT emits `casal` (LSE) or an exclusive loop
/// followed by `dmb ish`.
#[inline(always)]
fn reader_fence(slot: *mut u64) {
    if weakly_ordered() {
        atomic(slot).compare_exchange_ordered(0, 0);
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

    /// `compare_exchange` that LLVM may not move other memory accesses
    /// across either (the instruction is the same: eBPF has one
    /// compare-and-exchange, fully ordered).
    #[inline(always)]
    fn compare_exchange_ordered(self, current: u64, new: u64) -> bool {
        // SAFETY: see the type's comment.
        unsafe { intrinsics::atomic_cxchg::<u64, { SeqCst }, { SeqCst }>(self.0, current, new) }.1
    }
}

/// A direct load of a field of a kernel object reached through a BTF-typed
/// pointer (a program argument, or a pointer loaded from one): the verifier
/// checks `offset` against the object's layout and the JIT turns it into a
/// plain load that cannot fault, where `bpf_probe_read_kernel` is a helper
/// call. The offsets come from the running kernel's BTF.
#[inline(always)]
fn field<T>(object: *const u8, offset: u32) -> T {
    // SAFETY: see above; the verifier rejects the program if the offset is
    // not a `T`-sized member of the pointed-to type.
    unsafe { ptr::read_volatile(object.add(offset as usize).cast::<T>()) }
}

#[inline(always)]
fn atomic(slot: *mut u64) -> AtomicSlot {
    AtomicSlot(slot)
}

/// The thread-group leader of `task` (the task itself when it leads).
#[inline(always)]
fn group_leader(task: *const u8) -> *const u8 {
    field(task, offset!(task_group_leader))
}

/// The leader's start time (boot-based, like `/proc/<pid>/stat`): with the
/// tgid it names a process, so a reused PID never merges two processes.
#[inline(always)]
fn process_start_ns(leader: *const u8) -> u64 {
    field(leader, offset!(task_start_boottime))
}

// ---------------------------------------------------------------------------
// The context-switch path.

#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next,
    //          unsigned int prev_state)
    // Only `prev` (argument 1) is read: `prev_state` (argument 3) exists
    // only from 5.18, so the state comes from the task itself.
    let prev: *mut c_void = ctx.arg(1);
    on_switch_out(prev);
    0
}

/// `prev->__state` (or the older `prev->state`): `TASK_DEAD` is set before
/// a thread's last `schedule()`, and the low 32 bits of the older `long`
/// hold it too.
#[inline(always)]
fn task_state(task: *const u8) -> u32 {
    // SAFETY: a plain read of our own static.
    if unsafe { ptr::read_volatile(&raw const OFFSETS.task_state_size) } == 8 {
        field::<u64>(task, offset!(task_state)) as u32
    } else {
        field::<u32>(task, offset!(task_state))
    }
}

#[inline(always)]
fn on_switch_out(prev: *mut c_void) {
    let runtime: u64 = field(prev.cast(), offset!(task_sum_exec_runtime));
    // The idle threads keep no run time of their own; nothing to charge.
    if runtime == 0 {
        return;
    }
    let Some(entry) = TASK_RUNTIME.get(prev, true) else {
        // Creating the entry failed (only creating can: a lookup of an
        // existing entry succeeds even when the storage is busy). The time
        // is not lost while the thread lives: `last_runtime_ns` stays
        // behind, and the next switch or read charges from there.
        count_loss(LossCounter::TaskStorageFull, 1);
        if task_state(prev.cast()) & TASK_DEAD != 0 {
            exit_without_storage(prev, runtime);
        }
        return;
    };
    // SAFETY: entry is this thread's storage, written on this path only by
    // the CPU the thread is switching out of.
    let entry = unsafe { &mut *entry };
    let last = entry.last_runtime_ns;
    // `last` first, then the cumulative figure: the iterator reads them in
    // the opposite order, so it never sees the slice twice (see dump_tasks).
    // SAFETY: aligned stores into this thread's storage; volatile keeps the
    // compiler from reordering them.
    unsafe { ptr::write_volatile(&raw mut entry.last_runtime_ns, runtime) };
    if runtime > last {
        let slice = runtime - last;
        // SAFETY: a helper without arguments (inlined by the verifier).
        let cpu = unsafe { bpf_get_smp_processor_id() };
        let socket = &mut entry.by_socket[socket_of(cpu)];
        let cumulative = socket.cumulative_ns;
        if weakly_ordered() {
            // Fully ordered, so the store to `last_runtime_ns` above becomes
            // visible first (see the module's comment). Only this CPU writes
            // the figure now, so the exchange always succeeds.
            atomic(&raw mut socket.cumulative_ns)
                .compare_exchange_ordered(cumulative, cumulative + slice);
        } else {
            // SAFETY: as above.
            unsafe { ptr::write_volatile(&raw mut socket.cumulative_ns, cumulative + slice) };
        }
        if let Some(busy) = CPU_BUSY_NS.get_ptr_mut(0) {
            // SAFETY: this CPU's slot.
            unsafe { *busy += slice };
        }
    }
    if task_state(prev.cast()) & TASK_DEAD != 0 {
        flush_exited(prev, entry);
    }
}

/// A thread ends without ever having had an entry. Born after the agent
/// started, all its run time is new: charge it whole through `EXITED`.
/// Born before, what it ran before the start is not ours and cannot be
/// told apart: count it as lost.
#[inline(never)]
fn exit_without_storage(prev: *mut c_void, runtime: u64) {
    let started: u64 = field(prev.cast(), offset!(task_start_boottime));
    // SAFETY: a plain read of our own static.
    let agent_start = unsafe { ptr::read_volatile(&raw const AGENT_START_BOOTTIME_NS) };
    if started < agent_start {
        count_loss(LossCounter::TaskStorageFullNs, runtime);
        return;
    }
    let mut runtime_ns_by_socket = [0u64; MAX_SOCKETS];
    // SAFETY: a helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    runtime_ns_by_socket[socket_of(cpu)] = runtime;
    if let Some(busy) = CPU_BUSY_NS.get_ptr_mut(0) {
        // Its slices were never added at switches: add them here, on the
        // CPU it ends on (the best place known).
        // SAFETY: this CPU's slot.
        unsafe { *busy += runtime };
    }
    record_exit(prev, &runtime_ns_by_socket, runtime);
}

/// Moves the reported mark of one socket up to `total` (compare-and-swap:
/// the iterator and a thread's last switch may race on it) and returns how
/// much was not reported before.
#[inline(always)]
fn report_up_to(reported: *mut u64, total: u64) -> u64 {
    let slot = atomic(reported);
    // Bounded retries keep the verifier happy; losing the race twice in a row
    // means the other side reported it.
    for _ in 0..2 {
        let before = slot.load();
        if total <= before {
            return 0;
        }
        if slot.compare_exchange(before, total) {
            return total - before;
        }
    }
    0
}

/// The thread is switching out for the last time: move what was never
/// reported into `EXITED` before its storage is freed. `current` is still
/// `prev` here (the tracepoint fires before the switch).
#[inline(never)]
fn flush_exited(prev: *mut c_void, entry: &mut TaskRuntime) {
    let mut runtime_ns_by_socket = [0u64; MAX_SOCKETS];
    let mut total = 0u64;
    for (out, socket) in runtime_ns_by_socket
        .iter_mut()
        .zip(entry.by_socket.iter_mut())
        .take(sockets())
    {
        *out = report_up_to(&raw mut socket.reported_ns, socket.cumulative_ns);
        total += *out;
    }
    record_exit(prev, &runtime_ns_by_socket, total);
}

/// Adds an ending thread's unreported run time to its process's `EXITED`
/// entry (creating it), or counts it as lost when the map is full.
#[inline(never)]
fn record_exit(prev: *mut c_void, runtime_ns_by_socket: &[u64; MAX_SOCKETS], total: u64) {
    // Even with nothing left to report, the entry tells the agent that a
    // thread of this process ended, so it can check whether the process is
    // gone without sweeping /proc.
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let leader = group_leader(prev.cast());
    let key = ExitedKey {
        tgid,
        _pad: 0,
        process_start_ns: process_start_ns(leader),
    };
    if let Some(existing) = EXITED.get_ptr_mut(key) {
        add_exited(existing, runtime_ns_by_socket);
        return;
    }
    let value = ExitedValue {
        threads_exited: 1,
        // SAFETY: plain helper calls about `current`.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        comm: read_kernel(leader, offset!(task_comm)).unwrap_or([0; COMM_LEN]),
        runtime_ns_by_socket: *runtime_ns_by_socket,
    };
    if EXITED.insert(key, value, BPF_NOEXIST as u64).is_ok() {
        return;
    }
    // Another thread of the process inserted first, or the map is full.
    if let Some(existing) = EXITED.get_ptr_mut(key) {
        add_exited(existing, runtime_ns_by_socket);
    } else {
        count_loss(LossCounter::ExitedMapFull, 1);
        count_loss(LossCounter::ExitedMapFullNs, total);
    }
}

#[inline(always)]
fn add_exited(existing: *mut ExitedValue, runtime_ns_by_socket: &[u64; MAX_SOCKETS]) {
    // SAFETY: existing is a live map value.
    atomic(unsafe { &raw mut (*existing).threads_exited }).fetch_add(1);
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

/// Reports every thread's run time beyond what it reported before, the
/// slice in progress included. Writes one `TaskRecord` per thread with
/// anything new or on a CPU now.
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
    // A thread without storage has not switched out since the agent started
    // (or was created since): its whole run time is new, so a zeroed entry
    // is right.
    let Some(entry) = TASK_RUNTIME.get(task, true) else {
        count_loss(LossCounter::TaskStorageFull, 1);
        return 0;
    };
    let mut record: TaskRecord = unsafe { MaybeUninit::zeroed().assume_init() };
    let task_ptr: *const u8 = task.cast();
    // SAFETY: entry is a live storage value.
    let entry = unsafe { &mut *entry };
    let fence = &raw mut entry.reader_fence;
    // The switch path may update this thread's storage concurrently, on the
    // CPU the thread leaves. It stores `last_runtime_ns` before the
    // cumulative figure; reading in the opposite order (cumulative first)
    // means a half-done update can only look like less run time than there
    // is, never more, and under-reporting is made up by the next read (see
    // the module's comment for weakly ordered CPUs).
    //
    // One case remains: a switch-out that completes between our loads, after
    // which the thread runs elsewhere (another socket, or the same one):
    // `last` from before it with `sum_exec_runtime` and `cpu` from after
    // would put the ended slice in the "in progress" part too, and if the
    // thread then exits, its last switch reports that slice again. The
    // kernel bumps the thread's switch count before `sched_switch` fires, so
    // a count that moved while we read means exactly that: then only the
    // cumulative figures (each only ever grows) are claimed.
    let switches_before = switch_count(task_ptr);
    reader_fence(fence);
    let mut cumulative = [0u64; MAX_SOCKETS];
    for (out, socket) in cumulative
        .iter_mut()
        .zip(entry.by_socket.iter())
        .take(sockets())
    {
        // SAFETY: an aligned 8-byte load of a live map value.
        *out = unsafe { ptr::read_volatile(&raw const socket.cumulative_ns) };
    }
    reader_fence(fence);
    // SAFETY: as above.
    let last = unsafe { ptr::read_volatile(&raw const entry.last_runtime_ns) };
    // The slice in progress: scheduler run time not yet seen at a switch.
    // `sum_exec_runtime` of a running task is updated at every tick.
    let runtime: u64 = field(task_ptr, offset!(task_sum_exec_runtime));
    let cpu: u32 = field(task_ptr, offset!(task_cpu));
    reader_fence(fence);
    let switches_after = switch_count(task_ptr);
    let mut in_progress_socket = MAX_SOCKETS;
    if runtime > last && switches_before == switches_after {
        record.in_progress_ns = runtime - last;
        record.cpu = cpu;
        in_progress_socket = socket_of(cpu);
    }
    let mut anything = record.in_progress_ns > 0;
    // What each socket's mark was moved up to, to undo the claim if the
    // record cannot be written.
    let mut claimed_up_to = [0u64; MAX_SOCKETS];
    for (index, (((socket, delta), total), claimed)) in entry
        .by_socket
        .iter_mut()
        .zip(record.runtime_ns_by_socket.iter_mut())
        .zip(cumulative)
        .zip(claimed_up_to.iter_mut())
        .take(sockets())
        .enumerate()
    {
        let total = if index == in_progress_socket {
            total + record.in_progress_ns
        } else {
            total
        };
        *delta = report_up_to(&raw mut socket.reported_ns, total);
        *claimed = total;
        anything |= *delta != 0;
    }
    if !anything {
        return 0;
    }
    // Identity: cached in the storage, so a read of a busy machine touches
    // few cache lines per thread. The cgroup is re-read when the task's
    // css_set changes (a migration); the rest for a thread's first reports
    // and every 8th after (a name changes at exec).
    let css_set: *const u8 = field(task_ptr, offset!(task_cgroups));
    if css_set as u64 != entry.css_set {
        entry.cgroup_id = cgroup_id_of(css_set);
        entry.css_set = css_set as u64;
    }
    if entry.reports < 4 || entry.reports % 8 == 0 {
        entry.tid = field(task_ptr, offset!(task_pid));
        entry.tgid = field(task_ptr, offset!(task_tgid));
        let leader = group_leader(task_ptr);
        entry.process_start_ns = process_start_ns(leader);
        // The leader's name: thread names ("tokio-runtime-w") would hide the
        // program.
        entry.comm = read_kernel(leader, offset!(task_comm)).unwrap_or([0; COMM_LEN]);
    }
    entry.reports = entry.reports.wrapping_add(1);
    record.tid = entry.tid;
    record.tgid = entry.tgid;
    record.process_start_ns = entry.process_start_ns;
    record.comm = entry.comm;
    record.cgroup_id = entry.cgroup_id;
    // SAFETY: meta is valid for this call; the record lives on our stack.
    let written = unsafe {
        let seq = ptr::read_volatile(&(*meta).seq);
        bpf_seq_write(
            seq.cast(),
            ptr::from_ref(&record).cast(),
            size_of::<TaskRecord>() as u32,
        )
    };
    if written != 0 {
        // The record did not fit the kernel's buffer (-EOVERFLOW): the
        // kernel drops it and runs this program for the same thread on the
        // next read(). Undo the claim so that run reports the slice again.
        unclaim(entry, &record.runtime_ns_by_socket, &claimed_up_to);
    }
    0
}

/// Moves each socket's reported mark back from `claimed_up_to` by what the
/// dropped record held. A mark that moved on since (the thread's last
/// switch reported past it) cannot be moved back: that slice is counted as
/// lost.
#[inline(never)]
fn unclaim(
    entry: &mut TaskRuntime,
    delta_by_socket: &[u64; MAX_SOCKETS],
    claimed_up_to: &[u64; MAX_SOCKETS],
) {
    count_loss(LossCounter::IteratorRecordRewound, 1);
    for ((socket, delta), claimed) in entry
        .by_socket
        .iter_mut()
        .zip(delta_by_socket)
        .zip(claimed_up_to)
        .take(sockets())
    {
        if *delta == 0 {
            continue;
        }
        let mark = atomic(&raw mut socket.reported_ns);
        if !mark.compare_exchange(*claimed, *claimed - *delta) {
            count_loss(LossCounter::IteratorRecordLostNs, *delta);
        }
    }
}

/// The thread's context switches so far (voluntary + involuntary).
#[inline(always)]
fn switch_count(task: *const u8) -> u64 {
    let voluntary: u64 = field(task, offset!(task_nvcsw));
    let involuntary: u64 = field(task, offset!(task_nivcsw));
    voluntary.wrapping_add(involuntary)
}

/// css_set->dfl_cgrp->kn->id: the cgroup on the v2 hierarchy of the tasks
/// that share `css_set`.
#[inline(always)]
fn cgroup_id_of(css_set: *const u8) -> u64 {
    let cgroup: *const u8 = field(css_set, offset!(css_set_dfl_cgrp));
    let kernfs_node: *const u8 = field(cgroup, offset!(cgroup_kn));
    field(kernfs_node, offset!(kernfs_node_id))
}

/// Runs once before `sched_switch` is attached: marks every existing
/// thread's run time so far as seen, so powerlens charges only what runs
/// after it started (a daemon's hour of history is not one interval's work).
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task")]
extern "C" fn baseline_tasks(ctx: *mut BpfIterTask) -> i32 {
    // SAFETY: the kernel hands us a valid bpf_iter__task context.
    let task = unsafe { ptr::read_volatile(&(*ctx).task) };
    if task.is_null() {
        return 0;
    }
    let runtime: u64 = field(task.cast(), offset!(task_sum_exec_runtime));
    let Some(entry) = TASK_RUNTIME.get(task, true) else {
        count_loss(LossCounter::TaskStorageFull, 1);
        return 0;
    };
    // SAFETY: entry is a live storage value; sched_switch is not attached
    // yet, so nothing else writes it.
    unsafe {
        if (*entry).last_runtime_ns == 0 {
            (*entry).last_runtime_ns = runtime;
        }
    }
    0
}

// ---------------------------------------------------------------------------
// Cgroup names, as they are made.

#[btf_tracepoint(function = "cgroup_mkdir")]
pub fn cgroup_mkdir(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(struct cgroup *cgrp, const char *path)
    let cgroup: *const u8 = ctx.arg(0);
    let path: *const u8 = ctx.arg(1);
    let Some(mut entry) = CGROUP_EVENTS.reserve(0) else {
        count_loss(LossCounter::CgroupEventsDropped, 1);
        return 0;
    };
    let record = entry.as_mut_ptr();
    let kernfs_node: *const u8 = field(cgroup, offset!(cgroup_kn));
    let id: u64 = field(kernfs_node, offset!(kernfs_node_id));
    // SAFETY: `record` is ring buffer memory reserved for a CgroupCreated;
    // the string read is bounded by the array.
    unsafe {
        (*record).id = id;
        (*record).creator_uid = bpf_get_current_uid_gid() as u32;
        (*record)._pad = 0;
        (*record).path[0] = 0;
        let _ = bpf_probe_read_kernel_str_bytes(path, &mut (*record).path);
    }
    entry.submit(0);
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
