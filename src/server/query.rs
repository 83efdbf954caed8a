//! What an EC2 Query request asks beyond its action's own fields, so that
//! nothing asked is left undone: a parameter the action does not read is
//! refused (EC2's `UnknownParameter`) rather than ignored, `Filter.N`
//! narrows what a `Describe…` lists (EC2's filter names, `*` and `?`
//! wildcards; a name this server does not know is refused), and
//! `MaxResults` with `NextToken` pages it.

use std::collections::BTreeMap;

use super::Params;
use crate::error::{Error, Result};

/// A parameter's name with each number as `N`: `Filter.2.Value.1` is
/// `Filter.N.Value.N`.
fn shape(name: &str) -> String {
    name.split('.')
        .map(|s| {
            if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
                "N"
            } else {
                s
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// The first parameter of `p` whose shape `known` does not hold (`Action`,
/// `Version` and `DryRun` are every action's).
pub fn unknown<'a>(p: &'a Params, known: &[&str]) -> Option<&'a str> {
    p.keys().map(String::as_str).find(|k| {
        !matches!(*k, "Action" | "Version" | "DryRun") && !known.contains(&shape(k).as_str())
    })
}

/// The first numbered list of `p` with a number missing (`Tag.1.Key` and
/// `Tag.3.Key` without `Tag.2.…`), as `(list, missing number)`: each
/// action reads its lists from 1 on and stops at the first gap, so what
/// follows one would be left undone.
pub fn gap(p: &Params) -> Option<(String, u64)> {
    let mut lists: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for k in p.keys() {
        let parts: Vec<&str> = k.split('.').collect();
        for (j, part) in parts.iter().enumerate().skip(1) {
            if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
                // `Tag.01` or a number past u64 is never read as a list's
                // place: counted as past every place, it is a gap.
                let n = match part.parse::<u64>() {
                    Ok(n) if !part.starts_with('0') => n,
                    _ => u64::MAX,
                };
                lists.entry(parts[..j].join(".")).or_default().push(n);
            }
        }
    }
    lists.into_iter().find_map(|(list, mut numbers)| {
        numbers.sort_unstable();
        numbers.dedup();
        (1..)
            .zip(&numbers)
            .find(|(want, n)| *want != **n)
            .map(|(want, _)| (list, want))
    })
}

/// A request's filters: each a name and the values it accepts.
#[derive(Debug, Default)]
pub struct Filters(Vec<(String, Vec<String>)>);

impl Filters {
    /// `Filter.N.Name` with its `Filter.N.Value.M`, in whatever numbers
    /// they come; each name one of `names`, or `tag:KEY`.
    pub fn of(p: &Params, names: &[&str]) -> Result<Filters> {
        let mut by_index: BTreeMap<&str, (Option<&String>, Vec<&String>)> = BTreeMap::new();
        for (k, v) in p {
            let mut parts = k.split('.');
            let (Some("Filter"), Some(i)) = (parts.next(), parts.next()) else {
                continue;
            };
            let entry = by_index.entry(i).or_default();
            match (parts.next(), parts.next()) {
                (Some("Name"), None) => entry.0 = Some(v),
                (Some("Value"), Some(_)) => entry.1.push(v),
                _ => {}
            }
        }
        let mut out = Vec::new();
        for (i, (name, values)) in by_index {
            let Some(name) = name else {
                return Err(Error::InvalidArgument(format!(
                    "MissingParameter: Filter.{i} has values but no Filter.{i}.Name"
                )));
            };
            let tag = name.strip_prefix("tag:").is_some_and(|k| !k.is_empty());
            if !tag && !names.contains(&name.as_str()) {
                return Err(Error::InvalidArgument(format!(
                    "the filter '{name}' is invalid: this server filters by {} and tag:KEY",
                    names.join(", ")
                )));
            }
            if values.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "MissingParameter: the filter '{name}' has no Filter.{i}.Value.1"
                )));
            }
            out.push((name.clone(), values.into_iter().cloned().collect()));
        }
        Ok(Filters(out))
    }

    /// Whether an object with `attrs` (name, value; asked for only where
    /// there are filters) passes every filter: some value of the object's
    /// under the filter's name matches one of the filter's values.
    pub fn pass(&self, attrs: impl FnOnce() -> Vec<(String, String)>) -> bool {
        if self.0.is_empty() {
            return true;
        }
        let attrs = attrs();
        self.0.iter().all(|(name, patterns)| {
            attrs
                .iter()
                .filter(|(n, _)| n == name)
                .any(|(_, v)| patterns.iter().any(|p| wildcard(p, v)))
        })
    }
}

/// The attributes filters see of an object's tags: `tag:KEY` with its
/// value, and `tag-key`.
pub fn tag_attrs<'a>(
    tags: impl Iterator<Item = (&'a String, &'a String)>,
) -> Vec<(String, String)> {
    tags.flat_map(|(k, v)| {
        [
            (format!("tag:{k}"), v.clone()),
            ("tag-key".into(), k.clone()),
        ]
    })
    .collect()
}

/// EC2's filter values: `*` is any run of characters, `?` any one, and
/// `\` makes the next character plain.
fn wildcard(pattern: &str, s: &str) -> bool {
    #[derive(Clone, Copy, PartialEq)]
    enum Tok {
        Char(char),
        One,
        Any,
    }
    let mut toks = Vec::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        toks.push(match c {
            '\\' => Tok::Char(chars.next().unwrap_or('\\')),
            '*' => Tok::Any,
            '?' => Tok::One,
            c => Tok::Char(c),
        });
    }
    let s: Vec<char> = s.chars().collect();
    // Greedy with one backtrack point: the last `*` seen.
    let (mut t, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        match toks.get(t) {
            Some(Tok::Any) => {
                star = Some((t, i));
                t += 1;
            }
            Some(Tok::One) => {
                t += 1;
                i += 1;
            }
            Some(Tok::Char(c)) if *c == s[i] => {
                t += 1;
                i += 1;
            }
            _ => match star {
                Some((st, si)) => {
                    t = st + 1;
                    i = si + 1;
                    star = Some((st, si + 1));
                }
                None => return false,
            },
        }
    }
    toks[t..].iter().all(|k| *k == Tok::Any)
}

/// The page of `items` that `MaxResults` (5 to 1000) and `NextToken` (as
/// an earlier page gave it) ask for, and the token of the next page.
pub fn page<T>(p: &Params, items: Vec<T>) -> Result<(Vec<T>, Option<String>)> {
    let start = match p.get("NextToken") {
        None => 0,
        Some(t) => t
            .strip_prefix("page-")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "NextToken {t:?} is not one this server gave: start again without it"
                ))
            })?,
    };
    let Some(max) = p.get("MaxResults") else {
        return Ok((items.into_iter().skip(start).collect(), None));
    };
    let max = max
        .parse::<usize>()
        .ok()
        .filter(|m| (5..=1000).contains(m))
        .ok_or_else(|| {
            Error::InvalidArgument(format!("MaxResults {max:?} is not a number from 5 to 1000"))
        })?;
    let total = items.len();
    let this: Vec<T> = items.into_iter().skip(start).take(max).collect();
    let next = (start.saturating_add(max) < total).then(|| format!("page-{}", start + max));
    Ok((this, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Params {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn wildcards_match_as_ec2_filters_do() {
        for (p, s, want) in [
            ("prod", "prod", true),
            ("prod", "production", false),
            ("prod*", "production", true),
            ("*tion", "production", true),
            ("p*d*n", "production", true),
            ("p?od", "prod", true),
            ("p?od", "pod", false),
            ("*", "", true),
            ("?", "", false),
            ("a\\*b", "a*b", true),
            ("a\\*b", "axb", false),
            ("*a*a*", "banana", true),
            ("*x*", "banana", false),
        ] {
            assert_eq!(wildcard(p, s), want, "{p:?} against {s:?}");
        }
    }

    #[test]
    fn filters_and_their_values_combine_as_ec2_does() {
        let p = params(&[
            ("Filter.1.Name", "tag:env"),
            ("Filter.1.Value.1", "test"),
            ("Filter.1.Value.2", "dev*"),
            ("Filter.3.Name", "owner-id"),
            ("Filter.3.Value.1", "111111111111"),
        ]);
        let f = Filters::of(&p, &["owner-id"]).unwrap();
        let attrs = |env: &str, owner: &str| {
            let mut a = tag_attrs([(&"env".to_string(), &env.to_string())].into_iter());
            a.push(("owner-id".into(), owner.into()));
            a
        };
        assert!(f.pass(|| attrs("test", "111111111111")));
        assert!(f.pass(|| attrs("devel", "111111111111")));
        assert!(!f.pass(|| attrs("prod", "111111111111")));
        assert!(!f.pass(|| attrs("test", "222222222222")));
        assert!(!f.pass(|| vec![("owner-id".into(), "111111111111".into())]));
        // An unknown name, or a name without values, is refused.
        let bad = params(&[("Filter.1.Name", "volume-id"), ("Filter.1.Value.1", "x")]);
        assert!(Filters::of(&bad, &["owner-id"]).is_err());
        let empty = params(&[("Filter.1.Name", "owner-id")]);
        assert!(Filters::of(&empty, &["owner-id"]).is_err());
        let nameless = params(&[("Filter.1.Value.1", "x")]);
        assert!(Filters::of(&nameless, &["owner-id"]).is_err());
    }

    #[test]
    fn parameters_an_action_does_not_read_are_found() {
        let p = params(&[
            ("Action", "DeleteSnapshot"),
            ("Version", "2016-11-15"),
            ("SnapshotId", "snap-1"),
            ("DryRun", "true"),
        ]);
        assert_eq!(unknown(&p, &["SnapshotId"]), None);
        let p = params(&[("SnapshotId.1", "snap-1"), ("Filter.1.Name", "x")]);
        assert_eq!(unknown(&p, &["SnapshotId.N"]), Some("Filter.1.Name"));
    }

    #[test]
    fn a_numbered_list_with_a_gap_is_found() {
        let whole = params(&[
            ("ResourceId.1", "snap-1"),
            ("ResourceId.2", "snap-2"),
            ("Tag.1.Key", "a"),
            ("Tag.1.Value", "b"),
            ("Filter.1.Value.1", "x"),
            ("Filter.1.Value.2", "y"),
        ]);
        assert_eq!(gap(&whole), None);
        let gapped = params(&[("Tag.1.Key", "a"), ("Tag.3.Key", "c")]);
        assert_eq!(gap(&gapped), Some(("Tag".into(), 2)));
        let from_two = params(&[("SnapshotId.2", "snap-2")]);
        assert_eq!(gap(&from_two), Some(("SnapshotId".into(), 1)));
        let inner = params(&[("Filter.1.Value.1", "x"), ("Filter.1.Value.5", "y")]);
        assert_eq!(gap(&inner), Some(("Filter.1.Value".into(), 2)));
        // Numbers no action reads as a place are gaps too.
        let zero_led = params(&[("Tag.1.Key", "a"), ("Tag.02.Key", "b")]);
        assert_eq!(gap(&zero_led), Some(("Tag".into(), 2)));
        let huge = params(&[
            ("ResourceId.1", "a"),
            ("ResourceId.99999999999999999999", "b"),
        ]);
        assert_eq!(gap(&huge), Some(("ResourceId".into(), 2)));
    }

    #[test]
    fn pages_cover_every_item_once() {
        let items: Vec<u32> = (0..12).collect();
        let mut seen = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut p = params(&[("MaxResults", "5")]);
            if let Some(t) = &token {
                p.insert("NextToken".into(), t.clone());
            }
            let (this, next) = page(&p, items.clone()).unwrap();
            assert!(this.len() <= 5);
            seen.extend(this);
            match next {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        assert_eq!(seen, items);
        assert!(page(&params(&[("MaxResults", "4")]), items.clone()).is_err());
        assert!(page(&params(&[("NextToken", "forged")]), items.clone()).is_err());
        // A token far past the end: an empty page, and no next.
        let far = format!("page-{}", usize::MAX);
        let (none, next) = page(
            &params(&[("MaxResults", "5"), ("NextToken", &far)]),
            items.clone(),
        )
        .unwrap();
        assert_eq!((none.len(), next), (0, None));
        let (all, next) = page(&params(&[]), items.clone()).unwrap();
        assert_eq!((all.len(), next), (12, None));
    }
}
