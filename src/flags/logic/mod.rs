//! JsonLogic with flagd's operators (`fractional`, `sem_ver`, `starts_with`, `ends_with`),
//! compiled once when a flag file loads ([`compile`]) and evaluated per request without
//! re-parsing ([`evaluate`]).
//!
//! Evaluation borrows from the rule and from the request's context (`Cow`), so most rules
//! allocate nothing. Errors inside operators give `null`, as in flagd, which selects the
//! default variant.

mod compile;
mod evaluate;

use std::collections::BTreeMap;

use serde_json::Value;

pub use compile::compile;
pub use evaluate::{Out, truthy};

/// The deepest nesting a rule may have; deeper rules are rejected when the file loads.
pub const MAX_DEPTH: usize = 64;

/// Why a targeting rule could not be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    /// An operator JsonLogic and flagd do not define.
    #[error("unknown operator {0:?}")]
    UnknownOperator(String),
    /// `$ref` to an evaluator that does not exist.
    #[error("$ref to unknown evaluator {0:?}")]
    UnknownRef(String),
    /// `$ref` chains that loop.
    #[error("$ref cycle through evaluator {0:?}")]
    RefCycle(String),
    /// An operator with the wrong number or kind of arguments.
    #[error("{operator}: {problem}")]
    BadArguments {
        /// The operator.
        operator: &'static str,
        /// What is wrong.
        problem: &'static str,
    },
    /// The rule nests deeper than [`MAX_DEPTH`].
    #[error("rule nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

/// What a rule can see while it is evaluated.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The evaluation context (an object), or the current item inside `map`, `filter`, ….
    pub data: &'a Value,
    /// The key of the flag being evaluated (`$flagd.flagKey`).
    pub flag_key: &'a str,
    /// Seconds since the Unix epoch (`$flagd.timestamp`).
    pub timestamp: i64,
    /// The context's `targetingKey`, used by `fractional` when no bucketing value is given.
    pub targeting_key: Option<&'a str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compare {
    Less,
    LessEq,
    Greater,
    GreaterEq,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arith {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArrayOp {
    Map,
    Filter,
    All,
    None,
    Some,
}

/// A compiled rule.
#[derive(Debug, Clone, PartialEq)]
pub enum Rule {
    /// A constant.
    Literal(Value),
    /// An array whose items are not all constants.
    List(Vec<Rule>),
    /// `var` with a constant path (segments) and an optional default.
    Var(Vec<String>, Option<Box<Rule>>),
    /// `var` whose path is computed.
    DynamicVar(Box<Rule>, Option<Box<Rule>>),
    /// `$flagd.flagKey`.
    FlagKey,
    /// `$flagd.timestamp`.
    Timestamp,
    /// `missing`.
    Missing(Vec<Rule>),
    /// `missing_some`.
    MissingSome(Box<Rule>, Box<Rule>),
    /// `if` and `?:`.
    If(Vec<Rule>),
    /// `==`, `===`, `!=`, `!==`: (left, right, strict, negated).
    Equals(Box<Rule>, Box<Rule>, bool, bool),
    /// `!`.
    Not(Box<Rule>),
    /// `!!`.
    Truthy(Box<Rule>),
    /// `and`.
    And(Vec<Rule>),
    /// `or`.
    Or(Vec<Rule>),
    /// `<`, `<=` (with an optional third argument for "between"), `>`, `>=`.
    Compare(CompareRule),
    /// `+`, `-`, `*`, `/`, `%`.
    Arith(ArithRule),
    /// `max` (true) and `min` (false).
    Extremum(bool, Vec<Rule>),
    /// `in`.
    In(Box<Rule>, Box<Rule>),
    /// `cat`.
    Cat(Vec<Rule>),
    /// `substr`.
    Substr(Vec<Rule>),
    /// `merge`.
    Merge(Vec<Rule>),
    /// `map`, `filter`, `all`, `none`, `some`.
    Array(ArrayRule),
    /// `starts_with` (true) and `ends_with` (false).
    Affix(bool, Vec<Rule>),
    /// `sem_ver`.
    SemVer(Vec<Rule>),
    /// `fractional`.
    Fractional(Fractional),
}

/// A comparison rule.
#[derive(Debug, Clone, PartialEq)]
pub struct CompareRule {
    op: Compare,
    args: Vec<Rule>,
}

/// An arithmetic rule.
#[derive(Debug, Clone, PartialEq)]
pub struct ArithRule {
    op: Arith,
    args: Vec<Rule>,
}

/// An array rule.
#[derive(Debug, Clone, PartialEq)]
pub struct ArrayRule {
    op: ArrayOp,
    array: Box<Rule>,
    each: Box<Rule>,
}

/// `fractional`: an optional bucketing value and the weighted buckets.
#[derive(Debug, Clone, PartialEq)]
pub struct Fractional {
    bucket_by: Option<Box<Rule>>,
    buckets: Vec<(Rule, Rule)>,
    /// The weights when every one is a constant, so evaluation does not recompute them.
    constant_weights: Option<Vec<u64>>,
}

/// Named rules (`$evaluators`) that `{"$ref": name}` refers to.
pub type Evaluators = BTreeMap<String, Value>;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(rule: Value, data: Value) -> Value {
        let rule = compile(&rule, &Evaluators::new()).unwrap();
        let ctx = Context {
            data: &data,
            flag_key: "flag",
            timestamp: 1_700_000_000,
            targeting_key: data.get("targetingKey").and_then(Value::as_str),
        };
        rule.evaluate(&ctx).into_owned()
    }

    #[test]
    fn jsonlogic_basics() {
        assert_eq!(run(json!({"var": "a.b"}), json!({"a": {"b": 3}})), json!(3));
        assert_eq!(run(json!({"var": ["x", 7]}), json!({})), json!(7));
        assert_eq!(run(json!({"==": [1, "1"]}), json!({})), json!(true));
        assert_eq!(run(json!({"===": [1, "1"]}), json!({})), json!(false));
        assert_eq!(run(json!({"!=": ["a", "b"]}), json!({})), json!(true));
        assert_eq!(
            run(json!({"if": [false, 1, true, 2, 3]}), json!({})),
            json!(2)
        );
        assert_eq!(run(json!({"if": [false, 1]}), json!({})), Value::Null);
        assert_eq!(run(json!({"and": [true, 0, 5]}), json!({})), json!(0));
        assert_eq!(run(json!({"or": [false, "", "x"]}), json!({})), json!("x"));
        assert_eq!(run(json!({"<": [1, 2, 3]}), json!({})), json!(true));
        assert_eq!(run(json!({">=": ["b", "a"]}), json!({})), json!(true));
        assert_eq!(run(json!({"+": [1, "2", 3.5]}), json!({})), json!(6.5));
        assert_eq!(run(json!({"-": [5]}), json!({})), json!(-5));
        assert_eq!(run(json!({"/": [1, 0]}), json!({})), Value::Null);
        assert_eq!(run(json!({"max": [1, 9, 3]}), json!({})), json!(9));
        assert_eq!(
            run(json!({"in": ["b", ["a", "b"]]}), json!({})),
            json!(true)
        );
        assert_eq!(run(json!({"in": ["ell", "hello"]}), json!({})), json!(true));
        assert_eq!(
            run(json!({"cat": ["a", 1, true]}), json!({})),
            json!("a1true")
        );
        assert_eq!(
            run(json!({"substr": ["reading", -3]}), json!({})),
            json!("ing")
        );
        assert_eq!(
            run(json!({"substr": ["reading", 1, 3]}), json!({})),
            json!("ead")
        );
        assert_eq!(
            run(json!({"missing": ["a", "b"]}), json!({"a": 1})),
            json!(["b"])
        );
        assert_eq!(
            run(json!({"missing_some": [1, ["a", "b"]]}), json!({"a": 1})),
            json!([])
        );
        assert_eq!(run(json!({"!": [[]]}), json!({})), json!(true));
        assert_eq!(run(json!({"!!": ["0"]}), json!({})), json!(true));
        assert_eq!(
            run(
                json!({"filter": [{"var": "xs"}, {">": [{"var": ""}, 1]}]}),
                json!({"xs": [1, 2, 3]})
            ),
            json!([2, 3])
        );
        assert_eq!(
            run(
                json!({"all": [{"var": "xs"}, {">": [{"var": ""}, 0]}]}),
                json!({"xs": [1, 2]})
            ),
            json!(true)
        );
        assert_eq!(
            run(json!({"var": "$flagd.flagKey"}), json!({})),
            json!("flag")
        );
        assert_eq!(
            run(json!({"merge": [[1], 2, [3, [4]]]}), json!({})),
            json!([1, 2, 3, [4]])
        );
    }

    #[test]
    fn arrays_with_rules_inside_evaluate_each_item() {
        assert_eq!(
            run(json!([{"var": "a"}, 2, [3]]), json!({"a": 1})),
            json!([1, 2, [3]])
        );
    }

    #[test]
    fn flagd_operators_give_null_on_bad_input() {
        assert_eq!(
            run(json!({"starts_with": [{"var": "n"}, "a"]}), json!({"n": 1})),
            Value::Null
        );
        assert_eq!(run(json!({"ends_with": ["abc"]}), json!({})), Value::Null);
        assert_eq!(
            run(json!({"sem_ver": ["1.0.0", "="]}), json!({})),
            Value::Null
        );
        assert_eq!(
            run(json!({"sem_ver": [1.2, ">", "1.1"]}), json!({})),
            json!(true)
        );
        assert_eq!(
            run(
                json!({"fractional": [{"var": "nope"}, ["a", 1]]}),
                json!({})
            ),
            Value::Null
        );
        assert_eq!(
            run(json!({"fractional": [["a", 1]]}), json!({})),
            Value::Null,
            "no targeting key, no bucketing value"
        );
    }

    #[test]
    fn compile_errors_are_specific() {
        let evaluators: Evaluators = [("loop".to_string(), json!({"$ref": "loop"}))]
            .into_iter()
            .collect();
        assert_eq!(
            compile(&json!({"nope": [1]}), &evaluators),
            Err(CompileError::UnknownOperator("nope".into()))
        );
        assert_eq!(
            compile(&json!({"$ref": "missing"}), &evaluators),
            Err(CompileError::UnknownRef("missing".into()))
        );
        assert_eq!(
            compile(&json!({"$ref": "loop"}), &evaluators),
            Err(CompileError::RefCycle("loop".into()))
        );
        let mut deep = json!(true);
        for _ in 0..100 {
            deep = json!({"!": [deep]});
        }
        assert_eq!(compile(&deep, &evaluators), Err(CompileError::TooDeep));
        assert!(compile(&json!({"fractional": []}), &evaluators).is_err());
        assert!(compile(&json!({"==": [1]}), &evaluators).is_err());
    }
}
