//! Outputs: each reads the latest snapshot through [`SharedSnapshot`]
//! (`latest`, or `subscribe` to be woken per interval) and never blocks the
//! collector. Prometheus is pulled (`GET /metrics`), OTLP is pushed.
//!
//! [`SharedSnapshot`]: crate::snapshot::SharedSnapshot

pub mod otlp;
pub mod prometheus;

use std::sync::{
    Mutex,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use serde::{Deserialize, Serialize};

/// What the sinks say about themselves, shared with `/healthz`, `/metrics`
/// and the OTLP self-metrics.
#[derive(Debug, Default)]
pub struct ExportStats {
    otlp_enabled: AtomicBool,
    otlp_exports: AtomicU64,
    otlp_failures: AtomicU64,
    otlp_last_error: Mutex<Option<String>>,
    scrapes: AtomicU64,
    last_render_us: AtomicU64,
    last_render_bytes: AtomicU64,
}

/// A copy of [`ExportStats`] at one moment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ExportFigures {
    pub otlp_enabled: bool,
    /// Export attempts that succeeded.
    pub otlp_exports: u64,
    /// Export attempts that failed (collector down, slow or refusing).
    pub otlp_failures: u64,
    pub otlp_last_error: Option<String>,
    pub prometheus_scrapes: u64,
    /// Time and size of the last `/metrics` rendering.
    pub prometheus_last_render_seconds: f64,
    pub prometheus_last_render_bytes: u64,
}

impl ExportStats {
    pub fn otlp_started(&self) {
        self.otlp_enabled.store(true, Ordering::Relaxed);
    }

    pub fn otlp_result(&self, result: Result<(), String>) {
        match result {
            Ok(()) => {
                self.otlp_exports.fetch_add(1, Ordering::Relaxed);
            }
            Err(message) => {
                self.otlp_failures.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut last) = self.otlp_last_error.lock() {
                    *last = Some(message);
                }
            }
        }
    }

    pub fn scraped(&self, render_us: u64, bytes: u64) {
        self.scrapes.fetch_add(1, Ordering::Relaxed);
        self.last_render_us.store(render_us, Ordering::Relaxed);
        self.last_render_bytes.store(bytes, Ordering::Relaxed);
    }

    pub fn figures(&self) -> ExportFigures {
        ExportFigures {
            otlp_enabled: self.otlp_enabled.load(Ordering::Relaxed),
            otlp_exports: self.otlp_exports.load(Ordering::Relaxed),
            otlp_failures: self.otlp_failures.load(Ordering::Relaxed),
            otlp_last_error: self
                .otlp_last_error
                .lock()
                .map(|last| last.clone())
                .unwrap_or_default(),
            prometheus_scrapes: self.scrapes.load(Ordering::Relaxed),
            prometheus_last_render_seconds: self.last_render_us.load(Ordering::Relaxed) as f64
                / 1e6,
            prometheus_last_render_bytes: self.last_render_bytes.load(Ordering::Relaxed),
        }
    }
}
