//! Computes the view from a snapshot: the only place watts, totals, cores
//! and pod sums are derived from the accounting's raw figures.

use std::collections::BTreeMap;

use super::{
    AgentFigures, Books, ByDomain, ContainerFigures, DeviceFigures, EnergyFigures, Figures,
    ModelFigures, NodeFigures, PodFigures, PowerBooks, ProcessFigures, ProgramFigures,
    WorkloadFigures,
};
use crate::{
    accounting::DomainJoules,
    cgroup::Workload,
    cpu::SocketNs,
    energy::{Domain, DomainId, EnergyMethod},
    snapshot::{ProcessView, Snapshot, WorkloadView, seconds, total_seconds},
};

impl ByDomain {
    /// The domains this node measures, each `values[d] / divide_by` (0 when
    /// `divide_by` is not positive: no interval yet).
    fn of(methods: &[Option<EnergyMethod>], values: &DomainJoules, divide_by: f64) -> Self {
        let mut out = ByDomain::default();
        for domain in Domain::ALL {
            let d = domain as usize;
            if methods[d].is_none() {
                continue;
            }
            let value = if divide_by > 0.0 {
                values[d] / divide_by
            } else {
                0.0
            };
            if domain.in_total() {
                out.total += value;
            }
            *out.slot(domain) = Some(value);
        }
        out
    }
}

fn methods(snapshot: &Snapshot) -> BTreeMap<Domain, EnergyMethod> {
    Domain::ALL
        .into_iter()
        .filter_map(|d| snapshot.energy.node.methods[d as usize].map(|m| (d, m)))
        .collect()
}

/// Energy and power of one workload, pod or process.
pub fn energy_figures(
    snapshot: &Snapshot,
    joules: &DomainJoules,
    interval_joules: &DomainJoules,
) -> EnergyFigures {
    let node = &snapshot.energy.node;
    // Estimates carry the model's relative uncertainty (one standard
    // deviation); measured figures carry none.
    let relative_uncertainty = snapshot
        .energy
        .estimated
        .then(|| snapshot.energy.model.map(|m| m.relative_uncertainty))
        .flatten();
    EnergyFigures {
        energy_joules: ByDomain::of(&node.methods, joules, 1.0),
        power_watts: ByDomain::of(&node.methods, interval_joules, node.interval_seconds),
        energy_method: methods(snapshot),
        estimated: snapshot.energy.estimated,
        relative_uncertainty,
    }
}

fn cores(interval_ns: u64, snapshot: &Snapshot) -> f64 {
    let wall = snapshot.interval.as_nanos() as f64;
    if wall > 0.0 {
        interval_ns as f64 / wall
    } else {
        0.0
    }
}

/// Seconds on each of the machine's sockets.
fn socket_seconds(by_socket: &SocketNs, snapshot: &Snapshot) -> Vec<f64> {
    let sockets = snapshot.sockets.clamp(1, agent_common::MAX_SOCKETS);
    by_socket[..sockets].iter().map(|ns| seconds(*ns)).collect()
}

fn container_figures(snapshot: &Snapshot, view: &WorkloadView) -> Option<ContainerFigures> {
    let Workload::Container {
        id,
        runtime,
        pod,
        owner_uid,
    } = &*view.workload
    else {
        return None;
    };
    Some(ContainerFigures {
        container_id: id.clone(),
        runtime: runtime.as_str().to_owned(),
        owner_uid: *owner_uid,
        pod_uid: pod.as_ref().map(|p| p.uid.clone()),
        pod_qos: pod.as_ref().map(|p| p.qos.as_str().to_owned()),
        cgroup_path: view.cgroup_path.as_deref().map(str::to_owned),
        cpu_seconds: total_seconds(&view.cpu_ns_by_socket),
        cpu_seconds_by_socket: socket_seconds(&view.cpu_ns_by_socket, snapshot),
        cpu_cores: cores(view.interval_ns, snapshot),
        method: snapshot.method.as_str().to_owned(),
        first_seen: view.first_seen,
        last_seen: view.last_seen,
        exited: view.exited_at.is_some(),
        exited_at: view.exited_at,
        live_processes: view.live_processes,
        energy: energy_figures(snapshot, &view.energy_joules, &view.interval_energy_joules),
    })
}

fn workload_figures(snapshot: &Snapshot, view: &WorkloadView) -> WorkloadFigures {
    WorkloadFigures {
        workload: view.key.to_string(),
        kind: view.workload.kind().to_owned(),
        name: view.workload.name(),
        pod_uid: view.workload.pod().map(|p| p.uid.clone()),
        cgroup_path: view.cgroup_path.as_deref().map(str::to_owned),
        cpu_seconds: total_seconds(&view.cpu_ns_by_socket),
        cpu_cores: cores(view.interval_ns, snapshot),
        method: snapshot.method.as_str().to_owned(),
        first_seen: view.first_seen,
        last_seen: view.last_seen,
        exited: view.exited_at.is_some(),
        live_processes: view.live_processes,
        energy: energy_figures(snapshot, &view.energy_joules, &view.interval_energy_joules),
    }
}

/// One process (computed on demand: readers select processes first, since
/// a node has far more of them than of anything else).
pub fn process_figures(snapshot: &Snapshot, process: &ProcessView) -> ProcessFigures {
    let workload = snapshot.workload_of(process);
    let container_id = workload.and_then(|w| match &*w.workload {
        Workload::Container { id, .. } => Some(id.clone()),
        _ => None,
    });
    ProcessFigures {
        pid: process.key.pid,
        comm: process.comm.as_str().into_owned(),
        container_id,
        pod_uid: workload
            .and_then(|w| w.workload.pod())
            .map(|p| p.uid.clone()),
        workload: workload.map_or_else(|| "host".to_owned(), |w| w.key.to_string()),
        cgroup_path: snapshot
            .cgroup_paths
            .get(&process.cgroup_id)
            .map(|p| p.to_string()),
        cpu_seconds: total_seconds(&process.cpu_ns_by_socket),
        cpu_seconds_by_socket: socket_seconds(&process.cpu_ns_by_socket, snapshot),
        cpu_cores: cores(process.interval_ns, snapshot),
        method: snapshot.method.as_str().to_owned(),
        first_seen: process.first_seen,
        last_seen: process.last_seen,
        exited: process.exited,
        energy: energy_figures(
            snapshot,
            &process.energy_joules,
            &process.interval_energy_joules,
        ),
    }
}

fn pod_figures(snapshot: &Snapshot) -> Vec<PodFigures> {
    struct PodSum {
        qos: &'static str,
        cpu_ns: u64,
        interval_ns: u64,
        joules: DomainJoules,
        interval_joules: DomainJoules,
        containers: Vec<String>,
        live: bool,
    }
    let mut pods: BTreeMap<&str, PodSum> = BTreeMap::new();
    for view in snapshot.workloads.iter() {
        let Some(pod) = view.workload.pod() else {
            continue;
        };
        let sum = pods.entry(pod.uid.as_str()).or_insert_with(|| PodSum {
            qos: pod.qos.as_str(),
            cpu_ns: 0,
            interval_ns: 0,
            joules: [0.0; Domain::ALL.len()],
            interval_joules: [0.0; Domain::ALL.len()],
            containers: Vec::new(),
            live: false,
        });
        sum.cpu_ns += view.cpu_ns_by_socket.iter().sum::<u64>();
        sum.interval_ns += view.interval_ns;
        for d in 0..Domain::ALL.len() {
            sum.joules[d] += view.energy_joules[d];
            sum.interval_joules[d] += view.interval_energy_joules[d];
        }
        if let Workload::Container { id, .. } = &*view.workload {
            sum.containers.push(id.clone());
        }
        sum.live |= view.exited_at.is_none();
    }
    pods.into_iter()
        .map(|(uid, mut sum)| {
            sum.containers.sort_unstable();
            PodFigures {
                pod_uid: uid.to_owned(),
                pod_qos: sum.qos.to_owned(),
                containers: sum.containers,
                cpu_seconds: seconds(sum.cpu_ns),
                cpu_cores: cores(sum.interval_ns, snapshot),
                method: snapshot.method.as_str().to_owned(),
                exited: !sum.live,
                energy: energy_figures(snapshot, &sum.joules, &sum.interval_joules),
            }
        })
        .collect()
}

/// `hw.type` of a domain, after the OpenTelemetry hardware conventions.
fn hw_type(domain: Domain) -> &'static str {
    match domain {
        Domain::Package | Domain::Core | Domain::Uncore => "cpu",
        Domain::Dram => "memory",
        Domain::Gpu => "gpu",
        Domain::Psys => "host",
    }
}

fn hw_id(id: DomainId) -> String {
    match id.domain {
        Domain::Psys => "psys".to_owned(),
        domain => format!("{}-{}", domain.as_str(), id.index),
    }
}

fn device_figures(snapshot: &Snapshot) -> Vec<DeviceFigures> {
    let seconds = snapshot.energy.node.interval_seconds;
    snapshot
        .energy
        .devices
        .iter()
        .map(|device| {
            let gpu_name = (device.id.domain == Domain::Gpu)
                .then(|| {
                    snapshot
                        .energy
                        .gpus
                        .iter()
                        .find(|g| g.index == device.id.index)
                        .map(|g| g.name.clone())
                })
                .flatten();
            DeviceFigures {
                id: device.id,
                hw_id: hw_id(device.id),
                hw_type: hw_type(device.id.domain).to_owned(),
                hw_name: gpu_name.unwrap_or_else(|| device.id.domain.as_str().to_owned()),
                energy_joules: device.joules,
                power_watts: if seconds > 0.0 {
                    device.interval_joules / seconds
                } else {
                    0.0
                },
                method: device.method,
                estimated: device.method == EnergyMethod::Model,
            }
        })
        .collect()
}

fn node_figures(snapshot: &Snapshot) -> NodeFigures {
    let busy: Vec<f64> = snapshot
        .node
        .busy_ns_by_cpu
        .iter()
        .map(|ns| seconds(*ns))
        .collect();
    let idle: Vec<f64> = snapshot
        .node
        .idle_ns_by_cpu
        .iter()
        .map(|ns| seconds(*ns))
        .collect();
    let utilization = if snapshot.node.interval_capacity_ns > 0 {
        snapshot.node.interval_busy_ns as f64 / snapshot.node.interval_capacity_ns as f64
    } else {
        0.0
    };
    let books = &snapshot.energy.node;
    let m = &books.methods;
    let residual: DomainJoules = std::array::from_fn(|d| {
        books.measured[d] - books.attributed[d] - books.idle[d] - books.unattributed[d]
    });
    let per_second = books.interval_seconds;
    let mut sources = snapshot.sources.clone();
    sources.extend(snapshot.energy.sources.iter().cloned());
    let model = snapshot.energy.model;
    NodeFigures {
        method: snapshot.method.as_str().to_owned(),
        cpu_busy_seconds: busy.iter().sum(),
        cpu_idle_seconds: idle.iter().sum(),
        cpu_busy_seconds_by_cpu: busy,
        cpu_idle_seconds_by_cpu: idle,
        cpu_utilization: utilization,
        energy_joules: Books {
            measured: ByDomain::of(m, &books.measured, 1.0),
            attributed: ByDomain::of(m, &books.attributed, 1.0),
            idle: ByDomain::of(m, &books.idle, 1.0),
            unattributed: ByDomain::of(m, &books.unattributed, 1.0),
        },
        power_watts: PowerBooks {
            books: Books {
                measured: ByDomain::of(m, &books.interval_measured, per_second),
                attributed: ByDomain::of(m, &books.interval_attributed, per_second),
                idle: ByDomain::of(m, &books.interval_idle, per_second),
                unattributed: ByDomain::of(m, &books.interval_unattributed, per_second),
            },
            uncertainty: ByDomain::of(m, &books.interval_uncertainty, per_second),
        },
        idle_baseline_watts: ByDomain::of(m, &books.idle_watts, 1.0),
        residual_joules: ByDomain::of(m, &residual, 1.0),
        energy_method: methods(snapshot),
        estimated: snapshot.energy.estimated,
        temperatures: snapshot.energy.temperatures.clone(),
        gpus: snapshot.energy.gpus.clone(),
        devices: device_figures(snapshot),
        model: ModelFigures {
            idle_watts_per_socket: model.map(|m| m.idle_watts_per_socket),
            max_watts_per_socket: model.map(|m| m.max_watts_per_socket),
            relative_uncertainty: model.map(|m| m.relative_uncertainty),
            fits: snapshot.energy.model_fits.clone(),
        },
        sources,
    }
}

fn agent_figures(snapshot: &Snapshot) -> AgentFigures {
    AgentFigures {
        cpu_seconds: snapshot.agent.cpu_seconds,
        memory_bytes: snapshot.agent.memory_bytes,
        losses: snapshot
            .losses
            .iter()
            .map(|(name, count)| ((*name).to_owned(), *count))
            .collect(),
        read_errors: snapshot.read_errors,
        threads_read: snapshot.threads_read,
        programs: snapshot
            .programs
            .iter()
            .map(|p| ProgramFigures {
                name: p.name.to_owned(),
                run_time_ns: p.run_time_ns,
                run_count: p.run_count,
                ns_per_run: (p.run_count > 0).then(|| p.run_time_ns as f64 / p.run_count as f64),
            })
            .collect(),
    }
}

impl Figures {
    /// Everything but processes. Linear in workloads, plus one sort of the
    /// containers and workloads by key.
    pub fn build(snapshot: &Snapshot) -> Self {
        let mut ordered: Vec<&WorkloadView> = snapshot.workloads.iter().collect();
        ordered.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        let mut containers: Vec<ContainerFigures> = ordered
            .iter()
            .filter_map(|view| container_figures(snapshot, view))
            .collect();
        // The runtime-owned container first among those sharing an id.
        containers.sort_unstable_by(|a, b| {
            (&a.container_id, a.owner_uid.is_some(), a.owner_uid).cmp(&(
                &b.container_id,
                b.owner_uid.is_some(),
                b.owner_uid,
            ))
        });
        Figures {
            sequence: snapshot.sequence,
            generated_at: snapshot.generated_at,
            interval_seconds: snapshot.interval.as_secs_f64(),
            node: node_figures(snapshot),
            containers,
            pods: pod_figures(snapshot),
            workloads: ordered
                .iter()
                .map(|view| workload_figures(snapshot, view))
                .collect(),
            agent: agent_figures(snapshot),
        }
    }
}
