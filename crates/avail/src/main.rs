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
    let args = cli::Cli::parse();
    if let Some(command) = args.shim_command() {
        // No runtime, no logging: the shim only runs and reaps one program.
        let code = avail_driver::process::run_shim(&command[0], &command[1..]);
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
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
