//! A CPU kernel for the decoder's per-step shape: a few activation rows times a large weight
//! matrix (`y = x · Wᵀ`, `x` (rows, in), `W` (out, in)).
//!
//! A decoder step is bound by memory bandwidth: every weight is read once and used for only
//! `rows` (2 per take with guidance) multiply-adds. candle's general matmul is built for large
//! products and reaches a fraction of the bandwidth on this shape; this kernel streams each
//! weight row once, computes its dot products with every activation row while it is in L1, and
//! splits the output rows across threads. On x86-64 it uses AVX2/FMA when the processor has them
//! (checked at run time).

use candle_core::{CpuStorage, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Largest number of activation rows the kernel takes; more rows go to the general matmul.
pub const MAX_ROWS: usize = 8;

/// Output rows per parallel task.
const BLOCK: usize = 64;

struct MatVec;

/// `acc[r] = sum_i w[i] * x[r][i]` over one weight row, eight lanes at a time.
#[inline(always)]
fn dot_rows(w: &[f32], x: &[f32], rows: usize, out: &mut [f32]) {
    let n = w.len();
    let main = n - n % 8;
    for (r, o) in out.iter_mut().enumerate().take(rows) {
        let xr = &x[r * n..(r + 1) * n];
        let mut acc = [0f32; 8];
        for (wc, xc) in w[..main].chunks_exact(8).zip(xr[..main].chunks_exact(8)) {
            for j in 0..8 {
                acc[j] = wc[j].mul_add(xc[j], acc[j]);
            }
        }
        let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        for i in main..n {
            s = w[i].mul_add(xr[i], s);
        }
        *o = s;
    }
}

/// One block of output rows: `out` is (block, rows).
#[inline(always)]
fn block_generic(w: &[f32], x: &[f32], inner: usize, rows: usize, out: &mut [f32]) {
    for (wrow, o) in w.chunks_exact(inner).zip(out.chunks_exact_mut(rows)) {
        dot_rows(wrow, x, rows, o);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2(w: &[f32], x: &[f32], inner: usize, rows: usize, out: &mut [f32]) {
    block_generic(w, x, inner, rows, out)
}

fn block(w: &[f32], x: &[f32], inner: usize, rows: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the processor supports the features the function is compiled for.
            return unsafe { block_avx2(w, x, inner, rows, out) };
        }
    }
    block_generic(w, x, inner, rows, out)
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
        // (out, rows), filled in parallel blocks of output rows.
        let mut tmp = vec![0f32; out_dim * rows];
        tmp.par_chunks_mut(BLOCK * rows)
            .zip(w.par_chunks(BLOCK * inner))
            .for_each(|(o, wb)| block(wb, x, inner, rows, o));
        let mut y = vec![0f32; rows * out_dim];
        for (o, vals) in tmp.chunks_exact(rows).enumerate() {
            for (r, &v) in vals.iter().enumerate() {
                y[r * out_dim + o] = v;
            }
        }
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
}
