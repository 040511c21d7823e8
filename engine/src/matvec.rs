//! A CPU kernel for the decoder's per-step shape: a few activation rows times a large weight
//! matrix (`y = x · Wᵀ`, `x` (rows, in), `W` (out, in)).
//!
//! A decoder step is bound by memory bandwidth: every weight is read once and used for only
//! `rows` (2 per take with guidance) multiply-adds. candle's general matmul is built for large
//! products and reaches a fraction of the bandwidth on this shape; this kernel streams each
//! weight row once, computes its dot products with every activation row while it is in L1, and
//! splits the output rows across threads. On x86-64 it uses AVX2/FMA when the processor has them
//! (checked at run time).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Largest number of activation rows the kernel takes; more rows go to the general matmul.
pub const MAX_ROWS: usize = 8;

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
    macro_rules! run {
        ($r:literal) => {{
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    for (wrow, o) in w.chunks_exact(inner).zip(out.chunks_exact_mut($r)) {
                        // SAFETY: the features are present; the slices have the lengths the
                        // function requires (whole rows, `rows` outputs per weight row).
                        unsafe { dot_rows_avx2::<$r>(wrow, x, o) };
                    }
                    return;
                }
            }
            for (wrow, o) in w.chunks_exact(inner).zip(out.chunks_exact_mut($r)) {
                dot_rows_generic::<$r>(wrow, x, o);
            }
        }};
    }
    match rows {
        1 => run!(1),
        2 => run!(2),
        3 => run!(3),
        4 => run!(4),
        5 => run!(5),
        6 => run!(6),
        7 => run!(7),
        _ => run!(8),
    }
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
        // (rows, out): each parallel task computes a block of output columns into a stack
        // buffer laid out (block, rows) and scatters it into its own columns of `y`.
        let mut y = vec![0f32; rows * out_dim];
        let dst = SendPtr(y.as_mut_ptr());
        w.par_chunks(BLOCK * inner)
            .enumerate()
            .for_each(|(bi, wb)| {
                let n = wb.len() / inner;
                let mut buf = [0f32; BLOCK * MAX_ROWS];
                block(wb, x, inner, rows, &mut buf[..n * rows]);
                let dst = &dst;
                for (j, vals) in buf[..n * rows].chunks_exact(rows).enumerate() {
                    for (r, &v) in vals.iter().enumerate() {
                        // SAFETY: column bi * BLOCK + j < out_dim of row r < rows is inside
                        // `y`, and no other task writes the columns of block `bi`.
                        unsafe { *dst.0.add(r * out_dim + bi * BLOCK + j) = v };
                    }
                }
            });
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

/// Bytes of one Q8_0 block: an f16 scale and 32 signed 8-bit weights (ggml's `block_q8_0`).
const Q8_0_BLOCK_BYTES: usize = 34;
/// Weights per Q8_0 block.
const Q8_0_BLOCK: usize = 32;

/// The f32 scale of a Q8_0 block (its first two bytes, an f16, little-endian).
#[inline(always)]
fn q8_0_scale(block: &[u8]) -> f32 {
    half::f16::from_le_bytes([block[0], block[1]]).to_f32()
}

/// `out[r] = sum_i w[i] * x[r][i]` over one Q8_0 weight row (`row`: its blocks) and `R`
/// activation rows of width `n` (f32, not quantised).
#[inline(always)]
fn q8_0_row_generic<const R: usize>(row: &[u8], x: &[f32], n: usize, out: &mut [f32]) {
    let mut acc = [0f32; R];
    for (b, block) in row.chunks_exact(Q8_0_BLOCK_BYTES).enumerate() {
        let d = q8_0_scale(block);
        let qs = &block[2..];
        for (r, a) in acc.iter_mut().enumerate() {
            let xr = &x[r * n + b * Q8_0_BLOCK..r * n + (b + 1) * Q8_0_BLOCK];
            let mut s = 0f32;
            for (q, xv) in qs.iter().zip(xr) {
                s += f32::from(*q as i8) * xv;
            }
            *a += d * s;
        }
    }
    out[..R].copy_from_slice(&acc);
}

/// [`q8_0_row_generic`] with AVX2/FMA: each block's 32 weights are widened to f32 once, scaled,
/// and multiplied into every activation row (two accumulator chains per row).
///
/// # Safety
/// The processor must support AVX2 and FMA; `row` holds `n / 32` whole blocks,
/// `x.len() >= R * n`, `out.len() >= R`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn q8_0_row_avx2<const R: usize>(row: &[u8], x: &[f32], n: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut a0 = [_mm256_setzero_ps(); R];
    let mut a1 = [_mm256_setzero_ps(); R];
    let xp = x.as_ptr();
    for (b, block) in row.chunks_exact(Q8_0_BLOCK_BYTES).enumerate() {
        let d = _mm256_set1_ps(q8_0_scale(block));
        let q = block.as_ptr().add(2);
        // 32 i8 -> 4 × 8 f32, scaled.
        let w = [0, 8, 16, 24].map(|o| {
            let i = _mm256_cvtepi8_epi32(_mm_loadl_epi64(q.add(o) as *const __m128i));
            _mm256_mul_ps(_mm256_cvtepi32_ps(i), d)
        });
        let base = b * Q8_0_BLOCK;
        for r in 0..R {
            let xr = xp.add(r * n + base);
            a0[r] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xr), a0[r]);
            a1[r] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xr.add(8)), a1[r]);
            a0[r] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xr.add(16)), a0[r]);
            a1[r] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xr.add(24)), a1[r]);
        }
    }
    for r in 0..R {
        let v = _mm256_add_ps(a0[r], a1[r]);
        let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        let q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
        out[r] = _mm_cvtss_f32(q);
    }
}

/// One block of output rows of a Q8_0 product: `w` holds whole quantised rows of
/// `row_bytes` bytes, `out` is (block, rows).
fn block_q8_0(w: &[u8], x: &[f32], n: usize, row_bytes: usize, rows: usize, out: &mut [f32]) {
    macro_rules! run {
        ($r:literal) => {{
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    for (wrow, o) in w.chunks_exact(row_bytes).zip(out.chunks_exact_mut($r)) {
                        // SAFETY: the features are present; whole rows of `n / 32` blocks,
                        // `x` holds `rows` rows of width `n`, `rows` outputs per weight row.
                        unsafe { q8_0_row_avx2::<$r>(wrow, x, n, o) };
                    }
                    return;
                }
            }
            for (wrow, o) in w.chunks_exact(row_bytes).zip(out.chunks_exact_mut($r)) {
                q8_0_row_generic::<$r>(wrow, x, n, o);
            }
        }};
    }
    match rows {
        1 => run!(1),
        2 => run!(2),
        3 => run!(3),
        4 => run!(4),
        5 => run!(5),
        6 => run!(6),
        7 => run!(7),
        _ => run!(8),
    }
}

/// `x` (rows, in) · `w`ᵀ for a Q8_0 weight `w` (out, in) on the CPU -> (rows, out) f32, with at
/// most [`MAX_ROWS`] rows and `in` a multiple of 32.
///
/// Unlike candle's Q8_0 product, the activations stay f32 (each weight block is widened
/// instead of quantising `x` to 8 bits: closer to the f32 result), and the work is split over
/// rayon's pool like [`matvec`]. candle 0.11's CPU product waits for its workers by spinning,
/// which measured 4–5× slower per step than this on a 2-core machine shared with other
/// processes (see `BENCHMARKS.md`).
pub fn matvec_q8_0(x: &Tensor, w: &QTensor) -> candle_core::Result<Tensor> {
    let (rows, inner) = x.dims2()?;
    let (out_dim, inner_w) = w.shape().dims2()?;
    if w.dtype() != GgmlDType::Q8_0
        || !x.device().is_cpu()
        || x.dtype() != DType::F32
        || inner != inner_w
        || !inner.is_multiple_of(Q8_0_BLOCK)
        || rows == 0
        || rows > MAX_ROWS
    {
        candle_core::bail!(
            "segue-matvec-q8_0: unsupported product {:?} x {:?}ᵀ ({:?})",
            x.shape(),
            w.shape(),
            w.dtype()
        );
    }
    let data = w.data()?;
    let row_bytes = inner / Q8_0_BLOCK * Q8_0_BLOCK_BYTES;
    if data.len() != out_dim * row_bytes {
        candle_core::bail!(
            "segue-matvec-q8_0: {} bytes for a ({out_dim}, {inner}) Q8_0 weight",
            data.len()
        );
    }
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("segue-matvec-q8_0: activations not on the CPU");
    };
    let Some((o1, o2)) = layout.contiguous_offsets() else {
        candle_core::bail!("segue-matvec-q8_0: activations not contiguous");
    };
    let xs = &cpu.as_slice::<f32>()?[o1..o2];
    let mut y = vec![0f32; rows * out_dim];
    let dst = SendPtr(y.as_mut_ptr());
    data.par_chunks(BLOCK * row_bytes)
        .enumerate()
        .for_each(|(bi, wb)| {
            let n = wb.len() / row_bytes;
            let mut buf = [0f32; BLOCK * MAX_ROWS];
            block_q8_0(wb, xs, inner, row_bytes, rows, &mut buf[..n * rows]);
            let dst = &dst;
            for (j, vals) in buf[..n * rows].chunks_exact(rows).enumerate() {
                for (r, &v) in vals.iter().enumerate() {
                    // SAFETY: as in `MatVec::cpu_fwd`: inside `y`, columns owned by block `bi`.
                    unsafe { *dst.0.add(r * out_dim + bi * BLOCK + j) = v };
                }
            }
        });
    drop(storage);
    Tensor::from_vec(y, (rows, out_dim), x.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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

    /// The Q8_0 kernel equals candle's dequantised weight times f32 activations (it does not
    /// quantise the activations), for every row count.
    #[test]
    fn q8_0_equals_the_dequantised_product() {
        let dev = Device::Cpu;
        for (out, inner) in [(130usize, 96usize), (64, 32), (300, 1024)] {
            let w = Tensor::randn(0f32, 1.0, (out, inner), &dev).unwrap();
            let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
            let wd = q.dequantize(&dev).unwrap();
            for rows in 1..=MAX_ROWS {
                let x = Tensor::randn(0f32, 1.0, (rows, inner), &dev).unwrap();
                let got = matvec_q8_0(&x, &q).unwrap();
                let want = x.matmul(&wd.t().unwrap()).unwrap();
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
        // Not Q8_0, or too many rows: an error, not a panic.
        let w = Tensor::randn(0f32, 1.0, (8, 256), &dev).unwrap();
        let q4 = QTensor::quantize(&w, GgmlDType::Q4K).unwrap();
        let x = Tensor::zeros((2, 256), DType::F32, &dev).unwrap();
        assert!(matvec_q8_0(&x, &q4).is_err());
        let q8 = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let x = Tensor::zeros((MAX_ROWS + 1, 256), DType::F32, &dev).unwrap();
        assert!(matvec_q8_0(&x, &q8).is_err());
    }
}
