//! The process table, in shards that remember whether they changed, so a
//! snapshot rebuilds only the views of shards that did: with 1% of 10,000
//! processes running in an interval, a few hundred views instead of all.

use std::hash::BuildHasher as _;

use rustc_hash::{FxBuildHasher, FxHashMap};

use super::ProcessEntry;
use crate::cpu::ProcessKey;

/// Shards of the table: enough that the processes of one interval touch a
/// small part of them, few enough that an empty table costs nothing.
pub const PROCESS_SHARDS: usize = 1024;

#[derive(Debug)]
pub struct ProcessTable {
    shards: Vec<FxHashMap<ProcessKey, ProcessEntry>>,
    /// A process of the shard changed in this interval: its views must be
    /// rebuilt now, and again next interval (when its figures "in the last
    /// interval" go back to zero).
    changed_now: Vec<bool>,
    changed_next: Vec<bool>,
    len: usize,
}

impl Default for ProcessTable {
    fn default() -> Self {
        Self {
            shards: (0..PROCESS_SHARDS).map(|_| FxHashMap::default()).collect(),
            changed_now: vec![false; PROCESS_SHARDS],
            changed_next: vec![false; PROCESS_SHARDS],
            len: 0,
        }
    }
}

impl ProcessTable {
    fn shard_of(key: &ProcessKey) -> usize {
        // The high bits: Fx mixes into them.
        (FxBuildHasher.hash_one(key) >> 40) as usize % PROCESS_SHARDS
    }

    fn mark(&mut self, shard: usize) {
        self.changed_now[shard] = true;
        self.changed_next[shard] = true;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, key: &ProcessKey) -> Option<&ProcessEntry> {
        self.shards[Self::shard_of(key)].get(key)
    }

    pub fn contains_key(&self, key: &ProcessKey) -> bool {
        self.get(key).is_some()
    }

    /// The entry of `key` to change (its shard is marked changed).
    pub fn get_mut(&mut self, key: &ProcessKey) -> Option<&mut ProcessEntry> {
        let shard = Self::shard_of(key);
        if !self.shards[shard].contains_key(key) {
            return None;
        }
        self.mark(shard);
        self.shards[shard].get_mut(key)
    }

    /// The entry of `key` to change, made by `make` if there is none.
    pub fn get_or_insert_with(
        &mut self,
        key: ProcessKey,
        make: impl FnOnce() -> ProcessEntry,
    ) -> &mut ProcessEntry {
        let shard = Self::shard_of(&key);
        self.mark(shard);
        let map = &mut self.shards[shard];
        if !map.contains_key(&key) {
            self.len += 1;
        }
        map.entry(key).or_insert_with(make)
    }

    pub fn remove(&mut self, key: &ProcessKey) -> Option<ProcessEntry> {
        let shard = Self::shard_of(key);
        let removed = self.shards[shard].remove(key);
        if removed.is_some() {
            self.mark(shard);
            self.len -= 1;
        }
        removed
    }

    pub fn iter(&self) -> impl Iterator<Item = (&ProcessKey, &ProcessEntry)> {
        self.shards.iter().flatten()
    }

    pub fn keys(&self) -> impl Iterator<Item = &ProcessKey> {
        self.iter().map(|(key, _)| key)
    }

    pub fn values(&self) -> impl Iterator<Item = &ProcessEntry> {
        self.iter().map(|(_, entry)| entry)
    }

    /// The shards, and whether each changed since the views were last built.
    pub fn shards(&self) -> impl Iterator<Item = (&FxHashMap<ProcessKey, ProcessEntry>, bool)> {
        self.shards.iter().zip(self.changed_now.iter().copied())
    }

    /// The views were built: what changed now is shown; what changed now
    /// changes again (its per-interval figures) in the next interval.
    pub fn views_built(&mut self) {
        std::mem::swap(&mut self.changed_now, &mut self.changed_next);
        self.changed_next.fill(false);
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
        table.get_or_insert_with(key, entry);
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
    fn processes_spread_over_the_shards() {
        let mut table = ProcessTable::default();
        for pid in 0..10_000 {
            table.get_or_insert_with(ProcessKey { pid, start_ns: 0 }, entry);
        }
        let used = table
            .shards()
            .filter(|(shard, _)| !shard.is_empty())
            .count();
        assert!(used > PROCESS_SHARDS * 9 / 10, "{used} shards used");
        assert_eq!(table.iter().count(), 10_000);
    }
}
