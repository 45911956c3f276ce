//! The fuzz targets' checks (`fuzz/checks.rs`) on stable, for CI: a fixed number of inputs per target, made by
//! mutating seed inputs (valid envelopes, manifests, JSON-RPC messages) and from random bytes, with a fixed
//! seed so a failure reproduces. `MCPFLY_FUZZ_ITERATIONS` sets the count (default 20,000 per target, a few seconds);
//! `MCPFLY_FUZZ_SEED` the seed. The longer, coverage-guided run is `cargo +nightly fuzz run <target>` (see
//! RELIABILITY.md). Each regression found is kept in `regressions()` below.

#[path = "../fuzz/checks.rs"]
mod checks;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn iterations() -> usize {
    std::env::var("MCPFLY_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

fn rng() -> StdRng {
    let seed = std::env::var("MCPFLY_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_f00d);
    StdRng::seed_from_u64(seed)
}

const INTERESTING: &[&[u8]] = &[
    b"\n",
    b"\r\n",
    b"\0",
    b":",
    b": ",
    b"-",
    b"---\n",
    b"\"",
    b"'",
    b"{",
    b"}",
    b"[",
    b"]",
    b"\\u0000",
    b"\xff",
    b"\xe2\x80\x8b",
    b"\xd0\xb0",
    b"scope: ",
    b"namespace: ",
    b"mcpfly-envelope v",
    b"null",
    b"1e999",
    b"-1",
    b"\"jsonrpc\":\"2.0\"",
    b"&a",
    b"*a",
    b"!!binary",
    b"<<: *a",
];

/// One random mutation: flip, insert, delete, splice an interesting token, duplicate or truncate.
fn mutate(rng: &mut StdRng, input: &mut Vec<u8>) {
    let len = input.len();
    match rng.random_range(0..7) {
        0 if len > 0 => {
            let i = rng.random_range(0..len);
            input[i] ^= 1 << rng.random_range(0..8);
        }
        1 => {
            let i = rng.random_range(0..=len);
            input.insert(i, rng.random());
        }
        2 if len > 0 => {
            let i = rng.random_range(0..len);
            let n = rng.random_range(1..=(len - i).min(16));
            input.drain(i..i + n);
        }
        3 | 4 => {
            let i = rng.random_range(0..=len);
            let token = INTERESTING[rng.random_range(0..INTERESTING.len())];
            input.splice(i..i, token.iter().copied());
        }
        5 if len > 0 => {
            let i = rng.random_range(0..len);
            let j = rng.random_range(i..len);
            let piece = input[i..=j].to_vec();
            input.splice(j..j, piece);
        }
        _ if len > 0 => input.truncate(rng.random_range(0..len)),
        _ => input.push(rng.random()),
    }
}

fn run(seeds: &[Vec<u8>], check: fn(&[u8])) {
    let mut rng = rng();
    for seed in seeds {
        check(seed);
    }
    for i in 0..iterations() {
        let mut input = if i % 10 == 0 {
            (0..rng.random_range(0..256))
                .map(|_| rng.random())
                .collect()
        } else {
            seeds[rng.random_range(0..seeds.len())].clone()
        };
        for _ in 0..rng.random_range(1..6) {
            mutate(&mut rng, &mut input);
        }
        let shown = String::from_utf8_lossy(&input).into_owned();
        if std::panic::catch_unwind(|| check(&input)).is_err() {
            panic!("input {i} failed the check: {shown:?} (bytes {input:?})");
        }
    }
}

#[test]
fn envelope_parser() {
    let seeds: Vec<Vec<u8>> = vec![
        b"mcpfly-envelope v1\nscope: strict\nnamespace: team-a\nresource: github\nname: TOKEN\n\nvalue".to_vec(),
        b"mcpfly-envelope v1\nscope: namespace\nnamespace: team-a\n\n".to_vec(),
        b"mcpfly-envelope v1\nscope: cluster\n\nmulti\nline\nvalue\n".to_vec(),
        b"mcpfly-envelope v2\nscope: cluster\n\nx".to_vec(),
        b"3a9f0c12-gAAAAABmAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==".to_vec(),
    ];
    run(&seeds, checks::envelope);
}

#[test]
fn manifest_parsing() {
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    for dir in [
        "examples",
        "tests/manifests/valid",
        "tests/manifests/invalid",
        "tests/manifests/hostile",
    ] {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for path in paths
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .take(20)
        {
            seeds.push(std::fs::read(path).unwrap());
        }
    }
    seeds.push(b"A=1\nexport B=\"two words\"\n# comment\nC='x'\n".to_vec());
    assert!(seeds.len() > 10);
    run(&seeds, checks::manifest);
}

#[test]
fn bridge_jsonrpc_handling() {
    let seeds: Vec<Vec<u8>> = vec![
        br#"mcp-protocol-version: 2025-11-25	accept: application/json, text/event-stream
{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"c","version":"1"}}}"#.to_vec(),
        br#"mcp-protocol-version: 2026-07-28	mcp-method: tools/call	mcp-name: echo
{"jsonrpc":"2.0","id":"a","method":"tools/call","params":{"name":"echo","arguments":{"text":"hi"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"c","version":"1"},"io.modelcontextprotocol/clientCapabilities":{}}}}"#.to_vec(),
        br#"mcp-protocol-version: 2026-07-28
{"jsonrpc":"2.0","id":2,"method":"server/discover","params":{}}"#.to_vec(),
        br#"
{"jsonrpc":"2.0","method":"notifications/initialized"}"#.to_vec(),
        br#"
[{"jsonrpc":"2.0","id":1,"result":{}},{"jsonrpc":"2.0","id":2,"error":{"code":-32601,"message":"x"}}]"#.to_vec(),
    ];
    run(&seeds, checks::bridge_message);
}

/// Inputs that once failed a check (none so far); each stays here as a regression test.
#[test]
fn regressions() {
    type Case = (&'static str, &'static [u8], fn(&[u8]));
    let found: &[Case] = &[];
    for (what, input, check) in found {
        assert!(std::panic::catch_unwind(|| check(input)).is_ok(), "{what}");
    }
}
