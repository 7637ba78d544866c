//! The SQL that counts an experiment's variants over the raw events, and reading its answer.
//!
//! A subject belongs to the variant of its first exposure in event time (server-side
//! exposures and client `$exposure` events alike) within the range; its goal events and
//! ended sessions count from that exposure on. Event time, not arrival order, so that a
//! tablet syncing a week of events late is counted as the child lived it.

use std::collections::BTreeMap;

use datafusion::arrow::array::{Array, Float64Array, Int64Array, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;

use super::results::VariantCounts;
use super::stats::Summary;
use crate::events::schema::SESSION_ENDED_TYPE;
use crate::events::time::format_rfc3339;
use crate::sql::QueryResult;

/// The query for an experiment with `goals` goals; its parameters come from [`params`].
pub fn sql(goals: usize) -> String {
    let goal_params: Vec<String> = (0..goals).map(|i| format!("$goal_{i}")).collect();
    let flags: String = (0..goals)
        .map(|i| format!("max(CASE WHEN e.type = $goal_{i} THEN 1 ELSE 0 END) AS goal_{i},\n"))
        .collect();
    let sums: String = (0..goals)
        .map(|i| format!("sum(coalesce(a.goal_{i}, 0)) AS goal_{i},\n"))
        .collect();
    format!(
        "WITH exposed AS (
    SELECT subject,
           first_value(variant ORDER BY event_time, received_at) AS variant,
           min(event_time) AS exposed_at,
           count(DISTINCT variant) AS variants
    FROM exposures
    WHERE flag = $experiment AND subject IS NOT NULL AND variant IS NOT NULL
      AND event_time >= $from AND event_time < $to
    GROUP BY subject
),
activity AS (
    SELECT e.subject,
{flags}           sum(CASE WHEN e.type = '{SESSION_ENDED_TYPE}'
                    THEN greatest(coalesce(try_cast(e.properties['duration_ms'] AS BIGINT), 0), 0)
                    ELSE 0 END) AS time_spent
    FROM events e JOIN exposed x ON e.subject = x.subject
    WHERE e.type IN ({goals}'{SESSION_ENDED_TYPE}')
      AND e.event_time >= $from AND e.event_time < $to AND e.event_time >= x.exposed_at
    GROUP BY e.subject
)
SELECT x.variant AS variant,
       count(*) AS exposed,
{sums}       avg(CAST(coalesce(a.time_spent, 0) AS DOUBLE)) AS time_mean,
       var_samp(CAST(coalesce(a.time_spent, 0) AS DOUBLE)) AS time_variance,
       sum(CASE WHEN x.variants > 1 THEN 1 ELSE 0 END) AS multiple_variants
FROM exposed x LEFT JOIN activity a ON a.subject = x.subject
GROUP BY x.variant
ORDER BY x.variant",
        goals = goal_params
            .iter()
            .map(|p| format!("{p}, "))
            .collect::<String>(),
    )
}

/// The parameters of [`sql`]: the experiment, its goals and the range `[from, to)` in ms.
pub fn params(experiment: &str, goals: &[String], from: i64, to: i64) -> BTreeMap<String, String> {
    let mut params = BTreeMap::from([
        ("experiment".to_owned(), experiment.to_owned()),
        ("from".to_owned(), format_rfc3339(from)),
        ("to".to_owned(), format_rfc3339(to)),
    ]);
    for (i, goal) in goals.iter().enumerate() {
        params.insert(format!("goal_{i}"), goal.clone());
    }
    params
}

/// Reads the per-variant counts from the query's answer.
pub fn counts(result: &QueryResult, goals: usize) -> Result<Vec<VariantCounts>, String> {
    let mut out = Vec::new();
    for batch in &result.batches {
        let column = |name: &str, data_type: &DataType| {
            let array = batch
                .column_by_name(name)
                .ok_or_else(|| format!("the experiment query has no column {name}"))?;
            cast(array, data_type).map_err(|e| format!("column {name}: {e}"))
        };
        let variant = column("variant", &DataType::Utf8)?;
        let variant = downcast::<StringArray>(&variant)?;
        let int = |name: &str| column(name, &DataType::Int64);
        let exposed = int("exposed")?;
        let exposed = downcast::<Int64Array>(&exposed)?;
        let multiple = int("multiple_variants")?;
        let multiple = downcast::<Int64Array>(&multiple)?;
        let mean = column("time_mean", &DataType::Float64)?;
        let mean = downcast::<Float64Array>(&mean)?;
        let variance = column("time_variance", &DataType::Float64)?;
        let variance = downcast::<Float64Array>(&variance)?;
        let goal_columns = (0..goals)
            .map(|i| int(&format!("goal_{i}")))
            .collect::<Result<Vec<_>, _>>()?;
        let goal_columns = goal_columns
            .iter()
            .map(|c| downcast::<Int64Array>(c))
            .collect::<Result<Vec<_>, _>>()?;
        let count = |array: &Int64Array, row: usize| -> u64 {
            if array.is_null(row) {
                0
            } else {
                array.value(row).max(0) as u64
            }
        };
        for row in 0..batch.num_rows() {
            let exposed = count(exposed, row);
            out.push(VariantCounts {
                variant: variant.value(row).to_owned(),
                exposed,
                converted: goal_columns.iter().map(|c| count(c, row)).collect(),
                time_spent: Summary {
                    n: exposed,
                    mean: if mean.is_null(row) {
                        0.0
                    } else {
                        mean.value(row)
                    },
                    variance: if variance.is_null(row) {
                        0.0
                    } else {
                        variance.value(row)
                    },
                },
                multiple_variants: count(multiple, row),
            });
        }
    }
    Ok(out)
}

fn downcast<T: 'static>(array: &dyn Array) -> Result<&T, String> {
    array
        .as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| "the experiment query answered an unexpected type".to_owned())
}
