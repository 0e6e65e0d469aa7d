//! `infl bench --passes-only`: `infl fit` (EK-FAC) and a full-rank `infl score` timed pass by
//! pass, each pass printed against its GEMM-bound floor (the FLOPs of its products, counted from
//! the shapes, at the GEMM rate read while it ran), then the passes' parts timed apart.

use super::{fit_job, score_job, Inputs};
use anyhow::Result;
use infl::curvature::{statistics_flops, Fisher, Pass};
use infl::data::{Corpus, Query};
use infl::model::{TapModel, TokenBatch};
use infl::options::RunOptions;
use infl::pass::clock::{Elapsed, PhaseClock, Stopwatch};
use infl::pass::Progress;
use infl::pass_parts::PartSeconds;
use infl::workflow::{self, FitJob, ScoreJob};

/// How often `bench --passes-only` reads the GEMM rate while a pass runs. A reading takes
/// about 0.12 s (two reference products per thread) and is left out of the pass's time.
const RATE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// A phase of `bench --passes-only`'s run: its time (the rate readings' own left out) and the
/// GEMM rates read while it ran.
struct Timed {
    time: Elapsed,
    rates: Vec<f64>,
}

/// One run of `bench --passes-only`'s fit and score: each phase's time and rates, and the
/// fastest GEMM rate measured before, between, after and during them.
struct PassRun {
    best: f64,
    fit: Elapsed,
    score: Elapsed,
    covariance: Timed,
    eigenvalue: Timed,
    queries: Timed,
    scoring: Timed,
}

impl PassRun {
    /// The run's passes in the tables' order, each with its phase and `flops` (in that order).
    fn passes(&self, flops: [f64; 4]) -> [(&'static str, &Timed, f64); 4] {
        [
            ("covariance pass", &self.covariance, flops[0]),
            ("eigenvalue pass", &self.eigenvalue, flops[1]),
            ("score: query gradients", &self.queries, flops[2]),
            ("score: scoring pass", &self.scoring, flops[3]),
        ]
    }
}

/// The mean of `rates`, or `fallback` when there are none. An arithmetic mean, because the
/// readings are spread evenly over the pass's time: its FLOPs over the mean rate times its
/// seconds is its share of the GEMM throughput the machine gave over those seconds.
fn mean_rate(rates: &[f64], fallback: f64) -> f64 {
    if rates.is_empty() {
        fallback
    } else {
        rates.iter().sum::<f64>() / rates.len() as f64
    }
}

/// The median of `values` (not empty).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// What the passes ran on, and the FLOPs of their products counted from the shapes.
struct Work {
    n_tokens: usize,
    n_seqs: usize,
    n_queries: usize,
    batch: usize,
    /// The products of the forward and backward passes, batch by batch as the passes cut them.
    taps: f64,
    /// The query gradients: their forward and backward and their preconditioning.
    queries: f64,
    /// The statistics alone of the covariance, eigenvalue and scoring passes.
    statistics: [f64; 3],
}

impl Work {
    /// Counts the FLOPs of the passes over `data` and `queries` in batches of `batch`.
    fn count(model: &dyn TapModel, data: &Corpus, queries: &[Query], batch: usize) -> Result<Work> {
        let tracked = model.tracked();
        let mut taps = 0.0;
        for chunk in data.sequences.chunks(batch) {
            let refs: Vec<(u64, &[u32])> = chunk.iter().map(|s| (0, s.ids.as_slice())).collect();
            taps += model
                .tap_flops(&TokenBatch::training(&refs))
                .ok_or_else(|| {
                    anyhow::anyhow!("--passes-only needs the fast engine, which counts its FLOPs")
                })?;
        }
        let mut query_flops = 0.0;
        for chunk in queries.chunks(batch) {
            let refs: Vec<(u64, &[u32], &[u32])> = chunk
                .iter()
                .map(|q| (0, q.prompt_ids.as_slice(), q.completion_ids.as_slice()))
                .collect();
            query_flops += model.tap_flops(&TokenBatch::queries(&refs)).unwrap_or(0.0);
            let lens: Vec<usize> = chunk
                .iter()
                .map(|q| q.prompt_ids.len() + q.completion_ids.len())
                .collect();
            query_flops += infl::influence::query_flops(tracked, &lens, false);
        }
        let n_tokens = data.n_tokens();
        let n_seqs = data.sequences.len();
        Ok(Work {
            n_tokens,
            n_seqs,
            n_queries: queries.len(),
            batch,
            taps,
            queries: query_flops,
            statistics: [
                statistics_flops(Pass::Covariance, tracked, n_tokens),
                statistics_flops(Pass::Eigenvalue, tracked, n_tokens),
                infl::influence::scoring_flops(tracked, n_tokens, n_seqs, queries.len()),
            ],
        })
    }

    /// Each pass's FLOPs, in `PassRun::passes`' order.
    fn passes(&self) -> [f64; 4] {
        let [covariance, eigenvalue, scoring] = self.statistics;
        [
            self.taps + covariance,
            self.taps + eigenvalue,
            self.queries,
            self.taps + scoring,
        ]
    }
}

/// `infl bench --passes-only`: times `infl fit` (EK-FAC, with `fisher`'s labels) and a
/// full-rank `infl score` pass by pass, `repeat` times, and prints each pass against its
/// GEMM-bound floor.
pub fn pass_floors(
    model: &dyn TapModel,
    inputs: &Inputs,
    fisher: Fisher,
    repeat: usize,
    progress: &dyn Progress,
) -> Result<()> {
    let mut tok = infl::data::LazyTokenizer::new(&inputs.model);
    let data =
        infl::data::read_corpus(&inputs.train, &mut tok, inputs.max_len, model.vocab_size())?;
    let queries = infl::data::read_queries(
        &inputs.queries,
        &mut tok,
        model.max_positions(),
        model.vocab_size(),
    )?
    .0;
    let batch = inputs.batch_size.max(1);
    let work = Work::count(model, &data, &queries, batch)?;

    let runs = (0..repeat.max(1))
        .map(|_| time_fit_and_score(inputs, fisher, batch, progress))
        .collect::<Result<Vec<_>>>()?;
    // The fastest rate of all: the strict floor is then the lower bound it claims to be, in
    // every run.
    let rate = runs.iter().map(|r| r.best).fold(0.0, f64::max);
    let floors = Floors { work, rate };
    for (k, run) in runs.iter().enumerate() {
        floors.print_run(run, k, runs.len());
    }
    println!(
        "(the passes' products: forward and activation backward, covariance Grams as symmetric\n\
         rank-k updates, the eigenbasis rotations and per-sequence products, the scores' dot\n\
         products; element-wise work, the eigendecomposition and I/O are not counted. GF/s: the\n\
         mean of the rates read during the pass (the best rate where none was), the floor's\n\
         rate; vs best: the floor at the best rate read in the run{}, a stricter bound on a\n\
         machine whose rate wanders; cores: the process's CPU time over the wall time, of {}\n\
         threads)",
        if runs.len() > 1 { "s" } else { "" },
        rayon::current_num_threads()
    );
    if runs.len() > 1 {
        floors.print_over_runs(&runs);
    }
    let last = runs.last().expect("at least one run");

    // Each pass overlaps its forward/backward with its statistics: the parts timed apart say
    // which of the two is off its floor.
    let parts = infl::pass_parts::time_parts(model, &data.sequences, batch, queries.len().max(1))?;
    floors.print_parts(&parts, last, runs.len() > 1);
    Ok(())
}

/// The passes' work and the best GEMM rate of all runs: the two bounds of every row.
struct Floors {
    work: Work,
    rate: f64,
}

impl Floors {
    /// (floor at the rates read during the phase, at the best rate), in seconds.
    fn floors(&self, flops: f64, phase: &Timed) -> (f64, f64) {
        (
            flops / mean_rate(&phase.rates, self.rate),
            flops / self.rate,
        )
    }

    /// The whole job's (floor at the rates read, floor at the best rate) of a run.
    fn job_floors(&self, run: &PassRun) -> (f64, f64) {
        run.passes(self.work.passes())
            .into_iter()
            .map(|(_, phase, flops)| self.floors(flops, phase))
            .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y))
    }

    /// The table of run `k` (of `n_runs`): each pass and the rest of the fit and of the score.
    fn print_run(&self, run: &PassRun, k: usize, n_runs: usize) {
        let w = &self.work;
        let label = if n_runs > 1 {
            format!(" (run {} of {})", k + 1, n_runs)
        } else {
            String::new()
        };
        let read: Vec<f64> = [&run.covariance, &run.eigenvalue, &run.queries, &run.scoring]
            .iter()
            .flat_map(|p| p.rates.iter().copied())
            .collect();
        let (lo, hi) = read.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &r| {
            (lo.min(r), hi.max(r))
        });
        println!(
            "{}passes against their GEMM-bound floor: {} training tokens in {} sequences, {} queries (full rank), batch {}{label}; GEMM rate read {} times during the passes, {:.1}–{:.1} GF/s; best {:.1} GF/s",
            if k > 0 { "\n" } else { "" },
            w.n_tokens,
            w.n_seqs,
            w.n_queries,
            w.batch,
            read.len(),
            if read.is_empty() { 0.0 } else { lo / 1e9 },
            hi / 1e9,
            self.rate / 1e9
        );
        println!(
            "{:<34} {:>10} {:>7} {:>9} {:>9} {:>12} {:>9} {:>6}",
            "pass", "FLOP", "GF/s", "floor s", "seconds", "floor/actual", "vs best", "cores"
        );
        // The rest of the fit and of the score: what their own clocks measured beyond the passes.
        let fit_rest = run
            .fit
            .minus(run.covariance.time)
            .minus(run.eigenvalue.time);
        let score_rest = run.score.minus(run.queries.time).minus(run.scoring.time);
        let none = (0.0, 0.0);
        let pass_row = |(name, phase, flops): (&str, &Timed, f64)| {
            row(name, phase.time, flops, self.floors(flops, phase))
        };
        let flops = w.passes();
        let [covariance, eigenvalue, queries, scoring] = run.passes(flops);
        pass_row(covariance);
        pass_row(eigenvalue);
        row("fit: eigendecomposition, load, save", fit_rest, 0.0, none);
        pass_row(queries);
        pass_row(scoring);
        row("score: load, save", score_rest, 0.0, none);
        let total_flops = flops[0] + flops[1] + flops[2] + flops[3];
        row(
            "fit + score",
            run.fit.plus(run.score),
            total_flops,
            self.job_floors(run),
        );
    }

    /// The whole job's ratios over the runs, each and their median.
    fn print_over_runs(&self, runs: &[PassRun]) {
        let ratios = |strict: bool| -> Vec<f64> {
            runs.iter()
                .map(|r| {
                    let (floor, at_best) = self.job_floors(r);
                    100.0 * if strict { at_best } else { floor } / r.fit.plus(r.score).wall
                })
                .collect()
        };
        let listed = |v: &[f64]| {
            v.iter()
                .map(|p| format!("{p:.0}%"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (read, strict) = (ratios(false), ratios(true));
        println!(
            "fit + score over {} runs: floor/actual {} (median {:.0}%); vs best at {:.1} GF/s {} (median {:.0}%)",
            runs.len(),
            listed(&read),
            median(read.clone()),
            self.rate / 1e9,
            listed(&strict),
            median(strict.clone())
        );
    }

    /// The passes' parts timed apart, against the `last` run's passes.
    fn print_parts(&self, parts: &PartSeconds, last: &PassRun, several_runs: bool) {
        let w = &self.work;
        let [covariance, eigenvalue, scoring] = w.statistics;
        let statistics = [
            (
                "covariance statistics alone",
                parts.covariance,
                covariance,
                last.covariance.time.wall,
            ),
            (
                "eigenvalue statistics alone",
                parts.eigenvalue,
                eigenvalue,
                last.eigenvalue.time.wall,
            ),
            (
                "scoring statistics alone",
                parts.scoring,
                scoring,
                last.scoring.time.wall,
            ),
        ];
        println!(
            "\nthe passes' parts timed apart (at the best GEMM rate{}):",
            if several_runs {
                "; pass/parts of the last run"
            } else {
                ""
            }
        );
        println!(
            "{:<34} {:>10} {:>10} {:>10} {:>12} {:>12}",
            "part", "FLOP", "floor s", "seconds", "floor/actual", "pass/parts"
        );
        let part_row = |name: &str, secs: f64, flops: f64, overlap: String| {
            let floor = flops / self.rate;
            println!(
                "{name:<34} {flops:>10.3e} {floor:>10.3} {secs:>10.3} {:>11.0}% {overlap:>12}",
                100.0 * floor / secs.max(1e-9)
            );
        };
        part_row(
            "forward + activation backward",
            parts.taps,
            w.taps,
            "-".into(),
        );
        for (name, secs, flops, pass) in statistics {
            let overlap = format!("{:.0}%", 100.0 * pass / (parts.taps + secs).max(1e-9));
            part_row(name, secs, flops, overlap);
        }
        println!(
            "(forward + activation backward: every batch through the passes' driver, nothing\n\
             consuming the taps; statistics: on the taps of the first {} batches, scaled by tokens,\n\
             with dense stand-ins for the eigenbases and queries; pass/parts: the pass's time over\n\
             the two parts' sum, below 100% where the pass overlaps them)",
            w.n_seqs.div_ceil(w.batch).min(infl::pass_parts::KEPT_BATCHES)
        );
    }
}

/// One row of a run's table: a phase's FLOPs, the floor's rate, its floors (at the rates read,
/// at the best rate), its seconds and the cores it kept busy; dashes where `flops` is 0.
fn row(name: &str, time: Elapsed, flops: f64, (floor, strict): (f64, f64)) {
    let secs = time.wall;
    // Cores kept busy: the process's CPU time over the wall time (not for a phase too
    // short to time).
    let cores = match time.cpu {
        Some(c) if secs >= 0.01 => format!("{:.2}", c / secs),
        _ => "-".into(),
    };
    if flops > 0.0 {
        println!(
            "{name:<34} {flops:>10.3e} {:>7.1} {floor:>9.3} {secs:>9.3} {:>11.0}% {:>8.0}% {cores:>6}",
            flops / floor / 1e9,
            100.0 * floor / secs,
            100.0 * strict / secs
        );
    } else {
        println!(
            "{name:<34} {:>10} {:>7} {:>9} {secs:>9.3} {:>12} {:>9} {cores:>6}",
            "-", "-", "-", "-", "-"
        );
    }
}

/// Times one `infl fit` (EK-FAC) and one full-rank `infl score` for `bench --passes-only`.
fn time_fit_and_score(
    inputs: &Inputs,
    fisher: Fisher,
    batch: usize,
    progress: &dyn Progress,
) -> Result<PassRun> {
    let rate_before = infl::model::fast::bench::gemm_rate();
    let probe = infl::model::fast::bench::GemmProbe::default();
    let read = || probe.read();
    let clock = PhaseClock::sampling(
        progress,
        infl::pass::clock::Sampler {
            every: RATE_EVERY,
            read: &read,
        },
    );
    let factors = inputs.out.join("passes-factors");
    let fit = FitJob {
        run: RunOptions::ONCE,
        ..fit_job(inputs, factors.clone(), fisher, batch)
    };
    // Wall and CPU time over the same interval, so that their ratio means cores kept busy.
    let watch = Stopwatch::start();
    workflow::fit(&fit, &clock)?;
    let fit_time = watch.elapsed().minus(clock.paused());
    // The rate again between the fit and the score: on a shared machine one measurement can
    // land in a slow moment, which would lower the floor's rate and flatter every ratio.
    let rate_between = infl::model::fast::bench::gemm_rate();
    let score = ScoreJob {
        run: RunOptions::ONCE,
        ..score_job(
            (&inputs.model, &factors, &inputs.train, &inputs.queries),
            inputs.out.join("passes-scores"),
            (batch, inputs.max_len),
            None,
        )
    };
    let (watch, paused) = (Stopwatch::start(), clock.paused());
    workflow::score(&score, &clock)?;
    let score_time = watch.elapsed().minus(clock.paused().minus(paused));
    let timed = |name: &str| Timed {
        time: clock.seconds(name),
        rates: clock.readings(name),
    };
    let (covariance, eigenvalue) = (timed("covariance pass"), timed("eigenvalue pass"));
    let (queries, scoring) = (timed("query gradients"), timed("scoring pass"));
    let best = [&covariance, &eigenvalue, &queries, &scoring]
        .iter()
        .flat_map(|p| p.rates.iter().copied())
        .fold(
            rate_before
                .max(rate_between)
                .max(infl::model::fast::bench::gemm_rate()),
            f64::max,
        );
    Ok(PassRun {
        best,
        fit: fit_time,
        score: score_time,
        covariance,
        eigenvalue,
        queries,
        scoring,
    })
}
