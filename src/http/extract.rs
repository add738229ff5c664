//! Extractors shared by routes: a JSON body with precise 400/413/422 answers,
//! path parameters and query strings whose refusals are JSON too, and a
//! validated path id. API routes take only these (never axum's own `Path`,
//! `Query`, `Json` or `Form`, whose rejections are plain text), so every
//! refusal reads in the API's error shape; how each reads is decided in
//! `http/error.rs`.

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
                let msg = msg.split(" at line ").next().unwrap_or(&msg);
                ApiError::Validation(ValidationError::new(field, in_words(msg)))
            }
            _ => malformed(),
        }
    })?;
    de.end().map_err(|_| malformed())?;
    Ok(value)
}

/// serde's message for a value of the wrong shape, with the Rust type names
/// it quotes ("expected u64", "struct CreateSessionBody", "untagged enum
/// Expiration") put in the words of the JSON the client sent: a client knows
/// objects, arrays and numbers, not the server's types.
pub fn in_words(msg: &str) -> String {
    if msg.contains("untagged enum") {
        // serde says only that no form matched; the field's own deserializer
        // says which forms it takes where that matters.
        return "is not one of the accepted forms".into();
    }
    let words: Vec<&str> = msg.split(' ').collect();
    let mut out: Vec<String> = Vec::with_capacity(words.len());
    // Inside a quoted value the client sent (`string "a map"`), words are theirs.
    let mut quoted = false;
    let mut i = 0;
    while i < words.len() {
        let raw = words[i];
        let was_quoted = quoted;
        quoted ^= raw.matches(['"', '`']).count() % 2 == 1;
        let (word, tail) = split_punctuation(raw);
        let next_is_name = words.get(i + 1).is_some_and(|n| n.starts_with(|c: char| c.is_ascii_uppercase()));
        let plain = match word {
            _ if was_quoted || quoted => None,
            "map" => Some("an object"),
            "sequence" => Some("an array"),
            "struct" if next_is_name => Some("an object"),
            "enum" if next_is_name => Some("one of the accepted values"),
            "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => Some("a whole number of 0 or more"),
            "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => Some("a whole number"),
            "f32" | "f64" => Some("a number"),
            "unit" => Some("null"),
            _ => None,
        };
        let Some(plain) = plain else {
            out.push(raw.to_string());
            i += 1;
            continue;
        };
        // "a sequence", "a map": the article comes with the plain words.
        if plain.starts_with('a') && out.last().is_some_and(|w| w == "a") {
            out.pop();
        }
        if matches!(word, "struct" | "enum") {
            // `struct Name,`: the name goes with its keyword.
            out.push(format!("{plain}{}", split_punctuation(words[i + 1]).1));
            i += 2;
        } else {
            out.push(format!("{plain}{tail}"));
            i += 1;
        }
    }
    out.join(" ")
}

/// `word,` → (`word`, `,`).
fn split_punctuation(word: &str) -> (&str, &str) {
    let end = word.trim_end_matches([',', '.', ';', ':']).len();
    word.split_at(end)
}

/// Path parameters. A parameter that does not decode (not UTF-8, the wrong
/// shape) is a JSON 400 naming it (see `From<PathRejection> for ApiError`).
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(value) = Path::<T>::from_request_parts(parts, state).await?;
        Ok(ApiPath(value))
    }
}

/// A query string. A parameter of the wrong shape is 422 naming it, in the
/// same words as a JSON body's fields.
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parse_query(parts.uri.query().unwrap_or("")).map(ApiQuery)
    }
}

pub fn parse_query<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
    serde_path_to_error::deserialize(de).map_err(|err| {
        let path = err.path().to_string();
        let field = if path == "." { "query".to_string() } else { path };
        ApiError::Validation(ValidationError::new(field, in_words(&err.into_inner().to_string())))
    })
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
    fn messages_name_no_rust_type() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Shapes {
            n: Option<u64>,
            i: Option<i32>,
            list: Option<Vec<String>>,
            inner: Option<Body>,
        }
        let reason = |body: &[u8]| match parse_json::<Shapes>(body) {
            Err(ApiError::Validation(v)) => (v.field, v.message),
            other => panic!("{other:?}"),
        };
        let cases: [(&[u8], &str, &str); 6] = [
            (br#"{"n": -1}"#, "n", "invalid value: integer `-1`, expected a whole number of 0 or more"),
            (br#"{"i": "x"}"#, "i", "invalid type: string \"x\", expected a whole number"),
            (br#"{"i": "a map"}"#, "i", "invalid type: string \"a map\", expected a whole number"),
            (br#"{"list": {}}"#, "list", "invalid type: an object, expected an array"),
            (br#"{"inner": 5}"#, "inner", "invalid type: integer `5`, expected an object"),
            (br#""text""#, "body", "invalid type: string \"text\", expected an object"),
        ];
        for (body, field, message) in cases {
            assert_eq!(reason(body), (field.to_string(), message.to_string()));
        }
        let untagged = "data did not match any variant of untagged enum Expiration";
        assert_eq!(in_words(untagged), "is not one of the accepted forms");
        match parse_query::<Shapes>("n=soon") {
            Err(ApiError::Validation(v)) => {
                assert_eq!((v.field, v.message), ("n".into(), "invalid digit found in string".into()))
            }
            other => panic!("{other:?}"),
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
