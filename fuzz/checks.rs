//! What each fuzz target checks for one input. Shared by the libFuzzer targets in `fuzz_targets/` (nightly,
//! `cargo +nightly fuzz run <target>`) and by `tests/survival_fuzz.rs`, which runs the same checks on stable
//! for a fixed number of generated inputs in CI. Every check must hold for every input: no panic, and the
//! stated invariants.

#![allow(dead_code)]

use mcpfly::sealing::{Binding, Envelope, KeyRing, SecretValue, Target};

/// A fixed key ring, so inputs that reach decryption exercise the envelope parser behind it.
fn ring() -> &'static KeyRing {
    static RING: std::sync::OnceLock<KeyRing> = std::sync::OnceLock::new();
    RING.get_or_init(|| {
        KeyRing::parse("cw_0x689RpI-jtRR7oE8h_eUsKaCMIGHxdtUz9QA3qc=", "fuzz").expect("key")
    })
}

/// The sealed-value path: the envelope parser on raw bytes (and its encoding round-trip), the key-id split and
/// the whole unseal on text, and a valid token whose plaintext is the input.
pub fn envelope(data: &[u8]) {
    if let Ok(envelope) = Envelope::parse(data)
        && let Ok(encoded) = envelope.encode()
    {
        let again = Envelope::parse(&encoded).expect("an encoded envelope parses");
        assert_eq!(again, envelope, "envelope round trip");
    }
    let text = String::from_utf8_lossy(data);
    let _ = mcpfly::sealing::keyring::split_key_id(&text);
    let target = Target::new("team-a", "github", "TOKEN");
    let _ = mcpfly::sealing::unseal(ring(), &text, &target);
    // Arbitrary plaintext inside a genuine token: the parser sees it after authentication succeeds.
    let sealed = ring().encrypt(data);
    let _ = mcpfly::sealing::unseal(ring(), &sealed, &target);
    // A real envelope with an arbitrary value survives sealing and unsealing unchanged.
    if let Ok(value) = std::str::from_utf8(data)
        && let Ok(sealed) = mcpfly::sealing::seal(
            ring(),
            Binding::Strict(target.clone()),
            SecretValue::new(value.to_string()),
        )
    {
        let unsealed = mcpfly::sealing::unseal(ring(), &sealed, &target).expect("own seal unseals");
        assert_eq!(unsealed.value.expose(), value);
    }
}

/// Manifest parsing: the `seal --merge` manifest editor, the MCPDeployment type, the .env reader.
pub fn manifest(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(mut m) = mcpfly::sealing::manifest::Manifest::parse(&text) {
        let found = m.credentials();
        // An edit either fails cleanly or leaves a manifest that parses and holds the credential.
        if m.upsert_credential("team-a", "github", "FUZZ_TOKEN", "gAAAAABfuzz")
            .is_ok()
        {
            let again = mcpfly::sealing::manifest::Manifest::parse(m.text())
                .expect("an edited manifest parses");
            assert!(again.credentials().len() >= found.len().min(1));
        }
    }
    let _ = serde_yaml::from_str::<mcpfly::api::MCPDeployment>(&text);
    let _ = serde_json::from_slice::<mcpfly::api::MCPDeployment>(data);
    let _ = mcpfly::sealing::dotenv::parse(&text);
}

/// The bridge's JSON-RPC handling: the first line of the input is header pairs (`name: value` separated by
/// `\t`), the rest the body; everything the HTTP handler does with a message before the child sees it.
pub fn bridge_message(data: &[u8]) {
    use mcpfly::bridge::modern;
    let text = String::from_utf8_lossy(data);
    let (head, body) = text.split_once('\n').unwrap_or(("", &text));
    let mut headers = http::HeaderMap::new();
    for pair in head.split('\t') {
        if let Some((k, v)) = pair.split_once(':')
            && let (Ok(k), Ok(v)) = (
                http::HeaderName::from_bytes(k.trim().as_bytes()),
                http::HeaderValue::from_str(v.trim()),
            )
        {
            headers.append(k, v);
        }
    }
    let Ok(message) = serde_json::from_str::<serde_json::Value>(body) else {
        return;
    };
    let _ = modern::is_modern(&headers, &message);
    if let Err(rejection) = modern::validate(&headers, &message) {
        let response = rejection.to_response(message.get("id").cloned().unwrap_or_default());
        assert_eq!(response["jsonrpc"], "2.0");
        assert!((400..600).contains(&modern::http_status(
            response["error"]["code"].as_i64().unwrap_or_default()
        )));
    }
    let method = message["method"].as_str().unwrap_or_default().to_string();
    let _ = modern::not_served(&method);
    let to_child = modern::to_child(message.clone());
    let _ = modern::from_child(to_child, &method, &message);
    let _ = modern::discover_result(&message);
    let _ = mcpfly::bridge::child::is_response(&message);
    let mut audit = mcpfly::bridge::audit::AuditRecord::new("POST", "fuzz".into());
    audit.describe(&message);
}
