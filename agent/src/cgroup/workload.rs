//! cgroup path → workload: which container, pod, systemd unit or the host a
//! cgroup belongs to. Pure string work, no I/O: every container runtime and
//! cgroup driver names its cgroups differently, and this is where we learn
//! them all.
//!
//! Paths are relative to the cgroup v2 root, like the third field of a
//! `0::` line in `/proc/<pid>/cgroup`.

use std::fmt;

use serde::Serialize;

/// The container runtime, told apart by cgroup naming.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    Containerd,
    #[serde(rename = "cri-o")]
    CriO,
    Docker,
    Podman,
    /// A container id with no runtime marker (the cgroupfs driver of the
    /// kubelet names container cgroups by bare id).
    Unknown,
}

impl Runtime {
    pub const fn as_str(self) -> &'static str {
        match self {
            Runtime::Containerd => "containerd",
            Runtime::CriO => "cri-o",
            Runtime::Docker => "docker",
            Runtime::Podman => "podman",
            Runtime::Unknown => "unknown",
        }
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Kubernetes pod QoS class, from the kubelet's cgroup layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    pub const fn as_str(self) -> &'static str {
        match self {
            QosClass::Guaranteed => "guaranteed",
            QosClass::Burstable => "burstable",
            QosClass::BestEffort => "besteffort",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Pod {
    /// The pod UID with dashes (`1f2e…-…`), as Kubernetes prints it.
    pub uid: String,
    pub qos: QosClass,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Workload {
    Container {
        id: String,
        runtime: Runtime,
        pod: Option<Pod>,
        /// Set when the cgroup lives in a subtree delegated to an
        /// unprivileged user (a rootless container, or anything that user
        /// created there). Any such user can name a cgroup after another
        /// container's id, so the id alone is then not the identity: the
        /// owner is part of it, and such a cgroup never counts as a pod's.
        owner_uid: Option<u32>,
    },
    /// A pod-level cgroup that is not inside any container (the pause
    /// process on some runtimes, or processes the kubelet put there).
    PodSandbox { pod: Pod },
    /// A systemd service or scope (e.g. `sshd.service`, `session-3.scope`).
    SystemdUnit { name: String },
    /// Everything else: kernel threads, the root cgroup, bare slices.
    Host,
}

impl Workload {
    /// A short kind name for tables and JSON (`container`, `pod`, `service`, `host`).
    pub const fn kind(&self) -> &'static str {
        match self {
            Workload::Container { .. } => "container",
            Workload::PodSandbox { .. } => "pod",
            Workload::SystemdUnit { .. } => "service",
            Workload::Host => "host",
        }
    }

    /// A stable name for the workload, unique within a node.
    pub fn name(&self) -> String {
        match self {
            Workload::Container {
                id,
                owner_uid: Some(uid),
                ..
            } => format!("{id}@uid{uid}"),
            Workload::Container { id, .. } => id.clone(),
            Workload::PodSandbox { pod } => format!("pod{}", pod.uid),
            Workload::SystemdUnit { name } => name.clone(),
            Workload::Host => "host".to_owned(),
        }
    }

    pub fn pod(&self) -> Option<&Pod> {
        match self {
            Workload::Container { pod, .. } => pod.as_ref(),
            Workload::PodSandbox { pod } => Some(pod),
            _ => None,
        }
    }
}

/// Classifies a cgroup path. Never panics, whatever the input.
pub fn parse_cgroup_path(path: &str) -> Workload {
    classify_cgroup(path, None)
}

/// Classifies a cgroup path that the resolver found owned by `owner_uid`
/// (the directory or one of its parents belongs to that unprivileged user,
/// so the user can create and name cgroups there). A path inside a systemd
/// user manager (`user@<uid>.service`) is delegated to that user whatever
/// the directory's owner.
pub fn classify_cgroup(path: &str, owner_uid: Option<u32>) -> Workload {
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let owner_uid = owner_uid.or_else(|| {
        components.iter().find_map(|c| {
            c.strip_prefix("user@")?
                .strip_suffix(".service")?
                .parse::<u32>()
                .ok()
        })
    });

    // The innermost container wins: a Kubernetes node run inside Docker
    // (kind, k3d) nests `/docker/<id>/kubepods/...` and the pod's container
    // is the one that matters.
    let mut container: Option<(usize, String, Runtime)> = None;
    for (index, component) in components.iter().enumerate() {
        let parent = index.checked_sub(1).map(|i| components[i]);
        if let Some((id, runtime)) = container_marker(component, parent) {
            container = Some((index, id, runtime));
        }
    }

    let pod_search_end = container.as_ref().map_or(components.len(), |(i, _, _)| *i);
    // The kubelet's cgroups belong to root: a `kubepods` a user made in a
    // delegated subtree names no pod.
    let pod = match owner_uid {
        Some(_) => None,
        None => find_pod(&components[..pod_search_end]),
    };

    if let Some((_, id, runtime)) = container {
        return Workload::Container {
            id,
            runtime,
            pod,
            owner_uid,
        };
    }
    if let Some(pod) = pod {
        return Workload::PodSandbox { pod };
    }
    if let Some(unit) = components
        .iter()
        .rev()
        .find(|c| is_systemd_unit(c))
        .map(|c| (*c).to_owned())
    {
        return Workload::SystemdUnit { name: unit };
    }
    Workload::Host
}

/// A container id as runtimes write it: 64 lowercase hex digits.
fn is_container_id(candidate: &str) -> bool {
    candidate.len() == 64 && candidate.bytes().all(|b| b.is_ascii_hexdigit())
}

fn container_marker(component: &str, parent: Option<&str>) -> Option<(String, Runtime)> {
    // systemd driver: <prefix>-<id>.scope
    const SCOPED: [(&str, Runtime); 4] = [
        ("cri-containerd-", Runtime::Containerd),
        ("crio-", Runtime::CriO),
        ("docker-", Runtime::Docker),
        ("libpod-", Runtime::Podman),
    ];
    if let Some(stem) = component.strip_suffix(".scope") {
        for (prefix, runtime) in SCOPED {
            if let Some(id) = stem.strip_prefix(prefix)
                && is_container_id(id)
            {
                return Some((id.to_ascii_lowercase(), runtime));
            }
        }
        return None;
    }
    // cgroupfs driver: `/docker/<id>`, `/libpod_parent/libpod-<id>`, and
    // the kubelet's `/kubepods/<qos>/pod<uid>/<id>`.
    if let Some(id) = component.strip_prefix("libpod-")
        && is_container_id(id)
    {
        return Some((id.to_ascii_lowercase(), Runtime::Podman));
    }
    if is_container_id(component) {
        let runtime = match parent {
            Some("docker") => Runtime::Docker,
            Some(p) if p.starts_with("crio") => Runtime::CriO,
            _ => Runtime::Unknown,
        };
        return Some((component.to_ascii_lowercase(), runtime));
    }
    None
}

fn find_pod(components: &[&str]) -> Option<Pod> {
    let kubepods_at = components.iter().position(|c| {
        *c == "kubepods" || *c == "kubepods.slice" || c.ends_with("-kubepods.slice")
    })?;
    let mut qos = QosClass::Guaranteed;
    for component in &components[kubepods_at + 1..] {
        let name = component.strip_suffix(".slice").unwrap_or(component);
        // systemd driver: kubepods-burstable.slice, kubepods-burstable-pod<uid>.slice
        let name = name
            .strip_prefix("kubelet-kubepods-")
            .or_else(|| name.strip_prefix("kubepods-"))
            .unwrap_or(name);
        let name = if let Some(rest) = name.strip_prefix("burstable") {
            qos = QosClass::Burstable;
            rest.trim_start_matches('-')
        } else if let Some(rest) = name.strip_prefix("besteffort") {
            qos = QosClass::BestEffort;
            rest.trim_start_matches('-')
        } else {
            name
        };
        if let Some(uid) = name.strip_prefix("pod")
            && let Some(uid) = normalize_pod_uid(uid)
        {
            return Some(Pod { uid, qos });
        }
    }
    None
}

/// The systemd driver writes pod UIDs with `_` for `-` (a dash separates
/// slice levels). Accepts both; returns the dashed form, lowercase.
fn normalize_pod_uid(raw: &str) -> Option<String> {
    let uid: String = raw
        .chars()
        .map(|c| {
            if c == '_' {
                '-'
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect();
    let valid = !uid.is_empty()
        && uid.len() <= 64
        && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
        && uid.chars().any(|c| c.is_ascii_hexdigit());
    valid.then_some(uid)
}

fn is_systemd_unit(component: &str) -> bool {
    (component.ends_with(".service") || component.ends_with(".scope"))
        && component.len() > ".scope".len()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const ID: &str = "4a9d1b0c3f5e7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b";
    const UID: &str = "0a1b2c3d-4e5f-6789-abcd-ef0123456789";
    const UID_UNDERSCORE: &str = "0a1b2c3d_4e5f_6789_abcd_ef0123456789";

    fn container(id: &str, runtime: Runtime, pod: Option<(&str, QosClass)>) -> Workload {
        Workload::Container {
            id: id.to_owned(),
            runtime,
            pod: pod.map(|(uid, qos)| Pod {
                uid: uid.to_owned(),
                qos,
            }),
            owner_uid: None,
        }
    }

    #[test]
    fn a_user_cannot_pass_for_another_container_or_pod() {
        let real = parse_cgroup_path(&format!("/machine.slice/libpod-{ID}.scope"));
        let impostor = parse_cgroup_path(&format!(
            "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope"
        ));
        assert_eq!(real.name(), ID);
        assert_eq!(impostor.name(), format!("{ID}@uid1000"));
        assert_ne!(real, impostor);
        // Delegated by ownership rather than by systemd's naming.
        let owned = classify_cgroup(&format!("/kubepods/burstable/pod{UID}/{ID}"), Some(1001));
        assert_eq!(
            owned,
            Workload::Container {
                id: ID.to_owned(),
                runtime: Runtime::Unknown,
                pod: None,
                owner_uid: Some(1001),
            }
        );
        // Not a pod sandbox either.
        assert_eq!(
            classify_cgroup(&format!("/kubepods/burstable/pod{UID}"), Some(1001)).kind(),
            "host"
        );
    }

    #[test]
    fn kubernetes_containerd_systemd_driver() {
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_UNDERSCORE}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(
            parse_cgroup_path(&path),
            container(ID, Runtime::Containerd, Some((UID, QosClass::Burstable)))
        );
    }

    #[test]
    fn kubernetes_guaranteed_and_besteffort() {
        let guaranteed =
            format!("/kubepods.slice/kubepods-pod{UID_UNDERSCORE}.slice/cri-containerd-{ID}.scope");
        assert_eq!(
            parse_cgroup_path(&guaranteed),
            container(ID, Runtime::Containerd, Some((UID, QosClass::Guaranteed)))
        );
        let besteffort = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_UNDERSCORE}.slice/crio-{ID}.scope"
        );
        assert_eq!(
            parse_cgroup_path(&besteffort),
            container(ID, Runtime::CriO, Some((UID, QosClass::BestEffort)))
        );
    }

    #[test]
    fn kubernetes_cgroupfs_driver() {
        let path = format!("/kubepods/burstable/pod{UID}/{ID}");
        assert_eq!(
            parse_cgroup_path(&path),
            container(ID, Runtime::Unknown, Some((UID, QosClass::Burstable)))
        );
        let guaranteed = format!("/kubepods/pod{UID}/{ID}");
        assert_eq!(
            parse_cgroup_path(&guaranteed),
            container(ID, Runtime::Unknown, Some((UID, QosClass::Guaranteed)))
        );
    }

    #[test]
    fn pod_level_cgroup_without_container() {
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_UNDERSCORE}.slice"
        );
        assert_eq!(
            parse_cgroup_path(&path),
            Workload::PodSandbox {
                pod: Pod {
                    uid: UID.to_owned(),
                    qos: QosClass::Burstable
                }
            }
        );
    }

    #[test]
    fn docker_both_drivers() {
        assert_eq!(
            parse_cgroup_path(&format!("/system.slice/docker-{ID}.scope")),
            container(ID, Runtime::Docker, None)
        );
        assert_eq!(
            parse_cgroup_path(&format!("/docker/{ID}")),
            container(ID, Runtime::Docker, None)
        );
    }

    #[test]
    fn podman_rootful_rootless_and_cgroupfs() {
        assert_eq!(
            parse_cgroup_path(&format!("/machine.slice/libpod-{ID}.scope")),
            container(ID, Runtime::Podman, None)
        );
        assert_eq!(
            parse_cgroup_path(&format!(
                "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"
            )),
            Workload::Container {
                id: ID.to_owned(),
                runtime: Runtime::Podman,
                pod: None,
                owner_uid: Some(1000),
            }
        );
        assert_eq!(
            parse_cgroup_path(&format!("/libpod_parent/libpod-{ID}")),
            container(ID, Runtime::Podman, None)
        );
    }

    #[test]
    fn conmon_is_not_the_container() {
        let path = format!("/machine.slice/libpod-conmon-{ID}.scope");
        assert_eq!(
            parse_cgroup_path(&path),
            Workload::SystemdUnit {
                name: format!("libpod-conmon-{ID}.scope")
            }
        );
    }

    #[test]
    fn sub_cgroup_inside_a_container_belongs_to_it() {
        let path = format!("/system.slice/docker-{ID}.scope/init.scope");
        assert_eq!(
            parse_cgroup_path(&path),
            container(ID, Runtime::Docker, None)
        );
    }

    #[test]
    fn kind_node_nested_in_docker_picks_the_pod_container() {
        let outer = "1111111111111111111111111111111111111111111111111111111111111111";
        let path = format!(
            "/docker/{outer}/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_UNDERSCORE}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(
            parse_cgroup_path(&path),
            container(ID, Runtime::Containerd, Some((UID, QosClass::BestEffort)))
        );
    }

    #[test]
    fn systemd_units_and_host() {
        assert_eq!(
            parse_cgroup_path("/system.slice/sshd.service"),
            Workload::SystemdUnit {
                name: "sshd.service".to_owned()
            }
        );
        assert_eq!(
            parse_cgroup_path("/user.slice/user-1000.slice/session-3.scope"),
            Workload::SystemdUnit {
                name: "session-3.scope".to_owned()
            }
        );
        assert_eq!(
            parse_cgroup_path("/init.scope"),
            Workload::SystemdUnit {
                name: "init.scope".to_owned()
            }
        );
        assert_eq!(parse_cgroup_path("/"), Workload::Host);
        assert_eq!(parse_cgroup_path(""), Workload::Host);
        assert_eq!(parse_cgroup_path("/system.slice"), Workload::Host);
    }

    #[test]
    fn short_or_non_hex_ids_are_not_containers() {
        assert_eq!(parse_cgroup_path("/docker/abc123"), Workload::Host);
        let bad = "g".repeat(64);
        assert_eq!(
            parse_cgroup_path(&format!("/system.slice/docker-{bad}.scope")),
            Workload::SystemdUnit {
                name: format!("docker-{bad}.scope")
            }
        );
    }

    proptest! {
        #[test]
        fn never_panics(path in "\\PC{0,300}") {
            let _ = parse_cgroup_path(&path);
        }

        #[test]
        fn never_panics_on_path_like_input(parts in proptest::collection::vec("[a-z0-9_.@-]{0,80}", 0..12)) {
            let _ = parse_cgroup_path(&parts.join("/"));
        }

        #[test]
        fn containerd_pods_round_trip(id in "[0-9a-f]{64}", uid in "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", qos in 0..3u8) {
            let (slice, qos) = match qos {
                0 => ("".to_owned(), QosClass::Guaranteed),
                1 => ("kubepods-burstable.slice/".to_owned(), QosClass::Burstable),
                _ => ("kubepods-besteffort.slice/".to_owned(), QosClass::BestEffort),
            };
            let level = match qos {
                QosClass::Guaranteed => "kubepods".to_owned(),
                QosClass::Burstable => "kubepods-burstable".to_owned(),
                QosClass::BestEffort => "kubepods-besteffort".to_owned(),
            };
            let path = format!("/kubepods.slice/{slice}{level}-pod{}.slice/cri-containerd-{id}.scope", uid.replace('-', "_"));
            prop_assert_eq!(parse_cgroup_path(&path), Workload::Container {
                id: id.clone(),
                runtime: Runtime::Containerd,
                pod: Some(Pod { uid: uid.clone(), qos }),
                owner_uid: None,
            });
        }
    }
}
