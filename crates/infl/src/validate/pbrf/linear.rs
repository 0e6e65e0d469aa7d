//! The linearised PBRF, `infl validate pbrf`'s default ground truth: to first order in ε the
//! PBRF influence of training sequence z_m on query q is `∇f_qᵀ (G + λ)⁻¹ ∇L(z_m)`, G the
//! exact Gauss-Newton of the mean training loss over **every** sequence of the corpus and λ_ℓ
//! EK-FAC's damping per layer. That is one linear solve per query, `x_q = (G + λ)⁻¹ ∇f_q`,
//! after which every training sequence's influence is `x_qᵀ ∇L(z_m)`.
//!
//! The solve is the refined inverse of `ekfac-refined` factors (`influence::refine`) run with
//! the whole corpus as its sample, many iterations and a tight tolerance: preconditioned
//! conjugate gradient on exact Gauss-Newton products, EK-FAC's damped inverse as the
//! preconditioner and the starting point. [`solve`] is the one place that asks for it.

use crate::error::{Error, Result};
use crate::options::{QueryRank, RefineOptions, ScoreOptions};
use crate::pass::Progress;
use crate::workflow::{self, ScoreJob};
use std::path::Path;

/// How tightly the ground truth is solved.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LinearOptions {
    /// Conjugate-gradient iterations per query at most (each one Gauss-Newton product over
    /// the whole corpus).
    pub max_iterations: usize,
    /// A query's solve has converged once `‖∇f_q − (G + λ) x‖ ≤ tolerance · ‖∇f_q‖`.
    pub tolerance: f64,
}

impl Default for LinearOptions {
    fn default() -> Self {
        LinearOptions {
            max_iterations: 500,
            tolerance: 1e-5,
        }
    }
}

/// How one query's solve ended.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QuerySolve {
    pub query_id: String,
    pub iterations: usize,
    /// Relative residual at EK-FAC's answer (the start).
    pub initial_residual: f64,
    /// Relative residual at the answer (conjugate gradient's recursively updated one).
    pub residual: f64,
    /// `residual ≤ tolerance`: otherwise this query's reference is not the PBRF's.
    pub converged: bool,
}

/// The linearised PBRF of every (query, training sequence) pair.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LinearReference {
    pub options: LinearOptions,
    /// Training sequences G averages over (the whole corpus) and every query is compared on.
    pub sequences: usize,
    pub per_query: Vec<QuerySolve>,
    /// λ_ℓ the solve used (EK-FAC's), per tracked layer.
    pub damping_per_layer: Vec<(String, f64)>,
    /// `[query][sequence]`, corpus order; `infl score`'s sign and scale.
    pub scores: Vec<Vec<f64>>,
    pub seconds: f64,
}

impl LinearReference {
    pub fn converged(&self) -> usize {
        self.per_query.iter().filter(|q| q.converged).count()
    }
}

/// Solves `(G + λ) x_q = ∇f_q` for every query (`query_ids`, file order) with the
/// `ekfac-refined` factors in `factors` (fitted on `train`, `n` sequences) and scores all of
/// `train` densely into `results`.
pub fn solve(
    (model, train, queries): (&Path, &Path, &Path),
    query_ids: &[String],
    (factors, results): (&Path, &Path),
    n: usize,
    (options, score): (LinearOptions, ScoreOptions),
    progress: &dyn Progress,
) -> Result<LinearReference> {
    let started = std::time::Instant::now();
    let refine = RefineOptions {
        iterations: options.max_iterations,
        // The sample is drawn from the corpus: asking for all of it takes every sequence.
        refine_batch: n,
        refine_tolerance: options.tolerance,
        refine_seed: 0,
    };
    let summary = workflow::score(
        &ScoreJob {
            options: ScoreOptions {
                dense: true,
                query_rank: QueryRank(None),
                refine,
                ..score
            },
            ..ScoreJob::new(
                model.into(),
                factors.into(),
                train.into(),
                queries.into(),
                results.into(),
            )
        },
        progress,
    )?;
    let report = summary.meta.refine.as_ref().ok_or_else(|| {
        Error::Other(format!(
            "internal: {} holds no refined inverse (are the factors ekfac-refined?)",
            factors.display()
        ))
    })?;
    if report.sequences != n || report.queries.len() != query_ids.len() {
        return Err(Error::Other(format!(
            "internal: the refined inverse averaged over {} of {n} sequences and solved {} of {} queries",
            report.sequences,
            report.queries.len(),
            query_ids.len()
        )));
    }
    let per_query = query_ids
        .iter()
        .zip(&report.queries)
        .map(|(id, c)| QuerySolve {
            query_id: id.clone(),
            iterations: c.iterations,
            initial_residual: c.initial_residual,
            residual: c.residual,
            converged: c.residual.is_finite() && c.residual <= options.tolerance,
        })
        .collect();
    Ok(LinearReference {
        options,
        sequences: n,
        per_query,
        damping_per_layer: summary.meta.damping_per_layer.clone(),
        scores: super::super::exact::read_dense(results)?,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::super::gpt2::tests::{dense_gauss_newton, loss_gradient};
    use super::super::{run, PbrfJob, ResponseKind, SolveOptions};
    use crate::curvature::gauss_newton::GaussNewton;
    use crate::curvature::Fisher;
    use crate::influence::Damping;
    use crate::model::gpt2::{tests::tiny_config, Gpt2};
    use crate::model::{self, ModuleSelection, TapModel, TokenBatch};
    use crate::options::RefineOptions;
    use faer::linalg::solvers::Solve;
    use faer::Mat;
    use std::path::PathBuf;

    /// A model directory (a random tiny GPT-2 saved, or the tiny Llama fixture: GQA, scaled
    /// RoPE), its tracked modules, its vocabulary, and a corpus and queries beside it.
    fn setup(case: &str) -> (PathBuf, ModuleSelection, u32, PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("infl-pbrf-linear-{}-{case}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (model, modules, vocab) = match case {
            "gpt2" => {
                let m = Gpt2::random(tiny_config(), 7, ModuleSelection::All).unwrap();
                m.save(&dir.join("model")).unwrap();
                (dir.join("model"), ModuleSelection::Mlp, 23)
            }
            _ => (
                crate::model::autograd::testing::fixture("llama"),
                ModuleSelection::Attn,
                64,
            ),
        };
        let mut corpus = String::new();
        for d in 0..10u32 {
            let ids: Vec<u32> = (0..4 + d % 5)
                .map(|t| (d * 5 + t * 3 + t * t) % vocab)
                .collect();
            corpus.push_str(&format!("{{\"ids\": {ids:?}}}\n"));
        }
        std::fs::write(dir.join("corpus.jsonl"), corpus).unwrap();
        std::fs::write(
            dir.join("queries.jsonl"),
            "{\"id\": \"a\", \"prompt_ids\": [1, 2, 3], \"completion_ids\": [4, 5]}\n\
             {\"id\": \"b\", \"prompt_ids\": [9], \"completion_ids\": [10, 11, 12]}\n",
        )
        .unwrap();
        (model, modules, vocab, dir)
    }

    /// The linear reference equals `∇f_qᵀ (G + λ)⁻¹ ∇L_m` with G = (1/N) Σ_z Jᵀ H J over the
    /// whole corpus built densely from Gauss-Newton products, λ EK-FAC's per layer, solved in
    /// f64; EK-FAC's own scores are measurably further from it.
    #[test]
    fn the_linear_reference_is_the_dense_damped_gauss_newton_influence() {
        for case in ["gpt2", "llama"] {
            matches_dense(case);
        }
    }

    fn matches_dense(case: &str) {
        let (model_dir, modules, _, dir) = setup(case);
        let job = PbrfJob {
            model: model_dir.clone(),
            train: dir.join("corpus.jsonl"),
            queries: dir.join("queries.jsonl"),
            out: dir.join("out"),
            response: ResponseKind::Linear,
            linear: super::LinearOptions {
                max_iterations: 1000,
                tolerance: 1e-5,
            },
            refine: RefineOptions::default(),
            sample: 32,
            epsilon: None,
            solve: SolveOptions::default(),
            seed: 0,
            fisher: Fisher::Sampled,
            modules,
            max_len: None,
            batch_size: 4,
            damping: Damping::Heuristic,
            top_k: 3,
            fresh: false,
        };
        let report = run(&job, &crate::pass::Silent).unwrap();
        let linear = report.linear.as_ref().unwrap();
        assert_eq!(linear.sequences, 10);

        // The dense system in f64 on the same layers.
        let m = model::load_autograd(&model_dir, modules, &candle_core::Device::Cpu).unwrap();
        let tracked = match &m {
            model::AnyModel::Gpt2(g) => g.tracked().to_vec(),
            model::AnyModel::Llama(l) => l.tracked().to_vec(),
            model::AnyModel::GptNeoX(x) => x.tracked().to_vec(),
        };
        let vocab = match &m {
            model::AnyModel::Gpt2(g) => g.vocab_size(),
            model::AnyModel::Llama(l) => l.vocab_size(),
            model::AnyModel::GptNeoX(x) => x.vocab_size(),
        };
        let gn = GaussNewton::new(m, &tracked).unwrap();
        let corpus = std::fs::read_to_string(dir.join("corpus.jsonl")).unwrap();
        let seqs: Vec<Vec<u32>> = corpus
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                serde_json::from_value(v["ids"].clone()).unwrap()
            })
            .collect();
        let refs: Vec<(u64, &[u32])> = seqs
            .iter()
            .enumerate()
            .map(|(i, s)| (i as u64, s.as_slice()))
            .collect();
        let train = TokenBatch::training(&refs);
        let dims: Vec<usize> = tracked.iter().map(|l| l.d_out * l.d_in_h()).collect();
        let d: usize = dims.iter().sum();
        let mut g = dense_gauss_newton(&gn, &train, seqs.len());
        let mut at = 0;
        for (l, &dl) in tracked.iter().zip(&dims) {
            let (_, lam) = report
                .lambda_per_layer
                .iter()
                .find(|(name, _)| *name == l.name)
                .unwrap();
            (at..at + dl).for_each(|i| g[(i, i)] += lam);
            at += dl;
        }
        let lu = g.partial_piv_lu();
        let queries = [
            (vec![1u32, 2, 3], vec![4u32, 5]),
            (vec![9], vec![10, 11, 12]),
        ];
        let want: Vec<Vec<f64>> = queries
            .iter()
            .map(|(p, c)| {
                let b = TokenBatch::queries(&[(0, p.as_slice(), c.as_slice())]);
                let gq = loss_gradient(&gn, &b, vocab);
                let x = lu.solve(Mat::from_fn(d, 1, |i, _| gq[i]));
                refs.iter()
                    .map(|r| {
                        let gm = loss_gradient(&gn, &TokenBatch::training(&[*r]), vocab);
                        (0..d).map(|i| gm[i] * x[(i, 0)]).sum()
                    })
                    .collect()
            })
            .collect();
        let scale = want.iter().flatten().fold(0f64, |s, w| s.max(w.abs()));
        let error = |got: &[Vec<f64>]| {
            want.iter()
                .flatten()
                .zip(got.iter().flatten())
                .fold(0f64, |e, (w, g)| e.max((w - g).abs()))
        };
        let truth = error(&linear.scores);
        assert_eq!(linear.converged(), 2, "{:?}", linear.per_query);
        assert!(linear.per_query.iter().all(|q| q.iterations > 0));
        assert!(
            truth < 1e-4 * scale,
            "{case}: reference off by {truth} of {scale}: {want:?} vs {:?}",
            linear.scores
        );
        let ekfac = error(&report.strategies[0].scores);
        assert!(ekfac > 10.0 * truth, "{case}: EK-FAC {ekfac} vs {truth}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
