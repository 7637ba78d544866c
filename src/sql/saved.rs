//! Saved queries: `queries/<name>.sql`, each one read-only statement, with `$param`
//! placeholders filled from the request.
//!
//! The leading `--` comment lines describe the query; lines `-- @param name=default text`
//! (or `-- @param name text` for a required one) declare its parameters.

use std::path::Path;

use datafusion::sql::sqlparser::ast::Statement;
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;

/// A named query from the queries directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedQuery {
    /// The file name without `.sql`.
    pub name: String,
    /// The query text.
    pub sql: String,
    /// What it answers, from its leading comment.
    pub description: String,
    /// Its declared parameters.
    pub params: Vec<Param>,
}

/// A declared parameter of a saved query.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Param {
    /// The name (`$name` in the query).
    pub name: String,
    /// The value used when the request gives none; `None` makes it required.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    /// What it means.
    pub description: String,
}

impl SavedQuery {
    /// Reads the description and parameters from the leading comment of `sql`.
    pub fn new(name: String, sql: String) -> Result<Self, String> {
        let mut description = Vec::new();
        let mut params: Vec<Param> = Vec::new();
        for line in sql.lines() {
            let Some(comment) = line.trim().strip_prefix("--") else {
                if line.trim().is_empty() {
                    continue;
                }
                break;
            };
            let comment = comment.trim();
            match comment.strip_prefix("@param") {
                Some(declaration) => {
                    let declaration = declaration.trim();
                    let (head, text) = declaration
                        .split_once(char::is_whitespace)
                        .unwrap_or((declaration, ""));
                    let (name, default) = match head.split_once('=') {
                        Some((name, default)) => (name, Some(default.to_owned())),
                        None => (head, None),
                    };
                    if name.is_empty()
                        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                    {
                        return Err(format!(
                            "@param {head:?}: a name is letters, digits and '_'"
                        ));
                    }
                    if params.iter().any(|p| p.name == name) {
                        return Err(format!("@param {name} is declared twice"));
                    }
                    params.push(Param {
                        name: name.to_owned(),
                        default,
                        description: text.trim().to_owned(),
                    });
                }
                None if !comment.is_empty() => description.push(comment.to_owned()),
                None => {}
            }
        }
        Ok(Self {
            name,
            sql,
            description: description.join(" "),
            params,
        })
    }

    /// Returns the values to bind: the request's, then defaults; an error names a missing
    /// required parameter or one the query does not declare.
    pub fn bind(
        &self,
        given: &std::collections::BTreeMap<String, String>,
    ) -> Result<std::collections::BTreeMap<String, String>, String> {
        if let Some(unknown) = given
            .keys()
            .find(|k| !self.params.iter().any(|p| &p.name == *k))
        {
            let declared: Vec<_> = self.params.iter().map(|p| p.name.as_str()).collect();
            return Err(format!(
                "{:?} takes no parameter {unknown:?} (it takes: {})",
                self.name,
                if declared.is_empty() {
                    "none".to_owned()
                } else {
                    declared.join(", ")
                }
            ));
        }
        self.params
            .iter()
            .map(|param| {
                let value = given
                    .get(&param.name)
                    .or(param.default.as_ref())
                    .ok_or_else(|| format!("{:?} needs parameter {:?}", self.name, param.name))?;
                Ok((param.name.clone(), value.clone()))
            })
            .collect()
    }
}

/// A problem with one saved query.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {reason}")]
pub struct SavedQueryError {
    /// The file.
    pub file: String,
    /// What is wrong.
    pub reason: String,
}

/// Checks one saved query: a valid name and exactly one read-only `SELECT`.
pub fn check(name: &str, sql: &str) -> Result<(), String> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        return Err("the name must use only a-z, 0-9, '_' and '-'".into());
    }
    let statements = Parser::parse_sql(&GenericDialect {}, sql).map_err(|e| e.to_string())?;
    match statements.as_slice() {
        [Statement::Query(_)] => Ok(()),
        [] => Err("the file holds no statement".into()),
        [_] => Err("only a read-only query (SELECT or WITH) may be saved".into()),
        _ => Err("a saved query holds exactly one statement".into()),
    }
}

/// Reads and checks every `*.sql` file of `dir`; a missing directory holds none.
pub fn read_dir(dir: &Path) -> (Vec<SavedQuery>, Vec<SavedQueryError>) {
    let mut queries = Vec::new();
    let mut problems = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return (queries, problems),
        Err(err) => {
            let file = dir.display().to_string();
            let reason = format!("cannot read directory: {err}");
            return (queries, vec![SavedQueryError { file, reason }]);
        }
    };
    let mut paths: Vec<_> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "sql"))
        .collect();
    paths.sort();
    for path in paths {
        let file = path.display().to_string();
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let result = std::fs::read_to_string(&path)
            .map_err(|err| format!("cannot read: {err}"))
            .and_then(|sql| check(&name, &sql).map(|()| sql))
            .and_then(|sql| SavedQuery::new(name, sql));
        match result {
            Ok(query) => queries.push(query),
            Err(reason) => problems.push(SavedQueryError { file, reason }),
        }
    }
    (queries, problems)
}

#[cfg(test)]
mod tests {
    use super::{SavedQuery, check};

    #[test]
    fn only_single_selects_are_accepted() {
        assert!(check("daily", "SELECT count(*) FROM events WHERE day = $day").is_ok());
        assert!(check("w", "WITH a AS (SELECT 1) SELECT * FROM a").is_ok());
        assert!(check("drop", "DROP TABLE events").is_err());
        assert!(check("two", "SELECT 1; SELECT 2").is_err());
        assert!(check("bad", "SELEC 1").is_err());
        assert!(check("Bad Name", "SELECT 1").is_err());
        assert!(check("empty", "  ").is_err());
    }

    #[test]
    fn leading_comments_describe_the_query_and_declare_parameters() {
        let sql = "-- Events per platform\n-- in the last hours.\n-- @param hours=1 How far back.\n\
                   -- @param platform Which platform.\nSELECT 1 -- not a comment line\n-- @param late=2 x";
        let query = SavedQuery::new("p".into(), sql.into()).unwrap();
        assert_eq!(query.description, "Events per platform in the last hours.");
        let names: Vec<_> = query
            .params
            .iter()
            .map(|p| (p.name.as_str(), p.default.as_deref()))
            .collect();
        assert_eq!(names, vec![("hours", Some("1")), ("platform", None)]);
        let given = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let bound = query.bind(&given(&[("platform", "ios")])).unwrap();
        assert_eq!(bound, given(&[("hours", "1"), ("platform", "ios")]));
        assert!(
            query
                .bind(&given(&[]))
                .unwrap_err()
                .contains("\"platform\"")
        );
        assert!(
            query
                .bind(&given(&[("platform", "a"), ("day", "1")]))
                .unwrap_err()
                .contains("day")
        );
        assert!(
            SavedQuery::new("p".into(), "-- @param a b\n-- @param a c\nSELECT 1".into()).is_err()
        );
        assert!(SavedQuery::new("p".into(), "-- @param a-b\nSELECT 1".into()).is_err());
    }
}
