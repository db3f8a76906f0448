//! The gateway's own connections: to Adobe (ACS, IMS) and to a PostgreSQL ledger. Tokens,
//! credentials and personal data travel over verified TLS only; plaintext is allowed to this
//! machine alone (the emulator, a local PostgreSQL).

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgSslMode};

/// Whether `url` names this machine (a loopback address or `localhost`). For schemes the URL
/// standard does not know (`postgres://`) the host is opaque text, so addresses are parsed here.
pub fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(host)) => is_loopback_host(host),
        None => false,
    }
}

fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Refuses an upstream URL (ACS, IMS) that would carry tokens and personal data in clear:
/// `https://` only, except to a loopback address.
pub fn require_https(text: &str) -> Result<(), String> {
    let url = url::Url::parse(text).map_err(|e| format!("not a URL: {e}"))?;
    match url.scheme() {
        "https" => Ok(()),
        "http" if is_loopback(&url) => Ok(()),
        _ => Err(
            "must be an https:// URL (plain http:// is allowed to a loopback address \
                  only, such as the emulator's)"
                .into(),
        ),
    }
}

/// Refuses a PostgreSQL ledger on another host unless its server certificate is verified
/// (`sslmode=verify-full` or `verify-ca`): the ledger holds who asked not to be sold, and the
/// credentials travel with every connection. The URL is read the way the driver reads it
/// (`host`, `hostaddr`, `ssl-mode`, a repeated key, `PGHOST` and `PGSSLMODE`), so that what is
/// checked is what is used.
pub fn require_verified_postgres(location: &str) -> Result<(), String> {
    let options =
        PgConnectOptions::from_str(location).map_err(|e| format!("not a postgres:// URL: {e}"))?;
    // The driver's default host, without one in the URL or the environment, is the directory of
    // a local Unix socket when one exists.
    let host = options.get_host();
    let local = options.get_socket().is_some() || host.starts_with('/') || is_loopback_host(host);
    let verified = matches!(
        options.get_ssl_mode(),
        PgSslMode::VerifyFull | PgSslMode::VerifyCa
    );
    if local || verified {
        return Ok(());
    }
    Err(
        "a PostgreSQL ledger on another host must be reached over verified TLS: add \
         sslmode=verify-full (and sslrootcert=<CA file>) to the URL"
            .into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_recognised_whatever_the_scheme() {
        for url in [
            "http://127.0.0.1:8080",
            "http://localhost:1",
            "http://[::1]:1",
            "postgres://postgres@127.0.0.1:5432/test",
            "postgres://u@[::1]/db",
            "postgresql://localhost/db",
        ] {
            assert!(is_loopback(&url::Url::parse(url).unwrap()), "{url}");
        }
        for url in [
            "http://10.0.0.1",
            "https://mc.adobe.io",
            "postgres://db.corp.example/x",
            "postgres://10.1.2.3/x",
            "postgres://127.0.0.1.corp.example/x",
        ] {
            assert!(!is_loopback(&url::Url::parse(url).unwrap()), "{url}");
        }
    }

    #[test]
    fn upstreams_must_be_https_except_on_this_machine() {
        for ok in [
            "https://mc.adobe.io",
            "https://ims-na1.adobelogin.com",
            "http://127.0.0.1:8080",
            "http://localhost:9",
        ] {
            assert!(require_https(ok).is_ok(), "{ok}");
        }
        for refused in ["http://mc.adobe.io", "ftp://127.0.0.1", "mc.adobe.io"] {
            assert!(require_https(refused).is_err(), "{refused}");
        }
    }

    #[test]
    fn a_remote_postgres_ledger_needs_a_verified_certificate_however_the_url_says_it() {
        for ok in [
            "postgres://postgres@127.0.0.1:5432/test",
            "postgres://postgres@localhost/test?options[search_path]=x",
            "postgres:///test?host=/run/postgresql",
            "postgres://ledger.corp.example/ccpa?sslmode=verify-full",
            "postgres://ledger.corp.example/ccpa?ssl-mode=verify-ca",
        ] {
            assert!(require_verified_postgres(ok).is_ok(), "{ok}");
        }
        for refused in [
            "postgres://ledger.corp.example/ccpa",
            "postgres://ledger.corp.example/ccpa?sslmode=require",
            // The last of a repeated key is the one the driver uses.
            "postgres://ledger.corp.example/ccpa?sslmode=verify-full&ssl-mode=disable",
            // hostaddr wins over the URL's host.
            "postgres://127.0.0.1/ccpa?hostaddr=10.0.0.5",
            "postgres://127.0.0.1/ccpa?host=ledger.corp.example",
        ] {
            assert!(require_verified_postgres(refused).is_err(), "{refused}");
        }
    }
}
