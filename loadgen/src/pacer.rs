//! Open-loop send times kept to a tenth of a millisecond.
//!
//! tokio's timers have a granularity of one millisecond: a worker that
//! slept until its intended send time woke up to a millisecond late, and
//! every worker due within the same millisecond woke at once. Latency is
//! measured from the intended time (so a slow server cannot hide its
//! queueing by delaying the sends), so that lateness was the load
//! generator's own and counted against the server: 1-line orders offered
//! at 20,000/s to a server otherwise idle measured p50 1.34-1.42 ms, 0.43
//! ms with this pacer (docs/benchmarks.md, *Open-loop sends on time*).
//!
//! A [`Pacer`] belongs to one load generator thread: one periodic timerfd
//! ticks every [`TICK`] while the run lasts, and each tick wakes the
//! workers whose time has come. A worker is never woken early; it is late
//! by at most a tick plus its thread's other work, and the run reports how
//! late ([`crate::Report::send_late_us`]).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// How often a pacer looks for workers whose send time has come.
pub const TICK: Duration = Duration::from_micros(100);

/// The workers of one thread waiting for their send times.
pub struct Pacer {
    waiting: Mutex<Vec<(Instant, Waker)>>,
    /// The run is over: every wait ends.
    stop: Arc<AtomicBool>,
}

impl Pacer {
    /// A pacer ticking on the current runtime until the runtime drops it.
    pub fn start(stop: Arc<AtomicBool>) -> Result<Arc<Pacer>, String> {
        let timer = Timer::periodic(TICK).map_err(|e| format!("cannot start the open-loop pacer: {e}"))?;
        let pacer = Arc::new(Pacer { waiting: Mutex::new(Vec::new()), stop });
        tokio::spawn(pacer.clone().tick(timer));
        Ok(pacer)
    }

    /// Returns at `t` or within a [`TICK`] after it, never before; or
    /// within a tick of `stop` being set, whatever `t`.
    pub async fn until(&self, t: Instant) {
        std::future::poll_fn(|cx| {
            if self.stop.load(Relaxed) || Instant::now() >= t {
                return Poll::Ready(());
            }
            // Only a tick wakes this caller, and it takes the entry when
            // it does; a poll without a wake (allowed, never seen) leaves
            // a second entry, whose wake is then one spare poll.
            self.waiting.lock().unwrap().push((t, cx.waker().clone()));
            Poll::Pending
        })
        .await
    }

    async fn tick(self: Arc<Self>, timer: Timer) {
        let mut due = Vec::new();
        loop {
            if timer.wait().await.is_err() {
                // Never seen on a timerfd; keep the workers going at
                // tokio's coarser granularity rather than strand them.
                tokio::time::sleep(TICK).await;
            }
            let (now, stopping) = (Instant::now(), self.stop.load(Relaxed));
            {
                let mut waiting = self.waiting.lock().unwrap();
                let mut i = 0;
                while i < waiting.len() {
                    if stopping || waiting[i].0 <= now {
                        due.push(waiting.swap_remove(i).1);
                    } else {
                        i += 1;
                    }
                }
            }
            due.drain(..).for_each(Waker::wake);
        }
    }
}

/// A periodic CLOCK_MONOTONIC timerfd, read through the runtime's epoll.
struct Timer(AsyncFd<OwnedFd>);

impl Timer {
    fn periodic(every: Duration) -> std::io::Result<Timer> {
        // SAFETY: plain syscalls on a descriptor this function owns from
        // creation on; the itimerspec is a local the kernel only reads.
        let fd =
            unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let span = libc::timespec { tv_sec: every.as_secs() as _, tv_nsec: every.subsec_nanos() as _ };
        let spec = libc::itimerspec { it_interval: span, it_value: span };
        // SAFETY: see above.
        if unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: an OwnedFd keeps its one descriptor open until dropped,
        // and the AsyncFd owns it from here on.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) };
        Ok(Timer(fd.map_err(|e| e.into_parts().1)?))
    }

    /// Waits for the next expiry (one or more that passed since the last).
    async fn wait(&self) -> std::io::Result<()> {
        loop {
            let mut ready = self.0.readable().await?;
            let mut expirations = [0u8; 8];
            // SAFETY: reads at most 8 bytes into a local buffer of 8.
            let n = unsafe { libc::read(self.0.as_raw_fd(), expirations.as_mut_ptr().cast(), 8) };
            let result = if n == 8 { Ok(()) } else { Err(std::io::Error::last_os_error()) };
            // A read takes every expiry there was: nothing is left to read.
            ready.clear_ready();
            match result {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn no_worker_is_woken_before_its_time_and_every_one_is_woken() {
        runtime().block_on(async {
            let pacer = Pacer::start(Arc::new(AtomicBool::new(false))).unwrap();
            let t0 = Instant::now();
            // Times 37 us apart, finer than a tick, and some already passed.
            let workers: Vec<_> = (0..300u64)
                .map(|k| {
                    let (pacer, t) = (pacer.clone(), t0 + Duration::from_micros(37 * k) - TICK);
                    tokio::spawn(async move {
                        pacer.until(t).await;
                        (t, Instant::now())
                    })
                })
                .collect();
            let all = tokio::time::timeout(Duration::from_secs(10), async {
                let mut out = Vec::new();
                for w in workers {
                    out.push(w.await.unwrap());
                }
                out
            })
            .await
            .expect("every worker is woken (10 s bound)");
            for (t, woke) in all {
                assert!(woke >= t, "woken {:?} early", t - woke);
            }
            assert!(pacer.waiting.lock().unwrap().is_empty());
        });
    }

    #[test]
    fn stopping_wakes_workers_whose_time_is_far_off() {
        runtime().block_on(async {
            let stop = Arc::new(AtomicBool::new(false));
            let pacer = Pacer::start(stop.clone()).unwrap();
            let far = Instant::now() + Duration::from_secs(3600);
            let worker = tokio::spawn({
                let pacer = pacer.clone();
                async move { pacer.until(far).await }
            });
            tokio::time::sleep(Duration::from_millis(5)).await;
            assert!(!worker.is_finished());
            stop.store(true, Relaxed);
            tokio::time::timeout(Duration::from_secs(10), worker)
                .await
                .expect("a stopped pacer wakes every waiting worker (10 s bound)")
                .unwrap();
        });
    }
}
