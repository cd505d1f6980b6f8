//! The image, built and run for real: the runtime stage of deploy/Dockerfile
//! from the agent built here, on a local Debian base (`cargo xtask setup`
//! makes it with debootstrap), run by podman with exactly the DaemonSet's
//! capabilities, seccomp profile, read-only root, mounts and host PID
//! namespace. Needs root, podman and the base image; skips saying why.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use integration_tests::{
    TestCgroup, free_port, kubernetes_cgroup, random_hex, random_uuid, require_root,
    sibling_binary, spawn_in, workload_binary,
};

const BASE: &str = "localhost/powerlens-base:bookworm";

fn deploy() -> &'static Path {
    integration_tests::deploy_dir()
}

fn podman(args: &[&str]) -> (bool, String) {
    let output = Command::new("podman").args(args).output().expect("podman");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

/// Removes the container and the image, also when the test fails.
struct Cleanup {
    container: String,
    image: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", &self.container]);
        let _ = podman(&["rmi", "-f", &self.image]);
    }
}

#[test]
fn the_image_runs_the_agent_with_only_the_daemonsets_privileges() {
    if !require_root() {
        return;
    }
    if Command::new("podman").arg("--version").output().is_err() {
        eprintln!("skipping: podman is not installed (`cargo xtask setup` installs it)");
        return;
    }
    if !podman(&["image", "exists", BASE]).0 {
        eprintln!("skipping: no {BASE} image (`cargo xtask setup` builds it with debootstrap)");
        return;
    }
    let tag = random_hex(8);
    let image = format!("localhost/powerlens-test:{tag}");
    let container = format!("powerlens-test-{tag}");
    let _cleanup = Cleanup {
        container: container.clone(),
        image: image.clone(),
    };

    // The build context: the Dockerfile and the agent built here.
    let context = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(context.path().join("target/release")).expect("mkdir");
    let binary = context.path().join("target/release/powerlens");
    std::fs::copy(sibling_binary("powerlens"), &binary).expect("copy the agent");
    let _ = Command::new("strip")
        .arg("--strip-debug")
        .arg(&binary)
        .status();
    std::fs::copy(
        deploy().join("Dockerfile"),
        context.path().join("Dockerfile"),
    )
    .expect("copy");
    let started = Instant::now();
    let (built, text) = podman(&[
        "build",
        "--target",
        "runtime-prebuilt",
        "--build-arg",
        &format!("RUNTIME_IMAGE={BASE}"),
        "-t",
        &image,
        "-f",
        &context.path().join("Dockerfile").display().to_string(),
        &context.path().display().to_string(),
    ]);
    assert!(built, "podman build: {text}");
    eprintln!("image built in {:.1} s", started.elapsed().as_secs_f64());

    // The ConfigMap's config, on free ports and this machine's cgroup tree.
    let config_text = integration_tests::configmap_config();
    let (api, metrics) = (free_port(), free_port());
    let unified = Path::new("/sys/fs/cgroup/unified").exists();
    let config_text = config_text
        .replace("127.0.0.1:9876", &format!("127.0.0.1:{api}"))
        .replace("0.0.0.0:9877", &format!("127.0.0.1:{metrics}"))
        .replace(
            "cgroup_root = \"/host/sys/fs/cgroup\"",
            if unified {
                "cgroup_root = \"/host/sys/fs/cgroup/unified\""
            } else {
                "cgroup_root = \"/host/sys/fs/cgroup\""
            },
        )
        .replace("interval = \"1s\"", "interval = \"500ms\"");
    let config_dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(config_dir.path().join("powerlens.toml"), config_text).expect("write config");
    let state_dir = tempfile::tempdir().expect("tempdir");

    let capabilities = integration_tests::daemonset_capabilities();
    assert_eq!(
        capabilities,
        ["BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH"]
    );
    let seccomp = deploy().join("kubernetes/seccomp/powerlens.json");
    let (ran, text) = podman(&[
        "run",
        "-d",
        "--name",
        &container,
        "--pid=host",
        "--network=host",
        "--cap-drop=ALL",
        &format!("--cap-add={}", capabilities.join(",")),
        "--security-opt",
        &format!("seccomp={}", seccomp.display()),
        "--security-opt",
        "no-new-privileges",
        "--read-only",
        "-v",
        "/proc:/host/proc:ro",
        "-v",
        "/sys:/host/sys:ro",
        "-v",
        "/sys/kernel/btf:/sys/kernel/btf:ro",
        "-v",
        &format!("{}:/etc/powerlens:ro", config_dir.path().display()),
        "-v",
        &format!("{}:/var/lib/powerlens", state_dir.path().display()),
        &image,
    ]);
    assert!(ran, "podman run: {text}");

    let http = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(3)))
            .build(),
    );
    let get = |path: &str| -> Option<serde_json::Value> {
        let mut response = http
            .get(&format!("http://127.0.0.1:{api}{path}"))
            .call()
            .ok()?;
        serde_json::from_str(&response.body_mut().read_to_string().ok()?).ok()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let health = loop {
        if let Some(health) = get("/healthz").filter(|h| h["sequence"].as_u64() > Some(1)) {
            break health;
        }
        assert!(
            Instant::now() < deadline,
            "the agent in the image did not answer: {}",
            podman(&["logs", &container]).1
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        health["method"],
        "ebpf",
        "the programs load with only these privileges: {health}\n{}",
        podman(&["logs", &container]).1
    );

    // A container started beside it gets its CPU time.
    let container_id = random_hex(64);
    let cgroup: TestCgroup = kubernetes_cgroup(&container_id, &random_uuid());
    let burner = spawn_in(Some(&cgroup), &workload_binary(), &["burn", "30"]);
    std::thread::sleep(Duration::from_secs(2));
    burner.signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_secs(1));
    let kernel = integration_tests::schedstat_ns(burner.pid()) as f64 / 1e9;
    let seen = get(&format!("/api/v1/containers/{container_id}")).expect("the container");
    let ours = seen["cpu_seconds"].as_f64().expect("cpu_seconds");
    eprintln!("in the image: method ebpf, container {ours:.3} s vs schedstat {kernel:.3} s");
    assert!(
        integration_tests::relative_error(ours, kernel) < 0.02,
        "{ours} vs {kernel}"
    );
}
