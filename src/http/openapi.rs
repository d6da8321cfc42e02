//! The OpenAPI 3.1 description of the local HTTP interface (SPEC 4),
//! generated from the handlers' annotations so it cannot drift from them.

use axum::Json;
use utoipa::OpenApi;

use super::{api, backup, callback, device, grant_in, login};

/// The document served at `/openapi.json`.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "tokenkeeper",
        description = "Local API of the tokenkeeper OAuth2 token lifecycle daemon: fresh access tokens for local programs. The refresh token is never returned.",
        license(name = "MIT OR Apache-2.0")
    ),
    paths(
        super::dashboard,
        super::dashboard::script,
        callback::connect,
        callback::callback,
        login::create_link,
        login::login,
        api::token_default,
        api::token,
        api::refresh_default,
        api::refresh,
        api::connections,
        api::delete_connection,
        api::events,
        api::inspect,
        grant_in::import,
        grant_in::paste_start,
        grant_in::paste_finish,
        device::start,
        device::watch,
        device::cancel,
        device::page_start,
        device::page,
        api::healthz,
        api::readyz,
        api::metrics,
        backup::backup_now,
        openapi_json,
    ),
    components(schemas(
        api::TokenBody,
        api::ConnectionsBody,
        api::ConnectionJson,
        api::EventsBody,
        api::EventJson,
        api::InspectBody,
        login::LinkRequest,
        login::LinkBody,
        super::answers::ImportRequest,
        super::answers::ImportBody,
        super::answers::PasteStartBody,
        super::answers::PasteFinishRequest,
        super::answers::PasteFinishBody,
        super::answers::DeviceFlowBody,
        backup::BackupBody,
        super::error::ErrorBody
    ))
)]
pub struct ApiDoc;

/// `GET /openapi.json`.
#[utoipa::path(get, path = "/openapi.json", summary = "This document", responses(
    (status = 200, description = "OpenAPI 3.1 description of this interface", content_type = "application/json")
))]
pub async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
