//! `powerlens query`: the running agent's figures from a shell, as tables
//! or (`--json`) as the API's own objects.

pub mod format;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Subcommand, ValueEnum};
use serde_json::Value;

use self::format::{energy, number, power, short, table, text};

/// Exit codes, one per kind of failure (also in `--help`).
pub mod exit {
    pub const OK: i32 = 0;
    /// A malformed flag or argument (clap's own code).
    pub const USAGE: i32 = 2;
    pub const AGENT_UNREACHABLE: i32 = 3;
    pub const NOT_FOUND: i32 = 4;
    pub const AMBIGUOUS: i32 = 5;
    pub const UNAUTHORIZED: i32 = 6;
    pub const API_ERROR: i32 = 7;
}

pub const EXIT_CODES_HELP: &str = "Exit codes: 0 ok; 2 malformed flag or argument; 3 the agent cannot be reached; 4 unknown id; 5 ambiguous id prefix (the candidates are listed); 6 the agent asks for a token (POWERLENS_API_TOKEN); 7 any other error from the agent.";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SortBy {
    Power,
    Energy,
    Cpu,
}

#[derive(Debug, Args)]
pub struct QueryArgs {
    #[command(subcommand)]
    pub what: What,
    /// The agent's API (default: `listen` from the same config file and
    /// variables as `powerlens run`, else http://127.0.0.1:9876).
    #[arg(long, env = "POWERLENS_AGENT", global = true)]
    pub agent: Option<String>,
    /// The config file `powerlens run` uses (for its `listen`).
    #[arg(long, env = "POWERLENS_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Print the API's objects unchanged, for scripts and jq.
    #[arg(long, global = true)]
    pub json: bool,
    #[arg(long, value_enum, default_value = "power", global = true)]
    pub sort: SortBy,
    /// At most this many rows.
    #[arg(long, global = true)]
    pub limit: Option<usize>,
    /// Include exited containers and processes.
    #[arg(long, global = true)]
    pub all: bool,
}

#[derive(Debug, Subcommand)]
pub enum What {
    /// The node: power and energy by domain, measured, attributed, idle, unattributed.
    Node,
    /// Every container.
    Containers,
    /// Every pod.
    Pods,
    /// Processes, of one container with --container.
    Processes {
        #[arg(long)]
        container: Option<String>,
    },
    /// One container, by id or a unique prefix of 12 or more characters.
    Container { id: String },
    /// One pod, by UID or a unique prefix.
    Pod { uid: String },
}

/// Why a query failed, mapped to an exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

fn failure(code: i32, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

/// The agent's base URL: the flag or POWERLENS_AGENT, else `listen` from
/// the config (POWERLENS_LISTEN beats the file), else the default.
pub fn agent_url(args: &QueryArgs) -> Result<String, Failure> {
    if let Some(url) = &args.agent {
        return Ok(url.trim_end_matches('/').to_owned());
    }
    let mut listen: SocketAddr = crate::config::Config::default().listen;
    if let Some(path) = &args.config {
        let text = std::fs::read_to_string(path).map_err(|e| {
            failure(
                exit::USAGE,
                format!("reading the config file {}: {e}", path.display()),
            )
        })?;
        let config = crate::config::Config::from_toml(&text, path)
            .map_err(|e| failure(exit::USAGE, e.to_string()))?;
        listen = config.listen;
    }
    if let Ok(text) = std::env::var("POWERLENS_LISTEN") {
        listen = text.parse().map_err(|_| {
            failure(
                exit::USAGE,
                format!("POWERLENS_LISTEN: {text:?} is not an address"),
            )
        })?;
    }
    let host = if listen.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        listen.ip().to_string()
    };
    Ok(format!("http://{host}:{}", listen.port()))
}

/// GETs `path` from the agent and returns its JSON, or the failure.
pub fn get(base: &str, path: &str) -> Result<Value, Failure> {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| failure(exit::API_ERROR, e.to_string()))?;
    let mut request = client.get(format!("{base}{path}"));
    if let Ok(token) = std::env::var("POWERLENS_API_TOKEN") {
        request = request.bearer_auth(token.trim());
    }
    let response = request.send().map_err(|e| {
        failure(
            exit::AGENT_UNREACHABLE,
            format!("no powerlens agent answers at {base}: {}", root_cause(&e)),
        )
    })?;
    let status = response.status().as_u16();
    let body_text = response
        .text()
        .map_err(|e| failure(exit::API_ERROR, format!("{base}{path}: {e}")))?;
    let body: Value = serde_json::from_str(&body_text)
        .map_err(|e| failure(exit::API_ERROR, format!("{base}{path}: not JSON: {e}")))?;
    let message = || body["error"].as_str().unwrap_or("").to_owned();
    match status {
        200 => Ok(body),
        404 => Err(failure(exit::NOT_FOUND, message())),
        409 => {
            let candidates: Vec<String> = body["candidates"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c.as_str().map(str::to_owned))
                .collect();
            Err(failure(
                exit::AMBIGUOUS,
                format!("{} (candidates: {})", message(), candidates.join(", ")),
            ))
        }
        401 => Err(failure(
            exit::UNAUTHORIZED,
            "the agent asks for a token: set POWERLENS_API_TOKEN",
        )),
        _ => Err(failure(exit::API_ERROR, format!("{status}: {}", message()))),
    }
}

fn root_cause(error: &dyn std::error::Error) -> String {
    let mut cause = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// Runs a query and returns what to print.
pub fn run(args: &QueryArgs) -> Result<String, Failure> {
    let base = agent_url(args)?;
    let path = match &args.what {
        What::Node => "/api/v1/node".to_owned(),
        What::Containers => "/api/v1/containers?limit=1000000".to_owned(),
        What::Pods => "/api/v1/pods?limit=1000000".to_owned(),
        What::Processes { container } => match container {
            Some(id) => format!("/api/v1/processes?limit=1000000&container={id}"),
            None => "/api/v1/processes?limit=1000000".to_owned(),
        },
        What::Container { id } => format!("/api/v1/containers/{id}"),
        What::Pod { .. } => "/api/v1/pods?limit=1000000".to_owned(),
    };
    let body = get(&base, &path)?;
    let body = match &args.what {
        What::Pod { uid } => pick_pod(&body, uid)?,
        _ => body,
    };
    if args.json {
        let body = match (&args.what, body) {
            (What::Containers | What::Pods | What::Processes { .. }, Value::Array(items)) => {
                Value::Array(select(items, args))
            }
            (_, body) => body,
        };
        return Ok(serde_json::to_string_pretty(&body).unwrap_or_default() + "\n");
    }
    Ok(match &args.what {
        What::Node => node_text(&body),
        What::Containers => containers_text(&select(as_list(body), args)),
        What::Pods => pods_text(&select(as_list(body), args)),
        What::Processes { .. } => processes_text(&select(as_list(body), args)),
        What::Container { .. } => container_text(&body),
        What::Pod { .. } => pod_text(&body),
    })
}

fn as_list(body: Value) -> Vec<Value> {
    match body {
        Value::Array(items) => items,
        _ => Vec::new(),
    }
}

/// A pod by UID or unique prefix, from the pod list.
fn pick_pod(list: &Value, uid: &str) -> Result<Value, Failure> {
    let matches: Vec<&Value> = list
        .as_array()
        .into_iter()
        .flatten()
        .filter(|pod| text(pod, "pod_uid").starts_with(uid))
        .collect();
    match matches.as_slice() {
        [] => Err(failure(exit::NOT_FOUND, format!("no pod {uid:?}"))),
        [one] => Ok((*one).clone()),
        many if many.iter().any(|pod| text(pod, "pod_uid") == uid) => Ok(many
            .iter()
            .find(|pod| text(pod, "pod_uid") == uid)
            .map(|pod| (*pod).clone())
            .unwrap_or_default()),
        many => Err(failure(
            exit::AMBIGUOUS,
            format!(
                "pod prefix {uid:?} matches {} pods (candidates: {})",
                many.len(),
                many.iter()
                    .map(|p| text(p, "pod_uid"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// Hides exited entries (unless --all), sorts, and keeps --limit rows.
fn select(mut items: Vec<Value>, args: &QueryArgs) -> Vec<Value> {
    if !args.all {
        items.retain(|item| item["exited"] != Value::Bool(true));
    }
    let key = |item: &Value| match args.sort {
        SortBy::Power => number(item, &["power_watts", "total"]),
        SortBy::Energy => number(item, &["energy_joules", "total"]),
        SortBy::Cpu => number(item, &["cpu_seconds"]),
    };
    items.sort_by(|a, b| key(b).total_cmp(&key(a)));
    if let Some(limit) = args.limit {
        items.truncate(limit);
    }
    items
}

fn estimated(item: &Value) -> (bool, Option<f64>) {
    (
        item["estimated"] == Value::Bool(true),
        item["relative_uncertainty"].as_f64(),
    )
}

fn power_of(item: &Value) -> String {
    let (estimated, uncertainty) = estimated(item);
    power(
        number(item, &["power_watts", "total"]),
        estimated,
        uncertainty,
    )
}

fn containers_text(items: &[Value]) -> String {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|c| {
            vec![
                short(text(c, "container_id"), 12),
                short(c["pod_uid"].as_str().unwrap_or("-"), 8),
                c["pod_qos"].as_str().unwrap_or("-").to_owned(),
                text(c, "runtime").to_owned(),
                power_of(c),
                energy(number(c, &["energy_joules", "total"])),
                format!("{:.2}", number(c, &["cpu_cores"])),
                format!("{:.1} s", number(c, &["cpu_seconds"])),
                if c["exited"] == Value::Bool(true) {
                    "exited"
                } else {
                    "running"
                }
                .to_owned(),
            ]
        })
        .collect();
    table(
        &[
            "CONTAINER",
            "POD",
            "QOS",
            "RUNTIME",
            "POWER",
            "ENERGY",
            "CPUS",
            "CPU TIME",
            "STATE",
        ],
        &rows,
    )
}

fn pods_text(items: &[Value]) -> String {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|p| {
            vec![
                text(p, "pod_uid").to_owned(),
                text(p, "pod_qos").to_owned(),
                p["containers"].as_array().map_or(0, Vec::len).to_string(),
                power_of(p),
                energy(number(p, &["energy_joules", "total"])),
                format!("{:.2}", number(p, &["cpu_cores"])),
            ]
        })
        .collect();
    table(
        &["POD", "QOS", "CONTAINERS", "POWER", "ENERGY", "CPUS"],
        &rows,
    )
}

fn processes_text(items: &[Value]) -> String {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|p| {
            vec![
                number(p, &["pid"]).to_string(),
                text(p, "comm").to_owned(),
                short(p["container_id"].as_str().unwrap_or("-"), 12),
                power_of(p),
                energy(number(p, &["energy_joules", "total"])),
                format!("{:.2}", number(p, &["cpu_cores"])),
                format!("{:.1} s", number(p, &["cpu_seconds"])),
            ]
        })
        .collect();
    table(
        &[
            "PID",
            "COMMAND",
            "CONTAINER",
            "POWER",
            "ENERGY",
            "CPUS",
            "CPU TIME",
        ],
        &rows,
    )
}

fn container_text(c: &Value) -> String {
    let mut out = String::new();
    let line = |out: &mut String, key: &str, value: String| {
        out.push_str(&format!("{key:<14}{value}\n"));
    };
    line(&mut out, "container", text(c, "container_id").to_owned());
    line(&mut out, "runtime", text(c, "runtime").to_owned());
    line(
        &mut out,
        "pod",
        c["pod_uid"].as_str().unwrap_or("-").to_owned(),
    );
    line(
        &mut out,
        "qos",
        c["pod_qos"].as_str().unwrap_or("-").to_owned(),
    );
    line(
        &mut out,
        "cgroup",
        c["cgroup_path"].as_str().unwrap_or("-").to_owned(),
    );
    line(&mut out, "power", power_of(c));
    line(
        &mut out,
        "energy",
        energy(number(c, &["energy_joules", "total"])),
    );
    line(
        &mut out,
        "cpu",
        format!(
            "{:.2} CPUs now, {:.1} s in all ({})",
            number(c, &["cpu_cores"]),
            number(c, &["cpu_seconds"]),
            text(c, "method")
        ),
    );
    line(
        &mut out,
        "state",
        if c["exited"] == Value::Bool(true) {
            "exited"
        } else {
            "running"
        }
        .to_owned(),
    );
    out
}

fn pod_text(p: &Value) -> String {
    let mut out = format!(
        "pod           {}\nqos           {}\npower         {}\nenergy        {}\ncpu           {:.2} CPUs\ncontainers\n",
        text(p, "pod_uid"),
        text(p, "pod_qos"),
        power_of(p),
        energy(number(p, &["energy_joules", "total"])),
        number(p, &["cpu_cores"]),
    );
    for id in p["containers"].as_array().into_iter().flatten() {
        out.push_str(&format!("  {}\n", id.as_str().unwrap_or("")));
    }
    out
}

fn node_text(n: &Value) -> String {
    let books = &n["power_watts"];
    let estimated = n["estimated"] == Value::Bool(true);
    let mut rows = Vec::new();
    for domain in ["package", "core", "uncore", "dram", "psys", "gpu"] {
        let measured = number(books, &["measured", domain]);
        if measured.is_nan() {
            continue;
        }
        let uncertainty = number(books, &["uncertainty", domain]);
        let measured_text = if estimated && uncertainty.is_finite() && measured > 0.0 {
            format!("~{measured:.1} W ±{:.0}%", 100.0 * uncertainty / measured)
        } else {
            power(measured, estimated, None)
        };
        rows.push(vec![
            domain.to_owned(),
            measured_text,
            power(number(books, &["attributed", domain]), false, None),
            power(number(books, &["idle", domain]), false, None),
            power(number(books, &["unattributed", domain]), false, None),
            energy(number(n, &["energy_joules", "measured", domain])),
            n["energy_method"][domain]
                .as_str()
                .unwrap_or("-")
                .to_owned(),
        ]);
    }
    let mut out = format!(
        "node: CPU {:.0}% busy, method {}{}\n",
        100.0 * number(n, &["cpu_utilization"]),
        text(n, "method"),
        if estimated {
            " (energy estimated by the model)"
        } else {
            ""
        }
    );
    out.push_str(&table(
        &[
            "DOMAIN",
            "MEASURED",
            "ATTRIBUTED",
            "IDLE",
            "UNATTRIBUTED",
            "ENERGY",
            "SOURCE",
        ],
        &rows,
    ));
    for temperature in n["temperatures"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "temperature {} {}: {:.1} °C\n",
            text(temperature, "sensor"),
            temperature["label"].as_str().unwrap_or(""),
            number(temperature, &["celsius"])
        ));
    }
    for source in n["sources"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "source {}: {}{}\n",
            text(source, "name"),
            text(source, "status"),
            source["reason"]
                .as_str()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        ));
    }
    out
}
