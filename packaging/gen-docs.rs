//! Writes the man pages and shell completions of the `tokenkeeper`
//! command line into a directory, for the Debian package
//! (`packaging/build-deb.sh` runs it before `cargo deb`):
//!
//! ```text
//! cargo run --example gen-docs -- target/packaging
//! ```
//!
//! produces `man/tokenkeeper.1` (and one page per subcommand,
//! `tokenkeeper-serve.1`, ...) and `completions/tokenkeeper.bash`,
//! `completions/_tokenkeeper` (zsh) and `completions/tokenkeeper.fish`.
//! Both are generated from the same `clap` definition the binary parses
//! with, so they cannot drift from it. An example rather than a
//! subcommand: the generators are build-time tools and stay out of the
//! shipped binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;
use tokenkeeper::cli::Cli;

fn main() -> ExitCode {
    let Some(out) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: gen-docs OUT_DIR");
        return ExitCode::from(2);
    };
    match generate(&out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gen-docs: cannot write into {}: {e}", out.display());
            ExitCode::from(1)
        }
    }
}

fn generate(out: &std::path::Path) -> std::io::Result<()> {
    let man = out.join("man");
    let completions = out.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    clap_mangen::generate_to(Cli::command(), &man)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut Cli::command(), "tokenkeeper", &completions)?;
    }
    Ok(())
}
