//! A map kept sorted by key, for tables that are read in passes of keys
//! that come sorted (or nearly): each lookup gallops forward from where the
//! previous one ended, so a pass reads the table in order, as the CPU's
//! prefetcher likes, instead of one cold hash bucket per key. With 10,000
//! processes waking every second, hash lookups of threads and processes
//! (whose tables are larger than the caches keep between intervals) were a
//! quarter of the agent's time.
//!
//! New keys wait in a `BTreeMap` (any order, O(log n) each), merged into
//! the sorted vector by `settle` once they pass an eighth of it: a node
//! that starts threads all the time does not copy the whole table at every
//! pass, and an agent that starts on a node of 100,000 threads builds its
//! table in O(n log n). (A first version kept them in a sorted vector too,
//! where each insertion into the middle moved everything after it:
//! quadratic at start-up on a large node.) Removed keys are marked, and
//! swept out by `settle` the same way. Lookups in any order are correct,
//! and cost a binary search.

use std::collections::BTreeMap;

#[derive(Clone, Debug)]
struct Entry<K, V> {
    key: K,
    value: V,
    live: bool,
}

#[derive(Clone, Debug)]
pub struct SortedTable<K, V> {
    /// Sorted by key; removed entries stay (not `live`) until `settle`.
    main: Vec<Entry<K, V>>,
    /// Keys added since the last merge (none of them live in `main`).
    fresh: BTreeMap<K, V>,
    /// Entries of `main` that are not live.
    removed: usize,
}

impl<K, V> Default for SortedTable<K, V> {
    fn default() -> Self {
        Self {
            main: Vec::new(),
            fresh: BTreeMap::new(),
            removed: 0,
        }
    }
}

/// Where a pass's previous lookup ended in a table. Valid until the
/// table's next `settle`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cursor {
    main: usize,
}

/// The first index whose key is not below `key`, galloping forward from
/// `from` (a pass's next key is usually near), from the start if `key`
/// lies before `from`.
fn seek<K: Ord, V>(entries: &[Entry<K, V>], key: &K, from: usize) -> usize {
    let from = if from > entries.len() || (from > 0 && entries[from - 1].key >= *key) {
        0
    } else {
        from
    };
    let mut low = from;
    let mut step = 1;
    while low + step <= entries.len() && entries[low + step - 1].key < *key {
        low += step;
        step *= 2;
    }
    let high = (low + step).min(entries.len());
    low + entries[low..high].partition_point(|entry| entry.key < *key)
}

impl<K: Ord + Copy, V> SortedTable<K, V> {
    pub fn len(&self) -> usize {
        self.main.len() - self.removed + self.fresh.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The index of `key`'s live entry in `main`.
    fn find(&self, key: &K, cursor: &mut Cursor) -> Option<usize> {
        cursor.main = seek(&self.main, key, cursor.main);
        self.main
            .get(cursor.main)
            .filter(|entry| entry.key == *key && entry.live)
            .map(|_| cursor.main)
    }

    pub fn get(&self, key: &K, cursor: &mut Cursor) -> Option<&V> {
        match self.find(key, cursor) {
            Some(at) => Some(&self.main[at].value),
            None => self.fresh.get(key),
        }
    }

    pub fn get_mut(&mut self, key: &K, cursor: &mut Cursor) -> Option<&mut V> {
        match self.find(key, cursor) {
            Some(at) => Some(&mut self.main[at].value),
            None => self.fresh.get_mut(key),
        }
    }

    /// Sets `key`'s value (replacing any), and returns it.
    pub fn insert(&mut self, key: K, value: V, cursor: &mut Cursor) -> &mut V {
        if let Some(at) = self.find(&key, cursor) {
            self.main[at].value = value;
            return &mut self.main[at].value;
        }
        match self.fresh.entry(key) {
            std::collections::btree_map::Entry::Occupied(mut entry) => {
                entry.insert(value);
                entry.into_mut()
            }
            std::collections::btree_map::Entry::Vacant(entry) => entry.insert(value),
        }
    }

    /// Forgets `key`; true if it was there.
    pub fn remove(&mut self, key: &K) -> bool {
        if let Some(at) = self.find(key, &mut Cursor::default()) {
            self.main[at].live = false;
            self.removed += 1;
            return true;
        }
        self.fresh.remove(key).is_some()
    }

    /// Keeps the entries `keep` says to.
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool) {
        self.main
            .retain(|entry| entry.live && keep(&entry.key, &entry.value));
        self.removed = 0;
        self.fresh.retain(|key, value| keep(key, value));
    }

    /// Entries, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.main
            .iter()
            .filter(|entry| entry.live)
            .map(|entry| (&entry.key, &entry.value))
            .chain(self.fresh.iter())
    }

    /// After a pass: merges the new keys in and sweeps removed entries
    /// out, once either has grown past an eighth of the table. Cursors of
    /// earlier passes must not be used after this.
    pub fn settle(&mut self) {
        let threshold = (self.main.len() / 8).max(64);
        if self.fresh.len() <= threshold && self.removed <= threshold {
            return;
        }
        let main = std::mem::take(&mut self.main);
        let fresh = std::mem::take(&mut self.fresh);
        let mut merged = Vec::with_capacity(main.len() - self.removed + fresh.len());
        let mut main = main.into_iter().filter(|entry| entry.live).peekable();
        let mut fresh = fresh
            .into_iter()
            .map(|(key, value)| Entry {
                key,
                value,
                live: true,
            })
            .peekable();
        loop {
            let next = match (main.peek(), fresh.peek()) {
                (Some(a), Some(b)) if a.key <= b.key => main.next(),
                (_, Some(_)) => fresh.next(),
                (Some(_), None) => main.next(),
                (None, None) => break,
            };
            merged.extend(next);
        }
        self.main = merged;
        self.removed = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_pass_in_order_finds_every_key_and_many_new_keys_are_merged() {
        let mut table = SortedTable::default();
        let mut cursor = Cursor::default();
        for key in (0..1_000u64).step_by(2) {
            table.insert(key, key * 10, &mut cursor);
        }
        table.settle();
        assert!(table.fresh.is_empty(), "500 new keys > 64: merged");
        assert_eq!(table.main.len(), 500);
        let mut cursor = Cursor::default();
        for key in 0..1_000 {
            let found = table.get(&key, &mut cursor).copied();
            assert_eq!(found, (key % 2 == 0).then_some(key * 10));
        }
        // Out of order, with the same cursor: still found.
        assert_eq!(table.get(&10, &mut cursor), Some(&100));
    }

    #[test]
    fn a_few_new_keys_wait_until_there_are_enough_to_merge() {
        let mut table = SortedTable::default();
        let mut cursor = Cursor::default();
        for key in 0..1_000u64 {
            table.insert(key * 2, 1, &mut cursor);
        }
        table.settle();
        let mut cursor = Cursor::default();
        table.insert(7, 2, &mut cursor);
        table.insert(3, 3, &mut cursor);
        table.settle();
        assert_eq!(table.fresh.len(), 2, "2 of 1,000: not worth a copy");
        let mut cursor = Cursor::default();
        assert_eq!(table.get(&3, &mut cursor), Some(&3));
        assert_eq!(table.get(&4, &mut cursor), Some(&1));
        assert_eq!(table.get(&7, &mut cursor), Some(&2));
        assert!(table.remove(&7));
        assert!(table.remove(&4));
        assert!(!table.remove(&5));
        assert_eq!(table.len(), 1_000);
        assert_eq!(table.get(&7, &mut Cursor::default()), None);
        table.retain(|key, _| *key != 3);
        assert_eq!(table.len(), 999);
        assert_eq!(table.iter().count(), 999);
    }

    proptest! {
        /// Whatever the order of inserts, removals, lookups and settles,
        /// the table answers as a map would.
        #[test]
        fn the_table_behaves_as_a_map(
            operations in proptest::collection::vec((0u8..4, 0u64..300, any::<bool>()), 1..600),
        ) {
            let mut table = SortedTable::default();
            let mut model = std::collections::BTreeMap::new();
            let mut cursor = Cursor::default();
            for (operation, key, reset) in operations {
                if reset {
                    cursor = Cursor::default();
                }
                match operation {
                    0 => {
                        table.insert(key, key * 3, &mut cursor);
                        model.insert(key, key * 3);
                    }
                    1 => {
                        prop_assert_eq!(table.remove(&key), model.remove(&key).is_some());
                    }
                    2 => {
                        table.settle();
                        cursor = Cursor::default();
                    }
                    _ => {
                        prop_assert_eq!(table.get(&key, &mut cursor), model.get(&key));
                    }
                }
                prop_assert_eq!(table.len(), model.len());
            }
            let mut keys: Vec<u64> = table.iter().map(|(key, _)| *key).collect();
            keys.sort_unstable();
            prop_assert_eq!(keys, model.keys().copied().collect::<Vec<_>>());
        }
    }
}
