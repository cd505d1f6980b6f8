//! A real OTLP receiver for the tests: the `opentelemetry-proto` crate's
//! generated gRPC service served by tonic, and the HTTP/protobuf path
//! (`POST /v1/metrics`) decoded with prost. It keeps every data point it
//! receives, flattened with its resource and attributes.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use opentelemetry_proto::tonic::{
    collector::metrics::v1::{
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
        metrics_service_server::{MetricsService, MetricsServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value},
    metrics::v1::{metric, number_data_point},
};
use prost::Message as _;

/// One data point as received.
#[derive(Clone, Debug)]
pub struct Point {
    pub metric: String,
    pub unit: String,
    /// `sum` or `gauge`.
    pub kind: &'static str,
    pub monotonic: Option<bool>,
    /// 1 delta, 2 cumulative (sums only).
    pub temporality: Option<i32>,
    pub resource: BTreeMap<String, String>,
    pub attributes: BTreeMap<String, String>,
    pub value: f64,
    pub time_unix_nano: u64,
}

fn text(value: &Option<AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn map(attributes: &[KeyValue]) -> BTreeMap<String, String> {
    attributes
        .iter()
        .map(|kv| (kv.key.clone(), text(&kv.value)))
        .collect()
}

fn flatten(request: &ExportMetricsServiceRequest, into: &mut Vec<Point>) {
    for resource_metrics in &request.resource_metrics {
        let resource = resource_metrics
            .resource
            .as_ref()
            .map(|r| map(&r.attributes))
            .unwrap_or_default();
        for scope in &resource_metrics.scope_metrics {
            for m in &scope.metrics {
                let (kind, monotonic, temporality, points) = match &m.data {
                    Some(metric::Data::Sum(sum)) => (
                        "sum",
                        Some(sum.is_monotonic),
                        Some(sum.aggregation_temporality),
                        &sum.data_points,
                    ),
                    Some(metric::Data::Gauge(gauge)) => ("gauge", None, None, &gauge.data_points),
                    _ => continue,
                };
                for p in points {
                    let value = match p.value {
                        Some(number_data_point::Value::AsDouble(v)) => v,
                        Some(number_data_point::Value::AsInt(v)) => v as f64,
                        None => f64::NAN,
                    };
                    into.push(Point {
                        metric: m.name.clone(),
                        unit: m.unit.clone(),
                        kind,
                        monotonic,
                        temporality,
                        resource: resource.clone(),
                        attributes: map(&p.attributes),
                        value,
                        time_unix_nano: p.time_unix_nano,
                    });
                }
            }
        }
    }
}

#[derive(Clone, Default)]
struct Store(Arc<Mutex<Vec<Point>>>);

impl Store {
    fn add(&self, request: &ExportMetricsServiceRequest) {
        let mut points = self.0.lock().expect("receiver store");
        flatten(request, &mut points);
    }
}

#[tonic::async_trait]
impl MetricsService for Store {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.add(request.get_ref());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

async fn http_export(
    axum::extract::State(store): axum::extract::State<Store>,
    body: axum::body::Bytes,
) -> (axum::http::StatusCode, Vec<u8>) {
    match ExportMetricsServiceRequest::decode(body) {
        Ok(request) => {
            store.add(&request);
            (
                axum::http::StatusCode::OK,
                ExportMetricsServiceResponse::default().encode_to_vec(),
            )
        }
        Err(_) => (axum::http::StatusCode::BAD_REQUEST, Vec::new()),
    }
}

/// A receiver running on its own runtime until dropped.
pub struct Receiver {
    store: Store,
    runtime: Option<tokio::runtime::Runtime>,
    pub address: SocketAddr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Grpc,
    Http,
}

impl Receiver {
    /// Listens on `address` (port 0 for any free port).
    pub fn start(transport: Transport, address: SocketAddr) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("receiver runtime");
        let store = Store::default();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(address))
            .unwrap_or_else(|e| panic!("OTLP receiver cannot listen on {address}: {e}"));
        let address = listener.local_addr().expect("local address");
        let served = store.clone();
        match transport {
            Transport::Grpc => {
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                runtime.spawn(async move {
                    let _ = tonic::transport::Server::builder()
                        .add_service(MetricsServiceServer::new(served))
                        .serve_with_incoming(incoming)
                        .await;
                });
            }
            Transport::Http => {
                let router = axum::Router::new()
                    .route("/v1/metrics", axum::routing::post(http_export))
                    .with_state(served);
                runtime.spawn(async move {
                    let _ = axum::serve(listener, router).await;
                });
            }
        }
        Self {
            store,
            runtime: Some(runtime),
            address,
        }
    }

    pub fn points(&self) -> Vec<Point> {
        self.store.0.lock().expect("receiver store").clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
