//! The series limit: at most `limit` keys (containers, pods, processes) get
//! series of their own; the rest are summed into one overflow series, so a
//! sum over all series still equals the node's figure.
//!
//! The SDK has an overflow series too, but for observable counters it keeps
//! the *last* value reported into it, not the sum: with several keys over
//! the limit, all but one would vanish. So the limit is applied here, and
//! the SDK's own limit is set above it, as a backstop only.

use std::collections::{HashMap, HashSet};

/// Which keys have series of their own, and the overflow's running sums.
#[derive(Debug)]
pub struct SeriesLimit {
    limit: usize,
    /// Keys with series of their own; a key keeps its series while it
    /// exists, so counters never jump between series.
    tracked: HashSet<String>,
    /// Per (counter, key): the cumulative value already added to the
    /// overflow sum.
    counted: HashMap<(usize, String), f64>,
    /// Per counter: the overflow series' cumulative value (monotonic: it
    /// grows by what overflowed keys grew, and never shrinks when they go).
    overflow: HashMap<usize, f64>,
}

impl SeriesLimit {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            tracked: HashSet::new(),
            counted: HashMap::new(),
            overflow: HashMap::new(),
        }
    }

    /// Updates the tracked set for the keys present now, in order of
    /// preference (earlier keys win the free places).
    pub fn select<'a>(&mut self, present: impl Iterator<Item = &'a str> + Clone) {
        let now: HashSet<&str> = present.clone().collect();
        self.tracked.retain(|key| now.contains(key.as_str()));
        self.counted
            .retain(|(_, key), _| now.contains(key.as_str()));
        for key in present {
            if self.tracked.len() >= self.limit {
                break;
            }
            if !self.tracked.contains(key) {
                // A key that overflowed before and now gets a place keeps
                // what it added to the overflow there (no double count).
                self.tracked.insert(key.to_owned());
            }
        }
    }

    pub fn is_tracked(&self, key: &str) -> bool {
        self.tracked.contains(key)
    }

    /// Adds what an untracked key's counter grew since it was last seen to
    /// the overflow sum of counter `slot`; returns nothing (read with
    /// [`SeriesLimit::overflow`]).
    pub fn add_overflow(&mut self, slot: usize, key: &str, cumulative: f64) {
        let entry = self.counted.entry((slot, key.to_owned())).or_insert(0.0);
        let grown = (cumulative - *entry).max(0.0);
        *entry = cumulative.max(*entry);
        *self.overflow.entry(slot).or_insert(0.0) += grown;
    }

    /// The overflow series' value of counter `slot`, if anything overflowed.
    pub fn overflow(&self, slot: usize) -> Option<f64> {
        self.overflow.get(&slot).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_over_the_limit_are_summed_not_dropped() {
        let mut limit = SeriesLimit::new(2);
        let keys = ["a", "b", "c", "d"];
        limit.select(keys.iter().copied());
        assert!(limit.is_tracked("a") && limit.is_tracked("b"));
        assert!(!limit.is_tracked("c") && !limit.is_tracked("d"));
        limit.add_overflow(0, "c", 5.0);
        limit.add_overflow(0, "d", 7.0);
        assert_eq!(limit.overflow(0), Some(12.0));
        // They grow: the overflow grows by as much.
        limit.add_overflow(0, "c", 6.0);
        limit.add_overflow(0, "d", 9.0);
        assert_eq!(limit.overflow(0), Some(15.0));
        assert_eq!(limit.overflow(1), None);
    }

    #[test]
    fn the_overflow_never_shrinks_and_tracked_keys_keep_their_place() {
        let mut limit = SeriesLimit::new(1);
        limit.select(["a", "b"].into_iter());
        limit.add_overflow(0, "b", 10.0);
        // "a" leaves: "b" takes the free place; the overflow keeps its 10.
        limit.select(["b", "c"].into_iter());
        assert!(limit.is_tracked("b"));
        limit.add_overflow(0, "c", 1.0);
        assert_eq!(limit.overflow(0), Some(11.0));
        // A new key with an earlier rank does not take b's place.
        limit.select(["z", "b", "c"].into_iter());
        assert!(limit.is_tracked("b") && !limit.is_tracked("z"));
    }
}
