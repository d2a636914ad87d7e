//! The `orproxy` binary: parse the command line, run, map the result to an exit code.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = orproxy::cli::Cli::parse();
    orproxy::daemon::main(cli)
}
