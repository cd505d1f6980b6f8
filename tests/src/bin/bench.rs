//! `cargo xtask bench`: the agent's costs, measured in one run, printed as
//! ratios against their goals.
//!
//! 1. Kernel cost per context switch: powerlens's `sched_switch` program
//!    against an empty `tp_btf/sched_switch` program attached at the same
//!    time, from the kernel's BPF run-time statistics, under two loads: a
//!    pipe ping-pong (hot caches) and 4,000 processes that each wake once a
//!    second for 50 us (cold caches: every switch is another thread's).
//!    Goal: at most 1.5x the empty program under both.
//! 2. The agent's CPU time per interval (user + system, which includes the
//!    kernel work of its reads) and its peak RSS, with the whole load set up
//!    before and measured over 20 s:
//!    - 10,000 processes in 1,000 cgroups, each waking every second:
//!      5 ms per 1 s interval, 32 MiB;
//!    - the same, 1% of them running in an interval (each every 100 s):
//!      1 ms per interval;
//!    - 100,000 threads (1,000 processes x 100 in 100 cgroups), each waking
//!      every 100 s: 3 ms per interval, 64 MiB;
//!    - 1,000 processes waking every second, read every 100 ms: 1% of one
//!      CPU.
//! 3. What export adds: 10,000 processes waking every 10 s with OTLP
//!    pushed every second (container level, to a real gRPC receiver in this
//!    process) and `/metrics` scraped every second, against the same load
//!    without export. Goals: 1 ms of CPU per interval and 8 MiB of peak RSS;
//!    the time to render one `/metrics` and its size are printed.
//!
//! `powerlens-bench --agent 1,2` runs only those agent loads (numbered as
//! listed in 2., from 1), for profiling one; `--switch-only` only 1.
//!
//! `powerlens-bench --churn MINUTES` (`cargo xtask bench -- --churn 30`)
//! runs only the memory churn test instead: containers (cgroups) and
//! short-lived processes created and removed continuously, the agent's RSS
//! sampled every 30 s. Goal: flat once the retention (15 min) is full — the
//! last quarter of a 30-minute run within 10% of the third quarter.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use agent_common::names;
use anyhow::{Context as _, bail};
use aya::{
    Btf, Ebpf,
    programs::{BtfTracePoint, Program},
    sys::{Stats, enable_stats},
};
use integration_tests::{
    Agent, ChildGuard, TestCgroup,
    otlp::{Receiver, Transport},
    random_hex, spawn_in, workload_binary,
};
use powerlens::{
    cpu::CpuTimeSource as _,
    ebpf::{EbpfCpuSource, EbpfOptions},
    topology::Topology,
};

const SWITCH_GOAL_RATIO: f64 = 1.5;
const EXPORT_CPU_GOAL_MS: f64 = 1.0;
const EXPORT_RSS_GOAL_MIB: f64 = 8.0;

/// One load for the agent, and its goals.
#[derive(Clone, Copy)]
struct Scenario {
    label: &'static str,
    processes: usize,
    threads_per_process: usize,
    cgroups: usize,
    period_ms: u64,
    interval_ms: u64,
    export: bool,
    /// Goals: CPU per interval (ms) and peak RSS (MiB), when set.
    cpu_goal_ms: Option<f64>,
    rss_goal_mib: Option<f64>,
}

impl Scenario {
    fn quick(mut self) -> Self {
        self.processes /= 10;
        self.cgroups = (self.cgroups / 10).max(1);
        self
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(minutes) = args
        .iter()
        .position(|a| a == "--churn")
        .and_then(|i| args.get(i + 1))
    {
        let minutes: u64 = minutes.parse().context("--churn MINUTES")?;
        return bench_churn(minutes);
    }
    let quick = args.iter().any(|a| a == "--quick");
    // `--agent 1,2`: only those agent loads (numbered from 1 as printed),
    // no switch path and no table of goals; for profiling one load.
    let only_agent: Option<Vec<usize>> = args
        .iter()
        .position(|a| a == "--agent")
        .and_then(|i| args.get(i + 1))
        .map(|list| {
            list.split(',')
                .map(|n| n.trim().parse::<usize>().context("--agent N[,N...]"))
                .collect::<anyhow::Result<_>>()
        })
        .transpose()?;
    let switch_seconds = if quick { 3 } else { 10 };
    let measure_seconds = if quick { 5 } else { 20 };

    println!("powerlens benchmarks (kernel {})", kernel_release());
    if let Some(only) = only_agent {
        let scenarios = agent_scenarios();
        let raised = raise_pid_max(4_194_304)?;
        for number in only {
            let scenario = scenarios
                .get(number.wrapping_sub(1))
                .with_context(|| format!("--agent {number}: loads are 1..={}", scenarios.len()))?;
            let scenario = if quick { scenario.quick() } else { *scenario };
            let agent = bench_agent(&scenario, measure_seconds)?;
            println!(
                "{}: {:.2} ms per interval ({:.2} user, {:.2} system), {:.0} records, peak RSS {:.1} MiB",
                scenario.label,
                agent.cpu_ms_per_interval,
                agent.user_ms_per_interval,
                agent.system_ms_per_interval,
                agent.visited_per_interval,
                agent.peak_rss_mib
            );
        }
        drop(raised);
        return Ok(());
    }
    let hot = bench_switch_path(switch_seconds, SwitchLoad::PingPong)?;
    let cold = bench_switch_path(
        switch_seconds,
        SwitchLoad::Sleepers(if quick { 400 } else { 4_000 }),
    )?;
    if args.iter().any(|a| a == "--switch-only") {
        for (name, switch) in [("ping-pong", &hot), ("sleepers", &cold)] {
            println!(
                "{name}: powerlens {:.0} ns, empty {:.0} ns: {:.2}x at {:.0} switches/s",
                switch.ours_ns,
                switch.empty_ns,
                switch.ours_ns / switch.empty_ns,
                switch.switches_per_second
            );
        }
        return Ok(());
    }
    let mut scenarios = agent_scenarios();
    if quick {
        scenarios = scenarios.into_iter().map(Scenario::quick).collect();
    }
    let raised = raise_pid_max(4_194_304)?;
    let mut results = Vec::new();
    for scenario in &scenarios {
        results.push(bench_agent(scenario, measure_seconds)?);
    }
    drop(raised);

    println!();
    println!(
        "{:<62} {:>12} {:>10} {:>8}",
        "figure", "measured", "goal", "ratio"
    );
    let row = |name: &str, measured: f64, unit: &str, goal: f64| {
        println!(
            "{:<62} {:>9.2} {:<2} {:>7.1} {:<2} {:>7.2}{}",
            name,
            measured,
            unit,
            goal,
            unit,
            measured / goal,
            if measured <= goal { "" } else { "  OVER GOAL" }
        );
    };
    for (name, switch) in [
        ("ping-pong (hot caches)", &hot),
        ("sleepers (cold caches)", &cold),
    ] {
        println!(
            "switch path under {name}, {:.0} switches/s:",
            switch.switches_per_second
        );
        println!(
            "{:<62} {:>9.0} ns   powerlens {:.0} ns",
            "  empty tp_btf/sched_switch, per switch", switch.empty_ns, switch.ours_ns
        );
        row(
            "  powerlens / empty program, per switch (x)",
            switch.ours_ns / switch.empty_ns,
            "x",
            SWITCH_GOAL_RATIO,
        );
    }
    for (scenario, agent) in scenarios.iter().zip(&results) {
        println!("agent, {}:", scenario.label);
        let cpu = format!(
            "  CPU per {} ms interval (user + system)",
            scenario.interval_ms
        );
        match scenario.cpu_goal_ms {
            Some(goal) => row(&cpu, agent.cpu_ms_per_interval, "ms", goal),
            None => println!("{cpu:<62} {:>9.2} ms", agent.cpu_ms_per_interval),
        }
        println!(
            "{:<62} {:>9.2} ms user, {:.2} ms system (clock ticks)",
            "    of which", agent.user_ms_per_interval, agent.system_ms_per_interval
        );
        println!(
            "{:<62} {:>9.0}      (switch logs, running CPUs and overflow)",
            "    records read per interval", agent.visited_per_interval
        );
        match scenario.rss_goal_mib {
            Some(goal) => row("  peak RSS", agent.peak_rss_mib, "Mi", goal),
            None => println!("{:<62} {:>9.2} Mi", "  peak RSS", agent.peak_rss_mib),
        }
        println!(
            "{:<62} {:>9}      (live processes the agent tracked)",
            "  processes seen", agent.live_processes
        );
    }
    let baseline = &results[results.len() - 2];
    let exporting = &results[results.len() - 1];
    println!("export:");
    row(
        "  extra CPU per 1 s interval over no export",
        exporting.cpu_ms_per_interval - baseline.cpu_ms_per_interval,
        "ms",
        EXPORT_CPU_GOAL_MS,
    );
    row(
        "  extra peak RSS over no export",
        exporting.peak_rss_mib - baseline.peak_rss_mib,
        "Mi",
        EXPORT_RSS_GOAL_MIB,
    );
    println!(
        "{:<62} {:>9.2} ms   (agent's own time to render, the last of {} scrapes)",
        "  one /metrics render", exporting.render_ms, exporting.scrapes
    );
    println!(
        "{:<62} {:>9.0} KiB  (Prometheus text)",
        "  one /metrics size",
        exporting.scrape_bytes as f64 / 1024.0
    );
    println!(
        "{:<62} {:>9}      (OTLP data points received, {} exports)",
        "  OTLP points per export", exporting.points_per_export, exporting.exports
    );
    Ok(())
}

/// The agent loads, in the order they are printed.
fn agent_scenarios() -> Vec<Scenario> {
    let base = Scenario {
        label: "",
        processes: 10_000,
        threads_per_process: 1,
        cgroups: 1_000,
        period_ms: 1_000,
        interval_ms: 1_000,
        export: false,
        cpu_goal_ms: None,
        rss_goal_mib: None,
    };
    vec![
        Scenario {
            label: "10,000 processes in 1,000 cgroups, each waking every 1 s",
            cpu_goal_ms: Some(5.0),
            rss_goal_mib: Some(32.0),
            ..base
        },
        Scenario {
            label: "10,000 processes, 1% run per interval (each every 100 s)",
            period_ms: 100_000,
            cpu_goal_ms: Some(1.0),
            ..base
        },
        Scenario {
            label: "100,000 threads (1,000 x 100), each waking every 100 s",
            processes: 1_000,
            threads_per_process: 100,
            cgroups: 100,
            period_ms: 100_000,
            cpu_goal_ms: Some(3.0),
            rss_goal_mib: Some(64.0),
            ..base
        },
        Scenario {
            label: "1,000 processes each waking every 1 s, 100 ms interval",
            processes: 1_000,
            cgroups: 100,
            interval_ms: 100,
            // 1% of one CPU = 1 ms per 100 ms interval.
            cpu_goal_ms: Some(1.0),
            ..base
        },
        Scenario {
            label: "10,000 processes each waking every 10 s (export baseline)",
            period_ms: 10_000,
            ..base
        },
        Scenario {
            label: "the same, OTLP every 1 s + a scrape every 1 s",
            period_ms: 10_000,
            export: true,
            ..base
        },
    ]
}

/// Sets `kernel.pid_max` to at least `wanted` (100,000 threads need more
/// than the 32,768 of many machines); the old value comes back on drop.
fn raise_pid_max(wanted: u64) -> anyhow::Result<PidMaxGuard> {
    let path = "/proc/sys/kernel/pid_max";
    let old: u64 = std::fs::read_to_string(path)?.trim().parse()?;
    if old < wanted {
        std::fs::write(path, wanted.to_string()).context("raising kernel.pid_max")?;
    }
    Ok(PidMaxGuard { old })
}

struct PidMaxGuard {
    old: u64,
}

impl Drop for PidMaxGuard {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/kernel/pid_max", self.old.to_string());
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}

struct SwitchResult {
    empty_ns: f64,
    ours_ns: f64,
    switches_per_second: f64,
}

fn run_stats(program: &Program) -> anyhow::Result<(u64, u64)> {
    let info = program.info().context("program info")?;
    Ok((info.run_time().as_nanos() as u64, info.run_count()))
}

enum SwitchLoad {
    /// Two threads passing a byte through pipes: hot caches.
    PingPong,
    /// This many processes waking once a second for 50 us: every switch is
    /// another thread's, with cold lines.
    Sleepers(usize),
}

fn bench_switch_path(seconds: u64, load: SwitchLoad) -> anyhow::Result<SwitchResult> {
    // Keep the fd: statistics stay on while it is open.
    let _stats = enable_stats(Stats::RunTime).context("enabling BPF run-time statistics")?;
    let topology = Topology::read(Path::new("/sys"))?;
    let btf = Btf::from_sys_fs()?;
    // One empty program attached before powerlens's and one after: the
    // trampoline runs them in that order, and the first pays for warming
    // what they all touch (5-10 ns here). powerlens is compared with the
    // one after it, which runs in the same conditions; both are printed.
    let mut first = aya::EbpfLoader::new().load(powerlens::ebpf::KERNEL_OBJECT)?;
    let empty_first: &mut BtfTracePoint = first
        .program_mut(names::EMPTY_SCHED_SWITCH)
        .context("empty program in the object")?
        .try_into()?;
    empty_first.load("sched_switch", &btf)?;
    empty_first.attach()?;
    let mut source = EbpfCpuSource::load(
        &EbpfOptions::new(
            "/sys/kernel/btf/vmlinux".into(),
            "/proc".into(),
            0,
            agent_common::OVERFLOW_MAP_CAPACITY,
        ),
        topology,
    )?;
    let empty: &mut BtfTracePoint = source
        .ebpf_mut()
        .program_mut(names::EMPTY_SCHED_SWITCH)
        .context("empty program in the object")?
        .try_into()?;
    empty.load("sched_switch", &btf)?;
    empty.attach()?;

    let mut cgroup = None;
    let load = match load {
        SwitchLoad::PingPong => {
            println!("[switch path] {seconds} s of pipe ping-pong, both programs attached");
            spawn_in(
                None,
                &workload_binary(),
                &["pingpong", &seconds.to_string()],
            )
        }
        SwitchLoad::Sleepers(count) => {
            println!(
                "[switch path] {seconds} s of {count} processes waking every 1 s, both programs attached"
            );
            let group = TestCgroup::create(&format!("powerlens-bench-{}.slice", random_hex(8)));
            let mut swarm = spawn_in(
                None,
                &workload_binary(),
                &[
                    "swarm",
                    &(seconds + 30).to_string(),
                    &count.to_string(),
                    "1000",
                    &group.path.display().to_string(),
                ],
            );
            println!("      {}", swarm.first_line());
            // Past the start-up burst of forks.
            std::thread::sleep(Duration::from_secs(2));
            cgroup = Some(group);
            swarm
        }
    };
    let stats = |source: &mut EbpfCpuSource, name: &'static str| -> anyhow::Result<(u64, u64)> {
        run_stats(source.ebpf_mut().program(name).context(name)?)
    };
    let first_stats = |first: &Ebpf| -> anyhow::Result<(u64, u64)> {
        run_stats(
            first
                .program(names::EMPTY_SCHED_SWITCH)
                .context("first empty program")?,
        )
    };
    let before_ours = stats(&mut source, names::SCHED_SWITCH)?;
    let before_empty = stats(&mut source, names::EMPTY_SCHED_SWITCH)?;
    let before_first = first_stats(&first)?;
    let started = Instant::now();
    // Read as the agent does (draining busy logs between reads at the pace
    // the source asks for), so the reads' effects on caches count too.
    let mut next_read = Instant::now() + Duration::from_secs(1);
    while started.elapsed() < Duration::from_secs(seconds) {
        let next_drain = source.drain_period().map(|period| Instant::now() + period);
        let wake = next_drain.map_or(next_read, |drain| drain.min(next_read));
        std::thread::sleep(wake.saturating_duration_since(Instant::now()));
        if wake < next_read {
            source.drain();
            continue;
        }
        source.read()?;
        next_read += Duration::from_secs(1);
    }
    let losses = source.read()?.losses;
    println!("      kernel counters: {losses:?}");
    let elapsed = started.elapsed().as_secs_f64();
    let after_ours = stats(&mut source, names::SCHED_SWITCH)?;
    let after_empty = stats(&mut source, names::EMPTY_SCHED_SWITCH)?;
    let after_first = first_stats(&first)?;
    load.signal(libc::SIGKILL);
    drop(load);
    drop(cgroup);
    let ours_count = after_ours.1 - before_ours.1;
    let empty_count = after_empty.1 - before_empty.1;
    let first_count = after_first.1 - before_first.1;
    if ours_count == 0 || empty_count == 0 || first_count == 0 {
        bail!("no context switches were counted (statistics off?)");
    }
    let empty_after_ns = (after_empty.0 - before_empty.0) as f64 / empty_count as f64;
    let empty_before_ns = (after_first.0 - before_first.0) as f64 / first_count as f64;
    println!(
        "      empty program attached before powerlens {empty_before_ns:.0} ns, after {empty_after_ns:.0} ns"
    );
    Ok(SwitchResult {
        ours_ns: (after_ours.0 - before_ours.0) as f64 / ours_count as f64,
        empty_ns: empty_after_ns,
        switches_per_second: ours_count as f64 / elapsed,
    })
}

struct AgentResult {
    cpu_ms_per_interval: f64,
    user_ms_per_interval: f64,
    system_ms_per_interval: f64,
    visited_per_interval: f64,
    peak_rss_mib: f64,
    live_processes: usize,
    render_ms: f64,
    scrapes: u64,
    scrape_bytes: u64,
    exports: u64,
    points_per_export: usize,
}

/// CPU time of all threads of `pid`, in ns (scheduler run time).
fn process_cpu_ns(pid: u32) -> u64 {
    integration_tests::process_schedstat_ns(pid)
}

/// (utime, stime) of a process in clock ticks.
fn user_system_ticks(pid: u32) -> anyhow::Result<(u64, u64)> {
    let stat = powerlens::procinfo::read_stat(Path::new("/proc"), pid).context("agent stat")?;
    Ok((stat.utime, stat.stime))
}

fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmHWM in /proc/<pid>/status")
}

/// Threads the agent has read so far (its self-metric).
fn threads_read(agent: &Agent) -> u64 {
    agent.get("/healthz").1["agent"]["threads_read"]
        .as_u64()
        .unwrap_or(0)
}

fn bench_agent(scenario: &Scenario, seconds: u64) -> anyhow::Result<AgentResult> {
    let Scenario {
        processes,
        threads_per_process,
        cgroups,
        period_ms,
        interval_ms,
        export,
        ..
    } = *scenario;
    println!(
        "[agent] {processes} processes x {threads_per_process} threads in {cgroups} cgroups waking every {period_ms} ms, {seconds} s measured at a {interval_ms} ms interval{}",
        if export { ", exporting" } else { "" }
    );
    let per_cgroup = processes / cgroups;
    let receiver = export.then(|| {
        Receiver::start(
            Transport::Grpc,
            std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        )
    });
    let endpoint = receiver
        .as_ref()
        .map(|r| format!("http://{}", r.address))
        .unwrap_or_default();
    let interval = format!("{interval_ms}ms");
    let agent = if export {
        Agent::start_with_env(
            &interval,
            &["--otlp-endpoint", &endpoint],
            &[("OTEL_METRIC_EXPORT_INTERVAL", "1000")],
        )
    } else {
        Agent::start_with_interval(&interval, &[])
    };
    let parent = TestCgroup::create(&format!("powerlens-bench-{}.slice", random_hex(8)));
    let leaves: Vec<TestCgroup> = (0..cgroups)
        .map(|_| {
            TestCgroup::create(&format!(
                "{}/docker-{}.scope",
                parent.relative.trim_start_matches('/'),
                random_hex(64)
            ))
        })
        .collect();
    let dirs: Vec<String> = leaves
        .iter()
        .map(|c| c.path.display().to_string())
        .collect();
    let mut command = Command::new(workload_binary());
    command
        .arg("thread-swarm")
        .arg((seconds + 90).to_string())
        .arg(threads_per_process.to_string())
        .arg(per_cgroup.to_string())
        .arg(period_ms.to_string())
        .args(&dirs)
        .stdout(Stdio::piped());
    let mut swarm = ChildGuard {
        child: command.spawn().context("starting the swarm")?,
    };
    let mut ready = String::new();
    BufReader::new(swarm.child.stdout.as_mut().context("swarm stdout")?).read_line(&mut ready)?;
    println!("      swarm: {}", ready.trim());
    // Let every thread run once and the agent see it, and the start-up
    // burst of wake-ups pass.
    let threads = processes * threads_per_process;
    std::thread::sleep(Duration::from_secs(6 + (threads / 20_000) as u64));
    agent.wait_intervals(1);

    let pid = agent.pid();
    let ticks_before = user_system_ticks(pid)?;
    let cpu_before = process_cpu_ns(pid);
    let sequence_before = agent.sequence();
    let read_before = threads_read(&agent);
    println!("      measuring the agent (pid {pid}) for {seconds} s");
    let started = Instant::now();
    let mut scrape_bytes = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        if export {
            scrape_bytes = agent.get_text("/metrics").len() as u64;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let cpu_after = process_cpu_ns(pid);
    let sequence_after = agent.sequence();
    let ticks_after = user_system_ticks(pid)?;
    let read_after = threads_read(&agent);
    let peak_rss_mib = peak_rss_kib(pid)? as f64 / 1024.0;
    let intervals = (sequence_after - sequence_before).max(1);
    let cpu_ms_per_interval = (cpu_after - cpu_before) as f64 / 1e6 / intervals as f64;
    let tick_ms = 1000.0 / powerlens::procinfo::clock_ticks_per_second() as f64;
    let user_ms_per_interval = (ticks_after.0 - ticks_before.0) as f64 * tick_ms / intervals as f64;
    let system_ms_per_interval =
        (ticks_after.1 - ticks_before.1) as f64 * tick_ms / intervals as f64;
    let visited_per_interval = (read_after - read_before) as f64 / intervals as f64;

    let (_, health) = agent.get("/healthz");
    let exports = &health["exports"];
    let scrapes = exports["prometheus_scrapes"].as_u64().unwrap_or(0);
    let render_ms = exports["prometheus_last_render_seconds"]
        .as_f64()
        .unwrap_or(0.0)
        * 1e3;
    let exports_ok = exports["otlp_exports"].as_u64().unwrap_or(0);
    let points_per_export = receiver
        .as_ref()
        .map(|r| r.points().len() / exports_ok.max(1) as usize)
        .unwrap_or(0);
    let (_, list) = agent.get("/api/v1/processes?limit=1000000");
    let live_processes = list
        .as_array()
        .map(|l| l.iter().filter(|p| p["exited"] == false).count())
        .unwrap_or(0);
    swarm.signal(libc::SIGKILL);
    drop(swarm);
    drop(leaves);
    drop(parent);
    Ok(AgentResult {
        cpu_ms_per_interval,
        user_ms_per_interval,
        system_ms_per_interval,
        visited_per_interval,
        peak_rss_mib,
        live_processes,
        render_ms,
        scrapes,
        scrape_bytes,
        exports: exports_ok,
        points_per_export,
    })
}

fn current_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS in /proc/<pid>/status")
}

/// Containers and processes created and removed for `minutes`; the agent's
/// RSS every 30 s. Its retention (15 min) and exited-process bound make
/// what it keeps stop growing: RSS must go flat.
fn bench_churn(minutes: u64) -> anyhow::Result<()> {
    println!(
        "[churn] {minutes} min: a container cgroup every ~100 ms, each running 40 short-lived processes, removed when done"
    );
    let agent = Agent::start_with_interval("1s", &[]);
    let parent = TestCgroup::create(&format!("powerlens-churn-{}.slice", random_hex(8)));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let created = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let churn = {
        let stop = stop.clone();
        let created = created.clone();
        let parent = parent.relative.trim_start_matches('/').to_owned();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let cgroup =
                    TestCgroup::create(&format!("{parent}/docker-{}.scope", random_hex(64)));
                let child = spawn_in(Some(&cgroup), &workload_binary(), &["short", "40", "1"]);
                let _ = child.wait_output();
                drop(cgroup);
                created.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    let pid = agent.pid();
    let started = Instant::now();
    let mut samples: Vec<(f64, f64)> = Vec::new();
    println!(
        "{:>8} {:>10} {:>12} {:>12} {:>10}",
        "minute", "RSS MiB", "containers", "processes", "evicted"
    );
    while started.elapsed() < Duration::from_secs(minutes * 60) {
        std::thread::sleep(Duration::from_secs(30));
        let rss = current_rss_kib(pid)? as f64 / 1024.0;
        let minute = started.elapsed().as_secs_f64() / 60.0;
        let (_, health) = agent.get("/healthz");
        let evicted = health["losses"]["exited_processes_evicted"]
            .as_u64()
            .unwrap_or(0);
        let kept_containers = agent.total_count("/api/v1/containers");
        let kept_processes = agent.total_count("/api/v1/processes");
        println!(
            "{minute:>8.1} {rss:>10.1} {kept_containers:>12} {kept_processes:>12} {evicted:>10}"
        );
        samples.push((minute, rss));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = churn.join();
    let third = |from: f64, to: f64| {
        let picked: Vec<f64> = samples
            .iter()
            .filter(|(m, _)| *m >= from && *m <= to)
            .map(|(_, r)| *r)
            .collect();
        picked.iter().sum::<f64>() / picked.len().max(1) as f64
    };
    // After the retention has filled (15 min of a 30 min run): the last
    // quarter against the third.
    let total = minutes as f64;
    let middle = third(total / 2.0, 3.0 * total / 4.0);
    let last = third(3.0 * total / 4.0, total);
    println!(
        "containers created: {}; peak RSS {:.1} MiB",
        created.load(std::sync::atomic::Ordering::Relaxed),
        peak_rss_kib(pid)? as f64 / 1024.0
    );
    println!(
        "mean RSS, third quarter {middle:.1} MiB, last quarter {last:.1} MiB: ratio {:.3} (goal <= 1.10){}",
        last / middle,
        if last / middle <= 1.10 {
            ""
        } else {
            "  OVER GOAL"
        }
    );
    drop(parent);
    Ok(())
}
