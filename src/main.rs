//! The `infl` command line: a thin front over the library's workflow.
//!
//! Exit codes: 0 success, 1 failure while running, 2 usage error, 3 bad input (a file or option
//! the user can fix), 4 mismatch (factors or results from another model or other settings),
//! 5 a non-finite loss or gradient.

mod cli;

fn main() {
    infl::io::keep_freed_memory();
    let code = match cli::run() {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("error: {err:#}");
            cli::exit_code(&err)
        }
    };
    std::process::exit(code);
}
