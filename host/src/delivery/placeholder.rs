//! `:name:` placeholders in a destination's URL and header values, generalising 1NCE's
//! metadata injection.
//!
//! A placeholder is `:` + a name (a letter or `_`, then letters, digits or `_`) + `:`.
//! Known names (`iccid`, `imsi`, `ip`, `event_id`, `source`, `event_type`) become `none`
//! when no value exists; any other placeholder without a value stays as written. Values are
//! percent-encoded inside URLs, and a value containing CR, LF or NUL never goes into a
//! header (it is treated as missing).

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// Names that always resolve, to `none` when no value exists.
pub const KNOWN: &[&str] = &["iccid", "imsi", "ip", "event_id", "source", "event_type"];

/// Everything but RFC 3986's unreserved characters is encoded.
const URL_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Where a template is used, which decides how values are escaped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Url,
    Header,
}

/// Replaces the placeholders of `template` with values from `lookup`.
pub fn render<'a>(
    template: &str,
    target: Target,
    lookup: impl Fn(&str) -> Option<&'a str>,
) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find(':') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let name_len = placeholder_name_len(after);
        if name_len > 0 && after[name_len..].starts_with(':') {
            let name = &after[..name_len];
            let value = lookup(name).filter(|v| target == Target::Url || header_safe(v));
            match (value, KNOWN.contains(&name)) {
                (Some(v), _) => match target {
                    Target::Url => out.extend(utf8_percent_encode(v, URL_VALUE)),
                    Target::Header => out.push_str(v),
                },
                (None, true) => out.push_str("none"),
                (None, false) => {
                    out.push(':');
                    out.push_str(name);
                    out.push(':');
                }
            }
            rest = &after[name_len + 1..];
        } else {
            out.push(':');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn placeholder_name_len(s: &str) -> usize {
    let mut len = 0;
    for (i, c) in s.char_indices() {
        let ok = if i == 0 {
            c.is_ascii_alphabetic() || c == '_'
        } else {
            c.is_ascii_alphanumeric() || c == '_'
        };
        if !ok {
            break;
        }
        len = i + c.len_utf8();
    }
    len
}

fn header_safe(v: &str) -> bool {
    !v.contains(['\r', '\n', '\0'])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(name: &str) -> Option<&'static str> {
        match name {
            "iccid" => Some("8945738730000000012"),
            "ip" => Some("10.0.0.1"),
            "label" => Some("a b&c=d/é"),
            "evil" => Some("x\r\nx-injected: 1"),
            _ => None,
        }
    }

    #[test]
    fn url_values_are_encoded_and_missing_known_become_none() {
        let url = render(
            "https://h.example:8443/e?iccid=:iccid:&imsi=:imsi:&l=:label:&u=:unknown:",
            Target::Url,
            values,
        );
        assert_eq!(
            url,
            "https://h.example:8443/e?iccid=8945738730000000012&imsi=none&l=a%20b%26c%3Dd%2F%C3%A9&u=:unknown:"
        );
    }

    #[test]
    fn header_values_with_newlines_are_never_used() {
        assert_eq!(render(":evil:", Target::Header, values), ":evil:");
        assert_eq!(
            render(":ip:/:imsi:", Target::Header, values),
            "10.0.0.1/none"
        );
    }

    #[test]
    fn colons_that_are_not_placeholders_stay() {
        assert_eq!(
            render("a:b c::d: :1x:", Target::Header, values),
            "a:b c::d: :1x:"
        );
        assert_eq!(render("trailing:", Target::Header, values), "trailing:");
    }
}
