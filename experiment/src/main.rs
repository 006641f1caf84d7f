//! `s3-outage-experiment`: `run` against any S3 endpoint, or `demo` locally
//! (a real S3 backend process, the proxy in front, restarts every few seconds,
//! the same workload straight against the backend for comparison).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use s3_failover_proxy::backend_address::BackendAddress;
use s3_outage_experiment::runner::{self, BackendProcess, Restarts, Trigger, Workload};

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Run the workload against an endpoint while the backend restarts.
    Run(Box<RunArgs>),
    /// Local demo: backend process, proxy, restarts; through the proxy and direct.
    Demo(DemoArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// S3 endpoint, e.g. http://127.0.0.1:8080
    #[arg(long)]
    endpoint: String,
    #[arg(long, default_value = "outage-experiment")]
    bucket: String,
    /// Create the bucket first.
    #[arg(long)]
    create_bucket: bool,
    #[arg(long, env = "AWS_ACCESS_KEY_ID")]
    access_key: String,
    #[arg(long, env = "AWS_SECRET_ACCESS_KEY")]
    secret_key: String,
    #[arg(long, default_value = "us-east-1")]
    region: String,
    /// Time between operations.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Object size in bytes.
    #[arg(long, default_value_t = 4096)]
    size: usize,
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Every Nth operation is a GET of the previous object.
    #[arg(long)]
    get_every: Option<usize>,
    /// Backend command to run and restart, e.g. "s3s-fs --port 7480 /data".
    #[arg(long)]
    backend_command: Option<String>,
    /// Signal that takes the local backend down.
    #[arg(long, default_value = "KILL")]
    signal: String,
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    downtime: Duration,
    /// Instead of a local process: a command that restarts the backend.
    #[arg(long, conflicts_with = "backend_command")]
    restart_command: Option<String>,
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    restart_every: Duration,
    /// Backend address probed to time frontend-up after each restart.
    #[arg(long)]
    probe_address: Option<String>,
    /// Label of this run in the charts.
    #[arg(long, default_value = "run")]
    label: String,
    /// Output prefix: <prefix>_stats.json, _rtt.svg, _percentiles.svg.
    #[arg(long, default_value = "results/run")]
    out: PathBuf,
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Length of each of the two runs.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long, default_value = "4s", value_parser = humantime::parse_duration)]
    restart_every: Duration,
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    downtime: Duration,
    #[arg(long, default_value = "target/demo")]
    out: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Mode::Run(args) => run(*args).await,
        Mode::Demo(args) => demo(args).await,
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let s3 = runner::s3_client(
        &args.endpoint,
        &args.access_key,
        &args.secret_key,
        &args.region,
    );
    let probe = args
        .probe_address
        .as_deref()
        .map(str::parse::<BackendAddress>)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let trigger = match (&args.backend_command, &args.restart_command) {
        (Some(command), _) => {
            let mut backend =
                BackendProcess::new(command.split_whitespace().map(str::to_owned).collect());
            backend.start()?;
            if let Some(address) = &probe {
                runner::wait_frontend_up(address, Duration::from_secs(60))
                    .await
                    .context("backend did not start")?;
            }
            Trigger::Local {
                backend,
                signal: args.signal.clone(),
                downtime: args.downtime,
            }
        }
        (None, Some(command)) => Trigger::Command(command.clone()),
        (None, None) => Trigger::None,
    };
    if args.create_bucket {
        s3.create_bucket()
            .bucket(&args.bucket)
            .send()
            .await
            .context("creating the bucket")?;
    }
    let workload = Workload {
        bucket: args.bucket.clone(),
        interval: args.interval,
        size: args.size,
        duration: args.duration,
        get_every: args.get_every,
    };
    let restarts = Restarts {
        trigger,
        every: args.restart_every,
        probe,
    };
    let stats = runner::run(&args.label, &s3, &workload, restarts, true).await?;
    runner::write_results(&stats, &args.out)?;
    println!("{}", runner::summary(&stats));
    println!(
        "results: {}_{{stats.json,rtt.svg,percentiles.svg}}",
        args.out.display()
    );
    Ok(())
}

const DEMO_KEY: &str = "demo-access-key";
const DEMO_SECRET: &str = "demo-secret-key-0123456789";

/// The S3 backend binary: S3S_FS_BIN, the copy `demo.sh` installs, or PATH.
fn s3s_fs() -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var("S3S_FS_BIN") {
        return Ok(PathBuf::from(path));
    }
    let cached = PathBuf::from(std::env::var("HOME").unwrap_or_default())
        .join(".cache/s3fp/tools/bin/s3s-fs");
    if cached.exists() {
        return Ok(cached);
    }
    if Command::new("s3s-fs").arg("--version").output().is_ok() {
        return Ok(PathBuf::from("s3s-fs"));
    }
    bail!("the demo backend s3s-fs is not installed: run `bash demo.sh`, which installs it")
}

use std::process::Command;

fn backend_command(binary: &std::path::Path, port: u16, data: &std::path::Path) -> Vec<String> {
    [
        binary.display().to_string(),
        "--host".into(),
        "127.0.0.1".into(),
        "--port".into(),
        port.to_string(),
        "--access-key".into(),
        DEMO_KEY.into(),
        "--secret-key".into(),
        DEMO_SECRET.into(),
        data.display().to_string(),
    ]
    .into()
}

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let binary = s3s_fs()?;
    let data = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let address: BackendAddress = format!("127.0.0.1:{port}")
        .parse()
        .map_err(anyhow::Error::msg)?;
    let mut backend = BackendProcess::new(backend_command(&binary, port, data.path()));
    backend.start()?;
    runner::wait_frontend_up(&address, Duration::from_secs(30))
        .await
        .context("the backend did not start")?;

    let config =
        s3_failover_proxy::Config::parse(&format!("[backend]\naddress = \"{address}\"\n"))?;
    let s3_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let proxy_endpoint = format!("http://{}", s3_listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let listeners = s3_failover_proxy::Listeners::new(s3_listener, None, admin);
    let proxy = tokio::spawn(s3_failover_proxy::run(listeners, config, async move {
        let _ = stopped.await;
    }));

    let workload = Workload {
        bucket: "demo".into(),
        interval: Duration::from_millis(100),
        size: 4096,
        duration: args.duration,
        get_every: None,
    };
    let through_proxy = runner::s3_client(&proxy_endpoint, DEMO_KEY, DEMO_SECRET, "us-east-1");
    through_proxy.create_bucket().bucket("demo").send().await?;
    let restarts = |backend| Restarts {
        trigger: Trigger::Local {
            backend,
            signal: "KILL".into(),
            downtime: args.downtime,
        },
        every: args.restart_every,
        probe: Some(address.clone()),
    };
    println!(
        "PutObject every 100 ms for {:?}, the S3 backend SIGKILLed every {:?} and restarted after {:?}.\n",
        args.duration, args.restart_every, args.downtime
    );
    println!("1/2 through s3-failover-proxy ({proxy_endpoint}):");
    let proxied = runner::run(
        "through the proxy",
        &through_proxy,
        &workload,
        restarts(backend),
        true,
    )
    .await?;

    let mut backend = BackendProcess::new(backend_command(&binary, port, data.path()));
    backend.start()?;
    runner::wait_frontend_up(&address, Duration::from_secs(30))
        .await
        .context("the backend did not restart")?;
    println!("\n2/2 straight to the backend (http://{address}):");
    let direct_client = runner::s3_client(
        &format!("http://{address}"),
        DEMO_KEY,
        DEMO_SECRET,
        "us-east-1",
    );
    let direct = runner::run("direct", &direct_client, &workload, restarts(backend), true).await?;

    runner::write_results(&proxied, &args.out.join("proxy"))?;
    runner::write_results(&direct, &args.out.join("direct"))?;
    s3_outage_experiment::chart::percentiles_svg(
        &[&proxied, &direct],
        &args.out.join("compare_percentiles.svg"),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let _ = stop.send(());
    let _ = proxy.await;

    println!("\nSummary");
    println!("  {}", runner::summary(&proxied));
    println!("  {}", runner::summary(&direct));
    println!(
        "\nCharts and stats in {}/: proxy_rtt.svg, direct_rtt.svg, compare_percentiles.svg, *_stats.json",
        args.out.display()
    );
    Ok(())
}
