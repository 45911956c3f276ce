//! The real `mcpfly bridge` process: listens on `::`, refuses to start without a token unless `--no-auth`,
//! serves an MCP client, and shuts down on SIGTERM taking its servers with it.

#[path = "support/bridge_env.rs"]
mod support;

use std::time::Duration;

use support::*;

/// The port the bridge logged it listens on (`--port 0`: the kernel picks a free one at bind, so nothing can
/// take it between a pick and the bind). The rest of the log is passed on to the test's stderr, so the pipe
/// never fills.
async fn listening_port(stderr: tokio::process::ChildStderr) -> u16 {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    let port = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            eprintln!("{line}");
            let Ok(line) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if line["message"] == "bridge listening" {
                let addr: std::net::SocketAddr = line["addr"].as_str().unwrap().parse().unwrap();
                assert!(addr.ip().is_unspecified(), "not listening on `::`: {addr}");
                return addr.port();
            }
        }
        panic!("the bridge exited without listening");
    })
    .await
    .expect("the bridge never logged its address");
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("{line}");
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcpfly_bridge_process_serves_and_stops_on_sigterm() {
    let server = test_server();
    // Without a token and without --no-auth it must refuse to start.
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_mcpfly"))
        .args(["bridge", "--port", "0", "--"])
        .arg(&server)
        .env_remove("MCP_AUTH_TOKEN")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("MCP_AUTH_TOKEN"));

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mcpfly"))
        .args(["bridge", "--port", "0", "--path", "/mcp", "--"])
        .arg(&server)
        .env("MCP_AUTH_TOKEN", TOKEN)
        .env("MCPFLY_LOG_FORMAT", "json")
        .env("MCPFLY_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let port = listening_port(child.stderr.take().unwrap()).await;
    let http = {
        logs();
        reqwest::Client::new()
    };
    let ready_url = format!("http://[::1]:{port}/readyz");
    let mut ready = false;
    for _ in 0..100 {
        if http
            .get(&ready_url)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "mcpfly bridge never became ready on [::1]:{port}");
    let info = mcpfly::bridge::verify(&format!("http://[::1]:{port}/mcp"), Some(TOKEN))
        .await
        .unwrap();
    assert_eq!(info.protocol_version, "2026-07-28");
    assert!(info.tools.contains(&"echo".to_string()));

    // SIGTERM: graceful exit, status 0, no server process left behind.
    let pid = child.id().unwrap() as i32;
    // SAFETY: signals the process this test spawned.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("bridge exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
    let leftover = std::process::Command::new("pgrep")
        .args(["-P", &pid.to_string()])
        .output()
        .unwrap();
    assert!(leftover.stdout.is_empty(), "children left behind");
}

#[test]
fn bridge_help_says_which_features_work_in_which_era() {
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_mcpfly"))
        .args(["bridge", "--help"])
        .output()
        .unwrap();
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    for needle in [
        "Features by protocol era",
        "input_required",
        "subscriptions/listen",
        "Mcp-Param-*",
        "--input-timeout-secs",
    ] {
        assert!(
            help.contains(needle),
            "`mcpfly bridge --help` lacks {needle}:\n{help}"
        );
    }
}
