#!/usr/bin/env bash
# The README's main job: generate a small synthetic 15-modality dataset (and a held-out split), train its text
# tokenizer and feature codebooks, then train the tiny model on it (CPU, a few minutes).
# Steps whose outputs exist are skipped; delete runs/demo to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DATA=runs/demo/data
[ -f $DATA/index.json ] || $PY -m modus_mega.data.synth --out $DATA --num-samples 512 --image-size 64 \
  --samples-per-shard 64 --feature-grid 4
[ -f runs/demo/val/index.json ] || $PY -m modus_mega.data.synth --out runs/demo/val --split val --num-samples 64 \
  --image-size 64 --samples-per-shard 16 --feature-grid 4
[ -f runs/demo/text_tokenizer/tokenizer.json ] || $PY -m modus_mega.tokenizers.train_text --shards $DATA \
  --out runs/demo/text_tokenizer --vocab-size 512
[ -f runs/demo/vq/vq.json ] || $PY -m modus_mega.tokenizers.train_vq --shards $DATA --out runs/demo/vq --codebook-size 32
$PY launch/pretrain.py --config configs/tiny_shards.json "$@"
