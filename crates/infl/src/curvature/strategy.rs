//! What a fit computes: the [`Strategy`] approximating each layer's Fisher, where the Fisher's
//! labels come from ([`Fisher`]), and the passes over the data a strategy needs ([`Pass`]).

/// How the Fisher (GGN) of each tracked layer is approximated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Eigenvalue-corrected KFAC: KFAC eigenbases, per-sequence eigenvalues Λ (the paper's method).
    Ekfac,
    /// KFAC: F ≈ S ⊗ A on the per-token scale.
    Kfac,
    /// Diagonal Fisher from per-sequence squared gradients.
    Diagonal,
    /// No curvature: plain gradient dot products, no damping.
    Identity,
    /// EK-FAC's factors; at scoring time each query's inverse is refined by preconditioned
    /// conjugate gradient over exact Gauss-Newton products (the iterations option of score).
    #[serde(rename = "ekfac-refined")]
    #[cfg_attr(feature = "clap", value(name = "ekfac-refined"))]
    EkfacRefined,
}

impl Strategy {
    /// The strategy's name on the command line and in output files.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Ekfac => "ekfac",
            Strategy::Kfac => "kfac",
            Strategy::Diagonal => "diagonal",
            Strategy::Identity => "identity",
            Strategy::EkfacRefined => "ekfac-refined",
        }
    }

    /// Whether scores refine the factors' inverse per query (`score --iterations`).
    pub fn is_refined(self) -> bool {
        self == Strategy::EkfacRefined
    }

    pub(super) fn needs_covariance(self) -> bool {
        matches!(
            self,
            Strategy::Ekfac | Strategy::EkfacRefined | Strategy::Kfac
        )
    }
    pub(super) fn needs_lambda(self) -> bool {
        matches!(
            self,
            Strategy::Ekfac | Strategy::EkfacRefined | Strategy::Diagonal
        )
    }
}

/// Where the labels of the Fisher come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Fisher {
    /// Labels sampled from the model's predictive distribution: the true Fisher (= GGN).
    Sampled,
    /// The data's own labels (deterministic; what kronfluence calls use_empirical_fisher).
    Empirical,
}

/// The two passes over the data of a fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pass {
    /// Sums of ā āᵀ and g gᵀ over tokens (KFAC, EK-FAC).
    Covariance,
    /// Sums of squared per-sequence gradients, in the eigenbasis (EK-FAC) or not (diagonal).
    Eigenvalue,
}

impl Pass {
    pub fn name(self) -> &'static str {
        match self {
            Pass::Covariance => "covariance",
            Pass::Eigenvalue => "eigenvalue",
        }
    }

    /// Sampled labels are drawn afresh for each pass, as kronfluence does.
    pub(super) fn label_pass(self) -> u64 {
        match self {
            Pass::Covariance => 0,
            Pass::Eigenvalue => 1,
        }
    }
}

impl Strategy {
    /// The passes a fit of this strategy runs, in order.
    pub fn passes(self) -> Vec<Pass> {
        let mut p = Vec::new();
        if self.needs_covariance() {
            p.push(Pass::Covariance);
        }
        if self.needs_lambda() {
            p.push(Pass::Eigenvalue);
        }
        p
    }
}
