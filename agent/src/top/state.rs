//! What `powerlens top` shows and remembers: the level (containers, pods,
//! processes), the sort, the filter, pause, and each row's recent power for
//! its sparkline (kept by `top` itself while it runs).

use std::collections::{HashMap, VecDeque};

use serde_json::Value;

use crate::query::{SortBy, format::number};

/// Points of power history kept per row.
pub const HISTORY: usize = 60;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Containers,
    Pods,
    Processes,
}

impl Level {
    pub fn next(self) -> Self {
        match self {
            Level::Containers => Level::Pods,
            Level::Pods => Level::Processes,
            Level::Processes => Level::Containers,
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Level::Containers => "containers",
            Level::Pods => "pods",
            Level::Processes => "processes",
        }
    }

    /// The key that names a row at this level.
    pub fn key(self, row: &Value) -> String {
        let field = match self {
            Level::Containers => "container_id",
            Level::Pods => "pod_uid",
            Level::Processes => "pid",
        };
        match &row[field] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }
}

/// One poll of the agent.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Poll {
    pub node: Value,
    pub containers: Vec<Value>,
    pub pods: Vec<Value>,
    pub processes: Vec<Value>,
}

#[derive(Debug)]
pub struct TopState {
    pub agent: String,
    pub level: Level,
    pub sort: SortBy,
    pub filter: String,
    /// Typing a filter (after `/`, until Enter or Esc).
    pub editing_filter: bool,
    pub paused: bool,
    pub poll: Poll,
    /// The last error talking to the agent (shown; `top` keeps retrying).
    pub error: Option<String>,
    history: HashMap<(u8, String), VecDeque<f64>>,
}

impl TopState {
    pub fn new(agent: String) -> Self {
        Self {
            agent,
            level: Level::Containers,
            sort: SortBy::Power,
            filter: String::new(),
            editing_filter: false,
            paused: false,
            poll: Poll::default(),
            error: None,
            history: HashMap::new(),
        }
    }

    /// Takes a new poll (ignored while paused) and extends the sparklines.
    pub fn update(&mut self, poll: Poll) {
        self.error = None;
        if self.paused {
            return;
        }
        for (level, rows) in [
            (Level::Containers, &poll.containers),
            (Level::Pods, &poll.pods),
            (Level::Processes, &poll.processes),
        ] {
            for row in rows {
                let history = self
                    .history
                    .entry((level as u8, level.key(row)))
                    .or_default();
                if history.len() == HISTORY {
                    history.pop_front();
                }
                history.push_back(number(row, &["power_watts", "total"]).max(0.0));
            }
        }
        // Rows gone from every level take their history with them.
        let alive: std::collections::HashSet<(u8, String)> = [
            (Level::Containers, &poll.containers),
            (Level::Pods, &poll.pods),
            (Level::Processes, &poll.processes),
        ]
        .iter()
        .flat_map(|(level, rows)| rows.iter().map(move |row| (*level as u8, level.key(row))))
        .collect();
        self.history.retain(|key, _| alive.contains(key));
        self.poll = poll;
    }

    pub fn history(&self, row: &Value) -> Vec<f64> {
        self.history
            .get(&(self.level as u8, self.level.key(row)))
            .map(|h| h.iter().copied().collect())
            .unwrap_or_default()
    }

    /// The rows of the current level, filtered and sorted.
    pub fn rows(&self) -> Vec<&Value> {
        let rows = match self.level {
            Level::Containers => &self.poll.containers,
            Level::Pods => &self.poll.pods,
            Level::Processes => &self.poll.processes,
        };
        let filter = self.filter.to_lowercase();
        let mut rows: Vec<&Value> = rows
            .iter()
            .filter(|row| row["exited"] != Value::Bool(true))
            .filter(|row| {
                filter.is_empty()
                    || ["container_id", "pod_uid", "comm", "cgroup_path", "workload"]
                        .iter()
                        .any(|field| {
                            row[*field]
                                .as_str()
                                .is_some_and(|v| v.to_lowercase().contains(&filter))
                        })
                    || self.level.key(row).contains(&filter)
            })
            .collect();
        let key = |row: &Value| match self.sort {
            SortBy::Power => number(row, &["power_watts", "total"]),
            SortBy::Energy => number(row, &["energy_joules", "total"]),
            SortBy::Cpu => number(row, &["cpu_cores"]),
        };
        rows.sort_by(|a, b| key(b).total_cmp(&key(a)));
        rows
    }

    pub fn next_sort(&mut self) {
        self.sort = match self.sort {
            SortBy::Power => SortBy::Energy,
            SortBy::Energy => SortBy::Cpu,
            SortBy::Cpu => SortBy::Power,
        };
    }
}

/// `▁▂▃▅▇` from values, scaled to their own maximum.
pub fn sparkline(values: &[f64], width: usize) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let start = values.len().saturating_sub(width);
    let shown = &values[start..];
    let max = shown.iter().copied().fold(0.0f64, f64::max);
    shown
        .iter()
        .map(|v| {
            if max <= 0.0 {
                BARS[0]
            } else {
                BARS[((v / max) * 7.0).round().clamp(0.0, 7.0) as usize]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn sparklines_follow_power_and_forget_gone_rows() {
        let mut state = TopState::new("http://x".into());
        for watts in [1.0, 2.0, 4.0, 8.0] {
            state.update(Poll {
                containers: vec![json!({"container_id": "a", "power_watts": {"total": watts}})],
                ..Poll::default()
            });
        }
        let row = state.poll.containers[0].clone();
        assert_eq!(state.history(&row), vec![1.0, 2.0, 4.0, 8.0]);
        assert_eq!(sparkline(&state.history(&row), 10), "▂▃▅█");
        state.update(Poll::default());
        assert!(state.history(&row).is_empty());
        // Paused: nothing moves.
        state.paused = true;
        state.update(Poll {
            containers: vec![row.clone()],
            ..Poll::default()
        });
        assert!(state.poll.containers.is_empty());
    }

    #[test]
    fn rows_are_filtered_and_sorted() {
        let mut state = TopState::new("http://x".into());
        state.update(Poll {
            containers: vec![
                json!({"container_id": "aaa", "power_watts": {"total": 1.0}, "cpu_cores": 3.0}),
                json!({"container_id": "bbb", "power_watts": {"total": 5.0}, "cpu_cores": 1.0}),
                json!({"container_id": "ccc", "power_watts": {"total": 9.0}, "exited": true}),
            ],
            ..Poll::default()
        });
        let ids = |state: &TopState| -> Vec<String> {
            state
                .rows()
                .iter()
                .map(|r| Level::Containers.key(r))
                .collect()
        };
        assert_eq!(ids(&state), vec!["bbb", "aaa"], "exited hidden, by power");
        state.next_sort();
        state.next_sort();
        assert_eq!(ids(&state), vec!["aaa", "bbb"], "by CPU");
        state.filter = "bb".into();
        assert_eq!(ids(&state), vec!["bbb"]);
    }
}
