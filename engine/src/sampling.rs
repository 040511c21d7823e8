//! Token selection: classifier-free guidance mix, temperature, top-k, top-p, greedy, and a seeded
//! random source per take.
//!
//! Mirrors the reference's logits processors in the order `MusicgenForConditionalGeneration.generate`
//! chains them (`transformers/generation/logits_process.py`): `ClassifierFreeGuidanceLogitsProcessor`,
//! then `TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`, softmax and a
//! multinomial draw (or argmax when greedy, where the warpers do not apply).

/// How tokens are chosen from the decoder's logits.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    /// Take the most likely token (argmax of the guided logits); temperature, top-k and top-p
    /// are then ignored.
    pub greedy: bool,
    /// Logits are divided by this before top-k / top-p; must be > 0 unless `greedy`.
    pub temperature: f64,
    /// Keep the `top_k` most likely tokens (ties with the k-th kept); at least 1. A value at
    /// or above the vocabulary size keeps everything.
    pub top_k: usize,
    /// Nucleus sampling: keep the most likely tokens whose probability adds up to `top_p`;
    /// in (0, 1], 1 = off.
    pub top_p: f64,
    /// Classifier-free guidance: `uncond + scale * (cond - uncond)`; at least 1, where 1 turns
    /// guidance off (no null condition is run, as in the reference for scale <= 1).
    pub guidance_scale: f64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            greedy: false,
            temperature: 1.0,
            top_k: 250,
            top_p: 1.0,
            guidance_scale: 3.0,
        }
    }
}

/// Invalid sampling values, each naming the value and the accepted range.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SamplingError {
    #[error("temperature must be a finite number > 0 (got {0}); use greedy decoding for deterministic output")]
    Temperature(f64),
    #[error("top-k must be at least 1 (got 0)")]
    TopK,
    #[error("top-p must be in (0, 1] (got {0})")]
    TopP(f64),
    #[error("guidance scale must be a finite number >= 1 (got {0}); 1 turns guidance off")]
    Guidance(f64),
}

impl SamplingParams {
    /// Greedy decoding with the given guidance scale.
    pub fn greedy(guidance_scale: f64) -> Self {
        Self {
            greedy: true,
            guidance_scale,
            ..Self::default()
        }
    }

    /// Checks every value; temperature, top-k and top-p are checked only when sampling.
    ///
    /// Guidance below 1 is rejected rather than silently treated as 1 (the reference skips
    /// guidance for any scale <= 1, so a scale of 0.5 would quietly mean "no guidance").
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !(self.guidance_scale.is_finite() && self.guidance_scale >= 1.0) {
            return Err(SamplingError::Guidance(self.guidance_scale));
        }
        if self.greedy {
            return Ok(());
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(SamplingError::Temperature(self.temperature));
        }
        if self.top_k == 0 {
            return Err(SamplingError::TopK);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP(self.top_p));
        }
        Ok(())
    }

    /// Whether the null condition runs beside the real one (batch doubled).
    pub fn uses_guidance(&self) -> bool {
        self.guidance_scale > 1.0
    }
}

/// The reference's `ClassifierFreeGuidanceLogitsProcessor`: `uncond + scale * (cond - uncond)`,
/// written into `cond` (same length as `uncond`).
pub fn guidance_mix(cond: &mut [f32], uncond: &[f32], scale: f64) {
    let s = scale as f32;
    for (c, &u) in cond.iter_mut().zip(uncond) {
        *c = u + (*c - u) * s;
    }
}

/// A small, fast, portable random source (SplitMix64): the same seed gives the same stream on
/// every platform and every version of this crate, unlike `rand`'s `StdRng`.
#[derive(Clone, Debug)]
pub struct TakeRng {
    state: u64,
}

impl TakeRng {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Index of the largest value (the first one on ties, as `torch.argmax`). NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best as u32
}

/// Chooses tokens from logits rows. Owns its scratch buffers (sized for the vocabulary on first
/// use and reused), so a generation allocates nothing per step.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    /// (logit, token) candidates after top-k.
    cand: Vec<(f32, u32)>,
    probs: Vec<f64>,
}

impl Sampler {
    /// Validates `params`.
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        params.validate()?;
        Ok(Self {
            params,
            cand: Vec::new(),
            probs: Vec::new(),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks one token from one row of (already guided) logits, drawing from `rng` when
    /// sampling. `logits` must not be empty.
    pub fn sample(&mut self, logits: &[f32], rng: &mut TakeRng) -> u32 {
        if self.params.greedy {
            return argmax(logits);
        }
        let inv_t = (1.0 / self.params.temperature) as f32;
        // Top-k: the reference removes every score strictly below the k-th largest.
        self.cand.clear();
        self.cand.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (l * inv_t, i as u32)),
        );
        let k = self.params.top_k.min(self.cand.len());
        if k < self.cand.len() {
            let desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0);
            self.cand.select_nth_unstable_by(k - 1, desc);
            let kth = self.cand[k - 1].0;
            // Keep ties with the k-th value beyond the first k (they sit after index k-1).
            let mut keep = k;
            for i in k..self.cand.len() {
                if self.cand[i].0 >= kth {
                    self.cand.swap(keep, i);
                    keep += 1;
                }
            }
            self.cand.truncate(keep);
        }
        // Ascending order (token id breaks ties), as the reference's `torch.sort` for top-p.
        self.cand
            .sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let max = self.cand.last().map_or(0.0, |c| c.0);
        self.probs.clear();
        self.probs
            .extend(self.cand.iter().map(|c| f64::from(c.0 - max).exp()));
        let total: f64 = self.probs.iter().sum();
        let mut first = 0usize;
        if self.params.top_p < 1.0 {
            // Remove the low tail whose cumulative probability is <= 1 - top_p; keep at least one.
            let limit = 1.0 - self.params.top_p;
            let mut cum = 0.0;
            for (i, p) in self.probs.iter().enumerate() {
                cum += p / total;
                if cum <= limit && i + 1 < self.probs.len() {
                    first = i + 1;
                } else {
                    break;
                }
            }
        }
        let kept = &self.probs[first..];
        let mass: f64 = kept.iter().sum();
        let mut u = rng.next_f64() * mass;
        for (i, p) in kept.iter().enumerate() {
            if u < *p {
                return self.cand[first + i].1;
            }
            u -= p;
        }
        self.cand.last().map_or(0, |c| c.1)
    }
}

/// Chooses the tokens of one decoder step from the decoder's logits where they lie, so that
/// only token ids cross from the device to the host; owns every buffer it needs (built once per
/// generation, reused at every step).
///
/// Two paths, giving the same tokens up to float rounding at a bucket edge:
/// - host (CPU tensors): the logits are read in place from the tensor's storage (no copy),
///   mixed for guidance into a reused buffer, and chosen by [`Sampler`];
/// - tensor (any other device): guidance mix, temperature, top-k and top-p are tensor ops
///   (an ascending sort, a mask, and cumulative sums as a product with a preallocated
///   triangular matrix), and the draw compares the cumulative mass with one uniform number
///   per row from the take's [`TakeRng`], drawn in the same order as the host path draws
///   them. Greedy decoding is an on-device argmax (exactly the host's tokens).
#[derive(Debug)]
pub struct StepSelector {
    sampler: Sampler,
    /// One guided row of logits (vocab), host path.
    guided: Vec<f32>,
    /// Uniform draws per (row, codebook), tensor path.
    draws: Vec<f32>,
    /// (vocab, vocab) upper-triangular ones: `x · triu` is the cumulative sum along a row.
    /// Built on first use by the tensor path when sampling.
    triu: Option<candle_core::Tensor>,
    /// Run the tensor path even on the CPU (to test it against the host path).
    force_tensor_path: bool,
}

impl StepSelector {
    /// Validates `params`.
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        Ok(Self {
            sampler: Sampler::new(params)?,
            guided: Vec::new(),
            draws: Vec::new(),
            triu: None,
            force_tensor_path: false,
        })
    }

    /// Uses the tensor path on every device, the CPU included (slower there; for tests).
    pub fn with_tensor_path(mut self) -> Self {
        self.force_tensor_path = true;
        self
    }

    pub fn params(&self) -> &SamplingParams {
        self.sampler.params()
    }

    /// Chooses `out[r * codebooks + c]` for every take `r < rows` and codebook `c`.
    ///
    /// `logits`: (batch, codebooks, vocab) f32, the takes' rows first and, when `guidance`,
    /// their null-condition rows after them (batch = 2 × rows). `forced[r * codebooks + c]`:
    /// the token the delay pattern imposes there (nothing is drawn for it). `rngs`: one per
    /// take.
    pub fn select(
        &mut self,
        logits: &candle_core::Tensor,
        rows: usize,
        guidance: bool,
        forced: &[Option<u32>],
        rngs: &mut [TakeRng],
        out: &mut [u32],
    ) -> candle_core::Result<()> {
        let (batch, k, vocab) = logits.dims3()?;
        let n = rows * k;
        if batch != if guidance { 2 * rows } else { rows }
            || forced.len() != n
            || out.len() != n
            || rngs.len() != rows
            || vocab == 0
        {
            candle_core::bail!(
                "token selection: logits {:?} do not fit {rows} takes (guidance {guidance})",
                logits.dims()
            );
        }
        if forced.iter().all(Option::is_some) {
            for (o, f) in out.iter_mut().zip(forced) {
                *o = f.unwrap_or_default();
            }
            return Ok(());
        }
        if logits.device().is_cpu() && !self.force_tensor_path {
            self.select_host(logits, rows, guidance, forced, rngs, out)
        } else {
            self.select_tensor(logits, rows, guidance, forced, rngs, out)
        }
    }

    fn select_host(
        &mut self,
        logits: &candle_core::Tensor,
        rows: usize,
        guidance: bool,
        forced: &[Option<u32>],
        rngs: &mut [TakeRng],
        out: &mut [u32],
    ) -> candle_core::Result<()> {
        let (_, k, vocab) = logits.dims3()?;
        let logits = logits.to_dtype(candle_core::DType::F32)?.contiguous()?;
        crate::cpu_ops::with_slice(&logits, "token selection: logits", |all: &[f32]| {
            self.guided.resize(vocab, 0.0);
            let scale = self.sampler.params().guidance_scale;
            for (r, rng) in rngs.iter_mut().enumerate().take(rows) {
                for c in 0..k {
                    let i = r * k + c;
                    out[i] = match forced[i] {
                        Some(token) => token,
                        None => {
                            let at = i * vocab;
                            self.guided.copy_from_slice(&all[at..at + vocab]);
                            if guidance {
                                let u = (rows * k + i) * vocab;
                                guidance_mix(&mut self.guided, &all[u..u + vocab], scale);
                            }
                            self.sampler.sample(&self.guided, rng)
                        }
                    };
                }
            }
        })
    }

    fn select_tensor(
        &mut self,
        logits: &candle_core::Tensor,
        rows: usize,
        guidance: bool,
        forced: &[Option<u32>],
        rngs: &mut [TakeRng],
        out: &mut [u32],
    ) -> candle_core::Result<()> {
        use candle_core::{DType, Tensor, D};
        let (_, k, vocab) = logits.dims3()?;
        let n = rows * k;
        let device = logits.device();
        let logits = logits.to_dtype(DType::F32)?;
        let p = self.sampler.params().clone();
        let cond = logits.narrow(0, 0, rows)?;
        // (rows, codebooks, vocab): the reference's `uncond + scale * (cond - uncond)`.
        let guided = if guidance {
            let uncond = logits.narrow(0, rows, rows)?;
            (&uncond + ((&cond - &uncond)? * p.guidance_scale)?)?
        } else {
            cond
        };
        let guided = guided.reshape((n, vocab))?; // (rows * codebooks, vocab)
        let ids: Vec<u32> = if p.greedy {
            guided.argmax(D::Minus1)?.to_vec1()?
        } else {
            // One draw per chosen token, in the host path's order (take, then codebook).
            self.draws.clear();
            for (r, rng) in rngs.iter_mut().enumerate().take(rows) {
                for c in 0..k {
                    let u = if forced[r * k + c].is_none() {
                        rng.next_f64() as f32
                    } else {
                        0.0
                    };
                    self.draws.push(u);
                }
            }
            let triu = match &self.triu {
                Some(t) if t.device().same_device(device) => t.clone(),
                _ => {
                    let t = Tensor::triu2(vocab, DType::F32, device)?;
                    self.triu = Some(t.clone());
                    t
                }
            };
            let scaled = guided.affine(1.0 / p.temperature, 0.0)?.contiguous()?;
            // Ascending, ties in token order (as the host path's sort).
            let (sorted, order) = scaled.sort_last_dim(true)?; // (n, vocab) each
            let top_k = p.top_k.min(vocab);
            let kth = sorted.narrow(1, vocab - top_k, 1)?; // (n, 1)
            let max = sorted.narrow(1, vocab - 1, 1)?;
            let keep = sorted.broadcast_ge(&kth)?.to_dtype(DType::F32)?;
            let mut probs = (sorted.broadcast_sub(&max)?.exp()? * keep)?;
            if p.top_p < 1.0 {
                // Remove the low tail whose share of the mass is <= 1 - top_p (the largest
                // token's cumulative share is 1, so at least one stays).
                let cum = probs.matmul(&triu)?;
                let share = cum.broadcast_div(&cum.narrow(1, vocab - 1, 1)?)?;
                probs = (probs * share.gt(1.0 - p.top_p)?.to_dtype(DType::F32)?)?;
            }
            let cum = probs.matmul(&triu)?; // (n, vocab)
            let mass = cum.narrow(1, vocab - 1, 1)?;
            let draws = Tensor::from_slice(&self.draws, (n, 1), device)?;
            let target = (draws * mass)?;
            // The chosen position: how many cumulative sums stay at or below the target.
            let pos = cum
                .broadcast_le(&target)?
                .to_dtype(DType::F32)?
                .sum_keepdim(1)?
                .minimum((vocab - 1) as f64)?
                .to_dtype(DType::U32)?;
            order.gather(&pos, 1)?.squeeze(1)?.to_vec1()?
        };
        for ((o, f), id) in out.iter_mut().zip(forced).zip(ids) {
            *o = f.unwrap_or(id);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_values() {
        let p = SamplingParams::default();
        assert!(!p.greedy);
        assert_eq!(
            (p.temperature, p.top_k, p.top_p, p.guidance_scale),
            (1.0, 250, 1.0, 3.0)
        );
        assert!(p.validate().is_ok());
        assert!(p.uses_guidance());
    }

    #[test]
    fn validation_errors() {
        let base = SamplingParams::default();
        let bad = |f: &dyn Fn(&mut SamplingParams)| {
            let mut p = base.clone();
            f(&mut p);
            p.validate()
        };
        assert_eq!(bad(&|p| p.top_k = 0), Err(SamplingError::TopK));
        assert_eq!(
            bad(&|p| p.temperature = -1.0),
            Err(SamplingError::Temperature(-1.0))
        );
        assert_eq!(
            bad(&|p| p.temperature = 0.0),
            Err(SamplingError::Temperature(0.0))
        );
        assert!(bad(&|p| p.temperature = f64::NAN).is_err());
        assert_eq!(bad(&|p| p.top_p = 0.0), Err(SamplingError::TopP(0.0)));
        assert_eq!(bad(&|p| p.top_p = 1.5), Err(SamplingError::TopP(1.5)));
        assert_eq!(
            bad(&|p| p.guidance_scale = 0.5),
            Err(SamplingError::Guidance(0.5))
        );
        assert!(bad(&|p| p.guidance_scale = f64::INFINITY).is_err());
        // Greedy ignores the sampling knobs but not guidance.
        assert!(bad(&|p| {
            p.greedy = true;
            p.temperature = 0.0;
            p.top_k = 0
        })
        .is_ok());
        assert!(bad(&|p| {
            p.greedy = true;
            p.guidance_scale = 0.0
        })
        .is_err());
        assert!(!SamplingParams::greedy(1.0).uses_guidance());
        assert!(Sampler::new(SamplingParams { top_k: 0, ..base }).is_err());
    }

    #[test]
    fn guidance_mix_formula() {
        let mut cond = vec![1.0f32, 2.0, -1.0];
        let uncond = [0.5f32, 2.0, 1.0];
        guidance_mix(&mut cond, &uncond, 3.0);
        assert_eq!(cond, vec![0.5 + 3.0 * 0.5, 2.0, 1.0 + 3.0 * -2.0]);
        let mut c = vec![4.0f32];
        guidance_mix(&mut c, &[1.0], 1.0);
        assert_eq!(c, vec![4.0]);
    }

    #[test]
    fn rng_is_deterministic_and_uniformish() {
        let mut a = TakeRng::new(42);
        let mut b = TakeRng::new(42);
        let mut c = TakeRng::new(43);
        let xs: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..8).map(|_| b.next_u64()).collect();
        let zs: Vec<u64> = (0..8).map(|_| c.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
        let mut r = TakeRng::new(7);
        let mean: f64 = (0..10_000).map(|_| r.next_f64()).sum::<f64>() / 10_000.0;
        assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
    }

    #[test]
    fn greedy_is_argmax_first_on_ties() {
        let mut s = Sampler::new(SamplingParams::greedy(3.0)).unwrap();
        let mut rng = TakeRng::new(0);
        assert_eq!(s.sample(&[0.0, 3.0, 1.0, 3.0], &mut rng), 1);
        assert_eq!(argmax(&[f32::NAN, -1.0]), 1);
    }

    #[test]
    fn top_k_one_is_argmax() {
        let mut s = Sampler::new(SamplingParams {
            top_k: 1,
            ..Default::default()
        })
        .unwrap();
        let mut rng = TakeRng::new(9);
        for _ in 0..50 {
            assert_eq!(s.sample(&[0.0, 0.1, 5.0, 4.9], &mut rng), 2);
        }
    }

    #[test]
    fn top_k_restricts_to_k_best() {
        let mut s = Sampler::new(SamplingParams {
            top_k: 2,
            ..Default::default()
        })
        .unwrap();
        let mut rng = TakeRng::new(1);
        let logits = [1.0f32, 1.1, 0.9, 1.05, -3.0];
        let mut seen = [0usize; 5];
        for _ in 0..2000 {
            seen[s.sample(&logits, &mut rng) as usize] += 1;
        }
        assert_eq!(seen[0] + seen[2] + seen[4], 0, "{seen:?}");
        assert!(seen[1] > 0 && seen[3] > 0);
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // probs ~ [0.6, 0.3, 0.1] in logits form; top_p 0.8 keeps the first two.
        let logits = [0.6f32.ln(), 0.3f32.ln(), 0.1f32.ln()];
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.8,
            ..Default::default()
        })
        .unwrap();
        let mut rng = TakeRng::new(3);
        let mut seen = [0usize; 3];
        for _ in 0..3000 {
            seen[s.sample(&logits, &mut rng) as usize] += 1;
        }
        assert_eq!(seen[2], 0, "{seen:?}");
        let ratio = seen[0] as f64 / seen[1] as f64;
        assert!((ratio - 2.0).abs() < 0.3, "ratio {ratio}");
        // A tiny top_p still keeps the most likely token.
        let mut s = Sampler::new(SamplingParams {
            top_p: 1e-6,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.sample(&logits, &mut rng), 0);
    }

    #[test]
    fn temperature_sharpens_and_flattens() {
        let logits = [0.0f32, 1.0];
        let count = |t: f64| {
            let mut s = Sampler::new(SamplingParams {
                temperature: t,
                ..Default::default()
            })
            .unwrap();
            let mut rng = TakeRng::new(5);
            (0..4000)
                .filter(|_| s.sample(&logits, &mut rng) == 1)
                .count()
        };
        let (cold, warm, hot) = (count(0.25), count(1.0), count(10.0));
        assert!(cold > warm && warm > hot, "{cold} {warm} {hot}");
        // p(1) at t=1 is e/(1+e) ~ 0.731.
        assert!((warm as f64 / 4000.0 - 0.731).abs() < 0.03);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..300).map(|i| ((i * 37) % 101) as f32 / 20.0).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams::default()).unwrap();
            let mut rng = TakeRng::new(seed);
            (0..64)
                .map(|_| s.sample(&logits, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(11), run(11));
        assert_ne!(run(11), run(12));
    }

    /// Random logits of 3 takes × 4 codebooks × 300 tokens with guidance rows after them.
    fn step_logits(seed: u64) -> candle_core::Tensor {
        let mut rng = TakeRng::new(seed);
        let v: Vec<f32> = (0..6 * 4 * 300)
            .map(|_| (rng.next_f64() * 8.0 - 4.0) as f32)
            .collect();
        candle_core::Tensor::from_vec(v, (6, 4, 300), &candle_core::Device::Cpu).unwrap()
    }

    /// The tensor path (what runs on a GPU) chooses the host path's tokens: exactly for greedy,
    /// and for sampling (same draws, float sums in another order) on all but a rare token at a
    /// bucket edge; forced positions are kept and draw nothing on either path.
    #[test]
    fn tensor_path_chooses_the_host_paths_tokens() {
        let mut forced = vec![None; 12];
        forced[1] = Some(7);
        forced[6] = Some(2048);
        let cases = [
            SamplingParams::greedy(3.0),
            SamplingParams::default(),
            SamplingParams {
                top_k: 20,
                top_p: 0.7,
                temperature: 0.8,
                ..SamplingParams::default()
            },
            SamplingParams {
                top_k: 1000,
                guidance_scale: 1.0,
                ..SamplingParams::default()
            },
        ];
        for params in cases {
            let guidance = params.uses_guidance();
            let mut host = StepSelector::new(params.clone()).unwrap();
            let mut tensor = StepSelector::new(params.clone())
                .unwrap()
                .with_tensor_path();
            let mut rng_h: Vec<TakeRng> = (0..3).map(TakeRng::new).collect();
            let mut rng_t = rng_h.clone();
            let (mut same, mut total) = (0, 0);
            for step in 0..40 {
                let logits = step_logits(step);
                let logits = if guidance {
                    logits
                } else {
                    logits.narrow(0, 0, 3).unwrap()
                };
                let (mut a, mut b) = (vec![0u32; 12], vec![0u32; 12]);
                host.select(&logits, 3, guidance, &forced, &mut rng_h, &mut a)
                    .unwrap();
                tensor
                    .select(&logits, 3, guidance, &forced, &mut rng_t, &mut b)
                    .unwrap();
                assert_eq!((a[1], a[6]), (7, 2048));
                assert_eq!((b[1], b[6]), (7, 2048));
                if params.greedy {
                    assert_eq!(a, b, "greedy step {step}");
                }
                same += a.iter().zip(&b).filter(|(x, y)| x == y).count();
                total += a.len();
            }
            assert!(
                same * 100 >= total * 99,
                "{params:?}: {same} of {total} agree"
            );
            // Both drew the same number of values from each take's stream.
            for (h, t) in rng_h.iter_mut().zip(&mut rng_t) {
                assert_eq!(h.next_u64(), t.next_u64());
            }
        }
        // Shapes that do not fit are errors, not panics.
        let mut sel = StepSelector::new(SamplingParams::default()).unwrap();
        let mut rngs = vec![TakeRng::new(0); 2];
        let err = sel.select(&step_logits(0), 2, true, &[None; 8], &mut rngs, &mut [0; 8]);
        assert!(err.is_err());
    }
}
