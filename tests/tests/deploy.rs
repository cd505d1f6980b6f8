//! The deployment files, checked: the Kubernetes manifests against their
//! kinds' schemas (offline, `kubernetes-validate`), the ConfigMap's
//! embedded config with the agent's own parser, the systemd unit with
//! `systemd-analyze verify`. Tools are installed by `cargo xtask setup`; a
//! test says it skipped when its tool is missing.

use std::{path::Path, process::Command};

fn deploy() -> &'static Path {
    integration_tests::deploy_dir()
}

fn manifests() -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = ["kubernetes", "otel-collector"]
        .iter()
        .flat_map(|dir| {
            std::fs::read_dir(deploy().join(dir))
                .expect("deploy dir")
                .flatten()
        })
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n != "kustomization.yaml" && n != "config.yaml")
        })
        .collect();
    files.sort();
    files
}

#[test]
fn every_kubernetes_manifest_validates_against_its_schema() {
    if Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "skipping: kubernetes-validate is not installed (`cargo xtask setup` installs it)"
        );
        return;
    }
    let files = manifests();
    assert!(files.len() >= 5, "{files:?}");
    let output = Command::new("kubernetes-validate")
        .args(["--kubernetes-version", "1.30.0", "--strict"])
        .args(&files)
        .output()
        .expect("kubernetes-validate");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    eprintln!("{text}");
    assert!(output.status.success(), "{text}");
    assert!(!text.contains("failed"), "{text}");
    assert!(text.matches("passed").count() >= files.len(), "{text}");
    // Every manifest is in its directory's kustomization.
    for file in &files {
        let kustomization = std::fs::read_to_string(file.with_file_name("kustomization.yaml"))
            .expect("kustomization.yaml");
        let name = file.file_name().unwrap().to_string_lossy();
        assert!(
            kustomization.contains(&*name),
            "{name} not in its kustomization.yaml"
        );
    }
}

#[test]
fn the_daemonset_asks_for_exactly_the_capabilities_the_agent_needs() {
    let text = std::fs::read_to_string(deploy().join("kubernetes/daemonset.yaml")).expect("read");
    assert!(text.contains("privileged: false"));
    assert!(text.contains("drop: [\"ALL\"]"));
    assert!(text.contains("readOnlyRootFilesystem: true"));
    assert!(text.contains("hostPID: true"));
    assert!(!text.contains("- SYS_ADMIN"), "no CAP_SYS_ADMIN");
    assert_eq!(
        integration_tests::daemonset_capabilities(),
        ["BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH"]
    );
}

#[test]
fn the_configmaps_config_is_one_the_agent_parses() {
    let text = integration_tests::configmap_config();
    let config = powerlens::config::Config::from_toml(&text, Path::new("configmap.yaml"))
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(config.listen.to_string(), "127.0.0.1:9876");
    assert_eq!(
        config.otlp.endpoint.as_deref(),
        Some("http://otel-collector.powerlens.svc:4317")
    );
    assert_eq!(
        config.controller.mode,
        powerlens::controller::settings::Mode::Observe
    );
}

#[test]
fn the_systemd_unit_verifies() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipping: systemd-analyze is not installed");
        return;
    }
    // The unit names /usr/local/bin/powerlens; verify a copy that names the
    // binary built here (verify checks that ExecStart exists).
    let unit = std::fs::read_to_string(deploy().join("systemd/powerlens.service")).expect("read");
    let binary = integration_tests::sibling_binary("powerlens");
    let copy = unit.replace("/usr/local/bin/powerlens", &binary.display().to_string());
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("powerlens.service");
    std::fs::write(&path, copy).expect("write");
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze");
    let text = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    // Lines about the machine (no running systemd in a container, other
    // units' files) are not about our unit.
    let ours: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("powerlens.service"))
        .collect();
    eprintln!("{text}");
    assert!(ours.is_empty(), "systemd-analyze verify: {ours:?}");
    for option in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "StateDirectory=powerlens",
        "Restart=on-failure",
        "CapabilityBoundingSet=CAP_BPF CAP_PERFMON",
    ] {
        assert!(unit.contains(option), "{option}");
    }
}

#[test]
fn the_seccomp_profile_is_the_runtime_default_plus_bpf_and_perf_event_open() {
    let ours: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy().join("kubernetes/seccomp/powerlens.json")).expect("read"),
    )
    .expect("JSON");
    let default_path = Path::new("/usr/share/containers/seccomp.json");
    let Ok(default) = std::fs::read_to_string(default_path) else {
        eprintln!(
            "skipping the comparison: no {} (podman's containers-common)",
            default_path.display()
        );
        return;
    };
    let default: serde_json::Value = serde_json::from_str(&default).expect("JSON");
    // Every syscall name with its action and conditions, both ways.
    let rules = |profile: &serde_json::Value| -> std::collections::BTreeSet<String> {
        profile["syscalls"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|rule| {
                let condition = format!(
                    "{} {} {} {}",
                    rule["action"], rule["args"], rule["includes"], rule["excludes"]
                );
                rule["names"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(move |name| format!("{} {condition}", name.as_str().unwrap_or("")))
            })
            .collect()
    };
    let (ours_rules, default_rules) = (rules(&ours), rules(&default));
    let added: Vec<&String> = ours_rules.difference(&default_rules).collect();
    let removed: Vec<&String> = default_rules.difference(&ours_rules).collect();
    assert_eq!(ours["defaultAction"], default["defaultAction"]);
    assert_eq!(added.len(), 2, "added: {added:?}");
    assert!(
        added
            .iter()
            .all(|r| r.starts_with("bpf \"SCMP_ACT_ALLOW\" [] {} {}")
                || r.starts_with("perf_event_open \"SCMP_ACT_ALLOW\" [] {} {}")),
        "{added:?}"
    );
    // What went: only the rules that tied those two to CAP_SYS_ADMIN.
    assert_eq!(removed.len(), 4, "removed: {removed:?}");
    assert!(
        removed
            .iter()
            .all(|r| r.starts_with("bpf ") || r.starts_with("perf_event_open ")),
        "{removed:?}"
    );
}

#[test]
fn the_manifests_and_the_dockerfile_pass_checkov_and_the_dockerfile_hadolint() {
    if Command::new("checkov").arg("--version").output().is_err() {
        eprintln!("skipping: checkov is not installed (`cargo xtask setup` installs it)");
        return;
    }
    let output = Command::new("checkov")
        .args([
            "--framework",
            "kubernetes,dockerfile",
            "--compact",
            "--quiet",
            "-d",
        ])
        .arg(deploy())
        .output()
        .expect("checkov");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    eprintln!("{text}");
    assert!(output.status.success(), "checkov found problems:\n{text}");
    assert!(text.contains("Failed checks: 0"), "{text}");
    // Every skip carries its reason in the file.
    for file in manifests().iter().chain([&deploy().join("Dockerfile")]) {
        let content = std::fs::read_to_string(file).expect("read");
        for line in content.lines().filter(|l| l.contains("checkov")) {
            let reason = line
                .split_once('=')
                .or_else(|| line.rsplit_once(':'))
                .map_or("", |(_, r)| r.trim());
            assert!(
                reason.len() > 10,
                "{}: a skip without its reason: {line}",
                file.display()
            );
        }
    }
    let output = Command::new("hadolint")
        .arg(deploy().join("Dockerfile"))
        .output()
        .expect("hadolint");
    assert!(
        output.status.success(),
        "hadolint: {}",
        String::from_utf8_lossy(&output.stdout)
    );
}

/// The Collector's configuration as JSON (PyYAML, which checkov brings).
fn collector_config() -> Option<serde_json::Value> {
    let output = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(deploy().join("otel-collector/config.yaml"))
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| serde_json::from_slice(&output.stdout).ok())
        .flatten()
}

#[test]
fn the_collector_pipeline_uses_only_defined_components_and_the_agents_attribute_names() {
    let Some(config) = collector_config() else {
        eprintln!("skipping: python3 with PyYAML is not installed (`cargo xtask setup` brings it)");
        return;
    };
    let pipelines = config["service"]["pipelines"]
        .as_object()
        .expect("pipelines");
    assert!(pipelines.contains_key("metrics"), "{pipelines:?}");
    for (name, pipeline) in pipelines {
        for kind in ["receivers", "processors", "exporters"] {
            for component in pipeline[kind].as_array().into_iter().flatten() {
                let component = component.as_str().expect("a name");
                assert!(
                    config[kind].get(component).is_some(),
                    "pipeline {name} uses {kind} {component}, which is not defined"
                );
            }
        }
    }
    let processors: Vec<&str> = pipelines["metrics"]["processors"]
        .as_array()
        .expect("processors")
        .iter()
        .filter_map(|p| p.as_str())
        .collect();
    let position = |prefix: &str| {
        processors
            .iter()
            .position(|p| p.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in {processors:?}"))
    };
    assert_eq!(position("memory_limiter"), 0, "{processors:?}");
    assert!(
        position("groupbyattrs") < position("k8sattributes"),
        "k8sattributes after the regrouping: {processors:?}"
    );
    assert!(
        position("k8sattributes") < position("batch"),
        "{processors:?}"
    );
    // One source of truth: the attribute names the agent puts on points.
    use powerlens::sinks::otlp::instruments::{CONTAINER_ID, POD_UID};
    let group = processors[position("groupbyattrs")];
    let keys: Vec<&str> = config["processors"][group]["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter_map(|k| k.as_str())
        .collect();
    assert_eq!(keys, [POD_UID, CONTAINER_ID]);
    let association = &config["processors"]["k8sattributes"]["pod_association"][0]["sources"][0];
    assert_eq!(association["from"], "resource_attribute");
    assert_eq!(association["name"], POD_UID);
}
