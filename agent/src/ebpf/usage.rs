//! What a read gathers from the records it charges: each process's growth
//! per cgroup, and the names of the processes the records belong to.
//!
//! A record costs the reader one hash lookup (its thread); the process's
//! figures for the read are found through the thread (the entry it added
//! to last, kept in its track) or, for a thread's first record of a read,
//! through its process (one more lookup). A process whose threads run in
//! several cgroups in one read has one entry per cgroup, chained.

use agent_common::MAX_SOCKETS;

use crate::{
    cpu::{Comm, ProcessKey, ProcessUsage},
    sorted_table::{Cursor, SortedTable},
};

/// A process's name and start, from `PROCESS_EVENTS`, the baseline, or
/// procfs.
#[derive(Clone, Copy, Debug)]
pub struct ProcessName {
    pub start_ns: u64,
    pub comm: Comm,
}

/// What the reader keeps per process.
#[derive(Clone, Copy, Debug)]
pub(super) struct ProcessState {
    pub key: ProcessKey,
    pub comm: Comm,
    /// The read (`Pending::generation`) and index of the process's newest
    /// entry in `Pending::usage`.
    usage_generation: u32,
    usage_index: u32,
}

/// Where a thread's figures went in a read, kept in its track.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct UsageCache {
    generation: u32,
    index: u32,
}

/// No entry: the end of a chain.
const NONE: u32 = u32::MAX;

/// The processes the reader has seen, by tgid.
pub(super) struct Processes {
    /// Sorted: a pass meets the processes in order (see `SortedTable`).
    states: SortedTable<u32, ProcessState>,
    /// Names a process no event named (procfs, in the agent).
    resolve: Box<dyn FnMut(u32) -> Option<ProcessName> + Send>,
    clock_ticks_per_second: u64,
}

impl Processes {
    pub fn new(
        clock_ticks_per_second: u64,
        resolve: Box<dyn FnMut(u32) -> Option<ProcessName> + Send>,
    ) -> Self {
        Self {
            states: SortedTable::default(),
            resolve,
            clock_ticks_per_second,
        }
    }

    fn state_of(&self, tgid: u32, name: ProcessName) -> ProcessState {
        ProcessState {
            key: ProcessKey::at_tick(tgid, name.start_ns, self.clock_ticks_per_second),
            comm: name.comm,
            usage_generation: 0,
            usage_index: NONE,
        }
    }

    /// Names `tgid` (a new name replaces the old: a reused PID).
    pub fn name(&mut self, tgid: u32, name: ProcessName) {
        let state = self.state_of(tgid, name);
        self.states.insert(tgid, state, &mut Cursor::default());
    }

    /// Names `tgid` unless it has a name.
    pub fn name_if_unnamed(&mut self, tgid: u32, name: ProcessName) {
        if self.states.get(&tgid, &mut Cursor::default()).is_none() {
            self.name(tgid, name);
        }
    }

    /// Forgets `tgid` if it is still the process that started at
    /// `start_ns` (rounded to a clock tick, as its key is).
    pub fn forget(&mut self, tgid: u32, start_ns: u64) {
        if self
            .states
            .get(&tgid, &mut Cursor::default())
            .is_some_and(|state| state.key.start_ns == start_ns)
        {
            self.states.remove(&tgid);
        }
    }

    pub fn retain(&mut self, alive: impl Fn(u32) -> bool) {
        self.states.retain(|tgid, _| alive(*tgid));
    }

    /// After a pass (see `SortedTable::settle`).
    pub fn settle(&mut self) {
        self.states.settle();
    }

    /// The process `tgid`, looked up once (counted in `unnamed`) if no
    /// event named it. `cursor` is the pass's.
    pub fn state(
        &mut self,
        tgid: u32,
        cursor: &mut Cursor,
        unnamed: &mut usize,
    ) -> &mut ProcessState {
        if self.states.get(&tgid, cursor).is_none() {
            *unnamed += 1;
            let name = (self.resolve)(tgid).unwrap_or(ProcessName {
                start_ns: 0,
                comm: Comm::from_str_lossy("?"),
            });
            let state = self.state_of(tgid, name);
            return self.states.insert(tgid, state, cursor);
        }
        self.states.get_mut(&tgid, cursor).expect("found above")
    }
}

/// What the records read since the last read add up to, for the next one.
#[derive(Default)]
pub(super) struct Pending {
    /// Numbers the reads (wrapping; caches are checked against the entry
    /// they point at, so a stale one is never trusted).
    pub generation: u32,
    pub usage: Vec<ProcessUsage>,
    /// Per entry of `usage`, the process's previous entry in this read
    /// (another cgroup), or `NONE`.
    previous_of_process: Vec<u32>,
    pub threads_ended: Vec<ProcessKey>,
    pub threads_new: Vec<ProcessKey>,
    pub busy_ns_by_cpu: Vec<u64>,
    pub records: usize,
    pub unnamed: usize,
}

impl Pending {
    pub fn new(cpus: usize) -> Self {
        Self {
            generation: 1,
            busy_ns_by_cpu: vec![0; cpus],
            ..Self::default()
        }
    }

    /// The index in `usage` of the figures of `tgid` in `cgroup_id`,
    /// created when first charged. `cache` is the thread's.
    pub fn entry_index(
        &mut self,
        cache: &mut UsageCache,
        processes: &mut Processes,
        cursor: &mut Cursor,
        tgid: u32,
        cgroup_id: u64,
    ) -> usize {
        let generation = self.generation;
        // A thread's process never changes: its pid and the cgroup tell
        // whether the entry it charged last is the one.
        if cache.generation == generation
            && self
                .usage
                .get(cache.index as usize)
                .is_some_and(|usage| usage.key.pid == tgid && usage.cgroup_id == cgroup_id)
        {
            return cache.index as usize;
        }
        let process = processes.state(tgid, cursor, &mut self.unnamed);
        let newest = if process.usage_generation == generation {
            process.usage_index
        } else {
            NONE
        };
        let mut at = newest;
        while let Some(usage) = self.usage.get(at as usize) {
            if usage.key == process.key && usage.cgroup_id == cgroup_id {
                break;
            }
            at = self.previous_of_process[at as usize];
        }
        if at == NONE {
            at = self.usage.len() as u32;
            self.usage.push(ProcessUsage {
                key: process.key,
                comm: process.comm,
                cgroup_id,
                runtime_ns_by_socket: [0; MAX_SOCKETS],
            });
            self.previous_of_process.push(newest);
            process.usage_generation = generation;
            process.usage_index = at;
        }
        *cache = UsageCache {
            generation,
            index: at,
        };
        at as usize
    }

    /// Hands over what was gathered, and starts the next read.
    pub fn take(&mut self) -> Pending {
        let mut next = Pending::new(self.busy_ns_by_cpu.len());
        next.generation = self.generation.wrapping_add(1);
        // The chain links keep their memory from read to read.
        next.previous_of_process = std::mem::take(&mut self.previous_of_process);
        next.previous_of_process.clear();
        std::mem::replace(self, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn processes() -> Processes {
        let mut processes = Processes::new(100, Box::new(|_| None));
        for tgid in [1, 2] {
            processes.name(
                tgid,
                ProcessName {
                    start_ns: 1_000_000_000,
                    comm: Comm::from_str_lossy("p"),
                },
            );
        }
        processes
    }

    #[test]
    fn one_entry_per_process_and_cgroup_whichever_thread_charges_it() {
        let mut processes = processes();
        let mut pending = Pending::new(1);
        let (mut a, mut b, mut c) = Default::default();
        let first = pending.entry_index(&mut a, &mut processes, &mut Cursor::default(), 1, 10);
        assert_eq!(
            pending.entry_index(&mut a, &mut processes, &mut Cursor::default(), 1, 10),
            first
        );
        assert_eq!(
            pending.entry_index(&mut b, &mut processes, &mut Cursor::default(), 1, 10),
            first,
            "another thread"
        );
        let moved = pending.entry_index(&mut b, &mut processes, &mut Cursor::default(), 1, 20);
        assert_ne!(moved, first, "another cgroup");
        assert_eq!(
            pending.entry_index(&mut c, &mut processes, &mut Cursor::default(), 1, 10),
            first,
            "down the chain"
        );
        assert_eq!(
            pending.entry_index(&mut c, &mut processes, &mut Cursor::default(), 1, 20),
            moved
        );
        let other = pending.entry_index(&mut c, &mut processes, &mut Cursor::default(), 2, 20);
        assert_eq!(pending.usage.len(), 3);
        assert_eq!(pending.usage[other].key.pid, 2);
        assert_eq!(pending.unnamed, 0);

        // The next read starts empty; old caches are not trusted.
        let taken = pending.take();
        assert_eq!(taken.usage.len(), 3);
        assert!(pending.usage.is_empty());
        let again = pending.entry_index(&mut a, &mut processes, &mut Cursor::default(), 1, 10);
        assert_eq!(again, 0);
        assert_eq!(
            pending.entry_index(&mut c, &mut processes, &mut Cursor::default(), 2, 20),
            1
        );
        assert_eq!(pending.usage.len(), 2);
    }

    #[test]
    fn a_reused_pid_gets_its_own_entry() {
        let mut processes = processes();
        let mut pending = Pending::new(1);
        let (mut old_thread, mut new_thread) = Default::default();
        let old = pending.entry_index(
            &mut old_thread,
            &mut processes,
            &mut Cursor::default(),
            1,
            10,
        );
        processes.name(
            1,
            ProcessName {
                start_ns: 9_000_000_000,
                comm: Comm::from_str_lossy("new"),
            },
        );
        let new = pending.entry_index(
            &mut new_thread,
            &mut processes,
            &mut Cursor::default(),
            1,
            10,
        );
        assert_ne!(old, new);
        assert_eq!(pending.usage[new].comm, Comm::from_str_lossy("new"));
    }
}
