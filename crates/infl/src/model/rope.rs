//! Rotary position embeddings, written once for both engines and every architecture that uses
//! them (GPT-NeoX's partial rotary, the Llama family's scaled frequencies): the inverse
//! frequencies, their scaling, and the cos/sin tables both engines rotate by.

/// RoPE frequency scaling.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (equivalently, frequencies).
    Linear {
        factor: f64,
    },
    /// Llama 3.1's band-wise rescaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

impl RopeScaling {
    /// The plain frequencies `base` after this scaling.
    pub fn apply(&self, base: Vec<f64>) -> Vec<f64> {
        match self {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base
                .iter()
                .map(|f| (*f as f32 / *factor as f32) as f64)
                .collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

/// cos and sin tables `[len, 2·inv_freq.len()]` (each half repeated), shared with the fast
/// engine so that both rotate by the same f32 values.
pub(crate) fn rope_tables(inv_freq: &[f64], len: usize) -> (Vec<f32>, Vec<f32>) {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(len * 2 * half);
    let mut sin = Vec::with_capacity(len * 2 * half);
    for p in 0..len {
        for _ in 0..2 {
            for f in inv_freq {
                // transformers forms the angle in f32: round the frequency first.
                let angle = (p as f32 * *f as f32) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
    }
    (cos, sin)
}

/// Plain RoPE frequencies `1 / base^(2i/dims)`, computed in f32 like transformers.
pub(crate) fn inv_freq(base: f64, dims: usize) -> Vec<f64> {
    (0..dims / 2)
        .map(|i| {
            let e = (2 * i) as f32 / dims as f32;
            (1.0f32 / (base as f32).powf(e)) as f64
        })
        .collect()
}

/// RoPE settings as `config.json` spells them, in `rope_scaling` (legacy) or `rope_parameters`
/// (newer transformers): the scaling's type and factors, and in `rope_parameters` the base and
/// the rotated fraction too.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub(crate) struct RopeParameters {
    pub rope_type: Option<String>,
    #[serde(rename = "type")]
    pub legacy_type: Option<String>,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<f64>,
    pub rope_theta: Option<f64>,
    pub partial_rotary_factor: Option<f64>,
}

impl RopeParameters {
    /// The scaling's type (`default` when not given).
    pub fn kind(&self) -> &str {
        self.rope_type
            .as_deref()
            .or(self.legacy_type.as_deref())
            .unwrap_or("default")
    }

    /// The scaling these parameters describe; `path` names the config in errors.
    pub fn scaling(&self, path: &std::path::Path) -> crate::error::Result<RopeScaling> {
        let kind = self.kind();
        let factor = || {
            self.factor.ok_or_else(|| {
                crate::error::Error::input(format!(
                    "{}: rope scaling `{kind}` needs a numeric `factor`",
                    path.display()
                ))
            })
        };
        match kind {
            "default" => Ok(RopeScaling::None),
            "linear" => Ok(RopeScaling::Linear { factor: factor()? }),
            "llama3" => Ok(RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor: self.low_freq_factor.unwrap_or(1.0),
                high_freq_factor: self.high_freq_factor.unwrap_or(4.0),
                original_max_position_embeddings: self
                    .original_max_position_embeddings
                    .unwrap_or(8192.0),
            }),
            other => Err(crate::error::Error::input(format!(
                "{}: rope scaling type `{other}` is not supported (supported: default, linear, llama3)",
                path.display()
            ))),
        }
    }
}
