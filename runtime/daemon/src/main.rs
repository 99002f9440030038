//! `provd`: the node daemon's command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// A request's plan and partitions allocate tens of MiB for a moment, on
/// whichever thread runs them. glibc's allocator keeps freed memory in
/// per-thread arenas, so the daemon's resident memory grew with the
/// requests it had served (48 to 208 MiB over 100 requests). jemalloc,
/// with a background thread returning pages freed for a second
/// (`.cargo/config.toml` sets its options at build time), comes back to
/// within 15 MiB of its rest figure.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "provd", version, about = "The provd node daemon")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serves the node's API until SIGINT or SIGTERM.
    Serve {
        /// The configuration file (docs/api.md shows one).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Reads and checks a configuration file, then exits.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PROVD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: under systemd the log goes to the
        // journal, which would keep the escape codes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::CheckConfig { config } => provd_daemon::Config::load(&config)
            .map(|c| {
                println!(
                    "{}: ok (listen {}, data {})",
                    config.display(),
                    c.listen,
                    c.data_dir.display()
                )
            })
            .map_err(anyhow::Error::from),
        Command::Serve { config } => {
            provd_node::own_files_only();
            serve(config)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("provd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(path: PathBuf) -> anyhow::Result<()> {
    let config = provd_daemon::Config::load(&path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(provd_daemon::serve(config, shutdown_signal(), |bound| {
        // Scripts and tests read the address from here (port 0 picks one).
        println!("provd listening on https://{}", bound.addr);
    }))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        // Without signal handlers the daemon still stops on SIGKILL; a
        // restart recovers what it left running.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}
