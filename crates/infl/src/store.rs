//! The gradient store: every training sequence's gradient, rotated into the factors' eigenbasis,
//! kept on disk by `infl fit --store` so that `infl score --store` needs no forward or backward
//! pass over the training data, only the queries' gradients and one streaming read.
//!
//! For an eigenbasis (EK-FAC, KFAC) `I(q, z) = ⟨P_q, G_z⟩ = ⟨P̃_q, R_z⟩` with
//! `R_z = Q_Sᵀ G_z Q_A` and `P̃_q = Q_Sᵀ P_q Q_A = (Q_Sᵀ G_q Q_A) ⊘ (Λ + λ)`; for diagonal and
//! identity the basis is the original one (R_z = G_z). Per sequence and layer the store keeps
//! the rotated gradient `R_z` (`d_out × d_in_h`), or its per-token factors `g Q_S`
//! (`T × d_out`) and `ā Q_A` (`T × d_in_h`), from which `R_z = (g Q_S)ᵀ (ā Q_A)`, as
//! [`StoreForm`] chooses. The reader rebuilds factored records after their bytes are verified,
//! records of a batch in parallel.
//! The gradients are those of the training loss (the data's labels), whatever the Fisher's.
//!
//! Files in the store directory: `store.json` (what made it), `sequences.jsonl` (id and token ids
//! per sequence, in corpus order) and `gradients.bin` (per sequence and layer: a tag byte
//! `0` = dense R or `1` = factors, for factors a little-endian u32 T, then the values, in f32 or
//! bf16: R column-major, the factors row-major).
//!
//! `store.json` records xxh3 checksums of both data files per 4 MiB chunk
//! ([`crate::checksum`]); the reader verifies the chunks of `gradients.bin` that a batch lies in
//! before the batch is scored ([`StoreReader::ready_batch`], in parallel, while the batch before
//! is scored), and `sequences.jsonl` chunk by chunk before its lines are parsed. A store without checksums (written before format 3) is read unverified,
//! with a warning: rewriting a store costs a gradient pass over the corpus.

use crate::checksum::{self, ChunkSums, HashingWriter, Sums, VerifyingReader};
use crate::curvature::Factors;
use crate::data::Sequence;
use crate::error::{Error, Result};
use crate::linalg;
use crate::model::{TapBatch, TrackedLayer};
use faer::{Mat, MatRef};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

pub const STORE_DIR: &str = "store";
const META_FILE: &str = "store.json";
const SEQUENCES_FILE: &str = "sequences.jsonl";
const GRADIENTS_FILE: &str = "gradients.bin";
/// What every corruption message tells the user to do.
const REMEDY: &str = "rewrite the store with `infl fit --store`";

/// Which form each stored layer gradient takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum StoreForm {
    /// Per sequence and layer, the per-token factors where they are smaller on disk and cheap
    /// to rebuild (at most [`AUTO_MAX_TOKENS`] tokens), else the rotated gradient: the rotated
    /// form's speed for long sequences, compact where sequences are short.
    Auto,
    /// Per sequence and layer, whichever is smaller on disk: the rotated gradient or its
    /// per-token factors (rebuilding costs 2·T flops per value: slow for long sequences).
    Smallest,
    /// Always the rotated gradient: larger for short sequences; re-scoring reads it with no
    /// reconstruction.
    Rotated,
}

/// How `fit --store` writes the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoreOptions {
    pub dtype: StoreDtype,
    pub form: StoreForm,
}

/// Precision of the stored values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum StoreDtype {
    F32,
    /// bfloat16 (round to nearest even): half the disk, about 3 significant digits per value.
    Bf16,
}

impl StoreDtype {
    fn bytes(self) -> u64 {
        match self {
            StoreDtype::F32 => 4,
            StoreDtype::Bf16 => 2,
        }
    }
}

/// `store.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StoreMeta {
    /// [`crate::provenance::FORMAT_VERSION`] when written (1 for stores without the field).
    #[serde(default = "crate::provenance::format_1")]
    pub format_version: u32,
    pub dtype: StoreDtype,
    pub form: StoreForm,
    /// `eigen` (R = Q_Sᵀ G Q_A) or `original` (R = G).
    pub basis: String,
    pub layers: Vec<TrackedLayer>,
    pub factors_sha256: String,
    pub corpus_sha256: String,
    pub max_len: usize,
    pub n_documents: usize,
    pub n_tokens: usize,
    pub n_sequences: usize,
    pub bytes: u64,
    /// Per-chunk checksums of the data files (from format 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksums: Option<StoreChecksums>,
}

/// The checksums of a store's data files.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoreChecksums {
    pub gradients: ChunkSums,
    pub sequences: ChunkSums,
}

/// What a store is of: the factors (by hash) and the corpus as windowed.
#[derive(Debug, Clone)]
pub struct StoreProvenance {
    pub factors_sha256: String,
    pub corpus_sha256: String,
    pub max_len: usize,
    pub n_documents: usize,
}

/// Bytes one sequence of `len` tokens takes in the store.
pub fn sequence_bytes(layers: &[TrackedLayer], len: usize, options: StoreOptions) -> u64 {
    layers
        .iter()
        .map(|l| {
            let (dense, factored) = sizes(l, len);
            1 + if use_factors(l, len, options.form) {
                4 + factored * options.dtype.bytes()
            } else {
                dense * options.dtype.bytes()
            }
        })
        .sum()
}

/// Values of the two forms: (rotated gradient, per-token factors).
fn sizes(l: &TrackedLayer, len: usize) -> (u64, u64) {
    (
        (l.d_out * l.d_in_h()) as u64,
        (len * (l.d_out + l.d_in_h())) as u64,
    )
}

/// Longest sequence `--store-form auto` keeps as per-token factors. Rebuilding a rotated
/// gradient from T tokens costs 2·T flops per value where reading it stored costs one value's
/// bytes, so the factored form's cost grows with T while its saving shrinks: at 128 tokens it
/// re-scored the benchmark job 6.6× slower than the rotated form, at 8–16 tokens the bundled
/// model 1.5–1.6× slower for 2.5–5× less disk (docs/store.md, "Choosing the form").
pub const AUTO_MAX_TOKENS: usize = 16;

fn use_factors(l: &TrackedLayer, len: usize, form: StoreForm) -> bool {
    let (dense, factored) = sizes(l, len);
    match form {
        StoreForm::Auto => factored < dense && len <= AUTO_MAX_TOKENS,
        StoreForm::Smallest => factored < dense,
        StoreForm::Rotated => false,
    }
}

/// Free bytes on the file system holding `dir` (its nearest existing ancestor).
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let mut p = dir.to_path_buf();
    while !p.exists() {
        p = p.parent()?.to_path_buf();
    }
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    // Round to nearest, ties to even (values are finite: checked before they are stored).
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Writes a store while the factors' basis is at hand.
pub struct StoreWriter {
    dir: PathBuf,
    tmp: PathBuf,
    gradients: HashingWriter<std::io::BufWriter<std::fs::File>>,
    sequences: HashingWriter<std::io::BufWriter<std::fs::File>>,
    meta: StoreMeta,
    bases: Vec<Option<(Mat<f32>, Mat<f32>)>>,
}

impl StoreWriter {
    /// Starts a store in `dir` (built in a temporary sibling, renamed into place by
    /// [`StoreWriter::finish`]).
    pub fn create(
        dir: &Path,
        factors: &Factors,
        options: StoreOptions,
        provenance: &StoreProvenance,
    ) -> Result<Self> {
        let tmp = crate::io::temp_sibling(dir);
        let _ = std::fs::remove_dir_all(&tmp);
        crate::io::ensure_dir(&tmp)?;
        let open = |name: &str| -> Result<HashingWriter<std::io::BufWriter<std::fs::File>>> {
            let p = tmp.join(name);
            let f = std::fs::File::create(&p).map_err(|e| Error::io(&p, e))?;
            Ok(HashingWriter::new(
                std::io::BufWriter::with_capacity(1 << 20, f),
                checksum::CHUNK_BYTES,
            ))
        };
        let bases: Vec<Option<(Mat<f32>, Mat<f32>)>> = factors
            .layers
            .iter()
            .map(|l| l.eigen.as_ref().map(|e| (e.q_s.clone(), e.q_a.clone())))
            .collect();
        let basis = if bases.iter().all(Option::is_some) && !bases.is_empty() {
            "eigen"
        } else {
            "original"
        };
        Ok(StoreWriter {
            gradients: open(GRADIENTS_FILE)?,
            sequences: open(SEQUENCES_FILE)?,
            dir: dir.to_path_buf(),
            tmp,
            meta: StoreMeta {
                format_version: crate::provenance::FORMAT_VERSION,
                dtype: options.dtype,
                form: options.form,
                basis: basis.into(),
                layers: factors.layers.iter().map(|l| l.layer.clone()).collect(),
                factors_sha256: provenance.factors_sha256.clone(),
                corpus_sha256: provenance.corpus_sha256.clone(),
                max_len: provenance.max_len,
                n_documents: provenance.n_documents,
                n_tokens: 0,
                n_sequences: 0,
                bytes: 0,
                checksums: None,
            },
            bases: if basis == "eigen" {
                bases
            } else {
                vec![None; factors.layers.len()]
            },
        })
    }

    /// The fit's factors file, once it is written (a store made during the fit's own
    /// eigenvalue pass is created before it exists).
    pub fn set_factors_sha256(&mut self, sha256: String) {
        self.meta.factors_sha256 = sha256;
    }

    fn put(&mut self, values: &[f32]) -> Result<()> {
        let path = self.tmp.join(GRADIENTS_FILE);
        // Encoded into one buffer, written at once (a write call per value was most of the
        // store pass's time).
        let width = self.meta.dtype.bytes() as usize;
        let mut bytes = vec![0u8; values.len() * width];
        match self.meta.dtype {
            StoreDtype::F32 => {
                for (b, v) in bytes.chunks_exact_mut(4).zip(values) {
                    b.copy_from_slice(&v.to_le_bytes());
                }
            }
            StoreDtype::Bf16 => {
                for (b, v) in bytes.chunks_exact_mut(2).zip(values) {
                    b.copy_from_slice(&to_bf16(*v).to_le_bytes());
                }
            }
        }
        self.gradients
            .write_all(&bytes)
            .map_err(|e| Error::io(&path, e))?;
        self.meta.bytes += values.len() as u64 * self.meta.dtype.bytes();
        Ok(())
    }

    /// Adds the sequences of one batch (their taps under the data's labels), in corpus order.
    /// `rotated`: the batch's tokens already rotated into the store's basis by the eigenvalue
    /// pass that produced `taps` (the same bases), so that they are not rotated again.
    pub fn add(
        &mut self,
        seqs: &[Sequence],
        taps: &TapBatch,
        rotated: Option<&crate::curvature::RotatedTokens>,
    ) -> Result<()> {
        let offsets = taps.offsets();
        let n = offsets[offsets.len() - 1];
        let layers = self.meta.layers.clone();
        let owned: Vec<(linalg::RowMajor, linalg::RowMajor)>;
        let rotated: Vec<(MatRef<'_, f32>, MatRef<'_, f32>)> = match rotated {
            Some(r) if self.meta.basis == "eigen" && r.iter().all(Option::is_some) => r
                .iter()
                .flatten()
                .map(|(g, a)| (g.as_ref(), a.as_ref()))
                .collect(),
            _ => {
                owned = self.rotate(taps, n);
                owned
                    .iter()
                    .map(|(g, a)| (g.as_ref(), a.as_ref()))
                    .collect()
            }
        };
        // The rotated gradients of every sequence of the batch, for the layers that keep them.
        let products: Vec<Option<Mat<f32>>> = layers
            .iter()
            .zip(&rotated)
            .map(|(l, (g_rot, a_rot))| {
                let any = offsets
                    .windows(2)
                    .any(|w| !use_factors(l, w[1] - w[0], self.meta.form));
                any.then(|| linalg::sequence_products(*g_rot, *a_rot, &offsets))
            })
            .collect();
        for (k, seq) in seqs.iter().enumerate() {
            let (s, e) = (offsets[k], offsets[k + 1]);
            for ((l, (g_rot, a_rot)), product) in layers.iter().zip(&rotated).zip(&products) {
                let path = self.tmp.join(GRADIENTS_FILE);
                if use_factors(l, e - s, self.meta.form) {
                    self.gradients
                        .write_all(&[1u8])
                        .and_then(|_| self.gradients.write_all(&((e - s) as u32).to_le_bytes()))
                        .map_err(|err| Error::io(&path, err))?;
                    self.meta.bytes += 5;
                    let g = linalg::to_row_major(g_rot.subrows(s, e - s));
                    let a = linalg::to_row_major(a_rot.subrows(s, e - s));
                    self.put(&g)?;
                    self.put(&a)?;
                } else {
                    self.gradients
                        .write_all(&[0u8])
                        .map_err(|err| Error::io(&path, err))?;
                    self.meta.bytes += 1;
                    // Column-major, the layout the scores' products read.
                    let column = product
                        .as_ref()
                        .expect("computed for every layer a sequence keeps rotated")
                        .col(k)
                        .try_as_col_major()
                        .expect("owned column")
                        .as_slice();
                    self.put(column)?;
                }
            }
            let line = serde_json::json!({"id": seq.id, "ids": seq.ids});
            writeln!(self.sequences, "{line}")
                .map_err(|e| Error::io(self.tmp.join(SEQUENCES_FILE), e))?;
            self.meta.n_sequences += 1;
            self.meta.n_tokens += seq.ids.len();
        }
        Ok(())
    }

    /// The batch's tokens in the store's basis, `(g Q_S, ā Q_A)` per layer (copies of `g` and
    /// `[ā, 1]` in the original basis).
    fn rotate(&self, taps: &TapBatch, n: usize) -> Vec<(linalg::RowMajor, linalg::RowMajor)> {
        let mut rotated = Vec::with_capacity(self.meta.layers.len());
        for ((l, tap), basis) in self.meta.layers.iter().zip(&taps.layers).zip(&self.bases) {
            let a = linalg::homogeneous(&tap.a, n, l.d_in, l.has_bias);
            let g = linalg::rows(&tap.g, n, l.d_out);
            let basis = basis
                .as_ref()
                .map(|(q_s, q_a)| (q_s.as_ref(), q_a.as_ref()));
            rotated.push(
                linalg::rotate_tokens(g, a.as_ref(), basis, true).unwrap_or_else(|| {
                    (
                        linalg::RowMajor::copy_of(g),
                        linalg::RowMajor::copy_of(a.as_ref()),
                    )
                }),
            );
        }
        rotated
    }

    /// Flushes, writes store.json (with the files' checksums) and renames the store into place.
    pub fn finish(mut self) -> Result<StoreMeta> {
        let mut sums = Vec::with_capacity(2);
        for (mut w, name) in [
            (self.gradients, GRADIENTS_FILE),
            (self.sequences, SEQUENCES_FILE),
        ] {
            let p = self.tmp.join(name);
            w.flush().map_err(|e| Error::io(&p, e))?;
            w.get_ref()
                .get_ref()
                .sync_all()
                .map_err(|e| Error::io(&p, e))?;
            sums.push(w.sums());
        }
        let sequences = sums.pop();
        let gradients = sums.pop();
        self.meta.checksums =
            gradients
                .zip(sequences)
                .map(|(gradients, sequences)| StoreChecksums {
                    gradients,
                    sequences,
                });
        crate::io::write_json(&self.tmp.join(META_FILE), &self.meta)?;
        crate::io::publish(&self.tmp, &self.dir)?;
        Ok(self.meta)
    }
}

/// Refuses to start a store of `need` bytes (for `n_sequences` sequences) that the disk
/// holding `dir` cannot take.
pub fn check_disk(dir: &Path, need: u64, n_sequences: usize) -> Result<()> {
    if let Some(free) = free_bytes(dir) {
        if need > free {
            return Err(Error::input(format!(
                "--store: the gradient store needs {:.2} GiB ({:.1} KiB per sequence on average) but {} has {:.2} GiB free; use --store-dtype bf16, fewer --layers, or more disk",
                need as f64 / (1u64 << 30) as f64,
                need as f64 / n_sequences.max(1) as f64 / 1024.0,
                dir.display(),
                free as f64 / (1u64 << 30) as f64
            )));
        }
    }
    Ok(())
}

/// One layer's columns for a batch of stored sequences: the rotated gradients where they lie in
/// the store's mapping (as stored, bf16 or f32 little-endian, read in place), and those rebuilt
/// from per-token factors (in f32). `*_cols[i]` is the position in the batch of the i-th column
/// of each kind.
pub struct LayerBatch {
    /// Length of a column: `d_out · d_in_h`.
    pub d: usize,
    /// Byte offsets in the mapping of the stored columns, in `stored_cols` order.
    stored_at: Vec<usize>,
    pub stored_cols: Vec<usize>,
    /// Holds at least `rebuilt_cols.len()` columns; never shrunk, so that the next batch does
    /// not zero it again (every rebuilt column is overwritten whole).
    rebuilt: Vec<f32>,
    pub rebuilt_cols: Vec<usize>,
    /// The per-token factors of each rebuilt column, in `rebuilt_cols` order: located by the
    /// walk, rebuilt by [`StoreReader::ready_batch`] once their bytes are verified.
    factored: Vec<Factored>,
}

/// Where a record of per-token factors lies: its values (`g Q_S` then `ā Q_A`, row-major)
/// start at byte `at` of the mapping.
#[derive(Debug, Clone, Copy)]
struct Factored {
    at: usize,
    tokens: usize,
    d_out: usize,
}

impl LayerBatch {
    pub fn new(d: usize) -> Self {
        LayerBatch {
            d,
            stored_at: Vec::new(),
            stored_cols: Vec::new(),
            rebuilt: Vec::new(),
            rebuilt_cols: Vec::new(),
            factored: Vec::new(),
        }
    }

    /// Empties the batch, keeping the buffers.
    pub fn clear(&mut self) {
        self.stored_at.clear();
        self.stored_cols.clear();
        self.rebuilt_cols.clear();
        self.factored.clear();
    }

    /// The stored columns, in `stored_cols` order: slices of the store's mapping (`store`, from
    /// [`StoreReader::bytes`]), at any alignment; [`StoreBytes::columns`] gives them to the dot
    /// kernel.
    pub fn stored<'m>(&self, store: &'m StoreBytes) -> Vec<&'m [u8]> {
        let n = self.d * store.dtype.bytes() as usize;
        self.stored_at
            .iter()
            .map(|&at| &store.map[at..at + n])
            .collect()
    }

    /// The columns rebuilt from per-token factors, in `rebuilt_cols` order.
    pub fn rebuilt(&self) -> &[f32] {
        &self.rebuilt[..self.rebuilt_cols.len() * self.d]
    }

    /// Column `k` of the batch in f32 (widened if stored as bf16), for the cosine's norms.
    pub fn column_f32(&self, k: usize, store: &StoreBytes) -> Vec<f32> {
        let d = self.d;
        if let Some(i) = self.stored_cols.iter().position(|&c| c == k) {
            let at = self.stored_at[i];
            let mut out = vec![0f32; d];
            decode(store.dtype, &store.map[at..], &mut out);
            out
        } else {
            let i = self
                .rebuilt_cols
                .iter()
                .position(|&c| c == k)
                .expect("every column of the batch is stored or rebuilt");
            self.rebuilt[i * d..(i + 1) * d].to_vec()
        }
    }
}

/// Decodes `dst.len()` little-endian values of `dtype` from the start of `bytes`.
fn decode(dtype: StoreDtype, bytes: &[u8], dst: &mut [f32]) {
    match dtype {
        StoreDtype::F32 => {
            for (d, c) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        StoreDtype::Bf16 => {
            for (d, c) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                *d = from_bf16(u16::from_le_bytes([c[0], c[1]]));
            }
        }
    }
}

/// The gradients file, mapped read-only, and the dtype of its values; shared between the thread
/// that walks the records and those that read the columns.
pub struct StoreBytes {
    map: memmap2::Mmap,
    pub dtype: StoreDtype,
}

impl StoreBytes {
    /// Stored columns (from [`LayerBatch::stored`]) as the dot kernel reads them.
    pub fn columns<'a>(&self, stored: &'a [&'a [u8]]) -> linalg::Columns<'a> {
        match self.dtype {
            StoreDtype::Bf16 => linalg::Columns::Bf16Le(stored),
            StoreDtype::F32 => linalg::Columns::F32Le(stored),
        }
    }
}

/// A line of `sequences.jsonl`.
#[derive(serde::Deserialize)]
struct StoredSequence {
    id: String,
    ids: Vec<u32>,
}

/// Walks a store, sequence by sequence. The gradients file is memory-mapped rather than read: the
/// rotated columns are read by the dot kernel where the page cache holds them. Copying them out
/// first (`read`) was a fifth of re-scoring's CPU time and tripled its memory traffic.
pub struct StoreReader {
    pub meta: StoreMeta,
    dir: PathBuf,
    bytes: std::sync::Arc<StoreBytes>,
    /// Byte offset of the next record, and where the batch being filled began.
    at: usize,
    batch_start: usize,
    /// The gradients' checksums (none for a store without them), and the end of the chunks
    /// verified so far: every byte below it matched its chunk's sum.
    sums: Option<Sums>,
    verified_end: usize,
    sequences: std::io::Lines<std::io::BufReader<Box<dyn std::io::Read + Send>>>,
    read: usize,
    /// The sequences read so far, kept for [`Self::rewind`] when [`Self::keep_sequences`]
    /// asked (a pass after the first then parses and verifies no line again).
    kept: Option<Vec<Sequence>>,
}

impl StoreReader {
    pub fn open(dir: &Path) -> Result<Self> {
        let meta_path = dir.join(META_FILE);
        if !meta_path.exists() {
            return Err(Error::input(format!(
                "{}: no gradient store (no {META_FILE}); write one with `infl fit --store`",
                dir.display()
            )));
        }
        let meta: StoreMeta = crate::io::read_json(&meta_path)?;
        crate::provenance::check_format(meta.format_version, &meta_path)?;
        let open = |name: &str| -> Result<std::fs::File> {
            let p = dir.join(name);
            std::fs::File::open(&p).map_err(|e| Error::io(&p, e))
        };
        let g = open(GRADIENTS_FILE)?;
        let gpath = dir.join(GRADIENTS_FILE);
        let len = g.metadata().map_err(|e| Error::io(&gpath, e))?.len();
        if len != meta.bytes {
            return Err(Error::Mismatch(format!(
                "{}: {len} bytes, store.json says {}; the store is incomplete or was modified, rewrite it with `infl fit --store`",
                gpath.display(),
                meta.bytes
            )));
        }
        // SAFETY: a mapping is only sound while nobody truncates or rewrites the file in place.
        // `fit --store` never does: it builds a store in a temporary directory and renames it
        // into place, so a rewrite during scoring replaces the file and leaves this one mapped.
        let map = unsafe { memmap2::Mmap::map(&g) }.map_err(|e| Error::io(&gpath, e))?;
        #[cfg(unix)]
        let _ = map.advise(memmap2::Advice::Sequential);
        let sequences_file = open(SEQUENCES_FILE)?;
        let (sums, sequences): (Option<Sums>, Box<dyn std::io::Read + Send>) = match &meta.checksums
        {
            Some(c) => {
                let spath = dir.join(SEQUENCES_FILE);
                let slen = sequences_file
                    .metadata()
                    .map_err(|e| Error::io(&spath, e))?
                    .len();
                let ssums = c.sequences.parse(slen, &spath, REMEDY)?;
                (
                    Some(c.gradients.parse(len, &gpath, REMEDY)?),
                    Box::new(VerifyingReader::new(sequences_file, ssums, &spath, REMEDY)),
                )
            }
            None => {
                eprintln!(
                        "warning: {}: a store without checksums (written by an infl before format 3) is read unverified; rewrite it with `infl fit --store` to have it verified",
                        dir.display()
                    );
                (None, Box::new(sequences_file))
            }
        };
        Ok(StoreReader {
            sequences: std::io::BufReader::new(sequences).lines(),
            sums,
            verified_end: 0,
            dir: dir.to_path_buf(),
            bytes: std::sync::Arc::new(StoreBytes {
                map,
                dtype: meta.dtype,
            }),
            meta,
            at: 0,
            batch_start: 0,
            read: 0,
            kept: None,
        })
    }

    /// Keeps the sequences as they are read, so that [`Self::rewind`] can read the store again
    /// without parsing sequences.jsonl again (memory: the corpus's token ids).
    pub fn keep_sequences(mut self) -> Self {
        self.kept.get_or_insert_with(Vec::new);
        self
    }

    /// Back to the first sequence, for another pass: the mapping and the chunks of it already
    /// verified are kept (the store is replaced by renaming, never rewritten in place, so
    /// what was verified stays so). Without [`Self::keep_sequences`], an error.
    pub fn rewind(&mut self) -> Result<()> {
        if self.kept.is_none() {
            return Err(Error::Other(
                "a store reader rewound without keeping its sequences".into(),
            ));
        }
        self.at = 0;
        self.batch_start = 0;
        self.read = 0;
        Ok(())
    }

    /// The mapped gradients, for reading the columns of the batches this reader fills.
    pub fn bytes(&self) -> std::sync::Arc<StoreBytes> {
        self.bytes.clone()
    }

    /// The next `n` bytes of the gradients file, or an error naming the record when the file
    /// ends first.
    fn take(&mut self, n: usize) -> Result<std::ops::Range<usize>> {
        let range = self.at..self.at + n;
        if range.end > self.bytes.map.len() {
            return Err(Error::Mismatch(format!(
                "{}: ends inside the record of sequence {}; the store is corrupt, rewrite it with `infl fit --store`",
                self.dir.join(GRADIENTS_FILE).display(),
                self.read
            )));
        }
        self.at = range.end;
        Ok(range)
    }

    /// Reads the next sequence as column `k` of `batch` (one [`LayerBatch`] per layer): a rotated
    /// gradient is located in the mapping, one stored as per-token factors is located too and
    /// rebuilt in f32 by [`Self::ready_batch`]. `None` at the end.
    pub fn next_columns(&mut self, batch: &mut [LayerBatch], k: usize) -> Result<Option<Sequence>> {
        let Some(seq) = self.next_sequence()? else {
            return Ok(None);
        };
        if k == 0 {
            self.batch_start = self.at;
        }
        let width = self.meta.dtype.bytes() as usize;
        if batch.len() != self.meta.layers.len() {
            return Err(self.layers_differ());
        }
        for (li, l) in self.meta.layers.clone().iter().enumerate() {
            let (d_o, d_i) = (l.d_out, l.d_in_h());
            let dst = &mut batch[li];
            if d_o.checked_mul(d_i) != Some(dst.d) {
                return Err(self.layers_differ());
            }
            match self.tag()? {
                0 => {
                    let range = self.take(dst.d * width)?;
                    dst.stored_at.push(range.start);
                    dst.stored_cols.push(k);
                }
                _ => {
                    let tokens = self.factored_tokens(seq.ids.len())?;
                    let range = self.take(tokens * (d_o + d_i) * width)?;
                    dst.factored.push(Factored {
                        at: range.start,
                        tokens,
                        d_out: d_o,
                    });
                    dst.rebuilt_cols.push(k);
                }
            }
        }
        self.read += 1;
        Ok(Some(seq))
    }

    /// The store's layers are not those being scored.
    fn layers_differ(&self) -> Error {
        Error::Mismatch(format!(
            "{}: its layers differ from the factors' tracked layers; {REMEDY}",
            self.dir.join(META_FILE).display()
        ))
    }

    /// Makes `batch`, filled since its first [`Self::next_columns`], ready to score: maps its
    /// pages into memory, so that the threads that read its columns next do not stop at a page
    /// fault every 64 KiB (a tenth of the read, measured; only a hint), verifies the chunks
    /// of the gradients file it lies in that are not verified yet, in parallel, then rebuilds
    /// its columns stored as per-token factors, in parallel. Nothing of the batch is used
    /// before this returns: a chunk that does not match its checksum is an error instead of a
    /// batch. (The walk that filled the batch read only tags and token counts, each checked.)
    pub fn ready_batch(&mut self, batch: &mut [LayerBatch]) -> Result<()> {
        self.verify_batch()?;
        self.rebuild(batch);
        Ok(())
    }

    /// Maps in and verifies the bytes of the batch being filled ([`Self::ready_batch`]).
    fn verify_batch(&mut self) -> Result<()> {
        use rayon::prelude::*;
        let start = match &self.sums {
            Some(sums) => sums.range(self.verified_end / self.chunk_len()).start,
            None => self.batch_start,
        };
        let end = match &self.sums {
            Some(sums) if self.at > 0 => sums.range((self.at - 1) / self.chunk_len()).end,
            _ => self.at,
        };
        #[cfg(target_os = "linux")]
        if end > start {
            let _ = self
                .bytes
                .map
                .advise_range(memmap2::Advice::PopulateRead, start, end - start);
        }
        let Some(sums) = &self.sums else {
            return Ok(());
        };
        if end <= self.verified_end {
            return Ok(());
        }
        let path = self.dir.join(GRADIENTS_FILE);
        let map = &self.bytes.map;
        let chunks = self.verified_end / self.chunk_len()..(self.at - 1) / self.chunk_len() + 1;
        chunks
            .into_par_iter()
            .try_for_each(|i| sums.verify(i, &map[sums.range(i)], &path, REMEDY))?;
        self.verified_end = end;
        Ok(())
    }

    /// The checksums' chunk length (1 without checksums).
    fn chunk_len(&self) -> usize {
        self.sums.as_ref().map_or(1, Sums::chunk_bytes)
    }

    /// The next sequence (a line of sequences.jsonl, or the kept copy of it after a rewind),
    /// or `None` when every sequence has been read.
    fn next_sequence(&mut self) -> Result<Option<Sequence>> {
        if self.read == self.meta.n_sequences {
            return Ok(None);
        }
        if let Some(seq) = self.kept.as_ref().and_then(|k| k.get(self.read)) {
            return Ok(Some(seq.clone()));
        }
        let seq = self.parse_sequence()?;
        if let Some(kept) = &mut self.kept {
            kept.push(seq.clone());
        }
        Ok(Some(seq))
    }

    /// The next line of sequences.jsonl, parsed and checked.
    fn parse_sequence(&mut self) -> Result<Sequence> {
        let path = self.dir.join(SEQUENCES_FILE);
        let line = self
            .sequences
            .next()
            .ok_or_else(|| Error::Mismatch(format!("{}: ends early", path.display())))?
            .map_err(|e| checksum::mismatch_of(e).unwrap_or_else(|e| Error::io(&path, e)))?;
        let bad = |what: String| {
            Error::Mismatch(format!(
                "{}:{}: {what}; the store is corrupt, {REMEDY}",
                path.display(),
                self.read + 1
            ))
        };
        let record: StoredSequence = serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
        if record.ids.len() > self.meta.max_len {
            return Err(bad(format!(
                "{} token ids, more than --max-len {}",
                record.ids.len(),
                self.meta.max_len
            )));
        }
        Ok(Sequence {
            id: record.id,
            ids: record.ids,
        })
    }

    /// The form tag of the next layer record: 0 rotated gradient, 1 per-token factors.
    fn tag(&mut self) -> Result<u8> {
        let at = self.take(1)?.start;
        match self.bytes.map[at] {
            tag @ (0 | 1) => Ok(tag),
            other => Err(Error::Mismatch(format!(
                "{}: bad tag {other} at byte {at} (sequence {}); the store is corrupt, rewrite it with `infl fit --store`",
                self.dir.join(GRADIENTS_FILE).display(),
                self.read
            ))),
        }
    }

    /// The token count of a record of per-token factors (after its tag), checked to be the
    /// sequence's length `len`.
    fn factored_tokens(&mut self, len: usize) -> Result<usize> {
        let t = self.take(4)?;
        let m = &self.bytes.map;
        let tokens =
            u32::from_le_bytes([m[t.start], m[t.start + 1], m[t.start + 2], m[t.start + 3]])
                as usize;
        if tokens != len {
            return Err(Error::Mismatch(format!(
                "{}: the record of sequence {} holds {tokens} tokens, sequences.jsonl {len}; the store is corrupt, {REMEDY}",
                self.dir.join(GRADIENTS_FILE).display(),
                self.read
            )));
        }
        Ok(tokens)
    }

    /// Writes `(g Q_S)ᵀ (ā Q_A)` of every record of per-token factors in `batch` into its
    /// column (column-major `d_out × d_in_h`): one single-threaded product per record, the
    /// records of every layer spread over the threads (a threaded product per record left most
    /// threads idle on these small shapes).
    fn rebuild(&self, batch: &mut [LayerBatch]) {
        use rayon::prelude::*;
        let (dtype, map) = (self.meta.dtype, &self.bytes.map);
        let mut work = Vec::new();
        for layer in batch.iter_mut() {
            let (d, n) = (layer.d, layer.factored.len());
            if layer.rebuilt.len() < n * d {
                layer.rebuilt.resize(n * d, 0.0);
            }
            work.extend(layer.rebuilt[..n * d].chunks_mut(d).zip(&layer.factored));
        }
        work.into_par_iter().for_each(|(col, f)| {
            let d_in = col.len() / f.d_out;
            let mut g = vec![0f32; f.tokens * f.d_out];
            let mut a = vec![0f32; f.tokens * d_in];
            decode(dtype, &map[f.at..], &mut g);
            decode(
                dtype,
                &map[f.at + g.len() * dtype.bytes() as usize..],
                &mut a,
            );
            linalg::gemm(
                faer::MatMut::from_column_major_slice_mut(col, f.d_out, d_in),
                linalg::rows(&g, f.tokens, f.d_out).transpose(),
                linalg::rows(&a, f.tokens, d_in),
                false,
                false,
            );
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even() {
        for x in [1.0f32, -2.5, 2.718_281_7, 1e-20, 65504.0] {
            let y = from_bf16(to_bf16(x));
            assert!((x - y).abs() <= x.abs() * 2f32.powi(-8), "{x} → {y}");
        }
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1).
        assert_eq!(from_bf16(to_bf16(1.0 + 2f32.powi(-8))), 1.0);
        assert_eq!(
            from_bf16(to_bf16(1.0 + 3.0 * 2f32.powi(-8))),
            1.0 + 2f32.powi(-6)
        );
    }

    #[test]
    fn sizes_choose_the_smaller_form() {
        let l = TrackedLayer {
            name: "x".into(),
            d_in: 63,
            d_out: 64,
            has_bias: true,
        };
        let opts = |dtype, form| StoreOptions { dtype, form };
        let one = std::slice::from_ref(&l);
        // T = 2: 2·128 = 256 values < 4096 → factors (1 + 4 + 256·4 bytes).
        let small32 = opts(StoreDtype::F32, StoreForm::Smallest);
        assert_eq!(sequence_bytes(one, 2, small32), 1 + 4 + 1024);
        // Asked for the rotated form: 4096 values whatever the length.
        let rotated32 = opts(StoreDtype::F32, StoreForm::Rotated);
        assert_eq!(sequence_bytes(one, 2, rotated32), 1 + 4096 * 4);
        // T = 100: 12800 > 4096 → the rotated gradient (1 + 4096·2 bytes in bf16).
        let small16 = opts(StoreDtype::Bf16, StoreForm::Smallest);
        assert_eq!(sequence_bytes(one, 100, small16), 1 + 8192);
    }
}
