#![allow(dead_code)]
use fly_adapter::client::*;
use fly_emulator::{DEFAULT_ORG, DEFAULT_TOKEN};
use fly_emulator::{Emulator, EmulatorConfig, EmulatorHandle};
use std::time::Duration;

pub async fn emulator(cfg: EmulatorConfig) -> EmulatorHandle {
    Emulator::start(cfg).await.expect("emulator starts")
}

pub fn client_cfg(emu: &EmulatorHandle) -> FlyClientConfig {
    let mut c = FlyClientConfig::new(emu.base_url(), DEFAULT_TOKEN);
    c.org = Some(DEFAULT_ORG.into());
    c.retry.base_delay = Duration::from_millis(20);
    c
}

pub fn client(emu: &EmulatorHandle) -> FlyClient {
    FlyClient::new(client_cfg(emu)).expect("client")
}

pub fn config(image: &str) -> MachineConfig {
    MachineConfig {
        image: image.into(),
        ..Default::default()
    }
}

pub async fn new_app(c: &FlyClient, name: &str) {
    c.create_app(&CreateAppRequest {
        name: name.into(),
        org_slug: DEFAULT_ORG.into(),
        network: Some(name.into()),
        enable_subdomains: None,
    })
    .await
    .expect("create app");
}

pub async fn new_machine(c: &FlyClient, app: &str, name: &str) -> Machine {
    let req = CreateMachineRequest {
        config: config("registry.example/mcp:1"),
        name: Some(name.into()),
        region: Some("ams".into()),
        ..Default::default()
    };
    c.create_machine(app, &req).await.expect("create machine")
}
