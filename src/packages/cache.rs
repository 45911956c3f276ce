//! An in-memory TTL cache with single flight: concurrent look-ups of one key share one upstream request, and an
//! answer is reused for the TTL, so a thousand deployments of one package cost one registry call.
//!
//! Definitive answers (a document, or "not found") are cached; transient failures are shared with the callers
//! already waiting on them but not kept, so the next look-up tries again.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

use super::ResolveError;

type Slot<V> = Arc<OnceCell<Result<V, ResolveError>>>;

pub struct TtlCache<V> {
    ttl: Duration,
    entries: Mutex<HashMap<String, (Instant, Slot<V>)>>,
}

/// Past this many entries, expired ones are swept on insert.
const SWEEP_AT: usize = 1024;

impl<V: Clone> TtlCache<V> {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The cached answer for `key`, or the answer of `fetch`, run at most once for all concurrent callers.
    pub async fn get_or_fetch<F, Fut>(&self, key: &str, fetch: F) -> Result<V, ResolveError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, ResolveError>>,
    {
        let slot = {
            let mut entries = self.entries.lock().expect("cache lock");
            let now = Instant::now();
            let fresh = |(at, slot): &(Instant, Slot<V>)| {
                // A look-up still in flight is joined whatever its age.
                slot.get().is_none() || now.duration_since(*at) < self.ttl
            };
            match entries.get(key) {
                Some(entry) if fresh(entry) => entry.1.clone(),
                _ => {
                    if entries.len() >= SWEEP_AT {
                        entries.retain(|_, entry| fresh(entry));
                    }
                    let slot: Slot<V> = Arc::new(OnceCell::new());
                    entries.insert(key.to_string(), (now, slot.clone()));
                    slot
                }
            }
        };
        let result = slot.get_or_init(fetch).await.clone();
        if matches!(&result, Err(e) if e.transient) {
            let mut entries = self.entries.lock().expect("cache lock");
            if entries
                .get(key)
                .is_some_and(|(_, current)| Arc::ptr_eq(current, &slot))
            {
                entries.remove(key);
            }
        }
        result
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn concurrent_lookups_share_one_fetch() {
        let cache = Arc::new(TtlCache::<u32>::new(Duration::from_secs(60)));
        let calls = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let (cache, calls) = (cache.clone(), calls.clone());
                tokio::spawn(async move {
                    cache
                        .get_or_fetch("k", || async {
                            calls.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            Ok(7)
                        })
                        .await
                })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap().unwrap(), 7);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn expires_after_ttl_and_forgets_transient_errors() {
        // The cache reads the real clock, so the TTL must outlast any preemption between two back-to-back
        // look-ups on a loaded machine (30 ms did not); the sleep past it is what the test pays.
        let ttl = Duration::from_secs(2);
        let cache = TtlCache::<u32>::new(ttl);
        let calls = AtomicUsize::new(0);
        let fetch = || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok(1)
        };
        cache.get_or_fetch("k", fetch).await.unwrap();
        cache.get_or_fetch("k", fetch).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        tokio::time::sleep(ttl + Duration::from_millis(50)).await;
        cache.get_or_fetch("k", fetch).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        let failing = || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(ResolveError::transient("down"))
        };
        assert!(cache.get_or_fetch("t", failing).await.is_err());
        assert!(cache.get_or_fetch("t", failing).await.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 4);

        let not_found = || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(ResolveError::stall("PackageNotFound", "gone"))
        };
        assert!(cache.get_or_fetch("n", not_found).await.is_err());
        assert!(cache.get_or_fetch("n", not_found).await.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 5);
        assert_eq!(cache.len(), 2);
    }
}
