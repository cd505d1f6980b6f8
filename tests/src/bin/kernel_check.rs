//! `kernel-check`: the CPU-attribution check that `tests/tests/kernels.rs`
//! runs inside a virtual machine booted on another kernel (Debian's own
//! packages), as the initramfs's only job. Starts the agent, burns CPU in a
//! container cgroup, and compares the agent's figure with the kernel's
//! schedstat. From the floor (5.12) the kernel programs must load and be
//! exact; below it the agent must say why it cannot use them and fall back
//! to procfs sampling. Prints one line that starts with `KERNEL-CHECK PASS`
//! or `KERNEL-CHECK FAIL`.

use std::time::Duration;

use integration_tests::{
    Agent, TestCgroup, random_hex, relative_error, schedstat_ns, spawn_in, workload_binary,
};

fn main() {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let version: Vec<u32> = release
        .split(|c: char| !c.is_ascii_digit())
        .take(2)
        .filter_map(|part| part.parse().ok())
        .collect();
    let supported = version.as_slice() >= [5, 12].as_slice();
    let outcome = std::panic::catch_unwind(|| check(supported));
    match outcome {
        Ok(summary) => println!("KERNEL-CHECK PASS kernel={release} {summary}"),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            println!("KERNEL-CHECK FAIL kernel={release}: {message}");
            std::process::exit(1);
        }
    }
}

fn check(supported: bool) -> String {
    let agent = Agent::start(&[]);
    let (_, health) = agent.get("/healthz");
    let ebpf = health["sources"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "cpu:ebpf"))
        .cloned()
        .unwrap_or_default();
    let method = health["method"].as_str().unwrap_or("").to_owned();
    if supported {
        assert_eq!(method, "ebpf", "kernel programs refused: {ebpf}");
    } else {
        assert_eq!(
            method, "procfs",
            "below the floor the agent falls back: {health}"
        );
        assert_eq!(ebpf["status"], "failing", "{ebpf}");
        assert!(
            ebpf["reason"]
                .as_str()
                .unwrap_or("")
                .contains("older than 5.12"),
            "the reason names the kernel floor: {ebpf}"
        );
    }
    let container_id = random_hex(64);
    let cgroup = TestCgroup::create(&format!("system.slice/docker-{container_id}.scope"));
    let burner = spawn_in(Some(&cgroup), &workload_binary(), &["burn", "30"]);
    std::thread::sleep(Duration::from_secs(3));
    burner.signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(100));
    agent.wait_intervals(2);
    let kernel = schedstat_ns(burner.pid()) as f64 / 1e9;
    let (status, container) = agent.get(&format!("/api/v1/containers/{container_id}"));
    assert_eq!(status, 200, "{container}");
    let ours = container["cpu_seconds"].as_f64().expect("cpu_seconds");
    // The process's own figure, whichever cgroups it ran in: the burner
    // runs from fork to its move into the container (pre_exec) in the
    // checker's cgroup, which schedstat counts and the container does not
    // (a millisecond or two under emulation).
    let (_, processes) = agent.get("/api/v1/processes?limit=1000000");
    let process = processes
        .as_array()
        .and_then(|list| list.iter().find(|p| p["pid"] == burner.pid()))
        .and_then(|p| p["cpu_seconds"].as_f64())
        .unwrap_or(0.0);
    assert!(kernel > 0.5, "the burner ran only {kernel} s");
    if supported {
        // The same bar as on the host: both come from sum_exec_runtime.
        assert!(
            relative_error(ours, kernel) < 0.02,
            "powerlens {ours:.4} s vs schedstat {kernel:.4} s"
        );
        assert!(
            relative_error(process, kernel) < 1e-4,
            "the process: powerlens {process:.6} s vs schedstat {kernel:.6} s"
        );
        assert!(
            ours <= process + 1e-6,
            "the container {ours:.6} s ran more than its process {process:.6} s"
        );
    } else {
        // The procfs fallback's bar (clock ticks, one interval of lag).
        assert!(
            (ours - kernel).abs() <= 0.10 * kernel + 0.25,
            "procfs {ours:.3} s vs schedstat {kernel:.3} s"
        );
    }
    let reason = ebpf["reason"].as_str().unwrap_or("").to_owned();
    format!(
        "method={method} powerlens={ours:.6}s (container) {process:.6}s (process) schedstat={kernel:.6}s{}",
        if reason.is_empty() {
            String::new()
        } else {
            format!(" ebpf-refused-because=\"{reason}\"")
        }
    )
}
