//! Per-thread shards for what every request writes (request counters, the audit
//! queue): two workers serving the same key would otherwise pass one cache line
//! back and forth on every request. A thread keeps the shard number it got on
//! first use; readers combine all shards.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Shards of each sharded thing: threads beyond this share one (still correct).
pub const SHARDS: usize = 16;

/// This thread's shard, `< SHARDS`: threads are numbered in the order they ask.
pub fn this_thread() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

/// A value alone on its cache lines (two, for the adjacent-line prefetcher).
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Padded<T>(pub T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

/// One `T` per shard.
pub fn per_shard<T: Default>() -> Box<[Padded<T>]> {
    (0..SHARDS).map(|_| Padded::default()).collect()
}

/// A count that many threads add to: each adds to its own shard.
#[derive(Debug)]
pub struct Counter {
    shards: Box<[Padded<AtomicU64>]>,
}

impl Default for Counter {
    fn default() -> Self {
        Counter {
            shards: per_shard(),
        }
    }
}

impl Counter {
    pub fn add(&self, n: u64) {
        self.shards[this_thread()].fetch_add(n, Ordering::Relaxed);
    }

    pub fn sum(&self) -> u64 {
        self.shards.iter().map(|s| s.load(Ordering::Relaxed)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_keeps_its_shard_and_threads_spread() {
        let mine = this_thread();
        assert_eq!(this_thread(), mine);
        let others: std::collections::HashSet<usize> = (0..SHARDS)
            .map(|_| std::thread::spawn(this_thread).join().unwrap())
            .collect();
        assert!(others.iter().all(|s| *s < SHARDS));
        // SHARDS threads in a row take SHARDS consecutive numbers: all distinct.
        assert_eq!(others.len(), SHARDS);
    }

    #[test]
    fn a_counter_sums_what_every_thread_added() {
        let c = std::sync::Arc::new(Counter::default());
        let threads: Vec<_> = (0..SHARDS + 3)
            .map(|_| {
                let c = std::sync::Arc::clone(&c);
                std::thread::spawn(move || (0..1000).for_each(|_| c.add(1)))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(c.sum(), (SHARDS as u64 + 3) * 1000);
    }
}
