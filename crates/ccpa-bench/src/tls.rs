//! Mutual TLS for `bench --tls`: a CA, a server certificate and a client certificate made for
//! the run, and a policy that allows the load generator everything, so that the TLS phase
//! measures what TLS, identity and the policy cost on the real path.

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// The load generator's identity, allowed everything by the run's policy.
const LOAD_GENERATOR: &str = "spiffe://ccpa-bench.invalid/load-generator";

/// Certificates and policy for one run, in a temporary directory removed with it.
pub struct BenchTls {
    _dir: tempfile::TempDir,
    ca: String,
    client_cert: String,
    client_key: String,
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
    policy: PathBuf,
}

impl BenchTls {
    /// Makes the certificates and writes the files.
    pub fn new() -> Result<Self, String> {
        let error = |e: rcgen::Error| format!("making the benchmark's certificates: {e}");
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(error)?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().map_err(error)?)
            .map_err(error)?;

        let mut server = CertificateParams::new(vec!["localhost".to_owned()]).map_err(error)?;
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate().map_err(error)?;
        let server_cert = server.signed_by(&server_key, &ca).map_err(error)?;

        let mut client = CertificateParams::new(Vec::<String>::new()).map_err(error)?;
        client.subject_alt_names = vec![SanType::URI(LOAD_GENERATOR.try_into().map_err(error)?)];
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_key = KeyPair::generate().map_err(error)?;
        let client_cert = client.signed_by(&client_key, &ca).map_err(error)?;

        let write = |name: &str, contents: &str| -> Result<PathBuf, String> {
            let path = dir.path().join(name);
            std::fs::write(&path, contents).map_err(|e| e.to_string())?;
            Ok(path)
        };
        let everything = r#"["read", "read-by-email", "opt-out", "opt-in", "create-profile", "records", "bulk"]"#;
        Ok(Self {
            cert: write("server.crt", &server_cert.pem())?,
            key: write("server.key", &server_key.serialize_pem())?,
            client_ca: write("ca.crt", &ca.pem())?,
            policy: write(
                "policy.toml",
                &format!("[[caller]]\nid = \"{LOAD_GENERATOR}\"\nallow = {everything}\n"),
            )?,
            ca: ca.pem(),
            client_cert: client_cert.pem(),
            client_key: client_key.serialize_pem(),
            _dir: dir,
        })
    }

    /// The arguments of `serve` that turn mutual TLS on.
    pub fn serve_args(&self) -> Vec<String> {
        let path = |p: &PathBuf| p.display().to_string();
        vec![
            "--tls-cert".into(),
            path(&self.cert),
            "--tls-key".into(),
            path(&self.key),
            "--tls-client-ca".into(),
            path(&self.client_ca),
            "--authz-policy".into(),
            path(&self.policy),
        ]
    }

    /// The load generator's side.
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.client_cert, &self.client_key))
            .domain_name("localhost")
    }
}
