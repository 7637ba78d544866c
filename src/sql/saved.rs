//! Saved queries: `queries/<name>.sql`, each one read-only statement, with `$param`
//! placeholders filled from the request.

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
            .and_then(|sql| check(&name, &sql).map(|()| sql));
        match result {
            Ok(sql) => queries.push(SavedQuery { name, sql }),
            Err(reason) => problems.push(SavedQueryError { file, reason }),
        }
    }
    (queries, problems)
}

#[cfg(test)]
mod tests {
    use super::check;

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
}
