//! Reading a verified token's role and relations out of its claims, by the claim names an
//! issuer's configuration gives (pure: no I/O).

use std::collections::BTreeMap;
use std::collections::BTreeSet;

use serde_json::Value;

use crate::config::{ClaimNames, Role};

/// The most ids one relation claim may list (a school's roster fits; a runaway claim does
/// not).
pub const MAX_RELATION_IDS: usize = 2_000;

/// The longest id in a relation claim.
pub const MAX_ID_LENGTH: usize = 256;

/// Whom a verified caller is related to: ids only, as the identity provider states them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Relations {
    /// A guardian's children (user ids as in events).
    pub children: BTreeSet<String>,
    /// A teacher's classes.
    pub classes: BTreeSet<String>,
    /// The children on a teacher's roster.
    pub roster: BTreeSet<String>,
    /// A school admin's school.
    pub school: Option<String>,
}

/// Why a verified token's claims give no usable identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    /// No value of the role claim names a role.
    #[error("the token carries no flagstream role in its {claim} claim")]
    NoRole {
        /// The claim looked at.
        claim: String,
    },
    /// More than one role: a sign-in acts in one role.
    #[error("the token carries more than one flagstream role ({roles}); sign in for one")]
    SeveralRoles {
        /// The roles found.
        roles: String,
    },
    /// A relation claim is not an id or a list of ids.
    #[error("the {claim} claim must be a string or an array of 1 to {MAX_RELATION_IDS} ids")]
    BadRelation {
        /// The claim.
        claim: String,
    },
    /// The role needs a relation the token does not carry.
    #[error("a {role} token must carry the {claim} claim")]
    MissingRelation {
        /// The role.
        role: &'static str,
        /// The claim.
        claim: String,
    },
}

/// Finds `path` in `claims`: a claim name, or a dotted path into objects
/// (`realm_access.roles`). An exact top-level name wins over a path.
fn lookup<'a>(claims: &'a Value, path: &str) -> Option<&'a Value> {
    if let Some(value) = claims.get(path) {
        return Some(value);
    }
    path.split('.')
        .try_fold(claims, |value, part| value.get(part))
}

/// The strings of a claim that is a string or an array of strings; `None` when it is
/// something else.
fn strings(value: &Value) -> Option<Vec<&str>> {
    match value {
        Value::String(text) => Some(vec![text.as_str()]),
        Value::Array(items) => items.iter().map(Value::as_str).collect(),
        _ => None,
    }
}

fn is_id(id: &str) -> bool {
    !id.trim().is_empty() && id.len() <= MAX_ID_LENGTH && !id.chars().any(char::is_control)
}

fn ids(claims: &Value, claim: &str) -> Result<BTreeSet<String>, ClaimError> {
    let bad = || ClaimError::BadRelation {
        claim: claim.to_owned(),
    };
    let Some(value) = lookup(claims, claim) else {
        return Ok(BTreeSet::new());
    };
    let list = strings(value).ok_or_else(bad)?;
    if list.len() > MAX_RELATION_IDS || !list.iter().all(|id| is_id(id)) {
        return Err(bad());
    }
    Ok(list.into_iter().map(str::to_owned).collect())
}

/// Reads the role and relations of verified `claims`. Role values are mapped through
/// `roles`, or taken as a role's own name; the `client` role never comes from a token of an
/// identity provider (app installations use static keys), and values that name no role are
/// ignored (an identity provider's other roles).
pub fn read(
    claims: &Value,
    names: &ClaimNames,
    roles: &BTreeMap<String, Role>,
) -> Result<(Role, Relations), ClaimError> {
    let found: BTreeSet<&'static str> = lookup(claims, &names.role)
        .and_then(strings)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|value| roles.get(value).copied().or_else(|| value.parse().ok()))
        .filter(|role| *role != Role::Client)
        .map(Role::as_str)
        .collect();
    let role = match found.len() {
        0 => {
            return Err(ClaimError::NoRole {
                claim: names.role.clone(),
            });
        }
        1 => found
            .first()
            .and_then(|name| name.parse::<Role>().ok())
            .expect("a found role parses"),
        _ => {
            return Err(ClaimError::SeveralRoles {
                roles: found.into_iter().collect::<Vec<_>>().join(", "),
            });
        }
    };
    let school = match lookup(claims, &names.school) {
        None => None,
        Some(Value::String(id)) if is_id(id) => Some(id.clone()),
        Some(_) => {
            return Err(ClaimError::BadRelation {
                claim: names.school.clone(),
            });
        }
    };
    let relations = Relations {
        children: ids(claims, &names.children)?,
        classes: ids(claims, &names.classes)?,
        roster: ids(claims, &names.roster)?,
        school,
    };
    let missing = |claim: &str| ClaimError::MissingRelation {
        role: role.as_str(),
        claim: claim.to_owned(),
    };
    match role {
        Role::SchoolAdmin if relations.school.is_none() => Err(missing(&names.school)),
        _ => Ok((role, relations)),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn read_default(claims: Value) -> Result<(Role, Relations), ClaimError> {
        let roles = BTreeMap::from([("parent".to_owned(), Role::Guardian)]);
        read(&claims, &ClaimNames::default(), &roles)
    }

    #[test]
    fn a_guardian_token_names_its_children() {
        let (role, relations) = read_default(json!({
            "flagstream_role": "parent", "children": ["child-1", "child-2"]
        }))
        .unwrap();
        assert_eq!(role, Role::Guardian);
        assert_eq!(
            relations.children.iter().collect::<Vec<_>>(),
            ["child-1", "child-2"]
        );
        assert!(relations.roster.is_empty() && relations.school.is_none());
    }

    #[test]
    fn roles_come_from_a_dotted_path_and_other_values_are_ignored() {
        let names = ClaimNames {
            role: "realm_access.roles".into(),
            ..ClaimNames::default()
        };
        let claims = json!({
            "realm_access": {"roles": ["offline_access", "uma_authorization", "teacher"]},
            "classes": "4B", "roster": ["c1", "c2"]
        });
        let (role, relations) = read(&claims, &names, &BTreeMap::new()).unwrap();
        assert_eq!(role, Role::Teacher);
        assert!(relations.classes.contains("4B"));
        assert_eq!(relations.roster.len(), 2);
    }

    #[test]
    fn tokens_without_one_usable_role_or_with_bad_relations_are_refused() {
        for (claims, expected) in [
            (json!({}), "no flagstream role"),
            (json!({"flagstream_role": "client"}), "no flagstream role"),
            (
                json!({"flagstream_role": ["superuser"]}),
                "no flagstream role",
            ),
            (json!({"flagstream_role": 7}), "no flagstream role"),
            (
                json!({"flagstream_role": ["guardian", "teacher"]}),
                "more than one",
            ),
            (
                json!({"flagstream_role": "guardian", "children": [1, 2]}),
                "children claim",
            ),
            (
                json!({"flagstream_role": "guardian", "children": ["a\nb"]}),
                "children claim",
            ),
            (
                json!({"flagstream_role": "guardian", "children": ["x".repeat(300)]}),
                "children claim",
            ),
            (
                json!({"flagstream_role": "guardian", "children": vec!["c"; MAX_RELATION_IDS + 1]}),
                "children claim",
            ),
            (
                json!({"flagstream_role": "school_admin"}),
                "must carry the school",
            ),
            (
                json!({"flagstream_role": "school_admin", "school": ["s1"]}),
                "school claim",
            ),
        ] {
            let err = read_default(claims.clone()).unwrap_err().to_string();
            assert!(err.contains(expected), "{claims}: {err}");
        }
    }
}
