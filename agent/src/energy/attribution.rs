//! Splitting one domain's measured energy over one interval between the
//! workloads that were active on it, so that the books always balance:
//! for every domain and interval,
//! `sum over workloads + idle + unattributed == measured`.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// What happens to a domain's idle energy (what it would draw doing nothing).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IdlePolicy {
    /// Idle energy stays in the node's `idle` bucket (default: a workload
    /// pays for what it adds, not for the machine being on).
    #[default]
    Unattributed,
    /// Shared evenly by the workloads active in the interval.
    Even,
    /// Shared in proportion to the workloads' activity (CPU time).
    Proportional,
}

/// One domain-interval split.
#[derive(Clone, Debug, PartialEq)]
pub struct Split<K> {
    /// (key, dynamic joules, idle joules) for each active key.
    pub shares: Vec<(K, f64, f64)>,
    /// Idle energy not given to workloads.
    pub idle: f64,
    /// Dynamic energy with no workload to charge (nothing ran).
    pub unattributed: f64,
}

/// Splits `measured` joules: `idle_joules` (clamped into 0..=measured) is
/// the idle part; the rest, the dynamic part, goes to the keys (processes)
/// in proportion to their `activity` (e.g. CPU ns on the domain's socket).
/// Each entry is `(key, group, activity)`: the group is the workload the key
/// belongs to, which `Even` shares idle energy between (a container of 100
/// processes is one workload), handing each group's part to its keys in
/// proportion to their activity. Negative or non-finite activities count as
/// zero. The one place energy is divided: the books balance by construction
/// (property-tested below).
pub fn split<K: Copy, G: Copy + Eq + std::hash::Hash>(
    measured: f64,
    idle_joules: f64,
    activity: &[(K, G, f64)],
    policy: IdlePolicy,
) -> Split<K> {
    let measured = if measured.is_finite() {
        measured.max(0.0)
    } else {
        0.0
    };
    let idle_joules = if idle_joules.is_finite() {
        idle_joules.clamp(0.0, measured)
    } else {
        0.0
    };
    let dynamic = measured - idle_joules;
    let weight = |a: f64| if a.is_finite() && a > 0.0 { a } else { 0.0 };
    let total: f64 = activity.iter().map(|(_, _, a)| weight(*a)).sum();
    if total <= 0.0 {
        return Split {
            shares: Vec::new(),
            idle: idle_joules,
            unattributed: dynamic,
        };
    }
    // Each active group's total activity (for `Even`).
    let mut groups: std::collections::HashMap<G, f64> = std::collections::HashMap::new();
    if policy == IdlePolicy::Even {
        for (_, group, a) in activity {
            let a = weight(*a);
            if a > 0.0 {
                *groups.entry(*group).or_default() += a;
            }
        }
    }
    let mut shares = Vec::with_capacity(activity.len());
    let mut given_dynamic = 0.0;
    let mut given_idle = 0.0;
    for (key, group, a) in activity {
        let a = weight(*a);
        if a <= 0.0 {
            continue;
        }
        let fraction = a / total;
        let idle_share = match policy {
            IdlePolicy::Unattributed => 0.0,
            IdlePolicy::Even => {
                let group_total = groups.get(group).copied().unwrap_or(a);
                idle_joules / groups.len() as f64 * (a / group_total)
            }
            IdlePolicy::Proportional => idle_joules * fraction,
        };
        given_dynamic += dynamic * fraction;
        given_idle += idle_share;
        shares.push((*key, dynamic * fraction, idle_share));
    }
    // Rounding leaves a few ulps over or under. The largest share absorbs
    // them (it is a sizeable part of the total, so it cannot turn
    // negative), which keeps the sum exact and the node buckets at exactly
    // what the policy leaves there, never a negative crumb.
    let idle_to_give = match policy {
        IdlePolicy::Unattributed => 0.0,
        IdlePolicy::Even | IdlePolicy::Proportional => idle_joules,
    };
    if let Some(largest) = shares
        .iter_mut()
        .max_by(|a, b| (a.1 + a.2).total_cmp(&(b.1 + b.2)))
    {
        largest.1 = (largest.1 + dynamic - given_dynamic).max(0.0);
        largest.2 = (largest.2 + idle_to_give - given_idle).max(0.0);
    }
    Split {
        shares,
        idle: idle_joules - idle_to_give,
        unattributed: 0.0,
    }
}

/// Idle power of one domain: configured, or learned as a low percentile of
/// the power observed over a window (the machine is idle some of the time,
/// and the low end of what it draws is what it draws doing nothing).
///
/// The window is kept twice: in arrival order (to drop the oldest) and
/// sorted (to read the percentile). Each sample costs a binary search and
/// a shift of the sorted copy (an hour of 1 s samples is 28 KiB), instead
/// of sorting the window every interval.
#[derive(Clone, Debug)]
pub struct IdleBaseline {
    configured_watts: Option<f64>,
    window: VecDeque<f64>,
    sorted: Vec<f64>,
    capacity: usize,
    percentile: f64,
}

/// Samples a learned baseline needs before it is used: until then a busy
/// start would pass for idle. Before, the idle part is zero (all energy is
/// dynamic and goes to whoever ran).
pub const LEARNED_BASELINE_MIN_SAMPLES: usize = 60;

impl IdleBaseline {
    /// Learned: the `percentile` (0..1) of the last `capacity` samples.
    pub fn learned(capacity: usize, percentile: f64) -> Self {
        Self {
            configured_watts: None,
            window: VecDeque::with_capacity(capacity.max(1)),
            sorted: Vec::with_capacity(capacity.max(1)),
            capacity: capacity.max(1),
            percentile: percentile.clamp(0.0, 1.0),
        }
    }

    pub fn configured(watts: f64) -> Self {
        Self {
            configured_watts: Some(watts.max(0.0)),
            window: VecDeque::new(),
            sorted: Vec::new(),
            capacity: 1,
            percentile: 0.0,
        }
    }

    pub fn observe(&mut self, watts: f64) {
        if self.configured_watts.is_some() || !watts.is_finite() || watts < 0.0 {
            return;
        }
        if self.window.len() == self.capacity
            && let Some(oldest) = self.window.pop_front()
        {
            let at = self
                .sorted
                .partition_point(|w| w.total_cmp(&oldest).is_lt());
            self.sorted.remove(at);
        }
        self.window.push_back(watts);
        let at = self.sorted.partition_point(|w| w.total_cmp(&watts).is_lt());
        self.sorted.insert(at, watts);
    }

    pub fn is_configured(&self) -> bool {
        self.configured_watts.is_some()
    }

    /// The idle power in watts (0 until enough samples were seen).
    pub fn watts(&self) -> f64 {
        if let Some(watts) = self.configured_watts {
            return watts;
        }
        if self.sorted.len() < LEARNED_BASELINE_MIN_SAMPLES.min(self.capacity) {
            return 0.0;
        }
        let rank = ((self.sorted.len() - 1) as f64 * self.percentile).round() as usize;
        self.sorted[rank]
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn sum(split: &Split<u32>) -> f64 {
        split.shares.iter().map(|(_, d, i)| d + i).sum::<f64>() + split.idle + split.unattributed
    }

    #[test]
    fn dynamic_energy_follows_activity() {
        let split = split(
            100.0,
            20.0,
            &[(1u32, 1u32, 3.0), (2, 2, 1.0)],
            IdlePolicy::Unattributed,
        );
        assert_eq!(split.shares, vec![(1, 60.0, 0.0), (2, 20.0, 0.0)]);
        assert_eq!(split.idle, 20.0);
        assert_eq!(split.unattributed, 0.0);
    }

    #[test]
    fn idle_policies() {
        let even = split(
            100.0,
            20.0,
            &[(1u32, 1u32, 3.0), (2, 2, 1.0), (3, 3, 0.0)],
            IdlePolicy::Even,
        );
        assert_eq!(even.shares, vec![(1, 60.0, 10.0), (2, 20.0, 10.0)]);
        assert!(even.idle.abs() < 1e-12);
        let proportional = split(
            100.0,
            20.0,
            &[(1u32, 1u32, 3.0), (2, 2, 1.0)],
            IdlePolicy::Proportional,
        );
        assert_eq!(proportional.shares, vec![(1, 60.0, 15.0), (2, 20.0, 5.0)]);
    }

    #[test]
    fn even_shares_idle_between_workloads_not_processes() {
        // Workload 7 has three processes, workload 8 one: each workload gets
        // half the idle energy, shared inside by activity.
        let even = split(
            40.0,
            20.0,
            &[(1u32, 7u32, 1.0), (2, 7, 1.0), (3, 7, 2.0), (4, 8, 1.0)],
            IdlePolicy::Even,
        );
        let idle_of = |key: u32| even.shares.iter().find(|s| s.0 == key).unwrap().2;
        assert_eq!(idle_of(4), 10.0);
        assert_eq!(idle_of(1) + idle_of(2) + idle_of(3), 10.0);
        assert_eq!(idle_of(3), 5.0);
        assert_eq!(even.idle, 0.0);
    }

    #[test]
    fn nothing_ran_means_unattributed() {
        let split = split(10.0, 4.0, &[(1u32, 1u32, 0.0)], IdlePolicy::Even);
        assert!(split.shares.is_empty());
        assert_eq!((split.idle, split.unattributed), (4.0, 6.0));
    }

    #[test]
    fn idle_above_measured_is_clamped() {
        let split = split(10.0, 50.0, &[(1u32, 1u32, 1.0)], IdlePolicy::Unattributed);
        assert_eq!(split.idle, 10.0);
        assert_eq!(split.shares, vec![(1, 0.0, 0.0)]);
    }

    #[test]
    fn learned_baseline_is_a_low_percentile() {
        let mut baseline = IdleBaseline::learned(100, 0.05);
        for watts in (0..59).map(f64::from) {
            baseline.observe(watts + 10.0);
        }
        assert_eq!(baseline.watts(), 0.0, "not enough samples yet");
        for watts in (59..100).map(f64::from) {
            baseline.observe(watts + 10.0);
        }
        assert_eq!(baseline.watts(), 15.0);
        baseline.observe(f64::NAN);
        assert_eq!(IdleBaseline::configured(7.5).watts(), 7.5);
    }

    proptest! {
        /// The kept-sorted window reads the same percentile as sorting the
        /// window's samples would.
        #[test]
        fn the_window_percentile_is_the_sorted_windows(
            samples in proptest::collection::vec(0.0f64..500.0, 0..400),
            capacity in 1usize..120,
            percentile in 0.0f64..1.0,
        ) {
            let mut baseline = IdleBaseline::learned(capacity, percentile);
            for watts in &samples {
                baseline.observe(*watts);
            }
            let start = samples.len().saturating_sub(capacity);
            let mut window = samples[start..].to_vec();
            window.sort_by(f64::total_cmp);
            let expected = if window.len() < LEARNED_BASELINE_MIN_SAMPLES.min(capacity) {
                0.0
            } else {
                window[((window.len() - 1) as f64 * percentile).round() as usize]
            };
            prop_assert_eq!(baseline.watts(), expected);
        }

        /// The books balance whatever the inputs.
        #[test]
        fn conservation(
            measured in 0.0f64..1e6,
            idle in -10.0f64..2e6,
            activity in proptest::collection::vec((0u32..6, -1.0f64..1e9), 0..50),
            policy in prop_oneof![Just(IdlePolicy::Unattributed), Just(IdlePolicy::Even), Just(IdlePolicy::Proportional)],
        ) {
            let activity: Vec<(u32, u32, f64)> = activity.into_iter().enumerate().map(|(i, (group, a))| (i as u32, group, a)).collect();
            let split = split(measured, idle, &activity, policy);
            prop_assert!((sum(&split) - measured).abs() <= 1e-9 * measured.max(1.0));
            prop_assert!(split.shares.iter().all(|(_, d, i)| *d >= 0.0 && *i >= 0.0));
            prop_assert!(split.idle >= -1e-9 && split.unattributed >= -1e-9);
        }

        /// `Even`: every active workload gets the same idle energy.
        #[test]
        fn even_is_even_per_workload(
            idle in 0.0f64..1e4,
            activity in proptest::collection::vec((0u32..6, 1.0f64..1e9), 1..50),
        ) {
            let entries: Vec<(u32, u32, f64)> = activity.iter().enumerate().map(|(i, (group, a))| (i as u32, *group, *a)).collect();
            let split = split(1e5 + idle, idle, &entries, IdlePolicy::Even);
            let mut per_group: std::collections::BTreeMap<u32, f64> = std::collections::BTreeMap::new();
            for (key, _, share) in &split.shares {
                *per_group.entry(entries[*key as usize].1).or_default() += share;
            }
            let expected = idle / per_group.len() as f64;
            for share in per_group.values() {
                // The largest share absorbs rounding: a few ulps of the total.
                prop_assert!((share - expected).abs() <= 1e-9 * idle.max(1.0));
            }
        }

        /// Shares are proportional to activity.
        #[test]
        fn proportionality(a in 1.0f64..1e9, b in 1.0f64..1e9, measured in 1.0f64..1e4) {
            let split = split(measured, 0.0, &[(1u32, 1u32, a), (2, 2, b)], IdlePolicy::Unattributed);
            let ratio = split.shares[0].1 / split.shares[1].1;
            prop_assert!((ratio - a / b).abs() <= 1e-9 * (a / b));
        }
    }
}
