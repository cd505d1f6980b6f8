//! `GET /metrics`: the latest snapshot in the Prometheus (OpenMetrics) text
//! format, on the API listener and, optionally, on a listener of its own
//! (`metrics_listen`), so a DaemonSet on the host network can keep the JSON
//! API on loopback and still be scraped.

mod render;

use std::time::Instant;

use axum::{
    Router,
    extract::{FromRef, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use tokio_util::sync::CancellationToken;

pub use render::{Exposition, render, to_prometheus_text};

use crate::{snapshot::SharedSnapshot, view::process_figures};

/// The OpenMetrics content type Prometheus asks for first.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The classic text format, for everything else (`curl`, `promtool`).
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What `/metrics` shows beyond the defaults.
#[derive(Clone, Copy, Debug, Default)]
pub struct MetricsOptions {
    /// Per-process series (high cardinality: off by default).
    pub processes: bool,
}

/// The state `/metrics` needs, wherever it is served.
#[derive(Clone)]
pub struct MetricsState {
    pub shared: SharedSnapshot,
    pub options: MetricsOptions,
    /// Asked of every request but `/healthz`, when set.
    pub token: Option<crate::auth::ApiToken>,
    /// The power-cap controller's latest status.
    pub controller: crate::controller::SharedControllerStatus,
}

impl FromRef<MetricsState> for SharedSnapshot {
    fn from_ref(state: &MetricsState) -> Self {
        state.shared.clone()
    }
}

/// Renders the latest snapshot. The work runs on the blocking pool: a scrape
/// of a large node neither stalls the API's other requests nor the collector
/// (which publishes without waiting on readers).
pub async fn scrape(State(state): State<MetricsState>, headers: HeaderMap) -> Response {
    let MetricsState {
        shared,
        options,
        controller,
        ..
    } = state;
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let task = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let snapshot = shared.latest();
        let processes = options.processes.then(|| {
            snapshot
                .processes
                .iter()
                .map(|p| process_figures(&snapshot, p))
                .collect()
        });
        let controller = crate::controller::latest_status(&controller);
        let mut text = render(Exposition {
            figures: snapshot.figures(),
            processes,
            exports: shared.exports().figures(),
            controller: (controller.mode != "off").then_some(controller),
        });
        if !openmetrics {
            text = to_prometheus_text(&text);
        }
        shared.exports().scraped(
            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            text.len() as u64,
        );
        text
    });
    match task.await {
        Ok(text) => {
            let content_type = if openmetrics {
                OPENMETRICS
            } else {
                PROMETHEUS_TEXT
            };
            ([(header::CONTENT_TYPE, content_type)], text).into_response()
        }
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("rendering /metrics failed: {error}"),
        )
            .into_response(),
    }
}

/// `/metrics` (and `/healthz`, for probes) on a listener of their own.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: MetricsState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let token = state.token.clone();
    let router = Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(crate::api::healthz))
        .with_state(state);
    let router = crate::auth::protect(router, token);
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

#[cfg(test)]
mod tests;
