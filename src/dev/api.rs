//! The bearer-protected API under `/api/...`, with Keap's limits.

use super::*;

// ---------------------------------------------------------------------------
// protected API

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

pub(super) async fn api_endpoint(
    AxState(sim): AxState<Simulator>,
    method: Method,
    Path(path): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let authorized = {
        let mut st = sim.lock();
        st.stats.api_calls += 1;
        let ok = bearer_token(&headers).is_some_and(|t| st.access_valid(t));
        if !ok {
            st.stats.api_unauthorized += 1;
        }
        ok
    };
    if !authorized {
        return apigee_fault(
            StatusCode::UNAUTHORIZED,
            "Invalid Access Token",
            "keymanagement.service.invalid_access_token",
        );
    }
    // Like Apigee: the token is checked first, then the quotas; the
    // headers describe the quotas after this request.
    let mut quota_headers = HeaderMap::new();
    {
        let mut st = sim.lock();
        if let Some(limits) = st.config.limits {
            let now = Instant::now();
            let admitted = st.usage.admit(&limits, now);
            st.usage.headers(&limits, now, &mut quota_headers);
            if let Err(which) = admitted {
                st.stats.api_rate_limited += 1;
                drop(st);
                let mut resp = if which == "spike" {
                    apigee_fault(
                        StatusCode::TOO_MANY_REQUESTS,
                        &format!(
                            "Spike arrest violation. Allowed rate : MessageRate{{messagesPerPeriod={n}, periodInMicroseconds=1000000, maxBurstMessageCount={n}.0}}",
                            n = limits.per_second
                        ),
                        "policies.ratelimit.SpikeArrestViolation",
                    )
                } else {
                    apigee_fault(
                        StatusCode::TOO_MANY_REQUESTS,
                        "Rate limit quota violation. Quota limit exceeded. Identifier : sim1234",
                        "policies.ratelimit.QuotaViolation",
                    )
                };
                resp.headers_mut().extend(quota_headers);
                return resp;
            }
        }
    }
    if path == "connections" {
        let tenants = sim.lock().config.quirks.tenants.clone();
        if !tenants.is_empty() {
            // Xero's shape: one object per organisation the grant reaches.
            let list: Vec<serde_json::Value> = tenants
                .iter()
                .enumerate()
                .map(|(i, (id, name))| {
                    serde_json::json!({
                        "id": format!("c{i}"),
                        "authEventId": "sim",
                        "tenantId": id,
                        "tenantType": "ORGANISATION",
                        "tenantName": name,
                    })
                })
                .collect();
            let mut resp = json_response(StatusCode::OK, serde_json::Value::Array(list));
            resp.headers_mut().extend(quota_headers);
            return resp;
        }
    }
    let mut resp = api_answer(method, path, query, &headers, body).await;
    resp.headers_mut().extend(quota_headers);
    resp
}

/// The API itself: an echo, and `large?bytes=N`.
async fn api_answer(
    method: Method,
    path: String,
    query: Option<String>,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    if path == "headers" {
        // What reached the API, minus the (valid) bearer token itself.
        let seen: serde_json::Map<String, serde_json::Value> = headers
            .iter()
            .filter(|(k, _)| *k != header::AUTHORIZATION)
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into(),
                )
            })
            .collect();
        return json_response(StatusCode::OK, serde_json::json!({ "headers": seen }));
    }
    if path == "large" {
        let params = parse_params(query.as_deref().unwrap_or_default().as_bytes());
        let n = match param(&params, "bytes").map(str::parse::<u64>) {
            Some(Ok(n)) if n <= LARGE_BODY_MAX => n,
            _ => {
                return invalid_request(&format!(
                    "large requires bytes=N with N <= {LARGE_BODY_MAX}"
                ))
            }
        };
        // Deterministic pattern so a client can verify the bytes it relayed;
        // streamed in chunks so a large answer is never one buffer (and a
        // proxy in between is seen to stream, not to buffer).
        const CHUNK: u64 = 64 * 1024;
        let chunks = futures_util::stream::unfold(0u64, move |sent| async move {
            if sent >= n {
                return None;
            }
            let end = (sent + CHUNK).min(n);
            let data: Vec<u8> = (sent..end).map(|i| (i % 251) as u8).collect();
            Some((Ok::<_, std::io::Error>(Bytes::from(data)), end))
        });
        let mut resp = (StatusCode::OK, Body::from_stream(chunks)).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        return resp;
    }
    let body_len = match axum::body::to_bytes(body, API_BODY_LIMIT).await {
        Ok(b) => b.len(),
        Err(_) => {
            return oauth_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request",
                "Request body too large",
            )
        }
    };
    json_response(
        StatusCode::OK,
        serde_json::json!({
            "method": method.as_str(),
            "path": path,
            "query": query,
            "body_len": body_len,
        }),
    )
}
