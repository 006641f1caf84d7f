//! The `s3-failover-proxy` binary: parses the command line, loads the config,
//! installs signal handling and calls [`s3_failover_proxy::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use std::time::Duration;

use s3_failover_proxy::config::LogFormat;
use s3_failover_proxy::logging::{self, LogFlush, LogLevel};
use s3_failover_proxy::reload::ReloadSource;
use s3_failover_proxy::trusted_file::FilePolicy;
use s3_failover_proxy::{Config, Listeners, run_with_reload};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

/// An S3 ingress that holds requests while its backend restarts and replays them.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// The TOML configuration file.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Validate the configuration and exit.
    #[arg(long)]
    check: bool,
    /// Log format, overriding `log.format`: text for people, json for machines.
    #[arg(long, value_enum, value_name = "FORMAT")]
    log_format: Option<LogFormatArg>,
    /// Accept world-writable config, certificate, key and token files (refused
    /// by default, as sshd refuses them). A flag, not a config key, so a
    /// config file cannot grant itself the exemption.
    #[arg(long)]
    allow_world_writable: bool,
    /// Take the listening sockets over from the proxy running with the same
    /// `listener.handover_socket` (a hot binary upgrade): that one then
    /// drains and exits. With no proxy running there, start as usual.
    #[arg(long)]
    take_over: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let files = FilePolicy {
        allow_world_writable: cli.allow_world_writable,
    };
    let mut config = match Config::load(&cli.config, files) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("s3-failover-proxy: {error}");
            return ExitCode::from(2);
        }
    };
    if cli.check {
        println!("{}: configuration is valid", cli.config.display());
        return ExitCode::SUCCESS;
    }
    match cli.log_format {
        Some(LogFormatArg::Json) => config.log.format = LogFormat::Json,
        Some(LogFormatArg::Text) => config.log.format = LogFormat::Text,
        None => {}
    }
    let (log_level, log_flush) = logging::init(&config.log);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            drop(log_flush);
            eprintln!("s3-failover-proxy: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let served = runtime.block_on(serve(
        config,
        cli.config,
        log_level,
        log_flush.clone(),
        cli.take_over,
    ));
    // Every task has logged its last line once the runtime is gone; then the
    // queued lines are written, before the exit status (and its message).
    drop(runtime);
    drop(log_flush);
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("s3-failover-proxy: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(
    config: Config,
    path: PathBuf,
    log_level: LogLevel,
    log_flush: LogFlush,
    take_over: bool,
) -> anyhow::Result<()> {
    let listeners = if take_over {
        Listeners::take_over(&config).await?
    } else {
        Listeners::bind(&config).await?
    };
    let reload = ReloadSource {
        path,
        requests: reload_requests()?,
        poll: Duration::from_secs(1),
        log_level: Some(log_level),
    };
    run_with_reload(listeners, config, shutdown_signal(log_flush), Some(reload)).await?;
    Ok(())
}

/// One message per SIGHUP.
fn reload_requests() -> anyhow::Result<mpsc::Receiver<()>> {
    let mut hangups = signal(SignalKind::hangup())?;
    let (requests, receiver) = mpsc::channel(1);
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            // A reload already pending covers this one too.
            let _ = requests.try_send(());
        }
    });
    Ok(receiver)
}

/// Resolves on the first SIGTERM or SIGINT; a second one exits at once
/// (also after a handover, when the proxy drains without having been asked).
async fn shutdown_signal(log_flush: LogFlush) {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    let (first, first_received) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut first = Some(first);
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            match first.take() {
                Some(first) => {
                    let _ = first.send(());
                }
                None => {
                    log_flush.now();
                    eprintln!("s3-failover-proxy: second signal, exiting now");
                    std::process::exit(130);
                }
            }
        }
    });
    let _ = first_received.await;
}
