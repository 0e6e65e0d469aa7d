//! The `infl` command line: a thin front over the library's workflow.
//!
//! Exit codes: 0 success, 1 failure while running, 2 usage error, 3 bad input (a file or option
//! the user can fix), 4 mismatch (factors or results from another model or other settings),
//! 5 a non-finite loss or gradient.

mod bench;
mod cli;
mod demo;
mod progress;

fn main() {
    infl::io::keep_freed_memory();
    let code = match cli::run() {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("error: {err:#}");
            exit_code(&err)
        }
    };
    std::process::exit(code);
}

/// Maps the library's error kinds onto the documented exit codes (2, a usage error, is clap's
/// own: it exits while parsing).
fn exit_code(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<infl::Error>() {
            return match e {
                infl::Error::Input(_) => 3,
                infl::Error::Mismatch(_) => 4,
                infl::Error::NonFinite(_) => 5,
                _ => 1,
            };
        }
    }
    1
}
