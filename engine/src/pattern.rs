//! The codebook delay pattern of MusicGen, as pure functions over `(codebooks, positions)` grids.
//!
//! MusicGen predicts all codebooks of one position at once, but codebook `k` runs `k` steps behind
//! codebook 0 (for stereo checkpoints the codebooks are interleaved left/right and the *pair* `k`
//! runs `k` steps behind). A "delayed" sequence of length `L` therefore holds frame `f` of
//! codebook `k` at position `1 + f + delay(k)`; position 0 is the start (bos) token and every
//! position that holds no frame is filled with the pad token.
//!
//! Mirrors `MusicgenForCausalLM.build_delay_pattern_mask` / `apply_delay_pattern_mask` and the
//! pad-filtering undo at the end of `MusicgenForConditionalGeneration.generate` in
//! `transformers/models/musicgen/modeling_musicgen.py`.

/// Marks a position of the pattern mask that the model must predict (the reference uses `-1`).
pub const FREE: i64 = -1;

/// Errors of the pattern functions: shapes that do not fit together.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PatternError {
    #[error("delay pattern: expected {expected} codebooks, got {got}")]
    Codebooks { expected: usize, got: usize },
    #[error("delay pattern: codebook rows have different lengths ({first} vs {other})")]
    Ragged { first: usize, other: usize },
    #[error("delay pattern: sequence of {have} positions is shorter than the {need} needed")]
    TooShort { need: usize, have: usize },
    #[error("delay pattern: audio_channels must be 1 or 2 with an even codebook count (got {channels} channels, {codebooks} codebooks)")]
    Channels { channels: usize, codebooks: usize },
}

/// The delay (in positions) of each codebook: `k` for mono, `k / 2` for stereo checkpoints whose
/// codebooks are interleaved left/right (even = left, odd = right).
pub fn codebook_delays(
    num_codebooks: usize,
    audio_channels: usize,
) -> Result<Vec<usize>, PatternError> {
    match audio_channels {
        1 => Ok((0..num_codebooks).collect()),
        2 if num_codebooks.is_multiple_of(2) => Ok((0..num_codebooks).map(|k| k / 2).collect()),
        _ => Err(PatternError::Channels {
            channels: audio_channels,
            codebooks: num_codebooks,
        }),
    }
}

/// Number of delayed positions (bos included) that hold `frames` frames of every codebook.
pub fn delayed_len(frames: usize, delays: &[usize]) -> usize {
    1 + frames + delays.iter().copied().max().unwrap_or(0)
}

fn check_rows<T>(rows: &[Vec<T>], codebooks: usize) -> Result<usize, PatternError> {
    if rows.len() != codebooks {
        return Err(PatternError::Codebooks {
            expected: codebooks,
            got: rows.len(),
        });
    }
    let len = rows.first().map_or(0, Vec::len);
    if let Some(r) = rows.iter().find(|r| r.len() != len) {
        return Err(PatternError::Ragged {
            first: len,
            other: r.len(),
        });
    }
    Ok(len)
}

/// The pattern mask of the reference's `build_delay_pattern_mask`, plus the prefix the model is
/// fed first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DelayPattern {
    /// `(codebooks, max_length)`: the forced token at each position, or [`FREE`] where the model
    /// predicts.
    pub mask: Vec<Vec<i64>>,
    /// `(codebooks, start)`: the positions before the first free one, all forced; the input of
    /// the first decoder step.
    pub prefix: Vec<Vec<u32>>,
}

impl DelayPattern {
    /// The first position the model predicts (the length of [`DelayPattern::prefix`]).
    pub fn start(&self) -> usize {
        self.prefix.first().map_or(0, Vec::len)
    }
}

/// Builds the delay pattern for `input_ids` (`(codebooks, seq_len)`, starting with the bos token
/// and followed by the prompt frames, undelayed) over `max_length` positions, exactly like the
/// reference: prompt entries are shifted right by their codebook's delay, the lower triangle
/// (positions `0..=delay`) and the upper triangle (the last `max_delay - delay` positions) are
/// filled with `pad`, and every other position is [`FREE`] unless the shifted prompt covers it.
///
/// As in the reference, when `max_length < 2 * channel_codebooks - 1` no pattern is applied: the
/// input is returned as the prefix and the mask is all free.
pub fn build_delay_pattern_mask(
    input_ids: &[Vec<u32>],
    delays: &[usize],
    max_length: usize,
    pad: u32,
) -> Result<DelayPattern, PatternError> {
    let seq_len = check_rows(input_ids, delays.len())?;
    let channel_codebooks = delays.iter().copied().max().map_or(0, |d| d + 1);
    if max_length < (2 * channel_codebooks).saturating_sub(1) {
        return Ok(DelayPattern {
            mask: vec![vec![FREE; max_length]; delays.len()],
            prefix: input_ids.to_vec(),
        });
    }
    let mut mask = vec![vec![FREE; max_length]; delays.len()];
    for (k, (row, &d)) in mask.iter_mut().zip(delays).enumerate() {
        // Shifted prompt (the reference writes `input_ids[k]` into `[d, seq_len + d)`).
        for (t, &id) in input_ids[k].iter().enumerate() {
            if let Some(slot) = row.get_mut(t + d) {
                *slot = i64::from(id);
            }
        }
        // Lower triangle (bos padding): positions 0..=d. Upper triangle (eos padding): positions
        // >= max_length - channel_codebooks + 1 + d.
        let eos_from = (max_length + 1 + d).saturating_sub(channel_codebooks);
        for (t, slot) in row.iter_mut().enumerate() {
            if t <= d || t >= eos_from {
                *slot = i64::from(pad);
            }
        }
    }
    // The first free position of codebook 0 (the reference: `seq_len` when there is none).
    let start = mask[0].iter().position(|&v| v == FREE).unwrap_or(seq_len);
    let prefix = mask
        .iter()
        .map(|row| {
            row[..start.min(max_length)]
                .iter()
                .map(|&v| v as u32)
                .collect()
        })
        .collect();
    Ok(DelayPattern { mask, prefix })
}

/// The reference's `apply_delay_pattern_mask`: keeps `ids[k][t]` where the mask is free and
/// replaces it with the mask's token elsewhere. `ids` may be shorter than the mask.
pub fn apply_delay_pattern_mask(ids: &mut [Vec<u32>], mask: &[Vec<i64>]) {
    for (row, mrow) in ids.iter_mut().zip(mask) {
        for (id, &m) in row.iter_mut().zip(mrow) {
            if m != FREE {
                *id = m as u32;
            }
        }
    }
}

/// The token the delay pattern forces at column `t` of a codebook with delay `delay`, or `None`
/// where the model predicts. The sequence holds `bos` at columns `0..=delay`, the row's
/// `prompt` frames next, `new_frames` predicted frames after them, and `pad` from there on:
/// frame `f` sits at column `1 + delay + f`. For every length where the reference applies a
/// pattern this equals [`build_delay_pattern_mask`] over `1 + prompt.len() + new_frames +
/// max_delay` columns (tested); unlike the reference it also holds for very short sequences,
/// where the reference silently applies no delay at all.
pub fn forced_token(
    t: usize,
    delay: usize,
    prompt: &[u32],
    new_frames: usize,
    bos: u32,
    pad: u32,
) -> Option<u32> {
    if t <= delay {
        return Some(bos);
    }
    let f = t - 1 - delay;
    if f < prompt.len() {
        Some(prompt[f])
    } else if f < prompt.len() + new_frames {
        None
    } else {
        Some(pad)
    }
}

/// Columns of a delayed sequence holding `prompt_frames + new_frames` frames, the start column
/// included: `1 + frames + max_delay`.
pub fn sequence_len(prompt_frames: usize, new_frames: usize, delays: &[usize]) -> usize {
    delayed_len(prompt_frames + new_frames, delays)
}

/// Applies the delay to undelayed `frames` (`(codebooks, n)`): returns the `(codebooks,
/// delayed_len(n))` sequence with `bos` at position 0, frame `f` of codebook `k` at
/// `1 + f + delays[k]` and `pad` everywhere else. Equals the reference's pattern with the whole
/// sequence given as the prompt.
pub fn apply_delay(
    frames: &[Vec<u32>],
    delays: &[usize],
    bos: u32,
    pad: u32,
) -> Result<Vec<Vec<u32>>, PatternError> {
    let n = check_rows(frames, delays.len())?;
    let len = delayed_len(n, delays);
    Ok(frames
        .iter()
        .zip(delays)
        .map(|(row, &d)| {
            let mut out = vec![pad; len];
            if d == 0 {
                out[0] = bos;
            }
            out[1 + d..1 + d + n].copy_from_slice(row);
            out
        })
        .collect())
}

/// Undoes the delay: reads `frames` frames of every codebook out of a delayed sequence
/// (`(codebooks, >= delayed_len(frames))`), i.e. frame `f` of codebook `k` from position
/// `1 + f + delays[k]`. Positional, so a code equal to the pad id cannot confuse it.
pub fn undo_delay(
    delayed: &[Vec<u32>],
    delays: &[usize],
    frames: usize,
) -> Result<Vec<Vec<u32>>, PatternError> {
    let len = check_rows(delayed, delays.len())?;
    let need = delayed_len(frames, delays);
    if len < need {
        return Err(PatternError::TooShort { need, have: len });
    }
    Ok(delayed
        .iter()
        .zip(delays)
        .map(|(row, &d)| row[1 + d..1 + d + frames].to_vec())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u32 = 2048;

    #[test]
    fn delays_mono_and_stereo() {
        assert_eq!(codebook_delays(4, 1).unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(codebook_delays(8, 2).unwrap(), vec![0, 0, 1, 1, 2, 2, 3, 3]);
        assert!(codebook_delays(3, 2).is_err());
        assert!(codebook_delays(4, 3).is_err());
    }

    /// The docstring example of the reference: 4 codebooks, max length 8, no prompt.
    #[test]
    fn mask_without_prompt_matches_reference_docstring() {
        let delays = codebook_delays(4, 1).unwrap();
        let input = vec![vec![P]; 4];
        let p = build_delay_pattern_mask(&input, &delays, 8, P).unwrap();
        let p_ = i64::from(P);
        let f = FREE;
        assert_eq!(
            p.mask,
            vec![
                vec![p_, f, f, f, f, p_, p_, p_],
                vec![p_, p_, f, f, f, f, p_, p_],
                vec![p_, p_, p_, f, f, f, f, p_],
                vec![p_, p_, p_, p_, f, f, f, f],
            ]
        );
        assert_eq!(p.start(), 1);
        assert_eq!(p.prefix, vec![vec![P]; 4]);
    }

    /// The docstring's prompted example: prompt a..h offset by one (bos first).
    #[test]
    fn mask_with_prompt_matches_reference_docstring() {
        let delays = codebook_delays(4, 1).unwrap();
        let input = vec![vec![P, 1, 2], vec![P, 3, 4], vec![P, 5, 6], vec![P, 7, 8]];
        let p = build_delay_pattern_mask(&input, &delays, 8, P).unwrap();
        let p_ = i64::from(P);
        let f = FREE;
        assert_eq!(
            p.mask,
            vec![
                vec![p_, 1, 2, f, f, p_, p_, p_],
                vec![p_, p_, 3, 4, f, f, p_, p_],
                vec![p_, p_, p_, 5, 6, f, f, p_],
                vec![p_, p_, p_, p_, 7, 8, f, f],
            ]
        );
        assert_eq!(p.start(), 3);
        assert_eq!(
            p.prefix,
            vec![vec![P, 1, 2], vec![P, P, 3], vec![P, P, P], vec![P, P, P]]
        );
    }

    #[test]
    fn stereo_mask_duplicates_rows_pairwise() {
        let delays = codebook_delays(4, 2).unwrap();
        let input = vec![vec![P, 1], vec![P, 2], vec![P, 3], vec![P, 4]];
        let p = build_delay_pattern_mask(&input, &delays, 5, P).unwrap();
        let p_ = i64::from(P);
        assert_eq!(p.mask[0], vec![p_, 1, FREE, FREE, p_]);
        assert_eq!(p.mask[1], vec![p_, 2, FREE, FREE, p_]);
        assert_eq!(p.mask[2], vec![p_, p_, 3, FREE, FREE]);
        assert_eq!(p.mask[3], vec![p_, p_, 4, FREE, FREE]);
        assert_eq!(p.start(), 2);
    }

    #[test]
    fn short_max_length_returns_input_unchanged() {
        let delays = codebook_delays(4, 1).unwrap();
        let input = vec![vec![P, 9]; 4];
        let p = build_delay_pattern_mask(&input, &delays, 6, P).unwrap();
        assert_eq!(p.prefix, input);
        assert!(p.mask.iter().flatten().all(|&v| v == FREE));
    }

    #[test]
    fn apply_mask_forces_only_non_free_positions() {
        let mask = vec![vec![7, FREE, 9], vec![FREE, FREE, 1]];
        let mut ids = vec![vec![0, 0, 0], vec![5, 6, 0]];
        apply_delay_pattern_mask(&mut ids, &mask);
        assert_eq!(ids, vec![vec![7, 0, 9], vec![5, 6, 1]]);
    }

    #[test]
    fn apply_delay_layout() {
        let delays = codebook_delays(3, 1).unwrap();
        let frames = vec![vec![10, 11], vec![20, 21], vec![30, 31]];
        let d = apply_delay(&frames, &delays, 99, P).unwrap();
        assert_eq!(
            d,
            vec![
                vec![99, 10, 11, P, P],
                vec![P, P, 20, 21, P],
                vec![P, P, P, 30, 31]
            ]
        );
    }

    /// `apply_delay` equals the reference's mask when the whole sequence is the prompt (bos = pad
    /// as in every MusicGen checkpoint), and the reference's pad-filter undo gives the frames back.
    #[test]
    fn apply_delay_equals_reference_mask_and_filter_undo() {
        for (k, ch) in [(4, 1), (8, 2), (1, 1)] {
            let delays = codebook_delays(k, ch).unwrap();
            for n in [0usize, 1, 3, 17] {
                let frames: Vec<Vec<u32>> = (0..k)
                    .map(|c| (0..n).map(|f| (c * 100 + f) as u32).collect())
                    .collect();
                let input: Vec<Vec<u32>> = frames
                    .iter()
                    .map(|r| std::iter::once(P).chain(r.iter().copied()).collect())
                    .collect();
                let len = delayed_len(n, &delays);
                let p = build_delay_pattern_mask(&input, &delays, len, P).unwrap();
                let d = apply_delay(&frames, &delays, P, P).unwrap();
                if len >= 2 * (delays.iter().max().unwrap() + 1) - 1 {
                    let m: Vec<Vec<u32>> = p
                        .mask
                        .iter()
                        .map(|r| r.iter().map(|&v| v as u32).collect())
                        .collect();
                    assert_eq!(m, d, "k={k} n={n}");
                }
                let filtered: Vec<Vec<u32>> = d
                    .iter()
                    .map(|r| r.iter().copied().filter(|&v| v != P).collect())
                    .collect();
                assert_eq!(filtered, frames);
            }
        }
    }

    #[test]
    fn round_trip_any_length() {
        for (k, ch) in [(4, 1), (8, 2)] {
            let delays = codebook_delays(k, ch).unwrap();
            for n in [0usize, 1, 2, 5, 50] {
                let frames: Vec<Vec<u32>> = (0..k)
                    .map(|c| {
                        (0..n)
                            .map(|f| ((c * 7919 + f * 31) % 2048) as u32)
                            .collect()
                    })
                    .collect();
                let d = apply_delay(&frames, &delays, P, P).unwrap();
                assert_eq!(d[0].len(), delayed_len(n, &delays));
                assert_eq!(undo_delay(&d, &delays, n).unwrap(), frames);
            }
        }
    }

    #[test]
    fn undo_is_positional_even_for_pad_valued_codes() {
        let delays = codebook_delays(2, 1).unwrap();
        let frames = vec![vec![P, 1], vec![2, P]];
        let d = apply_delay(&frames, &delays, P, P).unwrap();
        assert_eq!(undo_delay(&d, &delays, 2).unwrap(), frames);
    }

    /// `forced_token` agrees with the reference's mask (with the reference's `input_ids`: bos then
    /// the prompt) wherever the reference applies a pattern, with and without a prompt, mono
    /// and stereo.
    #[test]
    fn forced_token_equals_reference_mask() {
        for (k, ch) in [(4usize, 1usize), (8, 2), (2, 1)] {
            let delays = codebook_delays(k, ch).unwrap();
            for p in [0usize, 1, 5] {
                for f in [1usize, 3, 7] {
                    let prompt: Vec<Vec<u32>> = (0..k)
                        .map(|c| (0..p).map(|i| (c * 10 + i) as u32).collect())
                        .collect();
                    let input: Vec<Vec<u32>> = prompt
                        .iter()
                        .map(|r| std::iter::once(P).chain(r.iter().copied()).collect())
                        .collect();
                    let len = sequence_len(p, f, &delays);
                    let cc = delays.iter().max().unwrap() + 1;
                    if len < 2 * cc - 1 {
                        continue;
                    }
                    let reference = build_delay_pattern_mask(&input, &delays, len, P).unwrap();
                    for (row, (&d, mrow)) in delays.iter().zip(&reference.mask).enumerate() {
                        for (t, &m) in mrow.iter().enumerate() {
                            let ours =
                                forced_token(t, d, &prompt[row], f, P, P).map_or(FREE, i64::from);
                            assert_eq!(ours, m, "k={k} p={p} f={f} row={row} t={t}");
                        }
                    }
                    // The first free column of codebook 0 is right after the prompt.
                    assert_eq!(reference.start(), p + 1);
                }
            }
        }
    }

    #[test]
    fn forced_token_short_sequences_still_delay() {
        // One new frame, no prompt, 4 codebooks: codebook 3 predicts at column 4 only.
        let col: Vec<Option<u32>> = (0..5).map(|t| forced_token(t, 3, &[], 1, P, 7)).collect();
        assert_eq!(col, vec![Some(P), Some(P), Some(P), Some(P), None]);
        let col: Vec<Option<u32>> = (0..5).map(|t| forced_token(t, 0, &[], 1, P, 7)).collect();
        assert_eq!(col, vec![Some(P), None, Some(7), Some(7), Some(7)]);
    }

    #[test]
    fn shape_errors() {
        let delays = codebook_delays(2, 1).unwrap();
        assert_eq!(
            apply_delay(&[vec![1]], &delays, P, P),
            Err(PatternError::Codebooks {
                expected: 2,
                got: 1
            })
        );
        assert_eq!(
            apply_delay(&[vec![1], vec![1, 2]], &delays, P, P),
            Err(PatternError::Ragged { first: 1, other: 2 })
        );
        assert_eq!(
            undo_delay(&[vec![1, 2], vec![3, 4]], &delays, 2),
            Err(PatternError::TooShort { need: 4, have: 2 })
        );
    }
}
