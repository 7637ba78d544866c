//! Typed query parameters: a handler names its parameters once, as a struct that both parses
//! them ([`Params`]) and documents them in OpenAPI (`#[derive(IntoParams)]`). A parameter the
//! struct does not name is refused with the list of those it does, rather than ignored.

use axum::extract::{FromRequestParts, Query};
use axum::http::Uri;
use axum::http::request::Parts;
use serde::de::{self, DeserializeOwned, Deserializer, Visitor};

use super::error::{ApiError, ErrorCode};

/// The query parameters of a request, read into `T`.
#[derive(Debug)]
pub struct Params<T>(pub T);

/// A struct of query parameters.
pub trait QueryParams: DeserializeOwned + Send {
    /// Said after the list of parameters when an unknown one is given.
    const HINT: &'static str = "";
}

impl<S: Send + Sync, T: QueryParams> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        parse(&parts.uri).map(Params)
    }
}

/// Reads `uri`'s query into `T`, refusing parameters `T` does not name.
pub fn parse<T: QueryParams>(uri: &Uri) -> Result<T, ApiError> {
    let invalid = |text: String| ApiError::new(ErrorCode::InvalidRequest, text);
    let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(uri)
        .map_err(|rejection| invalid(rejection.body_text()))?;
    let names = names_of::<T>();
    if let Some((unknown, _)) = pairs.iter().find(|(key, _)| !names.contains(&key.as_str())) {
        return Err(invalid(format!(
            "unknown parameter {unknown:?}; {}{}",
            listed(names),
            T::HINT
        )));
    }
    let Query(params) =
        Query::<T>::try_from_uri(uri).map_err(|rejection| invalid(rejection.body_text()))?;
    Ok(params)
}

/// "the parameters are a, b and c" (or "the parameter is a", "there are no parameters").
fn listed(names: &[&str]) -> String {
    match names {
        [] => "there are no parameters".into(),
        [one] => format!("the parameter is {one}"),
        [rest @ .., last] => format!("the parameters are {} and {last}", rest.join(", ")),
    }
}

/// The field names of a struct that derives `Deserialize`, as serde passes them to the
/// deserializer (renames applied).
fn names_of<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut names = FieldNames(&[]);
    let _ = T::deserialize(&mut names);
    names.0
}

/// A deserializer that only records the fields a struct asks for, then stops.
struct FieldNames(&'static [&'static str]);

impl<'de> Deserializer<'de> for &mut FieldNames {
    type Error = de::value::Error;

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0 = fields;
        Err(de::Error::custom("field names read"))
    }

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Range {
        from: Option<String>,
        #[serde(rename = "until")]
        to: Option<String>,
        format: Option<String>,
    }

    impl QueryParams for Range {}

    fn read(query: &str) -> Result<Range, String> {
        let uri: Uri = format!("/x?{query}").parse().unwrap();
        parse::<Range>(&uri).map_err(|err| err.description().to_owned())
    }

    #[test]
    fn known_parameters_are_read_and_decoded() {
        assert_eq!(
            read("from=2026-01-01T00%3A00%3A00Z&format=csv").unwrap(),
            Range {
                from: Some("2026-01-01T00:00:00Z".into()),
                to: None,
                format: Some("csv".into())
            }
        );
        assert_eq!(read("").unwrap().from, None);
        assert_eq!(read("until=x").unwrap().to.as_deref(), Some("x"));
    }

    #[test]
    fn unknown_parameters_are_refused_with_the_list() {
        assert_eq!(
            read("from=a&colour=blue").unwrap_err(),
            "unknown parameter \"colour\"; the parameters are from, until and format"
        );
        // The field's Rust name is not a parameter; its serde name is.
        assert!(
            read("to=x")
                .unwrap_err()
                .contains("unknown parameter \"to\"")
        );
        assert_eq!(listed(&["format"]), "the parameter is format");
        assert_eq!(listed(&[]), "there are no parameters");
    }

    #[test]
    fn a_repeated_parameter_is_refused() {
        assert!(
            read("from=a&from=b")
                .unwrap_err()
                .contains("duplicate field")
        );
    }
}
