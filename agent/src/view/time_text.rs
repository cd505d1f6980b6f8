//! Timestamps as RFC 3339 text with milliseconds (`2026-11-29T10:00:00.123Z`).

use std::time::SystemTime;

use serde::{Deserialize, Deserializer, Serializer};

pub fn text(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

pub fn serialize<S: Serializer>(at: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&text(*at))
}

fn parse<E: serde::de::Error>(raw: &str) -> Result<SystemTime, E> {
    humantime::parse_rfc3339(raw)
        .map_err(|e| E::custom(format!("{raw:?} is not an RFC 3339 time: {e}")))
}

pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SystemTime, D::Error> {
    parse(&String::deserialize(deserializer)?)
}

pub mod optional {
    use super::*;

    pub fn serialize<S: Serializer>(
        at: &Option<SystemTime>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match at {
            Some(at) => super::serialize(at, serializer),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<SystemTime>, D::Error> {
        Option::<String>::deserialize(deserializer)?
            .map(|raw| super::parse(&raw))
            .transpose()
    }
}
