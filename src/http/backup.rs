//! `POST /v1/backup` (SPEC 14): a backup now, made by the running daemon
//! on its own pool (what `tokenkeeper backup` asks when a daemon holds the
//! store). Mounted only when `[backup]` is configured; behind the same
//! checks as every `/v1/*` route.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::answers::ErrorBody;
use crate::backup::Backups;
use crate::refresh::Engine;

/// The answer to `POST /v1/backup`: the backup written and verified.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BackupBody {
    /// Path of the new backup file (its checksum is `<file>.sha256`).
    pub file: String,
    /// Lower-case hex SHA-256 of the file.
    pub sha256: String,
    pub bytes: u64,
    /// How many older backups were removed to keep `backup.keep`.
    pub removed: usize,
}

/// The route, with its own state.
pub fn routes(backups: Arc<Backups>, engine: Engine) -> Router {
    Router::new()
        .route("/v1/backup", post(backup_now))
        .with_state((backups, engine))
}

/// `POST /v1/backup`: 200 with [`BackupBody`], or `backup_failed` with
/// the sentence (paths and causes, never a token): 503 while the daemon
/// stops, else 500.
#[utoipa::path(post, path = "/v1/backup", summary = "Make a backup now (SQLite store with [backup] configured)", responses(
    (status = 200, description = "the backup, written and verified", body = BackupBody),
    (status = 401, description = "a bearer credential was presented and is wrong", body = ErrorBody),
    (status = 403, description = "cross-origin request", body = ErrorBody),
    (status = 404, description = "the daemon runs without [backup]", body = ErrorBody),
    (status = 500, description = "backup_failed: the sentence says why", body = ErrorBody),
    (status = 503, description = "backup_failed: the daemon is stopping", body = ErrorBody)
))]
pub async fn backup_now(State((backups, engine)): State<(Arc<Backups>, Engine)>) -> Response {
    match crate::backup::run_logged(&backups, &engine).await {
        Ok(made) => Json(BackupBody {
            file: made.path.display().to_string(),
            sha256: made.sha256,
            bytes: made.bytes,
            removed: made.removed.len(),
        })
        .into_response(),
        Err(e) => (
            match e {
                crate::backup::BackupError::Stopping => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            Json(ErrorBody {
                error: "backup_failed".into(),
                message: e.to_string(),
                connect_url: None,
            }),
        )
            .into_response(),
    }
}
