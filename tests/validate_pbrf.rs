//! `infl validate pbrf`: the optimiser against the closed-form PBRF of a linear model with
//! squared-error loss, the nonlinear command end to end (outputs, resuming, bad input), and the
//! linear response end to end on a Llama fixture (convergence recorded, MoE refused).
//! Both responses against the dense damped Gauss-Newton are unit tests of `validate::pbrf`.

mod common;

use common::{ok, run, s};
use faer::linalg::solvers::Solve;
use faer::Mat;
use infl::validate::pbrf::solve::{self, Problem, SolveOptions};

/// `h = W x` (W: k × d) with loss `½‖W x − y‖²`, whose Bregman divergence is `½‖h − h_s‖²`:
/// `Φ_ε(Δ) = (1/N) Σ_i ½‖Δ x_i‖² − ε (L_m(W_s + Δ) − L_m(W_s)) + ½ λ ‖Δ‖²`, and the measurement
/// `f_q(W) = ½‖W x_q − y_q‖²`. Δ is stored row-major.
struct Linear {
    w: Mat<f64>,
    xs: Vec<Vec<f64>>,
    ys: Vec<Vec<f64>>,
    queries: Vec<(Vec<f64>, Vec<f64>)>,
    lambda: Vec<f64>,
}

impl Linear {
    fn new(lambda: f64) -> Self {
        let (k, d) = (2, 3);
        let w = Mat::from_fn(k, d, |i, j| 0.3 * (i as f64 + 1.0) - 0.2 * j as f64);
        let xs: Vec<Vec<f64>> = (0..5)
            .map(|i| (0..d).map(|j| ((i * 7 + j * 3) % 5) as f64 - 2.0).collect())
            .collect();
        let ys: Vec<Vec<f64>> = (0..5)
            .map(|i| (0..k).map(|j| ((i + 2 * j) % 3) as f64 - 1.0).collect())
            .collect();
        let queries = vec![
            (vec![1.0, -1.0, 0.5], vec![0.3, -0.2]),
            (vec![0.0, 2.0, -1.0], vec![-1.0, 1.0]),
        ];
        Linear {
            w,
            xs,
            ys,
            queries,
            lambda: vec![lambda; k * d],
        }
    }

    fn at(&self, delta: &[f64]) -> Mat<f64> {
        let d = self.w.ncols();
        Mat::from_fn(self.w.nrows(), d, |i, j| self.w[(i, j)] + delta[i * d + j])
    }
}

fn residual(w: &Mat<f64>, x: &[f64], y: &[f64]) -> Vec<f64> {
    (0..w.nrows())
        .map(|i| (0..w.ncols()).map(|j| w[(i, j)] * x[j]).sum::<f64>() - y[i])
        .collect()
}

impl Problem for Linear {
    fn dim(&self) -> usize {
        self.lambda.len()
    }

    fn damping(&self) -> &[f64] {
        &self.lambda
    }

    fn gradient(&mut self, delta: &[f64], m: usize, epsilon: f64) -> infl::Result<Vec<f64>> {
        let (k, d) = (self.w.nrows(), self.w.ncols());
        let n = self.xs.len() as f64;
        let mut g = vec![0.0; k * d];
        // (1/N) Σ_i (Δ x_i) x_iᵀ.
        for x in &self.xs {
            for i in 0..k {
                let dx: f64 = (0..d).map(|j| delta[i * d + j] * x[j]).sum();
                for j in 0..d {
                    g[i * d + j] += dx * x[j] / n;
                }
            }
        }
        // −ε (W x_m − y_m) x_mᵀ.
        let r = residual(&self.at(delta), &self.xs[m], &self.ys[m]);
        for i in 0..k {
            for j in 0..d {
                g[i * d + j] -= epsilon * r[i] * self.xs[m][j];
            }
        }
        Ok(g)
    }

    fn measure(&mut self, delta: &[f64]) -> infl::Result<Vec<f64>> {
        let w = self.at(delta);
        Ok(self
            .queries
            .iter()
            .map(|(x, y)| 0.5 * residual(&w, x, y).iter().map(|r| r * r).sum::<f64>())
            .collect())
    }
}

/// The exact minimiser: Δ (C + λI − ε x_m x_mᵀ) = ε r_m x_mᵀ, with C = (1/N) Σ x xᵀ and
/// r_m = W_s x_m − y_m (Φ is quadratic in Δ).
fn closed_form(p: &Linear, m: usize, epsilon: f64) -> Vec<f64> {
    let (k, d) = (p.w.nrows(), p.w.ncols());
    let n = p.xs.len() as f64;
    let xm = &p.xs[m];
    let a = Mat::from_fn(d, d, |i, j| {
        let c: f64 = p.xs.iter().map(|x| x[i] * x[j]).sum::<f64>() / n;
        c + if i == j { p.lambda[0] } else { 0.0 } - epsilon * xm[i] * xm[j]
    });
    let r = residual(&p.w, xm, &p.ys[m]);
    // Δ A = B ⇔ Aᵀ Δᵀ = Bᵀ (A is symmetric).
    let bt = Mat::from_fn(d, k, |j, i| epsilon * r[i] * xm[j]);
    let dt = a.partial_piv_lu().solve(bt);
    (0..k)
        .flat_map(|i| (0..d).map(move |j| (i, j)))
        .map(|(i, j)| dt[(j, i)])
        .collect()
}

#[test]
fn the_optimised_pbrf_equals_the_closed_form_of_a_quadratic_model() {
    let options = SolveOptions {
        max_steps: 200,
        tolerance: 1e-12,
        memory: 10,
    };
    for lambda in [0.05, 1.0] {
        let mut p = Linear::new(lambda);
        let base = p.measure(&[0.0; 6]).unwrap();
        for m in 0..5 {
            // A finite ε where the response is visibly nonlinear, and a small one.
            for epsilon in [0.2, 1e-3] {
                let (delta, sol) = solve::minimise(&mut p, m, epsilon, &options).unwrap();
                assert!(sol.converged, "{sol:?}");
                let want = closed_form(&p, m, epsilon);
                for (a, b) in delta.iter().zip(&want) {
                    assert!(
                        (a - b).abs() < 1e-9,
                        "λ {lambda}, m {m}, ε {epsilon}: {a} vs {b}"
                    );
                }
                let got = solve::response(&mut p, m, epsilon, &options, &base).unwrap();
                let f_up = p.measure(&closed_form(&p, m, epsilon)).unwrap();
                let f_down = p.measure(&closed_form(&p, m, -epsilon)).unwrap();
                for q in 0..2 {
                    let exact = (f_up[q] - f_down[q]) / (2.0 * epsilon);
                    assert!(
                        (got.influence[q] - exact).abs() < 1e-7 * exact.abs().max(1.0),
                        "λ {lambda}, m {m}, ε {epsilon}, q {q}: {} vs {exact}",
                        got.influence[q]
                    );
                }
            }
            // As ε → 0 the PBRF influence is ∇f_qᵀ (C ⊗ I + λ)⁻¹ ∇L_m = r_qᵀ r_m · x_mᵀ (C + λ)⁻¹ x_q.
            let got = solve::response(&mut p, m, 1e-4, &options, &base).unwrap();
            let d = 3;
            let n = p.xs.len() as f64;
            let c = Mat::from_fn(d, d, |i, j| {
                p.xs.iter().map(|x| x[i] * x[j]).sum::<f64>() / n
                    + if i == j { lambda } else { 0.0 }
            });
            let lu = c.partial_piv_lu();
            for (q, (xq, yq)) in p.queries.iter().enumerate() {
                let s = lu.solve(Mat::from_fn(d, 1, |i, _| xq[i]));
                let quad: f64 = (0..d).map(|i| p.xs[m][i] * s[(i, 0)]).sum();
                let rq = residual(&p.w, xq, yq);
                let rm = residual(&p.w, &p.xs[m], &p.ys[m]);
                let first_order = quad * rq.iter().zip(&rm).map(|(a, b)| a * b).sum::<f64>();
                assert!(
                    (got.influence[q] - first_order).abs() < 1e-6 * first_order.abs().max(1.0),
                    "λ {lambda}, m {m}, q {q}: {} vs {first_order}",
                    got.influence[q]
                );
            }
        }
    }
}

fn pbrf_json(out: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("pbrf.json")).unwrap()).unwrap()
}

#[test]
fn command_writes_correlations_resumes_and_refuses_bad_input() {
    let dir = common::scratch("validate-pbrf", "cli");
    let (model, corpus, queries) =
        common::random_gpt2(&dir, 5, 14, |d| 4 + d % 7, |d, t| d * 5 + t * 3 + t * t);
    let out = dir.join("out");
    let args = |out: &std::path::Path, extra: &[&'static str]| {
        let mut a = vec![
            "validate",
            "pbrf",
            "--model",
            s(&model),
            "--train",
            s(&corpus),
            "--queries",
            s(&queries),
            "--response",
            "nonlinear",
            "--sample",
            "5",
            "--steps",
            "60",
            "--modules",
            "mlp",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        a.extend(["--out".to_string(), out.display().to_string()]);
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let a = args(&out, &[]);
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    let printed = String::from_utf8(ok(&refs).stdout).unwrap();
    assert!(
        printed.contains("Against the PBRF") && printed.contains("pooled"),
        "{printed}"
    );
    let report = pbrf_json(&out);
    assert_eq!(report["kind"], "validate-pbrf");
    let samples = report["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 5);
    // ε defaults to 1/N.
    assert!((report["epsilon"].as_f64().unwrap() - 1.0 / 14.0).abs() < 1e-12);
    for sample in samples {
        assert_eq!(sample["influence"].as_array().unwrap().len(), 2);
    }
    let names: Vec<&str> = report["strategies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["strategy"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["ekfac", "ekfac-refined", "kfac", "diagonal", "identity"]
    );
    assert_eq!(report["response"], "nonlinear");
    assert!(report["linear"].is_null());
    // The PBRF's λ is EK-FAC's.
    assert_eq!(
        report["lambda_per_layer"],
        report["strategies"][0]["damping_per_layer"]
    );
    for strategy in report["strategies"].as_array().unwrap() {
        let p = strategy["pooled_pearson"].as_f64().unwrap();
        assert!((-1.0..=1.0).contains(&p), "{strategy}");
    }

    // Rerun: every sequence is read back from work/, not recomputed.
    let ok_again = ok(&refs);
    assert!(ok_again.status.success());
    let again = pbrf_json(&out);
    assert_eq!(again["samples"], report["samples"]);
    // The λ or ε changed: the saved results no longer belong to the run.
    let b = args(&out, &["--epsilon", "0.01"]);
    let refs_b: Vec<&str> = b.iter().map(String::as_str).collect();
    ok(&refs_b);
    let other = pbrf_json(&out);
    assert_ne!(
        other["samples"][0]["influence"],
        report["samples"][0]["influence"]
    );

    // Bad input: usage errors exit 2, bad files 3.
    for (extra, code) in [
        (&["--sample", "2"][..], 2),
        (&["--epsilon", "0"][..], 2),
        (&["--epsilon", "-1"][..], 2),
        (&["--steps", "0"][..], 2),
    ] {
        let a = args(&dir.join("bad"), extra);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let r = run(&refs);
        assert_eq!(
            r.status.code(),
            Some(code),
            "{extra:?}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
    }
    let two = dir.join("two.jsonl");
    std::fs::write(&two, "{\"ids\": [1, 2, 3]}\n{\"ids\": [4, 5, 6]}\n").unwrap();
    let r = run(&[
        "validate",
        "pbrf",
        "--model",
        s(&model),
        "--train",
        s(&two),
        "--queries",
        s(&queries),
        "--out",
        s(&dir.join("bad2")),
    ]);
    assert_eq!(r.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&r.stderr).contains("at least 3"));
    let neox = common::family_fixture("gpt_neox_sequential");
    if neox.exists() {
        let r = run(&[
            "validate",
            "pbrf",
            "--model",
            s(&neox),
            "--train",
            s(&corpus),
            "--queries",
            s(&queries),
            "--out",
            s(&dir.join("bad3")),
            "--response",
            "nonlinear",
        ]);
        assert_eq!(
            r.status.code(),
            Some(3),
            "{}",
            String::from_utf8_lossy(&r.stderr)
        );
        assert!(String::from_utf8_lossy(&r.stderr).contains("GPT-2"));
    }
}

/// A corpus of 10 id sequences and two queries for the 64-token fixtures.
fn fixture_data(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let mut corpus = String::new();
    for d in 0..10u32 {
        let ids: Vec<u32> = (0..4 + d % 5)
            .map(|t| (d * 5 + t * 3 + t * t) % 64)
            .collect();
        corpus.push_str(&format!("{{\"ids\": {ids:?}}}\n"));
    }
    let (c, q) = (dir.join("corpus.jsonl"), dir.join("queries.jsonl"));
    std::fs::write(&c, corpus).unwrap();
    std::fs::write(
        &q,
        "{\"id\": \"a\", \"prompt_ids\": [1, 2, 3], \"completion_ids\": [4, 5]}\n\
         {\"id\": \"b\", \"prompt_ids\": [9], \"completion_ids\": [10, 11, 12]}\n",
    )
    .unwrap();
    (c, q)
}

#[test]
fn linear_response_on_a_llama_records_its_solves_and_refuses_experts() {
    let dir = common::scratch("validate-pbrf", "linear");
    let (corpus, queries) = fixture_data(&dir);
    let llama = common::family_fixture("llama");
    let args = |model: &std::path::Path, out: &str, extra: &[&str]| {
        let mut a: Vec<String> = [
            "validate",
            "pbrf",
            "--model",
            s(model),
            "--train",
            s(&corpus),
            "--queries",
            s(&queries),
            "--modules",
            "attn",
            "--out",
            s(&dir.join(out)),
        ]
        .map(String::from)
        .to_vec();
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let a = args(&llama, "out", &[]);
    let printed =
        String::from_utf8(ok(&a.iter().map(String::as_str).collect::<Vec<_>>()).stdout).unwrap();
    assert!(
        printed.contains("linearised PBRF") && !printed.contains("NOT CONVERGED"),
        "{printed}"
    );
    let report = pbrf_json(&dir.join("out"));
    assert_eq!(report["response"], "linear");
    assert!(report["epsilon"].is_null() && report["samples"].as_array().unwrap().is_empty());
    let linear = &report["linear"];
    assert_eq!(linear["sequences"], 10);
    assert_eq!(linear["options"]["tolerance"], 1e-5);
    for q in linear["per_query"].as_array().unwrap() {
        assert_eq!(q["converged"], true, "{q}");
        assert!(q["residual"].as_f64().unwrap() <= 1e-5, "{q}");
        assert!(q["iterations"].as_u64().unwrap() >= 1, "{q}");
    }
    assert_eq!(linear["scores"].as_array().unwrap().len(), 2);
    let strategies = report["strategies"].as_array().unwrap();
    assert_eq!(strategies.len(), 5);
    for st in strategies {
        for row in st["scores"].as_array().unwrap() {
            assert_eq!(row.as_array().unwrap().len(), 10, "every sequence compared");
        }
    }
    assert_eq!(
        report["lambda_per_layer"],
        strategies[0]["damping_per_layer"]
    );
    assert_eq!(report["lambda_per_layer"], linear["damping_per_layer"]);
    // ekfac-refined's products average over the same 10 sequences (--refine-batch 32 ≥ N):
    // its 5 iterations from EK-FAC's answer bring it at least as close as EK-FAC.
    let pooled = |i: usize| strategies[i]["pooled_pearson"].as_f64().unwrap();
    assert_eq!(strategies[1]["strategy"], "ekfac-refined");
    assert!(
        pooled(1) >= pooled(0) - 1e-9,
        "{} vs {}",
        pooled(1),
        pooled(0)
    );

    // One iteration cannot reach 1e-9: the table says so and the JSON records it.
    let a = args(
        &llama,
        "short",
        &["--cg-iterations", "1", "--cg-tolerance", "1e-9"],
    );
    let printed =
        String::from_utf8(ok(&a.iter().map(String::as_str).collect::<Vec<_>>()).stdout).unwrap();
    assert!(printed.contains("NOT CONVERGED: a, b"), "{printed}");
    let short = pbrf_json(&dir.join("short"));
    for q in short["linear"]["per_query"].as_array().unwrap() {
        assert_eq!(
            (q["converged"].as_bool(), q["iterations"].as_u64()),
            (Some(false), Some(1))
        );
    }

    // Refused: the nonlinear response on a Llama, the linear one on a mixture of experts.
    let a = args(&llama, "bad", &["--response", "nonlinear"]);
    let r = run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(r.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&r.stderr).contains("GPT-2"));
    let moe = common::family_fixture("../moe/mixtral");
    let a = args(&moe, "bad2", &[]);
    let r = run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(3), "{err}");
    assert!(err.contains("mixture-of-experts"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
