//! Draws `powerlens top` from its state: a header with the node's power by
//! domain (measured, idle, unattributed), temperatures, the sources' state
//! and the method; below, the current level ranked, each row with its
//! recent power as a sparkline. Pure: tests render into a test backend.

use ratatui::{
    Frame,
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    text::Line,
    widgets::{Block, Borders, Cell, Paragraph, Row, Table},
};
use serde_json::Value;

use super::state::{Level, TopState, sparkline};
use crate::query::{
    SortBy,
    format::{energy, number, power, short, text},
};

fn node_lines(state: &TopState) -> Vec<Line<'static>> {
    let node = &state.poll.node;
    let mut lines = Vec::new();
    let estimated = node["estimated"] == Value::Bool(true);
    let status = match &state.error {
        Some(error) => format!("agent {} not answering ({error}): retrying", state.agent),
        None => format!("agent {}", state.agent),
    };
    lines.push(Line::from(format!(
        "{status}   method {}   CPU {:.0}%{}{}",
        text(node, "method"),
        100.0 * number(node, &["cpu_utilization"]).max(0.0),
        if estimated {
            "   energy estimated (model)"
        } else {
            ""
        },
        if state.paused { "   [paused]" } else { "" }
    )));
    let books = &node["power_watts"];
    let mut domains = Vec::new();
    for domain in ["package", "core", "uncore", "dram", "psys", "gpu"] {
        let measured = number(books, &["measured", domain]);
        if measured.is_finite() {
            domains.push(format!(
                "{domain} {} (idle {:.1}, unattributed {:.1})",
                power(measured, estimated, None),
                number(books, &["idle", domain]).max(0.0),
                number(books, &["unattributed", domain]).max(0.0)
            ));
        }
    }
    lines.push(Line::from(if domains.is_empty() {
        "no power figures yet".to_owned()
    } else {
        domains.join("   ")
    }));
    let gpus: Vec<String> = node["gpus"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|gpu| {
            format!(
                "GPU{} {} {:.0} W",
                number(gpu, &["index"]),
                text(gpu, "name"),
                number(gpu, &["power_watts"])
            )
        })
        .collect();
    let temperatures: Vec<String> = node["temperatures"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            format!(
                "{} {:.0}°C",
                t["label"].as_str().unwrap_or_else(|| text(t, "sensor")),
                number(t, &["celsius"])
            )
        })
        .collect();
    let mut extras = Vec::new();
    if !gpus.is_empty() {
        extras.push(gpus.join("  "));
    }
    if !temperatures.is_empty() {
        extras.push(temperatures.join("  "));
    }
    let failing: Vec<String> = node["sources"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["status"] == "failing")
        .map(|s| format!("{} failing", text(s, "name")))
        .collect();
    if !failing.is_empty() {
        extras.push(failing.join("  "));
    }
    lines.push(Line::from(extras.join("   ")));
    lines
}

fn header_and_cells(state: &TopState, row: &Value, spark_width: usize) -> Vec<String> {
    let estimated = row["estimated"] == Value::Bool(true);
    let watts = power(
        number(row, &["power_watts", "total"]),
        estimated,
        row["relative_uncertainty"].as_f64(),
    );
    let joules = energy(number(row, &["energy_joules", "total"]));
    let cpus = format!("{:.2}", number(row, &["cpu_cores"]));
    let spark = sparkline(&state.history(row), spark_width);
    match state.level {
        Level::Containers => vec![
            short(text(row, "container_id"), 12),
            row["pod_uid"].as_str().map_or("-".into(), |p| short(p, 8)),
            watts,
            joules,
            cpus,
            spark,
        ],
        Level::Pods => vec![
            short(text(row, "pod_uid"), 36),
            text(row, "pod_qos").to_owned(),
            watts,
            joules,
            cpus,
            spark,
        ],
        Level::Processes => vec![
            number(row, &["pid"]).to_string(),
            text(row, "comm").to_owned(),
            watts,
            joules,
            cpus,
            spark,
        ],
    }
}

/// Draws the whole screen.
pub fn draw(frame: &mut Frame, state: &TopState) {
    let area = frame.area();
    let [header, body, footer] = Layout::vertical([
        Constraint::Length(5),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(area);
    frame.render_widget(
        Paragraph::new(node_lines(state)).block(
            Block::default()
                .borders(Borders::ALL)
                .title(" powerlens top "),
        ),
        header,
    );
    let narrow = area.width < 90;
    let spark_width = if narrow { 10 } else { 30 };
    let names = match state.level {
        Level::Containers => [
            "CONTAINER",
            "POD",
            "POWER",
            "ENERGY",
            "CPUS",
            "RECENT POWER",
        ],
        Level::Pods => ["POD", "QOS", "POWER", "ENERGY", "CPUS", "RECENT POWER"],
        Level::Processes => ["PID", "COMMAND", "POWER", "ENERGY", "CPUS", "RECENT POWER"],
    };
    let rows: Vec<Row> = state
        .rows()
        .into_iter()
        .map(|row| {
            Row::new(
                header_and_cells(state, row, spark_width)
                    .into_iter()
                    .map(Cell::from),
            )
        })
        .collect();
    let widths = if narrow {
        [
            Constraint::Length(12),
            Constraint::Length(8),
            Constraint::Length(13),
            Constraint::Length(9),
            Constraint::Length(0),
            Constraint::Min(4),
        ]
    } else {
        [
            Constraint::Length(if state.level == Level::Pods { 36 } else { 14 }),
            Constraint::Length(16),
            Constraint::Length(14),
            Constraint::Length(11),
            Constraint::Length(6),
            Constraint::Min(10),
        ]
    };
    let sort = match state.sort {
        SortBy::Power => "power",
        SortBy::Energy => "energy",
        SortBy::Cpu => "cpu",
    };
    let title = if state.filter.is_empty() {
        format!(" {} by {sort} ", state.level.title())
    } else {
        format!(
            " {} by {sort}, filter {:?} ",
            state.level.title(),
            state.filter
        )
    };
    frame.render_widget(
        Table::new(rows, widths)
            .header(Row::new(names).style(Style::default().add_modifier(Modifier::BOLD)))
            .block(Block::default().borders(Borders::ALL).title(title)),
        body,
    );
    let help = if state.editing_filter {
        format!("filter: {}_   (Enter to apply, Esc to clear)", state.filter)
    } else {
        "q quit  tab/c/p/r level  s sort  / filter  space pause".to_owned()
    };
    frame.render_widget(Paragraph::new(help), footer);
}

#[cfg(test)]
mod tests {
    use ratatui::{Terminal, backend::TestBackend};
    use serde_json::json;

    use super::*;
    use crate::top::state::Poll;

    fn screen(state: &TopState, width: u16, height: u16) -> String {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|frame| draw(frame, state)).unwrap();
        let buffer = terminal.backend().buffer().clone();
        let mut text = String::new();
        for y in 0..buffer.area.height {
            for x in 0..buffer.area.width {
                text.push_str(buffer[(x, y)].symbol());
            }
            text.push('\n');
        }
        text
    }

    fn node(estimated: bool, gpus: usize) -> Value {
        let gpu_list: Vec<Value> = (0..gpus)
            .map(|i| json!({"index": i, "name": "NVIDIA H100", "power_watts": 300.0 + i as f64}))
            .collect();
        let mut measured = json!({"package": 80.0, "total": 80.0});
        if gpus > 0 {
            measured["gpu"] = json!(300.0 * gpus as f64);
        }
        json!({
            "method": "ebpf",
            "cpu_utilization": 0.5,
            "estimated": estimated,
            "power_watts": {
                "measured": measured,
                "idle": {"package": 20.0},
                "unattributed": {"package": 1.5}
            },
            "gpus": gpu_list,
            "temperatures": [{"sensor": "coretemp", "label": "Package id 0", "celsius": 61.0}],
            "sources": [{"name": "rapl", "status": "ok"}, {"name": "nvml", "status": "failing"}]
        })
    }

    fn state(estimated: bool, gpus: usize) -> TopState {
        let mut state = TopState::new("http://127.0.0.1:9876".into());
        let container = |id: &str, watts: f64| {
            json!({
                "container_id": id, "pod_uid": "8f8bb328-1234", "estimated": estimated,
                "relative_uncertainty": if estimated { Some(0.3) } else { None },
                "power_watts": {"total": watts}, "energy_joules": {"total": watts * 100.0},
                "cpu_cores": watts / 30.0
            })
        };
        for step in 1..=5 {
            state.update(Poll {
                node: node(estimated, gpus),
                containers: vec![
                    container("18207abaf972aaaa", 10.0 * f64::from(step)),
                    container("a61f57d0bab8bbbb", 5.0),
                ],
                ..Poll::default()
            });
        }
        state
    }

    #[test]
    fn wide_screen_with_measured_figures_and_two_gpus() {
        let text = screen(&state(false, 2), 130, 14);
        assert!(
            text.contains("package 80.0 W (idle 20.0, unattributed 1.5)"),
            "{text}"
        );
        assert!(text.contains("gpu 600.0 W"), "{text}");
        assert!(
            text.contains("GPU0 NVIDIA H100 300 W") && text.contains("GPU1"),
            "{text}"
        );
        assert!(text.contains("Package id 0 61°C"), "{text}");
        assert!(text.contains("nvml failing"), "{text}");
        assert!(text.contains("containers by power"), "{text}");
        // Ranked by power: the growing one first, with its sparkline.
        let first = text.find("18207abaf972").unwrap();
        let second = text.find("a61f57d0bab8").unwrap();
        assert!(first < second, "{text}");
        assert!(text.contains("▂▄▅▇█"), "{text}");
    }

    #[test]
    fn narrow_screen_with_estimated_figures_and_no_gpu() {
        let text = screen(&state(true, 0), 60, 14);
        assert!(text.contains("~50.0 W ±30%"), "{text}");
        assert!(!text.contains("GPU0"), "{text}");
        assert!(text.contains("q quit"), "{text}");
    }

    #[test]
    fn an_agent_that_went_away_is_said_and_the_last_figures_stay() {
        let mut state = state(false, 0);
        state.error = Some("connection refused".into());
        let text = screen(&state, 130, 14);
        assert!(
            text.contains("not answering (connection refused): retrying"),
            "{text}"
        );
        assert!(text.contains("18207abaf972"), "{text}");
    }
}
