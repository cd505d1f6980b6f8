//! What the controller writes: RAPL package limits through powercap, and
//! container CPU bandwidth through cgroups (v2 `cpu.max`, or v1
//! `cpu.cfs_quota_us` where the cpu controller lives on v1). Each reads and
//! writes under a root, so tests drive them from fixture trees.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Something the controller limits.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// A RAPL package zone (`intel-rapl:0`) of socket `socket`.
    RaplPackage { zone: String, socket: u32 },
    /// A container's CPU bandwidth, by its cgroup path (from the v2 root).
    CpuBandwidth { cgroup: String },
    /// An NVIDIA GPU's power management limit, by NVML index.
    GpuPower { index: u32 },
}

impl Target {
    /// `rapl:intel-rapl:0`, `cpu:/kubepods/...`: for logs and the API.
    pub fn name(&self) -> String {
        match self {
            Target::RaplPackage { zone, .. } => format!("rapl:{zone}"),
            Target::CpuBandwidth { cgroup } => format!("cpu:{cgroup}"),
            Target::GpuPower { index } => format!("gpu:{index}"),
        }
    }
}

/// A limit as the kernel holds it, so it can be put back exactly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Limit {
    /// RAPL long-term (constraint 0) package limit, and whether limiting
    /// was enabled.
    PowerCap { limit_uw: u64, enabled: bool },
    /// CPU time per period (µs); `None` quota is unlimited.
    CpuBandwidth {
        quota_us: Option<u64>,
        period_us: u64,
    },
    /// A GPU's power management limit (mW).
    GpuPower { limit_mw: u32 },
}

impl Limit {
    /// For logs and the API: `125.0 W`, `0.50 CPU`, `unlimited`.
    pub fn describe(&self) -> String {
        match self {
            Limit::PowerCap { limit_uw, enabled } => {
                let watts = *limit_uw as f64 / 1e6;
                if *enabled {
                    format!("{watts:.1} W")
                } else {
                    format!("{watts:.1} W (disabled)")
                }
            }
            Limit::CpuBandwidth { quota_us: None, .. } => "unlimited".to_owned(),
            Limit::CpuBandwidth {
                quota_us: Some(quota),
                period_us,
            } => format!("{:.2} CPU", *quota as f64 / (*period_us).max(1) as f64),
            Limit::GpuPower { limit_mw } => format!("{:.1} W", *limit_mw as f64 / 1e3),
        }
    }
}

#[derive(Debug, Error)]
pub enum ActuatorError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: unexpected content {value:?}")]
    Garbage { path: PathBuf, value: String },
    #[error(
        "no cpu controller for cgroup {cgroup}: neither {v2}/cpu.max nor a v1 cpu hierarchy holds it"
    )]
    NoCpuController { cgroup: String, v2: PathBuf },
    #[error("{0} is not a target this actuator handles")]
    WrongTarget(String),
    #[error("GPU {index}: {message}")]
    Gpu { index: u32, message: String },
}

/// Reads and writes limits.
pub trait Actuator: Send {
    fn read(&self, target: &Target) -> Result<Limit, ActuatorError>;
    fn write(&mut self, target: &Target, limit: &Limit) -> Result<(), ActuatorError>;
}

/// A device whose power can be capped (a RAPL package, a GPU), with its
/// hardware bounds, for the controller.
#[derive(Clone, Debug, PartialEq)]
pub struct CapZone {
    pub target: Target,
    /// The socket of a package, the index of a GPU.
    pub index: u32,
    /// RAPL: `constraint_0_max_power_uw` (or `max_power_range_uw`); NVML:
    /// the power limit constraint's maximum.
    pub max_watts: Option<f64>,
    /// RAPL: `constraint_0_min_power_uw` where exposed; NVML: the
    /// constraint's minimum.
    pub min_watts: Option<f64>,
}

/// The real thing: files under the powercap root and the cgroup roots.
pub struct SysfsActuator {
    powercap_root: PathBuf,
    cgroup_v2_root: PathBuf,
    cgroup_v1_cpu_root: Option<PathBuf>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ActuatorError + '_ {
    move |source| ActuatorError::Io {
        path: path.to_owned(),
        source,
    }
}

fn read_text(path: &Path) -> Result<String, ActuatorError> {
    std::fs::read_to_string(path)
        .map(|text| text.trim().to_owned())
        .map_err(io(path))
}

fn read_number(path: &Path) -> Result<i64, ActuatorError> {
    let text = read_text(path)?;
    text.parse().map_err(|_| ActuatorError::Garbage {
        path: path.to_owned(),
        value: text,
    })
}

fn write_text(path: &Path, text: &str) -> Result<(), ActuatorError> {
    std::fs::write(path, text).map_err(io(path))
}

impl SysfsActuator {
    pub fn new(
        powercap_root: PathBuf,
        cgroup_v2_root: PathBuf,
        cgroup_v1_cpu_root: Option<PathBuf>,
    ) -> Self {
        Self {
            powercap_root,
            cgroup_v2_root,
            cgroup_v1_cpu_root,
        }
    }

    /// The package zones that can be limited (a `constraint_0` to write).
    pub fn package_zones(&self) -> Vec<CapZone> {
        let mut zones = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.powercap_root) else {
            return zones;
        };
        let mut dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        dirs.sort();
        for dir in dirs {
            let Some(zone) = dir.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if !(zone.starts_with("intel-rapl:") && zone.matches(':').count() == 1) {
                continue;
            }
            let Ok(name) = read_text(&dir.join("name")) else {
                continue;
            };
            let Some((socket, die)) = crate::energy::rapl::parse_package_name(&name) else {
                continue;
            };
            // One limit per socket: a second die's zone is left alone.
            if die.is_some_and(|d| d > 0) || !dir.join("constraint_0_power_limit_uw").exists() {
                continue;
            }
            let watts = |file: &str| {
                read_number(&dir.join(file))
                    .ok()
                    .filter(|v| *v > 0)
                    .map(|v| v as f64 / 1e6)
            };
            zones.push(CapZone {
                target: Target::RaplPackage {
                    zone: zone.to_owned(),
                    socket,
                },
                index: socket,
                max_watts: watts("constraint_0_max_power_uw")
                    .or_else(|| watts("max_power_range_uw")),
                min_watts: watts("constraint_0_min_power_uw"),
            });
        }
        zones
    }

    /// Where a cgroup's CPU bandwidth lives: (v2 `cpu.max`) or (v1 quota,
    /// v1 period).
    fn bandwidth_files(&self, cgroup: &str) -> Result<BandwidthFiles, ActuatorError> {
        let relative = cgroup.trim_start_matches('/');
        let v2 = self.cgroup_v2_root.join(relative);
        if v2.join("cpu.max").exists() {
            return Ok(BandwidthFiles::V2(v2.join("cpu.max")));
        }
        if let Some(v1_root) = &self.cgroup_v1_cpu_root {
            let dir = v1_root.join(relative);
            if dir.join("cpu.cfs_quota_us").exists() {
                return Ok(BandwidthFiles::V1 {
                    quota: dir.join("cpu.cfs_quota_us"),
                    period: dir.join("cpu.cfs_period_us"),
                });
            }
        }
        Err(ActuatorError::NoCpuController {
            cgroup: cgroup.to_owned(),
            v2,
        })
    }
}

enum BandwidthFiles {
    V2(PathBuf),
    V1 { quota: PathBuf, period: PathBuf },
}

/// `cpu.max`: `max 100000` or `50000 100000`.
pub fn parse_cpu_max(text: &str) -> Option<(Option<u64>, u64)> {
    let mut parts = text.split_whitespace();
    let quota = parts.next()?;
    let period = parts.next().map_or(Some(100_000), |p| p.parse().ok())?;
    let quota = if quota == "max" {
        None
    } else {
        Some(quota.parse().ok()?)
    };
    Some((quota, period))
}

impl Actuator for SysfsActuator {
    fn read(&self, target: &Target) -> Result<Limit, ActuatorError> {
        match target {
            Target::RaplPackage { zone, .. } => {
                let dir = self.powercap_root.join(zone);
                let limit = read_number(&dir.join("constraint_0_power_limit_uw"))?;
                let enabled = read_number(&dir.join("enabled")).unwrap_or(1) != 0;
                Ok(Limit::PowerCap {
                    limit_uw: limit.max(0) as u64,
                    enabled,
                })
            }
            Target::CpuBandwidth { cgroup } => match self.bandwidth_files(cgroup)? {
                BandwidthFiles::V2(path) => {
                    let text = read_text(&path)?;
                    let (quota_us, period_us) =
                        parse_cpu_max(&text).ok_or_else(|| ActuatorError::Garbage {
                            path: path.clone(),
                            value: text.clone(),
                        })?;
                    Ok(Limit::CpuBandwidth {
                        quota_us,
                        period_us,
                    })
                }
                BandwidthFiles::V1 { quota, period } => {
                    let quota = read_number(&quota)?;
                    let period = read_number(&period)?;
                    Ok(Limit::CpuBandwidth {
                        quota_us: (quota >= 0).then_some(quota as u64),
                        period_us: period.max(1) as u64,
                    })
                }
            },
            Target::GpuPower { .. } => Err(ActuatorError::WrongTarget(target.name())),
        }
    }

    fn write(&mut self, target: &Target, limit: &Limit) -> Result<(), ActuatorError> {
        match (target, limit) {
            (Target::RaplPackage { zone, .. }, Limit::PowerCap { limit_uw, enabled }) => {
                let dir = self.powercap_root.join(zone);
                write_text(
                    &dir.join("constraint_0_power_limit_uw"),
                    &limit_uw.to_string(),
                )?;
                if dir.join("enabled").exists() {
                    write_text(&dir.join("enabled"), if *enabled { "1" } else { "0" })?;
                }
                Ok(())
            }
            (
                Target::CpuBandwidth { cgroup },
                Limit::CpuBandwidth {
                    quota_us,
                    period_us,
                },
            ) => match self.bandwidth_files(cgroup)? {
                BandwidthFiles::V2(path) => {
                    let quota = quota_us.map_or_else(|| "max".to_owned(), |q| q.to_string());
                    write_text(&path, &format!("{quota} {period_us}"))
                }
                BandwidthFiles::V1 { quota, period } => {
                    // The period first: a quota is checked against it.
                    write_text(&period, &period_us.to_string())?;
                    let value = quota_us.map_or(-1, |q| q as i64);
                    write_text(&quota, &value.to_string())
                }
            },
            (target, _) => Err(ActuatorError::WrongTarget(target.name())),
        }
    }
}

/// GPU power limits: NVML on NVIDIA machines, a fake in tests.
pub trait GpuLimits: Send {
    /// (index, min mW, max mW) of every GPU whose limit can be set.
    fn devices(&self) -> Vec<(u32, u32, u32)>;
    fn limit_mw(&self, index: u32) -> Result<u32, String>;
    fn set_limit_mw(&mut self, index: u32, limit_mw: u32) -> Result<(), String>;
}

/// NVIDIA GPUs through NVML (`nvmlDeviceSetPowerManagementLimit`, which
/// needs root).
pub struct NvmlLimits {
    nvml: nvml_wrapper::Nvml,
}

impl NvmlLimits {
    /// Loads libnvidia-ml; `None` without an NVIDIA driver.
    pub fn load() -> Option<Self> {
        nvml_wrapper::Nvml::init().ok().map(|nvml| Self { nvml })
    }
}

impl GpuLimits for NvmlLimits {
    fn devices(&self) -> Vec<(u32, u32, u32)> {
        let count = self.nvml.device_count().unwrap_or(0);
        (0..count)
            .filter_map(|index| {
                let device = self.nvml.device_by_index(index).ok()?;
                let constraints = device.power_management_limit_constraints().ok()?;
                Some((index, constraints.min_limit, constraints.max_limit))
            })
            .collect()
    }

    fn limit_mw(&self, index: u32) -> Result<u32, String> {
        self.nvml
            .device_by_index(index)
            .and_then(|device| device.power_management_limit())
            .map_err(|e| e.to_string())
    }

    fn set_limit_mw(&mut self, index: u32, limit_mw: u32) -> Result<(), String> {
        let mut device = self
            .nvml
            .device_by_index(index)
            .map_err(|e| e.to_string())?;
        device
            .set_power_management_limit(limit_mw)
            .map_err(|e| e.to_string())
    }
}

/// A fake NVML for tests: limits in memory, within each GPU's range.
#[derive(Clone, Debug, Default)]
pub struct FakeGpuLimits {
    /// index → (limit, min, max), in mW.
    pub gpus: std::collections::BTreeMap<u32, (u32, u32, u32)>,
}

impl GpuLimits for FakeGpuLimits {
    fn devices(&self) -> Vec<(u32, u32, u32)> {
        self.gpus
            .iter()
            .map(|(index, (_, min, max))| (*index, *min, *max))
            .collect()
    }

    fn limit_mw(&self, index: u32) -> Result<u32, String> {
        self.gpus
            .get(&index)
            .map(|(limit, _, _)| *limit)
            .ok_or_else(|| format!("no GPU {index}"))
    }

    fn set_limit_mw(&mut self, index: u32, limit_mw: u32) -> Result<(), String> {
        let (limit, min, max) = self
            .gpus
            .get_mut(&index)
            .ok_or_else(|| format!("no GPU {index}"))?;
        // NVML refuses a limit outside the constraints (Invalid Argument).
        if limit_mw < *min || limit_mw > *max {
            return Err(format!("{limit_mw} mW is outside {min}..={max} mW"));
        }
        *limit = limit_mw;
        Ok(())
    }
}

/// The zones of `gpus`, for the controller.
pub fn gpu_zones(gpus: &dyn GpuLimits) -> Vec<CapZone> {
    gpus.devices()
        .into_iter()
        .map(|(index, min, max)| CapZone {
            target: Target::GpuPower { index },
            index,
            max_watts: Some(f64::from(max) / 1e3),
            min_watts: Some(f64::from(min) / 1e3),
        })
        .collect()
}

/// Files for packages and containers, NVML for GPUs.
pub struct NodeActuator {
    pub files: SysfsActuator,
    pub gpus: Option<Box<dyn GpuLimits>>,
}

impl Actuator for NodeActuator {
    fn read(&self, target: &Target) -> Result<Limit, ActuatorError> {
        match (target, &self.gpus) {
            (Target::GpuPower { index }, Some(gpus)) => gpus
                .limit_mw(*index)
                .map(|limit_mw| Limit::GpuPower { limit_mw })
                .map_err(|message| ActuatorError::Gpu {
                    index: *index,
                    message,
                }),
            _ => self.files.read(target),
        }
    }

    fn write(&mut self, target: &Target, limit: &Limit) -> Result<(), ActuatorError> {
        match (target, limit, &mut self.gpus) {
            (Target::GpuPower { index }, Limit::GpuPower { limit_mw }, Some(gpus)) => gpus
                .set_limit_mw(*index, *limit_mw)
                .map_err(|message| ActuatorError::Gpu {
                    index: *index,
                    message,
                }),
            _ => self.files.write(target, limit),
        }
    }
}

/// The v1 hierarchy holding the cpu controller (hybrid machines), from
/// `/proc/self/mountinfo` under `procfs_root`.
pub fn find_v1_cpu_root(procfs_root: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(procfs_root.join("self/mountinfo")).ok()?;
    text.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut right = right.split_whitespace();
        if right.next()? != "cgroup" {
            return None;
        }
        let options = right.nth(1)?;
        let mount_point = left.split_whitespace().nth(4)?;
        options
            .split(',')
            .any(|o| o == "cpu")
            .then(|| PathBuf::from(mount_point))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_limits_go_through_the_fake_nvml_within_its_constraints() {
        let mut gpus = FakeGpuLimits::default();
        gpus.gpus.insert(0, (300_000, 200_000, 700_000));
        let zones = gpu_zones(&gpus);
        assert_eq!(zones[0].max_watts, Some(700.0));
        assert_eq!(zones[0].min_watts, Some(200.0));
        let dir = tempfile::tempdir().unwrap();
        let mut actuator = NodeActuator {
            files: SysfsActuator::new(dir.path().into(), dir.path().into(), None),
            gpus: Some(Box::new(gpus)),
        };
        let gpu = Target::GpuPower { index: 0 };
        assert_eq!(
            actuator.read(&gpu).unwrap(),
            Limit::GpuPower { limit_mw: 300_000 }
        );
        actuator
            .write(&gpu, &Limit::GpuPower { limit_mw: 250_000 })
            .unwrap();
        assert_eq!(
            actuator.read(&gpu).unwrap(),
            Limit::GpuPower { limit_mw: 250_000 }
        );
        let error = actuator
            .write(&gpu, &Limit::GpuPower { limit_mw: 100_000 })
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("GPU 0") && error.contains("outside"),
            "{error}"
        );
        let error = actuator
            .read(&Target::GpuPower { index: 3 })
            .unwrap_err()
            .to_string();
        assert!(error.contains("GPU 3"), "{error}");
    }

    #[test]
    fn cpu_max_round_trips() {
        assert_eq!(parse_cpu_max("max 100000"), Some((None, 100_000)));
        assert_eq!(
            parse_cpu_max("50000 100000\n"),
            Some((Some(50_000), 100_000))
        );
        assert_eq!(parse_cpu_max("max"), Some((None, 100_000)));
        assert_eq!(parse_cpu_max("lots 100000"), None);
    }

    #[test]
    fn rapl_limits_and_v2_bandwidth_are_read_written_and_restored() {
        let dir = tempfile::tempdir().unwrap();
        let powercap = dir.path().join("powercap");
        let zone = powercap.join("intel-rapl:0");
        std::fs::create_dir_all(&zone).unwrap();
        for (file, value) in [
            ("name", "package-0"),
            ("enabled", "0"),
            ("constraint_0_power_limit_uw", "150000000"),
            ("constraint_0_max_power_uw", "205000000"),
        ] {
            std::fs::write(zone.join(file), format!("{value}\n")).unwrap();
        }
        let cgroups = dir.path().join("cgroup");
        let container = cgroups.join("kubepods/besteffort/podX/abc");
        std::fs::create_dir_all(&container).unwrap();
        std::fs::write(container.join("cpu.max"), "max 100000\n").unwrap();
        let mut actuator = SysfsActuator::new(powercap, cgroups, None);

        let zones = actuator.package_zones();
        assert_eq!(zones.len(), 1);
        assert_eq!(zones[0].max_watts, Some(205.0));
        let package = zones[0].target.clone();
        let original = actuator.read(&package).unwrap();
        assert_eq!(
            original,
            Limit::PowerCap {
                limit_uw: 150_000_000,
                enabled: false
            }
        );
        actuator
            .write(
                &package,
                &Limit::PowerCap {
                    limit_uw: 90_000_000,
                    enabled: true,
                },
            )
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(zone.join("constraint_0_power_limit_uw")).unwrap(),
            "90000000"
        );
        actuator.write(&package, &original).unwrap();
        assert_eq!(actuator.read(&package).unwrap(), original);

        let bandwidth = Target::CpuBandwidth {
            cgroup: "/kubepods/besteffort/podX/abc".into(),
        };
        assert_eq!(
            actuator.read(&bandwidth).unwrap(),
            Limit::CpuBandwidth {
                quota_us: None,
                period_us: 100_000
            }
        );
        actuator
            .write(
                &bandwidth,
                &Limit::CpuBandwidth {
                    quota_us: Some(25_000),
                    period_us: 100_000,
                },
            )
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(container.join("cpu.max")).unwrap(),
            "25000 100000"
        );
        let gone = Target::CpuBandwidth {
            cgroup: "/kubepods/gone".into(),
        };
        let error = actuator.read(&gone).unwrap_err().to_string();
        assert!(error.contains("/kubepods/gone"), "{error}");
    }

    #[test]
    fn v1_bandwidth_where_the_cpu_controller_lives_on_v1() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = dir.path().join("cpu,cpuacct");
        let container = v1.join("system.slice/docker-x.scope");
        std::fs::create_dir_all(&container).unwrap();
        std::fs::write(container.join("cpu.cfs_quota_us"), "-1\n").unwrap();
        std::fs::write(container.join("cpu.cfs_period_us"), "100000\n").unwrap();
        let mut actuator = SysfsActuator::new(
            dir.path().join("none"),
            dir.path().join("unified"),
            Some(v1),
        );
        let target = Target::CpuBandwidth {
            cgroup: "/system.slice/docker-x.scope".into(),
        };
        assert_eq!(
            actuator.read(&target).unwrap(),
            Limit::CpuBandwidth {
                quota_us: None,
                period_us: 100_000
            }
        );
        actuator
            .write(
                &target,
                &Limit::CpuBandwidth {
                    quota_us: Some(50_000),
                    period_us: 100_000,
                },
            )
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(container.join("cpu.cfs_quota_us")).unwrap(),
            "50000"
        );
        let mountinfo = dir.path().join("proc/self");
        std::fs::create_dir_all(&mountinfo).unwrap();
        std::fs::write(
            mountinfo.join("mountinfo"),
            "30 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n",
        )
        .unwrap();
        assert_eq!(
            find_v1_cpu_root(&dir.path().join("proc")),
            Some(PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"))
        );
    }
}
