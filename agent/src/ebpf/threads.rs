//! Reading the thread slots the kernel programs share with the agent.
//!
//! The kernel keeps one `ThreadSlot` per thread in `THREADS` and, on a
//! thread's first switch of a read generation, appends its slot to its CPU's
//! ran list. All of it is mapped into the agent's memory, so a read costs
//! one visit per thread that ran (no system call per thread) plus one
//! `read_running` call per busy CPU; threads that slept are not touched.
//!
//! A read (generation G → G+1):
//! 1. the tails of the G−1 lists appended after the last read looked (a
//!    switch that overlapped that read), then those lists are emptied for
//!    reuse;
//! 2. the generation moves to G+1: switches from now on list into the
//!    other parity;
//! 3. each busy CPU reports the slice of the thread running there;
//! 4. the G lists are read.
//!
//! The agent keeps, per slot, what it already reported; a slot's figures
//! only grow, so each visit reports the growth. Exited slots are zeroed and
//! returned through the free ring.

use std::{
    io,
    os::fd::BorrowedFd,
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
};

use agent_common::{
    Control, CpuLog, MAX_SOCKETS, RunningThread, SLOT_EXITED, SLOT_FREE, SLOT_LIVE, ThreadSlot,
};

use crate::cpu::{Comm, ProcessKey, ProcessUsage};

/// An array of `T` shared with the kernel: a BPF array map created with
/// `BPF_F_MMAPABLE` and mapped here, or (in tests) memory of our own.
///
/// The map is mapped in chunks as they are first used: the kernel puts
/// every page of a mapping in place at once, so mapping all 19 MiB of
/// `THREADS` would count them all in the agent's resident size although it
/// reads only the slots in use (which the kernel keeps at the front).
pub struct SharedArray<T> {
    base: NonNull<T>,
    len: usize,
    /// The map's file descriptor (a duplicate of aya's), for chunks mapped
    /// later; none for memory of our own.
    map: Option<std::os::fd::OwnedFd>,
    /// Bytes reserved at `base` (unmapped when dropped; 0 if not ours).
    reserved_bytes: usize,
    /// Whether each chunk of `CHUNK_BYTES` is mapped yet.
    mapped: Vec<std::cell::Cell<bool>>,
    /// Our own memory (tests), kept alive here.
    _owned: Option<Box<[T]>>,
}

/// Bytes mapped at a time: 16 pages.
const CHUNK_BYTES: usize = 64 * 1024;

// SAFETY: the memory is shared with the kernel, which synchronises with
// atomics; the agent uses an array from one thread at a time.
unsafe impl<T: Send> Send for SharedArray<T> {}

impl<T: Copy + Default> SharedArray<T> {
    /// Reserves room for `len` elements of the array map behind `fd`; the
    /// map's pages are mapped into it as they are used.
    pub fn map(fd: BorrowedFd<'_>, len: usize) -> io::Result<Self> {
        assert!(
            size_of::<T>().is_multiple_of(8),
            "array elements are 8-byte aligned"
        );
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        assert!(CHUNK_BYTES.is_multiple_of(page), "chunks are whole pages");
        let bytes = (len * size_of::<T>()).div_ceil(page).max(1) * page;
        // SAFETY: a fresh reservation of address space, inaccessible until
        // chunks of the map are mapped over it.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let array = Self {
            base: NonNull::new(address.cast()).expect("mmap returned null"),
            len,
            map: Some(fd.try_clone_to_owned()?),
            reserved_bytes: bytes,
            mapped: (0..bytes.div_ceil(CHUNK_BYTES))
                .map(|_| std::cell::Cell::new(false))
                .collect(),
            _owned: None,
        };
        // The first chunk now, so that a map the kernel refuses to map fails
        // here, with its name, rather than at the first read.
        array.map_chunk(0)?;
        Ok(array)
    }

    /// `len` zeroed elements of our own memory, standing in for the kernel's.
    pub fn owned(len: usize) -> Self {
        let mut owned = vec![T::default(); len].into_boxed_slice();
        Self {
            base: NonNull::new(owned.as_mut_ptr()).expect("boxed slice"),
            len,
            map: None,
            reserved_bytes: 0,
            mapped: Vec::new(),
            _owned: Some(owned),
        }
    }

    /// A second view of the same memory, which frees nothing (tests play
    /// the kernel through it). It must not outlive `self`.
    #[cfg(test)]
    fn alias(&self) -> Self {
        Self {
            base: self.base,
            len: self.len,
            map: None,
            reserved_bytes: 0,
            mapped: Vec::new(),
            _owned: None,
        }
    }
}

impl<T> SharedArray<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The element at `index`, if in bounds (and its pages could be
    /// mapped).
    pub fn at(&self, index: usize) -> Option<*mut T> {
        if index >= self.len {
            return None;
        }
        if self.map.is_some() {
            let first = index * size_of::<T>() / CHUNK_BYTES;
            let last = ((index + 1) * size_of::<T>() - 1) / CHUNK_BYTES;
            for chunk in first..=last {
                if !self.mapped[chunk].get()
                    && let Err(error) = self.map_chunk(chunk)
                {
                    tracing::warn!("mapping a chunk of a shared array: {error}");
                    return None;
                }
            }
        }
        // SAFETY: in bounds of the reservation, and mapped.
        Some(unsafe { self.base.as_ptr().add(index) })
    }

    /// Maps chunk `chunk` of the map over its place in the reservation.
    fn map_chunk(&self, chunk: usize) -> io::Result<()> {
        let Some(map) = &self.map else {
            return Ok(());
        };
        let offset = chunk * CHUNK_BYTES;
        let bytes = CHUNK_BYTES.min(self.reserved_bytes - offset);
        // SAFETY: replaces part of our own reservation (MAP_FIXED) with the
        // same range of the map's memory.
        let address = unsafe {
            libc::mmap(
                self.base.as_ptr().cast::<u8>().add(offset).cast(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                std::os::fd::AsRawFd::as_raw_fd(map),
                offset as libc::off_t,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        self.mapped[chunk].set(true);
        Ok(())
    }
}

impl<T> Drop for SharedArray<T> {
    fn drop(&mut self) {
        if self.reserved_bytes > 0 {
            // SAFETY: the reservation made in `map` (and the chunks mapped
            // over it), not used after this.
            unsafe { libc::munmap(self.base.as_ptr().cast(), self.reserved_bytes) };
        }
    }
}

fn u64_at(place: *mut u64) -> &'static AtomicU64 {
    // SAFETY: an aligned u64 in shared memory that outlives the reference's
    // use (callers use it at once).
    unsafe { AtomicU64::from_ptr(place) }
}

fn u32_at(place: *mut u32) -> &'static AtomicU32 {
    // SAFETY: as for u64_at.
    unsafe { AtomicU32::from_ptr(place) }
}

/// The shared arrays, as the kernel programs see them.
pub struct SharedMaps {
    pub threads: SharedArray<ThreadSlot>,
    pub free_ring: SharedArray<u64>,
    pub ran_lists: SharedArray<u64>,
    pub cpu_log: SharedArray<CpuLog>,
    pub control: SharedArray<Control>,
    pub running: SharedArray<RunningThread>,
    /// Entries of one CPU's list of one parity.
    pub ran_list_len: usize,
}

/// What one read of the slots found.
#[derive(Debug, Default)]
pub struct SlotsReading {
    /// Growth of each thread that ran (one entry per thread visited with
    /// anything new).
    pub usage: Vec<ProcessUsage>,
    /// Processes one of whose threads ended (each once per read).
    pub threads_ended: Vec<ProcessKey>,
    /// Processes of threads reported for the first time (new slots).
    pub threads_new: Vec<ProcessKey>,
    /// Run time of the slice in progress on each CPU.
    pub in_progress_by_cpu: Vec<u64>,
    /// Busy time each CPU's switches charged so far (the kernel's counter).
    pub busy_ns_by_cpu: Vec<u64>,
    /// Slots visited (ran lists, running threads, or the scan).
    pub visited: usize,
    /// A ran list had filled up: every slot was read.
    pub scanned: bool,
    /// CPUs whose running thread could not be asked for, with the reason.
    pub errors: Vec<String>,
}

pub struct SlotReader {
    maps: SharedMaps,
    cpus: usize,
    sockets: usize,
    clock_ticks_per_second: u64,
    /// What was reported per slot and socket (`sockets` per slot).
    reported: Vec<u64>,
    /// Per CPU, entries of the previous generation's list already read.
    consumed: Vec<u64>,
    generation: u64,
}

impl SlotReader {
    pub fn new(maps: SharedMaps, cpus: usize, sockets: usize, clock_ticks_per_second: u64) -> Self {
        let sockets = sockets.clamp(1, MAX_SOCKETS);
        let slots = maps.threads.len();
        // Generations start at 1: a slot is claimed with generation 0 in
        // `listed_generation`, so its first switch always lists it.
        let generation = 1;
        if let Some(control) = maps.control.at(0) {
            // SAFETY: the single control entry.
            u64_at(unsafe { &raw mut (*control).generation }).store(generation, Ordering::SeqCst);
        }
        Self {
            maps,
            cpus,
            sockets,
            clock_ticks_per_second,
            // Zeroed allocation: pages are touched only for slots in use.
            reported: vec![0; slots * sockets],
            consumed: vec![0; cpus],
            generation,
        }
    }

    fn log(&self, cpu: usize) -> Option<*mut CpuLog> {
        self.maps.cpu_log.at(cpu)
    }

    /// One read. `ask_running(cpu)` runs `read_running` on that CPU.
    pub fn read(&mut self, ask_running: &mut dyn FnMut(u32) -> io::Result<()>) -> SlotsReading {
        let mut out = SlotsReading {
            in_progress_by_cpu: vec![0; self.cpus],
            busy_ns_by_cpu: vec![0; self.cpus],
            ..SlotsReading::default()
        };
        let mut scan = false;
        let current = self.generation;
        let previous_parity = ((current + 1) & 1) as usize;
        let current_parity = (current & 1) as usize;

        // 1. Tails of the previous generation's lists; then empty them.
        for cpu in 0..self.cpus {
            let Some(log) = self.log(cpu) else { continue };
            // SAFETY: this CPU's log entry.
            let (listed, overflowed) = unsafe {
                (
                    u64_at(&raw mut (*log).listed[previous_parity]),
                    u32_at(&raw mut (*log).overflowed[previous_parity]),
                )
            };
            let end = listed.load(Ordering::Acquire);
            self.visit_list(cpu, previous_parity, self.consumed[cpu], end, &mut out);
            scan |= overflowed.load(Ordering::Relaxed) != 0;
            listed.store(0, Ordering::Relaxed);
            overflowed.store(0, Ordering::Relaxed);
        }

        // 2. A new generation.
        let next = current + 1;
        if let Some(control) = self.maps.control.at(0) {
            // SAFETY: the single control entry.
            u64_at(unsafe { &raw mut (*control).generation }).store(next, Ordering::SeqCst);
        }
        self.generation = next;

        // 3. The threads running now, before anything is freed below (a
        //    running thread's slot is its own until it ends).
        for cpu in 0..self.cpus {
            let Some(log) = self.log(cpu) else { continue };
            // SAFETY: this CPU's log entry.
            let (current_task, idle_task) = unsafe {
                (
                    u64_at(&raw mut (*log).current_task).load(Ordering::Relaxed),
                    u64_at(&raw mut (*log).idle_task).load(Ordering::Relaxed),
                )
            };
            if current_task == idle_task {
                continue;
            }
            if let Err(error) = ask_running(cpu as u32) {
                // Offline CPUs refuse; their threads report at the next
                // switch anyway.
                if error.raw_os_error() != Some(libc::ENXIO) {
                    out.errors
                        .push(format!("reading the running thread of CPU {cpu}: {error}"));
                }
                continue;
            }
            self.apply_running(cpu, next, &mut out);
        }

        // 4. The lists of the generation that just ended.
        for cpu in 0..self.cpus {
            let Some(log) = self.log(cpu) else { continue };
            // SAFETY: this CPU's log entry.
            let (listed, overflowed, busy) = unsafe {
                (
                    u64_at(&raw mut (*log).listed[current_parity]),
                    u32_at(&raw mut (*log).overflowed[current_parity]),
                    u64_at(&raw mut (*log).busy_ns),
                )
            };
            let end = listed.load(Ordering::Acquire);
            self.visit_list(cpu, current_parity, 0, end, &mut out);
            self.consumed[cpu] = end.min(self.maps.ran_list_len as u64);
            // Cleared here, so a list that overflows only once is scanned
            // for once; a switch that overflows it late sets it again and
            // is found at the next read (step 1).
            scan |= overflowed.swap(0, Ordering::Relaxed) != 0;
            out.busy_ns_by_cpu[cpu] = busy.load(Ordering::Relaxed);
        }

        if scan {
            out.scanned = true;
            for index in 0..self.slots_in_use() {
                self.visit(index, &mut out);
            }
        }
        out.threads_ended.sort_unstable();
        out.threads_ended.dedup();
        out
    }

    /// Slots the kernel has handed out at least once.
    fn slots_in_use(&self) -> usize {
        let Some(control) = self.maps.control.at(0) else {
            return 0;
        };
        // SAFETY: the single control entry.
        let next = u64_at(unsafe { &raw mut (*control).next_unused_slot }).load(Ordering::Acquire);
        (next as usize).min(self.maps.threads.len())
    }

    fn visit_list(
        &mut self,
        cpu: usize,
        parity: usize,
        from: u64,
        to: u64,
        out: &mut SlotsReading,
    ) {
        let len = self.maps.ran_list_len;
        let base = (cpu * 2 + parity) * len;
        for position in from as usize..(to as usize).min(len) {
            let Some(entry) = self.maps.ran_lists.at(base + position) else {
                break;
            };
            let index = u64_at(entry).load(Ordering::Relaxed) as usize;
            self.visit(index, out);
        }
    }

    /// Reports a slot's growth; frees it if its thread ended.
    fn visit(&mut self, index: usize, out: &mut SlotsReading) {
        let Some(slot) = self.maps.threads.at(index) else {
            return;
        };
        // SAFETY: a slot of the mapping.
        let state = u64_at(unsafe { &raw mut (*slot).state }).load(Ordering::Acquire);
        if state == SLOT_FREE {
            return;
        }
        out.visited += 1;
        let mut now = [0u64; MAX_SOCKETS];
        for (socket, figure) in now.iter_mut().enumerate().take(self.sockets) {
            // SAFETY: as above.
            *figure =
                u64_at(unsafe { &raw mut (*slot).cumulative_ns[socket] }).load(Ordering::Relaxed);
        }
        self.report(index, slot, &now, out);
        if state == SLOT_EXITED {
            out.threads_ended.push(self.process_of(slot));
            self.free(index, slot);
        }
    }

    /// Applies what `read_running` found on `cpu`.
    fn apply_running(&mut self, cpu: usize, generation: u64, out: &mut SlotsReading) {
        let Some(running) = self.maps.running.at(cpu) else {
            return;
        };
        // SAFETY: the CPU's entry, written by the program that just returned.
        let found = unsafe { std::ptr::read_volatile(running) };
        if found.generation != generation || found.slot_plus_one == 0 {
            return;
        }
        out.in_progress_by_cpu[cpu] = found.in_progress_ns;
        let index = found.slot_plus_one as usize - 1;
        let Some(slot) = self.maps.threads.at(index) else {
            return;
        };
        // SAFETY: a slot of the mapping.
        let state = u64_at(unsafe { &raw mut (*slot).state }).load(Ordering::Acquire);
        if state == SLOT_FREE {
            return;
        }
        out.visited += 1;
        let mut totals = found.cumulative_ns;
        let socket = (found.socket as usize).min(MAX_SOCKETS - 1);
        totals[socket] += found.in_progress_ns;
        self.report(index, slot, &totals, out);
    }

    /// Reports what `totals` hold beyond what was reported for the slot.
    fn report(
        &mut self,
        index: usize,
        slot: *mut ThreadSlot,
        totals: &[u64; MAX_SOCKETS],
        out: &mut SlotsReading,
    ) {
        let reported = &mut self.reported[index * self.sockets..(index + 1) * self.sockets];
        let first = reported.iter().all(|figure| *figure == 0);
        let mut delta = [0u64; MAX_SOCKETS];
        let mut grew = false;
        for ((delta, reported), total) in delta.iter_mut().zip(reported.iter_mut()).zip(totals) {
            if *total > *reported {
                *delta = *total - *reported;
                *reported = *total;
                grew = true;
            }
        }
        if !grew {
            return;
        }
        // SAFETY: a slot of the mapping; identity fields are written before
        // the slot is listed, and again only by the thread's own CPU.
        let (comm, cgroup_id) = unsafe {
            (
                std::ptr::read_volatile(&raw const (*slot).comm),
                u64_at(&raw mut (*slot).cgroup_id).load(Ordering::Relaxed),
            )
        };
        let key = self.process_of(slot);
        if first {
            out.threads_new.push(key);
        }
        out.usage.push(ProcessUsage {
            key,
            comm: Comm(comm),
            cgroup_id,
            runtime_ns_by_socket: delta,
        });
    }

    fn process_of(&self, slot: *mut ThreadSlot) -> ProcessKey {
        // SAFETY: a slot of the mapping.
        let (tgid, start) = unsafe {
            (
                u32_at(&raw mut (*slot).tgid).load(Ordering::Relaxed),
                u64_at(&raw mut (*slot).process_start_ns).load(Ordering::Relaxed),
            )
        };
        ProcessKey::at_tick(tgid, start, self.clock_ticks_per_second)
    }

    /// Zeroes an exited thread's slot and hands it back to the kernel. Its
    /// thread made its last switch, so nothing writes the slot until the
    /// kernel takes it from the ring.
    fn free(&mut self, index: usize, slot: *mut ThreadSlot) {
        // SAFETY: a slot of the mapping, unused by the kernel now.
        unsafe {
            for socket in 0..MAX_SOCKETS {
                u64_at(&raw mut (*slot).cumulative_ns[socket]).store(0, Ordering::Relaxed);
            }
            u64_at(&raw mut (*slot).state).store(SLOT_FREE, Ordering::Release);
        }
        self.reported[index * self.sockets..(index + 1) * self.sockets].fill(0);
        let Some(control) = self.maps.control.at(0) else {
            return;
        };
        // SAFETY: the single control entry; only the agent moves the head.
        let head = u64_at(unsafe { &raw mut (*control).free_head });
        let at = head.load(Ordering::Relaxed);
        let mask = self.maps.free_ring.len() as u64 - 1;
        if let Some(entry) = self.maps.free_ring.at((at & mask) as usize) {
            u64_at(entry).store(index as u64, Ordering::Relaxed);
            head.store(at + 1, Ordering::Release);
        }
    }

    /// Slots live or exited and not yet read (for tests and diagnostics).
    pub fn slots_taken(&self) -> usize {
        (0..self.slots_in_use())
            .filter(|index| {
                self.maps.threads.at(*index).is_some_and(|slot| {
                    // SAFETY: a slot of the mapping.
                    let state = u64_at(unsafe { &raw mut (*slot).state }).load(Ordering::Relaxed);
                    state == SLOT_LIVE || state == SLOT_EXITED
                })
            })
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPUS: usize = 2;
    const LIST_LEN: usize = 4;

    /// What the kernel programs do to the shared arrays, done by hand,
    /// through a view of the reader's memory.
    struct Kernel {
        maps: SharedMaps,
    }

    impl Kernel {
        fn maps(&self) -> &SharedMaps {
            &self.maps
        }

        fn generation(&self) -> u64 {
            let control = self.maps().control.at(0).unwrap();
            u64_at(unsafe { &raw mut (*control).generation }).load(Ordering::SeqCst)
        }

        /// `claim_slot`: slot `index` for thread `tid` of process `tgid`.
        fn claim(&self, index: usize, tgid: u32, tid: u32) {
            let slot = self.maps().threads.at(index).unwrap();
            unsafe {
                (*slot).tid = tid;
                (*slot).tgid = tgid;
                (*slot).process_start_ns = 0;
                (*slot).cgroup_id = 7;
                (*slot).comm = *b"burn\0\0\0\0\0\0\0\0\0\0\0\0";
                (*slot).state = SLOT_LIVE;
            }
            let control = self.maps().control.at(0).unwrap();
            let next = unsafe { &mut (*control).next_unused_slot };
            *next = (*next).max(index as u64 + 1);
        }

        /// `on_switch`: `slice` ns of slot `index` on `cpu`, ending it if
        /// `dead`.
        fn switch_out(&self, cpu: usize, index: usize, slice: u64, dead: bool) {
            let slot = self.maps().threads.at(index).unwrap();
            let log = self.maps().cpu_log.at(cpu).unwrap();
            unsafe {
                (*slot).cumulative_ns[0] += slice;
                (*log).busy_ns += slice;
                if dead {
                    (*slot).state = SLOT_EXITED;
                    self.list(cpu, self.generation(), index);
                } else if (*slot).listed_generation != self.generation() {
                    (*slot).listed_generation = self.generation();
                    self.list(cpu, self.generation(), index);
                }
            }
        }

        /// `list_slot`, for a given generation (a late switch lists into an
        /// older one).
        fn list(&self, cpu: usize, generation: u64, index: usize) {
            let parity = (generation & 1) as usize;
            let log = self.maps().cpu_log.at(cpu).unwrap();
            unsafe {
                let listed = (*log).listed[parity] as usize;
                if listed >= LIST_LEN {
                    (*log).overflowed[parity] = 1;
                    return;
                }
                let entry = self
                    .maps()
                    .ran_lists
                    .at((cpu * 2 + parity) * LIST_LEN + listed)
                    .unwrap();
                *entry = index as u64;
                (*log).listed[parity] += 1;
            }
        }

        /// `read_running` on `cpu` while slot `index` runs there with
        /// `in_progress` ns since its last switch.
        fn running(&self, cpu: usize, index: usize, in_progress: u64) {
            let slot = self.maps().threads.at(index).unwrap();
            let out = self.maps().running.at(cpu).unwrap();
            unsafe {
                *out = RunningThread {
                    generation: self.generation(),
                    slot_plus_one: index as u32 + 1,
                    socket: 0,
                    in_progress_ns: in_progress,
                    cumulative_ns: (*slot).cumulative_ns,
                };
            }
        }

        fn busy(&self, cpu: usize) {
            let log = self.maps().cpu_log.at(cpu).unwrap();
            unsafe { (*log).current_task = (*log).idle_task + 1 };
        }

        fn idle(&self, cpu: usize) {
            let log = self.maps().cpu_log.at(cpu).unwrap();
            unsafe { (*log).current_task = (*log).idle_task };
        }
    }

    fn reader(slots: usize) -> (SlotReader, Kernel) {
        let maps = SharedMaps {
            threads: SharedArray::owned(slots),
            free_ring: SharedArray::owned(slots.next_power_of_two()),
            ran_lists: SharedArray::owned(CPUS * 2 * LIST_LEN),
            cpu_log: SharedArray::owned(CPUS),
            control: SharedArray::owned(1),
            running: SharedArray::owned(CPUS),
            ran_list_len: LIST_LEN,
        };
        let kernel = Kernel {
            maps: SharedMaps {
                threads: maps.threads.alias(),
                free_ring: maps.free_ring.alias(),
                ran_lists: maps.ran_lists.alias(),
                cpu_log: maps.cpu_log.alias(),
                control: maps.control.alias(),
                running: maps.running.alias(),
                ran_list_len: LIST_LEN,
            },
        };
        (SlotReader::new(maps, CPUS, 1, 100), kernel)
    }

    fn no_running(_cpu: u32) -> io::Result<()> {
        Ok(())
    }

    fn ns_of(reading: &SlotsReading, pid: u32) -> u64 {
        reading
            .usage
            .iter()
            .filter(|u| u.key.pid == pid)
            .map(|u| u.runtime_ns_by_socket.iter().sum::<u64>())
            .sum()
    }

    #[test]
    fn a_thread_that_slept_is_not_visited_and_its_one_slice_counts_once() {
        let (mut reader, kernel) = reader(8);
        kernel.claim(0, 100, 100);
        kernel.switch_out(0, 0, 5_000, false);
        let first = reader.read(&mut no_running);
        assert_eq!(ns_of(&first, 100), 5_000);
        // Many reads asleep: nothing visited, nothing reported.
        for _ in 0..20 {
            let quiet = reader.read(&mut no_running);
            assert_eq!(quiet.visited, 0);
            assert!(quiet.usage.is_empty());
        }
        // It runs once: exactly that slice.
        kernel.switch_out(1, 0, 700, false);
        let woke = reader.read(&mut no_running);
        assert_eq!(ns_of(&woke, 100), 700);
        assert_eq!(woke.visited, 1);
        assert_eq!(woke.busy_ns_by_cpu, vec![5_000, 700]);
    }

    #[test]
    fn a_thread_that_never_switches_out_is_counted_in_every_interval() {
        let (mut reader, kernel) = reader(8);
        kernel.claim(3, 300, 300);
        kernel.busy(1);
        let mut in_progress = 0;
        for interval in 1..=5u64 {
            in_progress += 1_000;
            let reading = reader.read(&mut |cpu| {
                if cpu == 1 {
                    kernel.running(1, 3, in_progress);
                }
                Ok(())
            });
            assert_eq!(ns_of(&reading, 300), 1_000, "interval {interval}");
            assert_eq!(reading.in_progress_by_cpu[1], in_progress);
        }
        // It switches out at last, 5,400 ns after its last switch: only the
        // 400 not reported while it ran are new.
        kernel.idle(1);
        kernel.switch_out(1, 3, 5_400, false);
        let after = reader.read(&mut no_running);
        assert_eq!(ns_of(&after, 300), 400);
    }

    #[test]
    fn an_ended_thread_reports_its_last_slice_and_its_slot_is_freed() {
        let (mut reader, kernel) = reader(8);
        kernel.claim(2, 200, 201);
        kernel.switch_out(0, 2, 1_000, false);
        let _ = reader.read(&mut no_running);
        kernel.switch_out(0, 2, 300, true);
        let reading = reader.read(&mut no_running);
        assert_eq!(ns_of(&reading, 200), 300);
        assert_eq!(
            reading.threads_ended,
            vec![ProcessKey {
                pid: 200,
                start_ns: 0
            }]
        );
        let slot = reader.maps.threads.at(2).unwrap();
        assert_eq!(unsafe { (*slot).state }, SLOT_FREE);
        assert_eq!(unsafe { (*slot).cumulative_ns[0] }, 0);
        let control = reader.maps.control.at(0).unwrap();
        assert_eq!(unsafe { (*control).free_head }, 1);
        assert_eq!(unsafe { *reader.maps.free_ring.at(0).unwrap() }, 2);
        assert_eq!(reader.slots_taken(), 0);
        // The kernel hands the slot to a new thread: it starts from zero.
        kernel.claim(2, 900, 900);
        kernel.switch_out(1, 2, 50, false);
        assert_eq!(ns_of(&reader.read(&mut no_running), 900), 50);
    }

    #[test]
    fn a_switch_that_lists_into_the_old_generation_is_read_at_the_next_read() {
        let (mut reader, kernel) = reader(8);
        kernel.claim(0, 100, 100);
        kernel.claim(1, 101, 101);
        kernel.switch_out(0, 0, 10, false);
        let old_generation = kernel.generation();
        let first = reader.read(&mut no_running);
        assert_eq!(ns_of(&first, 100), 10);
        // A switch that read the generation before the agent changed it
        // lists into the old list after the agent read it.
        unsafe { (*reader.maps.threads.at(1).unwrap()).cumulative_ns[0] += 20 };
        kernel.list(0, old_generation, 1);
        let second = reader.read(&mut no_running);
        assert_eq!(ns_of(&second, 101), 20);
    }

    #[test]
    fn a_full_ran_list_makes_the_agent_read_every_slot() {
        let (mut reader, kernel) = reader(16);
        for index in 0..(LIST_LEN + 3) {
            kernel.claim(index, 1_000 + index as u32, 1_000 + index as u32);
            kernel.switch_out(0, index, 100, false);
        }
        let reading = reader.read(&mut no_running);
        assert!(reading.scanned);
        let total: u64 = (0..(LIST_LEN + 3))
            .map(|index| ns_of(&reading, 1_000 + index as u32))
            .sum();
        assert_eq!(
            total,
            100 * (LIST_LEN as u64 + 3),
            "every slot counted once"
        );
        let next = reader.read(&mut no_running);
        assert!(!next.scanned, "the overflow is cleared once read");
        assert!(next.usage.is_empty());
    }

    #[test]
    fn an_offline_cpu_is_skipped_and_another_failure_is_reported() {
        let (mut reader, kernel) = reader(4);
        kernel.claim(0, 5, 5);
        for cpu in 0..CPUS {
            let log = reader.maps.cpu_log.at(cpu).unwrap();
            unsafe { (*log).current_task = 1 };
        }
        let reading = reader.read(&mut |cpu| {
            Err(if cpu == 0 {
                io::Error::from_raw_os_error(libc::ENXIO)
            } else {
                io::Error::from_raw_os_error(libc::EPERM)
            })
        });
        assert_eq!(reading.errors.len(), 1, "{:?}", reading.errors);
        assert!(reading.errors[0].contains("CPU 1"));
    }
}
