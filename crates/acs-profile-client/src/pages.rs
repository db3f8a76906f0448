//! Following the `next.href` of an ACS collection: the one request whose URL ACS writes, not the
//! spec.
//!
//! The reference says to follow `next.href` as given: it can be relative or absolute, and what it
//! holds (`_lineStart`, `_lineCount` or anything else) is opaque. So the link is not taken apart
//! and rebuilt; it is resolved against the page that carried it and requested through the same
//! hooks as every generated operation (headers, token, error bodies). Its one check: the link
//! must stay on the configured ACS origin, since the request carries the bearer token and the
//! API key. Its one change: `_forcePagination=true` is added when the link lacks it, since on a
//! large table ACS answers no further `next` to a page asked for without it (see
//! [`force_pagination`]).

use progenitor_client::{ClientHooks, ClientInfo, Error, OperationInfo, ResponseValue};
use reqwest::Url;
use reqwest::header::{ACCEPT, HeaderValue};

use crate::generated::Client;
use crate::{ApiError, types};

/// Resolves a `next.href` against the URL of the page that carried it (as a browser would: an
/// absolute-path link lands on the same host, an absolute link stays as written), and refuses
/// one that leaves the origin (scheme, host and port) of `base_url`.
///
/// The error says what is wrong but not the link: it holds the address being looked up.
pub(crate) fn resolve_next(base_url: &str, page: &Url, href: &str) -> Result<Url, &'static str> {
    let base = Url::parse(base_url).map_err(|_| "the configured ACS base URL cannot be parsed")?;
    let next = page
        .join(href)
        .map_err(|_| "ACS answered a next-page link that is not a URL")?;
    if next.origin() != base.origin() {
        return Err(
            "ACS answered a next-page link to another origin than the configured base URL: \
             not followed, so that the token goes nowhere else",
        );
    }
    Ok(next)
}

/// The query parameter that makes ACS paginate a table larger than its `XtkBigTableThreshold`
/// option (100,000 records by default: every production profile table). Without it ACS answers
/// such a table's first page with no `next` link, and a lookup looks complete when it is not.
pub(crate) const FORCE_PAGINATION: &str = "_forcePagination";

/// `url` with `_forcePagination=true` in its query: as it is when it already holds exactly that,
/// else with any other `_forcePagination` removed and `_forcePagination=true` appended. Adobe's
/// documented sample `next` link carries only `_lineCount` and `_lineStart`, and nothing says
/// ACS copies the parameter into the links it writes, so a link followed as given could lose it
/// after the first page. The other parameters are kept byte for byte (the link is opaque).
pub(crate) fn force_pagination(mut url: Url) -> Url {
    // The value of a `_forcePagination` parameter, `None` for any other parameter.
    let ours = |segment: &str| {
        form_urlencoded::parse(segment.as_bytes())
            .next()
            .filter(|(name, _)| name == FORCE_PAGINATION)
            .map(|(_, value)| value.into_owned())
    };
    let query = url.query().unwrap_or_default().to_owned();
    let segments = query.split('&').filter(|segment| !segment.is_empty());
    let values: Vec<String> = segments.clone().filter_map(ours).collect();
    if !values.is_empty() && values.iter().all(|value| value == "true") {
        return url;
    }
    let forced = format!("{FORCE_PAGINATION}=true");
    let kept: Vec<&str> = segments
        .filter(|segment| ours(segment).is_none())
        .chain([forced.as_str()])
        .collect();
    url.set_query(Some(&kept.join("&")));
    url
}

/// The operation id of a page reached through a `next` link (not an operation of the spec).
pub(crate) const NEXT_PAGE_OPERATION: &str = "list_profiles_next_page";

impl Client {
    /// One GET of `url`, expected to answer a profile collection, made exactly as the generated
    /// operations make theirs (the same hooks, the same reading of the status), so that a page
    /// reached through a link is authenticated, logged and classified like the first one.
    pub(crate) async fn get_profile_collection(
        &self,
        url: Url,
    ) -> Result<ResponseValue<types::ProfileCollection>, ApiError> {
        let mut request = self
            .client()
            .get(url)
            .header(ACCEPT, HeaderValue::from_static("application/json"))
            .build()?;
        let info = OperationInfo {
            operation_id: NEXT_PAGE_OPERATION,
        };
        self.pre(&mut request, &info).await?;
        let result = self.exec(request, &info).await;
        self.post(&result, &info).await?;
        let response = result?;
        match response.status().as_u16() {
            200 => ResponseValue::from_response(response).await,
            400..=599 => Err(Error::ErrorResponse(
                ResponseValue::from_response(response).await?,
            )),
            _ => Err(Error::UnexpectedResponse(response)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "https://mc.adobe.io/acme/campaign";

    fn page() -> Url {
        Url::parse("https://mc.adobe.io/acme/campaign/profileAndServices/profile/byEmail?email=x")
            .unwrap()
    }

    #[test]
    fn links_are_resolved_against_their_page_and_kept_whole() {
        let cases = [
            (
                "/acme/campaign/profileAndServices/profile/byEmail?email=x&_lineStart=a%2Bb%3D&_lineCount=25&z=1",
                "https://mc.adobe.io/acme/campaign/profileAndServices/profile/byEmail?email=x&_lineStart=a%2Bb%3D&_lineCount=25&z=1",
            ),
            (
                "byEmail?_cursor=opaque",
                "https://mc.adobe.io/acme/campaign/profileAndServices/profile/byEmail?_cursor=opaque",
            ),
            (
                "https://mc.adobe.io:443/acme/campaign/other?_lineStart=1",
                "https://mc.adobe.io/acme/campaign/other?_lineStart=1",
            ),
        ];
        for (href, expected) in cases {
            let next = resolve_next(BASE, &page(), href).unwrap();
            assert_eq!(next.as_str(), expected, "{href}");
        }
    }

    #[test]
    fn every_page_asked_for_forces_pagination_and_keeps_the_rest_of_its_link() {
        let cases = [
            // ACS's documented link: the parameter is added, the opaque token kept as encoded.
            (
                "https://mc.adobe.io/a/campaign/p/byEmail?email=x&_lineStart=a%2Bb%3D&_lineCount=25",
                "https://mc.adobe.io/a/campaign/p/byEmail?email=x&_lineStart=a%2Bb%3D&_lineCount=25&_forcePagination=true",
            ),
            // Already there: the link is requested as written.
            (
                "https://mc.adobe.io/a/campaign/p/byEmail?_forcePagination=true&_lineStart=x",
                "https://mc.adobe.io/a/campaign/p/byEmail?_forcePagination=true&_lineStart=x",
            ),
            // Anything but `true`, however spelled, would end the lookup early: replaced.
            (
                "https://mc.adobe.io/a/campaign/p/byEmail?_forcePagination=false&_lineStart=x",
                "https://mc.adobe.io/a/campaign/p/byEmail?_lineStart=x&_forcePagination=true",
            ),
            (
                "https://mc.adobe.io/a/campaign/p/byEmail?%5FforcePagination=1&_forcePagination=true&_lineStart=x",
                "https://mc.adobe.io/a/campaign/p/byEmail?_lineStart=x&_forcePagination=true",
            ),
            (
                "https://mc.adobe.io/a/campaign/p/byEmail",
                "https://mc.adobe.io/a/campaign/p/byEmail?_forcePagination=true",
            ),
        ];
        for (link, expected) in cases {
            let forced = force_pagination(Url::parse(link).unwrap());
            assert_eq!(forced.as_str(), expected, "{link}");
        }
    }

    #[test]
    fn links_to_another_origin_are_refused_without_being_quoted() {
        for href in [
            "https://evil.example/acme/campaign/x?email=secret-person@example.com",
            "//evil.example/x?email=secret-person@example.com",
            "http://mc.adobe.io/acme/campaign/x?email=secret-person@example.com",
            "https://mc.adobe.io:8443/acme/campaign/x?email=secret-person@example.com",
        ] {
            let message = resolve_next(BASE, &page(), href).unwrap_err();
            assert!(message.contains("another origin"), "{href}: {message}");
            assert!(!message.contains("secret-person"), "{message}");
        }
    }
}
