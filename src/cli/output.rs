//! What the commands print, and how a failure is told.
//!
//! Each command returns `Result<Output, CliError>`: what to print on standard output, or why it
//! failed with the exit code that says which way; `cli::run_from` prints either and exits with
//! its code, in one place (`cli::finish`). A command whose output is a stream of lines cannot
//! wait for its end: a watch never ends, and an export of a ledger must not be held in memory.
//! It writes each line as it comes through [`Lines`], the writer `finish` prints with too, and
//! returns [`Output::nothing`]. What is said to the person rather than printed as the output (a
//! summary, a resumed stream, an error) goes to standard error through [`note`].

use std::fmt::Display;
use std::io::{BufWriter, Stdout, Write};

use serde::Serialize;
use tonic::Code;

use super::exit_codes;
use super::json::{self, Printed};
use crate::client::Error;

/// What a command that ran to its end prints on standard output, and its exit code.
#[must_use]
pub(super) struct Output {
    text: Option<String>,
    exit: u8,
}

impl Output {
    /// Nothing more to print: the command printed its lines as they came, or has no output.
    pub(super) fn nothing() -> Self {
        Self {
            text: None,
            exit: exit_codes::OK,
        }
    }

    /// `text` as it is (a table for people).
    pub(super) fn text(text: String) -> Self {
        Self {
            text: Some(text),
            exit: exit_codes::OK,
        }
    }

    /// One JSON document, on one line.
    pub(super) fn json(value: &impl Serialize) -> Result<Self, CliError> {
        Ok(Self::text(to_json(value)?))
    }

    /// An answer of the API, in the proto3 JSON mapping (see [`json`]).
    pub(super) fn message<M: Printed>(message: &M) -> Result<Self, CliError> {
        Self::json(&twin(message)?)
    }

    /// Exits with `code`, though the command ran to its end: what it found is what a script
    /// must be told (overdue requests, rows that failed).
    pub(super) fn exit_with(self, code: u8) -> Self {
        Self { exit: code, ..self }
    }

    /// Prints the output and gives the exit code.
    pub(super) fn print(self) -> Result<u8, CliError> {
        if let Some(text) = self.text {
            print_now(&[text])?;
        }
        Ok(self.exit)
    }
}

/// Why a command failed: the exit code that says which way, and what to tell the person.
#[derive(Debug)]
pub(super) struct CliError {
    code: u8,
    /// Said as `error: {message}`; `None` when the failure was told as it happened (logged, for
    /// a long-running command's log).
    message: Option<String>,
    /// Said after the message, one indented line each (the fields a request was refused for).
    details: Vec<String>,
}

/// The message alone, for a failure told elsewhere than on standard error.
impl Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message.as_deref().unwrap_or("failed (see the log)"))
    }
}

impl CliError {
    /// A failure with exit code `code`.
    pub(super) fn new(code: u8, message: impl Display) -> Self {
        Self {
            code,
            message: Some(message.to_string()),
            details: Vec::new(),
        }
    }

    /// Bad flags or settings: `message` names the setting.
    pub(super) fn usage(message: impl Display) -> Self {
        Self::new(exit_codes::USAGE, message)
    }

    /// A failure without a code of its own.
    pub(super) fn failure(message: impl Display) -> Self {
        Self::new(exit_codes::FAILURE, message)
    }

    /// A failure the log has told already: only the exit code is left to give.
    pub(super) fn logged(code: u8) -> Self {
        Self {
            code,
            message: None,
            details: Vec::new(),
        }
    }

    /// Adds `details` below the message.
    pub(super) fn with_details(self, details: impl IntoIterator<Item = String>) -> Self {
        Self {
            details: self.details.into_iter().chain(details).collect(),
            ..self
        }
    }

    /// Tells the failure on standard error and gives the exit code.
    pub(super) fn report(self) -> u8 {
        if let Some(message) = &self.message {
            note(&format!("error: {message}"));
        }
        for detail in &self.details {
            note(&format!("  {detail}"));
        }
        self.code
    }
}

/// The flag (and variable) behind a setting of the library's builder.
fn flag_of(setting: &str) -> &'static str {
    match setting {
        "addr" => "--addr (CCPA_ADDR)",
        "tls_ca" => "--tls-ca (CCPA_CLIENT_TLS_CA)",
        "tls_identity" => "--tls-cert and --tls-key (CCPA_CLIENT_TLS_CERT, CCPA_CLIENT_TLS_KEY)",
        "caller" => "--caller (CCPA_CALLER)",
        "deadline" => "--timeout (CCPA_CALL_TIMEOUT)",
        _ => "a setting",
    }
}

/// A failure of the library client: a setting named by its flag, or the gateway's status with
/// the fields it refused, under the exit code of its kind.
impl From<Error> for CliError {
    fn from(error: Error) -> Self {
        let code = match &error {
            Error::Config { .. } => exit_codes::USAGE,
            error => match error.code() {
                Code::NotFound => exit_codes::NOT_FOUND,
                Code::InvalidArgument => exit_codes::INVALID_INPUT,
                Code::Unavailable | Code::DeadlineExceeded => exit_codes::UNAVAILABLE,
                _ => exit_codes::FAILURE,
            },
        };
        match error {
            Error::Config { setting, reason } => {
                Self::new(code, format!("{}: {reason}", flag_of(setting)))
            }
            error @ Error::Connect { .. } => Self::new(code, format!("UNAVAILABLE: {error}")),
            Error::Status {
                code: status,
                message,
                violations,
                ..
            } => Self::new(code, format!("{status:?}: {message}")).with_details(
                violations
                    .iter()
                    .map(|violation| format!("{}: {}", violation.field, violation.description)),
            ),
        }
    }
}

/// Says `line` on standard error: a summary, a resumed stream, an error.
pub(super) fn note(line: &str) {
    // Standard error closed: there is nowhere left to say it.
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// `message`'s twin, which prints in the proto3 JSON mapping.
fn twin<M: Printed>(message: &M) -> Result<M::Twin, CliError> {
    json::twin_of(message)
        .map_err(|e| CliError::failure(format!("cannot read the gateway's answer again: {e}")))
}

fn to_json(value: &impl Serialize) -> Result<String, CliError> {
    serde_json::to_string(value)
        .map_err(|e| CliError::failure(format!("cannot print the answer as JSON: {e}")))
}

/// Standard output, a line at a time.
pub(super) struct Lines {
    out: BufWriter<Stdout>,
    /// Each line flushed as it is written, for a reader that waits for it.
    flush_each: bool,
}

impl Lines {
    /// For lines someone waits for (a watch): each is written whole as soon as it is made.
    pub(super) fn flushed() -> Self {
        Self {
            out: BufWriter::new(std::io::stdout()),
            flush_each: true,
        }
    }

    /// For many lines at once (an export): written in blocks.
    pub(super) fn buffered() -> Self {
        Self {
            out: BufWriter::new(std::io::stdout()),
            flush_each: false,
        }
    }

    /// Writes `line` and a line end.
    pub(super) fn text(&mut self, line: &str) -> Result<(), CliError> {
        writeln!(self.out, "{line}").map_err(output_failed)?;
        if self.flush_each {
            self.out.flush().map_err(output_failed)?;
        }
        Ok(())
    }

    /// Writes `value` as a JSON line.
    pub(super) fn json(&mut self, value: &impl Serialize) -> Result<(), CliError> {
        self.text(&to_json(value)?)
    }

    /// Writes an answer of the API as a JSON line, in the proto3 JSON mapping.
    pub(super) fn message<M: Printed>(&mut self, message: &M) -> Result<(), CliError> {
        self.json(&twin(message)?)
    }

    /// Writes what is left: only then is every line known to be written.
    pub(super) fn finish(mut self) -> Result<(), CliError> {
        self.out.flush().map_err(output_failed)
    }
}

/// Writes `lines` on standard output, whole and now.
pub(super) fn print_now(lines: &[String]) -> Result<(), CliError> {
    let mut out = Lines::buffered();
    for line in lines {
        out.text(line)?;
    }
    out.finish()
}

/// A closed or full standard output ends the command: the output was not all written.
fn output_failed(error: std::io::Error) -> CliError {
    CliError::failure(format!(
        "the output could not all be written to standard output: {error}"
    ))
}
