//! Waveform summaries: the minimum and maximum of the audio under each pixel column.
//!
//! Computed on the GUI thread, only while the window is open, from audio the audio thread never
//! waits for (a take's atomics, a prompt copied out of the capture history). Summaries are cached
//! per take and width ([`SummaryCache`]), so a steady window summarises nothing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::takes::{Take, TakeId};

/// The audio under one pixel column: its lowest and highest sample over every channel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Column {
    /// Lowest sample (at most 0 unless every sample is positive).
    pub min: f32,
    /// Highest sample.
    pub max: f32,
}

/// Summarises `frames` frames of `channels` channels read through `sample(channel, frame)` into
/// `columns` columns. Column `i` covers frames `i * frames / columns .. (i + 1) * frames /
/// columns`; when there are more columns than frames, a column shows the frame under it.
/// Non-finite samples count as silence. No frames or no columns give an empty summary.
pub fn summarise(
    channels: usize,
    frames: usize,
    columns: usize,
    sample: impl Fn(usize, usize) -> f32,
) -> Vec<Column> {
    if frames == 0 || columns == 0 || channels == 0 {
        return Vec::new();
    }
    (0..columns)
        .map(|i| {
            let a = i * frames / columns;
            let b = ((i + 1) * frames / columns).clamp(a + 1, frames);
            let mut column = Column {
                min: f32::INFINITY,
                max: f32::NEG_INFINITY,
            };
            for c in 0..channels {
                for f in a..b {
                    let x = sample(c, f);
                    let x = if x.is_finite() { x } else { 0.0 };
                    column.min = column.min.min(x);
                    column.max = column.max.max(x);
                }
            }
            column
        })
        .collect()
}

/// [`summarise`] over planar audio.
pub fn summarise_planar<S: AsRef<[f32]>>(planar: &[S], columns: usize) -> Vec<Column> {
    let frames = planar.iter().map(|c| c.as_ref().len()).min().unwrap_or(0);
    summarise(planar.len(), frames, columns, |c, f| planar[c].as_ref()[f])
}

/// How often a take that is still growing is summarised again.
pub const GROWING_REFRESH: Duration = Duration::from_millis(250);

struct Cached {
    /// Frames summarised (a growing take's count when it was summarised).
    frames: usize,
    complete: bool,
    at: Instant,
    columns: Vec<Column>,
}

/// Summaries of takes, by take and width. Lives in the editor (GUI thread).
#[derive(Default)]
pub struct SummaryCache {
    entries: HashMap<(TakeId, usize), Cached>,
    /// Summaries computed so far (for tests and to see that a steady window computes none).
    pub computed: u64,
}

impl SummaryCache {
    /// The summary of `take` at `columns` columns (its whole length, including frames a
    /// growing take has not published yet, which show as silence), computing it when it is not
    /// cached, or when the take grew and [`GROWING_REFRESH`] has passed.
    pub fn take(&mut self, take: &Take, columns: usize) -> &[Column] {
        let (valid, complete) = take.available();
        let key = (take.id(), columns);
        let stale = match self.entries.get(&key) {
            None => true,
            Some(c) => {
                (c.frames != valid || c.complete != complete)
                    && (complete || c.at.elapsed() >= GROWING_REFRESH)
            }
        };
        if stale {
            // A growing take is drawn at its final length: its audio fills in from the left.
            let frames = if complete { valid } else { take.capacity() };
            let columns_data = summarise(take.channels(), frames, columns, |c, f| {
                if f < valid {
                    take.sample(c, f)
                } else {
                    0.0
                }
            });
            self.computed += 1;
            self.entries.insert(
                key,
                Cached {
                    frames: valid,
                    complete,
                    at: Instant::now(),
                    columns: columns_data,
                },
            );
        }
        &self.entries[&key].columns
    }

    /// Forgets the summaries of takes not in `alive` (deleted takes, old widths are kept until
    /// their take goes).
    pub fn retain(&mut self, alive: &[TakeId]) {
        self.entries.retain(|(id, _), _| alive.contains(id));
    }

    /// Number of cached summaries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn columns_hold_the_extremes_of_their_frames() {
        let left = [0.0, 0.5, -0.25, 0.1, 0.0, 0.0, -1.0, 0.2];
        let right = [0.0, 0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 0.0];
        let s = summarise_planar(&[&left[..], &right[..]], 4);
        assert_eq!(
            s,
            vec![
                Column { min: 0.0, max: 0.5 },
                Column {
                    min: -0.25,
                    max: 0.9
                },
                Column { min: 0.0, max: 0.0 },
                Column {
                    min: -1.0,
                    max: 0.2
                },
            ]
        );
    }

    #[test]
    fn more_columns_than_frames_repeat_frames() {
        let s = summarise_planar(&[[1.0f32, -1.0]], 4);
        assert_eq!(s.len(), 4);
        assert_eq!(s[0], Column { min: 1.0, max: 1.0 });
        assert_eq!(s[1], Column { min: 1.0, max: 1.0 });
        assert_eq!(
            s[3],
            Column {
                min: -1.0,
                max: -1.0
            }
        );
    }

    #[test]
    fn uneven_split_covers_every_frame_once() {
        // 10 frames in 3 columns: 0..3, 3..6, 6..10; one spike per frame index.
        for spike in 0..10 {
            let mut x = vec![0.0f32; 10];
            x[spike] = 1.0;
            let s = summarise_planar(&[&x], 3);
            let hits: Vec<usize> = (0..3).filter(|i| s[*i].max == 1.0).collect();
            let want = [0, 0, 0, 1, 1, 1, 2, 2, 2, 2][spike];
            assert_eq!(hits, vec![want], "spike at {spike}");
        }
    }

    #[test]
    fn nothing_to_summarise_is_empty_and_nan_is_silence() {
        assert!(summarise_planar::<&[f32]>(&[], 10).is_empty());
        assert!(summarise_planar(&[[0.5f32; 4]], 0).is_empty());
        assert!(summarise_planar(&[Vec::<f32>::new()], 4).is_empty());
        let s = summarise_planar(&[[f32::NAN, f32::INFINITY]], 1);
        assert_eq!(s, vec![Column { min: 0.0, max: 0.0 }]);
    }

    fn take(frames: usize) -> Arc<Take> {
        let x: Vec<f32> = (0..frames).map(|i| (i as f32 * 0.3).sin()).collect();
        Take::complete(TakeId::fresh(), 48_000.0, None, &[x]).unwrap()
    }

    #[test]
    fn cache_computes_once_per_take_and_width() {
        let mut cache = SummaryCache::default();
        let a = take(1000);
        let b = take(500);
        let first = cache.take(&a, 100).to_vec();
        assert_eq!(first.len(), 100);
        assert_eq!(cache.take(&a, 100), &first[..]);
        assert_eq!(cache.computed, 1, "a steady take is summarised once");
        cache.take(&a, 50);
        cache.take(&b, 100);
        assert_eq!(cache.computed, 3);
        assert_eq!(cache.len(), 3);
        cache.retain(&[b.id()]);
        assert_eq!(cache.len(), 1);
        cache.take(&b, 100);
        assert_eq!(cache.computed, 3);
    }

    #[test]
    fn growing_takes_fill_in_from_the_left() {
        let (growing, mut writer) = Take::growing(TakeId::fresh(), 48_000.0, None, 1, 100).unwrap();
        let mut cache = SummaryCache::default();
        writer.append(&[vec![0.5f32; 50]]).unwrap();
        let s = cache.take(&growing, 10).to_vec();
        assert_eq!(s.len(), 10, "drawn at its final length");
        assert!(s[..5].iter().all(|c| c.max == 0.5));
        assert!(s[5..].iter().all(|c| c.max == 0.0));
        writer.append(&[vec![0.5f32; 50]]).unwrap();
        writer.finish();
        // Completion is picked up at once (no refresh delay).
        let s = cache.take(&growing, 10);
        assert!(s.iter().all(|c| c.max == 0.5));
        assert_eq!(cache.computed, 2);
    }
}
