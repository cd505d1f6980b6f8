//! The process table: entries in stable slots (`Slots`) (so an interval that found a
//! process once refers to it by slot, not by a second lookup), found by key
//! through one sorted index (an interval's processes come from the reader
//! in key order, so they meet the index in one forward pass: see
//! `SortedTable`), and grouped in shards of consecutive slots
//! that remember whether they changed, so a snapshot rebuilds only the
//! views of shards that did: with 1% of 10,000 processes running in an
//! interval, a few thousand views instead of all.

use super::{ProcessEntry, shards::Slots};
use crate::{
    cpu::ProcessKey,
    sorted_table::{Cursor, SortedTable},
};

#[derive(Debug, Default)]
pub struct ProcessTable {
    slots: Slots<(ProcessKey, ProcessEntry)>,
    index: SortedTable<ProcessKey, usize>,
}

impl ProcessTable {
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The slot of `key`'s process, if it has one.
    pub fn slot_of(&self, key: &ProcessKey) -> Option<usize> {
        self.index.get(key, &mut Cursor::default()).copied()
    }

    pub fn get(&self, key: &ProcessKey) -> Option<&ProcessEntry> {
        self.at(self.slot_of(key)?)
    }

    pub fn contains_key(&self, key: &ProcessKey) -> bool {
        self.slot_of(key).is_some()
    }

    /// The process in `slot`.
    pub fn at(&self, slot: usize) -> Option<&ProcessEntry> {
        self.slots.get(slot).map(|(_, entry)| entry)
    }

    /// The process in `slot`, to change (its shard is marked changed).
    pub fn at_mut(&mut self, slot: usize) -> Option<&mut ProcessEntry> {
        self.slots.get_mut(slot).map(|(_, entry)| entry)
    }

    /// The entry of `key` to change (its shard is marked changed).
    pub fn get_mut(&mut self, key: &ProcessKey) -> Option<&mut ProcessEntry> {
        self.at_mut(self.slot_of(key)?)
    }

    /// The slot of `key`'s process, made by `make` if there is none (its
    /// shard is marked changed either way: the caller is about to change
    /// it through `at_mut`). `cursor` is the pass's (see `SortedTable`);
    /// call `settle` after the pass.
    pub fn slot_or_insert_with(
        &mut self,
        key: ProcessKey,
        cursor: &mut Cursor,
        make: impl FnOnce() -> ProcessEntry,
    ) -> usize {
        if let Some(slot) = self.index.get(&key, cursor).copied() {
            self.slots.mark(slot);
            return slot;
        }
        let slot = self.slots.insert((key, make()));
        self.index.insert(key, slot, cursor);
        slot
    }

    /// Forgets `key`'s process (call `settle` after a batch of these).
    pub fn remove(&mut self, key: &ProcessKey) -> Option<ProcessEntry> {
        let slot = self.slot_of(key)?;
        self.index.remove(key);
        self.slots.take(slot).map(|(_, entry)| entry)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&ProcessKey, &ProcessEntry)> {
        self.slots.iter().map(|(key, entry)| (key, entry))
    }

    pub fn keys(&self) -> impl Iterator<Item = &ProcessKey> {
        self.iter().map(|(key, _)| key)
    }

    pub fn values(&self) -> impl Iterator<Item = &ProcessEntry> {
        self.iter().map(|(_, entry)| entry)
    }

    /// The shards, and whether each changed since the views were last
    /// built (see `Slots`).
    pub fn shards(&self) -> impl Iterator<Item = (&[Option<(ProcessKey, ProcessEntry)>], bool)> {
        self.slots.shards()
    }

    /// After a pass of lookups, inserts or removals (see `SortedTable`).
    pub fn settle(&mut self) {
        self.index.settle();
    }

    /// The views were built (see `Slots::views_built`).
    pub fn views_built(&mut self) {
        self.slots.views_built();
    }
}

impl std::ops::Index<&ProcessKey> for ProcessTable {
    type Output = ProcessEntry;

    fn index(&self, key: &ProcessKey) -> &ProcessEntry {
        self.get(key).expect("no process with this key")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounting::shards::SHARD_SLOTS;

    fn entry() -> ProcessEntry {
        ProcessEntry {
            comm: crate::cpu::Comm::from_str_lossy("t"),
            cgroup_id: 1,
            workload: 0,
            cpu_ns_by_socket: [0; agent_common::MAX_SOCKETS],
            interval_ns: 0,
            interval_seq: 0,
            energy: Default::default(),
            first_seen: std::time::SystemTime::UNIX_EPOCH,
            last_seen: std::time::SystemTime::UNIX_EPOCH,
            exited_at: None,
        }
    }

    fn changed(table: &ProcessTable) -> usize {
        table.shards().filter(|(_, changed)| *changed).count()
    }

    #[test]
    fn a_change_marks_its_shard_for_this_interval_and_the_next() {
        let mut table = ProcessTable::default();
        let key = ProcessKey {
            pid: 7,
            start_ns: 0,
        };
        table.slot_or_insert_with(key, &mut Cursor::default(), entry);
        table.settle();
        assert_eq!(table.len(), 1);
        assert_eq!(changed(&table), 1);
        table.views_built();
        assert_eq!(changed(&table), 1, "its interval figures go to zero next");
        table.views_built();
        assert_eq!(changed(&table), 0);
        assert!(table.get(&key).is_some(), "a read marks nothing");
        assert_eq!(changed(&table), 0);
        table.get_mut(&key).unwrap().interval_ns = 5;
        assert_eq!(changed(&table), 1);
        assert!(table.remove(&key).is_some());
        assert!(table.is_empty());
        assert!(table.get_mut(&key).is_none());
    }

    #[test]
    fn freed_slots_are_reused_and_shards_follow_the_slots() {
        let mut table = ProcessTable::default();
        let key = |pid| ProcessKey { pid, start_ns: 0 };
        for pid in 0..100 {
            let slot = table.slot_or_insert_with(key(pid), &mut Cursor::default(), entry);
            assert_eq!(slot, pid as usize);
        }
        assert_eq!(table.shards().count(), 100_usize.div_ceil(SHARD_SLOTS));
        table.views_built();
        table.views_built();
        assert_eq!(changed(&table), 0);
        let removed = table.remove(&key(37)).unwrap();
        assert_eq!(removed.cgroup_id, 1);
        assert_eq!(changed(&table), 1, "the shard that lost a process");
        assert!(table.at(37).is_none());
        assert_eq!(table.len(), 99);
        // The next process takes the freed slot, and is found by key.
        table.settle();
        assert_eq!(
            table.slot_or_insert_with(key(1_000), &mut Cursor::default(), entry),
            37
        );
        assert_eq!(table.slot_of(&key(1_000)), Some(37));
        let again = table.slot_or_insert_with(key(1_000), &mut Cursor::default(), entry);
        assert_eq!(again, 37, "found, not made");
        assert_eq!(table.len(), 100);
        assert_eq!(table.iter().count(), 100);
        table.views_built();
        table.views_built();
        table.at_mut(99).unwrap().interval_ns = 1;
        let changed_shards: Vec<usize> = table
            .shards()
            .enumerate()
            .filter(|(_, (_, changed))| *changed)
            .map(|(index, _)| index)
            .collect();
        assert_eq!(changed_shards, vec![99 / SHARD_SLOTS]);
    }
}
