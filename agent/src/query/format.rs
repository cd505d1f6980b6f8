//! Readable figures for `powerlens query`: energy in J, Wh or kWh as the
//! size calls for, watts with `~` and the uncertainty on estimates, and
//! tables whose columns fit their contents. Pure, tested here.

use serde_json::Value;

/// `512.0 J`, `3.42 Wh`, `1.20 kWh`.
pub fn energy(joules: f64) -> String {
    if !joules.is_finite() {
        return "-".to_owned();
    }
    if joules < 3_600.0 {
        format!("{joules:.1} J")
    } else if joules < 3_600_000.0 {
        format!("{:.2} Wh", joules / 3_600.0)
    } else {
        format!("{:.2} kWh", joules / 3_600_000.0)
    }
}

/// `12.3 W`, or `~12.3 W ±30%` for an estimate.
pub fn power(watts: f64, estimated: bool, relative_uncertainty: Option<f64>) -> String {
    if !watts.is_finite() {
        return "-".to_owned();
    }
    match (estimated, relative_uncertainty) {
        (true, Some(u)) => format!("~{watts:.1} W ±{:.0}%", u * 100.0),
        (true, None) => format!("~{watts:.1} W"),
        (false, _) => format!("{watts:.1} W"),
    }
}

/// A number from a JSON path, NaN when missing.
pub fn number(value: &Value, path: &[&str]) -> f64 {
    let mut at = value;
    for key in path {
        at = &at[*key];
    }
    at.as_f64().unwrap_or(f64::NAN)
}

pub fn text<'a>(value: &'a Value, key: &str) -> &'a str {
    value[key].as_str().unwrap_or("")
}

/// The first `n` characters (ids are shown short; they stay unique enough
/// to look up with `query container`).
pub fn short(id: &str, n: usize) -> String {
    id.chars().take(n).collect()
}

/// Lays out rows under a header, each column as wide as its widest cell,
/// numbers (cells that start with a digit, `~` or `-`) right-aligned.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let numeric = |cell: &str| {
        cell.starts_with(|c: char| c.is_ascii_digit() || c == '~')
            || (cell.starts_with('-') && cell.len() > 1)
    };
    let mut out = String::new();
    let line = |cells: Vec<String>, out: &mut String| {
        let formatted: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| {
                if numeric(cell) {
                    format!("{cell:>width$}")
                } else {
                    format!("{cell:<width$}")
                }
            })
            .collect();
        out.push_str(formatted.join("  ").trim_end());
        out.push('\n');
    };
    line(header.iter().map(|h| (*h).to_owned()).collect(), &mut out);
    for row in rows {
        line(row.clone(), &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn energy_takes_the_unit_its_size_calls_for() {
        assert_eq!(energy(512.0), "512.0 J");
        assert_eq!(energy(12_312.0), "3.42 Wh");
        assert_eq!(energy(4_320_000.0), "1.20 kWh");
        assert_eq!(energy(f64::NAN), "-");
    }

    #[test]
    fn estimates_carry_a_tilde_and_their_uncertainty() {
        assert_eq!(power(12.34, false, None), "12.3 W");
        assert_eq!(power(12.34, true, Some(0.3)), "~12.3 W ±30%");
        assert_eq!(power(12.34, true, None), "~12.3 W");
    }

    #[test]
    fn tables_align_text_left_and_numbers_right() {
        let text = table(
            &["NAME", "POWER"],
            &[
                vec!["a".into(), "1.0 W".into()],
                vec!["longer".into(), "~12.5 W ±30%".into()],
            ],
        );
        assert_eq!(
            text,
            "NAME    POWER\na              1.0 W\nlonger  ~12.5 W ±30%\n"
        );
    }
}
