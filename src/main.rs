//! The `blocksnap` binary: parses the command line, runs it, prints the
//! result, and maps failures to exit codes.

#![deny(unsafe_code)]

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    if std::env::var_os("BLOCKSNAP_DETACHED").is_some() {
        blocksnap::ignore_sigpipe();
    } else {
        blocksnap::default_sigpipe();
    }
    let args = cli::app::Cli::parse();
    match cli::app::run(args) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            let (code, message) = cli::exit::describe_error(&err);
            eprintln!("blocksnap: error: {message}");
            ExitCode::from(code)
        }
    }
}
