//! GPUs: per-device energy over an interval and per-process activity, so a
//! GPU's energy goes to the processes (and so containers) that used it.
//!
//! The hardware sits behind [`GpuBackend`]: NVML for NVIDIA (the library is
//! loaded at run time; no library, no source), a fake for tests.

use std::collections::HashMap;

use nvml_wrapper::{Nvml, enum_wrappers::device::TemperatureSensor};
use serde::{Deserialize, Serialize};

use super::{Domain, DomainEnergy, DomainId, EnergyError, EnergyMethod};

/// One process's use of one GPU over the last sampling period.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuProcess {
    pub pid: u32,
    /// SM (compute) utilization in percent, when the driver samples it.
    pub sm_utilization_percent: Option<u32>,
}

/// What a backend reports of one device at one moment.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuSample {
    pub index: u32,
    pub name: String,
    pub uuid: String,
    /// Cumulative energy since the driver loaded, in mJ (Volta and later).
    pub total_energy_mj: Option<u64>,
    pub power_mw: Option<u32>,
    pub temperature_celsius: Option<u32>,
    pub power_limit_mw: Option<u32>,
    pub power_limit_range_mw: Option<(u32, u32)>,
    pub processes: Vec<GpuProcess>,
}

pub trait GpuBackend: Send {
    fn name(&self) -> &'static str;
    fn method(&self) -> EnergyMethod;
    fn sample(&mut self) -> Result<Vec<GpuSample>, EnergyError>;
}

/// A device as `/api/v1/node` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GpuDevice {
    pub index: u32,
    pub name: String,
    pub uuid: String,
    pub power_watts: Option<f64>,
    pub temperature_celsius: Option<u32>,
    pub power_limit_watts: Option<f64>,
    pub power_limit_min_watts: Option<f64>,
    pub power_limit_max_watts: Option<f64>,
    /// `counter` (cumulative energy) or `power` (power × time).
    pub energy_from: String,
}

/// One interval of GPU energy and who used which GPU.
#[derive(Clone, Debug, Default)]
pub struct GpuReading {
    pub energies: Vec<DomainEnergy>,
    /// (GPU index, pid, activity weight).
    pub activity: Vec<(u32, u32, f64)>,
    pub devices: Vec<GpuDevice>,
}

pub struct GpuSource {
    backend: Box<dyn GpuBackend>,
    last_energy_mj: HashMap<u32, u64>,
}

impl GpuSource {
    pub fn new(backend: Box<dyn GpuBackend>) -> Self {
        Self {
            backend,
            last_energy_mj: HashMap::new(),
        }
    }

    pub fn name(&self) -> &'static str {
        self.backend.name()
    }

    /// Energy of each GPU over the last `seconds`: from the cumulative
    /// counter where the GPU has one (the first read is its baseline),
    /// else power × time.
    pub fn read(&mut self, seconds: f64) -> Result<GpuReading, EnergyError> {
        let samples = self.backend.sample()?;
        let method = self.backend.method();
        let mut reading = GpuReading::default();
        for sample in samples {
            let id = DomainId {
                domain: Domain::Gpu,
                index: sample.index,
            };
            let (joules, energy_from) = match sample.total_energy_mj {
                Some(now) => {
                    let joules = self
                        .last_energy_mj
                        .insert(sample.index, now)
                        .map(|before| now.saturating_sub(before) as f64 / 1e3);
                    (joules, "counter")
                }
                None => (
                    sample.power_mw.map(|mw| f64::from(mw) / 1e3 * seconds),
                    "power",
                ),
            };
            if let Some(joules) = joules {
                reading.energies.push(DomainEnergy {
                    id,
                    joules,
                    method,
                    uncertainty_joules: None,
                });
            }
            // Processes without a utilization sample (the driver samples
            // every ~1/6 s and may miss short users) share as equals with
            // weight 1; with samples, weight is the SM percentage.
            let any_sampled = sample
                .processes
                .iter()
                .any(|p| p.sm_utilization_percent.is_some());
            for process in &sample.processes {
                let weight = match (any_sampled, process.sm_utilization_percent) {
                    (true, Some(percent)) => f64::from(percent),
                    (true, None) => 0.0,
                    (false, _) => 1.0,
                };
                reading.activity.push((sample.index, process.pid, weight));
            }
            let watts = |mw: u32| f64::from(mw) / 1e3;
            reading.devices.push(GpuDevice {
                index: sample.index,
                name: sample.name,
                uuid: sample.uuid,
                power_watts: sample.power_mw.map(watts),
                temperature_celsius: sample.temperature_celsius,
                power_limit_watts: sample.power_limit_mw.map(watts),
                power_limit_min_watts: sample.power_limit_range_mw.map(|r| watts(r.0)),
                power_limit_max_watts: sample.power_limit_range_mw.map(|r| watts(r.1)),
                energy_from: energy_from.to_owned(),
            });
        }
        Ok(reading)
    }
}

/// NVIDIA GPUs through NVML.
pub struct NvmlBackend {
    nvml: Nvml,
    /// Per device, the timestamp (µs) of the newest utilization sample seen.
    last_sample_us: HashMap<u32, u64>,
}

impl NvmlBackend {
    /// Loads libnvidia-ml; an error means no NVIDIA driver here.
    pub fn load() -> Result<Self, EnergyError> {
        let nvml = Nvml::init().map_err(|e| EnergyError::Other(format!("NVML: {e}")))?;
        Ok(Self {
            nvml,
            last_sample_us: HashMap::new(),
        })
    }
}

impl GpuBackend for NvmlBackend {
    fn name(&self) -> &'static str {
        "nvml"
    }

    fn method(&self) -> EnergyMethod {
        EnergyMethod::Nvml
    }

    fn sample(&mut self) -> Result<Vec<GpuSample>, EnergyError> {
        let nvml_error = |what: &str, e: nvml_wrapper::error::NvmlError| {
            EnergyError::Other(format!("NVML {what}: {e}"))
        };
        let count = self
            .nvml
            .device_count()
            .map_err(|e| nvml_error("device count", e))?;
        let mut samples = Vec::with_capacity(count as usize);
        for index in 0..count {
            let device = self
                .nvml
                .device_by_index(index)
                .map_err(|e| nvml_error("device", e))?;
            let mut processes: Vec<GpuProcess> = device
                .running_compute_processes()
                .unwrap_or_default()
                .into_iter()
                .map(|p| GpuProcess {
                    pid: p.pid,
                    sm_utilization_percent: None,
                })
                .collect();
            for p in device.running_graphics_processes().unwrap_or_default() {
                if !processes.iter().any(|q| q.pid == p.pid) {
                    processes.push(GpuProcess {
                        pid: p.pid,
                        sm_utilization_percent: None,
                    });
                }
            }
            let since = self.last_sample_us.get(&index).copied();
            if let Ok(utilization) = device.process_utilization_stats(since) {
                let newest = utilization.iter().map(|u| u.timestamp).max();
                for sample in utilization {
                    match processes.iter_mut().find(|p| p.pid == sample.pid) {
                        Some(process) => {
                            let sum = process.sm_utilization_percent.unwrap_or(0) + sample.sm_util;
                            process.sm_utilization_percent = Some(sum);
                        }
                        None => processes.push(GpuProcess {
                            pid: sample.pid,
                            sm_utilization_percent: Some(sample.sm_util),
                        }),
                    }
                }
                if let Some(newest) = newest {
                    self.last_sample_us.insert(index, newest);
                }
            }
            samples.push(GpuSample {
                index,
                name: device.name().unwrap_or_default(),
                uuid: device.uuid().unwrap_or_default(),
                total_energy_mj: device.total_energy_consumption().ok(),
                power_mw: device.power_usage().ok(),
                temperature_celsius: device.temperature(TemperatureSensor::Gpu).ok(),
                power_limit_mw: device.enforced_power_limit().ok(),
                power_limit_range_mw: device
                    .power_management_limit_constraints()
                    .ok()
                    .map(|c| (c.min_limit, c.max_limit)),
                processes,
            });
        }
        Ok(samples)
    }
}

/// AMD GPUs through amdgpu's hwmon: `energy1_input` (µJ) where the part has
/// it, else `power1_average` (µW). hwmon says nothing of processes, so an
/// AMD GPU's energy stays in the node's unattributed bucket.
pub struct AmdGpuBackend {
    chips: Vec<std::path::PathBuf>,
}

impl AmdGpuBackend {
    /// The amdgpu chips under a hwmon root; `None` when there are none.
    pub fn discover(hwmon_root: &std::path::Path) -> Option<Self> {
        let mut chips: Vec<std::path::PathBuf> = std::fs::read_dir(hwmon_root)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .filter(|chip| {
                std::fs::read_to_string(chip.join("name")).is_ok_and(|name| name.trim() == "amdgpu")
            })
            .collect();
        chips.sort();
        (!chips.is_empty()).then_some(Self { chips })
    }
}

impl GpuBackend for AmdGpuBackend {
    fn name(&self) -> &'static str {
        "amdgpu"
    }

    fn method(&self) -> EnergyMethod {
        EnergyMethod::Hwmon
    }

    fn sample(&mut self) -> Result<Vec<GpuSample>, EnergyError> {
        Ok(self
            .chips
            .iter()
            .enumerate()
            .map(|(index, chip)| {
                let (energy_uj, power_uw) = super::thermal::read_amdgpu_counters(chip);
                GpuSample {
                    index: index as u32,
                    name: "amdgpu".to_owned(),
                    uuid: chip.display().to_string(),
                    total_energy_mj: energy_uj.map(|uj| uj / 1_000),
                    power_mw: power_uw.map(|uw| (uw / 1_000) as u32),
                    temperature_celsius: std::fs::read_to_string(chip.join("temp1_input"))
                        .ok()
                        .and_then(|t| t.trim().parse::<u32>().ok())
                        .map(|m| m / 1_000),
                    power_limit_mw: std::fs::read_to_string(chip.join("power1_cap"))
                        .ok()
                        .and_then(|t| t.trim().parse::<u64>().ok())
                        .map(|uw| (uw / 1_000) as u32),
                    power_limit_range_mw: None,
                    processes: Vec::new(),
                }
            })
            .collect())
    }
}

/// A scripted backend for tests: each call to `sample` returns the next
/// frame (the last one repeats).
pub struct FakeGpuBackend {
    pub frames: Vec<Vec<GpuSample>>,
    next: usize,
}

impl FakeGpuBackend {
    pub fn new(frames: Vec<Vec<GpuSample>>) -> Self {
        Self { frames, next: 0 }
    }
}

impl GpuBackend for FakeGpuBackend {
    fn name(&self) -> &'static str {
        "fake-nvml"
    }

    fn method(&self) -> EnergyMethod {
        EnergyMethod::Nvml
    }

    fn sample(&mut self) -> Result<Vec<GpuSample>, EnergyError> {
        let frame = self
            .frames
            .get(self.next.min(self.frames.len().saturating_sub(1)))
            .cloned()
            .ok_or_else(|| EnergyError::Other("fake GPU has no frames".into()))?;
        self.next += 1;
        Ok(frame)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn gpu(
        index: u32,
        energy_mj: Option<u64>,
        power_mw: u32,
        processes: &[(u32, Option<u32>)],
    ) -> GpuSample {
        GpuSample {
            index,
            name: format!("Fake GPU {index}"),
            uuid: format!("GPU-{index}"),
            total_energy_mj: energy_mj,
            power_mw: Some(power_mw),
            temperature_celsius: Some(50),
            power_limit_mw: Some(700_000),
            power_limit_range_mw: Some((200_000, 700_000)),
            processes: processes
                .iter()
                .map(|(pid, sm)| GpuProcess {
                    pid: *pid,
                    sm_utilization_percent: *sm,
                })
                .collect(),
        }
    }

    #[test]
    fn two_gpus_three_processes() {
        let frames = vec![
            vec![
                gpu(
                    0,
                    Some(1_000_000),
                    300_000,
                    &[(10, Some(60)), (11, Some(20))],
                ),
                gpu(1, None, 150_000, &[(12, None)]),
            ],
            vec![
                gpu(
                    0,
                    Some(1_250_000),
                    300_000,
                    &[(10, Some(60)), (11, Some(20))],
                ),
                gpu(1, None, 150_000, &[(12, None)]),
            ],
        ];
        let mut source = GpuSource::new(Box::new(FakeGpuBackend::new(frames)));
        let first = source.read(1.0).unwrap();
        // GPU 0's counter needs a baseline; GPU 1 has power only.
        assert_eq!(first.energies.len(), 1);
        assert_eq!(first.energies[0].joules, 150.0);
        let second = source.read(1.0).unwrap();
        let gpu0 = second.energies.iter().find(|e| e.id.index == 0).unwrap();
        assert_eq!(gpu0.joules, 250.0);
        assert_eq!(gpu0.method, EnergyMethod::Nvml);
        assert_eq!(
            second.activity,
            vec![(0, 10, 60.0), (0, 11, 20.0), (1, 12, 1.0)]
        );
        assert_eq!(second.devices[0].energy_from, "counter");
        assert_eq!(second.devices[1].energy_from, "power");
        assert_eq!(second.devices[0].power_limit_max_watts, Some(700.0));
    }

    #[test]
    fn amdgpu_hwmon_energy_and_power() {
        let dir = tempfile::tempdir().unwrap();
        let write = |relative: &str, content: &str| {
            crate::test_support::write_fixture(dir.path(), relative, content);
        };
        write("hwmon0/name", "coretemp\n");
        write("hwmon1/name", "amdgpu\n");
        write("hwmon1/energy1_input", "5000000\n");
        write("hwmon2/name", "amdgpu\n");
        write("hwmon2/power1_average", "120000000\n");
        let backend = AmdGpuBackend::discover(dir.path()).expect("two amdgpu chips");
        let mut source = GpuSource::new(Box::new(backend));
        let first = source.read(0.5).unwrap();
        assert_eq!(first.energies.len(), 1, "the counter GPU needs a baseline");
        assert_eq!(first.energies[0].joules, 60.0);
        assert_eq!(first.energies[0].method, EnergyMethod::Hwmon);
        write("hwmon1/energy1_input", "9000000\n");
        let second = source.read(0.5).unwrap();
        assert_eq!(second.energies[0].joules, 4.0);
        assert!(second.activity.is_empty());
    }

    #[test]
    fn nvml_without_a_driver_is_a_clear_error() {
        // This machine has no NVIDIA driver (CI neither): loading must fail
        // cleanly, not crash. On a GPU machine it loads.
        match NvmlBackend::load() {
            Ok(mut backend) => assert!(backend.sample().is_ok()),
            Err(error) => assert!(error.to_string().contains("NVML"), "{error}"),
        }
    }
}
