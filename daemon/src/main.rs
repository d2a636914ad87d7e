//! The `orproxy` binary: parse the command line, run, map the result to an exit code.

use std::process::ExitCode;

use clap::Parser;

// A relay allocates many small, short-lived buffers per request on every core; mimalloc's
// per-thread heaps make that markedly cheaper than glibc malloc (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = orproxy::cli::Cli::parse();
    orproxy::daemon::main(cli)
}
