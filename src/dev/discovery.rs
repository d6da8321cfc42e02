//! The simulator's authorization server metadata: the same document at the
//! OpenID Connect path and at RFC 8414's, with injectable faults.

use super::*;

/// How the discovery endpoints misbehave (see
/// [`Simulator::set_discovery_fault`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiscoveryFault {
    /// 404 at both well-known paths.
    NotFound,
    /// The OpenID Connect path answers 404; RFC 8414's serves the document.
    OnlyOAuthMetadata,
    /// This status, with a plain-text body, at both paths.
    Status(u16),
    /// 200 whose body is not JSON.
    NotJson,
    /// A JSON document without `token_endpoint`.
    NoTokenEndpoint,
    /// A document naming another issuer.
    WrongIssuer,
    /// 200 with a body far larger than any real document (2 MiB).
    Huge,
    /// Answers after this long.
    Hang(Duration),
}

/// `GET /.well-known/openid-configuration`.
pub(super) async fn openid_configuration(AxState(sim): AxState<Simulator>) -> Response {
    metadata(&sim, true).await
}

/// `GET /.well-known/oauth-authorization-server` (RFC 8414).
pub(super) async fn oauth_authorization_server(AxState(sim): AxState<Simulator>) -> Response {
    metadata(&sim, false).await
}

async fn metadata(sim: &Simulator, openid: bool) -> Response {
    let (issuer, fault) = {
        let mut st = sim.lock();
        st.stats.discovery_fetches += 1;
        (st.issuer.clone(), st.discovery_fault.clone())
    };
    let not_found = || (StatusCode::NOT_FOUND, "Not Found\n").into_response();
    let Some(issuer) = issuer else {
        return not_found();
    };
    let mut doc = serde_json::json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{issuer}/authorize"),
        "token_endpoint": format!("{issuer}/token"),
        "revocation_endpoint": format!("{issuer}/revoke"),
        "device_authorization_endpoint": format!("{issuer}/device/code"),
        "response_types_supported": ["code"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "code_challenge_methods_supported": ["S256", "plain"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
    });
    match fault {
        None => {}
        Some(DiscoveryFault::NotFound) => return not_found(),
        Some(DiscoveryFault::OnlyOAuthMetadata) if openid => return not_found(),
        Some(DiscoveryFault::OnlyOAuthMetadata) => {}
        Some(DiscoveryFault::Status(code)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return (status, "simulated discovery failure\n").into_response();
        }
        Some(DiscoveryFault::NotJson) => {
            return (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                "<html><body>Sign in</body></html>",
            )
                .into_response();
        }
        Some(DiscoveryFault::NoTokenEndpoint) => {
            if let Some(o) = doc.as_object_mut() {
                o.remove("token_endpoint");
            }
        }
        Some(DiscoveryFault::WrongIssuer) => {
            doc["issuer"] = serde_json::json!("https://attacker.example");
        }
        Some(DiscoveryFault::Huge) => {
            let filler = "x".repeat(2 * 1024 * 1024);
            doc["padding"] = serde_json::json!(filler);
        }
        Some(DiscoveryFault::Hang(d)) => tokio::time::sleep(d).await,
    }
    json_response(StatusCode::OK, doc)
}

impl Simulator {
    /// The issuer the discovery documents name (the base URL for
    /// [`Simulator::start_local`]); `None`: discovery answers 404.
    pub fn set_issuer(&self, issuer: Option<String>) {
        self.lock().issuer = issuer;
    }

    /// Makes discovery misbehave (`None`: serve the document).
    pub fn set_discovery_fault(&self, fault: Option<DiscoveryFault>) {
        self.lock().discovery_fault = fault;
    }
}
