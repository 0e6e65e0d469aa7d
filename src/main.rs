//! The `infl` command line: a thin front over the library's workflow.
//!
//! Exit codes: 0 success, 1 failure while running, 2 usage error (an option missing or out of
//! its range), 3 bad input (a file the user can fix, or one that does not exist), 4 mismatch
//! (factors or results from another model or other settings), 5 a non-finite loss or gradient.

mod bench;
mod cli;
mod demo;
mod progress;

fn main() {
    infl::io::keep_freed_memory();
    let code = match cli::run() {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("error: {}", message(&err));
            exit_code(&err)
        }
    };
    std::process::exit(code);
}

/// The error and its causes, joined by `: `, leaving out a cause whose text the message before
/// it already holds (`Error::Io` shows its OS error itself).
fn message(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Maps the library's error kinds onto the documented exit codes (clap's own usage errors exit
/// 2 while parsing).
fn exit_code(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<infl::Error>() {
            return e.exit_code();
        }
    }
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_os_error_is_printed_once_and_a_missing_file_is_bad_input() {
        let source = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let err = anyhow::Error::new(infl::Error::io("/x/meta.json", source));
        assert_eq!(message(&err), "I/O error on /x/meta.json: gone");
        assert_eq!(exit_code(&err), 3);
        let err = anyhow::Error::new(infl::Error::usage("--top-k 0")).context("scoring");
        assert_eq!(message(&err), "scoring: --top-k 0");
        assert_eq!(exit_code(&err), 2);
    }
}
