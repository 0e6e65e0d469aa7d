//! Retraining a model made by `infl train` with exactly its recipe on chosen training sets, the
//! ground truth of `infl validate lds` (random subsets) and `infl validate removal` (the corpus
//! without a query's top or bottom group).
//!
//! [`Recipe`] reads and checks what retraining needs (`training.json`, the corpus it names, the
//! queries) and measures the queries under the full model; [`Retraining`] retrains on each
//! [`TrainingSet`], `threads` models at a time, and saves each finished one in the work
//! directory under a fingerprint of everything its measurements depend on, so an interrupted
//! run resumes where it stopped.

use crate::data::{self, Corpus, LazyTokenizer, Query};
use crate::error::{Error, Result};
use crate::io;
use crate::model::gpt2::{Gpt2, Gpt2Config};
use crate::model::ModuleSelection;
use crate::pass::{Progress, Silent};
use crate::train::{completion_losses, Trainer, TrainingRecord};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// What retraining starts from, read and checked before any work: the recipe, the corpus it
/// was trained on, the queries, and their measurements f_q = −log p(completion | prompt) under
/// the full model.
pub struct Recipe {
    pub training: TrainingRecord,
    pub corpus_sha256: String,
    pub config: Gpt2Config,
    pub corpus: Corpus,
    pub queries: Vec<Query>,
    pub queries_sha256: String,
    pub full_model_losses: Vec<f64>,
    pub weights_sha256: String,
}

impl Recipe {
    /// Reads `model`'s `training.json` (refused without one: only `infl train` and `infl
    /// demo` record a recipe), the corpus `train` (refused unless it is the one trained on) and
    /// the queries.
    pub fn read(model: &Path, train: &Path, queries: &Path) -> Result<Self> {
        let record_path = model.join("training.json");
        let training: TrainingRecord = io::read_json(&record_path).map_err(|_| {
            Error::input(format!(
                "{}: missing or unreadable; this validation retrains the model, so it needs a checkpoint made by `infl train` (or `infl demo`), which records its recipe there",
                record_path.display()
            ))
        })?;
        let corpus_sha256 = data::sha256_file(train)?;
        if corpus_sha256 != training.corpus_sha256 {
            return Err(Error::Mismatch(format!(
                "{} (sha256 {}…) is not the corpus {} was trained on ({}, sha256 {}…)",
                train.display(),
                corpus_sha256.get(..12).unwrap_or(&corpus_sha256),
                model.display(),
                training.corpus,
                training
                    .corpus_sha256
                    .get(..12)
                    .unwrap_or(&training.corpus_sha256)
            )));
        }
        let full = Gpt2::load(model, ModuleSelection::All)?;
        let config = full.config().clone();
        let mut tokenizer = LazyTokenizer::new(model);
        let corpus =
            data::read_corpus(train, &mut tokenizer, config.n_positions, config.vocab_size)?;
        let n = corpus.sequences.len();
        if n != training.n_sequences {
            return Err(Error::Mismatch(format!(
                "{} cuts into {n} sequences but training.json records {}",
                train.display(),
                training.n_sequences
            )));
        }
        let (queries, queries_sha256) = data::read_queries(
            queries,
            &mut tokenizer,
            config.n_positions,
            config.vocab_size,
        )?;
        let full_model_losses = completion_losses(&full, &pairs(&queries))?;
        let weights_sha256 = crate::provenance::ModelInfo::of(model, &full)?.weights_sha256;
        Ok(Recipe {
            training,
            corpus_sha256,
            config,
            corpus,
            queries,
            queries_sha256,
            full_model_losses,
            weights_sha256,
        })
    }
}

/// Each query as (prompt, completion) token ids, as [`completion_losses`] measures them.
pub fn pairs(queries: &[Query]) -> Vec<(&[u32], &[u32])> {
    queries
        .iter()
        .map(|q| (q.prompt_ids.as_slice(), q.completion_ids.as_slice()))
        .collect()
}

/// One model to retrain: the training sequences it keeps (corpus indices, in corpus order)
/// and the name its result is saved under (`WORK/NAME.json`).
#[derive(Debug, Clone)]
pub struct TrainingSet {
    pub name: String,
    pub keep: Vec<usize>,
}

/// The saved result of one retrained model: every query's measurement under it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Retrained {
    /// SHA-256 of the recipe, corpus, queries and the kept sequences: a result is reused only
    /// where all of them are the same.
    pub fingerprint: String,
    pub name: String,
    /// f_q under the retrained model, in query-file order.
    pub losses: Vec<f64>,
    pub seconds: f64,
}

/// The retraining of a list of training sets on the recipe, resumable from `work`.
pub struct Retraining<'a> {
    recipe: &'a Recipe,
    pairs: Vec<(&'a [u32], &'a [u32])>,
    run_fingerprint: String,
    work: PathBuf,
}

impl<'a> Retraining<'a> {
    /// Readies `work` (emptied first with `fresh`).
    pub fn prepare(recipe: &'a Recipe, work: PathBuf, fresh: bool) -> Result<Self> {
        let run_fingerprint = serde_json::json!({
            "weights": recipe.weights_sha256,
            "corpus": recipe.corpus_sha256,
            "queries": recipe.queries_sha256,
            "options": recipe.training.options,
        })
        .to_string();
        if fresh && work.exists() {
            std::fs::remove_dir_all(&work).map_err(|e| Error::io(&work, e))?;
        }
        io::ensure_dir(&work)?;
        Ok(Retraining {
            recipe,
            pairs: pairs(&recipe.queries),
            run_fingerprint,
            work,
        })
    }

    /// Where `set`'s result is saved.
    pub fn saved(&self, set: &TrainingSet) -> PathBuf {
        self.work.join(format!("{}.json", set.name))
    }

    fn fingerprint(&self, set: &TrainingSet) -> String {
        let mut h = Sha256::new();
        h.update(&self.run_fingerprint);
        for i in &set.keep {
            h.update((*i as u64).to_le_bytes());
        }
        data::hex(&h.finalize())
    }

    /// Tokens trained on for `set` (the progress unit).
    fn tokens(&self, set: &TrainingSet) -> u64 {
        let sequences = &self.recipe.corpus.sequences;
        set.keep
            .iter()
            .filter_map(|&i| sequences.get(i))
            .map(|s| s.ids.len() as u64)
            .sum::<u64>()
            * self.recipe.training.options.epochs as u64
    }

    /// The saved results first, then the rest, `threads` at a time. Returns each set's result
    /// in `sets` order and the seconds spent retraining in this call.
    pub fn run(
        &self,
        sets: &[TrainingSet],
        threads: usize,
        progress: &dyn Progress,
    ) -> Result<(Vec<Retrained>, f64)> {
        let results: Mutex<Vec<Option<Retrained>>> =
            Mutex::new(sets.iter().map(|s| self.resume(s)).collect());
        let todo: Vec<usize> = {
            let r = results.lock().map_err(|_| poisoned())?;
            (0..sets.len()).filter(|&m| r[m].is_none()).collect()
        };
        progress.begin(
            &format!("retrain {} of {} models", todo.len(), sets.len()),
            todo.iter().map(|&m| self.tokens(&sets[m])).sum(),
        );
        let started = std::time::Instant::now();
        let next = AtomicUsize::new(0);
        let failure: Mutex<Option<Error>> = Mutex::new(None);
        std::thread::scope(|scope| {
            for _ in 0..threads.max(1).min(todo.len().max(1)) {
                scope.spawn(|| self.worker(sets, &todo, &next, &failure, &results, progress));
            }
        });
        progress.end();
        if let Some(e) = failure.into_inner().map_err(|_| poisoned())? {
            return Err(e);
        }
        let done = results
            .into_inner()
            .map_err(|_| poisoned())?
            .into_iter()
            .map(|r| r.ok_or_else(|| Error::Other("a training set was not retrained".into())))
            .collect::<Result<_>>()?;
        Ok((done, started.elapsed().as_secs_f64()))
    }

    /// `set`'s saved result, if it belongs to this run (same fingerprint and query count).
    fn resume(&self, set: &TrainingSet) -> Option<Retrained> {
        io::read_json::<Retrained>(&self.saved(set))
            .ok()
            .filter(|r| {
                r.fingerprint == self.fingerprint(set) && r.losses.len() == self.pairs.len()
            })
    }

    /// One retraining thread: takes the next set to do until none is left or one failed.
    fn worker(
        &self,
        sets: &[TrainingSet],
        todo: &[usize],
        next: &AtomicUsize,
        failure: &Mutex<Option<Error>>,
        results: &Mutex<Vec<Option<Retrained>>>,
        progress: &dyn Progress,
    ) {
        crate::linalg::flush_subnormals_on_this_thread();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(&m) = todo.get(i) else { break };
            if failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                break;
            }
            match self.retrain(&sets[m]) {
                Ok(r) => {
                    progress.advance(self.tokens(&sets[m]));
                    if let Ok(mut all) = results.lock() {
                        all[m] = Some(r);
                    }
                }
                Err(e) => {
                    if let Ok(mut f) = failure.lock() {
                        f.get_or_insert(e);
                    }
                    break;
                }
            }
        }
    }

    /// Retrains from scratch on `set`, measures the queries, and saves the result.
    fn retrain(&self, set: &TrainingSet) -> Result<Retrained> {
        let t0 = std::time::Instant::now();
        let sequences = &self.recipe.corpus.sequences;
        let seqs: Vec<&[u32]> = set
            .keep
            .iter()
            .filter_map(|&i| sequences.get(i))
            .map(|s| s.ids.as_slice())
            .collect();
        let mut trainer = Trainer::new(
            self.recipe.config.clone(),
            self.recipe.training.options.clone(),
        )?;
        trainer.fit(&seqs, &Silent)?;
        let r = Retrained {
            fingerprint: self.fingerprint(set),
            name: set.name.clone(),
            losses: completion_losses(trainer.model(), &self.pairs)?,
            seconds: t0.elapsed().as_secs_f64(),
        };
        io::write_json(&self.saved(set), &r)?;
        Ok(r)
    }
}

fn poisoned() -> Error {
    Error::Other("a retraining thread panicked".into())
}
