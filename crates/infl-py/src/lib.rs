//! `infl._infl`, the native module of the `infl` Python package: each pipeline stage of the
//! command line (`fit`, `score`, `self_influence`, `index`, `inspect`, `report`) as a function
//! taking the command line's own arguments, parsed by the same clap derives (so names, defaults,
//! range checks and help are the command line's), run with the GIL released, and its errors
//! raised as one exception class per exit code. The Python side (python/infl) turns keyword
//! arguments into those arguments and wraps the directories the jobs write.

mod args;
// The command line's progress bars and stage arguments, compiled here as they are there: one
// definition of each option for both front ends.
#[path = "../../../src/progress.rs"]
mod bars;
#[path = "../../../src/cli/jobs.rs"]
mod jobs;
mod progress;

use clap::{CommandFactory, Parser};
use progress::{PyProgress, Sink};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyKeyboardInterrupt};
use pyo3::prelude::*;
use std::path::PathBuf;

create_exception!(
    _infl,
    InflError,
    PyException,
    "An infl job failed (exit code 1)."
);
create_exception!(
    _infl,
    InputError,
    InflError,
    "Bad input the user can fix: a file, line, field or option (exit code 3)."
);
create_exception!(
    _infl,
    UsageError,
    InputError,
    "An option the command line would refuse while parsing (exit code 2)."
);
create_exception!(
    _infl,
    MismatchError,
    InflError,
    "Factors, results or state from another model, run or settings, or corrupt (exit code 4)."
);
create_exception!(
    _infl,
    NonFiniteError,
    InflError,
    "A loss or gradient became NaN or infinite (exit code 5)."
);

/// The library's error as the Python exception of its exit code, with the command line's
/// message.
fn to_py(e: infl::Error) -> PyErr {
    if let infl::Error::Interrupted(m) = &e {
        return PyKeyboardInterrupt::new_err(m.clone());
    }
    let message = e.to_string();
    match e.exit_code() {
        2 => UsageError::new_err(message),
        3 => InputError::new_err(message),
        4 => MismatchError::new_err(message),
        5 => NonFiniteError::new_err(message),
        _ => InflError::new_err(message),
    }
}

#[derive(Parser)]
#[command(name = "fit")]
struct Fit {
    #[command(flatten)]
    args: jobs::FitArgs,
}

#[derive(Parser)]
#[command(name = "score")]
struct Score {
    #[command(flatten)]
    args: jobs::ScoreArgs,
}

#[derive(Parser)]
#[command(name = "self-influence")]
struct SelfInfluence {
    #[command(flatten)]
    args: jobs::SelfInfluenceArgs,
}

/// `argv` (flags only) parsed as the command line parses command `T`; a refusal raises
/// `UsageError` with clap's message.
fn parse<T: Parser>(argv: Vec<String>) -> PyResult<T> {
    let name = T::command().get_name().to_string();
    T::try_parse_from(std::iter::once(name).chain(argv))
        .map_err(|e| UsageError::new_err(e.render().to_string().trim_end().to_string()))
}

/// The threads of the process, set before the first job starts its pools (they read the count
/// once; later values are ignored, as documented).
fn configure_threads(threads: Option<usize>, compute: &infl::options::Compute) -> PyResult<()> {
    static SET: std::sync::Once = std::sync::Once::new();
    if threads == Some(0) {
        return Err(InputError::new_err("--threads must be at least 1"));
    }
    SET.call_once(|| {
        infl::io::keep_freed_memory();
        infl::shard::set_threads(
            threads.unwrap_or(0),
            compute.engine() == infl::model::Engine::Autograd
                && compute.device == Default::default(),
        );
    });
    Ok(())
}

/// `progress` as a sink: None or False (silent), "bars" (the command line's bars on stderr), or
/// a callable `(stage, done, total, finished)`.
fn sink(progress: Option<&Bound<'_, PyAny>>) -> PyResult<Sink> {
    let Some(p) = progress else {
        return Ok(Sink::Silent);
    };
    if p.is_none() || p.extract::<bool>().is_ok_and(|b| !b) {
        Ok(Sink::Silent)
    } else if p.extract::<String>().is_ok_and(|s| s == "bars") {
        Ok(Sink::Bars(bars::Bars::new(false)))
    } else if p.is_callable() {
        Ok(Sink::Callback(p.clone().unbind()))
    } else {
        Err(UsageError::new_err(
            "progress must be None, False, \"bars\" or a callable (stage, done, total, finished)",
        ))
    }
}

/// Runs `job` with the GIL released, reporting to `progress`; an exception raised while it ran
/// (Ctrl-C's `KeyboardInterrupt`) is raised once the job has stopped, after its state is saved.
fn run_job<T: Send>(
    py: Python<'_>,
    progress: &PyProgress,
    job: impl FnOnce(&PyProgress) -> infl::Result<T> + Send,
) -> PyResult<T> {
    let result = py.detach(|| job(progress));
    if let Some(raised) = progress.take_raised() {
        return Err(raised);
    }
    result.map_err(to_py)
}

/// Fits the curvature factors; returns the library's summary line.
#[pyfunction]
#[pyo3(signature = (argv, progress=None, threads=None))]
fn fit(
    py: Python<'_>,
    argv: Vec<String>,
    progress: Option<&Bound<'_, PyAny>>,
    threads: Option<usize>,
) -> PyResult<(String, bool)> {
    let a = parse::<Fit>(argv)?.args;
    configure_threads(threads, &a.compute)?;
    let p = PyProgress::new(sink(progress)?);
    let job = a.into_job();
    let s = run_job(py, &p, |p| infl::workflow::fit(&job, p))?;
    Ok((s.message, s.finished))
}

/// Scores the influence of every training sequence on every query; returns the summary line.
#[pyfunction]
#[pyo3(signature = (argv, progress=None, threads=None))]
fn score(
    py: Python<'_>,
    argv: Vec<String>,
    progress: Option<&Bound<'_, PyAny>>,
    threads: Option<usize>,
) -> PyResult<String> {
    let a = parse::<Score>(argv)?.args;
    configure_threads(threads, &a.compute)?;
    let p = PyProgress::new(sink(progress)?);
    let job = a.into_job();
    let s = run_job(py, &p, |p| infl::workflow::score(&job, p))?;
    Ok(s.message)
}

/// Each training sequence's influence on its own loss; returns the summary line.
#[pyfunction]
#[pyo3(signature = (argv, progress=None, threads=None))]
fn self_influence(
    py: Python<'_>,
    argv: Vec<String>,
    progress: Option<&Bound<'_, PyAny>>,
    threads: Option<usize>,
) -> PyResult<String> {
    let a = parse::<SelfInfluence>(argv)?.args;
    configure_threads(threads, &a.compute)?;
    let p = PyProgress::new(sink(progress)?);
    let job = a.into_job();
    let s = run_job(py, &p, |p| infl::workflow::self_influence(&job, p))?;
    Ok(format!(
        "self-influence of {} training sequences in {:.1}s → {}",
        s.meta.corpus.n_sequences,
        s.seconds,
        job.out.display()
    ))
}

/// Builds a BM25 index over a corpus's token ids; returns the number of sequences indexed.
#[pyfunction]
fn index(py: Python<'_>, argv: Vec<String>) -> PyResult<usize> {
    let a = parse::<args::Index>(argv)?;
    py.detach(|| -> infl::Result<usize> {
        let index = infl::index::index_corpus(&a.model, &a.corpus, &a.out, a.max_len, a.overwrite)?;
        Ok(index.n_sequences())
    })
    .map_err(to_py)
}

/// The model's description and the memory and time estimates of fit and score, as text.
#[pyfunction]
#[pyo3(signature = (argv, threads=None))]
fn inspect(py: Python<'_>, argv: Vec<String>, threads: Option<usize>) -> PyResult<String> {
    let a = parse::<args::Inspect>(argv)?;
    configure_threads(threads, &a.compute)?;
    py.detach(|| -> infl::Result<String> {
        use infl::inspect;
        let model = infl::model::load(&a.model, a.modules, a.compute)?;
        let max_len = a.max_len.unwrap_or(model.max_positions().min(512));
        if max_len == 0 || max_len > model.max_positions() || a.batch_size == 0 {
            return Err(infl::Error::input(format!(
                "--max-len must be between 1 and {} and --batch-size at least 1",
                model.max_positions()
            )));
        }
        let e = inspect::estimate(model.as_ref(), a.batch_size, max_len);
        let fits = inspect::mem_available().is_none_or(|m| e.fit_total() < m);
        let probe = match a.no_probe || !fits {
            true => None,
            false => Some(inspect::probe(model.as_ref(), a.batch_size, max_len)?),
        };
        let m = model.as_ref();
        Ok(inspect::report(
            &a.model,
            m,
            a.batch_size,
            max_len,
            (a.n_queries as u64, a.query_rank.0),
            probe.as_ref(),
        ))
    })
    .map_err(to_py)
}

/// Writes the HTML report of a results directory; returns its size in bytes.
#[pyfunction]
fn report(py: Python<'_>, argv: Vec<String>) -> PyResult<usize> {
    let a = parse::<args::Report>(argv)?;
    let opts = infl::report::ReportOptions {
        fit: infl::powerlaw::FitOptions {
            bootstrap: a.bootstrap,
            seed: a.seed,
            ..Default::default()
        },
        max_tokens: a.max_tokens,
    };
    py.detach(|| infl::report::write_report(&a.results, &a.out, &opts))
        .map(|s| s.bytes)
        .map_err(to_py)
}

/// The ids (`LINE:WINDOW`) of a corpus's training sequences in corpus order: the columns of
/// the dense scores.
#[pyfunction]
fn sequence_ids(
    py: Python<'_>,
    model: PathBuf,
    corpus: PathBuf,
    max_len: usize,
) -> PyResult<Vec<String>> {
    py.detach(|| -> infl::Result<Vec<String>> {
        let config = infl::model::load(
            &model,
            infl::model::ModuleSelection::All,
            infl::model::Compute::CPU,
        )?;
        let mut tok = infl::data::LazyTokenizer::new(&model);
        let mut ids = Vec::new();
        infl::data::stream_corpus(&corpus, &mut tok, max_len, config.vocab_size(), 4096, |c| {
            ids.extend(c.iter().map(|s| s.id.clone()));
            Ok(())
        })?;
        Ok(ids)
    })
    .map_err(to_py)
}

/// The command line's help of a stage's options (`infl NAME --help`), for the docstrings.
#[pyfunction]
fn options_help(name: &str) -> PyResult<String> {
    let cmd = match name {
        "fit" => Fit::command(),
        "score" => Score::command(),
        "self_influence" => SelfInfluence::command(),
        "index" => args::Index::command(),
        "inspect" => args::Inspect::command(),
        "report" => args::Report::command(),
        _ => return Err(UsageError::new_err(format!("no stage named {name}"))),
    };
    Ok(cmd.term_width(100).render_long_help().to_string())
}

#[pymodule]
fn _infl(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("InflError", py.get_type::<InflError>())?;
    m.add("InputError", py.get_type::<InputError>())?;
    m.add("UsageError", py.get_type::<UsageError>())?;
    m.add("MismatchError", py.get_type::<MismatchError>())?;
    m.add("NonFiniteError", py.get_type::<NonFiniteError>())?;
    m.add_function(wrap_pyfunction!(fit, m)?)?;
    m.add_function(wrap_pyfunction!(score, m)?)?;
    m.add_function(wrap_pyfunction!(self_influence, m)?)?;
    m.add_function(wrap_pyfunction!(index, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(report, m)?)?;
    m.add_function(wrap_pyfunction!(sequence_ids, m)?)?;
    m.add_function(wrap_pyfunction!(options_help, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
