//! A CPU kernel for the decoder's per-step shape: a few activation rows times a large weight
//! matrix (`y = x · Wᵀ`, `x` (rows, in), `W` (out, in)).
//!
//! A decoder step is bound by memory bandwidth: every weight is read once and used for only
//! `rows` (2 per take with guidance) multiply-adds. candle's general matmul is built for large
//! products and reaches a fraction of the bandwidth on this shape; this kernel streams each
//! weight row once, computes its dot products with every activation row while it is in L1, and
//! splits the output rows across threads. On x86-64 it uses AVX2/FMA when the processor has them
//! (checked at run time).

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ8K};
use candle_core::quantized::{GgmlDType, GgmlType, QTensor};
use candle_core::{CpuStorage, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Largest number of activation rows the kernel takes; more rows go to the general matmul.
pub const MAX_ROWS: usize = 8;

/// Runs `$body` with the constant `$r` equal to the number of activation rows `$rows` (1 to
/// [`MAX_ROWS`]; more are taken as [`MAX_ROWS`]): the kernels are generic over the row count so
/// that their per-row accumulators live in registers.
macro_rules! with_rows {
    ($rows:expr, |$r:ident| $body:expr) => {
        match $rows {
            1 => with_rows!(@ $r = 1, $body),
            2 => with_rows!(@ $r = 2, $body),
            3 => with_rows!(@ $r = 3, $body),
            4 => with_rows!(@ $r = 4, $body),
            5 => with_rows!(@ $r = 5, $body),
            6 => with_rows!(@ $r = 6, $body),
            7 => with_rows!(@ $r = 7, $body),
            _ => with_rows!(@ $r = 8, $body),
        }
    };
    (@ $r:ident = $n:literal, $body:expr) => {{
        const $r: usize = $n;
        $body
    }};
}

/// Output rows per parallel task.
const BLOCK: usize = 64;

struct MatVec;

/// The output buffer, shared by the parallel tasks, each writing its own columns.
struct SendPtr(*mut f32);
// SAFETY: the tasks write disjoint elements and the buffer outlives them (joined before use).
unsafe impl Sync for SendPtr {}

/// `out[r] = sum_i w[i] * x[r][i]` over one weight row `w` (length `n`) and `R` activation
/// rows `x` (`R * n`), eight lanes at a time with two independent accumulators per row.
#[inline(always)]
fn dot_rows_generic<const R: usize>(w: &[f32], x: &[f32], out: &mut [f32]) {
    let n = w.len();
    let main = n - n % 8;
    let mut acc = [[0f32; 8]; R];
    for (c, wc) in w[..main].chunks_exact(8).enumerate() {
        for (r, a) in acc.iter_mut().enumerate() {
            let xc = &x[r * n + c * 8..r * n + c * 8 + 8];
            for j in 0..8 {
                a[j] = wc[j].mul_add(xc[j], a[j]);
            }
        }
    }
    for (r, (a, o)) in acc.iter().zip(out.iter_mut()).enumerate() {
        let mut s = (a[0] + a[4]) + (a[1] + a[5]) + ((a[2] + a[6]) + (a[3] + a[7]));
        for i in main..n {
            s = w[i].mul_add(x[r * n + i], s);
        }
        *o = s;
    }
}

/// [`dot_rows_generic`] with AVX2/FMA intrinsics: each weight vector is loaded once and
/// multiplied into every activation row, with two accumulator chains per row so that the FMA
/// latency (4 cycles) does not bound a 1-row or 2-row product.
///
/// # Safety
/// The processor must support AVX2 and FMA; `w.len() == n`, `x.len() >= R * n`,
/// `out.len() >= R`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_rows_avx2<const R: usize>(w: &[f32], x: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = w.len();
    let main = n - n % 16;
    let wp = w.as_ptr();
    let xp = x.as_ptr();
    let mut a0 = [_mm256_setzero_ps(); R];
    let mut a1 = [_mm256_setzero_ps(); R];
    let mut i = 0;
    while i < main {
        let w0 = _mm256_loadu_ps(wp.add(i));
        let w1 = _mm256_loadu_ps(wp.add(i + 8));
        for r in 0..R {
            let xr = xp.add(r * n + i);
            a0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), a0[r]);
            a1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr.add(8)), a1[r]);
        }
        i += 16;
    }
    for r in 0..R {
        let v = _mm256_add_ps(a0[r], a1[r]);
        let hi = _mm256_extractf128_ps(v, 1);
        let q = _mm_add_ps(_mm256_castps256_ps128(v), hi);
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        let q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
        let mut s = _mm_cvtss_f32(q);
        for j in main..n {
            s = w[j].mul_add(x[r * n + j], s);
        }
        out[r] = s;
    }
}

/// One block of output rows: `w` holds whole weight rows of width `inner`, `out` is
/// (block, rows).
fn block(w: &[f32], x: &[f32], inner: usize, rows: usize, out: &mut [f32]) {
    with_rows!(rows, |R| {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            for (wrow, o) in w.chunks_exact(inner).zip(out.chunks_exact_mut(R)) {
                // SAFETY: the features are present; the slices have the lengths the function
                // requires (whole rows, `rows` outputs per weight row).
                unsafe { dot_rows_avx2::<R>(wrow, x, o) };
            }
            return;
        }
        for (wrow, o) in w.chunks_exact(inner).zip(out.chunks_exact_mut(R)) {
            dot_rows_generic::<R>(wrow, x, o);
        }
    })
}

impl candle_core::CustomOp2 for MatVec {
    fn name(&self) -> &'static str {
        "segue-matvec"
    }

    /// `s1`: x (rows, in), `s2`: W (out, in), both contiguous f32.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (Some((x0, x1)), Some((w0, w1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("segue-matvec: operands must be contiguous");
        };
        let x = &s1.as_slice::<f32>()?[x0..x1];
        let w = &s2.as_slice::<f32>()?[w0..w1];
        let (rows, inner) = l1.shape().dims2()?;
        let (out_dim, inner_w) = l2.shape().dims2()?;
        if inner != inner_w || rows == 0 || rows > MAX_ROWS {
            candle_core::bail!(
                "segue-matvec: bad shapes {:?} x {:?}ᵀ",
                l1.shape(),
                l2.shape()
            );
        }
        let mut y = vec![0f32; rows * out_dim];
        matvec_into(x, rows, w, inner, &mut y);
        Ok((CpuStorage::F32(y), Shape::from_dims(&[rows, out_dim])))
    }
}

/// Whether [`matvec`] handles this product (CPU, f32, at most [`MAX_ROWS`] rows).
pub fn applies(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && x.rank() == 2
        && x.dims()[0] <= MAX_ROWS
}

/// `x` (rows, in) · `w`ᵀ with `w` (out, in) -> (rows, out). Check [`applies`] first.
pub fn matvec(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &MatVec)
}

/// Splits the `out_dim` output columns of a `rows`-row product into blocks of [`BLOCK`] on
/// rayon's pool: `task(block index, block's first output row, its outputs laid out (block,
/// rows))` fills the stack buffer it is given, which is then scattered into `y` (rows,
/// out_dim). Shared by the f32 and Q8_0 products.
fn par_blocks(
    rows: usize,
    out_dim: usize,
    y: &mut [f32],
    task: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    assert!(rows <= MAX_ROWS && y.len() >= rows * out_dim);
    let dst = SendPtr(y.as_mut_ptr());
    (0..out_dim.div_ceil(BLOCK)).into_par_iter().for_each(|bi| {
        let n = BLOCK.min(out_dim - bi * BLOCK);
        let mut buf = [0f32; BLOCK * MAX_ROWS];
        task(bi * BLOCK, n, &mut buf[..n * rows]);
        let dst = &dst;
        for (j, vals) in buf[..n * rows].chunks_exact(rows).enumerate() {
            for (r, &v) in vals.iter().enumerate() {
                // SAFETY: column bi * BLOCK + j < out_dim of row r < rows is inside `y`
                // (asserted above), and no other task writes the columns of block `bi`.
                unsafe { *dst.0.add(r * out_dim + bi * BLOCK + j) = v };
            }
        }
    });
}

/// `y` (rows, out) = `x` (rows, inner) · `w`ᵀ on slices, `w` (out, inner) row-major f32, with
/// `1 <= rows <= MAX_ROWS`; `y` is caller-owned (a decoder step's preallocated buffer).
///
/// # Panics
/// If the slice lengths do not match the shapes (a bug in the caller).
pub fn matvec_into(x: &[f32], rows: usize, w: &[f32], inner: usize, y: &mut [f32]) {
    assert!(rows >= 1 && x.len() == rows * inner && w.len().is_multiple_of(inner));
    let out_dim = w.len() / inner;
    par_blocks(rows, out_dim, y, |first, n, buf| {
        block(&w[first * inner..(first + n) * inner], x, inner, rows, buf);
    });
}

/// Bytes of one Q8_0 block: an f16 scale and 32 signed 8-bit weights (ggml's `block_q8_0`).
const Q8_0_BLOCK_BYTES: usize = 34;
/// Bytes ahead of the group being computed that the Q8_0 kernel asks the processor to fetch.
const PREFETCH_AHEAD: usize = 4096;
/// Weights per Q8_0 block.
const Q8_0_BLOCK: usize = 32;

/// The f32 scale of a Q8_0 block (its first two bytes, an f16, little-endian).
#[inline(always)]
fn q8_0_scale(block: &[u8]) -> f32 {
    half::f16::from_le_bytes([block[0], block[1]]).to_f32()
}

/// Activation rows quantised to Q8_0 once per product: per block of 32 values a scale
/// `d = absmax / 127` (f32) and 32 signed 8-bit values `q = round(x / d)` (ties to even), so
/// that `x ≈ d * q` with an error of at most `d / 2` per value.
#[derive(Debug, Default)]
struct QuantRows {
    /// (rows, in) signed 8-bit values.
    qs: Vec<i8>,
    /// (rows, in / 32) block scales.
    ds: Vec<f32>,
}

/// 1.5 · 2²³: adding and subtracting it rounds an f32 of magnitude below 2²² to the nearest
/// integer, ties to even, with plain arithmetic (vectorisable, no `roundf` call).
const ROUND_MAGIC: f32 = 12_582_912.0;

/// Quantises `x` (a whole number of 32-value blocks) into `qs` and `ds`.
#[inline(always)]
fn quantize_q8_0_body(x: &[f32], qs: &mut [i8], ds: &mut [f32]) {
    for ((xb, qb), d) in x
        .chunks_exact(Q8_0_BLOCK)
        .zip(qs.chunks_exact_mut(Q8_0_BLOCK))
        .zip(ds.iter_mut())
    {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let dv = amax / 127.0;
        let id = if dv > 0.0 { 1.0 / dv } else { 0.0 };
        for (q, v) in qb.iter_mut().zip(xb) {
            // |v * id| <= 127 (+ rounding), inside the magic constant's range.
            *q = ((v * id + ROUND_MAGIC) - ROUND_MAGIC) as i8;
        }
        *d = dv;
    }
}

/// [`quantize_q8_0_body`] compiled with AVX2 so that it vectorises; the arithmetic (no fused
/// operations) and so the result are the same.
///
/// # Safety
/// The processor must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_q8_0_avx2(x: &[f32], qs: &mut [i8], ds: &mut [f32]) {
    quantize_q8_0_body(x, qs, ds)
}

impl QuantRows {
    /// Quantises `x` (`len` a multiple of 32) into `self`, reusing its buffers; `avx2` picks
    /// the vectorised build.
    fn quantize(&mut self, x: &[f32], avx2: bool) {
        self.qs.resize(x.len(), 0);
        self.ds.resize(x.len() / Q8_0_BLOCK, 0.0);
        let (qs, ds) = (
            &mut self.qs[..x.len()],
            &mut self.ds[..x.len() / Q8_0_BLOCK],
        );
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: the caller checked the feature.
            unsafe { quantize_q8_0_avx2(x, qs, ds) };
            return;
        }
        let _ = avx2;
        quantize_q8_0_body(x, qs, ds);
    }
}

/// `out[r] = sum_b dw_b * dx_rb * sum_i w_bi * q_rbi` over one Q8_0 weight row (`row`: its
/// blocks) and `R` quantised activation rows of width `n`: an exact integer dot per block,
/// scaled by the product of the two block scales and summed in f32.
#[inline(always)]
fn q8_0_row_generic<const R: usize>(row: &[u8], x: &QuantRows, n: usize, out: &mut [f32]) {
    let nb = n / Q8_0_BLOCK;
    let mut acc = [0f32; R];
    for (b, block) in row.chunks_exact(Q8_0_BLOCK_BYTES).enumerate() {
        let dw = q8_0_scale(block);
        let qs = &block[2..];
        for (r, a) in acc.iter_mut().enumerate() {
            let xr = &x.qs[r * n + b * Q8_0_BLOCK..r * n + (b + 1) * Q8_0_BLOCK];
            // |sum| <= 32 · 128 · 127 < 2^24: exact in i32 and in f32.
            let s: i32 = qs
                .iter()
                .zip(xr)
                .map(|(&q, &v)| i32::from(q as i8) * i32::from(v))
                .sum();
            *a = (s as f32).mul_add(dw * x.ds[r * nb + b], *a);
        }
    }
    out[..R].copy_from_slice(&acc);
}

/// [`q8_0_row_generic`] with AVX2/FMA/F16C (llama.cpp's `ggml_vec_dot_q8_0_q8_0` scheme): each
/// weight block is loaded once, its absolute values computed once, and for every activation
/// row `|w| · (q · sign w)` is summed in pairs by `maddubs` (unsigned × signed → i16, no
/// saturation: |pair| <= 2 · 128 · 127), then in fours by `madd` with ones (→ 8 × i32), converted
/// to f32 and accumulated with the product of the two block scales.
///
/// # Safety
/// The processor must support AVX2, FMA and F16C; `row` holds `n / 32` whole blocks, `x`
/// holds at least `R` rows of width `n`, `out.len() >= R`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_row_avx2<const R: usize>(row: &[u8], x: &QuantRows, n: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let nb = n / Q8_0_BLOCK;
    let ones = _mm256_set1_epi16(1);
    let xq = x.qs.as_ptr();
    let xd = x.ds.as_ptr();
    // One block into `acc`: its scale, its 32 weights loaded once for all `R` rows.
    let step = |acc: &mut [__m256; R], b: usize, block: *const u8| {
        let bits = u16::from_le_bytes([*block, *block.add(1)]);
        let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))));
        let w = _mm256_loadu_si256(block.add(2) as *const __m256i);
        let aw = _mm256_sign_epi8(w, w);
        for (r, a) in acc.iter_mut().enumerate() {
            let y = _mm256_loadu_si256(xq.add(r * n + b * Q8_0_BLOCK) as *const __m256i);
            let sy = _mm256_sign_epi8(y, w);
            let p16 = _mm256_maddubs_epi16(aw, sy);
            let p32 = _mm256_madd_epi16(p16, ones);
            let d = _mm256_set1_ps(dw * *xd.add(r * nb + b));
            *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), d, *a);
        }
    };
    // Groups of eight blocks: the eight weight scales are gathered into one vector and
    // multiplied by the activation rows' eight scales once per group, and each block's
    // scale is picked from that vector by a lane permute, instead of a scalar conversion,
    // multiplication and broadcast per block and row (the kernel is bound by instruction
    // throughput, not memory, on a 2-core AVX2 machine: measured 20 GB/s with the weight in
    // cache against 17 GB/s streamed). Two accumulator sets, alternating by block, keep two
    // FMA chains in flight per row.
    let mut acc = [_mm256_setzero_ps(); R];
    let mut acc1 = [_mm256_setzero_ps(); R];
    let rp = row.as_ptr();
    let groups = nb / 8;
    for g in 0..groups {
        let b0 = g * 8;
        let gp = rp.add(b0 * Q8_0_BLOCK_BYTES);
        for l in 0..5 {
            _mm_prefetch::<_MM_HINT_T0>(gp.wrapping_add(PREFETCH_AHEAD + l * 64) as *const i8);
        }
        let sc = |k: usize| (gp.add(k * Q8_0_BLOCK_BYTES) as *const i16).read_unaligned();
        let dw = _mm256_cvtph_ps(_mm_setr_epi16(
            sc(0),
            sc(1),
            sc(2),
            sc(3),
            sc(4),
            sc(5),
            sc(6),
            sc(7),
        ));
        let mut dv = [_mm256_setzero_ps(); R];
        for (r, d) in dv.iter_mut().enumerate() {
            *d = _mm256_mul_ps(dw, _mm256_loadu_ps(xd.add(r * nb + b0)));
        }
        let block_k = |a: &mut [__m256; R], k: usize| {
            let w = _mm256_loadu_si256(gp.add(k * Q8_0_BLOCK_BYTES + 2) as *const __m256i);
            let aw = _mm256_sign_epi8(w, w);
            let idx = _mm256_set1_epi32(k as i32);
            for r in 0..R {
                let y = _mm256_loadu_si256(xq.add(r * n + (b0 + k) * Q8_0_BLOCK) as *const __m256i);
                let p32 = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(y, w)), ones);
                let d = _mm256_permutevar8x32_ps(dv[r], idx);
                a[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), d, a[r]);
            }
        };
        for k in (0..8).step_by(2) {
            block_k(&mut acc, k);
            block_k(&mut acc1, k + 1);
        }
    }
    // The blocks after the last whole group, one at a time.
    for b in groups * 8..nb {
        step(&mut acc, b, rp.add(b * Q8_0_BLOCK_BYTES));
    }
    for (a, a1) in acc.iter_mut().zip(acc1) {
        *a = _mm256_add_ps(*a, a1);
    }
    for (v, o) in acc.iter().zip(out.iter_mut()) {
        let v = *v;
        let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        let q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
        *o = _mm_cvtss_f32(q);
    }
}

/// Whether the AVX2 build of the Q8_0 kernels can run here (checked at run time).
fn q8_0_avx2_available() -> bool {
    crate::cpu_ops::avx2_fma()
}

/// One block of output rows of a Q8_0 product: `w` holds whole quantised rows of
/// `row_bytes` bytes, `x` the quantised activations, `out` is (block, rows); `avx2` picks the
/// AVX2 kernel (the caller checked [`q8_0_avx2_available`]).
fn block_q8_0(
    w: &[u8],
    x: &QuantRows,
    n: usize,
    row_bytes: usize,
    rows: usize,
    avx2: bool,
    out: &mut [f32],
) {
    with_rows!(rows, |R| {
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            for (wrow, o) in w.chunks_exact(row_bytes).zip(out.chunks_exact_mut(R)) {
                // SAFETY: the features are present; whole rows of `n / 32` blocks, `x` holds
                // `rows` rows of width `n`, `rows` outputs per weight row.
                unsafe { q8_0_row_avx2::<R>(wrow, x, n, o) };
            }
            return;
        }
        let _ = avx2;
        for (wrow, o) in w.chunks_exact(row_bytes).zip(out.chunks_exact_mut(R)) {
            q8_0_row_generic::<R>(wrow, x, n, o);
        }
    })
}

/// `x` (rows, in) · `w`ᵀ for a Q8_0 weight `w` (out, in) on the CPU -> (rows, out) f32, with at
/// most [`MAX_ROWS`] rows and `in` a multiple of 32.
///
/// Like llama.cpp's `ggml_vec_dot_q8_0_q8_0`, each activation row is quantised once per call to
/// Q8_0 (32 values per block with an f32 scale `absmax / 127`), and each weight block's dot with
/// it is an exact integer dot (AVX2 `maddubs`/`madd` when the processor has AVX2, FMA and F16C,
/// checked at run time; otherwise a generic loop with the same arithmetic), scaled by the
/// product of the two block scales. The error against the dequantised weight times f32
/// activations is at most `sum_b (dx_b / 2) · sum_i |w_bi|` (the activation rounding) plus f32
/// summation error. The work is split over rayon's pool like [`matvec`]. candle 0.11's CPU
/// product waits for its workers by spinning, which measured 4–5× slower per step than an
/// earlier version of this kernel on a 2-core machine shared with other processes (see
/// `BENCHMARKS.md`).
pub fn matvec_q8_0(x: &Tensor, w: &QTensor) -> candle_core::Result<Tensor> {
    let (rows, _) = x.dims2()?;
    let (out_dim, _) = w.shape().dims2()?;
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        candle_core::bail!(
            "segue-matvec-q8_0: unsupported product {:?} x {:?}ᵀ ({:?})",
            x.shape(),
            w.shape(),
            w.dtype()
        );
    }
    let x = x.contiguous()?;
    let mut y = vec![0f32; rows * out_dim];
    crate::cpu_ops::with_slice(&x, "segue-matvec-q8_0: activations", |xs: &[f32]| {
        matvec_q8_0_into(xs, rows, w, &mut Q8Scratch::default(), &mut y)
    })??;
    Tensor::from_vec(y, (rows, out_dim), x.device())
}

/// The Q8_0 product on slices into caller-owned buffers: `xs` (rows, inner) f32, `data` the
/// (out_dim, inner) Q8_0 weight bytes (checked by the caller); `xq` holds the quantised
/// activations (grown on first use, then reused), `y` (rows, out_dim).
fn q8_0_into(
    xs: &[f32],
    rows: usize,
    data: &[u8],
    inner: usize,
    xq: &mut QuantRows,
    avx2: bool,
    y: &mut [f32],
) {
    let row_bytes = inner / Q8_0_BLOCK * Q8_0_BLOCK_BYTES;
    let out_dim = data.len() / row_bytes;
    xq.quantize(xs, avx2);
    let xq = &*xq;
    par_blocks(rows, out_dim, y, |first, n, buf| {
        let wb = &data[first * row_bytes..(first + n) * row_bytes];
        block_q8_0(wb, xq, inner, row_bytes, rows, avx2, buf);
    });
}

/// Scratch of a Q8_0 product that a caller keeps between products (a decoder step): the
/// quantised activations.
#[derive(Debug, Default)]
pub struct Q8Scratch(QuantRows);

/// Checks the operands of a quantised product `x` (rows, inner) · `w`ᵀ into `y` (rows, out):
/// `w` of type `dtype` in host memory, `inner` a multiple of `block` values (`block_bytes`
/// bytes each), 1..=[`MAX_ROWS`] rows. Returns `(out, inner, w's bytes)`.
fn quantized_operands<'w>(
    name: &str,
    w: &'w QTensor,
    dtype: GgmlDType,
    (block, block_bytes): (usize, usize),
    (x_len, rows, y_len): (usize, usize, usize),
) -> candle_core::Result<(usize, usize, &'w [u8])> {
    let (out_dim, inner) = w.shape().dims2()?;
    if w.dtype() != dtype
        || !inner.is_multiple_of(block)
        || rows == 0
        || rows > MAX_ROWS
        || x_len != rows * inner
        || y_len != rows * out_dim
    {
        candle_core::bail!(
            "{name}: unsupported product ({rows}, {}) x {:?}ᵀ ({:?}) into {y_len}",
            x_len / rows.max(1),
            w.shape(),
            w.dtype(),
        );
    }
    let std::borrow::Cow::Borrowed(data) = w.data()? else {
        candle_core::bail!("{name}: weight not in host memory");
    };
    if data.len() != out_dim * (inner / block * block_bytes) {
        candle_core::bail!(
            "{name}: {} bytes for a ({out_dim}, {inner}) {dtype:?} weight",
            data.len()
        );
    }
    Ok((out_dim, inner, data))
}

/// `y` (rows, out) = `x` (rows, inner) · `w`ᵀ for a Q8_0 weight `w` (out, inner) on the CPU,
/// as [`matvec_q8_0`] but on slices and into caller-owned `y`, with `scratch` reused between
/// calls (no allocation once it has grown to the widest input). Errors when `w` is not a CPU
/// Q8_0 weight of width `inner` (a multiple of 32) or `rows` is outside `1..=MAX_ROWS`.
pub fn matvec_q8_0_into(
    x: &[f32],
    rows: usize,
    w: &QTensor,
    scratch: &mut Q8Scratch,
    y: &mut [f32],
) -> candle_core::Result<()> {
    let (_, inner, data) = quantized_operands(
        "segue-matvec-q8_0",
        w,
        GgmlDType::Q8_0,
        (Q8_0_BLOCK, Q8_0_BLOCK_BYTES),
        (x.len(), rows, y.len()),
    )?;
    q8_0_into(
        x,
        rows,
        data,
        inner,
        &mut scratch.0,
        q8_0_avx2_available(),
        y,
    );
    Ok(())
}

/// Scratch of a Q4K product that a caller keeps between products: the activations quantised to
/// Q8K (ggml's 256-value blocks with 16-value sums), grown on first use.
#[derive(Debug, Default)]
pub struct Q4KScratch(Vec<BlockQ8K>);

/// `y` (rows, out) = `x` (rows, inner) · `w`ᵀ for a Q4K weight `w` (out, inner) on the CPU,
/// into caller-owned `y`: each activation row quantised once to Q8K, each weight row's block
/// dots computed by ggml's Q4K×Q8K kernel (candle's `vec_dot`, AVX2 where compiled in), the
/// output rows split over rayon's pool like [`matvec_into`]. candle's own product does the same
/// arithmetic but hands its work to threads that wait by spinning, which on a 2-core machine
/// made Q4K steps slower than Q8_0's (see `BENCHMARKS.md`). Errors when `w` is not a CPU Q4K
/// weight of width `inner` (a multiple of 256) or `rows` is outside `1..=MAX_ROWS`.
pub fn matvec_q4k_into(
    x: &[f32],
    rows: usize,
    w: &QTensor,
    scratch: &mut Q4KScratch,
    y: &mut [f32],
) -> candle_core::Result<()> {
    const QK_K: usize = 256;
    let (out_dim, inner, data) = quantized_operands(
        "segue-matvec-q4k",
        w,
        GgmlDType::Q4K,
        (QK_K, std::mem::size_of::<BlockQ4K>()),
        (x.len(), rows, y.len()),
    )?;
    let nb = inner / QK_K;
    if !(data.as_ptr() as usize).is_multiple_of(std::mem::align_of::<BlockQ4K>()) {
        candle_core::bail!("segue-matvec-q4k: weight bytes not aligned for Q4K blocks");
    }
    // SAFETY: candle stores a Q4K tensor as a `Vec<BlockQ4K>` (plain data, `repr(C)`): the
    // length and alignment were checked above.
    let blocks: &[BlockQ4K] =
        unsafe { std::slice::from_raw_parts(data.as_ptr() as *const BlockQ4K, out_dim * nb) };
    let xq = &mut scratch.0;
    if xq.len() < rows * nb {
        xq.resize(rows * nb, BlockQ8K::zeros());
    }
    for (xr, qr) in x.chunks_exact(inner).zip(xq.chunks_exact_mut(nb)) {
        BlockQ8K::from_float(xr, qr);
    }
    let xq = &xq[..rows * nb];
    let avx2 = q8_0_avx2_available();
    par_blocks(rows, out_dim, y, |first, n, buf| {
        for (j, o) in buf.chunks_exact_mut(rows).enumerate().take(n) {
            let row = &blocks[(first + j) * nb..(first + j + 1) * nb];
            q4k_row(row, xq, nb, avx2, o);
        }
    });
    Ok(())
}

/// The dots of one Q4K weight row (`row`: `nb` blocks) with every quantised activation row
/// (`xq`: `out.len()` rows of `nb` Q8K blocks) into `out`: [`q4k_row_avx2`] when `avx2`
/// ([`q8_0_avx2_available`]) and at most [`MAX_ROWS`] rows, else candle's block dot per row.
fn q4k_row(row: &[BlockQ4K], xq: &[BlockQ8K], nb: usize, avx2: bool, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2 && (1..=MAX_ROWS).contains(&out.len()) {
        // SAFETY: the features were checked; `row` holds `nb` blocks and `xq` `out.len()` rows
        // of `nb`.
        with_rows!(out.len(), |R| unsafe {
            q4k_row_avx2::<R>(row, xq, nb, out)
        });
        return;
    }
    let _ = avx2;
    for (r, v) in out.iter_mut().enumerate() {
        *v = BlockQ4K::vec_dot(nb * 256, row, &xq[r * nb..(r + 1) * nb]);
    }
}

// The byte layout `q4k_row_avx2` reads (both types are `repr(C)`): `BlockQ4K` = f16 d, f16
// dmin, 12 bytes of packed 6-bit scales and mins, 128 bytes of 4-bit weights; `BlockQ8K` = f32
// d, 256 int8, 16 i16 sums of 16.
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);
const _: () = assert!(std::mem::size_of::<BlockQ8K>() == 292);

/// ggml's AVX2 Q4K×Q8K block dot (`ggml_vec_dot_q4_K_q8_K`) for `R` activation rows at once:
/// each weight block's 4-bit values, scales and mins are unpacked once and used for every row
/// (candle's `vec_dot` unpacks them once per row). Same integer arithmetic, so the same result
/// up to the order of the f32 sums.
///
/// # Safety
/// AVX2, FMA and F16C must be present; `row.len() >= nb`, `xq.len() >= R * nb`,
/// `out.len() >= R`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_row_avx2<const R: usize>(
    row: &[BlockQ4K],
    xq: &[BlockQ8K],
    nb: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    const KMASK1: u32 = 0x3f3f_3f3f;
    const KMASK2: u32 = 0x0f0f_0f0f;
    const KMASK3: u32 = 0x0303_0303;
    let f16 = |p: *const u8| {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
            (p as *const u16).read_unaligned(),
        ))))
    };
    let m4 = _mm256_set1_epi8(0xF);
    let mut acc = [_mm256_setzero_ps(); R];
    let mut acc_m = [_mm_setzero_ps(); R];
    let wp = row.as_ptr() as *const u8;
    let yp = xq.as_ptr() as *const u8;
    let ybytes = std::mem::size_of::<BlockQ8K>();
    for i in 0..nb {
        let bp = wp.add(i * 144);
        let d = f16(bp);
        let dmin = f16(bp.add(2));
        let sp = bp.add(4) as *const u32;
        let mut utmp = [
            sp.read_unaligned(),
            sp.add(1).read_unaligned(),
            sp.add(2).read_unaligned(),
            0,
        ];
        utmp[3] = ((utmp[2] >> 4) & KMASK2) | (((utmp[1] >> 6) & KMASK3) << 4);
        let uaux = utmp[1] & KMASK1;
        utmp[1] = (utmp[2] & KMASK2) | (((utmp[0] >> 6) & KMASK3) << 4);
        utmp[2] = uaux;
        utmp[0] &= KMASK1;
        // Eight 6-bit scales (low half) and eight mins (high half) as i16.
        let mins_and_scales = _mm256_cvtepu8_epi16(_mm_set_epi32(
            utmp[3] as i32,
            utmp[2] as i32,
            utmp[1] as i32,
            utmp[0] as i32,
        ));
        let sc128 = _mm256_castsi256_si128(mins_and_scales);
        let scales = _mm256_set_m128i(sc128, sc128);
        let mins = _mm256_extracti128_si256(mins_and_scales, 1);
        let mut sumi = [_mm256_setzero_si256(); R];
        for j in 0..4 {
            // Sub-blocks 2j (low nibbles) and 2j + 1 (high nibbles) of 32 values each.
            // The i16 scale k sits in bytes 2k, 2k + 1 of `scales`' halves.
            let sl = (4 * j) as i16 | (((4 * j + 1) as i16) << 8);
            let sh = (4 * j + 2) as i16 | (((4 * j + 3) as i16) << 8);
            let scale_l = _mm256_shuffle_epi8(scales, _mm256_set1_epi16(sl));
            let scale_h = _mm256_shuffle_epi8(scales, _mm256_set1_epi16(sh));
            let q4bits = _mm256_loadu_si256(bp.add(16 + 32 * j) as *const __m256i);
            let q4l = _mm256_and_si256(q4bits, m4);
            let q4h = _mm256_and_si256(_mm256_srli_epi16(q4bits, 4), m4);
            for (r, s) in sumi.iter_mut().enumerate() {
                let q8 = yp.add((r * nb + i) * ybytes + 4 + 64 * j);
                let q8l = _mm256_loadu_si256(q8 as *const __m256i);
                let q8h = _mm256_loadu_si256(q8.add(32) as *const __m256i);
                let pl = _mm256_madd_epi16(scale_l, _mm256_maddubs_epi16(q4l, q8l));
                let ph = _mm256_madd_epi16(scale_h, _mm256_maddubs_epi16(q4h, q8h));
                *s = _mm256_add_epi32(*s, _mm256_add_epi32(pl, ph));
            }
        }
        for r in 0..R {
            let y = yp.add((r * nb + i) * ybytes);
            let yd = (y as *const f32).read_unaligned();
            let q8sums = _mm256_loadu_si256(y.add(260) as *const __m256i);
            let q8s = _mm_hadd_epi16(
                _mm256_castsi256_si128(q8sums),
                _mm256_extracti128_si256(q8sums, 1),
            );
            let prod = _mm_madd_epi16(mins, q8s);
            acc_m[r] = _mm_fmadd_ps(_mm_set1_ps(-yd * dmin), _mm_cvtepi32_ps(prod), acc_m[r]);
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(yd * d), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
        }
    }
    for r in 0..R {
        let v = acc[r];
        let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let q = _mm_add_ps(q, acc_m[r]);
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        let q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
        out[r] = _mm_cvtss_f32(q);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The Q8_0 product on slices: `xs` (rows, inner) f32, `data` the (out_dim, inner) Q8_0 weight
    /// bytes (checked by the caller), -> (rows, out_dim). `avx2` requires
    /// [`q8_0_avx2_available`].
    fn q8_0_product(
        xs: &[f32],
        data: &[u8],
        rows: usize,
        inner: usize,
        out_dim: usize,
        avx2: bool,
    ) -> Vec<f32> {
        let mut xq = QuantRows::default();
        let mut y = vec![0f32; rows * out_dim];
        q8_0_into(xs, rows, data, inner, &mut xq, avx2, &mut y);
        y
    }

    fn quantize_q8_0(x: &[f32], avx2: bool) -> QuantRows {
        let mut q = QuantRows::default();
        q.quantize(x, avx2);
        q
    }

    #[test]
    fn equals_matmul_for_every_row_count_and_odd_widths() {
        let dev = Device::Cpu;
        for (out, inner) in [(130usize, 77usize), (64, 8), (5, 3), (300, 1024)] {
            let w = Tensor::randn(0f32, 1.0, (out, inner), &dev).unwrap();
            for rows in 1..=MAX_ROWS {
                let x = Tensor::randn(0f32, 1.0, (rows, inner), &dev).unwrap();
                assert!(applies(&x, &w));
                let got = matvec(&x, &w).unwrap();
                let want = x.matmul(&w.t().unwrap()).unwrap();
                assert_eq!(got.dims(), &[rows, out]);
                let err: f32 = (got - want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar()
                    .unwrap();
                assert!(err < 1e-3, "out {out} in {inner} rows {rows}: {err}");
            }
        }
        let x = Tensor::zeros((MAX_ROWS + 1, 4), DType::F32, &dev).unwrap();
        assert!(!applies(
            &x,
            &Tensor::zeros((4, 4), DType::F32, &dev).unwrap()
        ));
    }

    /// The Q8_0 kernel (activations quantised to Q8_0) is within the activation rounding's
    /// bound of candle's dequantised weight times f32 activations: per output,
    /// `sum_b (dx_b / 2) · sum_i |w_bi|` plus 1e-5 of `sum_i |w_i x_i|` for f32 summation.
    #[test]
    fn q8_0_within_the_activation_rounding_bound_of_the_dequantised_product() {
        let dev = Device::Cpu;
        for (out, inner) in [(130usize, 96usize), (64, 32), (300, 1024)] {
            let w = Tensor::randn(0f32, 1.0, (out, inner), &dev).unwrap();
            let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
            let wd: Vec<f32> = q
                .dequantize(&dev)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for rows in 1..=MAX_ROWS {
                let x = Tensor::randn(0f32, 1.0, (rows, inner), &dev).unwrap();
                let got: Vec<f32> = matvec_q8_0(&x, &q)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let xq = quantize_q8_0(&xv, false);
                // The activation rounding itself: |x - d q| <= d / 2.
                for (i, &v) in xv.iter().enumerate() {
                    let d = xq.ds[i / Q8_0_BLOCK];
                    let e = (v - d * f32::from(xq.qs[i])).abs();
                    assert!(e <= d * 0.5001 + 1e-7, "x[{i}] = {v}: error {e}, d {d}");
                }
                assert_eq!(got.len(), rows * out);
                let nb = inner / Q8_0_BLOCK;
                let mut worst = 0f64;
                for r in 0..rows {
                    for o in 0..out {
                        let wr = &wd[o * inner..(o + 1) * inner];
                        let xr = &xv[r * inner..(r + 1) * inner];
                        let want: f64 = wr
                            .iter()
                            .zip(xr)
                            .map(|(&a, &b)| f64::from(a) * f64::from(b))
                            .sum();
                        let mag: f64 = wr
                            .iter()
                            .zip(xr)
                            .map(|(&a, &b)| f64::from((a * b).abs()))
                            .sum();
                        let bound: f64 = (0..nb)
                            .map(|b| {
                                let dx = f64::from(xq.ds[r * nb + b]);
                                let aw: f64 = wr[b * Q8_0_BLOCK..(b + 1) * Q8_0_BLOCK]
                                    .iter()
                                    .map(|v| f64::from(v.abs()))
                                    .sum();
                                dx / 2.0 * aw
                            })
                            .sum::<f64>()
                            + 1e-5 * mag
                            + 1e-6;
                        let err = (f64::from(got[r * out + o]) - want).abs();
                        assert!(
                            err <= bound,
                            "out {out} in {inner} rows {rows} ({r}, {o}): {err} > {bound}"
                        );
                        worst = worst.max(err / bound);
                    }
                }
                // The bound is not vacuous: the rounding error is a sizeable part of it.
                assert!(
                    worst > 0.01,
                    "out {out} in {inner} rows {rows}: worst {worst}"
                );
            }
        }
        // Not Q8_0, or too many rows: an error, not a panic.
        let w = Tensor::randn(0f32, 1.0, (8, 256), &dev).unwrap();
        let q4 = QTensor::quantize(&w, GgmlDType::Q4K).unwrap();
        let x = Tensor::zeros((2, 256), DType::F32, &dev).unwrap();
        assert!(matvec_q8_0(&x, &q4).is_err());
        let q8 = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let x = Tensor::zeros((MAX_ROWS + 1, 256), DType::F32, &dev).unwrap();
        assert!(matvec_q8_0(&x, &q8).is_err());
    }

    /// The AVX2 kernel and the generic one compute the same sums (integer block dots, f32
    /// scale products) and differ only in f32 summation order: within 1e-5 of `sum |w x|`.
    /// Our Q4K product equals candle's `QMatMul` (same quantisation of the activations, same
    /// block kernel) for every row count.
    #[test]
    fn q4k_equals_candles_product() {
        let dev = Device::Cpu;
        let (out, inner) = (70usize, 512usize);
        let w = Tensor::randn(0f32, 1.0, (out, inner), &dev).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4K).unwrap();
        let mm = candle_core::quantized::QMatMul::from_qtensor(
            QTensor::quantize(&w, GgmlDType::Q4K).unwrap(),
        )
        .unwrap();
        let mut scratch = Q4KScratch::default();
        for rows in 1..=MAX_ROWS {
            let x = Tensor::randn(0f32, 1.0, (rows, inner), &dev).unwrap();
            let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let mut y = vec![0f32; rows * out];
            matvec_q4k_into(&xv, rows, &q, &mut scratch, &mut y).unwrap();
            let want: Vec<f32> = candle_core::Module::forward(&mm, &x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * scale,
                    "rows {rows}, {i}: {a} vs {b}"
                );
            }
        }
        // Wrong format or width: an error, not a panic.
        let q8 = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let mut y = vec![0f32; out];
        assert!(matvec_q4k_into(&vec![0.0; inner], 1, &q8, &mut scratch, &mut y).is_err());
        assert!(matvec_q4k_into(&vec![0.0; inner - 1], 1, &q, &mut scratch, &mut y).is_err());
    }

    #[test]
    fn q8_0_avx2_equals_generic() {
        if !q8_0_avx2_available() {
            eprintln!("AVX2/FMA/F16C absent: only the generic Q8_0 kernel can run here");
            return;
        }
        let dev = Device::Cpu;
        for (out, inner) in [(130usize, 96usize), (64, 32), (300, 1024), (70, 320)] {
            let w = Tensor::randn(0f32, 1.0, (out, inner), &dev).unwrap();
            let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
            let data = q.data().unwrap();
            let wd: Vec<f32> = q
                .dequantize(&dev)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for rows in 1..=MAX_ROWS {
                let x: Vec<f32> = Tensor::randn(0f32, 1.0, (rows, inner), &dev)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let a = quantize_q8_0(&x, true);
                let g = quantize_q8_0(&x, false);
                assert_eq!(a.qs, g.qs);
                assert_eq!(a.ds, g.ds);
                let fast = q8_0_product(&x, &data, rows, inner, out, true);
                let slow = q8_0_product(&x, &data, rows, inner, out, false);
                for r in 0..rows {
                    for o in 0..out {
                        let mag: f32 = wd[o * inner..(o + 1) * inner]
                            .iter()
                            .zip(&x[r * inner..(r + 1) * inner])
                            .map(|(a, b)| (a * b).abs())
                            .sum();
                        let (f, s) = (fast[r * out + o], slow[r * out + o]);
                        assert!(
                            (f - s).abs() <= 1e-5 * mag + 1e-6,
                            "rows {rows} ({r}, {o}): {f} vs {s}"
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod throughput {
    use super::*;

    /// Not a test: prints the Q8_0 kernel's throughput on weights resident in cache and
    /// streamed from memory. `cargo test --release -p segue-engine --lib q8_0_throughput --
    /// --ignored --nocapture`.
    #[test]
    #[ignore]
    fn q8_0_throughput() {
        let dev = candle_core::Device::Cpu;
        for (mats, out, inner) in [
            (1usize, 256usize, 1024usize),
            (1, 1024, 1024),
            (96, 4096, 1024),
        ] {
            let ws: Vec<QTensor> = (0..mats)
                .map(|_| {
                    let w = Tensor::randn(0f32, 1.0, (out, inner), &dev).unwrap();
                    QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()
                })
                .collect();
            let x = vec![0.5f32; 2 * inner];
            let mut y = vec![0f32; 2 * out];
            let mut s = Q8Scratch::default();
            let bytes = out * inner / 32 * 34;
            let reps = (2_000_000_000 / (bytes * mats)).max(1);
            let t = std::time::Instant::now();
            rayon::scope(|_| {
                for _ in 0..reps {
                    for w in &ws {
                        matvec_q8_0_into(&x, 2, w, &mut s, &mut y).unwrap();
                    }
                }
            });
            let secs = t.elapsed().as_secs_f64();
            println!(
                "{mats} x ({out}, {inner}): {:.1} GB/s, {:.1} us per product",
                (bytes * mats * reps) as f64 / secs / 1e9,
                secs / (reps * mats) as f64 * 1e6
            );
        }
    }
}
