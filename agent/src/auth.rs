//! An optional bearer token for the JSON API and `/metrics`.
//!
//! The API lists every tenant's process names and cgroup paths, so it stays
//! on loopback by default; where it must be reachable from elsewhere (a
//! Prometheus server, `kubectl port-forward`), a token keeps it to those who
//! hold it. `/healthz` stays open: probes carry no token, and it shows no
//! tenant's data.

use std::{path::Path, sync::Arc};

use axum::{
    Json, Router,
    extract::{Request, State},
    http::{HeaderMap, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use thiserror::Error;

/// The secret the API asks for, read once at start.
#[derive(Clone)]
pub struct ApiToken(Arc<str>);

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(..)")
    }
}

#[derive(Debug, Error)]
pub enum TokenError {
    #[error("reading the API token file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the API token from {from} is empty")]
    Empty { from: String },
}

impl ApiToken {
    /// A token given directly (`POWERLENS_API_TOKEN`); surrounding white
    /// space is not part of it.
    pub fn from_text(text: &str, from: &str) -> Result<Self, TokenError> {
        let token = text.trim();
        if token.is_empty() {
            return Err(TokenError::Empty {
                from: from.to_owned(),
            });
        }
        Ok(Self(Arc::from(token)))
    }

    /// A token kept in a file (a mounted Kubernetes Secret).
    pub fn from_file(path: &Path) -> Result<Self, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_text(&text, &path.display().to_string())
    }

    /// Whether the request's `Authorization: Bearer …` carries the token.
    /// The comparison takes the same time wherever the first difference is.
    pub fn admits(&self, headers: &HeaderMap) -> bool {
        let Some(given) = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
        else {
            return false;
        };
        constant_time_eq(given.trim().as_bytes(), self.0.as_bytes())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// Makes every route of `router` but `/healthz` ask for `token`, when set.
pub fn protect<S: Clone + Send + Sync + 'static>(
    router: Router<S>,
    token: Option<ApiToken>,
) -> Router<S> {
    match token {
        None => router,
        Some(token) => router.layer(middleware::from_fn_with_state(token, require_token)),
    }
}

async fn require_token(State(token): State<ApiToken>, request: Request, next: Next) -> Response {
    if request.uri().path() == "/healthz" || token.admits(request.headers()) {
        return next.run(request).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        Json(serde_json::json!({
            "error": "this API needs `Authorization: Bearer <token>` (the token in the agent's api_token_file or POWERLENS_API_TOKEN)"
        })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn with_authorization(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn admits_only_the_exact_bearer_token() {
        let token = ApiToken::from_text("s3cret\n", "test").unwrap();
        assert!(token.admits(&with_authorization("Bearer s3cret")));
        assert!(!token.admits(&with_authorization("Bearer s3cre")));
        assert!(!token.admits(&with_authorization("Bearer s3cret2")));
        assert!(!token.admits(&with_authorization("Basic s3cret")));
        assert!(!token.admits(&HeaderMap::new()));
    }

    #[test]
    fn an_empty_token_is_an_error_naming_its_origin() {
        let error = ApiToken::from_text("  \n", "/run/secrets/token").unwrap_err();
        assert!(error.to_string().contains("/run/secrets/token"), "{error}");
        let error = ApiToken::from_file(Path::new("/nonexistent/token")).unwrap_err();
        assert!(error.to_string().contains("/nonexistent/token"), "{error}");
    }
}
