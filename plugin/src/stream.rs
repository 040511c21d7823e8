//! Playing a take while it is generated: when a growing take may start (or resume) so that it
//! plays through to its end without a gap.
//!
//! The engine streams a take in chunks (a short first one, then a few seconds each); the
//! controller thread resamples each chunk to the host rate and appends it to the growing
//! [`crate::takes::Take`], and after every decoder step it publishes the take's [`Pace`]: how much
//! of the take the engine has generated, how fast it generates (measured), how large the chunks
//! still to come are and how long a chunk takes from its last generated frame to playable. The
//! player (audio thread) asks [`plays_through`] at every bar line while a growing take waits to
//! start or to resume; the function is pure arithmetic (no allocation, no lock), so it runs there.
//!
//! The judgment: from the bar line on, the play position moves one frame per frame of audio
//! (host time is wall-clock time when the host plays in real time), while playable audio grows a
//! chunk at a time. Playback must never come within the margin of the end of what is playable
//! before the next chunk arrives. On a machine faster than real time, that is the first bar line
//! after the first chunk (plus the margin); on a slower one the start is delayed until the part
//! still missing can be generated before playback reaches it, like a video buffering. The
//! estimate uses the measured speed; if generation falls behind anyway, the player fades out,
//! waits silently while the position moves on, and resumes at the first bar line from which it
//! can again play through.
//!
//! How the playback modes use it:
//! - Next bar: the take launches from its first frame at the first bar line (after it arrives)
//!   from which it plays through. Nothing is skipped: it waits as long as needed.
//! - Timeline: the take stays anchored at the bar line where its prompt ended. That bar is in
//!   the past when the first chunk arrives (generation started there), so live, the take joins
//!   mid-take: at the first bar line where the position the timeline dictates (the time since the
//!   anchor) is covered and stays covered — it fades in there. Generation faster than real time
//!   catches up with the timeline after some bars (the slower, the later); generation slower than
//!   real time never does, so it is heard on the next pass (a loop or a replay), complete or far
//!   enough ahead by then. Seeks and loops place it as any take, with the same judgment.
//! - MIDI: a note starts the take from its first frame at once when it can play through from
//!   there (a musician's note is not delayed to a bar line); otherwise the voice waits silently,
//!   its position moving on with time as a held note's would, and comes in (faded) as soon as it
//!   can play through from where it is.
//! - Extending a take replaces it by a longer growing take with the same id: a voice playing the
//!   old version moves over to the new one where it is, unheard, and plays on past the old end
//!   (see `crate::playback`).
//!
//! Offline rendering does not stream: the plugin waits in `process()` until the generation ends
//! (see `lib.rs`), so a bounce contains the whole take.

/// How the audio of a growing take arrives, in frames of the take (at the host rate) and seconds
/// of wall-clock time. Written by the controller thread after every decoder step, read by the
/// player.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pace {
    /// Frames of the take the engine has generated (decoded or not); at least the frames that
    /// are playable.
    pub generated: f64,
    /// Frames the take has when complete.
    pub final_frames: f64,
    /// Frames generated per second of wall-clock time (measured).
    pub frames_per_s: f64,
    /// Frames generated past a chunk's last frame before the chunk can be decoded (the codec's
    /// right context, the delay pattern) and resampled (the resampler's latency).
    pub lookahead: f64,
    /// Frames of every chunk still to come (the last one may be shorter).
    pub chunk: f64,
    /// Seconds from a chunk's last needed frame being generated to its audio being playable
    /// (decoding and hand-off), measured.
    pub delay_s: f64,
}

impl Pace {
    /// Whether every field is a usable number (a positive speed, a positive chunk).
    pub fn is_valid(&self) -> bool {
        [
            self.generated,
            self.final_frames,
            self.frames_per_s,
            self.lookahead,
            self.chunk,
            self.delay_s,
        ]
        .iter()
        .all(|x| x.is_finite())
            && self.frames_per_s > 0.0
            && self.chunk >= 1.0
    }
}

/// Whether a take played from frame `start` from now on plays through to its end without ever
/// coming within `margin` frames of the end of its playable audio, given `valid` playable frames
/// now, whether the take is `complete`, and (for a growing take) its [`Pace`] at `sample_rate`
/// frames of playback per second.
///
/// A complete take plays through from any frame it has. A growing take needs `margin` frames
/// ahead of `start` now; without a pace (not measured yet) that is all that is asked. With a
/// pace, each chunk still to come is predicted to arrive when the engine has generated its last
/// frame plus the lookahead, plus the decode delay; just before it arrives, playback must still
/// be `margin` frames short of the playable end. Realtime-safe: a few arithmetic operations.
pub fn plays_through(
    start: usize,
    valid: usize,
    complete: bool,
    pace: Option<&Pace>,
    sample_rate: f64,
    margin: usize,
) -> bool {
    if complete {
        return start < valid;
    }
    if start.saturating_add(margin) > valid {
        return false;
    }
    let Some(p) = pace else {
        return true;
    };
    if !(p.is_valid() && sample_rate.is_finite() && sample_rate > 0.0) {
        return false;
    }
    let (start, valid, margin) = (start as f64, valid as f64, margin as f64);
    let final_frames = p.final_frames.max(valid);
    if final_frames <= valid {
        // Everything is playable; only the completion flag is missing.
        return true;
    }
    let chunks = ((final_frames - valid) / p.chunk).ceil().max(1.0);
    // Chunk `k` (1-based) ends at `valid + k * chunk` (the last one at the final frame) and
    // arrives when the engine has generated that far plus the lookahead, plus the delay.
    // Before it arrives, `valid + (k - 1) * chunk` frames are playable.
    let ok = |k: f64| -> bool {
        let end = (valid + k * p.chunk).min(final_frames);
        let arrives_s = (end + p.lookahead - p.generated).max(0.0) / p.frames_per_s + p.delay_s;
        let playing = start + arrives_s * sample_rate;
        playing + margin <= valid + (k - 1.0) * p.chunk
    };
    // Over the regular chunks, the slack (playable minus play position) is linear in `k` minus a
    // convex function (the arrival time, clamped at zero): a concave function, smallest at an
    // end of the range. The last chunk (possibly shorter, arriving earlier) is checked on its
    // own. So three checks cover every chunk, however long the take.
    ok(1.0) && ok((chunks - 1.0).max(1.0)) && ok(chunks)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SR: f64 = 48_000.0;
    /// Host frames per 50 Hz model frame at 48 kHz.
    const HOP: f64 = SR / 50.0;

    /// A simulated engine: generates `total` model frames at `speed` times real time after
    /// `start_s` of preparation, streams a first chunk of 25 frames and then chunks of 200, each
    /// playable `lookahead` frames and `decode_s` seconds after its last frame is generated.
    #[derive(Clone, Copy)]
    struct Engine {
        total: f64,
        speed: f64,
        start_s: f64,
        lookahead: f64,
        decode_s: f64,
    }

    impl Engine {
        /// Model frames generated at wall time `t`.
        fn generated(&self, t: f64) -> f64 {
            ((t - self.start_s).max(0.0) * 50.0 * self.speed).min(self.total + self.lookahead)
        }

        /// Chunk ends in model frames.
        fn chunk_ends(&self) -> Vec<f64> {
            let mut ends = vec![25.0f64.min(self.total)];
            while *ends.last().unwrap() < self.total {
                ends.push((ends.last().unwrap() + 200.0).min(self.total));
            }
            ends
        }

        /// Playable host frames at wall time `t`.
        fn valid(&self, t: f64) -> f64 {
            let mut valid = 0.0;
            for end in self.chunk_ends() {
                let la = if end >= self.total {
                    0.0
                } else {
                    self.lookahead
                };
                let at = self.start_s + (end + la) / (50.0 * self.speed) + self.decode_s;
                if at <= t {
                    valid = end * HOP;
                }
            }
            valid
        }

        /// The pace the controller would publish at `t` (after the first chunk).
        fn pace(&self, t: f64) -> Pace {
            Pace {
                generated: self.generated(t).min(self.total) * HOP,
                final_frames: self.total * HOP,
                // Measured over the whole run, preparation included: a little pessimistic.
                frames_per_s: self.generated(t) * HOP / t,
                lookahead: self.lookahead * HOP,
                chunk: 200.0 * HOP,
                delay_s: self.decode_s * 1.5,
            }
        }

        fn complete(&self, t: f64) -> bool {
            self.valid(t) >= self.total * HOP
        }
    }

    /// Whether playing from wall time `t0` at take frame `f0` ever runs into the end of the
    /// playable audio before the take ends (checked every millisecond).
    fn underruns(e: &Engine, t0: f64, f0: f64) -> bool {
        let end = e.total * HOP;
        let mut t = t0;
        loop {
            let pos = f0 + (t - t0) * SR;
            if pos >= end {
                return false;
            }
            if pos >= e.valid(t) {
                return true;
            }
            t += 0.001;
        }
    }

    /// The first bar line (wall time, bars of `bar_s` from t = 0) at which the player's
    /// judgment lets the take start, for a take whose frame 0 sits at wall time `anchor_s`
    /// (timeline) or `None` (next bar: from frame 0).
    fn judged_start(e: &Engine, bar_s: f64, anchor_s: Option<f64>, margin: usize) -> Option<f64> {
        (1..10_000).map(|b| b as f64 * bar_s).find(|&t| {
            let valid = e.valid(t);
            if valid == 0.0 {
                return false;
            }
            let start = anchor_s.map_or(0.0, |a| (t - a) * SR);
            if start < 0.0 {
                return false;
            }
            let pace = e.pace(t);
            plays_through(
                start as usize,
                valid as usize,
                e.complete(t),
                Some(&pace),
                SR,
                margin,
            )
        })
    }

    const MARGIN: usize = 24_000;

    fn engine(speed: f64, bars: f64, bar_s: f64) -> Engine {
        Engine {
            total: (bars * bar_s * 50.0).round(),
            speed,
            start_s: 0.3,
            lookahead: 12.0,
            decode_s: 0.05,
        }
    }

    #[test]
    fn faster_than_real_time_starts_at_the_next_bar_line_after_the_first_chunk() {
        let bar_s = 2.0; // 4/4 at 120 BPM
        for speed in [5.0, 30.0] {
            let e = engine(speed, 8.0, bar_s);
            let start = judged_start(&e, bar_s, None, MARGIN).unwrap();
            // The first two chunks (4.5 s of audio; the first alone, 0.5 s, is no more than the
            // margin) are there before the first bar line at 2 s.
            assert_eq!(start, bar_s, "speed {speed}");
            assert!(!underruns(&e, start, 0.0), "speed {speed}");
        }
    }

    #[test]
    fn slower_than_real_time_waits_just_enough() {
        let bar_s = 2.0;
        for speed in [0.25, 0.5, 0.8, 1.1, 2.0] {
            let e = engine(speed, 8.0, bar_s);
            let start = judged_start(&e, bar_s, None, MARGIN).unwrap();
            assert!(
                !underruns(&e, start, 0.0),
                "speed {speed}: underrun from {start}"
            );
            // Not much later than needed: the earliest bar line without an underrun (no
            // margin, exact knowledge), plus at most two bars for the margin and the estimate.
            let ideal = (1..1_000)
                .map(|b| b as f64 * bar_s)
                .find(|&t| e.valid(t) > 0.0 && !underruns(&e, t, 0.0))
                .unwrap();
            assert!(start >= ideal, "speed {speed}: {start} before {ideal}");
            assert!(
                start <= ideal + 2.0 * bar_s,
                "speed {speed}: waits until {start}, {ideal} would do"
            );
            if speed < 1.0 {
                assert!(start > 4.0 * bar_s, "speed {speed}: starts at {start}");
            }
        }
    }

    #[test]
    fn timeline_joins_where_generation_has_caught_up() {
        // The anchor (frame 0) is the press at wall time 0; the take is 16 bars.
        let bar_s = 2.0;
        for speed in [1.5, 3.0, 10.0] {
            let e = engine(speed, 16.0, bar_s);
            let start = judged_start(&e, bar_s, Some(0.0), MARGIN).unwrap();
            let frame = start * SR;
            assert!(!underruns(&e, start, frame), "speed {speed}");
            // Faster generation catches up sooner.
            if speed >= 10.0 {
                assert_eq!(start, bar_s, "speed {speed}");
            }
        }
        let slow = judged_start(&engine(1.5, 16.0, bar_s), bar_s, Some(0.0), MARGIN).unwrap();
        let fast = judged_start(&engine(3.0, 16.0, bar_s), bar_s, Some(0.0), MARGIN).unwrap();
        assert!(slow > fast, "{slow} vs {fast}");
        // Slower than real time never catches up with the timeline within the take.
        let e = engine(0.7, 16.0, bar_s);
        let end_s = 16.0 * bar_s;
        assert!(judged_start(&e, bar_s, Some(0.0), MARGIN).is_none_or(|t| t >= end_s));
    }

    #[test]
    fn edge_cases() {
        let pace = Pace {
            generated: 48_000.0,
            final_frames: 480_000.0,
            frames_per_s: 96_000.0,
            lookahead: 1_000.0,
            chunk: 9_600.0,
            delay_s: 0.05,
        };
        // Complete: any frame it has.
        assert!(plays_through(0, 10, true, None, SR, MARGIN));
        assert!(!plays_through(10, 10, true, None, SR, MARGIN));
        // Growing without a pace: the margin alone.
        assert!(plays_through(0, MARGIN, false, None, SR, MARGIN));
        assert!(!plays_through(1, MARGIN, false, None, SR, MARGIN));
        // A pace that cannot be used: wait.
        for bad in [
            Pace {
                frames_per_s: 0.0,
                ..pace
            },
            Pace {
                frames_per_s: f64::NAN,
                ..pace
            },
            Pace { chunk: 0.0, ..pace },
            Pace {
                generated: f64::INFINITY,
                ..pace
            },
        ] {
            assert!(!plays_through(0, 40_000, false, Some(&bad), SR, 100));
        }
        assert!(!plays_through(0, 40_000, false, Some(&pace), f64::NAN, 100));
        // Twice real time with 0.8 s ready: fine from frame 0 (the next chunk arrives in 0.08 s)
        // and from frame 30000, not from frame 37000.
        assert!(plays_through(0, 40_000, false, Some(&pace), SR, 100));
        assert!(plays_through(30_000, 40_000, false, Some(&pace), SR, 100));
        assert!(!plays_through(37_000, 40_000, false, Some(&pace), SR, 100));
        // All generated and playable, not yet marked complete.
        let done = Pace {
            generated: 480_000.0,
            ..pace
        };
        assert!(plays_through(400_000, 480_000, false, Some(&done), SR, 100));
        // Half real time: 0.8 s ahead is far from enough for a 10 s take.
        let slow = Pace {
            frames_per_s: 24_000.0,
            ..pace
        };
        assert!(!plays_through(0, 40_000, false, Some(&slow), SR, 100));
    }
}
