//! A real-size GPT-2 (124M shapes, names and layout of the released checkpoint) loads and gives
//! the logits of transformers. Needs a checkpoint made by scripts/make_gpt2_small.py (500 MB,
//! not committed), so it is ignored by default:
//!
//! ```text
//! python scripts/make_gpt2_small.py /tmp/gpt2-small
//! INFL_GPT2_SMALL=/tmp/gpt2-small cargo test --release --test gpt2_small -- --ignored --nocapture
//! ```

use infl::model::ModuleSelection;
use std::path::PathBuf;

#[test]
#[ignore = "needs INFL_GPT2_SMALL (scripts/make_gpt2_small.py)"]
fn gpt2_small_logits_match_transformers() {
    let dir = PathBuf::from(std::env::var("INFL_GPT2_SMALL").expect("set INFL_GPT2_SMALL"));
    let t0 = std::time::Instant::now();
    let model = infl::model::load(&dir, ModuleSelection::All, infl::model::Compute::CPU).unwrap();
    eprintln!(
        "loaded {} parameters, {} tracked layers in {:.2}s",
        model.n_parameters(),
        model.tracked().len(),
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(model.tracked().len(), 48);
    let reference = infl::io::read_safetensors(&dir.join("reference_logits.safetensors")).unwrap();
    let ids: Vec<u32> = reference["ids"].1.iter().map(|&x| x as u32).collect();
    let want = &reference["logits"].1;
    let got = model.logits(&ids).unwrap();
    assert_eq!(got.len(), want.len());
    let worst = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
    eprintln!("max |logit − transformers| = {worst:.2e}");
    assert!(worst < 1e-4);
}
