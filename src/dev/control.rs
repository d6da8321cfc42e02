//! The control API (`/_sim/...`) tests use to inject faults and read stats.

use super::*;

// ---------------------------------------------------------------------------
// control API

pub(super) async fn sim_stats(AxState(sim): AxState<Simulator>) -> Json<SimStats> {
    Json(sim.stats())
}

pub(super) async fn sim_revoke_all(AxState(sim): AxState<Simulator>) -> StatusCode {
    sim.revoke_all_grants();
    StatusCode::NO_CONTENT
}

/// JSON representation of a [`Fault`] for `/_sim/config`, e.g.
/// `{"type":"status","status":503}`, `{"type":"rate_limited","retry_after_secs":5}`,
/// `{"type":"garbage"}`, `{"type":"missing_access_token"}`,
/// `{"type":"hang","ms":2000}`, `{"type":"reject_refresh"}`,
/// `{"type":"oauth_error","status":401,"error":"invalid_client"}`.
#[derive(Debug, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum FaultSpec {
    Status {
        status: u16,
    },
    RateLimited {
        retry_after_secs: Option<u64>,
    },
    Garbage,
    MissingAccessToken,
    Hang {
        ms: u64,
    },
    RejectRefresh,
    OauthError {
        status: u16,
        error: String,
        description: Option<String>,
    },
}

impl From<FaultSpec> for Fault {
    fn from(spec: FaultSpec) -> Self {
        match spec {
            FaultSpec::Status { status } => Fault::Status(status),
            FaultSpec::RateLimited { retry_after_secs } => Fault::RateLimited { retry_after_secs },
            FaultSpec::Garbage => Fault::Garbage,
            FaultSpec::MissingAccessToken => Fault::MissingAccessToken,
            FaultSpec::Hang { ms } => Fault::Hang(Duration::from_millis(ms)),
            FaultSpec::RejectRefresh => Fault::RejectRefresh,
            FaultSpec::OauthError {
                status,
                error,
                description,
            } => Fault::OAuthError {
                status,
                error,
                description,
            },
        }
    }
}

/// Body of `POST /_sim/config`. Absent keys leave a setting unchanged;
/// `"fault": null` clears the persistent fault.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigUpdate {
    token_delay_ms: Option<u64>,
    /// `"before_processing"` (default) or `"after_rotation"`.
    token_delay_phase: Option<String>,
    access_lifetime_secs: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    fault: Option<Option<FaultSpec>>,
}

/// Distinguishes `"fault": null` (clear) from an absent key (keep).
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    <Option<T> as serde::Deserialize>::deserialize(d).map(Some)
}

pub(super) async fn sim_config(AxState(sim): AxState<Simulator>, body: Body) -> Response {
    let raw = match read_body(body, FORM_BODY_LIMIT).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let update: ConfigUpdate = match serde_json::from_slice(&raw) {
        Ok(u) => u,
        Err(e) => return invalid_request(&format!("Invalid config JSON: {e}")),
    };
    let phase = match update.token_delay_phase.as_deref() {
        None => None,
        Some("before_processing") => Some(DelayPhase::BeforeProcessing),
        Some("after_rotation") => Some(DelayPhase::AfterRotation),
        Some(_) => {
            return invalid_request("token_delay_phase must be before_processing or after_rotation")
        }
    };
    let mut st = sim.lock();
    if let Some(ms) = update.token_delay_ms {
        st.token_delay = Duration::from_millis(ms);
    }
    if let Some(p) = phase {
        st.delay_phase = p;
    }
    if let Some(secs) = update.access_lifetime_secs {
        st.config.access_lifetime = Duration::from_secs(secs);
    }
    if let Some(fault) = update.fault {
        st.persistent_fault = fault.map(Fault::from);
    }
    let phase_name = match st.delay_phase {
        DelayPhase::BeforeProcessing => "before_processing",
        DelayPhase::AfterRotation => "after_rotation",
    };
    json_response(
        StatusCode::OK,
        serde_json::json!({
            "token_delay_ms": u64::try_from(st.token_delay.as_millis()).unwrap_or(u64::MAX),
            "token_delay_phase": phase_name,
            "access_lifetime_secs": st.config.access_lifetime.as_secs(),
            "fault": st.persistent_fault.as_ref().map(|f| format!("{f:?}")),
        }),
    )
}
