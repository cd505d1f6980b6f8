//! The snapshot's figures as Prometheus series, encoded by the Prometheus
//! project's own client (`prometheus-client`) in the OpenMetrics text format.

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _, text},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};

use crate::{
    sinks::ExportFigures,
    view::{ByDomain, EnergyFigures, Figures, ProcessFigures},
};

/// What one scrape shows.
#[derive(Debug)]
pub struct Exposition {
    pub figures: Arc<Figures>,
    /// Present when per-process series are asked for (`export.processes`).
    pub processes: Option<Vec<ProcessFigures>>,
    pub exports: ExportFigures,
    /// The power-cap controller, unless it is off.
    pub controller: Option<crate::controller::ControllerStatus>,
}

/// Renders the exposition to text (OpenMetrics 1.0, which Prometheus and
/// `promtool check metrics` read).
pub fn render(exposition: Exposition) -> String {
    let mut registry = Registry::with_prefix("powerlens");
    registry.register_collector(Box::new(exposition));
    let mut out = String::with_capacity(64 * 1024);
    // Writing into a String cannot fail.
    let _ = text::encode(&mut out, &registry);
    out
}

/// The Prometheus text format 0.0.4 from OpenMetrics text, for clients that
/// do not ask for OpenMetrics (`curl`, `promtool check metrics`, older
/// scrapers): a counter's HELP and TYPE name its `_total` samples, and the
/// `# UNIT` and `# EOF` lines, which 0.0.4 does not have, go.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some(name) = rest.strip_suffix(" counter")
        {
            counters.insert(name.to_owned());
        }
    }
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let header = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|prefix| line.strip_prefix(prefix).map(|rest| (prefix, rest)));
        match header {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                out.push_str(prefix);
                out.push_str(name);
                out.push_str(suffix);
                out.push(' ');
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

type Labels = Vec<(&'static str, String)>;

/// One metric family: its descriptor and every series of it.
struct Family<'a> {
    name: &'a str,
    help: &'a str,
    unit: Option<Unit>,
    kind: MetricType,
    series: Vec<(Labels, f64)>,
}

impl<'a> Family<'a> {
    fn new(name: &'a str, help: &'a str, unit: Option<Unit>, kind: MetricType) -> Self {
        Self {
            name,
            help,
            unit,
            kind,
            series: Vec::new(),
        }
    }

    fn push(&mut self, labels: Labels, value: f64) {
        self.series.push((labels, value));
    }

    fn encode(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if self.series.is_empty() {
            return Ok(());
        }
        let mut metric =
            encoder.encode_descriptor(self.name, self.help, self.unit.as_ref(), self.kind)?;
        for (labels, value) in &self.series {
            let family = metric.encode_family(labels)?;
            match self.kind {
                MetricType::Counter => ConstCounter::new(*value).encode(family)?,
                _ => ConstGauge::new(*value).encode(family)?,
            }
        }
        Ok(())
    }
}

/// Adds one series per measured domain (never `total`: summing over the
/// `domain` label must not count a joule twice).
fn per_domain(family: &mut Family, labels: &Labels, values: &ByDomain) {
    for (domain, value) in values.iter() {
        let mut with_domain = labels.clone();
        with_domain.push(("domain", domain.as_str().to_owned()));
        family.push(with_domain, value);
    }
}

/// The energy counter and power gauge of one workload, pod or process.
fn energy_pair(energy: &mut Family, power: &mut Family, labels: &Labels, figures: &EnergyFigures) {
    let mut labels = labels.clone();
    labels.push(("estimated", figures.estimated.to_string()));
    per_domain(energy, &labels, &figures.energy_joules);
    per_domain(power, &labels, &figures.power_watts);
}

fn opt(value: &Option<String>) -> String {
    value.clone().unwrap_or_default()
}

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter, Gauge};
        let f = &self.figures;
        let mut families = Vec::new();

        // Containers.
        let mut energy = Family::new(
            "container_energy",
            "Energy charged to a container since the agent started, per domain.",
            Some(Unit::Joules),
            Counter,
        );
        let mut power = Family::new(
            "container_power_watts",
            "Power of a container over the last interval, per domain.",
            None,
            Gauge,
        );
        let mut cpu = Family::new(
            "container_cpu",
            "CPU time of a container since the agent started.",
            Some(Unit::Seconds),
            Counter,
        );
        for c in &f.containers {
            let labels: Labels = vec![
                ("container_id", c.container_id.clone()),
                ("pod_uid", opt(&c.pod_uid)),
                ("runtime", c.runtime.clone()),
                ("pod_qos", opt(&c.pod_qos)),
            ];
            cpu.push(labels.clone(), c.cpu_seconds);
            energy_pair(&mut energy, &mut power, &labels, &c.energy);
        }
        families.extend([energy, power, cpu]);

        // Pods.
        let mut energy = Family::new(
            "pod_energy",
            "Energy charged to a pod (its containers and pod cgroup), per domain.",
            Some(Unit::Joules),
            Counter,
        );
        let mut power = Family::new(
            "pod_power_watts",
            "Power of a pod over the last interval, per domain.",
            None,
            Gauge,
        );
        for p in &f.pods {
            let labels: Labels = vec![
                ("pod_uid", p.pod_uid.clone()),
                ("pod_qos", p.pod_qos.clone()),
            ];
            energy_pair(&mut energy, &mut power, &labels, &p.energy);
        }
        families.extend([energy, power]);

        // Workloads other than containers (services, pod cgroups, the host):
        // with the containers, they are everything the node attributed.
        let mut energy = Family::new(
            "workload_energy",
            "Energy charged to a workload that is not a container (systemd unit, pod cgroup, host), per domain.",
            Some(Unit::Joules),
            Counter,
        );
        let mut power = Family::new(
            "workload_power_watts",
            "Power of a workload that is not a container, per domain.",
            None,
            Gauge,
        );
        for w in f.workloads.iter().filter(|w| w.kind != "container") {
            let labels: Labels = vec![("workload", w.workload.clone()), ("kind", w.kind.clone())];
            energy_pair(&mut energy, &mut power, &labels, &w.energy);
        }
        families.extend([energy, power]);

        // Processes, when asked for.
        if let Some(processes) = &self.processes {
            let mut energy = Family::new(
                "process_energy",
                "Energy charged to a process since the agent started, per domain.",
                Some(Unit::Joules),
                Counter,
            );
            let mut power = Family::new(
                "process_power_watts",
                "Power of a process over the last interval, per domain.",
                None,
                Gauge,
            );
            for p in processes {
                let labels: Labels = vec![
                    ("pid", p.pid.to_string()),
                    ("comm", p.comm.clone()),
                    ("container_id", opt(&p.container_id)),
                    ("workload", p.workload.clone()),
                ];
                energy_pair(&mut energy, &mut power, &labels, &p.energy);
            }
            families.extend([energy, power]);
        }

        // The node's books: measured = attributed + idle + unattributed.
        let mut energy = Family::new(
            "node_energy",
            "The node's energy books per domain: measured = attributed + idle + unattributed.",
            Some(Unit::Joules),
            Counter,
        );
        let mut power = Family::new(
            "node_power_watts",
            "The node's power books over the last interval, per domain.",
            None,
            Gauge,
        );
        let node = &f.node;
        for (book, joules, watts) in [
            (
                "measured",
                &node.energy_joules.measured,
                &node.power_watts.books.measured,
            ),
            (
                "attributed",
                &node.energy_joules.attributed,
                &node.power_watts.books.attributed,
            ),
            (
                "idle",
                &node.energy_joules.idle,
                &node.power_watts.books.idle,
            ),
            (
                "unattributed",
                &node.energy_joules.unattributed,
                &node.power_watts.books.unattributed,
            ),
        ] {
            let labels: Labels = vec![
                ("book", book.to_owned()),
                ("estimated", node.estimated.to_string()),
            ];
            per_domain(&mut energy, &labels, joules);
            per_domain(&mut power, &labels, watts);
        }
        families.extend([energy, power]);

        // Devices (domain instances) and temperatures.
        let mut energy = Family::new(
            "device_energy",
            "Energy of one device (a socket's package or dram, a GPU, the platform) since the agent started.",
            Some(Unit::Joules),
            Counter,
        );
        let mut power = Family::new(
            "device_power_watts",
            "Power of one device over the last interval.",
            None,
            Gauge,
        );
        for d in &node.devices {
            let labels: Labels = vec![
                ("hw_id", d.hw_id.clone()),
                ("hw_type", d.hw_type.clone()),
                ("hw_name", d.hw_name.clone()),
                ("source", d.method.as_str().to_owned()),
                ("estimated", d.estimated.to_string()),
            ];
            energy.push(labels.clone(), d.energy_joules);
            power.push(labels, d.power_watts);
        }
        let mut temperature = Family::new(
            "temperature",
            "Temperature of a sensor (hwmon, thermal zone, GPU).",
            Some(Unit::Celsius),
            Gauge,
        );
        for t in &node.temperatures {
            temperature.push(
                vec![("sensor", t.sensor.clone()), ("label", opt(&t.label))],
                t.celsius,
            );
        }
        for g in &node.gpus {
            if let Some(celsius) = g.temperature_celsius {
                temperature.push(
                    vec![
                        ("sensor", format!("gpu-{}", g.index)),
                        ("label", g.name.clone()),
                    ],
                    f64::from(celsius),
                );
            }
        }
        families.extend([energy, power, temperature]);

        // The agent itself.
        let a = &f.agent;
        let mut agent_cpu = Family::new(
            "agent_cpu",
            "CPU time (user + system) of the agent since it started.",
            Some(Unit::Seconds),
            Counter,
        );
        agent_cpu.push(Vec::new(), a.cpu_seconds);
        let mut agent_memory = Family::new(
            "agent_memory",
            "Resident memory of the agent.",
            Some(Unit::Bytes),
            Gauge,
        );
        agent_memory.push(Vec::new(), a.memory_bytes as f64);
        let mut losses = Family::new(
            "losses",
            "Events where the kernel side lost data, by counter (0 in a healthy agent).",
            None,
            Counter,
        );
        for (name, count) in &a.losses {
            losses.push(vec![("counter", name.clone())], *count as f64);
        }
        let mut read_errors = Family::new(
            "read_errors",
            "Failed reads of the CPU source since the agent started.",
            None,
            Counter,
        );
        read_errors.push(Vec::new(), a.read_errors as f64);
        let mut sources = Family::new(
            "source_up",
            "1 when a source works, 0 when it is disabled or failing (see the status label).",
            None,
            Gauge,
        );
        for s in &node.sources {
            let up = matches!(s.status, crate::energy::SourceState::Ok);
            sources.push(
                vec![
                    ("source", s.name.clone()),
                    ("status", s.status.as_str().to_owned()),
                ],
                if up { 1.0 } else { 0.0 },
            );
        }
        let mut program_time = Family::new(
            "bpf_program_run_time",
            "Time the kernel programs ran (counted while kernel.bpf_stats_enabled = 1).",
            Some(Unit::Seconds),
            Counter,
        );
        let mut program_runs = Family::new(
            "bpf_program_runs",
            "Calls of the kernel programs (counted while kernel.bpf_stats_enabled = 1).",
            None,
            Counter,
        );
        for p in &a.programs {
            let labels: Labels = vec![("program", p.name.clone())];
            program_time.push(labels.clone(), p.run_time_ns as f64 / 1e9);
            program_runs.push(labels, p.run_count as f64);
        }
        let e = &self.exports;
        let mut exports = Family::new(
            "otlp_exports",
            "OTLP export attempts, by result.",
            None,
            Counter,
        );
        if e.otlp_enabled {
            exports.push(vec![("result", "ok".to_owned())], e.otlp_exports as f64);
            exports.push(
                vec![("result", "failed".to_owned())],
                e.otlp_failures as f64,
            );
        }
        families.extend([
            agent_cpu,
            agent_memory,
            losses,
            read_errors,
            sources,
            program_time,
            program_runs,
            exports,
        ]);

        if let Some(status) = &self.controller {
            families.extend(controller_families(status));
        }

        for family in &families {
            family.encode(&mut encoder)?;
        }
        Ok(())
    }
}

/// Budget, headroom and every limit in force, so a scheduler or autoscaler
/// can place work where there is room.
fn controller_families(status: &crate::controller::ControllerStatus) -> Vec<Family<'static>> {
    use MetricType::{Counter, Gauge};
    let mode: Labels = vec![("mode", status.mode.clone())];
    let mut budget = Family::new(
        "controller_budget_watts",
        "The node power budget the controller holds (observe mode: would hold).",
        None,
        Gauge,
    );
    let mut headroom = Family::new(
        "controller_headroom_watts",
        "Budget minus measured node power (negative: over budget).",
        None,
        Gauge,
    );
    if let Some(watts) = status.budget_watts {
        budget.push(mode.clone(), watts);
    }
    if let Some(watts) = status.headroom_watts {
        headroom.push(mode.clone(), watts);
    }
    let mut caps = Family::new(
        "controller_cap_watts",
        "A device power cap the controller has in force.",
        None,
        Gauge,
    );
    let mut cpus = Family::new(
        "controller_cpu_limit_cpus",
        "CPUs a container is held to by the controller.",
        None,
        Gauge,
    );
    for target in &status.targets {
        let labels: Labels = vec![
            ("target", target.target.clone()),
            ("mode", status.mode.clone()),
        ];
        if let Some(watts) = target.cap_watts {
            caps.push(labels.clone(), watts);
        }
        if let Some(limit) = target.cpu_limit_cpus {
            cpus.push(labels, limit);
        }
    }
    let mut failures = Family::new(
        "controller_write_failures",
        "Writes of a limit that failed (the file is named in the log and the API).",
        None,
        Counter,
    );
    failures.push(mode, status.write_failures as f64);
    vec![budget, headroom, caps, cpus, failures]
}
