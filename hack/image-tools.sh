#!/usr/bin/env bash
# Installs (once; idempotent) the Debian packages the image build and the container smoke test use.
# Needs root; prints nothing on stdout.
set -euo pipefail
tools=(mmdebstrap umoci runc iptables jq curl)
missing=()
for pkg in "${tools[@]}"; do
  dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ "${#missing[@]}" = 0 ] && exit 0
[ "$(id -u)" = 0 ] || { echo "[image-tools] missing ${missing[*]}; install them as root (apt-get install ${missing[*]})" >&2; exit 1; }
echo "[image-tools] installing ${missing[*]}" >&2
apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
