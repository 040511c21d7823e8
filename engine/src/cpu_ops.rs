//! Slice kernels of the decoder's CPU step (see `decoder::host_step`): layer norm, the
//! feed-forward activations, and attention of a few query rows over a key/value cache.
//!
//! A decoder step on the CPU is a few activation rows pushed through large weights; everything
//! between the weight products is small, and run as candle tensor operations it costs more in
//! dispatch, allocation and single-threaded transcendental functions than in arithmetic
//! (measured: about a third of a Q8_0 step). These kernels work on caller-owned slices, use
//! eight independent accumulator lanes so that the compiler vectorises them, and are compiled
//! twice: generic, and with AVX2/FMA on x86-64 when the processor has them (checked at run time).
//! `exp` and `erf` are polynomial approximations written as plain arithmetic so that they
//! vectorise too (relative error of `exp` about 2e-7; absolute error of `erf` about 3e-7:
//! Abramowitz & Stegun 7.1.26's 1.5e-7 plus f32 rounding).

use candle_core::Tensor;
use candle_nn::Activation;

/// Runs `f` on the elements of a contiguous CPU tensor of element type `T`, without copying
/// (the tensor's storage read lock is held meanwhile). `what` names the tensor in the error
/// when it is elsewhere, not contiguous or of another type.
pub(crate) fn with_slice<T: candle_core::WithDType, R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[T]) -> R,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("{what}: not on the CPU");
    };
    let Some((a, b)) = layout.contiguous_offsets() else {
        candle_core::bail!("{what}: not contiguous");
    };
    Ok(f(&cpu.as_slice::<T>()?[a..b]))
}

/// 1.5 · 2²³: adding and subtracting it rounds an f32 of magnitude below 2²² to the nearest
/// integer (ties to even) with plain arithmetic.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// Whether the AVX2 builds (AVX2, FMA and F16C) can run here.
#[inline]
pub(crate) fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Runs `$body` (an expression using only `#[inline(always)]` functions) compiled with AVX2/FMA
/// when the processor has them, else as generic code.
macro_rules! dispatch {
    ($name:ident ( $($arg:ident : $ty:ty),* ) $body:block) => {{
        #[cfg(target_arch = "x86_64")]
        let result = {
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $name($($arg: $ty),*) $body
            if avx2_fma() {
                // SAFETY: the features were just checked.
                unsafe { $name($($arg),*) }
            } else {
                $body
            }
        };
        #[cfg(not(target_arch = "x86_64"))]
        let result = $body;
        result
    }};
}

/// `e^x` for `x <= 88` (values below -87 give 0): Cephes' `expf` (range reduction by ln 2, a
/// degree-6 polynomial, the power of two built in the exponent bits). Relative error about
/// 2e-7.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.0, 88.0);
    let n = (xc * LOG2E + ROUND_MAGIC) - ROUND_MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * (r * r) + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) << 23) as u32);
    if x < -87.0 {
        0.0
    } else {
        y * scale
    }
}

/// The error function, Abramowitz & Stegun 7.1.26 (absolute error 1.5e-7, about 3e-7 with
/// the f32 arithmetic).
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_8) * t - 0.284_496_72) * t
        + 0.254_829_6)
        * t;
    let y = 1.0 - poly * exp(-a * a);
    y.copysign(x)
}

#[inline(always)]
fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    // tanh(u) = 1 - 2 / (e^{2u} + 1); e^{2u} saturates (and its reciprocal goes to 0) for
    // large u, giving ±1.
    let u = 0.797_884_6 * (x + 0.044_715 * x * x * x);
    let th = 1.0 - 2.0 / (exp((2.0 * u).min(88.0)) + 1.0);
    0.5 * x * (1.0 + th)
}

#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + exp((-x).min(88.0)))
}

/// Applies `act` to `xs` in place. Returns `false` (and leaves `xs` alone) for activations
/// this module does not implement; the caller then uses candle's.
pub(crate) fn activation(act: Activation, xs: &mut [f32]) -> bool {
    #[inline(always)]
    fn map(xs: &mut [f32], f: impl Fn(f32) -> f32) {
        for v in xs.iter_mut() {
            *v = f(*v);
        }
    }
    match act {
        Activation::Gelu => {
            dispatch!(gelu_avx2(xs: &mut [f32]) { map(xs, gelu_erf) });
        }
        Activation::NewGelu | Activation::GeluPytorchTanh => {
            dispatch!(gelu_tanh_avx2(xs: &mut [f32]) { map(xs, gelu_tanh) });
        }
        Activation::Silu => {
            dispatch!(silu_avx2(xs: &mut [f32]) { map(xs, silu) });
        }
        Activation::Relu => map(xs, |v| v.max(0.0)),
        _ => return false,
    }
    true
}

/// Element type of a key/value cache: f32, or f16 (half the bytes a late step reads).
pub(crate) trait KvElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    /// Eight consecutive values from `p`, as f32.
    ///
    /// # Safety
    /// `p..p + 8` must be readable; the caller must run with AVX2 and F16C enabled.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl KvElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl KvElem for half::f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

/// Sum of `a[i] * b[i]` in eight lanes (vectorisable), then the lanes pairwise.
#[inline(always)]
fn dot<T: KvElem>(a: &[f32], b: &[T]) -> f32 {
    let n = a.len().min(b.len());
    let main = n - n % 8;
    let mut acc = [0f32; 8];
    for (ac, bc) in a[..main].chunks_exact(8).zip(b[..main].chunks_exact(8)) {
        for j in 0..8 {
            acc[j] += ac[j] * bc[j].to_f32();
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for i in main..n {
        s += a[i] * b[i].to_f32();
    }
    s
}

#[inline(always)]
fn sum(a: &[f32]) -> f32 {
    let main = a.len() - a.len() % 8;
    let mut acc = [0f32; 8];
    for c in a[..main].chunks_exact(8) {
        for j in 0..8 {
            acc[j] += c[j];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for v in &a[main..] {
        s += v;
    }
    s
}

/// Layer norm of each row of `x` (rows of `weight.len()` values) into `out`:
/// `(x - mean) / sqrt(var + eps) * weight + bias`, biased variance (torch's `LayerNorm`).
pub(crate) fn layer_norm(x: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
    #[inline(always)]
    fn body(x: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
        let d = weight.len();
        for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let mean = sum(xr) / d as f32;
            for (o, v) in or.iter_mut().zip(xr) {
                *o = v - mean;
            }
            let var = dot(or, or) / d as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            for ((o, w), b) in or.iter_mut().zip(weight).zip(bias) {
                *o = *o * rstd * w + b;
            }
        }
    }
    dispatch!(layer_norm_avx2(x: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
        body(x, weight, bias, eps, out)
    })
}

/// `acc += other`, element by element.
pub(crate) fn add_assign(acc: &mut [f32], other: &[f32]) {
    dispatch!(add_assign_avx2(acc: &mut [f32], other: &[f32]) {
        for (a, b) in acc.iter_mut().zip(other) {
            *a += b;
        }
    })
}

/// `xs *= s`, element by element.
pub(crate) fn scale(xs: &mut [f32], s: f32) {
    for v in xs.iter_mut() {
        *v *= s;
    }
}

/// One query head attending over `n` cached positions: `q` (head_dim), `keys` and `values`
/// (n, head_dim) row-major in f32 or f16, `mask` an optional additive (n) mask, `scores` (at least n)
/// scratch; writes `softmax(q · keysᵀ + mask) · values` into `out` (head_dim). The query is
/// expected pre-scaled by `1 / sqrt(head_dim)`.
pub(crate) fn attend<T: KvElem>(
    q: &[f32],
    keys: &[T],
    values: &[T],
    mask: Option<&[f32]>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    #[inline(always)]
    fn body<T: KvElem>(
        q: &[f32],
        keys: &[T],
        values: &[T],
        mask: Option<&[f32]>,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let hd = q.len();
        let n = keys.len() / hd;
        let scores = &mut scores[..n];
        for (s, k) in scores.iter_mut().zip(keys.chunks_exact(hd)) {
            *s = dot(q, k);
        }
        if let Some(m) = mask {
            for (s, m) in scores.iter_mut().zip(m) {
                *s += m;
            }
        }
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        for s in scores.iter_mut() {
            *s = exp(*s - max);
        }
        let inv = 1.0 / sum(scores);
        out.fill(0.0);
        for (&p, v) in scores.iter().zip(values.chunks_exact(hd)) {
            let p = p * inv;
            for (o, v) in out.iter_mut().zip(v) {
                *o += p * v.to_f32();
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        macro_rules! heads {
            ($($c:literal),*) => {
                match q.len() {
                    $(n if n == 8 * $c => {
                        // SAFETY: the features were just checked; `q.len() == 8 * $c`.
                        return unsafe { attend_avx2::<T, $c>(q, keys, values, mask, scores, out) };
                    })*
                    _ => {}
                }
            };
        }
        heads!(1, 2, 4, 8, 12, 16);
    }
    body(q, keys, values, mask, scores, out)
}

/// [`attend`] for a head width of `8 * C` with AVX2/FMA intrinsics: the query lives in `C`
/// registers; scores are computed four keys at a time (four independent FMA chains, one
/// horizontal reduction for the four); the output accumulates in `C` registers over all keys
/// and is normalised once at the end.
///
/// # Safety
/// The processor must support AVX2 and FMA; `q.len() == 8 * C` and the other slices as in
/// [`attend`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_avx2<T: KvElem, const C: usize>(
    q: &[f32],
    keys: &[T],
    values: &[T],
    mask: Option<&[f32]>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let hd = 8 * C;
    let n = keys.len() / hd;
    assert!(q.len() == hd && values.len() >= n * hd && scores.len() >= n && out.len() >= hd);
    let scores = &mut scores[..n];
    let (kp, vp, sp) = (keys.as_ptr(), values.as_ptr(), scores.as_mut_ptr());
    let mut qv = [_mm256_setzero_ps(); C];
    for (c, v) in qv.iter_mut().enumerate() {
        *v = _mm256_loadu_ps(q.as_ptr().add(8 * c));
    }
    let mut j = 0;
    while j + 4 <= n {
        let mut a = [_mm256_setzero_ps(); 4];
        for (c, qc) in qv.iter().enumerate() {
            for (t, at) in a.iter_mut().enumerate() {
                *at = _mm256_fmadd_ps(*qc, T::load8(kp.add((j + t) * hd + 8 * c)), *at);
            }
        }
        // [a0 a1 a2 a3] lane sums: pairwise within 128-bit halves, then the halves added.
        let h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        let s4 = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        _mm_storeu_ps(sp.add(j), s4);
        j += 4;
    }
    while j < n {
        let mut a = _mm256_setzero_ps();
        for (c, qc) in qv.iter().enumerate() {
            a = _mm256_fmadd_ps(*qc, T::load8(kp.add(j * hd + 8 * c)), a);
        }
        let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        *sp.add(j) = _mm_cvtss_f32(s);
        j += 1;
    }
    if let Some(m) = mask {
        for (s, m) in scores.iter_mut().zip(m) {
            *s += m;
        }
    }
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    for s in scores.iter_mut() {
        *s = exp(*s - max);
    }
    let inv = 1.0 / sum(scores);
    let mut o = [_mm256_setzero_ps(); C];
    for (j, &p) in scores.iter().enumerate() {
        let p = _mm256_set1_ps(p);
        for (c, oc) in o.iter_mut().enumerate() {
            *oc = _mm256_fmadd_ps(p, T::load8(vp.add(j * hd + 8 * c)), *oc);
        }
    }
    let inv = _mm256_set1_ps(inv);
    for (c, oc) in o.iter().enumerate() {
        _mm256_storeu_ps(out.as_mut_ptr().add(8 * c), _mm256_mul_ps(*oc, inv));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf in f64: its Taylor series below |x| = 3, the asymptotic series of erfc beyond
    /// (six terms: error far below 1e-9 there).
    fn erf64(x: f64) -> f64 {
        let z = x.abs();
        if z >= 3.0 {
            let (mut term, mut s) = (1.0, 1.0);
            for n in 1..6 {
                term *= -((2 * n - 1) as f64) / (2.0 * z * z);
                s += term;
            }
            let erfc = (-z * z).exp() / (z * std::f64::consts::PI.sqrt()) * s;
            return (1.0 - erfc).copysign(x);
        }
        let mut term = x;
        let mut s = x;
        for n in 1..200 {
            term *= -x * x / n as f64;
            s += term / (2 * n + 1) as f64;
        }
        s * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn exp_is_close_to_libm_and_zero_far_below() {
        let mut worst = 0f64;
        for i in -8700..=8800 {
            let x = i as f32 * 0.01;
            let got = f64::from(exp(x));
            let want = f64::from(x).exp();
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(exp(-88.0), 0.0);
        assert_eq!(exp(-1e9), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn erf_and_activations_match_their_definitions() {
        let mut worst = 0f64;
        for i in -600..=600 {
            let x = i as f32 * 0.01;
            worst = worst.max((f64::from(erf(x)) - erf64(f64::from(x))).abs());
        }
        assert!(worst < 4e-7, "erf error {worst}");
        assert_eq!(erf(10.0), 1.0);
        assert_eq!(erf(-10.0), -1.0);

        let xs: Vec<f32> = (-400..=400).map(|i| i as f32 * 0.02).collect();
        for (act, f) in [
            (
                Activation::Gelu,
                (|x: f64| 0.5 * x * (1.0 + erf64(x / 2f64.sqrt()))) as fn(f64) -> f64,
            ),
            (Activation::GeluPytorchTanh, |x: f64| {
                0.5 * x
                    * (1.0
                        + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
            }),
            (Activation::Silu, |x: f64| x / (1.0 + (-x).exp())),
            (Activation::Relu, |x: f64| x.max(0.0)),
        ] {
            let mut got = xs.clone();
            assert!(activation(act, &mut got));
            for (&x, &g) in xs.iter().zip(&got) {
                let want = f(f64::from(x));
                assert!(
                    (f64::from(g) - want).abs() < 1e-6 * (1.0 + want.abs()),
                    "{act:?}({x}) = {g}, want {want}"
                );
            }
        }
        let mut v = vec![1.0f32];
        assert!(!activation(Activation::Sigmoid, &mut v));
        assert_eq!(v, [1.0]);
    }

    #[test]
    fn layer_norm_matches_the_two_pass_definition() {
        let d = 37;
        let x: Vec<f32> = (0..2 * d)
            .map(|i| ((i * 7919) % 101) as f32 * 0.1 - 3.0)
            .collect();
        let w: Vec<f32> = (0..d).map(|i| 1.0 + i as f32 * 0.01).collect();
        let b: Vec<f32> = (0..d).map(|i| i as f32 * -0.02).collect();
        let mut out = vec![0f32; 2 * d];
        layer_norm(&x, &w, &b, 1e-5, &mut out);
        for r in 0..2 {
            let row: Vec<f64> = x[r * d..(r + 1) * d]
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            let mean = row.iter().sum::<f64>() / d as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
            for i in 0..d {
                let want =
                    (row[i] - mean) / (var + 1e-5).sqrt() * f64::from(w[i]) + f64::from(b[i]);
                assert!(
                    (f64::from(out[r * d + i]) - want).abs() < 1e-5,
                    "row {r} col {i}"
                );
            }
        }
    }

    #[test]
    fn attend_is_softmax_weighted_values_and_masked_rows_give_zero() {
        // Head widths of the vectorised build (8, 64, 96) and of the generic one (12); key
        // counts on and off the four-key step.
        for (n, hd) in [(13, 12), (13, 64), (6, 8), (3, 96), (1, 64), (16, 64)] {
            let q: Vec<f32> = (0..hd).map(|i| (i as f32 * 0.37).sin()).collect();
            // Values exact in f16, so that the f16 cache sees the same inputs.
            let r = |v: f32| half::f16::from_f32(v).to_f32();
            let k: Vec<f32> = (0..n * hd).map(|i| r((i as f32 * 0.11).cos())).collect();
            let v: Vec<f32> = (0..n * hd)
                .map(|i| r((i as f32 * 0.07).sin() * 2.0))
                .collect();
            let k16: Vec<half::f16> = k.iter().map(|&v| half::f16::from_f32(v)).collect();
            let v16: Vec<half::f16> = v.iter().map(|&v| half::f16::from_f32(v)).collect();
            let mask: Vec<f32> = (0..n)
                .map(|j| if j % 3 == 2 { -1e9 } else { 0.0 })
                .collect();
            let mut scores = vec![0f32; n];
            let mut out = vec![0f32; hd];
            for (m, f16) in [
                (None, false),
                (Some(&mask[..]), false),
                (Some(&mask[..]), true),
            ] {
                if f16 {
                    attend(&q, &k16, &v16, m, &mut scores, &mut out);
                } else {
                    attend(&q, &k, &v, m, &mut scores, &mut out);
                }
                let s: Vec<f64> = (0..n)
                    .map(|j| {
                        let d: f64 = (0..hd)
                            .map(|i| f64::from(q[i]) * f64::from(k[j * hd + i]))
                            .sum();
                        d + m.map_or(0.0, |m| f64::from(m[j]))
                    })
                    .collect();
                let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|s| (s - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for i in 0..hd {
                    let want: f64 = (0..n).map(|j| e[j] / z * f64::from(v[j * hd + i])).sum();
                    assert!(
                        (f64::from(out[i]) - want).abs() < 1e-5,
                        "n {n}, hd {hd}, f16 {f16}, {i}: {} vs {want}",
                        out[i]
                    );
                }
            }
        }
        let (n, hd) = (13, 64);
        let q = vec![0.3f32; hd];
        let k = vec![0.1f32; n * hd];
        let mut scores = vec![0f32; n];
        let mut out = vec![0f32; hd];
        // Every key masked and zero values (the null condition): exactly 0, not NaN.
        let all: Vec<f32> = vec![-1e9; n];
        let zeros = vec![0f32; n * hd];
        attend(&q, &k, &zeros, Some(&all), &mut scores, &mut out);
        assert!(out.iter().all(|&o| o == 0.0));
    }
}
