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
/// was not reused by a later process. Zombies count as gone: they run no more.
pub fn process_alive(
    procfs_root: &Path,
    pid: u32,
    start_boottime_ns: u64,
    ticks_per_second: u64,
) -> bool {
    let Some(stat) = read_stat(procfs_root, pid) else {
        return false;
    };
    if stat.state == 'Z' || stat.state == 'X' {
        return false;
    }
    same_start(stat.starttime, start_boottime_ns, ticks_per_second)
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

#[cfg(test)]
mod tests {
    use super::*;

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
