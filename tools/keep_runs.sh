#!/usr/bin/env bash
# Copy the finished runs (run.json and log.jsonl, no checkpoints) of experiment folders into
# docs/results/, where they are versioned next to the tables made from them. Copy a folder back
# (cp -r docs/results/NAME runs/) and a command with --out runs/NAME reuses those runs.
#   bash tools/keep_runs.sh runs/mqar-memory-128 [more folders]
set -euo pipefail
cd "$(dirname "$0")/.."
for out in "$@"; do
  name=$(basename "$out")
  find "$out" -name run.json | while read -r f; do
    d=$(dirname "$f")
    dest="docs/results/$name/${d#"$out"/}"
    mkdir -p "$dest"
    cp "$f" "$dest/"
    [ -f "$d/log.jsonl" ] && cp "$d/log.jsonl" "$dest/"
  done
done
