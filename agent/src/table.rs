//! The compact table `powerlens run` prints every interval.

use std::fmt::Write as _;

use crate::{
    accounting::DomainJoules,
    cgroup::Workload,
    energy::Domain,
    snapshot::{Snapshot, WorkloadView, seconds, total_seconds},
};

fn short_name(view: &WorkloadView) -> String {
    match &*view.workload {
        Workload::Container {
            id,
            runtime,
            pod,
            owner_uid,
        } => {
            let short = id.get(..12).unwrap_or(id);
            if let Some(uid) = owner_uid {
                return format!("{short} ({runtime}, uid {uid})");
            }
            match pod {
                Some(pod) => format!(
                    "{short} ({runtime}, pod {})",
                    pod.uid.get(..8).unwrap_or(&pod.uid)
                ),
                None => format!("{short} ({runtime})"),
            }
        }
        Workload::PodSandbox { pod } => format!("pod {}", pod.uid),
        Workload::SystemdUnit { name } => name.clone(),
        Workload::Host => "host (kernel, root cgroup, other)".to_owned(),
    }
}

/// Watts over the last interval, over the domains that do not overlap.
fn watts(interval_joules: &DomainJoules, snapshot: &Snapshot) -> f64 {
    let seconds = snapshot.energy.node.interval_seconds;
    if seconds <= 0.0 {
        return 0.0;
    }
    Domain::ALL
        .iter()
        .filter(|d| d.in_total())
        .map(|d| interval_joules[*d as usize])
        .sum::<f64>()
        / seconds
}

fn percent(interval_ns: u64, snapshot: &Snapshot) -> f64 {
    let wall = snapshot.interval.as_nanos() as f64;
    if wall > 0.0 {
        100.0 * interval_ns as f64 / wall
    } else {
        0.0
    }
}

/// Renders the top `rows` workloads and processes by CPU in the last interval.
pub fn render(snapshot: &Snapshot, rows: usize) -> String {
    let mut out = String::new();
    let node = &snapshot.node;
    let utilization = if node.interval_capacity_ns > 0 {
        100.0 * node.interval_busy_ns as f64 / node.interval_capacity_ns as f64
    } else {
        0.0
    };
    let live = snapshot.processes.iter().filter(|p| !p.exited).count();
    let containers = snapshot
        .containers()
        .filter(|c| c.exited_at.is_none())
        .count();
    let books = &snapshot.energy.node;
    let estimated = if snapshot.energy.estimated { "~" } else { "" };
    let _ = writeln!(
        out,
        "powerlens {}  every {:.2}s  method {}  node CPU {:.1}% of {} CPUs  power {estimated}{:.1} W (idle {:.1} W, unattributed {:.1} W){}  processes {}  containers {}{}",
        humantime::format_rfc3339_seconds(snapshot.generated_at),
        snapshot.interval.as_secs_f64(),
        snapshot.method,
        utilization,
        node.busy_ns_by_cpu.len(),
        watts(&books.interval_measured, snapshot),
        watts(&books.interval_idle, snapshot),
        watts(&books.interval_unattributed, snapshot),
        if snapshot.energy.estimated {
            "  ~ = estimated by the model (no energy meter)"
        } else {
            ""
        },
        live,
        containers,
        if snapshot.read_errors > 0 {
            format!("  read errors {}", snapshot.read_errors)
        } else {
            String::new()
        },
    );
    let mut workloads: Vec<&WorkloadView> = snapshot.workloads.iter().collect();
    workloads.sort_by(|a, b| {
        b.interval_ns
            .cmp(&a.interval_ns)
            .then_with(|| a.key.cmp(&b.key))
    });
    let _ = writeln!(
        out,
        "  {:<10} {:<48} {:>7} {:>10} {:>9} {:>6}",
        "KIND", "WORKLOAD", "CPU%", "CPU-SEC", "WATTS", "PROCS"
    );
    for view in workloads.iter().take(rows) {
        let _ = writeln!(
            out,
            "  {:<10} {:<48} {:>7.1} {:>10.2} {:>9} {:>6}{}",
            view.workload.kind(),
            truncate(&short_name(view), 48),
            percent(view.interval_ns, snapshot),
            total_seconds(&view.cpu_ns_by_socket),
            format!(
                "{estimated}{:.2}",
                watts(&view.interval_energy_joules, snapshot)
            ),
            view.live_processes,
            if view.exited_at.is_some() {
                "  exited"
            } else {
                ""
            }
        );
    }
    let mut processes: Vec<_> = snapshot
        .processes
        .iter()
        .filter(|p| p.interval_ns > 0)
        .collect();
    processes.sort_by(|a, b| {
        b.interval_ns
            .cmp(&a.interval_ns)
            .then_with(|| a.key.cmp(&b.key))
    });
    let _ = writeln!(
        out,
        "  {:<8} {:<16} {:<36} {:>7} {:>10} {:>9}",
        "PID", "COMM", "WORKLOAD", "CPU%", "CPU-SEC", "WATTS"
    );
    for process in processes.iter().take(rows) {
        let workload = snapshot
            .workload_of(process)
            .map_or_else(|| "host".to_owned(), short_name);
        let _ = writeln!(
            out,
            "  {:<8} {:<16} {:<36} {:>7.1} {:>10.2} {:>9}",
            process.key.pid,
            process.comm.as_str(),
            truncate(&workload, 36),
            percent(process.interval_ns, snapshot),
            seconds(process.cpu_ns_by_socket.iter().sum()),
            format!(
                "{estimated}{:.2}",
                watts(&process.interval_energy_joules, snapshot)
            ),
        );
    }
    out
}

fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_owned()
    } else {
        let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}
