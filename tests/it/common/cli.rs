//! Running the `ccpa-gateway` command as a person or a script would: every test that runs it
//! builds it with [`ccpa_gateway`], and one that waits for its end reads it through [`Outcome`].

use std::time::Duration;

use serde_json::Value;
use tokio::process::Command;

/// The `ccpa-gateway` binary, without the test's own `RUST_LOG` (a test sets the filter it
/// wants), killed if the test drops it; the caller adds the arguments, and spawns it or
/// [`run`]s it.
pub fn ccpa_gateway() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ccpa-gateway"));
    command.env_remove("RUST_LOG").kill_on_drop(true);
    command
}

/// How a command ended.
pub struct Outcome {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    /// Standard output, one JSON value.
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {:?} / {:?}",
                self.stdout, self.stderr
            )
        })
    }
}

/// Runs `command` to its end, a minute at the most, and says how it ended.
pub async fn run(command: &mut Command) -> Outcome {
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("the command ends within a minute")
        .unwrap();
    Outcome {
        code: output.status.code().expect("exited, not killed"),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}
