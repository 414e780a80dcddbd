//! The relay's marketplace workers: a fixed number of threads and a bounded queue in two
//! priorities (devices already bound before devices that only enrolled). A call that
//! finds the queue full is answered `busy` at once instead of waiting past the device's
//! timeout; a bound device's call arriving at a full queue takes the place of the newest
//! enrolment call (that one is answered `busy`); a call that waited longer than
//! `max_wait` is answered `busy` without being forwarded.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::relay::Priority;

type Task = Box<dyn FnOnce(bool) + Send>;

struct Queued {
    task: Task,
    since: Instant,
}

#[derive(Default)]
struct Queues {
    bound: VecDeque<Queued>,
    enrolled: VecDeque<Queued>,
}

impl Queues {
    fn len(&self) -> usize {
        self.bound.len() + self.enrolled.len()
    }
}

pub struct Pool {
    shared: Arc<(Mutex<Queues>, Condvar)>,
    capacity: usize,
}

/// The queue is full: answer busy.
#[derive(Debug, PartialEq, Eq)]
pub struct Busy;

impl Pool {
    /// Starts `workers` threads; at most `capacity` calls wait.
    pub fn new(workers: usize, capacity: usize, max_wait: Duration) -> Pool {
        let shared = Arc::new((Mutex::new(Queues::default()), Condvar::new()));
        for i in 0..workers.max(1) {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("relay-{i}"))
                .spawn(move || worker(&shared, max_wait))
                .expect("spawn a relay worker");
        }
        Pool { shared, capacity }
    }

    /// Runs `f` on a worker; the answer is None when the call was dropped as busy (queue
    /// overtaken or waited too long).
    pub async fn run<R: Send + 'static>(
        &self,
        priority: Priority,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<Option<R>, Busy> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task: Task = Box::new(move |run| {
            let _ = tx.send(run.then(f));
        });
        {
            let (lock, cv) = &*self.shared;
            let mut q = lock.lock().unwrap_or_else(|p| p.into_inner());
            if q.len() >= self.capacity {
                match (priority, q.enrolled.pop_back()) {
                    (Priority::Bound, Some(evicted)) => (evicted.task)(false),
                    (_, Some(back)) => {
                        q.enrolled.push_back(back);
                        return Err(Busy);
                    }
                    (_, None) => return Err(Busy),
                }
            }
            let item = Queued {
                task,
                since: Instant::now(),
            };
            match priority {
                Priority::Bound => q.bound.push_back(item),
                Priority::Enrolled => q.enrolled.push_back(item),
            }
            cv.notify_one();
        }
        Ok(rx.await.unwrap_or(None))
    }
}

fn worker(shared: &(Mutex<Queues>, Condvar), max_wait: Duration) {
    let (lock, cv) = shared;
    loop {
        let item = {
            let mut q = lock.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(i) = q.bound.pop_front().or_else(|| q.enrolled.pop_front()) {
                    break i;
                }
                q = cv.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        };
        let fresh = item.since.elapsed() <= max_wait;
        (item.task)(fresh);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_queues_answer_busy_and_bound_calls_go_first() {
        let pool = Arc::new(Pool::new(1, 2, Duration::from_secs(30)));
        let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
        let order = Arc::new(Mutex::new(Vec::new()));
        // The worker is held by the first call until the gate opens.
        let p = pool.clone();
        let first = tokio::spawn(async move {
            p.run(Priority::Enrolled, move || gate_rx.recv().unwrap())
                .await
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut waiting = Vec::new();
        for (name, prio) in [("e2", Priority::Enrolled), ("e3", Priority::Enrolled)] {
            let (p, o) = (pool.clone(), order.clone());
            waiting.push(tokio::spawn(async move {
                p.run(prio, move || o.lock().unwrap().push(name)).await
            }));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Full: another enrolment call is busy at once; a bound one takes e3's place.
        assert_eq!(pool.run(Priority::Enrolled, || ()).await, Err(Busy));
        let (p, o) = (pool.clone(), order.clone());
        let bound = tokio::spawn(async move {
            p.run(Priority::Bound, move || o.lock().unwrap().push("b"))
                .await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        gate_tx.send(()).unwrap();
        assert_eq!(first.await.unwrap(), Ok(Some(())));
        assert_eq!(bound.await.unwrap(), Ok(Some(())));
        let e2 = waiting.remove(0).await.unwrap();
        let e3 = waiting.remove(0).await.unwrap();
        assert_eq!((e2, e3), (Ok(Some(())), Ok(None)));
        assert_eq!(*order.lock().unwrap(), ["b", "e2"]);
    }

    #[tokio::test]
    async fn a_call_that_waited_too_long_is_not_run() {
        let pool = Arc::new(Pool::new(1, 4, Duration::from_millis(50)));
        let p = pool.clone();
        let slow = tokio::spawn(async move {
            p.run(Priority::Bound, || {
                std::thread::sleep(Duration::from_millis(200))
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let ran = Arc::new(Mutex::new(false));
        let r = ran.clone();
        assert_eq!(
            pool.run(Priority::Bound, move || *r.lock().unwrap() = true)
                .await,
            Ok(None)
        );
        assert!(!*ran.lock().unwrap());
        assert_eq!(slow.await.unwrap(), Ok(Some(())));
    }
}
