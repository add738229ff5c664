//! Extractors shared by routes: a JSON body with precise 400/413/422 answers, and
//! a validated path id.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::validation::{nul_path, ValidationError};

/// A JSON body. Malformed JSON is 400, a body over the limit is 413, and a
/// well-formed body of the wrong shape is 422 naming the offending field.
/// An empty body reads as `{}`.
///
/// A string (or key) holding NUL anywhere in the body is 422 too, naming where:
/// what a client sends the control plane ends up in `text` and `jsonb` columns
/// or is matched as text, and Postgres can store NUL in neither. Data the server
/// keeps as sent takes [`DataJson`] instead.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_body(req, state).await?;
        refuse_nul(&bytes)?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// A JSON body whose values the server keeps as sent, NUL included (a run's
/// output or error, stored in `json` columns). Otherwise as [`ApiJson`].
pub struct DataJson<T>(pub T);

impl<S, T> FromRequest<S> for DataJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_body(req, state).await?;
        parse_json(&bytes).map(DataJson)
    }
}

/// The body's bytes, `{}` for an empty one.
async fn read_body<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge
        } else {
            ApiError::BadRequest("Could not read the request body".into())
        }
    })?;
    Ok(if bytes.iter().all(u8::is_ascii_whitespace) { Bytes::from_static(b"{}") } else { bytes })
}

/// 422 if a string or key in the body holds NUL. JSON can carry NUL only as the
/// escape `\u0000` (a raw control byte is malformed), so a body without that
/// byte sequence is passed through unparsed; one with it is parsed and walked,
/// which also tells an escaped backslash followed by `u0000` from a real NUL.
fn refuse_nul(bytes: &[u8]) -> Result<(), ApiError> {
    if memchr::memmem::find(bytes, b"\\u0000").is_none() {
        return Ok(());
    }
    // Malformed JSON is left for `parse_json` to answer.
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(bytes) else { return Ok(()) };
    match nul_path(&value) {
        Some(path) => {
            let field = if path == "." { "body".to_string() } else { path };
            Err(ValidationError::new(field, "must not contain NUL characters").into())
        }
        None => Ok(()),
    }
}

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let malformed = || ApiError::BadRequest("Malformed JSON in request body".into());
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                let field = if path == "." { "body".to_string() } else { path };
                // serde's messages carry the line/column; keep only the reason.
                let msg = inner.to_string();
                let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
                ApiError::Validation(ValidationError::new(field, msg))
            }
            _ => malformed(),
        }
    })?;
    de.end().map_err(|_| malformed())?;
    Ok(value)
}

/// A `:session`-style path id: a friendly id or an external id. Rejects ids that
/// break the id rule ([`crate::ids::id_problem`]: too long, control characters)
/// before they reach a query.
pub struct PathId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(id): Path<String> = Path::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::BadRequest("Invalid id in path".into()))?;
        validate_path_id(&id)?;
        Ok(PathId(id))
    }
}

pub fn validate_path_id(id: &str) -> Result<(), ApiError> {
    if crate::ids::id_problem(id).is_some() {
        return Err(ApiError::BadRequest("Invalid id in path".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        tags: Option<Vec<String>>,
    }

    #[test]
    fn syntax_errors_are_400_and_shape_errors_are_422_with_the_field() {
        assert!(matches!(parse_json::<Body>(b"{not json"), Err(ApiError::BadRequest(_))));
        match parse_json::<Body>(br#"{"name":"x","tags":[1]}"#) {
            Err(ApiError::Validation(v)) => assert_eq!(v.field, "tags[0]"),
            other => panic!("{other:?}"),
        }
        match parse_json::<Body>(br#"{"tags":[]}"#) {
            Err(ApiError::Validation(v)) => assert!(v.message.contains("name"), "{v:?}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse_json::<Body>(br#"{"name":"x"} trailing"#), Err(ApiError::BadRequest(_))));
    }

    #[test]
    fn nul_in_a_string_or_key_is_422_naming_it() {
        let field = |body: &[u8]| match refuse_nul(body) {
            Err(ApiError::Validation(v)) => Some(v.field),
            Ok(()) => None,
            Err(other) => panic!("{other:?}"),
        };
        assert_eq!(field(br#"{"name":"a\u0000","tags":[]}"#).as_deref(), Some("name"));
        assert_eq!(field(br#"{"tags":["x","\u0000"]}"#).as_deref(), Some("tags[1]"));
        assert_eq!(field(br#""\u0000""#).as_deref(), Some("body"));
        // An escaped backslash followed by `u0000` is not NUL.
        assert_eq!(field(br#"{"name":"\\u0000"}"#), None);
        // Malformed JSON is left for parse_json's 400.
        assert_eq!(field(br#"{"name":"\u0000"#), None);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn any_body_parses_or_is_refused_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..200), text in ".{0,100}") {
                for body in [bytes.as_slice(), text.as_bytes()] {
                    let _ = refuse_nul(body);
                    let _ = parse_json::<Body>(body);
                    let _ = parse_json::<serde_json::Value>(body);
                }
            }

            #[test]
            fn a_body_passes_the_check_exactly_when_no_string_holds_nul(name in any::<String>(), tags in proptest::collection::vec(any::<String>(), 0..4)) {
                let body = serde_json::to_vec(&serde_json::json!({"name": name, "tags": tags})).unwrap();
                let has_nul = name.contains('\0') || tags.iter().any(|t| t.contains('\0'));
                prop_assert_eq!(refuse_nul(&body).is_err(), has_nul);
                if !has_nul {
                    let parsed: Body = parse_json(&body).unwrap();
                    prop_assert_eq!((parsed.name, parsed.tags), (name, Some(tags)));
                }
            }

            #[test]
            fn path_ids_never_hold_control_characters(id in any::<String>()) {
                if validate_path_id(&id).is_ok() {
                    prop_assert!(!id.is_empty() && id.chars().count() <= crate::ids::MAX_ID_CHARS && !id.chars().any(char::is_control));
                }
            }
        }
    }

    #[test]
    fn path_ids_are_bounded() {
        assert!(validate_path_id("chat-1").is_ok());
        assert!(validate_path_id(&"a".repeat(10_000)).is_err());
        assert!(validate_path_id("a\0b").is_err());
        assert!(validate_path_id("").is_err());
    }
}
