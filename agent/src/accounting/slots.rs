//! Workloads live in stable slots, so a process refers to its workload by
//! index; slots of forgotten workloads are reused. Like the process table,
//! they are `Slots`: a snapshot rebuilds only the views of shards that
//! changed, and all changes go through `get_mut`, which marks.

use std::{sync::Arc, time::SystemTime};

use rustc_hash::FxHashMap;

use super::{Accounting, Energy, WorkloadEntry, shards::Slots};
use crate::cgroup::Workload;

#[derive(Debug, Default)]
pub struct WorkloadTable {
    slots: Slots<WorkloadEntry>,
    index: FxHashMap<Arc<str>, usize>,
}

impl WorkloadTable {
    /// Workloads kept.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Slots in use or free (a process's `workload` is below this).
    pub fn slot_count(&self) -> usize {
        self.slots.count()
    }

    pub fn get(&self, slot: usize) -> Option<&WorkloadEntry> {
        self.slots.get(slot)
    }

    /// The workload in `slot`, to change (its shard is marked changed).
    pub fn get_mut(&mut self, slot: usize) -> Option<&mut WorkloadEntry> {
        self.slots.get_mut(slot)
    }

    pub fn slot_of(&self, key: &str) -> Option<usize> {
        self.index.get(key).copied()
    }

    pub fn by_key(&self, key: &str) -> Option<&WorkloadEntry> {
        self.get(self.slot_of(key)?)
    }

    pub fn iter(&self) -> impl Iterator<Item = &WorkloadEntry> {
        self.slots.iter()
    }

    /// Puts `entry` in a free slot (or a new one), and returns the slot.
    fn insert(&mut self, entry: WorkloadEntry) -> usize {
        let key = Arc::clone(&entry.key);
        let slot = self.slots.insert(entry);
        self.index.insert(key, slot);
        slot
    }

    /// Frees the slot of a forgotten workload for reuse.
    pub fn free(&mut self, slot: usize) {
        if let Some(entry) = self.slots.take(slot) {
            self.index.remove(&entry.key);
        }
    }

    /// The shards, and whether each changed since the views were last
    /// built (see `Slots`).
    pub fn shards(&self) -> impl Iterator<Item = (&[Option<WorkloadEntry>], bool)> {
        self.slots.shards()
    }

    /// The views were built (see `Slots::views_built`).
    pub fn views_built(&mut self) {
        self.slots.views_built();
    }
}

impl Accounting {
    /// The slot of the workload with `key`, created if new.
    pub(super) fn workload_slot(
        &mut self,
        key: Arc<str>,
        workload: Arc<Workload>,
        now: SystemTime,
    ) -> usize {
        if let Some(slot) = self.workloads.slot_of(&key) {
            return slot;
        }
        self.workloads
            .insert(WorkloadEntry::new(key, workload, now))
    }
}

impl WorkloadEntry {
    /// A workload first seen `now`, with nothing charged yet.
    fn new(key: Arc<str>, workload: Arc<Workload>, now: SystemTime) -> Self {
        Self {
            key,
            workload,
            cgroup_path: None,
            cgroup_ids: Vec::new(),
            cpu_ns_by_socket: [0; agent_common::MAX_SOCKETS],
            interval_ns: 0,
            interval_seq: 0,
            energy: Energy::default(),
            first_seen: now,
            last_seen: now,
            exited_at: None,
            live_processes: 0,
            last_existence_check: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_are_found_by_key_and_their_slots_reused() {
        let mut table = WorkloadTable::default();
        let entry = |key: &str| {
            WorkloadEntry::new(
                Arc::from(key),
                Arc::new(Workload::Host),
                SystemTime::UNIX_EPOCH,
            )
        };
        for n in 0..40 {
            assert_eq!(table.insert(entry(&format!("w{n}"))), n);
        }
        assert_eq!(table.by_key("w20").map(|w| &*w.key), Some("w20"));
        table.free(33);
        assert!(table.slot_of("w33").is_none());
        assert_eq!(table.len(), 39);
        assert_eq!(table.insert(entry("new")), 33);
        assert_eq!(table.slot_of("new"), Some(33));
        assert_eq!(table.iter().count(), 40);
    }
}
