//! cgroups: where the v2 hierarchy is mounted, cgroup id → path, and path →
//! workload (in [`workload`]).

pub mod workload;

use std::{
    collections::{HashMap, HashSet},
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use thiserror::Error;

pub use workload::{Pod, QosClass, Runtime, Workload, classify_cgroup, parse_cgroup_path};

#[derive(Debug, Error)]
pub enum CgroupError {
    #[error("no cgroup v2 hierarchy is mounted (looked in {mountinfo} for a cgroup2 mount)")]
    NoV2Mount { mountinfo: PathBuf },
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Finds the cgroup v2 mount point in `/proc/self/mountinfo` text: pure v2
/// at `/sys/fs/cgroup`, or hybrid with v2 at `/sys/fs/cgroup/unified`.
pub fn find_v2_mount(mountinfo: &str) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = Vec::new();
    for line in mountinfo.lines() {
        // "36 35 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw"
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fs_type = right.split_whitespace().next();
        let mount_point = left.split_whitespace().nth(4);
        let root = left.split_whitespace().nth(3);
        // Root `/` is the whole hierarchy. Seen from a cgroup namespace (an
        // agent in a pod, with the host's hierarchy mounted), the same
        // mount's root reads `/../..`: above the namespace's root, which is
        // what powerlens needs. A bind of a sub-cgroup (`/kubepods/...`)
        // is not the hierarchy.
        let whole = root.is_some_and(|root| root.split('/').all(|c| c.is_empty() || c == ".."));
        if fs_type == Some("cgroup2")
            && whole
            && let Some(mount_point) = mount_point
        {
            found.push(PathBuf::from(unescape_mountinfo(mount_point)));
        }
    }
    // Prefer the canonical places when several are mounted.
    for preferred in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        if let Some(p) = found.iter().find(|p| p.as_path() == Path::new(preferred)) {
            return Some(p.clone());
        }
    }
    found.into_iter().next()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What the agent knows of one cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupInfo {
    /// Path relative to the v2 root, starting with `/`.
    pub path: Arc<str>,
    pub workload: Arc<Workload>,
}

/// Maps cgroup ids (the inode numbers of v2 cgroup directories, which is
/// what `bpf_get_current_cgroup_id` returns) to paths and workloads. The
/// cache is refreshed by a walk of the hierarchy on a miss, at most once per
/// `min_rescan_interval`; entries of removed cgroups are kept so that the
/// time of exited containers still has a name.
pub struct CgroupResolver {
    root: PathBuf,
    by_id: HashMap<u64, CgroupInfo>,
    last_scan: Option<Instant>,
    min_rescan_interval: Duration,
    scanned_this_round: bool,
    unknown: Arc<Workload>,
    /// Ids the last walk found; the others are removed cgroups, kept only
    /// while the books still name them.
    present: HashSet<u64>,
    /// Ids learnt from the kernel's creation events, with the rounds since:
    /// kept a few rounds even if nothing ran in them yet (a process may
    /// first run in the interval after its cgroup was made).
    learned: HashMap<u64, u32>,
}

impl CgroupResolver {
    pub fn new(root: impl Into<PathBuf>, min_rescan_interval: Duration) -> Self {
        Self {
            root: root.into(),
            by_id: HashMap::new(),
            last_scan: None,
            min_rescan_interval,
            scanned_this_round: false,
            unknown: Arc::new(Workload::Host),
            present: HashSet::new(),
            learned: HashMap::new(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Starts a round of lookups (one per interval): the first miss of a
    /// round walks the hierarchy again, so a cgroup created since the last
    /// walk is always found in the interval it first ran in.
    pub fn new_round(&mut self) {
        self.scanned_this_round = false;
    }

    /// The cgroup's path and workload, walking the hierarchy again on a miss
    /// (once per round, and not more often than `min_rescan_interval` across
    /// rounds). A cgroup that vanished before it was ever seen resolves to
    /// `None`.
    pub fn resolve(&mut self, id: u64) -> Option<&CgroupInfo> {
        if !self.by_id.contains_key(&id) && !self.scanned_this_round {
            let due = self
                .last_scan
                .is_none_or(|at| at.elapsed() >= self.min_rescan_interval);
            if due {
                self.rescan();
                self.scanned_this_round = true;
            }
        }
        self.by_id.get(&id)
    }

    /// The workload and path of `id` in one lookup: the host and no path
    /// when the cgroup is unknown.
    pub fn workload_and_path(&mut self, id: u64) -> (Arc<Workload>, Option<Arc<str>>) {
        match self.resolve(id) {
            Some(info) => (Arc::clone(&info.workload), Some(Arc::clone(&info.path))),
            None => (Arc::clone(&self.unknown), None),
        }
    }

    /// Records a cgroup the kernel reported as it created it (the walk may
    /// never see one that lives less than an interval). A creator other
    /// than root made it in a subtree delegated to that user.
    pub fn learn(&mut self, id: u64, path: &str, creator_uid: u32) {
        if self.by_id.contains_key(&id) {
            return;
        }
        let path = if path.starts_with('/') {
            path.to_owned()
        } else {
            format!("/{path}")
        };
        // Delegated if a user made it, or if it (or a parent) belongs to
        // one, as the walk decides (a delegated subtree made by root and
        // handed over with chown).
        let delegated_to = (creator_uid != 0)
            .then_some(creator_uid)
            .or_else(|| self.owner_of_path(&path));
        self.learned.insert(id, 0);
        self.by_id.insert(
            id,
            CgroupInfo {
                workload: Arc::new(classify_cgroup(&path, delegated_to)),
                path: Arc::from(path.as_str()),
            },
        );
    }

    /// The unprivileged owner of `path` or of one of its parents, if any
    /// (directories that are gone are skipped).
    fn owner_of_path(&self, path: &str) -> Option<u32> {
        let root_owner = std::fs::metadata(&self.root).map_or(0, |m| m.uid());
        let mut dir = self.root.clone();
        for component in path.split('/').filter(|c| !c.is_empty()) {
            dir.push(component);
            if let Ok(metadata) = std::fs::metadata(&dir)
                && metadata.uid() != 0
                && metadata.uid() != root_owner
            {
                return Some(metadata.uid());
            }
        }
        None
    }

    /// Forgets removed cgroups (absent from the last walk) that `needed`
    /// no longer asks for: the entries of exited containers stay while
    /// their figures are kept, and no longer.
    pub fn forget_removed(&mut self, needed: impl Fn(u64) -> bool) {
        // Learnt ids wait a few rounds for their processes to run.
        const LEARNED_ROUNDS: u32 = 3;
        self.learned.retain(|_, rounds| {
            *rounds += 1;
            *rounds <= LEARNED_ROUNDS
        });
        let present = &self.present;
        let learned = &self.learned;
        self.by_id
            .retain(|id, _| present.contains(id) || learned.contains_key(id) || needed(*id));
    }

    /// Cgroups the resolver remembers.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Walks the whole hierarchy and records every cgroup directory.
    pub fn rescan(&mut self) {
        self.last_scan = Some(Instant::now());
        self.present.clear();
        // (directory, path from the root, the unprivileged user that owns
        // it or a parent: a delegated subtree, where that user names cgroups)
        // Root, or whoever owns the root here (a user namespace may show
        // it as another uid), is the privileged owner.
        let root_owner = std::fs::metadata(&self.root).map_or(0, |m| m.uid());
        let mut pending = vec![(self.root.clone(), String::from("/"), None)];
        while let Some((dir, relative, delegated_to)) = pending.pop() {
            let Ok(metadata) = std::fs::metadata(&dir) else {
                continue;
            };
            self.present.insert(metadata.ino());
            let owner = metadata.uid();
            let delegated_to =
                delegated_to.or((owner != 0 && owner != root_owner).then_some(owner));
            self.by_id
                .entry(metadata.ino())
                .or_insert_with(|| CgroupInfo {
                    workload: Arc::new(classify_cgroup(&relative, delegated_to)),
                    path: Arc::from(relative.as_str()),
                });
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let Ok(file_type) = entry.file_type() else {
                    continue;
                };
                if file_type.is_dir() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let child_relative = if relative == "/" {
                        format!("/{name}")
                    } else {
                        format!("{relative}/{name}")
                    };
                    pending.push((entry.path(), child_relative, delegated_to));
                }
            }
        }
    }

    /// Whether the cgroup directory is still there (and still the same one).
    pub fn still_exists(&self, id: u64) -> bool {
        let Some(info) = self.by_id.get(&id) else {
            return false;
        };
        let full = self.root.join(info.path.trim_start_matches('/'));
        std::fs::metadata(full).is_ok_and(|m| m.ino() == id)
    }
}

/// Reads `/proc/self/mountinfo` under `procfs_root` and finds the v2 mount.
pub fn detect_v2_root(procfs_root: &Path) -> Result<PathBuf, CgroupError> {
    let mountinfo = procfs_root.join("self/mountinfo");
    let text = std::fs::read_to_string(&mountinfo).map_err(|source| CgroupError::Io {
        path: mountinfo.clone(),
        source,
    })?;
    find_v2_mount(&text).ok_or(CgroupError::NoV2Mount { mountinfo })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
34 33 0:29 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
35 33 0:30 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
";
    const PURE_V2: &str = "\
35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn finds_hybrid_and_pure_v2_mounts() {
        assert_eq!(
            find_v2_mount(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            find_v2_mount(PURE_V2),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(find_v2_mount("garbage\n\n - -"), None);
    }

    #[test]
    fn finds_the_hierarchy_from_inside_a_cgroup_namespace() {
        let text = "30 25 0:26 /../.. /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_v2_mount(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn ignores_bind_mounts_of_sub_cgroups() {
        let text = "40 35 0:30 /kubepods.slice /host/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(find_v2_mount(text), None);
    }

    #[test]
    fn unescapes_octal_in_mount_points() {
        assert_eq!(unescape_mountinfo("/mnt/with\\040space"), "/mnt/with space");
        assert_eq!(unescape_mountinfo("/trailing\\04"), "/trailing\\04");
    }

    #[test]
    fn resolver_walks_a_tree_and_keeps_removed_cgroups() {
        let dir = tempfile::tempdir().unwrap();
        let id = "f".repeat(64);
        let leaf = dir.path().join(format!("system.slice/docker-{id}.scope"));
        std::fs::create_dir_all(&leaf).unwrap();
        let leaf_id = std::fs::metadata(&leaf).unwrap().ino();

        let mut resolver = CgroupResolver::new(dir.path(), Duration::ZERO);
        let info = resolver.resolve(leaf_id).expect("resolved").clone();
        assert_eq!(&*info.path, format!("/system.slice/docker-{id}.scope"));
        assert_eq!(info.workload.kind(), "container");
        assert!(resolver.still_exists(leaf_id));

        std::fs::remove_dir(&leaf).unwrap();
        assert!(!resolver.still_exists(leaf_id));
        assert_eq!(
            resolver.resolve(leaf_id).map(|i| i.path.clone()),
            Some(info.path)
        );
        resolver.new_round();
        assert!(resolver.resolve(u64::MAX).is_none());
        // The walk on that miss saw the leaf gone: it is kept while the
        // books need it, and forgotten after.
        resolver.forget_removed(|id| id == leaf_id);
        assert!(resolver.resolve(leaf_id).is_some());
        let before = resolver.len();
        resolver.forget_removed(|_| false);
        assert_eq!(resolver.len(), before - 1);
    }
}
