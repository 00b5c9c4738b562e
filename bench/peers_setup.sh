#!/usr/bin/env bash
# Builds the peers' venv for `make bench-peers` once: llama-cpp-python compiled from source for this
# CPU (GGML_NATIVE), its server extra and matplotlib, all pinned in bench/peers-requirements.txt.
# Idempotent: a stamp holding the requirements' hash skips the (several minutes') build next time.
set -euo pipefail
PEERS_DIR="${EDGELLM_PEERS_DIR:-$HOME/.cache/edgellm/peers}"
REQS="$(dirname "$0")/peers-requirements.txt"
VENV="$PEERS_DIR/venv"
STAMP="$VENV/.setup-done"
WANT="$(sha256sum "$REQS" | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  echo "peers venv up to date: $VENV"; exit 0
fi
mkdir -p "$PEERS_DIR"
test -x "$VENV/bin/python" || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
start=$(date +%s)
echo "building llama-cpp-python (llama.cpp from source, about 7 minutes on 2 busy cores) into $VENV ..."
# Two compile jobs at the lowest priority: the machine is shared with services and tests.
CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF" \
CMAKE_BUILD_PARALLEL_LEVEL=2 \
  nice -n 19 "$VENV/bin/python" -m pip install -q --no-cache-dir -r "$REQS"
echo "peers venv built in $(( $(date +%s) - start )) s: $VENV"
echo "$WANT" > "$STAMP"
