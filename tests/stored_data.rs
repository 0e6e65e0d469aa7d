//! Stored data is verified before use: a gradient store, a BM25 index, factors and a checkpoint,
//! each corrupted after it was written, make the command that reads it exit 4 naming the file
//! (and, for the store, the chunk), never exit 0 with another answer and never panic.

mod common;

use common::{ok, run, s};
use std::path::{Path, PathBuf};
use std::process::Output;

fn scratch(name: &str) -> PathBuf {
    common::scratch("stored-data", name)
}

/// The random GPT-2 of the store tests: 40 short documents, two queries.
fn fixture(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    common::random_gpt2(dir, 5, 40, |d| 2 + d * 5 % 13, |d, t| d * 3 + t * 7 + t * t)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Exit code 4 with `needles` in the message, and no panic.
fn assert_corrupt(out: &Output, needles: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "`{n}` not in: {err}");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

fn patch(path: &Path, at: usize, bytes: &[u8]) {
    let mut b = std::fs::read(path).unwrap();
    b[at..at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, b).unwrap();
}

struct Scored {
    model: PathBuf,
    corpus: PathBuf,
    queries: PathBuf,
    dir: PathBuf,
}

impl Scored {
    fn score(&self, factors: &Path, out: &str, extra: &[&str]) -> Output {
        let out = self.dir.join(out);
        let mut a = vec![
            "score",
            "--model",
            s(&self.model),
            "--factors",
            s(factors),
            "--train",
            s(&self.corpus),
            "--queries",
            s(&self.queries),
            "--out",
            s(&out),
            "--top-k",
            "5",
        ];
        a.extend(extra);
        run(&a)
    }
}

#[test]
fn a_changed_value_in_the_gradient_store_is_refused_naming_file_and_chunk() {
    let dir = scratch("store");
    let (model, corpus, queries) = fixture(&dir);
    let factors = dir.join("factors");
    ok(&[
        "fit",
        "--model",
        s(&model),
        "--train",
        s(&corpus),
        "--out",
        s(&factors),
        "--store",
    ]);
    let t = Scored {
        model,
        corpus,
        queries,
        dir: dir.clone(),
    };
    let clean = t.score(&factors, "clean", &["--store"]);
    assert!(clean.status.success(), "{}", stderr(&clean));
    // The last 4 bytes of gradients.bin are a value in either form (the last record's last
    // column or last factor row).
    let len = std::fs::metadata(factors.join("store/gradients.bin"))
        .unwrap()
        .len() as usize;
    for (name, value) in [("huge", 1e30f32), ("nan", f32::from_bits(0x7fc0_0001))] {
        let f = dir.join(format!("factors-{name}"));
        copy_dir(&factors, &f);
        patch(
            &f.join("store/gradients.bin"),
            len - 4,
            &value.to_le_bytes(),
        );
        let out = t.score(&f, name, &["--store"]);
        assert_corrupt(&out, &["gradients.bin", "chunk 0 of 1", "infl fit --store"]);
        assert!(!dir.join(name).join("top_k.jsonl").exists());
    }
    // A changed token id in sequences.jsonl.
    let f = dir.join("factors-ids");
    copy_dir(&factors, &f);
    let seqs = std::fs::read_to_string(f.join("store/sequences.jsonl")).unwrap();
    let edited = seqs.replacen("\"ids\":[", "\"ids\":[3,", 1);
    assert_ne!(seqs, edited);
    std::fs::write(f.join("store/sequences.jsonl"), edited).unwrap();
    let out = t.score(&f, "ids", &["--store"]);
    assert_corrupt(&out, &["sequences.jsonl"]);
    std::fs::remove_dir_all(&dir).ok();
}

/// An index file's arrays (name, values) and header metadata.
type IndexParts = (
    Vec<(String, Vec<u32>)>,
    std::collections::HashMap<String, String>,
);

/// The arrays of an index file, and its header metadata.
fn read_index(path: &Path) -> IndexParts {
    let bytes = std::fs::read(path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let arrays = [
        "offsets",
        "postings_sequence",
        "postings_tf",
        "sequence_length",
    ]
    .iter()
    .map(|n| {
        let v = st.tensor(n).unwrap();
        let values = v
            .data()
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (n.to_string(), values)
    })
    .collect();
    (arrays, meta)
}

/// Writes an index with `arrays`, its checksums recomputed (as a hostile or buggy writer would).
fn write_index(
    path: &Path,
    arrays: &[(String, Vec<u32>)],
    mut meta: std::collections::HashMap<String, String>,
) {
    let bytes: Vec<(String, Vec<u8>)> = arrays
        .iter()
        .map(|(n, v)| (n.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    for (n, b) in &bytes {
        meta.insert(format!("xxh3.{n}"), infl::checksum::hex_of(b));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, b)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::U32, vec![b.len() / 4], b)
                    .unwrap();
            (n.clone(), view)
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
}

#[test]
fn a_tampered_or_flipped_index_is_refused_without_a_panic() {
    let dir = scratch("index");
    let (model, corpus, queries) = fixture(&dir);
    let (factors, index) = (dir.join("factors"), dir.join("index"));
    ok(&[
        "fit",
        "--model",
        s(&model),
        "--train",
        s(&corpus),
        "--out",
        s(&factors),
    ]);
    ok(&[
        "index",
        s(&corpus),
        "--model",
        s(&model),
        "--out",
        s(&index),
    ]);
    let t = Scored {
        model,
        corpus,
        queries,
        dir: dir.clone(),
    };
    let prefilter = |name: &str, index: &Path| {
        t.score(&factors, name, &["--prefilter", "3", "--index", s(index)])
    };
    let clean = prefilter("clean", &index);
    assert!(clean.status.success(), "{}", stderr(&clean));
    let file = index.join("index.safetensors");
    let (arrays, meta) = read_index(&file);
    let n_terms = arrays[0].1.len() - 1;
    let n_postings = arrays[1].1.len();
    type Tamper = Box<dyn Fn(&mut [(String, Vec<u32>)])>;
    let cases: Vec<(&str, Tamper, &str)> = vec![
        (
            "offset-out-of-range",
            Box::new(move |a| a[0].1[n_terms / 2] = 1_000_000),
            "`offsets` decreases",
        ),
        (
            "offsets-reversed",
            Box::new(|a| a[0].1.reverse()),
            "does not start at 0",
        ),
        (
            "zero-lengths",
            Box::new(|a| a[3].1.iter_mut().for_each(|l| *l = 0)),
            "term counts sum to",
        ),
        (
            "posting-id-1e9",
            Box::new(move |a| a[1].1[n_postings / 2] = 1_000_000_000),
            "sequence 1000000000",
        ),
    ];
    for (name, tamper, why) in cases {
        let bad = dir.join(format!("index-{name}"));
        std::fs::create_dir_all(&bad).unwrap();
        let mut a = arrays.clone();
        tamper(&mut a);
        write_index(&bad.join("index.safetensors"), &a, meta.clone());
        let out = prefilter(name, &bad);
        assert_corrupt(&out, &["index.safetensors", why, "infl index"]);
        // The same tampering with the clean file's checksums: caught by them first.
        let (_, clean_meta) = read_index(&file);
        let mut b = std::fs::read(bad.join("index.safetensors")).unwrap();
        let header_len = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        let mut header: serde_json::Value = serde_json::from_slice(&b[8..8 + header_len]).unwrap();
        for (k, v) in &clean_meta {
            if k.starts_with("xxh3.") {
                header["__metadata__"][k] = v.clone().into();
            }
        }
        let mut text = serde_json::to_vec(&header).unwrap();
        text.resize(text.len().div_ceil(8) * 8, b' ');
        let mut rebuilt = (text.len() as u64).to_le_bytes().to_vec();
        rebuilt.extend(&text);
        rebuilt.extend(&b.split_off(8 + header_len));
        std::fs::write(bad.join("index.safetensors"), rebuilt).unwrap();
        let out = prefilter(&format!("{name}-unsummed"), &bad);
        assert_corrupt(&out, &["index.safetensors", "does not match its checksum"]);
    }
    // One bit flipped in the clean index's postings.
    let flipped = dir.join("index-flip");
    copy_dir(&index, &flipped);
    let mut b = std::fs::read(&file).unwrap();
    let at = b.len() - 4 * (arrays[3].1.len() + 1);
    b[at] ^= 0x10;
    std::fs::write(flipped.join("index.safetensors"), b).unwrap();
    let out = prefilter("flip", &flipped);
    assert_corrupt(&out, &["index.safetensors", "does not match its checksum"]);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_bit_flip_in_the_factors_or_a_checkpoint_is_refused() {
    let dir = scratch("factors");
    let (model, corpus, queries) = fixture(&dir);
    let t = Scored {
        model: model.clone(),
        corpus: corpus.clone(),
        queries,
        dir: dir.clone(),
    };
    let fit = |out: &Path, extra: &[&str]| {
        let mut a = vec![
            "fit",
            "--model",
            s(&model),
            "--train",
            s(&corpus),
            "--out",
            s(out),
        ];
        a.extend(extra);
        run(&a)
    };
    // Factors: one bit in the middle of factors.safetensors.
    let factors = dir.join("factors");
    assert!(fit(&factors, &[]).status.success());
    let file = factors.join("factors.safetensors");
    let mut b = std::fs::read(&file).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x01;
    std::fs::write(&file, b).unwrap();
    let out = t.score(&factors, "scores", &[]);
    assert_corrupt(&out, &["factors.safetensors", "does not match"]);

    // A shard's finished state: merged by `infl merge`, which must refuse the flipped one.
    let sharded = dir.join("sharded");
    for i in 0..2 {
        let shard = format!("{i}/2");
        let out = fit(&sharded, &["--shard", &shard]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let work = sharded.join("work");
    let payload = std::fs::read_dir(&work)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.starts_with("covariance.0-of-2.") && !n.ends_with(".json")
        })
        .unwrap_or_else(|| panic!("no state of shard 0 in {}", work.display()));
    let mut b = std::fs::read(&payload).unwrap();
    let at = b.len() - 3;
    b[at] ^= 0x20;
    std::fs::write(&payload, b).unwrap();
    let out = run(&["merge", s(&sharded)]);
    let name = payload.file_name().unwrap().to_string_lossy().into_owned();
    assert_corrupt(&out, &[name.as_str(), "corrupt checkpoint"]);
    std::fs::remove_dir_all(&dir).ok();
}

/// What verifying the gradient store costs re-scoring: `score --store` end to end on the bundled
/// model's store of the kronfluence fixture (rotated f32, 585 sequences of 48 tokens), verified against the same store with its
/// checksums removed (read unverified), alternating, best of 7 each. Prints the ratio; run with
/// `cargo test --release --test stored_data -- --ignored --nocapture`.
#[test]
#[ignore]
fn verification_cost_of_rescoring_from_the_store() {
    let dir = scratch("cost");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("assets/tiny-gpt2");
    let corpus = root.join("tests/fixtures/kronfluence/corpus_ids.jsonl");
    let queries = root.join("tests/fixtures/kronfluence/queries_ids.jsonl");
    let verified = dir.join("verified");
    ok(&[
        "fit",
        "--model",
        s(&model),
        "--train",
        s(&corpus),
        "--max-len",
        "48",
        "--out",
        s(&verified),
        "--store",
        "--store-form",
        "rotated",
    ]);
    let unverified = dir.join("unverified");
    copy_dir(&verified, &unverified);
    let meta_path = unverified.join("store/store.json");
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
    meta.as_object_mut().unwrap().remove("checksums");
    std::fs::write(&meta_path, serde_json::to_string(&meta).unwrap()).unwrap();
    let time = |factors: &Path| {
        let _ = std::fs::remove_dir_all(dir.join("scores"));
        let started = std::time::Instant::now();
        ok(&[
            "score",
            "--model",
            s(&model),
            "--factors",
            s(factors),
            "--train",
            s(&corpus),
            "--queries",
            s(&queries),
            "--max-len",
            "48",
            "--store",
            "--out",
            s(&dir.join("scores")),
        ]);
        started.elapsed().as_secs_f64()
    };
    time(&verified);
    let (mut with, mut without) = (f64::MAX, f64::MAX);
    for _ in 0..7 {
        with = with.min(time(&verified));
        without = without.min(time(&unverified));
    }
    let bytes = std::fs::metadata(verified.join("store/gradients.bin"))
        .unwrap()
        .len();
    println!(
        "re-scoring from a {:.0} MiB store: {with:.3} s verified, {without:.3} s unverified: ratio {:.3}",
        bytes as f64 / (1u64 << 20) as f64,
        with / without
    );
    std::fs::remove_dir_all(&dir).ok();
}
