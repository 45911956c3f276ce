//! Fly's `fly-replay` response header and the `fly-replay-src` request header it produces (REALISM.md §4).
//!
//! `fly-replay` is a `;`-separated list of `field=value` (a value may be double-quoted). The proxy consumes it:
//! the client never sees it, and the original request is replayed where it says, carrying
//! `fly-replay-src: instance=<responder>;region=<its region>;t=<µs since the epoch>[;state=<state>]`.

/// What a machine asked for with `fly-replay`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Replay {
    /// `instance=`: only this machine.
    pub instance: Option<String>,
    /// `prefer_instance=`: this machine if it can take the request, else the usual load balancing.
    pub prefer_instance: Option<String>,
    /// `region=`: regions in order of preference (`any` = fall back to every region).
    pub regions: Vec<String>,
    /// `elsewhere=true`: the responder is left out of the next load-balancing round.
    pub elsewhere: bool,
    /// `state=`: returned to the target in `fly-replay-src`.
    pub state: Option<String>,
    /// `app=`: another app of the organisation (not modelled: the emulator refuses such a replay).
    pub app: Option<String>,
}

pub fn parse(value: &str) -> Replay {
    let mut replay = Replay::default();
    for field in value.split(';') {
        let Some((key, raw)) = field.split_once('=') else {
            continue;
        };
        let value = raw.trim().trim_matches('"').to_string();
        match key.trim().to_ascii_lowercase().as_str() {
            "instance" => replay.instance = Some(value),
            "prefer_instance" => replay.prefer_instance = Some(value),
            "region" => {
                replay.regions = value
                    .split(',')
                    .map(|r| r.trim().to_string())
                    .filter(|r| !r.is_empty())
                    .collect()
            }
            "elsewhere" => replay.elsewhere = value.eq_ignore_ascii_case("true"),
            "state" => replay.state = Some(value),
            "app" => replay.app = Some(value),
            _ => {}
        }
    }
    replay
}

/// The `fly-replay-src` value the proxy adds to a replayed request.
pub fn source(instance: &str, region: &str, state: Option<&str>) -> String {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    let mut out = format!("instance={instance};region={region};t={micros}");
    if let Some(state) = state {
        out.push_str(";state=");
        out.push_str(state);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_documented_field() {
        let r = parse(
            r#"instance=00bb33ff;elsewhere=true;state=abc;region="sjc,any";prefer_instance=1"#,
        );
        assert_eq!(r.instance.as_deref(), Some("00bb33ff"));
        assert_eq!(r.prefer_instance.as_deref(), Some("1"));
        assert!(r.elsewhere);
        assert_eq!(r.state.as_deref(), Some("abc"));
        assert_eq!(r.regions, ["sjc", "any"]);
        assert_eq!(parse("elsewhere=false"), Replay::default());
    }

    #[test]
    fn source_carries_instance_region_time_and_state() {
        let s = source("m1", "ord", Some("x"));
        assert!(s.starts_with("instance=m1;region=ord;t="), "{s}");
        assert!(s.ends_with(";state=x"), "{s}");
        assert!(!source("m1", "ord", None).contains("state"));
    }
}
