//! The dual-number ops the tangent (forward-mode) passes are built from, one per op of the
//! autograd forwards ([`crate::model::autograd`]): a value and its tangent along the weight
//! direction `V`, carried together. Linear maps (reshapes, rotary embeddings, head repeats)
//! act on both alike; the nonlinear ops carry their derivative. Each op computes its value
//! exactly as the autograd op does, so the tangent pass's logits are the model's.

use crate::model::autograd::{LayerNorm, Linear, RmsNorm, Rotary};
use crate::model::lora::Lora;
use candle_core::{Result, Tensor, D};
use std::cell::Cell;

/// A value and its tangent.
pub(super) struct Dual {
    pub x: Tensor,
    pub dx: Tensor,
}

/// The tangent direction of one tracked layer, as candle tensors: `w` is `[d_out, d_in]`,
/// `b` the bias column `[d_out]` (absent without a bias).
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
}

impl Directions {
    pub fn new(by_tap: Vec<Option<Direction>>) -> Self {
        let used = by_tap.iter().map(|_| Cell::new(false)).collect();
        Directions { by_tap, used }
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
    /// A value that does not depend on the tracked weights (the embeddings).
    pub fn constant(x: Tensor) -> Result<Dual> {
        Ok(Dual {
            dx: x.zeros_like()?,
            x,
        })
    }

    /// A linear map applied to value and tangent alike.
    pub fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Dual> {
        Ok(Dual {
            x: f(&self.x)?,
            dx: f(&self.dx)?,
        })
    }

    pub fn add(&self, o: &Dual) -> Result<Dual> {
        Ok(Dual {
            x: (&self.x + &o.x)?,
            dx: (&self.dx + &o.dx)?,
        })
    }

    /// Element-wise product: `d(ab) = da·b + a·db`.
    pub fn mul(&self, o: &Dual) -> Result<Dual> {
        Ok(Dual {
            x: (&self.x * &o.x)?,
            dx: ((&self.dx * &o.x)? + (&self.x * &o.dx)?)?,
        })
    }

    /// `y = x W + b` for a fixed `w_in_out` (`[d_in, d_out]`) plus, when the layer moves
    /// along `dir`, `x Vᵀ + v_b` in the tangent.
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
            dy = (dy + self.x.matmul(&dir.w.t()?)?)?;
            if let Some(b) = &dir.b {
                dy = dy.broadcast_add(b)?;
            }
        }
        Ok(Dual { x: y, dx: dy })
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
        v.map(|t| t * lora.scaling)
    }

    /// `y = (x − μ)/σ · w + b`: `dy = (dc − n·mean(n ⊙ dc))/σ · w` with `c = x − μ`, `n = c/σ`.
    pub fn layer_norm(&self, ln: &LayerNorm) -> Result<Dual> {
        let mean = self.x.mean_keepdim(D::Minus1)?;
        let c = self.x.broadcast_sub(&mean)?;
        let sigma = (c.sqr()?.mean_keepdim(D::Minus1)? + ln.eps)?.sqrt()?;
        let n = c.broadcast_div(&sigma)?;
        let dc = self.dx.broadcast_sub(&self.dx.mean_keepdim(D::Minus1)?)?;
        let proj = (&n * &dc)?.mean_keepdim(D::Minus1)?;
        let dn = dc.sub(&n.broadcast_mul(&proj)?)?.broadcast_div(&sigma)?;
        Ok(Dual {
            x: n.broadcast_mul(&ln.weight)?.broadcast_add(&ln.bias)?,
            dx: dn.broadcast_mul(&ln.weight)?,
        })
    }

    /// `y = x/r · w`, `r = √(mean(x²) + eps)`: `dy = (dx − x·mean(x ⊙ dx)/r²)/r · w`.
    pub fn rms_norm(&self, norm: &RmsNorm) -> Result<Dual> {
        let r = (self.x.sqr()?.mean_keepdim(D::Minus1)? + norm.eps)?.sqrt()?;
        let proj = (&self.x * &self.dx)?
            .mean_keepdim(D::Minus1)?
            .broadcast_div(&r.sqr()?)?;
        let dn = self
            .dx
            .sub(&self.x.broadcast_mul(&proj)?)?
            .broadcast_div(&r)?;
        Ok(Dual {
            x: self.x.broadcast_div(&r)?.broadcast_mul(&norm.weight)?,
            dx: dn.broadcast_mul(&norm.weight)?,
        })
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
        Ok(Dual {
            x: y,
            dx: (&self.dx * slope)?,
        })
    }

    /// Rotary embeddings rotate value and tangent alike (a linear map per position).
    pub fn rotate(&self, rotary: &Rotary) -> Result<Dual> {
        self.map(|t| rotary.apply(t))
    }
}

/// Causal softmax attention and its tangent, as [`crate::model::autograd::attention`]: `q` is
/// `[b, h, t, hd]`, `k`, `v` `[b, kv, t, hd]` with `h` a multiple of `kv`; returns
/// `[b·t, h·hd]`. `dP = P ⊙ (dS − Σ_j P ⊙ dS)` with `dS = (dQ Kᵀ + Q dKᵀ)·scale`.
pub(super) fn attention(q: &Dual, k: &Dual, v: &Dual, mask: &Tensor, scale: f64) -> Result<Dual> {
    let (b, h, t, hd) = q.x.dims4()?;
    let kv = k.x.dim(1)?;
    let repeat = |x: &Tensor| -> Result<Tensor> {
        if kv == h {
            return x.contiguous();
        }
        x.unsqueeze(2)?
            .expand((b, kv, h / kv, t, hd))?
            .contiguous()?
            .reshape((b, h, t, hd))
    };
    let (k, v) = (k.map(repeat)?, v.map(repeat)?);
    let (qx, qdx) = (q.x.contiguous()?, q.dx.contiguous()?);
    let kt = k.x.t()?.contiguous()?;
    let scores = (qx.matmul(&kt)? * scale)?.broadcast_add(mask)?;
    let dscores = ((qdx.matmul(&kt)? + qx.matmul(&k.dx.t()?.contiguous()?)?)? * scale)?;
    let max = scores.max_keepdim(D::Minus1)?;
    let e = scores.broadcast_sub(&max)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    let pd = (&p * &dscores)?;
    let dp = (&pd - p.broadcast_mul(&pd.sum_keepdim(D::Minus1)?)?)?;
    let out = Dual {
        x: p.matmul(&v.x)?,
        dx: (dp.matmul(&v.x)? + p.matmul(&v.dx)?)?,
    };
    out.map(|x| x.transpose(1, 2)?.contiguous()?.reshape((b * t, h * hd)))
}
