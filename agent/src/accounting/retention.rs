//! Retention: workloads whose cgroups are gone are marked exited, and what
//! exited longer ago than the retention is forgotten.

use std::time::SystemTime;

use super::Accounting;
use crate::{cgroup::Workload, cpu::ProcessKey};

impl Accounting {
    /// Marks workloads whose cgroups are gone and that have no live process
    /// as exited, and forgets what exited longer than the retention ago.
    pub fn retire(&mut self, now: SystemTime, cgroup_exists: &mut dyn FnMut(u64) -> bool) {
        self.mark_gone_workloads(now, cgroup_exists);
        self.forget_expired(now);
    }

    /// Marks workloads whose cgroups are gone and that have no live process
    /// as exited (each checked at most every few seconds). Linear in the
    /// workloads: cheap enough for every interval.
    pub fn mark_gone_workloads(
        &mut self,
        now: SystemTime,
        cgroup_exists: &mut dyn FnMut(u64) -> bool,
    ) {
        let check_every = self.existence_check_every;
        for slot in 0..self.workloads.slot_count() {
            let due = self.workloads.get(slot).is_some_and(|entry| {
                entry.exited_at.is_none()
                    && entry.live_processes == 0
                    && !matches!(*entry.workload, Workload::Host)
                    && entry
                        .last_existence_check
                        .is_none_or(|at| now.duration_since(at).unwrap_or_default() >= check_every)
            });
            // Only a workload that is due is taken to change: `get_mut`
            // marks its shard for the next snapshot to rebuild.
            if !due {
                continue;
            }
            let Some(entry) = self.workloads.get_mut(slot) else {
                continue;
            };
            entry.last_existence_check = Some(now);
            if !entry.cgroup_ids.iter().any(|id| cgroup_exists(*id)) {
                entry.exited_at = Some(now);
            }
        }
        // A workload outlives its cgroups (a service restarted a thousand
        // times had a thousand): keep the ids that still exist, and the
        // newest, so the list stays as long as the cgroups alive.
        let mut forgotten_ids = Vec::new();
        for slot in 0..self.workloads.slot_count() {
            let prune = self.workloads.get(slot).is_some_and(|entry| {
                entry.cgroup_ids.len() > 1
                    && (entry.live_processes == 0 || entry.cgroup_ids.len() >= 8)
            });
            if !prune {
                continue;
            }
            let Some(entry) = self.workloads.get_mut(slot) else {
                continue;
            };
            let newest = entry.cgroup_ids.last().copied();
            entry.cgroup_ids.retain(|id| {
                let keep = Some(*id) == newest || cgroup_exists(*id);
                if !keep {
                    forgotten_ids.push(*id);
                }
                keep
            });
        }
        for id in forgotten_ids {
            self.cgroup_slots.remove(&id);
            self.cgroups_changed = true;
        }
    }

    /// Forgets processes and workloads that exited longer than the
    /// retention ago, and exited processes past the bound. Linear in the
    /// processes: the collector runs it every few seconds, not every
    /// interval (retention is minutes).
    pub fn forget_expired(&mut self, now: SystemTime) {
        let retention = self.retention;
        let expired = |exited_at: Option<SystemTime>| {
            exited_at.is_some_and(|at| now.duration_since(at).unwrap_or_default() > retention)
        };
        let expired_keys: Vec<ProcessKey> = self
            .processes
            .iter()
            .filter(|(_, p)| expired(p.exited_at))
            .map(|(key, _)| *key)
            .collect();
        for key in expired_keys {
            self.processes.remove(&key);
        }
        self.evict_exited_processes_over_the_bound();
        self.processes.settle();
        for slot in 0..self.workloads.slot_count() {
            if self
                .workloads
                .get(slot)
                .is_some_and(|w| expired(w.exited_at))
            {
                self.workloads.free(slot);
            }
        }
        let workloads = &self.workloads;
        let before = self.cgroup_slots.len();
        self.cgroup_slots
            .retain(|_, (slot, _)| workloads.get(*slot).is_some());
        self.cgroups_changed |= self.cgroup_slots.len() != before;
    }

    /// Forgets the oldest exited processes while more than the bound are
    /// kept, and the exit records of processes already gone.
    fn evict_exited_processes_over_the_bound(&mut self) {
        // Records whose process expired, ran again or exited again later
        // are stale.
        let processes = &self.processes;
        self.exit_order.retain(|(at, key)| {
            processes
                .get(key)
                .is_some_and(|process| process.exited_at == Some(*at))
        });
        while self.exit_order.len() > self.max_exited_processes {
            let Some((_, key)) = self.exit_order.pop_front() else {
                break;
            };
            self.processes.remove(&key);
            self.evicted_processes += 1;
        }
    }
}
