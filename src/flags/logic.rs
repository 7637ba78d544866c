//! JsonLogic with flagd's operators (`fractional`, `sem_ver`, `starts_with`, `ends_with`),
//! compiled once when a flag file loads and evaluated per request without re-parsing.
//!
//! Evaluation borrows from the rule and from the request's context (`Cow`), so most rules
//! allocate nothing. Errors inside operators give `null`, as in flagd, which selects the
//! default variant.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde_json::Value;

use super::bucket;
use super::semver;

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

/// Compiles a JsonLogic expression.
pub fn compile(value: &Value, evaluators: &Evaluators) -> Result<Rule, CompileError> {
    Compiler {
        evaluators,
        expanding: Vec::new(),
    }
    .compile(value, 0)
}

struct Compiler<'e> {
    evaluators: &'e Evaluators,
    expanding: Vec<String>,
}

fn args_of(value: &Value) -> Vec<&Value> {
    match value {
        Value::Array(items) => items.iter().collect(),
        other => vec![other],
    }
}

impl Compiler<'_> {
    fn compile(&mut self, value: &Value, depth: usize) -> Result<Rule, CompileError> {
        if depth > MAX_DEPTH {
            return Err(CompileError::TooDeep);
        }
        match value {
            Value::Array(items) => {
                let rules = self.all(items.iter(), depth)?;
                // An array of constants stays one constant.
                if rules.iter().all(|r| matches!(r, Rule::Literal(_))) {
                    Ok(Rule::Literal(Value::Array(
                        rules
                            .into_iter()
                            .map(|r| match r {
                                Rule::Literal(v) => v,
                                _ => unreachable!("checked above"),
                            })
                            .collect(),
                    )))
                } else {
                    Ok(Rule::List(rules))
                }
            }
            Value::Object(map) if map.len() == 1 => {
                let (operator, raw) = map.iter().next().expect("one entry");
                self.operator(operator, raw, depth + 1)
            }
            other => Ok(Rule::Literal(other.clone())),
        }
    }

    fn all<'v>(
        &mut self,
        values: impl Iterator<Item = &'v Value>,
        depth: usize,
    ) -> Result<Vec<Rule>, CompileError> {
        values.map(|v| self.compile(v, depth + 1)).collect()
    }

    fn operator(
        &mut self,
        operator: &str,
        raw: &Value,
        depth: usize,
    ) -> Result<Rule, CompileError> {
        let args = args_of(raw);
        let list = |c: &mut Self| c.all(args.iter().copied(), depth);
        let bad = |operator: &'static str, problem: &'static str| CompileError::BadArguments {
            operator,
            problem,
        };
        let rule = match operator {
            "$ref" => return self.reference(raw, depth),
            "var" => self.var(&args, depth)?,
            "missing" => Rule::Missing(list(self)?),
            "missing_some" => {
                let [need, keys] = self.exactly::<2>(&args, depth, "missing_some")?;
                Rule::MissingSome(Box::new(need), Box::new(keys))
            }
            "if" | "?:" => Rule::If(list(self)?),
            "==" | "===" | "!=" | "!==" => {
                let [left, right] = self.exactly::<2>(&args, depth, "==")?;
                let strict = operator.len() == 3;
                let negated = operator.starts_with('!');
                Rule::Equals(Box::new(left), Box::new(right), strict, negated)
            }
            "!" => Rule::Not(Box::new(self.first(&args, depth)?)),
            "!!" => Rule::Truthy(Box::new(self.first(&args, depth)?)),
            "and" => Rule::And(list(self)?),
            "or" => Rule::Or(list(self)?),
            "<" | "<=" | ">" | ">=" => {
                let op = match operator {
                    "<" => Compare::Less,
                    "<=" => Compare::LessEq,
                    ">" => Compare::Greater,
                    _ => Compare::GreaterEq,
                };
                let args = list(self)?;
                if !(2..=3).contains(&args.len()) {
                    return Err(bad("comparison", "takes two or three arguments"));
                }
                Rule::Compare(CompareRule { op, args })
            }
            "+" | "-" | "*" | "/" | "%" => {
                let op = match operator {
                    "+" => Arith::Add,
                    "-" => Arith::Sub,
                    "*" => Arith::Mul,
                    "/" => Arith::Div,
                    _ => Arith::Rem,
                };
                Rule::Arith(ArithRule {
                    op,
                    args: list(self)?,
                })
            }
            "max" => Rule::Extremum(true, list(self)?),
            "min" => Rule::Extremum(false, list(self)?),
            "in" => {
                let [needle, haystack] = self.exactly::<2>(&args, depth, "in")?;
                Rule::In(Box::new(needle), Box::new(haystack))
            }
            "cat" => Rule::Cat(list(self)?),
            "substr" => Rule::Substr(list(self)?),
            "merge" => Rule::Merge(list(self)?),
            "map" | "filter" | "all" | "none" | "some" => {
                let op = match operator {
                    "map" => ArrayOp::Map,
                    "filter" => ArrayOp::Filter,
                    "all" => ArrayOp::All,
                    "none" => ArrayOp::None,
                    _ => ArrayOp::Some,
                };
                let [array, each] = self.exactly::<2>(&args, depth, "array operator")?;
                Rule::Array(ArrayRule {
                    op,
                    array: Box::new(array),
                    each: Box::new(each),
                })
            }
            "starts_with" => Rule::Affix(true, list(self)?),
            "ends_with" => Rule::Affix(false, list(self)?),
            "sem_ver" => Rule::SemVer(list(self)?),
            "fractional" => Rule::Fractional(self.fractional(&args, depth)?),
            other => return Err(CompileError::UnknownOperator(other.to_owned())),
        };
        Ok(rule)
    }

    fn exactly<const N: usize>(
        &mut self,
        args: &[&Value],
        depth: usize,
        operator: &'static str,
    ) -> Result<[Rule; N], CompileError> {
        let rules = self.all(args.iter().copied(), depth)?;
        rules.try_into().map_err(|_| CompileError::BadArguments {
            operator,
            problem: "wrong number of arguments",
        })
    }

    fn first(&mut self, args: &[&Value], depth: usize) -> Result<Rule, CompileError> {
        match args.first() {
            Some(value) => self.compile(value, depth),
            None => Ok(Rule::Literal(Value::Null)),
        }
    }

    fn reference(&mut self, raw: &Value, depth: usize) -> Result<Rule, CompileError> {
        let Some(name) = raw.as_str() else {
            return Err(CompileError::BadArguments {
                operator: "$ref",
                problem: "takes the name of an evaluator",
            });
        };
        let target = self
            .evaluators
            .get(name)
            .ok_or_else(|| CompileError::UnknownRef(name.to_owned()))?;
        if self.expanding.iter().any(|n| n == name) {
            return Err(CompileError::RefCycle(name.to_owned()));
        }
        self.expanding.push(name.to_owned());
        let rule = self.compile(target, depth);
        self.expanding.pop();
        rule
    }

    fn var(&mut self, args: &[&Value], depth: usize) -> Result<Rule, CompileError> {
        let default = match args.get(1) {
            Some(value) => Some(Box::new(self.compile(value, depth)?)),
            None => None,
        };
        let path = match args.first() {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(other) => {
                let rule = self.compile(other, depth)?;
                return Ok(Rule::DynamicVar(Box::new(rule), default));
            }
        };
        Ok(match path.as_str() {
            "$flagd.flagKey" => Rule::FlagKey,
            "$flagd.timestamp" => Rule::Timestamp,
            "" => Rule::Var(Vec::new(), default),
            _ => Rule::Var(path.split('.').map(str::to_owned).collect(), default),
        })
    }

    fn fractional(&mut self, args: &[&Value], depth: usize) -> Result<Fractional, CompileError> {
        let bad = |problem| CompileError::BadArguments {
            operator: "fractional",
            problem,
        };
        let (bucket_by, rest) = match args.first() {
            Some(Value::Array(_)) => (None, args),
            Some(first) => (Some(Box::new(self.compile(first, depth)?)), &args[1..]),
            None => return Err(bad("needs at least one bucket")),
        };
        if rest.is_empty() {
            return Err(bad("needs at least one bucket"));
        }
        let mut buckets = Vec::with_capacity(rest.len());
        for bucket in rest {
            let Value::Array(parts) = bucket else {
                return Err(bad("each bucket is [variant, weight]"));
            };
            let (variant, weight) = match parts.as_slice() {
                [variant] => (variant, &Value::from(1)),
                [variant, weight] => (variant, weight),
                _ => return Err(bad("each bucket is [variant, weight]")),
            };
            buckets.push((self.compile(variant, depth)?, self.compile(weight, depth)?));
        }
        let constant_weights = buckets
            .iter()
            .map(|(_, weight)| match weight {
                Rule::Literal(value) => Some(bucket::weight_from(to_number(value).unwrap_or(0.0))),
                _ => None,
            })
            .collect();
        Ok(Fractional {
            bucket_by,
            buckets,
            constant_weights,
        })
    }
}

type Out<'a> = Cow<'a, Value>;

const NULL: Value = Value::Null;

impl Rule {
    /// Evaluates the rule against a context.
    pub fn evaluate<'a>(&'a self, ctx: &Context<'a>) -> Out<'a> {
        match self {
            Rule::Literal(value) => Cow::Borrowed(value),
            Rule::List(items) => Cow::Owned(Value::Array(
                items
                    .iter()
                    .map(|item| item.evaluate(ctx).into_owned())
                    .collect(),
            )),
            Rule::Var(path, default) => match lookup(ctx.data, path) {
                Some(value) => Cow::Borrowed(value),
                None => default
                    .as_ref()
                    .map_or(Cow::Borrowed(&NULL), |d| d.evaluate(ctx)),
            },
            Rule::DynamicVar(path, default) => {
                let path = path.evaluate(ctx);
                let text = to_text(&path);
                let segments: Vec<String> = if text.is_empty() {
                    Vec::new()
                } else {
                    text.split('.').map(str::to_owned).collect()
                };
                match lookup(ctx.data, &segments) {
                    Some(value) => Cow::Borrowed(value),
                    None => default
                        .as_ref()
                        .map_or(Cow::Borrowed(&NULL), |d| d.evaluate(ctx)),
                }
            }
            Rule::FlagKey => Cow::Owned(Value::String(ctx.flag_key.to_owned())),
            Rule::Timestamp => Cow::Owned(Value::from(ctx.timestamp)),
            Rule::Missing(keys) => Cow::Owned(missing(keys, ctx)),
            Rule::MissingSome(need, keys) => {
                let need = to_number(&need.evaluate(ctx)).unwrap_or(0.0);
                let keys = keys.evaluate(ctx);
                let keys = keys.as_array().map(Vec::as_slice).unwrap_or(&[]);
                let absent: Vec<Value> = keys
                    .iter()
                    .filter(|key| is_absent(ctx.data, &to_text(key)))
                    .cloned()
                    .collect();
                let present = (keys.len() - absent.len()) as f64;
                Cow::Owned(Value::Array(if present >= need {
                    Vec::new()
                } else {
                    absent
                }))
            }
            Rule::If(args) => {
                let mut pairs = args.chunks_exact(2);
                for pair in pairs.by_ref() {
                    if truthy(&pair[0].evaluate(ctx)) {
                        return pair[1].evaluate(ctx);
                    }
                }
                match pairs.remainder() {
                    [otherwise] => otherwise.evaluate(ctx),
                    _ => Cow::Borrowed(&NULL),
                }
            }
            Rule::Equals(left, right, strict, negated) => {
                let (l, r) = (left.evaluate(ctx), right.evaluate(ctx));
                let equal = if *strict {
                    strict_equals(&l, &r)
                } else {
                    loose_equals(&l, &r)
                };
                Cow::Owned(Value::Bool(equal != *negated))
            }
            Rule::Not(arg) => Cow::Owned(Value::Bool(!truthy(&arg.evaluate(ctx)))),
            Rule::Truthy(arg) => Cow::Owned(Value::Bool(truthy(&arg.evaluate(ctx)))),
            Rule::And(args) => {
                let mut last = Cow::Borrowed(&NULL);
                for arg in args {
                    last = arg.evaluate(ctx);
                    if !truthy(&last) {
                        break;
                    }
                }
                last
            }
            Rule::Or(args) => {
                let mut last = Cow::Borrowed(&NULL);
                for arg in args {
                    last = arg.evaluate(ctx);
                    if truthy(&last) {
                        break;
                    }
                }
                last
            }
            Rule::Compare(rule) => Cow::Owned(Value::Bool(rule.holds(ctx))),
            Rule::Arith(rule) => Cow::Owned(rule.compute(ctx).map_or(Value::Null, number)),
            Rule::Extremum(max, args) => {
                let numbers: Option<Vec<f64>> =
                    args.iter().map(|a| to_number(&a.evaluate(ctx))).collect();
                let result = numbers.and_then(|n| {
                    n.into_iter().reduce(|a, b| {
                        if (*max && b > a) || (!*max && b < a) {
                            b
                        } else {
                            a
                        }
                    })
                });
                Cow::Owned(result.map_or(Value::Null, number))
            }
            Rule::In(needle, haystack) => {
                let needle = needle.evaluate(ctx);
                let found = match &*haystack.evaluate(ctx) {
                    Value::String(text) => text.contains(to_text(&needle).as_ref()),
                    Value::Array(items) => items.iter().any(|item| strict_equals(item, &needle)),
                    _ => false,
                };
                Cow::Owned(Value::Bool(found))
            }
            Rule::Cat(args) => {
                let mut text = String::new();
                for arg in args {
                    text.push_str(&to_text(&arg.evaluate(ctx)));
                }
                Cow::Owned(Value::String(text))
            }
            Rule::Substr(args) => Cow::Owned(substr(args, ctx)),
            Rule::Merge(args) => {
                let mut merged = Vec::new();
                for arg in args {
                    match arg.evaluate(ctx).into_owned() {
                        Value::Array(items) => merged.extend(items),
                        other => merged.push(other),
                    }
                }
                Cow::Owned(Value::Array(merged))
            }
            Rule::Array(rule) => rule.apply(ctx),
            Rule::Affix(starts, args) => {
                let [subject, affix] = args.as_slice() else {
                    return Cow::Borrowed(&NULL);
                };
                match (&*subject.evaluate(ctx), &*affix.evaluate(ctx)) {
                    (Value::String(s), Value::String(a)) => Cow::Owned(Value::Bool(if *starts {
                        s.starts_with(a.as_str())
                    } else {
                        s.ends_with(a.as_str())
                    })),
                    _ => Cow::Borrowed(&NULL),
                }
            }
            Rule::SemVer(args) => {
                let [version, operator, target] = args.as_slice() else {
                    return Cow::Borrowed(&NULL);
                };
                let (version, operator, target) = (
                    version.evaluate(ctx),
                    operator.evaluate(ctx),
                    target.evaluate(ctx),
                );
                let (Some(version), Some(operator), Some(target)) = (
                    version_text(&version),
                    operator.as_str(),
                    version_text(&target),
                ) else {
                    return Cow::Borrowed(&NULL);
                };
                semver::compare(&version, operator, &target)
                    .map_or(Cow::Borrowed(&NULL), |b| Cow::Owned(Value::Bool(b)))
            }
            Rule::Fractional(rule) => rule.choose(ctx),
        }
    }
}

impl CompareRule {
    fn holds(&self, ctx: &Context<'_>) -> bool {
        let values: Vec<Out<'_>> = self.args.iter().map(|a| a.evaluate(ctx)).collect();
        let pair = |a: &Value, b: &Value| -> bool {
            let ordering = match (a, b) {
                (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
                _ => match (to_number(a), to_number(b)) {
                    (Some(x), Some(y)) => x.partial_cmp(&y),
                    _ => None,
                },
            };
            let Some(ordering) = ordering else {
                return false;
            };
            match self.op {
                Compare::Less => ordering.is_lt(),
                Compare::LessEq => ordering.is_le(),
                Compare::Greater => ordering.is_gt(),
                Compare::GreaterEq => ordering.is_ge(),
            }
        };
        match values.as_slice() {
            [a, b] => pair(a, b),
            [a, b, c] if matches!(self.op, Compare::Less | Compare::LessEq) => {
                pair(a, b) && pair(b, c)
            }
            _ => false,
        }
    }
}

impl ArithRule {
    fn compute(&self, ctx: &Context<'_>) -> Option<f64> {
        let numbers: Option<Vec<f64>> = self
            .args
            .iter()
            .map(|a| to_number(&a.evaluate(ctx)))
            .collect();
        let numbers = numbers?;
        let result = match (self.op, numbers.as_slice()) {
            (Arith::Add, n) => n.iter().sum(),
            (Arith::Mul, [first, rest @ ..]) => rest.iter().fold(*first, |a, b| a * b),
            (Arith::Sub, [only]) => -only,
            (Arith::Sub, [a, b]) => a - b,
            (Arith::Div, [a, b]) if *b != 0.0 => a / b,
            (Arith::Rem, [a, b]) if *b != 0.0 => a % b,
            _ => return None,
        };
        result.is_finite().then_some(result)
    }
}

impl ArrayRule {
    fn apply<'a>(&'a self, ctx: &Context<'a>) -> Out<'a> {
        let array = self.array.evaluate(ctx);
        let items: &[Value] = array.as_array().map(Vec::as_slice).unwrap_or(&[]);
        let mut each = items.iter().map(|item| {
            let inner = Context { data: item, ..*ctx };
            (item, self.each.evaluate(&inner).into_owned())
        });
        let result = match self.op {
            ArrayOp::Map => Value::Array(each.map(|(_, v)| v).collect()),
            ArrayOp::Filter => Value::Array(
                each.filter(|(_, v)| truthy(v))
                    .map(|(item, _)| item.clone())
                    .collect(),
            ),
            ArrayOp::All => Value::Bool(!items.is_empty() && each.all(|(_, v)| truthy(&v))),
            ArrayOp::None => Value::Bool(!each.any(|(_, v)| truthy(&v))),
            ArrayOp::Some => Value::Bool(each.any(|(_, v)| truthy(&v))),
        };
        Cow::Owned(result)
    }
}

impl Fractional {
    /// Returns each bucket's variant and weight when both are constants: the split an
    /// experiment's sample-ratio check expects.
    pub fn allocation(&self) -> Option<Vec<(String, u64)>> {
        let weights = self.constant_weights.as_ref()?;
        self.buckets
            .iter()
            .zip(weights)
            .map(|((variant, _), weight)| match variant {
                Rule::Literal(Value::String(name)) => Some((name.clone(), *weight)),
                _ => None,
            })
            .collect()
    }

    fn choose<'a>(&'a self, ctx: &Context<'a>) -> Out<'a> {
        let hash = match &self.bucket_by {
            Some(rule) => match &*rule.evaluate(ctx) {
                Value::String(text) => bucket::hash([text.as_bytes(), b""]),
                Value::Number(n) => bucket::hash([n.to_string().as_bytes(), b""]),
                _ => return Cow::Borrowed(&NULL),
            },
            None => match ctx.targeting_key {
                Some(key) => bucket::hash([ctx.flag_key.as_bytes(), key.as_bytes()]),
                None => return Cow::Borrowed(&NULL),
            },
        };
        let computed;
        let weights = match &self.constant_weights {
            Some(weights) => weights.as_slice(),
            None => {
                computed = self
                    .buckets
                    .iter()
                    .map(|(_, w)| bucket::weight_from(to_number(&w.evaluate(ctx)).unwrap_or(0.0)))
                    .collect::<Vec<_>>();
                computed.as_slice()
            }
        };
        match bucket::pick(hash, weights) {
            Some(index) => self.buckets[index].0.evaluate(ctx),
            None => Cow::Borrowed(&NULL),
        }
    }
}

fn lookup<'a>(data: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut current = data;
    for segment in path {
        current = match current {
            Value::Object(map) => map.get(segment)?,
            Value::Array(items) => items.get(segment.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    (!current.is_null()).then_some(current)
}

fn is_absent(data: &Value, key: &str) -> bool {
    let path: Vec<String> = key.split('.').map(str::to_owned).collect();
    match lookup(data, &path) {
        None => true,
        Some(Value::String(s)) => s.is_empty(),
        Some(_) => false,
    }
}

fn missing(keys: &[Rule], ctx: &Context<'_>) -> Value {
    let mut names = Vec::new();
    for key in keys {
        match key.evaluate(ctx).into_owned() {
            Value::Array(items) => names.extend(items),
            other => names.push(other),
        }
    }
    Value::Array(
        names
            .into_iter()
            .filter(|name| is_absent(ctx.data, &to_text(name)))
            .collect(),
    )
}

fn substr(args: &[Rule], ctx: &Context<'_>) -> Value {
    let text = args.first().map(|a| to_text(&a.evaluate(ctx)).into_owned());
    let Some(text) = text else {
        return Value::Null;
    };
    let chars: Vec<char> = text.chars().collect();
    let len = chars.len() as i64;
    let arg = |i: usize| args.get(i).and_then(|a| to_number(&a.evaluate(ctx)));
    let start = arg(1).unwrap_or(0.0) as i64;
    let start = if start < 0 {
        (len + start).max(0)
    } else {
        start.min(len)
    };
    let end = match arg(2) {
        None => len,
        Some(n) if n < 0.0 => (len + n as i64).max(start),
        Some(n) => (start + n as i64).min(len),
    };
    Value::String(
        chars[start as usize..end.max(start) as usize]
            .iter()
            .collect(),
    )
}

/// JsonLogic truthiness: `false`, `null`, `0`, `""` and `[]` are false.
pub fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(items) => !items.is_empty(),
        Value::Object(_) => true,
    }
}

/// JavaScript's `Number(value)`, or `None` for NaN.
fn to_number(value: &Value) -> Option<f64> {
    match value {
        Value::Null => Some(0.0),
        Value::Bool(b) => Some(f64::from(u8::from(*b))),
        Value::Number(n) => n.as_f64(),
        Value::String(s) if s.trim().is_empty() => Some(0.0),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A number as JSON: integral values become integers, as in JavaScript's output.
fn number(value: f64) -> Value {
    if value.fract() == 0.0 && value.abs() < 9.0e15 {
        Value::from(value as i64)
    } else {
        serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number)
    }
}

/// JavaScript's `String(value)`.
fn to_text(value: &Value) -> Cow<'_, str> {
    match value {
        Value::String(s) => Cow::Borrowed(s),
        Value::Null => Cow::Borrowed("null"),
        Value::Bool(b) => Cow::Borrowed(if *b { "true" } else { "false" }),
        Value::Number(n) => Cow::Owned(n.to_string()),
        Value::Array(items) => Cow::Owned(
            items
                .iter()
                .map(|item| to_text(item).into_owned())
                .collect::<Vec<_>>()
                .join(","),
        ),
        Value::Object(_) => Cow::Borrowed("[object Object]"),
    }
}

fn version_text(value: &Value) -> Option<Cow<'_, str>> {
    match value {
        Value::String(s) => Some(Cow::Borrowed(s)),
        Value::Number(_) => Some(to_text(value)),
        _ => None,
    }
}

fn strict_equals(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(_), Value::Array(_)) | (Value::Object(_), Value::Object(_)) => false,
        _ => a == b,
    }
}

fn loose_equals(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Null, Value::Null) => true,
        (Value::Null, _) | (_, Value::Null) => false,
        (Value::Bool(_), _) | (_, Value::Bool(_)) => match (to_number(a), to_number(b)) {
            (Some(x), Some(y)) => x == y,
            _ => false,
        },
        (Value::String(x), Value::String(y)) => x == y,
        (Value::Number(_), Value::String(_)) | (Value::String(_), Value::Number(_)) => {
            matches!((to_number(a), to_number(b)), (Some(x), Some(y)) if x == y)
        }
        _ => strict_equals(a, b),
    }
}

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
