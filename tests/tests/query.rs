//! `powerlens query` against a running agent: a container burning CPU shows
//! with growing energy, `--json` is the API's objects, and each failure has
//! its exit code. Needs root (the agent loads its programs).

use std::{process::Command, time::Duration};

use integration_tests::{
    Agent, TestCgroup, kubernetes_cgroup, random_hex, random_uuid, require_root, sibling_binary,
    spawn_in, workload_binary,
};
use serde_json::Value;

fn query(agent: &str, args: &[&str]) -> (i32, String, String) {
    let output = Command::new(sibling_binary("powerlens"))
        .arg("query")
        .args(["--agent", agent])
        .args(args)
        .output()
        .expect("run powerlens query");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn query_answers_from_the_running_agent_and_fails_with_distinct_codes() {
    if !require_root() {
        return;
    }
    let agent = Agent::start(&["--method", "ebpf"]);
    let url = agent.base_url.clone();
    let container_id = random_hex(64);
    let pod_uid = random_uuid();
    let cgroup = kubernetes_cgroup(&container_id, &pod_uid);
    let _burner = spawn_in(Some(&cgroup), &workload_binary(), &["burn", "30"]);
    // Two containers sharing their first 12 characters, for the ambiguity.
    let prefix = random_hex(12);
    let slice = TestCgroup::create(&format!("powerlens-test-{}.slice", random_hex(8)));
    let twins: Vec<TestCgroup> = (0..2)
        .map(|_| {
            TestCgroup::create(&format!(
                "{}/docker-{prefix}{}.scope",
                slice.relative.trim_start_matches('/'),
                random_hex(52)
            ))
        })
        .collect();
    let _twin_burners: Vec<_> = twins
        .iter()
        .map(|twin| spawn_in(Some(twin), &workload_binary(), &["burn", "30"]))
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    agent.wait_intervals(2);

    // A table, with the container in it.
    let (code, table, stderr) = query(&url, &["containers"]);
    assert_eq!(code, 0, "{stderr}");
    eprintln!("{table}");
    assert!(table.starts_with("CONTAINER"), "{table}");
    assert!(table.contains(&container_id[..12]), "{table}");
    assert!(
        table.contains("~"),
        "estimated figures carry a tilde: {table}"
    );

    // --json is the API's object; energy grows between two queries.
    let short = &container_id[..12];
    let (code, first, stderr) = query(&url, &["container", short, "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let first: Value = serde_json::from_str(&first).expect("JSON");
    assert_eq!(first["container_id"], container_id.as_str());
    assert_eq!(first["pod_uid"], pod_uid.as_str());
    agent.wait_intervals(2);
    let (_, second, _) = query(&url, &["container", short, "--json"]);
    let second: Value = serde_json::from_str(&second).expect("JSON");
    let energy = |v: &Value| v["energy_joules"]["total"].as_f64().expect("energy");
    eprintln!(
        "container {short}: {:.3} J, then {:.3} J",
        energy(&first),
        energy(&second)
    );
    assert!(energy(&second) > energy(&first), "energy grows");
    let (_, api) = agent.get(&format!("/api/v1/containers/{container_id}"));
    assert_eq!(
        api.as_object().map(|o| o.keys().collect::<Vec<_>>()),
        second.as_object().map(|o| o.keys().collect::<Vec<_>>()),
        "the same object as the API's"
    );
    let (code, node, _) = query(&url, &["node"]);
    assert_eq!(code, 0);
    assert!(node.contains("package"), "{node}");
    let (code, pods, _) = query(&url, &["pods", "--json"]);
    assert_eq!(code, 0);
    assert!(
        serde_json::from_str::<Value>(&pods)
            .expect("JSON")
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["pod_uid"] == pod_uid.as_str())),
        "{pods}"
    );

    // Each failure, its code and one line.
    let (code, _, stderr) = query(&url, &["container", &random_hex(64)]);
    assert_eq!(code, 4, "unknown id: {stderr}");
    let (code, _, stderr) = query(&url, &["container", &prefix]);
    assert_eq!(code, 5, "ambiguous prefix: {stderr}");
    assert!(
        stderr.contains(&prefix) && stderr.contains("candidates"),
        "{stderr}"
    );
    let (code, _, stderr) = query("http://127.0.0.1:1", &["node"]);
    assert_eq!(code, 3, "no agent: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let (code, _, stderr) = query(&url, &["containers", "--sort", "loudness"]);
    assert_eq!(code, 2, "malformed flag: {stderr}");
}

fn tmux(args: &[&str]) -> String {
    let output = Command::new("tmux").args(args).output().expect("tmux");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn top_shows_the_node_and_its_containers_in_a_real_terminal_and_quits_cleanly() {
    if !require_root() {
        return;
    }
    if Command::new("tmux").arg("-V").output().is_err() {
        eprintln!("skipping: tmux is not installed (`cargo xtask setup` installs it)");
        return;
    }
    let agent = Agent::start(&["--method", "ebpf"]);
    let container_id = random_hex(64);
    let cgroup = kubernetes_cgroup(&container_id, &random_uuid());
    let _burner = spawn_in(Some(&cgroup), &workload_binary(), &["burn", "30"]);
    agent.wait_intervals(2);
    let session = format!("powerlens-top-{}", random_hex(6));
    let command = format!(
        "{} top --agent {} --every 0.5",
        sibling_binary("powerlens").display(),
        agent.base_url
    );
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "120",
        "-y",
        "30",
        &command,
    ]);
    struct Session(String);
    impl Drop for Session {
        fn drop(&mut self) {
            let _ = Command::new("tmux")
                .args(["kill-session", "-t", &self.0])
                .output();
        }
    }
    let _guard = Session(session.clone());
    let mut screen = String::new();
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(200));
        screen = tmux(&["capture-pane", "-p", "-t", &session]);
        if screen.contains(&container_id[..12]) {
            break;
        }
    }
    eprintln!("{screen}");
    assert!(screen.contains("powerlens top"), "{screen}");
    assert!(screen.contains("containers by power"), "{screen}");
    assert!(screen.contains(&container_id[..12]), "{screen}");
    // Processes, then quit: the pane (and so top) is gone.
    tmux(&["send-keys", "-t", &session, "r"]);
    std::thread::sleep(Duration::from_millis(800));
    let processes = tmux(&["capture-pane", "-p", "-t", &session]);
    assert!(processes.contains("processes by power"), "{processes}");
    tmux(&["send-keys", "-t", &session, "q"]);
    let mut gone = false;
    for _ in 0..25 {
        std::thread::sleep(Duration::from_millis(200));
        let listed = tmux(&["list-sessions", "-F", "#{session_name}"]);
        if !listed.lines().any(|name| name == session) {
            gone = true;
            break;
        }
    }
    assert!(gone, "q quits top");
}
