//! Whether a child belongs to a school, as the recent events tell: the relation a school
//! admin's requests are checked against (an identity provider names the school, not its
//! pupils).

use std::collections::BTreeMap;

use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::Int64Type;

use super::SqlError;
use super::engine::SqlEngine;

impl SqlEngine {
    /// Whether the SQL window holds an event of one of `subjects` (a child's pseudonyms)
    /// whose context `column` (`school_id`) is `value`.
    pub async fn holds_subject_in(
        &self,
        subjects: &[String],
        column: &'static str,
        value: &str,
    ) -> Result<bool, SqlError> {
        if subjects.is_empty() {
            return Ok(false);
        }
        let mut params = BTreeMap::from([("value".to_owned(), value.to_owned())]);
        let mut alternatives = Vec::with_capacity(subjects.len());
        for (i, subject) in subjects.iter().enumerate() {
            params.insert(format!("s{i}"), subject.clone());
            alternatives.push(format!("subject = $s{i}"));
        }
        let sql = format!(
            "SELECT count(*) AS n FROM events WHERE {column} = $value AND ({})",
            alternatives.join(" OR ")
        );
        let result = self.run(&sql, &params, None).await?;
        let seen = result
            .batches
            .iter()
            .find(|batch| batch.num_rows() > 0)
            .is_some_and(|batch| batch.column(0).as_primitive::<Int64Type>().value(0) > 0);
        Ok(seen)
    }
}
