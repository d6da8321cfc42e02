//! The OAuth2 endpoints: consent page, approve/deny, token, revocation.

use super::*;

use super::faults::fault_response_immediate;

/// Credentials from an `Authorization: Basic` header, if one was sent.
fn basic_credentials(headers: &HeaderMap) -> Result<Option<(String, String)>, Response> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| invalid_request("Malformed Authorization header"))?;
    let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(invalid_client(
            "Unsupported client authentication scheme; use HTTP Basic",
        ));
    }
    let decoded = STANDARD
        .decode(rest.trim())
        .map_err(|_| invalid_request("Malformed Basic authorization header: bad base64"))?;
    let decoded = String::from_utf8(decoded)
        .map_err(|_| invalid_request("Malformed Basic authorization header: not UTF-8"))?;
    let (id, secret) = decoded
        .split_once(':')
        .ok_or_else(|| invalid_request("Malformed Basic authorization header: missing ':'"))?;
    // RFC 6749 2.3.1: both parts are form-urlencoded before Basic encoding.
    let form_decode = |s: &str| -> String {
        url::form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    Ok(Some((form_decode(id), form_decode(secret))))
}

/// Checks client credentials. `basic_only` forbids credentials in the body
/// for confidential clients (Keap's refresh behaviour).
fn authenticate_client(
    config: &SimulatorConfig,
    headers: &HeaderMap,
    params: &Params,
    basic_only: bool,
) -> Result<(), Response> {
    let public = config.client_secret.is_empty();
    if config.quirks.refuse_basic && headers.contains_key(header::AUTHORIZATION) {
        return Err(invalid_client(
            "Client credentials must be sent as client_id and client_secret parameters",
        ));
    }
    let body_id = param(params, "client_id");
    let body_secret = param(params, "client_secret");
    match basic_credentials(headers)? {
        Some((id, secret)) => {
            if body_secret.is_some() {
                return Err(invalid_request(
                    "Client credentials supplied both in the Authorization header and in the body",
                ));
            }
            if body_id.is_some_and(|b| b != id) {
                return Err(invalid_client(
                    "client_id does not match the Authorization header",
                ));
            }
            if id != config.client_id || secret != config.client_secret {
                return Err(invalid_client("Invalid client credentials"));
            }
            Ok(())
        }
        None => {
            let Some(id) = body_id else {
                return Err(invalid_client("Client authentication required"));
            };
            if id != config.client_id {
                return Err(invalid_client("Invalid client credentials"));
            }
            if public {
                return match body_secret {
                    None => Ok(()),
                    Some(_) => Err(invalid_client("Invalid client credentials")),
                };
            }
            if basic_only {
                return Err(invalid_client("Client must authenticate with HTTP Basic"));
            }
            match body_secret {
                Some(s) if s == config.client_secret => Ok(()),
                Some(_) => Err(invalid_client("Invalid client credentials")),
                None => Err(invalid_client("Client authentication required")),
            }
        }
    }
}

/// [`authenticate_client`] for the device endpoints.
pub(super) fn authenticate(
    config: &SimulatorConfig,
    headers: &HeaderMap,
    params: &Params,
    basic_only: bool,
) -> Result<(), Response> {
    authenticate_client(config, headers, params, basic_only)
}

/// A successful token answer, for the device grant.
pub(super) fn token_answer(issued: &Issued, shape: Option<&AnswerShape>) -> Response {
    token_success(issued, shape)
}

fn pkce_matches(verifier: &str, challenge: &str, method: ChallengeMethod) -> bool {
    match method {
        ChallengeMethod::S256 => {
            URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes())) == challenge
        }
        ChallengeMethod::Plain => verifier == challenge,
    }
}
// ---------------------------------------------------------------------------
// authorization endpoint

struct AuthorizeRequest {
    params: Params,
    redirect_uri: url::Url,
    challenge: Option<(String, ChallengeMethod)>,
}

fn validate_authorize(
    config: &SimulatorConfig,
    params: Params,
) -> Result<AuthorizeRequest, Response> {
    let bad = |msg: &str| {
        html_page(
            StatusCode::BAD_REQUEST,
            "Invalid authorization request",
            maud::html! { p { (msg) } },
        )
    };
    if param(&params, "client_id") != Some(config.client_id.as_str()) {
        return Err(bad("Unknown or missing client_id."));
    }
    let Some(redirect_raw) = param(&params, "redirect_uri") else {
        return Err(bad("Missing redirect_uri."));
    };
    let redirect_uri = match url::Url::parse(redirect_raw) {
        Ok(u) if u.fragment().is_none() => u,
        _ => {
            return Err(bad(
                "redirect_uri must be an absolute URI without a fragment.",
            ))
        }
    };
    if param(&params, "response_type") != Some("code") {
        return Err(bad("response_type must be \"code\"."));
    }
    let delimiter = config.quirks.scope_delimiter;
    if delimiter != ' ' && param(&params, "scope").is_some_and(|s| s.contains(' ')) {
        return Err(bad(&format!(
            "Invalid scope: separate scopes with \"{delimiter}\"."
        )));
    }
    let challenge = match param(&params, "code_challenge") {
        None => None,
        Some(c) => {
            let method = match param(&params, "code_challenge_method") {
                None | Some("plain") => ChallengeMethod::Plain,
                Some("S256") => ChallengeMethod::S256,
                Some(_) => return Err(bad("Unsupported code_challenge_method.")),
            };
            Some((c.to_owned(), method))
        }
    };
    Ok(AuthorizeRequest {
        params,
        redirect_uri,
        challenge,
    })
}

pub(super) async fn authorize_page(
    AxState(sim): AxState<Simulator>,
    RawQuery(query): RawQuery,
) -> Response {
    let params = parse_params(query.unwrap_or_default().as_bytes());
    let config = sim.lock().config.clone();
    let req = match validate_authorize(&config, params) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let hidden = maud::html! {
        @for (k, v) in &req.params {
            input type="hidden" name=(k) value=(v);
        }
    };
    let body = maud::html! {
        p {
            "The application " b { (config.client_id) } " wants access to your Keap account "
            "(simulated; scope " code { (SIM_SCOPE) } ")."
        }
        form method="post" action="approve" {
            (hidden) button type="submit" id="approve" { "Approve" }
        }
        form method="post" action="deny" {
            (hidden) button type="submit" id="deny" { "Deny" }
        }
    };
    html_page(StatusCode::OK, "Keap simulator: authorize access", body)
}

pub(super) async fn approve(AxState(sim): AxState<Simulator>, body: Body) -> Response {
    let raw = match read_body(body, FORM_BODY_LIMIT).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let params = parse_params(&raw);
    let mut st = sim.lock();
    let req = match validate_authorize(&st.config, params) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let code = random_token();
    let now = Instant::now();
    let client_id = st.config.client_id.clone();
    let quirks = st.config.quirks.clone();
    let offline = quirks.offline.earned(&req.params, quirks.scope_delimiter);
    // Expired codes are useless; dropping them keeps long dev sessions small.
    st.codes.retain(|_, c| c.expires_at > now);
    st.codes.insert(
        code.clone(),
        AuthCode {
            offline,
            client_id,
            redirect_uri: param(&req.params, "redirect_uri")
                .unwrap_or_default()
                .to_owned(),
            challenge: req.challenge,
            expires_at: now + CODE_LIFETIME,
            used: false,
        },
    );
    drop(st);
    tracing::debug!("simulator: authorization approved, code issued");
    let mut location = req.redirect_uri;
    {
        let mut q = location.query_pairs_mut();
        q.append_pair("code", &code);
        if let Some(state) = param(&req.params, "state") {
            q.append_pair("state", state);
        }
        for (k, v) in &quirks.callback_extras {
            q.append_pair(k, v);
        }
    }
    redirect(location.as_str())
}

pub(super) async fn deny(AxState(sim): AxState<Simulator>, body: Body) -> Response {
    let raw = match read_body(body, FORM_BODY_LIMIT).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let config = sim.lock().config.clone();
    let req = match validate_authorize(&config, parse_params(&raw)) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let mut location = req.redirect_uri;
    {
        let mut q = location.query_pairs_mut();
        q.append_pair("error", "access_denied");
        q.append_pair(
            "error_description",
            "The user denied the authorization request",
        );
        if let Some(state) = param(&req.params, "state") {
            q.append_pair("state", state);
        }
    }
    redirect(location.as_str())
}

// ---------------------------------------------------------------------------
// token endpoint

fn token_success(issued: &Issued, shape: Option<&AnswerShape>) -> Response {
    let mut body = serde_json::json!({
        "access_token": issued.access_token,
        "token_type": "bearer",
        "expires_in": issued.expires_in,
        "scope": SIM_SCOPE,
    });
    let Some(obj) = body.as_object_mut() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    if let Some(rt) = &issued.refresh_token {
        obj.insert(
            "refresh_token".to_owned(),
            serde_json::Value::from(rt.as_str()),
        );
    }
    for (k, v) in &issued.extras {
        obj.insert(k.clone(), v.clone());
    }
    if issued.omit_expires_in {
        obj.remove("expires_in");
    }
    let mut status = StatusCode::OK;
    let mut raw_expires_in = None;
    match shape {
        None | Some(AnswerShape::TextPlain) => {}
        Some(AnswerShape::ExpiresIn(raw)) => {
            obj.remove("expires_in");
            raw_expires_in = Some(raw.as_str());
        }
        Some(AnswerShape::NoTokenType) => {
            obj.remove("token_type");
        }
        Some(AnswerShape::TokenType(t)) => {
            obj.insert("token_type".into(), t.as_str().into());
        }
        Some(AnswerShape::Status(code)) => {
            status = StatusCode::from_u16(*code).unwrap_or(StatusCode::OK);
        }
        Some(AnswerShape::NoAccessToken) => {
            obj.remove("access_token");
        }
    }
    let mut text = body.to_string();
    if let Some(raw) = raw_expires_in {
        // Spliced as text: `1e400` is no serde_json number.
        text = format!("{{\"expires_in\":{raw},{}", &text[1..]);
    }
    let mut resp = (status, text).into_response();
    let h = resp.headers_mut();
    let ct = if shape == Some(&AnswerShape::TextPlain) {
        "text/plain; charset=utf-8"
    } else {
        JSON_CT
    };
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

/// Processes a validated token request; `Ok` means tokens were issued.
fn process_token(
    sim: &Simulator,
    headers: &HeaderMap,
    params: &Params,
) -> Result<Response, Response> {
    if !has_form_content_type(headers) {
        return Err(invalid_request(
            "Content-Type must be application/x-www-form-urlencoded",
        ));
    }
    if let Some(name) = repeated_param(params) {
        return Err(invalid_request(&format!("Parameter {name} is repeated")));
    }
    let mut st = sim.lock();
    match param(params, "grant_type") {
        None => Err(invalid_request("Missing grant_type")),
        Some("authorization_code") => {
            let basic_only = st.config.quirks.require_basic_on_code && !st.is_public_client();
            authenticate_client(&st.config, headers, params, basic_only)?;
            let Some(code) = param(params, "code") else {
                return Err(invalid_request("Missing code"));
            };
            let invalid_grant = |d: &str| oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", d);
            let client_id = st.config.client_id.clone();
            let Some(entry) = st.codes.get_mut(code) else {
                return Err(invalid_grant("Invalid authorization code"));
            };
            if entry.used || entry.expires_at <= Instant::now() || entry.client_id != client_id {
                return Err(invalid_grant("Invalid authorization code"));
            }
            if param(params, "redirect_uri") != Some(entry.redirect_uri.as_str()) {
                return Err(invalid_grant(
                    "redirect_uri does not match the authorization request",
                ));
            }
            let verifier = param(params, "code_verifier");
            match (&entry.challenge, verifier) {
                (Some((challenge, method)), Some(v)) if pkce_matches(v, challenge, *method) => {}
                (Some(_), _) => return Err(invalid_grant("PKCE verification failed")),
                // A verifier without a challenge means the client and server
                // disagree about PKCE; refusing surfaces that client bug.
                (None, Some(_)) => {
                    return Err(invalid_grant(
                        "code_verifier sent but no code_challenge was registered",
                    ))
                }
                (None, None) => {}
            }
            entry.used = true;
            let offline = entry.offline;
            let grant = st.new_grant();
            let issued = st.issue(grant, offline);
            st.stats.code_exchanges += 1;
            let shape = st.answer_shape.clone();
            drop(st);
            tracing::debug!("simulator: authorization code exchanged");
            Ok(token_success(&issued, shape.as_ref()))
        }
        Some("refresh_token") => {
            let basic_only = st.config.require_basic_on_refresh && !st.is_public_client();
            authenticate_client(&st.config, headers, params, basic_only)?;
            let Some(rt) = param(params, "refresh_token") else {
                return Err(invalid_request("Missing refresh_token"));
            };
            let style = st.config.refresh_error_style;
            let (grant, status) = match st.refresh.get(rt) {
                Some(e) => (e.grant, e.status),
                None => {
                    st.stats.refresh_rejected += 1;
                    tracing::debug!("simulator: unknown refresh token rejected");
                    return Err(refresh_rejected(style));
                }
            };
            let grant_revoked = st.grants.get(grant).is_none_or(|g| g.revoked);
            match status {
                RefreshStatus::Used => {
                    st.stats.refresh_reuse += 1;
                    st.stats.refresh_rejected += 1;
                    tracing::warn!("simulator: rotated-out refresh token presented again (reuse)");
                    return Err(refresh_rejected(style));
                }
                RefreshStatus::Revoked => {
                    st.stats.refresh_rejected += 1;
                    return Err(refresh_rejected(style));
                }
                RefreshStatus::Valid if grant_revoked => {
                    st.stats.refresh_rejected += 1;
                    return Err(refresh_rejected(style));
                }
                RefreshStatus::Valid => {}
            }
            if st.refresh_token_expired(rt, grant) {
                st.stats.refresh_expired += 1;
                st.stats.refresh_rejected += 1;
                tracing::debug!("simulator: refresh token past its lifetime rejected");
                return Err(refresh_rejected(style));
            }
            if let Some(e) = st.refresh.get_mut(rt) {
                e.last_used = Instant::now();
            }
            let rotate = st.config.rotate_refresh_tokens;
            if rotate && !st.config.quirks.keep_used_refresh_tokens {
                if let Some(e) = st.refresh.get_mut(rt) {
                    e.status = RefreshStatus::Used;
                }
            }
            let issued = st.issue(grant, rotate);
            st.stats.refresh_ok += 1;
            let shape = st.answer_shape.clone();
            drop(st);
            tracing::debug!(rotated = rotate, "simulator: refresh succeeded");
            Ok(token_success(&issued, shape.as_ref()))
        }
        Some("client_credentials") => {
            // The client authenticates as it does on refresh (Keap-like:
            // HTTP Basic only, unless `require_basic_on_refresh` is off).
            let basic_only = st.config.require_basic_on_refresh && !st.is_public_client();
            authenticate_client(&st.config, headers, params, basic_only)?;
            if st.is_public_client() {
                return Err(oauth_error(
                    StatusCode::BAD_REQUEST,
                    "unauthorized_client",
                    "A public client cannot use the client_credentials grant",
                ));
            }
            st.client_credentials_scope = param(params, "scope").map(str::to_owned);
            // Each token is a grant of its own: issuing one does not kill
            // the previous one, which lives out its lifetime (RFC 6749 4.4
            // tokens are independent).
            let grant = st.new_grant();
            let issued = st.issue(grant, false);
            st.stats.client_credentials_ok += 1;
            let shape = st.answer_shape.clone();
            drop(st);
            tracing::debug!("simulator: client credentials token issued");
            Ok(token_success(&issued, shape.as_ref()))
        }
        Some(super::device::DEVICE_GRANT) => super::device::poll(&mut st, headers, params),
        Some(_) => Err(oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "grant_type must be authorization_code, refresh_token or client_credentials",
        )),
    }
}

pub(super) async fn token_endpoint(
    AxState(sim): AxState<Simulator>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let raw = match read_body(body, FORM_BODY_LIMIT).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    // Parsed before the content-type check so a refresh is counted (and
    // faults apply) no matter how malformed the rest of the request is.
    let params = parse_params(&raw);
    let is_refresh = param(&params, "grant_type") == Some("refresh_token");
    let is_client_credentials = param(&params, "grant_type") == Some("client_credentials");
    let (fault, delay, phase, style) = {
        let mut st = sim.lock();
        if is_refresh {
            st.stats.refresh_calls += 1;
        }
        if is_client_credentials {
            st.stats.client_credentials_calls += 1;
        }
        if is_refresh || is_client_credentials {
            if st.token_calls.len() >= super::TOKEN_CALLS_KEPT {
                st.token_calls.pop_front();
            }
            st.token_calls.push_back(Instant::now());
        }
        let fault = match st.fault_queue.pop_front() {
            Some(f) => Some(f),
            None if is_refresh || is_client_credentials => st.persistent_fault.clone(),
            None => None,
        };
        if is_refresh && fault == Some(Fault::RejectRefresh) {
            st.stats.refresh_rejected += 1;
        }
        (
            fault,
            st.token_delay,
            st.delay_phase,
            st.config.refresh_error_style,
        )
    };
    if phase == DelayPhase::BeforeProcessing && !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if let Some(fault) = fault {
        tracing::debug!(?fault, "simulator: injecting token endpoint fault");
        if let Fault::Hang(d) = fault {
            tokio::time::sleep(d).await;
            return apigee_fault(
                StatusCode::GATEWAY_TIMEOUT,
                "Gateway Timeout",
                "messaging.adaptors.http.flow.GatewayTimeout",
            );
        }
        if let Some(resp) = fault_response_immediate(&fault, style) {
            return resp;
        }
    }
    match process_token(&sim, &headers, &params) {
        Ok(resp) => {
            if phase == DelayPhase::AfterRotation && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            resp
        }
        Err(resp) => resp,
    }
}

// ---------------------------------------------------------------------------
// revocation endpoint

pub(super) async fn revoke_endpoint(
    AxState(sim): AxState<Simulator>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let raw = match read_body(body, FORM_BODY_LIMIT).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    if !has_form_content_type(&headers) {
        return invalid_request("Content-Type must be application/x-www-form-urlencoded");
    }
    let params = parse_params(&raw);
    let mut st = sim.lock();
    if let Some(status) = st.revoke_fault {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let error = if status.is_server_error() {
            "temporarily_unavailable"
        } else {
            "unsupported_token_type"
        };
        return (
            status,
            [(header::CONTENT_TYPE, JSON_CT)],
            serde_json::json!({
                "error": error,
                "error_description": "simulated revocation failure",
            })
            .to_string(),
        )
            .into_response();
    }
    if let Err(resp) = authenticate_client(&st.config, &headers, &params, false) {
        return resp;
    }
    let Some(token) = param(&params, "token") else {
        return invalid_request("Missing token");
    };
    // The hint is only an optimisation in RFC 7009; both tables are searched.
    let strict = st.strict_revocation;
    let grant = st
        .refresh
        .get(token)
        .filter(|e| !strict || e.status == RefreshStatus::Valid)
        .map(|e| e.grant)
        .or_else(|| {
            st.access
                .get(token)
                .filter(|_| !strict || st.access_valid(token))
                .map(|e| e.grant)
        });
    if let Some(g) = grant {
        if st.grants.get(g).is_some_and(|g| !g.revoked) {
            st.revoke_grant(g);
            st.stats.revocations += 1;
            tracing::debug!("simulator: grant revoked");
        }
    }
    StatusCode::OK.into_response()
}
