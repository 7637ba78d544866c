//! The caller as every handler sees it: a static token (app installations, operators) or a
//! verified identity with its relations. Handlers ask it what it may do ("may act for this
//! child?") instead of comparing roles.

use std::sync::Arc;

use super::claims::Relations;
use crate::config::{Role, TokenScope};

/// A verified OpenID Connect identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The issuer (`iss`), as configured.
    pub issuer: Arc<str>,
    /// The subject (`sub`) at that issuer. Personal data: never logged or stored as is
    /// (see [`Identity::account`]).
    pub subject: String,
    /// Whom the identity is related to.
    pub relations: Relations,
    /// How records name this person: the reference of the pseudonym of
    /// [`Identity::account`] (`r_` and 32 hex characters).
    pub reference: String,
}

impl Identity {
    /// The text that names this person across issuers (`<iss>#<sub>`), to be pseudonymized
    /// before it is kept anywhere (the consent ledger's guardian, the request journal's
    /// requester).
    pub fn account(&self) -> String {
        format!("{}#{}", self.issuer, self.subject)
    }
}

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// How logs and the audit trail name the caller: the token's configured name, or for a
    /// verified identity `<role>:<reference>` (never its subject).
    pub name: Arc<str>,
    /// The role.
    pub role: Role,
    /// The school or class a scoped caller is limited to.
    pub scope: Option<TokenScope>,
    /// The project of a static token (`default` when its key names none); none when the
    /// API is open and for signed-in people.
    pub project: Option<Arc<str>>,
    /// For a signed-in person: the verified identity and its relations.
    pub identity: Option<Arc<Identity>>,
}

impl Principal {
    /// The caller of an API with no tokens configured (allowed on loopback only).
    pub fn anonymous() -> Self {
        Self {
            name: "anonymous".into(),
            role: Role::Admin,
            scope: None,
            project: None,
            identity: None,
        }
    }

    fn relations(&self) -> Option<&Relations> {
        self.identity.as_deref().map(|identity| &identity.relations)
    }

    /// Whether the caller may decide and file requests for the child `user_id` (a raw id,
    /// as the identity provider names children): privacy officers and admins for any
    /// child, a guardian for the children their token names.
    pub fn may_act_for(&self, user_id: &str) -> bool {
        match self.role {
            Role::Admin | Role::Privacy => true,
            Role::Guardian => self
                .relations()
                .is_some_and(|relations| relations.children.contains(user_id)),
            _ => false,
        }
    }

    /// Whether the caller may read about the child `user_id`: whoever may act for it, and
    /// a teacher for the children on their roster.
    pub fn may_read_child(&self, user_id: &str) -> bool {
        self.may_act_for(user_id)
            || (self.role == Role::Teacher
                && self
                    .relations()
                    .is_some_and(|relations| relations.roster.contains(user_id)))
    }

    /// Whether the caller may see the class `class_id`: a teacher of it, and the operators.
    pub fn may_see_class(&self, class_id: &str) -> bool {
        match self.role {
            Role::Admin | Role::Analyst => self.scope.is_none(),
            Role::Teacher => self
                .relations()
                .is_some_and(|relations| relations.classes.contains(class_id)),
            _ => false,
        }
    }

    /// Whether the caller sees only the requests they filed (a guardian, a school admin),
    /// rather than every request (a privacy officer).
    pub fn sees_own_requests_only(&self) -> bool {
        matches!(self.role, Role::Guardian | Role::SchoolAdmin)
    }

    /// The school a school admin acts for.
    pub fn school(&self) -> Option<&str> {
        match self.role {
            Role::SchoolAdmin => self.relations().and_then(|r| r.school.as_deref()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed_in(role: Role, relations: Relations) -> Principal {
        Principal {
            name: "t".into(),
            role,
            scope: None,
            project: None,
            identity: Some(Arc::new(Identity {
                issuer: "https://idp".into(),
                subject: "s".into(),
                relations,
                reference: "r_0".into(),
            })),
        }
    }

    #[test]
    fn guardians_act_for_their_own_children_and_teachers_read_their_roster() {
        let parent = signed_in(
            Role::Guardian,
            Relations {
                children: ["c1".to_owned()].into(),
                ..Relations::default()
            },
        );
        assert!(parent.may_act_for("c1") && parent.may_read_child("c1"));
        assert!(!parent.may_act_for("c2") && !parent.may_read_child("c2"));
        assert!(!parent.may_see_class("4B"));
        let teacher = signed_in(
            Role::Teacher,
            Relations {
                classes: ["4B".to_owned()].into(),
                roster: ["c1".to_owned()].into(),
                ..Relations::default()
            },
        );
        assert!(
            !teacher.may_act_for("c1"),
            "a teacher decides nothing for a child"
        );
        assert!(teacher.may_read_child("c1") && !teacher.may_read_child("c9"));
        assert!(teacher.may_see_class("4B") && !teacher.may_see_class("4C"));
        let officer = Principal {
            role: Role::Privacy,
            identity: None,
            ..parent.clone()
        };
        assert!(officer.may_act_for("anyone"));
        let researcher = signed_in(Role::Researcher, Relations::default());
        assert!(!researcher.may_act_for("c1") && !researcher.may_read_child("c1"));
        assert_eq!(
            signed_in(Role::Teacher, Relations::default()).account_of(),
            "https://idp#s"
        );
    }

    impl Principal {
        fn account_of(&self) -> String {
            self.identity.as_ref().unwrap().account()
        }
    }
}
