//! Who is calling: the three ways a caller's identity is established (`--caller-identity`).

use std::fmt;
use std::str::FromStr;

use http::HeaderMap;
use http::header::HeaderName;

/// The metadata key a caller names itself in, where identities are self-declared.
pub const SELF_DECLARED_HEADER: &str = "x-ccpa-caller";

/// Istio's header: the identity is the `URI=` part of its last element.
pub const ISTIO_HEADER: &str = "x-forwarded-client-cert";

/// The longest identity taken (a SPIFFE ID is at most 2,048 bytes; ours are far shorter).
pub const MAX_IDENTITY_BYTES: usize = 512;

/// How callers are identified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityMode {
    /// The client certificate's URI SAN (a SPIFFE ID), else its first DNS SAN.
    Mtls,
    /// A header set by a service mesh that authenticated the caller itself: `l5d-client-id`
    /// (Linkerd), `x-forwarded-client-cert` (Istio, the `URI=` of the last element), or any
    /// other header holding the identity as it is.
    Header(HeaderName),
    /// `x-ccpa-caller`, as the caller declares it: for a loopback listener or the emulator.
    SelfDeclared,
}

impl FromStr for IdentityMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "mtls" => Ok(Self::Mtls),
            "self-declared" => Ok(Self::SelfDeclared),
            _ => {
                let Some(name) = text.strip_prefix("header:") else {
                    return Err("one of mtls, header:NAME or self-declared".into());
                };
                let name = HeaderName::from_str(&name.to_ascii_lowercase())
                    .map_err(|_| format!("{name:?} is not a header name"))?;
                if name.as_str().starts_with("grpc-") || name.as_str() == SELF_DECLARED_HEADER {
                    return Err(format!(
                        "{name} cannot carry an identity: callers set it themselves"
                    ));
                }
                Ok(Self::Header(name))
            }
        }
    }
}

impl fmt::Display for IdentityMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Mtls => f.write_str("mtls"),
            Self::Header(name) => write!(f, "header:{name}"),
            Self::SelfDeclared => f.write_str("self-declared"),
        }
    }
}

/// Why a call has no identity it can be trusted with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unidentified {
    /// The connection carries no client certificate.
    NoCertificate,
    /// The client certificate names neither a URI nor a DNS name.
    CertificateWithoutName,
    /// The identity header is absent.
    NoHeader,
    /// The identity header is there but unusable: several, empty, too long, not printable, or
    /// (Istio) without a `URI=`.
    MalformedHeader,
}

impl Unidentified {
    /// What the caller is told.
    pub fn message(self) -> &'static str {
        match self {
            Self::NoCertificate => {
                "a client certificate is required for this call (only health answers without one)"
            }
            Self::CertificateWithoutName => {
                "the client certificate names no identity: it needs a URI SAN (a SPIFFE ID) or a \
                 DNS SAN"
            }
            Self::NoHeader => "the caller's identity header is missing",
            Self::MalformedHeader => "the caller's identity header is malformed",
        }
    }
}

/// Checks an identity: non-empty, at most [`MAX_IDENTITY_BYTES`], printable ASCII.
pub fn well_formed(identity: &str) -> bool {
    !identity.is_empty()
        && identity.len() <= MAX_IDENTITY_BYTES
        && identity.bytes().all(|b| b.is_ascii_graphic())
}

/// The identity a mesh passed in `header`.
pub fn from_header(headers: &HeaderMap, header: &HeaderName) -> Result<String, Unidentified> {
    let mut values = headers.get_all(header).iter();
    let Some(first) = values.next() else {
        return Err(Unidentified::NoHeader);
    };
    let identity = if header.as_str() == ISTIO_HEADER {
        // Each proxy on the way appends an element; the last is the one that called us. Several
        // header lines are one list.
        let last_line = values.next_back().unwrap_or(first);
        let text = last_line
            .to_str()
            .map_err(|_| Unidentified::MalformedHeader)?;
        xfcc_last_uri(text).ok_or(Unidentified::MalformedHeader)?
    } else {
        if values.next().is_some() {
            return Err(Unidentified::MalformedHeader);
        }
        first
            .to_str()
            .map_err(|_| Unidentified::MalformedHeader)?
            .trim()
            .to_owned()
    };
    if well_formed(&identity) {
        Ok(identity)
    } else {
        Err(Unidentified::MalformedHeader)
    }
}

/// The `URI=` value of the last element of an `x-forwarded-client-cert` header.
///
/// Elements are separated by commas and pairs by semicolons, except inside double quotes, where
/// `\"` is a quote (Envoy's format). A header whose quotes do not balance is refused: a caller
/// could otherwise open a quote in the element it sends, swallow the comma before the element
/// its sidecar appends, and have its own `URI=` read as the last one.
fn xfcc_last_uri(header: &str) -> Option<String> {
    let elements = split_unquoted(header, ',')?;
    let last = elements.last()?;
    split_unquoted(last, ';')?.into_iter().find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case("URI")
            .then(|| unquote(value.trim()))
    })
}

/// Splits `text` at `separator` outside quotes; `None` when a quote or escape is left open.
fn split_unquoted(text: &str, separator: char) -> Option<Vec<&str>> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == separator && !quoted => {
                parts.push(&text[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    if quoted || escaped {
        return None;
    }
    parts.push(&text[start..]);
    Some(parts)
}

fn unquote(value: &str) -> String {
    match value
        .strip_prefix('"')
        .and_then(|inner| inner.strip_suffix('"'))
    {
        Some(inner) => inner.replace("\\\"", "\""),
        None => value.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(name: &'static str, values: &[&'static str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for value in values {
            map.append(name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn modes_parse_and_print() {
        for text in ["mtls", "self-declared", "header:l5d-client-id"] {
            assert_eq!(text.parse::<IdentityMode>().unwrap().to_string(), text);
        }
        assert_eq!(
            "header:L5D-Client-Id".parse::<IdentityMode>().unwrap(),
            IdentityMode::Header(HeaderName::from_static("l5d-client-id"))
        );
        for bad in [
            "",
            "tls",
            "header:",
            "header:bad name",
            "header:x-ccpa-caller",
        ] {
            assert!(bad.parse::<IdentityMode>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn linkerd_passes_the_identity_as_it_is() {
        let name = HeaderName::from_static("l5d-client-id");
        let map = headers(
            "l5d-client-id",
            &["web.ns.serviceaccount.identity.linkerd.local"],
        );
        assert_eq!(
            from_header(&map, &name).unwrap(),
            "web.ns.serviceaccount.identity.linkerd.local"
        );
        assert_eq!(
            from_header(&HeaderMap::new(), &name),
            Err(Unidentified::NoHeader)
        );
        let twice = headers("l5d-client-id", &["a", "b"]);
        assert_eq!(
            from_header(&twice, &name),
            Err(Unidentified::MalformedHeader)
        );
        let spaced = headers("l5d-client-id", &["a b"]);
        assert_eq!(
            from_header(&spaced, &name),
            Err(Unidentified::MalformedHeader)
        );
    }

    #[test]
    fn istio_takes_the_uri_of_the_last_element() {
        let name = HeaderName::from_static(ISTIO_HEADER);
        let map = headers(
            ISTIO_HEADER,
            &[
                "By=spiffe://corp.example/ns/gw/sa/gateway;Hash=abc;Subject=\"CN=a, O=b\";URI=spiffe://corp.example/ns/edge/sa/proxy,By=spiffe://corp.example/ns/privacy/sa/ccpa-gateway;Hash=def;Subject=\"\";URI=spiffe://corp.example/ns/web/sa/privacy-portal",
            ],
        );
        assert_eq!(
            from_header(&map, &name).unwrap(),
            "spiffe://corp.example/ns/web/sa/privacy-portal"
        );
        let quoted = headers(
            ISTIO_HEADER,
            &["Subject=\"CN=x,\\\"y\\\"\";URI=\"spiffe://corp.example/ns/a/sa/b\""],
        );
        assert_eq!(
            from_header(&quoted, &name).unwrap(),
            "spiffe://corp.example/ns/a/sa/b"
        );
        let lines = headers(
            ISTIO_HEADER,
            &[
                "URI=spiffe://corp.example/ns/first/sa/x",
                "URI=spiffe://corp.example/ns/last/sa/y",
            ],
        );
        assert_eq!(
            from_header(&lines, &name).unwrap(),
            "spiffe://corp.example/ns/last/sa/y"
        );
        // A caller's own element left with an open quote must not swallow its sidecar's.
        let smuggled = headers(
            ISTIO_HEADER,
            &[
                "URI=spiffe://corp.example/ns/web/sa/privacy-portal;Subject=\",By=spiffe://corp.example/ns/privacy/sa/ccpa-gateway;URI=spiffe://corp.example/ns/evil/sa/attacker",
            ],
        );
        assert_eq!(
            from_header(&smuggled, &name),
            Err(Unidentified::MalformedHeader)
        );
        let without_uri = headers(ISTIO_HEADER, &["Hash=abc;DNS=web.example"]);
        assert_eq!(
            from_header(&without_uri, &name),
            Err(Unidentified::MalformedHeader)
        );
    }
}
