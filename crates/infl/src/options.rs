//! Options of the stages, defined once: the library API takes them, the command line flattens
//! them and every output's `meta.json` records them.

/// What the reported score is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Normalize {
    /// The influence I(q, z) itself.
    None,
    /// I(q, z) / sqrt(I(q, q) · I(z, z)): cosine of the two gradients in the damped
    /// inverse-Fisher metric (RelatIF-style; bounded by 1 in magnitude).
    Cosine,
}
