//! Sources of per-process CPU time: the kernel programs ([`ebpf`]) and the
//! procfs/cgroup sampling fallback ([`procfs`]). Both produce the same
//! [`CpuReading`], a set of deltas since the previous read.

pub mod procfs;

use std::fmt;

use agent_common::{COMM_LEN, MAX_SOCKETS};
use serde::Serialize;
use thiserror::Error;

/// How a figure was measured. Every figure powerlens reports carries one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Kernel programs: the scheduler's own run time, per context switch.
    Ebpf,
    /// Sampling `/proc/<pid>/stat`: clock-tick resolution, processes that
    /// exit between two samples lose their last partial interval.
    Procfs,
}

impl Method {
    pub const fn as_str(self) -> &'static str {
        match self {
            Method::Ebpf => "ebpf",
            Method::Procfs => "procfs",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A process, told apart from any later one that reuses its PID by the
/// start time of its thread-group leader.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProcessKey {
    pub pid: u32,
    /// Start time in ns since boot (eBPF: `task_struct.start_time`; procfs:
    /// `/proc/<pid>/stat` field 22 converted from clock ticks).
    pub start_ns: u64,
}

impl ProcessKey {
    /// The key of the process `pid` started at `start_boottime_ns` (ns
    /// since boot), at the resolution `/proc/<pid>/stat` gives (clock
    /// ticks, truncated like the kernel's `nsec_to_clock_t`), so the eBPF
    /// source and the procfs fallback name the same process alike and a
    /// switch between them at run time continues its figures.
    pub fn at_tick(pid: u32, start_boottime_ns: u64, ticks_per_second: u64) -> Self {
        let ns_per_tick = (1_000_000_000 / ticks_per_second.max(1)).max(1);
        Self {
            pid,
            start_ns: start_boottime_ns / ns_per_tick * ns_per_tick,
        }
    }
}

/// `task_struct.comm`, kept inline so a reading of 10,000 processes does not
/// allocate 10,000 strings.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Comm(pub [u8; COMM_LEN]);

impl Comm {
    pub fn from_str_lossy(name: &str) -> Self {
        let mut bytes = [0u8; COMM_LEN];
        let source = name.as_bytes();
        let len = source.len().min(COMM_LEN - 1);
        bytes[..len].copy_from_slice(&source[..len]);
        Self(bytes)
    }

    pub fn as_str(&self) -> std::borrow::Cow<'_, str> {
        let end = self.0.iter().position(|b| *b == 0).unwrap_or(COMM_LEN);
        String::from_utf8_lossy(&self.0[..end])
    }
}

impl fmt::Debug for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// CPU time per socket, in nanoseconds.
pub type SocketNs = [u64; MAX_SOCKETS];

pub fn total_ns(by_socket: &SocketNs) -> u64 {
    by_socket.iter().sum()
}

/// CPU time one process spent in one cgroup since the previous reading.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessUsage {
    pub key: ProcessKey,
    pub comm: Comm,
    pub cgroup_id: u64,
    pub runtime_ns_by_socket: SocketNs,
}

/// One read of a CPU source: what happened since the previous read.
#[derive(Clone, Debug, Default)]
pub struct CpuReading {
    pub usage: Vec<ProcessUsage>,
    /// Processes known to have exited since the previous read.
    pub exited: Vec<ProcessKey>,
    /// Time spent running tasks on each CPU since the previous read, indexed
    /// by CPU number; each CPU's idle time is wall time minus this.
    pub busy_ns_by_cpu: Vec<u64>,
    /// Cumulative loss counters of the source (name, count).
    pub losses: Vec<(&'static str, u64)>,
    /// Run-time statistics of the kernel programs (eBPF source only).
    pub programs: Vec<ProgramStats>,
    /// Parts of the read that failed after others had succeeded. What was
    /// read is in the reading (the kernel has already moved its marks for
    /// it); the collector counts and shows these like a failed read.
    pub errors: Vec<String>,
    /// The per-CPU busy counters could not be read: `busy_ns_by_cpu` is
    /// empty, and the node's busy and idle time for this window is added
    /// with the next reading that has them (its busy deltas cover both).
    pub busy_missing: bool,
    /// Cgroups created since the previous read, as the kernel named them:
    /// (id, path from the hierarchy's root, uid of their creator).
    pub cgroups_created: Vec<(u64, String, u32)>,
    /// Records this read looked at (eBPF: switch records, running threads
    /// and overflow records).
    pub threads_read: u64,
}

/// A kernel program's cumulative run time and calls, as the kernel counts
/// them while `kernel.bpf_stats_enabled` is 1 (both stay 0 otherwise).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramStats {
    pub name: &'static str,
    pub run_time_ns: u64,
    pub run_count: u64,
}

#[derive(Debug, Error)]
pub enum CpuSourceError {
    #[error("reading {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel program map {map}: {message}")]
    Map { map: &'static str, message: String },
    #[error("task iterator: {0}")]
    Iterator(String),
}

/// A source of per-process CPU time.
pub trait CpuTimeSource: Send {
    fn method(&self) -> Method;

    /// Everything since the previous call (the first call covers the time
    /// since the source was created).
    fn read(&mut self) -> Result<CpuReading, CpuSourceError>;

    /// How soon the source needs `drain` before the next read, if it does
    /// (its kernel buffers fill faster than the interval empties them).
    fn drain_period(&self) -> Option<std::time::Duration> {
        None
    }

    /// Moves what the kernel buffered into the source's own memory, for
    /// the next read.
    fn drain(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ebpf_and_procfs_name_a_process_alike() {
        // The kernel's start_boottime in ns, and the same in USER_HZ ticks
        // as /proc/<pid>/stat reports it (truncated).
        let start_boottime_ns = 123_456_789_012u64;
        let starttime_ticks = start_boottime_ns / 10_000_000;
        let from_ebpf = ProcessKey::at_tick(42, start_boottime_ns, 100);
        let from_procfs = ProcessKey {
            pid: 42,
            start_ns: crate::procinfo::ticks_to_ns(starttime_ticks, 100),
        };
        assert_eq!(from_ebpf, from_procfs);
    }

    #[test]
    fn comm_round_trips_and_truncates() {
        assert_eq!(Comm::from_str_lossy("stress-ng").as_str(), "stress-ng");
        assert_eq!(
            Comm::from_str_lossy("a-very-long-process-name").as_str(),
            "a-very-long-pro"
        );
    }
}
