//! CPU attribution on the real kernel: the agent loads its programs into the
//! running kernel, and its figures are compared with the kernel's own
//! accounting. Needs root; run one at a time (`cargo xtask test` does).

use std::time::Duration;

use integration_tests::{
    Agent, TestCgroup, kubernetes_cgroup, process_schedstat_ns, random_hex, random_uuid,
    relative_error, require_root, schedstat_arrivals, schedstat_ns, spawn_in, workload_binary,
};
use serde_json::Value;

fn find_process(list: &Value, pid: u32) -> &Value {
    list.as_array()
        .expect("process list")
        .iter()
        .find(|p| p["pid"].as_u64() == Some(u64::from(pid)))
        .unwrap_or_else(|| panic!("pid {pid} not in {list}"))
}

#[test]
fn processes_and_containers_match_the_kernels_own_run_time() {
    if !require_root() {
        return;
    }
    let agent = Agent::start(&["--method", "ebpf"]);
    assert_eq!(agent.get("/healthz").1["method"], "ebpf");

    let container_id = random_hex(64);
    let pod_uid = random_uuid();
    let cgroup = kubernetes_cgroup(&container_id, &pod_uid);
    let elsewhere = TestCgroup::create(&format!("powerlens-test-{}.slice", random_hex(8)));
    let workload = workload_binary();
    let burners = [
        spawn_in(Some(&cgroup), &workload, &["burn", "30"]),
        spawn_in(Some(&cgroup), &workload, &["burn", "30"]),
    ];
    let half = spawn_in(Some(&elsewhere), &workload, &["half", "30"]);
    std::thread::sleep(Duration::from_millis(3500));

    // Freeze them so the kernel's figures and ours describe the same time:
    // a stopped task switches out, and the next read drains its last slice.
    for child in burners.iter().chain([&half]) {
        child.signal(libc::SIGSTOP);
    }
    std::thread::sleep(Duration::from_millis(50));
    agent.wait_intervals(2);

    let (status, processes) = agent.get(&format!("/api/v1/processes?container={container_id}"));
    assert_eq!(status, 200, "{processes}");
    let mut kernel_sum = 0.0;
    for burner in &burners {
        let kernel = schedstat_ns(burner.pid()) as f64 / 1e9;
        kernel_sum += kernel;
        let ours = find_process(&processes, burner.pid())["cpu_seconds"]
            .as_f64()
            .expect("cpu_seconds");
        // 2%: the bar. Both figures come from the same
        // sum_exec_runtime counter, so the only gap is what ran between
        // the agent's start and the process's first switch (none here).
        assert!(
            relative_error(ours, kernel) < 0.02,
            "pid {}: powerlens {ours:.4}s vs schedstat {kernel:.4}s",
            burner.pid()
        );
        assert!(
            kernel > 1.0,
            "the burner ran only {kernel}s: machine overloaded?"
        );
        eprintln!(
            "pid {}: powerlens {ours:.6} s, schedstat {kernel:.6} s",
            burner.pid()
        );
    }
    assert_eq!(
        processes.as_array().map(Vec::len),
        Some(2),
        "only the two burners are in the container: {processes}"
    );

    let (status, container) = agent.get(&format!("/api/v1/containers/{container_id}"));
    assert_eq!(status, 200, "{container}");
    assert_eq!(container["container_id"], container_id.as_str());
    assert_eq!(container["pod_uid"], pod_uid.as_str());
    assert_eq!(container["pod_qos"], "burstable");
    assert_eq!(container["runtime"], "containerd");
    assert_eq!(container["method"], "ebpf");
    assert_eq!(container["exited"], false);
    assert_eq!(container["cgroup_path"], cgroup.relative.as_str());
    let (status, pods) = agent.get("/api/v1/pods");
    assert_eq!(status, 200);
    let pod = pods
        .as_array()
        .and_then(|p| p.iter().find(|p| p["pod_uid"] == pod_uid.as_str()))
        .unwrap_or_else(|| panic!("pod {pod_uid} not in {pods}"));
    assert_eq!(pod["containers"][0], container_id.as_str());
    let container_seconds = container["cpu_seconds"].as_f64().expect("cpu_seconds");
    eprintln!("container: powerlens {container_seconds:.6} s, sum of schedstat {kernel_sum:.6} s");
    assert!(
        relative_error(
            pod["cpu_seconds"].as_f64().expect("pod cpu"),
            container_seconds
        ) < 1e-9
    );
    assert!(
        relative_error(container_seconds, kernel_sum) < 0.02,
        "container {container_seconds:.4}s vs sum of schedstat {kernel_sum:.4}s; workloads: {}",
        agent.get("/api/v1/workloads").1
    );

    // The half-busy process elsewhere is attributed to its own cgroup.
    let (_, all) = agent.get("/api/v1/processes");
    let half_entry = find_process(&all, half.pid());
    let half_kernel = schedstat_ns(half.pid()) as f64 / 1e9;
    let half_ours = half_entry["cpu_seconds"].as_f64().expect("cpu_seconds");
    assert!(
        relative_error(half_ours, half_kernel) < 0.02,
        "half-busy: powerlens {half_ours:.4}s vs schedstat {half_kernel:.4}s"
    );
    assert!(half_entry["container_id"].is_null());
    assert_eq!(half_entry["cgroup_path"], elsewhere.relative.as_str());

    // The node's busy and idle time covers the wall time of every CPU.
    let (_, node) = agent.get("/api/v1/node");
    let busy = node["cpu_busy_seconds"].as_f64().expect("busy");
    let idle = node["cpu_idle_seconds"].as_f64().expect("idle");
    assert!(
        busy >= kernel_sum + half_kernel - 0.05,
        "node busy {busy} below the workloads' {}",
        kernel_sum + half_kernel
    );
    assert!(idle >= 0.0);
}

#[test]
fn every_process_of_a_crowd_and_of_a_4000_thread_process_matches_its_schedstat() {
    if !require_root() {
        return;
    }
    // 1,000 busy processes and a process of 4,000 busy threads: every read
    // returns ~5,000 records (~600 KB), many times the kernel's 32 KiB
    // iterator buffer, so records land on its edge in every read. A record
    // lost there (the issue measured up to -16.7% on one process) shows as
    // one process off by one interval's share.
    let agent = Agent::start(&["--method", "ebpf"]);
    let container_id = random_hex(64);
    let cgroup = TestCgroup::create(&format!("system.slice/docker-{container_id}.scope"));
    let workload = workload_binary();
    // nice 19: 5,000 busy threads must leave the agent room to read.
    let mut crowd = spawn_in(
        Some(&cgroup),
        &workload,
        &["nice", "19", "crowd", "1000", "120"],
    );
    assert_eq!(crowd.first_line(), "ready 1000");
    let threads = spawn_in(
        Some(&cgroup),
        &workload,
        &["nice", "19", "threads", "4000", "120"],
    );
    std::thread::sleep(Duration::from_secs(20));
    let (off, worst, count) = compare_every_process_with_schedstat(&agent, &cgroup, &container_id);
    let (_, health) = agent.get("/healthz");
    eprintln!(
        "{count} processes (4000 threads in pid {}): worst {:.4}%; losses {}",
        threads.pid(),
        worst * 100.0,
        health["losses"]
    );
    assert_eq!(count, 1002, "the crowd, its parent and the threads");
    assert!(
        off.is_empty(),
        "{} of {count} processes off by more than 1%: {:?}",
        off.len(),
        &off[..off.len().min(10)]
    );
    let (_, container) = agent.get(&format!("/api/v1/containers/{container_id}"));
    let total = container["cpu_seconds"].as_f64().expect("cpu_seconds");
    assert!(
        total > 20.0,
        "two CPUs for 20 s should give the crowd > 20 s, got {total}"
    );
    drop(threads);
    drop(crowd);
}

/// Runs `count` children one after another in `cgroup`, each burning
/// `millis` of CPU, and returns the children's CPU seconds and the
/// parent's own (getrusage).
fn run_short_lived(cgroup: &TestCgroup, count: u32, millis: u32) -> (f64, f64) {
    let parent = spawn_in(
        Some(cgroup),
        &workload_binary(),
        &["short", &count.to_string(), &millis.to_string()],
    );
    let output = parent.wait_output();
    let field = |name: &str| -> f64 {
        output
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {name} in {output:?}"))
            / 1e9
    };
    (field("children_ns"), field("self_ns"))
}

/// Waits until every thread of `pids` is stopped (state `T`).
fn wait_until_stopped(pids: &[i32], timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    let all_stopped = || {
        pids.iter().all(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .into_iter()
                .flatten()
                .flatten()
                .all(|task| {
                    std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
                        stat.rsplit_once(')')
                            .and_then(|(_, rest)| rest.split_whitespace().next())
                            .is_some_and(|state| state == "T" || state == "t")
                    })
                })
        })
    };
    while !all_stopped() {
        assert!(
            std::time::Instant::now() < deadline,
            "the test's processes did not all stop within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Stops every process of `cgroup`, lets the agent drain their last
/// slices, and returns (processes off by more than 1%, the worst error).
fn compare_every_process_with_schedstat(
    agent: &Agent,
    cgroup: &TestCgroup,
    container_id: &str,
) -> (Vec<String>, f64, usize) {
    let pids = cgroup.pids();
    for pid in &pids {
        // SAFETY: plain kill syscall on our own test processes.
        unsafe { libc::kill(*pid, libc::SIGSTOP) };
    }
    // Each thread stops when it next runs: 5,000 nice-19 threads on two
    // CPUs can take seconds to all get there. Compare only once every
    // thread is stopped, and the agent has read after that.
    wait_until_stopped(&pids, Duration::from_secs(60));
    agent.wait_intervals(3);
    let (status, processes) = agent.get(&format!(
        "/api/v1/processes?container={container_id}&limit=100000"
    ));
    assert_eq!(status, 200, "{processes}");
    let mut off = Vec::new();
    let mut worst = 0.0f64;
    for pid in &pids {
        let pid = *pid as u32;
        let kernel = process_schedstat_ns(pid) as f64 / 1e9;
        let ours = find_process(&processes, pid)["cpu_seconds"]
            .as_f64()
            .expect("cpu_seconds");
        let error = relative_error(ours, kernel);
        worst = worst.max(error);
        if error > 0.01 {
            off.push(format!("pid {pid}: {ours:.6} s vs {kernel:.6} s"));
        }
    }
    (off, worst, pids.len())
}

#[test]
fn with_short_switch_logs_every_process_still_matches_its_schedstat() {
    if !require_root() {
        return;
    }
    // Logs of 64 records per CPU and a crowd of 600 busy processes: the
    // agent drains the logs between intervals, and switches that still find
    // a log full go through `OVERFLOW`.
    let agent =
        Agent::start_with_interval("250ms", &["--method", "ebpf", "--switch-log-len", "64"]);
    let container_id = random_hex(64);
    let cgroup = TestCgroup::create(&format!("system.slice/docker-{container_id}.scope"));
    let mut crowd = spawn_in(
        Some(&cgroup),
        &workload_binary(),
        &["nice", "19", "crowd", "600", "60"],
    );
    assert_eq!(crowd.first_line(), "ready 600");
    std::thread::sleep(Duration::from_secs(10));
    let (off, worst, count) = compare_every_process_with_schedstat(&agent, &cgroup, &container_id);
    let losses = agent.get("/healthz").1["losses"].clone();
    eprintln!(
        "{count} processes, logs of 64: worst {:.4}%, losses {losses}",
        worst * 100.0
    );
    assert!(
        losses["switch_log_full"].as_u64().unwrap_or(0) > 0,
        "hundreds of busy threads per CPU in logs of 64: {losses}"
    );
    assert_eq!(
        losses["overflow_map_full"].as_u64(),
        Some(0),
        "the overflow map holds them: {losses}"
    );
    assert!(
        off.is_empty(),
        "{} of {count} processes off by more than 1%: {:?}",
        off.len(),
        &off[..off.len().min(10)]
    );
    drop(crowd);
}

#[test]
fn a_full_overflow_map_is_counted_and_nothing_is_counted_twice() {
    if !require_root() {
        return;
    }
    // Logs of 64 and room in `OVERFLOW` for 4 threads, under a crowd of
    // busy processes, while 300 children each burn 2 ms and exit: records
    // are dropped (a live thread's slice then comes with its next record;
    // an ending thread's last slice is lost), and the counter says so.
    let agent = Agent::start(&[
        "--method",
        "ebpf",
        "--switch-log-len",
        "64",
        "--overflow-map-capacity",
        "4",
    ]);
    let container_id = random_hex(64);
    let cgroup = TestCgroup::create(&format!("system.slice/docker-{container_id}.scope"));
    let crowd_cgroup = TestCgroup::create(&format!("powerlens-test-{}.slice", random_hex(8)));
    let mut crowd = spawn_in(
        Some(&crowd_cgroup),
        &workload_binary(),
        &["nice", "19", "crowd", "400", "60"],
    );
    assert_eq!(crowd.first_line(), "ready 400");
    let (children, parent_self) = run_short_lived(&cgroup, 300, 2);
    agent.wait_intervals(3);
    let (_, container) = agent.get(&format!("/api/v1/containers/{container_id}"));
    let ours = container["cpu_seconds"].as_f64().expect("cpu_seconds");
    let losses = agent.get("/healthz").1["losses"].clone();
    eprintln!(
        "overflow map of 4: container {ours:.4} s vs children {children:.4} s (+ parent {parent_self:.4} s); losses {losses}"
    );
    assert!(
        losses["overflow_map_full"].as_u64().unwrap_or(0) > 0,
        "400 busy processes through logs of 64 and a map of 4 must overflow it: {losses}"
    );
    assert!(
        ours <= 1.02 * (children + parent_self),
        "container {ours:.4} s > children {children:.4} s + parent {parent_self:.4} s"
    );
    drop(crowd);
}

#[test]
fn a_user_who_names_a_cgroup_after_another_container_gets_no_share_of_it() {
    if !require_root() {
        return;
    }
    let agent = Agent::start(&["--method", "ebpf"]);
    let victim_id = random_hex(64);
    let victim = TestCgroup::create(&format!("machine.slice/libpod-{victim_id}.scope"));
    // A subtree delegated to uid 4242 (as systemd's Delegate= or a user
    // manager does: the directories belong to the user), in which the user
    // names a cgroup after the victim's container id.
    let tenant = TestCgroup::create(&format!("powerlens-test-{}.slice", random_hex(8)));
    let chown = |path: &std::path::Path| {
        let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: valid C string; plain syscall.
        assert_eq!(
            unsafe { libc::chown(path.as_ptr(), 4242, 4242) },
            0,
            "chown"
        );
    };
    chown(&tenant.path);
    let impostor = TestCgroup::create(&format!(
        "{}/libpod-{victim_id}.scope",
        tenant.relative.trim_start_matches('/')
    ));
    chown(&impostor.path);
    let workload = workload_binary();
    let real = spawn_in(Some(&victim), &workload, &["burn", "30"]);
    let fake = spawn_in(Some(&impostor), &workload, &["burn", "30"]);
    std::thread::sleep(Duration::from_secs(3));
    real.signal(libc::SIGSTOP);
    fake.signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(50));
    agent.wait_intervals(2);

    let real_kernel = schedstat_ns(real.pid()) as f64 / 1e9;
    let fake_kernel = schedstat_ns(fake.pid()) as f64 / 1e9;
    let (status, container) = agent.get(&format!("/api/v1/containers/{victim_id}"));
    assert_eq!(
        status, 200,
        "the exact id names the runtime's container: {container}"
    );
    let ours = container["cpu_seconds"].as_f64().expect("cpu_seconds");
    eprintln!(
        "victim: powerlens {ours:.4} s, its schedstat {real_kernel:.4} s; impostor ran {fake_kernel:.4} s"
    );
    assert!(
        relative_error(ours, real_kernel) < 0.02,
        "the victim's figure holds only its own time: {ours:.4} s vs {real_kernel:.4} s (impostor {fake_kernel:.4} s)"
    );
    assert!(container["owner_uid"].is_null(), "{container}");
    let (_, list) = agent.get("/api/v1/containers");
    let impostor_entry = list
        .as_array()
        .expect("list")
        .iter()
        .find(|c| c["container_id"] == victim_id.as_str() && c["owner_uid"] == 4242)
        .unwrap_or_else(|| panic!("the impostor is its own entry, owned by 4242: {list}"));
    let impostor_seconds = impostor_entry["cpu_seconds"].as_f64().expect("cpu_seconds");
    assert!(
        relative_error(impostor_seconds, fake_kernel) < 0.02,
        "impostor {impostor_seconds:.4} s vs {fake_kernel:.4} s"
    );
    drop((real, fake));
    drop(impostor);
}

#[test]
fn containers_that_live_less_than_an_interval_are_all_listed_with_their_cpu_time() {
    if !require_root() {
        return;
    }
    // 1 s intervals; each container lives ~20-30 ms: created, a process
    // burns 20 ms of CPU in it, removed. The walk of the hierarchy never
    // sees one. (A 20 ms wall-clock burn preempted by the agent's interval
    // got 13 ms of CPU once in CI: the burn counts CPU time now.)
    let agent = Agent::start_with_interval("1s", &["--method", "ebpf"]);
    let slice = TestCgroup::create(&format!("powerlens-test-{}.slice", random_hex(8)));
    let mut ids = Vec::new();
    for _ in 0..200 {
        let id = random_hex(64);
        let cgroup = TestCgroup::create(&format!(
            "{}/docker-{id}.scope",
            slice.relative.trim_start_matches('/')
        ));
        spawn_in(Some(&cgroup), &workload_binary(), &["burn-cpu", "0.02"]).wait_output();
        drop(cgroup);
        ids.push(id);
    }
    agent.wait_intervals(3);
    let (_, list) = agent.get("/api/v1/containers?limit=100000");
    let list = list.as_array().expect("list").clone();
    let mut found = 0;
    let mut cpu = 0.0;
    for id in &ids {
        if let Some(container) = list.iter().find(|c| c["container_id"] == id.as_str()) {
            found += 1;
            let seconds = container["cpu_seconds"].as_f64().unwrap_or(0.0);
            // 20 ms of CPU, less what ran before the move into the
            // container (the fork's child, in the test's cgroup).
            assert!(seconds > 0.015, "{id}: {seconds} s of a 20 ms burn");
            cpu += seconds;
        }
    }
    let losses = agent.get("/healthz").1["losses"].clone();
    eprintln!(
        "200 containers of ~25 ms each: {found} listed, {cpu:.3} s of CPU among them; losses {losses}"
    );
    assert_eq!(found, 200, "every short container is listed");
}

#[test]
fn a_thousand_short_lived_processes_are_all_counted() {
    if !require_root() {
        return;
    }
    let agent = Agent::start(&["--method", "ebpf"]);
    let container_id = random_hex(64);
    let cgroup = TestCgroup::create(&format!("system.slice/docker-{container_id}.scope"));
    let (children, parent_self) = run_short_lived(&cgroup, 1000, 3);
    agent.wait_intervals(3);

    let (status, container) = agent.get(&format!("/api/v1/containers/{container_id}"));
    assert_eq!(status, 200, "{container}");
    assert_eq!(container["runtime"], "docker");
    let ours = container["cpu_seconds"].as_f64().expect("cpu_seconds");
    // At least 99% of the children's time (the bar); at most their
    // time plus the parent's own (fork/wait) plus 2% for rounding of
    // getrusage to microseconds.
    eprintln!(
        "short-lived: container {ours:.6} s, children {children:.6} s, parent {parent_self:.6} s"
    );
    assert!(
        ours >= 0.99 * children,
        "container {ours:.4}s < 99% of children's {children:.4}s"
    );
    assert!(
        ours <= 1.02 * (children + parent_self),
        "container {ours:.4}s > children {children:.4}s + parent {parent_self:.4}s"
    );
    assert!(
        children > 2.5,
        "1000 children x 3 ms should be about 3 s, got {children}"
    );

    // The parent has exited: the container is still queryable, and is
    // reported exited once its cgroup is gone.
    drop(cgroup);
    std::thread::sleep(Duration::from_secs(6));
    let (status, container) = agent.get(&format!("/api/v1/containers/{container_id}"));
    assert_eq!(status, 200, "exited containers stay queryable: {container}");
    assert_eq!(container["exited"], true, "{container}");
}

#[test]
fn a_multi_threaded_process_is_one_process_with_the_sum_of_its_threads() {
    if !require_root() {
        return;
    }
    let agent = Agent::start(&["--method", "ebpf"]);
    let container_id = random_hex(64);
    let cgroup = TestCgroup::create(&format!("machine.slice/libpod-{container_id}.scope"));
    let process = spawn_in(Some(&cgroup), &workload_binary(), &["threads", "4", "30"]);
    std::thread::sleep(Duration::from_secs(3));
    process.signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(50));
    agent.wait_intervals(2);
    let kernel = process_schedstat_ns(process.pid()) as f64 / 1e9;

    let (status, processes) = agent.get(&format!("/api/v1/processes?container={container_id}"));
    assert_eq!(status, 200, "{processes}");
    let list = processes.as_array().expect("list");
    assert_eq!(
        list.len(),
        1,
        "threads must not show as processes: {processes}"
    );
    let ours = list[0]["cpu_seconds"].as_f64().expect("cpu_seconds");
    eprintln!("4 threads: powerlens {ours:.6} s, threads' schedstat {kernel:.6} s");
    assert!(
        relative_error(ours, kernel) < 0.02,
        "powerlens {ours:.4}s vs threads' schedstat {kernel:.4}s"
    );
    assert!(
        kernel > 2.0,
        "4 threads on this machine for 3 s should use > 2 s, got {kernel}"
    );
    let (_, container) = agent.get(&format!("/api/v1/containers/{container_id}"));
    assert_eq!(container["runtime"], "podman");
}

#[test]
fn when_the_kernel_refuses_the_programs_procfs_sampling_still_attributes_cpu() {
    if !require_root() {
        return;
    }
    // A BTF file that does not exist makes the loader fail before anything
    // reaches the kernel: the agent must say why and carry on with procfs.
    let agent = Agent::start(&["--btf-path", "/nonexistent/powerlens-test/vmlinux"]);
    let (_, health) = agent.get("/healthz");
    assert_eq!(health["method"], "procfs");
    let ebpf = health["sources"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "cpu:ebpf"))
        .unwrap_or_else(|| panic!("no cpu:ebpf source in {health}"));
    assert_eq!(ebpf["status"], "failing");
    assert!(
        ebpf["reason"]
            .as_str()
            .unwrap_or("")
            .contains("/nonexistent/powerlens-test/vmlinux"),
        "the reason names the missing BTF: {ebpf}"
    );

    let container_id = random_hex(64);
    let cgroup = TestCgroup::create(&format!("system.slice/crio-{container_id}.scope"));
    let burner = spawn_in(Some(&cgroup), &workload_binary(), &["burn", "30"]);
    std::thread::sleep(Duration::from_secs(2));
    burner.signal(libc::SIGSTOP);
    agent.wait_intervals(2);
    let kernel = schedstat_ns(burner.pid()) as f64 / 1e9;
    let (status, container) = agent.get(&format!("/api/v1/containers/{container_id}"));
    assert_eq!(status, 200, "{container}");
    assert_eq!(container["method"], "procfs");
    assert_eq!(container["runtime"], "cri-o");
    let ours = container["cpu_seconds"].as_f64().expect("cpu_seconds");
    eprintln!("procfs fallback: powerlens {ours:.3} s, schedstat {kernel:.3} s");
    // procfs counts in clock ticks (10 ms) and the first sample after the
    // process appeared is its baseline: allow 10% + one interval (250 ms).
    assert!(
        (ours - kernel).abs() <= 0.10 * kernel + 0.25,
        "procfs fallback {ours:.3}s vs schedstat {kernel:.3}s"
    );
}

#[test]
fn with_a_token_set_the_api_and_metrics_ask_for_it_and_probes_do_not() {
    if !require_root() {
        return;
    }
    let token = random_hex(32);
    let token_file = std::env::temp_dir().join(format!("powerlens-token-{}", random_hex(8)));
    std::fs::write(&token_file, format!("{token}\n")).expect("write token file");
    let agent = Agent::start_with_env(
        "250ms",
        &["--api-token-file", token_file.to_str().expect("utf-8 path")],
        &[],
    );
    let _ = std::fs::remove_file(&token_file);
    for path in ["/api/v1/node", "/api/v1/processes", "/metrics"] {
        assert_eq!(
            agent.status_with_token(path, None),
            401,
            "{path} without a token"
        );
        assert_eq!(
            agent.status_with_token(path, Some("wrong")),
            401,
            "{path} with a wrong token"
        );
        assert_eq!(agent.status_with_token(path, Some(&token)), 200, "{path}");
    }
    assert_eq!(
        agent.status_with_token("/healthz", None),
        200,
        "probes carry no token"
    );
}

#[test]
fn inside_a_cgroup_namespace_procfs_sampling_still_finds_the_container() {
    if !require_root() {
        return;
    }
    // As in a pod: the agent's /proc/<pid>/cgroup views are relative to its
    // own namespace root, `/../../system.slice/...` for everyone else.
    let agent_cgroup = TestCgroup::create(&format!(
        "powerlens-test-{}.slice/agent-pod.scope",
        random_hex(8)
    ));
    let agent = Agent::start_in_cgroup_namespace(&agent_cgroup, &["--method", "procfs"]);
    let container_id = random_hex(64);
    let pod_uid = random_uuid();
    let cgroup = kubernetes_cgroup(&container_id, &pod_uid);
    let burner = spawn_in(Some(&cgroup), &workload_binary(), &["burn", "30"]);
    let seen = std::fs::read_to_string(format!("/proc/{}/cgroup", agent.pid())).expect("cgroup");
    std::thread::sleep(Duration::from_secs(2));
    burner.signal(libc::SIGSTOP);
    agent.wait_intervals(2);
    let kernel = schedstat_ns(burner.pid()) as f64 / 1e9;
    let (status, container) = agent.get(&format!("/api/v1/containers/{container_id}"));
    assert_eq!(
        status, 200,
        "the container is found from inside the namespace (the agent's own view: {seen}): {container}"
    );
    assert_eq!(container["pod_uid"], pod_uid.as_str());
    let ours = container["cpu_seconds"].as_f64().expect("cpu_seconds");
    eprintln!("in a cgroup namespace: powerlens {ours:.3} s, schedstat {kernel:.3} s");
    drop(agent);
    // The procfs fallback's tolerance (see the test above).
    assert!(
        (ours - kernel).abs() <= 0.10 * kernel + 0.25,
        "procfs in a namespace {ours:.3}s vs schedstat {kernel:.3}s"
    );
}

#[test]
fn a_process_whose_leader_thread_exited_is_alive_while_a_thread_runs() {
    if !require_root() {
        return;
    }
    let agent = Agent::start(&["--method", "ebpf"]);
    let container_id = random_hex(64);
    let cgroup = TestCgroup::create(&format!("system.slice/docker-{container_id}.scope"));
    let process = spawn_in(Some(&cgroup), &workload_binary(), &["leader-exits", "30"]);
    std::thread::sleep(Duration::from_secs(2));
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", process.pid())).expect("stat");
    // Here the leader has been a zombie for ~1 s and the thread sleeps.
    let after_comm = stat.rsplit_once(')').expect("stat fields").1;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    assert_eq!(fields[0], "Z", "the leader is a zombie: {stat}");
    agent.wait_intervals(4);
    let (_, processes) = agent.get(&format!("/api/v1/processes?container={container_id}"));
    let entry = find_process(&processes, process.pid());
    eprintln!(
        "zombie leader, {} threads: exited={}, cpu {} s",
        fields[17], entry["exited"], entry["cpu_seconds"]
    );
    assert_eq!(entry["exited"], false, "its thread still runs: {entry}");
    let (_, container) = agent.get(&format!("/api/v1/containers/{container_id}"));
    assert_eq!(container["live_processes"], 1, "{container}");
}

#[test]
fn api_errors_are_json_with_the_right_status() {
    if !require_root() {
        return;
    }
    let agent = Agent::start(&[]);
    let (status, body) = agent.get(&format!("/api/v1/containers/{}", random_hex(64)));
    assert_eq!(status, 404);
    assert!(body["error"].as_str().is_some(), "{body}");
    let (status, body) = agent.get("/api/v1/containers/not%20valid!");
    assert_eq!(status, 400, "{body}");
    let (status, body) = agent.get("/api/v1/processes?container=%2F%2F");
    assert_eq!(status, 400, "{body}");
    let (status, body) = agent.get("/api/v1/processes?limit=-3");
    assert_eq!(status, 400, "{body}");
    let (status, body) = agent.get("/api/v1/processes?bogus=1");
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap_or("").contains("bogus"),
        "{body}"
    );
    let (status, _) = agent.get("/api/v1/nothing-here");
    assert_eq!(status, 404);
    let (status, list) = agent.get("/api/v1/containers");
    assert_eq!(status, 200);
    assert!(list.is_array());
}

/// An eBPF agent, and a Docker-named container running the workload with
/// `args`.
fn agent_and_container_running(
    args: &[&str],
) -> (Agent, String, TestCgroup, integration_tests::ChildGuard) {
    let agent = Agent::start(&["--method", "ebpf"]);
    let container_id = random_hex(64);
    let cgroup = TestCgroup::create(&format!("system.slice/docker-{container_id}.scope"));
    let process = spawn_in(Some(&cgroup), &workload_binary(), args);
    (agent, container_id, cgroup, process)
}

/// The agent's cumulative CPU seconds of `pid` (in the container's list),
/// and the snapshot it came from.
fn agent_cpu_seconds(agent: &Agent, container_id: &str, pid: u32) -> (f64, u64) {
    let (status, list) = agent.get(&format!("/api/v1/processes?container={container_id}"));
    if status == 404 {
        // Not seen yet.
        return (0.0, agent.sequence());
    }
    assert_eq!(status, 200, "{list}");
    let seconds = list
        .as_array()
        .expect("list")
        .iter()
        .find(|p| p["pid"].as_u64() == Some(u64::from(pid)))
        .and_then(|p| p["cpu_seconds"].as_f64())
        .unwrap_or(0.0);
    (seconds, agent.sequence())
}

#[test]
fn a_thread_that_slept_for_many_intervals_then_ran_once_is_counted_exactly() {
    if !require_root() {
        return;
    }
    // Burns 0.3 s, sleeps 5 s (20 intervals of 250 ms), burns 0.4 s once.
    let (agent, container_id, _cgroup, mut process) =
        agent_and_container_running(&["wake-once", "0.3", "5", "0.4"]);
    assert_eq!(process.first_line(), "slept");
    agent.wait_intervals(2);
    let (before, _) = agent_cpu_seconds(&agent, &container_id, process.pid());
    let kernel_before = schedstat_ns(process.pid()) as f64 / 1e9;
    // Asleep: nothing may be added, interval after interval.
    let start = agent.sequence();
    while agent.sequence() < start + 8 {
        agent.wait_intervals(1);
        let (now, _) = agent_cpu_seconds(&agent, &container_id, process.pid());
        assert!(
            (now - before).abs() < 1e-9,
            "asleep, yet {before:.6} s became {now:.6} s"
        );
    }
    assert_eq!(process.first_line(), "ran again");
    agent.wait_intervals(2);
    let (after, _) = agent_cpu_seconds(&agent, &container_id, process.pid());
    let kernel_after = schedstat_ns(process.pid()) as f64 / 1e9;
    let ours = after - before;
    let kernel = kernel_after - kernel_before;
    eprintln!(
        "one slice after 20 intervals asleep: powerlens {ours:.6} s, schedstat {kernel:.6} s; totals {after:.6} s vs {kernel_after:.6} s"
    );
    assert!(
        relative_error(ours, kernel) < 0.01,
        "the slice: powerlens {ours:.6} s vs schedstat {kernel:.6} s"
    );
    assert!(
        relative_error(after, kernel_after) < 0.01,
        "the total: powerlens {after:.6} s vs schedstat {kernel_after:.6} s"
    );
}

#[test]
fn a_thread_that_never_switches_out_is_counted_in_every_interval() {
    if !require_root() {
        return;
    }
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if cpus < 2 {
        eprintln!("skipping: needs a second CPU to hold a real-time burner");
        return;
    }
    // A real-time thread pinned to the last CPU: no normal task preempts it,
    // so it runs its 0.8 s (under the kernel's 0.95 s real-time budget per
    // second) with no switch out, or one at most: a kernel thread of higher
    // priority (or the fair class's deadline server) may take a slice. The
    // agent reads every 100 ms, so the burn spans seven intervals or so.
    let agent = Agent::start_with_interval("100ms", &["--method", "ebpf"]);
    let container_id = random_hex(64);
    let cgroup = TestCgroup::create(&format!("system.slice/docker-{container_id}.scope"));
    let mut process = spawn_in(
        Some(&cgroup),
        &workload_binary(),
        &["fifo-burn", &(cpus - 1).to_string(), "0.8"],
    );
    assert_eq!(process.first_line(), "ready");
    // Each sample reads the agent's figure between two reads of the
    // snapshot sequence (kept only when they agree) and those between two
    // reads of the burner's arrivals on a CPU (schedstat's third field: one
    // more after each switch out and back).
    struct Sample {
        arrivals_before: u64,
        sequence: u64,
        seconds: f64,
        arrivals_after: u64,
    }
    let mut samples: Vec<Sample> = Vec::new();
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_millis(1_000) {
        let arrivals_before = schedstat_arrivals(process.pid());
        let sequence = agent.sequence();
        let (seconds, sequence_after) = agent_cpu_seconds(&agent, &container_id, process.pid());
        let arrivals_after = schedstat_arrivals(process.pid());
        if sequence == sequence_after {
            samples.push(Sample {
                arrivals_before,
                sequence,
                seconds,
                arrivals_after,
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let switches = process.first_line();
    eprintln!("{switches}");
    // The kernel read behind the snapshot first seen in sample k happened
    // after the previous sample read an older sequence, and before sample
    // k read this one: the outer arrival counts of those two samples
    // bracket it. Between two snapshots whose brackets show no arrival the
    // thread never switched, so any growth there came from reading the
    // running thread; without that, only a switch could make it grow.
    let firsts: Vec<(usize, &Sample)> = samples
        .iter()
        .enumerate()
        .skip(1)
        .filter(|(index, sample)| sample.sequence != samples[index - 1].sequence)
        .collect();
    let grew_without_switch = firsts
        .windows(2)
        .filter(|pair| {
            let (first_index, first) = pair[0];
            let (_, second) = pair[1];
            let switch_free = samples[first_index - 1].arrivals_before == second.arrivals_after;
            switch_free && second.seconds > first.seconds + 0.05
        })
        .count();
    let seen: Vec<(u64, f64, u64)> = firsts
        .iter()
        .map(|(_, sample)| (sample.sequence, sample.seconds, sample.arrivals_after))
        .collect();
    eprintln!(
        "snapshots during the burn (sequence, cpu s, arrivals): {seen:?}; grew without a switch in {grew_without_switch}"
    );
    assert!(
        grew_without_switch >= 2,
        "a thread that did not switch out must grow in the intervals it ran through: {seen:?}"
    );
    agent.wait_intervals(2);
    let (total, _) = agent_cpu_seconds(&agent, &container_id, process.pid());
    let kernel = schedstat_ns(process.pid()) as f64 / 1e9;
    assert!(
        relative_error(total, kernel) < 0.01,
        "total: powerlens {total:.6} s vs schedstat {kernel:.6} s"
    );
}
