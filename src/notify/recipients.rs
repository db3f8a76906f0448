//! Who is told of consumer requests: the recipients file (`--recipients`), TOML.
//!
//! ```toml
//! [[recipient]]
//! id = "ad-platform-sync"
//! url = "https://sync.internal.example/ccpa"
//! secret_file = "/run/secrets/ad-platform-sync"   # Standard Webhooks secrets: whsec_ + base64
//! events = ["opt-out"]                           # "opt-out", "opt-in"
//! max_rps = 20
//! ```
//!
//! A file with no recipient is valid: nobody is told. An unknown key, an id used twice, a URL
//! that would carry personal data in clear, or a secret file that does not hold usable secrets
//! makes the whole file invalid; the error names the entry and the key, and never quotes a
//! secret (nor the TOML text: a mistyped line could be one).
//!
//! The secrets live in files of their own, so that they can be mounted from a secret store and
//! rotated without editing the list. [`watched_paths`] names them beside the list, so that a
//! watched value (`access::watched::Watched`, with [`load`] as its loader) reloads when either
//! changes.

use std::collections::HashSet;
use std::fmt;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use secrecy::{ExposeSecret, SecretSlice, SecretString};
use serde::Deserialize;

/// The highest `max_rps` a recipient may ask for.
pub const MAX_RPS: u32 = 10_000;

/// The shortest key (once decoded) a secret may hold: Standard Webhooks suggests 24 to 64
/// bytes.
pub const MIN_KEY_BYTES: usize = 24;

/// The longest key (once decoded) a secret may hold.
pub const MAX_KEY_BYTES: usize = 64;

/// What every Standard Webhooks secret starts with.
const SECRET_PREFIX: &str = "whsec_";

/// The longest recipient id: it becomes a metric label and a ledger column.
const MAX_ID_LEN: usize = 63;

/// The recipients in force. Empty when the file names none.
#[derive(Debug, Default)]
pub struct Recipients {
    /// In the order of the file.
    pub list: Vec<Recipient>,
}

impl Recipients {
    /// Parses a recipients file's text. Relative `secret_file` paths are resolved against
    /// `dir` (the file's own directory), and every secret file is read.
    pub fn parse(text: &str, dir: &Path) -> Result<Self, String> {
        let mut seen = HashSet::new();
        let mut list = Vec::new();
        for (label, entry) in entries(text)? {
            let recipient = entry.validate(&label, dir)?;
            if !seen.insert(recipient.id.clone()) {
                return Err(format!("{label}: id: used by an earlier entry"));
            }
            list.push(recipient);
        }
        Ok(Self { list })
    }

    /// The recipient with this id, if the file names it.
    pub fn get(&self, id: &str) -> Option<&Recipient> {
        self.list.iter().find(|recipient| recipient.id == id)
    }
}

/// One recipient of notifications.
pub struct Recipient {
    /// Its name in the ledger, the logs and the metrics' `recipient` label.
    pub id: String,
    /// Where notifications are POSTed: `https://`, or `http://` to a loopback address.
    pub url: url::Url,
    /// What every notification to it is signed with.
    pub secrets: Secrets,
    /// Whether it is told of opt-outs (`events` holds `"opt-out"`).
    pub opt_out: bool,
    /// Whether it is told of opt-ins (`events` holds `"opt-in"`).
    pub opt_in: bool,
    /// The most notifications per second it is sent.
    pub max_rps: NonZeroU32,
}

impl Recipient {
    /// Whether it asked to be told of a request that sets the opt-out to `opt_out`.
    pub fn wants(&self, opt_out: bool) -> bool {
        if opt_out { self.opt_out } else { self.opt_in }
    }
}

/// The URL is shown by its origin alone: a recipient may take a token in its path or query,
/// which would then be in every log line that prints a recipient.
impl fmt::Debug for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recipient")
            .field("id", &self.id)
            .field("url", &self.url.origin().ascii_serialization())
            .field("secrets", &self.secrets)
            .field("opt_out", &self.opt_out)
            .field("opt_in", &self.opt_in)
            .field("max_rps", &self.max_rps)
            .finish()
    }
}

/// Loads the recipients file, `paths[0]` (the loader of the watched files; the other paths,
/// the secret files of [`watched_paths`], are read through the list itself).
pub fn load(paths: &[PathBuf]) -> Result<Recipients, String> {
    let Some(path) = paths.first() else {
        return Err("no recipients file".into());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot be read ({e})", path.display()))?;
    Recipients::parse(&text, &base_dir(path)).map_err(|e| format!("{}: {e}", path.display()))
}

/// The recipients file at `file`, loaded, and reloaded when it or a secret file it names
/// changes (see [`watched_paths`]); the error says what is wrong, for start-up to stop on.
pub fn open(file: &Path) -> Result<crate::access::watched::Watched<Recipients>, String> {
    crate::access::watched::Watched::open("--recipients", watched_paths(file)?, load)
}

/// The files a watched recipients list depends on: `file` itself, then every secret file it
/// names (each once), so that a rotated secret is picked up as an edited list is.
///
/// The set is fixed when the watch starts: a secret file that a later edit of the list adds is
/// read with that edit, but its own later changes are seen only when the watch is opened again
/// (with this function called again).
pub fn watched_paths(file: &Path) -> Result<Vec<PathBuf>, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("{}: cannot be read ({e})", file.display()))?;
    let dir = base_dir(file);
    let mut paths = vec![file.to_path_buf()];
    for (_, entry) in entries(&text).map_err(|e| format!("{}: {e}", file.display()))? {
        let secret_file = dir.join(&entry.secret_file);
        if !paths.contains(&secret_file) {
            paths.push(secret_file);
        }
    }
    Ok(paths)
}

/// The directory relative secret files are found in: the list's own. (`Path::join` leaves an
/// absolute secret file as it is, and an empty directory leaves a relative one relative to the
/// working directory, as the list's own path was.)
fn base_dir(file: &Path) -> PathBuf {
    file.parent().map(Path::to_path_buf).unwrap_or_default()
}

/// The file's top level: the entries are kept as TOML values at first, so that an error in one
/// can name it by its id.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecipientsFile {
    #[serde(default)]
    recipient: Vec<toml::Value>,
}

/// One `[[recipient]]` entry, as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    id: String,
    url: String,
    secret_file: PathBuf,
    events: Vec<String>,
    /// Signed, so that a negative number gets this module's message rather than serde's.
    max_rps: i64,
}

/// Each entry with the label its errors carry: `recipient "<id>"` when the id is well formed,
/// else `[[recipient]] <n>` (counting from 1).
fn entries(text: &str) -> Result<Vec<(String, Entry)>, String> {
    let file: RecipientsFile = toml::from_str(text).map_err(|e| describe(text, &e))?;
    file.recipient
        .into_iter()
        .enumerate()
        .map(|(n, value)| {
            let label = match value.get("id").and_then(toml::Value::as_str) {
                Some(id) if well_formed_id(id) => format!("recipient \"{id}\""),
                _ => format!("[[recipient]] {}", n + 1),
            };
            let fault = field_at_fault(&value).map_or(String::new(), |key| format!("{key}: "));
            let entry = value
                .try_into::<Entry>()
                .map_err(|e| format!("{label}: {fault}{}", e.message().trim()))?;
            Ok((label, entry))
        })
        .collect()
}

/// The key of an entry whose value has the wrong type, if one has: serde's message for it
/// ("invalid type: string, expected i64") does not say which key it is.
fn field_at_fault(entry: &toml::Value) -> Option<&str> {
    let table = entry.as_table()?;
    table.iter().find_map(|(key, value)| {
        let value = value.clone();
        let fits = match key.as_str() {
            "id" | "url" => value.try_into::<String>().is_ok(),
            "secret_file" => value.try_into::<PathBuf>().is_ok(),
            "events" => value.try_into::<Vec<String>>().is_ok(),
            "max_rps" => value.try_into::<i64>().is_ok(),
            _ => true,
        };
        (!fits).then_some(key.as_str())
    })
}

/// A TOML error by its line and column, without the line itself.
fn describe(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim();
    match error.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message.to_owned(),
    }
}

/// `[a-z0-9][a-z0-9._-]{0,62}`: safe as a metric label, a log field and a file name.
fn well_formed_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    matches!(bytes.first(), Some(b'a'..=b'z' | b'0'..=b'9'))
        && bytes.len() <= MAX_ID_LEN
        && bytes
            .iter()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
}

impl Entry {
    fn validate(self, label: &str, dir: &Path) -> Result<Recipient, String> {
        if !well_formed_id(&self.id) {
            return Err(format!(
                "{label}: id: must be 1 to {MAX_ID_LEN} characters of a-z, 0-9, '.', '_' and \
                 '-', starting with a letter or digit"
            ));
        }
        let url = recipient_url(&self.url).map_err(|e| format!("{label}: url: {e}"))?;
        let (opt_out, opt_in) =
            events(&self.events).map_err(|e| format!("{label}: events: {e}"))?;
        let max_rps = u32::try_from(self.max_rps)
            .ok()
            .filter(|rps| *rps <= MAX_RPS)
            .and_then(NonZeroU32::new)
            .ok_or_else(|| format!("{label}: max_rps: must be 1 to {MAX_RPS}"))?;
        let secrets = Secrets::read(&dir.join(&self.secret_file))
            .map_err(|e| format!("{label}: secret_file: {e}"))?;
        Ok(Recipient {
            id: self.id,
            url,
            secrets,
            opt_out,
            opt_in,
            max_rps,
        })
    }
}

/// Checks a recipient's URL. The errors do not quote it: its path or query may hold a token.
fn recipient_url(text: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(text).map_err(|e| format!("not a URL ({e})"))?;
    match url.scheme() {
        "https" => {}
        // Notifications carry a consumer's key and request: in clear only on this machine.
        "http" if crate::transport::is_loopback(&url) => {}
        _ => {
            return Err(
                "must be an https:// URL (plain http:// is allowed to a loopback \
                        address only: 127.0.0.0/8, ::1 or localhost)"
                    .into(),
            );
        }
    }
    // Proxies and servers log request lines and URLs: credentials belong in the signature.
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not hold a user name or password".into());
    }
    Ok(url)
}

/// `events` as (opt-out, opt-in).
fn events(events: &[String]) -> Result<(bool, bool), String> {
    if events.is_empty() {
        return Err("must name at least one of \"opt-out\" and \"opt-in\"".into());
    }
    let (mut opt_out, mut opt_in) = (false, false);
    for event in events {
        let wanted = match event.as_str() {
            "opt-out" => &mut opt_out,
            "opt-in" => &mut opt_in,
            _ => return Err(format!("\"{event}\" is not \"opt-out\" or \"opt-in\"")),
        };
        if *wanted {
            return Err(format!("\"{event}\" appears twice"));
        }
        *wanted = true;
    }
    Ok((opt_out, opt_in))
}

/// The keys a recipient's notifications are signed with: one or more Standard Webhooks
/// secrets. Several are listed while a secret is rotated; every one of them signs, so that the
/// recipient may switch to the new one whenever it likes.
///
/// Never empty. The keys are wiped from memory when dropped, and never shown: `Debug` prints
/// `Secrets([redacted; 2])`.
pub struct Secrets(Vec<SecretSlice<u8>>);

impl Secrets {
    /// Parses a secret file's text: `whsec_` + standard base64 (a 24- to 64-byte key), one or
    /// more, separated by white space. The error says which secret is wrong, never what it
    /// holds.
    pub fn parse(text: &str) -> Result<Self, String> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let count = words.len();
        let mut keys = Vec::with_capacity(count);
        for (n, word) in words.into_iter().enumerate() {
            let which = if count == 1 {
                "the secret".to_owned()
            } else {
                format!("secret {} of {count}", n + 1)
            };
            let Some(encoded) = word.strip_prefix(SECRET_PREFIX) else {
                return Err(format!("{which} does not start with {SECRET_PREFIX}"));
            };
            // The decoder's own error would quote the offending character: a piece of the key.
            // Padding is required, as the reference libraries require it: a secret they
            // cannot read would be one the recipient cannot verify with.
            let key = SecretSlice::from(
                base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .map_err(|_| format!("{which} is not {SECRET_PREFIX} followed by base64"))?,
            );
            let len = key.expose_secret().len();
            if !(MIN_KEY_BYTES..=MAX_KEY_BYTES).contains(&len) {
                return Err(format!(
                    "{which} decodes to {len} bytes; {MIN_KEY_BYTES} to {MAX_KEY_BYTES} are \
                     required"
                ));
            }
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(format!(
                "holds no secret ({SECRET_PREFIX} followed by base64)"
            ));
        }
        Ok(Self(keys))
    }

    /// Reads and parses a secret file; the error names the file.
    pub fn read(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map(SecretString::from)
            .map_err(|e| format!("{}: cannot be read ({e})", path.display()))?;
        Self::parse(text.expose_secret()).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// How many secrets there are (at least one).
    pub fn count(&self) -> usize {
        self.0.len()
    }

    /// The decoded keys, in the file's order.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &[u8]> {
        self.0.iter().map(ExposeSecret::expose_secret)
    }
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secrets([redacted; {}])", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Standard Webhooks test vector's secret (24 bytes).
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    /// A 32-byte secret.
    const OTHER: &str = "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    /// A directory holding `good` (one secret) and `two` (two), and a recipients file written
    /// from `toml`; returns the directory and the load's result.
    fn load_text(toml: &str) -> (tempfile::TempDir, Result<Recipients, String>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("good"), format!("{SECRET}\n")).unwrap();
        std::fs::write(dir.path().join("two"), format!("{SECRET}\n  {OTHER}\n")).unwrap();
        let file = dir.path().join("recipients.toml");
        std::fs::write(&file, toml).unwrap();
        let loaded = load(&[file]);
        (dir, loaded)
    }

    fn entry(id: &str, url: &str) -> String {
        format!(
            "[[recipient]]\nid = \"{id}\"\nurl = \"{url}\"\nsecret_file = \"good\"\n\
             events = [\"opt-out\"]\nmax_rps = 20\n"
        )
    }

    fn error(toml: &str) -> String {
        let (_dir, loaded) = load_text(toml);
        match loaded {
            Ok(recipients) => panic!("loaded: {recipients:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn a_valid_file_loads_with_relative_secret_files_found_beside_it() {
        let (dir, loaded) = load_text(
            r#"
            [[recipient]]
            id = "ad-platform-sync"
            url = "https://sync.internal.example/ccpa?tenant=1"
            secret_file = "two"
            events = ["opt-out", "opt-in"]
            max_rps = 20

            [[recipient]]
            id = "warehouse.v2_a-b"
            url = "http://127.0.0.1:9000/hook"
            secret_file = "good"
            events = ["opt-in"]
            max_rps = 10000
            "#,
        );
        let recipients = loaded.unwrap();
        assert_eq!(recipients.list.len(), 2);
        let first = &recipients.list[0];
        assert_eq!(first.id, "ad-platform-sync");
        assert_eq!(
            first.url.as_str(),
            "https://sync.internal.example/ccpa?tenant=1"
        );
        assert_eq!(first.secrets.count(), 2);
        assert!(first.opt_out && first.opt_in && first.wants(true) && first.wants(false));
        assert_eq!(first.max_rps.get(), 20);
        let second = recipients.get("warehouse.v2_a-b").unwrap();
        assert!(!second.opt_out && second.opt_in && !second.wants(true));
        assert_eq!(second.max_rps.get(), MAX_RPS);
        assert!(recipients.get("nobody").is_none());

        // An absolute secret_file is taken as it is.
        let absolute = dir.path().join("good");
        let (_dir, loaded) = load_text(&entry("a", "https://a.example").replace(
            "secret_file = \"good\"",
            &format!("secret_file = \"{}\"", absolute.display()),
        ));
        assert_eq!(loaded.unwrap().list.len(), 1);
    }

    #[test]
    fn an_empty_file_names_nobody() {
        let (_dir, loaded) = load_text("# nobody yet\n");
        assert!(loaded.unwrap().list.is_empty());
    }

    #[test]
    fn errors_name_the_recipient_and_the_field() {
        let cases: &[(String, &str)] = &[
            (
                entry("a", "https://a.example").replace("max_rps = 20", "max_rps = 20\nsecret = 1"),
                "recipient \"a\": unknown field `secret`",
            ),
            (
                entry("a", "https://a.example").replace("max_rps = 20\n", ""),
                "recipient \"a\": missing field `max_rps`",
            ),
            (
                entry("", "https://a.example"),
                "[[recipient]] 1: id: must be",
            ),
            (
                entry("Ad", "https://a.example"),
                "[[recipient]] 1: id: must be",
            ),
            (
                entry("-a", "https://a.example"),
                "[[recipient]] 1: id: must be",
            ),
            (
                entry("a b", "https://a.example"),
                "[[recipient]] 1: id: must be",
            ),
            (
                entry(&"a".repeat(64), "https://a.example"),
                "[[recipient]] 1: id: must be",
            ),
            (
                entry("a", "https://a.example").replace("max_rps = 20", "max_rps = \"20\""),
                "recipient \"a\": max_rps: invalid type",
            ),
            (
                entry("a", "https://a.example").replace("[\"opt-out\"]", "\"opt-out\""),
                "recipient \"a\": events: invalid type",
            ),
            (
                "[[recipient]]\nid = 7\n".into(),
                "[[recipient]] 1: id: invalid type",
            ),
            (
                entry("a", "https://a.example") + &entry("a", "https://b.example"),
                "recipient \"a\": id: used by an earlier entry",
            ),
            (entry("a", "not a url"), "recipient \"a\": url: not a URL"),
            (
                entry("a", "http://sync.example/"),
                "recipient \"a\": url: must be an https:// URL",
            ),
            (
                entry("a", "ftp://127.0.0.1/"),
                "recipient \"a\": url: must be an https:// URL",
            ),
            (
                entry("a", "https://user:pw@a.example/"),
                "recipient \"a\": url: must not hold a user name or password",
            ),
            (
                entry("a", "https://user@a.example/"),
                "recipient \"a\": url: must not hold a user name or password",
            ),
            (
                entry("a", "https://a.example").replace("[\"opt-out\"]", "[]"),
                "recipient \"a\": events: must name at least one",
            ),
            (
                entry("a", "https://a.example")
                    .replace("[\"opt-out\"]", "[\"opt-out\", \"opt-out\"]"),
                "recipient \"a\": events: \"opt-out\" appears twice",
            ),
            (
                entry("a", "https://a.example").replace("[\"opt-out\"]", "[\"deleted\"]"),
                "recipient \"a\": events: \"deleted\" is not \"opt-out\" or \"opt-in\"",
            ),
            (
                entry("a", "https://a.example").replace("max_rps = 20", "max_rps = 0"),
                "recipient \"a\": max_rps: must be 1 to 10000",
            ),
            (
                entry("a", "https://a.example").replace("max_rps = 20", "max_rps = 10001"),
                "recipient \"a\": max_rps: must be 1 to 10000",
            ),
            (
                entry("a", "https://a.example").replace("max_rps = 20", "max_rps = -1"),
                "recipient \"a\": max_rps: must be 1 to 10000",
            ),
            (
                entry("a", "https://a.example").replace("\"good\"", "\"missing\""),
                "recipient \"a\": secret_file: ",
            ),
            (
                "[[recipients]]\nid = \"a\"\n".into(),
                "unknown field `recipients`",
            ),
        ];
        for (toml, expected) in cases {
            let error = error(toml);
            assert!(
                error.contains(expected),
                "{toml}\n gave {error:?}, expected it to contain {expected:?}"
            );
            assert!(error.contains("recipients.toml: "), "{error}");
        }
    }

    #[test]
    fn only_loopback_hosts_may_be_plain_http() {
        for url in [
            "http://127.0.0.1:8080/hook",
            "http://127.3.2.1/",
            "http://localhost:1/",
            "http://[::1]:9/x",
            "https://sync.example/ccpa",
        ] {
            assert!(recipient_url(url).is_ok(), "{url}");
        }
        for url in [
            "http://10.0.0.1/",
            "http://localhost.example/",
            "http://0.0.0.0/",
            "http://[::2]/",
            "ws://127.0.0.1/",
        ] {
            assert!(recipient_url(url).is_err(), "{url}");
        }
    }

    #[test]
    fn url_errors_do_not_quote_the_url() {
        let error = error(&entry("a", "http://sync.example/hook?token=s3cr3t-token"));
        assert!(!error.contains("s3cr3t"), "{error}");
        assert!(!error.contains("sync.example"), "{error}");
    }

    #[test]
    fn toml_syntax_errors_give_the_line_without_quoting_it() {
        let error = error("[[recipient]]\nid = \"a\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8\n");
        assert!(error.contains("line 3"), "{error}");
        assert!(!error.contains("MfKQ9r8"), "{error}");
    }

    #[test]
    fn secrets_are_parsed_and_checked_without_being_quoted() {
        assert_eq!(Secrets::parse(SECRET).unwrap().count(), 1);
        assert_eq!(
            Secrets::parse(&format!("\n{SECRET}\t{OTHER}\n"))
                .unwrap()
                .count(),
            2
        );
        let keys: Vec<usize> = Secrets::parse(&format!("{SECRET} {OTHER}"))
            .unwrap()
            .keys()
            .map(<[u8]>::len)
            .collect();
        assert_eq!(keys, [24, 32]);
        // 64 bytes is the most.
        let longest = format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode([7; 64])
        );
        assert!(Secrets::parse(&longest).is_ok());

        let cases = [
            ("", "holds no secret"),
            ("  \n ", "holds no secret"),
            (
                "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                "the secret does not start with whsec_",
            ),
            (
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLa!w",
                "the secret is not whsec_ followed by base64",
            ),
            // Padding left out.
            (
                "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8",
                "not whsec_ followed by base64",
            ),
            (
                "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRY=",
                "decodes to 23 bytes; 24 to 64",
            ),
            (
                &format!(
                    "whsec_{}",
                    base64::engine::general_purpose::STANDARD.encode([7; 65])
                ),
                "decodes to 65 bytes",
            ),
            (
                &format!("{SECRET} whsec_MfKQ9r8GKYqr!"),
                "secret 2 of 2 is not whsec_",
            ),
        ];
        for (text, expected) in cases {
            let error = Secrets::parse(text).unwrap_err();
            assert!(error.contains(expected), "{text:?} gave {error:?}");
            assert!(!error.contains("MfKQ9r8"), "{error}");
            assert!(!error.contains("AAECAwQ"), "{error}");
        }
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let secrets = Secrets::parse(&format!("{SECRET} {OTHER}")).unwrap();
        assert_eq!(format!("{secrets:?}"), "Secrets([redacted; 2])");
        let (_dir, loaded) = load_text(&entry("a", "https://a.example/p?token=t0ken"));
        let shown = format!("{:?}", loaded.unwrap());
        assert!(shown.contains("Secrets([redacted; 1])"), "{shown}");
        assert!(!shown.contains("MfKQ9r8"), "{shown}");
        assert!(!shown.contains("t0ken"), "{shown}");
        assert!(shown.contains("https://a.example"), "{shown}");
    }

    #[test]
    fn a_secret_file_that_is_not_secrets_is_refused_by_name() {
        let (dir, _) = load_text("");
        std::fs::write(dir.path().join("bad"), "hunter2-not-a-secret\n").unwrap();
        let error = Secrets::read(&dir.path().join("bad")).unwrap_err();
        assert!(
            error.contains("bad: the secret does not start with whsec_"),
            "{error}"
        );
        assert!(!error.contains("hunter2"), "{error}");
    }

    #[test]
    fn the_watched_paths_are_the_list_then_each_secret_file_once() {
        let (dir, loaded) = load_text(
            &(entry("a", "https://a.example")
                + &entry("b", "https://b.example")
                + &entry("c", "https://c.example").replace("\"good\"", "\"two\"")),
        );
        loaded.unwrap();
        let file = dir.path().join("recipients.toml");
        assert_eq!(
            watched_paths(&file).unwrap(),
            [
                file.clone(),
                dir.path().join("good"),
                dir.path().join("two")
            ]
        );
        // What Watched does with them: the same load.
        assert_eq!(load(&watched_paths(&file).unwrap()).unwrap().list.len(), 3);
    }
}
