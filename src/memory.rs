//! Gives the memory a burst of jobs freed back to the system once the burst is over.
//!
//! glibc keeps what a thread freed in that thread's arena for its next allocations; after a
//! burst, the two tokio worker threads' arenas held ~18 MB each of freed memory, a third of the
//! worker's resident size ([benchmarks](../docs/benchmarks.md)). It returns such memory only
//! when asked (`malloc_trim`), and only one arena (`MALLOC_ARENA_MAX=1`, which serializes
//! every allocation) kept it away otherwise. So the worker asks once after each burst: when no
//! job has been in flight for two samples in a row after some were. Under steady load it never
//! asks (the memory is about to be used again), and one call costs a walk of the free lists.
//!
//! The allocator is the process's, so this is the process's choice: the `llm-worker` binary
//! turns it on (`app::Running::release_memory_after_bursts`); a program that embeds a worker
//! (and the integration tests, which run many in one process) decides for itself.
//!
//! With the `mimalloc` feature (on by default) the `llm-worker` binary allocates with mimalloc
//! (about a sixth less worker CPU per job than glibc's malloc). Its heaps are per thread, so
//! after a burst each runtime thread collects its own when it next parks ([`on_park`]), and
//! its arenas are committed as they are used (`.cargo/config.toml`), so that collection
//! returns the memory: 44-47 MB resident a second after 50,000 jobs.
//!
//! The crate's `unsafe` calls (`malloc_trim`, `mi_collect`) live here.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How often the jobs in flight are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// Returns freed memory to the system; whether glibc returned any. With mimalloc (feature
/// `mimalloc`) it collects this thread's mimalloc heap and asks every runtime thread to
/// collect its own when it next parks ([`on_park`]): mimalloc's heaps are per thread. On
/// glibc it also trims every malloc arena (`malloc_trim(0)`).
pub fn release() -> bool {
    #[cfg(feature = "mimalloc")]
    {
        COLLECTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        collect_here();
    }
    trim_glibc()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim_glibc() -> bool {
    // SAFETY: `malloc_trim` takes no pointers and changes only glibc's own free lists, under
    // each arena's lock; any thread may call it at any time.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Elsewhere nothing: musl's and other systems' allocators return freed memory themselves.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_glibc() -> bool {
    false
}

/// How many collections [`release`] asked for.
#[cfg(feature = "mimalloc")]
static COLLECTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[cfg(feature = "mimalloc")]
thread_local! {
    /// The last of [`COLLECTS`] this thread answered.
    static COLLECTED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// For a runtime's `on_thread_park`: collects this thread's mimalloc heap once after each
/// [`release`] (one atomic load otherwise). Nothing without the `mimalloc` feature.
pub fn on_park() {
    #[cfg(feature = "mimalloc")]
    if collect_due() {
        collect_here();
    }
}

/// Whether this thread has not yet collected since the last [`release`] (and from now on, it
/// has).
#[cfg(feature = "mimalloc")]
fn collect_due() -> bool {
    let asked = COLLECTS.load(std::sync::atomic::Ordering::Relaxed);
    COLLECTED.with(|c| c.replace(asked)) != asked
}

#[cfg(feature = "mimalloc")]
#[allow(unsafe_code)]
fn collect_here() {
    // SAFETY: `mi_collect` takes no pointers; it frees the calling thread's unused mimalloc
    // pages and purges what the arenas hold free. Any thread may call it at any time.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// When a burst of jobs is over, from samples of the jobs in flight.
#[derive(Debug, Default)]
pub struct Bursts {
    busy: bool,
    idle_samples: u32,
}

impl Bursts {
    /// Takes one sample; true when memory should be released now (once per burst).
    pub fn sample(&mut self, in_flight: usize) -> bool {
        if in_flight > 0 {
            self.busy = true;
            self.idle_samples = 0;
            return false;
        }
        self.idle_samples = self.idle_samples.saturating_add(1);
        if self.busy && self.idle_samples >= 2 {
            self.busy = false;
            return true;
        }
        false
    }
}

/// Samples `jobs` (the tasks of the jobs in flight) every [`SAMPLE_EVERY`] until `stop`, and
/// releases memory after each burst (on a blocking thread: the call walks every arena).
pub async fn release_after_bursts(jobs: TaskTracker, stop: CancellationToken) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut bursts = Bursts::default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if bursts.sample(jobs.len()) {
            let released = tokio::task::spawn_blocking(release).await.unwrap_or(false);
            tracing::debug!(released, "a burst of jobs ended: freed memory returned");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_released_once_after_each_burst_and_never_while_busy() {
        let mut b = Bursts::default();
        // Idle from the start: nothing to give back.
        assert!(!b.sample(0));
        assert!(!b.sample(0));
        assert!(!b.sample(0));
        // A burst: never while jobs run.
        assert!(!b.sample(3));
        assert!(!b.sample(1));
        // One idle sample is not yet the end (a gap between pulls).
        assert!(!b.sample(0));
        assert!(!b.sample(2));
        assert!(!b.sample(0));
        // Two in a row are; and only once.
        assert!(b.sample(0));
        assert!(!b.sample(0));
        assert!(!b.sample(0));
        // The next burst releases again.
        assert!(!b.sample(5));
        assert!(!b.sample(0));
        assert!(b.sample(0));
    }

    #[cfg(feature = "mimalloc")]
    #[test]
    fn after_a_release_each_thread_collects_once_when_it_parks() {
        std::thread::spawn(|| {
            // A thread that never saw a release has nothing to collect for it, once it has
            // caught up with the ones before it started.
            let _ = collect_due();
            assert!(!collect_due());
            release();
            assert!(collect_due(), "the first park after a release collects");
            assert!(!collect_due(), "later parks do not");
        })
        .join()
        .unwrap();
    }

    fn resident_bytes() -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }

    /// Set in the child process that runs the check below alone.
    const ALONE: &str = "LLMW_MEMORY_TEST_ALONE";

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn release_returns_what_a_thread_freed_to_the_system() {
        // In a process of its own: in the test binary's, other tests' threads take over the
        // arena the thread below leaves and allocate from what it freed (seen in CI).
        if std::env::var_os(ALONE).is_none() {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "memory::tests::release_returns_what_a_thread_freed_to_the_system",
                    "--test-threads",
                    "1",
                ])
                .env(ALONE, "1")
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains("1 passed"),
                "{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        // A thread's arena keeps 64 MB of small blocks it freed (one block allocated last stays
        // live, so the arena cannot simply shrink from its top).
        let (freed, keep) = std::thread::spawn(|| {
            let blocks: Vec<Vec<u8>> = (0..2048).map(|i| vec![i as u8; 32 * 1024]).collect();
            let keep = vec![1u8; 1024];
            let sum: u64 = blocks.iter().map(|b| u64::from(b[0])).sum();
            drop(blocks);
            (sum, keep)
        })
        .join()
        .unwrap();
        assert!(freed > 0 && !keep.is_empty());
        let before = resident_bytes().unwrap();
        assert!(release(), "malloc_trim returned nothing");
        let after = resident_bytes().unwrap();
        assert!(
            after + 32 * 1024 * 1024 < before,
            "resident {before} bytes before, {after} after"
        );
    }
}
