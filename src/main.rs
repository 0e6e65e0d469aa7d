//! The `infl` command line: a thin front over the library's workflow.
//!
//! Exit codes: 0 success, 1 failure while running, 2 usage error, 3 bad input (a file or option
//! the user can fix), 4 mismatch (factors or results from another model or other settings),
//! 5 a non-finite loss or gradient.

mod cli;

fn main() {
    // The autograd paths (training, the reference engine) allocate and free many short-lived
    // multi-megabyte tensors; glibc would hand each back to the kernel (mmap/munmap) and fault
    // it in again, zeroed, on the next step. Keeping freed memory in the heap avoids that.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
    let code = match cli::run() {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("error: {err:#}");
            cli::exit_code(&err)
        }
    };
    std::process::exit(code);
}
