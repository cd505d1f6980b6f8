//! The `powerlens` command.

use std::{io::Write as _, time::Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use powerlens::{
    api,
    cgroup::detect_v2_root,
    collector::{Collector, energy_options, error_chain, select_source},
    config::{Config, Overrides},
    energy::collector::EnergyCollector,
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
    Run(Overrides),
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
    }
}

fn run(overrides: &Overrides) -> anyhow::Result<()> {
    let config = Config::load(overrides)?;
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
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(config.listen))
        .with_context(|| format!("binding the API to `listen` = {}", config.listen))?;
    info!("API on http://{}", config.listen);

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
    let server = runtime.spawn(api::serve(listener, shared.clone(), shutdown.clone()));

    let mut next = Instant::now() + config.interval;
    while !shutdown.is_cancelled() {
        let deadline = tokio::time::Instant::from_std(next);
        let stop = runtime.block_on(async {
            tokio::select! {
                () = shutdown.cancelled() => true,
                () = tokio::time::sleep_until(deadline) => false,
            }
        });
        if stop {
            break;
        }
        collector.tick();
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
    runtime
        .block_on(server)
        .context("API task")?
        .context("API server")?;
    Ok(())
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
