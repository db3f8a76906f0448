//! The manner of a request on the command line: the contract's own `RequestSource`, not a copy
//! of it. Its values, and the help of each, are read from the proto's descriptor compiled into
//! the binary; each is spelled as the proto names it without its prefix, in kebab case
//! (`web-form`, `postal-mail`), but for GLOBAL_PRIVACY_CONTROL, which the CLI spells `gpc` (the
//! signal's own name). UNSPECIFIED is not accepted: the regulations require the manner of each
//! request.
//!
//! Flags parse it with `#[arg(value_enum)]` (exact spellings); a CSV column with [`from_column`]
//! (any case, `_` for `-`).

use std::sync::LazyLock;

use clap::ValueEnum;
use clap::builder::PossibleValue;
use prost::Message as _;

use crate::proto::ccpa_v1::RequestSource;

/// The prefix of every value's name in the proto.
const PREFIX: &str = "REQUEST_SOURCE_";

/// One accepted value: the source, its spelling and its help.
struct Spelling {
    source: RequestSource,
    name: String,
    help: Option<String>,
}

/// Every accepted value, in the proto's order.
static SPELLINGS: LazyLock<Vec<Spelling>> = LazyLock::new(spellings);
/// The same sources alone, as clap asks for them.
static SOURCES: LazyLock<Vec<RequestSource>> =
    LazyLock::new(|| SPELLINGS.iter().map(|spelling| spelling.source).collect());

/// The values of `ccpa.v1.RequestSource` in the descriptor set, UNSPECIFIED aside, with the
/// first sentence of each one's comment.
fn spellings() -> Vec<Spelling> {
    // The descriptor set is build.rs's encoding of the proto this binary was generated from:
    // it decodes and holds the enum (a unit test checks both). Were it ever not to, no value
    // would be accepted and every command giving a source would say so.
    let Ok(set) = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET) else {
        return Vec::new();
    };
    let Some((file, index, values)) = set.file.iter().find_map(|file| {
        let package = file.package.as_deref() == Some("ccpa.v1");
        let (index, found) = file
            .enum_type
            .iter()
            .enumerate()
            .find(|(_, e)| package && e.name.as_deref() == Some("RequestSource"))?;
        Some((file, index, &found.value))
    }) else {
        return Vec::new();
    };
    values
        .iter()
        .enumerate()
        .filter_map(|(value_index, value)| {
            let source = RequestSource::from_str_name(value.name.as_deref()?)?;
            let name = spelling(source)?;
            // A value's comment is at path [enum_type (5), index, value (2), value_index].
            let path = [5, index, 2, value_index].map(|n| i32::try_from(n).unwrap_or(-1));
            let help = file
                .source_code_info
                .as_ref()?
                .location
                .iter()
                .find(|location| location.path == path)
                .and_then(|location| location.leading_comments.as_deref())
                .map(first_sentence);
            Some(Spelling { source, name, help })
        })
        .collect()
}

/// How the CLI spells `source`; `None` for UNSPECIFIED, which it does not accept.
fn spelling(source: RequestSource) -> Option<String> {
    match source {
        RequestSource::Unspecified => None,
        RequestSource::GlobalPrivacyControl => Some("gpc".to_owned()),
        other => Some(
            other
                .as_str_name()
                .trim_start_matches(PREFIX)
                .to_ascii_lowercase()
                .replace('_', "-"),
        ),
    }
}

/// A comment's first sentence, on one line, without its full stop (as clap shows the help of
/// a value documented in Rust).
fn first_sentence(comment: &str) -> String {
    let text = comment.split_whitespace().collect::<Vec<_>>().join(" ");
    let sentence = text
        .split_once(". ")
        .map_or(text.as_str(), |(first, _)| first);
    sentence.trim_end_matches('.').to_owned()
}

impl ValueEnum for RequestSource {
    fn value_variants<'a>() -> &'a [Self] {
        &SOURCES
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        let spelling = SPELLINGS.iter().find(|s| s.source == *self)?;
        let value = PossibleValue::new(spelling.name.as_str());
        Some(match &spelling.help {
            Some(help) => value.help(help.as_str()),
            None => value,
        })
    }
}

/// The source a CSV column gives: as on the command line, in any case, with `_` for `-`
/// (`WEB_FORM`, `web_form`, `Web-Form`).
pub(super) fn from_column(text: &str) -> Option<RequestSource> {
    RequestSource::from_str(&text.replace('_', "-"), true).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_source_but_unspecified_is_accepted_as_the_cli_has_always_spelled_it() {
        let names: Vec<_> = RequestSource::value_variants()
            .iter()
            .filter_map(|source| source.to_possible_value())
            .map(|value| value.get_name().to_owned())
            .collect();
        assert_eq!(
            names,
            [
                "gpc",
                "web-form",
                "email",
                "phone",
                "postal-mail",
                "in-person",
                "authorized-agent",
                "internal"
            ]
        );
        assert!(
            SPELLINGS.iter().all(|spelling| spelling.help.is_some()),
            "every value has its comment as help"
        );
        assert_eq!(
            RequestSource::from_str("web-form", false),
            Ok(RequestSource::WebForm)
        );
        assert!(RequestSource::from_str("Web-Form", false).is_err());
        assert!(RequestSource::from_str("unspecified", true).is_err());
        assert!(RequestSource::from_str("global-privacy-control", true).is_err());
    }

    #[test]
    fn a_column_may_use_any_case_and_underscores() {
        for (text, source) in [
            ("gpc", RequestSource::GlobalPrivacyControl),
            ("GPC", RequestSource::GlobalPrivacyControl),
            ("WEB_FORM", RequestSource::WebForm),
            ("web_form", RequestSource::WebForm),
            ("Postal-Mail", RequestSource::PostalMail),
        ] {
            assert_eq!(from_column(text), Some(source), "{text}");
        }
        for text in ["", "unspecified", "UNSPECIFIED", "fax"] {
            assert_eq!(from_column(text), None, "{text}");
        }
    }

    #[test]
    fn help_is_the_first_sentence_of_the_comment() {
        assert_eq!(
            first_sentence(
                " A Global Privacy Control signal (`Sec-GPC: 1`). A later absence\n of it.\n"
            ),
            "A Global Privacy Control signal (`Sec-GPC: 1`)"
        );
        assert_eq!(first_sentence(" A letter.\n"), "A letter");
    }
}
