//! The local query API (JSON over HTTP), served from the latest snapshot.
//!
//! Every handler reads one `Arc<Snapshot>` and never waits on the collector.

use std::collections::HashMap;

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{
    controller::ControllerStatus,
    sinks::prometheus::{self, MetricsState},
    snapshot::{ProcessView, SharedSnapshot},
    view::{
        ContainerFigures, Health, Lookup, NodeFigures, PodFigures, ProcessFigures, WorkloadFigures,
        process_figures,
    },
};

pub fn router(state: MetricsState) -> Router {
    let token = state.token.clone();
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/api/v1/containers", get(list_containers))
        .route("/api/v1/containers/{id}", get(get_container))
        .route("/api/v1/processes", get(list_processes))
        .route("/api/v1/workloads", get(list_workloads))
        .route("/api/v1/pods", get(list_pods))
        .route("/api/v1/node", get(node))
        .route("/api/v1/controller", get(controller))
        .route("/metrics", get(prometheus::scrape))
        .fallback(not_found)
        .with_state(state);
    crate::auth::protect(router, token)
}

/// Serves the API on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: MetricsState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
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

    /// A container lookup that found nothing, or more than one container.
    fn lookup(id: &str, lookup: Lookup) -> Self {
        match lookup {
            Lookup::NotFound => Self::not_found(format!(
                "no container {id:?} seen on this node (exited ones are kept for the retention period)"
            )),
            Lookup::Ambiguous(candidates) => Self {
                status: StatusCode::CONFLICT,
                message: format!(
                    "container id prefix {id:?} is ambiguous: {}",
                    candidates.join(", ")
                ),
            },
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
        "no such endpoint; see /api/v1/containers, /api/v1/processes, /api/v1/workloads, /api/v1/pods, /api/v1/node, /healthz, /metrics",
    )
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

/// Items a list returns when the request names no `limit`: a node can hold
/// hundreds of thousands of processes (exited ones are kept for the
/// retention), and a bare request must not build a response of that size.
/// `X-Total-Count` tells how many there were.
pub const DEFAULT_LIST_LIMIT: usize = 1000;

/// A list response: the first `limit` items, and the total in a header.
type Listing<T> = ([(&'static str, String); 1], Json<Vec<T>>);

fn listing<T>(items: Vec<T>, total: usize) -> Listing<T> {
    ([("x-total-count", total.to_string())], Json(items))
}

/// For list endpoints whose only parameter is `limit`.
fn limit_only(params: &HashMap<String, String>) -> Result<usize, ApiError> {
    check_params(params, &["limit"])?;
    Ok(parse_limit(params)?.unwrap_or(DEFAULT_LIST_LIMIT))
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

fn first<T: Clone>(items: &[T], limit: usize) -> Listing<T> {
    listing(items.iter().take(limit).cloned().collect(), items.len())
}

pub(crate) async fn healthz(State(shared): State<SharedSnapshot>) -> Json<Health> {
    Json(Health::of(&shared.latest(), shared.exports().figures()))
}

async fn list_containers(
    State(shared): State<SharedSnapshot>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Listing<ContainerFigures>, ApiError> {
    let limit = limit_only(&params)?;
    Ok(first(&shared.latest().figures().containers, limit))
}

async fn get_container(
    State(shared): State<SharedSnapshot>,
    Path(id): Path<String>,
) -> Result<Json<ContainerFigures>, ApiError> {
    validate_container_id(&id)?;
    let figures = shared.latest().figures();
    let container = figures
        .container(&id)
        .map_err(|lookup| ApiError::lookup(&id, lookup))?;
    Ok(Json(container.clone()))
}

async fn list_processes(
    State(shared): State<SharedSnapshot>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Listing<ProcessFigures>, ApiError> {
    check_params(&params, &["container", "limit"])?;
    let limit = parse_limit(&params)?.unwrap_or(DEFAULT_LIST_LIMIT);
    let snapshot = shared.latest();
    let workload_filter = match params.get("container") {
        None => None,
        Some(id) => {
            validate_container_id(id)?;
            let figures = snapshot.figures();
            let container = figures
                .container(id)
                .map_err(|lookup| ApiError::lookup(id, lookup))?;
            let key = match container.owner_uid {
                Some(uid) => format!("container:{}@uid{uid}", container.container_id),
                None => format!("container:{}", container.container_id),
            };
            Some(
                snapshot
                    .workloads
                    .iter_slots()
                    .find(|(_, w)| *w.key == *key)
                    .map(|(slot, _)| slot),
            )
        }
    };
    let mut selected: Vec<&ProcessView> = snapshot
        .processes
        .iter()
        .filter(|p| workload_filter.is_none_or(|slot| Some(p.workload_slot) == slot))
        .collect();
    selected.sort_unstable_by_key(|p| p.key);
    let total = selected.len();
    Ok(listing(
        selected
            .into_iter()
            .take(limit)
            .map(|p| process_figures(&snapshot, p))
            .collect(),
        total,
    ))
}

async fn list_workloads(
    State(shared): State<SharedSnapshot>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Listing<WorkloadFigures>, ApiError> {
    let limit = limit_only(&params)?;
    Ok(first(&shared.latest().figures().workloads, limit))
}

/// Pods: the sums of their containers and pod-level cgroups.
async fn list_pods(
    State(shared): State<SharedSnapshot>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Listing<PodFigures>, ApiError> {
    let limit = limit_only(&params)?;
    Ok(first(&shared.latest().figures().pods, limit))
}

/// The power-cap controller: mode, budget, headroom, limits in force and
/// the last decisions.
async fn controller(State(state): State<MetricsState>) -> Json<ControllerStatus> {
    Json(crate::controller::latest_status(&state.controller))
}

async fn node(State(shared): State<SharedSnapshot>) -> Json<NodeFigures> {
    Json(shared.latest().figures().node.clone())
}
