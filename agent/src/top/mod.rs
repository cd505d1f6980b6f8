//! `powerlens top`: a live view of where the node's power goes, for the
//! person on the node. Polls the agent's API every interval; the terminal
//! is restored on quit, on Ctrl-C and on panic (ratatui's own hook).

pub mod render;
pub mod state;

use std::time::{Duration, Instant};

use clap::Args;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use serde_json::Value;

use self::state::{Level, Poll, TopState};
use crate::query::{self, Failure};

#[derive(Debug, Args)]
pub struct TopArgs {
    /// The agent's API (default: as for `powerlens query`).
    #[arg(long, env = "POWERLENS_AGENT")]
    pub agent: Option<String>,
    #[arg(long, env = "POWERLENS_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// Seconds between polls.
    #[arg(long, default_value = "1")]
    pub every: f64,
}

fn list(base: &str, path: &str) -> Result<Vec<Value>, Failure> {
    Ok(match query::get(base, path)? {
        Value::Array(items) => items,
        _ => Vec::new(),
    })
}

fn poll(base: &str) -> Result<Poll, Failure> {
    Ok(Poll {
        node: query::get(base, "/api/v1/node")?,
        containers: list(base, "/api/v1/containers?limit=100000")?,
        pods: list(base, "/api/v1/pods?limit=100000")?,
        processes: list(base, "/api/v1/processes?limit=5000")?,
    })
}

/// Runs until `q` or Ctrl-C.
pub fn run(args: &TopArgs) -> Result<(), Failure> {
    let base = query::agent_url(&query::QueryArgs {
        what: query::What::Node,
        agent: args.agent.clone(),
        config: args.config.clone(),
        json: false,
        sort: query::SortBy::Power,
        limit: None,
        all: false,
    })?;
    let every = Duration::from_secs_f64(args.every.clamp(0.1, 60.0));
    let mut state = TopState::new(base.clone());
    let mut terminal = ratatui::init();
    let mut next_poll = Instant::now();
    let result = loop {
        if Instant::now() >= next_poll {
            match poll(&base) {
                Ok(poll) => state.update(poll),
                Err(failure) => state.error = Some(failure.message),
            }
            next_poll = Instant::now() + every;
        }
        if let Err(error) = terminal.draw(|frame| render::draw(frame, &state)) {
            break Err(query_failure(error));
        }
        let wait = next_poll.saturating_duration_since(Instant::now());
        match event::poll(wait) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(error) => break Err(query_failure(error)),
        }
        let Ok(Event::Key(key)) = event::read() else {
            // A resize: the next draw follows it.
            continue;
        };
        if key.kind != KeyEventKind::Press {
            continue;
        }
        if state.editing_filter {
            match key.code {
                KeyCode::Enter => state.editing_filter = false,
                KeyCode::Esc => {
                    state.editing_filter = false;
                    state.filter.clear();
                }
                KeyCode::Backspace => {
                    state.filter.pop();
                }
                KeyCode::Char(c) => state.filter.push(c),
                _ => {}
            }
            continue;
        }
        match key.code {
            KeyCode::Char('q') => break Ok(()),
            KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => break Ok(()),
            KeyCode::Tab => state.level = state.level.next(),
            KeyCode::Char('c') => state.level = Level::Containers,
            KeyCode::Char('p') => state.level = Level::Pods,
            KeyCode::Char('r') => state.level = Level::Processes,
            KeyCode::Char('s') => state.next_sort(),
            KeyCode::Char('/') => state.editing_filter = true,
            KeyCode::Char(' ') => state.paused = !state.paused,
            _ => {}
        }
    };
    ratatui::restore();
    result
}

fn query_failure(error: std::io::Error) -> Failure {
    Failure {
        code: query::exit::API_ERROR,
        message: format!("terminal: {error}"),
    }
}
