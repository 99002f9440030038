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
    let cli = Cli::parse();
    let result = match cli.command {
        Command::CheckConfig { config } => {
            provd_daemon::log::init(provd_daemon::config::LogFormat::Text);
            check_config(&config)
        }
        Command::Serve { config } => {
            provd_node::own_files_only();
            return serve(config);
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

fn check_config(config: &std::path::Path) -> anyhow::Result<()> {
    provd_daemon::Config::load(config)
        .map(|c| {
            println!(
                "{}: ok (listen {}, data {})",
                config.display(),
                c.listen,
                c.data_dir.display()
            )
        })
        .map_err(anyhow::Error::from)
}

/// Reads the configuration, starts the log in its format and serves; an
/// error after that is logged in the same format.
fn serve(path: PathBuf) -> ExitCode {
    let config = match provd_daemon::Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("provd: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    provd_daemon::log::init(config.log.format);
    let served = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| {
            runtime.block_on(provd_daemon::serve(config, shutdown_signal(), |bound| {
                // Scripts and tests read the address from here (port 0
                // picks one).
                println!("provd listening on https://{}", bound.addr);
            }))
        });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "provd stopped");
            ExitCode::FAILURE
        }
    }
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
