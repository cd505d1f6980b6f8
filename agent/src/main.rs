//! The `powerlens` command.

use std::{
    io::Write as _,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Instant,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use powerlens::{
    api,
    auth::ApiToken,
    cgroup::detect_v2_root,
    collector::{Collector, energy_options, error_chain, select_source},
    config::{Config, Overrides},
    controller::{
        Controller, ControllerStatus, Observation, SharedControllerStatus,
        actuators::{
            GpuLimits, NodeActuator, NvmlLimits, SysfsActuator, find_v1_cpu_root, gpu_zones,
        },
        settings::Mode,
    },
    energy::collector::EnergyCollector,
    sinks::{
        otlp,
        prometheus::{self, MetricsOptions, MetricsState},
    },
    snapshot::{SharedSnapshot, Snapshot},
    table,
    topology::Topology,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

#[derive(Parser)]
#[command(
    name = "powerlens",
    version,
    about = "eBPF-based power observability agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure, print a table every interval and serve the JSON API.
    Run(Box<Overrides>),
    /// Ask the running agent: how many joules, how many watts.
    #[command(after_help = powerlens::query::EXIT_CODES_HELP)]
    Query(powerlens::query::QueryArgs),
    /// A live view of where the node's power goes (q quits).
    Top(powerlens::top::TopArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Run(overrides) => run(&overrides),
        Command::Top(args) => powerlens::top::run(&args).map_err(|failure| {
            eprintln!("powerlens top: {}", failure.message);
            std::process::exit(failure.code)
        }),
        Command::Query(args) => match powerlens::query::run(&args) {
            Ok(text) => {
                let mut stdout = std::io::stdout().lock();
                let _ = stdout.write_all(text.as_bytes());
                let _ = stdout.flush();
                Ok(())
            }
            Err(failure) => {
                eprintln!("powerlens query: {}", failure.message);
                std::process::exit(failure.code);
            }
        },
    }
}

fn run(overrides: &Overrides) -> anyhow::Result<()> {
    let config = Config::load(overrides)?;
    // Checked before anything starts: a bad OTLP setting is a clear error,
    // not a silent lack of data.
    let otlp_settings = otlp::resolve(&config.otlp, overrides.otlp_endpoint.as_deref(), &|name| {
        std::env::var(name).ok()
    })?;
    let topology = Topology::read(&config.sysfs_root).context("reading CPU topology")?;
    if topology.has_socket_overflow() {
        warn!(
            "this machine has more than {} sockets; the last ones share one slot",
            agent_common::MAX_SOCKETS
        );
    }
    let cgroup_root = match &config.cgroup_root {
        Some(root) => root.clone(),
        None => detect_v2_root(&config.procfs_root).context("finding the cgroup v2 hierarchy")?,
    };
    info!(cgroup_root = %cgroup_root.display(), cpus = topology.online_cpus().len(), sockets = topology.sockets(), "starting");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let token = match (std::env::var("POWERLENS_API_TOKEN"), &config.api_token_file) {
        (Ok(text), _) => Some(ApiToken::from_text(&text, "POWERLENS_API_TOKEN")?),
        (Err(_), Some(path)) => Some(ApiToken::from_file(path)?),
        (Err(_), None) => None,
    };
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(config.listen))
        .with_context(|| format!("binding the API to `listen` = {}", config.listen))?;
    info!(token = token.is_some(), "API on http://{}", config.listen);
    let exposed = |address: std::net::SocketAddr| !address.ip().is_loopback();
    if token.is_none() && exposed(config.listen) {
        warn!(
            "the API listens on {} without a token: anyone who reaches it sees every tenant's process names and cgroup paths; set api_token_file or POWERLENS_API_TOKEN, or listen on 127.0.0.1",
            config.listen
        );
    }
    if token.is_none() && config.metrics_listen.is_some_and(exposed) {
        info!(
            "/metrics listens on {} without a token: container ids and their energy are visible to whoever reaches it",
            config
                .metrics_listen
                .map_or_else(String::new, |a| a.to_string())
        );
    }

    // The controller comes up before anything else is set up: a previous
    // run that was killed may have left limits, and they go back first.
    let mut controller = start_controller(&config, &cgroup_root)?;
    let (source, sources) = select_source(&config, &topology, &cgroup_root)
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    let energy =
        EnergyCollector::new(&energy_options(&config)).context("setting up the energy sources")?;
    let shared = SharedSnapshot::new(Snapshot::empty(source.method(), config.interval));
    let mut collector = Collector::new(
        source,
        sources,
        cgroup_root,
        topology,
        &config,
        energy,
        shared.clone(),
    );
    info!(method = %collector.method(), "measuring CPU time every {}", humantime::format_duration(config.interval));

    let shutdown = CancellationToken::new();
    runtime.spawn(wait_for_signal(shutdown.clone()));
    let controller_status: SharedControllerStatus = Arc::new(RwLock::new(ControllerStatus::off()));
    let state = MetricsState {
        shared: shared.clone(),
        options: MetricsOptions {
            processes: config.export_processes,
        },
        token,
        controller: Arc::clone(&controller_status),
    };
    let server = runtime.spawn(api::serve(listener, state.clone(), shutdown.clone()));
    let metrics_server = match config.metrics_listen {
        None => None,
        Some(address) => {
            let listener = runtime
                .block_on(tokio::net::TcpListener::bind(address))
                .with_context(|| format!("binding /metrics to `metrics_listen` = {address}"))?;
            info!("/metrics also on http://{address}/metrics");
            Some(runtime.spawn(prometheus::serve(listener, state, shutdown.clone())))
        }
    };
    let otlp = match otlp_settings {
        None => {
            info!(
                "OTLP export off (no endpoint in the config, flags or OTEL_EXPORTER_OTLP_ENDPOINT)"
            );
            None
        }
        Some(settings) => Some(
            otlp::start(
                &settings,
                &shared,
                config.export_processes,
                controller.is_some().then(|| Arc::clone(&controller_status)),
                runtime.handle(),
            )
            .context("starting the OTLP export")?,
        ),
    };

    let mut next = Instant::now() + config.interval;
    // With intervals longer than a counter takes to wrap twice, the
    // counters are sampled in between.
    let sample_every = collector.counter_sample_period();
    if let Some(period) = sample_every {
        info!(
            "energy counters sampled every {} between intervals (they could wrap twice in one)",
            humantime::format_duration(period)
        );
    }
    let mut next_sample = sample_every.map(|period| Instant::now() + period);
    // Busy CPUs' switch logs are drained between intervals at the pace the
    // source asks for (none on a quiet node).
    let mut next_drain = collector
        .drain_period()
        .map(|period| Instant::now() + period);
    while !shutdown.is_cancelled() {
        let wake = [next_sample, next_drain]
            .into_iter()
            .flatten()
            .fold(next, Instant::min);
        let deadline = tokio::time::Instant::from_std(wake);
        let stop = runtime.block_on(async {
            tokio::select! {
                () = shutdown.cancelled() => true,
                () = tokio::time::sleep_until(deadline) => false,
            }
        });
        if stop {
            break;
        }
        if wake < next {
            if next_sample.is_some_and(|at| at <= wake) {
                collector.sample_counters();
                next_sample = sample_every.map(|period| Instant::now() + period);
            }
            if next_drain.is_some_and(|at| at <= wake) {
                collector.drain();
                next_drain = collector
                    .drain_period()
                    .map(|period| Instant::now() + period);
            }
            continue;
        }
        collector.tick();
        next_sample = sample_every.map(|period| Instant::now() + period);
        next_drain = collector
            .drain_period()
            .map(|period| Instant::now() + period);
        if let Some(controller) = &mut controller {
            if controller.has_policy() {
                let figures = shared.latest().figures();
                controller.step(&Observation::from_figures(&figures));
            }
            let status = controller.status();
            match controller_status.write() {
                Ok(mut shared_status) => *shared_status = status,
                Err(poisoned) => *poisoned.into_inner() = status,
            }
        }
        next += config.interval;
        // After a long stall (suspended VM, debugger) do not run a burst of
        // catch-up intervals.
        if next < Instant::now() {
            next = Instant::now() + config.interval;
        }
        if config.table {
            let text = table::render(&shared.latest(), config.table_rows);
            let mut stdout = std::io::stdout().lock();
            // A closed stdout (piped to `head`) must not stop the agent.
            let _ = writeln!(stdout, "{text}");
            let _ = stdout.flush();
        }
    }
    info!("shutting down");
    if let Some(controller) = &mut controller {
        controller.restore_all("agent stopping");
    }
    if let Some(otlp) = otlp {
        // The provider's shutdown blocks on a last export: off the runtime.
        otlp.shutdown();
    }
    runtime
        .block_on(server)
        .context("API task")?
        .context("API server")?;
    if let Some(metrics_server) = metrics_server {
        runtime
            .block_on(metrics_server)
            .context("/metrics task")?
            .context("/metrics server")?;
    }
    Ok(())
}

/// The power-cap controller, unless its mode is `off`.
fn start_controller(
    config: &Config,
    cgroup_root: &std::path::Path,
) -> anyhow::Result<Option<Controller>> {
    let settings = config.controller.clone();
    if settings.mode == Mode::Off {
        return Ok(None);
    }
    let powercap_root = config
        .powercap_root
        .clone()
        .unwrap_or_else(|| PathBuf::from(powerlens::config::DEFAULT_POWERCAP_ROOT));
    let files = SysfsActuator::new(
        powercap_root,
        cgroup_root.to_owned(),
        find_v1_cpu_root(&config.procfs_root),
    );
    let mut zones = files.package_zones();
    let packages = zones.len();
    // GPU limits through NVML, when there is an NVIDIA driver.
    let gpus: Option<Box<dyn GpuLimits>> = if config.gpu {
        NvmlLimits::load().map(|nvml| Box::new(nvml) as Box<dyn GpuLimits>)
    } else {
        None
    };
    if let Some(gpus) = &gpus {
        zones.extend(gpu_zones(gpus.as_ref()));
    }
    let actuator = NodeActuator { files, gpus };
    // A budget no setting of the levers can reach is a mistake: say so.
    let hardware_minimum: f64 = zones.iter().filter_map(|zone| zone.min_watts).sum();
    if let Some(budget) = settings.budget_watts
        && settings.mode != Mode::Off
        && budget < hardware_minimum
    {
        anyhow::bail!(
            "invalid `controller.budget_watts`: {budget} W is below the hardware's minimum of {hardware_minimum} W (the sum of the package and GPU minimum power limits)"
        );
    }
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    info!(
        mode = settings.mode.as_str(),
        budget_watts = settings.budget_watts,
        rapl_packages = packages,
        gpus = zones.len() - packages,
        state_file = %settings.state_file.display(),
        "power-cap controller"
    );
    let controller = Controller::new(settings, Box::new(actuator), zones, cpus)
        .context("starting the power-cap controller")?;
    Ok(Some(controller))
}

async fn wait_for_signal(shutdown: CancellationToken) {
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(e) => {
                warn!("cannot listen for SIGTERM: {e}");
                let _ = tokio::signal::ctrl_c().await;
                shutdown.cancel();
                return;
            }
        };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    shutdown.cancel();
}
