//! Retention: workloads whose cgroups are gone are marked exited, and what
//! exited longer ago than the retention is forgotten.

use std::time::SystemTime;

use super::Accounting;
use crate::cgroup::Workload;

impl Accounting {
    /// Marks workloads whose cgroups are gone and that have no live process
    /// as exited, and forgets what exited longer than the retention ago.
    pub fn retire(&mut self, now: SystemTime, cgroup_exists: &mut dyn FnMut(u64) -> bool) {
        for entry in self.workload_slots.iter_mut().flatten() {
            if entry.exited_at.is_some()
                || entry.live_processes > 0
                || matches!(*entry.workload, Workload::Host)
            {
                continue;
            }
            let due = entry.last_existence_check.is_none_or(|at| {
                now.duration_since(at).unwrap_or_default() >= self.existence_check_every
            });
            if !due {
                continue;
            }
            entry.last_existence_check = Some(now);
            if !entry.cgroup_ids.iter().any(|id| cgroup_exists(*id)) {
                entry.exited_at = Some(now);
            }
        }
        let retention = self.retention;
        let expired = |exited_at: Option<SystemTime>| {
            exited_at.is_some_and(|at| now.duration_since(at).unwrap_or_default() > retention)
        };
        self.processes.retain(|_, p| !expired(p.exited_at));
        for slot in 0..self.workload_slots.len() {
            if self.workload_slots[slot]
                .as_ref()
                .is_some_and(|w| expired(w.exited_at))
            {
                self.free_workload_slot(slot);
            }
        }
        let slots = &self.workload_slots;
        self.cgroup_slots
            .retain(|_, (slot, _)| slots[*slot].is_some());
    }
}
