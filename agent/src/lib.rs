//! powerlens: eBPF-based host power observability agent.
//!
//! Data flow: kernel programs (`agent-ebpf`) charge on-CPU time to
//! processes and cgroups → [`cpu`] sources read it as deltas → [`accounting`]
//! keeps cumulative figures per process, workload and CPU → one
//! [`snapshot::Snapshot`] per interval → its typed [`view`] → the [`api`],
//! the [`table`] and the [`sinks`] (Prometheus `/metrics`, OTLP).

pub mod accounting;
pub mod api;
pub mod auth;
pub mod cgroup;
pub mod collector;
pub mod config;
pub mod controller;
pub mod cpu;
pub mod ebpf;
pub mod energy;
pub mod procinfo;
pub mod query;
pub mod sinks;
pub mod snapshot;
pub mod sorted_table;
pub mod table;
pub mod top;
pub mod topology;
pub mod view;

#[cfg(test)]
pub(crate) mod test_support;
