//! The emulator and the gateway as separate processes (this binary, run as `emulator` and
//! `serve`), and what `/proc` says about them and about a PostgreSQL server on this machine.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A child process of the benchmark.
pub struct Process {
    child: Child,
    pid: i32,
}

/// CPU time and memory of a process, read from `/proc`.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// User plus system CPU time.
    pub cpu: Duration,
    /// Peak resident set size (VmHWM), in bytes.
    pub peak_rss: u64,
}

/// Reads a process's CPU time and peak RSS.
pub fn usage(pid: i32) -> Result<Usage, String> {
    let process = procfs::process::Process::new(pid).map_err(|e| format!("/proc/{pid}: {e}"))?;
    let stat = process
        .stat()
        .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    let status = process
        .status()
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    let ticks = procfs::ticks_per_second().max(1);
    let cpu_ticks = stat.utime + stat.stime;
    Ok(Usage {
        cpu: Duration::from_secs_f64(cpu_ticks as f64 / ticks as f64),
        peak_rss: status.vmhwm.unwrap_or(0) * 1024,
    })
}

/// CPU time the PostgreSQL server of this machine has used so far: the user and system time
/// of every process whose command is `postgres` (the postmaster, its backends and its helper
/// processes), each with that of its children it has reaped. Between two readings the difference
/// holds every backend that ran in between: one started since counts from nothing, and one that
/// exits moves its time into the postmaster's reaped children's. (A backend that ends while the
/// processes are being read may be missed in that reading.) `None` when no such process is
/// visible here.
pub fn postgres_server_cpu() -> Result<Option<Duration>, String> {
    let processes = procfs::process::all_processes().map_err(|e| format!("/proc: {e}"))?;
    let mut ticks = 0u64;
    let mut seen = false;
    for process in processes {
        // A process that ends while /proc is read is skipped: its time, once reaped, is its
        // parent's.
        let Ok(stat) = process.and_then(|process| process.stat()) else {
            continue;
        };
        if stat.comm != "postgres" {
            continue;
        }
        seen = true;
        let reaped = u64::try_from(stat.cutime.saturating_add(stat.cstime)).unwrap_or(0);
        ticks = ticks
            .saturating_add(stat.utime)
            .saturating_add(stat.stime)
            .saturating_add(reaped);
    }
    let per_second = procfs::ticks_per_second().max(1);
    Ok(seen.then(|| Duration::from_secs_f64(ticks as f64 / per_second as f64)))
}

impl Process {
    /// The process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Asks the process to stop (SIGTERM) and waits for it.
    pub async fn stop(mut self) {
        // The child has not been waited for, so its pid cannot have been reused.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

fn this_binary() -> Result<std::path::PathBuf, String> {
    std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))
}

fn pid_of(child: &Child) -> Result<i32, String> {
    child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .ok_or_else(|| "the child process has no pid".to_owned())
}

/// A command running this binary, with one worker thread unless the caller chose otherwise:
/// the load generator, the emulator and the gateway share the machine's cores.
pub fn this_binary_command() -> Result<Command, String> {
    let mut command = Command::new(this_binary()?);
    // `ccpa-bench gateway ...` is `ccpa-gateway ...` (see `main`).
    command.arg(crate::GATEWAY);
    if std::env::var_os(ccpa_gateway::cli::WORKER_THREADS).is_none() {
        command.env(ccpa_gateway::cli::WORKER_THREADS, "1");
    }
    Ok(command)
}

/// Starts an emulator with `latency` on every answer; returns it and its URL.
pub async fn start_emulator(latency: Duration) -> Result<(Process, String), String> {
    let mut child = this_binary_command()?
        .args([
            "emulator",
            "--listen",
            "127.0.0.1:0",
            "--no-record",
            "--latency",
        ])
        .arg(format!("{}ms", latency.as_millis()))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start the emulator: {e}"))?;
    let pid = pid_of(&child)?;
    let stdout = child.stdout.take().ok_or("the emulator has no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .map_err(|_| "the emulator did not start in 10 s")?
        .map_err(|e| format!("reading the emulator's output: {e}"))?
        .ok_or("the emulator exited")?;
    let url = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .ok_or("the emulator did not print its URL")?
        .to_owned();
    // Keep reading so that the emulator never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((Process { child, pid }, url))
}

/// Limits the gateway is started with.
#[derive(Debug, Clone, Copy)]
pub struct GatewayLimits {
    /// `--acs-max-in-flight`.
    pub max_in_flight: usize,
    /// Worker threads of the gateway's runtime; `None` leaves the default of one.
    pub worker_threads: Option<usize>,
    /// `RUST_LOG` of the gateway: `info` logs a line per call, as in production.
    pub log_filter: &'static str,
}

/// Starts a gateway in front of the emulator at `emulator_url`; returns it and its address.
/// `extra` arguments are given to `serve` (TLS, say).
pub async fn start_gateway(
    emulator_url: &str,
    ledger: &str,
    limits: GatewayLimits,
    extra: &[String],
) -> Result<(Process, SocketAddr), String> {
    use acs_emulator::EmulatorConfig;
    let mut command = this_binary_command()?;
    if let Some(threads) = limits.worker_threads {
        command.env(ccpa_gateway::cli::WORKER_THREADS, threads.to_string());
    }
    let addr_dir = tempfile::tempdir().map_err(|e| format!("cannot make a directory: {e}"))?;
    let addr_file = addr_dir.path().join("listen-addr");
    let mut child = command
        .args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0"])
        .arg("--listen-addr-file")
        .arg(&addr_file)
        .args(["--acs-max-rps", "1000000"])
        .args(["--acs-max-in-flight", &limits.max_in_flight.to_string()])
        .args(["--acs-max-queued", "1000000"])
        .args(["--ledger", ledger])
        .args(extra)
        .env("CCPA_ACS_BASE_URL", emulator_url)
        .env("CCPA_ACS_TENANT", EmulatorConfig::DEFAULT_TENANT)
        .env("CCPA_ACS_API_KEY", EmulatorConfig::DEFAULT_API_KEY)
        .env(
            "CCPA_ACS_ACCESS_TOKEN",
            EmulatorConfig::DEFAULT_ACCESS_TOKEN,
        )
        .env("RUST_LOG", limits.log_filter)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start the gateway: {e}"))?;
    let pid = pid_of(&child)?;
    let stderr = child.stderr.take().ok_or("the gateway has no stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    // The gateway logs a line per call: read them (as a log collector would) and drop them.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let addr = ccpa_gateway::cli::listen_addr::wait(&addr_file, Duration::from_secs(10)).await?;
    Ok((Process { child, pid }, addr))
}

/// Starts a webhook receiver (`webhook-receiver`, which verifies every signature) on loopback
/// with the secret in `secret_file`; returns it, its address, and the count of deliveries it has
/// taken (one line each on its standard output).
pub async fn start_receiver(
    secret_file: &std::path::Path,
) -> Result<
    (
        Process,
        SocketAddr,
        std::sync::Arc<std::sync::atomic::AtomicU64>,
    ),
    String,
> {
    let addr_dir = tempfile::tempdir().map_err(|e| format!("cannot make a directory: {e}"))?;
    let addr_file = addr_dir.path().join("listen-addr");
    let mut child = this_binary_command()?
        .args(["webhook-receiver", "--listen", "127.0.0.1:0"])
        .arg("--listen-addr-file")
        .arg(&addr_file)
        .arg("--secret-file")
        .arg(secret_file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start a webhook receiver: {e}"))?;
    let pid = pid_of(&child)?;
    let stdout = child.stdout.take().ok_or("the receiver has no stdout")?;
    let delivered = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = delivered.clone();
    let mut lines = BufReader::new(stdout).lines();
    tokio::spawn(async move {
        while let Ok(Some(_)) = lines.next_line().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let addr = ccpa_gateway::cli::listen_addr::wait(&addr_file, Duration::from_secs(10)).await?;
    Ok((Process { child, pid }, addr, delivered))
}
