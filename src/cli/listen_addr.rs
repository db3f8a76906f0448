//! `serve --listen-addr-file`: the address the gateway bound, written to a file once it listens,
//! for whatever starts it on port 0 (tests, the benchmark, a supervisor) to read, instead of
//! parsing its logs.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

/// Writes `addr` to `path` whole or not at all: to a file beside it, then renamed over it, so
/// that a reader never sees half an address.
pub fn write(path: &Path, addr: SocketAddr) -> std::io::Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    std::fs::write(&partial, format!("{addr}\n"))?;
    std::fs::rename(&partial, path)
}

/// Listens on `addr` and, when `file` is given, writes the address bound to it: what `serve` and
/// `webhook-receiver` do first. A failure names the flag (`listen_flag`, `file_flag`: each with
/// its variable) and stops the command as a bad setting.
pub(super) async fn listen(
    addr: SocketAddr,
    listen_flag: &str,
    file: Option<&Path>,
    file_flag: &str,
) -> Result<(tokio::net::TcpListener, SocketAddr), super::output::CliError> {
    use super::output::CliError;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| CliError::usage(format!("{listen_flag}: cannot listen on {addr}: {e}")))?;
    let bound = listener.local_addr().unwrap_or(addr);
    if let Some(path) = file {
        write(path, bound).map_err(|e| {
            CliError::usage(format!("{file_flag}: cannot write {}: {e}", path.display()))
        })?;
    }
    Ok((listener, bound))
}

/// Waits until `path` holds an address (written by [`write()`]), for at most `timeout`.
pub async fn wait(path: &Path, timeout: Duration) -> Result<SocketAddr, String> {
    let give_up = Instant::now() + timeout;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            return text
                .trim()
                .parse()
                .map_err(|e| format!("{} does not hold an address: {e}", path.display()));
        }
        if Instant::now() >= give_up {
            return Err(format!(
                "the gateway did not write its address to {} within {timeout:?}",
                path.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
