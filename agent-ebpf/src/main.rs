//! powerlens kernel programs.
//!
//! The context-switch path is the cost that matters, so it touches no
//! per-thread memory of its own: no hash map, no task storage, no slot.
//!
//! * `sched_switch` (tp_btf) appends one `SwitchRecord` to its CPU's log in
//!   `SWITCH_LOG`: the outgoing thread's task address and start time (which
//!   together name it for good), its scheduler run time
//!   (`se.sum_exec_runtime`, what `/proc/<pid>/schedstat` reports), its
//!   cgroup and tgid, and whether this is its last switch. Every field is
//!   read with a direct load from lines the scheduler has just touched
//!   (the run time, the switch counters next to the start time, the css_set
//!   the cgroup's CPU time was charged through), and the record goes to the
//!   CPU's own log: no line is shared with another CPU on this path.
//! * The agent maps the logs and `CPU_LOG` into its memory and reads the
//!   records appended since its last read: the run time is absolute, so a
//!   thread's slice is the growth since its previous record, whichever CPU
//!   wrote it. A read costs one visit per switch, none for a thread that
//!   slept. `read_running`, run by the agent on each busy CPU through
//!   `BPF_PROG_TEST_RUN`, reports the thread running there, so a thread
//!   that never switches out is counted in every interval.
//! * A CPU whose log is full (the agent has not caught up) writes the
//!   record to the `OVERFLOW` hash map instead, keyed by thread, newest
//!   record kept: nothing is lost while it has room.
//! * `baseline_tasks` (a task iterator, once at start) writes every
//!   existing thread's run time so far, which the agent marks as seen;
//!   `process_fork` and `process_exec` name processes as they start.
//!
//! Kernel floor: 5.12, for BPF atomic exchange (the release store below;
//! 5.10's verifier refuses it even where the branch is dead). The rest is
//! older: mmapable arrays 5.5, ring buffers 5.8, running a raw tracepoint
//! program on a chosen CPU 5.10.
//!
//! Memory ordering: a record is written before the log's `written` count
//! that covers it; on weakly ordered CPUs (`WEAKLY_ORDERED`, arm64) the
//! count is stored with a fully ordered exchange (release).
//!
//! Offsets into kernel structures come from the running kernel's BTF, read
//! by the agent and set as read-only globals before the programs load.
#![no_std]
#![no_main]
// The bpf target reports no compare-and-swap, so `core::sync::atomic` offers
// only loads and stores; the kernel (BPF ISA v3, Linux 5.12+) has atomic
// add and exchange, which these intrinsics reach.
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::{
    ffi::c_void,
    intrinsics::{
        self,
        AtomicOrdering::{Relaxed, SeqCst},
    },
    ptr,
};

use agent_common::{
    BaselineThread, COMM_LEN, CgroupCreated, Control, CpuLog, KernelOffsets, LossCounter,
    LossCounts, OVERFLOW_MAP_CAPACITY, OverflowKey, OverflowValue, ProcessStarted, RECORD_ENDED,
    RunningThread, SwitchRecord, TASK_DEAD,
};
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_F_MMAPABLE},
    btf_maps::{Array, HashMap, RingBuf},
    helpers::{
        bpf_get_current_uid_gid, bpf_get_smp_processor_id, bpf_probe_read_kernel,
        bpf_probe_read_kernel_str_bytes,
        generated::{bpf_get_current_task_btf, bpf_seq_write},
    },
    macros::{btf_map, btf_tracepoint, raw_tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext},
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
    task_mm: 0,
    task_cgroups: 0,
    css_set_dfl_cgrp: 0,
    cgroup_kn: 0,
    kernfs_node_id: 0,
    task_state: 0,
    task_state_size: 4,
};

/// 1 on CPUs that may reorder stores or loads (anything but x86).
#[unsafe(no_mangle)]
static WEAKLY_ORDERED: u32 = 1;

/// Records in each CPU's log (a power of two; `SWITCH_LOG` holds CPUs ×
/// this).
#[unsafe(no_mangle)]
static SWITCH_LOG_LEN: u32 = 1;

// ---------------------------------------------------------------------------
// Maps. Sizes of 1 are placeholders: the agent sets them before loading.

const MMAPABLE: usize = BPF_F_MMAPABLE as usize;

/// Per CPU, a ring of `SWITCH_LOG_LEN` records.
#[btf_map]
static SWITCH_LOG: Array<SwitchRecord, 1, MMAPABLE> = Array::new();

/// One `CpuLog` per possible CPU: how many records its switches wrote.
#[btf_map]
static CPU_LOG: Array<CpuLog, 1, MMAPABLE> = Array::new();

#[btf_map]
static CONTROL: Array<Control, 1, MMAPABLE> = Array::new();

/// One `RunningThread` per possible CPU, written by `read_running`.
#[btf_map]
static RUNNING: Array<RunningThread, 1, MMAPABLE> = Array::new();

/// Records of switches that found their CPU's log full, newest per thread.
#[btf_map]
static OVERFLOW: HashMap<OverflowKey, OverflowValue, { OVERFLOW_MAP_CAPACITY as usize }> =
    HashMap::new();

#[btf_map]
static LOSS_COUNTERS: Array<LossCounts, 1, MMAPABLE> = Array::new();

/// Cgroups as the kernel creates them (id, path): a container that lives
/// less than one interval is gone before the agent's walk of the
/// hierarchy could see its name.
#[btf_map]
static CGROUP_EVENTS: RingBuf<CgroupCreated, { 256 * 1024 }> = RingBuf::new();

/// Processes as they start or run `execve`: their start time and name.
#[btf_map]
static PROCESS_EVENTS: RingBuf<ProcessStarted, { 1024 * 1024 }> = RingBuf::new();

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
fn count_loss(counter: LossCounter, amount: u64) {
    // SAFETY: a helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    if let Some(counts) = LOSS_COUNTERS.get_ptr_mut(cpu) {
        // Atomic even though the entry is this CPU's: the iterator runs
        // preemptibly, so `sched_switch` can count on the same CPU in the
        // middle of its read-modify-write. Rare, so the cost does not matter.
        // SAFETY: the counter's index is below COUNT.
        atomic(unsafe { &raw mut (*counts).counts[counter as usize] }).fetch_add(amount);
    }
}

#[inline(always)]
fn weakly_ordered() -> bool {
    // SAFETY: a plain read of our own static.
    unsafe { ptr::read_volatile(&raw const WEAKLY_ORDERED) != 0 }
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
    fn fetch_add(self, value: u64) {
        // SAFETY: see the type's comment.
        unsafe { intrinsics::atomic_xadd::<u64, u64, { Relaxed }>(self.0, value) };
    }

    /// Stores `value` with a fully ordered exchange: every access before it
    /// is visible to other CPUs before the new value, and every access after
    /// it happens after (eBPF's exchange is always fully ordered).
    #[inline(always)]
    fn exchange_ordered(self, value: u64) {
        // SAFETY: see the type's comment.
        unsafe { intrinsics::atomic_xchg::<u64, { SeqCst }>(self.0, value) };
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
// Records.

/// Reads a `T` from a map value shared with the agent without letting the
/// compiler cache or merge it.
#[inline(always)]
fn load<T>(place: *const T) -> T {
    // SAFETY: callers pass pointers into live map values.
    unsafe { ptr::read_volatile(place) }
}

#[inline(always)]
fn store<T>(place: *mut T, value: T) {
    // SAFETY: callers pass pointers into live map values.
    unsafe { ptr::write_volatile(place, value) }
}

/// The read the agent is doing now (`Control::read`).
#[inline(always)]
fn current_read() -> u64 {
    match CONTROL.get_ptr(0) {
        // SAFETY: a live map value.
        Some(control) => load(unsafe { &raw const (*control).read }),
        None => 0,
    }
}

/// css_set->dfl_cgrp->kn->id: the cgroup on the v2 hierarchy of the tasks
/// that share `css_set`.
#[inline(always)]
fn cgroup_id_of(css_set: *const u8) -> u64 {
    let cgroup: *const u8 = field(css_set, offset!(css_set_dfl_cgrp));
    let kernfs_node: *const u8 = field(cgroup, offset!(cgroup_kn));
    field(kernfs_node, offset!(kernfs_node_id))
}

/// What a record says of `task` now, with its run time `runtime`.
#[inline(always)]
fn record_of(task: *const u8, runtime: u64, ended: bool) -> SwitchRecord {
    let mut record = SwitchRecord::default();
    write_record(&mut record, task, runtime, ended);
    record
}

/// Writes what a record says of `task` into `entry` (a log entry, or a
/// record on the stack).
#[inline(always)]
fn write_record(entry: *mut SwitchRecord, task: *const u8, runtime: u64, ended: bool) {
    let pid: u32 = field(task, offset!(task_pid));
    let tgid: u32 = field(task, offset!(task_tgid));
    let css_set: *const u8 = field(task, offset!(task_cgroups));
    let thread_start_ns: u64 = field(task, offset!(task_start_boottime));
    let cgroup_id = cgroup_id_of(css_set);
    let tgid_pid = (u64::from(tgid) << 32) | u64::from(pid) | if ended { RECORD_ENDED } else { 0 };
    // SAFETY: a live log entry of this CPU, not visible to the agent until
    // `written` covers it, or a record of the caller's.
    unsafe {
        store(&raw mut (*entry).task, task as u64);
        store(&raw mut (*entry).thread_start_ns, thread_start_ns);
        store(&raw mut (*entry).runtime_ns, runtime);
        store(&raw mut (*entry).cgroup_id, cgroup_id);
        store(&raw mut (*entry).tgid_pid, tgid_pid);
    }
}

// ---------------------------------------------------------------------------
// The context-switch path.

#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next,
    //          unsigned int prev_state)
    // `prev_state` (argument 3) exists only from 5.18, so the state comes
    // from the task itself; `next` is kept only as a number.
    let prev: *const u8 = ctx.arg(1);
    let next: u64 = ctx.arg(2);
    on_switch(prev, next);
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
fn on_switch(prev: *const u8, next: u64) {
    // SAFETY: a helper without arguments (inlined by the verifier).
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let Some(log) = CPU_LOG.get_ptr_mut(cpu) else {
        return;
    };
    let runtime: u64 = field(prev, offset!(task_sum_exec_runtime));
    // SAFETY: this CPU's log, written only here.
    unsafe { store(&raw mut (*log).current_task, next) };
    // The idle task keeps no run time of its own; nothing to charge.
    if runtime == 0 {
        // SAFETY: as above.
        unsafe { store(&raw mut (*log).idle_task, prev as u64) };
        return;
    }
    // SAFETY: as above.
    let written_at = unsafe { &raw mut (*log).written };
    let written = load(written_at);
    // SAFETY: as above.
    let consumed = load(unsafe { &raw const (*log).consumed });
    // SAFETY: a plain read of our own static.
    let len = unsafe { ptr::read_volatile(&raw const SWITCH_LOG_LEN) };
    if written.wrapping_sub(consumed) >= u64::from(len) {
        log_full(prev, runtime, cpu);
        return;
    }
    let at = cpu * len + (written as u32 & (len - 1));
    let Some(entry) = SWITCH_LOG.get_ptr_mut(at) else {
        return;
    };
    // Written field by field into the log: a record built on the stack
    // first would cost a copy on every switch.
    write_record(entry, prev, runtime, task_state(prev) & TASK_DEAD != 0);
    if weakly_ordered() {
        // Release: the record is visible before the count that covers it.
        atomic(written_at).exchange_ordered(written + 1);
    } else {
        store(written_at, written + 1);
    }
}

/// The CPU's log is full: keep the record in `OVERFLOW` (newest per
/// thread; a thread's last record is never replaced, nothing follows it).
#[inline(never)]
fn log_full(prev: *const u8, runtime: u64, cpu: u32) {
    count_loss(LossCounter::SwitchLogFull, 1);
    let record = &record_of(prev, runtime, task_state(prev) & TASK_DEAD != 0);
    let key = OverflowKey {
        task: record.task,
        thread_start_ns: record.thread_start_ns,
    };
    let value = OverflowValue {
        record: *record,
        cpu,
        _pad: 0,
    };
    if OVERFLOW.insert(key, value, u64::from(BPF_ANY)).is_err() {
        count_loss(LossCounter::OverflowMapFull, 1);
    }
}

// ---------------------------------------------------------------------------
// The running thread of a CPU, read on that CPU.

/// Run by the agent on each busy CPU (`BPF_PROG_TEST_RUN` with
/// `BPF_F_TEST_RUN_ON_CPU`, in an interrupt on that CPU): the record of the
/// thread running there, which a thread that never switches out would
/// otherwise never write. `sum_exec_runtime` of a running thread is brought
/// up to date at every scheduler tick.
#[raw_tracepoint(tracepoint = "read_running")]
pub fn read_running(_ctx: RawTracePointContext) -> i32 {
    // SAFETY: helpers without arguments.
    let (task, cpu) = unsafe {
        (
            bpf_get_current_task_btf().cast::<u8>().cast_const(),
            bpf_get_smp_processor_id(),
        )
    };
    let Some(out) = RUNNING.get_ptr_mut(cpu) else {
        return 0;
    };
    let runtime: u64 = field(task, offset!(task_sum_exec_runtime));
    let record = if runtime == 0 {
        SwitchRecord::default()
    } else {
        record_of(task, runtime, false)
    };
    // SAFETY: this CPU's entry, written only here.
    unsafe {
        store(&raw mut (*out).record, record);
        store(&raw mut (*out).read, current_read());
    }
    0
}

// ---------------------------------------------------------------------------
// Start: every existing thread's run time so far.

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

/// Runs once after `sched_switch` is attached: writes a `BaselineThread`
/// per existing thread, whose run time so far the agent marks as seen, so
/// powerlens charges only what runs after it started (a daemon's hour of
/// history is not one interval's work).
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task")]
extern "C" fn baseline_tasks(ctx: *mut BpfIterTask) -> i32 {
    // SAFETY: the kernel hands us a valid bpf_iter__task context.
    let (task, meta) = unsafe { (ptr::read_volatile(&(*ctx).task), (*ctx).meta) };
    if task.is_null() {
        return 0;
    }
    let task: *const u8 = task.cast();
    let runtime: u64 = field(task, offset!(task_sum_exec_runtime));
    let leader = group_leader(task);
    let thread = BaselineThread {
        record: record_of(task, runtime, false),
        process_start_ns: process_start_ns(leader),
        comm: read_kernel(leader, offset!(task_comm)).unwrap_or([0; COMM_LEN]),
    };
    // SAFETY: `meta` is the iterator's; the record is on our stack.
    unsafe {
        let seq = (*meta).seq;
        bpf_seq_write(
            seq.cast(),
            ptr::from_ref(&thread).cast(),
            size_of::<BaselineThread>() as u32,
        );
    }
    0
}

// ---------------------------------------------------------------------------
// Processes, as they start.

/// A new process (not a new thread of one): its start time and name.
#[btf_tracepoint(function = "sched_process_fork")]
pub fn process_fork(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(struct task_struct *parent, struct task_struct *child)
    let child: *const u8 = ctx.arg(1);
    let pid: u32 = field(child, offset!(task_pid));
    let tgid: u32 = field(child, offset!(task_tgid));
    if pid == tgid {
        announce_process(child);
    }
    0
}

/// `execve` renames the process.
#[btf_tracepoint(function = "sched_process_exec")]
pub fn process_exec(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)
    let task: *const u8 = ctx.arg(0);
    announce_process(group_leader(task));
    0
}

#[inline(always)]
fn announce_process(leader: *const u8) {
    let Some(mut entry) = PROCESS_EVENTS.reserve(0) else {
        count_loss(LossCounter::ProcessEventsDropped, 1);
        return;
    };
    let event = ProcessStarted {
        tgid: field(leader, offset!(task_tgid)),
        _pad: 0,
        start_ns: process_start_ns(leader),
        comm: read_kernel(leader, offset!(task_comm)).unwrap_or([0; COMM_LEN]),
    };
    entry.write(event);
    entry.submit(0);
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
