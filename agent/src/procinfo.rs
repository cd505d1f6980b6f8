//! Small reads of `/proc` under a configurable root, shared by the sources.

use std::path::Path;

use procfs::{FromRead as _, process::Stat};

/// USER_HZ, the unit of `/proc/<pid>/stat` times.
pub fn clock_ticks_per_second() -> u64 {
    procfs::ticks_per_second().max(1)
}

/// `/proc/<pid>/stat` of one process, parsed.
pub fn read_stat(procfs_root: &Path, pid: u32) -> Option<Stat> {
    Stat::from_file(procfs_root.join(pid.to_string()).join("stat")).ok()
}

/// Whether the process `pid` that started at `start_boottime_ns` (ns since
/// boot, as the kernel programs report it) is still alive: its PID exists and
/// was not reused by a later process. A zombie is gone, unless it is a
/// thread-group leader that exited before its other threads: the process
/// then lives on in them.
pub fn process_alive(
    procfs_root: &Path,
    pid: u32,
    start_boottime_ns: u64,
    ticks_per_second: u64,
) -> bool {
    let Some(stat) = read_stat(procfs_root, pid) else {
        return false;
    };
    runs_on(stat.state, stat.num_threads)
        && same_start(stat.starttime, start_boottime_ns, ticks_per_second)
}

/// A process in `state` with `num_threads` threads (the count still holds
/// a zombie leader until the last of its threads is gone) still runs.
pub fn runs_on(state: char, num_threads: i64) -> bool {
    match state {
        'X' => false,
        'Z' => num_threads > 1,
        _ => true,
    }
}

/// `/proc` reports start time in clock ticks, truncated: compare in ticks.
pub fn same_start(starttime_ticks: u64, start_boottime_ns: u64, ticks_per_second: u64) -> bool {
    let ns_per_tick = 1_000_000_000 / ticks_per_second.max(1);
    start_boottime_ns / ns_per_tick.max(1) == starttime_ticks
}

/// Converts `/proc/<pid>/stat` start ticks to ns since boot.
pub fn ticks_to_ns(ticks: u64, ticks_per_second: u64) -> u64 {
    ticks.saturating_mul(1_000_000_000 / ticks_per_second.max(1))
}

/// The numeric entries of the procfs root.
pub fn list_pids(procfs_root: &Path) -> std::io::Result<Vec<u32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir(procfs_root)? {
        let entry = entry?;
        if let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// The v2 cgroup path of a process from `/proc/<pid>/cgroup` (the `0::` line).
pub fn read_v2_cgroup_path(procfs_root: &Path, pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(procfs_root.join(pid.to_string()).join("cgroup")).ok()?;
    parse_v2_cgroup_line(&text).map(str::to_owned)
}

pub fn parse_v2_cgroup_line(text: &str) -> Option<&str> {
    text.lines().find_map(|line| line.strip_prefix("0::"))
}

/// A path from `/proc/<pid>/cgroup` read inside a cgroup namespace is
/// relative to the namespace's root: a process outside it reads like
/// `/../../kubepods/…`. Joins it to the root's real path (from the v2 root)
/// and resolves `..`; `None` if it climbs above the real root.
pub fn resolve_in_namespace(namespace_root: &str, path: &str) -> Option<String> {
    let mut components: Vec<&str> = namespace_root
        .split('/')
        .filter(|c| !c.is_empty())
        .collect();
    for component in path.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                components.pop()?;
            }
            name => components.push(name),
        }
    }
    Some(format!("/{}", components.join("/")))
}

/// Whether this process runs in a PID namespace other than the initial one
/// (`NSpid:` in its status lists one PID per level). The kernel's task
/// iterators then see only that namespace's tasks.
pub fn in_child_pid_namespace(procfs_root: &Path) -> std::io::Result<bool> {
    let status = std::fs::read_to_string(procfs_root.join("self/status"))?;
    Ok(status
        .lines()
        .find_map(|line| line.strip_prefix("NSpid:"))
        .is_some_and(|pids| pids.split_whitespace().count() > 1))
}

/// The real path (from the v2 root) of the root of this process's cgroup
/// namespace, when it has one of its own (an agent in a pod): found as the
/// cgroup under `cgroup_root` that lists this process, minus the path this
/// process sees for itself. `None` when the two agree (no namespace), or
/// its cgroup cannot be found: paths are then taken as they are. (Comparing
/// `/proc/1/ns/cgroup` would be cheaper, but reading another process's
/// namespace links needs ptrace rights a hardened pod may not have.)
pub fn cgroup_namespace_root(procfs_root: &Path, cgroup_root: &Path) -> Option<String> {
    let seen_from_inside = read_v2_cgroup_path(procfs_root, std::process::id())?;
    let real = own_real_cgroup(cgroup_root)?;
    let depth_inside = seen_from_inside
        .split('/')
        .filter(|c| !c.is_empty())
        .count();
    let mut components: Vec<&str> = real.split('/').filter(|c| !c.is_empty()).collect();
    components.truncate(components.len().saturating_sub(depth_inside));
    let root = format!("/{}", components.join("/"));
    (resolve_in_namespace(&root, &seen_from_inside).as_deref() == Some(real.as_str())
        && real != seen_from_inside)
        .then_some(root)
}

/// The cgroup (path from `cgroup_root`) whose `cgroup.procs` lists this
/// process.
fn own_real_cgroup(cgroup_root: &Path) -> Option<String> {
    let pid = std::process::id().to_string();
    let mut pending = vec![(cgroup_root.to_path_buf(), String::from("/"))];
    while let Some((dir, relative)) = pending.pop() {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        if procs.lines().any(|line| line.trim() == pid) {
            return Some(relative);
        }
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                let name = entry.file_name().to_string_lossy().into_owned();
                let child = format!("{}/{name}", relative.trim_end_matches('/'));
                pending.push((entry.path(), child));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zombie_leader_with_live_threads_runs_on() {
        assert!(runs_on('R', 1));
        assert!(runs_on('Z', 3), "leader exited, two threads left");
        assert!(!runs_on('Z', 1), "an ordinary zombie");
        assert!(!runs_on('X', 1));
    }

    #[test]
    fn namespaced_paths_resolve_against_the_namespace_root() {
        let root = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podA.slice/cri-containerd-agent.scope";
        assert_eq!(
            resolve_in_namespace(
                root,
                "/../../kubepods-besteffort.slice/kubepods-besteffort-podB.slice/cri-containerd-x.scope"
            )
            .as_deref(),
            Some(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-besteffort.slice/kubepods-besteffort-podB.slice/cri-containerd-x.scope"
            )
        );
        assert_eq!(resolve_in_namespace(root, "/").as_deref(), Some(root));
        assert_eq!(
            resolve_in_namespace(root, "/../../../../system.slice/sshd.service").as_deref(),
            Some("/system.slice/sshd.service")
        );
        assert_eq!(resolve_in_namespace("/a", "/../../x"), None);
        assert_eq!(
            resolve_in_namespace("/", "/system.slice").as_deref(),
            Some("/system.slice")
        );
    }

    #[test]
    fn this_test_runs_in_the_initial_namespaces_here() {
        assert!(!in_child_pid_namespace(Path::new("/proc")).unwrap());
        let Ok(root) = crate::cgroup::detect_v2_root(Path::new("/proc")) else {
            eprintln!("skipping: no cgroup v2 hierarchy here");
            return;
        };
        assert_eq!(cgroup_namespace_root(Path::new("/proc"), &root), None);
    }

    #[test]
    fn start_times_compare_in_ticks() {
        assert!(same_start(12345, 123_450_000_000 + 9_999_999, 100));
        assert!(!same_start(12345, 123_460_000_000, 100));
        assert_eq!(ticks_to_ns(3, 100), 30_000_000);
    }

    #[test]
    fn finds_the_v2_line_in_hybrid_and_pure_layouts() {
        let hybrid = "12:pids:/user.slice\n1:name=systemd:/user.slice/session-1.scope\n0::/user.slice/session-1.scope\n";
        assert_eq!(
            parse_v2_cgroup_line(hybrid),
            Some("/user.slice/session-1.scope")
        );
        assert_eq!(parse_v2_cgroup_line("0::/\n"), Some("/"));
        assert_eq!(parse_v2_cgroup_line("3:cpu:/x\n"), None);
    }

    #[test]
    fn this_process_is_alive_and_a_wrong_start_is_not() {
        let root = Path::new("/proc");
        let pid = std::process::id();
        let stat = read_stat(root, pid).expect("own stat");
        let hz = clock_ticks_per_second();
        let start_ns = ticks_to_ns(stat.starttime, hz);
        assert!(process_alive(root, pid, start_ns, hz));
        assert!(!process_alive(root, pid, start_ns + 10_000_000_000, hz));
        assert!(!process_alive(root, u32::MAX - 1, start_ns, hz));
    }
}
