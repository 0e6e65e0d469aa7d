//! # infl
//!
//! Which training sequences made a language model produce a given completion? `infl` answers
//! with EK-FAC influence functions (Grosse et al. 2023), exactly as the reference implementation
//! in the literature (kronfluence) defines them, as a Rust library and a single binary.
//!
//! The pipeline, one module per stage, data flowing one way:
//! [`data`] (corpus, queries, tokenizer) → [`model`] (forward/backward with layer taps (a, g))
//! → [`curvature`] (A, S, eigenbases, Λ) → [`influence`] (inverse-Hessian-vector products,
//! scores) → [`results`] (top-k JSONL, dense safetensors). [`workflow`] runs the stages as
//! file-to-file jobs (`infl fit`, `infl score`); [`report`] (with [`powerlaw`] for the heavy
//! tail) and [`compare`] turn results directories into HTML a person reads; [`validate`] measures
//! each approximate strategy against a more exact reference (`infl validate exact`).

pub mod checkpoint;
pub mod checksum;
pub mod compare;
pub mod curvature;
pub mod data;
pub mod demo;
pub mod error;
pub mod index;
pub mod influence;
pub mod inspect;
pub mod io;
pub mod linalg;
pub mod model;
pub mod options;
pub mod output_dir;
pub mod partition;
pub mod pass;
pub mod pass_parts;
pub mod powerlaw;
pub mod provenance;
pub mod report;
pub mod results;
pub mod shard;
pub mod store;
pub mod train;
pub mod validate;
pub mod workflow;

pub use error::{Error, Result};
