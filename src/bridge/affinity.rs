//! Session affinity across machines: a handshake-era session lives in one machine's bridge, and Fly's proxy
//! spreads requests over every machine of the app. So a session id names its machine (`<machine>-<random>`,
//! from `FLY_MACHINE_ID`), and a request for another machine's session is answered with
//! `fly-replay: prefer_instance=<machine>`: Fly's proxy then replays it there.
//!
//! Why `prefer_instance` rather than `instance`: when that machine is gone, `instance=` makes the proxy answer
//! with its own error, which no MCP client takes as "session gone", so the client would retry its dead session
//! forever. With `prefer_instance=` the proxy replays to another machine instead, which finds `fly-replay-src`
//! on the request (the loop guard: a replayed request is never replayed again) and answers 404 "session not
//! found", so the client re-initializes. The replay answer itself is also a 404: where no proxy acts on the
//! header, the client still sees "session gone" and starts over.
//!
//! Nothing here is trusted: a client that forges `fly-replay-src` only turns its own request into a 404, and
//! one that picks a session id naming another machine only gets its own request replayed there, where the
//! session must exist and the request passes auth like any other.

use http::{HeaderMap, HeaderValue};

pub const REPLAY: &str = "fly-replay";
pub const REPLAY_SRC: &str = "fly-replay-src";

/// This machine's id (from `--machine-id` / `FLY_MACHINE_ID`), when the bridge runs on Fly.
#[derive(Clone, Debug, Default)]
pub struct Affinity {
    machine: Option<String>,
}

impl Affinity {
    /// An id that cannot sit in a session id unambiguously (anything but ASCII letters and digits) is ignored:
    /// sessions then stay local, as without Fly.
    pub fn new(machine_id: Option<&str>) -> Self {
        let machine = machine_id
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .filter(|m| {
                let ok = m.len() <= 64 && m.bytes().all(|b| b.is_ascii_alphanumeric());
                if !ok {
                    tracing::warn!(
                        machine_id = %m,
                        "machine id is not 1-64 ASCII letters and digits; sessions will not be routed across machines"
                    );
                }
                ok
            })
            .map(str::to_string);
        Self { machine }
    }

    /// This machine's id, when it has a usable one.
    pub fn machine(&self) -> Option<&str> {
        self.machine.as_deref()
    }

    /// A new, unguessable session id, naming this machine when it has an id.
    pub fn new_session_id(&self) -> String {
        let random = hex::encode(rand::random::<[u8; 16]>());
        match &self.machine {
            Some(machine) => format!("{machine}-{random}"),
            None => random,
        }
    }

    /// The machine to replay a request to: the one its session id names, when that is not this machine and
    /// the request has not been replayed already.
    pub fn replay_target<'s>(&self, headers: &HeaderMap, session_id: &'s str) -> Option<&'s str> {
        self.machine.as_ref()?;
        let (machine, _) = session_id.split_once('-')?;
        let elsewhere = Some(machine) != self.machine.as_deref()
            && !machine.is_empty()
            && machine.bytes().all(|b| b.is_ascii_alphanumeric());
        (elsewhere && !headers.contains_key(REPLAY_SRC)).then_some(machine)
    }
}

/// The `fly-replay` value sending a request to `machine` (see the module docs for why `prefer_instance`).
pub fn replay_header(machine: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("prefer_instance={machine}"))
        .expect("machine ids are ASCII letters and digits")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_name_the_machine_and_other_machines_sessions_are_replayed_once() {
        let here = Affinity::new(Some("148ed193b95189"));
        let id = here.new_session_id();
        assert!(id.starts_with("148ed193b95189-"), "{id}");
        let none = HeaderMap::new();
        assert_eq!(here.replay_target(&none, &id), None, "own session");
        assert_eq!(here.replay_target(&none, "e2865013-ab"), Some("e2865013"));
        let mut replayed = HeaderMap::new();
        replayed.insert(
            REPLAY_SRC,
            HeaderValue::from_static("instance=x;region=iad;t=1"),
        );
        assert_eq!(
            here.replay_target(&replayed, "e2865013-ab"),
            None,
            "loop guard"
        );
        assert_eq!(
            here.replay_target(&none, "0123abcd"),
            None,
            "no machine part"
        );
        assert_eq!(here.replay_target(&none, "bad.id-ab"), None);
    }

    #[test]
    fn without_a_usable_machine_id_sessions_stay_local() {
        for off in [Affinity::new(None), Affinity::new(Some("has space"))] {
            let id = off.new_session_id();
            assert_eq!(id.len(), 32, "{id}");
            assert_eq!(off.replay_target(&HeaderMap::new(), "e2865013-ab"), None);
        }
    }
}
