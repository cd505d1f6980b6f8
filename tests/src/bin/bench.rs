//! `cargo xtask bench`: the agent's costs, measured in one run, printed as
//! ratios against their goals.
//!
//! 1. Kernel cost per context switch: powerlens's `sched_switch` program
//!    against an empty `tp_btf/sched_switch` program attached at the same
//!    time, under a pipe ping-pong load, from the kernel's BPF run-time
//!    statistics. Goal: at most 2x the empty program.
//! 2. The agent's CPU time per 1 s interval (user + system, which includes
//!    the task iterator that runs in its read) and its peak RSS, with
//!    10,000 live processes across 1,000 cgroups. Goals: 5 ms, 40 MiB.
//! 3. What export adds to that: the same load with OTLP pushed every second
//!    (container level, to a real gRPC receiver in this process) and
//!    `/metrics` scraped every second. Goals: 1 ms of CPU per interval and
//!    8 MiB of peak RSS over the agent without export; the time to render
//!    one `/metrics` and its size are printed.
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
    Btf,
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

const SWITCH_GOAL_RATIO: f64 = 2.0;
const CPU_PER_INTERVAL_GOAL_MS: f64 = 5.0;
const RSS_GOAL_MIB: f64 = 40.0;
const EXPORT_CPU_GOAL_MS: f64 = 1.0;
const EXPORT_RSS_GOAL_MIB: f64 = 8.0;

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
    let switch_seconds = if quick { 3 } else { 10 };
    let (processes, cgroups, measure_seconds) = if quick {
        (1_000, 100, 5)
    } else {
        (10_000, 1_000, 20)
    };

    println!("powerlens benchmarks (kernel {})", kernel_release());
    let switch = bench_switch_path(switch_seconds)?;
    // Typical node: most processes sleep; each wakes every 10 s.
    let typical = bench_agent(processes, cgroups, measure_seconds, 10_000, false)?;
    // The same, exporting: OTLP every second and a scrape every second.
    let exporting = bench_agent(processes, cgroups, measure_seconds, 10_000, true)?;
    // Stress: every process runs in every interval.
    let stress = bench_agent(processes, cgroups, measure_seconds, 1_000, false)?;

    println!();
    println!(
        "{:<58} {:>12} {:>10} {:>8}",
        "figure", "measured", "goal", "ratio"
    );
    let row = |name: &str, measured: f64, unit: &str, goal: f64| {
        println!(
            "{:<58} {:>9.2} {:<2} {:>7.1} {:<2} {:>7.2}{}",
            name,
            measured,
            unit,
            goal,
            unit,
            measured / goal,
            if measured <= goal { "" } else { "  OVER GOAL" }
        );
    };
    println!(
        "{:<58} {:>9.0} ns {:>10} {:>8}",
        "empty tp_btf/sched_switch, per switch", switch.empty_ns, "", ""
    );
    println!(
        "{:<58} {:>9.0} ns {:>10} {:>8}",
        "powerlens sched_switch, per switch", switch.ours_ns, "", ""
    );
    row(
        "powerlens / empty program, per switch (x)",
        switch.ours_ns / switch.empty_ns,
        "x",
        SWITCH_GOAL_RATIO,
    );
    println!(
        "{:<58} {:>9.0} /s   (during the measurement)",
        "context switches", switch.switches_per_second
    );
    for (label, agent) in [
        ("each wakes every 10 s", &typical),
        ("all run every interval", &stress),
    ] {
        println!("agent, {processes} live processes in {cgroups} cgroups, {label}:");
        row(
            "  CPU per 1 s interval (user + system)",
            agent.cpu_ms_per_interval,
            "ms",
            CPU_PER_INTERVAL_GOAL_MS,
        );
        println!(
            "{:<58} {:>9.2} ms user, {:.2} ms system (clock ticks)",
            "    of which", agent.user_ms_per_interval, agent.system_ms_per_interval
        );
        println!(
            "{:<58} {:>9.0} ns   x {:.0} threads per interval",
            "    task iterator program, per thread visited",
            agent.iterator_ns_per_thread,
            agent.threads_per_interval
        );
        row("  peak RSS", agent.peak_rss_mib, "Mi", RSS_GOAL_MIB);
        println!(
            "{:<58} {:>9}      (live processes the agent tracked)",
            "  processes seen", agent.live_processes
        );
    }
    println!("export, same load as 'each wakes every 10 s', OTLP every 1 s + a scrape every 1 s:");
    row(
        "  extra CPU per 1 s interval over no export",
        exporting.cpu_ms_per_interval - typical.cpu_ms_per_interval,
        "ms",
        EXPORT_CPU_GOAL_MS,
    );
    row(
        "  extra peak RSS over no export",
        exporting.peak_rss_mib - typical.peak_rss_mib,
        "Mi",
        EXPORT_RSS_GOAL_MIB,
    );
    println!(
        "{:<58} {:>9.2} ms   (agent's own time to render, the last of {} scrapes)",
        "  one /metrics render", exporting.render_ms, exporting.scrapes
    );
    println!(
        "{:<58} {:>9.0} KiB  (Prometheus text)",
        "  one /metrics size",
        exporting.scrape_bytes as f64 / 1024.0
    );
    println!(
        "{:<58} {:>9}      (OTLP data points received, {} exports)",
        "  OTLP points per export", exporting.points_per_export, exporting.exports
    );
    Ok(())
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

fn bench_switch_path(seconds: u64) -> anyhow::Result<SwitchResult> {
    println!("[switch path] {seconds} s of pipe ping-pong with both programs attached");
    // Keep the fd: statistics stay on while it is open.
    let _stats = enable_stats(Stats::RunTime).context("enabling BPF run-time statistics")?;
    let topology = Topology::read(Path::new("/sys"))?;
    let mut source = EbpfCpuSource::load(
        &EbpfOptions::new(
            "/sys/kernel/btf/vmlinux".into(),
            "/proc".into(),
            agent_common::EXITED_MAP_CAPACITY,
            agent_common::DEFAULT_THREAD_SLOTS,
        ),
        topology,
    )?;
    let btf = Btf::from_sys_fs()?;
    let empty: &mut BtfTracePoint = source
        .ebpf_mut()
        .program_mut(names::EMPTY_SCHED_SWITCH)
        .context("empty program in the object")?
        .try_into()?;
    empty.load("sched_switch", &btf)?;
    empty.attach()?;

    let before_ours = run_stats(
        source
            .ebpf_mut()
            .program(names::SCHED_SWITCH)
            .context("sched_switch")?,
    )?;
    let before_empty = run_stats(
        source
            .ebpf_mut()
            .program(names::EMPTY_SCHED_SWITCH)
            .context("empty")?,
    )?;
    let started = Instant::now();
    let load = spawn_in(
        None,
        &workload_binary(),
        &["pingpong", &seconds.to_string()],
    );
    // Read as the agent does, so the in-progress claims and drains run too.
    while started.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_secs(1));
        source.read()?;
    }
    let output = load.wait_output();
    let elapsed = started.elapsed().as_secs_f64();
    let after_ours = run_stats(
        source
            .ebpf_mut()
            .program(names::SCHED_SWITCH)
            .context("sched_switch")?,
    )?;
    let after_empty = run_stats(
        source
            .ebpf_mut()
            .program(names::EMPTY_SCHED_SWITCH)
            .context("empty")?,
    )?;
    let ours_count = after_ours.1 - before_ours.1;
    let empty_count = after_empty.1 - before_empty.1;
    if ours_count == 0 || empty_count == 0 {
        bail!("no context switches were counted (statistics off?)");
    }
    println!("      load: {}", output.trim());
    Ok(SwitchResult {
        ours_ns: (after_ours.0 - before_ours.0) as f64 / ours_count as f64,
        empty_ns: (after_empty.0 - before_empty.0) as f64 / empty_count as f64,
        switches_per_second: ours_count as f64 / elapsed,
    })
}

struct AgentResult {
    cpu_ms_per_interval: f64,
    user_ms_per_interval: f64,
    system_ms_per_interval: f64,
    iterator_ns_per_thread: f64,
    threads_per_interval: f64,
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

/// (run time ns, runs) of the agent's task iterator program, summed over
/// loaded instances (the kernel truncates names to 15 characters).
fn iterator_stats() -> anyhow::Result<(u64, u64)> {
    let mut total = (0, 0);
    for info in aya::programs::loaded_programs().flatten() {
        if info.name_as_str() == Some(names::READ_RUNNING) {
            total.0 += info.run_time().as_nanos() as u64;
            total.1 += info.run_count();
        }
    }
    Ok(total)
}

fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmHWM in /proc/<pid>/status")
}

fn bench_agent(
    processes: usize,
    cgroups: usize,
    seconds: u64,
    period_ms: u64,
    export: bool,
) -> anyhow::Result<AgentResult> {
    println!(
        "[agent] {processes} live processes in {cgroups} cgroups waking every {period_ms} ms, {seconds} s measured at a 1 s interval"
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
    let agent = if export {
        Agent::start_with_env(
            "1s",
            &["--otlp-endpoint", &endpoint],
            &[("OTEL_METRIC_EXPORT_INTERVAL", "1000")],
        )
    } else {
        Agent::start_with_interval("1s", &[])
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
        .arg("swarm")
        .arg((seconds + 60).to_string())
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
    // Let every process run at least once and the agent see it.
    std::thread::sleep(Duration::from_secs(4));
    agent.wait_intervals(1);

    let pid = agent.pid();
    let _stats = enable_stats(Stats::RunTime).context("enabling BPF run-time statistics")?;
    let iterator_before = iterator_stats()?;
    let ticks_before = user_system_ticks(pid)?;
    let cpu_before = process_cpu_ns(pid);
    let sequence_before = agent.sequence();
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
    let iterator_after = iterator_stats()?;
    let peak_rss_mib = peak_rss_kib(pid)? as f64 / 1024.0;
    let intervals = (sequence_after - sequence_before).max(1);
    let cpu_ms_per_interval = (cpu_after - cpu_before) as f64 / 1e6 / intervals as f64;
    let tick_ms = 1000.0 / powerlens::procinfo::clock_ticks_per_second() as f64;
    let user_ms_per_interval = (ticks_after.0 - ticks_before.0) as f64 * tick_ms / intervals as f64;
    let system_ms_per_interval =
        (ticks_after.1 - ticks_before.1) as f64 * tick_ms / intervals as f64;
    let iterator_runs = iterator_after.1.saturating_sub(iterator_before.1).max(1);
    let iterator_ns_per_thread =
        (iterator_after.0 - iterator_before.0) as f64 / iterator_runs as f64;
    let threads_per_interval = iterator_runs as f64 / intervals as f64;

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
        iterator_ns_per_thread,
        threads_per_interval,
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
        let kept_containers = count(&agent, "/api/v1/containers?limit=1000000");
        let kept_processes = count(&agent, "/api/v1/processes?limit=1000000");
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

fn count(agent: &Agent, path: &str) -> usize {
    agent.get(path).1.as_array().map_or(0, Vec::len)
}
