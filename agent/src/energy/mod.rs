//! Energy sources: RAPL through powercap ([`rapl`]), a utilization model
//! where no meter exists ([`model`]), temperatures ([`thermal`]) and GPUs
//! ([`gpu`]). Each source reads from a configurable root or a trait object,
//! fails alone, and reports per-interval energy per domain.

pub mod attribution;
pub mod collector;
pub mod counter;
pub mod gpu;
pub mod model;
pub mod off_thread;
pub mod rapl;
pub mod thermal;

use std::{fmt, path::PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// What a figure measures. `core` and `uncore` are parts of `package`;
/// `psys` (the platform, on client parts) covers package and dram too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Domain {
    Package,
    Core,
    Uncore,
    Dram,
    Psys,
    Gpu,
}

impl Domain {
    pub const ALL: [Domain; 6] = [
        Domain::Package,
        Domain::Core,
        Domain::Uncore,
        Domain::Dram,
        Domain::Psys,
        Domain::Gpu,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Domain::Package => "package",
            Domain::Core => "core",
            Domain::Uncore => "uncore",
            Domain::Dram => "dram",
            Domain::Psys => "psys",
            Domain::Gpu => "gpu",
        }
    }

    /// Domains that do not overlap, whose sum is a machine's `total`:
    /// package + dram + gpu (core/uncore are inside package; psys overlaps
    /// all of them and is reported on its own).
    pub const fn in_total(self) -> bool {
        matches!(self, Domain::Package | Domain::Dram | Domain::Gpu)
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an energy figure was obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EnergyMethod {
    /// Intel/AMD RAPL counters through powercap: measured.
    Rapl,
    /// NVIDIA Management Library: measured by the GPU.
    Nvml,
    /// hwmon (amdgpu): measured by the device.
    Hwmon,
    /// Estimated from utilization: no meter on this machine.
    Model,
}

impl EnergyMethod {
    pub const fn as_str(self) -> &'static str {
        match self {
            EnergyMethod::Rapl => "rapl",
            EnergyMethod::Nvml => "nvml",
            EnergyMethod::Hwmon => "hwmon",
            EnergyMethod::Model => "model",
        }
    }
}

/// One domain instance: a socket's package, a GPU, the platform.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DomainId {
    pub domain: Domain,
    /// Socket for per-socket domains, GPU index for `gpu`, 0 otherwise.
    pub index: u32,
}

/// Energy of one domain over one interval.
#[derive(Clone, Debug, PartialEq)]
pub struct DomainEnergy {
    pub id: DomainId,
    pub joules: f64,
    pub method: EnergyMethod,
    /// One standard deviation, for estimates.
    pub uncertainty_joules: Option<f64>,
}

/// One domain instance's energy since the agent started.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceEnergy {
    pub id: DomainId,
    pub joules: f64,
    /// In the last interval.
    pub interval_joules: f64,
    pub method: EnergyMethod,
}

/// Adds one interval of per-instance energy to the running totals; an
/// instance absent from the interval reads 0 for it (its total stays).
pub fn add_interval(totals: &mut Vec<DeviceEnergy>, interval: &[DomainEnergy]) {
    for device in totals.iter_mut() {
        device.interval_joules = 0.0;
    }
    for energy in interval {
        match totals.iter_mut().find(|d| d.id == energy.id) {
            Some(device) => {
                device.joules += energy.joules;
                device.interval_joules = energy.joules;
                device.method = energy.method;
            }
            None => totals.push(DeviceEnergy {
                id: energy.id,
                joules: energy.joules,
                interval_joules: energy.joules,
                method: energy.method,
            }),
        }
    }
    totals.sort_by_key(|d| d.id);
}

#[derive(Debug, Error)]
pub enum EnergyError {
    #[error("{path}: permission denied; {hint}")]
    Permission { path: PathBuf, hint: &'static str },
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {value:?} is not {expected}")]
    Garbage {
        path: PathBuf,
        value: String,
        expected: &'static str,
    },
    #[error("{path} does not exist (configured as {setting})")]
    MissingRoot {
        path: PathBuf,
        setting: &'static str,
    },
    #[error("{0}")]
    Other(String),
}

/// Whether a source works.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceState {
    Ok,
    /// Off by configuration, or absent on this machine.
    Disabled,
    /// Configured or present, but its reads fail.
    Failing,
}

impl SourceState {
    pub const fn as_str(self) -> &'static str {
        match self {
            SourceState::Ok => "ok",
            SourceState::Disabled => "disabled",
            SourceState::Failing => "failing",
        }
    }
}

/// State of one source, as `/api/v1/node` and `/healthz` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceHealth {
    pub name: String,
    pub status: SourceState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl SourceHealth {
    pub fn ok(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            status: SourceState::Ok,
            reason: None,
        }
    }

    pub fn disabled(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            status: SourceState::Disabled,
            reason: Some(reason.into()),
        }
    }

    pub fn failing(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            status: SourceState::Failing,
            reason: Some(reason.into()),
        }
    }
}

/// Reads a sysfs value as an unsigned integer, naming the file on error.
pub(crate) fn read_u64(path: &std::path::Path) -> Result<u64, EnergyError> {
    let text = std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            EnergyError::Permission {
                path: path.to_owned(),
                hint: "energy counters are readable by root only since the CVE-2020-8694 fix; run as root or grant CAP_DAC_READ_SEARCH",
            }
        } else {
            EnergyError::Io {
                path: path.to_owned(),
                source,
            }
        }
    })?;
    text.trim().parse().map_err(|_| EnergyError::Garbage {
        path: path.to_owned(),
        value: text.trim().chars().take(40).collect(),
        expected: "an unsigned integer",
    })
}
