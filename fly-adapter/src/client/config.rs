//! Config normalisation and a stable hash.
//!
//! Fly echoes a config with its own defaults filled in (`init:{}`, `dns:{}`, a restart policy,
//! `autostop` as a bool, `[]` vs `null`), so comparing what we sent with what we read back fires on
//! every reconcile, and every resulting update reboots the machine. Both sides are normalised to one
//! canonical JSON form first; the hash of that form is what the controller stores in the machine's
//! metadata and compares.

use super::types::{FlyDuration, MachineConfig};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Metadata key under which the controller stores the config hash. It is excluded from the hash
/// itself, so storing the hash does not change it.
pub const CONFIG_HASH_METADATA_KEY: &str = "mcpfly_config_hash";

/// Canonical JSON of a config: server defaults made explicit or removed, durations in nanoseconds,
/// `autostop` off/stop as booleans, empty maps/lists/nulls dropped, keys sorted.
pub fn normalize(cfg: &MachineConfig) -> Value {
    let mut v = serde_json::to_value(cfg).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        // Fly's default restart policy is on-failure; an explicit default equals an absent one.
        let restart = m
            .entry("restart")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(r) = restart {
            let empty = r
                .get("policy")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty);
            if empty {
                r.insert("policy".into(), Value::String("on-failure".into()));
            }
        }
        // Fly's default guest: shared, 1 CPU, 256 MB.
        if m.get("guest").is_none_or(Value::is_null) {
            m.insert(
                "guest".into(),
                serde_json::json!({"cpu_kind": "shared", "cpus": 1, "memory_mb": 256}),
            );
        }
        if let Some(Value::Object(md)) = m.get_mut("metadata") {
            md.remove(CONFIG_HASH_METADATA_KEY);
        }
        if let Some(Value::Array(services)) = m.get_mut("services") {
            for s in services.iter_mut().filter_map(Value::as_object_mut) {
                if let Some(a) = s.get("autostop").cloned() {
                    let b = match a.as_str() {
                        Some("off") => Value::Bool(false),
                        Some("stop") => Value::Bool(true),
                        _ => a,
                    };
                    s.insert("autostop".into(), b);
                }
                if let Some(Value::Array(checks)) = s.get_mut("checks") {
                    checks.iter_mut().for_each(normalize_check);
                }
            }
        }
        if let Some(Value::Object(checks)) = m.get_mut("checks") {
            checks.values_mut().for_each(normalize_check);
        }
        if let Some(Value::Object(sc)) = m.get_mut("stop_config") {
            normalize_duration_field(sc, "timeout");
        }
    }
    prune(&mut v);
    v
}

fn normalize_check(c: &mut Value) {
    if let Value::Object(m) = c {
        for k in ["interval", "timeout", "grace_period"] {
            normalize_duration_field(m, k);
        }
    }
}

fn normalize_duration_field(m: &mut Map<String, Value>, key: &str) {
    if let Some(v) = m.get(key).cloned()
        && let Ok(d) = serde_json::from_value::<FlyDuration>(v)
        && let Some(n) = d.as_nanos()
    {
        m.insert(key.into(), Value::from(n));
    }
}

/// Drop nulls, empty objects, empty arrays and empty strings, recursively: the server turns absent
/// into any of these and back.
fn prune(v: &mut Value) -> bool {
    match v {
        Value::Null => false,
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => {
            for x in a.iter_mut() {
                prune(x);
            }
            !a.is_empty()
        }
        Value::Object(m) => {
            let keys: Vec<String> = m.keys().cloned().collect();
            for k in keys {
                let keep = prune(m.get_mut(&k).expect("key exists"));
                if !keep {
                    m.remove(&k);
                }
            }
            !m.is_empty()
        }
        _ => true,
    }
}

/// Serialise with sorted keys regardless of serde_json's `preserve_order` feature.
pub fn canonical_json(v: &Value) -> String {
    fn write(v: &Value, out: &mut String) {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String((*k).clone()).to_string());
                    out.push(':');
                    write(&m[*k], out);
                }
                out.push('}');
            }
            Value::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(x, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut s = String::new();
    write(v, &mut s);
    s
}

/// sha256 hex of the canonical normalised JSON: equal for a desired config and Fly's echo of it.
pub fn config_hash(cfg: &MachineConfig) -> String {
    hex::encode(Sha256::digest(canonical_json(&normalize(cfg)).as_bytes()))
}

/// True when two configs mean the same to Fly.
pub fn configs_equivalent(a: &MachineConfig, b: &MachineConfig) -> bool {
    normalize(a) == normalize(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::types::*;

    #[test]
    fn server_defaults_do_not_change_the_hash() {
        let mut desired = MachineConfig {
            image: "img:1".into(),
            ..Default::default()
        };
        desired.services.push(ServiceConfig {
            protocol: "tcp".into(),
            internal_port: 8080,
            autostop: Some(Autostop::Mode("stop".into())),
            checks: vec![CheckConfig {
                grace_period: Some(FlyDuration::Text("5s".into())),
                ..Default::default()
            }],
            ..Default::default()
        });
        let mut echoed = desired.clone();
        echoed.init = Some(InitConfig::default());
        echoed.dns = Some(serde_json::json!({}));
        echoed.restart = Some(RestartPolicy {
            policy: "on-failure".into(),
            max_retries: None,
        });
        echoed.services[0].autostop = Some(Autostop::Bool(true));
        echoed.services[0].checks[0].grace_period = Some(FlyDuration::Nanos(5_000_000_000));
        echoed
            .metadata
            .insert(CONFIG_HASH_METADATA_KEY.into(), "x".into());
        assert_eq!(config_hash(&desired), config_hash(&echoed));
        echoed.env.insert("A".into(), "b".into());
        assert_ne!(config_hash(&desired), config_hash(&echoed));
    }
}
