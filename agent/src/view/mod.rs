//! One typed view of a snapshot: every figure a reader shows (watts,
//! totals, cores, pod sums, the node's books, devices), computed once per
//! snapshot and read by the JSON API, `/metrics`, OTLP, and the coming
//! `query` / `top` / controller, so a figure means the same everywhere.
//!
//! The view is serde `Serialize` + `Deserialize`: the API's JSON is this
//! view, and a client can read it back into the same types.

mod build;
pub(crate) mod time_text;

use std::{collections::BTreeMap, time::SystemTime};

use serde::{Deserialize, Serialize};

pub use build::{energy_figures, process_figures};

use crate::energy::{
    Domain, DomainId, EnergyMethod, SourceHealth, gpu::GpuDevice, model::ModelFit,
    thermal::Temperature,
};
use crate::{sinks::ExportFigures, snapshot::Snapshot};

/// Joules or watts keyed by the domains this node measures (absent:
/// not measured here), plus `total` (package + dram + gpu: the domains that
/// do not overlap; core/uncore are inside package, psys covers them all).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ByDomain {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub core: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uncore: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dram: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psys: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<f64>,
    pub total: f64,
}

impl ByDomain {
    pub fn get(&self, domain: Domain) -> Option<f64> {
        match domain {
            Domain::Package => self.package,
            Domain::Core => self.core,
            Domain::Uncore => self.uncore,
            Domain::Dram => self.dram,
            Domain::Psys => self.psys,
            Domain::Gpu => self.gpu,
        }
    }

    fn slot(&mut self, domain: Domain) -> &mut Option<f64> {
        match domain {
            Domain::Package => &mut self.package,
            Domain::Core => &mut self.core,
            Domain::Uncore => &mut self.uncore,
            Domain::Dram => &mut self.dram,
            Domain::Psys => &mut self.psys,
            Domain::Gpu => &mut self.gpu,
        }
    }

    /// The measured domains and their values, in `Domain::ALL` order.
    pub fn iter(&self) -> impl Iterator<Item = (Domain, f64)> + '_ {
        Domain::ALL
            .into_iter()
            .filter_map(|d| self.get(d).map(|v| (d, v)))
    }
}

/// The energy fields every workload, pod and process carries.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EnergyFigures {
    /// Cumulative since the agent (or the workload) started.
    pub energy_joules: ByDomain,
    /// Over the last interval.
    pub power_watts: ByDomain,
    /// The method behind each measured domain.
    pub energy_method: BTreeMap<Domain, EnergyMethod>,
    /// True when the figures come from the model (no meter on this node).
    pub estimated: bool,
    /// One relative standard deviation, for estimates.
    pub relative_uncertainty: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContainerFigures {
    pub container_id: String,
    pub runtime: String,
    /// The unprivileged user whose delegated cgroup subtree holds this
    /// container (rootless containers, or a cgroup a user named after a
    /// container id): absent for containers of the node's runtimes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_uid: Option<u32>,
    pub pod_uid: Option<String>,
    pub pod_qos: Option<String>,
    pub cgroup_path: Option<String>,
    pub cpu_seconds: f64,
    pub cpu_seconds_by_socket: Vec<f64>,
    /// CPUs used in the last interval (1.0 = one CPU busy all the time).
    pub cpu_cores: f64,
    pub method: String,
    #[serde(with = "time_text")]
    pub first_seen: SystemTime,
    #[serde(with = "time_text")]
    pub last_seen: SystemTime,
    pub exited: bool,
    #[serde(with = "time_text::optional")]
    pub exited_at: Option<SystemTime>,
    pub live_processes: u32,
    #[serde(flatten)]
    pub energy: EnergyFigures,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcessFigures {
    pub pid: u32,
    pub comm: String,
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
    pub workload: String,
    pub cgroup_path: Option<String>,
    pub cpu_seconds: f64,
    pub cpu_seconds_by_socket: Vec<f64>,
    pub cpu_cores: f64,
    pub method: String,
    #[serde(with = "time_text")]
    pub first_seen: SystemTime,
    #[serde(with = "time_text")]
    pub last_seen: SystemTime,
    pub exited: bool,
    #[serde(flatten)]
    pub energy: EnergyFigures,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkloadFigures {
    /// `container:<id>`, `pod:<uid>`, `service:<unit>` or `host`.
    pub workload: String,
    /// `container`, `pod`, `service` or `host`.
    pub kind: String,
    pub name: String,
    pub pod_uid: Option<String>,
    pub cgroup_path: Option<String>,
    pub cpu_seconds: f64,
    pub cpu_cores: f64,
    pub method: String,
    #[serde(with = "time_text")]
    pub first_seen: SystemTime,
    #[serde(with = "time_text")]
    pub last_seen: SystemTime,
    pub exited: bool,
    pub live_processes: u32,
    #[serde(flatten)]
    pub energy: EnergyFigures,
}

/// A pod: the sums of its containers and pod-level cgroups.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PodFigures {
    pub pod_uid: String,
    pub pod_qos: String,
    pub containers: Vec<String>,
    pub cpu_seconds: f64,
    pub cpu_cores: f64,
    pub method: String,
    /// True when every container and cgroup of the pod has exited.
    pub exited: bool,
    #[serde(flatten)]
    pub energy: EnergyFigures,
}

/// The node's books of one kind (measured, attributed, idle, unattributed).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Books {
    pub measured: ByDomain,
    pub attributed: ByDomain,
    pub idle: ByDomain,
    pub unattributed: ByDomain,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PowerBooks {
    #[serde(flatten)]
    pub books: Books,
    /// One standard deviation of the last interval's estimates.
    pub uncertainty: ByDomain,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelFigures {
    pub idle_watts_per_socket: Option<f64>,
    pub max_watts_per_socket: Option<f64>,
    pub relative_uncertainty: Option<f64>,
    pub fits: Vec<ModelFit>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeFigures {
    pub method: String,
    pub cpu_busy_seconds: f64,
    pub cpu_idle_seconds: f64,
    pub cpu_busy_seconds_by_cpu: Vec<f64>,
    pub cpu_idle_seconds_by_cpu: Vec<f64>,
    /// Busy share of the node's CPUs over the last interval.
    pub cpu_utilization: f64,
    pub energy_joules: Books,
    pub power_watts: PowerBooks,
    pub idle_baseline_watts: ByDomain,
    /// measured − attributed − idle − unattributed: zero when the books balance.
    pub residual_joules: ByDomain,
    pub energy_method: BTreeMap<Domain, EnergyMethod>,
    pub estimated: bool,
    pub temperatures: Vec<Temperature>,
    pub gpus: Vec<GpuDevice>,
    /// Each metered or modelled domain instance (a socket's package, a GPU).
    pub devices: Vec<DeviceFigures>,
    pub model: ModelFigures,
    pub sources: Vec<SourceHealth>,
}

/// One domain instance, as the OpenTelemetry hardware conventions name it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceFigures {
    pub id: DomainId,
    /// `package-0`, `dram-1`, `psys`, `gpu-0`.
    pub hw_id: String,
    /// `cpu`, `memory`, `gpu` or `host` (psys: the whole platform).
    pub hw_type: String,
    /// Model name where known (GPUs), else the domain.
    pub hw_name: String,
    /// Cumulative since the agent started.
    pub energy_joules: f64,
    /// Over the last interval.
    pub power_watts: f64,
    pub method: EnergyMethod,
    pub estimated: bool,
}

/// Run-time statistics of one kernel program (zero unless the kernel's BPF
/// statistics are on: `sysctl kernel.bpf_stats_enabled=1`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProgramFigures {
    pub name: String,
    pub run_time_ns: u64,
    pub run_count: u64,
    /// Mean run time per call, when counted.
    pub ns_per_run: Option<f64>,
}

/// The agent's own cost and losses.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentFigures {
    /// User + system CPU time of the agent since it started.
    pub cpu_seconds: f64,
    /// Resident memory.
    pub memory_bytes: u64,
    /// Where the kernel side lost data (name → count since load).
    pub losses: BTreeMap<String, u64>,
    /// Failed reads of the CPU source since start.
    pub read_errors: u64,
    /// Threads the CPU source's reads looked at since start (eBPF: only
    /// threads that ran, or run now).
    #[serde(default)]
    pub threads_read: u64,
    pub programs: Vec<ProgramFigures>,
}

/// `/healthz`: whether the agent measures, and what it costs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub method: String,
    pub sequence: u64,
    #[serde(with = "time_text")]
    pub generated_at: SystemTime,
    #[serde(with = "time_text")]
    pub started_at: SystemTime,
    pub interval_seconds: f64,
    pub sources: Vec<SourceHealth>,
    pub losses: BTreeMap<String, u64>,
    pub read_errors: u64,
    pub agent: AgentFigures,
    pub exports: ExportFigures,
}

impl Health {
    pub fn of(snapshot: &Snapshot, exports: ExportFigures) -> Self {
        let figures = snapshot.figures();
        Self {
            status: "ok".to_owned(),
            method: snapshot.method.as_str().to_owned(),
            sequence: snapshot.sequence,
            generated_at: snapshot.generated_at,
            started_at: snapshot.started_at,
            interval_seconds: snapshot.interval.as_secs_f64(),
            // Every input: the CPU source's and the energy sources'.
            sources: snapshot
                .sources
                .iter()
                .chain(&snapshot.energy.sources)
                .cloned()
                .collect(),
            losses: figures.agent.losses.clone(),
            read_errors: snapshot.read_errors,
            agent: figures.agent.clone(),
            exports,
        }
    }
}

/// Everything but processes (which readers select before computing).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    pub sequence: u64,
    #[serde(with = "time_text")]
    pub generated_at: SystemTime,
    pub interval_seconds: f64,
    pub node: NodeFigures,
    /// Sorted by id.
    pub containers: Vec<ContainerFigures>,
    /// Sorted by UID.
    pub pods: Vec<PodFigures>,
    /// Sorted by key.
    pub workloads: Vec<WorkloadFigures>,
    pub agent: AgentFigures,
}

impl Figures {
    /// A container by full id, or by a unique prefix of at least 12
    /// characters (the short form `docker ps` and `crictl ps` print).
    pub fn container(&self, id: &str) -> Result<&ContainerFigures, Lookup> {
        // An exact id names the runtime's container (sorted first) even
        // when a user's delegated cgroup carries the same id.
        let exact = self
            .containers
            .partition_point(|c| c.container_id.as_str() < id);
        if let Some(found) = self.containers.get(exact)
            && found.container_id == id
        {
            return Ok(found);
        }
        if id.len() < 12 {
            return Err(Lookup::NotFound);
        }
        let start = self
            .containers
            .partition_point(|c| c.container_id.as_str() < id);
        let matches: Vec<&ContainerFigures> = self.containers[start..]
            .iter()
            .take_while(|c| c.container_id.starts_with(id))
            .collect();
        match matches.as_slice() {
            [] => Err(Lookup::NotFound),
            [one] => Ok(one),
            many => Err(Lookup::Ambiguous(
                many.iter().map(|c| c.container_id.clone()).collect(),
            )),
        }
    }
}

/// Why a lookup by id found no single answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    NotFound,
    /// The candidates a prefix matches.
    Ambiguous(Vec<String>),
}

#[cfg(test)]
pub(crate) mod tests;
