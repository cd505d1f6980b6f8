//! The thermal guard: as a device nears its critical temperature minus the
//! operator's margin, its cap comes down progressively; it goes up again
//! only once the device has cooled a hysteresis below that point.
//!
//! With `T` the temperature, `T_c` the critical temperature, `m` the margin
//! and `P` the device's power over the last interval:
//!
//! ```text
//! T_on  = T_c − m                      (the guard acts from here)
//! over  = (T − T_on) / m               (0 at T_on, 1 at T_c)
//! cap   = P · (1 − 0.5 · over)  while T ≥ T_on, and never above the last cap
//! cap  += 5% of the ceiling per interval once T < T_on − 2 °C, until gone
//! ```

/// Degrees below `T_on` a device must cool to before its cap is raised.
pub const HYSTERESIS_CELSIUS: f64 = 2.0;

/// How much of the ceiling is given back per interval when cool.
pub const RAISE_FRACTION: f64 = 0.05;

/// The guard's cap for one device.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ThermalGuard {
    cap_watts: Option<f64>,
}

impl ThermalGuard {
    pub fn cap_watts(&self) -> Option<f64> {
        self.cap_watts
    }

    /// One interval. Returns the cap the guard asks for (`None`: no cap).
    pub fn step(
        &mut self,
        celsius: f64,
        critical_celsius: f64,
        margin_celsius: f64,
        power_watts: f64,
        floor_watts: f64,
        ceiling_watts: f64,
    ) -> Option<f64> {
        let on = critical_celsius - margin_celsius;
        if celsius >= on {
            let over = if margin_celsius > 0.0 {
                ((celsius - on) / margin_celsius).clamp(0.0, 1.0)
            } else {
                1.0
            };
            let wanted = power_watts * (1.0 - 0.5 * over);
            let capped = self.cap_watts.map_or(wanted, |cap| cap.min(wanted));
            self.cap_watts = Some(capped.clamp(floor_watts, ceiling_watts));
        } else if celsius < on - HYSTERESIS_CELSIUS
            && let Some(cap) = self.cap_watts
        {
            let raised = cap + RAISE_FRACTION * ceiling_watts;
            self.cap_watts = (raised < ceiling_watts).then_some(raised);
        }
        self.cap_watts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket with thermal inertia: temperature moves a fifth of the way
    /// each interval towards 40 °C + 0.5 °C per watt.
    #[test]
    fn a_hot_socket_is_capped_progressively_and_released_with_hysteresis() {
        let mut guard = ThermalGuard::default();
        let (critical, margin) = (100.0, 10.0);
        let demand: f64 = 120.0;
        let mut celsius = 40.0;
        let mut history = Vec::new();
        for _ in 0..60 {
            let power = guard.cap_watts().map_or(demand, |cap| demand.min(cap));
            let cap = guard.step(celsius, critical, margin, power, 30.0, 200.0);
            let next_power = cap.map_or(demand, |cap| demand.min(cap));
            celsius += (40.0 + 0.5 * next_power - celsius) / 5.0;
            history.push((celsius, cap));
        }
        let hottest = history.iter().map(|(c, _)| *c).fold(0.0, f64::max);
        eprintln!(
            "uncapped it would reach {:.0} °C; with the guard the hottest was {hottest:.1} °C, settling at {:.1} °C",
            40.0 + 0.5 * demand,
            history.last().unwrap().0
        );
        assert!(hottest < critical, "never reaches the critical temperature");
        assert!(
            history.iter().any(|(_, cap)| cap.is_some()),
            "the guard acted"
        );
        // Cooler load: the cap is raised step by step, then gone.
        let mut cool = ThermalGuard {
            cap_watts: Some(60.0),
        };
        let mut caps = Vec::new();
        for _ in 0..40 {
            caps.push(cool.step(70.0, critical, margin, 50.0, 30.0, 200.0));
        }
        assert!(
            caps.windows(2)
                .all(|w| w[1].unwrap_or(f64::MAX) >= w[0].unwrap_or(f64::MAX))
        );
        assert_eq!(*caps.last().unwrap(), None);
        // Inside the hysteresis band nothing moves.
        let mut held = ThermalGuard {
            cap_watts: Some(60.0),
        };
        assert_eq!(
            held.step(89.0, critical, margin, 50.0, 30.0, 200.0),
            Some(60.0)
        );
    }
}
