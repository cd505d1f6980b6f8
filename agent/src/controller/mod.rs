//! The adaptive power-cap controller: reads each interval's figures,
//! decides, and (in `enforce` mode) writes through actuators.
//!
//! - [`settings`]: the `[controller]` table, checked at start.
//! - [`budget`]: the node-budget policy (PI, least harm first).
//! - [`thermal`]: the thermal guard (a cap that follows temperature).
//! - [`efficiency`]: the per-device search for the cheapest energy-time limit.
//! - [`actuators`]: RAPL package limits and container CPU bandwidth.
//! - [`state`]: originals on disk before the first write; restored on exit
//!   and, after a crash, on the next start before anything else.
//!
//! Safety rules, in the code below: `observe` writes nothing; nothing goes
//! outside the hardware's bounds or the configured floor and ceiling; a
//! container's own quota (a Kubernetes CPU limit) is never raised; stale
//! measurements put every original back; a failed write is logged, counted
//! and shown, and the controller keeps observing.

pub mod actuators;
pub mod budget;
pub mod efficiency;
pub mod settings;
pub mod state;
pub mod thermal;

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, RwLock},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use self::{
    actuators::{Actuator, CapZone, Limit, Target},
    budget::{BudgetController, ContainerLever, DeviceLever, Tuning},
    settings::{ControllerSettings, Mode, ThrottleClass},
    state::{StateFile, restore},
};
use crate::{
    cgroup::QosClass,
    energy::Domain,
    view::{Figures, time_text},
};

/// One container as the controller sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct ContainerObservation {
    pub cgroup: String,
    pub class: ThrottleClass,
    pub watts: f64,
    pub cores: f64,
}

/// What one interval tells the controller.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    pub sequence: u64,
    /// Measured node power (psys, else package + dram, plus GPUs); `None`
    /// when no energy source delivered.
    pub node_watts: Option<f64>,
    pub containers: Vec<ContainerObservation>,
    /// Package power per socket.
    pub package_watts: BTreeMap<u32, f64>,
    /// Package temperature and critical temperature per socket (°C).
    pub package_celsius: BTreeMap<u32, (f64, f64)>,
    /// GPU power per NVML index.
    pub gpu_watts: BTreeMap<u32, f64>,
    /// Seconds the interval lasted.
    pub interval_seconds: f64,
    /// CPU time delivered in the interval, all CPUs (the efficiency
    /// search's work signal for packages).
    pub cpu_seconds: f64,
}

impl Observation {
    pub fn from_figures(figures: &Figures) -> Self {
        let measured = &figures.node.power_watts.books.measured;
        let node_watts = match measured.psys {
            Some(psys) => Some(psys + measured.gpu.unwrap_or(0.0)),
            None if measured.package.is_some() || measured.gpu.is_some() => Some(measured.total),
            None => None,
        };
        let containers = figures
            .containers
            .iter()
            .filter(|c| !c.exited && c.owner_uid.is_none())
            .filter_map(|c| {
                let qos = match c.pod_qos.as_deref() {
                    Some("besteffort") => Some(QosClass::BestEffort),
                    Some("burstable") => Some(QosClass::Burstable),
                    Some("guaranteed") => Some(QosClass::Guaranteed),
                    _ => None,
                };
                Some(ContainerObservation {
                    cgroup: c.cgroup_path.clone()?,
                    class: ThrottleClass::of(qos),
                    watts: c.energy.power_watts.total,
                    cores: c.cpu_cores,
                })
            })
            .collect();
        let mut package_watts = BTreeMap::new();
        for device in &figures.node.devices {
            if device.id.domain == Domain::Package {
                *package_watts.entry(device.id.index).or_insert(0.0) += device.power_watts;
            }
        }
        let mut package_celsius = BTreeMap::new();
        for temperature in &figures.node.temperatures {
            if let (Some(socket), Some(critical)) =
                (temperature.socket, temperature.critical_celsius)
            {
                let entry = package_celsius
                    .entry(socket)
                    .or_insert((temperature.celsius, critical));
                // The hottest sensor of the socket counts.
                if temperature.celsius > entry.0 {
                    *entry = (temperature.celsius, critical);
                }
            }
        }
        let gpu_watts = figures
            .node
            .gpus
            .iter()
            .filter_map(|gpu| Some((gpu.index, gpu.power_watts?)))
            .collect();
        let interval_seconds = figures.interval_seconds;
        let cpus = figures.node.cpu_busy_seconds_by_cpu.len().max(1) as f64;
        Self {
            sequence: figures.sequence,
            node_watts,
            containers,
            package_watts,
            package_celsius,
            gpu_watts,
            interval_seconds,
            cpu_seconds: figures.node.cpu_utilization * cpus * interval_seconds,
        }
    }
}

/// One decision, as logged and shown.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    #[serde(with = "time_text")]
    pub at: SystemTime,
    pub target: String,
    pub old: String,
    pub new: String,
    pub reason: String,
    /// `false` in observe mode, or when the write failed.
    pub applied: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TargetStatus {
    pub target: String,
    pub original: String,
    pub current: String,
    /// The cap in force, for a power-capped device (W).
    pub cap_watts: Option<f64>,
    /// The CPU allowed, for a throttled container.
    pub cpu_limit_cpus: Option<f64>,
}

/// `GET /api/v1/controller`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ControllerStatus {
    pub mode: String,
    pub budget_watts: Option<f64>,
    pub measured_watts: Option<f64>,
    /// budget − measured (negative: over budget).
    pub headroom_watts: Option<f64>,
    /// Measurements stopped (or an energy source failed): every original
    /// is back and nothing is adjusted until they return.
    pub stale: bool,
    pub policies: BTreeMap<String, String>,
    pub targets: Vec<TargetStatus>,
    pub write_failures: u64,
    pub decisions: Vec<Decision>,
}

impl ControllerStatus {
    pub fn off() -> Self {
        Self {
            mode: Mode::Off.as_str().to_owned(),
            budget_watts: None,
            measured_watts: None,
            headroom_watts: None,
            stale: false,
            policies: BTreeMap::new(),
            targets: Vec::new(),
            write_failures: 0,
            decisions: Vec::new(),
        }
    }
}

/// The latest status, shared with the API.
pub type SharedControllerStatus = Arc<RwLock<ControllerStatus>>;

/// A copy of the latest status (a writer that panicked left a complete
/// value behind: it is still the latest).
pub fn latest_status(shared: &SharedControllerStatus) -> ControllerStatus {
    shared
        .read()
        .map(|status| status.clone())
        .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
}

/// Decisions kept for the API.
const DECISIONS_KEPT: usize = 50;

/// Changes smaller than this fraction are not written (no rewriting of the
/// same value). Far below the budget policy's deadband (2%, where the
/// hysteresis lives): a larger one would leave the controller stuck just
/// outside the band, its steps too small to write.
const MIN_CHANGE: f64 = 0.002;

pub struct Controller {
    settings: ControllerSettings,
    actuator: Box<dyn Actuator>,
    /// Devices whose power can be capped: RAPL packages, GPUs.
    zones: Vec<CapZone>,
    state: StateFile,
    budget: BudgetController,
    /// Limits the controller has set (or, observing, would have set).
    in_force: BTreeMap<Target, Limit>,
    /// Originals read before the first change (observe mode keeps them here
    /// only; enforce also on disk).
    originals: BTreeMap<Target, Limit>,
    decisions: VecDeque<Decision>,
    last_sequence: Option<u64>,
    write_failures: u64,
    cpus: f64,
    stale: bool,
    last_measured: Option<f64>,
    /// The thermal guard's state per socket.
    thermal: BTreeMap<u32, thermal::ThermalGuard>,
    /// The efficiency search's state per socket.
    efficiency: BTreeMap<u32, efficiency::EfficiencySearch>,
}

impl Controller {
    /// Puts back whatever a previous run left (it crashed or was killed),
    /// before anything else.
    pub fn new(
        settings: ControllerSettings,
        mut actuator: Box<dyn Actuator>,
        zones: Vec<CapZone>,
        cpus: usize,
    ) -> Result<Self, state::StateError> {
        if let Some(leftover) = StateFile::leftover(&settings.state_file)? {
            warn!(
                file = %settings.state_file.display(),
                previous_pid = leftover.pid,
                targets = leftover.originals.len(),
                "controller: a previous run did not stop cleanly; putting its original limits back"
            );
            for error in restore(&leftover, actuator.as_mut()) {
                warn!("controller: restoring: {error}");
            }
            let _ = std::fs::remove_file(&settings.state_file);
        }
        Ok(Self {
            state: StateFile::new(settings.state_file.clone()),
            settings,
            actuator,
            zones,
            budget: BudgetController::new(Tuning::default()),
            in_force: BTreeMap::new(),
            originals: BTreeMap::new(),
            decisions: VecDeque::new(),
            last_sequence: None,
            write_failures: 0,
            cpus: cpus.max(1) as f64,
            stale: false,
            last_measured: None,
            thermal: BTreeMap::new(),
            efficiency: BTreeMap::new(),
        })
    }

    pub fn mode(&self) -> Mode {
        self.settings.mode
    }

    /// Whether any policy has something to do (else the agent does not
    /// build observations for it).
    pub fn has_policy(&self) -> bool {
        self.settings.mode != Mode::Off
            && (self.settings.budget_watts.is_some()
                || self.settings.thermal_margin_celsius.is_some())
    }

    /// One interval.
    pub fn step(&mut self, observation: &Observation) {
        if self.settings.mode == Mode::Off {
            return;
        }
        let fresh = self.last_sequence != Some(observation.sequence);
        self.last_sequence = Some(observation.sequence);
        self.last_measured = observation.node_watts;
        let (Some(measured), true) = (observation.node_watts, fresh) else {
            if !self.stale {
                warn!("controller: measurements are stale or missing; putting every original back");
                self.stale = true;
                self.budget.reset();
                self.restore_all("measurements stale");
            }
            return;
        };
        self.stale = false;
        self.forget_exited(observation);
        // The levers as they are.
        let mut container_targets = Vec::new();
        let mut containers = Vec::new();
        for container in &observation.containers {
            let Some(rank) = self.settings.rank(container.class) else {
                continue;
            };
            let target = Target::CpuBandwidth {
                cgroup: container.cgroup.clone(),
            };
            let allowed = match self.in_force.get(&target) {
                Some(Limit::CpuBandwidth {
                    quota_us: Some(quota),
                    period_us,
                }) => Some(*quota as f64 / (*period_us).max(1) as f64),
                _ => None,
            };
            containers.push(ContainerLever {
                class_rank: rank,
                watts: container.watts,
                cores: container.cores,
                allowed_cores: allowed,
            });
            container_targets.push(target);
        }
        let mut devices = Vec::new();
        let mut device_targets = Vec::new();
        for zone in self.zones.clone() {
            let Some(original) = self.original_of(&zone.target) else {
                continue;
            };
            let (original_watts, floor_setting, ceiling_setting, watts) =
                match (&zone.target, &original) {
                    (Target::RaplPackage { socket, .. }, Limit::PowerCap { limit_uw, .. }) => (
                        *limit_uw as f64 / 1e6,
                        self.settings.floor_watts.package,
                        self.settings.ceiling_watts.package,
                        observation.package_watts.get(socket),
                    ),
                    (Target::GpuPower { index }, Limit::GpuPower { limit_mw }) => (
                        f64::from(*limit_mw) / 1e3,
                        self.settings.floor_watts.gpu,
                        self.settings.ceiling_watts.gpu,
                        observation.gpu_watts.get(index),
                    ),
                    _ => continue,
                };
            // Never above the hardware's maximum, the configured ceiling,
            // or the limit the device had before.
            let ceiling = [zone.max_watts, ceiling_setting, Some(original_watts)]
                .into_iter()
                .flatten()
                .fold(f64::INFINITY, f64::min);
            // Without a hardware minimum, a tenth of the ceiling: RAPL does
            // not hold a socket much below that anyway.
            let floor = [zone.min_watts, floor_setting]
                .into_iter()
                .flatten()
                .fold(ceiling * 0.1, f64::max)
                .min(ceiling);
            let cap = match self.in_force.get(&zone.target) {
                Some(Limit::PowerCap {
                    limit_uw,
                    enabled: true,
                }) => Some(*limit_uw as f64 / 1e6),
                Some(Limit::GpuPower { limit_mw }) => Some(f64::from(*limit_mw) / 1e3),
                _ => None,
            };
            devices.push(DeviceLever {
                watts: watts.copied().unwrap_or(0.0),
                cap_watts: cap,
                floor_watts: floor,
                ceiling_watts: ceiling,
            });
            device_targets.push(zone.target.clone());
        }
        let (allocation, reason) = match self.settings.budget_watts {
            Some(budget) => {
                let allocation =
                    self.budget
                        .step(measured, budget, &containers, &devices, self.cpus);
                let reason = format!(
                    "node {measured:.1} W, budget {budget:.1} W: {} {:.1} W",
                    if allocation.delta_watts >= 0.0 {
                        "shed"
                    } else {
                        "release"
                    },
                    allocation.delta_watts.abs()
                );
                (allocation, reason)
            }
            None => (
                budget::Allocation {
                    container_cores: vec![None; containers.len()],
                    device_caps: vec![None; devices.len()],
                    delta_watts: 0.0,
                },
                "no budget".to_owned(),
            ),
        };
        for (target, cores) in container_targets.iter().zip(&allocation.container_cores) {
            self.set_bandwidth(target, *cores, &reason);
        }
        for ((target, device), budget_cap) in device_targets
            .iter()
            .zip(&devices)
            .zip(&allocation.device_caps)
        {
            // The thermal guard's cap, where it is lower.
            let socket = match target {
                Target::RaplPackage { socket, .. } => *socket,
                // The thermal guard watches sockets only, for now.
                Target::GpuPower { .. } => {
                    self.set_cap(target, *budget_cap, &reason);
                    continue;
                }
                Target::CpuBandwidth { .. } => continue,
            };
            let thermal_cap = match (
                self.settings.thermal_margin_celsius,
                observation.package_celsius.get(&socket),
            ) {
                (Some(margin), Some((celsius, critical))) => {
                    self.thermal.entry(socket).or_default().step(
                        *celsius,
                        *critical,
                        margin,
                        device.watts,
                        device.floor_watts,
                        device.ceiling_watts,
                    )
                }
                _ => None,
            };
            // The efficiency search's limit: a ceiling for the others.
            let efficiency_cap = if self.settings.efficiency_search {
                let search = self.efficiency.entry(socket).or_insert_with(|| {
                    efficiency::EfficiencySearch::new(
                        device.floor_watts,
                        device.ceiling_watts,
                        self.settings.efficiency_eta,
                    )
                });
                let limit = search.step(
                    device.watts * observation.interval_seconds,
                    observation.cpu_seconds,
                    observation.interval_seconds,
                );
                (limit < device.ceiling_watts).then_some(limit)
            } else {
                None
            };
            let lowest = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let cap = lowest(lowest(*budget_cap, thermal_cap), efficiency_cap);
            let why = if cap.is_some() && cap == thermal_cap {
                "thermal guard".to_owned()
            } else if cap.is_some() && cap == efficiency_cap && cap != *budget_cap {
                format!(
                    "efficiency search (eta {}): cheapest energy-time limit",
                    self.settings.efficiency_eta
                )
            } else {
                reason.clone()
            };
            let why = match (why.as_str(), observation.package_celsius.get(&socket)) {
                ("thermal guard", Some((celsius, critical))) => format!(
                    "thermal guard: socket {socket} at {celsius:.1} °C, critical {critical:.1} °C"
                ),
                _ => why,
            };
            self.set_cap(target, cap, &why);
        }
    }

    /// The original of `target`: saved, or read now.
    fn original_of(&mut self, target: &Target) -> Option<Limit> {
        if let Some(original) = self.originals.get(target) {
            return Some(original.clone());
        }
        match self.actuator.read(target) {
            Ok(original) => {
                self.originals.insert(target.clone(), original.clone());
                Some(original)
            }
            Err(error) => {
                warn!(target = target.name(), "controller: cannot read: {error}");
                None
            }
        }
    }

    fn set_bandwidth(&mut self, target: &Target, cores: Option<f64>, reason: &str) {
        let Some(original) = self.original_of(target) else {
            return;
        };
        let Limit::CpuBandwidth {
            quota_us: original_quota,
            period_us,
        } = original
        else {
            return;
        };
        let wanted = match cores {
            // Never above the container's own quota (its CPU limit).
            Some(cores) => {
                let quota = (cores * period_us as f64).round().max(1000.0) as u64;
                Limit::CpuBandwidth {
                    quota_us: Some(original_quota.map_or(quota, |q| q.min(quota))),
                    period_us,
                }
            }
            None => original.clone(),
        };
        let current = self.in_force.get(target).cloned().unwrap_or(original);
        let differs = match (&current, &wanted) {
            (
                Limit::CpuBandwidth {
                    quota_us: Some(a), ..
                },
                Limit::CpuBandwidth {
                    quota_us: Some(b), ..
                },
            ) => (*a as f64 - *b as f64).abs() > MIN_CHANGE * period_us as f64,
            (a, b) => a != b,
        };
        if differs {
            self.change(target, &current, wanted, reason);
        }
    }

    fn set_cap(&mut self, target: &Target, watts: Option<f64>, reason: &str) {
        let Some(original) = self.original_of(target) else {
            return;
        };
        let wanted = match (watts, target) {
            (Some(watts), Target::GpuPower { .. }) => Limit::GpuPower {
                limit_mw: (watts * 1e3).round() as u32,
            },
            (Some(watts), _) => Limit::PowerCap {
                limit_uw: (watts * 1e6).round() as u64,
                enabled: true,
            },
            (None, _) => original.clone(),
        };
        let current = self.in_force.get(target).cloned().unwrap_or(original);
        let watts_of = |limit: &Limit| match limit {
            Limit::PowerCap {
                limit_uw,
                enabled: true,
            } => Some(*limit_uw as f64 / 1e6),
            Limit::GpuPower { limit_mw } => Some(f64::from(*limit_mw) / 1e3),
            _ => None,
        };
        let differs = match (watts_of(&current), watts_of(&wanted)) {
            (Some(a), Some(b)) => (a - b).abs() > MIN_CHANGE * a.max(1.0),
            _ => current != wanted,
        };
        if differs {
            self.change(target, &current, wanted, reason);
        }
    }

    /// Records a decision and, enforcing, writes it (the original on disk
    /// first).
    fn change(&mut self, target: &Target, old: &Limit, new: Limit, reason: &str) {
        let mut applied = false;
        let mut note = reason.to_owned();
        if self.settings.mode == Mode::Enforce {
            let saved = match self.originals.get(target) {
                Some(original) => self.state.remember(target, original.clone()),
                None => Ok(()),
            };
            match saved
                .map_err(|e| e.to_string())
                .and_then(|()| self.actuator.write(target, &new).map_err(|e| e.to_string()))
            {
                Ok(()) => applied = true,
                Err(error) => {
                    self.write_failures += 1;
                    warn!(target = target.name(), "controller: write failed: {error}");
                    note = format!("{reason}; write failed: {error}");
                }
            }
        }
        info!(
            target = target.name(),
            old = old.describe(),
            new = new.describe(),
            applied,
            "controller: {note}"
        );
        self.push_decision(target, old, &new, note, applied);
        if applied || self.settings.mode == Mode::Observe {
            let back_to_original = self.originals.get(target) == Some(&new);
            if back_to_original {
                self.in_force.remove(target);
                let _ = self.state.forget(target);
            } else {
                self.in_force.insert(target.clone(), new);
            }
        }
    }

    fn push_decision(
        &mut self,
        target: &Target,
        old: &Limit,
        new: &Limit,
        reason: String,
        applied: bool,
    ) {
        if self.decisions.len() == DECISIONS_KEPT {
            self.decisions.pop_front();
        }
        self.decisions.push_back(Decision {
            at: SystemTime::now(),
            target: target.name(),
            old: old.describe(),
            new: new.describe(),
            reason,
            applied,
        });
    }

    /// A container that is gone takes its throttle with it.
    fn forget_exited(&mut self, observation: &Observation) {
        let alive: Vec<&str> = observation
            .containers
            .iter()
            .map(|c| c.cgroup.as_str())
            .collect();
        let gone: Vec<Target> = self
            .in_force
            .keys()
            .filter(|target| matches!(target, Target::CpuBandwidth { cgroup } if !alive.contains(&cgroup.as_str())))
            .cloned()
            .collect();
        for target in gone {
            self.in_force.remove(&target);
            self.originals.remove(&target);
            let _ = self.state.forget(&target);
        }
    }

    /// Puts every original back (exit, stale measurements, policy off).
    pub fn restore_all(&mut self, reason: &str) {
        let targets: Vec<(Target, Limit)> = self
            .in_force
            .keys()
            .filter_map(|target| Some((target.clone(), self.originals.get(target)?.clone())))
            .collect();
        for (target, original) in targets {
            let current = self
                .in_force
                .get(&target)
                .cloned()
                .unwrap_or(original.clone());
            self.change(&target, &current, original, reason);
        }
        // Anything still on disk (a write that failed just now) is put back
        // on the next start.
    }

    pub fn status(&self) -> ControllerStatus {
        let budget = self.settings.budget_watts;
        let mut policies = BTreeMap::new();
        policies.insert(
            "efficiency_search".to_owned(),
            if self.settings.efficiency_search {
                let limits: Vec<String> = self
                    .efficiency
                    .iter()
                    .map(|(socket, search)| format!("socket {socket}: {:.1} W", search.limit()))
                    .collect();
                format!("on ({})", limits.join(", "))
            } else {
                "off".to_owned()
            },
        );
        policies.insert(
            "thermal_guard".to_owned(),
            match self.settings.thermal_margin_celsius {
                None => "off (no thermal_margin_celsius)".to_owned(),
                Some(_) if self.thermal.values().any(|g| g.cap_watts().is_some()) => {
                    "limiting".to_owned()
                }
                Some(_) => "idle".to_owned(),
            },
        );
        policies.insert(
            "budget".to_owned(),
            match (budget, self.stale) {
                (None, _) => "off (no budget_watts)".to_owned(),
                (Some(_), true) => "paused (stale measurements)".to_owned(),
                (Some(_), false) if self.in_force.is_empty() => "idle".to_owned(),
                (Some(_), false) => "limiting".to_owned(),
            },
        );
        ControllerStatus {
            mode: self.settings.mode.as_str().to_owned(),
            budget_watts: budget,
            measured_watts: self.last_measured,
            headroom_watts: budget.zip(self.last_measured).map(|(b, m)| b - m),
            stale: self.stale,
            policies,
            targets: self
                .in_force
                .iter()
                .map(|(target, current)| TargetStatus {
                    target: target.name(),
                    original: self
                        .originals
                        .get(target)
                        .map_or_else(String::new, Limit::describe),
                    current: current.describe(),
                    cap_watts: match current {
                        Limit::PowerCap { limit_uw, .. } => Some(*limit_uw as f64 / 1e6),
                        Limit::GpuPower { limit_mw } => Some(f64::from(*limit_mw) / 1e3),
                        Limit::CpuBandwidth { .. } => None,
                    },
                    cpu_limit_cpus: match current {
                        Limit::CpuBandwidth {
                            quota_us: Some(quota),
                            period_us,
                        } => Some(*quota as f64 / (*period_us).max(1) as f64),
                        _ => None,
                    },
                })
                .collect(),
            write_failures: self.write_failures,
            decisions: self.decisions.iter().cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests;
