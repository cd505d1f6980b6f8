//! OTLP push to an OpenTelemetry Collector (gRPC or HTTP/protobuf), with the
//! OpenTelemetry SDK's periodic reader. Observable instruments read the
//! latest snapshot in their callbacks (on the reader's own thread): the
//! collector never waits on an export, and an export never waits on the
//! collector.
//!
//! Values are cumulative since the agent started (cumulative temporality,
//! the Collector's and Prometheus's default): an export that fails loses
//! nothing, because the next one carries the totals.

pub mod instruments;
mod limiter;
mod settings;

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use opentelemetry::{KeyValue, metrics::MeterProvider as _};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _, WithTonicConfig as _};
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    metrics::{
        Instrument, PeriodicReader, SdkMeterProvider, Stream, Temporality, data::ResourceMetrics,
        exporter::PushMetricExporter,
    },
};
use thiserror::Error;
use tracing::{info, warn};

pub use settings::{OtlpConfig, OtlpSettings, Protocol, SettingsError, resolve};

use crate::snapshot::SharedSnapshot;

#[derive(Debug, Error)]
pub enum OtlpError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error("reading the OTLP CA certificate {path}: {source}")]
    Certificate {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("building the OTLP exporter for {endpoint}: {message}")]
    Exporter { endpoint: String, message: String },
}

/// When the last export that succeeded collected its data, and when the
/// current collection ran: an exited container is exported until an
/// export collected after its exit has succeeded, then its series stop.
#[derive(Debug, Default)]
pub struct ExportClock {
    collecting_at_ns: AtomicU64,
    last_ok_collected_ns: AtomicU64,
}

fn unix_ns(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl ExportClock {
    pub fn collecting(&self, now: SystemTime) {
        self.collecting_at_ns.store(unix_ns(now), Ordering::Relaxed);
    }

    fn succeeded(&self) {
        let collected = self.collecting_at_ns.load(Ordering::Relaxed);
        self.last_ok_collected_ns
            .fetch_max(collected, Ordering::Relaxed);
    }

    /// Whether something that exited at `exited_at` (or is live) still has
    /// to be exported.
    pub fn still_owed(&self, exited_at: Option<SystemTime>) -> bool {
        exited_at.is_none_or(|at| unix_ns(at) >= self.last_ok_collected_ns.load(Ordering::Relaxed))
    }
}

/// The OTLP exporter, counting what it sends and what fails.
struct CountingExporter<E> {
    inner: E,
    shared: SharedSnapshot,
    clock: Arc<ExportClock>,
}

impl<E: PushMetricExporter> PushMetricExporter for CountingExporter<E> {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let result = self.inner.export(metrics).await;
        match &result {
            Ok(()) => {
                self.clock.succeeded();
                self.shared.exports().otlp_result(Ok(()));
            }
            Err(error) => {
                // The SDK logs through its own internal logs, which we do not
                // install: say it here, once per failure, with the reason.
                warn!("OTLP export failed (the next export carries the totals): {error}");
                self.shared.exports().otlp_result(Err(error.to_string()));
            }
        }
        result
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

/// A running OTLP sink; `shutdown` sends a last export.
pub struct OtlpSink {
    provider: SdkMeterProvider,
}

impl OtlpSink {
    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown() {
            warn!("OTLP: final export at shutdown failed: {error}");
        }
    }
}

/// The node as an OpenTelemetry resource: `host.name`, `k8s.node.name`
/// (from `K8S_NODE_NAME`), `service.name` (`powerlens` unless
/// `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` say otherwise),
/// `service.version`, and `OTEL_RESOURCE_ATTRIBUTES`.
pub fn resource(env: &dyn Fn(&str) -> Option<String>) -> Resource {
    let mut builder = Resource::builder();
    let named_by_env = env("OTEL_SERVICE_NAME").is_some_and(|v| !v.is_empty())
        || env("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|v| v.contains("service.name="));
    if !named_by_env {
        builder = builder.with_service_name("powerlens");
    }
    let mut attributes = vec![KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))];
    if let Some(host) = hostname() {
        attributes.push(KeyValue::new("host.name", host));
    }
    if let Some(node) = env("K8S_NODE_NAME").filter(|n| !n.is_empty()) {
        attributes.push(KeyValue::new("k8s.node.name", node));
    }
    builder.with_attributes(attributes).build()
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

fn exporter_error(settings: &OtlpSettings, error: impl std::fmt::Display) -> OtlpError {
    OtlpError::Exporter {
        endpoint: settings.endpoint.clone(),
        message: error.to_string(),
    }
}

fn read_certificate(settings: &OtlpSettings) -> Result<Option<Vec<u8>>, OtlpError> {
    settings
        .certificate
        .as_ref()
        .map(|path| {
            std::fs::read(path).map_err(|source| OtlpError::Certificate {
                path: path.clone(),
                source,
            })
        })
        .transpose()
}

/// Builds the exporter. gRPC needs a Tokio runtime for its connection
/// (`runtime`); the HTTP client runs on a thread of its own and must be
/// built outside any runtime.
fn build_exporter(
    settings: &OtlpSettings,
    runtime: &tokio::runtime::Handle,
) -> Result<opentelemetry_otlp::MetricExporter, OtlpError> {
    let certificate = read_certificate(settings)?;
    match settings.protocol {
        Protocol::Grpc => {
            let _entered = runtime.enter();
            let mut metadata = tonic::metadata::MetadataMap::new();
            for (key, value) in &settings.headers {
                let key = tonic::metadata::MetadataKey::from_bytes(key.as_bytes())
                    .map_err(|e| exporter_error(settings, format!("header {key:?}: {e}")))?;
                let value = value
                    .parse()
                    .map_err(|e| exporter_error(settings, format!("header {key:?}: {e}")))?;
                metadata.insert(key, value);
            }
            let mut builder = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_endpoint(settings.endpoint.clone())
                .with_timeout(settings.timeout)
                .with_metadata(metadata);
            if settings.endpoint.starts_with("https://") {
                let mut tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
                if let Some(pem) = certificate {
                    tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
                }
                builder = builder.with_tls_config(tls);
            }
            builder.build().map_err(|e| exporter_error(settings, e))
        }
        Protocol::HttpProtobuf => {
            let mut builder = opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .with_endpoint(settings.endpoint.clone())
                .with_timeout(settings.timeout)
                .with_headers(
                    settings
                        .headers
                        .clone()
                        .into_iter()
                        .collect::<HashMap<_, _>>(),
                );
            if let Some(pem) = certificate {
                let certificate = reqwest::Certificate::from_pem(&pem)
                    .map_err(|e| exporter_error(settings, format!("CA certificate: {e}")))?;
                let client = reqwest::blocking::Client::builder()
                    .timeout(settings.timeout)
                    .tls_certs_merge([certificate])
                    .build()
                    .map_err(|e| exporter_error(settings, e))?;
                builder = builder.with_http_client(client);
            }
            builder.build().map_err(|e| exporter_error(settings, e))
        }
    }
}

/// Starts the OTLP sink, or returns `Ok(None)` when no endpoint is set.
/// A collector that is down is not an error: exports fail, are counted and
/// retried with the totals at the next interval.
pub fn start(
    settings: &OtlpSettings,
    shared: &SharedSnapshot,
    export_processes: bool,
    controller: Option<crate::controller::SharedControllerStatus>,
    runtime: &tokio::runtime::Handle,
) -> Result<OtlpSink, OtlpError> {
    let exporter = build_exporter(settings, runtime)?;
    let clock = Arc::new(ExportClock::default());
    let reader = PeriodicReader::builder(CountingExporter {
        inner: exporter,
        shared: shared.clone(),
        clock: Arc::clone(&clock),
    })
    .with_interval(settings.export_interval)
    .build();
    // The SDK's own per-instrument limit, far above ours (which sums the
    // excess instead of keeping one of its values): a backstop only.
    let backstop = settings.series_limit.saturating_mul(8).saturating_add(256);
    let provider = SdkMeterProvider::builder()
        .with_reader(reader)
        .with_resource(resource(&|name| std::env::var(name).ok()))
        .with_view(move |_: &Instrument| {
            Stream::builder()
                .with_cardinality_limit(backstop)
                .build()
                .ok()
        })
        .build();
    let meter = provider.meter("powerlens");
    instruments::register(
        &meter,
        instruments::Observed::new(
            shared.clone(),
            clock,
            settings.series_limit,
            export_processes,
        ),
    );
    if let Some(controller) = controller {
        instruments::register_controller(&meter, controller);
    }
    shared.exports().otlp_started();
    info!(
        endpoint = %settings.endpoint,
        protocol = ?settings.protocol,
        every = %humantime::format_duration(settings.export_interval),
        "OTLP export on"
    );
    Ok(OtlpSink { provider })
}
