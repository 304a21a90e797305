#!/usr/bin/env bash
# The README's main job: generate a small synthetic 15-modality dataset (and a held-out split),
# train its text tokenizer and feature codebooks, train the tiny model on it (CPU, a few minutes),
# then generate from it on held-out synthetic scenes and evaluate it (about a minute each).
# Steps whose outputs exist are skipped; delete runs/demo to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DATA=runs/demo/data
[ -f $DATA/index.json ] || $PY -m modus_mega.datasets.synth --out $DATA --num-samples 512 --image-size 64 \
  --samples-per-shard 64 --feature-grid 4
[ -f runs/demo/val/index.json ] || $PY -m modus_mega.datasets.synth --out runs/demo/val --split val --num-samples 64 \
  --image-size 64 --samples-per-shard 16 --feature-grid 4
[ -f runs/demo/text_tokenizer/tokenizer.json ] || $PY -m modus_mega.datasets.train_text --shards $DATA \
  --out runs/demo/text_tokenizer --vocab-size 512
[ -f runs/demo/vq/vq.json ] || $PY -m modus_mega.datasets.train_vq --shards $DATA --out runs/demo/vq --codebook-size 32
$PY launch/pretrain.py --config configs/tiny_shards.json "$@"
$PY -m modus_mega.generate --ckpt runs/demo --held-out --steps 20 --quiet --out runs/demo/generated
echo "Generated from held-out scenes (conditions | generated | ground truth): runs/demo/generated/contact_sheet.png"
# Evaluate the trained model on held-out synthetic scenes (about a minute) and print the table.
$PY -m modus_mega.eval --ckpt runs/demo --num-scenes 4 --steps 10 --quiet \
  --directions rgb:depth,rgb:normal,rgb:seg,rgb:sam_edge,rgb:caption,caption:rgb --out runs/demo/eval
echo "Browser demo of the trained model: .venv/bin/python -m modus_mega.demo --ckpt runs/demo, then open http://127.0.0.1:7860"
