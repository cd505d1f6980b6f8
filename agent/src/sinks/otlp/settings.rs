//! Where and how OTLP is pushed: the `[otlp]` table of the config file, the
//! `--otlp-endpoint` flag, and the standard OpenTelemetry variables, resolved
//! in one pure function so the precedence is tested, not assumed.
//!
//! Precedence, as for every powerlens knob: flag, then environment, then
//! file, then default. Among variables, the metrics-specific one
//! (`OTEL_EXPORTER_OTLP_METRICS_*`) beats the generic one.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The `[otlp]` table of the config file.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpConfig {
    /// `http://collector:4317` (gRPC) or `http://collector:4318` (HTTP). No
    /// endpoint anywhere: OTLP is off.
    pub endpoint: Option<String>,
    /// `grpc` (default) or `http/protobuf`.
    pub protocol: Option<String>,
    /// Sent with every export (e.g. an API key).
    pub headers: BTreeMap<String, String>,
    /// Per export; default 10 s.
    #[serde(with = "crate::config::optional_duration_text")]
    pub timeout: Option<Duration>,
    /// Default 10 s.
    #[serde(with = "crate::config::optional_duration_text")]
    pub export_interval: Option<Duration>,
    /// A PEM file of CA certificates for an `https` endpoint (system roots
    /// are used too).
    pub certificate: Option<PathBuf>,
    /// Containers, pods, other workloads and processes with series of their
    /// own, each; the rest are summed into one series marked
    /// `otel.metric.overflow = true` (nothing is dropped). Default 2000.
    pub series_limit: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

/// Everything the exporter is built from.
#[derive(Clone, Debug, PartialEq)]
pub struct OtlpSettings {
    /// The full URL the exporter posts to (`…/v1/metrics` for HTTP).
    pub endpoint: String,
    pub protocol: Protocol,
    /// From the file; the exporter adds `OTEL_EXPORTER_OTLP_(METRICS_)HEADERS`.
    pub headers: BTreeMap<String, String>,
    pub timeout: Duration,
    pub export_interval: Duration,
    pub certificate: Option<PathBuf>,
    pub series_limit: usize,
}

#[derive(Debug, Error, PartialEq)]
pub enum SettingsError {
    #[error("invalid {source_name}: {message}")]
    Invalid {
        source_name: String,
        message: String,
    },
}

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_EXPORT_INTERVAL: Duration = Duration::from_secs(10);
const DEFAULT_SERIES_LIMIT: usize = 2000;

fn invalid(source_name: &str, message: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        source_name: source_name.to_owned(),
        message: message.into(),
    }
}

/// The first variable of `names` that is set and not empty, with its name.
fn first_var(
    env: &dyn Fn(&str) -> Option<String>,
    names: &[&'static str],
) -> Option<(&'static str, String)> {
    names.iter().find_map(|name| {
        env(name)
            .filter(|v| !v.trim().is_empty())
            .map(|v| (*name, v))
    })
}

/// Milliseconds, as the OpenTelemetry variables give durations.
fn millis(name: &str, raw: &str) -> Result<Duration, SettingsError> {
    raw.trim()
        .parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|_| {
            invalid(
                name,
                format!("{raw:?} is not a whole number of milliseconds"),
            )
        })
}

fn check_endpoint(name: &str, endpoint: &str) -> Result<(), SettingsError> {
    if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
        Ok(())
    } else {
        Err(invalid(
            name,
            format!("{endpoint:?} needs its scheme, e.g. http://127.0.0.1:4317"),
        ))
    }
}

/// For HTTP, a base endpoint gets the metrics path (`/v1/metrics`), as the
/// OpenTelemetry specification says for the generic variable; a URL that
/// already has a path is used as it is.
fn with_metrics_path(endpoint: &str) -> String {
    let after_scheme = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest);
    match after_scheme.find('/') {
        Some(slash) if after_scheme[slash..] != *"/" => endpoint.to_owned(),
        _ => format!("{}/v1/metrics", endpoint.trim_end_matches('/')),
    }
}

/// Resolves the settings; `Ok(None)` when no endpoint is configured anywhere
/// (OTLP off). `flag_endpoint` is `--otlp-endpoint` / `POWERLENS_OTLP_ENDPOINT`.
pub fn resolve(
    file: &OtlpConfig,
    flag_endpoint: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<OtlpSettings>, SettingsError> {
    let protocol = match first_var(
        env,
        &[
            "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ],
    )
    .map(|(name, value)| (name.to_owned(), value))
    .or_else(|| {
        file.protocol
            .clone()
            .map(|p| ("otlp.protocol".to_owned(), p))
    }) {
        None => Protocol::Grpc,
        Some((name, value)) => match value.trim() {
            "grpc" => Protocol::Grpc,
            "http/protobuf" => Protocol::HttpProtobuf,
            other => {
                return Err(invalid(
                    &name,
                    format!("{other:?} is not supported; use \"grpc\" or \"http/protobuf\""),
                ));
            }
        },
    };
    let http = protocol == Protocol::HttpProtobuf;
    let base = |name: &str, endpoint: &str| -> Result<String, SettingsError> {
        check_endpoint(name, endpoint)?;
        Ok(if http {
            with_metrics_path(endpoint)
        } else {
            endpoint.to_owned()
        })
    };
    let endpoint = if let Some(flag) = flag_endpoint.filter(|f| !f.trim().is_empty()) {
        base("--otlp-endpoint", flag.trim())?
    } else if let Some(metrics) =
        env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT").filter(|v| !v.trim().is_empty())
    {
        // The signal-specific variable is the full URL.
        check_endpoint("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", metrics.trim())?;
        metrics.trim().to_owned()
    } else if let Some(generic) =
        env("OTEL_EXPORTER_OTLP_ENDPOINT").filter(|v| !v.trim().is_empty())
    {
        base("OTEL_EXPORTER_OTLP_ENDPOINT", generic.trim())?
    } else if let Some(file_endpoint) = file.endpoint.as_deref().filter(|f| !f.trim().is_empty()) {
        base("otlp.endpoint", file_endpoint.trim())?
    } else {
        return Ok(None);
    };
    let timeout = match first_var(
        env,
        &[
            "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT",
            "OTEL_EXPORTER_OTLP_TIMEOUT",
        ],
    ) {
        Some((name, raw)) => millis(name, &raw)?,
        None => file.timeout.unwrap_or(DEFAULT_TIMEOUT),
    };
    let export_interval = match first_var(env, &["OTEL_METRIC_EXPORT_INTERVAL"]) {
        Some((name, raw)) => millis(name, &raw)?,
        None => file.export_interval.unwrap_or(DEFAULT_EXPORT_INTERVAL),
    };
    if export_interval < Duration::from_millis(100) {
        return Err(invalid(
            "OTEL_METRIC_EXPORT_INTERVAL / otlp.export_interval",
            format!("{} ms is below 100 ms", export_interval.as_millis()),
        ));
    }
    if timeout.is_zero() {
        return Err(invalid(
            "OTEL_EXPORTER_OTLP_TIMEOUT / otlp.timeout",
            "a timeout of 0 would fail every export",
        ));
    }
    let certificate = first_var(
        env,
        &[
            "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE",
            "OTEL_EXPORTER_OTLP_CERTIFICATE",
        ],
    )
    .map(|(_, path)| PathBuf::from(path))
    .or_else(|| file.certificate.clone());
    let series_limit = file.series_limit.unwrap_or(DEFAULT_SERIES_LIMIT);
    if series_limit == 0 {
        return Err(invalid("otlp.series_limit", "must be at least 1"));
    }
    Ok(Some(OtlpSettings {
        endpoint,
        protocol,
        headers: file.headers.clone(),
        timeout,
        export_interval,
        certificate,
        series_limit,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn no_endpoint_anywhere_means_off() {
        let settings = resolve(&OtlpConfig::default(), None, &env_of(&[])).unwrap();
        assert_eq!(settings, None);
    }

    #[test]
    fn flag_beats_environment_beats_file() {
        let file = OtlpConfig {
            endpoint: Some("http://file:4317".into()),
            ..Default::default()
        };
        let env = env_of(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4317")]);
        let flag = resolve(&file, Some("http://flag:4317"), &env)
            .unwrap()
            .unwrap();
        assert_eq!(flag.endpoint, "http://flag:4317");
        let from_env = resolve(&file, None, &env).unwrap().unwrap();
        assert_eq!(from_env.endpoint, "http://env:4317");
        let from_file = resolve(&file, None, &env_of(&[])).unwrap().unwrap();
        assert_eq!(from_file.endpoint, "http://file:4317");
        assert_eq!(from_file.protocol, Protocol::Grpc);
        assert_eq!(from_file.timeout, DEFAULT_TIMEOUT);
        assert_eq!(from_file.export_interval, DEFAULT_EXPORT_INTERVAL);
    }

    #[test]
    fn http_gets_the_metrics_path_unless_the_url_has_one() {
        let env = env_of(&[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
        ]);
        let s = resolve(&OtlpConfig::default(), None, &env)
            .unwrap()
            .unwrap();
        assert_eq!(s.protocol, Protocol::HttpProtobuf);
        assert_eq!(s.endpoint, "http://collector:4318/v1/metrics");
        let env = env_of(&[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            (
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                "https://c:4318/custom",
            ),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://ignored:4318"),
        ]);
        let s = resolve(&OtlpConfig::default(), None, &env)
            .unwrap()
            .unwrap();
        assert_eq!(s.endpoint, "https://c:4318/custom");
        assert_eq!(
            with_metrics_path("http://c:4318/otlp"),
            "http://c:4318/otlp"
        );
    }

    #[test]
    fn variables_set_timeout_interval_and_certificate() {
        let env = env_of(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4317"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "1500"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "1000"),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/etc/ca.pem"),
        ]);
        let file = OtlpConfig {
            timeout: Some(Duration::from_secs(30)),
            series_limit: Some(50),
            ..Default::default()
        };
        let s = resolve(&file, None, &env).unwrap().unwrap();
        assert_eq!(s.timeout, Duration::from_millis(1500));
        assert_eq!(s.export_interval, Duration::from_secs(1));
        assert_eq!(s.certificate, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(s.series_limit, 50);
    }

    #[test]
    fn bad_values_name_their_source() {
        let cases: [(&[(&str, &str)], &str); 4] = [
            (
                &[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317")],
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ),
            (
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                    ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
                ],
                "OTEL_EXPORTER_OTLP_PROTOCOL",
            ),
            (
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                    ("OTEL_EXPORTER_OTLP_TIMEOUT", "10s"),
                ],
                "OTEL_EXPORTER_OTLP_TIMEOUT",
            ),
            (
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                    ("OTEL_METRIC_EXPORT_INTERVAL", "5"),
                ],
                "OTEL_METRIC_EXPORT_INTERVAL",
            ),
        ];
        for (vars, named) in cases {
            let error = resolve(&OtlpConfig::default(), None, &env_of(vars))
                .unwrap_err()
                .to_string();
            assert!(error.contains(named), "{error} should name {named}");
        }
    }
}
