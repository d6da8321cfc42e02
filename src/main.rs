//! The `tokenkeeper` binary: parse the command line, set up logging,
//! dispatch. Everything else lives in the library.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Parser;

/// glibc malloc tuning, measured with `bench/run.sh` (`scale_10000_idle_rss`):
///
/// - At most two arenas. By default each thread that allocates gets its own
///   (tokio workers, blocking threads, one thread per SQLite connection),
///   and memory freed in one is never reused by another: with 10,000
///   connections that was 30 MB of idle RSS, for no measurable speed.
/// - A fixed mmap threshold of 256 KiB. glibc raises the threshold each time
///   a large block is freed, after which large blocks (a `/metrics` page of
///   10,000 connections is 5 MB) come from the heap and their pages stay
///   resident: RSS grew by 10 MB after the first scrape.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; it is called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

/// Whether file descriptor 1 was closed when the process started (`>&-`).
/// Rust's runtime opens /dev/null on a closed standard descriptor before
/// `main`, after which writes "succeed" and a printed token would vanish;
/// this is recorded first, by a constructor (see [`CHECK_STDOUT`]).
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Runs from `.init_array`, before the Rust runtime's own start-up.
#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array"]
static CHECK_STDOUT: extern "C" fn() = {
    extern "C" fn check_stdout() {
        // SAFETY: fcntl(F_GETFD) only queries the descriptor table.
        let closed = unsafe { libc::fcntl(1, libc::F_GETFD) } == -1;
        STDOUT_CLOSED.store(closed, Ordering::Relaxed);
    }
    check_stdout
};

fn main() -> ExitCode {
    tune_malloc();
    tokenkeeper::cli::stdout_closed_at_start(STDOUT_CLOSED.load(Ordering::Relaxed));
    let cli = tokenkeeper::cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            // Not eprintln!: it panics when stderr is gone.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "tokenkeeper: cannot start the async runtime: {e}"
            );
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(tokenkeeper::cli::run(cli));
    ExitCode::from(code)
}
