//! The `mcpfly` command. Each subcommand is a thin shim over the library module that owns the concern.

use clap::Parser;

mod cli;
mod cli_sealing;

fn main() -> std::process::ExitCode {
    // kube and reqwest use rustls with the ring provider; one process-wide default avoids ambiguity.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = cli::Cli::parse();
    #[cfg(feature = "demo")]
    if let cli::Command::Demo(demo) = &args.command {
        // The demo keeps the terminal for progress lines and its table; everything else goes to its log file.
        cli::init_logging(&args.log, Some(&demo.log_path()));
        // SAFETY: no other thread exists yet (the tokio runtime is built below).
        unsafe { mcpfly::demo::put_uvx_on_path() };
    } else {
        cli::init_logging(&args.log, None);
    }
    #[cfg(not(feature = "demo"))]
    cli::init_logging(&args.log, None);
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
