//! Temperatures: hwmon (`/sys/class/hwmon/hwmonN/{name,temp*_input,
//! temp*_label,temp*_crit,temp*_max}`) and thermal zones
//! (`/sys/class/thermal/thermal_zone*/{type,temp}`). Values are in
//! millidegrees Celsius.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{EnergyError, read_u64};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Temperature {
    /// hwmon chip name (`coretemp`, `k10temp`, `amdgpu`) or thermal zone type.
    pub sensor: String,
    pub label: Option<String>,
    pub celsius: f64,
    pub critical_celsius: Option<f64>,
    /// The CPU socket, when the label says so (`Package id 1`).
    pub socket: Option<u32>,
}

fn read_millicelsius(path: &Path) -> Result<f64, EnergyError> {
    // Temperatures can be negative: parse as signed.
    let text = std::fs::read_to_string(path).map_err(|source| EnergyError::Io {
        path: path.to_owned(),
        source,
    })?;
    text.trim()
        .parse::<i64>()
        .map(|m| m as f64 / 1000.0)
        .map_err(|_| EnergyError::Garbage {
            path: path.to_owned(),
            value: text.trim().chars().take(40).collect(),
            expected: "millidegrees Celsius",
        })
}

/// `Package id 1` (coretemp) → socket 1.
pub fn socket_of_label(label: &str) -> Option<u32> {
    label.strip_prefix("Package id ")?.trim().parse().ok()
}

fn sorted_entries(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(prefix))
                })
                .collect()
        })
        .unwrap_or_default();
    entries.sort();
    entries
}

/// Reads every hwmon temperature under `root`. Sensors that fail are
/// returned as errors; the others are read.
pub fn read_hwmon(root: &Path) -> (Vec<Temperature>, Vec<EnergyError>) {
    let mut temperatures = Vec::new();
    let mut errors = Vec::new();
    for chip in sorted_entries(root, "hwmon") {
        let sensor = std::fs::read_to_string(chip.join("name"))
            .map(|n| n.trim().to_owned())
            .unwrap_or_else(|_| {
                chip.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
        for input in sorted_entries(&chip, "temp") {
            let Some(stem) = input
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix("_input"))
            else {
                continue;
            };
            match read_millicelsius(&input) {
                Ok(celsius) => {
                    let label = std::fs::read_to_string(chip.join(format!("{stem}_label")))
                        .ok()
                        .map(|l| l.trim().to_owned());
                    let critical_celsius = read_millicelsius(&chip.join(format!("{stem}_crit")))
                        .or_else(|_| read_millicelsius(&chip.join(format!("{stem}_max"))))
                        .ok();
                    temperatures.push(Temperature {
                        socket: label.as_deref().and_then(socket_of_label),
                        sensor: sensor.clone(),
                        label,
                        celsius,
                        critical_celsius,
                    });
                }
                Err(error) => errors.push(error),
            }
        }
    }
    (temperatures, errors)
}

/// Reads every thermal zone under `root`.
pub fn read_thermal_zones(root: &Path) -> (Vec<Temperature>, Vec<EnergyError>) {
    let mut temperatures = Vec::new();
    let mut errors = Vec::new();
    for zone in sorted_entries(root, "thermal_zone") {
        let sensor = std::fs::read_to_string(zone.join("type"))
            .map(|t| t.trim().to_owned())
            .unwrap_or_else(|_| "thermal_zone".to_owned());
        match read_millicelsius(&zone.join("temp")) {
            Ok(celsius) => temperatures.push(Temperature {
                label: zone.file_name().map(|n| n.to_string_lossy().into_owned()),
                sensor,
                celsius,
                critical_celsius: None,
                socket: None,
            }),
            Err(error) => errors.push(error),
        }
    }
    (temperatures, errors)
}

/// amdgpu's hwmon exposes energy (`energy1_input`, µJ) on some parts and
/// average power (`power1_average`, µW) on others.
pub fn read_amdgpu_counters(chip: &Path) -> (Option<u64>, Option<u64>) {
    (
        read_u64(&chip.join("energy1_input")).ok(),
        read_u64(&chip.join("power1_average")).ok(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_support::write_fixture as write;

    #[test]
    fn reads_coretemp_packages_and_thermal_zones() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "hwmon/hwmon0/name", "coretemp\n");
        write(root, "hwmon/hwmon0/temp1_input", "54000\n");
        write(root, "hwmon/hwmon0/temp1_label", "Package id 0\n");
        write(root, "hwmon/hwmon0/temp1_crit", "100000\n");
        write(root, "hwmon/hwmon0/temp2_input", "61500\n");
        write(root, "hwmon/hwmon0/temp2_label", "Package id 1\n");
        write(root, "hwmon/hwmon0/temp2_max", "90000\n");
        write(root, "hwmon/hwmon1/name", "nvme\n");
        write(root, "hwmon/hwmon1/temp1_input", "not-a-number\n");
        write(root, "thermal/thermal_zone0/type", "x86_pkg_temp\n");
        write(root, "thermal/thermal_zone0/temp", "-5000\n");

        let (temperatures, errors) = read_hwmon(&root.join("hwmon"));
        assert_eq!(temperatures.len(), 2);
        assert_eq!(temperatures[0].socket, Some(0));
        assert_eq!(temperatures[0].critical_celsius, Some(100.0));
        assert_eq!(temperatures[1].celsius, 61.5);
        assert_eq!(temperatures[1].critical_celsius, Some(90.0));
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("hwmon1/temp1_input"));

        let (zones, errors) = read_thermal_zones(&root.join("thermal"));
        assert!(errors.is_empty());
        assert_eq!(zones[0].sensor, "x86_pkg_temp");
        assert_eq!(zones[0].celsius, -5.0);
    }
}
