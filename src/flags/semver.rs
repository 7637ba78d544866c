//! flagd's `sem_ver` operator: semantic versions compared with `=`, `!=`, `<`, `<=`, `>`,
//! `>=`, `^` (same major) and `~` (same major and minor). Versions may carry a `v` prefix and
//! may be partial (`1`, `1.2`); build metadata is ignored; pre-releases sort before releases.

use std::cmp::Ordering;

/// A parsed semantic version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version<'a> {
    major: u64,
    minor: u64,
    patch: u64,
    pre: Option<&'a str>,
}

impl<'a> Version<'a> {
    /// Parses `text`, or returns `None` when it is not a version.
    pub fn parse(text: &'a str) -> Option<Self> {
        let text = text.trim();
        let text = text
            .strip_prefix('v')
            .or_else(|| text.strip_prefix('V'))
            .unwrap_or(text);
        let text = text
            .split_once('+')
            .map_or(text, |(version, _build)| version);
        let (core, pre) = match text.split_once('-') {
            Some((core, pre)) if !pre.is_empty() => (core, Some(pre)),
            Some(_) => return None,
            None => (text, None),
        };
        let mut parts = core.split('.');
        let mut number = |required: bool| -> Option<Option<u64>> {
            match parts.next() {
                None if !required => Some(None),
                None => None,
                Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                    p.parse().ok().map(Some)
                }
                Some(_) => None,
            }
        };
        let major = number(true)??;
        let minor = number(false)?.unwrap_or(0);
        let patch = number(false)?.unwrap_or(0);
        if parts.next().is_some() {
            return None;
        }
        Some(Self {
            major,
            minor,
            patch,
            pre,
        })
    }
}

impl Ord for Version<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.major, self.minor, self.patch)
            .cmp(&(other.major, other.minor, other.patch))
            .then_with(|| match (self.pre, other.pre) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) => Ordering::Greater,
                (Some(_), None) => Ordering::Less,
                (Some(a), Some(b)) => compare_prerelease(a, b),
            })
    }
}

impl PartialOrd for Version<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

fn compare_prerelease(a: &str, b: &str) -> Ordering {
    let mut left = a.split('.');
    let mut right = b.split('.');
    loop {
        match (left.next(), right.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) => {
                let order = match (x.parse::<u64>(), y.parse::<u64>()) {
                    (Ok(x), Ok(y)) => x.cmp(&y),
                    (Ok(_), Err(_)) => Ordering::Less,
                    (Err(_), Ok(_)) => Ordering::Greater,
                    (Err(_), Err(_)) => x.cmp(y),
                };
                if order != Ordering::Equal {
                    return order;
                }
            }
        }
    }
}

/// Compares `left` with `right` by `operator`; `None` when an argument is not a version or
/// the operator is unknown.
pub fn compare(left: &str, operator: &str, right: &str) -> Option<bool> {
    let (a, b) = (Version::parse(left)?, Version::parse(right)?);
    Some(match operator {
        "=" => a == b,
        "!=" => a != b,
        "<" => a < b,
        "<=" => a <= b,
        ">" => a > b,
        ">=" => a >= b,
        "^" => a.major == b.major,
        "~" => a.major == b.major && a.minor == b.minor,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::compare;

    #[test]
    fn comparisons_follow_semver() {
        assert_eq!(compare("2.0.0", "=", "2.0.0"), Some(true));
        assert_eq!(compare("2.0.0-alpha", "<", "2.0.0"), Some(true));
        assert_eq!(compare("1.0.0-alpha.2", "<", "1.0.0-alpha.10"), Some(true));
        assert_eq!(compare("1.0.0-alpha", "<", "1.0.0-beta"), Some(true));
        assert_eq!(compare("3.0.1", "~", "3.0.0"), Some(true));
        assert_eq!(compare("3.1.0", "~", "3.0.0"), Some(false));
        assert_eq!(compare("3.1.0", "^", "3.0.0"), Some(true));
        assert_eq!(compare("v1.0.0", "=", "V1.0.0+build"), Some(true));
        assert_eq!(compare("1.2", ">", "1.1"), Some(true));
        assert_eq!(compare("1", "^", "1.9.3"), Some(true));
    }

    #[test]
    fn invalid_input_gives_none() {
        assert_eq!(compare("2.0.0.0", "=", "2.0.0"), None);
        assert_eq!(compare("not-a-version", "=", "1.0.0"), None);
        assert_eq!(compare("1.0.0", "===", "1.0.0"), None);
        assert_eq!(compare("1.0.0-", "=", "1.0.0"), None);
        assert_eq!(compare("", "=", "1.0.0"), None);
    }
}
