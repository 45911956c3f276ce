#!/usr/bin/env bash
# Runs the images hack/build-images.sh wrote as containers under runc, the way a Fly machine runs them, and
# prints PASS/FAIL per check (exit 1 on any failure):
#
#   hack/image-smoke.sh [IMAGES_DIR]      # default target/images
#
# runtime image, each container in its own network namespace, read-only root, tmpfs home and /tmp:
#   - the unchanged ENTRYPOINT + CMD serve MCP: initialize with the bearer token -> 200, without -> 401
#   - an npm server (npx) and a PyPI server (uvx) start behind the bridge as the non-root user (uid 1000),
#     with the command line the controller writes into init.cmd (the image's ENTRYPOINT kept)
#   - SIGTERM stops the container gracefully (exit 0)
# controller image: `mcpfly --version` runs; without FLY_API_TOKEN it refuses to start and says why.
#
# Package downloads from inside the container go out through a veth pair and NAT. Where outbound TLS passes an
# intercepting proxy, the host's CA bundle is mounted read-only at run time (never baked into the image).
# Needs root and runc; without them it prints SKIPPED and exits 0 (hack/test.sh says so loudly).
set -euo pipefail
cd "$(dirname "$0")/.."
images="${1:-target/images}"
TOKEN="smoke-$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')"
NPM_SERVER="${MCPFLY_SMOKE_NPM:-@modelcontextprotocol/server-everything@2026.8.31}"
PYPI_SERVER="${MCPFLY_SMOKE_PYPI:-mcp-server-time==2026.10.19}"
PYPI_COMMAND="${MCPFLY_SMOKE_PYPI_COMMAND:-mcp-server-time}"

if [ "$(id -u)" != 0 ] || ! command -v runc >/dev/null || ! command -v umoci >/dev/null; then
  echo "image smoke: SKIPPED (needs root, runc and umoci: run hack/image-tools.sh as root)"
  exit 0
fi

work="$(mktemp -d /tmp/mcpfly-smoke.XXXXXX)"
id="mcpfly-smoke-$$"
ns="$id"
failures=0
pass() { echo "image smoke: PASS $*"; }
fail() { echo "image smoke: FAIL $*"; failures=$((failures + 1)); }

forward_before="$(cat /proc/sys/net/ipv4/ip_forward)"
cleanup() {
  for c in $(runc list -q 2>/dev/null | grep "^$id" || true); do runc kill "$c" KILL 2>/dev/null || true; runc delete -f "$c" 2>/dev/null || true; done
  iptables -t nat -D POSTROUTING -s 10.213.0.0/30 -j MASQUERADE 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
  ip link del "vh$$" 2>/dev/null || true
  echo "$forward_before" > /proc/sys/net/ipv4/ip_forward
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT

# One network namespace, like a Fly machine's: loopback up, a veth pair to the host, NAT out.
ip netns add "$ns"
ip -n "$ns" link set lo up
ip link add "vh$$" type veth peer name eth0 netns "$ns"
ip addr add 10.213.0.1/30 dev "vh$$"
ip link set "vh$$" up
ip -n "$ns" addr add 10.213.0.2/30 dev eth0
ip -n "$ns" link set eth0 up
ip -n "$ns" route add default via 10.213.0.1
echo 1 > /proc/sys/net/ipv4/ip_forward
iptables -t nat -A POSTROUTING -s 10.213.0.0/30 -j MASQUERADE

host_ca="${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}"

# A bundle whose config.json is the image's own (umoci translates user, entrypoint, cmd, env, working dir), plus
# what a machine adds at run time. Each image is unpacked once; its read-only root is shared by the bundles.
bundle() {
  local image="$1" tag="$2" dir="$3"
  if [ ! -d "$work/image-$image" ]; then
    umoci unpack --image "$images/$image:$tag" "$work/image-$image" >/dev/null
  fi
  mkdir -p "$dir"
  jq --arg root "$work/image-$image/rootfs" '.root.path = $root' "$work/image-$image/config.json" > "$dir/config.json"
  jq --arg ns "/var/run/netns/$ns" --arg token "$TOKEN" --arg ca "$host_ca" '
    .root.readonly = true
    | .process.terminal = false
    | .process.env += ["MCP_AUTH_TOKEN=" + $token, "NODE_EXTRA_CA_CERTS=/run/host-ca.crt", "SSL_CERT_FILE=/run/host-ca.crt"]
    | .linux.namespaces = ([.linux.namespaces[] | select(.type != "network")] + [{type: "network", path: $ns}])
    | .mounts += [
        {destination: "/tmp", type: "tmpfs", source: "tmpfs", options: ["nosuid", "nodev", "mode=1777"]},
        {destination: "/home/node", type: "tmpfs", source: "tmpfs", options: ["nosuid", "nodev", "mode=0755", "uid=1000", "gid=1000"]},
        {destination: "/run/host-ca.crt", type: "bind", source: $ca, options: ["rbind", "ro"]},
        {destination: "/etc/resolv.conf", type: "bind", source: "/etc/resolv.conf", options: ["rbind", "ro"]}
      ]' "$dir/config.json" > "$dir/config.json.new"
  mv "$dir/config.json.new" "$dir/config.json"
}

# POSTs an MCP initialize inside the namespace; prints the HTTP status, the body goes to $work/body.
initialize() {
  local auth=()
  [ "${1:-}" = token ] && auth=(-H "Authorization: Bearer $TOKEN")
  ip netns exec "$ns" curl -s -o "$work/body" -w '%{http_code}' --max-time 60 \
    -H 'Content-Type: application/json' -H 'Accept: application/json, text/event-stream' "${auth[@]}" \
    --data '{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"image-smoke","version":"0"}}}' \
    http://127.0.0.1:8080/mcp || true
}

# Starts a container in the foreground (runc forwards signals to it); sets $runc_pid.
start() {
  local name="$1" bundle_dir="$2"
  runc run --bundle "$bundle_dir" "$id-$name" < /dev/null > "$work/$name.log" 2>&1 &
  runc_pid=$!
}

# Waits until the bridge's readiness check (the machine check the controller configures) passes, up to $2 s.
# Before that the server may still be downloading; a session opened then starts a second npx on the same cache.
wait_ready() {
  local name="$1" deadline=$((SECONDS + $2))
  while [ "$SECONDS" -lt "$deadline" ]; do
    if [ "$(ip netns exec "$ns" curl -s -o /dev/null -w '%{http_code}' --max-time 2 http://127.0.0.1:8080/readyz || true)" = 200 ]; then
      return 0
    fi
    kill -0 "$runc_pid" 2>/dev/null || { fail "$name: container exited before serving"; sed 's/^/    /' "$work/$name.log"; return 1; }
    sleep 0.2
  done
  fail "$name: not serving after $2 s"; sed 's/^/    /' "$work/$name.log"; return 1
}

# SIGTERM to runc (forwarded to tini, then mcpfly): the container must exit 0 within 10 s.
stop_gracefully() {
  local name="$1" rc=0 deadline=$((SECONDS + 10))
  kill -TERM "$runc_pid"
  while kill -0 "$runc_pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
  if kill -0 "$runc_pid" 2>/dev/null; then
    fail "$name: still running 10 s after SIGTERM"; runc kill "$id-$name" KILL 2>/dev/null || true; wait "$runc_pid" || true
  else
    wait "$runc_pid" || rc=$?
    if [ "$rc" = 0 ]; then pass "$name: SIGTERM stopped it gracefully (exit 0)"; else fail "$name: exit $rc after SIGTERM"; sed 's/^/    /' "$work/$name.log"; fi
  fi
  runc delete -f "$id-$name" 2>/dev/null || true
}

# Every process in the container runs as uid 1000 (the image's `node` user).
check_uid() {
  local name="$1" pids uids
  pids="$(runc ps --format json "$id-$name" | jq -r '.[]')"
  uids="$(for p in $pids; do awk '/^Uid:/ {print $2}' "/proc/$p/status" 2>/dev/null; done | sort -u | tr '\n' ' ')"
  if [ "$uids" = "1000 " ]; then pass "$name: $(echo "$pids" | wc -w) processes, all uid 1000 (node)"; else fail "$name: process uids are '$uids', not 1000"; fi
}

# A server behind the bridge: initialize must reach the server itself (its serverInfo name comes back).
server_case() {
  local name="$1" expect="$2" timeout="$3"; shift 3
  local dir="$work/$name"
  bundle runtime mcpfly-runtime "$dir"
  # What the controller writes into init.cmd (reconcile/desired.rs); Fly keeps the image's ENTRYPOINT.
  jq --argjson cmd "$(printf '%s\n' mcpfly bridge --port 8080 --path /mcp -- "$@" | jq -R . | jq -s .)" \
    '.process.args = .process.args[0:2] + $cmd' "$dir/config.json" > "$dir/c" && mv "$dir/c" "$dir/config.json"
  local t0=$SECONDS
  start "$name" "$dir"
  wait_ready "$name" "$timeout" || { stop_gracefully "$name"; return; }
  local code
  code="$(initialize token)"
  if [ "$code" = 200 ] && grep -q "$expect" "$work/body"; then
    pass "$name: '$*' answered initialize as $expect ($((SECONDS - t0)) s from start)"
  else
    fail "$name: initialize returned $code: $(head -c 300 "$work/body")"; sed 's/^/    /' "$work/$name.log"
  fi
  check_uid "$name"
  stop_gracefully "$name"
}

start_all=$SECONDS
[ -f "$images/runtime/index.json" ] && [ -f "$images/controller/index.json" ] \
  || { echo "image smoke: FAIL no images in $images (run hack/build-images.sh)"; exit 1; }

# 1. The runtime image exactly as built: ENTRYPOINT (tini) + CMD (the bridge in front of the example server).
dir="$work/default"
bundle runtime mcpfly-runtime "$dir"
if [ "$(jq -c '.process.args' "$dir/config.json")" = '["/usr/bin/tini","--","mcpfly","bridge","--port","8080","--path","/mcp","--","mcpfly","example-server"]' ]; then
  pass "runtime: the container runs the image's ENTRYPOINT + CMD"
else
  fail "runtime: unexpected process args $(jq -c '.process.args' "$dir/config.json")"
fi
start default "$dir"
if wait_ready default 30; then
  code="$(initialize token)"
  [ "$code" = 200 ] && pass "default: initialize with the token -> 200" || fail "default: initialize with the token -> $code"
  code="$(initialize)"
  [ "$code" = 401 ] && pass "default: initialize without a token -> 401" || fail "default: initialize without a token -> $code"
  check_uid default
fi
stop_gracefully default

# 2. npm and PyPI servers, downloaded at start into the tmpfs home.
server_case npm '"serverInfo"' 120 npx -y "$NPM_SERVER"
server_case pypi '"serverInfo"' 120 uvx --from "$PYPI_SERVER" "$PYPI_COMMAND"

# 3. The controller image.
dir="$work/controller"
umoci unpack --image "$images/controller:mcpfly" "$dir" >/dev/null
jq '.root.readonly = true | .process.terminal = false | .process.args = ["/usr/local/bin/mcpfly", "--version"]' \
  "$dir/config.json" > "$dir/c" && mv "$dir/c" "$dir/config.json"
if out="$(runc run --bundle "$dir" "$id-ctl-version" < /dev/null 2>&1)" && [[ "$out" == "mcpfly "* ]]; then
  pass "controller: '$out' as uid $(jq '.process.user.uid' "$dir/config.json")"
else
  fail "controller: mcpfly --version: $out"
fi
runc delete -f "$id-ctl-version" 2>/dev/null || true
jq '.process.args = ["/usr/local/bin/mcpfly", "controller"]' "$dir/config.json" > "$dir/c" && mv "$dir/c" "$dir/config.json"
rc=0; out="$(runc run --bundle "$dir" "$id-ctl-notoken" < /dev/null 2>&1)" || rc=$?
if [ "$rc" != 0 ] && grep -q -- "--fly-api-token" <<< "$out"; then
  pass "controller: refuses to start without FLY_API_TOKEN (exit $rc: $(grep -m1 -- '--fly-api-token' <<< "$out" | head -c 120))"
else
  fail "controller: without a token it exited $rc: $out"
fi
runc delete -f "$id-ctl-notoken" 2>/dev/null || true

if [ "$failures" = 0 ]; then
  echo "image smoke: PASSED ($((SECONDS - start_all)) s)"
else
  echo "image smoke: FAILED ($failures checks, $((SECONDS - start_all)) s)"
  exit 1
fi
