//! The gateway's settings: one typed home, every flag also an environment variable, and every bad
//! or missing value refused at start-up with a message that names it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use acs_profile_client::{AccessToken, Client, ClientConfig, ConfigError, SharedToken};
use clap::Args;
use secrecy::{ExposeSecret, SecretString};

use crate::server::ShutdownOptions;

/// Settings of `ccpa-gateway serve`.
#[derive(Args, Clone)]
pub struct ServeSettings {
    /// Address the gRPC server listens on.
    #[arg(long, env = "CCPA_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Run an Adobe Campaign emulator in this process, seeded with demo profiles, and use it
    /// instead of Adobe. For trying the gateway out; nothing is kept.
    #[arg(long, conflicts_with_all = ["acs_tenant", "acs_api_key", "acs_access_token"])]
    pub emulator: bool,

    /// Time between reporting NOT_SERVING and closing the listener on shutdown, so that load
    /// balancers stop sending calls first (e.g. "5s" behind Kubernetes).
    #[arg(long, env = "CCPA_DRAIN_DELAY", default_value = "0s", value_parser = humantime::parse_duration)]
    pub drain_delay: Duration,

    /// Longest wait for calls in flight on shutdown.
    #[arg(long, env = "CCPA_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// How to reach Adobe Campaign.
    #[command(flatten, next_help_heading = "Adobe Campaign")]
    pub acs: AcsSettings,
}

impl ServeSettings {
    /// The shutdown part of the settings.
    pub fn shutdown_options(&self) -> ShutdownOptions {
        ShutdownOptions {
            drain_delay: self.drain_delay,
            drain_timeout: self.drain_timeout,
        }
    }
}

/// How to reach the Adobe Campaign Standard tenant.
#[derive(Args, Clone)]
pub struct AcsSettings {
    /// Adobe I/O endpoint in front of Campaign.
    #[arg(long, env = "CCPA_ACS_BASE_URL", default_value = "https://mc.adobe.io")]
    pub acs_base_url: String,

    /// Campaign tenant (organization) name: `<tenant>` in production, `<tenant>-mkt-stage<N>`
    /// on stage.
    #[arg(long, env = "CCPA_ACS_TENANT")]
    pub acs_tenant: Option<String>,

    /// API key: the client id of the Adobe Developer Console integration.
    #[arg(long, env = "CCPA_ACS_API_KEY", hide_env_values = true, value_parser = secret)]
    pub acs_api_key: Option<SecretString>,

    /// Static access token for Adobe I/O. Prefer the environment variable: command lines are
    /// visible to other users of the machine.
    #[arg(long, env = "CCPA_ACS_ACCESS_TOKEN", hide_env_values = true, value_parser = secret)]
    pub acs_access_token: Option<SecretString>,

    /// Bound on each call to ACS, from connecting to the last byte of the answer.
    #[arg(long, env = "CCPA_ACS_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub acs_timeout: Duration,

    /// Bound on establishing a connection to ACS.
    #[arg(long, env = "CCPA_ACS_CONNECT_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub acs_connect_timeout: Duration,
}

fn secret(value: &str) -> Result<SecretString, String> {
    Ok(SecretString::from(value))
}

/// A setting that is missing or wrong. The message names the flag and its environment variable,
/// never the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting}: {problem}")]
pub struct SettingError {
    /// The flag and variable, as `--acs-tenant (CCPA_ACS_TENANT)`.
    pub setting: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

const BASE_URL: &str = "--acs-base-url (CCPA_ACS_BASE_URL)";
const TENANT: &str = "--acs-tenant (CCPA_ACS_TENANT)";
const API_KEY: &str = "--acs-api-key (CCPA_ACS_API_KEY)";
const ACCESS_TOKEN: &str = "--acs-access-token (CCPA_ACS_ACCESS_TOKEN)";

fn required<T>(value: Option<T>, setting: &'static str) -> Result<T, SettingError> {
    value.ok_or(SettingError {
        setting,
        problem: "is required (or run with --emulator)".into(),
    })
}

impl AcsSettings {
    /// The ACS client these settings describe.
    pub fn client(&self) -> Result<Client, SettingError> {
        let tenant = required(self.acs_tenant.clone(), TENANT)?;
        let api_key = required(self.acs_api_key.clone(), API_KEY)?;
        let token = required(self.acs_access_token.clone(), ACCESS_TOKEN)?;
        if !acs_profile_client::is_header_token(token.expose_secret()) {
            return Err(SettingError {
                setting: ACCESS_TOKEN,
                problem: "must be non-empty visible ASCII".into(),
            });
        }
        let tokens = Arc::new(SharedToken::new(AccessToken::new(token.expose_secret())));
        let config = ClientConfig {
            base_url: self.acs_base_url.clone(),
            tenant,
            api_key,
            tokens,
            timeout: self.acs_timeout,
            connect_timeout: self.acs_connect_timeout,
        };
        Client::from_config(config).map_err(|e| {
            let setting = match &e {
                ConfigError::BaseUrl(_) | ConfigError::HttpClient(_) => BASE_URL,
                ConfigError::Tenant => TENANT,
                ConfigError::ApiKey => API_KEY,
            };
            SettingError {
                setting,
                problem: e.to_string(),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> AcsSettings {
        AcsSettings {
            acs_base_url: "https://mc.adobe.io".into(),
            acs_tenant: Some("acme".into()),
            acs_api_key: Some("key".into()),
            acs_access_token: Some("token".into()),
            acs_timeout: Duration::from_secs(10),
            acs_connect_timeout: Duration::from_secs(3),
        }
    }

    #[test]
    fn complete_settings_make_a_client() {
        assert!(settings().client().is_ok());
    }

    #[test]
    fn each_missing_or_bad_setting_is_named() {
        let cases: [(AcsSettings, &str); 6] = [
            (
                AcsSettings {
                    acs_tenant: None,
                    ..settings()
                },
                TENANT,
            ),
            (
                AcsSettings {
                    acs_api_key: None,
                    ..settings()
                },
                API_KEY,
            ),
            (
                AcsSettings {
                    acs_access_token: None,
                    ..settings()
                },
                ACCESS_TOKEN,
            ),
            (
                AcsSettings {
                    acs_access_token: Some(" ".into()),
                    ..settings()
                },
                ACCESS_TOKEN,
            ),
            (
                AcsSettings {
                    acs_base_url: "mc.adobe.io".into(),
                    ..settings()
                },
                BASE_URL,
            ),
            (
                AcsSettings {
                    acs_tenant: Some("a b".into()),
                    ..settings()
                },
                TENANT,
            ),
        ];
        for (bad, setting) in cases {
            let error = bad.client().unwrap_err();
            assert_eq!(error.setting, setting);
        }
    }
}
