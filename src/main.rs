//! The `mcpfly` command. Each subcommand is a thin shim over the library module that owns the concern.

use clap::Parser;

mod cli;
mod cli_sealing;

fn main() -> std::process::ExitCode {
    // kube and reqwest use rustls with the ring provider; one process-wide default avoids ambiguity.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = cli::Cli::parse();
    cli::init_logging(&args.log);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(cli::run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // `{:#}` prints the context chain on one line; error messages never carry secret material.
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
