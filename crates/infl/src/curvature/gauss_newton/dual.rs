//! The dual-number ops the tangent (forward-mode) passes are built from, one per op of the
//! autograd forwards ([`crate::model::autograd`]): a value and its tangents along `n` weight
//! directions `V_1 … V_n`, carried together, so one pass serves a batch of queries' directions
//! (the value is computed once; each op's tangent work is one batched kernel, not n). Linear
//! maps (reshapes, rotary embeddings, head repeats) act on value and tangents alike; the
//! nonlinear ops carry their derivative. Each op computes its value exactly as the autograd op
//! does, so the tangent pass's logits are the model's.
//!
//! The tangents are stacked direction-major along the value's first axis: a value `[b, …]`
//! has tangents `[n·b, …]`, so a reshape written for the batch `b` serves the tangents with
//! `n·b` ([`Dual::map`] passes the multiplier).

use crate::model::autograd::{LayerNorm, Linear, RmsNorm, Rotary};
use crate::model::lora::Lora;
use candle_core::{Result, Tensor, D};
use std::cell::Cell;

/// A value `x` and its tangents along `n` directions, `dx` (`[n·b, …]` for `x` `[b, …]`).
pub(super) struct Dual {
    pub x: Tensor,
    pub dx: Tensor,
    n: usize,
}

/// The tangent directions of one tracked layer, as candle tensors: `w` is the n directions'
/// weight parts stacked, `[n·d_out, d_in]`, `b` their bias columns `[n, d_out]` (absent
/// without a bias).
pub(super) struct Direction {
    pub w: Tensor,
    pub b: Option<Tensor>,
}

/// The direction of every tracked layer of the model, by tap index (none: held fixed), and
/// which of them a pass applied: a direction no op consumed means the tangent pass does not
/// mirror the model's forward, which [`Directions::unused`] reports.
pub(super) struct Directions {
    by_tap: Vec<Option<Direction>>,
    used: Vec<Cell<bool>>,
    n: usize,
}

impl Directions {
    /// `n` directions per layer.
    pub fn new(by_tap: Vec<Option<Direction>>, n: usize) -> Self {
        let used = by_tap.iter().map(|_| Cell::new(false)).collect();
        Directions { by_tap, used, n }
    }

    /// How many directions each layer moves along.
    pub fn n(&self) -> usize {
        self.n
    }

    /// The direction of the layer tapped as `tap`, marked as applied.
    pub fn take(&self, tap: Option<usize>) -> Option<&Direction> {
        let i = tap?;
        let d = self.by_tap.get(i)?.as_ref()?;
        if let Some(u) = self.used.get(i) {
            u.set(true);
        }
        Some(d)
    }

    /// The tap index of the first direction given but never applied.
    pub fn unused(&self) -> Option<usize> {
        self.by_tap
            .iter()
            .zip(&self.used)
            .position(|(d, u)| d.is_some() && !u.get())
    }
}

impl Dual {
    /// A value that does not depend on the tracked weights (the embeddings), with `n` zero
    /// tangents.
    pub fn constant(x: Tensor, n: usize) -> Result<Dual> {
        Ok(Dual {
            dx: Tensor::zeros(stacked(&x, n), x.dtype(), x.device())?,
            x,
            n,
        })
    }

    /// A linear map applied to value and tangents alike: `f(t, c)` maps a tensor whose first
    /// axis holds `c` copies of the batch (1 for the value, n for the tangents).
    pub fn map(&self, f: impl Fn(&Tensor, usize) -> Result<Tensor>) -> Result<Dual> {
        Ok(Dual {
            x: f(&self.x, 1)?,
            dx: f(&self.dx, self.n)?,
            n: self.n,
        })
    }

    /// The tangents as `[n, …x's dims]`, to broadcast against values.
    fn tangents(&self) -> Result<Tensor> {
        let mut dims = vec![self.n];
        dims.extend_from_slice(self.x.dims());
        self.dx.reshape(dims)
    }

    /// A value and tangents laid out as [`Dual::tangents`] returns them.
    fn with_tangents(&self, x: Tensor, per_direction: Tensor) -> Result<Dual> {
        Ok(Dual {
            dx: per_direction.reshape(stacked(&x, self.n))?,
            x,
            n: self.n,
        })
    }

    pub fn add(&self, o: &Dual) -> Result<Dual> {
        Ok(Dual {
            x: (&self.x + &o.x)?,
            dx: (&self.dx + &o.dx)?,
            n: self.n,
        })
    }

    /// Element-wise product: `d(ab) = da·b + a·db`.
    pub fn mul(&self, o: &Dual) -> Result<Dual> {
        let d = (self.tangents()?.broadcast_mul(&o.x)? + o.tangents()?.broadcast_mul(&self.x)?)?;
        self.with_tangents((&self.x * &o.x)?, d)
    }

    /// `y = x W + b` for a fixed `w_in_out` (`[d_in, d_out]`, `x` `[rows, d_in]`) plus, when
    /// the layer moves along `dir`, `x V_kᵀ + v_b,k` in tangent k.
    pub fn affine(
        &self,
        w_in_out: &Tensor,
        bias: Option<&Tensor>,
        dir: Option<&Direction>,
    ) -> Result<Dual> {
        let mut y = self.x.matmul(w_in_out)?;
        if let Some(b) = bias {
            y = y.broadcast_add(b)?;
        }
        let mut dy = self.dx.matmul(w_in_out)?;
        if let Some(dir) = dir {
            // Every direction's `x V_kᵀ` in one product with the stacked `[n·d_out, d_in]`.
            let (rows, d_out) = y.dims2()?;
            let mut xv = self
                .x
                .matmul(&dir.w.t()?)?
                .reshape((rows, self.n, d_out))?
                .transpose(0, 1)?;
            if let Some(b) = &dir.b {
                xv = xv.broadcast_add(&b.unsqueeze(1)?)?;
            }
            dy = (dy + xv.contiguous()?.reshape((self.n * rows, d_out))?)?;
        }
        Ok(Dual {
            x: y,
            dx: dy,
            n: self.n,
        })
    }

    /// A checkpoint's linear layer as [`crate::model::autograd::Recorder::linear`] computes
    /// it, a LoRA adapter's `B(A x) · scaling` included (A and B move along their own
    /// directions when tracked).
    pub fn linear(&self, layer: &Linear, dirs: &Directions) -> Result<Dual> {
        let mut y = self.affine(
            &layer.weight.t()?,
            layer.bias.as_ref(),
            dirs.take(layer.tap),
        )?;
        if let Some(lora) = &layer.lora {
            y = y.add(&self.lora(lora, dirs)?)?;
        }
        Ok(y)
    }

    /// A LoRA adapter's `B(A x) · scaling` on `x` = `self` (A and B move along their own
    /// directions when tracked), for any base layer it is attached to.
    pub fn lora(&self, lora: &Lora, dirs: &Directions) -> Result<Dual> {
        let u = self.affine(&lora.a.t()?, None, dirs.take(lora.tap_a))?;
        let v = u.affine(&lora.b.t()?, None, dirs.take(lora.tap_b))?;
        v.map(|t, _| t * lora.scaling)
    }

    /// `y = (x − μ)/σ · w + b`: `dy = (dc − n·mean(n ⊙ dc))/σ · w` with `c = x − μ`, `n = c/σ`.
    pub fn layer_norm(&self, ln: &LayerNorm) -> Result<Dual> {
        let mean = self.x.mean_keepdim(D::Minus1)?;
        let c = self.x.broadcast_sub(&mean)?;
        let sigma = (c.sqr()?.mean_keepdim(D::Minus1)? + ln.eps)?.sqrt()?;
        let n = c.broadcast_div(&sigma)?;
        let dx = self.tangents()?;
        let dc = dx.broadcast_sub(&dx.mean_keepdim(D::Minus1)?)?;
        let proj = dc.broadcast_mul(&n)?.mean_keepdim(D::Minus1)?;
        let dn = dc.sub(&proj.broadcast_mul(&n)?)?.broadcast_div(&sigma)?;
        self.with_tangents(
            n.broadcast_mul(&ln.weight)?.broadcast_add(&ln.bias)?,
            dn.broadcast_mul(&ln.weight)?,
        )
    }

    /// `y = x/r · w`, `r = √(mean(x²) + eps)`: `dy = (dx − x·mean(x ⊙ dx)/r²)/r · w`.
    pub fn rms_norm(&self, norm: &RmsNorm) -> Result<Dual> {
        let r = (self.x.sqr()?.mean_keepdim(D::Minus1)? + norm.eps)?.sqrt()?;
        let dx = self.tangents()?;
        let proj = dx
            .broadcast_mul(&self.x)?
            .mean_keepdim(D::Minus1)?
            .broadcast_div(&r.sqr()?)?;
        let dn = dx.sub(&proj.broadcast_mul(&self.x)?)?.broadcast_div(&r)?;
        self.with_tangents(
            self.x.broadcast_div(&r)?.broadcast_mul(&norm.weight)?,
            dn.broadcast_mul(&norm.weight)?,
        )
    }

    /// The activations of [`crate::model::autograd::activation`], by the same config names,
    /// with their derivatives.
    pub fn activation(&self, name: &str) -> Result<Dual> {
        let x = &self.x;
        let (y, slope) = match name {
            "relu" => (x.relu()?, x.ge(0f32)?.to_dtype(x.dtype())?),
            // x Φ(x): slope Φ(x) + x φ(x).
            "gelu" => {
                let cdf = (((x / std::f64::consts::SQRT_2)?.erf()? + 1.0)? * 0.5)?;
                let pdf = ((x.sqr()? * -0.5)?.exp()? * (0.5 / std::f64::consts::PI).sqrt())?;
                ((x * &cdf)?, (cdf + (x * pdf)?)?)
            }
            // x σ(x), σ(x) = (1 + tanh(x/2))/2: slope σ (1 + x (1 − σ)).
            "silu" | "swish" => {
                let sig = (((x * 0.5)?.tanh()? + 1.0)? * 0.5)?;
                let slope = ((x * (sig.neg()? + 1.0)?)? + 1.0)?.mul(&sig)?;
                ((x * &sig)?, slope)
            }
            // 0.5 x (1 + tanh u), u = c (x + 0.044715 x³):
            // slope 0.5 (1 + tanh u) + 0.5 x (1 − tanh² u) c (1 + 3·0.044715 x²).
            _ => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                let th = ((x + ((x.sqr()? * x)? * 0.044715)?)? * c)?.tanh()?;
                let half = ((&th + 1.0)? * 0.5)?;
                let du = (((x.sqr()? * (3.0 * 0.044715))? + 1.0)? * c)?;
                let sech2 = (th.sqr()?.neg()? + 1.0)?;
                let slope = (&half + ((x * 0.5)? * (sech2 * du)?)?)?;
                ((x * &half)?, slope)
            }
        };
        let dy = self.tangents()?.broadcast_mul(&slope)?;
        self.with_tangents(y, dy)
    }

    /// Rotary embeddings rotate value and tangent alike (a linear map per position).
    pub fn rotate(&self, rotary: &Rotary) -> Result<Dual> {
        self.map(|t, _| rotary.apply(t))
    }
}

/// Causal softmax attention and its tangents, as [`crate::model::autograd::attention`]: `q` is
/// `[b, h, t, hd]`, `k`, `v` `[b, kv, t, hd]` with `h` a multiple of `kv`; returns
/// `[b·t, h·hd]`. `dP = P ⊙ (dS − Σ_j P ⊙ dS)` with `dS = (dQ Kᵀ + Q dKᵀ)·scale`, per direction
/// (the tangents `[n, b, h, t, ·]` broadcast against the value's `[b, h, t, ·]`).
pub(super) fn attention(q: &Dual, k: &Dual, v: &Dual, mask: &Tensor, scale: f64) -> Result<Dual> {
    let (b, h, t, hd) = q.x.dims4()?;
    let repeat = |x: &Tensor, _: usize| -> Result<Tensor> {
        let (copies, kv, t, hd) = x.dims4()?;
        if kv == h {
            return x.contiguous();
        }
        x.unsqueeze(2)?
            .expand((copies, kv, h / kv, t, hd))?
            .contiguous()?
            .reshape((copies, h, t, hd))
    };
    let (k, v) = (k.map(repeat)?, v.map(repeat)?);
    let qx = q.x.contiguous()?;
    let kt = k.x.t()?.contiguous()?;
    let scores = (qx.matmul(&kt)? * scale)?.broadcast_add(mask)?;
    let dkt = k.tangents()?.t()?.contiguous()?;
    let dscores = ((matmul(&q.tangents()?, &kt)? + matmul(&qx, &dkt)?)? * scale)?;
    let max = scores.max_keepdim(D::Minus1)?;
    let e = scores.broadcast_sub(&max)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    let pd = dscores.broadcast_mul(&p)?;
    let dp = (&pd - pd.sum_keepdim(D::Minus1)?.broadcast_mul(&p)?)?;
    let dout = (matmul(&dp, &v.x)? + matmul(&p, &v.tangents()?)?)?;
    let out = q.with_tangents(p.matmul(&v.x)?, dout)?;
    out.map(|x, c| {
        x.transpose(1, 2)?
            .contiguous()?
            .reshape((c * b * t, h * hd))
    })
}

/// The shape of `n` tangents of `x` stacked along its first axis.
fn stacked(x: &Tensor, n: usize) -> Vec<usize> {
    let mut dims = x.dims().to_vec();
    if let Some(first) = dims.first_mut() {
        *first *= n;
    }
    dims
}

/// A batched matrix product whose operands' batch axes broadcast (a value's `[b, h, …]`
/// against the tangents' `[n, b, h, …]`: the missing leading axes are added), both made
/// contiguous for the CPU kernel.
fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let rank = a.rank().max(b.rank());
    let batch: Vec<usize> = (0..rank - 2)
        .map(|i| {
            let dim = |t: &Tensor| (i + t.rank()).checked_sub(rank).map_or(1, |j| t.dims()[j]);
            dim(a).max(dim(b))
        })
        .collect();
    let full = |t: &Tensor| -> Result<Tensor> {
        let matrix = &t.dims()[t.rank() - 2..];
        let mut padded = vec![1; rank - t.rank()];
        padded.extend_from_slice(t.dims());
        let mut shape = batch.clone();
        shape.extend_from_slice(matrix);
        let t = t.contiguous()?.reshape(padded.as_slice())?;
        if t.dims() == shape.as_slice() {
            return Ok(t);
        }
        // `contiguous` keeps a stride-0 axis of length 1, which the kernel refuses.
        t.broadcast_as(shape)?.force_contiguous()
    };
    // The CPU kernel takes at most two batch axes: flatten them into one.
    let flat = |t: Tensor| -> Result<Tensor> {
        let d = t.dims();
        let (m, k) = (d[d.len() - 2], d[d.len() - 1]);
        t.reshape(((), m, k))
    };
    let y = flat(full(a)?)?.matmul(&flat(full(b)?)?)?;
    let mut shape = batch;
    shape.extend_from_slice(&y.dims()[1..]);
    y.reshape(shape)
}
