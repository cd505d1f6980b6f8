//! The instruments and what their callbacks observe. Devices follow the
//! OpenTelemetry hardware conventions (`hw.energy`, `hw.power`,
//! `hw.temperature`, `hw.host.*`); workloads and the node's books are
//! `powerlens.*`; the agent's own cost follows the process conventions.
//!
//! Every point says whether it is measured or estimated
//! (`powerlens.estimated`) and by which source (`powerlens.source`).

use std::{
    sync::{Arc, Mutex},
    time::SystemTime,
};

/// The data-point attributes that name a container and its pod. The
/// Collector pipeline in deploy/otel-collector regroups and enriches on
/// these names; a test checks that config against these constants.
pub const CONTAINER_ID: &str = "container.id";
pub const POD_UID: &str = "k8s.pod.uid";

use opentelemetry::{
    KeyValue,
    metrics::{AsyncInstrument, Meter},
};

use super::{ExportClock, limiter::SeriesLimit};
use crate::{
    snapshot::SharedSnapshot,
    view::{ByDomain, EnergyFigures, Figures, process_figures},
};

/// What the callbacks share: the snapshot, the export clock, and one
/// series limit per kind of key.
pub struct Observed {
    shared: SharedSnapshot,
    clock: Arc<ExportClock>,
    containers: Mutex<SeriesLimit>,
    pods: Mutex<SeriesLimit>,
    processes: Option<Mutex<SeriesLimit>>,
}

impl Observed {
    pub fn new(
        shared: SharedSnapshot,
        clock: Arc<ExportClock>,
        series_limit: usize,
        processes: bool,
    ) -> Self {
        Self {
            shared,
            clock,
            containers: Mutex::new(SeriesLimit::new(series_limit)),
            pods: Mutex::new(SeriesLimit::new(series_limit)),
            processes: processes.then(|| Mutex::new(SeriesLimit::new(series_limit))),
        }
    }

    fn figures(&self) -> Arc<Figures> {
        self.shared.latest().figures()
    }
}

type Points = Vec<(f64, Vec<KeyValue>)>;

/// Counter slots of a series limit: one per (metric, domain).
const ENERGY_SLOT: usize = 0;
const CPU_SLOT: usize = 100;

fn estimated(figures: &EnergyFigures) -> KeyValue {
    KeyValue::new("powerlens.estimated", figures.estimated)
}

/// One point per measured domain (never `total`, so summing over `domain`
/// counts each joule once).
fn per_domain(points: &mut Points, attributes: &[KeyValue], values: &ByDomain) {
    for (domain, value) in values.iter() {
        let mut with_domain = attributes.to_vec();
        with_domain.push(KeyValue::new("domain", domain.as_str()));
        points.push((value, with_domain));
    }
}

fn overflow_attributes(domain: Option<&'static str>) -> Vec<KeyValue> {
    let mut attributes = vec![KeyValue::new("otel.metric.overflow", true)];
    if let Some(domain) = domain {
        attributes.push(KeyValue::new("domain", domain));
    }
    attributes
}

/// Which figure of a workload a callback reports.
#[derive(Clone, Copy)]
enum Figure {
    Energy,
    Power,
    Cpu,
}

/// Points for keyed workloads under a series limit: tracked keys get their
/// own points; the rest are summed into overflow points per domain.
fn limited<'a>(
    limit: &Mutex<SeriesLimit>,
    figure: Figure,
    items: impl Iterator<Item = (&'a str, Vec<KeyValue>, &'a EnergyFigures, f64)> + Clone,
) -> Points {
    let Ok(mut limit) = limit.lock() else {
        return Points::new();
    };
    limit.select(items.clone().map(|(key, ..)| key));
    let mut points = Points::new();
    let mut overflow_gauge: std::collections::BTreeMap<&'static str, f64> = Default::default();
    let mut overflowed = false;
    for (key, attributes, energy, cpu_seconds) in items {
        if limit.is_tracked(key) {
            match figure {
                Figure::Energy => per_domain(&mut points, &attributes, &energy.energy_joules),
                Figure::Power => per_domain(&mut points, &attributes, &energy.power_watts),
                Figure::Cpu => points.push((cpu_seconds, attributes)),
            }
            continue;
        }
        overflowed = true;
        match figure {
            Figure::Energy => {
                for (domain, joules) in energy.energy_joules.iter() {
                    limit.add_overflow(ENERGY_SLOT + domain as usize, key, joules);
                }
            }
            Figure::Power => {
                for (domain, watts) in energy.power_watts.iter() {
                    *overflow_gauge.entry(domain.as_str()).or_insert(0.0) += watts;
                }
            }
            Figure::Cpu => limit.add_overflow(CPU_SLOT, key, cpu_seconds),
        }
    }
    match figure {
        Figure::Energy => {
            for domain in crate::energy::Domain::ALL {
                if let Some(total) = limit.overflow(ENERGY_SLOT + domain as usize) {
                    points.push((total, overflow_attributes(Some(domain.as_str()))));
                }
            }
        }
        Figure::Power if overflowed => {
            for (domain, watts) in overflow_gauge {
                points.push((watts, overflow_attributes(Some(domain))));
            }
        }
        Figure::Power => {}
        Figure::Cpu => {
            if let Some(total) = limit.overflow(CPU_SLOT) {
                points.push((total, overflow_attributes(None)));
            }
        }
    }
    points
}

fn container_points(observed: &Observed, figure: Figure) -> Points {
    let figures = observed.figures();
    let mut owed: Vec<_> = figures
        .containers
        .iter()
        .filter(|c| observed.clock.still_owed(c.exited_at))
        .collect();
    // Long-lived containers keep their own series first.
    owed.sort_by_key(|c| c.first_seen);
    let items = owed.iter().map(|c| {
        let mut attributes = vec![
            KeyValue::new(CONTAINER_ID, c.container_id.clone()),
            KeyValue::new("container.runtime", c.runtime.clone()),
            estimated(&c.energy),
        ];
        if let Some(uid) = &c.pod_uid {
            attributes.push(KeyValue::new(POD_UID, uid.clone()));
        }
        if let Some(qos) = &c.pod_qos {
            attributes.push(KeyValue::new("k8s.pod.qos", qos.clone()));
        }
        (
            c.container_id.as_str(),
            attributes,
            &c.energy,
            c.cpu_seconds,
        )
    });
    limited(&observed.containers, figure, items)
}

fn pod_points(observed: &Observed, figure: Figure) -> Points {
    let figures = observed.figures();
    let items = figures.pods.iter().map(|p| {
        let attributes = vec![
            KeyValue::new(POD_UID, p.pod_uid.clone()),
            KeyValue::new("k8s.pod.qos", p.pod_qos.clone()),
            estimated(&p.energy),
        ];
        (p.pod_uid.as_str(), attributes, &p.energy, p.cpu_seconds)
    });
    limited(&observed.pods, figure, items)
}

fn process_points(observed: &Observed, figure: Figure) -> Points {
    let Some(limit) = &observed.processes else {
        return Points::new();
    };
    let snapshot = observed.shared.latest();
    let processes: Vec<_> = snapshot
        .processes
        .iter()
        .filter(|p| !p.exited)
        .map(|p| (p.key, process_figures(&snapshot, p)))
        .collect();
    let keys: Vec<String> = processes
        .iter()
        .map(|(key, _)| format!("{}:{}", key.pid, key.start_ns))
        .collect();
    let items = processes.iter().zip(&keys).map(|((_, p), key)| {
        let mut attributes = vec![
            KeyValue::new("process.pid", i64::from(p.pid)),
            KeyValue::new("process.command", p.comm.clone()),
            KeyValue::new("powerlens.workload", p.workload.clone()),
            estimated(&p.energy),
        ];
        if let Some(id) = &p.container_id {
            attributes.push(KeyValue::new(CONTAINER_ID, id.clone()));
        }
        (key.as_str(), attributes, &p.energy, p.cpu_seconds)
    });
    limited(limit, figure, items)
}

/// Workloads that are not containers: systemd units, pod cgroups, the host.
/// Few per node, so no limit; with the containers they are everything the
/// node attributed.
fn other_workload_points(observed: &Observed, power: bool) -> Points {
    let figures = observed.figures();
    let mut points = Points::new();
    for w in figures.workloads.iter().filter(|w| w.kind != "container") {
        let attributes = vec![
            KeyValue::new("powerlens.workload", w.workload.clone()),
            KeyValue::new("powerlens.workload.kind", w.kind.clone()),
            estimated(&w.energy),
        ];
        let values = if power {
            &w.energy.power_watts
        } else {
            &w.energy.energy_joules
        };
        per_domain(&mut points, &attributes, values);
    }
    points
}

fn node_points(observed: &Observed, power: bool) -> Points {
    let figures = observed.figures();
    let node = &figures.node;
    let (joules, watts) = (&node.energy_joules, &node.power_watts.books);
    let books = if power { watts } else { joules };
    let mut points = Points::new();
    for (book, values) in [
        ("measured", &books.measured),
        ("attributed", &books.attributed),
        ("idle", &books.idle),
        ("unattributed", &books.unattributed),
    ] {
        let attributes = vec![
            KeyValue::new("powerlens.book", book),
            KeyValue::new("powerlens.estimated", node.estimated),
        ];
        per_domain(&mut points, &attributes, values);
    }
    points
}

fn device_points(observed: &Observed, power: bool) -> Points {
    let figures = observed.figures();
    figures
        .node
        .devices
        .iter()
        .map(|d| {
            let value = if power {
                d.power_watts
            } else {
                d.energy_joules
            };
            (
                value,
                vec![
                    KeyValue::new("hw.id", d.hw_id.clone()),
                    KeyValue::new("hw.type", d.hw_type.clone()),
                    KeyValue::new("hw.name", d.hw_name.clone()),
                    KeyValue::new("powerlens.source", d.method.as_str()),
                    KeyValue::new("powerlens.estimated", d.estimated),
                ],
            )
        })
        .collect()
}

/// The whole host: psys where the platform meters it, else the measured
/// total of the domains that do not overlap (package + dram + gpu).
fn host_points(observed: &Observed, power: bool) -> Points {
    let figures = observed.figures();
    let node = &figures.node;
    if node.energy_method.is_empty() {
        return Points::new();
    }
    let values = if power {
        &node.power_watts.books.measured
    } else {
        &node.energy_joules.measured
    };
    let (value, from) = match values.psys {
        Some(psys) => (psys, "psys"),
        None => (values.total, "package+dram+gpu"),
    };
    vec![(
        value,
        vec![
            KeyValue::new("hw.id", "host"),
            KeyValue::new("hw.type", "host"),
            KeyValue::new("powerlens.domain", from),
            KeyValue::new("powerlens.estimated", node.estimated),
        ],
    )]
}

fn temperature_points(observed: &Observed) -> Points {
    let figures = observed.figures();
    let node = &figures.node;
    let mut points: Points = node
        .temperatures
        .iter()
        .map(|t| {
            let name = t.label.clone().unwrap_or_else(|| t.sensor.clone());
            (
                t.celsius,
                vec![
                    KeyValue::new("hw.id", format!("{}/{}", t.sensor, name)),
                    KeyValue::new("hw.type", "temperature"),
                    KeyValue::new("hw.name", name),
                ],
            )
        })
        .collect();
    for g in &node.gpus {
        if let Some(celsius) = g.temperature_celsius {
            points.push((
                f64::from(celsius),
                vec![
                    KeyValue::new("hw.id", format!("gpu-{}", g.index)),
                    KeyValue::new("hw.type", "gpu"),
                    KeyValue::new("hw.name", g.name.clone()),
                ],
            ));
        }
    }
    points
}

fn agent_points(observed: &Observed, what: AgentFigure) -> Points {
    let figures = observed.figures();
    let agent = &figures.agent;
    match what {
        AgentFigure::Cpu => vec![(agent.cpu_seconds, Vec::new())],
        AgentFigure::Memory => vec![(agent.memory_bytes as f64, Vec::new())],
        AgentFigure::Losses => agent
            .losses
            .iter()
            .map(|(name, count)| {
                (
                    *count as f64,
                    vec![KeyValue::new("powerlens.loss", name.clone())],
                )
            })
            .chain(std::iter::once((
                agent.read_errors as f64,
                vec![KeyValue::new("powerlens.loss", "cpu_read_errors")],
            )))
            .collect(),
        AgentFigure::ProgramTime => agent
            .programs
            .iter()
            .map(|p| {
                (
                    p.run_time_ns as f64 / 1e9,
                    vec![KeyValue::new("powerlens.program", p.name.clone())],
                )
            })
            .collect(),
        AgentFigure::ProgramRuns => agent
            .programs
            .iter()
            .map(|p| {
                (
                    p.run_count as f64,
                    vec![KeyValue::new("powerlens.program", p.name.clone())],
                )
            })
            .collect(),
        AgentFigure::Sources => figures
            .node
            .sources
            .iter()
            .map(|s| {
                let up = matches!(s.status, crate::energy::SourceState::Ok);
                (
                    if up { 1.0 } else { 0.0 },
                    vec![
                        KeyValue::new("powerlens.source", s.name.clone()),
                        KeyValue::new("powerlens.source.status", s.status.as_str()),
                    ],
                )
            })
            .collect(),
        AgentFigure::ExportFailures => {
            let exports = observed.shared.exports().figures();
            vec![(exports.otlp_failures as f64, Vec::new())]
        }
    }
}

#[derive(Clone, Copy)]
enum AgentFigure {
    Cpu,
    Memory,
    Losses,
    ProgramTime,
    ProgramRuns,
    Sources,
    ExportFailures,
}

fn observe(observer: &dyn AsyncInstrument<f64>, points: Points) {
    for (value, attributes) in points {
        observer.observe(value, &attributes);
    }
}

/// Registers every instrument. The SDK keeps the callbacks for the
/// provider's life; each reads the latest snapshot and never blocks.
pub fn register(meter: &Meter, observed: Observed) {
    let observed = Arc::new(observed);
    let counter = |name: &'static str,
                   unit: &'static str,
                   description: &'static str,
                   points: Box<dyn Fn(&Observed) -> Points + Send + Sync>| {
        let observed = Arc::clone(&observed);
        meter
            .f64_observable_counter(name)
            .with_unit(unit)
            .with_description(description)
            .with_callback(move |observer| observe(observer, points(&observed)))
            .build();
    };
    let gauge = |name: &'static str,
                 unit: &'static str,
                 description: &'static str,
                 points: Box<dyn Fn(&Observed) -> Points + Send + Sync>| {
        let observed = Arc::clone(&observed);
        meter
            .f64_observable_gauge(name)
            .with_unit(unit)
            .with_description(description)
            .with_callback(move |observer| observe(observer, points(&observed)))
            .build();
    };
    // The first callback of a collection notes its time, for exited
    // containers' last export.
    {
        let observed = Arc::clone(&observed);
        meter
            .f64_observable_counter("powerlens.container.energy")
            .with_unit("J")
            .with_description("Energy charged to a container since the agent started, per domain.")
            .with_callback(move |observer| {
                observed.clock.collecting(SystemTime::now());
                observe(observer, container_points(&observed, Figure::Energy));
            })
            .build();
    }
    gauge(
        "powerlens.container.power",
        "W",
        "Power of a container over the last interval, per domain.",
        Box::new(|o| container_points(o, Figure::Power)),
    );
    counter(
        "container.cpu.time",
        "s",
        "CPU time of a container since the agent started.",
        Box::new(|o| container_points(o, Figure::Cpu)),
    );
    counter(
        "powerlens.pod.energy",
        "J",
        "Energy charged to a pod (its containers and pod cgroup), per domain.",
        Box::new(|o| pod_points(o, Figure::Energy)),
    );
    gauge(
        "powerlens.pod.power",
        "W",
        "Power of a pod over the last interval, per domain.",
        Box::new(|o| pod_points(o, Figure::Power)),
    );
    counter(
        "powerlens.workload.energy",
        "J",
        "Energy charged to a workload that is not a container (systemd unit, pod cgroup, host), per domain.",
        Box::new(|o| other_workload_points(o, false)),
    );
    gauge(
        "powerlens.workload.power",
        "W",
        "Power of a workload that is not a container, per domain.",
        Box::new(|o| other_workload_points(o, true)),
    );
    if observed.processes.is_some() {
        counter(
            "powerlens.process.energy",
            "J",
            "Energy charged to a process since the agent started, per domain.",
            Box::new(|o| process_points(o, Figure::Energy)),
        );
        gauge(
            "powerlens.process.power",
            "W",
            "Power of a process over the last interval, per domain.",
            Box::new(|o| process_points(o, Figure::Power)),
        );
        counter(
            "powerlens.process.cpu.time",
            "s",
            "CPU time of a process since the agent started.",
            Box::new(|o| process_points(o, Figure::Cpu)),
        );
    }
    counter(
        "powerlens.node.energy",
        "J",
        "The node's energy books per domain: measured = attributed + idle + unattributed.",
        Box::new(|o| node_points(o, false)),
    );
    gauge(
        "powerlens.node.power",
        "W",
        "The node's power books over the last interval, per domain.",
        Box::new(|o| node_points(o, true)),
    );
    counter(
        "hw.energy",
        "J",
        "Energy of a device (a socket's package or dram, a GPU, the platform) since the agent started.",
        Box::new(|o| device_points(o, false)),
    );
    gauge(
        "hw.power",
        "W",
        "Power of a device over the last interval.",
        Box::new(|o| device_points(o, true)),
    );
    counter(
        "hw.host.energy",
        "J",
        "Energy of the whole host since the agent started.",
        Box::new(|o| host_points(o, false)),
    );
    gauge(
        "hw.host.power",
        "W",
        "Power of the whole host over the last interval.",
        Box::new(|o| host_points(o, true)),
    );
    gauge(
        "hw.temperature",
        "Cel",
        "Temperature of a sensor.",
        Box::new(temperature_points),
    );
    counter(
        "process.cpu.time",
        "s",
        "CPU time (user + system) of the agent.",
        Box::new(|o| agent_points(o, AgentFigure::Cpu)),
    );
    gauge(
        "process.memory.usage",
        "By",
        "Resident memory of the agent.",
        Box::new(|o| agent_points(o, AgentFigure::Memory)),
    );
    counter(
        "powerlens.losses",
        "{event}",
        "Events where the agent lost data, by kind (0 in a healthy agent).",
        Box::new(|o| agent_points(o, AgentFigure::Losses)),
    );
    counter(
        "powerlens.bpf.program.time",
        "s",
        "Run time of the kernel programs (counted while kernel.bpf_stats_enabled = 1).",
        Box::new(|o| agent_points(o, AgentFigure::ProgramTime)),
    );
    counter(
        "powerlens.bpf.program.runs",
        "{run}",
        "Calls of the kernel programs (counted while kernel.bpf_stats_enabled = 1).",
        Box::new(|o| agent_points(o, AgentFigure::ProgramRuns)),
    );
    gauge(
        "powerlens.source.up",
        "1",
        "1 when a source works, 0 when it is disabled or failing.",
        Box::new(|o| agent_points(o, AgentFigure::Sources)),
    );
    counter(
        "powerlens.export.failures",
        "{export}",
        "OTLP exports that failed.",
        Box::new(|o| agent_points(o, AgentFigure::ExportFailures)),
    );
}

/// The power-cap controller's budget, headroom and limits in force, so a
/// scheduler or autoscaler downstream can place work where there is room.
pub fn register_controller(meter: &Meter, controller: crate::controller::SharedControllerStatus) {
    let status = move || crate::controller::latest_status(&controller);
    let status = Arc::new(status);
    type Pick = fn(&crate::controller::ControllerStatus) -> Points;
    let gauges: [(&'static str, &'static str, &'static str, Pick); 4] = [
        (
            "powerlens.controller.budget",
            "W",
            "The node power budget the controller holds (observe mode: would hold).",
            |s| node_point(s, s.budget_watts),
        ),
        (
            "powerlens.controller.headroom",
            "W",
            "Budget minus measured node power (negative: over budget).",
            |s| node_point(s, s.headroom_watts),
        ),
        (
            "powerlens.controller.cap",
            "W",
            "A device power cap the controller has in force.",
            |s| per_target(s, |t| t.cap_watts),
        ),
        (
            "powerlens.controller.cpu_limit",
            "{cpu}",
            "CPUs a container is held to by the controller.",
            |s| per_target(s, |t| t.cpu_limit_cpus),
        ),
    ];
    for (name, unit, description, pick) in gauges {
        let status = Arc::clone(&status);
        meter
            .f64_observable_gauge(name)
            .with_unit(unit)
            .with_description(description)
            .with_callback(move |observer| observe(observer, pick(&status())))
            .build();
    }
}

/// A node-level controller figure, labelled with the controller's mode.
fn node_point(status: &crate::controller::ControllerStatus, value: Option<f64>) -> Points {
    value
        .map(|value| {
            vec![(
                value,
                vec![KeyValue::new(
                    "powerlens.controller.mode",
                    status.mode.clone(),
                )],
            )]
        })
        .unwrap_or_default()
}

/// A per-target controller figure, for each target that has one.
fn per_target(
    status: &crate::controller::ControllerStatus,
    pick: fn(&crate::controller::TargetStatus) -> Option<f64>,
) -> Points {
    status
        .targets
        .iter()
        .filter_map(|target| {
            Some((
                pick(target)?,
                vec![KeyValue::new(
                    "powerlens.controller.target",
                    target.target.clone(),
                )],
            ))
        })
        .collect()
}
