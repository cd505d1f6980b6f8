//! The node-budget policy: a PI controller in velocity form on "watts to
//! shed", handed out in order of least harm.
//!
//! Each interval, with measured node power `P`, budget `B`, deadband `d`
//! (2%) and `e = P − B·(1 − d)` (over the setpoint: positive):
//!
//! ```text
//! Δ = Kp·(e − e_prev) + Ki·e         (watts to shed more, or release if < 0)
//! Δ = clamp(Δ, −R, R)                (rate limit: R = 20% of the budget)
//! ```
//!
//! The velocity form acts on the levers as they are, so it has no integral
//! to wind up: a lever at its floor or ceiling simply takes no more.
//! Within `d·B` of the setpoint nothing moves (hysteresis), so power rests
//! between `B·(1 − 2d)` and `B`.
//!
//! Shedding goes first to the throttleable containers, class by class
//! (BestEffort before Burstable), each in proportion to the power it draws,
//! down to a floor of CPU; what they cannot absorb goes to the device caps,
//! shared in proportion to each device's draw above its floor (a busy GPU is
//! not starved to feed an idle socket). Releasing goes the other way:
//! device caps first, then containers, the last class throttled first.

/// One container the policy may throttle, as it is now.
#[derive(Clone, Debug, PartialEq)]
pub struct ContainerLever {
    /// Position in the throttle order (0 = throttled first).
    pub class_rank: usize,
    /// Power it drew over the last interval (W).
    pub watts: f64,
    /// CPUs it used over the last interval.
    pub cores: f64,
    /// CPUs it is allowed now (`None`: unthrottled).
    pub allowed_cores: Option<f64>,
}

/// One device whose power cap the policy may lower, as it is now.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceLever {
    /// Power it drew over the last interval (W).
    pub watts: f64,
    /// The cap in force (`None`: uncapped, i.e. at the ceiling).
    pub cap_watts: Option<f64>,
    pub floor_watts: f64,
    pub ceiling_watts: f64,
}

/// What the levers should be for the next interval.
#[derive(Clone, Debug, PartialEq)]
pub struct Allocation {
    /// Per container: CPUs allowed, `None` for unthrottled.
    pub container_cores: Vec<Option<f64>>,
    /// Per device: the cap, `None` for uncapped.
    pub device_caps: Vec<Option<f64>>,
    /// Watts shed more (negative: released) this interval.
    pub delta_watts: f64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tuning {
    pub proportional: f64,
    pub integral: f64,
    /// |e| below this fraction of the budget moves nothing.
    pub deadband: f64,
    /// Most watts shed or released in one interval, as a fraction of the
    /// budget.
    pub max_step: f64,
}

impl Default for Tuning {
    /// Tuned on the simulated plant and on the real kernel (see the tests):
    /// power answers a lever within one interval, but CPU quotas are
    /// enforced per 100 ms period and attribution is noisy, so the
    /// proportional part (on the change of the error: the derivative of the
    /// positional form) stays small; with 0.3/0.6 the end-to-end test swung
    /// between 48 and 61 W around a 55 W budget.
    fn default() -> Self {
        Self {
            proportional: 0.1,
            integral: 0.4,
            deadband: 0.02,
            max_step: 0.2,
        }
    }
}

/// Least CPU a throttled container keeps: it must still make progress (and
/// answer its health checks).
pub const MIN_CONTAINER_CORES: f64 = 0.05;

#[derive(Clone, Debug, Default)]
pub struct BudgetController {
    tuning: Tuning,
    previous_error: Option<f64>,
}

impl BudgetController {
    pub fn new(tuning: Tuning) -> Self {
        Self {
            tuning,
            previous_error: None,
        }
    }

    /// Forgets the past (the policy was off, or measurements stale).
    pub fn reset(&mut self) {
        self.previous_error = None;
    }

    /// One interval. `cpus` is the machine's CPU count: an allowance that
    /// reaches it is no limit.
    pub fn step(
        &mut self,
        measured_watts: f64,
        budget_watts: f64,
        containers: &[ContainerLever],
        devices: &[DeviceLever],
        cpus: f64,
    ) -> Allocation {
        // Aim a deadband below the budget, so that resting anywhere in the
        // deadband keeps power at or under it.
        let setpoint = budget_watts * (1.0 - self.tuning.deadband);
        let error = measured_watts - setpoint;
        let previous = self.previous_error.replace(error).unwrap_or(error);
        let mut delta = if error.abs() <= self.tuning.deadband * budget_watts {
            0.0
        } else {
            self.tuning.proportional * (error - previous) + self.tuning.integral * error
        };
        let limit = self.tuning.max_step * budget_watts;
        delta = delta.clamp(-limit, limit);
        if delta >= 0.0 {
            shed(delta, containers, devices)
        } else {
            release(-delta, containers, devices, cpus)
        }
    }
}

fn unchanged(containers: &[ContainerLever], devices: &[DeviceLever], delta: f64) -> Allocation {
    Allocation {
        container_cores: containers.iter().map(|c| c.allowed_cores).collect(),
        device_caps: devices.iter().map(|d| d.cap_watts).collect(),
        delta_watts: delta,
    }
}

/// What throttling a container to the floor would save now (W).
fn sheddable(container: &ContainerLever) -> f64 {
    if container.cores <= MIN_CONTAINER_CORES || container.watts <= 0.0 {
        return 0.0;
    }
    container.watts * (1.0 - MIN_CONTAINER_CORES / container.cores)
}

fn cap_of(device: &DeviceLever) -> f64 {
    device.cap_watts.unwrap_or(device.ceiling_watts)
}

/// Sheds `amount` more watts: containers by class, then devices.
pub fn shed(amount: f64, containers: &[ContainerLever], devices: &[DeviceLever]) -> Allocation {
    let mut allocation = unchanged(containers, devices, amount);
    let mut remaining = amount;
    let mut ranks: Vec<usize> = containers.iter().map(|c| c.class_rank).collect();
    ranks.sort_unstable();
    ranks.dedup();
    for rank in ranks {
        let members: Vec<usize> = (0..containers.len())
            .filter(|i| containers[*i].class_rank == rank && sheddable(&containers[*i]) > 0.0)
            .collect();
        let room: f64 = members.iter().map(|i| sheddable(&containers[*i])).sum();
        if remaining <= 0.0 || room <= 0.0 {
            continue;
        }
        let take = remaining.min(room);
        let power: f64 = members.iter().map(|i| containers[*i].watts).sum();
        for i in members {
            let container = &containers[i];
            let cut = (take * container.watts / power).min(sheddable(container));
            // Its power follows its CPU time: the same fraction of each.
            let cores = container.cores * (1.0 - cut / container.watts);
            allocation.container_cores[i] = Some(cores.max(MIN_CONTAINER_CORES));
        }
        remaining -= take;
    }
    if remaining > 0.0 {
        // Room under each cap, measured from what the device draws now.
        let room: Vec<f64> = devices
            .iter()
            .map(|d| (d.watts.min(cap_of(d)) - d.floor_watts).max(0.0))
            .collect();
        let total: f64 = room.iter().sum();
        if total > 0.0 {
            let take = remaining.min(total);
            for (i, device) in devices.iter().enumerate() {
                if room[i] > 0.0 {
                    let cap = device.watts.min(cap_of(device)) - take * room[i] / total;
                    allocation.device_caps[i] =
                        Some(cap.clamp(device.floor_watts, device.ceiling_watts));
                }
            }
        }
    }
    allocation
}

/// Releases `amount` watts: device caps first (in proportion to how far
/// each is below its ceiling), then containers, the last class first.
pub fn release(
    amount: f64,
    containers: &[ContainerLever],
    devices: &[DeviceLever],
    cpus: f64,
) -> Allocation {
    let mut allocation = unchanged(containers, devices, -amount);
    let mut remaining = amount;
    let below: Vec<f64> = devices
        .iter()
        .map(|d| match d.cap_watts {
            Some(cap) => (d.ceiling_watts - cap).max(0.0),
            None => 0.0,
        })
        .collect();
    let total: f64 = below.iter().sum();
    if total > 0.0 {
        let give = remaining.min(total);
        for (i, device) in devices.iter().enumerate() {
            if let Some(cap) = device.cap_watts {
                let raised = cap + give * below[i] / total;
                allocation.device_caps[i] =
                    (raised < device.ceiling_watts - 1e-9).then_some(raised);
            }
        }
        remaining -= give;
    }
    let mut ranks: Vec<usize> = containers
        .iter()
        .filter(|c| c.allowed_cores.is_some())
        .map(|c| c.class_rank)
        .collect();
    ranks.sort_unstable();
    ranks.dedup();
    for rank in ranks.into_iter().rev() {
        if remaining <= 0.0 {
            break;
        }
        let members: Vec<usize> = (0..containers.len())
            .filter(|i| containers[*i].class_rank == rank && containers[*i].allowed_cores.is_some())
            .collect();
        // Watts per CPU of each throttled container (at least a small
        // figure, so a container held at the floor can be given CPU back).
        let per_core = |c: &ContainerLever| (c.watts / c.cores.max(MIN_CONTAINER_CORES)).max(1.0);
        // Each can take back up to all the CPUs of the machine.
        let room: f64 = members
            .iter()
            .map(|i| {
                let c = &containers[*i];
                (cpus - c.allowed_cores.unwrap_or(cpus)).max(0.0) * per_core(c)
            })
            .sum();
        if room <= 0.0 {
            continue;
        }
        let give = remaining.min(room);
        for i in &members {
            let c = &containers[*i];
            let allowed = c.allowed_cores.unwrap_or(cpus);
            let share = give * ((cpus - allowed).max(0.0) * per_core(c)) / room;
            let raised = allowed + share / per_core(c);
            allocation.container_cores[*i] = (raised < cpus - 1e-9).then_some(raised);
        }
        remaining -= give;
    }
    allocation
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(class_rank: usize, watts: f64, cores: f64) -> ContainerLever {
        ContainerLever {
            class_rank,
            watts,
            cores,
            allowed_cores: None,
        }
    }

    #[test]
    fn shedding_takes_besteffort_first_by_power_then_burstable_then_devices() {
        let containers = [
            container(0, 30.0, 1.0),
            container(0, 10.0, 1.0),
            container(1, 40.0, 2.0),
        ];
        let devices = [
            DeviceLever {
                watts: 100.0,
                cap_watts: None,
                floor_watts: 40.0,
                ceiling_watts: 150.0,
            },
            DeviceLever {
                watts: 20.0,
                cap_watts: None,
                floor_watts: 10.0,
                ceiling_watts: 100.0,
            },
        ];
        // 20 W: BestEffort alone, 3:1, the same fraction of each one's CPU.
        let a = shed(20.0, &containers, &devices);
        assert!((a.container_cores[0].unwrap() - 0.5).abs() < 1e-9);
        assert!((a.container_cores[1].unwrap() - 0.5).abs() < 1e-9);
        assert_eq!(a.container_cores[2], None);
        assert_eq!(a.device_caps, vec![None, None]);
        // 60 W: BestEffort to its floor (38 W), Burstable the other 22 W.
        let a = shed(60.0, &containers, &devices);
        assert!((a.container_cores[0].unwrap() - MIN_CONTAINER_CORES).abs() < 1e-9);
        let burstable = a.container_cores[2].unwrap();
        assert!(
            (burstable - 2.0 * (1.0 - 22.0 / 40.0)).abs() < 1e-9,
            "{burstable}"
        );
        assert_eq!(a.device_caps, vec![None, None]);
        // 130 W: what the containers cannot give goes to the devices, by
        // their draw above the floor (60 : 10).
        let a = shed(130.0, &containers, &devices);
        let caps: Vec<f64> = a.device_caps.iter().map(|c| c.unwrap()).collect();
        assert!(((100.0 - caps[0]) / (20.0 - caps[1]) - 6.0).abs() < 1e-9);
    }

    #[test]
    fn releasing_lifts_device_caps_first_then_the_last_class_throttled() {
        let mut containers = [container(0, 5.0, 0.5), container(1, 10.0, 1.0)];
        containers[0].allowed_cores = Some(0.5);
        containers[1].allowed_cores = Some(1.0);
        let devices = [DeviceLever {
            watts: 60.0,
            cap_watts: Some(60.0),
            floor_watts: 40.0,
            ceiling_watts: 100.0,
        }];
        let a = release(30.0, &containers, &devices, 4.0);
        assert_eq!(a.device_caps, vec![Some(90.0)]);
        assert_eq!(a.container_cores, vec![Some(0.5), Some(1.0)]);
        let a = release(50.0, &containers, &devices, 4.0);
        assert_eq!(a.device_caps, vec![None], "the cap is gone at the ceiling");
        assert_eq!(a.container_cores[0], Some(0.5), "BestEffort waits");
        assert!(a.container_cores[1].unwrap() > 1.0);
    }
}
