//! CPU time: each reading's per-process deltas summed into processes,
//! workloads and the node's per-CPU busy and idle time.

use std::time::{Duration, SystemTime};

use super::{Accounting, Energy, NO_SLOT, ProcessEntry, Resolved, add_socket_ns, workload_key};
use crate::{
    cpu::{Comm, CpuReading, total_ns},
    sorted_table::Cursor,
};
use std::sync::Arc;

impl Accounting {
    /// Applies one reading that covers `wall` of time on `cpus` online CPUs.
    pub(super) fn apply_cpu(
        &mut self,
        reading: &CpuReading,
        now: SystemTime,
        wall: Duration,
        online_cpus: &[u32],
        resolve: &mut dyn FnMut(u64) -> Resolved,
    ) {
        self.seq += 1;
        let seq = self.seq;
        let mut usage_slots = std::mem::take(&mut self.usage_slots);
        usage_slots.clear();
        // The reader gives processes in key order: one pass through the
        // process index.
        let mut cursor = Cursor::default();
        for usage in &reading.usage {
            // Each cgroup is resolved once, when first seen.
            let (slot, path) = match self.cgroup_slots.get(&usage.cgroup_id) {
                Some((slot, path)) if self.workloads.get(*slot).is_some() => (*slot, path.clone()),
                _ => {
                    let resolved = resolve(usage.cgroup_id);
                    let key = Arc::from(workload_key(&resolved.workload));
                    let slot = self.workload_slot(key, resolved.workload, now);
                    // An unresolved cgroup is looked up again next time.
                    if resolved.path.is_some() {
                        self.cgroup_slots
                            .insert(usage.cgroup_id, (slot, resolved.path.clone()));
                        self.cgroups_changed = true;
                    }
                    (slot, resolved.path)
                }
            };
            let delta = total_ns(&usage.runtime_ns_by_socket);

            let Some(workload_entry) = self.workloads.get_mut(slot) else {
                usage_slots.push(NO_SLOT);
                continue;
            };
            add_socket_ns(
                &mut workload_entry.cpu_ns_by_socket,
                &usage.runtime_ns_by_socket,
            );
            if workload_entry.interval_seq != seq {
                workload_entry.interval_seq = seq;
                workload_entry.interval_ns = 0;
            }
            workload_entry.interval_ns += delta;
            workload_entry.last_seen = now;
            // A workload that runs again (a restarted unit, a reused cgroup
            // name) is alive again.
            workload_entry.exited_at = None;
            // Most often the very same string: compare pointers first.
            let same_path = match (&workload_entry.cgroup_path, &path) {
                (Some(ours), Some(new)) => Arc::ptr_eq(ours, new) || ours == new,
                (_, None) => true,
                (None, Some(_)) => false,
            };
            if !same_path {
                workload_entry.cgroup_path.clone_from(&path);
            }
            if !workload_entry.cgroup_ids.contains(&usage.cgroup_id) {
                workload_entry.cgroup_ids.push(usage.cgroup_id);
            }

            let mut moved_from = None;
            let mut is_new = false;
            let process_slot = self
                .processes
                .slot_or_insert_with(usage.key, &mut cursor, || {
                    is_new = true;
                    ProcessEntry::new(usage.comm, usage.cgroup_id, slot, now)
                });
            usage_slots.push(process_slot);
            let Some(process) = self.processes.at_mut(process_slot) else {
                continue;
            };
            if process.workload != slot {
                if process.exited_at.is_none() {
                    moved_from = Some(process.workload);
                }
                process.workload = slot;
            }
            add_socket_ns(&mut process.cpu_ns_by_socket, &usage.runtime_ns_by_socket);
            if process.interval_seq != seq {
                process.interval_seq = seq;
                process.interval_ns = 0;
            }
            process.interval_ns += delta;
            process.cgroup_id = usage.cgroup_id;
            if usage.comm != Comm::default() {
                process.comm = usage.comm;
            }
            process.last_seen = now;
            // Run time after it was marked exited means the mark was wrong
            // (a liveness check that raced, a zombie leader whose threads
            // still run): it is alive again, and counted live again below.
            let revived = !is_new && process.exited_at.take().is_some();
            let alive = process.exited_at.is_none();

            // The live count follows the process (new, or moved cgroups).
            if is_new || moved_from.is_some() || revived {
                if let Some(old) = moved_from.and_then(|s| self.workloads.get_mut(s)) {
                    old.live_processes = old.live_processes.saturating_sub(1);
                }
                if alive && let Some(new) = self.workloads.get_mut(slot) {
                    new.live_processes += 1;
                }
            }
        }

        self.usage_slots = usage_slots;
        self.processes.settle();

        for key in &reading.exited {
            if let Some(process) = self.processes.get_mut(key)
                && process.exited_at.is_none()
            {
                process.exited_at = Some(now);
                self.exit_order.push_back((now, *key));
                if let Some(w) = self.workloads.get_mut(process.workload) {
                    w.live_processes = w.live_processes.saturating_sub(1);
                }
            }
        }

        if reading.busy_missing {
            self.node_wall_pending += wall;
            self.node.interval_busy_ns = 0;
            self.node.interval_capacity_ns = 0;
        } else {
            let wall = wall + std::mem::take(&mut self.node_wall_pending);
            self.apply_node(&reading.busy_ns_by_cpu, wall, online_cpus);
        }
    }

    fn apply_node(&mut self, busy_ns_by_cpu: &[u64], wall: Duration, online_cpus: &[u32]) {
        let cpus = busy_ns_by_cpu.len().max(
            online_cpus
                .iter()
                .map(|c| *c as usize + 1)
                .max()
                .unwrap_or(0),
        );
        self.node.busy_ns_by_cpu.resize(cpus, 0);
        self.node.idle_ns_by_cpu.resize(cpus, 0);
        let wall_ns = wall.as_nanos() as u64;
        let mut interval_busy = 0;
        for &cpu in online_cpus {
            let cpu = cpu as usize;
            // Busy can exceed wall by a tick's worth of skew between the
            // programs' clock and ours; clamp so idle never goes negative.
            let busy = busy_ns_by_cpu.get(cpu).copied().unwrap_or(0).min(wall_ns);
            self.node.busy_ns_by_cpu[cpu] += busy;
            self.node.idle_ns_by_cpu[cpu] += wall_ns - busy;
            interval_busy += busy;
        }
        self.node.interval_busy_ns = interval_busy;
        self.node.interval_capacity_ns = wall_ns * online_cpus.len() as u64;
    }
}

impl ProcessEntry {
    /// A process first seen `now` in `cgroup_id` (workload `slot`), with
    /// nothing charged yet.
    fn new(comm: Comm, cgroup_id: u64, workload: usize, now: SystemTime) -> Self {
        Self {
            comm,
            cgroup_id,
            workload,
            cpu_ns_by_socket: [0; agent_common::MAX_SOCKETS],
            interval_ns: 0,
            interval_seq: 0,
            energy: Energy::default(),
            first_seen: now,
            last_seen: now,
            exited_at: None,
        }
    }
}
