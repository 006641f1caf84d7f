//! A second real S3 backend: radosgw, Ceph's S3 gateway (the code s3gw runs),
//! with the same controls as [`super::S3Backend`].
//!
//! radosgw 16.2 cannot run without a RADOS cluster, so the first test of a
//! binary that asks for one brings up a one-node cluster (one `ceph-mon`, one
//! `ceph-osd` on a small sparse file-backed bluestore, no mgr, auth off, all on
//! 127.0.0.1; about 5 s) and every later test of that binary shares it. Each
//! [`RadosGw`] is its own `radosgw` process on its own port: SIGKILL it, freeze
//! it, restart it on the same port, and its objects are still there because
//! they live in the cluster. All gateways of a binary serve the same S3 user
//! (`ACCESS_KEY`) and so the same buckets: each test names its own.
//!
//! Everything lives in one directory under the system temp dir
//! (`s3fp-radosgw-*`, with the logs in `log/`). It is kept after the test
//! binary exits, so a failure can be read; the next run removes the
//! directories whose test binary is gone (a `lock` file each binary holds).
//!
//! Every Ceph process is forked by one thread that never ends, with
//! `PR_SET_PDEATHSIG = SIGKILL`: the kernel kills them when the test binary
//! exits, however it exits. The death signal fires when the forking *thread*
//! ends, hence a dedicated thread rather than the tests' own.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::{ACCESS_KEY, SECRET_KEY, free_port, http_status};

const INSTALL_HINT: &str = "install it with `apt-get install --no-install-recommends \
     radosgw ceph-mon ceph-osd ceph-common` (Debian/Ubuntu), or run `bash .ci/run`";

/// The programs the cluster and the gateway need, all from those packages.
const PROGRAMS: [&str; 6] = [
    "monmaptool",
    "ceph-mon",
    "ceph-osd",
    "ceph",
    "radosgw-admin",
    "radosgw",
];

/// Name prefix of the cluster directories under the system temp dir.
const DIR_PREFIX: &str = "s3fp-radosgw-";

/// Pools radosgw would create on first use. Creating them with the cluster
/// keeps the first bucket and the first PUT of a test from taking a second
/// or more while the monitor makes a pool.
const POOLS: [&str; 7] = [
    ".rgw.root",
    "default.rgw.log",
    "default.rgw.control",
    "default.rgw.meta",
    "default.rgw.buckets.index",
    "default.rgw.buckets.data",
    "default.rgw.buckets.non-ec",
];

/// A radosgw process on 127.0.0.1 in front of the shared cluster.
pub struct RadosGw {
    pub address: SocketAddr,
    /// `client.rgw.<n>`: its own config name, so its own log and admin socket.
    name: String,
    cluster: &'static Cluster,
    child: Option<Child>,
    /// Settings of its own, as `--name value` pairs (`rgw_print_continue`).
    settings: Vec<(String, String)>,
}

impl RadosGw {
    /// Starts a radosgw on a free port (bringing up the shared cluster first
    /// if this is the binary's first) and waits until it answers S3.
    pub async fn start() -> anyhow::Result<RadosGw> {
        RadosGw::start_with(&[]).await
    }

    /// [`RadosGw::start`] with settings of its own (`("rgw_print_continue",
    /// "false")`), kept across restarts.
    pub async fn start_with(settings: &[(&str, &str)]) -> anyhow::Result<RadosGw> {
        let mut gateway = RadosGw::stopped().await?;
        gateway.settings = settings
            .iter()
            .map(|(name, value)| (format!("--{name}"), (*value).to_owned()))
            .collect();
        gateway.restart().await?;
        Ok(gateway)
    }

    /// A gateway with an address and the shared cluster but no process yet.
    pub async fn stopped() -> anyhow::Result<RadosGw> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let cluster = tokio::task::spawn_blocking(Cluster::shared)
            .await?
            .map_err(anyhow::Error::msg)?;
        Ok(RadosGw {
            address: SocketAddr::from(([127, 0, 0, 1], free_port())),
            name: format!("client.rgw.gw{}", NEXT.fetch_add(1, Ordering::Relaxed)),
            cluster,
            child: None,
            settings: Vec::new(),
        })
    }

    /// Moves a stopped gateway to another loopback IP, same port and data
    /// (a rescheduled pod: new IP, same volume).
    pub fn move_to(&mut self, ip: &str) {
        assert!(self.child.is_none(), "stop radosgw before moving it");
        self.address = SocketAddr::new(ip.parse().unwrap(), self.address.port());
    }

    /// Starts the process (again) on the same port, in front of the same cluster.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.spawn()?;
        self.wait_serving(Duration::from_secs(30)).await
    }

    /// Starts the process without waiting for it to serve.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        assert!(self.child.is_none(), "radosgw already running");
        let mut command = Command::new("radosgw");
        command
            .arg("--conf")
            .arg(&self.cluster.conf)
            .args(["-f", "-n", &self.name])
            // Beast's header and idle limits written out at their 16.2
            // defaults, so that what the tests meet is what a default
            // deployment does.
            .arg("--rgw_frontends")
            .arg(format!(
                "beast endpoint={} max_header_size=16384 request_timeout_ms=65000",
                self.address
            ));
        for (name, value) in &self.settings {
            command.arg(name).arg(value);
        }
        let output = self.cluster.output_file(&format!("{}.out", self.name))?;
        command
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output);
        let child = spawn_tied(command)
            .with_context(|| format!("starting radosgw ({})", installed_or_hint("radosgw")))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the process answers HTTP (it listens only once its store
    /// is ready), failing early if it exits.
    pub async fn wait_serving(&mut self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let child = self.child.as_mut().expect("radosgw started");
            if let Some(status) = child.try_wait()? {
                self.child = None;
                bail!(
                    "radosgw {} exited ({status}) before serving; see {}",
                    self.name,
                    self.log_path().display()
                );
            }
            if http_status(self.address, "HEAD", "/").await.is_some() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "radosgw {} did not answer on {} within {limit:?}; see {}",
                    self.name,
                    self.address,
                    self.log_path().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGKILL, as a crash: no clean shutdown, connections reset.
    pub fn kill9(&mut self) {
        super::kill_now(&mut self.child);
    }

    /// SIGSTOP: the process keeps its socket but answers nothing (a hang).
    pub fn freeze(&self) {
        super::stop_process(self.child.as_ref().expect("radosgw running"));
    }

    /// SIGCONT after [`RadosGw::freeze`].
    pub fn thaw(&self) {
        super::send_signal(self.child.as_ref().expect("radosgw running"), "-CONT");
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// radosgw's own log (one request line each, errors), kept after the run.
    fn log_path(&self) -> PathBuf {
        self.cluster
            .dir
            .join("log")
            .join(format!("{}.log", self.name))
    }
}

impl Drop for RadosGw {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(child.id().to_string())
                .status();
        }
        self.kill9();
    }
}

/// The one-node Ceph cluster the radosgw processes of this test binary share.
struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
    /// Locked for as long as this binary lives: a later run removes the
    /// directory only once it can take the lock.
    _lock: File,
    /// ceph-mon and ceph-osd; the kernel kills them when the binary exits.
    daemons: Mutex<Vec<(&'static str, Child)>>,
}

impl Cluster {
    /// The binary's cluster, brought up by the first caller (the others wait
    /// for it). A failed bring-up is remembered, so every test reports it
    /// instead of each trying again for 20 s.
    fn shared() -> Result<&'static Cluster, String> {
        static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
        CLUSTER
            .get_or_init(|| Cluster::bring_up().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(Clone::clone)
    }

    fn bring_up() -> anyhow::Result<Cluster> {
        for program in PROGRAMS {
            if find_on_path(program).is_none() {
                bail!("{program} is not on PATH: {INSTALL_HINT}");
            }
        }
        remove_stale_dirs();
        let (dir, lock) = fresh_dir()?;
        for sub in ["run", "log", "mon", "osd/0", "crash"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        let (mon_v2, mon_v1) = (free_port(), free_port());
        let mon_addrs = format!("[v2:127.0.0.1:{mon_v2},v1:127.0.0.1:{mon_v1}]");
        let fsid = new_uuid()?;
        let conf = dir.join("ceph.conf");
        fs::write(&conf, ceph_conf(&dir, &fsid, &mon_addrs))?;
        let cluster = Cluster {
            dir,
            conf,
            _lock: lock,
            daemons: Mutex::new(Vec::new()),
        };
        cluster
            .try_bring_up(&fsid, &mon_addrs)
            .with_context(|| format!("bringing up Ceph in {}", cluster.dir.display()))?;
        Ok(cluster)
    }

    fn try_bring_up(&self, fsid: &str, mon_addrs: &str) -> anyhow::Result<()> {
        let quick = Duration::from_secs(30);
        let monmap = self.dir.join("monmap").display().to_string();
        self.run(
            "monmaptool",
            &[
                "--create", "--fsid", fsid, "--addv", "a", mon_addrs, &monmap,
            ],
            None,
            quick,
        )?;
        // `-f` for --mkfs too: in the background a daemon forks, and the
        // fork would not inherit the parent-death signal.
        self.run(
            "ceph-mon",
            &["-f", "--mkfs", "-i", "a", "--monmap", &monmap],
            None,
            quick,
        )?;
        self.start_daemon("mon.a", "ceph-mon", &["-i", "a"])?;
        let osd_uuid = new_uuid()?;
        self.run("ceph", &["osd", "new", &osd_uuid], None, quick)?;
        self.run(
            "ceph-osd",
            &["-f", "--mkfs", "-i", "0", "--osd-uuid", &osd_uuid],
            None,
            Duration::from_secs(60),
        )?;
        self.start_daemon("osd.0", "ceph-osd", &["-i", "0"])?;
        // The monitor makes the pools while the OSD boots: one `ceph` run
        // reading its commands from stdin.
        let mut commands = String::new();
        for pool in POOLS {
            commands +=
                &format!("osd pool create {pool}\nosd pool application enable {pool} rgw\n");
        }
        self.run("ceph", &[], Some(&commands), quick)?;
        self.wait_osd_up(Duration::from_secs(60))?;
        self.run(
            "radosgw-admin",
            &[
                "user",
                "create",
                "--uid",
                "s3fp",
                "--display-name",
                "s3fp tests",
                "--access-key",
                ACCESS_KEY,
                "--secret-key",
                SECRET_KEY,
            ],
            None,
            Duration::from_secs(120),
        )?;
        Ok(())
    }

    /// Runs a Ceph tool to completion, its output in `log/<program>-<n>.out`;
    /// returns its stdout.
    fn run(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&str>,
        limit: Duration,
    ) -> anyhow::Result<String> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let stdout_path = self.dir.join("log").join(format!("{program}-{n}.out"));
        let stderr_path = stdout_path.with_extension("err");
        let mut command = Command::new(program);
        command
            .arg("--conf")
            .arg(&self.conf)
            .args(args)
            .stdout(File::create(&stdout_path)?)
            .stderr(File::create(&stderr_path)?);
        match stdin {
            Some(text) => {
                let input = stdout_path.with_extension("in");
                fs::write(&input, text)?;
                command.stdin(File::open(&input)?);
            }
            None => {
                command.stdin(Stdio::null());
            }
        }
        let what = format!("{program} {}", args.join(" "));
        let mut child = spawn_tied(command).with_context(|| format!("starting {what}"))?;
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "`{what}` did not finish within {limit:?}; see {}{}",
                    stderr_path.display(),
                    self.daemon_report()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if !status.success() {
            bail!(
                "`{what}` failed ({status}): {}{}",
                fs::read_to_string(&stderr_path).unwrap_or_default().trim(),
                self.daemon_report()
            );
        }
        Ok(fs::read_to_string(&stdout_path)?)
    }

    /// Starts a daemon in the foreground, its stray output in `log/<name>.out`
    /// (its log proper goes to `log/<name>.log`).
    fn start_daemon(&self, name: &'static str, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let output = self.output_file(&format!("{name}.out"))?;
        let mut command = Command::new(program);
        command
            .arg("--conf")
            .arg(&self.conf)
            .arg("-f")
            .args(args)
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output);
        let child = spawn_tied(command).with_context(|| format!("starting {program}"))?;
        self.daemons.lock().unwrap().push((name, child));
        Ok(())
    }

    /// Waits until the monitor counts the OSD as up.
    fn wait_osd_up(&self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let stat = self.run(
                "ceph",
                &["osd", "stat", "--format", "json"],
                None,
                Duration::from_secs(30),
            )?;
            let stat: serde_json::Value = serde_json::from_str(&stat)
                .with_context(|| format!("`ceph osd stat` printed {stat:?}"))?;
            if stat["num_up_osds"] == 1 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the OSD was not up within {limit:?} ({stat}); see {}{}",
                    self.dir.join("log/osd.0.log").display(),
                    self.daemon_report()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Names the daemons that have exited, for an error message.
    fn daemon_report(&self) -> String {
        let mut report = String::new();
        for (name, child) in self.daemons.lock().unwrap().iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                report += &format!(
                    "; {name} exited ({status}), see {}",
                    self.dir.join("log").join(format!("{name}.log")).display()
                );
            }
        }
        report
    }

    /// A file in `log/` that a process's stdout and stderr append to.
    fn output_file(&self, name: &str) -> io::Result<File> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("log").join(name))
    }
}

/// The whole Ceph configuration: every path in `dir`, every address on 127.0.0.1.
fn ceph_conf(dir: &Path, fsid: &str, mon_addrs: &str) -> String {
    let dir = dir.display();
    format!(
        "\
[global]
fsid = {fsid}
mon_host = {mon_addrs}
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
# Auth is off: read no keyring from /etc/ceph.
keyring = /dev/null
run_dir = {dir}/run
admin_socket = {dir}/run/$name.asok
log_file = {dir}/log/$name.log
mon_cluster_log_file = {dir}/log/cluster.$channel.log
crash_dir = {dir}/crash
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
mon_allow_pool_size_one = true
osd_crush_chooseleaf_type = 0

[mon]
mon_data = {dir}/mon/$id
# Each pool creation waits for the next map proposal (1 s apart by
# default): 0.1 s brings the cluster up about 10 s sooner.
paxos_propose_interval = 0.1
# A test machine's disk may be over 95 % full (build caches): the monitor
# would refuse to start (ENOSPC) though the test needs a few MiB.
mon_data_avail_crit = 0
mon_data_avail_warn = 0

[osd]
osd_data = {dir}/osd/$id
osd_objectstore = bluestore
# A sparse 4 GiB file: keeps objects across an OSD restart, unlike memstore.
bluestore_block_create = true
bluestore_block_size = 4294967296
osd_max_object_name_len = 460
osd_max_object_namespace_len = 64
osd_memory_target = 1073741824

[client]
# radosgw 16.2 asks for a secure monitor connection even with auth off,
# and loops on `get_initial_auth_request returned -13` without this.
ms_mon_client_mode = crc secure
# With its metadata cache on, a radosgw tells every other radosgw of the
# cluster about each bucket it creates and waits for their answers; one
# killed with SIGKILL is waited for until the OSD drops its watch (30 s).
# Off, a SIGKILL costs the other gateways (and its own restart) nothing, as
# with a gateway that owns its store.
rgw_cache_enabled = false
# Path-style requests only (no rgw_dns_name), no quotas. Attribute limits
# at their 16.2 defaults (0: no limit of radosgw's own).
rgw_max_attr_size = 0
rgw_max_attr_name_len = 0
rgw_max_attrs_num_in_req = 0
"
    )
}

/// Spawns `command` from the thread that never ends, with SIGKILL as its
/// parent-death signal.
fn spawn_tied(command: Command) -> io::Result<Child> {
    type Request = (Command, mpsc::Sender<io::Result<Child>>);
    static SPAWNER: OnceLock<mpsc::Sender<Request>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (requests, incoming) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("ceph-spawner".into())
            .spawn(move || {
                // The sender lives in a static, so this loop never ends...
                for (mut command, reply) in incoming {
                    let _ = reply.send(spawn_dying_with_parent(&mut command));
                }
                // ...and if it did, the thread must still not.
                loop {
                    std::thread::park();
                }
            })
            .expect("spawning the Ceph process thread");
        requests
    });
    let (reply, answer) = mpsc::channel();
    let gone = || io::Error::other("the Ceph process thread is gone");
    spawner.send((command, reply)).map_err(|_| gone())?;
    answer.recv().map_err(|_| gone())?
}

fn spawn_dying_with_parent(command: &mut Command) -> io::Result<Child> {
    let parent = std::process::id();
    // SAFETY: the hook runs between fork and exec and only makes
    // async-signal-safe system calls; it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The test binary died before the prctl: no signal will come.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    command.spawn()
}

/// A new directory `s3fp-radosgw-*` under the temp dir with its `lock` held.
/// The lock is taken before the directory gets its final name, so another
/// run's [`remove_stale_dirs`] never sees it unlocked.
fn fresh_dir() -> anyhow::Result<(PathBuf, File)> {
    let staging = tempfile::Builder::new()
        .prefix(".s3fp-radosgw-new-")
        .tempdir()?;
    let lock = File::create(staging.path().join("lock"))?;
    lock.try_lock()
        .map_err(|e| anyhow::anyhow!("locking {}: {e}", staging.path().display()))?;
    let suffix = staging.path().file_name().unwrap().to_string_lossy()
        [".s3fp-radosgw-new-".len()..]
        .to_owned();
    let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{suffix}"));
    fs::rename(staging.keep(), &dir)?;
    Ok((dir, lock))
}

/// Removes the cluster directories of earlier test binaries that have exited
/// (their lock is free; their daemons died with them).
fn remove_stale_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(DIR_PREFIX) {
            continue;
        }
        let Ok(lock) = File::open(entry.path().join("lock")) else {
            continue;
        };
        if lock.try_lock().is_ok() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

fn new_uuid() -> io::Result<String> {
    Ok(fs::read_to_string("/proc/sys/kernel/random/uuid")?
        .trim()
        .to_owned())
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}

/// Where `program` is, or how to install it.
fn installed_or_hint(program: &str) -> String {
    match find_on_path(program) {
        Some(path) => path.display().to_string(),
        None => format!("{program} is not on PATH: {INSTALL_HINT}"),
    }
}
