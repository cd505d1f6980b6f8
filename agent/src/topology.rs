//! CPU topology: which CPUs exist and which socket (physical package) each
//! belongs to, read from sysfs under a configurable root.

use std::{
    io,
    path::{Path, PathBuf},
};

use agent_common::{MAX_CPUS, MAX_SOCKETS};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TopologyError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: cannot parse {value:?} as a CPU list")]
    BadCpuList { path: PathBuf, value: String },
    #[error("{path}: cannot parse {value:?} as a package id")]
    BadPackageId { path: PathBuf, value: String },
    #[error("CPU {cpu} is beyond the {MAX_CPUS} CPUs powerlens supports")]
    TooManyCpus { cpu: u32 },
}

/// The machine's CPUs and sockets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// Socket of each possible CPU, indexed by CPU number.
    socket_of_cpu: Vec<u16>,
    /// CPUs online when read.
    online: Vec<u32>,
}

impl Topology {
    /// Reads `devices/system/cpu/{possible,online}` and each CPU's
    /// `topology/physical_package_id` under `sysfs_root`.
    pub fn read(sysfs_root: &Path) -> Result<Self, TopologyError> {
        let cpu_dir = sysfs_root.join("devices/system/cpu");
        let possible = read_cpu_list(&cpu_dir.join("possible"))?;
        let online = read_cpu_list(&cpu_dir.join("online"))?;
        let highest = possible.iter().chain(&online).copied().max().unwrap_or(0);
        if highest as usize >= MAX_CPUS {
            return Err(TopologyError::TooManyCpus { cpu: highest });
        }
        let mut socket_of_cpu = vec![0u16; highest as usize + 1];
        for &cpu in &online {
            let path = cpu_dir.join(format!("cpu{cpu}/topology/physical_package_id"));
            let value = match std::fs::read_to_string(&path) {
                Ok(value) => value,
                // Offline or hot-plugged CPUs may lack a topology directory.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => return Err(TopologyError::Io { path, source }),
            };
            let package: i64 = value
                .trim()
                .parse()
                .map_err(|_| TopologyError::BadPackageId {
                    path: path.clone(),
                    value: value.trim().to_owned(),
                })?;
            // -1 means "unknown" on some virtual machines: one socket.
            socket_of_cpu[cpu as usize] = u16::try_from(package.max(0)).unwrap_or(u16::MAX);
        }
        Ok(Self {
            socket_of_cpu,
            online,
        })
    }

    /// A single-socket topology with `cpus` CPUs (for tests and benchmarks).
    pub fn uniform(cpus: u32) -> Self {
        Self {
            socket_of_cpu: vec![0; cpus as usize],
            online: (0..cpus).collect(),
        }
    }

    pub fn from_sockets(socket_of_cpu: Vec<u16>) -> Self {
        let online = (0..socket_of_cpu.len() as u32).collect();
        Self {
            socket_of_cpu,
            online,
        }
    }

    pub fn socket_of(&self, cpu: u32) -> usize {
        let socket = self.socket_of_cpu.get(cpu as usize).copied().unwrap_or(0) as usize;
        socket.min(MAX_SOCKETS - 1)
    }

    pub fn online_cpus(&self) -> &[u32] {
        &self.online
    }

    pub fn possible_cpus(&self) -> usize {
        self.socket_of_cpu.len()
    }

    /// Number of sockets (highest package id + 1, capped at MAX_SOCKETS).
    pub fn sockets(&self) -> usize {
        self.socket_of_cpu
            .iter()
            .map(|s| *s as usize + 1)
            .max()
            .unwrap_or(1)
            .min(MAX_SOCKETS)
    }

    /// True when a package id does not fit the kernel side's socket slots.
    pub fn has_socket_overflow(&self) -> bool {
        self.socket_of_cpu
            .iter()
            .any(|s| *s as usize >= MAX_SOCKETS)
    }

    /// The table handed to the kernel programs.
    pub fn kernel_table(&self) -> [u8; MAX_CPUS] {
        let mut table = [0u8; MAX_CPUS];
        for (cpu, socket) in self.socket_of_cpu.iter().enumerate().take(MAX_CPUS) {
            table[cpu] = (*socket as usize).min(MAX_SOCKETS - 1) as u8;
        }
        table
    }
}

fn read_cpu_list(path: &Path) -> Result<Vec<u32>, TopologyError> {
    let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Io {
        path: path.to_owned(),
        source,
    })?;
    parse_cpu_list(text.trim()).ok_or_else(|| TopologyError::BadCpuList {
        path: path.to_owned(),
        value: text.trim().to_owned(),
    })
}

/// Parses the kernel's CPU list format: `0-3,5,8-9`.
pub fn parse_cpu_list(text: &str) -> Option<Vec<u32>> {
    let mut cpus = Vec::new();
    if text.is_empty() {
        return Some(cpus);
    }
    for part in text.split(',') {
        let part = part.trim();
        match part.split_once('-') {
            Some((start, end)) => {
                let start: u32 = start.parse().ok()?;
                let end: u32 = end.parse().ok()?;
                if end < start || end as usize >= MAX_CPUS {
                    return None;
                }
                cpus.extend(start..=end);
            }
            None => {
                let cpu: u32 = part.parse().ok()?;
                if cpu as usize >= MAX_CPUS {
                    return None;
                }
                cpus.push(cpu);
            }
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Some(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_lists() {
        assert_eq!(parse_cpu_list("0-3,5,8-9"), Some(vec![0, 1, 2, 3, 5, 8, 9]));
        assert_eq!(parse_cpu_list("0"), Some(vec![0]));
        assert_eq!(parse_cpu_list(""), Some(vec![]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("a-b"), None);
        assert_eq!(parse_cpu_list("0-99999"), None);
    }

    use crate::test_support::write_fixture as write;

    #[test]
    fn reads_two_sockets_from_a_sysfs_tree() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "devices/system/cpu/possible", "0-3\n");
        write(root, "devices/system/cpu/online", "0-3\n");
        for (cpu, package) in [(0, 0), (1, 0), (2, 1), (3, 1)] {
            write(
                root,
                &format!("devices/system/cpu/cpu{cpu}/topology/physical_package_id"),
                &format!("{package}\n"),
            );
        }
        let topology = Topology::read(root).unwrap();
        assert_eq!(topology.sockets(), 2);
        assert_eq!(topology.socket_of(1), 0);
        assert_eq!(topology.socket_of(2), 1);
        assert_eq!(topology.kernel_table()[3], 1);
    }

    #[test]
    fn garbage_package_id_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "devices/system/cpu/possible", "0\n");
        write(root, "devices/system/cpu/online", "0\n");
        write(
            root,
            "devices/system/cpu/cpu0/topology/physical_package_id",
            "zero\n",
        );
        let error = Topology::read(root).unwrap_err().to_string();
        assert!(error.contains("physical_package_id"), "{error}");
        assert!(error.contains("zero"), "{error}");
    }
}
