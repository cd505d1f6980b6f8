//! The controller against a simulated plant behind the same actuator trait:
//! containers whose power follows the CPU they are allowed, a socket whose
//! power is capped by its RAPL limit.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use super::{
    actuators::{ActuatorError, CapZone},
    *,
};

const WATTS_PER_CORE: f64 = 20.0;
const BASE_WATTS: f64 = 60.0;
const PERIOD: u64 = 100_000;
const CRITICAL_CELSIUS: f64 = 95.0;

/// The plant: limits written by the controller, and what they do to power.
#[derive(Default)]
struct Plant {
    limits: HashMap<Target, Limit>,
    /// Cgroup → (class, CPU demand).
    demand: Vec<(String, ThrottleClass, f64)>,
    fail_writes: bool,
    writes: u32,
    /// A GPU drawing this much when not limited (W), if the plant has one.
    gpu_demand_watts: Option<f64>,
    /// The socket's temperature: moves a fifth of the way each interval
    /// towards 30 °C + 0.5 °C per watt (thermal inertia).
    celsius: f64,
}

#[derive(Clone)]
struct PlantHandle(Arc<Mutex<Plant>>);

impl Actuator for PlantHandle {
    fn read(&self, target: &Target) -> Result<Limit, ActuatorError> {
        let plant = self.0.lock().unwrap();
        Ok(plant.limits.get(target).cloned().unwrap_or(match target {
            Target::CpuBandwidth { .. } => Limit::CpuBandwidth {
                quota_us: None,
                period_us: PERIOD,
            },
            Target::RaplPackage { .. } => Limit::PowerCap {
                limit_uw: 250_000_000,
                enabled: false,
            },
            Target::GpuPower { .. } => Limit::GpuPower { limit_mw: 300_000 },
        }))
    }

    fn write(&mut self, target: &Target, limit: &Limit) -> Result<(), ActuatorError> {
        let mut plant = self.0.lock().unwrap();
        if plant.fail_writes {
            return Err(ActuatorError::Io {
                path: "/sys/fs/cgroup/read-only/cpu.max".into(),
                source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
            });
        }
        plant.writes += 1;
        plant.limits.insert(target.clone(), limit.clone());
        Ok(())
    }
}

fn package() -> Target {
    Target::RaplPackage {
        zone: "intel-rapl:0".into(),
        socket: 0,
    }
}

impl PlantHandle {
    fn new(demand: &[(&str, ThrottleClass, f64)]) -> Self {
        Self(Arc::new(Mutex::new(Plant {
            demand: demand
                .iter()
                .map(|(cgroup, class, cores)| ((*cgroup).to_owned(), *class, *cores))
                .collect(),
            ..Plant::default()
        })))
    }

    /// One interval of the plant under the limits in force.
    fn observe(&self, sequence: u64) -> Observation {
        let mut plant = self.0.lock().unwrap();
        let mut containers = Vec::new();
        let mut watts = BASE_WATTS;
        for (cgroup, class, demand) in &plant.demand {
            let target = Target::CpuBandwidth {
                cgroup: cgroup.clone(),
            };
            let allowed = match plant.limits.get(&target) {
                Some(Limit::CpuBandwidth {
                    quota_us: Some(quota),
                    period_us,
                }) => *quota as f64 / *period_us as f64,
                _ => f64::INFINITY,
            };
            let cores = demand.min(allowed);
            watts += cores * WATTS_PER_CORE;
            containers.push(ContainerObservation {
                cgroup: cgroup.clone(),
                class: *class,
                watts: cores * WATTS_PER_CORE,
                cores,
            });
        }
        if let Some(Limit::PowerCap {
            limit_uw,
            enabled: true,
        }) = plant.limits.get(&package())
        {
            watts = watts.min(*limit_uw as f64 / 1e6);
        }
        let mut gpu_watts = BTreeMap::new();
        if let Some(demand) = plant.gpu_demand_watts {
            let limit = match plant.limits.get(&Target::GpuPower { index: 0 }) {
                Some(Limit::GpuPower { limit_mw }) => f64::from(*limit_mw) / 1e3,
                _ => 300.0,
            };
            gpu_watts.insert(0, demand.min(limit));
        }
        let package = watts;
        let watts = watts + gpu_watts.values().sum::<f64>();
        if plant.celsius == 0.0 {
            // A cold start.
            plant.celsius = 40.0;
        }
        plant.celsius += (30.0 + 0.5 * package - plant.celsius) / 5.0;
        Observation {
            sequence,
            node_watts: Some(watts),
            containers,
            package_watts: BTreeMap::from([(0, package)]),
            package_celsius: BTreeMap::from([(0, (plant.celsius, CRITICAL_CELSIUS))]),
            gpu_watts,
            interval_seconds: 1.0,
            cpu_seconds: 0.0,
        }
    }

    fn cores_allowed(&self, cgroup: &str) -> Option<f64> {
        match self.0.lock().unwrap().limits.get(&Target::CpuBandwidth {
            cgroup: cgroup.into(),
        }) {
            Some(Limit::CpuBandwidth {
                quota_us: Some(q),
                period_us,
            }) => Some(*q as f64 / *period_us as f64),
            _ => None,
        }
    }
}

/// The simulated socket: RAPL limits 40-250 W.
fn socket_zone() -> CapZone {
    CapZone {
        target: package(),
        index: 0,
        max_watts: Some(250.0),
        min_watts: Some(40.0),
    }
}

fn controller(plant: &PlantHandle, mode: Mode, budget: f64, state: &std::path::Path) -> Controller {
    Controller::new(
        ControllerSettings {
            mode,
            budget_watts: Some(budget),
            state_file: state.to_owned(),
            ..ControllerSettings::default()
        },
        Box::new(plant.clone()),
        vec![socket_zone()],
        4,
    )
    .unwrap()
}

const DEMAND: [(&str, ThrottleClass, f64); 3] = [
    (
        "/kubepods/besteffort/pod1/a",
        ThrottleClass::Besteffort,
        2.0,
    ),
    ("/kubepods/burstable/pod2/b", ThrottleClass::Burstable, 1.0),
    ("/kubepods/pod3/g", ThrottleClass::Guaranteed, 1.0),
];

/// Runs `intervals` and returns the node power of each.
fn run(controller: &mut Controller, plant: &PlantHandle, from: u64, intervals: u64) -> Vec<f64> {
    (from..from + intervals)
        .map(|sequence| {
            let observation = plant.observe(sequence);
            controller.step(&observation);
            observation.node_watts.unwrap()
        })
        .collect()
}

#[test]
fn settles_under_the_budget_by_squeezing_besteffort_first_and_releases_when_it_rises() {
    let dir = tempfile::tempdir().unwrap();
    let plant = PlantHandle::new(&DEMAND);
    // 60 + 4 × 20 = 140 W of demand; a budget of 110 W.
    let mut controller = controller(&plant, Mode::Enforce, 110.0, &dir.path().join("state.json"));
    let power = run(&mut controller, &plant, 1, 30);
    let settled = power.iter().position(|w| *w <= 110.0).expect("settles");
    let overshoot = power[settled..]
        .iter()
        .fold(0.0f64, |m, w| m.max(w - 110.0));
    let last = &power[20..];
    let spread =
        last.iter().fold(f64::MIN, |m, w| m.max(*w)) - last.iter().fold(f64::MAX, |m, w| m.min(*w));
    eprintln!(
        "budget 110 W from 140 W: at or under it after {} intervals, over it after that by {overshoot:.2} W at most, last 10 intervals spread {spread:.3} W, final {:.2} W",
        settled + 1,
        power[29]
    );
    assert!(settled < 10, "settles within 10 intervals: {power:?}");
    assert!(overshoot <= 0.0, "never over the budget again: {power:?}");
    assert!(spread < 0.5, "no oscillation: {last:?}");
    assert!(power[29] <= 110.0 && power[29] >= 110.0 * 0.96, "{power:?}");
    // BestEffort alone gave the 30 W (1.5 of its 2 CPUs); Guaranteed and
    // Burstable keep their speed.
    let besteffort = plant.cores_allowed(DEMAND[0].0).expect("throttled");
    assert!((0.4..0.6).contains(&besteffort), "{besteffort}");
    assert_eq!(plant.cores_allowed(DEMAND[1].0), None);
    assert_eq!(plant.cores_allowed(DEMAND[2].0), None);
    assert!(dir.path().join("state.json").exists(), "originals on disk");

    // Tighter: 75 W is below base + Guaranteed + both others at the floor
    // (82 W): BestEffort and Burstable go to the floor, then the socket cap.
    controller.settings.budget_watts = Some(75.0);
    let power = run(&mut controller, &plant, 31, 30);
    eprintln!("budget 75 W: final {:.2} W", power[29]);
    assert!(power[29] <= 75.0, "{power:?}");
    assert!(plant.cores_allowed(DEMAND[0].0).unwrap() <= 0.06);
    assert!(plant.cores_allowed(DEMAND[1].0).is_some());
    assert_eq!(
        plant.cores_allowed(DEMAND[2].0),
        None,
        "Guaranteed is never throttled"
    );

    // Lower still: only the socket's cap can give it.
    controller.settings.budget_watts = Some(70.0);
    let power = run(&mut controller, &plant, 61, 30);
    eprintln!("budget 70 W: final {:.2} W", power[29]);
    assert!(power[29] <= 70.0, "{power:?}");
    assert!(matches!(
        plant.0.lock().unwrap().limits.get(&package()),
        Some(Limit::PowerCap { enabled: true, .. })
    ));

    // Room again: everything goes back to its original, device cap first.
    controller.settings.budget_watts = Some(200.0);
    let power = run(&mut controller, &plant, 91, 40);
    eprintln!("budget 200 W: final {:.2} W", power[39]);
    assert!((power[39] - 140.0).abs() < 1e-6, "{power:?}");
    assert!(
        controller.status().targets.is_empty(),
        "{:?}",
        controller.status()
    );
    assert!(
        !dir.path().join("state.json").exists(),
        "nothing left to restore"
    );
}

#[test]
fn observe_mode_decides_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let plant = PlantHandle::new(&DEMAND);
    let mut controller = controller(&plant, Mode::Observe, 110.0, &dir.path().join("state.json"));
    run(&mut controller, &plant, 1, 5);
    assert_eq!(plant.0.lock().unwrap().writes, 0);
    let status = controller.status();
    assert!(!status.decisions.is_empty());
    assert!(status.decisions.iter().all(|d| !d.applied));
    assert_eq!(status.headroom_watts, Some(110.0 - 140.0));
    assert!(!dir.path().join("state.json").exists());
}

#[test]
fn after_a_kill_the_next_start_restores_every_original_first() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let plant = PlantHandle::new(&DEMAND);
    let mut first = controller(&plant, Mode::Enforce, 70.0, &state);
    run(&mut first, &plant, 1, 30);
    assert!(!plant.0.lock().unwrap().limits.is_empty());
    // kill -9: no restore_all, the process is simply gone.
    std::mem::forget(first);
    // The next start, before any step: the plant is back as it was.
    let _second = controller(&plant, Mode::Enforce, 70.0, &state);
    let plant_now = plant.0.lock().unwrap();
    for (target, limit) in &plant_now.limits {
        match (target, limit) {
            (Target::CpuBandwidth { .. }, Limit::CpuBandwidth { quota_us, .. }) => {
                assert_eq!(*quota_us, None, "{target:?}")
            }
            (Target::RaplPackage { .. }, Limit::PowerCap { limit_uw, enabled }) => {
                assert_eq!((*limit_uw, *enabled), (250_000_000, false))
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(!state.exists());
}

#[test]
fn stale_measurements_put_the_originals_back_and_failed_writes_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let plant = PlantHandle::new(&DEMAND);
    let mut controller = controller(&plant, Mode::Enforce, 100.0, &dir.path().join("s.json"));
    run(&mut controller, &plant, 1, 10);
    assert!(plant.cores_allowed(DEMAND[0].0).is_some());
    // The same snapshot again: nothing new was measured.
    controller.step(&plant.observe(10));
    assert!(controller.status().stale);
    assert_eq!(plant.cores_allowed(DEMAND[0].0), None, "original back");
    // Writes start failing: counted, shown, and the controller goes on.
    plant.0.lock().unwrap().fail_writes = true;
    run(&mut controller, &plant, 11, 5);
    let status = controller.status();
    assert!(status.write_failures > 0);
    assert!(
        status
            .decisions
            .iter()
            .any(|d| d.reason.contains("write failed") && d.reason.contains("cpu.max")),
        "{status:?}"
    );
}

#[test]
fn the_thermal_guard_keeps_a_hot_socket_under_its_critical_temperature() {
    let dir = tempfile::tempdir().unwrap();
    // 140 W would settle at 100 °C, over the 95 °C critical temperature.
    let plant = PlantHandle::new(&DEMAND);
    let mut controller = Controller::new(
        ControllerSettings {
            mode: Mode::Enforce,
            budget_watts: None,
            thermal_margin_celsius: Some(10.0),
            state_file: dir.path().join("state.json"),
            ..ControllerSettings::default()
        },
        Box::new(plant.clone()),
        vec![socket_zone()],
        4,
    )
    .unwrap();
    let mut hottest: f64 = 0.0;
    for sequence in 1..80 {
        let observation = plant.observe(sequence);
        hottest = hottest.max(observation.package_celsius[&0].0);
        controller.step(&observation);
    }
    let celsius = plant.0.lock().unwrap().celsius;
    eprintln!(
        "thermal guard, margin 10 °C: hottest {hottest:.1} °C, now {celsius:.1} °C (critical 95, 100 uncapped)"
    );
    assert!(hottest < CRITICAL_CELSIUS, "{hottest}");
    assert_eq!(controller.status().policies["thermal_guard"], "limiting");
    assert_eq!(
        plant.cores_allowed(DEMAND[0].0),
        None,
        "no budget: no container throttled"
    );
}

#[test]
fn devices_share_the_cut_by_their_draw_above_the_floor_within_their_limits() {
    let dir = tempfile::tempdir().unwrap();
    let plant = PlantHandle::new(&DEMAND);
    plant.0.lock().unwrap().gpu_demand_watts = Some(250.0);
    let gpu = Target::GpuPower { index: 0 };
    let mut controller = Controller::new(
        ControllerSettings {
            mode: Mode::Enforce,
            budget_watts: Some(250.0),
            state_file: dir.path().join("state.json"),
            ..ControllerSettings::default()
        },
        Box::new(plant.clone()),
        vec![
            socket_zone(),
            // An H100-like range: 200 W to 700 W, at 300 W now.
            CapZone {
                target: gpu.clone(),
                index: 0,
                max_watts: Some(700.0),
                min_watts: Some(200.0),
            },
        ],
        4,
    )
    .unwrap();
    // 140 W of CPU load and 250 W of GPU: 390 W against 250 W.
    let power = run(&mut controller, &plant, 1, 60);
    let limits = plant.0.lock().unwrap().limits.clone();
    let gpu_cap = match limits.get(&gpu) {
        Some(Limit::GpuPower { limit_mw }) => f64::from(*limit_mw) / 1e3,
        other => panic!("GPU not capped: {other:?}"),
    };
    let package_cap = match limits.get(&package()) {
        Some(Limit::PowerCap { limit_uw, .. }) => *limit_uw as f64 / 1e6,
        other => panic!("package not capped: {other:?}"),
    };
    eprintln!(
        "390 W of demand, budget 250 W: final {:.1} W; GPU capped at {gpu_cap:.1} W (250 W demand), package at {package_cap:.1} W",
        power[59]
    );
    assert!(power[59] <= 250.0, "{power:?}");
    assert!((200.0..=300.0).contains(&gpu_cap), "within the GPU's range");
    assert!(package_cap >= 40.0);
    // Both containers at the floor first, then the devices by draw above
    // their floors: the GPU 250 − 200 = 50 W, the socket 82 − 40 = 42 W.
    assert!(plant.cores_allowed(DEMAND[0].0).unwrap() <= 0.06);
    assert_eq!(plant.cores_allowed(DEMAND[2].0), None);
    let ratio = (250.0 - gpu_cap) / (82.0 - package_cap);
    assert!((ratio - 50.0 / 42.0).abs() < 0.15, "cut ratio {ratio}");
}

#[test]
fn the_efficiency_search_holds_the_socket_at_its_cheapest_energy_per_work() {
    let dir = tempfile::tempdir().unwrap();
    let plant = PlantHandle::new(&[]);
    let mut controller = Controller::new(
        ControllerSettings {
            mode: Mode::Enforce,
            budget_watts: None,
            efficiency_search: true,
            efficiency_eta: 1.0,
            state_file: dir.path().join("state.json"),
            ..ControllerSettings::default()
        },
        Box::new(plant.clone()),
        vec![socket_zone()],
        4,
    )
    .unwrap();
    // A busy socket that would draw 200 W, idles at 60 W, and whose speed
    // grows with the cube root of the power above that.
    let limit_now = || match plant.0.lock().unwrap().limits.get(&package()) {
        Some(Limit::PowerCap {
            limit_uw,
            enabled: true,
        }) => *limit_uw as f64 / 1e6,
        _ => 250.0,
    };
    for sequence in 1..=40 {
        let watts = limit_now().min(200.0);
        controller.step(&Observation {
            sequence,
            node_watts: Some(watts),
            containers: Vec::new(),
            package_watts: BTreeMap::from([(0, watts)]),
            package_celsius: BTreeMap::new(),
            gpu_watts: BTreeMap::new(),
            interval_seconds: 1.0,
            cpu_seconds: (watts - 60.0).max(0.0).cbrt(),
        });
    }
    let held = limit_now();
    eprintln!(
        "efficiency search, eta 1: held at {held:.1} W ({})",
        controller.status().policies["efficiency_search"]
    );
    // Levels 250, 197.5, 145, 92.5, 40 W; energy per work is least at 92.5.
    assert!((held - 92.5).abs() < 0.01, "{held}");
    assert!(
        controller
            .status()
            .decisions
            .iter()
            .any(|d| d.reason.contains("efficiency search")),
        "{:?}",
        controller.status().decisions
    );
}
