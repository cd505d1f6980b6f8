//! CPU workloads for the integration tests and benchmarks.
//!
//! - `burn SECONDS`: one thread busy for SECONDS of wall time.
//! - `pinned CPU SECONDS`: like `burn`, on one CPU only (so several of them
//!   share it in a known ratio).
//! - `half SECONDS`: busy about half the time (5 ms on, 5 ms off).
//! - `threads N SECONDS`: N busy threads.
//! - `short COUNT MILLIS`: forks COUNT children one after another, each
//!   burning MILLIS of CPU then exiting; prints the children's CPU time
//!   (getrusage RUSAGE_CHILDREN) and its own, in ns, as `children_ns=.. self_ns=..`.
//! - `crowd COUNT SECONDS`: forks COUNT children, each busy for SECONDS
//!   (they die with the parent); prints `ready COUNT` once all are forked.
//! - `leader-exits SECONDS`: starts a thread that burns 0.5 s then sleeps
//!   SECONDS, and after 1 s ends the main thread alone (the leader becomes
//!   a zombie; the process lives on in its thread).
//! - `sleep SECONDS`: sleeps (a live process that never runs).
//! - `nice N MODE ...`: runs MODE at nice N (children and threads inherit
//!   it), so a crowd of busy workloads leaves the agent room to run.
//! - `pingpong SECONDS`: two threads hand a byte back and forth over pipes
//!   (thousands of context switches per second).
//! - `swarm SECONDS PER_CGROUP PERIOD_MS DIR...`: forks PER_CGROUP children
//!   into each cgroup directory; each wakes every PERIOD_MS to burn ~50 us,
//!   for SECONDS. Forked children share the parent's pages, so 10,000 of them
//!   fit in memory. Prints `ready` once all are running.

use std::{
    io::{Read as _, Write as _},
    time::{Duration, Instant},
};

fn burn_for(wall: Duration) {
    let start = Instant::now();
    let mut x = 1u64;
    while start.elapsed() < wall {
        for _ in 0..10_000 {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
        }
    }
    std::hint::black_box(x);
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn burn_cpu(cpu: Duration) {
    let target = thread_cpu_ns() + cpu.as_nanos() as u64;
    let mut x = 1u64;
    while thread_cpu_ns() < target {
        for _ in 0..1_000 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        }
    }
    std::hint::black_box(x);
}

fn rusage_ns(who: i32) -> u64 {
    // SAFETY: zeroed rusage is valid; pointer valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut usage) };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1_000;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn arg<T: std::str::FromStr>(args: &[String], index: usize, what: &str) -> T {
    args.get(index)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("missing or bad {what} (argument {index})"))
}

fn main() {
    let mut args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("nice") {
        let nice: i32 = arg(&args, 2, "nice value");
        // SAFETY: plain syscall on ourselves.
        let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
        assert_eq!(result, 0, "setpriority({nice})");
        args.drain(1..3);
    }
    let mode = args.get(1).map(String::as_str).unwrap_or("");
    match mode {
        "burn" => burn_for(Duration::from_secs_f64(arg(&args, 2, "seconds"))),
        // burn-cpu SECONDS: until this thread has run that long (a
        // wall-clock burn gets less CPU when preempted).
        "burn-cpu" => burn_cpu(Duration::from_secs_f64(arg(&args, 2, "seconds"))),
        "pinned" => {
            let cpu: usize = arg(&args, 2, "cpu");
            pin_to(cpu);
            burn_for(Duration::from_secs_f64(arg(&args, 3, "seconds")));
        }
        "fifo-burn" => {
            // fifo-burn CPU SECONDS: burns on CPU at real-time priority, so
            // nothing of the normal class preempts it, then reports its own
            // context switches during the burn and sleeps 30 s.
            let cpu: usize = arg(&args, 2, "cpu");
            let wall = Duration::from_secs_f64(arg(&args, 3, "seconds"));
            pin_to(cpu);
            println!("ready");
            let _ = std::io::stdout().flush();
            let switches = || {
                // SAFETY: getrusage fills the struct.
                let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
                unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
                usage.ru_nvcsw + usage.ru_nivcsw
            };
            let param = libc::sched_param { sched_priority: 50 };
            // SAFETY: valid pointer; changes only this thread's policy.
            let set = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
            assert_eq!(set, 0, "SCHED_FIFO: {}", std::io::Error::last_os_error());
            let before = switches();
            burn_for(wall);
            let after = switches();
            println!("switches during the burn: {}", after - before);
            let _ = std::io::stdout().flush();
            std::thread::sleep(Duration::from_secs(30));
        }
        "wake-once" => {
            // wake-once BURN SLEEP BURN: burns, sleeps (one switch out, then
            // nothing for many intervals), burns once more, then sleeps 60 s.
            burn_for(Duration::from_secs_f64(arg(&args, 2, "first burn (s)")));
            println!("slept");
            let _ = std::io::stdout().flush();
            std::thread::sleep(Duration::from_secs_f64(arg(&args, 3, "sleep (s)")));
            burn_for(Duration::from_secs_f64(arg(&args, 4, "second burn (s)")));
            println!("ran again");
            let _ = std::io::stdout().flush();
            std::thread::sleep(Duration::from_secs(60));
        }
        "half" => {
            let end = Instant::now() + Duration::from_secs_f64(arg(&args, 2, "seconds"));
            while Instant::now() < end {
                burn_for(Duration::from_millis(5));
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        "threads" => {
            let count: usize = arg(&args, 2, "thread count");
            let wall = Duration::from_secs_f64(arg(&args, 3, "seconds"));
            let handles: Vec<_> = (0..count)
                .map(|_| std::thread::spawn(move || burn_for(wall)))
                .collect();
            for handle in handles {
                handle.join().expect("burner thread");
            }
        }
        "short" => {
            let count: usize = arg(&args, 2, "count");
            let cpu = Duration::from_millis(arg(&args, 3, "millis"));
            for _ in 0..count {
                // SAFETY: the child only burns CPU and calls _exit.
                let pid = unsafe { libc::fork() };
                if pid == 0 {
                    burn_cpu(cpu);
                    unsafe { libc::_exit(0) };
                }
                assert!(pid > 0, "fork failed");
                let mut status = 0;
                // SAFETY: waiting for our own child.
                unsafe { libc::waitpid(pid, &mut status, 0) };
            }
            println!(
                "children_ns={} self_ns={}",
                rusage_ns(libc::RUSAGE_CHILDREN),
                rusage_ns(libc::RUSAGE_SELF)
            );
        }
        "crowd" => {
            let count: usize = arg(&args, 2, "count");
            let wall = Duration::from_secs_f64(arg(&args, 3, "seconds"));
            let mut children = Vec::with_capacity(count);
            for _ in 0..count {
                // SAFETY: single-threaded parent; the child only burns CPU
                // and exits.
                let pid = unsafe { libc::fork() };
                if pid == 0 {
                    // SAFETY: plain syscall; the child ends with its parent.
                    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
                    burn_for(wall);
                    unsafe { libc::_exit(0) };
                }
                assert!(pid > 0, "fork failed: {}", std::io::Error::last_os_error());
                children.push(pid);
            }
            println!("ready {}", children.len());
            let _ = std::io::stdout().flush();
            for pid in children {
                let mut status = 0;
                // SAFETY: waiting for our own children.
                unsafe { libc::waitpid(pid, &mut status, 0) };
            }
        }
        "leader-exits" => {
            let wall = Duration::from_secs_f64(arg(&args, 2, "seconds"));
            // The thread runs, then sleeps: after the leader is gone nothing
            // of the process runs, so only a liveness check keeps it alive.
            std::thread::spawn(move || {
                burn_for(Duration::from_millis(500));
                std::thread::sleep(wall);
                std::process::exit(0);
            });
            std::thread::sleep(Duration::from_millis(1000));
            // SAFETY: exit(2) ends only the calling thread; the other
            // thread owns nothing of this one's stack.
            unsafe { libc::syscall(libc::SYS_exit, 0) };
        }
        "sleep" => std::thread::sleep(Duration::from_secs_f64(arg(&args, 2, "seconds"))),
        "pingpong" => {
            let wall = Duration::from_secs_f64(arg(&args, 2, "seconds"));
            let (mut to_echo_read, mut to_echo_write) = std::io::pipe().expect("pipe");
            let (mut to_main_read, mut to_main_write) = std::io::pipe().expect("pipe");
            let echo = std::thread::spawn(move || {
                let mut byte = [0u8; 1];
                while to_echo_read.read_exact(&mut byte).is_ok() {
                    if to_main_write.write_all(&byte).is_err() {
                        break;
                    }
                }
            });
            let end = Instant::now() + wall;
            let mut byte = [0u8; 1];
            let mut rounds = 0u64;
            while Instant::now() < end {
                to_echo_write.write_all(&byte).expect("write");
                to_main_read.read_exact(&mut byte).expect("read");
                rounds += 1;
            }
            drop(to_echo_write);
            let _ = echo.join();
            println!("rounds={rounds}");
        }
        "swarm" => swarm(&args, 1),
        "thread-swarm" => {
            // thread-swarm SECONDS THREADS PER_CGROUP PERIOD_MS DIRS...
            let threads: usize = arg(&args, 3, "threads per process");
            let mut rest = args.clone();
            rest.remove(3);
            swarm(&rest, threads.max(1));
        }
        _ => {
            eprintln!(
                "usage: workload [nice N] burn|burn-cpu|pinned|half|threads|short|crowd|sleep|pingpong|swarm|thread-swarm|fifo-burn|wake-once ..."
            );
            std::process::exit(2);
        }
    }
}

/// Keeps the calling thread on `cpu`.
fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET and the syscall only
    // touch it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity to CPU {cpu}"
        );
    }
}

/// Runs once now (so the agent sees every thread), then 50 us once a
/// `period`, offset by `number` within it, until `end` or the parent dies.
fn wake_every(period: Duration, spread: usize, number: usize, end: Instant) {
    burn_cpu(Duration::from_micros(50));
    std::thread::sleep(Duration::from_micros((number * 997 % spread) as u64));
    while Instant::now() < end {
        burn_cpu(Duration::from_micros(50));
        std::thread::sleep(period);
        // SAFETY: no preconditions.
        if unsafe { libc::getppid() } == 1 {
            break;
        }
    }
}

fn swarm(args: &[String], threads: usize) {
    let seconds: f64 = arg(args, 2, "seconds");
    let per_cgroup: usize = arg(args, 3, "children per cgroup");
    let period = Duration::from_millis(arg(args, 4, "wake-up period (ms)"));
    let dirs = &args[5..];
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let mut children = Vec::with_capacity(dirs.len() * per_cgroup);
    let spread = period.as_micros().max(1) as usize;
    for (index, dir) in dirs.iter().enumerate() {
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("{dir}/cgroup.procs"))
            .unwrap_or_else(|e| panic!("{dir}/cgroup.procs: {e}"));
        let fd = std::os::fd::AsRawFd::as_raw_fd(&procs);
        for child_index in 0..per_cgroup {
            // SAFETY: this process is single-threaded; the child only makes
            // syscalls, starts threads, burns CPU and exits.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
                let first = (index * per_cgroup + child_index) * threads;
                // Each thread wakes once a period, the wake-ups spread over
                // it; small stacks, so 100,000 threads fit.
                let extra: Vec<_> = (1..threads)
                    .map(|thread| {
                        std::thread::Builder::new()
                            .stack_size(64 * 1024)
                            .spawn(move || wake_every(period, spread, first + thread, end))
                            .expect("thread")
                    })
                    .collect();
                wake_every(period, spread, first, end);
                drop(extra);
                unsafe { libc::_exit(0) };
            }
            assert!(pid > 0, "fork failed: {}", std::io::Error::last_os_error());
            children.push(pid);
        }
    }
    println!("ready {}", children.len());
    let _ = std::io::stdout().flush();
    for pid in children {
        let mut status = 0;
        // SAFETY: waiting for our own children.
        unsafe { libc::waitpid(pid, &mut status, 0) };
    }
}
