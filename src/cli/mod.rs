//! The `ccpa-gateway` command: the server, the emulator, and commands for people at a terminal.

mod bulk;
mod calls;
mod json;
pub mod listen_addr;
mod output;
pub mod records;
mod serve;
mod source;
mod webhook_receiver;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::telemetry::{self, LogFormat};
use output::{CliError, Output};

/// Exit codes, so that scripts can tell outcomes apart without parsing messages.
pub mod exit_codes {
    /// Success.
    pub const OK: u8 = 0;
    /// Any failure without a code of its own.
    pub const FAILURE: u8 = 1;
    /// Bad flags or settings (clap uses 2 for its own usage errors as well).
    pub const USAGE: u8 = 2;
    /// The profile does not exist.
    pub const NOT_FOUND: u8 = 3;
    /// The gateway refused the input (INVALID_ARGUMENT).
    pub const INVALID_INPUT: u8 = 4;
    /// The gateway or Adobe Campaign could not be reached; retrying later may help.
    pub const UNAVAILABLE: u8 = 5;
    /// `records --overdue` found pending requests past the threshold.
    pub const OVERDUE: u8 = 6;
    /// `bulk-set-opt-out` finished, but some rows failed (see the results file).
    pub const SOME_ROWS_FAILED: u8 = 7;

    /// Every exit code with what it means, in order: `--help` lists them from here.
    pub const MEANINGS: [(u8, &str); 8] = [
        (OK, "success"),
        (FAILURE, "other failure"),
        (USAGE, "bad flags or settings"),
        (NOT_FOUND, "profile not found"),
        (INVALID_INPUT, "input refused (INVALID_ARGUMENT)"),
        (UNAVAILABLE, "gateway or Adobe Campaign unavailable"),
        (OVERDUE, "overdue opt-out requests (records --overdue)"),
        (SOME_ROWS_FAILED, "some rows failed (bulk-set-opt-out)"),
    ];

    /// The exit codes' part of `--help`, made from [`MEANINGS`].
    pub fn help() -> String {
        MEANINGS
            .iter()
            .fold(String::from("Exit codes:"), |help, (code, meaning)| {
                format!("{help}\n  {code}  {meaning}")
            })
    }
}

/// Reads and sets the CCPA opt-out of sale in Adobe Campaign Standard, over gRPC.
#[derive(Parser)]
#[command(name = "ccpa-gateway", version, after_help = exit_codes::help())]
pub struct Cli {
    /// Log format, on standard error.
    #[arg(long, env = "CCPA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC gateway.
    Serve(Box<crate::config::ServeSettings>),
    /// Run an Adobe Campaign emulator alone, for pointing a gateway (or anything else) at it.
    Emulator(serve::EmulatorArgs),
    /// Print a profile's opt-out, as JSON.
    GetOptOut(calls::GetOptOutArgs),
    /// Set a profile's opt-out and print what Adobe Campaign then holds, as JSON.
    SetOptOut(calls::SetOptOutArgs),
    /// Create a profile and print it, as JSON.
    CreateProfile(calls::CreateProfileArgs),
    /// Send a CSV file of opt-out requests to the gateway (columns: pkey or email, opt_out,
    /// source, received_at, request_id), with a progress bar, a summary and a results file.
    BulkSetOptOut(bulk::BulkArgs),
    /// Read the opt-out ledger: overdue requests, exports for auditors, pruning.
    Records(records::RecordsArgs),
    /// Follow the ledger's changes (WatchOptOutChanges), one JSON line each, resuming after the
    /// last one printed when the stream breaks.
    Watch(calls::WatchArgs),
    /// Receive the gateway's webhooks: verify each delivery's signature and print its event as
    /// a JSON line.
    WebhookReceiver(webhook_receiver::Args),
}

/// Parses the process's command line, runs the command, and says how it ended.
pub fn run() -> ExitCode {
    run_from(std::env::args_os())
}

/// Parses `args` (the program's name first) as the command line, runs the command, and says
/// how it ended.
pub fn run_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    ExitCode::from(finish(Cli::parse_from(args).run()))
}

/// Prints what a command ended with, its output or its failure, and gives its exit code: the
/// one place where commands' results are printed (but for lines streamed as they come, see
/// [`output`]).
fn finish(result: Result<Output, CliError>) -> u8 {
    result
        .and_then(Output::print)
        .unwrap_or_else(CliError::report)
}

impl Cli {
    /// Starts the runtime and telemetry, and runs the command.
    fn run(self) -> Result<Output, CliError> {
        let traces = match &self.command {
            Command::Serve(settings) => settings.observability.traces().map_err(CliError::usage)?,
            // Commands that call the gateway once trace nothing.
            _ => telemetry::TraceSettings::default(),
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| CliError::failure(format!("cannot start the async runtime: {e}")))?;
        runtime.block_on(async {
            // Inside the runtime: the OTLP exporter runs on it.
            let _telemetry = telemetry::init(self.log_format, &traces).map_err(CliError::usage)?;
            self.command.run().await
        })
    }
}

/// tokio's variable for the number of worker threads of a runtime.
pub const WORKER_THREADS: &str = "TOKIO_WORKER_THREADS";

impl Command {
    async fn run(self) -> Result<Output, CliError> {
        match self {
            Command::Serve(settings) => serve::serve(*settings).await,
            Command::Emulator(args) => serve::emulator(args).await,
            Command::GetOptOut(args) => calls::get_opt_out(args).await,
            Command::SetOptOut(args) => calls::set_opt_out(args).await,
            Command::CreateProfile(args) => calls::create_profile(args).await,
            Command::BulkSetOptOut(args) => bulk::run(args).await,
            Command::Records(args) => records::run(args).await,
            Command::Watch(args) => calls::watch(args).await,
            Command::WebhookReceiver(args) => webhook_receiver::run(args).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::exit_codes::{self, MEANINGS};

    #[test]
    fn the_exit_codes_are_0_to_7_and_the_help_lists_each_with_its_meaning() {
        let codes: Vec<u8> = MEANINGS.iter().map(|(code, _)| *code).collect();
        assert_eq!(codes, (0..=7).collect::<Vec<u8>>());
        let help = exit_codes::help();
        let lines: Vec<&str> = help.lines().collect();
        assert_eq!(lines.len(), 9, "{help}");
        assert_eq!(lines[0], "Exit codes:");
        assert_eq!(lines[1], "  0  success");
        assert_eq!(lines[6], "  5  gateway or Adobe Campaign unavailable");
        assert_eq!(lines[8], "  7  some rows failed (bulk-set-opt-out)");
    }
}
