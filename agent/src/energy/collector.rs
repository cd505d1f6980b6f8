//! Reads every energy source once per interval: RAPL where the machine has
//! it, else the model; GPUs; temperatures. Each source fails alone and its
//! state is reported.

use std::path::{Path, PathBuf};

use tracing::{info, warn};

use super::{
    Domain, DomainEnergy, SourceHealth,
    gpu::{AmdGpuBackend, GpuDevice, GpuSource, NvmlBackend},
    model::{ModelCoefficients, ModelFit, PowerModel},
    off_thread::OffThread,
    rapl::RaplSource,
    thermal::{Temperature, read_hwmon, read_thermal_zones},
};
use crate::topology::Topology;

/// Where each source reads, and whether it was configured explicitly (then
/// a missing root is an error) or is a default (then it just turns off).
#[derive(Clone, Debug)]
pub struct SourceRoot {
    pub path: PathBuf,
    pub configured: bool,
}

#[derive(Clone, Debug)]
pub struct EnergyOptions {
    /// For CPU frequencies (`devices/system/cpu/cpuN/cpufreq`).
    pub sysfs_root: PathBuf,
    pub powercap: SourceRoot,
    pub hwmon: SourceRoot,
    pub thermal: SourceRoot,
    pub gpu: bool,
    /// How long a GPU or temperature read may take before it is reported
    /// failing and skipped.
    pub source_deadline: std::time::Duration,
    pub model: ModelCoefficients,
}

/// Everything the energy sources said about one interval.
#[derive(Clone, Debug, Default)]
pub struct EnergyInterval {
    pub energies: Vec<DomainEnergy>,
    /// (GPU index, pid, weight).
    pub gpu_activity: Vec<(u32, u32, f64)>,
    pub gpus: Vec<GpuDevice>,
    pub temperatures: Vec<Temperature>,
    pub health: Vec<SourceHealth>,
    pub model_fits: Vec<ModelFit>,
    /// Idle power known for a domain instance better than a percentile of
    /// what it drew: the model's idle coefficient for its own estimates, the
    /// fitted intercept (power at zero utilization) for a metered package.
    pub idle_watts_hints: Vec<(super::DomainId, f64)>,
}

pub struct EnergyCollector {
    rapl: Option<RaplSource>,
    rapl_health: SourceHealth,
    /// The GPU source, on a thread of its own (NVML calls can hang).
    gpu: Option<(OffThread<GpuSource>, &'static str)>,
    gpu_health: SourceHealth,
    /// hwmon and thermal reads, on a thread of their own (a sensor such as
    /// drivetemp can block for seconds).
    sensors: OffThread<()>,
    /// How long a read on those threads may take.
    deadline: std::time::Duration,
    hwmon_root: Option<PathBuf>,
    thermal_root: Option<PathBuf>,
    model: PowerModel,
    model_coefficients: ModelCoefficients,
    frequencies: CpuFrequencies,
}

/// Checks a root: `Ok(Some)` usable, `Ok(None)` an absent default, `Err` an
/// absent configured root (named in the error).
pub fn check_root(
    root: &SourceRoot,
    setting: &'static str,
) -> Result<Option<PathBuf>, super::EnergyError> {
    if root.path.is_dir() {
        Ok(Some(root.path.clone()))
    } else if root.configured {
        Err(super::EnergyError::MissingRoot {
            path: root.path.clone(),
            setting,
        })
    } else {
        Ok(None)
    }
}

impl EnergyCollector {
    /// Sets the sources up. Fails only for a configured root that is missing.
    pub fn new(options: &EnergyOptions) -> Result<Self, super::EnergyError> {
        let powercap = check_root(&options.powercap, "powercap_root / POWERLENS_POWERCAP_ROOT")?;
        let hwmon_root = check_root(&options.hwmon, "hwmon_root / POWERLENS_HWMON_ROOT")?;
        let thermal_root = check_root(&options.thermal, "thermal_root / POWERLENS_THERMAL_ROOT")?;
        let (rapl, rapl_health) = match powercap {
            None => (
                None,
                SourceHealth::disabled(
                    "rapl",
                    format!(
                        "{} does not exist (no RAPL here: a virtual machine?)",
                        options.powercap.path.display()
                    ),
                ),
            ),
            Some(root) => match RaplSource::discover(&root) {
                Ok(Some(rapl)) => {
                    info!(root = %root.display(), zones = rapl.domains().len(), "RAPL energy counters found");
                    (Some(rapl), SourceHealth::ok("rapl"))
                }
                Ok(None) => (
                    None,
                    SourceHealth::disabled(
                        "rapl",
                        format!("no intel-rapl zone under {}", root.display()),
                    ),
                ),
                Err(error) => {
                    warn!("RAPL: {error}");
                    (None, SourceHealth::failing("rapl", error.to_string()))
                }
            },
        };
        let (gpu, gpu_health) = if !options.gpu {
            (
                None,
                SourceHealth::disabled("nvml", "GPU source turned off in the configuration"),
            )
        } else {
            match NvmlBackend::load() {
                Ok(backend) => {
                    info!("NVIDIA GPUs found through NVML");
                    (
                        Some(GpuSource::new(Box::new(backend))),
                        SourceHealth::ok("nvml"),
                    )
                }
                Err(error) => match hwmon_root.as_deref().and_then(AmdGpuBackend::discover) {
                    Some(backend) => {
                        info!("AMD GPUs found through amdgpu hwmon (no per-process split)");
                        (
                            Some(GpuSource::new(Box::new(backend))),
                            SourceHealth::ok("amdgpu"),
                        )
                    }
                    None => {
                        info!("no GPU source: {error}; no amdgpu hwmon either");
                        (
                            None,
                            SourceHealth::disabled("gpu", format!("{error}; no amdgpu hwmon")),
                        )
                    }
                },
            }
        };
        if rapl.is_none() {
            info!(
                idle_watts_per_socket = options.model.idle_watts_per_socket,
                max_watts_per_socket = options.model.max_watts_per_socket,
                "no energy meter: estimating package power from CPU utilization (figures are marked `model`)"
            );
        }
        let spawn_error = |error: std::io::Error| super::EnergyError::Io {
            path: PathBuf::from("<thread>"),
            source: error,
        };
        let gpu = match gpu {
            Some(source) => {
                let name = source.name();
                Some((OffThread::spawn("gpu", source).map_err(spawn_error)?, name))
            }
            None => None,
        };
        Ok(Self {
            rapl,
            rapl_health,
            gpu,
            gpu_health,
            sensors: OffThread::spawn("sensors", ()).map_err(spawn_error)?,
            deadline: options.source_deadline,
            hwmon_root,
            thermal_root,
            model: PowerModel::new(options.model),
            model_coefficients: options.model,
            frequencies: CpuFrequencies::new(options.sysfs_root.clone()),
        })
    }

    pub fn coefficients(&self) -> ModelCoefficients {
        self.model_coefficients
    }

    pub fn metered(&self) -> bool {
        self.rapl.is_some()
    }

    /// How often the energy counters need a sample so none wraps twice
    /// unseen (`None`: they do not wrap).
    pub fn counter_sample_period(&self) -> Option<std::time::Duration> {
        self.rapl.as_ref().and_then(RaplSource::sample_period)
    }

    /// Samples the energy counters between two reads (long intervals).
    pub fn sample_counters(&mut self) {
        if let Some(rapl) = &mut self.rapl {
            for (path, error) in rapl.sample() {
                warn!(file = %path.display(), "RAPL zone: {error}");
            }
        }
    }

    /// Reads every source for an interval of `seconds`, in which the CPUs
    /// were busy `busy_ns_by_cpu`.
    pub fn read(
        &mut self,
        seconds: f64,
        busy_ns_by_cpu: &[u64],
        topology: &Topology,
    ) -> EnergyInterval {
        let mut interval = EnergyInterval::default();
        // Frequencies matter to the estimate only; a metered machine (where
        // hundreds of CPUs would mean hundreds of file reads) skips them.
        let frequency = if self.rapl.is_none() {
            self.frequencies.factors(topology)
        } else {
            vec![1.0; topology.possible_cpus()]
        };
        let utilization = utilization_by_socket(busy_ns_by_cpu, &frequency, seconds, topology);

        let mut metered = false;
        if let Some(rapl) = &mut self.rapl {
            let reading = rapl.read();
            for (path, error) in &reading.errors {
                warn!(file = %path.display(), "RAPL zone: {error}");
            }
            self.rapl_health = rapl.health();
            metered = !reading.energies.is_empty();
            // Per socket: a multi-die package reports one zone per die.
            let mut package_joules = vec![0.0; utilization.len()];
            for energy in &reading.energies {
                if energy.id.domain == Domain::Package
                    && let Some(joules) = package_joules.get_mut(energy.id.index as usize)
                {
                    *joules += energy.joules;
                }
            }
            if seconds > 0.0 {
                for (socket, (joules, u)) in package_joules.iter().zip(&utilization).enumerate() {
                    if *joules > 0.0 {
                        self.model.calibrate(socket, *u, joules / seconds);
                    }
                }
            }
            interval.energies.extend(reading.energies);
        }
        if !metered && self.rapl.is_none() {
            let estimates = self.model.estimate(&utilization, seconds);
            let idle = self.model_coefficients.idle_watts_per_socket;
            interval
                .idle_watts_hints
                .extend(estimates.iter().map(|e| (e.id, idle)));
            interval.energies.extend(estimates);
        }
        interval.health.push(self.rapl_health.clone());
        interval
            .health
            .push(SourceHealth::ok("model").with_reason_if(
                self.rapl.is_some(),
                "calibrated against RAPL; RAPL figures are reported",
            ));

        if let Some((gpu, name)) = &self.gpu {
            // The energy of an interval whose read missed the deadline is
            // not lost: the counters are cumulative, the next read has it.
            match gpu.call(self.deadline, move |gpu| gpu.read(seconds)) {
                Ok(Ok(reading)) => {
                    self.gpu_health = SourceHealth::ok(*name);
                    interval.energies.extend(reading.energies);
                    interval.gpu_activity = reading.activity;
                    interval.gpus = reading.devices;
                }
                Ok(Err(error)) => {
                    warn!("GPU source: {error}");
                    self.gpu_health = SourceHealth::failing(*name, error.to_string());
                }
                Err(error) => {
                    warn!("GPU source: {error}");
                    self.gpu_health = SourceHealth::failing(*name, error.to_string());
                }
            }
        }
        interval.health.push(self.gpu_health.clone());

        let hwmon_root = self.hwmon_root.clone();
        let thermal_root = self.thermal_root.clone();
        let sensors = self.sensors.call(self.deadline, move |()| {
            let mut temperatures = Vec::new();
            let health = [
                read_temperatures(
                    "hwmon",
                    hwmon_root.as_deref(),
                    read_hwmon,
                    &mut temperatures,
                ),
                read_temperatures(
                    "thermal",
                    thermal_root.as_deref(),
                    read_thermal_zones,
                    &mut temperatures,
                ),
            ];
            (temperatures, health)
        });
        match sensors {
            Ok((temperatures, health)) => {
                interval.temperatures = temperatures;
                interval.health.extend(health);
            }
            Err(error) => {
                warn!("temperature sensors: {error}");
                for name in ["hwmon", "thermal"] {
                    interval
                        .health
                        .push(SourceHealth::failing(name, error.to_string()));
                }
            }
        }
        interval.model_fits = self.model.fits();
        if metered {
            // Only a fit that can be an idle power; otherwise the learned
            // low percentile of what the meter saw stands.
            interval
                .idle_watts_hints
                .extend(self.model.idle_watts().into_iter().map(|(socket, watts)| {
                    (
                        super::DomainId {
                            domain: Domain::Package,
                            index: socket,
                        },
                        watts,
                    )
                }));
        }
        interval
    }
}

fn read_temperatures(
    name: &str,
    root: Option<&Path>,
    read: fn(&Path) -> (Vec<Temperature>, Vec<super::EnergyError>),
    out: &mut Vec<Temperature>,
) -> SourceHealth {
    let Some(root) = root else {
        return SourceHealth::disabled(name, "root does not exist");
    };
    let (temperatures, errors) = read(root);
    out.extend(temperatures);
    if errors.is_empty() {
        SourceHealth::ok(name)
    } else {
        SourceHealth::failing(
            name,
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        )
    }
}

impl SourceHealth {
    fn with_reason_if(mut self, condition: bool, reason: &str) -> Self {
        if condition {
            self.reason = Some(reason.to_owned());
        }
        self
    }
}

/// Each CPU's current frequency as a fraction of its maximum, where cpufreq
/// says (`scaling_cur_freq` / `cpuinfo_max_freq`); 1.0 where it does not
/// (virtual machines).
///
/// Which CPUs have cpufreq, and their maximum, are found once and again
/// every `PROBE_EVERY` reads (a driver loaded late, CPUs brought online):
/// a read opens one file per CPU that has it, and none on a VM, instead of
/// two lookups per CPU that fail on every interval.
pub struct CpuFrequencies {
    sysfs_root: PathBuf,
    /// Per CPU with cpufreq: its `scaling_cur_freq` and maximum (kHz).
    cpus: Vec<(u32, PathBuf, u64)>,
    reads: u64,
}

impl CpuFrequencies {
    const PROBE_EVERY: u64 = 60;

    pub fn new(sysfs_root: PathBuf) -> Self {
        Self {
            sysfs_root,
            cpus: Vec::new(),
            reads: 0,
        }
    }

    fn probe(&mut self, topology: &Topology) {
        self.cpus = topology
            .online_cpus()
            .iter()
            .filter_map(|&cpu| {
                let dir = self
                    .sysfs_root
                    .join(format!("devices/system/cpu/cpu{cpu}/cpufreq"));
                let max = super::read_u64(&dir.join("cpuinfo_max_freq")).ok()?;
                (max > 0).then(|| (cpu, dir.join("scaling_cur_freq"), max))
            })
            .collect();
    }

    /// The factors, indexed by CPU number.
    pub fn factors(&mut self, topology: &Topology) -> Vec<f64> {
        if self.reads.is_multiple_of(Self::PROBE_EVERY) {
            self.probe(topology);
        }
        self.reads += 1;
        let mut factors = vec![1.0; topology.possible_cpus()];
        for (cpu, current, max) in &self.cpus {
            if let Ok(current) = super::read_u64(current)
                && let Some(slot) = factors.get_mut(*cpu as usize)
            {
                *slot = (current as f64 / *max as f64).clamp(0.0, 1.0);
            }
        }
        factors
    }
}

/// Utilization (0..=1) of each socket's online CPUs over an interval, each
/// CPU's busy time weighted by its frequency factor: at half the clock, a
/// busy CPU does (to first order) half the switching, so draws about half
/// the dynamic power.
pub fn utilization_by_socket(
    busy_ns_by_cpu: &[u64],
    frequency_by_cpu: &[f64],
    seconds: f64,
    topology: &Topology,
) -> Vec<f64> {
    let sockets = topology.sockets();
    let mut busy = vec![0.0; sockets];
    let mut cpus = vec![0u32; sockets];
    for &cpu in topology.online_cpus() {
        let socket = topology.socket_of(cpu).min(sockets - 1);
        cpus[socket] += 1;
        let factor = frequency_by_cpu.get(cpu as usize).copied().unwrap_or(1.0);
        busy[socket] +=
            busy_ns_by_cpu.get(cpu as usize).copied().unwrap_or(0) as f64 / 1e9 * factor;
    }
    busy.iter()
        .zip(&cpus)
        .map(|(busy, cpus)| {
            if *cpus == 0 || seconds <= 0.0 {
                0.0
            } else {
                (busy / (seconds * f64::from(*cpus))).clamp(0.0, 1.0)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::energy::rapl::tests::{set_energy, write_zone};

    fn options(powercap: &Path, configured: bool) -> EnergyOptions {
        EnergyOptions {
            sysfs_root: PathBuf::from("/nonexistent/sys"),
            powercap: SourceRoot {
                path: powercap.to_owned(),
                configured,
            },
            hwmon: SourceRoot {
                path: PathBuf::from("/nonexistent/hwmon"),
                configured: false,
            },
            thermal: SourceRoot {
                path: PathBuf::from("/nonexistent/thermal"),
                configured: false,
            },
            gpu: false,
            source_deadline: std::time::Duration::from_secs(1),
            model: ModelCoefficients::default(),
        }
    }

    #[test]
    fn utilization_per_socket() {
        let topology = Topology::from_sockets(vec![0, 0, 1, 1]);
        let busy = [1_000_000_000, 0, 500_000_000, 500_000_000];
        let u = utilization_by_socket(&busy, &[1.0; 4], 1.0, &topology);
        assert_eq!(u, vec![0.5, 0.5]);
        let slowed = utilization_by_socket(&busy, &[0.5, 1.0, 1.0, 1.0], 1.0, &topology);
        assert_eq!(slowed, vec![0.25, 0.5]);
    }

    #[test]
    fn frequency_factors_from_cpufreq() {
        let dir = tempfile::tempdir().unwrap();
        let cpufreq = dir.path().join("devices/system/cpu/cpu1/cpufreq");
        std::fs::create_dir_all(&cpufreq).unwrap();
        std::fs::write(cpufreq.join("scaling_cur_freq"), "1200000\n").unwrap();
        std::fs::write(cpufreq.join("cpuinfo_max_freq"), "3000000\n").unwrap();
        let mut frequencies = CpuFrequencies::new(dir.path().to_owned());
        let topology = Topology::uniform(2);
        assert_eq!(frequencies.factors(&topology), vec![1.0, 0.4]);
        std::fs::write(cpufreq.join("scaling_cur_freq"), "3000000\n").unwrap();
        assert_eq!(frequencies.factors(&topology), vec![1.0, 1.0], "read again");
        // A driver that appears later is found at the next probe.
        let late = dir.path().join("devices/system/cpu/cpu0/cpufreq");
        std::fs::create_dir_all(&late).unwrap();
        std::fs::write(late.join("scaling_cur_freq"), "1500000\n").unwrap();
        std::fs::write(late.join("cpuinfo_max_freq"), "3000000\n").unwrap();
        let mut reads = 2;
        while frequencies.factors(&topology)[0] == 1.0 {
            reads += 1;
            assert!(
                reads <= CpuFrequencies::PROBE_EVERY + 1,
                "never probed again"
            );
        }
    }

    #[test]
    fn the_model_tells_its_idle_power() {
        let mut collector =
            EnergyCollector::new(&options(Path::new("/nonexistent/powercap"), false)).unwrap();
        let interval = collector.read(1.0, &[0, 0], &Topology::uniform(2));
        assert_eq!(interval.idle_watts_hints.len(), 1);
        assert_eq!(interval.idle_watts_hints[0].1, 20.0);
    }

    #[test]
    fn without_rapl_the_model_estimates_and_says_so() {
        let mut collector =
            EnergyCollector::new(&options(Path::new("/nonexistent/powercap"), false)).unwrap();
        assert!(!collector.metered());
        let interval = collector.read(1.0, &[500_000_000, 500_000_000], &Topology::uniform(2));
        assert_eq!(interval.energies.len(), 1);
        assert_eq!(
            interval.energies[0].method,
            super::super::EnergyMethod::Model
        );
        assert_eq!(interval.energies[0].joules, 60.0);
        assert!(interval.energies[0].uncertainty_joules.is_some());
        assert_eq!(
            interval.health[0].status,
            crate::energy::SourceState::Disabled
        );
    }

    #[test]
    fn a_configured_root_that_is_missing_is_an_error_naming_it() {
        let error = EnergyCollector::new(&options(Path::new("/nonexistent/powercap"), true))
            .err()
            .expect("error")
            .to_string();
        assert!(
            error.contains("/nonexistent/powercap") && error.contains("POWERLENS_POWERCAP_ROOT"),
            "{error}"
        );
    }

    #[test]
    fn with_rapl_the_meter_is_reported_and_the_model_calibrates() {
        let dir = tempfile::tempdir().unwrap();
        write_zone(dir.path(), "intel-rapl:0", "package-0", 0, 1 << 40);
        let mut collector = EnergyCollector::new(&options(dir.path(), true)).unwrap();
        let topology = Topology::uniform(2);
        collector.read(1.0, &[0, 0], &topology);
        set_energy(dir.path(), "intel-rapl:0", 42_000_000);
        let interval = collector.read(1.0, &[1_000_000_000, 0], &topology);
        assert_eq!(interval.energies.len(), 1);
        assert_eq!(interval.energies[0].joules, 42.0);
        assert_eq!(
            interval.energies[0].method,
            super::super::EnergyMethod::Rapl
        );
    }
}
