//! Talking to OAuth2 providers: authorization URLs, code exchange, refresh,
//! revocation, and the one place that decides which failures are transient.
//!
//! Requests are built by the `oauth2` crate and sent through our own
//! `reqwest` client (one per daemon, connection-pooled). The answer is read
//! by our own lenient parser ([`answer`]), not by `oauth2`'s strict one: the
//! transport keeps the status, `Retry-After` and body it saw, and whatever
//! `oauth2` made of them is ignored except for transport errors. A strict
//! parser refusing a 2xx answer the provider has already rotated on loses
//! the grant (see [`answer`]). This module holds no state and never
//! touches the database.

pub mod answer;
pub mod device;
pub mod discovery;
pub mod extras;
pub mod presets;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use oauth2::basic::{BasicClient, BasicTokenResponse};
use oauth2::{
    AuthType, AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, PkceCodeChallenge,
    PkceCodeVerifier, RedirectUrl, RefreshToken, RequestTokenError, Scope, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use url::Url;

use crate::config::{ClientAuth, ProviderConfig};

/// Largest token-endpoint answer we read; anything bigger is garbage.
const MAX_TOKEN_RESPONSE_BYTES: usize = 256 * 1024;

/// What a successful token call yields.
pub struct TokenGrant {
    pub access_token: SecretString,
    /// `None` when the provider did not rotate the refresh token.
    pub refresh_token: Option<SecretString>,
    /// As the provider named it, case-normalized ("Bearer", "DPoP", ...;
    /// see [`answer::normalize_token_type`]).
    pub token_type: String,
    pub scope: Option<String>,
    /// When the request left: the provider issued the token after this, so
    /// lifetimes counted from here never overstate what is left.
    pub issued_at: DateTime<Utc>,
    /// Absolute expiry, computed when the answer arrives, counted from when
    /// the request left: a deliberate tightening of SPEC 7 (see [`expiry`]).
    pub expires_at: DateTime<Utc>,
    /// The refresh token's remaining life as the answer stated it
    /// (`refresh_token_expires_in`, `x_refresh_token_expires_in`), counted
    /// from `issued_at` (SPEC 11).
    pub refresh_token_expires_in: Option<Duration>,
    /// What the answer carried beside the tokens that the preset declares
    /// (see [`presets::ExtraSource::TokenAnswer`]); empty when none.
    pub extra: crate::store::Extras,
}

impl TokenGrant {
    /// A grant that is only its refresh token, with an access token already
    /// expired at `now`, so the first caller's request refreshes it: what
    /// is kept of an answer whose refresh token is the grant but whose
    /// access token is unusable ([`ProviderError::Unusable`]).
    pub fn refresh_token_only(refresh_token: SecretString, now: DateTime<Utc>) -> TokenGrant {
        TokenGrant {
            access_token: SecretString::from(String::new()),
            refresh_token: Some(refresh_token),
            token_type: "Bearer".into(),
            scope: None,
            issued_at: now,
            expires_at: now,
            refresh_token_expires_in: None,
            extra: Default::default(),
        }
    }
}

/// Why a token call failed, classified once, in [`answer::interpret`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    /// Worth retrying later: network, timeout, 408, 429, 5xx, garbage answers.
    #[error("{message}")]
    Transient {
        message: String,
        retry_after: Option<Duration>,
    },
    /// The provider rejected the grant itself (`invalid_grant`, or Keap's
    /// `invalid_request` "Invalid Refresh Token"): only a new authorization
    /// helps (SPEC 7).
    #[error("{message}")]
    Rejected { message: String },
    /// The provider refused the client or the request (`invalid_client`,
    /// `unauthorized_client`, `invalid_scope`, any other OAuth error, a 4xx
    /// without one): a configuration problem, not a dead grant. `message`
    /// says what was refused and what to fix. The grant stays; retrying
    /// after a reload (new secret) can succeed.
    #[error("{message}")]
    Refused { message: String },
    /// A 2xx answer that cannot be used (no usable access token) but
    /// carries a refresh token. The provider has most likely rotated
    /// already, so `refresh_token` is the grant now: the caller must store
    /// it, then report `message`.
    #[error("{message}")]
    Unusable {
        message: String,
        refresh_token: SecretString,
    },
}

/// The start of a browser authorization.
pub struct AuthorizationStart {
    pub url: Url,
    pub state: String,
    pub pkce_verifier: Option<SecretString>,
}

/// A configured provider with the shared HTTP client.
#[derive(Clone)]
pub struct Provider {
    pub config: ProviderConfig,
    http: reqwest::Client,
}

/// What the transport saw: the answer is read from here, not from what
/// `oauth2` parsed.
#[derive(Default)]
struct Observed {
    status: Option<u16>,
    retry_after: Option<Duration>,
    /// The whole body, once it was read completely.
    body: Option<Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
enum TransportError {
    #[error("{0}")]
    Http(#[from] reqwest::Error),
    #[error("the response is larger than {MAX_TOKEN_RESPONSE_BYTES} bytes")]
    TooLarge,
    #[error("cannot build the request: {0}")]
    Build(String),
}

impl Provider {
    pub fn new(config: ProviderConfig, http: reqwest::Client) -> Self {
        Provider { config, http }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    fn client(
        &self,
        auth: ClientAuth,
    ) -> oauth2::Client<
        oauth2::basic::BasicErrorResponse,
        BasicTokenResponse,
        oauth2::basic::BasicTokenIntrospectionResponse,
        oauth2::StandardRevocableToken,
        oauth2::basic::BasicRevocationErrorResponse,
        oauth2::EndpointSet,
        oauth2::EndpointNotSet,
        oauth2::EndpointNotSet,
        oauth2::EndpointNotSet,
        oauth2::EndpointSet,
    > {
        let mut c = BasicClient::new(ClientId::new(self.config.client_id.clone()))
            .set_auth_uri(AuthUrl::from_url(self.config.authorization_url.clone()))
            .set_token_uri(TokenUrl::from_url(self.config.token_url.clone()))
            .set_auth_type(match auth {
                ClientAuth::Basic => AuthType::BasicAuth,
                ClientAuth::Body | ClientAuth::None => AuthType::RequestBody,
            });
        if auth != ClientAuth::None {
            if let Some(s) = &self.config.client_secret {
                c = c.set_client_secret(ClientSecret::new(s.expose_secret().to_string()));
            }
        }
        c
    }

    /// The configured scopes as one `scope` parameter, joined with the
    /// provider's delimiter (a space per RFC 6749 3.3; Zoho wants commas);
    /// `None` when none are configured. Passed to `oauth2` as a single
    /// scope, so its own joining (with spaces) never applies.
    pub(crate) fn scope_param(&self) -> Option<String> {
        (!self.config.scopes.is_empty())
            .then(|| self.config.scopes.join(self.config.scope_delimiter))
    }

    /// Builds the URL that starts a browser authorization.
    pub fn authorization_start(&self, redirect_uri: &Url) -> AuthorizationStart {
        let client = self
            .client(self.config.code_auth)
            .set_redirect_uri(RedirectUrl::from_url(redirect_uri.clone()));
        let mut req = client.authorize_url(CsrfToken::new_random);
        if let Some(scope) = self.scope_param() {
            req = req.add_scope(Scope::new(scope));
        }
        for (k, v) in &self.config.extra_authorize_params {
            req = req.add_extra_param(k.clone(), v.clone());
        }
        let mut verifier = None;
        if self.config.pkce {
            let (challenge, v) = PkceCodeChallenge::new_random_sha256();
            req = req.set_pkce_challenge(challenge);
            verifier = Some(SecretString::from(v.secret().to_string()));
        }
        let (url, state) = req.url();
        AuthorizationStart {
            url,
            state: state.secret().to_string(),
            pkce_verifier: verifier,
        }
    }

    /// Exchanges an authorization code for a grant.
    pub async fn exchange_code(
        &self,
        code: &str,
        pkce_verifier: Option<&SecretString>,
        redirect_uri: &Url,
    ) -> Result<TokenGrant, ProviderError> {
        let client = self
            .client(self.config.code_auth)
            .set_redirect_uri(RedirectUrl::from_url(redirect_uri.clone()));
        let observed = Arc::new(Mutex::new(Observed::default()));
        let mut req = client.exchange_code(AuthorizationCode::new(code.to_string()));
        if let Some(v) = pkce_verifier {
            req = req.set_pkce_verifier(PkceCodeVerifier::new(v.expose_secret().to_string()));
        }
        let send = self.transport(&observed);
        let sent_at = Utc::now();
        let result = req.request_async(&send).await;
        self.finish(result, &observed, sent_at)
    }

    /// Redeems a refresh token.
    pub async fn refresh(&self, refresh_token: &SecretString) -> Result<TokenGrant, ProviderError> {
        let client = self.client(self.config.refresh_auth);
        let observed = Arc::new(Mutex::new(Observed::default()));
        let token = RefreshToken::new(refresh_token.expose_secret().to_string());
        let send = self.transport(&observed);
        let sent_at = Utc::now();
        let result = client
            .exchange_refresh_token(&token)
            .request_async(&send)
            .await;
        self.finish(result, &observed, sent_at)
    }

    /// Asks for an access token with the client's own credentials (RFC
    /// 6749 4.4, `grant = "client_credentials"`), authenticating the way
    /// `refresh_auth` says and asking for the configured scopes.
    ///
    /// There is no grant to lose here, so the classes narrow: a refresh
    /// token in the answer is dropped (nothing is rotated or stored), a
    /// 2xx without a usable access token is transient, and a refusal of
    /// any kind (`invalid_client`, even `invalid_grant`) is a
    /// configuration problem, never "authorize again": nobody could.
    pub async fn client_credentials(&self) -> Result<TokenGrant, ProviderError> {
        let client = self.client(self.config.refresh_auth);
        let observed = Arc::new(Mutex::new(Observed::default()));
        let mut req = client.exchange_client_credentials();
        if let Some(scope) = self.scope_param() {
            req = req.add_scope(Scope::new(scope));
        }
        let send = self.transport(&observed);
        let sent_at = Utc::now();
        let result = req.request_async(&send).await;
        match self.finish(result, &observed, sent_at) {
            Ok(grant) => Ok(TokenGrant {
                refresh_token: None,
                ..grant
            }),
            Err(ProviderError::Unusable { message, .. }) => Err(transient(message, None)),
            Err(ProviderError::Rejected { message }) => Err(ProviderError::Refused {
                message: format!(
                    "{message}; the client-credentials grant needs no authorization, so check client_id, the client secret and scopes of [providers.{}], then reload",
                    self.name()
                ),
            }),
            Err(e) => Err(e),
        }
    }

    /// Client authentication (`auth`) added to a request to one of the
    /// provider's endpoints: HTTP Basic, or the credentials in the `form`,
    /// or only `client_id` for a public client.
    fn authenticate(
        &self,
        req: reqwest::RequestBuilder,
        auth: ClientAuth,
        form: &mut Vec<(&'static str, String)>,
    ) -> reqwest::RequestBuilder {
        match (auth, &self.config.client_secret) {
            (ClientAuth::Basic, Some(secret)) => {
                // RFC 6749 2.3.1: client id and secret are form-urlencoded
                // before Basic, exactly as `oauth2` does at the token
                // endpoint. Plain `basic_auth` made a secret with `+`, `/`
                // or `=` (any base64 secret) fail with 401 at oidc-provider.
                let enc = |s: &str| {
                    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>()
                };
                let credential = base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD,
                    format!(
                        "{}:{}",
                        enc(&self.config.client_id),
                        enc(secret.expose_secret())
                    ),
                );
                req.header(
                    reqwest::header::AUTHORIZATION,
                    format!("Basic {credential}"),
                )
            }
            (ClientAuth::Body, Some(secret)) => {
                form.push(("client_id", self.config.client_id.clone()));
                form.push(("client_secret", secret.expose_secret().to_string()));
                req
            }
            _ => {
                form.push(("client_id", self.config.client_id.clone()));
                req
            }
        }
    }

    /// A form POST to one of the provider's endpoints, the client
    /// authenticated as `auth` says, asking for JSON.
    fn form_request(
        &self,
        url: &Url,
        auth: ClientAuth,
        mut form: Vec<(&'static str, String)>,
    ) -> reqwest::RequestBuilder {
        let req = self
            .http
            .post(url.clone())
            .timeout(self.config.request_timeout)
            .header(reqwest::header::ACCEPT, "application/json");
        let req = self.authenticate(req, auth, &mut form);
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&form)
            .finish();
        req.header(
            reqwest::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(body)
    }

    /// [`Provider::form_request`] sent, and its answer's status and body
    /// (read whole, at most `MAX_TOKEN_RESPONSE_BYTES`); `Err` is a
    /// sentence without the URL.
    pub(crate) async fn post_form(
        &self,
        url: &Url,
        auth: ClientAuth,
        form: Vec<(&'static str, String)>,
    ) -> Result<(u16, Vec<u8>), String> {
        let mut resp = self
            .form_request(url, auth, form)
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    "it did not answer in time".to_string()
                } else {
                    without_url(&e).to_string()
                }
            })?;
        let status = resp.status().as_u16();
        match read_body(&mut resp).await {
            Ok(body) => Ok((status, body)),
            Err(TransportError::Http(e)) => Err(without_url(&e).to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Revokes a token upstream (RFC 7009). `Ok(false)` when the provider
    /// has no revocation endpoint.
    pub async fn revoke(&self, token: &SecretString, hint: &str) -> Result<bool, ProviderError> {
        let Some(url) = &self.config.revocation_url else {
            return Ok(false);
        };
        let form = vec![
            ("token", token.expose_secret().to_string()),
            ("token_type_hint", hint.to_string()),
        ];
        let resp = self
            .form_request(url, self.config.refresh_auth, form)
            .send()
            .await
            .map_err(|e| {
                transient(
                    format!("cannot reach the revocation endpoint: {}", without_url(&e)),
                    None,
                )
            })?;
        let status = resp.status().as_u16();
        if (200..=299).contains(&status) {
            return Ok(true);
        }
        let said = revocation_error(resp).await;
        let message = format!("the revocation endpoint answered HTTP {status}{said}");
        match status {
            429 | 500..=599 => Err(transient(message, None)),
            _ => Err(ProviderError::Rejected { message }),
        }
    }

    /// The transport handed to `oauth2`: owns what it uses, so the futures it
    /// returns are `'static` and `Send`.
    fn transport(
        &self,
        observed: &Arc<Mutex<Observed>>,
    ) -> impl Fn(
        oauth2::HttpRequest,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<oauth2::HttpResponse, TransportError>> + Send>,
    > {
        let http = self.http.clone();
        let timeout = self.config.request_timeout;
        let observed = observed.clone();
        move |req| Box::pin(send(http.clone(), timeout, req, observed.clone()))
    }

    fn finish(
        &self,
        result: Result<
            BasicTokenResponse,
            RequestTokenError<TransportError, oauth2::basic::BasicErrorResponse>,
        >,
        observed: &Arc<Mutex<Observed>>,
        sent_at: DateTime<Utc>,
    ) -> Result<TokenGrant, ProviderError> {
        let seen = observed
            .lock()
            .map(|mut o| (o.status, o.retry_after, o.body.take()))
            .unwrap_or((None, None, None));
        if let (Some(status), retry_after, Some(body)) = seen {
            let ctx = answer::AnswerContext {
                provider: self.name(),
                sent_at,
                default_lifetime: self.config.default_lifetime,
            };
            let mut grant = answer::interpret(&ctx, status, retry_after, &body)?;
            grant.extra = answer::extras(&body, &self.token_answer_extras());
            self.warn_if_short_lived(&grant);
            // A token dead on arrival (a lifetime shorter than the round
            // trip) is no token: serving it answers 503, and every request
            // would refresh again at once. Reported instead, so backoff
            // applies; the answer's refresh token is still kept.
            if grant.expires_at <= Utc::now() {
                let message = format!(
                    "the provider issued an access token that had expired before its answer arrived (the call took {} ms)",
                    (Utc::now() - sent_at).num_milliseconds()
                );
                return Err(match grant.refresh_token {
                    Some(refresh_token) => ProviderError::Unusable {
                        message,
                        refresh_token,
                    },
                    None => transient(message, None),
                });
            }
            return Ok(grant);
        }
        // No complete answer: the transport failed.
        Err(match result {
            Err(RequestTokenError::Request(TransportError::Http(re))) if re.is_timeout() => {
                transient("the token endpoint did not answer in time".into(), None)
            }
            Err(RequestTokenError::Request(TransportError::Http(re))) => transient(
                format!("cannot reach the token endpoint: {}", without_url(&re)),
                None,
            ),
            Err(RequestTokenError::Request(other)) => {
                transient(format!("bad answer from the token endpoint: {other}"), None)
            }
            _ => transient("the token endpoint's answer could not be read".into(), None),
        })
    }

    /// The lists the preset fetches from the API once a grant is new
    /// ([`presets::ExtraSource::ApiList`]: Xero's tenants), each under its
    /// key. A list that cannot be fetched is logged and left out: the
    /// grant is good without it, and the caller can still name a tenant.
    pub async fn list_extras(&self, access_token: &SecretString) -> crate::store::Extras {
        let mut out = crate::store::Extras::new();
        for e in self.config.preset.spec().extras {
            let presets::ExtraSource::ApiList { path, id, name } = e.source else {
                continue;
            };
            match self.fetch_list(access_token, path, (id, name)).await {
                Ok(list) => {
                    out.insert(e.key.to_string(), serde_json::Value::Array(list));
                }
                Err(why) => tracing::warn!(
                    provider = self.name(),
                    "cannot fetch {} ({why}); the proxy will need the caller to name one",
                    e.key
                ),
            }
        }
        out
    }

    /// `GET api_base_url + path` with the access token: a JSON array of
    /// objects, each kept as `{"id", "name"}` from its members `keys`.
    async fn fetch_list(
        &self,
        access_token: &SecretString,
        path: &str,
        (id, name): (&str, &str),
    ) -> Result<Vec<serde_json::Value>, String> {
        let base = self
            .config
            .api_base_url
            .as_ref()
            .ok_or_else(|| "the provider has no api_base_url".to_string())?;
        let url = format!("{}{path}", base.as_str().trim_end_matches('/'));
        let resp = self
            .http
            .get(url)
            .bearer_auth(access_token.expose_secret())
            .header(reqwest::header::ACCEPT, "application/json")
            .timeout(self.config.request_timeout)
            .send()
            .await
            .map_err(|e| without_url(&e).to_string())?;
        let status = resp.status();
        if !status.is_success() {
            return Err(format!("HTTP {}", status.as_u16()));
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| without_url(&e).to_string())?;
        if body.len() > MAX_TOKEN_RESPONSE_BYTES {
            return Err("the answer is too large".into());
        }
        let items: Vec<serde_json::Map<String, serde_json::Value>> = serde_json::from_slice(&body)
            .map_err(|_| "the answer is not a JSON array of objects".to_string())?;
        let text = |o: &serde_json::Map<String, serde_json::Value>, k: &str| {
            o.get(k).and_then(|v| v.as_str()).map(str::to_string)
        };
        Ok(items
            .iter()
            .filter_map(|o| {
                let mut kept = serde_json::Map::new();
                kept.insert("id".into(), text(o, id)?.into());
                if let Some(n) = text(o, name) {
                    kept.insert("name".into(), n.into());
                }
                Some(serde_json::Value::Object(kept))
            })
            .collect())
    }

    /// The extras the preset reads from the redirect back (Intuit's
    /// `realmId`), from the raw query of `/callback` or of a pasted
    /// address. A value that is empty, repeated or implausibly long is
    /// left out.
    pub fn callback_extras(&self, raw_query: &str) -> crate::store::Extras {
        let mut out = crate::store::Extras::new();
        for e in self.config.preset.spec().extras {
            if e.source != presets::ExtraSource::Callback {
                continue;
            }
            let mut values = url::form_urlencoded::parse(raw_query.as_bytes())
                .filter(|(k, _)| k == e.key)
                .map(|(_, v)| v.into_owned());
            if let (Some(v), None) = (values.next(), values.next()) {
                if !v.is_empty() && v.len() <= 256 && !v.chars().any(char::is_control) {
                    out.insert(e.key.to_string(), v.into());
                }
            }
        }
        out
    }

    /// The keys of the extras the preset reads from token answers.
    fn token_answer_extras(&self) -> Vec<&'static str> {
        self.config
            .preset
            .spec()
            .extras
            .iter()
            .filter(|e| e.source == presets::ExtraSource::TokenAnswer)
            .map(|e| e.key)
            .collect()
    }

    /// A token that lives less than `min_validity` can never satisfy it; the
    /// refresh policy then serves it for half its life instead of
    /// refreshing on every request, which the operator should know about
    /// (once per process: it is a property of the provider, not news).
    fn warn_if_short_lived(&self, grant: &TokenGrant) {
        static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        let lifetime = (grant.expires_at - grant.issued_at)
            .to_std()
            .unwrap_or_default();
        if lifetime < SHORT_LIFETIME && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(
                provider = self.name(),
                lifetime_ms = lifetime.as_millis() as u64,
                "the provider issues access tokens that live under a minute; each is served for half its lifetime (less than refresh.min_validity), then refreshed"
            );
        }
    }
}

/// Below this, access-token lifetimes are worth a warning (see
/// [`Provider::warn_if_short_lived`]): shorter than the default
/// `min_validity` of 5 minutes would be noisy for providers with 5-minute
/// tokens, which are deliberate; under a minute rarely is.
const SHORT_LIFETIME: Duration = Duration::from_secs(60);

async fn send(
    http: reqwest::Client,
    timeout: Duration,
    req: oauth2::HttpRequest,
    observed: Arc<Mutex<Observed>>,
) -> Result<oauth2::HttpResponse, TransportError> {
    let (parts, body) = req.into_parts();
    let mut rb = http
        .request(parts.method, parts.uri.to_string())
        .timeout(timeout)
        .body(body);
    for (name, value) in parts.headers.iter() {
        rb = rb.header(name, value);
    }
    let mut resp = rb.send().await?;
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    if let Ok(mut o) = observed.lock() {
        o.status = Some(status.as_u16());
        o.retry_after = retry_after;
        o.body = None;
    }
    let mut builder = axum::http::Response::builder().status(status);
    for (name, value) in resp.headers().iter() {
        builder = builder.header(name, value);
    }
    let buf = read_body(&mut resp).await?;
    if let Ok(mut o) = observed.lock() {
        o.body = Some(buf.clone());
    }
    builder
        .body(buf)
        .map_err(|e| TransportError::Build(e.to_string()))
}

/// A response's body, whole; one larger than `MAX_TOKEN_RESPONSE_BYTES`
/// is refused as soon as it passes the limit.
async fn read_body(resp: &mut reqwest::Response) -> Result<Vec<u8>, TransportError> {
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if buf.len() + chunk.len() > MAX_TOKEN_RESPONSE_BYTES {
            return Err(TransportError::TooLarge);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

/// The absolute expiry of a token whose answer said `lifetime`, for a
/// request sent at `sent_at`. Counted from the send instant (the provider
/// issued the token after it) and less up to one second, because providers
/// count `expires_in` from their own issue time rounded down to the second
/// (oidc-provider does): handing out a token the provider already considers
/// expired is worse than refreshing a second early.
///
/// Lifetimes are capped at [`answer::MAX_LIFETIME`] and the sum is
/// checked, so no provider answer can overflow the date arithmetic.
pub fn expiry(sent_at: DateTime<Utc>, lifetime: Duration) -> DateTime<Utc> {
    let lifetime = lifetime.min(answer::MAX_LIFETIME);
    let margin = Duration::from_secs(1).min(lifetime / 10);
    let lifetime = chrono::Duration::from_std(lifetime - margin).unwrap_or_default();
    sent_at.checked_add_signed(lifetime).unwrap_or(sent_at)
}

fn transient(message: String, retry_after: Option<Duration>) -> ProviderError {
    ProviderError::Transient {
        message,
        retry_after,
    }
}

/// reqwest errors print the URL, which can carry a query; keep the kind only.
/// What went wrong with an HTTP call, without the URL (which may carry
/// credentials in its query) or anything the server sent.
pub(crate) fn without_url(e: &reqwest::Error) -> &'static str {
    if e.is_connect() {
        "connection failed"
    } else if e.is_timeout() {
        "timed out"
    } else if e.is_body() || e.is_decode() {
        "bad response body"
    } else {
        "request failed"
    }
}

/// `Retry-After` (RFC 9110 10.2.3): delay-seconds, or an HTTP-date,
/// turned into the time left from now (a date already past is zero).
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    retry_after_at(v, Utc::now())
}

/// [`parse_retry_after`] with `now` given, for tests.
fn retry_after_at(v: &str, now: DateTime<Utc>) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    // IMF-fixdate ("Sun, 06 Nov 1994 08:49:37 GMT") is RFC 2822 syntax.
    let at = DateTime::parse_from_rfc2822(v).ok()?.with_timezone(&Utc);
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

/// Idle connections [`http_client`] keeps per provider host.
pub const PROVIDER_IDLE_CONNECTIONS: usize = 16;

/// The HTTP client shared by all provider calls: rustls, no cookies, a
/// connect timeout so a black-holed provider cannot stall a refresh.
///
/// Idle connections are capped: a burst of refreshes (a wave after a
/// suspend, hundreds of short-lived tokens) opens one connection per call
/// in flight, and reqwest would keep every one of them for its idle
/// timeout, each holding its buffers (the soak grew by some 30 MB of them).
/// Paced refreshes need a handful.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(PROVIDER_IDLE_CONNECTIONS)
        .user_agent(concat!("tokenkeeper/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap_or_default()
}

/// The provider's own words from a failed revocation (RFC 7009 answers
/// with an OAuth error body): `: error (description)`, or nothing. Only
/// these two fields are read, bounded, so nothing else of the body (which
/// could echo the token) reaches a message.
async fn revocation_error(resp: reqwest::Response) -> String {
    #[derive(serde::Deserialize)]
    struct OAuthError {
        error: String,
        error_description: Option<String>,
    }
    let Ok(bytes) = resp.bytes().await else {
        return String::new();
    };
    let Ok(e) = serde_json::from_slice::<OAuthError>(&bytes[..bytes.len().min(4096)]) else {
        return String::new();
    };
    let clean = |v: &str| -> String { v.chars().filter(|c| !c.is_control()).take(200).collect() };
    match e.error_description {
        Some(d) => format!(": {} ({})", clean(&e.error), clean(&d)),
        None => format!(": {}", clean(&e.error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_one_parameter_joined_with_the_providers_delimiter() {
        let mut config = crate::dev::config("127.0.0.1:1".parse().unwrap(), "t.db".into(), "s")
            .providers["demo"]
            .clone();
        let scope_of = |config: &ProviderConfig| {
            let p = Provider::new(config.clone(), reqwest::Client::new());
            let start = p.authorization_start(&Url::parse("http://127.0.0.1:1/callback").unwrap());
            let scope = start
                .url
                .query_pairs()
                .find(|(k, _)| k == "scope")
                .map(|(_, v)| v.into_owned());
            (p.scope_param(), scope)
        };
        config.scopes = vec![];
        assert_eq!(scope_of(&config), (None, None));
        config.scopes = vec!["a.read".into(), "b.write".into()];
        config.scope_delimiter = " ";
        let joined = Some("a.read b.write".to_string());
        assert_eq!(scope_of(&config), (joined.clone(), joined));
        config.scope_delimiter = ",";
        let joined = Some("a.read,b.write".to_string());
        assert_eq!(scope_of(&config), (joined.clone(), joined));
    }

    #[test]
    fn expiry_never_overstates_the_lifetime() {
        let sent = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        assert_eq!(
            expiry(sent, Duration::from_secs(86400)),
            sent + chrono::Duration::seconds(86399)
        );
        // Short lifetimes lose at most a tenth.
        assert_eq!(
            expiry(sent, Duration::from_secs(4)),
            sent + chrono::Duration::milliseconds(3600)
        );
        assert_eq!(expiry(sent, Duration::ZERO), sent);
    }

    #[test]
    fn retry_after_seconds() {
        assert_eq!(parse_retry_after(" 12 "), Some(Duration::from_secs(12)));
        let now = DateTime::parse_from_rfc3339("2015-10-21T07:27:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            retry_after_at("Wed, 21 Oct 2015 07:28:00 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            retry_after_at("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO),
            "a date already past"
        );
        assert_eq!(retry_after_at("soon", now), None);
        assert_eq!(retry_after_at("-5", now), None);
    }
}
