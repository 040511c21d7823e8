//! Residual vector quantiser with Euclidean codebooks. Mirrors `EncodecEuclideanCodebook`,
//! `EncodecVectorQuantization` and `EncodecResidualVectorQuantizer` in transformers'
//! `models/encodec/modeling_encodec.py`. Only `embed` is used at inference (`embed_avg`,
//! `cluster_size` and `inited` are training state and are not loaded).

use candle_core::{DType, Tensor, D};
use candle_nn::VarBuilder;

use super::weights::get;
use super::CodecError;

#[derive(Clone, Debug)]
struct Codebook {
    /// (codebook_size, codebook_dim)
    embed: Tensor,
    /// (codebook_dim, codebook_size): `embed` transposed, contiguous, for the distance matmul.
    embed_t: Tensor,
    /// (1, codebook_size): squared norm of every entry.
    embed_sq: Tensor,
}

impl Codebook {
    fn new(size: usize, dim: usize, vb: VarBuilder) -> Result<Self, CodecError> {
        let embed = get(&vb.pp("codebook"), &[size, dim], "embed")?.contiguous()?;
        let embed_t = embed.t()?.contiguous()?;
        let embed_sq = embed.sqr()?.sum_keepdim(1)?.t()?.contiguous()?;
        Ok(Self {
            embed,
            embed_t,
            embed_sq,
        })
    }

    /// Nearest entry of each row: (n, dim) f32 -> (n,) u32. Distances as the reference computes
    /// them: `|x|^2 - 2 x.e + |e|^2`.
    fn encode(&self, xs: &Tensor) -> Result<Tensor, CodecError> {
        let x_sq = xs.sqr()?.sum_keepdim(1)?; // (n, 1)
        let dots = xs.matmul(&self.embed_t)?; // (n, size)
        let dist = x_sq
            .broadcast_sub(&(dots * 2.0)?)?
            .broadcast_add(&self.embed_sq)?;
        Ok(dist.argmin(D::Minus1)?)
    }

    /// (n,) u32 -> (n, dim)
    fn decode(&self, ids: &Tensor) -> Result<Tensor, CodecError> {
        Ok(self.embed.index_select(ids, 0)?)
    }
}

/// The residual vector quantiser: `num_quantizers` codebooks applied one after the other to what
/// the previous ones left unexplained.
#[derive(Clone, Debug)]
pub struct ResidualVectorQuantizer {
    layers: Vec<Codebook>,
    codebook_size: usize,
    dim: usize,
}

impl ResidualVectorQuantizer {
    /// `vb` is the codec root's `.pp("quantizer")`.
    pub fn new(
        num_quantizers: usize,
        codebook_size: usize,
        dim: usize,
        vb: VarBuilder,
    ) -> Result<Self, CodecError> {
        let vb = vb.pp("layers");
        let layers = (0..num_quantizers)
            .map(|q| Codebook::new(codebook_size, dim, vb.pp(q.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            layers,
            codebook_size,
            dim,
        })
    }

    /// Number of codebooks stored.
    pub fn num_quantizers(&self) -> usize {
        self.layers.len()
    }

    /// Embeddings (batch, dim, frames) -> codes (batch, n_q, frames) u32 with the first `n_q`
    /// codebooks.
    pub fn encode(&self, xs: &Tensor, n_q: usize) -> Result<Tensor, CodecError> {
        let (b, d, t) = xs.dims3()?;
        if d != self.dim {
            return Err(CodecError::Input(format!(
                "quantizer expects {} channels, got {d}",
                self.dim
            )));
        }
        if n_q == 0 || n_q > self.layers.len() {
            return Err(CodecError::Input(format!(
                "{n_q} quantizers requested, the checkpoint has {}",
                self.layers.len()
            )));
        }
        let mut residual = xs.transpose(1, 2)?.reshape((b * t, d))?; // (batch * frames, dim)
        let mut codes = Vec::with_capacity(n_q);
        for layer in &self.layers[..n_q] {
            let ids = layer.encode(&residual)?; // (batch * frames,)
            residual = (residual - layer.decode(&ids)?)?;
            codes.push(ids.reshape((b, t))?);
        }
        Ok(Tensor::stack(&codes, 1)?)
    }

    /// Codes (batch, K, frames) u32, K <= num_quantizers -> quantized embeddings (batch, dim,
    /// frames): the sum of each codebook's entries. Codes must be < codebook_size (checked by
    /// the caller, see [`super::Encodec::decode`]).
    pub fn decode(&self, codes: &Tensor) -> Result<Tensor, CodecError> {
        let (b, k, t) = codes.dims3()?;
        if k == 0 || k > self.layers.len() {
            return Err(CodecError::Input(format!(
                "codes have {k} codebooks, the checkpoint has {}",
                self.layers.len()
            )));
        }
        let codes = codes.to_dtype(DType::U32)?;
        let mut sum: Option<Tensor> = None;
        for (q, layer) in self.layers[..k].iter().enumerate() {
            let ids = codes.narrow(1, q, 1)?.flatten_all()?; // (batch * frames,)
            let e = layer.decode(&ids)?; // (batch * frames, dim)
            sum = Some(match sum {
                None => e,
                Some(s) => (s + e)?,
            });
        }
        let sum = sum.expect("k >= 1");
        Ok(sum
            .reshape((b, t, self.dim))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    /// Codebook size (number of entries per codebook).
    pub fn codebook_size(&self) -> usize {
        self.codebook_size
    }
}
