//! Support for the privileged integration tests: cgroups, workloads and a
//! running agent, each cleaned up on drop (so also when a test panics).

use std::{
    fs::File,
    io::Write as _,
    net::TcpListener,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

pub mod otlp;

/// Whether the test can run: it loads kernel programs and creates cgroups.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: needs root to load kernel programs and create cgroups");
        return false;
    }
    true
}

/// A cgroup laid out as the kubelet (systemd driver) and containerd lay out
/// a Burstable pod's container.
pub fn kubernetes_cgroup(container_id: &str, pod_uid: &str) -> TestCgroup {
    TestCgroup::create(&format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{container_id}.scope",
        pod_uid.replace('-', "_")
    ))
}

/// A port free on loopback now (the OS may hand it out again later, which
/// the tests accept: they bind it within milliseconds).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("free port");
    listener.local_addr().expect("addr").port()
}

/// The cgroup v2 mount of this machine (pure v2 or hybrid).
pub fn v2_root() -> PathBuf {
    powerlens::cgroup::detect_v2_root(Path::new("/proc")).expect("a cgroup v2 hierarchy is mounted")
}

/// A random lowercase hex string of `len` characters (from the kernel's uuid source).
pub fn random_hex(len: usize) -> String {
    let mut out = String::new();
    while out.len() < len {
        let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid").expect("uuid");
        out.extend(uuid.trim().chars().filter(|c| *c != '-'));
    }
    out.truncate(len);
    out
}

pub fn random_uuid() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .expect("uuid")
        .trim()
        .to_owned()
}

/// A cgroup (and any missing parents) created for a test, removed on drop
/// after killing whatever still runs in it.
pub struct TestCgroup {
    pub path: PathBuf,
    pub relative: String,
    created: Vec<PathBuf>,
}

impl TestCgroup {
    pub fn create(relative: &str) -> Self {
        let root = v2_root();
        let mut created = Vec::new();
        let mut path = root.clone();
        for component in relative.trim_matches('/').split('/') {
            path.push(component);
            if !path.exists() {
                std::fs::create_dir(&path)
                    .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
                created.push(path.clone());
            }
        }
        Self {
            path,
            relative: format!("/{}", relative.trim_matches('/')),
            created,
        }
    }

    /// The cgroup id (its directory's inode number).
    pub fn id(&self) -> u64 {
        std::fs::metadata(&self.path).expect("cgroup exists").ino()
    }

    /// The processes in this cgroup now.
    pub fn pids(&self) -> Vec<i32> {
        Self::procs(&self.path)
    }

    fn procs(dir: &Path) -> Vec<i32> {
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for dir in self.created.iter().rev() {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let pids = Self::procs(dir);
                if pids.is_empty() || Instant::now() > deadline {
                    break;
                }
                for pid in pids {
                    // SAFETY: plain kill syscall.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Err(e) = std::fs::remove_dir(dir) {
                eprintln!("warning: could not remove cgroup {}: {e}", dir.display());
            }
        }
    }
}

/// The workload binary built with the tests.
pub fn workload_binary() -> PathBuf {
    sibling_binary("workload")
}

/// A binary of this workspace, next to the running test's directory
/// (`target/<profile>/<name>`).
pub fn sibling_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: build it first (`cargo xtask test` builds the agent before the integration tests)",
        path.display()
    );
    path
}

/// A child process killed and reaped on drop.
pub struct ChildGuard {
    pub child: Child,
}

impl ChildGuard {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: plain kill syscall on our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Waits for the first line the child prints (e.g. `ready ...`).
    pub fn first_line(&mut self) -> String {
        let stdout = self.child.stdout.as_mut().expect("piped stdout");
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while std::io::Read::read(stdout, &mut byte).expect("read stdout") == 1 && byte[0] != b'\n'
        {
            line.push(byte[0]);
        }
        String::from_utf8_lossy(&line).into_owned()
    }

    pub fn wait_output(mut self) -> String {
        let mut stdout = self.child.stdout.take().expect("piped stdout");
        let mut out = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut out).expect("read stdout");
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "workload failed: {status}");
        out
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `program args` inside every cgroup directory of `dirs` (one per
/// hierarchy: the v2 one, and v1 controllers such as cpu on a hybrid
/// machine), moving itself there between fork and exec.
pub fn spawn_in_cgroups(dirs: &[&Path], program: &Path, args: &[&str]) -> ChildGuard {
    let files: Vec<File> = dirs
        .iter()
        .map(|dir| {
            File::options()
                .write(true)
                .open(dir.join("cgroup.procs"))
                .unwrap_or_else(|e| panic!("open {}/cgroup.procs: {e}", dir.display()))
        })
        .collect();
    let fds: Vec<i32> = files.iter().map(|file| file.as_raw_fd()).collect();
    let mut command = Command::new(program);
    command
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // SAFETY: between fork and exec only write(2) on fds opened before the
    // fork: async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            for fd in &fds {
                if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = command.spawn().expect("spawn workload");
    drop(files);
    ChildGuard { child }
}

/// Starts `program args` already inside `cgroup` (it moves itself there
/// between fork and exec, so none of its time is charged elsewhere).
pub fn spawn_in(cgroup: Option<&TestCgroup>, program: &Path, args: &[&str]) -> ChildGuard {
    let mut command = Command::new(program);
    command
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(cgroup) = cgroup {
        let procs = File::options()
            .write(true)
            .open(cgroup.path.join("cgroup.procs"))
            .expect("open cgroup.procs");
        let fd = procs.as_raw_fd();
        // SAFETY: between fork and exec we only call write(2) on an fd
        // opened before the fork: async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                if written == 1 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let child = command.spawn().expect("spawn workload");
        drop(procs);
        return ChildGuard { child };
    }
    ChildGuard {
        child: command.spawn().expect("spawn workload"),
    }
}

/// Run time of one thread in ns, as the scheduler counts it.
pub fn schedstat_ns(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).expect("schedstat");
    text.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .expect("schedstat value")
}

/// How many times the thread `pid` has been put on a CPU (schedstat's third
/// field): one more after every switch out and back.
pub fn schedstat_arrivals(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).expect("schedstat");
    text.split_whitespace()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .expect("schedstat arrival count")
}

/// Run time of all live threads of a process in ns.
pub fn process_schedstat_ns(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task dir")
        .flatten()
        .filter_map(|entry| std::fs::read_to_string(entry.path().join("schedstat")).ok())
        .filter_map(|text| {
            text.split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}

/// A running `powerlens run`, stopped on drop.
pub struct Agent {
    child: Child,
    pub base_url: String,
    http: ureq::Agent,
}

impl Agent {
    /// Starts the agent with a short interval (250 ms) and waits for its
    /// first snapshot.
    pub fn start(extra_args: &[&str]) -> Self {
        Self::start_with_interval("250ms", extra_args)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts the agent and waits for its first snapshot.
    pub fn start_with_interval(interval: &str, extra_args: &[&str]) -> Self {
        Self::start_with_env(interval, extra_args, &[])
    }

    /// Starts the agent with extra environment variables.
    pub fn start_with_env(interval: &str, extra_args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::launch(interval, extra_args, env, None)
    }

    /// Starts the agent in a cgroup namespace of its own (rooted at the
    /// test's cgroup), as in a pod: `/proc/<pid>/cgroup` of every other
    /// process then reads `/../…`.
    pub fn start_in_cgroup_namespace(cgroup: &TestCgroup, extra_args: &[&str]) -> Self {
        Self::launch("250ms", extra_args, &[], Some(cgroup))
    }

    fn launch(
        interval: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
        namespace_in: Option<&TestCgroup>,
    ) -> Self {
        let listen = format!("127.0.0.1:{}", free_port());
        let mut command = Command::new(sibling_binary("powerlens"));
        let procs = namespace_in.map(|cgroup| {
            File::options()
                .write(true)
                .open(cgroup.path.join("cgroup.procs"))
                .expect("open cgroup.procs")
        });
        if let Some(procs) = &procs {
            let fd = procs.as_raw_fd();
            // SAFETY: write(2) and unshare(2) between fork and exec are
            // async-signal-safe; the fd was opened before the fork.
            unsafe {
                command.pre_exec(move || {
                    if libc::write(fd, b"0".as_ptr().cast(), 1) == 1
                        && libc::unshare(libc::CLONE_NEWCGROUP) == 0
                    {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let child = command
            .args([
                "run",
                "--no-table",
                "--interval",
                interval,
                "--listen",
                &listen,
            ])
            .args(extra_args)
            .env(
                "RUST_LOG",
                std::env::var("POWERLENS_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start powerlens");
        let http = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(5)))
                .build(),
        );
        let mut agent = Self {
            child,
            base_url: format!("http://{listen}"),
            http,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = agent.child.try_wait().expect("try_wait") {
                let mut stderr = String::new();
                if let Some(mut pipe) = agent.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
                }
                panic!("powerlens exited early ({status}):\n{stderr}");
            }
            if let Ok((200, health)) = agent.try_get("/healthz")
                && health["sequence"].as_u64().unwrap_or(0) >= 1
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "powerlens did not publish a snapshot within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Drain stderr in the background so the agent never blocks on it.
        if let Some(mut pipe) = agent.child.stderr.take() {
            std::thread::spawn(move || {
                let mut sink = std::io::stderr();
                let _ = std::io::copy(&mut pipe, &mut sink);
                let _ = sink.flush();
            });
        }
        agent
    }

    fn try_get(&self, path: &str) -> Result<(u16, Value), String> {
        let mut response = self
            .http
            .get(&format!("{}{path}", self.base_url))
            .call()
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .read_to_string()
            .map_err(|e| e.to_string())?;
        let value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        Ok((status, value))
    }

    /// The status of GET `path`, with `Authorization: Bearer <token>` when
    /// a token is given.
    pub fn status_with_token(&self, path: &str, token: Option<&str>) -> u16 {
        let mut request = self.http.get(&format!("{}{path}", self.base_url));
        if let Some(token) = token {
            request = request.header("Authorization", &format!("Bearer {token}"));
        }
        request
            .call()
            .map(|response| response.status().as_u16())
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// GET `path` as text (e.g. `/metrics`).
    pub fn get_text(&self, path: &str) -> String {
        self.http
            .get(&format!("{}{path}", self.base_url))
            .call()
            .and_then(|mut r| r.body_mut().read_to_string())
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// How many items the list route `path` has (its `X-Total-Count`),
    /// without transferring them.
    pub fn total_count(&self, path: &str) -> usize {
        let separator = if path.contains('?') { '&' } else { '?' };
        let response = self
            .http
            .get(&format!("{}{path}{separator}limit=1", self.base_url))
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        response
            .headers()
            .get("x-total-count")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("GET {path}: no X-Total-Count"))
    }

    /// GET `path`, returning the status and the JSON body.
    pub fn get(&self, path: &str) -> (u16, Value) {
        self.try_get(path)
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    pub fn sequence(&self) -> u64 {
        self.get("/healthz").1["sequence"]
            .as_u64()
            .expect("sequence")
    }

    /// Waits until `n` more intervals have been published.
    pub fn wait_intervals(&self, n: u64) {
        let target = self.sequence() + n;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.sequence() < target {
            assert!(Instant::now() < deadline, "agent stopped publishing");
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Agent {
    /// `kill -9`: no chance to clean anything up.
    pub fn kill_hard(&mut self) {
        // SAFETY: plain kill syscall on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: plain kill syscall on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Relative difference |a - b| / b.
pub fn relative_error(measured: f64, expected: f64) -> f64 {
    (measured - expected).abs() / expected.abs().max(f64::MIN_POSITIVE)
}

/// The project's `deploy/` directory.
pub fn deploy_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy"))
}

/// The `powerlens.toml` block of the Kubernetes ConfigMap, unindented.
pub fn configmap_config() -> String {
    let text = std::fs::read_to_string(deploy_dir().join("kubernetes/configmap.yaml"))
        .expect("read configmap.yaml");
    let block = text
        .split_once("powerlens.toml: |\n")
        .expect("powerlens.toml in the ConfigMap")
        .1;
    block
        .lines()
        .map(|line| line.strip_prefix("    ").unwrap_or(line.trim_start()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The capabilities the DaemonSet adds (its `add:` list).
pub fn daemonset_capabilities() -> Vec<String> {
    let text = std::fs::read_to_string(deploy_dir().join("kubernetes/daemonset.yaml"))
        .expect("read daemonset.yaml");
    text.lines()
        .map(str::trim)
        .skip_while(|l| *l != "add:")
        .skip(1)
        .take_while(|l| !l.starts_with("seccompProfile"))
        .filter_map(|l| l.strip_prefix("- "))
        .map(str::to_owned)
        .collect()
}
