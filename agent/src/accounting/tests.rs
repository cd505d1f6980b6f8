use agent_common::MAX_SOCKETS;
use proptest::prelude::*;

use super::*;
use crate::cpu::{ProcessUsage, total_ns};

const CONTAINER: &str = "0000000000000000000000000000000000000000000000000000000000000001";

fn usage(pid: u32, cgroup_id: u64, ns: u64) -> ProcessUsage {
    let mut runtime_ns_by_socket = [0; MAX_SOCKETS];
    runtime_ns_by_socket[0] = ns;
    ProcessUsage {
        key: ProcessKey { pid, start_ns: 1 },
        comm: Comm::from_str_lossy("burn"),
        cgroup_id,
        runtime_ns_by_socket,
    }
}

fn resolver(id: u64) -> Resolved {
    let path = match id {
        1 => format!("/system.slice/docker-{CONTAINER}.scope"),
        2 => "/system.slice/sshd.service".to_owned(),
        _ => "/".to_owned(),
    };
    Resolved {
        workload: Arc::new(crate::cgroup::parse_cgroup_path(&path)),
        path: Some(Arc::from(path)),
    }
}

fn at(seconds: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + seconds)
}

#[test]
fn sums_processes_into_workloads_and_keeps_per_interval_figures() {
    let mut accounting = Accounting::new(Duration::from_secs(900));
    let reading = CpuReading {
        usage: vec![usage(10, 1, 300), usage(11, 1, 100), usage(12, 2, 50)],
        ..Default::default()
    };
    accounting.apply_cpu(&reading, at(1), Duration::from_secs(1), &[0], &mut resolver);
    let second = CpuReading {
        usage: vec![usage(10, 1, 200)],
        ..Default::default()
    };
    accounting.apply_cpu(&second, at(2), Duration::from_secs(1), &[0], &mut resolver);

    let container = accounting
        .workload(&format!("container:{CONTAINER}"))
        .unwrap();
    assert_eq!(total_ns(&container.cpu_ns_by_socket), 600);
    assert_eq!(container.interval_ns, 200);
    assert_eq!(container.interval_seq, 2);
    assert_eq!(container.live_processes, 2);
    let process = &accounting.processes()[&ProcessKey {
        pid: 11,
        start_ns: 1,
    }];
    assert_eq!(total_ns(&process.cpu_ns_by_socket), 100);
    assert_eq!(process.interval_seq, 1, "did not run in interval 2");
}

#[test]
fn exited_processes_and_containers_are_kept_for_the_retention_then_dropped() {
    let mut accounting = Accounting::new(Duration::from_secs(60));
    let reading = CpuReading {
        usage: vec![usage(10, 1, 300)],
        ..Default::default()
    };
    accounting.apply_cpu(&reading, at(0), Duration::from_secs(1), &[0], &mut resolver);
    let exit = CpuReading {
        exited: vec![ProcessKey {
            pid: 10,
            start_ns: 1,
        }],
        ..Default::default()
    };
    accounting.apply_cpu(&exit, at(1), Duration::from_secs(1), &[0], &mut resolver);
    accounting.retire(at(1), &mut |_| false);
    let key = format!("container:{CONTAINER}");
    assert_eq!(accounting.workload(&key).unwrap().exited_at, Some(at(1)));
    assert_eq!(accounting.processes().len(), 1);

    accounting.retire(at(30), &mut |_| false);
    assert!(accounting.workload(&key).is_some());
    accounting.retire(at(62), &mut |_| false);
    assert!(accounting.workload(&key).is_none());
    assert!(accounting.processes().is_empty());
}

#[test]
fn a_container_whose_cgroup_remains_is_not_exited() {
    let mut accounting = Accounting::new(Duration::from_secs(60));
    let reading = CpuReading {
        usage: vec![usage(10, 1, 300)],
        exited: vec![ProcessKey {
            pid: 10,
            start_ns: 1,
        }],
        ..Default::default()
    };
    accounting.apply_cpu(&reading, at(0), Duration::from_secs(1), &[0], &mut resolver);
    accounting.retire(at(1), &mut |_| true);
    let key = format!("container:{CONTAINER}");
    assert_eq!(accounting.workload(&key).unwrap().exited_at, None);
}

#[test]
fn exited_processes_are_bounded_oldest_first_and_counted() {
    let mut accounting = Accounting::with_limits(Duration::from_secs(3600), 3);
    for pid in 0..5u32 {
        let key = ProcessKey { pid, start_ns: 1 };
        let reading = CpuReading {
            usage: vec![usage(pid, 1, 100)],
            exited: vec![key],
            ..Default::default()
        };
        accounting.apply_cpu(
            &reading,
            at(u64::from(pid)),
            Duration::from_secs(1),
            &[0],
            &mut resolver,
        );
        accounting.retire(at(u64::from(pid)), &mut |_| true);
    }
    let mut kept: Vec<u32> = accounting.processes().keys().map(|k| k.pid).collect();
    kept.sort_unstable();
    assert_eq!(kept, vec![2, 3, 4], "the oldest two went first");
    assert_eq!(accounting.evicted_processes(), 2);
    // Their time stays in the workload.
    let key = format!("container:{CONTAINER}");
    assert_eq!(
        total_ns(&accounting.workload(&key).unwrap().cpu_ns_by_socket),
        500
    );
}

#[test]
fn a_workload_keeps_only_the_cgroup_ids_that_still_exist() {
    let mut accounting = Accounting::new(Duration::from_secs(3600));
    // A service restarted 20 times: 20 cgroups, one process each, all gone.
    for restart in 0..20u64 {
        let id = 100 + restart;
        let reading = CpuReading {
            usage: vec![usage(1000 + restart as u32, id, 10)],
            exited: vec![ProcessKey {
                pid: 1000 + restart as u32,
                start_ns: 1,
            }],
            ..Default::default()
        };
        accounting.apply_cpu(
            &reading,
            at(restart),
            Duration::from_secs(1),
            &[0],
            &mut |_| resolver(2),
        );
    }
    let service = accounting.workload("service:sshd.service").unwrap();
    assert_eq!(service.cgroup_ids.len(), 20);
    // Only the newest cgroup exists now.
    accounting.retire(at(100), &mut |id| id == 119);
    let service = accounting.workload("service:sshd.service").unwrap();
    assert_eq!(service.cgroup_ids, vec![119]);
    assert!(!accounting.knows_cgroup(100));
    assert!(accounting.knows_cgroup(119));
}

#[test]
fn node_idle_is_wall_minus_busy_per_cpu() {
    let mut accounting = Accounting::new(Duration::from_secs(60));
    let reading = CpuReading {
        busy_ns_by_cpu: vec![250_000_000, 1_200_000_000],
        ..Default::default()
    };
    accounting.apply_cpu(
        &reading,
        at(0),
        Duration::from_secs(1),
        &[0, 1],
        &mut resolver,
    );
    assert_eq!(
        accounting.node().busy_ns_by_cpu,
        vec![250_000_000, 1_000_000_000]
    );
    assert_eq!(accounting.node().idle_ns_by_cpu, vec![750_000_000, 0]);
    assert_eq!(accounting.node().interval_capacity_ns, 2_000_000_000);
}

#[test]
fn a_window_without_busy_figures_is_carried_to_the_next() {
    let mut accounting = Accounting::new(Duration::from_secs(60));
    let missing = CpuReading {
        usage: vec![usage(10, 1, 300)],
        busy_missing: true,
        ..Default::default()
    };
    accounting.apply_cpu(&missing, at(0), Duration::from_secs(1), &[0], &mut resolver);
    assert_eq!(accounting.node().idle_ns_by_cpu, vec![0; 0]);
    assert_eq!(accounting.node().interval_capacity_ns, 0);
    // The next deltas cover both windows (the source kept its marks).
    let next = CpuReading {
        busy_ns_by_cpu: vec![1_500_000_000],
        ..Default::default()
    };
    accounting.apply_cpu(&next, at(1), Duration::from_secs(1), &[0], &mut resolver);
    assert_eq!(accounting.node().busy_ns_by_cpu, vec![1_500_000_000]);
    assert_eq!(accounting.node().idle_ns_by_cpu, vec![500_000_000]);
    // The process's time was applied even though the node's was not.
    let key = format!("container:{CONTAINER}");
    assert_eq!(accounting.workload(&key).unwrap().live_processes, 1);
}

#[test]
fn a_process_that_runs_after_being_marked_exited_is_alive_again() {
    let mut accounting = Accounting::new(Duration::from_secs(60));
    let key = ProcessKey {
        pid: 10,
        start_ns: 1,
    };
    let exit = CpuReading {
        usage: vec![usage(10, 1, 300)],
        exited: vec![key],
        ..Default::default()
    };
    accounting.apply_cpu(&exit, at(0), Duration::from_secs(1), &[0], &mut resolver);
    let workload = format!("container:{CONTAINER}");
    assert_eq!(accounting.workload(&workload).unwrap().live_processes, 0);
    assert!(accounting.processes()[&key].exited_at.is_some());
    let again = CpuReading {
        usage: vec![usage(10, 1, 200)],
        ..Default::default()
    };
    accounting.apply_cpu(&again, at(1), Duration::from_secs(1), &[0], &mut resolver);
    assert_eq!(accounting.processes()[&key].exited_at, None);
    assert_eq!(accounting.workload(&workload).unwrap().live_processes, 1);
}

fn energy(domain: Domain, index: u32, joules: f64) -> crate::energy::DomainEnergy {
    crate::energy::DomainEnergy {
        id: DomainId { domain, index },
        joules,
        method: EnergyMethod::Rapl,
        uncertainty_joules: None,
    }
}

fn on_socket(pid: u32, cgroup_id: u64, socket: usize, ns: u64) -> ProcessUsage {
    let mut u = usage(pid, cgroup_id, 0);
    u.runtime_ns_by_socket = [0; MAX_SOCKETS];
    u.runtime_ns_by_socket[socket] = ns;
    u
}

fn no_idle(_: Domain) -> IdleBaseline {
    IdleBaseline::configured(0.0)
}

#[test]
fn the_nodes_idle_watts_add_up_over_sockets() {
    let mut accounting = Accounting::new(Duration::from_secs(60));
    let interval = EnergyInterval {
        energies: vec![
            energy(Domain::Package, 0, 50.0),
            energy(Domain::Package, 1, 20.0),
        ],
        ..Default::default()
    };
    let configured = |_: Domain| IdleBaseline::configured(12.5);
    accounting.apply_energy(
        &[],
        &[],
        &interval,
        1.0,
        IdlePolicy::Unattributed,
        &configured,
    );
    let node = accounting.node_energy();
    assert_eq!(node.idle_watts[Domain::Package as usize], 25.0);
    assert_eq!(node.idle[Domain::Package as usize], 25.0);
    // The next interval starts again from zero, not from 25.
    accounting.apply_energy(
        &[],
        &[],
        &interval,
        1.0,
        IdlePolicy::Unattributed,
        &configured,
    );
    assert_eq!(
        accounting.node_energy().idle_watts[Domain::Package as usize],
        25.0
    );
}

#[test]
fn a_process_on_socket_1_is_never_charged_socket_0() {
    let mut accounting = Accounting::new(Duration::from_secs(60));
    let usage = vec![on_socket(10, 1, 0, 300), on_socket(11, 2, 1, 100)];
    let reading = CpuReading {
        usage: usage.clone(),
        ..Default::default()
    };
    accounting.apply_cpu(
        &reading,
        at(0),
        Duration::from_secs(1),
        &[0, 1],
        &mut resolver,
    );
    let interval = EnergyInterval {
        energies: vec![
            energy(Domain::Package, 0, 50.0),
            energy(Domain::Package, 1, 20.0),
            energy(Domain::Psys, 0, 80.0),
        ],
        ..Default::default()
    };
    accounting.apply_energy(
        &usage,
        &accounting.usage_slots.clone(),
        &interval,
        1.0,
        IdlePolicy::Unattributed,
        &no_idle,
    );
    let p10 = &accounting.processes()[&ProcessKey {
        pid: 10,
        start_ns: 1,
    }]
        .energy;
    let p11 = &accounting.processes()[&ProcessKey {
        pid: 11,
        start_ns: 1,
    }]
        .energy;
    assert_eq!(p10.joules[Domain::Package as usize], 50.0);
    assert_eq!(p11.joules[Domain::Package as usize], 20.0);
    // psys follows CPU time anywhere: 300:100.
    assert_eq!(p10.joules[Domain::Psys as usize], 60.0);
    assert_eq!(p11.joules[Domain::Psys as usize], 20.0);
    let node = accounting.node_energy();
    assert_eq!(node.measured[Domain::Package as usize], 70.0);
    assert_eq!(node.attributed[Domain::Package as usize], 70.0);
}

#[test]
fn even_idle_is_shared_by_workloads_not_processes() {
    let mut accounting = Accounting::new(Duration::from_secs(60));
    // Three processes in the container (cgroup 1), one in sshd (cgroup 2).
    let usage = vec![
        usage(10, 1, 100),
        usage(11, 1, 100),
        usage(12, 1, 100),
        usage(13, 2, 100),
    ];
    let reading = CpuReading {
        usage: usage.clone(),
        ..Default::default()
    };
    accounting.apply_cpu(&reading, at(0), Duration::from_secs(1), &[0], &mut resolver);
    let interval = EnergyInterval {
        energies: vec![energy(Domain::Package, 0, 100.0)],
        ..Default::default()
    };
    accounting.apply_energy(
        &usage,
        &accounting.usage_slots.clone(),
        &interval,
        1.0,
        IdlePolicy::Even,
        &|_| IdleBaseline::configured(20.0),
    );
    let d = Domain::Package as usize;
    let container = accounting
        .workload(&format!("container:{CONTAINER}"))
        .unwrap();
    let sshd = accounting.workload("service:sshd.service").unwrap();
    // Dynamic 80 J by CPU time (3:1), idle 20 J half each.
    assert!((container.energy.joules[d] - (60.0 + 10.0)).abs() < 1e-9);
    assert!((sshd.energy.joules[d] - (20.0 + 10.0)).abs() < 1e-9);
    let p10 = accounting.processes()[&ProcessKey {
        pid: 10,
        start_ns: 1,
    }]
        .energy
        .joules[d];
    assert!((p10 - (20.0 + 10.0 / 3.0)).abs() < 1e-9);
    let node = accounting.node_energy();
    assert!(node.idle[d].abs() < 1e-9);
    assert!((node.attributed[d] - 100.0).abs() < 1e-9);
}

#[test]
fn gpu_energy_goes_to_the_processes_that_used_the_gpu() {
    use crate::energy::gpu::{FakeGpuBackend, GpuSource, tests::gpu};
    let mut accounting = Accounting::new(Duration::from_secs(60));
    let usage = vec![usage(10, 1, 100), usage(11, 2, 100), usage(12, 2, 100)];
    let reading = CpuReading {
        usage: usage.clone(),
        ..Default::default()
    };
    accounting.apply_cpu(&reading, at(0), Duration::from_secs(1), &[0], &mut resolver);
    // Two GPUs, three processes: 10 and 11 share GPU 0 at 60%/20% SM,
    // 12 alone on GPU 1, and pid 99 (not seen on CPU) on GPU 1 too.
    let frames = vec![vec![
        gpu(0, None, 400_000, &[(10, Some(60)), (11, Some(20))]),
        gpu(1, None, 100_000, &[(12, Some(50)), (99, Some(50))]),
    ]];
    let mut source = GpuSource::new(Box::new(FakeGpuBackend::new(frames)));
    let reading = source.read(1.0).unwrap();
    let interval = EnergyInterval {
        energies: reading.energies,
        gpu_activity: reading.activity,
        ..Default::default()
    };
    accounting.apply_energy(
        &usage,
        &accounting.usage_slots.clone(),
        &interval,
        1.0,
        IdlePolicy::Unattributed,
        &no_idle,
    );
    let gpu_joules = |pid| {
        accounting.processes()[&ProcessKey { pid, start_ns: 1 }]
            .energy
            .joules[Domain::Gpu as usize]
    };
    assert_eq!(gpu_joules(10), 300.0);
    assert_eq!(gpu_joules(11), 100.0);
    assert_eq!(gpu_joules(12), 50.0);
    let node = accounting.node_energy();
    assert_eq!(node.measured[Domain::Gpu as usize], 500.0);
    assert_eq!(
        node.unattributed[Domain::Gpu as usize],
        50.0,
        "pid 99's share stays on the node"
    );
    let container = accounting
        .workload(&format!("container:{CONTAINER}"))
        .unwrap();
    assert_eq!(container.energy.joules[Domain::Gpu as usize], 300.0);
}

proptest! {
    /// Whatever the readings, the workloads' time adds up to the
    /// processes' time, and both to what the readings reported.
    #[test]
    fn workloads_add_up_to_processes(
        readings in proptest::collection::vec(
            proptest::collection::vec((0u32..20, 0u64..4, 0u64..1_000_000), 0..30),
            1..10,
        )
    ) {
        let mut accounting = Accounting::new(Duration::from_secs(3600));
        let mut reported = 0u64;
        for (i, reading) in readings.iter().enumerate() {
            let reading = CpuReading {
                usage: reading.iter().map(|(pid, cgroup, ns)| usage(*pid, *cgroup, *ns)).collect(),
                ..Default::default()
            };
            reported += reading.usage.iter().map(|u| total_ns(&u.runtime_ns_by_socket)).sum::<u64>();
            accounting.apply_cpu(&reading, at(i as u64), Duration::from_secs(1), &[0], &mut resolver);
        }
        let processes: u64 = accounting.processes().values().map(|p| total_ns(&p.cpu_ns_by_socket)).sum();
        let workloads: u64 = accounting.workloads().map(|w| total_ns(&w.cpu_ns_by_socket)).sum();
        prop_assert_eq!(processes, reported);
        prop_assert_eq!(workloads, reported);
    }

    /// Per domain, the processes' energy plus the node's idle and
    /// unattributed buckets is what was measured; workloads sum to the
    /// same as processes.
    #[test]
    fn energy_books_balance(
        usage_spec in proptest::collection::vec((0u32..30, 0u64..4, 0usize..2, 0u64..1_000_000_000), 0..40),
        joules in proptest::collection::vec(0.0f64..500.0, 2),
        idle_watts in 0.0f64..300.0,
        policy in prop_oneof![Just(IdlePolicy::Unattributed), Just(IdlePolicy::Even), Just(IdlePolicy::Proportional)],
    ) {
        let mut accounting = Accounting::new(Duration::from_secs(3600));
        let usage: Vec<ProcessUsage> = usage_spec.iter().map(|(pid, cgroup, socket, ns)| on_socket(*pid, *cgroup, *socket, *ns)).collect();
        let reading = CpuReading { usage: usage.clone(), ..Default::default() };
        accounting.apply_cpu(&reading, at(0), Duration::from_secs(1), &[0, 1], &mut resolver);
        let interval = EnergyInterval {
            energies: vec![energy(Domain::Package, 0, joules[0]), energy(Domain::Package, 1, joules[1])],
            ..Default::default()
        };
        accounting.apply_energy(&usage, &accounting.usage_slots.clone(), &interval, 1.0, policy, &|_| IdleBaseline::configured(idle_watts));
        let d = Domain::Package as usize;
        let processes: f64 = accounting.processes().values().map(|p| p.energy.joules[d]).sum();
        let workloads: f64 = accounting.workloads().map(|w| w.energy.joules[d]).sum();
        let node = accounting.node_energy();
        let measured = joules[0] + joules[1];
        prop_assert!((node.measured[d] - measured).abs() < 1e-9);
        prop_assert!((processes + node.idle[d] + node.unattributed[d] - measured).abs() < 1e-6);
        prop_assert!((workloads - processes).abs() < 1e-6);
        prop_assert!((node.attributed[d] - processes).abs() < 1e-6);
    }
}

/// A snapshot rebuilds only the shards whose processes or workloads
/// changed, and still shows every change: the interval after a workload ran
/// shows it idle, and a shard nobody touched is the very same memory.
#[test]
fn snapshots_share_unchanged_views_and_show_every_change() {
    use crate::snapshot::{Snapshot, SnapshotBase};
    let snapshot = |accounting: &mut Accounting, previous: Option<&Snapshot>| {
        let base = SnapshotBase {
            generated_at: at(0),
            started_at: at(0),
            interval: Duration::from_secs(1),
            method: crate::cpu::Method::Ebpf,
            sockets: 1,
            losses: Vec::new(),
            sources: Vec::new(),
            read_errors: 0,
            threads_read: 0,
            energy: Default::default(),
            agent: Default::default(),
            programs: Vec::new(),
        };
        let built = Snapshot::build(accounting, base, previous);
        accounting.views_built();
        built
    };
    let mut accounting = Accounting::new(Duration::from_secs(900));
    let apply = |accounting: &mut Accounting, usage: Vec<ProcessUsage>, second| {
        let reading = CpuReading {
            usage,
            ..Default::default()
        };
        accounting.apply_cpu(
            &reading,
            at(second),
            Duration::from_secs(1),
            &[0],
            &mut resolver,
        );
        // As the collector does every interval (the cgroups all exist).
        accounting.mark_gone_workloads(at(second), &mut |_| true);
    };
    // 40 processes in the container, and sshd.
    let mut everyone: Vec<ProcessUsage> = (100..140).map(|pid| usage(pid, 1, 10)).collect();
    everyone.push(usage(10, 2, 50));
    apply(&mut accounting, everyone, 1);
    let first = snapshot(&mut accounting, None);
    let sshd = |s: &Snapshot| {
        s.workloads
            .iter()
            .find(|w| &*w.key == "service:sshd.service")
            .map(|w| (w.interval_ns, w.cpu_ns_by_socket[0]))
    };
    assert_eq!(sshd(&first), Some((50, 50)));
    assert_eq!(first.processes.len(), 41);

    // Only sshd runs.
    apply(&mut accounting, vec![usage(10, 2, 20)], 2);
    let second = snapshot(&mut accounting, Some(&first));
    assert_eq!(sshd(&second), Some((20, 70)));
    let container = |s: &Snapshot| {
        s.workloads
            .iter()
            .find(|w| w.key.starts_with("container:"))
            .map(|w| (w.interval_ns, w.cpu_ns_by_socket[0]))
    };
    assert_eq!(container(&second), Some((0, 400)), "idle this interval");
    let process = |s: &Snapshot, pid| {
        s.processes
            .iter()
            .find(|p| p.key.pid == pid)
            .map(|p| p.interval_ns)
    };
    assert_eq!(process(&second, 100), Some(0));
    assert_eq!(process(&second, 10), Some(20));

    // Nobody runs: figures from the last interval go to zero, and then
    // nothing is rebuilt.
    apply(&mut accounting, Vec::new(), 3);
    let third = snapshot(&mut accounting, Some(&second));
    assert_eq!(sshd(&third), Some((0, 70)));
    assert_eq!(process(&third, 10), Some(0));
    apply(&mut accounting, Vec::new(), 4);
    let fourth = snapshot(&mut accounting, Some(&third));
    assert_eq!(sshd(&fourth), Some((0, 70)));
    assert_eq!(container(&fourth), Some((0, 400)));
    assert_eq!(fourth.processes.len(), 41);
    let same = |a: &Snapshot, b: &Snapshot| {
        a.workloads
            .iter()
            .zip(b.workloads.iter())
            .all(|(x, y)| std::ptr::eq(x, y))
            && a.processes
                .iter()
                .zip(b.processes.iter())
                .all(|(x, y)| std::ptr::eq(x, y))
    };
    assert!(same(&third, &fourth), "an idle interval rebuilds nothing");
    assert!(!same(&second, &third));
}
