//! `avail`: the CLI, and the server and agent daemons, in one binary.
//!
//! Thin: it parses flags and calls the library crates. Exit codes: 0 ok, 1 error,
//! 2 invalid input or unplaceable.

mod cli;
mod context;
mod output;
mod tokens;
mod up;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // The shim reads its own command line (containment options, `--`, the program):
    // no clap, no runtime, no logging; it only runs and reaps one program.
    let raw: Vec<String> = std::env::args().collect();
    if raw.get(1).map(String::as_str) == Some(avail_driver::process::SHIM_SUBCOMMAND) {
        let code = avail_driver::shim::run_shim(&raw[2..]);
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let args = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_max_level(if args.verbose {
            tracing::Level::DEBUG
        } else {
            tracing::Level::INFO
        })
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(cli::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}
