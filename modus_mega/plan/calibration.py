"""Hardware figures the planner turns FLOPs and bytes into seconds and fits into memory.

They live in one JSON file per GPU kind (``bench/calibration/h100.json``) so that a
benchmark run on the target cluster can replace a prior by a measurement
(``update_calibration``) without touching code. Every figure carries a line in
``sources`` saying where it came from; the planner prints the file it used.

Units: TFLOP/s are 1e12 FLOP/s, GB/s are 1e9 bytes/s (NCCL's bus bandwidth convention),
memory is GiB (2^30 bytes), latencies are microseconds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CALIBRATION = REPO_ROOT / "bench" / "calibration" / "h100.json"


@dataclass(frozen=True)
class Calibration:
    """Throughputs, bandwidths and memory of one GPU kind and its cluster fabric."""

    device: str  # what the figures describe, e.g. "NVIDIA H100 80GB HBM3 (SXM5), 8 per node, NDR InfiniBand"
    peak_tflops: float  # dense bf16 peak of one GPU: the denominator of MFU
    memory_gib: float  # device memory of one GPU as CUDA reports it
    runtime_reserve_gib: float  # CUDA context, NCCL communicators and cuBLAS workspaces: never available to tensors
    fragmentation: float  # caching-allocator margin, as a fraction of the dynamic (activation and transient) bytes
    gpus_per_node: int  # GPUs joined by NVLink; tensor parallelism stays inside a node
    layer_tflops: dict[str, float]  # achieved TFLOP/s of the decoder's linear layers (fwd + bwd) per tp degree ("1", "2", ...)
    attention_tflops: float  # achieved TFLOP/s of the masked attention kernel, counted in model FLOPs (fwd + bwd)
    encoder_tflops: float  # achieved TFLOP/s of the ViT and the VAE encoder (narrower GEMMs, convolutions)
    hbm_gbps: float  # achieved HBM bandwidth: the optimizer step is bound by it
    nvlink_busbw_gbps: float  # NCCL bus bandwidth of collectives inside a node
    ib_busbw_gbps: float  # NCCL bus bandwidth per GPU of collectives across nodes (one NIC per GPU)
    p2p_nvlink_gbps: float  # point-to-point send/recv bandwidth inside a node (pipeline stages)
    p2p_ib_gbps: float  # point-to-point send/recv bandwidth across nodes
    nvlink_latency_us: float  # fixed cost of one collective inside a node
    ib_latency_us: float  # fixed cost of one collective across nodes
    overlap: float  # share of the backward compute that can hide data-parallel communication (0-1)
    sources: dict[str, str] = field(default_factory=dict)  # field name -> where its value came from

    def layer_tflops_at(self, tp: int) -> float:
        """Achieved TFLOP/s of the decoder's linear layers at tensor-parallel degree ``tp``."""
        try:
            return self.layer_tflops[str(tp)]
        except KeyError:
            raise ValueError(
                f"calibration has no layer_tflops for tp={tp} (it has {sorted(self.layer_tflops)}); "
                f"measure it with bench/calibration/measure_layers.py or add the key to the calibration file"
            ) from None

    @property
    def usable_bytes(self) -> int:
        """Bytes one process can give to tensors: device memory minus the runtime reserve."""
        return int((self.memory_gib - self.runtime_reserve_gib) * 2**30)


def _check(calibration: Calibration, source: str) -> None:
    """Raise ``ValueError`` naming the field and the file for values that make no sense."""
    positive = [
        "peak_tflops", "memory_gib", "attention_tflops", "encoder_tflops", "hbm_gbps", "nvlink_busbw_gbps",
        "ib_busbw_gbps", "p2p_nvlink_gbps", "p2p_ib_gbps",
    ]  # fmt: skip
    for name in positive:
        value = getattr(calibration, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{source}: {name} = {value!r} must be a positive number")
    for name in ("runtime_reserve_gib", "fragmentation", "nvlink_latency_us", "ib_latency_us"):
        if getattr(calibration, name) < 0:
            raise ValueError(f"{source}: {name} must be >= 0")
    if calibration.runtime_reserve_gib >= calibration.memory_gib:
        raise ValueError(f"{source}: runtime_reserve_gib must be below memory_gib")
    if not 0 <= calibration.overlap <= 1:
        raise ValueError(f"{source}: overlap = {calibration.overlap} must lie in [0, 1]")
    if calibration.gpus_per_node < 1:
        raise ValueError(f"{source}: gpus_per_node must be at least 1")
    if not calibration.layer_tflops:
        raise ValueError(f"{source}: layer_tflops needs at least the key \"1\" (tp = 1)")
    for key, value in calibration.layer_tflops.items():
        if not key.isdigit() or int(key) < 1 or not value > 0:
            raise ValueError(f"{source}: layer_tflops[{key!r}] = {value!r}: keys are tp degrees, values positive TFLOP/s")


def calibration_from_dict(raw: Mapping[str, Any], source: str = "<dict>") -> Calibration:
    """Build and check a calibration; unknown or missing keys are errors that name the key."""
    fields = {f.name: f for f in dataclasses.fields(Calibration)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"{source}: unknown calibration key {unknown[0]!r}; valid keys are {sorted(fields)}")
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in raw]
    if missing:
        raise ValueError(f"{source}: calibration key {missing[0]!r} is missing; every figure must be given")
    hints = typing.get_type_hints(Calibration)
    values: dict[str, Any] = {}
    for name, value in raw.items():
        hint = hints[name]
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif hint is dict[str, float]:
            if not isinstance(value, dict):
                raise ValueError(f"{source}: {name} must be an object of tp degree -> TFLOP/s")
            value = {str(k): float(v) for k, v in value.items()}
        elif hint is dict[str, str]:
            if not isinstance(value, dict):
                raise ValueError(f"{source}: {name} must be an object of field name -> text")
        elif hint in (int, float, str) and type(value) is not hint:
            raise ValueError(f"{source}: {name} must be {hint.__name__}, got {value!r}")
        values[name] = value
    calibration = Calibration(**values)
    _check(calibration, source)
    return calibration


def load_calibration(path: str | Path = DEFAULT_CALIBRATION) -> Calibration:
    """Read a calibration JSON file (``bench/calibration/h100.json`` by default)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"calibration file {path} does not exist; pass --calibration bench/calibration/h100.json") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"calibration file {path} is not valid JSON: {e}") from None
    return calibration_from_dict(raw, source=str(path))


def update_calibration(path: str | Path, updates: Mapping[str, Any], source: str) -> Calibration:
    """Replace figures in a calibration file with measured ones and record where they came from.

    ``updates`` maps field names to new values; ``layer_tflops`` entries are merged per tp
    degree, so a benchmark that measured tp = 2 only leaves the other degrees alone.
    ``source`` (e.g. "bench/calibration/measure_layers.py on node gpu042, 2025-03-01")
    is recorded for every updated field. The file is rewritten atomically.
    """
    path = Path(path)
    raw = json.loads(path.read_text())
    for name, value in updates.items():
        if name == "sources":
            raise ValueError("update_calibration records sources itself; pass the measured fields only")
        if name == "layer_tflops":
            merged = dict(raw.get("layer_tflops", {}))
            merged.update({str(k): float(v) for k, v in value.items()})
            value = merged
            for tp in updates["layer_tflops"]:
                raw.setdefault("sources", {})[f"layer_tflops.{tp}"] = source
        else:
            raw.setdefault("sources", {})[name] = source
        raw[name] = value
    calibration = calibration_from_dict(raw, source=str(path))
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(raw, indent=2) + "\n")
    tmp.replace(path)
    return calibration
