"""Measure the decoder layer's throughput per tp degree and record it in a calibration file.

    python bench/calibration/measure_layers.py --config configs/7b.json --tp 1,2,4 \
        [--tokens 16384] [--calibration bench/calibration/h100.json] [--dry-run]

For each tp degree, one MoT decoder layer is built at the shapes one tensor-parallel rank
holds (q/k/v and gate/up split by output features, o and down by input features, heads
and KV heads divided by tp) and run forward + backward in bf16 over a packed micro-batch
whose tokens are split between the two experts. The attention kernel is replaced by a
pass-through, because the planner times it separately (``attention_tflops``); norms,
RoPE, the per-expert gathers and SwiGLU stay, so the figure is what the planner's
``layer_tflops`` means: decoder linear model FLOPs (6 x one expert's linear weights / tp
x tokens) per second of the layer without its attention kernel. Collectives are not run:
they are modelled from link bandwidths.

Each figure is printed as a ratio to the calibration's current one (the baseline), then
replaces ``layer_tflops[tp]`` in the calibration file, with the GPU, the token count and
the date recorded as its source (``--dry-run`` only prints).
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from modus_mega.config import LLMConfig, load_config
from modus_mega.model.layers import LinearFactory, rope_cos_sin
from modus_mega.model.mot import LayerContext, MoTLayer
from modus_mega.ops.attention import AttentionBackend
from modus_mega.plan.calibration import DEFAULT_CALIBRATION, load_calibration, update_calibration


class PassThroughAttention(AttentionBackend):
    """Returns q as the attention output: the layer runs without its attention kernel."""

    def prepare(self, lo: Tensor, hi: Tensor) -> None:
        return None

    def forward(self, q: Tensor, k: Tensor, v: Tensor, prepared: Any, scale: float) -> Tensor:
        return q  # [T, Hq, Dh]


def rank_linears(tp: int) -> LinearFactory:
    """nn.Linear layers at the shapes one tensor-parallel rank of ``tp`` holds."""
    return LinearFactory(
        column=lambda i, o, bias: nn.Linear(i, o // tp, bias=bias),
        row=lambda i, o, bias: nn.Linear(i // tp, o, bias=bias),
        embedding=nn.Embedding,
        tp_size=tp,
    )


def measure_layer(llm: LLMConfig, tp: int, tokens: int, device: torch.device, iters: int) -> float:
    """Achieved TFLOP/s (decoder linear model FLOPs) of one layer's rank shard, fwd + bwd."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layer = MoTLayer(llm, rank_linears(tp)).to(device=device, dtype=dtype)
    expert_ids = (torch.arange(tokens, device=device) % 3 == 0).long()  # a third of the tokens are 2D tokens
    index, unpermute = LayerContext.route(expert_ids)
    cos, sin = rope_cos_sin(torch.arange(tokens, device=device), llm.head_dim, llm.rope_theta, dtype)
    ctx = LayerContext(index, unpermute, cos, sin, PassThroughAttention(), None)
    x = torch.randn(tokens, llm.hidden_size, device=device, dtype=dtype, requires_grad=True)
    expert = layer.experts[0]
    weights = sum(
        m.weight.numel()
        for m in (expert.q_proj, expert.k_proj, expert.v_proj, expert.o_proj, expert.mlp.gate_proj, expert.mlp.up_proj, expert.mlp.down_proj)
    )

    def step() -> None:
        layer(x, ctx).float().pow(2).mean().backward()

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / iters
    return 6.0 * weights * tokens / seconds / 1e12


def main(argv: list[str] | None = None) -> None:
    """Measure each tp degree and update (or just print) the calibration."""
    parser = argparse.ArgumentParser(description="Measure decoder-layer TFLOP/s per tp degree for the planner.")
    parser.add_argument("--config", required=True, help="model config, e.g. configs/7b.json")
    parser.add_argument("--tp", default="1,2,4", help="tp degrees to measure (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per micro-batch (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per degree (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calibration", type=Path, default=DEFAULT_CALIBRATION, help="file to update (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="print the figures, write nothing")
    args = parser.parse_args(argv)

    llm = load_config(args.config).model.llm
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    current = load_calibration(args.calibration).layer_tflops  # the baseline each figure is compared with
    measured = {}
    for tp in (int(t) for t in args.tp.split(",")):
        if llm.num_kv_heads % tp or llm.intermediate_size % tp:
            raise SystemExit(f"tp={tp} does not split num_kv_heads={llm.num_kv_heads} / intermediate_size; drop it from --tp")
        measured[str(tp)] = measure_layer(llm, tp, args.tokens, device, args.iters)
        baseline = current.get(str(tp))
        ratio = f", {measured[str(tp)] / baseline:.2f}x the calibration's {baseline:g}" if baseline else ""
        print(f"tp={tp}: {measured[str(tp)]:.4g} TFLOP/s ({name}, {args.tokens} tokens{ratio})")
    if args.dry_run:
        return
    source = f"bench/calibration/measure_layers.py on {name}, {args.tokens} tokens, {datetime.date.today().isoformat()}"
    update_calibration(args.calibration, {"layer_tflops": measured}, source)
    print(f"updated {args.calibration}")


if __name__ == "__main__":
    main()
