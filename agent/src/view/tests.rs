//! The view on a hand-made snapshot: the figures every reader shows.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use super::*;
use crate::{
    cgroup::{Pod, QosClass, Runtime, Workload},
    cpu::{Comm, Method, ProcessKey},
    energy::{Domain, EnergyMethod},
    snapshot::{ProcessView, Snapshot, WorkloadView},
};

pub(crate) const POD: &str = "0a1b2c3d-0000-4000-8000-000000000001";

fn joules(package: f64, core: f64, dram: f64) -> crate::accounting::DomainJoules {
    let mut j = [0.0; Domain::ALL.len()];
    j[Domain::Package as usize] = package;
    j[Domain::Core as usize] = core;
    j[Domain::Dram as usize] = dram;
    j
}

fn workload(workload: Workload, key: &str, cpu_s: u64, package: f64, exited: bool) -> WorkloadView {
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let mut cpu = [0; agent_common::MAX_SOCKETS];
    cpu[0] = cpu_s * 1_000_000_000;
    WorkloadView {
        key: Arc::from(key),
        workload: Arc::new(workload),
        cgroup_path: Some(Arc::from(format!("/test/{key}"))),
        cpu_ns_by_socket: cpu,
        interval_ns: 500_000_000,
        energy_joules: joules(package, package / 2.0, package / 10.0),
        interval_energy_joules: joules(4.0, 2.0, 0.4),
        first_seen: at,
        last_seen: at + Duration::from_secs(60),
        exited_at: exited.then_some(at + Duration::from_secs(61)),
        live_processes: u32::from(!exited),
    }
}

fn container(id: &str, qos: QosClass, package: f64, exited: bool) -> WorkloadView {
    workload(
        Workload::Container {
            id: id.to_owned(),
            runtime: Runtime::Containerd,
            pod: Some(Pod {
                uid: POD.to_owned(),
                qos,
            }),
            owner_uid: None,
        },
        &format!("container:{id}"),
        3,
        package,
        exited,
    )
}

/// Two containers of one pod (ids sharing a 12-character prefix), a
/// service, and a process in the first container; package, core and dram
/// metered over a 2 s interval.
pub(crate) fn sample_snapshot() -> Snapshot {
    let mut snapshot = Snapshot::empty(Method::Ebpf, Duration::from_secs(1));
    snapshot.sequence = 7;
    // Whole milliseconds: the JSON view keeps times to the millisecond.
    snapshot.generated_at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_800_000_061_250);
    snapshot.workloads = vec![
        container(
            &format!("abcdef012345{}", "1".repeat(52)),
            QosClass::Burstable,
            100.0,
            false,
        ),
        container(
            &format!("abcdef012345{}", "2".repeat(52)),
            QosClass::Burstable,
            50.0,
            true,
        ),
        workload(
            Workload::SystemdUnit {
                name: "sshd.service".into(),
            },
            "service:sshd.service",
            1,
            10.0,
            false,
        ),
    ]
    .into();
    snapshot.processes = vec![ProcessView {
        key: ProcessKey {
            pid: 42,
            start_ns: 9,
        },
        comm: Comm::from_str_lossy("burn"),
        cgroup_id: 1,
        workload_slot: 0,
        cpu_ns_by_socket: snapshot.workloads[0].cpu_ns_by_socket,
        interval_ns: 250_000_000,
        energy_joules: joules(100.0, 50.0, 10.0),
        interval_energy_joules: joules(4.0, 2.0, 0.4),
        first_seen: snapshot.workloads[0].first_seen,
        last_seen: snapshot.workloads[0].last_seen,
        exited: false,
    }]
    .into();
    let node = &mut snapshot.energy.node;
    for domain in [Domain::Package, Domain::Core, Domain::Dram] {
        node.methods[domain as usize] = Some(EnergyMethod::Rapl);
    }
    node.interval_seconds = 2.0;
    node.measured = joules(200.0, 90.0, 20.0);
    node.attributed = joules(160.0, 80.0, 16.0);
    node.idle = joules(30.0, 10.0, 4.0);
    node.unattributed = joules(10.0, 0.0, 0.0);
    node.interval_measured = joules(20.0, 9.0, 2.0);
    snapshot
}

#[test]
fn totals_count_only_domains_that_do_not_overlap() {
    let figures = sample_snapshot().figures();
    let c = &figures.containers[0];
    // package + dram; core is inside package.
    assert_eq!(c.energy.energy_joules.total, 100.0 + 10.0);
    assert_eq!(c.energy.energy_joules.core, Some(50.0));
    assert_eq!(
        c.energy.energy_joules.psys, None,
        "psys is not metered here"
    );
    // Watts are the interval's joules over the interval's seconds.
    assert_eq!(c.energy.power_watts.package, Some(2.0));
    assert_eq!(c.energy.power_watts.total, 2.0 + 0.2);
    assert_eq!(c.cpu_cores, 0.5);
    assert_eq!(c.cpu_seconds, 3.0);
    assert_eq!(figures.node.power_watts.books.measured.package, Some(10.0));
    assert_eq!(figures.node.residual_joules.package, Some(0.0));
}

#[test]
fn pods_are_the_sums_of_their_containers() {
    let figures = sample_snapshot().figures();
    assert_eq!(figures.pods.len(), 1);
    let pod = &figures.pods[0];
    assert_eq!(pod.pod_uid, POD);
    assert_eq!(pod.containers.len(), 2);
    assert_eq!(pod.energy.energy_joules.package, Some(150.0));
    assert_eq!(pod.cpu_seconds, 6.0);
    assert_eq!(pod.cpu_cores, 1.0);
    assert!(!pod.exited, "one container still runs");
}

#[test]
fn containers_are_found_by_id_or_unique_prefix() {
    let figures = sample_snapshot().figures();
    let first = figures.containers[0].container_id.clone();
    assert_eq!(figures.container(&first).unwrap().container_id, first);
    assert_eq!(
        figures.container(&first[..13]).unwrap().container_id,
        first,
        "13 characters tell the two apart"
    );
    match figures.container(&first[..12]) {
        Err(Lookup::Ambiguous(candidates)) => assert_eq!(candidates.len(), 2),
        other => panic!("expected an ambiguous prefix, got {other:?}"),
    }
    assert_eq!(
        figures.container("abcdef"),
        Err(Lookup::NotFound),
        "too short"
    );
    assert_eq!(figures.container("ffffffffffffffff"), Err(Lookup::NotFound));
}

#[test]
fn the_view_round_trips_through_json() {
    let snapshot = sample_snapshot();
    let figures = snapshot.figures();
    let text = serde_json::to_string(&*figures).unwrap();
    let back: Figures = serde_json::from_str(&text).unwrap();
    assert_eq!(back, *figures);
    let process = process_figures(&snapshot, snapshot.processes.iter().next().unwrap());
    let text = serde_json::to_string(&process).unwrap();
    assert!(
        text.contains(
            "\"energy_joules\":{\"package\":100.0,\"core\":50.0,\"dram\":10.0,\"total\":110.0}"
        ),
        "{text}"
    );
    let back: ProcessFigures = serde_json::from_str(&text).unwrap();
    assert_eq!(back, process);
    assert_eq!(
        back.container_id.as_deref(),
        Some(figures.containers[0].container_id.as_str())
    );
}

#[test]
fn the_view_is_computed_once_per_snapshot() {
    let snapshot = sample_snapshot();
    assert!(Arc::ptr_eq(&snapshot.figures(), &snapshot.figures()));
}
