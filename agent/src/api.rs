//! The local query API (JSON over HTTP), served from the latest snapshot.
//!
//! Every handler reads one `Arc<Snapshot>` and never waits on the collector.

use std::{collections::HashMap, time::SystemTime};

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Serialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::{
    accounting::DomainJoules,
    cgroup::Workload,
    energy::Domain,
    snapshot::{ProcessView, SharedSnapshot, Snapshot, WorkloadView, seconds, total_seconds},
};

pub fn router(snapshot: SharedSnapshot) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/api/v1/containers", get(list_containers))
        .route("/api/v1/containers/{id}", get(get_container))
        .route("/api/v1/processes", get(list_processes))
        .route("/api/v1/workloads", get(list_workloads))
        .route("/api/v1/pods", get(list_pods))
        .route("/api/v1/node", get(node))
        .fallback(not_found)
        .with_state(snapshot)
}

/// Serves the API on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    snapshot: SharedSnapshot,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(snapshot))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// A JSON error: `{"error": "...", "status": 404}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": self.message, "status": self.status.as_u16() });
        (self.status, Json(body)).into_response()
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found(
        "no such endpoint; see /api/v1/containers, /api/v1/processes, /api/v1/workloads, /api/v1/node, /healthz",
    )
}

fn timestamp(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

/// Container ids are hex for every runtime we know; accept the characters
/// any runtime could use, reject anything else as malformed.
fn validate_container_id(id: &str) -> Result<(), ApiError> {
    let valid = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if valid {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "malformed container id {id:?}: expected 1 to 128 characters of [A-Za-z0-9._-]"
        )))
    }
}

fn check_params(params: &HashMap<String, String>, allowed: &[&str]) -> Result<(), ApiError> {
    for name in params.keys() {
        if !allowed.contains(&name.as_str()) {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter {name:?}; allowed: {}",
                allowed.join(", ")
            )));
        }
    }
    Ok(())
}

/// For list endpoints whose only parameter is `limit`.
fn limit_only(params: &HashMap<String, String>) -> Result<usize, ApiError> {
    check_params(params, &["limit"])?;
    Ok(parse_limit(params)?.unwrap_or(usize::MAX))
}

fn parse_limit(params: &HashMap<String, String>) -> Result<Option<usize>, ApiError> {
    match params.get("limit") {
        None => Ok(None),
        Some(raw) => match raw.parse::<usize>() {
            Ok(limit) if limit > 0 => Ok(Some(limit)),
            _ => Err(ApiError::bad_request(format!(
                "malformed limit {raw:?}: expected a positive integer"
            ))),
        },
    }
}

#[derive(Serialize)]
struct ContainerJson<'a> {
    container_id: &'a str,
    runtime: &'static str,
    pod_uid: Option<&'a str>,
    pod_qos: Option<&'static str>,
    cgroup_path: Option<&'a str>,
    cpu_seconds: f64,
    cpu_seconds_by_socket: Vec<f64>,
    /// CPUs used in the last interval (1.0 = one CPU busy all the time).
    cpu_cores: f64,
    method: &'static str,
    first_seen: String,
    last_seen: String,
    exited: bool,
    exited_at: Option<String>,
    live_processes: u32,
}

fn sockets(snapshot: &Snapshot) -> usize {
    snapshot.sockets.clamp(1, agent_common::MAX_SOCKETS)
}

/// Seconds on each of the machine's sockets.
fn socket_seconds(by_socket: &crate::cpu::SocketNs, sockets: usize) -> Vec<f64> {
    by_socket[..sockets].iter().map(|ns| seconds(*ns)).collect()
}

fn container_json<'a>(snapshot: &Snapshot, view: &'a WorkloadView) -> Option<ContainerJson<'a>> {
    let Workload::Container { id, runtime, pod } = &*view.workload else {
        return None;
    };
    Some(ContainerJson {
        container_id: id,
        runtime: runtime.as_str(),
        pod_uid: pod.as_ref().map(|p| p.uid.as_str()),
        pod_qos: pod.as_ref().map(|p| p.qos.as_str()),
        cgroup_path: view.cgroup_path.as_deref(),
        cpu_seconds: total_seconds(&view.cpu_ns_by_socket),
        cpu_seconds_by_socket: socket_seconds(&view.cpu_ns_by_socket, sockets(snapshot)),
        cpu_cores: cores(view.interval_ns, snapshot),
        method: snapshot.method.as_str(),
        first_seen: timestamp(view.first_seen),
        last_seen: timestamp(view.last_seen),
        exited: view.exited_at.is_some(),
        exited_at: view.exited_at.map(timestamp),
        live_processes: view.live_processes,
    })
}

fn cores(interval_ns: u64, snapshot: &Snapshot) -> f64 {
    let wall = snapshot.interval.as_nanos() as f64;
    if wall > 0.0 {
        interval_ns as f64 / wall
    } else {
        0.0
    }
}

/// Joules (or watts) keyed by the domains this node measures, plus `total`
/// (package + dram + gpu: the domains that do not overlap).
fn by_domain(snapshot: &Snapshot, values: &DomainJoules, divide_by: f64) -> Value {
    let methods = &snapshot.energy.node.methods;
    let mut map = serde_json::Map::new();
    let mut total = 0.0;
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
            total += value;
        }
        map.insert(domain.as_str().to_owned(), json!(value));
    }
    map.insert("total".to_owned(), json!(total));
    Value::Object(map)
}

/// The method behind each measured domain (`rapl`, `nvml`, `model`, ...).
fn energy_methods(snapshot: &Snapshot) -> Value {
    let mut map = serde_json::Map::new();
    for domain in Domain::ALL {
        if let Some(method) = snapshot.energy.node.methods[domain as usize] {
            map.insert(domain.as_str().to_owned(), json!(method.as_str()));
        }
    }
    Value::Object(map)
}

fn energy_fields(
    snapshot: &Snapshot,
    joules: &DomainJoules,
    interval_joules: &DomainJoules,
) -> Value {
    // Estimates carry the model's relative uncertainty (one standard
    // deviation); measured figures carry none.
    let uncertainty = snapshot
        .energy
        .estimated
        .then(|| snapshot.energy.model.map(|m| m.relative_uncertainty))
        .flatten();
    json!({
        "energy_joules": by_domain(snapshot, joules, 1.0),
        "power_watts": by_domain(snapshot, interval_joules, snapshot.energy.node.interval_seconds),
        "energy_method": energy_methods(snapshot),
        "estimated": snapshot.energy.estimated,
        "relative_uncertainty": uncertainty,
    })
}

/// Serializes `item` and adds the energy fields to it.
fn with_energy(item: impl Serialize, energy: Value) -> Value {
    let mut value = json!(item);
    if let (Value::Object(map), Value::Object(extra)) = (&mut value, energy) {
        map.extend(extra);
    }
    value
}

async fn healthz(State(shared): State<SharedSnapshot>) -> Json<Value> {
    let snapshot = shared.latest();
    let losses: serde_json::Map<String, Value> = snapshot
        .losses
        .iter()
        .map(|(name, count)| ((*name).to_owned(), json!(count)))
        .collect();
    Json(json!({
        "status": "ok",
        "method": snapshot.method.as_str(),
        "sequence": snapshot.sequence,
        "generated_at": timestamp(snapshot.generated_at),
        "started_at": timestamp(snapshot.started_at),
        "interval_seconds": snapshot.interval.as_secs_f64(),
        "sources": snapshot.sources,
        "losses": losses,
        "read_errors": snapshot.read_errors,
    }))
}

async fn list_containers(
    State(shared): State<SharedSnapshot>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let limit = limit_only(&params)?;
    let snapshot = shared.latest();
    let mut views: Vec<&WorkloadView> = snapshot.containers().collect();
    views.sort_unstable_by(|a, b| a.key.cmp(&b.key));
    let list: Vec<Value> = views
        .into_iter()
        .filter_map(|view| {
            let energy =
                energy_fields(&snapshot, &view.energy_joules, &view.interval_energy_joules);
            container_json(&snapshot, view).map(|c| with_energy(c, energy))
        })
        .take(limit)
        .collect();
    Ok(Json(json!(list)))
}

async fn get_container(
    State(shared): State<SharedSnapshot>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    validate_container_id(&id)?;
    let snapshot = shared.latest();
    let view = snapshot.container(&id).ok_or_else(|| {
        ApiError::not_found(format!(
            "no container {id:?} seen on this node (exited ones are kept for the retention period)"
        ))
    })?;
    let energy = energy_fields(&snapshot, &view.energy_joules, &view.interval_energy_joules);
    Ok(Json(with_energy(container_json(&snapshot, view), energy)))
}

#[derive(Serialize)]
struct ProcessJson<'a> {
    pid: u32,
    comm: String,
    container_id: Option<&'a str>,
    pod_uid: Option<&'a str>,
    workload: &'a str,
    cgroup_path: Option<&'a str>,
    cpu_seconds: f64,
    cpu_seconds_by_socket: Vec<f64>,
    cpu_cores: f64,
    method: &'static str,
    first_seen: String,
    last_seen: String,
    exited: bool,
}

fn process_json<'a>(snapshot: &'a Snapshot, process: &'a ProcessView) -> ProcessJson<'a> {
    let workload = snapshot.workloads.get(process.workload);
    let container_id = workload.and_then(|w| match &*w.workload {
        Workload::Container { id, .. } => Some(id.as_str()),
        _ => None,
    });
    ProcessJson {
        pid: process.key.pid,
        comm: process.comm.as_str().into_owned(),
        container_id,
        pod_uid: workload
            .and_then(|w| w.workload.pod())
            .map(|p| p.uid.as_str()),
        workload: workload.map_or("host", |w| &*w.key),
        cgroup_path: snapshot.cgroup_paths.get(&process.cgroup_id).map(|p| &**p),
        cpu_seconds: total_seconds(&process.cpu_ns_by_socket),
        cpu_seconds_by_socket: socket_seconds(&process.cpu_ns_by_socket, sockets(snapshot)),
        cpu_cores: cores(process.interval_ns, snapshot),
        method: snapshot.method.as_str(),
        first_seen: timestamp(process.first_seen),
        last_seen: timestamp(process.last_seen),
        exited: process.exited,
    }
}

async fn list_processes(
    State(shared): State<SharedSnapshot>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    check_params(&params, &["container", "limit"])?;
    let limit = parse_limit(&params)?.unwrap_or(usize::MAX);
    let snapshot = shared.latest();
    let workload_filter = match params.get("container") {
        None => None,
        Some(id) => {
            validate_container_id(id)?;
            let view = snapshot.container(id).ok_or_else(|| {
                ApiError::not_found(format!("no container {id:?} seen on this node"))
            })?;
            snapshot
                .workloads
                .iter()
                .position(|w| std::ptr::eq(w, view))
        }
    };
    let mut selected: Vec<&ProcessView> = snapshot
        .processes
        .iter()
        .filter(|p| workload_filter.is_none_or(|index| p.workload == index))
        .collect();
    selected.sort_unstable_by_key(|p| p.key);
    let list: Vec<Value> = selected
        .into_iter()
        .take(limit)
        .map(|p| {
            let energy = energy_fields(&snapshot, &p.energy_joules, &p.interval_energy_joules);
            with_energy(process_json(&snapshot, p), energy)
        })
        .collect();
    Ok(Json(json!(list)))
}

#[derive(Serialize)]
struct WorkloadJson<'a> {
    workload: &'a str,
    kind: &'static str,
    name: String,
    pod_uid: Option<&'a str>,
    cgroup_path: Option<&'a str>,
    cpu_seconds: f64,
    cpu_cores: f64,
    method: &'static str,
    first_seen: String,
    last_seen: String,
    exited: bool,
    live_processes: u32,
}

async fn list_workloads(
    State(shared): State<SharedSnapshot>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let limit = limit_only(&params)?;
    let snapshot = shared.latest();
    let mut views: Vec<&WorkloadView> = snapshot.workloads.iter().collect();
    views.sort_unstable_by(|a, b| a.key.cmp(&b.key));
    let list: Vec<Value> = views
        .into_iter()
        .take(limit)
        .map(|w| {
            (
                w,
                WorkloadJson {
                    workload: &w.key,
                    kind: w.workload.kind(),
                    name: w.workload.name(),
                    pod_uid: w.workload.pod().map(|p| p.uid.as_str()),
                    cgroup_path: w.cgroup_path.as_deref(),
                    cpu_seconds: total_seconds(&w.cpu_ns_by_socket),
                    cpu_cores: cores(w.interval_ns, &snapshot),
                    method: snapshot.method.as_str(),
                    first_seen: timestamp(w.first_seen),
                    last_seen: timestamp(w.last_seen),
                    exited: w.exited_at.is_some(),
                    live_processes: w.live_processes,
                },
            )
        })
        .map(|(w, json)| {
            with_energy(
                json,
                energy_fields(&snapshot, &w.energy_joules, &w.interval_energy_joules),
            )
        })
        .collect();
    Ok(Json(json!(list)))
}

/// Pods: the sums of their containers and pod-level cgroups.
async fn list_pods(
    State(shared): State<SharedSnapshot>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let limit = limit_only(&params)?;
    let snapshot = shared.latest();
    struct PodSum<'a> {
        qos: &'static str,
        cpu_ns: u64,
        interval_ns: u64,
        joules: DomainJoules,
        interval_joules: DomainJoules,
        containers: Vec<&'a str>,
        live: bool,
    }
    let mut pods: std::collections::BTreeMap<&str, PodSum<'_>> = std::collections::BTreeMap::new();
    for view in &snapshot.workloads {
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
            sum.containers.push(id);
        }
        sum.live |= view.exited_at.is_none();
    }
    let list: Vec<Value> = pods
        .into_iter()
        .take(limit)
        .map(|(uid, sum)| {
            with_energy(
                json!({
                    "pod_uid": uid,
                    "pod_qos": sum.qos,
                    "containers": sum.containers,
                    "cpu_seconds": seconds(sum.cpu_ns),
                    "cpu_cores": cores(sum.interval_ns, &snapshot),
                    "method": snapshot.method.as_str(),
                    "exited": !sum.live,
                }),
                energy_fields(&snapshot, &sum.joules, &sum.interval_joules),
            )
        })
        .collect();
    Ok(Json(json!(list)))
}

async fn node(State(shared): State<SharedSnapshot>) -> Json<Value> {
    let snapshot = shared.latest();
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
    let residual: DomainJoules = std::array::from_fn(|d| {
        books.measured[d] - books.attributed[d] - books.idle[d] - books.unattributed[d]
    });
    let seconds_of_interval = books.interval_seconds;
    let mut sources: Vec<Value> = snapshot.sources.iter().map(|s| json!(s)).collect();
    sources.extend(snapshot.energy.sources.iter().map(|s| json!(s)));
    Json(json!({
        "method": snapshot.method.as_str(),
        "cpu_busy_seconds": busy.iter().sum::<f64>(),
        "cpu_idle_seconds": idle.iter().sum::<f64>(),
        "cpu_busy_seconds_by_cpu": busy,
        "cpu_idle_seconds_by_cpu": idle,
        "cpu_utilization": utilization,
        "energy_joules": {
            "measured": by_domain(&snapshot, &books.measured, 1.0),
            "attributed": by_domain(&snapshot, &books.attributed, 1.0),
            "idle": by_domain(&snapshot, &books.idle, 1.0),
            "unattributed": by_domain(&snapshot, &books.unattributed, 1.0),
        },
        "power_watts": {
            "measured": by_domain(&snapshot, &books.interval_measured, seconds_of_interval),
            "attributed": by_domain(&snapshot, &books.interval_attributed, seconds_of_interval),
            "idle": by_domain(&snapshot, &books.interval_idle, seconds_of_interval),
            "unattributed": by_domain(&snapshot, &books.interval_unattributed, seconds_of_interval),
            "uncertainty": by_domain(&snapshot, &books.interval_uncertainty, seconds_of_interval),
        },
        "idle_baseline_watts": by_domain(&snapshot, &books.idle_watts, 1.0),
        "residual_joules": by_domain(&snapshot, &residual, 1.0),
        "energy_method": energy_methods(&snapshot),
        "estimated": snapshot.energy.estimated,
        "temperatures": snapshot.energy.temperatures,
        "gpus": snapshot.energy.gpus,
        "model": {
            "idle_watts_per_socket": snapshot.energy.model.map(|m| m.idle_watts_per_socket),
            "max_watts_per_socket": snapshot.energy.model.map(|m| m.max_watts_per_socket),
            "relative_uncertainty": snapshot.energy.model.map(|m| m.relative_uncertainty),
            "fits": snapshot.energy.model_fits,
        },
        "sources": sources,
    }))
}
