//! Stable slots grouped in shards that remember whether they changed: the
//! storage of the process and workload tables. A process or workload keeps
//! its slot for life (so others refer to it by index), a freed slot is
//! reused, and a snapshot rebuilds only the views of shards that changed.
//! Every change goes through `get_mut`, `insert` or `take`, which mark.

/// Slots per shard: small enough that the few processes of a quiet
/// interval rebuild few views, large enough that 10,000 processes make
/// hundreds of shards (one shared pointer each per snapshot), not
/// thousands.
pub const SHARD_SLOTS: usize = 16;

#[derive(Debug)]
pub struct Slots<T> {
    /// Freed slots are `None` until reused.
    slots: Vec<Option<T>>,
    free: Vec<usize>,
    /// Something in the shard changed in this interval: its views must be
    /// rebuilt now, and again next interval (when its figures "in the last
    /// interval" go back to zero).
    changed_now: Vec<bool>,
    changed_next: Vec<bool>,
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
            changed_now: Vec::new(),
            changed_next: Vec::new(),
        }
    }
}

impl<T> Slots<T> {
    /// Marks `slot`'s shard changed.
    pub fn mark(&mut self, slot: usize) {
        let shard = slot / SHARD_SLOTS;
        self.changed_now[shard] = true;
        self.changed_next[shard] = true;
    }

    /// Slots in use or free.
    pub fn count(&self) -> usize {
        self.slots.len()
    }

    pub fn get(&self, slot: usize) -> Option<&T> {
        self.slots.get(slot)?.as_ref()
    }

    /// The item in `slot`, to change (its shard is marked changed).
    pub fn get_mut(&mut self, slot: usize) -> Option<&mut T> {
        self.slots.get(slot)?.as_ref()?;
        self.mark(slot);
        self.slots[slot].as_mut()
    }

    /// Puts `item` in a free slot (or a new one), and returns the slot.
    pub fn insert(&mut self, item: T) -> usize {
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
        self.slots[slot] = Some(item);
        self.mark(slot);
        slot
    }

    /// Takes the item out of `slot`, which is free for reuse after.
    pub fn take(&mut self, slot: usize) -> Option<T> {
        let item = self.slots.get_mut(slot)?.take()?;
        self.free.push(slot);
        self.mark(slot);
        Some(item)
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().flatten()
    }

    /// The shards (each up to `SHARD_SLOTS` slots), and whether each
    /// changed since the views were last built.
    pub fn shards(&self) -> impl Iterator<Item = (&[Option<T>], bool)> {
        self.slots
            .chunks(SHARD_SLOTS)
            .zip(self.changed_now.iter().copied())
    }

    /// The views were built: what changed now is shown; what changed now
    /// changes again (its per-interval figures) in the next interval.
    pub fn views_built(&mut self) {
        std::mem::swap(&mut self.changed_now, &mut self.changed_next);
        self.changed_next.fill(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changed<T>(slots: &Slots<T>) -> Vec<usize> {
        slots
            .shards()
            .enumerate()
            .filter(|(_, (_, changed))| *changed)
            .map(|(index, _)| index)
            .collect()
    }

    #[test]
    fn changes_mark_their_shard_for_this_interval_and_the_next() {
        let mut slots = Slots::default();
        for n in 0..40 {
            assert_eq!(slots.insert(n), n);
        }
        assert_eq!(changed(&slots), vec![0, 1, 2]);
        slots.views_built();
        slots.views_built();
        assert!(changed(&slots).is_empty());
        assert_eq!(slots.get(20), Some(&20), "reading marks nothing");
        assert!(changed(&slots).is_empty());
        *slots.get_mut(20).unwrap() = 3;
        assert_eq!(changed(&slots), vec![1]);
        slots.views_built();
        assert_eq!(
            changed(&slots),
            vec![1],
            "its interval figures go to zero next"
        );
        slots.views_built();
        assert_eq!(slots.take(33), Some(33));
        assert_eq!(changed(&slots), vec![2]);
        assert_eq!(slots.get(33), None);
        assert_eq!(slots.take(33), None);
        assert_eq!(slots.insert(99), 33, "the freed slot is reused");
        assert_eq!(slots.iter().count(), 40);
        assert_eq!(slots.count(), 40);
    }
}
