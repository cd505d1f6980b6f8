//! Sources that can block (an NVML call on a wedged GPU driver, a hwmon
//! sensor such as drivetemp that spins a disk up) run on a thread of their
//! own; the collector waits for them at most a deadline. A source that
//! misses it is reported failing and skipped while it is still busy, and
//! CPU accounting goes on.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, RecvTimeoutError, SyncSender},
    },
    time::Duration,
};

use thiserror::Error;

type Job<S> = Box<dyn FnOnce(&mut S) + Send>;

/// A source owned by a worker thread.
pub struct OffThread<S> {
    jobs: SyncSender<Job<S>>,
    busy: Arc<AtomicBool>,
    name: &'static str,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum OffThreadError {
    #[error("{name} did not answer within {deadline:?}; its reads are skipped until it does")]
    Late {
        name: &'static str,
        deadline: Duration,
    },
    #[error("{name} is still busy with a read that missed its deadline")]
    StillBusy { name: &'static str },
    #[error("{name}'s worker thread is gone")]
    Gone { name: &'static str },
}

impl<S: Send + 'static> OffThread<S> {
    /// Moves `source` to a thread named after it.
    pub fn spawn(name: &'static str, mut source: S) -> std::io::Result<Self> {
        let (jobs, receiver) = mpsc::sync_channel::<Job<S>>(1);
        let busy = Arc::new(AtomicBool::new(false));
        let worker_busy = Arc::clone(&busy);
        std::thread::Builder::new()
            .name(format!("powerlens-{name}"))
            .spawn(move || {
                for job in receiver {
                    job(&mut source);
                    worker_busy.store(false, Ordering::Release);
                }
            })?;
        Ok(Self { jobs, busy, name })
    }

    /// Runs `read` on the source's thread and waits at most `deadline` for
    /// its answer. A late answer is dropped when it comes.
    pub fn call<R: Send + 'static>(
        &self,
        deadline: Duration,
        read: impl FnOnce(&mut S) -> R + Send + 'static,
    ) -> Result<R, OffThreadError> {
        let name = self.name;
        if self.busy.swap(true, Ordering::AcqRel) {
            return Err(OffThreadError::StillBusy { name });
        }
        let (reply, answer) = mpsc::sync_channel(1);
        let job: Job<S> = Box::new(move |source| {
            // The collector may have stopped waiting: nobody to tell then.
            let _ = reply.send(read(source));
        });
        if self.jobs.send(job).is_err() {
            return Err(OffThreadError::Gone { name });
        }
        match answer.recv_timeout(deadline) {
            Ok(result) => Ok(result),
            Err(RecvTimeoutError::Timeout) => Err(OffThreadError::Late { name, deadline }),
            Err(RecvTimeoutError::Disconnected) => Err(OffThreadError::Gone { name }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::Receiver;

    use super::*;

    /// A source whose reads wait for a go-ahead (a hung driver until then).
    struct Gate(Receiver<()>);

    #[test]
    fn a_hung_source_misses_its_deadline_is_skipped_then_recovers() {
        let (open, gate) = mpsc::channel();
        let source = OffThread::spawn("test-gpu", Gate(gate)).unwrap();
        let deadline = Duration::from_millis(50);
        let read = |gate: &mut Gate| gate.0.recv().map(|()| 42).unwrap_or(0);
        assert_eq!(
            source.call(deadline, read),
            Err(OffThreadError::Late {
                name: "test-gpu",
                deadline
            })
        );
        assert_eq!(
            source.call(deadline, read),
            Err(OffThreadError::StillBusy { name: "test-gpu" })
        );
        // The driver answers: the late read ends (its answer dropped), and
        // the next read is served.
        open.send(()).unwrap();
        open.send(()).unwrap();
        let mut answer = Err(OffThreadError::StillBusy { name: "test-gpu" });
        for _ in 0..100 {
            answer = source.call(deadline, read);
            if answer.is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(answer, Ok(42));
    }
}
