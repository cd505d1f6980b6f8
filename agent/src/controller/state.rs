//! The original value of everything the controller changed, on disk before
//! its first write, so that no limit outlives the agent by accident: they
//! are put back on exit, and after a crash or `kill -9` on the next start,
//! before anything else.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::actuators::{Actuator, Limit, Target};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SavedOriginals {
    /// The agent that wrote the file (for the log of a later start).
    pub pid: u32,
    pub originals: Vec<(Target, Limit)>,
}

#[derive(Debug, Error)]
pub enum StateError {
    #[error("controller state file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("controller state file {path} is not valid: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The state file and what it holds.
pub struct StateFile {
    path: PathBuf,
    saved: SavedOriginals,
}

impl StateFile {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            saved: SavedOriginals {
                pid: std::process::id(),
                originals: Vec::new(),
            },
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What a previous run left (it did not stop cleanly), if anything.
    pub fn leftover(path: &Path) -> Result<Option<SavedOriginals>, StateError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|error| StateError::Invalid {
                path: path.to_owned(),
                message: error.to_string(),
            })
    }

    /// The original of `target`, when this run saved one.
    pub fn original(&self, target: &Target) -> Option<&Limit> {
        self.saved
            .originals
            .iter()
            .find(|(saved, _)| saved == target)
            .map(|(_, limit)| limit)
    }

    pub fn targets(&self) -> impl Iterator<Item = &(Target, Limit)> {
        self.saved.originals.iter()
    }

    /// Records `original` for `target` (once: the first value is the one to
    /// put back) and writes the file before returning, so the original is
    /// on disk before anything is changed.
    pub fn remember(&mut self, target: &Target, original: Limit) -> Result<(), StateError> {
        if self.original(target).is_some() {
            return Ok(());
        }
        self.saved.originals.push((target.clone(), original));
        self.write()
    }

    /// Forgets `target` (restored, or gone with its container).
    pub fn forget(&mut self, target: &Target) -> Result<(), StateError> {
        let before = self.saved.originals.len();
        self.saved.originals.retain(|(saved, _)| saved != target);
        if self.saved.originals.len() == before {
            return Ok(());
        }
        self.write()
    }

    /// Writes the whole file atomically: a temporary file, synced, renamed
    /// over the old one, and the directory synced.
    fn write(&self) -> Result<(), StateError> {
        let io = |source| StateError::Io {
            path: self.path.clone(),
            source,
        };
        if self.saved.originals.is_empty() {
            return match std::fs::remove_file(&self.path) {
                Ok(()) => Ok(()),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(error) => Err(io(error)),
            };
        }
        let directory = self.path.parent().unwrap_or_else(|| Path::new("."));
        std::fs::create_dir_all(directory).map_err(io)?;
        let temporary = self.path.with_extension("tmp");
        let text =
            serde_json::to_string_pretty(&self.saved).map_err(|error| StateError::Invalid {
                path: self.path.clone(),
                message: error.to_string(),
            })?;
        let mut file = std::fs::File::create(&temporary).map_err(io)?;
        file.write_all(text.as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&temporary, &self.path).map_err(io)?;
        if let Ok(directory) = std::fs::File::open(directory) {
            let _ = directory.sync_all();
        }
        Ok(())
    }
}

/// Puts back every original in `saved` through `actuator`. A target that
/// is gone (a container that exited took its throttle with it) is not an
/// error; other failures are returned, each naming its target.
pub fn restore(saved: &SavedOriginals, actuator: &mut dyn Actuator) -> Vec<String> {
    let mut errors = Vec::new();
    for (target, original) in &saved.originals {
        match actuator.write(target, original) {
            Ok(()) => tracing::info!(
                target = target.name(),
                limit = original.describe(),
                "controller: original limit restored"
            ),
            Err(super::actuators::ActuatorError::NoCpuController { .. }) => {}
            Err(super::actuators::ActuatorError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => errors.push(format!("{}: {error}", target.name())),
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::controller::actuators::ActuatorError;

    #[derive(Default)]
    struct Memory(HashMap<Target, Limit>);

    impl Actuator for Memory {
        fn read(&self, target: &Target) -> Result<Limit, ActuatorError> {
            self.0
                .get(target)
                .cloned()
                .ok_or_else(|| ActuatorError::WrongTarget(target.name()))
        }
        fn write(&mut self, target: &Target, limit: &Limit) -> Result<(), ActuatorError> {
            self.0.insert(target.clone(), limit.clone());
            Ok(())
        }
    }

    #[test]
    fn originals_are_on_disk_before_a_write_and_a_later_start_restores_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/controller.json");
        let package = Target::RaplPackage {
            zone: "intel-rapl:0".into(),
            socket: 0,
        };
        let original = Limit::PowerCap {
            limit_uw: 150_000_000,
            enabled: false,
        };
        let mut state = StateFile::new(path.clone());
        state.remember(&package, original.clone()).unwrap();
        // A second remember keeps the first original.
        state
            .remember(
                &package,
                Limit::PowerCap {
                    limit_uw: 1,
                    enabled: true,
                },
            )
            .unwrap();
        // The agent dies here (kill -9): the file is what a new start sees.
        drop(state);
        let leftover = StateFile::leftover(&path).unwrap().expect("left over");
        assert_eq!(
            leftover.originals,
            vec![(package.clone(), original.clone())]
        );
        let mut actuator = Memory::default();
        actuator.0.insert(
            package.clone(),
            Limit::PowerCap {
                limit_uw: 80_000_000,
                enabled: true,
            },
        );
        assert!(restore(&leftover, &mut actuator).is_empty());
        assert_eq!(actuator.read(&package).unwrap(), original);
    }

    #[test]
    fn forgetting_the_last_target_removes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("controller.json");
        let target = Target::CpuBandwidth {
            cgroup: "/a".into(),
        };
        let mut state = StateFile::new(path.clone());
        state
            .remember(
                &target,
                Limit::CpuBandwidth {
                    quota_us: None,
                    period_us: 100_000,
                },
            )
            .unwrap();
        assert!(path.exists());
        state.forget(&target).unwrap();
        assert!(!path.exists());
        assert!(StateFile::leftover(&path).unwrap().is_none());
        std::fs::write(&path, "not json").unwrap();
        let error = StateFile::leftover(&path).unwrap_err().to_string();
        assert!(error.contains("controller.json"), "{error}");
    }
}
