"""The fault matrix: inject every fault of each class and count the cases the system held.

    python bench/reliability/faults.py --out runs/faults [--classes bad_shards,kill_resume] [--cases 20] [--kills 3]

A fault class is one row of ``FAULT_CLASSES``: a name and a generator of cases, each a
named fault with a check that says whether the system held (refused the fault with a clear
message, or survived it as documented). The command runs every case, prints per class
"cases tried / cases held" and every case that did not hold, and writes every case's
outcome to ``OUT/faults.json``; it exits non-zero when a case did not hold. A case that
crashes did not hold. ``--cases`` is how often each random kind is drawn (offsets,
tensors, files), ``--kills`` how many kill / resume cases run (each two tiny training runs).

The classes (issue 15):

- ``bad_config``: every numeric config field out of range (its range's neighbours, NaN and
  infinity) plus wrong list lengths and empty output paths, each refused with a message
  naming the key;
- ``bad_conversion``: a tiny BAGEL release tampered (NaN / Inf / integer tensors, truncated
  files at random offsets, missing / extra / mis-shaped tensors, changed settings in its
  JSON, tokenizer or autoencoder files), each refused by ``python -m modus_mega.convert
  from-bagel --config configs/tiny.json`` with one stderr line and exit status 2, leaving no
  output behind;
- ``bad_shards`` (``shard_cases.py``): one bad member among good samples (header bombs,
  unknown members, oversized members, truncations at random offsets, random bytes, exceptions
  inside decoders), read as the loader reads; the bad sample counted under its reason, every
  good one delivered;
- ``kill_resume`` (``kill_cases.py``): ``launch/pretrain.py`` SIGKILLed during a save or at a
  random time, then resumed: its losses equal an uninterrupted run's bit for bit;
- ``tampered_checkpoint``, ``truncated_checkpoint``, ``bit_flip_checkpoint``,
  ``missing_file``, ``damaged_latest``, ``disk_full``, ``read_only`` (``checkpoint_cases.py``):
  a tiny run's checkpoints damaged, or its save made to fail, and resumed through the real code.

A row is a function ``(work dir, rng, count) -> cases``; the sibling modules give
``(name, check)`` pairs that ``sibling_class`` wraps. ``tests/reliability/test_faults.py``
runs every class with one case per random kind (and one kill) in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(Path(__file__).parent)]  # run as a script from anywhere; its sibling modules

import checkpoint_cases  # noqa: E402
from kill_cases import kill_cases  # noqa: E402
from shard_cases import shard_cases  # noqa: E402

from modus_mega.cli import one_line  # noqa: E402
from modus_mega.config import (  # noqa: E402
    FIELD_LENGTHS,
    FIELD_RANGES,
    NON_EMPTY_STRINGS,
    config_from_dict,
    config_to_dict,
    load_config,
    numeric_field_patterns,
)
from modus_mega.convert.__main__ import main as convert_main  # noqa: E402
from modus_mega.convert.bagel import save_bagel  # noqa: E402
from modus_mega.encoders.vae import FluxAutoEncoder  # noqa: E402
from modus_mega.model.init import init_weights  # noqa: E402
from modus_mega.model.modus import ModusModel  # noqa: E402

TINY = REPO / "configs" / "tiny.json"


@dataclass(frozen=True)
class Case:
    """One injected fault: its name, and a check that runs it and says whether the system held."""

    name: str
    check: Callable[[], tuple[bool, str]]  # -> (held, what happened: the message or the reason it did not hold)


@dataclass(frozen=True)
class FaultClass:
    """One row of the matrix: a fault class and its cases, ``cases(work_dir, rng, count)``."""

    name: str
    cases: Callable[[Path, random.Random, int], Iterator[Case]]
    counted_by: str = "cases"  # the command-line flag that gives ``count``: "cases", or "kills" for kill_resume


# ----------------------------------------------------------------------------- bad configs


def _refused_naming(raw: dict, key: str) -> tuple[bool, str]:
    """Whether loading ``raw`` raises a ValueError that starts with the file and ``key``."""
    try:
        config_from_dict(raw, source="run.json")
    except ValueError as error:
        return str(error).startswith(f"run.json: {key}"), str(error)
    return False, "accepted"


def _with(raw: dict, key: str, value: object) -> dict:
    """A copy of ``raw`` with ``key`` (dotted; ``name[0]`` for a list's first item) set to ``value``."""
    raw = json.loads(json.dumps(raw))
    *parents, last = key.split(".")
    node = raw
    for part in parents:
        node = node[part]
    if last.endswith("[0]"):
        node[last[:-3]][0] = value
    else:
        node[last] = value
    return raw


def bad_config_cases(work: Path, rng: random.Random, count: int) -> Iterator[Case]:
    """Every numeric field at each invalid example of its range; fixed-length lists; empty output paths."""
    raw = config_to_dict(load_config(TINY))
    for pattern, kind in numeric_field_patterns():
        key = pattern.replace("[]", "[0]").replace(".*", ".rgb")
        for value in FIELD_RANGES[pattern].invalid_examples(is_int=kind is int):
            bad = _with(raw, key, value)
            yield Case(f"{key}={value}", lambda bad=bad, key=key: _refused_naming(bad, key))
    for key, length in FIELD_LENGTHS.items():
        for items in (length - 1, length + 1):
            bad = _with(raw, key, [0.5] * items)
            yield Case(f"{key} with {items} items", lambda bad=bad, key=key: _refused_naming(bad, key))
    for key in NON_EMPTY_STRINGS:
        bad = _with(raw, key, "  ")
        yield Case(f"{key} empty", lambda bad=bad, key=key: _refused_naming(bad, key))


# ----------------------------------------------------------------------------- bad conversions


def write_tiny_release(out: Path, seed: int = 0) -> Path:
    """A BAGEL release of the tiny model (random weights, text rows only), written by MODUS's own export,
    with a tokenizer that defines no vision markers (the tiny config appends its own)."""
    cfg = load_config(TINY).model
    model, vae = ModusModel(cfg), FluxAutoEncoder(cfg.vae)
    init_weights(model, seed, std=0.1)
    init_weights(vae, seed + 1, std=0.05, prefix="vae.")
    save_bagel(model, vae, out, text_vocab_only=True)
    (out / "tokenizer.json").write_text(json.dumps({"added_tokens": []}))
    return out


def _edit_ema(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(path / "ema.safetensors")
    edit(tensors)
    save_file(tensors, path / "ema.safetensors")


def _edit_json(path: Path, name: str, edit: Callable[[dict], None]) -> None:
    data = json.loads((path / name).read_text())
    edit(data)
    (path / name).write_text(json.dumps(data))


def _truncate(path: Path, offset: int) -> None:
    path.write_bytes(path.read_bytes()[:offset])


def _convert_refuses(release: Path, work: Path, tamper: Callable[[Path], None]) -> tuple[bool, str]:
    """Tamper with a copy of ``release``; held when from-bagel (given the tiny config) exits 2 with one stderr
    line and writes nothing."""
    src, out = work / "src", work / "out"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(release, src)
    tamper(src)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            convert_main(["from-bagel", str(src), str(out), "--config", str(TINY), "--quiet"])
    except SystemExit as exit_:
        lines = err.getvalue().strip().splitlines()
        held = exit_.code == 2 and len(lines) == 1 and not out.exists()
        return held, lines[-1] if lines else f"exit {exit_.code}, nothing printed"
    finally:
        leftovers = [p.name for p in work.iterdir() if p.name != "src"]
        shutil.rmtree(work, ignore_errors=True)
    return False, f"converted; left {leftovers}"


def bad_conversion_cases(work: Path, rng: random.Random, count: int) -> Iterator[Case]:
    """A tiny release tampered in every way the converter must refuse; random kinds ``count`` times each."""
    release = write_tiny_release(work / "release")
    ema = load_file(release / "ema.safetensors")
    names = sorted(ema)
    ema_bytes = (release / "ema.safetensors").stat().st_size

    def case(name: str, tamper: Callable[[Path], None]) -> Case:
        return Case(name, lambda: _convert_refuses(release, work / "attempt", tamper))

    def set_value(tensor_name: str, index: int, value: float) -> Callable[[Path], None]:
        def tamper(path: Path) -> None:
            def edit(tensors: dict[str, torch.Tensor]) -> None:
                flat = tensors[tensor_name].clone().reshape(-1)
                flat[index % flat.numel()] = value
                tensors[tensor_name] = flat.reshape(tensors[tensor_name].shape)

            _edit_ema(path, edit)

        return tamper

    for _ in range(count):
        name = rng.choice(names)
        index = rng.randrange(ema[name].numel())
        yield case(f"NaN in {name}[{index}]", set_value(name, index, float("nan")))
        yield case(f"-Inf in {name}[{index}]", set_value(name, index, float("-inf")))
        name = rng.choice(names)
        yield case(f"{name} as int32", lambda p, n=name: _edit_ema(p, lambda t: t.update({n: t[n].to(torch.int32)})))
        offset = rng.randrange(ema_bytes)
        yield case(
            f"ema.safetensors truncated at byte {offset}", lambda p, o=offset: _truncate(p / "ema.safetensors", o)
        )
        name = rng.choice(names)
        yield case(f"{name} missing", lambda p, n=name: _edit_ema(p, lambda t: t.pop(n)))
        name = rng.choice(names)
        yield case(
            f"{name} with a row less", lambda p, n=name: _edit_ema(p, lambda t: t.update({n: t[n][:-1].clone()}))
        )
    table = "latent_pos_embed.pos_embed"  # compared with MODUS's table: its dtype must be checked first
    yield case("the latent sin-cos table as int32", lambda p: _edit_ema(p, lambda t: t.update({table: t[table].int()})))
    yield case("an extra tensor", lambda p: _edit_ema(p, lambda t: t.update({"unknown_head.weight": torch.zeros(3)})))
    yield case("llm_config.json: num_hidden_layers changed",
               lambda p: _edit_json(p, "llm_config.json", lambda c: c.update(num_hidden_layers=3)))  # fmt: skip
    yield case("vit_config.json: patch_size changed",
               lambda p: _edit_json(p, "vit_config.json", lambda c: c.update(patch_size=4)))  # fmt: skip
    yield case("llm_config.json missing", lambda p: (p / "llm_config.json").unlink())
    yield case("llm_config.json not JSON", lambda p: (p / "llm_config.json").write_text("{'hidden_size': 64"))
    yield case("ae_config.json: norm_groups changed",
               lambda p: _edit_json(p, "ae_config.json", lambda c: c.update(norm_groups=4)))  # fmt: skip
    yield case("ae_config.json: scale_factor changed",
               lambda p: _edit_json(p, "ae_config.json", lambda c: c.update(scale_factor=1.0)))  # fmt: skip
    yield case("ae_config.json missing (taken for FLUX's autoencoder)", lambda p: (p / "ae_config.json").unlink())
    yield case("tokenizer defines the vision markers",
               lambda p: (p / "tokenizer.json").write_text(json.dumps({"added_tokens": [
                   {"id": 500, "content": "<|vision_start|>"}, {"id": 501, "content": "<|vision_end|>"}]})))  # fmt: skip


# ----------------------------------------------------------------------------- rows from the sibling modules

NamedChecks = Iterator[tuple[str, Callable[[], tuple[bool, str]]]]


def sibling_class(name: str, cases: Callable[[Path, random.Random, int], NamedChecks], counted_by: str = "cases") -> FaultClass:
    """The row ``name`` from a sibling module's ``(work, rng, count) -> (case name, check)`` generator."""
    return FaultClass(name, lambda work, rng, count: (Case(*case) for case in cases(work, rng, count)), counted_by)


def checkpoint_class(name: str, kind: str) -> FaultClass:
    """The row ``name``: the cases of ``kind`` from ``checkpoint_cases.py``, against a freshly trained tiny run."""

    def cases(work: Path, rng: random.Random, count: int) -> NamedChecks:
        with checkpoint_cases.open_bench(work, rng) as bench:
            for case, check in checkpoint_cases.checkpoint_cases(kind, bench, count):
                yield case, lambda check=check: (check(), "as documented in checkpoint_cases.py")

    return sibling_class(name, cases)


# ----------------------------------------------------------------------------- the matrix

FAULT_CLASSES: dict[str, FaultClass] = {
    "bad_config": FaultClass("bad_config", bad_config_cases),
    "bad_conversion": FaultClass("bad_conversion", bad_conversion_cases),
    "bad_shards": sibling_class("bad_shards", shard_cases),
    "kill_resume": sibling_class("kill_resume", kill_cases, counted_by="kills"),
    **{name: checkpoint_class(name, kind) for name, kind in [
        ("tampered_checkpoint", "tampered"), ("truncated_checkpoint", "truncated"), ("bit_flip_checkpoint", "bit_flip"),
        ("missing_file", "missing"), ("damaged_latest", "pointer"), ("disk_full", "disk_full"), ("read_only", "read_only"),
    ]},  # fmt: skip
}


@dataclass(frozen=True)
class Outcome:
    """What one case did."""

    fault_class: str
    case: str
    held: bool
    detail: str


def run_class(fault_class: FaultClass, work: Path, seed: int, count: int) -> list[Outcome]:
    """Every case of ``fault_class`` (random kinds ``count`` times each), in ``work`` (emptied first)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = random.Random(seed)
    outcomes = []
    for case in fault_class.cases(work, rng, count):
        try:
            held, detail = case.check()
        except Exception as error:  # a case that crashes did not hold; count it and go on
            held, detail = False, f"raised {type(error).__name__}: {one_line(error)}"
        outcomes.append(Outcome(fault_class.name, case.name, held, detail))
    return outcomes


def _class_list(text: str) -> list[str]:
    """``--classes a,b``: known class names, in the matrix's order."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in FAULT_CLASSES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown fault class(es) {unknown}; choose from {','.join(FAULT_CLASSES)}")
    return [name for name in FAULT_CLASSES if name in names]


def main(argv: list[str] | None = None) -> int:
    """Run the matrix; print cases tried / held per class and the cases that did not hold; 1 if any."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="work directory; faults.json is written there")
    parser.add_argument("--classes", type=_class_list, default=list(FAULT_CLASSES),
                        help=f"comma-separated fault classes (default all): {','.join(FAULT_CLASSES)}")
    parser.add_argument("--cases", type=int, default=20, help="cases of each random kind (offsets, tensors)")
    parser.add_argument("--kills", type=int, default=3, help="kill_resume cases (each two tiny training runs)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    outcomes = []
    for name in args.classes:
        fault_class = FAULT_CLASSES[name]
        outcomes += run_class(fault_class, args.out / name, args.seed, getattr(args, fault_class.counted_by))
    print(f"{'fault class':<22} {'tried':>6} {'held':>6}")
    for name in args.classes:
        mine = [o for o in outcomes if o.fault_class == name]
        print(f"{name:<22} {len(mine):>6} {sum(o.held for o in mine):>6}")
    for o in outcomes:
        if not o.held:
            print(f"NOT HELD  {o.fault_class}: {o.case}: {o.detail}")
    (args.out / "faults.json").write_text(json.dumps([o.__dict__ for o in outcomes], indent=1) + "\n")
    return int(not all(o.held for o in outcomes))


if __name__ == "__main__":
    raise SystemExit(main())
