//! Workloads live in stable slots, so a process refers to its workload by
//! index; slots of forgotten workloads are reused. Like the process table,
//! the slots are grouped in shards that remember whether they changed, so
//! a snapshot rebuilds only the views of workloads that did: all changes go
//! through `get_mut`, which marks.

use std::{sync::Arc, time::SystemTime};

use rustc_hash::FxHashMap;

use super::{Accounting, Energy, WorkloadEntry, table::SHARD_SLOTS};
use crate::cgroup::Workload;

#[derive(Debug, Default)]
pub struct WorkloadTable {
    /// Freed slots are `None` until reused.
    slots: Vec<Option<WorkloadEntry>>,
    index: FxHashMap<Arc<str>, usize>,
    free: Vec<usize>,
    /// A workload of the shard changed in this interval: its views must be
    /// rebuilt now, and again next interval (when its figures "in the last
    /// interval" go back to zero).
    changed_now: Vec<bool>,
    changed_next: Vec<bool>,
}

impl WorkloadTable {
    fn mark(&mut self, slot: usize) {
        let shard = slot / SHARD_SLOTS;
        self.changed_now[shard] = true;
        self.changed_next[shard] = true;
    }

    /// Workloads kept.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Slots in use or free (a process's `workload` is below this).
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    pub fn get(&self, slot: usize) -> Option<&WorkloadEntry> {
        self.slots.get(slot)?.as_ref()
    }

    /// The workload in `slot`, to change (its shard is marked changed).
    pub fn get_mut(&mut self, slot: usize) -> Option<&mut WorkloadEntry> {
        self.slots.get(slot)?.as_ref()?;
        self.mark(slot);
        self.slots[slot].as_mut()
    }

    pub fn slot_of(&self, key: &str) -> Option<usize> {
        self.index.get(key).copied()
    }

    pub fn by_key(&self, key: &str) -> Option<&WorkloadEntry> {
        self.get(self.slot_of(key)?)
    }

    pub fn iter(&self) -> impl Iterator<Item = &WorkloadEntry> {
        self.slots.iter().flatten()
    }

    /// Puts `entry` in a free slot (or a new one), and returns the slot.
    fn insert(&mut self, entry: WorkloadEntry) -> usize {
        let key = Arc::clone(&entry.key);
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(None);
                if self.slots.len() > self.changed_now.len() * SHARD_SLOTS {
                    self.changed_now.push(false);
                    self.changed_next.push(false);
                }
                self.slots.len() - 1
            }
        };
        self.slots[slot] = Some(entry);
        self.index.insert(key, slot);
        self.mark(slot);
        slot
    }

    /// Frees the slot of a forgotten workload for reuse.
    pub fn free(&mut self, slot: usize) {
        if let Some(entry) = self.slots.get_mut(slot).and_then(Option::take) {
            self.index.remove(&entry.key);
            self.free.push(slot);
            self.mark(slot);
        }
    }

    /// The shards (each up to `SHARD_SLOTS` slots), and whether each
    /// changed since the views were last built.
    pub fn shards(&self) -> impl Iterator<Item = (&[Option<WorkloadEntry>], bool)> {
        self.slots
            .chunks(SHARD_SLOTS)
            .zip(self.changed_now.iter().copied())
    }

    /// The views were built (see `ProcessTable::views_built`).
    pub fn views_built(&mut self) {
        std::mem::swap(&mut self.changed_now, &mut self.changed_next);
        self.changed_next.fill(false);
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
        self.workloads.insert(WorkloadEntry {
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
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str) -> WorkloadEntry {
        WorkloadEntry {
            key: Arc::from(key),
            workload: Arc::new(Workload::Host),
            cgroup_path: None,
            cgroup_ids: Vec::new(),
            cpu_ns_by_socket: [0; agent_common::MAX_SOCKETS],
            interval_ns: 0,
            interval_seq: 0,
            energy: Energy::default(),
            first_seen: SystemTime::UNIX_EPOCH,
            last_seen: SystemTime::UNIX_EPOCH,
            exited_at: None,
            live_processes: 0,
            last_existence_check: None,
        }
    }

    fn changed(table: &WorkloadTable) -> Vec<usize> {
        table
            .shards()
            .enumerate()
            .filter(|(_, (_, changed))| *changed)
            .map(|(index, _)| index)
            .collect()
    }

    #[test]
    fn changes_mark_their_shard_and_freed_slots_are_reused() {
        let mut table = WorkloadTable::default();
        for n in 0..40 {
            assert_eq!(table.insert(entry(&format!("w{n}"))), n);
        }
        assert_eq!(changed(&table), vec![0, 1, 2]);
        table.views_built();
        table.views_built();
        assert!(changed(&table).is_empty());
        assert_eq!(table.by_key("w20").map(|w| &*w.key), Some("w20"));
        assert!(table.get(20).is_some(), "reading marks nothing");
        assert!(changed(&table).is_empty());
        table.get_mut(20).unwrap().live_processes = 3;
        assert_eq!(changed(&table), vec![1]);
        table.views_built();
        assert_eq!(
            changed(&table),
            vec![1],
            "its interval figures go to zero next"
        );
        table.views_built();
        table.free(33);
        assert_eq!(changed(&table), vec![2]);
        assert!(table.slot_of("w33").is_none());
        assert_eq!(table.insert(entry("new")), 33);
        assert_eq!(table.iter().count(), 40);
    }
}
