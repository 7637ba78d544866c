//! Evaluating compiled rules against a context, with JsonLogic's truthiness and loose
//! equality, and flagd's operators giving `null` on bad input.

use std::borrow::Cow;

use serde_json::Value;

use super::super::{bucket, semver};
use super::{
    Arith, ArithRule, ArrayOp, ArrayRule, Compare, CompareRule, Context, Fractional, Rule,
};

/// What a rule evaluates to: borrowed from the rule or the context where it can be.
pub type Out<'a> = Cow<'a, Value>;

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
            Rule::DynamicVar(path, default) => dynamic_var(path, default.as_deref(), ctx),
            Rule::FlagKey => Cow::Owned(Value::String(ctx.flag_key.to_owned())),
            Rule::Timestamp => Cow::Owned(Value::from(ctx.timestamp)),
            Rule::Missing(keys) => Cow::Owned(missing(keys, ctx)),
            Rule::MissingSome(need, keys) => Cow::Owned(missing_some(need, keys, ctx)),
            Rule::If(args) => if_then(args, ctx),
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
            Rule::And(args) => first_with_truth(args, false, ctx),
            Rule::Or(args) => first_with_truth(args, true, ctx),
            Rule::Compare(rule) => Cow::Owned(Value::Bool(rule.holds(ctx))),
            Rule::Arith(rule) => Cow::Owned(rule.compute(ctx).map_or(Value::Null, number)),
            Rule::Extremum(max, args) => Cow::Owned(extremum(*max, args, ctx)),
            Rule::In(needle, haystack) => Cow::Owned(Value::Bool(contains(haystack, needle, ctx))),
            Rule::Cat(args) => Cow::Owned(Value::String(cat(args, ctx))),
            Rule::Substr(args) => Cow::Owned(substr(args, ctx)),
            Rule::Merge(args) => Cow::Owned(merge(args, ctx)),
            Rule::Array(rule) => rule.apply(ctx),
            Rule::Affix(starts, args) => affix(*starts, args, ctx),
            Rule::SemVer(args) => sem_ver(args, ctx),
            Rule::Fractional(rule) => rule.choose(ctx),
        }
    }
}

/// `var` whose dotted path is computed.
fn dynamic_var<'a>(path: &'a Rule, default: Option<&'a Rule>, ctx: &Context<'a>) -> Out<'a> {
    let path = path.evaluate(ctx);
    let text = to_text(&path);
    let segments: Vec<String> = if text.is_empty() {
        Vec::new()
    } else {
        text.split('.').map(str::to_owned).collect()
    };
    match lookup(ctx.data, &segments) {
        Some(value) => Cow::Borrowed(value),
        None => default.map_or(Cow::Borrowed(&NULL), |d| d.evaluate(ctx)),
    }
}

/// `missing_some`: the absent keys, or none once at least `need` are present.
fn missing_some(need: &Rule, keys: &Rule, ctx: &Context<'_>) -> Value {
    let need = to_number(&need.evaluate(ctx)).unwrap_or(0.0);
    let keys = keys.evaluate(ctx);
    let keys = keys.as_array().map(Vec::as_slice).unwrap_or(&[]);
    let absent: Vec<Value> = keys
        .iter()
        .filter(|key| is_absent(ctx.data, &to_text(key)))
        .cloned()
        .collect();
    let present = (keys.len() - absent.len()) as f64;
    Value::Array(if present >= need { Vec::new() } else { absent })
}

/// `if`: the value of the first branch whose condition holds, else the last argument.
fn if_then<'a>(args: &'a [Rule], ctx: &Context<'a>) -> Out<'a> {
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

/// `and` (`truth` false) and `or` (true): the first argument whose truthiness is `truth`,
/// else the last one.
fn first_with_truth<'a>(args: &'a [Rule], truth: bool, ctx: &Context<'a>) -> Out<'a> {
    let mut last = Cow::Borrowed(&NULL);
    for arg in args {
        last = arg.evaluate(ctx);
        if truthy(&last) == truth {
            break;
        }
    }
    last
}

/// `max` and `min`: `null` when an argument is not a number.
fn extremum(max: bool, args: &[Rule], ctx: &Context<'_>) -> Value {
    let numbers: Option<Vec<f64>> = args.iter().map(|a| to_number(&a.evaluate(ctx))).collect();
    let result = numbers.and_then(|n| {
        n.into_iter().reduce(|a, b| {
            if (max && b > a) || (!max && b < a) {
                b
            } else {
                a
            }
        })
    });
    result.map_or(Value::Null, number)
}

/// `in`: a substring of a string, or an item of an array.
fn contains(haystack: &Rule, needle: &Rule, ctx: &Context<'_>) -> bool {
    let needle = needle.evaluate(ctx);
    match &*haystack.evaluate(ctx) {
        Value::String(text) => text.contains(to_text(&needle).as_ref()),
        Value::Array(items) => items.iter().any(|item| strict_equals(item, &needle)),
        _ => false,
    }
}

/// `cat`: the arguments' texts, joined.
fn cat(args: &[Rule], ctx: &Context<'_>) -> String {
    let mut text = String::new();
    for arg in args {
        text.push_str(&to_text(&arg.evaluate(ctx)));
    }
    text
}

/// `merge`: arrays flattened one level, other values kept as items.
fn merge(args: &[Rule], ctx: &Context<'_>) -> Value {
    let mut merged = Vec::new();
    for arg in args {
        match arg.evaluate(ctx).into_owned() {
            Value::Array(items) => merged.extend(items),
            other => merged.push(other),
        }
    }
    Value::Array(merged)
}

/// `starts_with` and `ends_with`: `null` unless both arguments are strings.
fn affix<'a>(starts: bool, args: &'a [Rule], ctx: &Context<'a>) -> Out<'a> {
    let [subject, affix] = args else {
        return Cow::Borrowed(&NULL);
    };
    match (&*subject.evaluate(ctx), &*affix.evaluate(ctx)) {
        (Value::String(s), Value::String(a)) => Cow::Owned(Value::Bool(if starts {
            s.starts_with(a.as_str())
        } else {
            s.ends_with(a.as_str())
        })),
        _ => Cow::Borrowed(&NULL),
    }
}

/// `sem_ver`: `null` unless both sides are versions and the operator is known.
fn sem_ver<'a>(args: &'a [Rule], ctx: &Context<'a>) -> Out<'a> {
    let [version, operator, target] = args else {
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
pub(super) fn to_number(value: &Value) -> Option<f64> {
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
