//! Reading the switch logs the kernel programs share with the agent.
//!
//! Each CPU's `sched_switch` appends a `SwitchRecord` to its log: the
//! thread, its absolute run time and its cgroup. The logs are mapped into
//! the agent's memory, so reading them costs one visit per switch and no
//! system call; a thread that slept is not touched. A thread's slice is the
//! growth of its run time since its previous record, whichever CPU wrote
//! that one. Records of one thread are ordered by their run time only, so
//! each drain sorts them, by process, thread and run time: the order the
//! thread and process tables are kept in (`SortedTable`), so one pass reads
//! each table front to back. An older record that comes in a later read (it
//! was written while the logs were being read) adds nothing, and the slice
//! the newer one took for its CPU is handed back to the CPU it ran on.
//!
//! A read (`LogReader::read`):
//! 1. new processes' names (the caller drains `PROCESS_EVENTS`);
//! 2. each CPU's records up to the count read at the start, then the count
//!    is handed back (`CpuLog::consumed`) so the kernel reuses the room;
//! 3. each busy CPU's running thread (`read_running`);
//! 4. records that went to `OVERFLOW` while a log was full (the caller
//!    passes them).
//!
//! Between reads, `drain` does step 2 alone, when a log fills faster than
//! the interval empties it.

use std::{io, sync::atomic::Ordering};

use agent_common::{BaselineThread, Control, CpuLog, MAX_SOCKETS, RunningThread, SwitchRecord};
use rustc_hash::FxHashMap;

pub use super::shared::SharedArray;
use super::shared::u64_at;
pub use super::usage::ProcessName;
use super::usage::{Pending, Processes, UsageCache};
use crate::{
    cpu::{Comm, ProcessKey, ProcessUsage},
    sorted_table::{Cursor, SortedTable},
};

/// The shared arrays, as the kernel programs see them.
pub struct SharedMaps {
    /// CPUs × `log_len` records.
    pub log: SharedArray<SwitchRecord>,
    pub cpu_log: SharedArray<CpuLog>,
    pub control: SharedArray<Control>,
    pub running: SharedArray<RunningThread>,
    /// Records per CPU log (a power of two).
    pub log_len: usize,
}

/// What one read found.
#[derive(Debug, Default)]
pub struct LogReading {
    /// Growth per process and cgroup since the previous read.
    pub usage: Vec<ProcessUsage>,
    /// Processes one of whose threads ended (each once per read).
    pub threads_ended: Vec<ProcessKey>,
    /// Processes of threads seen for the first time.
    pub threads_new: Vec<ProcessKey>,
    /// Run time charged to each CPU since the previous read.
    pub busy_ns_by_cpu: Vec<u64>,
    /// Records read (logs, running threads, overflow).
    pub records: usize,
    /// Processes whose name no event gave (looked up in procfs).
    pub unnamed: usize,
    /// CPUs whose running thread could not be asked for, with the reason.
    pub errors: Vec<String>,
}

/// What the agent keeps per thread: its run time at its newest record,
/// and, for handing a slice back to the CPU it ran on, the one before and
/// the CPU of the newest; and where its figures went in this read.
#[derive(Clone, Copy, Debug, Default)]
struct ThreadTrack {
    last_cpu: u32,
    last_ns: u64,
    previous_ns: u64,
    usage: UsageCache,
}

/// A thread: its task address and start time.
type ThreadId = (u64, u64);

/// A thread as the thread table orders it: by process first, so that a
/// pass meets each process's threads together, and the processes in order.
type ThreadKey = (u32, u64, u64);

fn thread_key(record: &SwitchRecord) -> ThreadKey {
    (record.tgid(), record.task, record.thread_start_ns)
}

/// A pass's places in the reader's tables.
#[derive(Default)]
struct Cursors {
    threads: Cursor,
    processes: Cursor,
}

pub struct LogReader {
    maps: SharedMaps,
    cpus: usize,
    socket_of_cpu: Vec<usize>,
    threads: SortedTable<ThreadKey, ThreadTrack>,
    /// Threads whose last record was read, with the read: an older record
    /// of theirs read later (from another CPU's log) must not bring them
    /// back as new.
    ended: FxHashMap<ThreadId, u64>,
    processes: Processes,
    /// Per CPU, records read so far.
    consumed: Vec<u64>,
    /// Records of one drain, sorted (kept to reuse its memory).
    batch: Vec<(SwitchRecord, u32)>,
    /// What drains between reads gathered for the next read.
    pending: Pending,
    read: u64,
}

/// Reads after which an ended thread's older records can no longer come.
const ENDED_KEPT_READS: u64 = 3;

impl LogReader {
    pub fn new(
        maps: SharedMaps,
        cpus: usize,
        socket_of_cpu: Vec<usize>,
        clock_ticks_per_second: u64,
        resolve: Box<dyn FnMut(u32) -> Option<ProcessName> + Send>,
    ) -> Self {
        Self {
            maps,
            cpus,
            socket_of_cpu,
            threads: SortedTable::default(),
            ended: FxHashMap::default(),
            processes: Processes::new(clock_ticks_per_second, resolve),
            consumed: vec![0; cpus],
            batch: Vec::new(),
            pending: Pending::new(cpus),
            read: 0,
        }
    }

    /// Existing threads at start: their run time so far is not ours.
    pub fn baseline(&mut self, threads: &[BaselineThread]) {
        for thread in threads {
            let record = &thread.record;
            if record.task == 0 {
                continue;
            }
            self.processes.name_if_unnamed(
                record.tgid(),
                ProcessName {
                    start_ns: thread.process_start_ns,
                    comm: Comm(thread.comm),
                },
            );
            let mut cursor = Cursor::default();
            let key = thread_key(record);
            match self.threads.get_mut(&key, &mut cursor) {
                Some(track) => track.last_ns = track.last_ns.max(record.runtime_ns),
                None => {
                    self.threads.insert(
                        key,
                        ThreadTrack {
                            last_cpu: u32::MAX,
                            last_ns: record.runtime_ns,
                            previous_ns: record.runtime_ns,
                            usage: UsageCache::default(),
                        },
                        &mut cursor,
                    );
                }
            }
        }
        self.threads.settle();
        self.processes.settle();
    }

    /// A process started or ran `execve` (or was looked up in procfs).
    pub fn name_process(&mut self, tgid: u32, name: ProcessName) {
        self.processes.name(tgid, name);
    }

    /// Forgets a process that is gone (`start_ns` as in its key).
    pub fn forget_process(&mut self, tgid: u32, start_ns: u64) {
        self.processes.forget(tgid, start_ns);
    }

    /// Keeps only threads of processes `alive` says exist (a thread whose
    /// last record was dropped would be kept forever otherwise).
    pub fn retain_processes(&mut self, alive: impl Fn(u32) -> bool) {
        self.processes.retain(&alive);
        self.threads.retain(|(tgid, _, _), _| alive(*tgid));
    }

    pub fn threads_tracked(&self) -> usize {
        self.threads.len()
    }

    /// Records written but not read yet, per CPU, at most.
    pub fn fullest_log(&self) -> usize {
        (0..self.cpus)
            .map(|cpu| self.written(cpu).saturating_sub(self.consumed[cpu]) as usize)
            .max()
            .unwrap_or(0)
    }

    pub fn log_len(&self) -> usize {
        self.maps.log_len
    }

    fn written(&self, cpu: usize) -> u64 {
        match self.maps.cpu_log.at(cpu) {
            // SAFETY: this CPU's log header.
            Some(log) => u64_at(unsafe { &raw mut (*log).written }).load(Ordering::Acquire),
            None => 0,
        }
    }

    /// Reads every CPU's log as far as it is written, into the next read.
    ///
    /// A thread's records are spread over the logs of the CPUs it ran on;
    /// a record's slice is the growth since the thread's previous record,
    /// and ran on the CPU of the record. So the records are sorted by
    /// thread and run time before they are charged: read log by log, a
    /// thread that went back and forth between two CPUs would have its
    /// slices charged to whichever log came first.
    pub fn drain(&mut self) {
        let written: Vec<u64> = (0..self.cpus).map(|cpu| self.written(cpu)).collect();
        let mut batch = std::mem::take(&mut self.batch);
        batch.clear();
        for (cpu, written) in written.into_iter().enumerate() {
            let from = self.consumed[cpu];
            // The kernel never writes more than a log's length ahead.
            let from = from.max(written.saturating_sub(self.maps.log_len as u64));
            for number in from..written {
                let at = cpu * self.maps.log_len + (number as usize & (self.maps.log_len - 1));
                let Some(entry) = self.maps.log.at(at) else {
                    break;
                };
                // SAFETY: a record the kernel finished before moving
                // `written` past it (acquire above), and will not reuse
                // until we hand the count back below.
                batch.push((unsafe { std::ptr::read_volatile(entry) }, cpu as u32));
            }
            self.consumed[cpu] = written;
            if let Some(log) = self.maps.cpu_log.at(cpu) {
                // SAFETY: this CPU's log header.
                u64_at(unsafe { &raw mut (*log).consumed }).store(written, Ordering::Release);
            }
        }
        batch.sort_unstable_by_key(|(record, _)| (thread_key(record), record.runtime_ns));
        // The records are in the thread table's order, and so in the
        // process table's: one forward pass through each.
        let mut cursors = Cursors::default();
        for (record, cpu) in &batch {
            self.apply(record, *cpu as usize, &mut cursors);
        }
        self.threads.settle();
        self.processes.settle();
        self.batch = batch;
    }

    /// One read. `ask_running(cpu)` runs `read_running` on that CPU;
    /// `overflow` holds what `OVERFLOW` had (record, CPU).
    pub fn read(
        &mut self,
        ask_running: &mut dyn FnMut(u32) -> io::Result<()>,
        overflow: &[(SwitchRecord, u32)],
    ) -> LogReading {
        self.read += 1;
        if let Some(control) = self.maps.control.at(0) {
            // SAFETY: the single control entry.
            u64_at(unsafe { &raw mut (*control).read }).store(self.read, Ordering::SeqCst);
        }
        self.drain();
        let mut errors = Vec::new();
        for cpu in 0..self.cpus {
            let Some(log) = self.maps.cpu_log.at(cpu) else {
                continue;
            };
            // SAFETY: this CPU's log header.
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
                    errors.push(format!("reading the running thread of CPU {cpu}: {error}"));
                }
                continue;
            }
            let Some(running) = self.maps.running.at(cpu) else {
                continue;
            };
            // SAFETY: the CPU's entry, written by the program that just
            // returned.
            let found = unsafe { std::ptr::read_volatile(running) };
            if found.read == self.read && found.record.task != 0 {
                self.apply(&found.record, cpu, &mut Cursors::default());
            }
        }
        for (record, cpu) in overflow {
            let cpu = (*cpu as usize).min(self.cpus.saturating_sub(1));
            self.apply(record, cpu, &mut Cursors::default());
        }
        self.threads.settle();
        self.processes.settle();
        let read = self.read;
        self.ended
            .retain(|_, ended_at| read - *ended_at < ENDED_KEPT_READS);
        let Pending {
            usage,
            mut threads_ended,
            threads_new,
            busy_ns_by_cpu,
            records,
            unnamed,
            ..
        } = self.pending.take();
        threads_ended.sort_unstable();
        threads_ended.dedup();
        LogReading {
            usage,
            threads_ended,
            threads_new,
            busy_ns_by_cpu,
            records,
            unnamed,
            errors,
        }
    }

    /// Charges what `record`, written on `cpu`, adds to its thread.
    /// `cursors` are the pass's through the tables.
    fn apply(&mut self, record: &SwitchRecord, cpu: usize, cursors: &mut Cursors) {
        if record.task == 0 {
            return;
        }
        self.pending.records += 1;
        let key = thread_key(record);
        let tgid = record.tgid();
        let cpu_number = cpu as u32;
        let track = match self.threads.get_mut(&key, &mut cursors.threads) {
            Some(track) => track,
            None => {
                if self.ended.contains_key(&record.thread()) {
                    // An older record of a thread whose last one was read.
                    return;
                }
                // Not in the baseline: born since the programs were
                // attached, so all of its run time is new.
                let process =
                    self.processes
                        .state(tgid, &mut cursors.processes, &mut self.pending.unnamed);
                self.pending.threads_new.push(process.key);
                let track = ThreadTrack {
                    last_cpu: cpu_number,
                    ..ThreadTrack::default()
                };
                self.threads.insert(key, track, &mut cursors.threads)
            }
        };
        let (slice, handed_back) = if record.runtime_ns > track.last_ns {
            let slice = record.runtime_ns - track.last_ns;
            track.previous_ns = track.last_ns;
            track.last_ns = record.runtime_ns;
            track.last_cpu = cpu_number;
            (slice, None)
        } else if record.runtime_ns > track.previous_ns
            && track.last_cpu != cpu_number
            && (track.last_cpu as usize) < self.cpus
        {
            // An older record read after a newer one from another CPU:
            // that one took this record's slice for its own CPU. Hand it
            // back.
            let moved = record.runtime_ns - track.previous_ns;
            track.previous_ns = record.runtime_ns;
            (0, Some((track.last_cpu as usize, moved)))
        } else {
            (0, None)
        };
        let socket = socket_of(&self.socket_of_cpu, cpu);
        let moved_between_sockets = handed_back
            .is_some_and(|(from_cpu, _)| socket_of(&self.socket_of_cpu, from_cpu) != socket);
        if slice > 0 || moved_between_sockets {
            let pending = &mut self.pending;
            let index = pending.entry_index(
                &mut track.usage,
                &mut self.processes,
                &mut cursors.processes,
                tgid,
                record.cgroup_id,
            );
            let figures = &mut pending.usage[index].runtime_ns_by_socket;
            figures[socket] += slice;
            if let Some((from_cpu, moved)) = handed_back
                && moved_between_sockets
            {
                let from_socket = socket_of(&self.socket_of_cpu, from_cpu);
                let taken = figures[from_socket].min(moved);
                figures[from_socket] -= taken;
                figures[socket] += taken;
            }
        }
        let busy = &mut self.pending.busy_ns_by_cpu;
        busy[cpu] += slice;
        if let Some((from_cpu, moved)) = handed_back {
            busy[from_cpu] = busy[from_cpu].saturating_sub(moved);
            busy[cpu] += moved;
        }
        if record.ended() {
            self.threads.remove(&key);
            self.ended.insert(record.thread(), self.read);
            let process =
                self.processes
                    .state(tgid, &mut cursors.processes, &mut self.pending.unnamed);
            self.pending.threads_ended.push(process.key);
        }
    }
}

/// The socket of `cpu` (0 if unknown).
fn socket_of(socket_of_cpu: &[usize], cpu: usize) -> usize {
    socket_of_cpu
        .get(cpu)
        .copied()
        .unwrap_or(0)
        .min(MAX_SOCKETS - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPUS: usize = 2;
    const LOG_LEN: usize = 8;

    /// The kernel's side of the shared arrays, played by hand through a
    /// view of the reader's memory.
    struct Kernel {
        log: SharedArray<SwitchRecord>,
        cpu_log: SharedArray<CpuLog>,
        running: SharedArray<RunningThread>,
        control: SharedArray<Control>,
    }

    impl Kernel {
        /// `sched_switch` on `cpu`: false when the log is full.
        fn switch_out(&self, cpu: usize, record: SwitchRecord) -> bool {
            let header = self.cpu_log.at(cpu).unwrap();
            let consumed = unsafe { (*self.cpu_log.at(cpu).unwrap()).consumed };
            unsafe {
                let written = (*header).written;
                if written - consumed >= LOG_LEN as u64 {
                    return false;
                }
                *self
                    .log
                    .at(cpu * LOG_LEN + (written as usize & (LOG_LEN - 1)))
                    .unwrap() = record;
                (*header).written = written + 1;
                (*header).current_task = 0;
                (*header).idle_task = 0;
            }
            true
        }

        /// A thread keeps running on `cpu`: `read_running` will report it.
        fn running(&self, cpu: usize, record: SwitchRecord) {
            unsafe {
                (*self.cpu_log.at(cpu).unwrap()).current_task = record.task;
                (*self.cpu_log.at(cpu).unwrap()).idle_task = 1;
            }
            let running = self.running.at(cpu).unwrap();
            unsafe { (*running).record = record };
        }

        /// `read_running`, as the reader asks for it.
        fn answer(&self, cpu: u32) {
            let read = unsafe { (*self.control.at(0).unwrap()).read };
            unsafe { (*self.running.at(cpu as usize).unwrap()).read = read };
        }

        fn idle(&self, cpu: usize) {
            unsafe {
                (*self.cpu_log.at(cpu).unwrap()).current_task = 0;
                (*self.cpu_log.at(cpu).unwrap()).idle_task = 0;
            }
        }
    }

    fn reader() -> (LogReader, Kernel) {
        let maps = SharedMaps {
            log: SharedArray::owned(CPUS * LOG_LEN),
            cpu_log: SharedArray::owned(CPUS),
            control: SharedArray::owned(1),
            running: SharedArray::owned(CPUS),
            log_len: LOG_LEN,
        };
        let kernel = Kernel {
            log: maps.log.alias(),
            cpu_log: maps.cpu_log.alias(),
            running: maps.running.alias(),
            control: maps.control.alias(),
        };
        let mut reader = LogReader::new(
            maps,
            CPUS,
            vec![0, 1],
            100,
            Box::new(|tgid| {
                (tgid == 77).then(|| ProcessName {
                    start_ns: 5_000_000_000,
                    comm: Comm::from_str_lossy("late"),
                })
            }),
        );
        reader.name_process(
            10,
            ProcessName {
                start_ns: 1_000_000_000,
                comm: Comm::from_str_lossy("burn"),
            },
        );
        (reader, kernel)
    }

    fn record(task: u64, tgid: u32, runtime_ns: u64, ended: bool) -> SwitchRecord {
        SwitchRecord {
            task,
            thread_start_ns: task * 10,
            runtime_ns,
            cgroup_id: 7,
            tgid_pid: (u64::from(tgid) << 32)
                | task
                | if ended { agent_common::RECORD_ENDED } else { 0 },
        }
    }

    fn read(reader: &mut LogReader, kernel: &Kernel) -> LogReading {
        reader.read(
            &mut |cpu| {
                kernel.answer(cpu);
                Ok(())
            },
            &[],
        )
    }

    fn total(reading: &LogReading) -> u64 {
        reading
            .usage
            .iter()
            .map(|usage| usage.runtime_ns_by_socket.iter().sum::<u64>())
            .sum()
    }

    #[test]
    fn a_new_threads_slices_are_charged_once_each() {
        let (mut reader, kernel) = reader();
        assert!(kernel.switch_out(0, record(1, 10, 300, false)));
        assert!(kernel.switch_out(0, record(1, 10, 500, false)));
        let first = read(&mut reader, &kernel);
        assert_eq!(total(&first), 500, "born after the start: all of it");
        assert_eq!(first.usage.len(), 1, "one entry per process and cgroup");
        assert_eq!(
            first.usage[0].key,
            ProcessKey::at_tick(10, 1_000_000_000, 100)
        );
        assert_eq!(first.usage[0].comm, Comm::from_str_lossy("burn"));
        assert_eq!(first.threads_new.len(), 1);
        assert_eq!(first.busy_ns_by_cpu, vec![500, 0]);
        // Asleep: nothing.
        let asleep = read(&mut reader, &kernel);
        assert_eq!(total(&asleep), 0);
        assert_eq!(asleep.records, 0, "a thread that slept costs nothing");
        assert!(kernel.switch_out(1, record(1, 10, 900, false)));
        let again = read(&mut reader, &kernel);
        assert_eq!(total(&again), 400);
        assert_eq!(again.busy_ns_by_cpu, vec![0, 400]);
        assert_eq!(
            again.usage[0].runtime_ns_by_socket[1], 400,
            "CPU 1 is socket 1"
        );
    }

    #[test]
    fn the_baseline_is_not_charged() {
        let (mut reader, kernel) = reader();
        reader.baseline(&[BaselineThread {
            record: record(2, 10, 1_000, false),
            process_start_ns: 1_000_000_000,
            comm: *b"burn\0\0\0\0\0\0\0\0\0\0\0\0",
        }]);
        // An older record (written between the attach and the baseline).
        assert!(kernel.switch_out(0, record(2, 10, 800, false)));
        assert!(kernel.switch_out(0, record(2, 10, 1_250, false)));
        let reading = read(&mut reader, &kernel);
        assert_eq!(total(&reading), 250);
        assert!(reading.threads_new.is_empty());
    }

    #[test]
    fn an_older_record_read_later_hands_its_slice_back_to_its_cpu() {
        let (mut reader, kernel) = reader();
        assert!(kernel.switch_out(0, record(3, 10, 100, false)));
        read(&mut reader, &kernel);
        // Ran 50 on CPU 0 (to 150), then 70 on CPU 1 (to 220): in order.
        assert!(kernel.switch_out(0, record(3, 10, 150, false)));
        assert!(kernel.switch_out(1, record(3, 10, 220, false)));
        let reading = read(&mut reader, &kernel);
        assert_eq!(total(&reading), 120);
        assert_eq!(reading.busy_ns_by_cpu, vec![50, 70]);
        // Out of order: the newer record from CPU 1's log, the older one
        // (CPU 0's) read after it, as overflow records are.
        assert!(kernel.switch_out(1, record(3, 10, 400, false)));
        let reading = reader.read(
            &mut |cpu| {
                kernel.answer(cpu);
                Ok(())
            },
            &[(record(3, 10, 300, false), 0)],
        );
        assert_eq!(total(&reading), 180, "the thread's growth, once");
        assert_eq!(
            reading.busy_ns_by_cpu,
            vec![80, 100],
            "80 ran on CPU 0 (220 to 300), 100 on CPU 1"
        );
        assert_eq!(reading.usage[0].runtime_ns_by_socket, {
            let mut figures = [0; MAX_SOCKETS];
            figures[0] = 80;
            figures[1] = 100;
            figures
        });
    }

    #[test]
    fn a_thread_that_went_back_and_forth_is_charged_to_each_cpu_it_ran_on() {
        let (mut reader, kernel) = reader();
        assert!(kernel.switch_out(0, record(3, 10, 100, false)));
        read(&mut reader, &kernel);
        // CPU 0: +10, CPU 1: +20, CPU 0: +30, CPU 1: +40, CPU 0: +50.
        for (cpu, runtime) in [(0, 110), (1, 130), (0, 160), (1, 200), (0, 250)] {
            assert!(kernel.switch_out(cpu, record(3, 10, runtime, false)));
        }
        let reading = read(&mut reader, &kernel);
        assert_eq!(reading.busy_ns_by_cpu, vec![90, 60]);
        assert_eq!(reading.usage[0].runtime_ns_by_socket[..2], [90, 60]);
    }

    #[test]
    fn a_threads_last_record_ends_it_and_older_ones_add_nothing() {
        let (mut reader, kernel) = reader();
        assert!(kernel.switch_out(0, record(4, 10, 100, false)));
        read(&mut reader, &kernel);
        assert!(kernel.switch_out(1, record(4, 10, 300, true)));
        let ended = read(&mut reader, &kernel);
        assert_eq!(total(&ended), 200);
        assert_eq!(
            ended.threads_ended,
            vec![ProcessKey::at_tick(10, 1_000_000_000, 100)]
        );
        assert_eq!(reader.threads_tracked(), 0);
        // An older record of it, read late (another CPU's log): not a new
        // thread.
        let late = reader.read(&mut |_| Ok(()), &[(record(4, 10, 250, false), 0)]);
        assert_eq!(total(&late), 0);
        assert!(late.threads_new.is_empty());
        // A new thread at the same address: a later start names it apart.
        let mut reused = record(4, 10, 40, false);
        reused.thread_start_ns += 1;
        assert!(kernel.switch_out(0, reused));
        let reading = read(&mut reader, &kernel);
        assert_eq!(total(&reading), 40);
    }

    #[test]
    fn a_running_thread_is_counted_and_its_switch_adds_only_the_rest() {
        let (mut reader, kernel) = reader();
        kernel.running(1, record(5, 10, 600, false));
        let running = read(&mut reader, &kernel);
        assert_eq!(total(&running), 600);
        assert_eq!(running.busy_ns_by_cpu, vec![0, 600]);
        kernel.running(1, record(5, 10, 1_600, false));
        assert_eq!(total(&read(&mut reader, &kernel)), 1_000);
        kernel.idle(1);
        assert!(kernel.switch_out(1, record(5, 10, 1_700, false)));
        kernel.idle(1);
        assert_eq!(total(&read(&mut reader, &kernel)), 100);
        // A stale answer (from an earlier read) is not taken.
        kernel.running(1, record(5, 10, 9_999, false));
        let stale = reader.read(&mut |_| Ok(()), &[]);
        assert_eq!(total(&stale), 0);
    }

    #[test]
    fn a_full_log_is_emptied_by_a_drain_and_handed_back() {
        let (mut reader, kernel) = reader();
        for step in 1..=LOG_LEN as u64 {
            assert!(kernel.switch_out(0, record(6, 10, step * 10, false)));
        }
        assert!(!kernel.switch_out(0, record(6, 10, 1_000, false)), "full");
        assert_eq!(reader.fullest_log(), LOG_LEN);
        reader.drain();
        assert_eq!(reader.fullest_log(), 0);
        assert!(
            kernel.switch_out(0, record(6, 10, 1_100, false)),
            "room again"
        );
        let reading = read(&mut reader, &kernel);
        assert_eq!(total(&reading), 1_100, "drained records count at the read");
        assert_eq!(reading.records, LOG_LEN + 1);
    }

    #[test]
    fn a_process_no_event_named_is_looked_up_once() {
        let (mut reader, kernel) = reader();
        assert!(kernel.switch_out(0, record(7, 77, 10, false)));
        assert!(kernel.switch_out(1, record(8, 77, 20, false)));
        assert!(kernel.switch_out(0, record(9, 88, 30, false)));
        let reading = read(&mut reader, &kernel);
        assert_eq!(reading.unnamed, 2, "77 once, and 88 (gone) once");
        let late = reading
            .usage
            .iter()
            .find(|usage| usage.key.pid == 77)
            .unwrap();
        assert_eq!(late.key, ProcessKey::at_tick(77, 5_000_000_000, 100));
        assert_eq!(late.runtime_ns_by_socket.iter().sum::<u64>(), 30);
        let gone = reading
            .usage
            .iter()
            .find(|usage| usage.key.pid == 88)
            .unwrap();
        assert_eq!(gone.comm, Comm::from_str_lossy("?"));
    }
}
