//! Workloads live in stable slots, so a process refers to its workload by
//! index; slots of forgotten workloads are reused.

use std::{sync::Arc, time::SystemTime};

use super::{Accounting, Energy, WorkloadEntry};
use crate::cgroup::Workload;

impl Accounting {
    /// The slot of the workload with `key`, created if new.
    pub(super) fn workload_slot(
        &mut self,
        key: Arc<str>,
        workload: Arc<Workload>,
        now: SystemTime,
    ) -> usize {
        if let Some(slot) = self.workload_index.get(&key) {
            return *slot;
        }
        let entry = WorkloadEntry {
            key: Arc::clone(&key),
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
        };
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                self.workload_slots[slot] = Some(entry);
                slot
            }
            None => {
                self.workload_slots.push(Some(entry));
                self.workload_slots.len() - 1
            }
        };
        self.workload_index.insert(key, slot);
        slot
    }

    /// Frees the slot of a forgotten workload for reuse.
    pub(super) fn free_workload_slot(&mut self, slot: usize) {
        if let Some(entry) = self.workload_slots[slot].take() {
            self.workload_index.remove(&entry.key);
            self.free_slots.push(slot);
        }
    }
}
