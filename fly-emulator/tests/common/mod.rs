#![allow(dead_code)]
use fly_emulator::{Emulator, EmulatorConfig, EmulatorHandle};

pub async fn emulator(cfg: EmulatorConfig) -> EmulatorHandle {
    Emulator::start(cfg).await.expect("emulator starts")
}
