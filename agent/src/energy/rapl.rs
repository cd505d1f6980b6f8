//! RAPL energy counters through the powercap interface
//! (`/sys/class/powercap/intel-rapl:N[:M]/{name,energy_uj,max_energy_range_uj}`).
//! AMD processors expose the same interface. Each zone fails alone.

use std::path::{Path, PathBuf};

use super::{
    Domain, DomainEnergy, DomainId, EnergyError, EnergyMethod, SourceHealth,
    counter::counter_delta, read_u64,
};

#[derive(Clone, Debug)]
struct Zone {
    dir: PathBuf,
    id: DomainId,
    /// The die of a multi-die package (`package-0-die-1`), for the package
    /// zone and its children.
    die: Option<u32>,
    /// The zone repeats another die's counter (AMD's multi-die parts show
    /// the socket's one counter under every die): skipped, or the socket
    /// would count once per die.
    mirror: bool,
    max_range_uj: u64,
    last_uj: Option<u64>,
    /// Energy counted by samples since the last `read` (µJ): samples between
    /// reads keep a counter from wrapping twice unseen.
    pending_uj: u64,
    /// Whether a sample since the last `read` saw the counter.
    pending: bool,
    error: Option<String>,
}

/// The most power one zone is assumed able to draw, for the sampling period
/// that keeps its counter from wrapping twice between two samples.
pub const MAX_ZONE_WATTS: f64 = 2_000.0;

/// A reading of every zone: energies of the zones that could be read, and
/// the errors of those that could not.
#[derive(Debug, Default)]
pub struct RaplReading {
    pub energies: Vec<DomainEnergy>,
    pub errors: Vec<(PathBuf, EnergyError)>,
}

pub struct RaplSource {
    root: PathBuf,
    zones: Vec<Zone>,
}

/// `package-0-die-1` → (0, Some(1)); `package-1` → (1, None).
pub fn parse_package_name(name: &str) -> Option<(u32, Option<u32>)> {
    let rest = name.trim().strip_prefix("package-")?;
    match rest.split_once("-die-") {
        Some((socket, die)) => Some((socket.parse().ok()?, Some(die.parse().ok()?))),
        None => Some((rest.parse().ok()?, None)),
    }
}

/// `package-1` (or `package-1-die-0`) → (Package, 1); `core` → (Core,
/// parent's socket); `psys` → Psys.
pub fn classify_zone(name: &str, parent_socket: Option<u32>) -> Option<DomainId> {
    let name = name.trim();
    if name.starts_with("package-") {
        let (socket, _) = parse_package_name(name)?;
        return Some(DomainId {
            domain: Domain::Package,
            index: socket,
        });
    }
    let domain = match name {
        "core" => Domain::Core,
        "uncore" => Domain::Uncore,
        "dram" => Domain::Dram,
        "psys" => Domain::Psys,
        _ => return None,
    };
    let index = if domain == Domain::Psys {
        0
    } else {
        parent_socket.unwrap_or(0)
    };
    Some(DomainId { domain, index })
}

impl RaplSource {
    /// Finds the zones under `root`; `Ok(None)` when there is no RAPL zone.
    pub fn discover(root: &Path) -> Result<Option<Self>, EnergyError> {
        let entries = std::fs::read_dir(root).map_err(|source| EnergyError::Io {
            path: root.to_owned(),
            source,
        })?;
        let mut zones = Vec::new();
        let mut tops: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| is_top_zone(p))
            .collect();
        tops.sort();
        for top in tops {
            let Some(id) = zone_id(&top, None) else {
                continue;
            };
            let parent_socket = (id.domain == Domain::Package).then_some(id.index);
            let die = std::fs::read_to_string(top.join("name"))
                .ok()
                .and_then(|name| parse_package_name(&name))
                .and_then(|(_, die)| die);
            zones.push(new_zone(top.clone(), id, die));
            let Ok(children) = std::fs::read_dir(&top) else {
                continue;
            };
            let mut subs: Vec<PathBuf> = children
                .flatten()
                .map(|e| e.path())
                .filter(|p| is_sub_zone(p))
                .collect();
            subs.sort();
            for sub in subs {
                if let Some(id) = zone_id(&sub, parent_socket) {
                    zones.push(new_zone(sub, id, die));
                }
            }
        }
        if zones.is_empty() {
            return Ok(None);
        }
        Ok(Some(Self {
            root: root.to_owned(),
            zones,
        }))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn domains(&self) -> Vec<DomainId> {
        self.zones.iter().map(|z| z.id).collect()
    }

    /// Zones read (mirrors of another die's counter left out).
    pub fn counted_zones(&self) -> usize {
        self.zones.iter().filter(|z| !z.mirror).count()
    }

    /// How often the counters must be sampled so that none wraps twice
    /// between samples, at `MAX_ZONE_WATTS`, with a factor of 2 to spare.
    /// `None` when no counter wraps.
    pub fn sample_period(&self) -> Option<std::time::Duration> {
        self.zones
            .iter()
            .filter(|z| z.max_range_uj > 0)
            .map(|z| z.max_range_uj as f64 / 1e6 / MAX_ZONE_WATTS / 2.0)
            .min_by(f64::total_cmp)
            .map(|seconds| std::time::Duration::from_secs_f64(seconds.max(0.1)))
    }

    /// Reads every counter and keeps what it grew by for the next `read`:
    /// called between reads when the interval is longer than
    /// `sample_period`. Errors show at the next `read`.
    pub fn sample(&mut self) -> Vec<(PathBuf, EnergyError)> {
        let mut errors = Vec::new();
        for zone in &mut self.zones {
            if zone.mirror {
                continue;
            }
            let path = zone.dir.join("energy_uj");
            match read_u64(&path) {
                Ok(now) => {
                    if let Some(previous) = zone.last_uj {
                        match counter_delta(previous, now, zone.max_range_uj) {
                            Some(delta) => {
                                zone.pending_uj += delta;
                                zone.pending = true;
                            }
                            None => errors.push((
                                path.clone(),
                                EnergyError::Garbage {
                                    path: path.clone(),
                                    value: now.to_string(),
                                    expected: "a counter value within max_energy_range_uj",
                                },
                            )),
                        }
                    }
                    zone.last_uj = Some(now);
                    zone.error = None;
                }
                Err(error) => {
                    zone.error = Some(error.to_string());
                    errors.push((path, error));
                }
            }
        }
        errors
    }

    /// Reads every zone: the energy since the previous read, samples in
    /// between included. The first read of a zone only sets its baseline.
    pub fn read(&mut self) -> RaplReading {
        let first = self.zones.iter().all(|z| z.last_uj.is_none());
        let mut reading = RaplReading {
            errors: self.sample(),
            ..RaplReading::default()
        };
        for zone in &mut self.zones {
            if zone.mirror || !zone.pending {
                continue;
            }
            reading.energies.push(DomainEnergy {
                id: zone.id,
                joules: zone.pending_uj as f64 / 1e6,
                method: EnergyMethod::Rapl,
                uncertainty_joules: None,
            });
            zone.pending_uj = 0;
            zone.pending = false;
        }
        if first {
            self.mark_mirrored_dies();
        }
        reading
    }

    /// Dies of one package whose package counters hold the same value (to
    /// within what the time between two reads adds) repeat one counter:
    /// two independent meters do not agree to 0.01% after running since
    /// boot. Keeps the first die of each such package, with its children.
    fn mark_mirrored_dies(&mut self) {
        let packages: Vec<(u32, u32, u64)> = self
            .zones
            .iter()
            .filter(|z| z.id.domain == Domain::Package)
            .filter_map(|z| Some((z.id.index, z.die?, z.last_uj?)))
            .collect();
        let mut mirrored: Vec<(u32, u32)> = Vec::new();
        for (socket, die, value) in &packages {
            let first = packages
                .iter()
                .filter(|(s, _, _)| s == socket)
                .min_by_key(|(_, d, _)| *d);
            if let Some((_, first_die, first_value)) = first
                && first_die != die
                && first_value.abs_diff(*value) <= (first_value / 10_000).max(2_000_000)
            {
                mirrored.push((*socket, *die));
            }
        }
        for zone in &mut self.zones {
            if let Some(die) = zone.die
                && mirrored.contains(&(zone.id.index, die))
            {
                zone.mirror = true;
            }
        }
        if !mirrored.is_empty() {
            tracing::info!(
                dies = ?mirrored,
                "RAPL: these dies repeat their package's counter (one counter per socket); counting it once"
            );
        }
    }

    pub fn health(&self) -> SourceHealth {
        let failing: Vec<&str> = self
            .zones
            .iter()
            .filter_map(|z| z.error.as_deref())
            .collect();
        if failing.is_empty() {
            SourceHealth::ok("rapl")
        } else {
            SourceHealth::failing("rapl", failing.join("; "))
        }
    }
}

fn new_zone(dir: PathBuf, id: DomainId, die: Option<u32>) -> Zone {
    // A missing range means the counter is not expected to wrap in our
    // lifetime; 0 disables wrap handling (a decrease is then an error).
    let max_range_uj = read_u64(&dir.join("max_energy_range_uj")).unwrap_or(0);
    Zone {
        dir,
        id,
        die,
        mirror: false,
        max_range_uj,
        last_uj: None,
        pending_uj: 0,
        pending: false,
        error: None,
    }
}

fn zone_name(path: &Path) -> Option<&str> {
    path.file_name().and_then(|n| n.to_str())
}

/// `intel-rapl:0` (and AMD's, named the same way).
fn is_top_zone(path: &Path) -> bool {
    zone_name(path).is_some_and(|n| n.starts_with("intel-rapl:") && n.matches(':').count() == 1)
}

/// `intel-rapl:0:1`.
fn is_sub_zone(path: &Path) -> bool {
    zone_name(path).is_some_and(|n| n.starts_with("intel-rapl:") && n.matches(':').count() == 2)
}

fn zone_id(dir: &Path, parent_socket: Option<u32>) -> Option<DomainId> {
    let name = std::fs::read_to_string(dir.join("name")).ok()?;
    classify_zone(&name, parent_socket)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes a powercap tree like the kernel's: per zone `name`,
    /// `energy_uj` and `max_energy_range_uj`.
    pub(crate) fn write_zone(root: &Path, zone: &str, name: &str, energy_uj: u64, max_uj: u64) {
        let dir = zone
            .rsplit_once(':')
            .filter(|_| zone.matches(':').count() == 2)
            .map_or_else(
                || root.join(zone),
                |(parent, _)| root.join(parent).join(zone),
            );
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("name"), format!("{name}\n")).unwrap();
        std::fs::write(dir.join("energy_uj"), format!("{energy_uj}\n")).unwrap();
        std::fs::write(dir.join("max_energy_range_uj"), format!("{max_uj}\n")).unwrap();
    }

    pub(crate) fn set_energy(root: &Path, zone: &str, energy_uj: u64) {
        let dir = if zone.matches(':').count() == 2 {
            let (parent, _) = zone.rsplit_once(':').unwrap();
            root.join(parent).join(zone)
        } else {
            root.join(zone)
        };
        std::fs::write(dir.join("energy_uj"), format!("{energy_uj}\n")).unwrap();
    }

    fn joules(reading: &RaplReading, domain: Domain, index: u32) -> Option<f64> {
        reading
            .energies
            .iter()
            .find(|e| e.id == DomainId { domain, index })
            .map(|e| e.joules)
    }

    #[test]
    fn classifies_zone_names() {
        assert_eq!(
            classify_zone("package-1\n", None),
            Some(DomainId {
                domain: Domain::Package,
                index: 1
            })
        );
        assert_eq!(
            classify_zone("dram", Some(1)),
            Some(DomainId {
                domain: Domain::Dram,
                index: 1
            })
        );
        assert_eq!(
            classify_zone("psys", Some(3)),
            Some(DomainId {
                domain: Domain::Psys,
                index: 0
            })
        );
        assert_eq!(classify_zone("package-x", None), None);
        assert_eq!(classify_zone("mystery", None), None);
    }

    #[test]
    fn two_sockets_different_ranges_and_a_wrap() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write_zone(
            root,
            "intel-rapl:0",
            "package-0",
            1_000_000,
            262_143_328_850,
        );
        write_zone(root, "intel-rapl:0:0", "core", 500_000, 262_143_328_850);
        write_zone(root, "intel-rapl:0:1", "dram", 100_000, 65_712_999_613);
        // Socket 1's counter is near the top of a smaller range.
        write_zone(root, "intel-rapl:1", "package-1", 9_990_000, 10_000_000);
        write_zone(root, "intel-rapl:2", "psys", 0, 262_143_328_850);
        let mut rapl = RaplSource::discover(root).unwrap().expect("zones");
        assert_eq!(rapl.domains().len(), 5);
        assert!(
            rapl.read().energies.is_empty(),
            "the first read is a baseline"
        );

        set_energy(root, "intel-rapl:0", 51_000_000); // +50 J
        set_energy(root, "intel-rapl:0:0", 30_500_000); // +30 J
        set_energy(root, "intel-rapl:0:1", 5_100_000); // +5 J
        set_energy(root, "intel-rapl:1", 20_000); // wrapped: +0.03 J
        set_energy(root, "intel-rapl:2", 70_000_000); // +70 J
        let reading = rapl.read();
        assert!(reading.errors.is_empty(), "{:?}", reading.errors);
        assert_eq!(joules(&reading, Domain::Package, 0), Some(50.0));
        assert_eq!(joules(&reading, Domain::Core, 0), Some(30.0));
        assert_eq!(joules(&reading, Domain::Dram, 0), Some(5.0));
        assert!((joules(&reading, Domain::Package, 1).unwrap() - 0.03).abs() < 1e-9);
        assert_eq!(joules(&reading, Domain::Psys, 0), Some(70.0));
    }

    #[test]
    fn a_garbage_value_fails_that_zone_only_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write_zone(root, "intel-rapl:0", "package-0", 1_000, 1 << 40);
        write_zone(root, "intel-rapl:1", "package-1", 1_000, 1 << 40);
        let mut rapl = RaplSource::discover(root).unwrap().unwrap();
        rapl.read();
        std::fs::write(root.join("intel-rapl:0/energy_uj"), "banana\n").unwrap();
        set_energy(root, "intel-rapl:1", 2_001_000);
        let reading = rapl.read();
        assert_eq!(joules(&reading, Domain::Package, 1), Some(2.0));
        assert_eq!(reading.errors.len(), 1);
        let message = reading.errors[0].1.to_string();
        assert!(
            message.contains("intel-rapl:0/energy_uj") && message.contains("banana"),
            "{message}"
        );
        assert_eq!(rapl.health().status, crate::energy::SourceState::Failing);
    }

    #[test]
    fn an_unreadable_counter_names_the_cause() {
        // Root bypasses file modes, so simulate the kernel's EACCES with a
        // directory where the file should be... which reads as EISDIR. The
        // permission path is covered by mapping the error kind directly.
        let error = EnergyError::Permission {
            path: PathBuf::from("/sys/class/powercap/intel-rapl:0/energy_uj"),
            hint: "energy counters are readable by root only since the CVE-2020-8694 fix; run as root or grant CAP_DAC_READ_SEARCH",
        };
        let text = error.to_string();
        assert!(text.contains("CVE-2020-8694") && text.contains("energy_uj"));

        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write_zone(root, "intel-rapl:0", "package-0", 1_000, 1 << 40);
        let mut rapl = RaplSource::discover(root).unwrap().unwrap();
        std::fs::remove_file(root.join("intel-rapl:0/energy_uj")).unwrap();
        std::fs::create_dir(root.join("intel-rapl:0/energy_uj")).unwrap();
        let reading = rapl.read();
        assert_eq!(reading.errors.len(), 1);
        assert!(reading.errors[0].1.to_string().contains("energy_uj"));
    }

    /// A captured powercap tree from `tests/fixtures/powercap`, copied so a
    /// test can move its counters.
    fn captured(machine: &str) -> tempfile::TempDir {
        fn copy(from: &Path, to: &Path) {
            std::fs::create_dir_all(to).unwrap();
            for entry in std::fs::read_dir(from).unwrap().flatten() {
                let target = to.join(entry.file_name());
                if entry.file_type().unwrap().is_dir() {
                    copy(&entry.path(), &target);
                } else {
                    std::fs::copy(entry.path(), target).unwrap();
                }
            }
        }
        let source = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/powercap")
            .join(machine);
        let dir = tempfile::tempdir().unwrap();
        copy(&source, dir.path());
        dir
    }

    fn advance(root: &Path, zone: &str, add_uj: u64) {
        let dir = if zone.matches(':').count() == 2 {
            root.join(zone.rsplit_once(':').unwrap().0).join(zone)
        } else {
            root.join(zone)
        };
        let now: u64 = std::fs::read_to_string(dir.join("energy_uj"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let range: u64 = std::fs::read_to_string(dir.join("max_energy_range_uj"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Past the range the counter starts again from 0 (counter_delta's
        // convention: the one energy unit of the step itself is below what
        // a test can see).
        let next = if now + add_uj > range {
            (now + add_uj) % range
        } else {
            now + add_uj
        };
        std::fs::write(dir.join("energy_uj"), format!("{next}\n")).unwrap();
    }

    #[test]
    fn captured_four_socket_server_with_core_and_dram() {
        let dir = captured("four-socket-package-core-dram");
        let root = dir.path();
        let mut rapl = RaplSource::discover(root).unwrap().unwrap();
        assert_eq!(rapl.domains().len(), 12);
        rapl.read();
        // Socket 2's core counter (64.87 kJ of a 65.53 kJ range) wraps.
        advance(root, "intel-rapl:2", 120_000_000);
        advance(root, "intel-rapl:2:0", 1_000_000_000);
        advance(root, "intel-rapl:3:1", 7_000_000);
        let reading = rapl.read();
        assert!(reading.errors.is_empty(), "{:?}", reading.errors);
        assert_eq!(joules(&reading, Domain::Package, 2), Some(120.0));
        assert_eq!(joules(&reading, Domain::Core, 2), Some(1000.0));
        assert_eq!(joules(&reading, Domain::Dram, 3), Some(7.0));
        assert_eq!(joules(&reading, Domain::Package, 0), Some(0.0));
    }

    #[test]
    fn captured_server_whose_zone_numbers_run_opposite_to_its_sockets() {
        let dir = captured("four-socket-zones-in-reverse");
        let root = dir.path();
        let mut rapl = RaplSource::discover(root).unwrap().unwrap();
        rapl.read();
        // intel-rapl:0 is package-3, and its dram sub-zone is socket 3's.
        advance(root, "intel-rapl:0", 80_000_000);
        advance(root, "intel-rapl:0:0", 9_000_000);
        let reading = rapl.read();
        assert_eq!(joules(&reading, Domain::Package, 3), Some(80.0));
        assert_eq!(joules(&reading, Domain::Dram, 3), Some(9.0));
        assert_eq!(joules(&reading, Domain::Package, 0), Some(0.0));
        assert_eq!(joules(&reading, Domain::Dram, 0), Some(0.0));
    }

    #[test]
    fn captured_threadripper_counts_its_mirrored_dies_once() {
        let dir = captured("threadripper-1950x-two-dies");
        let root = dir.path();
        let mut rapl = RaplSource::discover(root).unwrap().unwrap();
        assert_eq!(rapl.domains().len(), 2, "both dies are package 0");
        rapl.read();
        assert_eq!(rapl.counted_zones(), 1, "die 1 repeats die 0's counter");
        // The socket draws 166 W for 1 s; both dies show it.
        advance(root, "intel-rapl:0", 166_000_000);
        advance(root, "intel-rapl:1", 166_000_000);
        let reading = rapl.read();
        let package: f64 = reading
            .energies
            .iter()
            .filter(|e| e.id.domain == Domain::Package)
            .map(|e| e.joules)
            .sum();
        assert_eq!(package, 166.0);
    }

    #[test]
    fn dies_with_counters_of_their_own_are_summed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write_zone(
            root,
            "intel-rapl:0",
            "package-0-die-0",
            10_000_000_000,
            1 << 40,
        );
        write_zone(
            root,
            "intel-rapl:1",
            "package-0-die-1",
            31_000_000_000,
            1 << 40,
        );
        write_zone(root, "intel-rapl:1:0", "dram", 5_000_000, 1 << 40);
        let mut rapl = RaplSource::discover(root).unwrap().unwrap();
        rapl.read();
        assert_eq!(rapl.counted_zones(), 3);
        advance(root, "intel-rapl:0", 40_000_000);
        advance(root, "intel-rapl:1", 60_000_000);
        let reading = rapl.read();
        let package: f64 = reading
            .energies
            .iter()
            .filter(|e| e.id.domain == Domain::Package)
            .map(|e| e.joules)
            .sum();
        assert_eq!(package, 100.0);
        assert_eq!(joules(&reading, Domain::Dram, 0), Some(0.0));
        assert_eq!(parse_package_name("package-0-die-1"), Some((0, Some(1))));
        assert_eq!(parse_package_name("package-3"), Some((3, None)));
        assert_eq!(parse_package_name("package-0-die-x"), None);
    }

    #[test]
    fn samples_between_reads_catch_every_wrap() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // A 262 kJ counter: at 2 kW it wraps in 131 s; sampled every 65 s.
        write_zone(root, "intel-rapl:0", "package-0", 0, 262_143_328_850);
        let mut rapl = RaplSource::discover(root).unwrap().unwrap();
        let period = rapl.sample_period().unwrap();
        assert!((period.as_secs_f64() - 65.5).abs() < 0.1, "{period:?}");
        rapl.read();
        // An hour at 300 W is 1,080 kJ: four wraps. Sampled every minute,
        // each step is 18 kJ, and nothing is lost.
        for _ in 0..60 {
            advance(root, "intel-rapl:0", 18_000_000_000);
            assert!(rapl.sample().is_empty());
        }
        let reading = rapl.read();
        let hour = joules(&reading, Domain::Package, 0).unwrap();
        assert!((hour - 1_080_000.0).abs() < 1.0, "{hour}");
        // Without samples, the same hour would read as what is left after
        // the wraps (under one range): the reason for sampling.
        advance(root, "intel-rapl:0", 18_000_000_000 * 60);
        let unsampled = joules(&rapl.read(), Domain::Package, 0).unwrap();
        assert!(unsampled < 262_144.0, "{unsampled}");
    }

    #[test]
    fn no_zones_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(RaplSource::discover(dir.path()).unwrap().is_none());
    }
}
