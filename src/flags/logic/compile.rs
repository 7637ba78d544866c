//! Compiling JsonLogic: operators and their arguments are checked once, `$ref`s to the
//! flag file's `$evaluators` are expanded (refusing cycles), constants are folded.

use serde_json::Value;

use super::super::bucket;
use super::evaluate::to_number;
use super::{
    Arith, ArithRule, ArrayOp, ArrayRule, Compare, CompareRule, CompileError, Evaluators,
    Fractional, MAX_DEPTH, Rule,
};

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

    // Long: one arm per JsonLogic operator, so the table reads as the language.
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
