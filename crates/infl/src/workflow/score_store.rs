//! `infl score --store`: the scoring pass reading every training sequence's gradient back from
//! the factors' gradient store (`fit --store`) instead of running the model. The queries are
//! exact (full rank), rotated into the store's basis; a reader thread walks the store while the
//! batch before is scored.

use super::score::{Saved, ScoreJob, ScoreRun};
use crate::curvature::format::FactorsMeta;
use crate::data::{self, CorpusStats, Sequence};
use crate::error::{Error, Result};
use crate::influence::LayerQueries;
use crate::linalg::Columns;
use crate::store::{LayerBatch, StoreMeta, StoreReader, STORE_DIR};
use faer::{Mat, MatRef};
use std::sync::mpsc;

/// The factors' gradient store, checked to hold these factors, this corpus and window length.
pub(super) fn open_store(
    job: &ScoreJob,
    fmeta: &FactorsMeta,
    max_len: usize,
) -> Result<StoreReader> {
    let reader = StoreReader::open(&job.factors.join(STORE_DIR))?;
    let m = &reader.meta;
    if m.factors_sha256 != fmeta.factors_sha256 {
        return Err(Error::Mismatch(format!(
            "{}: the gradient store was written with other factors; rewrite it with `infl fit --store`",
            job.factors.display()
        )));
    }
    if m.corpus_sha256 != data::sha256_file(&job.train)? || m.max_len != max_len {
        return Err(Error::Mismatch(format!(
            "the gradient store in {} holds another corpus or --max-len ({} tokens per window) than --train {} with --max-len {max_len}",
            job.factors.display(),
            m.max_len,
            job.train.display()
        )));
    }
    Ok(reader)
}

/// The stored corpus's counts and hash, as a streamed pass would have found them.
pub(super) fn stored_corpus(m: &StoreMeta) -> CorpusStats {
    CorpusStats {
        n_documents: m.n_documents,
        n_sequences: m.n_sequences,
        n_tokens: m.n_tokens,
        sha256: m.corpus_sha256.clone(),
    }
}

/// A batch of stored sequences: each layer's columns, and the sequences.
type Filled = Result<(Vec<LayerBatch>, Vec<Sequence>)>;

/// Scores every stored sequence against every query. Reading overlaps scoring: a reader
/// thread walks the next batch's records (locating its rotated columns in the mapping and
/// mapping their pages in, rebuilding those stored as factors) while the batch before it is
/// scored; two sets of per-layer batches go back and forth.
pub(super) fn score_from_store(
    run: &ScoreRun<'_>,
    reader: &mut StoreReader,
    saved: &mut Saved,
) -> Result<()> {
    let rotated = rotated_queries(run)?;
    let batch = run.options.batch_size.max(1) * 4;
    let (filled_tx, filled_rx) = mpsc::sync_channel::<Filled>(1);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<LayerBatch>>();
    for _ in 0..2 {
        let set = run
            .tracked
            .iter()
            .map(|l| LayerBatch::new(l.d_out * l.d_in_h()))
            .collect();
        let _ = empty_tx.send(set);
    }
    let bytes = reader.bytes();
    std::thread::scope(|scope| -> Result<()> {
        scope.spawn(move || read_batches(reader, batch, empty_rx, filled_tx));
        // Owned here, so that an early return drops it and the reader stops waiting.
        let empty_tx = empty_tx;
        let mut scorer = StoredScorer {
            run,
            rotated: &rotated,
            bytes: &bytes,
            dots: Vec::new(),
        };
        let mut index = 0usize;
        for filled in filled_rx {
            let (columns, seqs) = filled?;
            let n = seqs.len();
            let (parts, own) = scorer.batch(&columns, n);
            let indices: Vec<usize> = (index..index + n).collect();
            let own = run.cosine().then_some(own.as_slice());
            run.add(saved, &indices, &seqs, &parts, own)?;
            run.progress
                .advance(seqs.iter().map(|s| s.ids.len() as u64).sum());
            index += n;
            let _ = empty_tx.send(columns);
        }
        Ok(())
    })
}

/// The reader thread: fills the per-layer batches it is handed with the next stored records.
fn read_batches(
    reader: &mut StoreReader,
    batch: usize,
    empty_rx: mpsc::Receiver<Vec<LayerBatch>>,
    filled_tx: mpsc::SyncSender<Filled>,
) {
    crate::linalg::flush_subnormals_on_this_thread();
    for mut columns in empty_rx {
        columns.iter_mut().for_each(|c| c.clear());
        let mut seqs = Vec::with_capacity(batch);
        while seqs.len() < batch {
            match reader.next_columns(&mut columns, seqs.len()) {
                Ok(Some(seq)) => seqs.push(seq),
                Ok(None) => break,
                Err(e) => {
                    let _ = filled_tx.send(Err(e));
                    return;
                }
            }
        }
        if let Err(e) = reader.ready_batch(&mut columns) {
            let _ = filled_tx.send(Err(e));
            return;
        }
        if seqs.is_empty() || filled_tx.send(Ok((columns, seqs))).is_err() {
            return;
        }
    }
}

/// Each layer's queries, already in the store's basis, query after query (`Q × D`, each query
/// contiguous, as the dot kernel reads them).
fn rotated_queries(run: &ScoreRun<'_>) -> Result<Vec<Vec<f32>>> {
    run.tracked
        .iter()
        .zip(&run.pq.per_layer)
        .map(|(l, queries)| match queries {
            LayerQueries::Full(stack) => {
                let d = l.d_out * l.d_in_h();
                let mut out = vec![0f32; stack.ncols() * d];
                for q in 0..stack.ncols() {
                    for (o, x) in out[q * d..(q + 1) * d].iter_mut().zip(stack.col(q).iter()) {
                        *o = *x;
                    }
                }
                Ok(out)
            }
            LayerQueries::LowRank { .. } => Err(Error::Other(
                "store scoring asks for full-rank queries".into(),
            )),
        })
        .collect()
}

/// Scores batches of stored gradients against the rotated queries.
struct StoredScorer<'a> {
    run: &'a ScoreRun<'a>,
    rotated: &'a [Vec<f32>],
    bytes: &'a crate::store::StoreBytes,
    dots: Vec<f64>,
}

impl StoredScorer<'_> {
    /// Each layer's scores (queries × the batch's `n` sequences) and, for cosine scores, each
    /// sequence's self-influence.
    fn batch(&mut self, columns: &[LayerBatch], n: usize) -> (Vec<Mat<f32>>, Vec<f64>) {
        let (run, n_queries) = (self.run, self.run.pq.self_influence.len());
        let mut own = vec![0f64; n];
        let mut parts = Vec::with_capacity(run.tracked.len());
        for (li, l) in run.tracked.iter().enumerate() {
            let c = &columns[li];
            if run.cosine() {
                for (k, o) in own.iter_mut().enumerate() {
                    let col = c.column_f32(k, self.bytes);
                    let g = MatRef::from_column_major_slice(&col, l.d_out, l.d_in_h());
                    *o += run.preconditioner.self_influence_in_store_basis(li, g);
                }
            }
            let mut part = Mat::<f32>::zeros(n_queries, n);
            let queries: Vec<&[f32]> = self.rotated[li].chunks(c.d).collect();
            let stored = c.stored(self.bytes);
            let rebuilt: Vec<&[f32]> = c.rebuilt().chunks(c.d).collect();
            for (block, cols) in [
                (self.bytes.columns(&stored), &c.stored_cols),
                (Columns::F32(&rebuilt), &c.rebuilt_cols),
            ] {
                if cols.is_empty() {
                    continue;
                }
                self.dots.resize(cols.len() * n_queries, 0.0);
                crate::linalg::dots_into(&mut self.dots, &queries, block, c.d);
                for (i, &k) in cols.iter().enumerate() {
                    for q in 0..n_queries {
                        part[(q, k)] = self.dots[i * n_queries + q] as f32;
                    }
                }
            }
            parts.push(part);
        }
        (parts, own)
    }
}
