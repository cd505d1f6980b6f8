//! Export end to end: a real OTLP receiver (gRPC and HTTP/protobuf) and a
//! real Prometheus server read what the agent, with its kernel programs
//! loaded, pushes and serves. Needs root; run one at a time.

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{
    Agent, ChildGuard, free_port, kubernetes_cgroup,
    otlp::{Point, Receiver, Transport},
    random_hex, random_uuid, require_root, spawn_in, workload_binary,
};
use serde_json::Value;

const EXPORT_ENV: [(&str, &str); 3] = [
    ("OTEL_METRIC_EXPORT_INTERVAL", "500"),
    ("OTEL_EXPORTER_OTLP_TIMEOUT", "1000"),
    ("K8S_NODE_NAME", "test-node-1"),
];

fn container_energy(agent: &Agent, id: &str) -> f64 {
    let (status, body) = agent.get(&format!("/api/v1/containers/{id}"));
    assert_eq!(status, 200, "{body}");
    body["energy_joules"]["package"]
        .as_f64()
        .expect("package joules")
}

/// Points of `metric` for container `id` (package domain), in arrival order.
fn container_points<'a>(points: &'a [Point], metric: &str, id: &str) -> Vec<&'a Point> {
    points
        .iter()
        .filter(|p| {
            p.metric == metric
                && p.attributes.get("container.id").map(String::as_str) == Some(id)
                && p.attributes.get("domain").map(String::as_str) == Some("package")
        })
        .collect()
}

fn unix_nanos_now() -> u64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    u64::try_from(since_epoch.as_nanos()).expect("fits until 2554")
}

fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn otlp_grpc_carries_container_energy_and_catches_up_after_the_receiver_was_down() {
    if !require_root() {
        return;
    }
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let container_id = random_hex(64);
    let pod_uid = random_uuid();
    let cgroup = kubernetes_cgroup(&container_id, &pod_uid);
    let agent = Agent::start_with_env("250ms", &["--otlp-endpoint", &endpoint], &EXPORT_ENV);
    let burner = spawn_in(Some(&cgroup), &workload_binary(), &["burn", "60"]);

    // 1. The receiver is down: exports fail, are counted, the agent goes on.
    wait_for("failed exports", Duration::from_secs(10), || {
        agent.get("/healthz").1["exports"]["otlp_failures"]
            .as_u64()
            .unwrap_or(0)
            >= 2
    });
    let health = agent.get("/healthz").1;
    assert_eq!(health["exports"]["otlp_enabled"], true, "{health}");
    let energy_while_down = container_energy(&agent, &container_id);
    let read_at_unix_nano = unix_nanos_now();
    assert!(energy_while_down > 0.0, "the burner drew energy: {health}");
    println!(
        "receiver down: {} failed exports, container at {energy_while_down:.3} J",
        health["exports"]["otlp_failures"]
    );

    // 2. The receiver comes up on the same port: data arrives, and the
    // first value collected after the API read already holds the energy of
    // the time it was down. (An export collected during the outage may still
    // be delivered first, late, by the gRPC client's retry: it carries the
    // older, smaller figure with its older timestamp.)
    let receiver = Receiver::start(Transport::Grpc, SocketAddr::from(([127, 0, 0, 1], port)));
    wait_for(
        "container energy over OTLP",
        Duration::from_secs(15),
        || {
            container_points(
                &receiver.points(),
                "powerlens.container.energy",
                &container_id,
            )
            .iter()
            .filter(|point| point.time_unix_nano >= read_at_unix_nano)
            .count()
                >= 3
        },
    );
    let points = receiver.points();
    let mut energy = container_points(&points, "powerlens.container.energy", &container_id);
    energy.sort_by_key(|point| point.time_unix_nano);
    assert!(
        energy.windows(2).all(|pair| pair[0].value <= pair[1].value),
        "a cumulative counter never goes down across the outage"
    );
    let first = energy
        .iter()
        .find(|point| point.time_unix_nano >= read_at_unix_nano)
        .expect("waited for points collected after the read");
    println!(
        "first OTLP value collected after the outage read {:.3} J (API said {energy_while_down:.3} J while the receiver was down; {} earlier point(s) delivered late)",
        first.value,
        energy
            .iter()
            .filter(|point| point.time_unix_nano < read_at_unix_nano)
            .count()
    );
    assert!(
        first.value >= energy_while_down,
        "cumulative: nothing of the outage is lost"
    );
    assert_eq!(first.unit, "J");
    assert_eq!(first.kind, "sum");
    assert_eq!(first.monotonic, Some(true));
    assert_eq!(first.temporality, Some(2), "cumulative temporality");
    for (key, expected) in [
        ("service.name", Some("powerlens")),
        ("k8s.node.name", Some("test-node-1")),
        ("service.version", None),
        ("host.name", None),
    ] {
        let value = first.resource.get(key);
        assert!(
            value.is_some(),
            "resource lacks {key}: {:?}",
            first.resource
        );
        if let Some(expected) = expected {
            assert_eq!(value.map(String::as_str), Some(expected));
        }
    }
    assert_eq!(first.attributes.get("k8s.pod.uid"), Some(&pod_uid));
    assert_eq!(
        first.attributes.get("k8s.pod.qos").map(String::as_str),
        Some("burstable")
    );
    assert_eq!(
        first
            .attributes
            .get("container.runtime")
            .map(String::as_str),
        Some("containerd")
    );
    assert_eq!(
        first
            .attributes
            .get("powerlens.estimated")
            .map(String::as_str),
        Some("true")
    );
    let values: Vec<f64> = energy.iter().map(|p| p.value).collect();
    assert!(
        values.windows(2).all(|w| w[1] >= w[0]),
        "monotonic: {values:?}"
    );
    assert!(
        values.last() > values.first(),
        "grows while it burns: {values:?}"
    );

    // Power, CPU time, devices, the node's books and the agent's own health.
    let power = container_points(&points, "powerlens.container.power", &container_id);
    assert!(
        power
            .last()
            .is_some_and(|p| p.unit == "W" && p.kind == "gauge" && p.value > 0.0)
    );
    let cpu = points
        .iter()
        .find(|p| {
            p.metric == "container.cpu.time"
                && p.attributes.get("container.id") == Some(&container_id)
        })
        .expect("container.cpu.time");
    assert_eq!((cpu.unit.as_str(), cpu.monotonic), ("s", Some(true)));
    let device = points
        .iter()
        .find(|p| p.metric == "hw.energy")
        .expect("hw.energy");
    assert_eq!(
        device.attributes.get("hw.id").map(String::as_str),
        Some("package-0")
    );
    assert_eq!(
        device.attributes.get("hw.type").map(String::as_str),
        Some("cpu")
    );
    assert_eq!(
        device
            .attributes
            .get("powerlens.source")
            .map(String::as_str),
        Some("model")
    );
    for metric in [
        "hw.power",
        "hw.host.energy",
        "hw.host.power",
        "process.cpu.time",
        "process.memory.usage",
        "powerlens.losses",
        "powerlens.source.up",
    ] {
        assert!(
            points.iter().any(|p| p.metric == metric),
            "no {metric} received"
        );
    }
    // The books balance within one export (points of one collection share
    // their timestamp).
    let last_time = points
        .iter()
        .filter(|p| p.metric == "powerlens.node.energy")
        .map(|p| p.time_unix_nano)
        .max()
        .expect("node books");
    let book = |name: &str| {
        points
            .iter()
            .find(|p| {
                p.metric == "powerlens.node.energy"
                    && p.time_unix_nano == last_time
                    && p.attributes.get("powerlens.book").map(String::as_str) == Some(name)
                    && p.attributes.get("domain").map(String::as_str) == Some("package")
            })
            .unwrap_or_else(|| panic!("no {name} book"))
            .value
    };
    let (measured, attributed, idle, unattributed) = (
        book("measured"),
        book("attributed"),
        book("idle"),
        book("unattributed"),
    );
    println!(
        "books over OTLP: measured {measured:.3} J = attributed {attributed:.3} + idle {idle:.3} + unattributed {unattributed:.3}"
    );
    // 1e-9 relative: the same float sums the agent keeps, only rounded.
    assert!((measured - attributed - idle - unattributed).abs() <= 1e-9 * measured.max(1.0));

    // 3. The burner stops: its energy stops growing.
    burner.signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(600));
    let stopped_at = receiver.points().len();
    std::thread::sleep(Duration::from_millis(1500));
    let points = receiver.points();
    let after: Vec<f64> = container_points(
        &points[stopped_at..],
        "powerlens.container.energy",
        &container_id,
    )
    .iter()
    .map(|p| p.value)
    .collect();
    assert!(after.len() >= 2, "exports go on: {after:?}");
    // The default idle policy leaves idle energy unattributed: a stopped
    // container draws nothing (1e-6 J: float noise).
    assert!(
        after.last().unwrap() - after.first().unwrap() < 1e-6,
        "a stopped container's energy stays: {after:?}"
    );
}

#[test]
fn otlp_http_exports_an_exited_container_once_more_then_stops_its_series() {
    if !require_root() {
        return;
    }
    let receiver = Receiver::start(Transport::Http, SocketAddr::from(([127, 0, 0, 1], 0)));
    let container_id = random_hex(64);
    let cgroup = kubernetes_cgroup(&container_id, &random_uuid());
    let mut env = EXPORT_ENV.to_vec();
    env.push(("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"));
    let endpoint = format!("http://{}", receiver.address);
    env.push(("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint));
    // With a budget, the controller (observe mode) exports its figures too.
    let agent = Agent::start_with_env("250ms", &["--budget-watts", "500"], &env);
    let burner = spawn_in(Some(&cgroup), &workload_binary(), &["burn", "1.5"]);
    burner.wait_output();
    drop(cgroup);
    wait_for(
        "the container to be marked exited",
        Duration::from_secs(10),
        || agent.get(&format!("/api/v1/containers/{container_id}")).1["exited"] == true,
    );
    let final_energy = container_energy(&agent, &container_id);
    // Several export intervals later, the series has stopped while others go on.
    std::thread::sleep(Duration::from_secs(3));
    let points = receiver.points();
    let ours = container_points(&points, "powerlens.container.energy", &container_id);
    let last = ours.last().expect("the container was exported over HTTP");
    println!(
        "exited container: final {final_energy:.3} J, last exported {:.3} J",
        last.value
    );
    assert!(
        (last.value - final_energy).abs() < 1e-9,
        "its final value was exported"
    );
    let newest = points
        .iter()
        .filter(|p| p.metric == "hw.energy")
        .map(|p| p.time_unix_nano)
        .max()
        .expect("hw.energy");
    assert!(
        newest >= last.time_unix_nano + 1_000_000_000,
        "its series stopped while the others went on (last {} vs newest {newest})",
        last.time_unix_nano
    );
    let headroom = points
        .iter()
        .rfind(|p| p.metric == "powerlens.controller.headroom")
        .expect("the controller's headroom over OTLP");
    let (_, node) = agent.get("/api/v1/node");
    println!(
        "controller headroom over OTLP: {:.3} W (budget 500 W)",
        headroom.value
    );
    assert_eq!(headroom.unit, "W");
    assert_eq!(
        headroom
            .attributes
            .get("powerlens.controller.mode")
            .map(String::as_str),
        Some("observe")
    );
    assert!(
        headroom.value > 0.0 && headroom.value < 500.0,
        "500 W minus the node's measured power: {} ({node})",
        headroom.value
    );
    drop(agent);
}

type Sample = (std::collections::BTreeMap<String, String>, f64);

fn prometheus_query(port: u16, query: &str) -> Vec<Sample> {
    try_prometheus_query(port, query).unwrap_or_else(|e| panic!("PromQL {query}: {e}"))
}

/// A PromQL instant query; `Err` while the server is not up yet.
fn try_prometheus_query(port: u16, query: &str) -> Result<Vec<Sample>, String> {
    let http = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(5)))
            .build(),
    );
    let body: Value = http
        .get(&format!("http://127.0.0.1:{port}/api/v1/query"))
        .query("query", query)
        .call()
        .and_then(|mut r| r.body_mut().read_json())
        .map_err(|e| e.to_string())?;
    if body["status"] != "success" {
        return Err(format!("PromQL {query}: {body}"));
    }
    Ok(body["data"]["result"]
        .as_array()
        .expect("vector")
        .iter()
        .map(|sample| {
            let labels = sample["metric"]
                .as_object()
                .expect("labels")
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect();
            let value = sample["value"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .expect("value");
            (labels, value)
        })
        .collect())
}

/// A Prometheus server (Debian's package) scraping `target` every second,
/// removed with its data on drop.
struct PrometheusServer {
    _child: ChildGuard,
    _data: tempfile::TempDir,
    port: u16,
}

impl PrometheusServer {
    fn start(target: &str) -> Self {
        let binary = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("the prometheus server is not installed: `cargo xtask setup` installs Debian's prometheus package");
        let data = tempfile::tempdir().expect("temporary directory");
        let config = data.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: powerlens\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("prometheus.yml");
        let port = free_port();
        let child = ChildGuard {
            child: Command::new(binary)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    data.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start prometheus"),
        };
        Self {
            _child: child,
            _data: data,
            port,
        }
    }
}

#[test]
fn a_real_prometheus_scrapes_the_agent_and_the_books_balance() {
    if !require_root() {
        return;
    }
    let busy_id = random_hex(64);
    let idle_id = random_hex(64);
    let busy_cgroup = kubernetes_cgroup(&busy_id, &random_uuid());
    let idle_cgroup = kubernetes_cgroup(&idle_id, &random_uuid());
    let metrics_port = free_port();
    let metrics_listen = format!("127.0.0.1:{metrics_port}");
    let agent = Agent::start_with_interval("500ms", &["--metrics-listen", &metrics_listen]);
    let workload = workload_binary();
    let _busy = spawn_in(Some(&busy_cgroup), &workload, &["burn", "40"]);
    let _idle = spawn_in(Some(&idle_cgroup), &workload, &["sleep", "40"]);
    let prometheus = PrometheusServer::start(&metrics_listen);

    let busy_rate = format!(
        "rate(powerlens_container_energy_joules_total{{container_id=\"{busy_id}\",domain=\"package\"}}[5s])"
    );
    let idle_rate = format!(
        "rate(powerlens_container_energy_joules_total{{container_id=\"{idle_id}\",domain=\"package\"}}[5s])"
    );
    wait_for(
        "Prometheus to have 5 s of scrapes",
        Duration::from_secs(40),
        || {
            [&busy_rate, &idle_rate]
                .iter()
                .all(|q| try_prometheus_query(prometheus.port, q).is_ok_and(|r| !r.is_empty()))
        },
    );
    let busy = prometheus_query(prometheus.port, &busy_rate)[0].1;
    let idle = prometheus_query(prometheus.port, &idle_rate)[0].1;
    println!("PromQL: busy container {busy:.3} W, idle container {idle:.6} W");
    assert!(busy > 0.0 && busy > idle, "busy {busy} W vs idle {idle} W");

    // containers + other workloads + idle + unattributed = measured, in the
    // same scrape (Prometheus stamps every series of a scrape alike).
    let books = "(sum(powerlens_container_energy_joules_total{domain=\"package\"}) \
                 + sum(powerlens_workload_energy_joules_total{domain=\"package\"}) \
                 + sum(powerlens_node_energy_joules_total{book=~\"idle|unattributed\",domain=\"package\"})) \
                 - sum(powerlens_node_energy_joules_total{book=\"measured\",domain=\"package\"})";
    let residual = prometheus_query(prometheus.port, books)[0].1;
    let measured = prometheus_query(
        prometheus.port,
        "sum(powerlens_node_energy_joules_total{book=\"measured\",domain=\"package\"})",
    )[0]
    .1;
    println!("PromQL books: measured {measured:.3} J, residual {residual:e} J");
    assert!(measured > 0.0);
    // 1e-9 relative: float sums of the same joules in another order.
    assert!(
        residual.abs() <= 1e-9 * measured,
        "residual {residual} J of {measured} J"
    );

    // promtool agrees with the exposition of a loaded agent.
    let text = agent.get_text("/metrics");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (from Debian's prometheus package)");
    std::io::Write::write_all(&mut promtool.stdin.take().expect("stdin"), text.as_bytes())
        .expect("feed promtool");
    let output = promtool.wait_with_output().expect("promtool");
    assert!(
        output.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("promtool check metrics: ok on {} bytes", text.len());
}
