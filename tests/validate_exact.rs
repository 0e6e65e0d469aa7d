//! `infl validate exact`: the exact damped block-diagonal Fisher against dense solves and
//! hand-checkable limits, and the command end to end on the bundled model.

mod common;

use common::{ok, run, s, scratch};
use faer::linalg::solvers::Solve;
use faer::Mat;
use infl::curvature::{Fisher, Strategy};
use infl::influence::Damping;
use infl::model::ModuleSelection;
use infl::options::FitOptions;
use infl::options::Normalize;
use infl::pass::Silent;
use infl::validate::exact::{self, ExactJob, ExactReport, Solver};
use infl::workflow::{self, FitJob, ScoreJob};
use std::path::{Path, PathBuf};

fn options(fisher: Fisher) -> FitOptions {
    FitOptions {
        strategy: Strategy::Ekfac,
        fisher,
        batch_size: 4,
        seed: 3,
        ..FitOptions::default()
    }
}

/// A random GPT-2 (width 12, 2 blocks, 8 tracked layers) with `n_docs` documents of 3–15 tokens.
fn random_setup(name: &str, n_docs: u32) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let dir = scratch("validate-exact", name);
    let (model, corpus, queries) = common::random_gpt2(
        &dir,
        11,
        n_docs,
        |d| 3 + (d * 7) % 13,
        |d, t| d * 5 + t * 3 + t * t,
    );
    (dir, model, corpus, queries)
}

fn max_rel(got: &Mat<f64>, want: &Mat<f64>) -> f64 {
    let mut scale = 0f64;
    let mut err = 0f64;
    for j in 0..want.ncols() {
        for i in 0..want.nrows() {
            scale = scale.max(want[(i, j)].abs());
            err = err.max((got[(i, j)] - want[(i, j)]).abs());
        }
    }
    err / scale
}

#[test]
fn woodbury_equals_a_dense_damped_solve() {
    let (_dir, model_dir, corpus, _) = random_setup("woodbury", 12);
    let model =
        infl::model::load(&model_dir, ModuleSelection::All, infl::model::Compute::CPU).unwrap();
    let mut tok = infl::data::LazyTokenizer::new(&model_dir);
    let data = infl::data::read_corpus(&corpus, &mut tok, 16, model.vocab_size()).unwrap();
    let n = data.sequences.len();
    assert_eq!(n, 12);
    let grads = exact::fisher_gradients(
        model.as_ref(),
        &data.sequences,
        &options(Fisher::Sampled),
        &Silent,
    )
    .unwrap();
    assert_eq!(grads.len(), 8);
    for m in &grads {
        let d = m.nrows();
        // D > N here: F has rank ≤ N and only the damping makes F + λI invertible.
        assert!(d > n);
        let lam = exact::layer_damping(m.as_ref(), Damping::Heuristic);
        assert!(lam > 0.0);
        // Right-hand sides: some training gradients (where F acts) and a generic vector.
        let rhs = Mat::from_fn(d, 3, |i, j| match j {
            0 => m[(i, 0)],
            1 => m[(i, n - 1)],
            _ => ((i * 37 % 101) as f64 / 101.0 - 0.5) * 1e-2,
        });
        // Reference: F + λI formed explicitly and solved by LU, in f64.
        let mut f = Mat::<f64>::from_fn(d, d, |i, j| {
            (0..n).map(|z| m[(i, z)] * m[(j, z)]).sum::<f64>() / n as f64
        });
        for i in 0..d {
            f[(i, i)] += lam;
        }
        let want = f.partial_piv_lu().solve(&rhs);
        for solver in [Solver::Woodbury, Solver::Dense] {
            let got = exact::damped_inverse_apply(m.as_ref(), lam, rhs.as_ref(), solver).unwrap();
            let err = max_rel(&got, &want);
            assert!(err < 1e-10, "{solver:?}: relative error {err:e}");
        }
        // (F + λI)·x = rhs, checked directly on the Woodbury answer.
        let x =
            exact::damped_inverse_apply(m.as_ref(), lam, rhs.as_ref(), Solver::Woodbury).unwrap();
        let back = &f * &x;
        assert!(max_rel(&back, &rhs) < 1e-10);
    }
    // The whole exact-score computation, every layer forced through either solver.
    let mut tok = infl::data::LazyTokenizer::new(&model_dir);
    let queries = model_dir.parent().unwrap().join("queries.jsonl");
    let (qs, _) = infl::data::read_queries(&queries, &mut tok, 16, model.vocab_size()).unwrap();
    let scores = |solver| {
        exact::exact_scores(
            model.as_ref(),
            &data.sequences,
            &qs,
            &options(Fisher::Sampled),
            Damping::Heuristic,
            Some(solver),
            &Silent,
        )
        .unwrap()
    };
    let (w, d) = (scores(Solver::Woodbury), scores(Solver::Dense));
    assert!(w.layers.iter().all(|l| l.solver == Solver::Woodbury));
    assert!(d.layers.iter().all(|l| l.solver == Solver::Dense));
    let flat = |s: &exact::ExactScores| Mat::from_fn(s.scores.len(), n, |q, z| s.scores[q][z]);
    let err = max_rel(&flat(&w), &flat(&d));
    assert!(err < 1e-9, "exact scores, Woodbury vs dense: {err:e}");

    // λ must be positive: the exact damped Fisher of a rank-deficient F needs it.
    let m = &grads[0];
    let e = exact::damped_inverse_apply(m.as_ref(), 0.0, m.as_ref(), Solver::Woodbury);
    assert!(matches!(e, Err(infl::Error::Input(_))));
}

fn fit_and_score(
    model: &Path,
    corpus: &Path,
    queries: &Path,
    dir: &Path,
    strategy: Strategy,
    fisher: Fisher,
    damping: Damping,
) -> (Vec<Vec<f64>>, workflow::ScoreSummary) {
    let factors = dir.join(format!("{strategy:?}-factors"));
    let results = dir.join(format!("{strategy:?}-results"));
    workflow::fit(
        &FitJob {
            model: model.into(),
            train: corpus.into(),
            out: factors.clone(),
            store: None,
            partitioning: Default::default(),
            options: FitOptions {
                strategy,
                modules: ModuleSelection::All,
                layers: None,
                max_len: Some(16),
                ..options(fisher)
            },
            run: infl::options::RunOptions {
                memory_check: false,
                shard: infl::shard::Shard::WHOLE,
                fresh: true,
                ..infl::options::RunOptions::ONCE
            },
            compute: Default::default(),
        },
        &Silent,
    )
    .unwrap();
    let summary = workflow::score(
        &ScoreJob {
            model: model.into(),
            factors,
            train: corpus.into(),
            queries: queries.into(),
            out: results.clone(),
            options: infl::options::ScoreOptions {
                damping,
                top_k: 3,
                dense: true,
                batch_size: 4,
                max_len: Some(16),
                query_rank: infl::options::QueryRank(None),
                per_layer: false,
                per_token: false,
                normalize: Normalize::None,
                prefilter: None,
                store: false,
                ..infl::options::ScoreOptions::default()
            },
            run: infl::options::RunOptions {
                memory_check: false,
                shard: infl::shard::Shard::WHOLE,
                fresh: true,
                ..infl::options::RunOptions::ONCE
            },
            index: None,
            compute: Default::default(),
            partitioning: Default::default(),
        },
        &Silent,
    )
    .unwrap();
    (exact::read_dense(&results).unwrap(), summary)
}

/// (F + λI)⁻¹ → I/λ as λ → ∞: λ·I_exact(q, z) is then the plain gradient dot product, which is
/// what `score --strategy identity` computes. This pins the exact scores' sign, scale, query
/// gradients (completion tokens) and training gradients (data labels) to `infl score`'s.
#[test]
fn huge_damping_gives_the_identity_scores() {
    let (dir, model_dir, corpus, queries) = random_setup("identity", 10);
    let model =
        infl::model::load(&model_dir, ModuleSelection::All, infl::model::Compute::CPU).unwrap();
    let mut tok = infl::data::LazyTokenizer::new(&model_dir);
    let data = infl::data::read_corpus(&corpus, &mut tok, 16, model.vocab_size()).unwrap();
    let (qs, _) = infl::data::read_queries(&queries, &mut tok, 16, model.vocab_size()).unwrap();
    let (identity, _) = fit_and_score(
        &model_dir,
        &corpus,
        &queries,
        &dir,
        Strategy::Identity,
        Fisher::Sampled,
        Damping::Heuristic,
    );
    let lam = 1e10;
    for fisher in [Fisher::Sampled, Fisher::Empirical] {
        let ex = exact::exact_scores(
            model.as_ref(),
            &data.sequences,
            &qs,
            &options(fisher),
            Damping::Fixed(lam),
            None,
            &Silent,
        )
        .unwrap();
        assert_eq!(ex.scores.len(), 2);
        assert!(ex.layers.iter().all(|l| l.damping == lam));
        for (e_row, i_row) in ex.scores.iter().zip(&identity) {
            let scale = i_row.iter().fold(0f64, |m, x| m.max(x.abs()));
            assert!(scale > 0.0);
            for (e, i) in e_row.iter().zip(i_row) {
                let got = e * lam;
                assert!(
                    (got - i).abs() <= 1e-4 * scale,
                    "{fisher:?}: λ·I_exact = {got}, identity {i} (scale {scale})"
                );
            }
        }
    }
}

/// The default λ, 0.1·trace(F)/D from the exact per-sequence Fisher, is EK-FAC's 0.1·mean(Λ):
/// the same labels (fit's eigenvalue pass, same seed) and an orthogonal eigenbasis. A mismatch
/// of the sampled labels would show here. Also: with moderate damping, the exact scores differ
/// from the identity ones (the Fisher matters), and every strategy's λ is recorded.
#[test]
fn heuristic_damping_equals_the_ekfac_runs_recorded_damping() {
    let (dir, model_dir, corpus, queries) = random_setup("damping", 14);
    let out = dir.join("out");
    let report = exact::run(
        &ExactJob {
            model: model_dir.clone(),
            train: corpus.clone(),
            queries: queries.clone(),
            out: out.clone(),
            fisher: Fisher::Sampled,
            seed: 3,
            modules: ModuleSelection::All,
            max_len: Some(16),
            batch_size: 4,
            damping: Damping::Heuristic,
            top_k: 3,
            memory_limit: None,
            refine: Default::default(),
        },
        &Silent,
    )
    .unwrap();
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("runs/ekfac/results/meta.json")).unwrap(),
    )
    .unwrap();
    let recorded = meta["damping_per_layer"].as_array().unwrap();
    assert_eq!(recorded.len(), report.layers.len());
    for (layer, rec) in report.layers.iter().zip(recorded) {
        assert_eq!(rec[0].as_str().unwrap(), layer.name);
        let ekfac = rec[1].as_f64().unwrap();
        assert!(
            (layer.damping - ekfac).abs() <= 1e-5 * ekfac,
            "{}: exact λ {} vs ekfac λ {ekfac}",
            layer.name,
            layer.damping
        );
        assert!((layer.mean_eigenvalue * 0.1 - layer.damping).abs() <= 1e-12 * layer.damping);
    }
    // With another seed the sampled labels differ, and so does λ (the check above can fail).
    let other = exact::exact_scores(
        infl::model::load(&model_dir, ModuleSelection::All, infl::model::Compute::CPU)
            .unwrap()
            .as_ref(),
        &{
            let m = infl::model::load(&model_dir, ModuleSelection::All, infl::model::Compute::CPU)
                .unwrap();
            let mut tok = infl::data::LazyTokenizer::new(&model_dir);
            infl::data::read_corpus(&corpus, &mut tok, 16, m.vocab_size())
                .unwrap()
                .sequences
        },
        &[],
        &FitOptions {
            seed: 4,
            ..options(Fisher::Sampled)
        },
        Damping::Heuristic,
        None,
        &Silent,
    )
    .unwrap();
    assert!(other
        .layers
        .iter()
        .zip(&report.layers)
        .any(|(a, b)| (a.damping - b.damping).abs() > 1e-4 * b.damping));

    let names: Vec<Strategy> = report.strategies.iter().map(|s| s.strategy).collect();
    assert_eq!(names, exact::STRATEGIES.to_vec());
    let identity = &report.strategies[3];
    assert!(identity.damping_per_layer.iter().all(|(_, l)| *l == 0.0));
    // The table and exact.json agree.
    let back: ExactReport =
        serde_json::from_str(&std::fs::read_to_string(out.join("exact.json")).unwrap()).unwrap();
    assert_eq!(back.strategies.len(), 5);
    assert_eq!(back.layers.len(), 8);
    assert!(report.table().contains("ekfac"));
}

fn bundled_slice(dir: &Path, lines: usize) -> PathBuf {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo/corpus.jsonl");
    let text = std::fs::read_to_string(corpus).unwrap();
    let slice: String = text.lines().take(lines).map(|l| format!("{l}\n")).collect();
    let path = dir.join("slice.jsonl");
    std::fs::write(&path, slice).unwrap();
    path
}

#[test]
fn cli_validate_exact_on_the_bundled_model() {
    let dir = scratch("validate-exact", "cli");
    let slice = bundled_slice(&dir, 30);
    let out = dir.join("out");
    let o = ok(&[
        "validate",
        "exact",
        "--train",
        s(&slice),
        "--out",
        s(&out),
        "--top-k",
        "5",
    ]);
    let table = String::from_utf8_lossy(&o.stdout);
    for name in [
        "ekfac",
        "kfac",
        "diagonal",
        "identity",
        "Spearman",
        "top-5 overlap",
    ] {
        assert!(table.contains(name), "{name} missing from:\n{table}");
    }
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("exact.json")).unwrap()).unwrap();
    assert_eq!(j["kind"], "validate-exact");
    assert_eq!(j["fisher"], "sampled");
    assert_eq!(j["top_k"], 5);
    assert_eq!(
        j["corpus"]["sha256"].as_str().unwrap(),
        infl::data::sha256_file(&slice).unwrap()
    );
    assert_eq!(j["corpus"]["max_len"], 48);
    let n_seq = j["corpus"]["n_sequences"].as_u64().unwrap();
    assert!(n_seq >= 30);
    assert_eq!(j["queries"]["ids"].as_array().unwrap().len(), 8);
    assert_eq!(j["model"]["weights_sha256"].as_str().unwrap().len(), 64);
    let layers = j["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 8);
    for l in layers {
        assert!(l["damping"].as_f64().unwrap() > 0.0);
        assert_eq!(l["solver"], "woodbury"); // every bundled layer has D > N here
    }
    let strategies = j["strategies"].as_array().unwrap();
    let names: Vec<&str> = strategies
        .iter()
        .map(|s| s["strategy"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["ekfac", "kfac", "diagonal", "identity", "ekfac-refined"]
    );
    for st in strategies {
        let per_query = st["per_query"].as_array().unwrap();
        assert_eq!(per_query.len(), 8);
        for q in per_query.iter().chain([&st["mean"], &st["min"]]) {
            for key in ["spearman", "pearson", "top_k_overlap"] {
                let v = q[key]
                    .as_f64()
                    .unwrap_or_else(|| panic!("{key} of {} not finite: {q}", st["strategy"]));
                assert!((-1.0..=1.0).contains(&v), "{key} = {v}");
            }
        }
        // An overlap of two top-5 sets is a multiple of 1/5 (per query, and so the minimum).
        for q in per_query.iter().chain([&st["min"]]) {
            let t = q["top_k_overlap"].as_f64().unwrap() * 5.0;
            assert!((t - t.round()).abs() < 1e-9 && t >= 0.0, "{q}");
        }
        let mean = st["mean"]["spearman"].as_f64().unwrap();
        let min = st["min"]["spearman"].as_f64().unwrap();
        assert!(min <= mean + 1e-12);
        assert!(out
            .join("runs")
            .join(st["strategy"].as_str().unwrap())
            .join("results/scores.safetensors")
            .exists());
    }

    // Too little memory allowed: refused with the numbers, exit code 3.
    let o = run(&[
        "validate",
        "exact",
        "--train",
        s(&slice),
        "--out",
        s(&dir.join("refused")),
        "--memory-limit",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(3));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--modules mlp") && err.contains("MiB"),
        "{err}"
    );
    assert!(!dir.join("refused/exact.json").exists());

    // The help teaches what the numbers mean.
    let o = ok(&["validate", "exact", "--help"]);
    let help = String::from_utf8_lossy(&o.stdout);
    for word in ["Woodbury", "Spearman", "Pearson", "top-k", "trace(F_l)"] {
        assert!(help.contains(word), "{word} missing from --help");
    }
}
