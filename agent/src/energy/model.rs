//! A power model for machines without a meter (virtual machines, most
//! cloud instances): package power per socket from CPU utilization,
//! `P = idle + (max - idle) * utilization`, with configurable coefficients.
//!
//! Where a meter exists, the same model is fitted online against it (an
//! ordinary least-squares regression of measured watts on utilization, with
//! exponential forgetting, as SmartWatts does with its own features), and
//! its error is exported; the meter's figures are the ones reported.

use serde::{Deserialize, Serialize};

use super::{Domain, DomainEnergy, DomainId, EnergyMethod};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelCoefficients {
    pub idle_watts_per_socket: f64,
    pub max_watts_per_socket: f64,
    /// Relative standard deviation assumed for uncalibrated estimates.
    pub relative_uncertainty: f64,
}

impl Default for ModelCoefficients {
    /// Rough figures for one server socket (a 16 to 32 core part idles near
    /// 20 W and runs near its ~100 W TDP flat out); set them for your
    /// hardware. The assumed error is wide on purpose.
    fn default() -> Self {
        Self {
            idle_watts_per_socket: 20.0,
            max_watts_per_socket: 100.0,
            relative_uncertainty: 0.3,
        }
    }
}

/// Online least squares of y = a + b x with forgetting factor `lambda`.
#[derive(Clone, Debug, Default)]
pub struct OnlineRegression {
    weight: f64,
    sum_x: f64,
    sum_y: f64,
    sum_xx: f64,
    sum_xy: f64,
    /// Exponentially weighted mean of squared prediction errors (made
    /// before each sample is learned: an honest out-of-sample error).
    mean_squared_error: f64,
    mean_abs_relative_error: f64,
    samples: u64,
    /// The lowest `y` seen: an idle power above it is not an idle power.
    min_y: Option<f64>,
}

/// The spread (standard deviation) of utilization a fit needs before its
/// intercept is trusted as the idle power: a node that sat at 40-60% all
/// along says little about what it draws at 0%.
pub const MIN_UTILIZATION_SPREAD: f64 = 0.1;

const FORGETTING: f64 = 0.995;

impl OnlineRegression {
    pub fn observe(&mut self, x: f64, y: f64) {
        if !x.is_finite() || !y.is_finite() {
            return;
        }
        if let Some((a, b)) = self.coefficients() {
            let error = a + b * x - y;
            self.mean_squared_error =
                FORGETTING * self.mean_squared_error + (1.0 - FORGETTING) * error * error;
            if y.abs() > 1e-9 {
                self.mean_abs_relative_error = FORGETTING * self.mean_abs_relative_error
                    + (1.0 - FORGETTING) * (error / y).abs();
            }
        }
        self.min_y = Some(self.min_y.map_or(y, |min| min.min(y)));
        self.weight = FORGETTING * self.weight + 1.0;
        self.sum_x = FORGETTING * self.sum_x + x;
        self.sum_y = FORGETTING * self.sum_y + y;
        self.sum_xx = FORGETTING * self.sum_xx + x * x;
        self.sum_xy = FORGETTING * self.sum_xy + x * y;
        self.samples += 1;
    }

    /// (intercept, slope), once the inputs vary enough to fit a line.
    pub fn coefficients(&self) -> Option<(f64, f64)> {
        if self.samples < 10 {
            return None;
        }
        let denominator = self.weight * self.sum_xx - self.sum_x * self.sum_x;
        if denominator.abs() < 1e-9 * self.weight * self.weight {
            return None;
        }
        let slope = (self.weight * self.sum_xy - self.sum_x * self.sum_y) / denominator;
        let intercept = (self.sum_y - slope * self.sum_x) / self.weight;
        Some((intercept, slope))
    }

    /// The (weighted) standard deviation of the inputs.
    pub fn x_spread(&self) -> f64 {
        if self.weight <= 0.0 {
            return 0.0;
        }
        let mean = self.sum_x / self.weight;
        (self.sum_xx / self.weight - mean * mean).max(0.0).sqrt()
    }

    /// The intercept as an idle power, when it can be one: the inputs
    /// spread enough to fit a line, and 0 <= intercept <= the lowest power
    /// seen (a node never draws less than idle), that lowest reading given
    /// two RMSEs of slack for the meter's noise. `None`: fall back.
    pub fn idle_intercept(&self) -> Option<f64> {
        let (intercept, _) = self.coefficients()?;
        let ceiling = self.min_y? + 2.0 * self.mean_squared_error.sqrt();
        (self.x_spread() >= MIN_UTILIZATION_SPREAD && intercept >= 0.0 && intercept <= ceiling)
            .then_some(intercept)
    }

    pub fn rmse(&self) -> Option<f64> {
        (self.samples > 10).then(|| self.mean_squared_error.sqrt())
    }

    pub fn mean_abs_relative_error(&self) -> Option<f64> {
        (self.samples > 10).then_some(self.mean_abs_relative_error)
    }
}

/// How good the fitted model is against the meter, per socket.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModelFit {
    pub socket: u32,
    pub idle_watts: f64,
    pub max_watts: f64,
    pub rmse_watts: f64,
    pub mean_abs_relative_error: f64,
}

pub struct PowerModel {
    coefficients: ModelCoefficients,
    fits: Vec<OnlineRegression>,
}

impl PowerModel {
    pub fn new(coefficients: ModelCoefficients) -> Self {
        Self {
            coefficients,
            fits: Vec::new(),
        }
    }

    /// Estimated package energy per socket for an interval of `seconds`
    /// with the given utilization (0..=1) per socket.
    pub fn estimate(&self, utilization_by_socket: &[f64], seconds: f64) -> Vec<DomainEnergy> {
        utilization_by_socket
            .iter()
            .enumerate()
            .map(|(socket, utilization)| {
                let utilization = utilization.clamp(0.0, 1.0);
                let c = &self.coefficients;
                let watts = c.idle_watts_per_socket
                    + (c.max_watts_per_socket - c.idle_watts_per_socket) * utilization;
                let joules = watts * seconds;
                DomainEnergy {
                    id: DomainId {
                        domain: Domain::Package,
                        index: socket as u32,
                    },
                    joules,
                    method: EnergyMethod::Model,
                    uncertainty_joules: Some(joules * c.relative_uncertainty),
                }
            })
            .collect()
    }

    /// Learns from a metered interval: package watts against utilization.
    pub fn calibrate(&mut self, socket: usize, utilization: f64, measured_watts: f64) {
        if self.fits.len() <= socket {
            self.fits.resize_with(socket + 1, OnlineRegression::default);
        }
        self.fits[socket].observe(utilization, measured_watts);
    }

    /// Per socket, the fitted idle power where it passes the checks of
    /// [`OnlineRegression::idle_intercept`].
    pub fn idle_watts(&self) -> Vec<(u32, f64)> {
        self.fits
            .iter()
            .enumerate()
            .filter_map(|(socket, fit)| Some((socket as u32, fit.idle_intercept()?)))
            .collect()
    }

    pub fn fits(&self) -> Vec<ModelFit> {
        self.fits
            .iter()
            .enumerate()
            .filter_map(|(socket, fit)| {
                let (intercept, slope) = fit.coefficients()?;
                Some(ModelFit {
                    socket: socket as u32,
                    idle_watts: intercept,
                    max_watts: intercept + slope,
                    rmse_watts: fit.rmse()?,
                    mean_abs_relative_error: fit.mean_abs_relative_error()?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_follow_utilization() {
        let model = PowerModel::new(ModelCoefficients::default());
        let energies = model.estimate(&[0.0, 0.5, 1.5], 2.0);
        let joules: Vec<f64> = energies.iter().map(|e| e.joules).collect();
        assert_eq!(joules, vec![40.0, 120.0, 200.0]);
        assert!(energies.iter().all(|e| e.method == EnergyMethod::Model));
        assert_eq!(energies[1].uncertainty_joules, Some(36.0));
    }

    #[test]
    fn calibration_recovers_a_linear_plant() {
        let mut model = PowerModel::new(ModelCoefficients::default());
        // A plant drawing 35 W idle and 180 W flat out, with ±1 W of noise.
        for i in 0..2000 {
            let utilization = f64::from((i * 37) % 100) / 100.0;
            let noise = if i % 2 == 0 { 1.0 } else { -1.0 };
            model.calibrate(0, utilization, 35.0 + 145.0 * utilization + noise);
        }
        let fit = &model.fits()[0];
        assert!((fit.idle_watts - 35.0).abs() < 0.5, "{fit:?}");
        assert!((fit.max_watts - 180.0).abs() < 0.5, "{fit:?}");
        assert!(fit.rmse_watts < 1.5, "{fit:?}");
    }

    #[test]
    fn the_fitted_idle_power_is_used_only_when_it_can_be_one() {
        // Utilization spread 0..1: the intercept (35 W) is the idle power.
        let mut spread = OnlineRegression::default();
        for i in 0..500 {
            let u = f64::from(i % 100) / 100.0;
            let noise = if i % 2 == 0 { 1.0 } else { -1.0 };
            spread.observe(u, 35.0 + 145.0 * u + noise);
        }
        assert!((spread.idle_intercept().unwrap() - 35.0).abs() < 0.5);
        // Always 45-55% busy: a line fits, but says little about 0%.
        let mut narrow = OnlineRegression::default();
        for i in 0..500 {
            let u = 0.45 + f64::from(i % 10) / 100.0;
            narrow.observe(u, 35.0 + 145.0 * u);
        }
        assert!(narrow.coefficients().is_some());
        assert_eq!(narrow.idle_intercept(), None);
        // A curve that bends down at low load extrapolates to a negative
        // intercept: not an idle power.
        let mut negative = OnlineRegression::default();
        for i in 0..500 {
            let u = f64::from(i % 100) / 100.0;
            negative.observe(u, -20.0 + 200.0 * u.sqrt().max(0.1));
        }
        assert_eq!(negative.idle_intercept(), None);
        // An intercept above the lowest power seen is not an idle power.
        let mut above = OnlineRegression::default();
        for i in 0..500 {
            let u = f64::from(i % 100) / 100.0;
            above.observe(u, if u < 0.05 { 10.0 } else { 60.0 + 100.0 * u });
        }
        let (intercept, _) = above.coefficients().unwrap();
        assert!(intercept > 10.0, "{intercept}");
        assert_eq!(above.idle_intercept(), None);
    }

    #[test]
    fn constant_input_does_not_fit() {
        let mut regression = OnlineRegression::default();
        for _ in 0..100 {
            regression.observe(0.5, 60.0);
        }
        assert_eq!(regression.coefficients(), None);
    }
}
