//! The configuration of `serve --dev`, beside the simulator it points at.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use url::Url;

use super::SimulatorConfig;
use crate::config::{
    ClientAuth, Config, NotifyConfig, Preset, ProviderConfig, RefreshConfig, ServerConfig,
    StorageConfig,
};

/// The configuration of `serve --dev`: no file, the built-in `demo`
/// provider served by the simulator under `/dev-provider` on the same
/// listener, a throw-away database.
pub fn config(listen: SocketAddr, db_path: PathBuf, client_secret: &str) -> Config {
    let base = format!("http://{listen}/dev-provider");
    let url = |p: &str| Url::parse(&format!("{base}{p}")).expect("dev URLs are well-formed");
    let mut providers = BTreeMap::new();
    providers.insert(
        "demo".to_string(),
        ProviderConfig {
            name: "demo".into(),
            preset: Preset::Keap,
            client_id: SimulatorConfig::default().client_id,
            client_secret: Some(SecretString::from(client_secret.to_string())),
            authorization_url: url("/authorize"),
            token_url: url("/token"),
            revocation_url: Some(url("/revoke")),
            api_base_url: Some(url("/api")),
            scopes: vec!["full".into()],
            code_auth: ClientAuth::Body,
            refresh_auth: ClientAuth::Basic,
            pkce: true,
            extra_authorize_params: BTreeMap::new(),
            default_lifetime: Duration::from_secs(3600),
            limits: Preset::Keap.limits(),
            request_timeout: Duration::from_secs(30),
            revoke_replaced: true,
            device_authorization_url: Some(url("/device/code")),
            issuer: None,
            explicit: Default::default(),
            scope_delimiter: " ",
            rotation: crate::provider::presets::Rotation::SingleUse,
            refresh_token_lifetime: Preset::Keap.spec().refresh_token_lifetime,
            grant: Default::default(),
        },
    );
    Config {
        server: ServerConfig::local(listen),
        storage: StorageConfig {
            path: db_path,
            url: None,
            encryption_key_file: None,
            history: crate::config::DEFAULT_HISTORY,
        },
        refresh: RefreshConfig::default(),
        providers,
        notify: NotifyConfig::default(),
        sinks: Vec::new(),
        backup: None,
        warnings: Vec::new(),
    }
}
