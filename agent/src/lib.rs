//! powerlens: eBPF-based host power observability agent.
//!
//! Data flow: kernel programs (`agent-ebpf`) charge on-CPU time to
//! processes and cgroups → [`cpu`] sources read it as deltas → [`accounting`]
//! keeps cumulative figures per process, workload and CPU → one
//! [`snapshot::Snapshot`] per interval → the [`api`] and the [`table`].

pub mod accounting;
pub mod api;
pub mod cgroup;
pub mod collector;
pub mod config;
pub mod cpu;
pub mod ebpf;
pub mod energy;
pub mod procinfo;
pub mod snapshot;
pub mod table;
pub mod topology;

#[cfg(test)]
pub(crate) mod test_support;
