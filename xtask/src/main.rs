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
const APT_PACKAGES: [&str; 3] = ["llvm-22-dev", "libpolly-22-dev", "libzstd-dev"];
/// Real peers for the export tests: the Prometheus server and promtool.
const TEST_PEER_PACKAGES: [&str; 1] = ["prometheus"];

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
    // 1. LLVM for bpf-linker.
    let llvm_config = format!("/usr/lib/llvm-{LLVM_MAJOR}/bin/llvm-config");
    let llvm_present = Path::new(&llvm_config).exists()
        && Path::new(&format!("/usr/lib/llvm-{LLVM_MAJOR}/lib/libPolly.a")).exists()
        && Path::new("/usr/include/zstd.h").exists();
    if !llvm_present {
        if is_root() && Path::new("/usr/bin/apt-get").exists() {
            run_step("refreshing package lists", "apt-get", &["update"], None)?;
            let mut args = vec!["install", "-y", "--no-install-recommends"];
            args.extend(APT_PACKAGES);
            run_step("installing LLVM 22", "apt-get", &args, None)?;
        } else {
            bail!(
                "LLVM {LLVM_MAJOR} development files are missing. Install them with:\n  sudo apt-get update && sudo apt-get install -y {}",
                APT_PACKAGES.join(" ")
            );
        }
    }

    // 1b. Peers the tests run against (Debian's prometheus: server + promtool).
    let peers_present =
        Path::new("/usr/bin/prometheus").exists() && Path::new("/usr/bin/promtool").exists();
    if !peers_present {
        if is_root() && Path::new("/usr/bin/apt-get").exists() {
            if llvm_present {
                run_step("refreshing package lists", "apt-get", &["update"], None)?;
            }
            let mut args = vec!["install", "-y", "--no-install-recommends"];
            args.extend(TEST_PEER_PACKAGES);
            run_step(
                "installing the test peers (prometheus, promtool)",
                "apt-get",
                &args,
                None,
            )?;
        } else {
            bail!(
                "the export tests need Debian's prometheus package. Install it with:\n  sudo apt-get update && sudo apt-get install -y {}",
                TEST_PEER_PACKAGES.join(" ")
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
    Ok(())
}
