//! The power-cap controller end to end on the real kernel: the agent in
//! `enforce` mode, a powercap fixture tree whose package counter advances at
//! the lower of the load's power and the limit written, a BestEffort-shaped
//! and a Guaranteed-shaped container burning CPU, and a budget below their
//! combined draw. Then `kill -9` and a new start. Needs root.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use integration_tests::{
    Agent, TestCgroup, random_hex, random_uuid, require_root, spawn_in_cgroups, workload_binary,
};
use serde_json::Value;

/// Idle power of the simulated socket, and what one busy CPU adds.
const BASE_WATTS: f64 = 20.0;
const WATTS_PER_CPU: f64 = 30.0;
const ORIGINAL_LIMIT_UW: &str = "200000000";

/// The same cgroup in the v1 cpu hierarchy (where this machine's cpu
/// controller lives), removed on drop.
struct V1Cgroup {
    created: Vec<PathBuf>,
    path: PathBuf,
}

impl V1Cgroup {
    fn create(root: &Path, relative: &str) -> Self {
        let mut created = Vec::new();
        let mut path = root.to_owned();
        for part in relative.split('/') {
            path.push(part);
            if !path.exists() {
                std::fs::create_dir(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                created.push(path.clone());
            }
        }
        Self { created, path }
    }
}

impl Drop for V1Cgroup {
    fn drop(&mut self) {
        for dir in self.created.iter().rev() {
            for _ in 0..100 {
                let pids = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                if pids.trim().is_empty() {
                    break;
                }
                for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    // SAFETY: plain kill syscall.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = std::fs::remove_dir(dir);
        }
    }
}

fn v1_cpu_root() -> Option<PathBuf> {
    powerlens::controller::actuators::find_v1_cpu_root(Path::new("/proc"))
}

fn usage_usec(cgroup: &Path) -> u64 {
    std::fs::read_to_string(cgroup.join("cpu.stat"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// A socket whose power is the load's (from the containers' CPU time),
/// held under the RAPL limit when limiting is enabled.
struct Socket {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Socket {
    fn start(zone: PathBuf, containers: Vec<PathBuf>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let running = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut energy_uj = 1_000_000_000u64;
            let mut last_usage: u64 = containers.iter().map(|c| usage_usec(c)).sum();
            let mut last = Instant::now();
            while !running.load(Ordering::Relaxed) {
                // Fine steps: a 50 ms step of a 55 W socket is 2.75 J, a
                // 5.5 W error in one 500 ms interval, more than the
                // controller's deadband.
                std::thread::sleep(Duration::from_millis(10));
                let now = Instant::now();
                let seconds = now.duration_since(last).as_secs_f64();
                last = now;
                let usage: u64 = containers.iter().map(|c| usage_usec(c)).sum();
                let cpus = usage.saturating_sub(last_usage) as f64 / 1e6 / seconds;
                last_usage = usage;
                let mut watts = BASE_WATTS + WATTS_PER_CPU * cpus;
                if read(&zone.join("enabled")) == "1"
                    && let Ok(limit) =
                        read(&zone.join("constraint_0_power_limit_uw")).parse::<f64>()
                {
                    watts = watts.min(limit / 1e6);
                }
                energy_uj += (watts * seconds * 1e6) as u64;
                let temporary = zone.join("energy_uj.tmp");
                std::fs::write(&temporary, format!("{energy_uj}\n")).expect("write energy");
                std::fs::rename(&temporary, zone.join("energy_uj")).expect("rename energy");
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn container_cores(agent: &Agent, id: &str) -> f64 {
    agent.get(&format!("/api/v1/containers/{id}")).1["cpu_cores"]
        .as_f64()
        .unwrap_or(-1.0)
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

#[test]
fn enforce_squeezes_besteffort_keeps_guaranteed_holds_the_budget_and_a_kill_leaves_nothing_behind()
{
    if !require_root() {
        return;
    }
    let Some(v1_root) = v1_cpu_root() else {
        eprintln!(
            "skipping: this test throttles through the v1 cpu controller of a hybrid machine"
        );
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let zone = dir.path().join("powercap/intel-rapl:0");
    std::fs::create_dir_all(&zone).expect("zone");
    for (file, value) in [
        ("name", "package-0"),
        ("energy_uj", "1000000000"),
        ("max_energy_range_uj", "262143328850"),
        ("constraint_0_power_limit_uw", ORIGINAL_LIMIT_UW),
        ("constraint_0_max_power_uw", "250000000"),
        ("constraint_0_min_power_uw", "30000000"),
        ("enabled", "0"),
    ] {
        std::fs::write(zone.join(file), format!("{value}\n")).expect("fixture");
    }
    let state_file = dir.path().join("state/controller.json");

    // A BestEffort pod's container and a Guaranteed pod's, as the kubelet
    // (systemd driver) and containerd name them, in both hierarchies.
    let (besteffort_id, guaranteed_id) = (random_hex(64), random_hex(64));
    let besteffort_path = format!(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{besteffort_id}.scope",
        random_uuid().replace('-', "_")
    );
    let guaranteed_path = format!(
        "kubepods.slice/kubepods-pod{}.slice/cri-containerd-{guaranteed_id}.scope",
        random_uuid().replace('-', "_")
    );
    let besteffort = TestCgroup::create(&besteffort_path);
    let guaranteed = TestCgroup::create(&guaranteed_path);
    let besteffort_v1 = V1Cgroup::create(&v1_root, &besteffort_path);
    let guaranteed_v1 = V1Cgroup::create(&v1_root, &guaranteed_path);
    let workload = workload_binary();
    let _burner_besteffort = spawn_in_cgroups(
        &[&besteffort.path, &besteffort_v1.path],
        &workload,
        &["burn", "120"],
    );
    let _burner_guaranteed = spawn_in_cgroups(
        &[&guaranteed.path, &guaranteed_v1.path],
        &workload,
        &["burn", "120"],
    );
    let _socket = Socket::start(
        zone.clone(),
        vec![besteffort.path.clone(), guaranteed.path.clone()],
    );
    // Two busy CPUs: 20 + 2 × 30 = 80 W. The budget: 55 W.
    let args = |mode: &'static str| {
        vec![
            "--method".to_owned(),
            "ebpf".to_owned(),
            "--powercap-root".to_owned(),
            dir.path().join("powercap").display().to_string(),
            "--controller-mode".to_owned(),
            mode.to_owned(),
            "--budget-watts".to_owned(),
            "55".to_owned(),
            "--controller-state-file".to_owned(),
            state_file.display().to_string(),
        ]
    };
    let enforce = args("enforce");
    let enforce: Vec<&str> = enforce.iter().map(String::as_str).collect();
    // Their speed before any controller, from the kernel's own counters.
    let (be_start, g_start) = (usage_usec(&besteffort.path), usage_usec(&guaranteed.path));
    std::thread::sleep(Duration::from_secs(2));
    let before_besteffort = (usage_usec(&besteffort.path) - be_start) as f64 / 2e6;
    let before_guaranteed = (usage_usec(&guaranteed.path) - g_start) as f64 / 2e6;
    let mut agent = Agent::start_with_interval("1s", &enforce);

    // Give the controller 15 s (15 intervals), then watch 10 s.
    std::thread::sleep(Duration::from_secs(15));
    let mut node_watts = Vec::new();
    let mut besteffort_cores = Vec::new();
    let mut guaranteed_cores = Vec::new();
    for _ in 0..10 {
        agent.wait_intervals(1);
        node_watts.push(
            agent.get("/api/v1/node").1["power_watts"]["measured"]["package"]
                .as_f64()
                .unwrap_or(f64::NAN),
        );
        besteffort_cores.push(container_cores(&agent, &besteffort_id));
        guaranteed_cores.push(container_cores(&agent, &guaranteed_id));
    }
    let (_, status) = agent.get("/api/v1/controller");
    if std::env::var_os("POWERLENS_TEST_VERBOSE").is_some() {
        for decision in status["decisions"].as_array().into_iter().flatten() {
            eprintln!(
                "  {} {} -> {}: {}",
                decision["target"], decision["old"], decision["new"], decision["reason"]
            );
        }
    }
    let quota = read(&besteffort_v1.path.join("cpu.cfs_quota_us"));
    eprintln!(
        "before: BestEffort {before_besteffort:.2} CPU, Guaranteed {before_guaranteed:.2} CPU; \
         settled: node {:.1} W (budget 55), BestEffort {:.2} CPU (quota {quota} us), Guaranteed {:.2} CPU; \
         controller: {} targets, {} decisions, headroom {}",
        mean(&node_watts),
        mean(&besteffort_cores),
        mean(&guaranteed_cores),
        status["targets"].as_array().map_or(0, Vec::len),
        status["decisions"].as_array().map_or(0, Vec::len),
        status["headroom_watts"]
    );
    assert_eq!(status["mode"], "enforce", "{status}");
    assert!(
        mean(&node_watts) <= 55.0 * 1.03,
        "node power settles under the budget: {node_watts:?}"
    );
    assert!(
        mean(&besteffort_cores) < 0.6 * before_besteffort,
        "BestEffort squeezed: {before_besteffort:.2} -> {besteffort_cores:?}"
    );
    assert!(
        mean(&guaranteed_cores) > 0.85 * before_guaranteed,
        "Guaranteed keeps its speed: {before_guaranteed:.2} -> {guaranteed_cores:?}"
    );
    assert_eq!(
        read(&guaranteed_v1.path.join("cpu.cfs_quota_us")),
        "-1",
        "Guaranteed never throttled"
    );
    assert_ne!(quota, "-1", "BestEffort throttled through cpu.cfs_quota_us");
    assert!(
        state_file.exists(),
        "originals on disk while limits are in force"
    );
    let metrics = agent.get_text("/metrics");
    for series in [
        "powerlens_controller_budget_watts{mode=\"enforce\"} 55",
        "powerlens_controller_headroom_watts{",
        "powerlens_controller_cpu_limit_cpus{target=\"cpu:/kubepods.slice/kubepods-besteffort.slice/",
    ] {
        assert!(metrics.contains(series), "{series} in /metrics");
    }

    // kill -9: the limits outlive the agent...
    agent.kill_hard();
    assert_ne!(read(&besteffort_v1.path.join("cpu.cfs_quota_us")), "-1");
    // ...until the next start puts every original back before anything
    // else (observe mode: it would write nothing itself).
    let observe = args("observe");
    let observe: Vec<&str> = observe.iter().map(String::as_str).collect();
    let agent = Agent::start_with_interval("500ms", &observe);
    assert_eq!(read(&besteffort_v1.path.join("cpu.cfs_quota_us")), "-1");
    assert_eq!(
        read(&zone.join("constraint_0_power_limit_uw")),
        ORIGINAL_LIMIT_UW
    );
    assert_eq!(read(&zone.join("enabled")), "0");
    assert!(!state_file.exists());
    let (_, status) = agent.get("/api/v1/controller");
    assert_eq!(status["mode"], "observe");
    assert!(
        status["decisions"]
            .as_array()
            .is_some_and(|d| d.iter().all(|d| d["applied"] == Value::Bool(false))),
        "{status}"
    );
    drop(agent);

    // A clean stop (SIGTERM) gives a throttled container its bandwidth back.
    let agent = Agent::start_with_interval("1s", &enforce);
    let deadline = Instant::now() + Duration::from_secs(30);
    while read(&besteffort_v1.path.join("cpu.cfs_quota_us")) == "-1" {
        assert!(Instant::now() < deadline, "throttled again within 30 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(agent);
    assert_eq!(read(&besteffort_v1.path.join("cpu.cfs_quota_us")), "-1");
    assert!(
        !state_file.exists(),
        "nothing left to restore after a clean stop"
    );
}

#[test]
fn a_budget_below_the_hardware_minimum_is_refused_at_start_naming_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let zone = dir.path().join("powercap/intel-rapl:0");
    std::fs::create_dir_all(&zone).expect("zone");
    for (file, value) in [
        ("name", "package-0"),
        ("energy_uj", "1000"),
        ("max_energy_range_uj", "262143328850"),
        ("constraint_0_power_limit_uw", ORIGINAL_LIMIT_UW),
        ("constraint_0_min_power_uw", "30000000"),
        ("enabled", "0"),
    ] {
        std::fs::write(zone.join(file), format!("{value}\n")).expect("fixture");
    }
    let run = |extra: &[&str]| {
        std::process::Command::new(integration_tests::sibling_binary("powerlens"))
            .args([
                "run",
                "--no-table",
                "--listen",
                "127.0.0.1:0",
                "--method",
                "procfs",
            ])
            .arg("--powercap-root")
            .arg(dir.path().join("powercap"))
            .arg("--controller-state-file")
            .arg(dir.path().join("state.json"))
            .args(extra)
            .output()
            .expect("run powerlens")
    };
    let output = run(&["--controller-mode", "enforce", "--budget-watts", "10"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("controller.budget_watts") && stderr.contains("30 W"),
        "{stderr}"
    );
    for (flags, field) in [
        (&["--budget-watts=-5"][..], "controller.budget_watts"),
        (
            &[
                "--floor-watts",
                "package=90",
                "--ceiling-watts",
                "package=50",
            ][..],
            "controller.floor_watts",
        ),
        (&["--throttle-classes", "besteffort,premium"][..], "premium"),
        (&["--efficiency-eta", "2"][..], "controller.efficiency_eta"),
    ] {
        let output = run(flags);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{flags:?} must be refused");
        assert!(stderr.contains(field), "{flags:?}: {stderr}");
    }
}
