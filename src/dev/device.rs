//! The device authorization grant (RFC 8628): the device authorization
//! endpoint, the `device_code` grant at `/token` (authorization_pending,
//! slow_down, expired_token, access_denied), the verification page a
//! person types the code into, and the hooks tests approve, deny or expire
//! codes with.

use super::*;

/// The grant type of a device-code poll.
pub(super) const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// How the device authorization endpoint misbehaves (see
/// [`Simulator::set_device_fault`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceFault {
    /// This status with a plain-text body.
    Status(u16),
    /// 200 whose body is not JSON (labelled as JSON).
    NotJson,
    /// 200 JSON answer without this member (`device_code`, `user_code`,
    /// `verification_uri`).
    Missing(String),
    /// 400 with this OAuth error.
    OAuthError(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CodeStatus {
    Pending,
    Approved,
    Denied,
    /// Expired early by [`Simulator::expire_device_codes`].
    Expired,
    /// Redeemed for tokens.
    Used,
}

pub(super) struct DeviceCode {
    user_code: String,
    status: CodeStatus,
    issued_at: Instant,
    expires_at: Instant,
    /// The interval this client must respect now (grows by 5 s with each
    /// `slow_down` sent, RFC 8628 3.5).
    interval: Duration,
    polls: Vec<Instant>,
}

/// The device side of the simulator's state.
pub(super) struct DeviceState {
    /// `interval` in the answers, in seconds.
    interval_secs: u64,
    /// `expires_in` in the answers.
    expires_in: Duration,
    fault: Option<DeviceFault>,
    /// Answer `slow_down` to this many next polls.
    slow_downs: u32,
    /// By device code.
    codes: HashMap<String, DeviceCode>,
    /// Device codes, oldest first.
    order: Vec<String>,
}

impl Default for DeviceState {
    fn default() -> Self {
        DeviceState {
            interval_secs: 5,
            expires_in: Duration::from_secs(600),
            fault: None,
            slow_downs: 0,
            codes: HashMap::new(),
            order: Vec::new(),
        }
    }
}

impl DeviceState {
    fn by_user_code(&mut self, user_code: &str) -> Option<&mut DeviceCode> {
        let wanted = normalize(user_code);
        self.codes
            .values_mut()
            .find(|c| normalize(&c.user_code) == wanted)
    }

    fn newest(&self) -> Option<&DeviceCode> {
        self.order.last().and_then(|d| self.codes.get(d))
    }
}

/// User codes are compared without case, spaces or dashes, as people type
/// them.
fn normalize(code: &str) -> String {
    code.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

fn user_code() -> String {
    // No vowels or look-alikes, as RFC 8628 6.1 suggests.
    const SET: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";
    let mut rng = rand::thread_rng();
    let mut pick = || char::from(SET[rng.gen_range(0..SET.len())]);
    let a: String = (0..4).map(|_| pick()).collect();
    let b: String = (0..4).map(|_| pick()).collect();
    format!("{a}-{b}")
}

impl Simulator {
    /// What device authorizations answer from now on: `interval` (whole
    /// seconds, as RFC 8628 writes it) and `expires_in`.
    pub fn set_device_timing(&self, interval_secs: u64, expires_in: Duration) {
        let mut st = self.lock();
        st.device.interval_secs = interval_secs;
        st.device.expires_in = expires_in;
    }

    /// Makes the device authorization endpoint misbehave (`None`: normal).
    pub fn set_device_fault(&self, fault: Option<DeviceFault>) {
        self.lock().device.fault = fault;
    }

    /// Answers `slow_down` to the next `n` polls of a pending code.
    pub fn slow_down_next(&self, n: u32) {
        self.lock().device.slow_downs = n;
    }

    /// The user codes still waiting for a person, oldest first.
    pub fn pending_user_codes(&self) -> Vec<String> {
        let st = self.lock();
        st.device
            .order
            .iter()
            .filter_map(|d| st.device.codes.get(d))
            .filter(|c| c.status == CodeStatus::Pending)
            .map(|c| c.user_code.clone())
            .collect()
    }

    /// Approves a user code, as the person would on the verification page;
    /// `false` when no pending code matches.
    pub fn approve_device(&self, user_code: &str) -> bool {
        self.decide(user_code, CodeStatus::Approved)
    }

    /// Denies a user code; `false` when no pending code matches.
    pub fn deny_device(&self, user_code: &str) -> bool {
        self.decide(user_code, CodeStatus::Denied)
    }

    /// Expires every pending code now: the next poll of each gets
    /// `expired_token`.
    pub fn expire_device_codes(&self) {
        for c in self.lock().device.codes.values_mut() {
            if c.status == CodeStatus::Pending {
                c.status = CodeStatus::Expired;
            }
        }
    }

    fn decide(&self, user_code: &str, to: CodeStatus) -> bool {
        let mut st = self.lock();
        match st.device.by_user_code(user_code) {
            Some(c) if c.status == CodeStatus::Pending && Instant::now() < c.expires_at => {
                c.status = to;
                true
            }
            _ => false,
        }
    }

    /// Every device code issued, oldest first: what must never appear in
    /// the daemon's logs or answers.
    pub fn device_codes_issued(&self) -> Vec<String> {
        self.lock().device.order.clone()
    }

    /// When the newest device code was polled, counted from its issue.
    pub fn device_polls(&self) -> Vec<Duration> {
        let st = self.lock();
        st.device
            .newest()
            .map(|c| c.polls.iter().map(|t| *t - c.issued_at).collect())
            .unwrap_or_default()
    }
}

/// `POST /device/code`: RFC 8628 3.1.
pub(super) async fn device_authorization(
    AxState(sim): AxState<Simulator>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let raw = match read_body(body, FORM_BODY_LIMIT).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let params = parse_params(&raw);
    if !has_form_content_type(&headers) {
        return invalid_request("Content-Type must be application/x-www-form-urlencoded");
    }
    let mut st = sim.lock();
    st.stats.device_authorizations += 1;
    if let Err(r) = super::oauth::authenticate(&st.config, &headers, &params, false) {
        return r;
    }
    let fault = st.device.fault.clone();
    let base = st.issuer.clone().unwrap_or_default();
    let device_code = random_token();
    let user = user_code();
    let now = Instant::now();
    let expires_in = st.device.expires_in;
    let interval = st.device.interval_secs;
    let mut body = serde_json::json!({
        "device_code": device_code,
        "user_code": user,
        "verification_uri": format!("{base}/device"),
        "verification_uri_complete": format!("{base}/device?user_code={user}"),
        "expires_in": expires_in.as_secs().max(1),
        "interval": interval,
    });
    match fault {
        None => {}
        Some(DeviceFault::Status(code)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return (status, format!("{code} error\n")).into_response();
        }
        Some(DeviceFault::NotJson) => {
            let mut r = (StatusCode::OK, "<html><body>Sign in</body></html>").into_response();
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON_CT));
            return r;
        }
        Some(DeviceFault::Missing(name)) => {
            if let Some(o) = body.as_object_mut() {
                o.remove(&name);
            }
            return json_response(StatusCode::OK, body);
        }
        Some(DeviceFault::OAuthError(e)) => {
            return oauth_error(StatusCode::BAD_REQUEST, &e, "refused by the simulator");
        }
    }
    st.device.codes.insert(
        device_code.clone(),
        DeviceCode {
            user_code: user,
            status: CodeStatus::Pending,
            issued_at: now,
            expires_at: now + expires_in,
            interval: Duration::from_secs(interval),
            polls: Vec::new(),
        },
    );
    st.device.order.push(device_code);
    drop(st);
    tracing::debug!("simulator: device authorization issued");
    json_response(StatusCode::OK, body)
}

/// The `device_code` grant at `/token` (RFC 8628 3.4 and 3.5), with the
/// state already locked and the client not yet authenticated.
pub(super) fn poll(
    st: &mut MutexGuard<'_, State>,
    headers: &HeaderMap,
    params: &Params,
) -> Result<Response, Response> {
    let basic_only = st.config.quirks.require_basic_on_code && !st.is_public_client();
    super::oauth::authenticate(&st.config, headers, params, basic_only)?;
    st.stats.device_polls += 1;
    let Some(code) = param(params, "device_code") else {
        return Err(invalid_request("Missing device_code"));
    };
    let error = |e: &str, d: &str| oauth_error(StatusCode::BAD_REQUEST, e, d);
    let now = Instant::now();
    let slow_down = st.device.slow_downs > 0;
    let Some(c) = st.device.codes.get_mut(code) else {
        return Err(error("invalid_grant", "Unknown device code"));
    };
    let too_fast = c
        .polls
        .last()
        .is_some_and(|last| now.duration_since(*last) < c.interval.mul_f64(0.9));
    c.polls.push(now);
    if too_fast {
        st.stats.device_polls_too_fast += 1;
    }
    let c = st
        .device
        .codes
        .get_mut(code)
        .ok_or_else(|| error("invalid_grant", "Unknown device code"))?;
    if c.status == CodeStatus::Pending && now >= c.expires_at {
        c.status = CodeStatus::Expired;
    }
    match c.status {
        CodeStatus::Pending if slow_down => {
            c.interval += Duration::from_secs(5);
            st.device.slow_downs -= 1;
            Err(error("slow_down", "Polling too fast"))
        }
        CodeStatus::Pending => Err(error(
            "authorization_pending",
            "The user has not yet approved",
        )),
        CodeStatus::Denied => Err(error("access_denied", "The user denied the request")),
        CodeStatus::Expired => Err(error("expired_token", "The device code expired")),
        CodeStatus::Used => Err(error("invalid_grant", "The device code was already used")),
        CodeStatus::Approved => {
            c.status = CodeStatus::Used;
            let grant = st.new_grant();
            let issued = st.issue(grant, true);
            let shape = st.answer_shape.clone();
            tracing::debug!("simulator: device code redeemed");
            Ok(super::oauth::token_answer(&issued, shape.as_ref()))
        }
    }
}

/// `GET /device`: where a person types the code (prefilled from
/// `?user_code=`).
pub(super) async fn verification_page(RawQuery(query): RawQuery) -> Response {
    let params = parse_params(query.unwrap_or_default().as_bytes());
    let prefilled = param(&params, "user_code").unwrap_or_default().to_owned();
    let body = maud::html! {
        form method="post" action="device" {
            label { "Code " input name="user_code" value=(prefilled); }
            " "
            button type="submit" name="action" value="approve" id="approve" { "Approve" }
            " "
            button type="submit" name="action" value="deny" id="deny" { "Deny" }
        }
    };
    html_page(StatusCode::OK, "Keap simulator: connect a device", body)
}

/// `POST /device`: the verification page's answer.
pub(super) async fn verification_answer(AxState(sim): AxState<Simulator>, body: Body) -> Response {
    let raw = match read_body(body, FORM_BODY_LIMIT).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let params = parse_params(&raw);
    let code = param(&params, "user_code").unwrap_or_default();
    let (done, title) = match param(&params, "action") {
        Some("deny") => (sim.deny_device(code), "Access denied"),
        _ => (sim.approve_device(code), "Device connected"),
    };
    if done {
        html_page(
            StatusCode::OK,
            title,
            maud::html! { p { "You can return to your device." } },
        )
    } else {
        html_page(
            StatusCode::BAD_REQUEST,
            "Unknown code",
            maud::html! { p { "No device is waiting for that code, or it expired." } },
        )
    }
}
