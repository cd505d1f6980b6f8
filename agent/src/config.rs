//! Configuration: a TOML file, environment variables and flags, in rising
//! order of precedence (a flag beats its environment variable, which beats
//! the file, which beats the default). Errors name the field at fault.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

use crate::{
    energy::{Domain, attribution::IdlePolicy},
    sinks::otlp::OtlpConfig,
};

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid `{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

/// How CPU time is measured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MethodChoice {
    /// Kernel programs, falling back to procfs if the kernel refuses them.
    #[default]
    Auto,
    /// Kernel programs only: refusing them is fatal.
    Ebpf,
    /// procfs sampling only.
    Procfs,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// How often to read and publish, 100ms to 1h.
    #[serde(with = "duration_text")]
    pub interval: Duration,
    /// Where the JSON API listens.
    pub listen: SocketAddr,
    /// How long exited processes and containers stay queryable.
    #[serde(with = "duration_text")]
    pub retention: Duration,
    /// Most exited processes kept for queries within the retention (the
    /// oldest go first; their time stays in their workload's figures).
    pub max_exited_processes: usize,
    pub method: MethodChoice,
    /// Records in each CPU's switch log (a power of two, 40 bytes of
    /// kernel memory each); 0 sizes them to 8 MiB over all CPUs (8,192
    /// per CPU up to 25 CPUs, 2,048 from 103). The agent drains a log
    /// between intervals when it fills faster than that; switches that
    /// still find it full go to the overflow map (`switch_log_full`).
    pub switch_log_len: u32,
    /// Threads whose switches found their CPU's log full that the kernel
    /// side can hold between two reads (newest record per thread; past it
    /// `overflow_map_full` counts dropped records). ~120 bytes each.
    pub overflow_map_capacity: u32,
    /// Kernel BTF (type information) used to load the programs.
    pub btf_path: PathBuf,
    pub procfs_root: PathBuf,
    pub sysfs_root: PathBuf,
    /// The cgroup v2 mount; found in /proc/self/mountinfo when unset.
    pub cgroup_root: Option<PathBuf>,
    /// Print a table of the top workloads every interval.
    pub table: bool,
    pub table_rows: usize,
    /// powercap (RAPL) root; default `/sys/class/powercap`. A configured
    /// root that does not exist is an error; a missing default turns the
    /// source off.
    pub powercap_root: Option<PathBuf>,
    /// hwmon root; default `/sys/class/hwmon`.
    pub hwmon_root: Option<PathBuf>,
    /// Thermal zones root; default `/sys/class/thermal`.
    pub thermal_root: Option<PathBuf>,
    /// Read NVIDIA GPUs through NVML when the library is there.
    pub gpu: bool,
    /// What happens to idle energy: unattributed, even or proportional.
    pub idle_policy: IdlePolicy,
    /// Idle power per domain instance (e.g. `{ package = 15.0, dram = 2.0 }`);
    /// domains not listed learn it as a low percentile of observed power.
    pub idle_watts: BTreeMap<String, f64>,
    /// Window and percentile of the learned idle baseline.
    #[serde(with = "duration_text")]
    pub idle_window: Duration,
    pub idle_percentile: f64,
    /// The power model used where no meter exists, per socket.
    pub model_idle_watts_per_socket: f64,
    pub model_max_watts_per_socket: f64,
    /// A second address serving only `/metrics` and `/healthz` (e.g. the
    /// node's address, while `listen` stays on loopback).
    pub metrics_listen: Option<SocketAddr>,
    /// Per-process series in `/metrics` and OTLP (high cardinality).
    pub export_processes: bool,
    /// A file holding a bearer token that the API and `/metrics` then ask
    /// for (`/healthz` stays open). `POWERLENS_API_TOKEN` gives the token
    /// itself.
    pub api_token_file: Option<PathBuf>,
    /// OTLP push; off unless an endpoint is configured here, by flag or by
    /// the standard OTEL_EXPORTER_OTLP_* variables.
    pub otlp: OtlpConfig,
    /// The power-cap controller (`observe` by default: decides, writes
    /// nothing).
    pub controller: crate::controller::settings::ControllerSettings,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            listen: SocketAddr::from(([127, 0, 0, 1], 9876)),
            retention: Duration::from_secs(15 * 60),
            max_exited_processes: crate::accounting::DEFAULT_MAX_EXITED_PROCESSES,
            method: MethodChoice::Auto,
            switch_log_len: 0,
            overflow_map_capacity: agent_common::OVERFLOW_MAP_CAPACITY,
            btf_path: PathBuf::from("/sys/kernel/btf/vmlinux"),
            procfs_root: PathBuf::from("/proc"),
            sysfs_root: PathBuf::from("/sys"),
            cgroup_root: None,
            table: true,
            table_rows: 10,
            powercap_root: None,
            hwmon_root: None,
            thermal_root: None,
            gpu: true,
            idle_policy: IdlePolicy::Unattributed,
            idle_watts: BTreeMap::new(),
            idle_window: Duration::from_secs(3600),
            idle_percentile: 0.05,
            model_idle_watts_per_socket: 20.0,
            model_max_watts_per_socket: 100.0,
            metrics_listen: None,
            export_processes: false,
            api_token_file: None,
            otlp: OtlpConfig::default(),
            controller: crate::controller::settings::ControllerSettings::default(),
        }
    }
}

pub const DEFAULT_POWERCAP_ROOT: &str = "/sys/class/powercap";
pub const DEFAULT_HWMON_ROOT: &str = "/sys/class/hwmon";
pub const DEFAULT_THERMAL_ROOT: &str = "/sys/class/thermal";

pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);

/// Values given as flags or environment variables; `None` keeps the file's.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Overrides {
    /// TOML config file.
    #[arg(long, env = "POWERLENS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Read and publish interval (e.g. 1s, 500ms; 100ms at least).
    #[arg(long, env = "POWERLENS_INTERVAL", value_parser = parse_duration_arg)]
    pub interval: Option<Duration>,
    /// Address of the JSON API.
    #[arg(long, env = "POWERLENS_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// How long exited processes and containers stay queryable (e.g. 15m).
    #[arg(long, env = "POWERLENS_RETENTION", value_parser = parse_duration_arg)]
    pub retention: Option<Duration>,
    /// CPU time source.
    #[arg(long, env = "POWERLENS_METHOD", value_enum)]
    pub method: Option<MethodChoice>,
    /// Kernel BTF file.
    /// Most exited processes kept for queries.
    #[arg(long, env = "POWERLENS_MAX_EXITED_PROCESSES")]
    pub max_exited_processes: Option<usize>,
    /// Records in each CPU's switch log (a power of two).
    #[arg(long, env = "POWERLENS_SWITCH_LOG_LEN")]
    pub switch_log_len: Option<u32>,
    /// Threads the kernel side holds records of when a CPU's log is full.
    #[arg(long, env = "POWERLENS_OVERFLOW_MAP_CAPACITY")]
    pub overflow_map_capacity: Option<u32>,
    #[arg(long, env = "POWERLENS_BTF_PATH")]
    pub btf_path: Option<PathBuf>,
    /// Root of procfs (for containers that mount the host's elsewhere).
    #[arg(long, env = "POWERLENS_PROCFS_ROOT")]
    pub procfs_root: Option<PathBuf>,
    /// Root of sysfs.
    #[arg(long, env = "POWERLENS_SYSFS_ROOT")]
    pub sysfs_root: Option<PathBuf>,
    /// cgroup v2 mount point (default: found in /proc/self/mountinfo).
    #[arg(long, env = "POWERLENS_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,
    /// Do not print the table every interval.
    #[arg(long, env = "POWERLENS_NO_TABLE")]
    pub no_table: bool,
    /// Rows of the table.
    #[arg(long, env = "POWERLENS_TABLE_ROWS")]
    pub table_rows: Option<usize>,
    /// powercap root for RAPL (default /sys/class/powercap).
    #[arg(long, env = "POWERLENS_POWERCAP_ROOT")]
    pub powercap_root: Option<PathBuf>,
    /// hwmon root (default /sys/class/hwmon).
    #[arg(long, env = "POWERLENS_HWMON_ROOT")]
    pub hwmon_root: Option<PathBuf>,
    /// Thermal zone root (default /sys/class/thermal).
    #[arg(long, env = "POWERLENS_THERMAL_ROOT")]
    pub thermal_root: Option<PathBuf>,
    /// Do not look for NVIDIA GPUs.
    #[arg(long, env = "POWERLENS_NO_GPU")]
    pub no_gpu: bool,
    /// What happens to idle energy.
    #[arg(long, env = "POWERLENS_IDLE_POLICY", value_enum)]
    pub idle_policy: Option<IdlePolicy>,
    /// Idle watts per domain, e.g. `package=15,dram=2`.
    #[arg(long, env = "POWERLENS_IDLE_WATTS", value_parser = parse_idle_watts)]
    pub idle_watts: Option<BTreeMap<String, f64>>,
    /// Model: idle watts per socket (used where no meter exists).
    #[arg(long, env = "POWERLENS_MODEL_IDLE_WATTS")]
    pub model_idle_watts_per_socket: Option<f64>,
    /// Model: watts per socket at full load.
    #[arg(long, env = "POWERLENS_MODEL_MAX_WATTS")]
    pub model_max_watts_per_socket: Option<f64>,
    /// Also serve /metrics (and /healthz) on this address.
    #[arg(long, env = "POWERLENS_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Export per-process series too (high cardinality).
    #[arg(long, env = "POWERLENS_EXPORT_PROCESSES")]
    pub export_processes: bool,
    /// Power-cap controller: observe (default), enforce or off.
    #[arg(long, env = "POWERLENS_CONTROLLER_MODE", value_enum)]
    pub controller_mode: Option<crate::controller::settings::Mode>,
    /// Node power budget for the controller (W).
    #[arg(long, env = "POWERLENS_CONTROLLER_BUDGET_WATTS")]
    pub budget_watts: Option<f64>,
    /// Thermal margin below a device's critical temperature (°C).
    #[arg(long, env = "POWERLENS_CONTROLLER_THERMAL_MARGIN_CELSIUS")]
    pub thermal_margin_celsius: Option<f64>,
    /// Where the controller keeps the originals of what it changed.
    #[arg(long, env = "POWERLENS_CONTROLLER_STATE_FILE")]
    pub controller_state_file: Option<PathBuf>,
    /// Container classes the controller may throttle, in order
    /// (`besteffort,burstable`).
    #[arg(long, env = "POWERLENS_CONTROLLER_THROTTLE_CLASSES", value_parser = parse_throttle_classes)]
    pub throttle_classes: Option<Vec<crate::controller::settings::ThrottleClass>>,
    /// Lowest caps per device kind (`package=60,gpu=150`).
    #[arg(long, env = "POWERLENS_CONTROLLER_FLOOR_WATTS", value_parser = parse_device_watts)]
    pub floor_watts: Option<crate::controller::settings::DeviceWatts>,
    /// Highest caps per device kind (`package=205,gpu=700`).
    #[arg(long, env = "POWERLENS_CONTROLLER_CEILING_WATTS", value_parser = parse_device_watts)]
    pub ceiling_watts: Option<crate::controller::settings::DeviceWatts>,
    /// Search each socket's cheapest energy-time limit.
    #[arg(long, env = "POWERLENS_CONTROLLER_EFFICIENCY_SEARCH")]
    pub efficiency_search: bool,
    /// Weight of energy against time in that search (0..=1).
    #[arg(long, env = "POWERLENS_CONTROLLER_EFFICIENCY_ETA")]
    pub efficiency_eta: Option<f64>,
    /// File with the bearer token the API and /metrics ask for.
    #[arg(long, env = "POWERLENS_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
    /// OTLP endpoint (e.g. http://otel-collector:4317); beats
    /// OTEL_EXPORTER_OTLP_ENDPOINT and the file's `otlp.endpoint`.
    #[arg(long, env = "POWERLENS_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

fn parse_throttle_classes(
    text: &str,
) -> Result<Vec<crate::controller::settings::ThrottleClass>, String> {
    use crate::controller::settings::ThrottleClass;
    text.split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(|part| match part {
            "besteffort" => Ok(ThrottleClass::Besteffort),
            "burstable" => Ok(ThrottleClass::Burstable),
            "guaranteed" => Ok(ThrottleClass::Guaranteed),
            "container" => Ok(ThrottleClass::Container),
            other => Err(format!(
                "{other:?} is not a class: besteffort, burstable, guaranteed or container"
            )),
        })
        .collect()
}

fn parse_device_watts(text: &str) -> Result<crate::controller::settings::DeviceWatts, String> {
    let mut watts = crate::controller::settings::DeviceWatts::default();
    for (kind, value) in parse_idle_watts(text)? {
        match kind.as_str() {
            "package" => watts.package = Some(value),
            "gpu" => watts.gpu = Some(value),
            other => return Err(format!("{other:?} is not a device kind: package or gpu")),
        }
    }
    Ok(watts)
}

fn parse_idle_watts(text: &str) -> Result<BTreeMap<String, f64>, String> {
    let mut map = BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (domain, watts) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?}: write DOMAIN=WATTS, e.g. package=15"))?;
        let watts: f64 = watts
            .trim()
            .parse()
            .map_err(|_| format!("{part:?}: {watts:?} is not a number of watts"))?;
        map.insert(domain.trim().to_owned(), watts);
    }
    Ok(map)
}

fn parse_duration_arg(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration ({e}); write e.g. 1s, 500ms, 15m"))
}

impl Config {
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// The file (if any), then the overrides, then validation.
    pub fn load(overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut config = match &overrides.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                Self::from_toml(&text, path)?
            }
            None => Self::default(),
        };
        config.apply(overrides);
        config.validate()?;
        Ok(config)
    }

    pub fn apply(&mut self, o: &Overrides) {
        if let Some(v) = o.interval {
            self.interval = v;
        }
        if let Some(v) = o.listen {
            self.listen = v;
        }
        if let Some(v) = o.retention {
            self.retention = v;
        }
        if let Some(v) = o.max_exited_processes {
            self.max_exited_processes = v;
        }
        if let Some(v) = o.overflow_map_capacity {
            self.overflow_map_capacity = v;
        }
        if let Some(v) = o.switch_log_len {
            self.switch_log_len = v;
        }
        if let Some(v) = o.method {
            self.method = v;
        }
        if let Some(v) = &o.btf_path {
            self.btf_path = v.clone();
        }
        if let Some(v) = &o.procfs_root {
            self.procfs_root = v.clone();
        }
        if let Some(v) = &o.sysfs_root {
            self.sysfs_root = v.clone();
        }
        if let Some(v) = &o.cgroup_root {
            self.cgroup_root = Some(v.clone());
        }
        if o.no_table {
            self.table = false;
        }
        if let Some(v) = o.table_rows {
            self.table_rows = v;
        }
        if let Some(v) = &o.powercap_root {
            self.powercap_root = Some(v.clone());
        }
        if let Some(v) = &o.hwmon_root {
            self.hwmon_root = Some(v.clone());
        }
        if let Some(v) = &o.thermal_root {
            self.thermal_root = Some(v.clone());
        }
        if o.no_gpu {
            self.gpu = false;
        }
        if let Some(v) = o.idle_policy {
            self.idle_policy = v;
        }
        if let Some(v) = &o.idle_watts {
            self.idle_watts = v.clone();
        }
        if let Some(v) = o.model_idle_watts_per_socket {
            self.model_idle_watts_per_socket = v;
        }
        if let Some(v) = o.model_max_watts_per_socket {
            self.model_max_watts_per_socket = v;
        }
        if let Some(v) = o.metrics_listen {
            self.metrics_listen = Some(v);
        }
        if o.export_processes {
            self.export_processes = true;
        }
        if let Some(v) = &o.api_token_file {
            self.api_token_file = Some(v.clone());
        }
        if let Some(v) = o.controller_mode {
            self.controller.mode = v;
        }
        if let Some(v) = o.budget_watts {
            self.controller.budget_watts = Some(v);
        }
        if let Some(v) = o.thermal_margin_celsius {
            self.controller.thermal_margin_celsius = Some(v);
        }
        if let Some(v) = &o.controller_state_file {
            self.controller.state_file = v.clone();
        }
        if let Some(v) = &o.throttle_classes {
            self.controller.throttle_classes = v.clone();
        }
        if let Some(v) = o.floor_watts {
            self.controller.floor_watts = v;
        }
        if let Some(v) = o.ceiling_watts {
            self.controller.ceiling_watts = v;
        }
        if o.efficiency_search {
            self.controller.efficiency_search = true;
        }
        if let Some(v) = o.efficiency_eta {
            self.controller.efficiency_eta = v;
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.interval < MIN_INTERVAL || self.interval > MAX_INTERVAL {
            return Err(ConfigError::Invalid {
                field: "interval",
                message: format!(
                    "{} is outside {}..={}",
                    humantime::format_duration(self.interval),
                    humantime::format_duration(MIN_INTERVAL),
                    humantime::format_duration(MAX_INTERVAL)
                ),
            });
        }
        if self.retention < self.interval {
            return Err(ConfigError::Invalid {
                field: "retention",
                message: format!(
                    "{} is shorter than the interval ({})",
                    humantime::format_duration(self.retention),
                    humantime::format_duration(self.interval)
                ),
            });
        }
        if let Err((field, message)) = self.controller.check() {
            return Err(ConfigError::Invalid { field, message });
        }
        if !(1..=1 << 24).contains(&self.overflow_map_capacity) {
            return Err(ConfigError::Invalid {
                field: "overflow_map_capacity",
                message: format!("{} is outside 1..=16777216", self.overflow_map_capacity),
            });
        }
        if self.switch_log_len != 0
            && (!(64..=1 << 20).contains(&self.switch_log_len)
                || !self.switch_log_len.is_power_of_two())
        {
            return Err(ConfigError::Invalid {
                field: "switch_log_len",
                message: format!(
                    "{} is neither 0 (sized by the agent) nor a power of two within 64..=1048576",
                    self.switch_log_len
                ),
            });
        }
        for (field, path) in [
            ("procfs_root", &self.procfs_root),
            ("sysfs_root", &self.sysfs_root),
        ] {
            if !path.is_dir() {
                return Err(ConfigError::Invalid {
                    field,
                    message: format!("{} is not a directory", path.display()),
                });
            }
        }
        if let Some(root) = &self.cgroup_root
            && !root.is_dir()
        {
            return Err(ConfigError::Invalid {
                field: "cgroup_root",
                message: format!("{} is not a directory", root.display()),
            });
        }
        for (field, root) in [
            ("powercap_root", &self.powercap_root),
            ("hwmon_root", &self.hwmon_root),
            ("thermal_root", &self.thermal_root),
        ] {
            if let Some(root) = root
                && !root.is_dir()
            {
                return Err(ConfigError::Invalid {
                    field,
                    message: format!("{} does not exist", root.display()),
                });
            }
        }
        for (domain, watts) in &self.idle_watts {
            if !Domain::ALL.iter().any(|d| d.as_str() == domain) {
                return Err(ConfigError::Invalid {
                    field: "idle_watts",
                    message: format!(
                        "unknown domain {domain:?}; domains are {}",
                        Domain::ALL.map(Domain::as_str).join(", ")
                    ),
                });
            }
            if !watts.is_finite() || *watts < 0.0 {
                return Err(ConfigError::Invalid {
                    field: "idle_watts",
                    message: format!("{domain} = {watts} is not a non-negative number of watts"),
                });
            }
        }
        if !(0.0..=1.0).contains(&self.idle_percentile) {
            return Err(ConfigError::Invalid {
                field: "idle_percentile",
                message: format!("{} is outside 0..=1", self.idle_percentile),
            });
        }
        let (idle, max) = (
            self.model_idle_watts_per_socket,
            self.model_max_watts_per_socket,
        );
        if !(idle.is_finite() && max.is_finite() && 0.0 <= idle && idle <= max) {
            return Err(ConfigError::Invalid {
                field: "model_max_watts_per_socket",
                message: format!(
                    "need 0 <= model_idle_watts_per_socket ({idle}) <= model_max_watts_per_socket ({max})"
                ),
            });
        }
        if self.table_rows == 0 || self.table_rows > 1000 {
            return Err(ConfigError::Invalid {
                field: "table_rows",
                message: format!("{} is outside 1..=1000", self.table_rows),
            });
        }
        Ok(())
    }
}

/// Optional durations as human text in TOML.
pub(crate) mod optional_duration_text {
    use super::*;

    pub fn serialize<S: Serializer>(
        value: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(value) => super::duration_text::serialize(value, serializer),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        super::duration_text::deserialize(deserializer).map(Some)
    }
}

/// Durations as human text in TOML ("1s", "15m").
mod duration_text {
    use super::*;

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(*value).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "{text:?} is not a duration ({e}); write e.g. \"1s\", \"500ms\""
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_values_then_overrides() {
        let config = Config::from_toml(
            "interval = \"250ms\"\nlisten = \"127.0.0.1:1\"\n",
            Path::new("x.toml"),
        )
        .unwrap();
        assert_eq!(config.interval, Duration::from_millis(250));
        let mut config = config;
        config.apply(&Overrides {
            listen: Some("127.0.0.1:2".parse().unwrap()),
            ..Default::default()
        });
        assert_eq!(config.listen.port(), 2);
        assert_eq!(config.interval, Duration::from_millis(250));
        config.validate().unwrap();
    }

    #[test]
    fn unknown_fields_and_bad_values_name_the_field() {
        let error = Config::from_toml("intervall = \"1s\"", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("intervall"), "{error}");
        assert!(error.contains("c.toml"), "{error}");
        let error = Config::from_toml("interval = \"fast\"", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("interval") && error.contains("fast"),
            "{error}"
        );
        let config = Config {
            interval: Duration::from_millis(10),
            ..Default::default()
        };
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("`interval`"), "{error}");
    }

    #[test]
    fn a_missing_root_is_named() {
        let config = Config {
            procfs_root: PathBuf::from("/definitely/not/here"),
            ..Default::default()
        };
        let error = config.validate().unwrap_err().to_string();
        assert!(
            error.contains("procfs_root") && error.contains("/definitely/not/here"),
            "{error}"
        );
    }

    #[test]
    fn energy_settings_are_checked() {
        let config = Config::from_toml(
            "idle_watts = { package = 12.5, gpu = 60 }\nidle_policy = \"even\"\n",
            Path::new("e.toml"),
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(config.idle_policy, IdlePolicy::Even);
        let bad = Config::from_toml("idle_watts = { cpu = 1 }", Path::new("e.toml")).unwrap();
        let error = bad.validate().unwrap_err().to_string();
        assert!(
            error.contains("idle_watts") && error.contains("cpu"),
            "{error}"
        );
        let missing = Config {
            powercap_root: Some(PathBuf::from("/nonexistent/powercap")),
            ..Default::default()
        };
        let error = missing.validate().unwrap_err().to_string();
        assert!(
            error.contains("powercap_root") && error.contains("/nonexistent/powercap"),
            "{error}"
        );
        assert_eq!(parse_idle_watts("package=15, dram=2").unwrap().len(), 2);
        assert!(parse_idle_watts("package").is_err());
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let text = include_str!("../../deploy/powerlens.toml");
        let config = Config::from_toml(text, Path::new("deploy/powerlens.toml")).unwrap();
        config.validate().unwrap();
    }

    #[test]
    fn defaults_round_trip_through_toml() {
        let text = toml::to_string(&Config::default()).unwrap();
        assert_eq!(
            Config::from_toml(&text, Path::new("d.toml")).unwrap(),
            Config::default()
        );
    }
}
