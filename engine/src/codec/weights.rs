//! Checked tensor loading: every missing or mis-shaped tensor is an error that names the tensor
//! (full checkpoint key) and both shapes.

use candle_core::{Storage, Tensor, D};
use candle_nn::VarBuilder;

use super::CodecError;

/// The full checkpoint key of `name` under `vb`'s prefix.
pub(crate) fn full_name(vb: &VarBuilder, name: &str) -> String {
    let prefix = vb.prefix();
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Loads `name` and checks its shape against `shape`.
///
/// Backends that can only produce a tensor for a known shape (random initialisation for
/// benchmarks) fail `get_unchecked`; for those the shape is passed down with `get`.
pub(crate) fn get(vb: &VarBuilder, shape: &[usize], name: &str) -> Result<Tensor, CodecError> {
    if !vb.contains_tensor(name) {
        return Err(CodecError::MissingTensor {
            name: full_name(vb, name),
            expected: shape.to_vec(),
        });
    }
    let t = match vb.get_unchecked(name) {
        Ok(t) => t,
        Err(_) => vb.get(shape, name)?,
    };
    if t.dims() != shape {
        return Err(CodecError::TensorShape {
            name: full_name(vb, name),
            expected: shape.to_vec(),
            found: t.dims().to_vec(),
        });
    }
    Ok(t)
}

/// The two names weight norm goes by: `(g, v)` as written by `torch.nn.utils.parametrizations`
/// (recent `transformers`) and by the older `torch.nn.utils.weight_norm` (the Hub's checkpoints).
const WEIGHT_NORM_NAMES: [(&str, &str); 2] = [
    (
        "parametrizations.weight.original0",
        "parametrizations.weight.original1",
    ),
    ("weight_g", "weight_v"),
];

/// The effective weight `g * v / ||v||` of a weight-normalised convolution, the norm taken over
/// every axis but `dim` (0: output channels of a conv, input channels of a transposed conv).
/// `shape` is `v`'s shape; `g` has shape `(shape[dim], 1, 1)`.
pub(crate) fn weight_norm(
    vb: &VarBuilder,
    shape: &[usize],
    g_len: usize,
    dim: usize,
) -> Result<Tensor, CodecError> {
    debug_assert_eq!(dim, 0, "only dim 0 is used by EnCodec");
    let Some((g_name, v_name)) = WEIGHT_NORM_NAMES
        .iter()
        .find(|(_, v)| vb.contains_tensor(v))
    else {
        let v0 = WEIGHT_NORM_NAMES[0].1;
        let v1 = WEIGHT_NORM_NAMES[1].1;
        return Err(CodecError::MissingTensor {
            name: format!("{} (or {})", full_name(vb, v0), full_name(vb, v1)),
            expected: shape.to_vec(),
        });
    };
    let v = get(vb, shape, v_name)?;
    let g = get(vb, &[g_len, 1, 1], g_name)?;
    // ||v|| per slice along dim 0, computed in f32 like the reference (`torch._weight_norm`).
    let norm = v.sqr()?.sum_keepdim(D::Minus1)?.sum_keepdim(1)?.sqrt()?; // (g_len, 1, 1)
    Ok(v.broadcast_mul(&g.broadcast_div(&norm)?)?.contiguous()?)
}

/// Read access to the f32 data of a contiguous tensor on the CPU, without copying. Holds the
/// tensor's storage read lock while alive.
pub(crate) struct HostView<'a> {
    guard: candle_core::StorageRef<'a>,
    start: usize,
    end: usize,
}

impl<'a> HostView<'a> {
    pub fn new(t: &'a Tensor) -> Result<Self, CodecError> {
        let (guard, layout) = t.storage_and_layout();
        match (&*guard, layout.contiguous_offsets()) {
            (Storage::Cpu(_), Some((start, end))) if t.dtype() == candle_core::DType::F32 => {
                Ok(Self { guard, start, end })
            }
            _ => Err(CodecError::Input(
                "host kernels need contiguous f32 tensors on the CPU".into(),
            )),
        }
    }

    pub fn slice(&self) -> &[f32] {
        match &*self.guard {
            Storage::Cpu(candle_core::CpuStorage::F32(v)) => &v[self.start..self.end],
            _ => &[],
        }
    }
}
