//! The `tokenkeeper` binary: parse the command line, set up logging,
//! dispatch. Everything else lives in the library.

use std::process::ExitCode;

use clap::Parser;

/// At most two glibc malloc arenas. By default glibc gives each thread that
/// allocates its own arena (tokio workers, blocking threads, one thread per
/// SQLite connection), and memory freed in one is never reused by another:
/// with 10,000 connections that was 30 MB of idle RSS (`bench/run.sh`,
/// `scale_10000_idle_rss`), for no measurable speed.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; it is called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = tokenkeeper::cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokenkeeper: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(tokenkeeper::cli::run(cli));
    ExitCode::from(code)
}
