//! What a scoped caller (school staff, researchers) may see: the events of its school or
//! class only (researchers: of every school), and only aggregates over groups of at least
//! `min_group` children.
//!
//! Two guards, both beneath the query text. The session's `events` table is a view that
//! filters on the scope's context key, so no query can reach another school's rows. And the
//! plan must be one aggregation over `events`, which is rewritten to count the distinct
//! children of every group and leave out groups of fewer than `min_group`; the aggregates
//! themselves may not reveal an identifier (no `min(subject)`, no `array_agg`, no grouping by
//! device). Pure: plans in, plans out.

use std::sync::Arc;

use datafusion::catalog::TableProvider;
use datafusion::catalog::default_table_source::provider_as_source;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, DFSchema};
use datafusion::datasource::ViewTable;
use datafusion::functions_aggregate::expr_fn::count_distinct;
use datafusion::logical_expr::{Aggregate, Expr, LogicalPlan, LogicalPlanBuilder, col, lit};

use super::SqlError;

/// The columns that name a child, a device or a session.
const IDENTIFIERS: [&str; 3] = ["subject", "device_id", "session_id"];

/// Aggregates a scoped token may use; only the counting ones may take an identifier.
const AGGREGATES: [&str; 14] = [
    "count",
    "sum",
    "avg",
    "mean",
    "min",
    "max",
    "median",
    "stddev",
    "stddev_pop",
    "var",
    "var_pop",
    "approx_distinct",
    "approx_median",
    "approx_percentile_cont",
];
const COUNTING: [&str; 2] = ["count", "approx_distinct"];

/// The output column that carries a group's distinct children, removed before the answer.
const CHILDREN: &str = "__flagstream_children";

/// A scoped caller's view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// The context column that names the school or class, and its id; `None` for every
    /// school (a researcher: aggregates only, over all rows).
    pub rows: Option<(&'static str, String)>,
    /// The fewest children a group may have and be answered.
    pub min_group: usize,
}

impl Scope {
    /// The `events` table as the scope sees it: a view over `events` that keeps its rows only.
    pub fn events(
        &self,
        events: Arc<dyn TableProvider>,
    ) -> Result<Arc<dyn TableProvider>, SqlError> {
        let Some((column, value)) = &self.rows else {
            return Ok(events);
        };
        let plan = LogicalPlanBuilder::scan("events", provider_as_source(events), None)?
            .filter(col(*column).eq(lit(value.clone())))?
            .build()?;
        Ok(Arc::new(ViewTable::new(plan, None)))
    }

    /// Checks that `plan` is one aggregation over `events` that reveals no identifier, and
    /// leaves out its groups of fewer than `min_group` children.
    pub fn restrict(&self, plan: LogicalPlan) -> Result<LogicalPlan, SqlError> {
        // EXPLAIN ANALYZE would show the rows of every group before any is left out.
        if matches!(
            plan,
            LogicalPlan::Explain(_) | LogicalPlan::Analyze(_) | LogicalPlan::DescribeTable(_)
        ) {
            return Err(forbidden("EXPLAIN and DESCRIBE are not answered".into()));
        }
        let (mut scans, mut aggregates, mut other_table, mut problem) = (0, 0, None, None);
        plan.apply_with_subqueries(|node| {
            match node {
                LogicalPlan::TableScan(scan) => {
                    scans += 1;
                    if scan.table_name.table() != "events" {
                        other_table = Some(scan.table_name.to_string());
                    }
                }
                LogicalPlan::Aggregate(aggregate) => {
                    aggregates += 1;
                    if let Err(why) = check_aggregate(aggregate) {
                        problem.get_or_insert(why);
                    }
                }
                _ => {}
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
        if let Some(table) = other_table {
            return Err(forbidden(format!("it reads {table}")));
        }
        if scans != 1 || aggregates != 1 {
            return Err(forbidden(
                "it must be one aggregation (GROUP BY, or count(*) and the like) over events"
                    .into(),
            ));
        }
        if let Some(why) = problem {
            return Err(forbidden(why));
        }
        let min_group = self.min_group as i64;
        let restricted = plan.transform_up(|node| match node {
            LogicalPlan::Aggregate(aggregate) => {
                Ok(Transformed::yes(restrict_aggregate(aggregate, min_group)?))
            }
            other => Ok(Transformed::no(other)),
        })?;
        Ok(restricted.data)
    }
}

fn forbidden(why: String) -> SqlError {
    SqlError::Forbidden(format!(
        "a token scoped to a school or class may run aggregations over events only, and sees no group of fewer children than allowed; this query is refused: {why}"
    ))
}

fn names_identifier(expr: &Expr) -> Option<&'static str> {
    expr.column_refs()
        .iter()
        .find_map(|c| IDENTIFIERS.iter().find(|i| **i == c.name).copied())
}

/// Why `aggregate` may not be answered to a scoped token, if it may not.
fn check_aggregate(aggregate: &Aggregate) -> Result<(), String> {
    let refuse = Err;
    // Beneath the aggregation: only filters of the events table.
    let mut below = aggregate.input.as_ref();
    loop {
        match below {
            LogicalPlan::Filter(filter) => below = filter.input.as_ref(),
            LogicalPlan::SubqueryAlias(alias) => below = alias.input.as_ref(),
            LogicalPlan::TableScan(_) => break,
            other => {
                return refuse(format!(
                    "the aggregation reads a {} rather than the events table",
                    other.display()
                ));
            }
        }
    }
    for group in &aggregate.group_expr {
        if let Some(column) = names_identifier(group) {
            return refuse(format!("it groups by {column}"));
        }
    }
    for expr in &aggregate.aggr_expr {
        let Expr::AggregateFunction(function) = expr.clone().unalias() else {
            return refuse("an aggregate expression is not a plain aggregate".into());
        };
        let name = function.func.name().to_ascii_lowercase();
        if !AGGREGATES.contains(&name.as_str()) {
            return refuse(format!(
                "{name} is not allowed (use count, sum, avg, min, max and the like)"
            ));
        }
        // An identifier may only be counted as it is: `count(CASE WHEN subject = …)` or a
        // FILTER on one would single a child out.
        if let Some(column) = function.params.filter.as_deref().and_then(names_identifier) {
            return refuse(format!("a FILTER on {column} would single a child out"));
        }
        for arg in &function.params.args {
            let Some(column) = names_identifier(arg) else {
                continue;
            };
            if !COUNTING.contains(&name.as_str()) {
                return refuse(format!("{name} of {column} would reveal it"));
            }
            if !matches!(arg, Expr::Column(_)) {
                return refuse(format!(
                    "{column} may be counted only as it is, not through an expression"
                ));
            }
        }
    }
    Ok(())
}

/// Counts the distinct children of every group of `aggregate` and leaves out the groups of
/// fewer than `min_group`; the output is as before.
fn restrict_aggregate(
    aggregate: Aggregate,
    min_group: i64,
) -> datafusion::error::Result<LogicalPlan> {
    let subject = subject_column(aggregate.input.schema())?;
    let output: Vec<Expr> = aggregate
        .schema
        .iter()
        .map(|(qualifier, field)| Expr::Column(Column::from((qualifier, field))))
        .collect();
    let mut aggr_expr = aggregate.aggr_expr.clone();
    aggr_expr.push(count_distinct(Expr::Column(subject)).alias(CHILDREN));
    let counted = Aggregate::try_new(
        aggregate.input.clone(),
        aggregate.group_expr.clone(),
        aggr_expr,
    )?;
    LogicalPlanBuilder::from(LogicalPlan::Aggregate(counted))
        .filter(col(CHILDREN).gt_eq(lit(min_group)))?
        .project(output)?
        .build()
}

fn subject_column(schema: &DFSchema) -> datafusion::error::Result<Column> {
    let (qualifier, field) = schema.qualified_field_with_unqualified_name("subject")?;
    Ok(Column::from((qualifier, field)))
}
