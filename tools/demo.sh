#!/usr/bin/env bash
# Sets the machine up (tools/setup.sh) and runs the fanpkt demo in its own namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec python3 tools/demo.py "$@"
