//! The efficiency search: per device, the power limit that minimizes an
//! energy-time cost for the work delivered, as Zeus does for GPUs.
//!
//! It profiles a few limits from the ceiling down to the floor, each for a
//! window of intervals, and for each computes, per unit of work `W` done
//! in the window's time `T` with energy `E`:
//!
//! ```text
//! cost = η · E/W + (1 − η) · P_max · T/W
//! ```
//!
//! (`η` weighs energy against time, `P_max` the device's ceiling turns time
//! into joules). It then holds the cheapest limit, and profiles again when
//! the work rate moves by more than a third from what it was when it chose
//! (the workload changed). While it holds, an interval without work leaves
//! it where it is; a level under which no work is done is never chosen.

/// Intervals spent at each profiled limit.
pub const WINDOW: usize = 5;
/// Limits profiled, evenly from the ceiling to the floor.
pub const LEVELS: usize = 5;
/// A change of the work rate that starts a new search.
pub const WORKLOAD_CHANGE: f64 = 1.0 / 3.0;

#[derive(Clone, Debug, PartialEq)]
enum Phase {
    Profiling {
        level: usize,
        energy_j: f64,
        work: f64,
        seconds: f64,
        intervals: usize,
    },
    Holding {
        limit: f64,
        work_rate: f64,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct EfficiencySearch {
    eta: f64,
    levels: Vec<f64>,
    costs: Vec<Option<f64>>,
    /// Work per second measured at each level.
    rates: Vec<f64>,
    phase: Phase,
    /// Searches finished (for the status).
    pub searches: u32,
}

impl EfficiencySearch {
    pub fn new(floor_watts: f64, ceiling_watts: f64, eta: f64) -> Self {
        let levels: Vec<f64> = (0..LEVELS)
            .map(|i| ceiling_watts - (ceiling_watts - floor_watts) * i as f64 / (LEVELS - 1) as f64)
            .collect();
        Self {
            eta: eta.clamp(0.0, 1.0),
            costs: vec![None; levels.len()],
            rates: vec![0.0; levels.len()],
            levels,
            phase: Phase::Profiling {
                level: 0,
                energy_j: 0.0,
                work: 0.0,
                seconds: 0.0,
                intervals: 0,
            },
            searches: 0,
        }
    }

    fn ceiling(&self) -> f64 {
        self.levels[0]
    }

    /// The limit in force now (profiling: the level being measured).
    pub fn limit(&self) -> f64 {
        match &self.phase {
            Phase::Profiling { level, .. } => self.levels[*level],
            Phase::Holding { limit, .. } => *limit,
        }
    }

    /// One interval in which the device used `energy_j` and delivered
    /// `work` in `seconds`, under the limit `limit()` returned before.
    /// Returns the limit for the next interval.
    pub fn step(&mut self, energy_j: f64, work: f64, seconds: f64) -> f64 {
        if !(energy_j.is_finite() && work.is_finite() && seconds > 0.0) {
            return self.limit();
        }
        let p_max = self.ceiling();
        match &mut self.phase {
            // An idle stretch is not a new workload: hold.
            Phase::Holding { .. } if work <= 0.0 => {}
            Phase::Holding { limit, work_rate } => {
                let rate = work / seconds;
                if (rate - *work_rate).abs() > WORKLOAD_CHANGE * work_rate.max(f64::MIN_POSITIVE) {
                    // The workload changed: search again from the top.
                    let _ = limit;
                    self.costs = vec![None; self.levels.len()];
                    self.phase = Phase::Profiling {
                        level: 0,
                        energy_j: 0.0,
                        work: 0.0,
                        seconds: 0.0,
                        intervals: 0,
                    };
                }
            }
            Phase::Profiling {
                level,
                energy_j: e,
                work: w,
                seconds: t,
                intervals,
            } => {
                // The first interval at a new level still ran partly under
                // the previous one: it is not counted.
                *intervals += 1;
                if *intervals > 1 {
                    *e += energy_j;
                    *w += work;
                    *t += seconds;
                }
                if *intervals > WINDOW {
                    // A limit under which no work gets done has no cost:
                    // it is never chosen.
                    self.costs[*level] =
                        (*w > 0.0).then(|| self.eta * *e / *w + (1.0 - self.eta) * p_max * *t / *w);
                    self.rates[*level] = *w / *t;
                    let next = *level + 1;
                    if next < self.levels.len() {
                        self.phase = Phase::Profiling {
                            level: next,
                            energy_j: 0.0,
                            work: 0.0,
                            seconds: 0.0,
                            intervals: 0,
                        };
                    } else {
                        let (best, _) = self
                            .costs
                            .iter()
                            .enumerate()
                            .filter_map(|(i, c)| Some((i, (*c)?)))
                            .min_by(|a, b| a.1.total_cmp(&b.1))
                            // Nothing worked anywhere: the ceiling.
                            .unwrap_or((0, 0.0));
                        self.searches += 1;
                        // The workload is judged against the rate measured
                        // at the chosen limit.
                        self.phase = Phase::Holding {
                            limit: self.levels[best],
                            work_rate: self.rates[best],
                        };
                    }
                }
            }
        }
        self.limit()
    }

    /// (limit, cost) of every level profiled in the last search.
    pub fn profile(&self) -> Vec<(f64, Option<f64>)> {
        self.levels
            .iter()
            .copied()
            .zip(self.costs.iter().copied())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket that idles at 60 W and whose speed grows with the cube root
    /// of the power above that (frequency, with power ∝ f³): past some
    /// limit, more power buys little speed.
    fn speed(limit: f64) -> f64 {
        (limit - 60.0).max(0.0).cbrt()
    }

    fn searched(eta: f64) -> (f64, EfficiencySearch) {
        let mut search = EfficiencySearch::new(60.0, 200.0, eta);
        let mut limit = search.limit();
        for _ in 0..(LEVELS * (WINDOW + 1) + 3) {
            // Power is the limit (the socket is busy), work its speed.
            limit = search.step(limit, speed(limit), 1.0);
        }
        (limit, search)
    }

    #[test]
    fn energy_alone_picks_the_knee_time_alone_picks_the_ceiling() {
        // E/W = P / (P − 60)^(1/3) is least at P = 90 W; of the levels
        // (200, 165, 130, 95, 60) the search must pick 95 W.
        let (limit, search) = searched(1.0);
        eprintln!("η = 1: {limit} W from {:?}", search.profile());
        assert_eq!(limit, 95.0);
        assert_eq!(search.searches, 1);
        // Time alone: the fastest, the ceiling.
        assert_eq!(searched(0.0).0, 200.0);
        // Half and half lands in between.
        let (middle, _) = searched(0.5);
        assert!((95.0..=200.0).contains(&middle), "{middle}");
    }

    #[test]
    fn a_change_of_workload_starts_a_new_search() {
        let (_, mut search) = searched(1.0);
        // The work rate halves (another phase of the job).
        let limit = search.step(95.0, speed(95.0) / 2.0, 1.0);
        assert_eq!(limit, 200.0, "profiling again from the ceiling");
        // No work: it stays where it is.
        assert_eq!(search.step(95.0, 0.0, 1.0), 200.0);
    }
}
