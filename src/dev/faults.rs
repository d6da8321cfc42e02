//! The answers an injected [`Fault`] turns into.

use super::*;

pub(super) fn fault_response_immediate(
    fault: &Fault,
    style: RefreshErrorStyle,
) -> Option<Response> {
    let resp = match fault {
        Fault::Status(code) => {
            let status = StatusCode::from_u16(*code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let reason = status.canonical_reason().unwrap_or("Error");
            if status.is_server_error() {
                html_page(
                    status,
                    &format!("{} {reason}", status.as_u16()),
                    maud::html! { p { "The upstream server is temporarily unable to service your request." } },
                )
            } else {
                let mut resp = (status, format!("{} {reason}\n", status.as_u16())).into_response();
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                resp
            }
        }
        Fault::RateLimited { retry_after_secs } => {
            let mut resp = apigee_fault(
                StatusCode::TOO_MANY_REQUESTS,
                "Rate limit quota violation. Quota limit exceeded. Identifier : sim1234",
                "policies.ratelimit.QuotaViolation",
            );
            if let Some(secs) = retry_after_secs {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*secs));
            }
            resp
        }
        Fault::Garbage => {
            // Labelled JSON on purpose: clients must not trust the header.
            let mut resp = (
                StatusCode::OK,
                "<html><body>Service temporarily unavailable</body></html>",
            )
                .into_response();
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON_CT));
            resp
        }
        Fault::MissingAccessToken => json_response(
            StatusCode::OK,
            serde_json::json!({ "token_type": "bearer", "expires_in": 86400, "scope": SIM_SCOPE }),
        ),
        Fault::RejectRefresh => refresh_rejected(style),
        Fault::OAuthError {
            status,
            error,
            description,
        } => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_REQUEST);
            let mut body = serde_json::json!({ "error": error });
            if let (Some(d), Some(obj)) = (description, body.as_object_mut()) {
                obj.insert("error_description".into(), d.as_str().into());
            }
            json_response(status, body)
        }
        Fault::Hang(_) => return None,
    };
    Some(resp)
}
