//! Deltas of hardware energy counters that wrap around.

/// The increase of a counter from `previous` to `current`, for a counter
/// that counts from 0 up to `max_range` and then starts again at 0 (RAPL's
/// `energy_uj` wraps at `max_energy_range_uj`, every ~60 s on a busy
/// server package). `None` when the values cannot come from such a counter
/// (a value above the range): the caller drops that interval rather than
/// report a huge jump.
pub fn counter_delta(previous: u64, current: u64, max_range: u64) -> Option<u64> {
    if max_range > 0 && (previous > max_range || current > max_range) {
        return None;
    }
    if current >= previous {
        Some(current - previous)
    } else if max_range > 0 {
        // Wrapped once: up to the top of the range, then from zero.
        Some(max_range - previous + current)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn plain_increase_and_wrap() {
        assert_eq!(counter_delta(100, 250, 1000), Some(150));
        assert_eq!(counter_delta(900, 50, 1000), Some(150));
        assert_eq!(counter_delta(5, 5, 1000), Some(0));
    }

    #[test]
    fn values_outside_the_range_are_rejected() {
        assert_eq!(counter_delta(1500, 10, 1000), None);
        assert_eq!(counter_delta(10, 1500, 1000), None);
        assert_eq!(counter_delta(10, 5, 0), None);
    }

    proptest! {
        /// Advancing a wrapping counter by `step` always reads back `step`.
        #[test]
        fn wrapped_steps_read_back(max in 1u64..1u64 << 40, start_fraction in 0.0f64..1.0, step_fraction in 0.0f64..0.999) {
            let start = ((max as f64) * start_fraction) as u64;
            let step = ((max as f64) * step_fraction) as u64;
            let end = if start + step > max { start + step - max } else { start + step };
            prop_assert_eq!(counter_delta(start, end, max), Some(step));
        }
    }
}
