#!/usr/bin/env bash
# Container tooling for tests/integration/test_container.py: podman (rootful, runc runtime,
# chroot isolation for builds) and a local base image made by debootstrap, because no registry
# image can be pulled in the test environment. Idempotent: quick when all is present;
# the base image (~45 s of debootstrap) is built only if `podman image exists` says it is missing.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
BASE_IMAGE="${PIPECONNECT_BASE_IMAGE:-localhost/python-base:3.11}"
SUITE=bookworm
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

PKGS=(podman debootstrap runc)
missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("$p")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    if ! $SUDO apt-get install -y --no-install-recommends "${missing[@]}"; then
        $SUDO apt-get update
        $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
    fi
fi

if ! $SUDO podman image exists "$BASE_IMAGE"; then
    rootfs="$(mktemp -d)"
    trap '$SUDO rm -rf "$rootfs"' EXIT
    $SUDO debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        "$SUITE" "$rootfs" "$MIRROR"
    # apt lists and caches are not needed in a base image (the Dockerfile installs no debs)
    $SUDO rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    $SUDO tar -C "$rootfs" -c . | $SUDO podman import - "$BASE_IMAGE"
fi
$SUDO podman --version
$SUDO podman image inspect --format '{{.Id}} {{.Size}}' "$BASE_IMAGE" | sed "s|^|$BASE_IMAGE |"

# The prometheus-operator CRD schemas, for validating deploy/kubernetes/servicemonitor.yaml in
# tests/test_deploy.py: the npm package @kubernetes-models/prometheus-operator ships them as
# compiled validators (no PyPI package does without also installing a pytest plugin).
NODE_DIR="${PIPECONNECT_NODE_DIR:-/opt/pipeconnect-ci/node}"
if [ ! -d "$NODE_DIR/node_modules/@kubernetes-models/prometheus-operator" ]; then
    if ! command -v npm >/dev/null 2>&1; then
        $SUDO apt-get install -y --no-install-recommends nodejs npm ||
            { $SUDO apt-get update && $SUDO apt-get install -y --no-install-recommends nodejs npm; }
    fi
    $SUDO mkdir -p "$NODE_DIR"
    $SUDO npm install --prefix "$NODE_DIR" --no-audit --no-fund --loglevel=error \
        @kubernetes-models/prometheus-operator@6
fi
