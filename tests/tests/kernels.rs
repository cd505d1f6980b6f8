//! The agent on the kernels production nodes run, not only this machine's:
//! boots Debian's own kernel packages (fetched by `cargo xtask setup` into
//! `target/kernels/`) under QEMU, with an initramfs whose only job is
//! `kernel-check` (load the programs, burn CPU in a container cgroup,
//! compare with schedstat). Software emulation (KVM with
//! POWERLENS_TEST_KVM=1). Skips, saying why, when QEMU or the kernels are
//! missing.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{require_root, sibling_binary};

fn kernels_dir() -> PathBuf {
    std::env::var_os("POWERLENS_TEST_KERNELS").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/kernels"),
        PathBuf::from,
    )
}

/// Shared libraries a dynamic binary needs (from `ldd`), the loader included.
fn libraries(binary: &Path) -> Vec<PathBuf> {
    let output = Command::new("ldd").arg(binary).output().expect("ldd");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

fn copy_into(root: &Path, source: &Path, target: &Path, strip: bool) {
    let destination = root.join(target.strip_prefix("/").unwrap_or(target));
    std::fs::create_dir_all(destination.parent().expect("parent")).expect("mkdir");
    std::fs::copy(source, &destination)
        .unwrap_or_else(|e| panic!("copying {}: {e}", source.display()));
    if strip {
        // Debug info would make the initramfs hundreds of MiB.
        let _ = Command::new("strip")
            .arg("--strip-debug")
            .arg(&destination)
            .status();
    }
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup
ip link set lo up
echo "KERNEL-CHECK START $(uname -r)"
/bin/kernel-check
poweroff -f
"#;

/// An initramfs (gzip'd newc cpio) with busybox, the agent and the check.
fn initramfs(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    for sub in ["bin", "proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(root.join(sub)).expect("mkdir");
    }
    let busybox = Path::new("/bin/busybox");
    copy_into(&root, busybox, Path::new("/bin/busybox"), false);
    for name in ["kernel-check", "powerlens", "workload"] {
        let binary = sibling_binary(name);
        copy_into(&root, &binary, &Path::new("/bin").join(name), true);
        for library in libraries(&binary) {
            copy_into(&root, &library, &library, false);
        }
    }
    std::fs::write(root.join("init"), INIT).expect("init");
    std::fs::set_permissions(
        root.join("init"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod init");
    let image = dir.join("initramfs.cpio.gz");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . | cpio -o -H newc --quiet | gzip -1 > {}",
            root.display(),
            image.display()
        ))
        .status()
        .expect("cpio");
    assert!(status.success(), "building the initramfs");
    image
}

/// Boots `kernel` with `initrd` and returns the serial console's output.
fn boot(kernel: &Path, initrd: &Path, timeout: Duration) -> String {
    // Software emulation unless asked: nested KVM hangs before the
    // kernel's first line on machines like this one (seen here), and TCG
    // boots Debian's cloud kernel in about 2 s anyway.
    let kvm = std::env::var_os("POWERLENS_TEST_KVM").is_some() && Path::new("/dev/kvm").exists();
    let mut command = Command::new("qemu-system-x86_64");
    command
        .args(["-m", "1024", "-smp", "2", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if kvm {
        command.arg("-enable-kvm");
    }
    let mut child = command.spawn().expect("start qemu");
    let started = Instant::now();
    loop {
        if child.try_wait().expect("qemu status").is_some() {
            break;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let output = child.wait_with_output().expect("qemu output");
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    text
}

#[test]
fn cpu_attribution_is_exact_on_debians_own_kernels() {
    if !require_root() {
        return;
    }
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "skipping: qemu-system-x86_64 is not installed (`cargo xtask setup` installs it)"
        );
        return;
    }
    let mut kernels: Vec<PathBuf> = std::fs::read_dir(kernels_dir())
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    kernels.sort();
    if kernels.is_empty() {
        eprintln!(
            "skipping: no kernel under {} (`cargo xtask setup` fetches Debian's)",
            kernels_dir().display()
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let initrd = initramfs(dir.path());
    for kernel in kernels {
        let started = Instant::now();
        let console = boot(&kernel, &initrd, Duration::from_secs(240));
        let verdict = console
            .lines()
            .find(|line| line.contains("KERNEL-CHECK PASS") || line.contains("KERNEL-CHECK FAIL"))
            .map(str::trim)
            .map(str::to_owned);
        eprintln!(
            "{}: {} ({:.0} s)",
            kernel.display(),
            verdict.as_deref().unwrap_or("no verdict"),
            started.elapsed().as_secs_f64()
        );
        let tail: String = console
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            verdict
                .as_deref()
                .is_some_and(|v| v.contains("KERNEL-CHECK PASS")),
            "{}: the check did not pass; console tail:\n{tail}",
            kernel.display()
        );
    }
}
