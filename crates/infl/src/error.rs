//! The library's error type. Every variant says what the user can fix: which file, which line,
//! which field, which sequence.

use std::path::PathBuf;

/// Errors raised by the `infl` library. The binary maps [`Error::Input`] to exit code 3
/// (bad input the user can fix) and everything else to exit code 1.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A user-supplied file is malformed or inconsistent; the message names file, line and field.
    #[error("{0}")]
    Input(String),

    /// Factors or results that do not belong to the model/settings they are used with.
    #[error("{0}")]
    Mismatch(String),

    /// A loss or gradient became NaN or infinite.
    #[error("{0}")]
    NonFinite(String),

    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("tensor engine error: {0}")]
    Candle(#[from] candle_core::Error),

    /// The caller asked the pass to stop ([`crate::pass::Progress::stop_requested`]); any
    /// resumable state is saved.
    #[error("interrupted: {0}")]
    Interrupted(String),

    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn input(msg: impl Into<String>) -> Self {
        Error::Input(msg.into())
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
