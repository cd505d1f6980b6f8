//! The `[controller]` table: what the operator asks of the power-cap
//! controller, checked before anything runs.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::cgroup::QosClass;

/// What the controller may do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Compute, log and export decisions; write nothing (default).
    #[default]
    Observe,
    /// Write limits.
    Enforce,
    /// No controller.
    Off,
}

impl Mode {
    pub const fn as_str(self) -> &'static str {
        match self {
            Mode::Observe => "observe",
            Mode::Enforce => "enforce",
            Mode::Off => "off",
        }
    }
}

/// Containers of these classes may be throttled, in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ThrottleClass {
    Besteffort,
    Burstable,
    Guaranteed,
    /// Containers outside Kubernetes (Docker, Podman, CRI-O without a pod).
    Container,
}

impl ThrottleClass {
    /// The class of a container with this pod QoS (`None`: no pod).
    pub fn of(qos: Option<QosClass>) -> Self {
        match qos {
            Some(QosClass::BestEffort) => Self::Besteffort,
            Some(QosClass::Burstable) => Self::Burstable,
            Some(QosClass::Guaranteed) => Self::Guaranteed,
            None => Self::Container,
        }
    }
}

/// Bounds in watts per device kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceWatts {
    pub package: Option<f64>,
    pub gpu: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerSettings {
    pub mode: Mode,
    /// Node power to stay at or under (W). No budget: the budget policy is
    /// off (the thermal guard still runs when a margin is set).
    pub budget_watts: Option<f64>,
    /// Degrees below a device's critical temperature where the thermal
    /// guard starts lowering its cap.
    pub thermal_margin_celsius: Option<f64>,
    /// Containers the controller may throttle, throttled in this order.
    pub throttle_classes: Vec<ThrottleClass>,
    /// No cap below this (W), per device kind (and never below the
    /// hardware's minimum).
    pub floor_watts: DeviceWatts,
    /// No cap above this (W), per device kind (and never above the
    /// hardware's maximum).
    pub ceiling_watts: DeviceWatts,
    /// Where the original value of everything written is kept, so it can be
    /// restored after a crash.
    pub state_file: PathBuf,
    /// Search each RAPL package's limit for the least energy-time cost of
    /// the CPU time delivered (see `efficiency`); off by default.
    pub efficiency_search: bool,
    /// Weight of energy against time in that cost: 1 = energy only, 0 =
    /// time only.
    pub efficiency_eta: f64,
}

pub const DEFAULT_STATE_FILE: &str = "/var/lib/powerlens/controller-state.json";

impl Default for ControllerSettings {
    fn default() -> Self {
        Self {
            mode: Mode::Observe,
            budget_watts: None,
            thermal_margin_celsius: None,
            throttle_classes: vec![ThrottleClass::Besteffort, ThrottleClass::Burstable],
            floor_watts: DeviceWatts::default(),
            ceiling_watts: DeviceWatts::default(),
            state_file: PathBuf::from(DEFAULT_STATE_FILE),
            efficiency_search: false,
            efficiency_eta: 0.5,
        }
    }
}

impl ControllerSettings {
    /// The first thing wrong, as (field, message).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if let Some(budget) = self.budget_watts
            && !(budget.is_finite() && budget > 0.0)
        {
            return Err((
                "controller.budget_watts",
                format!("{budget} is not a positive number of watts"),
            ));
        }
        if let Some(margin) = self.thermal_margin_celsius
            && !(margin.is_finite() && margin >= 0.0)
        {
            return Err((
                "controller.thermal_margin_celsius",
                format!("{margin} is negative"),
            ));
        }
        for (kind, floor, ceiling) in [
            (
                "package",
                self.floor_watts.package,
                self.ceiling_watts.package,
            ),
            ("gpu", self.floor_watts.gpu, self.ceiling_watts.gpu),
        ] {
            for (field, value) in [("floor_watts", floor), ("ceiling_watts", ceiling)] {
                if let Some(value) = value
                    && !(value.is_finite() && value > 0.0)
                {
                    return Err((
                        "controller.floor_watts / ceiling_watts",
                        format!("{field}.{kind} = {value} is not a positive number of watts"),
                    ));
                }
            }
            if let (Some(floor), Some(ceiling)) = (floor, ceiling)
                && floor > ceiling
            {
                return Err((
                    "controller.floor_watts",
                    format!(
                        "floor_watts.{kind} = {floor} is above ceiling_watts.{kind} = {ceiling}"
                    ),
                ));
            }
        }
        let mut seen = Vec::new();
        for class in &self.throttle_classes {
            if seen.contains(class) {
                return Err((
                    "controller.throttle_classes",
                    format!("{class:?} is listed twice"),
                ));
            }
            seen.push(*class);
        }
        if !(self.efficiency_eta.is_finite() && (0.0..=1.0).contains(&self.efficiency_eta)) {
            return Err((
                "controller.efficiency_eta",
                format!("{} is outside 0..=1", self.efficiency_eta),
            ));
        }
        if self.state_file.as_os_str().is_empty() {
            return Err(("controller.state_file", "is empty".to_owned()));
        }
        Ok(())
    }

    /// Position of a container class in the throttle order, `None` when it
    /// may not be throttled.
    pub fn rank(&self, class: ThrottleClass) -> Option<usize> {
        self.throttle_classes.iter().position(|c| *c == class)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_name_the_field() {
        let mut settings = ControllerSettings {
            budget_watts: Some(-5.0),
            ..ControllerSettings::default()
        };
        assert_eq!(settings.check().unwrap_err().0, "controller.budget_watts");
        settings.budget_watts = Some(200.0);
        settings.thermal_margin_celsius = Some(-1.0);
        assert_eq!(
            settings.check().unwrap_err().0,
            "controller.thermal_margin_celsius"
        );
        settings.thermal_margin_celsius = Some(5.0);
        settings.floor_watts.package = Some(100.0);
        settings.ceiling_watts.package = Some(50.0);
        let (field, message) = settings.check().unwrap_err();
        assert_eq!(field, "controller.floor_watts");
        assert!(message.contains("above"), "{message}");
        settings.ceiling_watts.package = Some(150.0);
        assert!(settings.check().is_ok());
    }

    #[test]
    fn guaranteed_pods_are_not_throttled_unless_named() {
        let settings = ControllerSettings::default();
        assert_eq!(settings.rank(ThrottleClass::Besteffort), Some(0));
        assert_eq!(settings.rank(ThrottleClass::Burstable), Some(1));
        assert_eq!(settings.rank(ThrottleClass::Guaranteed), None);
        assert_eq!(settings.rank(ThrottleClass::Container), None);
    }
}
