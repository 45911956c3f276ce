//! Every mutating call leaves exactly one audit line (action, app/machine, status, Fly request id, outcome),
//! and no log line ever carries a request body: a canary secret value must not appear anywhere.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use fly_adapter::client::types::SecretValue;
use fly_adapter::client::{AUDIT_TARGET, FlyError};
use tracing_subscriber::fmt::MakeWriter;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

const CANARY: &str = "canary-secret-7d1e9a";

#[tokio::test]
async fn one_audit_line_per_mutation_and_no_bodies_in_logs() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(captured.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let emu = common::emulator(Default::default()).await;
    let client = common::client(&emu);
    common::new_app(&client, "audited").await;
    let secrets = BTreeMap::from([("TOKEN".to_string(), Some(SecretValue::new(CANARY)))]);
    client
        .set_secrets("audited", &secrets)
        .await
        .expect("secrets set");
    let missing = client
        .delete_machine("audited", "0123456789abcd", true, None)
        .await;
    assert!(
        matches!(missing, Err(FlyError::NotFound { .. })),
        "{missing:?}"
    );
    client
        .get_app("audited")
        .await
        .expect("a read is not audited");

    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(!text.contains(CANARY), "a secret value reached the logs");
    let audit: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == AUDIT_TARGET)
        .collect();
    let actions: Vec<&str> = audit
        .iter()
        .map(|v| v["fields"]["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["apps.create", "secrets.set", "machines.delete"],
        "{text}"
    );
    for line in &audit {
        let fields = &line["fields"];
        assert!(
            fields["fly_request_id"]
                .as_str()
                .is_some_and(|id| !id.is_empty()),
            "{line}"
        );
        assert!(fields["status"].as_u64().is_some(), "{line}");
    }
    assert_eq!(audit[1]["fields"]["app"], "audited");
    assert_eq!(audit[1]["fields"]["outcome"], "ok");
    assert_eq!(audit[2]["fields"]["machine"], "0123456789abcd");
    assert_eq!(audit[2]["fields"]["outcome"], "not_found");
}
