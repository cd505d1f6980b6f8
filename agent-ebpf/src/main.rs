//! powerlens kernel programs.
//!
//! The context-switch path is the cost that matters, so it does the least
//! that keeps the figures exact, and the reader's cost follows the threads
//! that ran, not the threads that exist:
//!
//! * `sched_switch` (tp_btf) reads the outgoing thread's own scheduler run
//!   time (`se.sum_exec_runtime`, what `/proc/<pid>/schedstat` reports) with
//!   one direct load, and adds the slice since its last switch to the
//!   thread's slot in `THREADS`, on the socket of the CPU it ran on. No
//!   clock read, no hash map, no lock shared across CPUs: only the thread's
//!   own CPU writes its slot. On a thread's first switch of a read
//!   generation it also appends the slot's index to its CPU's ran list.
//! * The agent maps `THREADS`, the ran lists and `CPU_LOG` into its memory.
//!   At each read it starts a new generation, asks each busy CPU for the
//!   slice of the thread running there (`read_running`, run on that CPU
//!   through `BPF_PROG_TEST_RUN`), and reads the slots on the previous
//!   generation's lists: threads that slept are not visited at all.
//! * A thread's last switch (`TASK_DEAD`) marks its slot exited and lists
//!   it; the agent reads the final figures and returns the slot through a
//!   free ring, so short-lived processes are never lost.
//! * `baseline_tasks` (a task iterator, once at start) gives every existing
//!   thread a slot with its past run time marked as seen.
//!
//! A thread that finds no free slot is still counted exactly: its slices go
//! to the `EXITED` hash map, keyed by process, until a slot frees up.
//!
//! Kernel floor: 5.12 (task storage for tracing programs arrived in 5.11,
//! atomic compare-and-exchange in 5.12). Nothing else is newer: the task
//! state is read through a BTF offset rather than `sched_switch`'s
//! `prev_state` argument (5.18); mmapable arrays are 5.5, running a raw
//! tracepoint program on a chosen CPU 5.10.
//!
//! Memory ordering. Each figure in a slot only grows and is one aligned
//! 8-byte word, so the agent may read it at any moment. What must be seen
//! in order: a slot's fields before its `state`, and a list entry before
//! the list's length. `state` is always stored with an atomic exchange
//! (fully ordered); the length, on weakly ordered CPUs (`WEAKLY_ORDERED`,
//! arm64), with one too (release). The exchange on a thread's last switch
//! also orders its final figures before the generation is read, so its
//! slot is listed where the agent will look (see `end_thread`).
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
    ptr,
};

use agent_common::{
    COMM_LEN, CgroupCreated, Control, CpuLog, EXITED_MAP_CAPACITY, ExitedKey, ExitedValue,
    KernelOffsets, LossCounter, LossCounts, MAX_CPUS, MAX_SOCKETS, RunningThread, SLOT_EXITED,
    SLOT_LIVE, TASK_DEAD, TaskRuntime, ThreadSlot,
};
use aya_ebpf::{
    bindings::{
        BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, BPF_LOCAL_STORAGE_GET_F_CREATE, BPF_NOEXIST,
        bpf_map_type,
    },
    btf_maps::{Array, HashMap, RingBuf},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_get_smp_processor_id, bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes,
        generated::{bpf_get_current_task_btf, bpf_task_storage_get},
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

/// Entries of each CPU's ran list per generation parity (`RAN_LISTS` holds
/// CPUs × 2 × this).
#[unsafe(no_mangle)]
static RAN_LIST_LEN: u32 = 1;

/// Slots in `THREADS`, and the free ring's size minus one (a power of two).
#[unsafe(no_mangle)]
static THREAD_SLOTS: u32 = 1;
#[unsafe(no_mangle)]
static FREE_RING_MASK: u64 = 0;

// ---------------------------------------------------------------------------
// Maps. Sizes of 1 are placeholders: the agent sets them before loading.

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

const MMAPABLE: usize = BPF_F_MMAPABLE as usize;

/// One slot per thread (see `ThreadSlot`).
#[btf_map]
static THREADS: Array<ThreadSlot, 1, MMAPABLE> = Array::new();

/// Slot indices the agent has freed, as a ring (see `Control`). Array
/// elements are 8 bytes apart whatever their type, hence u64.
#[btf_map]
static FREE_SLOTS: Array<u64, 1, MMAPABLE> = Array::new();

/// Per CPU and generation parity, the slots of threads that switched out.
#[btf_map]
static RAN_LISTS: Array<u64, 1, MMAPABLE> = Array::new();

/// One `CpuLog` per possible CPU.
#[btf_map]
static CPU_LOG: Array<CpuLog, 1, MMAPABLE> = Array::new();

#[btf_map]
static CONTROL: Array<Control, 1, MMAPABLE> = Array::new();

/// One `RunningThread` per possible CPU, written by `read_running`.
#[btf_map]
static RUNNING: Array<RunningThread, 1, MMAPABLE> = Array::new();

#[btf_map]
static EXITED: HashMap<ExitedKey, ExitedValue, { EXITED_MAP_CAPACITY as usize }> = HashMap::new();

#[btf_map]
static LOSS_COUNTERS: Array<LossCounts, 1, MMAPABLE> = Array::new();

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

/// A full memory barrier on weakly ordered CPUs, nothing on x86: a
/// compare-and-exchange (always a fetching, fully ordered atomic in eBPF)
/// that succeeds on `slot`, whose value stays 0. eBPF has no barrier
/// instruction; the kernel treats fetching atomics as fully ordered, and
/// the arm64 JIT emits `casal` (LSE) or an exclusive loop followed by
/// `dmb ish`.
#[inline(always)]
fn fence_if_weakly_ordered(slot: *mut u64) {
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
// Slots.

/// Reads a `T` field of a slot (or of another map value shared with the
/// agent) without letting the compiler cache or merge it.
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

#[inline(always)]
fn control() -> Option<*mut Control> {
    CONTROL.get_ptr_mut(0)
}

/// The generation the agent is collecting now.
#[inline(always)]
fn generation() -> u64 {
    match control() {
        // SAFETY: a live map value.
        Some(control) => load(unsafe { &raw const (*control).generation }),
        None => 0,
    }
}

/// A slot from the agent's free ring, or one never used; `None` when all
/// are taken.
#[inline(always)]
fn take_free_slot() -> Option<u32> {
    let control = control()?;
    // SAFETY: a live map value; the fields are 8-byte aligned.
    let (tail, head, next_unused, fence) = unsafe {
        (
            &raw mut (*control).free_tail,
            &raw const (*control).free_head,
            &raw mut (*control).next_unused_slot,
            &raw mut (*control)._pad1[0],
        )
    };
    // SAFETY: a plain read of our own static.
    let mask = unsafe { ptr::read_volatile(&raw const FREE_RING_MASK) };
    // Bounded retries keep the verifier happy; losing the race to other
    // CPUs four times in a row is left to the next switch.
    for _ in 0..4 {
        let taken = load(tail);
        if taken >= load(head) {
            break;
        }
        // The agent writes the entry before moving the head.
        fence_if_weakly_ordered(fence);
        let index = FREE_SLOTS.get_ptr((taken & mask) as u32).map(load)? as u32;
        if atomic(tail).compare_exchange(taken, taken + 1) {
            return Some(index);
        }
    }
    // SAFETY: a plain read of our own static.
    let capacity = u64::from(unsafe { ptr::read_volatile(&raw const THREAD_SLOTS) });
    for _ in 0..4 {
        let index = load(next_unused);
        if index >= capacity {
            return None;
        }
        if atomic(next_unused).compare_exchange(index, index + 1) {
            return Some(index as u32);
        }
    }
    None
}

/// Gives `task` a slot, with `last_runtime_ns` = `last`, and records it in
/// the thread's `entry`. Returns the slot's index plus one, 0 when none is
/// free.
#[inline(never)]
fn claim_slot(task: *mut c_void, entry: *mut TaskRuntime, last: u64) -> u32 {
    let Some(index) = take_free_slot() else {
        count_loss(LossCounter::ThreadSlotsFull, 1);
        return 0;
    };
    let Some(slot) = THREADS.get_ptr_mut(index) else {
        return 0;
    };
    // SAFETY: the slot is ours: the agent zeroed it before freeing it (or
    // it was never used), and no other thread holds its index.
    unsafe {
        store(&raw mut (*slot).last_runtime_ns, last);
        store(&raw mut (*slot).listed_generation, 0);
        for socket in 0..MAX_SOCKETS {
            store(&raw mut (*slot).cumulative_ns[socket], 0);
        }
        store(&raw mut (*slot).css_set, 0);
    }
    read_identity(task.cast(), slot);
    // SAFETY: as above.
    atomic(unsafe { &raw mut (*slot).state }).exchange_ordered(SLOT_LIVE);
    let slot_plus_one = index + 1;
    // SAFETY: the thread's own storage.
    store(unsafe { &raw mut (*entry).slot_plus_one }, slot_plus_one);
    slot_plus_one
}

/// Writes who `task` is into its slot.
#[inline(never)]
fn read_identity(task: *const u8, slot: *mut ThreadSlot) {
    let leader = group_leader(task);
    let tid: u32 = field(task, offset!(task_pid));
    let tgid: u32 = field(task, offset!(task_tgid));
    // The leader's name: thread names ("tokio-runtime-w") would hide the
    // program.
    let comm = read_kernel(leader, offset!(task_comm)).unwrap_or([0u8; COMM_LEN]);
    let start = process_start_ns(leader);
    let mm: u64 = field(task, offset!(task_mm));
    // SAFETY: a live slot owned by this thread (see ThreadSlot).
    unsafe {
        store(&raw mut (*slot).mm, mm);
        store(&raw mut (*slot).tid, tid);
        store(&raw mut (*slot).tgid, tgid);
        store(&raw mut (*slot).process_start_ns, start);
        store(&raw mut (*slot).comm, comm);
    }
    refresh_cgroup(task, slot);
}

/// Re-reads a thread's name and process after an `execve` (a new `mm`).
#[inline(always)]
fn refresh_after_exec(task: *const u8, slot: *mut ThreadSlot) {
    let mm: u64 = field(task, offset!(task_mm));
    // SAFETY: a live slot owned by this thread.
    if mm != load(unsafe { &raw const (*slot).mm }) {
        read_identity(task, slot);
    }
}

#[inline(always)]
fn refresh_cgroup(task: *const u8, slot: *mut ThreadSlot) {
    let css_set: *const u8 = field(task, offset!(task_cgroups));
    // SAFETY: a live slot owned by this thread.
    unsafe {
        if css_set as u64 != load(&raw const (*slot).css_set) {
            store(&raw mut (*slot).cgroup_id, cgroup_id_of(css_set));
            store(&raw mut (*slot).css_set, css_set as u64);
        }
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

/// Appends slot `index` to this CPU's ran list of `generation`'s parity.
#[inline(always)]
fn list_slot(log: *mut CpuLog, generation: u64, index: u32) {
    // SAFETY: a helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let parity = (generation & 1) as usize;
    // SAFETY: a plain read of our own static.
    let len = unsafe { ptr::read_volatile(&raw const RAN_LIST_LEN) };
    // SAFETY: this CPU's log; parity is 0 or 1.
    let (listed_at, overflowed_at) = unsafe {
        (
            &raw mut (*log).listed[parity],
            &raw mut (*log).overflowed[parity],
        )
    };
    let listed = load(listed_at);
    if listed >= u64::from(len) {
        store(overflowed_at, 1);
        count_loss(LossCounter::RanListOverflow, 1);
        return;
    }
    let at = (cpu * 2 + parity as u32) * len + listed as u32;
    let Some(entry) = RAN_LISTS.get_ptr_mut(at) else {
        store(overflowed_at, 1);
        return;
    };
    store(entry, u64::from(index));
    if weakly_ordered() {
        // Release: the entry is visible before the length that covers it.
        atomic(listed_at).exchange_ordered(listed + 1);
    } else {
        store(listed_at, listed + 1);
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
    let prev: *mut c_void = ctx.arg(1);
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
fn on_switch(prev: *mut c_void, next: u64) {
    // SAFETY: a helper without arguments (inlined by the verifier).
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let Some(log) = CPU_LOG.get_ptr_mut(cpu) else {
        return;
    };
    let runtime: u64 = field(prev.cast(), offset!(task_sum_exec_runtime));
    // SAFETY: this CPU's log, written only here.
    unsafe { store(&raw mut (*log).current_task, next) };
    // The idle task keeps no run time of its own; nothing to charge.
    if runtime == 0 {
        // SAFETY: as above.
        unsafe { store(&raw mut (*log).idle_task, prev as u64) };
        return;
    }
    let Some(entry) = TASK_RUNTIME.get(prev, true) else {
        // Creating the entry failed (only creating can: a lookup of an
        // existing entry succeeds even when the storage is busy). The time
        // is not lost while the thread lives: its run time keeps counting,
        // and the next switch that gets an entry charges from its start.
        count_loss(LossCounter::TaskStorageFull, 1);
        if task_state(prev.cast()) & TASK_DEAD != 0 {
            exit_without_storage(prev, runtime, cpu);
        }
        return;
    };
    // SAFETY: the thread's own storage, written on this path only by the
    // CPU it is switching out of.
    let mut slot_plus_one = load(unsafe { &raw const (*entry).slot_plus_one });
    if slot_plus_one == 0 {
        // SAFETY: as above.
        let last = load(unsafe { &raw const (*entry).unslotted_last_ns });
        slot_plus_one = claim_slot(prev, entry, last);
        if slot_plus_one == 0 {
            charge_without_slot(prev, entry, runtime, cpu, log);
            return;
        }
    }
    let index = slot_plus_one - 1;
    let Some(slot) = THREADS.get_ptr_mut(index) else {
        return;
    };
    // The slice is charged to the cgroup the thread is in now, so a thread
    // moved into a container is counted there from its first switch on.
    // The scheduler has just read `prev->cgroups` to charge the cgroup's
    // own CPU time: the line is in cache.
    refresh_cgroup(prev.cast(), slot);
    // SAFETY: the thread's slot; only this CPU writes it now.
    unsafe {
        let last = load(&raw const (*slot).last_runtime_ns);
        store(&raw mut (*slot).last_runtime_ns, runtime);
        if runtime > last {
            let slice = runtime - last;
            let figure = &raw mut (*slot).cumulative_ns[socket_of(cpu)];
            store(figure, load(figure) + slice);
            store(
                &raw mut (*log).busy_ns,
                load(&raw const (*log).busy_ns) + slice,
            );
        }
    }
    if task_state(prev.cast()) & TASK_DEAD != 0 {
        end_thread(prev, slot, index, log);
        return;
    }
    let generation = generation();
    // SAFETY: as above.
    if load(unsafe { &raw const (*slot).listed_generation }) != generation {
        list_thread(prev, slot, index, log, generation);
    }
}

/// The thread's first switch of this generation: put it on the ran list,
/// and read its name again if it ran `execve`.
#[inline(never)]
fn list_thread(
    task: *mut c_void,
    slot: *mut ThreadSlot,
    index: u32,
    log: *mut CpuLog,
    generation: u64,
) {
    // SAFETY: the thread's slot; only this CPU writes it now.
    store(unsafe { &raw mut (*slot).listed_generation }, generation);
    refresh_after_exec(task.cast(), slot);
    list_slot(log, generation, index);
}

/// The thread's last switch: mark its slot exited and list it.
///
/// The exchange orders the final figures before the generation is read.
/// Reading the generation first, a switch that overlapped the agent's
/// change of generation could add the last slice after the agent had read
/// the slot on the old list; with the exchange first, the agent either
/// finds the slot on the list it reads now, or on the old list's tail at
/// its next read (it reads what was appended after it last looked).
/// Its name is read once more: a process that ran `execve` and ended
/// within one generation was listed under its parent's.
#[inline(never)]
fn end_thread(task: *mut c_void, slot: *mut ThreadSlot, index: u32, log: *mut CpuLog) {
    read_identity(task.cast(), slot);
    // SAFETY: the thread's slot.
    atomic(unsafe { &raw mut (*slot).state }).exchange_ordered(SLOT_EXITED);
    list_slot(log, generation(), index);
}

/// All slots are taken: charge the slice through `EXITED`, keyed by
/// process (a hash update per switch, exact, until a slot frees up).
#[inline(never)]
fn charge_without_slot(
    prev: *mut c_void,
    entry: *mut TaskRuntime,
    runtime: u64,
    cpu: u32,
    log: *mut CpuLog,
) {
    // SAFETY: the thread's own storage.
    let last = unsafe {
        let last = load(&raw const (*entry).unslotted_last_ns);
        store(&raw mut (*entry).unslotted_last_ns, runtime);
        last
    };
    let slice = runtime.saturating_sub(last);
    let mut runtime_ns_by_socket = [0u64; MAX_SOCKETS];
    runtime_ns_by_socket[socket_of(cpu)] = slice;
    // SAFETY: this CPU's log.
    unsafe {
        store(
            &raw mut (*log).busy_ns,
            load(&raw const (*log).busy_ns) + slice,
        )
    };
    let ended = task_state(prev.cast()) & TASK_DEAD != 0;
    if slice > 0 || ended {
        record_exit(prev, &runtime_ns_by_socket, slice, ended);
    }
}

/// A thread ends without ever having had an entry. Born after the agent
/// started, all its run time is new: charge it whole through `EXITED`.
/// Born before, what it ran before the start is not ours and cannot be
/// told apart: count it as lost.
#[inline(never)]
fn exit_without_storage(prev: *mut c_void, runtime: u64, cpu: u32) {
    let started: u64 = field(prev.cast(), offset!(task_start_boottime));
    // SAFETY: a plain read of our own static.
    let agent_start = unsafe { ptr::read_volatile(&raw const AGENT_START_BOOTTIME_NS) };
    if started < agent_start {
        count_loss(LossCounter::TaskStorageFullNs, runtime);
        return;
    }
    let mut runtime_ns_by_socket = [0u64; MAX_SOCKETS];
    runtime_ns_by_socket[socket_of(cpu)] = runtime;
    if let Some(log) = CPU_LOG.get_ptr_mut(cpu) {
        // Its slices were never added at switches: add them here, on the
        // CPU it ends on (the best place known).
        // SAFETY: this CPU's log.
        unsafe {
            store(
                &raw mut (*log).busy_ns,
                load(&raw const (*log).busy_ns) + runtime,
            )
        };
    }
    record_exit(prev, &runtime_ns_by_socket, runtime, true);
}

/// Adds run time of `prev` to its process's `EXITED` entry (creating it),
/// or counts it as lost when the map is full. `ended`: this is the
/// thread's last switch (the agent then checks whether the process is gone).
#[inline(never)]
fn record_exit(
    prev: *mut c_void,
    runtime_ns_by_socket: &[u64; MAX_SOCKETS],
    total: u64,
    ended: bool,
) {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let leader = group_leader(prev.cast());
    let key = ExitedKey {
        tgid,
        _pad: 0,
        process_start_ns: process_start_ns(leader),
    };
    if let Some(existing) = EXITED.get_ptr_mut(key) {
        add_exited(existing, runtime_ns_by_socket, ended);
        return;
    }
    let value = ExitedValue {
        threads_exited: u64::from(ended),
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
        add_exited(existing, runtime_ns_by_socket, ended);
    } else {
        count_loss(LossCounter::ExitedMapFull, 1);
        count_loss(LossCounter::ExitedMapFullNs, total);
    }
}

#[inline(always)]
fn add_exited(existing: *mut ExitedValue, runtime_ns_by_socket: &[u64; MAX_SOCKETS], ended: bool) {
    if ended {
        // SAFETY: existing is a live map value.
        atomic(unsafe { &raw mut (*existing).threads_exited }).fetch_add(1);
    }
    for (socket, amount) in runtime_ns_by_socket.iter().enumerate() {
        if *amount > 0 {
            // SAFETY: existing is a live map value; socket < MAX_SOCKETS.
            let slot = unsafe { &raw mut (*existing).runtime_ns_by_socket[socket] };
            atomic(slot).fetch_add(*amount);
        }
    }
}

// ---------------------------------------------------------------------------
// The running thread of a CPU, read on that CPU.

/// Run by the agent on each busy CPU (`BPF_PROG_TEST_RUN` with
/// `BPF_F_TEST_RUN_ON_CPU`, in an interrupt on that CPU, so the thread's
/// own switch path cannot run meanwhile): the slice of the thread running
/// there since its last switch, which a thread that never switches out
/// would otherwise never report. `sum_exec_runtime` of a running thread is
/// brought up to date at every scheduler tick.
#[raw_tracepoint(tracepoint = "read_running")]
pub fn read_running(_ctx: RawTracePointContext) -> i32 {
    // SAFETY: helpers without arguments.
    let (task, cpu) = unsafe {
        (
            bpf_get_current_task_btf().cast::<c_void>(),
            bpf_get_smp_processor_id(),
        )
    };
    let Some(out) = RUNNING.get_ptr_mut(cpu) else {
        return 0;
    };
    // SAFETY: this CPU's entry, written only here.
    unsafe {
        store(&raw mut (*out).generation, generation());
        store(&raw mut (*out).slot_plus_one, 0);
        store(&raw mut (*out).in_progress_ns, 0);
    }
    let runtime: u64 = field(task.cast(), offset!(task_sum_exec_runtime));
    if runtime == 0 {
        return 0;
    }
    let Some(entry) = TASK_RUNTIME.get(task, true) else {
        count_loss(LossCounter::TaskStorageFull, 1);
        return 0;
    };
    // SAFETY: the thread's storage; its switch path cannot run meanwhile.
    let mut slot_plus_one = load(unsafe { &raw const (*entry).slot_plus_one });
    if slot_plus_one == 0 {
        // A thread that has not switched out since it was born (or since
        // the agent started): everything since `unslotted_last_ns` is new.
        // SAFETY: as above.
        let last = load(unsafe { &raw const (*entry).unslotted_last_ns });
        slot_plus_one = claim_slot(task, entry, last);
        if slot_plus_one == 0 {
            return 0;
        }
    }
    let Some(slot) = THREADS.get_ptr_mut(slot_plus_one - 1) else {
        return 0;
    };
    refresh_after_exec(task.cast(), slot);
    refresh_cgroup(task.cast(), slot);
    // SAFETY: the thread's slot and this CPU's entry.
    unsafe {
        let last = load(&raw const (*slot).last_runtime_ns);
        store(&raw mut (*out).in_progress_ns, runtime.saturating_sub(last));
        store(&raw mut (*out).socket, socket_of(cpu) as u32);
        for (socket, figure) in (*slot).cumulative_ns.iter().enumerate().take(sockets()) {
            store(&raw mut (*out).cumulative_ns[socket], load(figure));
        }
        store(&raw mut (*out).slot_plus_one, slot_plus_one);
    }
    0
}

// ---------------------------------------------------------------------------
// Start: every existing thread gets a slot.

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

/// Runs once before `sched_switch` is attached: gives every existing thread
/// a slot with its run time so far marked as seen, so powerlens charges
/// only what runs after it started (a daemon's hour of history is not one
/// interval's work). Writes nothing.
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
        if load(&raw const (*entry).slot_plus_one) == 0 {
            store(&raw mut (*entry).unslotted_last_ns, runtime);
            claim_slot(task, entry, runtime);
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
