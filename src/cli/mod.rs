//! The `ccpa-gateway` command: the server, the emulator, and commands for people at a terminal.

mod bulk;
mod calls;
pub mod listen_addr;
pub mod records;
mod serve;
mod source;
mod webhook_receiver;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::telemetry::{self, LogFormat};

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
}

const EXIT_CODES_HELP: &str = "\
Exit codes: 0 success, 1 other failure, 2 bad flags or settings, 3 profile not found,
4 input refused (INVALID_ARGUMENT), 5 gateway or Adobe Campaign unavailable,
6 overdue opt-out requests (records --overdue), 7 some rows failed (bulk-set-opt-out).";

/// Reads and sets the CCPA opt-out of sale in Adobe Campaign Standard, over gRPC.
#[derive(Parser)]
#[command(name = "ccpa-gateway", version, after_help = EXIT_CODES_HELP)]
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
    let cli = Cli::parse_from(args);
    let traces = match &cli.command {
        Command::Serve(settings) => match settings.observability.traces() {
            Ok(traces) => traces,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(exit_codes::USAGE);
            }
        },
        // Commands that call the gateway once trace nothing.
        _ => telemetry::TraceSettings::default(),
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    match runtime.build() {
        Ok(runtime) => ExitCode::from(runtime.block_on(async {
            // Inside the runtime: the OTLP exporter runs on it.
            let _telemetry = match telemetry::init(cli.log_format, &traces) {
                Ok(guard) => guard,
                Err(e) => {
                    eprintln!("error: {e}");
                    return exit_codes::USAGE;
                }
            };
            cli.command.run().await
        })),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::from(exit_codes::FAILURE)
        }
    }
}

/// tokio's variable for the number of worker threads of a runtime.
pub const WORKER_THREADS: &str = "TOKIO_WORKER_THREADS";

impl Command {
    async fn run(self) -> u8 {
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
