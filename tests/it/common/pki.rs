//! Certificates made in the test: a CA, server certificates for `localhost`, and client
//! certificates naming a SPIFFE ID or a DNS name, written as PEM files.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// A certificate authority of the test's own.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, as PEM.
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// What a leaf certificate names.
pub enum Name<'a> {
    /// A URI SAN, such as a SPIFFE ID (and a DNS SAN after it, which the URI must win over).
    Uri(&'a str),
    /// A DNS SAN only.
    Dns(&'a str),
    /// No subject alternative name at all.
    Nothing,
}

impl Ca {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    /// The CA's certificate.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self) -> Pem {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate naming `name`.
    pub fn client(&self, name: Name<'_>) -> Pem {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        match name {
            Name::Uri(uri) => {
                params
                    .subject_alt_names
                    .push(SanType::URI(uri.try_into().unwrap()));
                params.subject_alt_names.push(SanType::DnsName(
                    "also-a-dns-name.example".try_into().unwrap(),
                ));
            }
            Name::Dns(dns) => params
                .subject_alt_names
                .push(SanType::DnsName(dns.try_into().unwrap())),
            Name::Nothing => {}
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Pem {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

impl Pem {
    /// Writes the certificate and key into `dir` as `<name>.crt` and `<name>.key`, replacing
    /// any earlier ones at once (a rename, as cert-manager's symlink swap is atomic).
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        write_atomically(&key, &self.key);
        write_atomically(&cert, &self.cert);
        (cert, key)
    }

    /// The client identity tonic presents.
    pub fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert, &self.key)
    }
}

/// Replaces `path` with `contents` in one step.
pub fn write_atomically(path: &Path, contents: &str) {
    let staging = path.with_extension("staging");
    std::fs::write(&staging, contents).unwrap();
    std::fs::rename(&staging, path).unwrap();
}

/// TLS settings of a client that trusts `ca` and presents `identity`, if any.
pub fn client_tls(ca: &str, identity: Option<&Pem>) -> ClientTlsConfig {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    match identity {
        Some(pem) => tls.identity(pem.identity()),
        None => tls,
    }
}
