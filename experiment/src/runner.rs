//! Running the experiment: the S3 workload (PutObject every N ms, SDK retries
//! off, optionally a GET mix), the restart trigger (kill a local backend
//! process with a chosen signal and start it again, or run a user command such
//! as `kubectl delete pod ...`), and frontend-up detection by probing the
//! backend address every few milliseconds.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use aws_sdk_s3::primitives::ByteStream;
use s3_failover_proxy::backend_address::BackendAddress;
use s3_failover_proxy::connector::Connector;
use s3_failover_proxy::probe::{ProbeSettings, probe_once};

use crate::stats::{Operation, Outage, Stats, summarize};

/// What the workload does.
#[derive(Debug, Clone)]
pub struct Workload {
    pub bucket: String,
    pub interval: Duration,
    pub size: usize,
    pub duration: Duration,
    /// Every Nth operation reads back the previous object instead of writing.
    pub get_every: Option<usize>,
}

/// A backend process the experiment kills and starts again.
pub struct BackendProcess {
    command: Vec<String>,
    child: Option<Child>,
}

impl BackendProcess {
    pub fn new(command: Vec<String>) -> BackendProcess {
        BackendProcess {
            command,
            child: None,
        }
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        let (program, args) = self
            .command
            .split_first()
            .context("empty backend command")?;
        let child = Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        self.child = Some(child);
        Ok(())
    }

    /// Sends `signal` (KILL, TERM...) and waits for the process to end.
    pub fn signal(&mut self, signal: &str) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()?;
        if !status.success() {
            bail!("kill -{signal} failed");
        }
        child.wait()?;
        Ok(())
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// How the backend is taken down.
pub enum Trigger {
    None,
    /// Signal a local process, wait `downtime`, start it again.
    Local {
        backend: BackendProcess,
        signal: String,
        downtime: Duration,
    },
    /// Run a command (e.g. `kubectl delete pod s3gw-0`); the platform restarts it.
    Command(String),
}

/// Restarts and where to watch for frontend-up.
pub struct Restarts {
    pub trigger: Trigger,
    pub every: Duration,
    /// Probed every 5 ms after each restart to time frontend-up.
    pub probe: Option<BackendAddress>,
}

/// Waits until `address` answers HTTP (any status but 502-504).
pub async fn wait_frontend_up(address: &BackendAddress, limit: Duration) -> Option<Instant> {
    let connector = Connector::plain(address.clone());
    let settings = ProbeSettings {
        interval: Duration::from_millis(5),
        timeout: Duration::from_millis(500),
        path: "/".into(),
    };
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if probe_once(&connector, &settings).await.is_ok() {
            return Some(Instant::now());
        }
        tokio::time::sleep(settings.interval).await;
    }
    None
}

fn ms_since(start: Instant, at: Instant) -> f64 {
    at.saturating_duration_since(start).as_secs_f64() * 1000.0
}

/// Number of the latest object whose PutObject succeeded, plus one (0: none yet).
type LastWritten = Arc<std::sync::atomic::AtomicUsize>;

async fn one_operation(
    s3: &aws_sdk_s3::Client,
    workload: &Workload,
    n: usize,
    last_written: &LastWritten,
) -> (String, Result<(), String>) {
    // Reads only objects known to be written, so a read never races its write.
    let readable = last_written.load(std::sync::atomic::Ordering::SeqCst);
    let read = readable > 0
        && workload
            .get_every
            .is_some_and(|k| k > 0 && n.is_multiple_of(k));
    if read {
        let result = s3
            .get_object()
            .bucket(&workload.bucket)
            .key(format!("exp-{:06}", readable - 1))
            .send()
            .await;
        let outcome = match result {
            Ok(output) => output
                .body
                .collect()
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(error) => Err(format!("{error:?}")),
        };
        ("get".into(), outcome)
    } else {
        let body = vec![(n % 251) as u8; workload.size];
        let result = s3
            .put_object()
            .bucket(&workload.bucket)
            .key(format!("exp-{n:06}"))
            .body(ByteStream::from(body))
            .send()
            .await;
        if result.is_ok() {
            last_written.fetch_max(n + 1, std::sync::atomic::Ordering::SeqCst);
        }
        (
            "put".into(),
            result.map(|_| ()).map_err(|e| format!("{e:?}")),
        )
    }
}

/// Runs the workload while the trigger restarts the backend; prints progress
/// each second when `progress` is set.
pub async fn run(
    label: &str,
    s3: &aws_sdk_s3::Client,
    workload: &Workload,
    mut restarts: Restarts,
    progress: bool,
) -> anyhow::Result<Stats> {
    let start = Instant::now();
    let operations: Arc<Mutex<Vec<Operation>>> = Arc::default();
    let outages: Arc<Mutex<Vec<Outage>>> = Arc::default();
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let last_written = LastWritten::default();

    let restart_loop = async {
        if matches!(restarts.trigger, Trigger::None) {
            return Ok::<(), anyhow::Error>(());
        }
        loop {
            tokio::time::sleep(restarts.every).await;
            if start.elapsed() + restarts.every / 2 >= workload.duration {
                return Ok(());
            }
            let down = Instant::now();
            match &mut restarts.trigger {
                Trigger::None => return Ok(()),
                Trigger::Local {
                    backend,
                    signal,
                    downtime,
                } => {
                    backend.signal(signal)?;
                    // The downtime is the experiment.
                    tokio::time::sleep(*downtime).await;
                    backend.start()?;
                }
                Trigger::Command(command) => {
                    let status = tokio::process::Command::new("sh")
                        .arg("-c")
                        .arg(&*command)
                        .status()
                        .await?;
                    if !status.success() {
                        bail!("restart command failed: {command}");
                    }
                }
            }
            let up = match &restarts.probe {
                Some(address) => wait_frontend_up(address, Duration::from_secs(300)).await,
                None => None,
            };
            outages.lock().unwrap().push(Outage {
                down_ms: ms_since(start, down),
                frontend_up_ms: up.map(|at| ms_since(start, at)),
            });
        }
    };

    let workload_loop = async {
        let mut ticker = tokio::time::interval(workload.interval);
        let mut tasks = tokio::task::JoinSet::new();
        let mut n = 0;
        let mut last_report = Instant::now();
        while start.elapsed() < workload.duration {
            ticker.tick().await;
            let last_written = Arc::clone(&last_written);
            let (s3, workload_copy, done, waiting) = (
                s3.clone(),
                workload.clone(),
                Arc::clone(&operations),
                Arc::clone(&in_flight),
            );
            tasks.spawn(async move {
                waiting.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let began = Instant::now();
                let (kind, result) = one_operation(&s3, &workload_copy, n, &last_written).await;
                waiting.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                done.lock().unwrap().push(Operation {
                    kind,
                    start_ms: ms_since(start, began),
                    rtt_ms: began.elapsed().as_secs_f64() * 1000.0,
                    ok: result.is_ok(),
                    error: result.err(),
                });
            });
            n += 1;
            if progress && last_report.elapsed() >= Duration::from_secs(1) {
                last_report = Instant::now();
                let done = operations.lock().unwrap();
                let failed = done.iter().filter(|op| !op.ok).count();
                println!(
                    "  [{label}] t={:>4.1}s  requests={:<4} failed={:<3} waiting={:<3} outages={}",
                    start.elapsed().as_secs_f64(),
                    done.len(),
                    failed,
                    in_flight.load(std::sync::atomic::Ordering::SeqCst),
                    outages.lock().unwrap().len()
                );
            }
        }
        while tasks.join_next().await.is_some() {}
    };

    let (restarted, ()) = tokio::join!(restart_loop, workload_loop);
    restarted?;
    let mut operations = std::mem::take(&mut *operations.lock().unwrap());
    operations.sort_by(|a, b| a.start_ms.total_cmp(&b.start_ms));
    let outages = std::mem::take(&mut *outages.lock().unwrap());
    Ok(summarize(label, operations, outages))
}

/// An S3 client with retries off, path-style, for `endpoint`.
pub fn s3_client(
    endpoint: &str,
    access_key: &str,
    secret_key: &str,
    region: &str,
) -> aws_sdk_s3::Client {
    let credentials =
        aws_sdk_s3::config::Credentials::new(access_key, secret_key, None, None, "experiment");
    let config = aws_sdk_s3::Config::builder()
        .behavior_version_latest()
        .endpoint_url(endpoint)
        .region(aws_sdk_s3::config::Region::new(region.to_owned()))
        .credentials_provider(credentials)
        .force_path_style(true)
        .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
        .timeout_config(
            aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                .operation_timeout(Duration::from_secs(120))
                .build(),
        )
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// Writes `<prefix>_stats.json`, `<prefix>_rtt.svg` and `<prefix>_percentiles.svg`.
pub fn write_results(stats: &Stats, prefix: &std::path::Path) -> anyhow::Result<()> {
    if let Some(parent) = prefix.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let with_suffix = |suffix: &str| {
        let mut name = prefix.as_os_str().to_owned();
        name.push(suffix);
        std::path::PathBuf::from(name)
    };
    std::fs::write(
        with_suffix("_stats.json"),
        serde_json::to_vec_pretty(stats)?,
    )?;
    crate::chart::rtt_svg(stats, &with_suffix("_rtt.svg")).map_err(|e| anyhow::anyhow!("{e}"))?;
    crate::chart::percentiles_svg(&[stats], &with_suffix("_percentiles.svg"))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// A one-paragraph summary of a run.
pub fn summary(stats: &Stats) -> String {
    let p = |v: &Option<crate::stats::Percentiles>| {
        v.as_ref().map_or("-".into(), |p| {
            format!(
                "p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
                p.p50, p.p99, p.max
            )
        })
    };
    let up: Vec<String> = stats
        .outages
        .iter()
        .map(|o| {
            o.to_frontend_up_ms
                .map_or("never".into(), |t| format!("{t:.0} ms"))
        })
        .collect();
    format!(
        "{}: {} requests, {} failed; RTT {}; longest {:.0} ms; {} restarts (to frontend-up: {}); extra wait after frontend-up: {}",
        stats.label,
        stats.requests,
        stats.failed,
        p(&stats.rtt_ms),
        stats.longest_rtt_ms,
        stats.outages.len(),
        up.join(", "),
        p(&stats.extra_wait_after_frontend_up_ms),
    )
}
