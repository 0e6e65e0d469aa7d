//! The library's error type. Every variant says what the user can fix: which file, which line,
//! which field, which sequence.

use std::path::PathBuf;

/// Errors raised by the `infl` library. The binary maps [`Error::Usage`] to exit code 2,
/// [`Error::Input`] (and a missing input file) to 3, [`Error::Mismatch`] to 4,
/// [`Error::NonFinite`] to 5 and everything else to 1.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An option out of its range (a zero batch size, a window too short for a loss); the
    /// message names the option, the value and the range.
    #[error("{0}")]
    Usage(String),

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
    /// The exit code the command line gives this error, and so the Python exception class:
    /// 2 an option out of its range, 3 bad input (a file that is not there included), 4 a
    /// mismatch or corruption, 5 a non-finite loss or gradient, 1 anything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) => 2,
            Error::Input(_) => 3,
            // A file that is not there is an input the user named wrongly.
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => 3,
            Error::Mismatch(_) => 4,
            Error::NonFinite(_) => 5,
            _ => 1,
        }
    }

    pub fn input(msg: impl Into<String>) -> Self {
        Error::Input(msg.into())
    }

    pub fn usage(msg: impl Into<String>) -> Self {
        Error::Usage(msg.into())
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
