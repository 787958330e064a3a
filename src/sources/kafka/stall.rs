//! Noticing a partition that stops delivering: its high watermark is past the reader's position,
//! yet no record arrives for `stall_timeout_ms` of polling.
//!
//! A broker can hold records it never serves — tansu 0.6 answers a fetch that starts inside a
//! producer batch with nothing — and a consumer would then wait forever without a word. The
//! [`StallWatch`] compares each partition's position with its high watermark at every check;
//! only the time the reader spends polling counts (a slow micro-batch in between is not a stall).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A partition that holds records past the reader's position but delivers none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stall {
    /// The partition.
    pub partition: i32,
    /// The offset the reader waits for.
    pub position: i64,
    /// The partition's high watermark (offset after its last record).
    pub high_watermark: i64,
    /// How long the reader has polled without a record from it.
    pub waited: Duration,
}

impl Stall {
    /// The error a caller reports: names the topic, partition, position and high watermark,
    /// with what to check.
    pub fn describe(&self, topic: &str) -> String {
        format!(
            "kafka topic '{topic}' partition {} is stalled: position {}, high watermark {}, no record for {:.1} s \
             (hint: the broker holds {} records past the position but returns none — check the broker and its logs; \
             tansu 0.6 cannot serve a fetch that starts inside a producer batch; raise the table's stall_timeout_ms \
             if the broker is merely slow)",
            self.partition,
            self.position,
            self.high_watermark,
            self.waited.as_secs_f64(),
            self.high_watermark - self.position
        )
    }
}

/// What changed at a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StallChange {
    /// The partition has just been found stalled.
    Stalled(Stall),
    /// The partition delivered again (or the reader reached its end).
    Recovered {
        /// The partition.
        partition: i32,
    },
}

/// One partition's state.
#[derive(Debug, Default)]
struct Watched {
    /// Offset of the next record to read; `None` after the partition's end was reached (the
    /// next check takes the high watermark as the position).
    position: Option<i64>,
    /// Since when (in polling time) the partition has been behind, and its position then.
    behind: Option<(Instant, i64)>,
    /// Set while the partition is stalled.
    stalled: Option<Stall>,
}

/// Tracks the partitions of one reader.
#[derive(Debug)]
pub struct StallWatch {
    timeout: Duration,
    partitions: BTreeMap<i32, Watched>,
    paused_at: Option<Instant>,
    last_check: Option<Instant>,
    changes: Vec<StallChange>,
}

impl StallWatch {
    /// Watches `positions` (partition → the offset the reader starts at, `None` when unknown:
    /// the first check then takes the high watermark). A partition stalls after `timeout`.
    pub fn new(timeout: Duration, positions: impl IntoIterator<Item = (i32, Option<i64>)>) -> Self {
        StallWatch {
            timeout,
            partitions: positions
                .into_iter()
                .map(|(p, position)| {
                    (
                        p,
                        Watched {
                            position,
                            ..Default::default()
                        },
                    )
                })
                .collect(),
            paused_at: None,
            last_check: None,
            changes: Vec::new(),
        }
    }

    /// How often the reader compares positions with high watermarks: a third of the timeout,
    /// between 100 ms and 10 s.
    pub fn check_interval(&self) -> Duration {
        (self.timeout / 3).clamp(Duration::from_millis(100), Duration::from_secs(10))
    }

    /// Whether a check is due at `now`.
    pub fn due(&self, now: Instant) -> bool {
        self.last_check
            .is_none_or(|t| now.duration_since(t) >= self.check_interval())
    }

    /// A record was read from `partition`; the next one is at `next`.
    pub fn delivered(&mut self, partition: i32, next: i64) {
        if let Some(w) = self.partitions.get_mut(&partition) {
            w.position = Some(next);
        }
    }

    /// The reader reached `partition`'s end (its position is the high watermark; control
    /// records such as transaction markers can leave it past the last record read).
    pub fn reached_end(&mut self, partition: i32) {
        if let Some(w) = self.partitions.get_mut(&partition) {
            w.position = None;
        }
    }

    /// The reader stops polling (it processes a micro-batch): the clock stops.
    pub fn pause(&mut self, now: Instant) {
        self.paused_at.get_or_insert(now);
    }

    /// The reader polls again: time spent paused does not count towards a stall.
    pub fn resume(&mut self, now: Instant) {
        if let Some(paused) = self.paused_at.take() {
            let gap = now.saturating_duration_since(paused);
            for w in self.partitions.values_mut() {
                if let Some((since, _)) = &mut w.behind {
                    *since += gap;
                }
            }
        }
    }

    /// Compares every partition's position with `high` (partition → high watermark) at `now`;
    /// what changed is kept for [`StallWatch::take_changes`].
    pub fn check(&mut self, high: &BTreeMap<i32, i64>, now: Instant) {
        self.last_check = Some(now);
        for (&partition, w) in &mut self.partitions {
            let Some(&high) = high.get(&partition) else { continue };
            let position = *w.position.get_or_insert(high);
            let progressed = w.behind.is_some_and(|(_, at)| position > at);
            if high <= position || progressed {
                w.behind = (high > position).then_some((now, position));
                if w.stalled.take().is_some() {
                    self.changes.push(StallChange::Recovered { partition });
                }
                continue;
            }
            let (since, _) = *w.behind.get_or_insert((now, position));
            let waited = now.saturating_duration_since(since);
            if waited < self.timeout {
                continue;
            }
            let stall = Stall {
                partition,
                position,
                high_watermark: high,
                waited,
            };
            if w.stalled.is_none() {
                self.changes.push(StallChange::Stalled(stall.clone()));
            }
            w.stalled = Some(stall);
        }
    }

    /// Changes since the last call.
    pub fn take_changes(&mut self) -> Vec<StallChange> {
        std::mem::take(&mut self.changes)
    }

    /// Whether a check found a change (a stall or a recovery) the caller has not taken yet.
    pub fn has_changes(&self) -> bool {
        !self.changes.is_empty()
    }

    /// The partitions stalled now.
    pub fn stalled(&self) -> impl Iterator<Item = &Stall> {
        self.partitions.values().filter_map(|w| w.stalled.as_ref())
    }

    /// Whether `partition` is stalled now.
    pub fn is_stalled(&self, partition: i32) -> bool {
        self.partitions.get(&partition).is_some_and(|w| w.stalled.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(30);

    fn high(pairs: &[(i32, i64)]) -> BTreeMap<i32, i64> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn a_partition_behind_without_progress_stalls_after_the_timeout_and_recovers() {
        let t0 = Instant::now();
        let mut watch = StallWatch::new(TIMEOUT, [(0, Some(40)), (1, Some(10))]);
        watch.check(&high(&[(0, 200), (1, 10)]), t0);
        watch.check(&high(&[(0, 200), (1, 10)]), t0 + Duration::from_secs(29));
        assert!(watch.take_changes().is_empty(), "not before the timeout");
        watch.check(&high(&[(0, 200), (1, 10)]), t0 + Duration::from_secs(31));
        let changes = watch.take_changes();
        let [StallChange::Stalled(stall)] = changes.as_slice() else {
            panic!("{changes:?}")
        };
        assert_eq!((stall.partition, stall.position, stall.high_watermark), (0, 40, 200));
        assert!(
            stall
                .describe("docs")
                .contains("'docs' partition 0 is stalled: position 40, high watermark 200")
        );
        // Reported once, then kept until the partition moves.
        watch.check(&high(&[(0, 200), (1, 10)]), t0 + Duration::from_secs(40));
        assert!(watch.take_changes().is_empty());
        assert!(watch.is_stalled(0) && !watch.is_stalled(1));
        watch.delivered(0, 41);
        watch.check(&high(&[(0, 200), (1, 10)]), t0 + Duration::from_secs(41));
        assert_eq!(watch.take_changes(), vec![StallChange::Recovered { partition: 0 }]);
        assert_eq!(watch.stalled().count(), 0);
    }

    #[test]
    fn steady_progress_or_an_idle_caught_up_partition_never_stalls() {
        let t0 = Instant::now();
        let mut watch = StallWatch::new(TIMEOUT, [(0, Some(0)), (1, None)]);
        for second in 0..120 {
            // Partition 0 is always behind but moves; partition 1 sits at its end.
            watch.delivered(0, second + 1);
            watch.check(&high(&[(0, 1000), (1, 7)]), t0 + Duration::from_secs(second as u64));
        }
        assert!(watch.take_changes().is_empty());
        // A record produced to the idle partition long after it was caught up is not a stall
        // until it has been waited for the whole timeout.
        watch.check(&high(&[(0, 120), (1, 8)]), t0 + Duration::from_secs(200));
        watch.check(&high(&[(0, 120), (1, 8)]), t0 + Duration::from_secs(210));
        assert!(watch.take_changes().is_empty());
    }

    #[test]
    fn time_spent_outside_polling_does_not_count() {
        let t0 = Instant::now();
        let mut watch = StallWatch::new(TIMEOUT, [(0, Some(5))]);
        watch.check(&high(&[(0, 50)]), t0);
        // A micro-batch takes 60 s to process; the reader polls 10 s before and after it.
        watch.pause(t0 + Duration::from_secs(10));
        watch.resume(t0 + Duration::from_secs(70));
        watch.check(&high(&[(0, 50)]), t0 + Duration::from_secs(80));
        assert!(!watch.has_changes(), "20 s of polling is under the timeout");
        watch.check(&high(&[(0, 50)]), t0 + Duration::from_secs(91));
        assert!(watch.has_changes());
    }

    #[test]
    fn reaching_the_end_takes_the_high_watermark_as_position() {
        let t0 = Instant::now();
        // A transaction marker leaves the high watermark one past the last record.
        let mut watch = StallWatch::new(TIMEOUT, [(0, Some(0))]);
        watch.delivered(0, 9);
        watch.reached_end(0);
        for second in [0, 40, 80] {
            watch.check(&high(&[(0, 10)]), t0 + Duration::from_secs(second));
        }
        assert!(watch.take_changes().is_empty());
        assert_eq!(watch.check_interval(), Duration::from_secs(10));
    }
}
