//! `/metrics` text from a hand-made snapshot.

use super::*;
use crate::{sinks::ExportFigures, view::tests::sample_snapshot};

fn render_sample(processes: bool) -> String {
    let snapshot = sample_snapshot();
    let processes = processes.then(|| {
        snapshot
            .processes
            .iter()
            .map(|p| process_figures(&snapshot, p))
            .collect()
    });
    render(Exposition {
        figures: snapshot.figures(),
        processes,
        exports: ExportFigures::default(),
        controller: None,
    })
}

fn sample_line<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{text}"))
}

#[test]
fn containers_pods_and_books_are_series_per_domain() {
    let text = render_sample(false);
    let id = format!("abcdef012345{}", "1".repeat(52));
    let line = sample_line(
        &text,
        &format!("powerlens_container_energy_joules_total{{container_id=\"{id}\""),
    );
    assert!(line.contains("runtime=\"containerd\""), "{line}");
    assert!(line.contains("pod_qos=\"burstable\""), "{line}");
    assert!(line.ends_with("domain=\"package\"} 100.0"), "{line}");
    assert!(
        !text.contains("domain=\"total\""),
        "a total series would count joules twice under sum()"
    );
    let pod = sample_line(&text, "powerlens_pod_energy_joules_total{");
    assert!(pod.ends_with("domain=\"package\"} 150.0"), "{pod}");
    let measured = sample_line(
        &text,
        "powerlens_node_energy_joules_total{book=\"measured\",estimated=\"false\",domain=\"package\"}",
    );
    assert!(measured.ends_with(" 200.0"), "{measured}");
    let service = sample_line(
        &text,
        "powerlens_workload_energy_joules_total{workload=\"service:sshd.service\"",
    );
    assert!(service.contains("kind=\"service\""), "{service}");
    assert!(
        !text.contains("powerlens_process_energy"),
        "processes only when asked"
    );
    assert_eq!(text.lines().last(), Some("# EOF"));
    assert!(text.contains("# UNIT powerlens_container_energy_joules joules"));
}

#[test]
fn process_series_when_asked() {
    let text = render_sample(true);
    let line = sample_line(&text, "powerlens_process_energy_joules_total{pid=\"42\"");
    assert!(line.contains("comm=\"burn\""), "{line}");
}

#[test]
fn classic_text_names_counters_by_their_samples() {
    let text = to_prometheus_text(&render_sample(false));
    assert!(text.contains("# TYPE powerlens_container_energy_joules_total counter\n"));
    assert!(text.contains("# HELP powerlens_container_energy_joules_total Energy"));
    assert!(text.contains("# TYPE powerlens_container_power_watts gauge\n"));
    assert!(!text.contains("# UNIT") && !text.contains("# EOF"));
}
