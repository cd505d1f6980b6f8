//! Energy: each domain instance's interval energy split (by the one
//! [`split`]) between the processes active on it, and the node's books.

use rustc_hash::FxHashMap;

use super::Accounting;
use crate::{
    cpu::{ProcessUsage, total_ns},
    energy::{
        Domain,
        attribution::{IdleBaseline, IdlePolicy, split},
        collector::EnergyInterval,
    },
};

impl Accounting {
    /// Splits one interval's energy, domain by domain, between the processes
    /// (and so workloads) active on it: CPU domains by CPU time on the
    /// domain's socket (`psys` by CPU time anywhere), GPUs by each process's
    /// use of that GPU. Call after `apply` with the same reading.
    pub(super) fn apply_energy(
        &mut self,
        usage: &[ProcessUsage],
        usage_slots: &[usize],
        interval: &EnergyInterval,
        seconds: f64,
        policy: IdlePolicy,
        baseline_for: &dyn Fn(Domain) -> IdleBaseline,
    ) {
        let seq = self.seq;
        let node = &mut self.node_energy;
        node.interval_measured = [0.0; Domain::ALL.len()];
        node.interval_attributed = [0.0; Domain::ALL.len()];
        node.interval_idle = [0.0; Domain::ALL.len()];
        node.interval_unattributed = [0.0; Domain::ALL.len()];
        node.interval_uncertainty = [0.0; Domain::ALL.len()];
        node.idle_watts = [0.0; Domain::ALL.len()];
        node.interval_seconds = seconds;
        // GPU users come as PIDs: each live one's slot.
        let pids: FxHashMap<u32, usize> = if interval.gpu_activity.is_empty() {
            FxHashMap::default()
        } else {
            self.processes
                .iter()
                .filter(|(_, p)| p.exited_at.is_none())
                .filter_map(|(key, _)| Some((key.pid, self.processes.slot_of(key)?)))
                .collect()
        };
        for energy in &interval.energies {
            let domain = energy.id.domain;
            let d = domain as usize;
            let baseline = self
                .baselines
                .entry(energy.id)
                .or_insert_with(|| baseline_for(domain));
            if seconds > 0.0 {
                baseline.observe(energy.joules / seconds);
            }
            // A configured figure wins; then what the sources know; then
            // the learned percentile.
            let hint = interval
                .idle_watts_hints
                .iter()
                .find(|(id, _)| *id == energy.id)
                .map(|(_, watts)| *watts);
            let idle_watts = match hint {
                Some(watts) if !baseline.is_configured() => watts,
                _ => baseline.watts(),
            };
            // (process slot, its workload slot, activity): `Even` shares
            // idle energy per workload, so the split needs to know which.
            let processes = &self.processes;
            let with_workload = |slot: usize| {
                let workload = processes.at(slot).map(|p| p.workload);
                (workload.map(|_| slot), workload)
            };
            let activity: Vec<(Option<usize>, Option<usize>, f64)> = match domain {
                Domain::Gpu => interval
                    .gpu_activity
                    .iter()
                    .filter(|(gpu, _, _)| *gpu == energy.id.index)
                    .map(|(_, pid, weight)| {
                        let (slot, workload) = pids
                            .get(pid)
                            .map_or((None, None), |slot| with_workload(*slot));
                        (slot, workload, *weight)
                    })
                    .collect(),
                Domain::Psys => usage
                    .iter()
                    .zip(usage_slots)
                    .map(|(u, slot)| {
                        let ns = total_ns(&u.runtime_ns_by_socket) as f64;
                        let (slot, workload) = with_workload(*slot);
                        (slot, workload, ns)
                    })
                    .collect(),
                _ => usage
                    .iter()
                    .zip(usage_slots)
                    .map(|(u, slot)| {
                        let ns = u
                            .runtime_ns_by_socket
                            .get(energy.id.index as usize)
                            .copied()
                            .unwrap_or(0);
                        let (slot, workload) = with_workload(*slot);
                        (slot, workload, ns as f64)
                    })
                    .collect(),
            };
            let result = split(energy.joules, idle_watts * seconds, &activity, policy);
            let mut attributed = 0.0;
            let mut unattributed = result.unattributed;
            for (key, dynamic, idle) in result.shares {
                let joules = dynamic + idle;
                let charged = key
                    .and_then(|slot| self.processes.at_mut(slot))
                    .map(|process| {
                        process.energy.charge(domain, joules, seq);
                        process.workload
                    });
                match charged {
                    Some(slot) => {
                        if let Some(workload) = self.workloads.get_mut(slot) {
                            workload.energy.charge(domain, joules, seq);
                        }
                        attributed += joules;
                    }
                    // A GPU user the CPU accounting has not seen (another
                    // PID namespace, or gone): the node keeps its energy.
                    None => unattributed += joules,
                }
            }
            let node = &mut self.node_energy;
            node.measured[d] += energy.joules;
            node.attributed[d] += attributed;
            node.idle[d] += result.idle;
            node.unattributed[d] += unattributed;
            node.interval_measured[d] += energy.joules;
            node.interval_attributed[d] += attributed;
            node.interval_idle[d] += result.idle;
            node.interval_unattributed[d] += unattributed;
            if let Some(sigma) = energy.uncertainty_joules {
                // Independent per-instance errors add in quadrature.
                let previous = node.interval_uncertainty[d];
                node.interval_uncertainty[d] = (previous * previous + sigma * sigma).sqrt();
            }
            node.methods[d] = Some(energy.method);
            // Summed over the domain's instances (one per socket).
            node.idle_watts[d] += idle_watts;
        }
    }
}
