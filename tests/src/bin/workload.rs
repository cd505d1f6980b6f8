//! CPU workloads for the integration tests and benchmarks.
//!
//! - `burn SECONDS`: one thread busy for SECONDS of wall time.
//! - `half SECONDS`: busy about half the time (5 ms on, 5 ms off).
//! - `threads N SECONDS`: N busy threads.
//! - `short COUNT MILLIS`: forks COUNT children one after another, each
//!   burning MILLIS of CPU then exiting; prints the children's CPU time
//!   (getrusage RUSAGE_CHILDREN) and its own, in ns, as `children_ns=.. self_ns=..`.
//! - `sleep SECONDS`: sleeps (a live process that never runs).
//! - `pingpong SECONDS`: two threads hand a byte back and forth over pipes
//!   (thousands of context switches per second).

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
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("");
    match mode {
        "burn" => burn_for(Duration::from_secs_f64(arg(&args, 2, "seconds"))),
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
        "sleep" => std::thread::sleep(Duration::from_secs_f64(arg(&args, 2, "seconds"))),
        "pingpong" => {
            let wall = Duration::from_secs_f64(arg(&args, 2, "seconds"));
            let (mut a_read, mut b_write) = std::io::pipe().expect("pipe");
            let (mut b_read, mut a_write) = std::io::pipe().expect("pipe");
            let echo = std::thread::spawn(move || {
                let mut byte = [0u8; 1];
                while a_read.read_exact(&mut byte).is_ok() {
                    if b_write.write_all(&byte).is_err() {
                        break;
                    }
                }
            });
            let end = Instant::now() + wall;
            let mut byte = [0u8; 1];
            let mut rounds = 0u64;
            while Instant::now() < end {
                a_write.write_all(&byte).expect("write");
                b_read.read_exact(&mut byte).expect("read");
                rounds += 1;
            }
            drop(a_write);
            let _ = echo.join();
            println!("rounds={rounds}");
        }
        _ => {
            eprintln!("usage: workload burn|half|threads|short|sleep|pingpong ...");
            std::process::exit(2);
        }
    }
}
