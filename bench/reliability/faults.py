"""The fault matrix: inject every fault of each class and count the cases the system held.

    python bench/reliability/faults.py --out runs/faults [--cases 20] [--classes bad_config bad_conversion]

A fault class is one row of ``FAULT_CLASSES``: a name and a generator of cases, each a
named fault with a check that says whether the system held (refused the fault with a clear
message, or survived it as documented). The command runs every case, prints per class
"cases tried / cases held" and every case that did not hold, and writes every case's
outcome to ``OUT/faults.json``; it exits non-zero when a case did not hold.

Classes so far (issue 15): ``bad_config``, every numeric config field out of range (its
range's neighbours, NaN and infinity) plus wrong list lengths and empty output paths, each
refused with a message naming the key; ``bad_conversion``, a tiny BAGEL release tampered
(NaN / Inf / integer tensors, truncated files at random offsets, missing / extra /
mis-shaped tensors, changed settings in its JSON, tokenizer or autoencoder files), each
refused by ``python -m modus_mega.convert from-bagel --config configs/tiny.json`` with one
stderr line and exit status 2, leaving no output behind. Kill / resume, bad shards, tampered checkpoints and a
full disk are added as rows the same way: a function ``(work dir, rng, cases) -> cases``.
``tests/reliability/test_faults.py`` runs each class with one case per random kind in CI.
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
sys.path.insert(0, str(REPO))  # run as a script from anywhere

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


# ----------------------------------------------------------------------------- the matrix

FAULT_CLASSES: dict[str, FaultClass] = {
    "bad_config": FaultClass("bad_config", bad_config_cases),
    "bad_conversion": FaultClass("bad_conversion", bad_conversion_cases),
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
        held, detail = case.check()
        outcomes.append(Outcome(fault_class.name, case.name, held, detail))
    return outcomes


def main(argv: list[str] | None = None) -> int:
    """Run the matrix; print cases tried / held per class and the cases that did not hold; 1 if any."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="work directory; faults.json is written there")
    parser.add_argument("--classes", nargs="+", choices=list(FAULT_CLASSES), default=list(FAULT_CLASSES))
    parser.add_argument("--cases", type=int, default=20, help="cases of each random kind (offsets, tensors)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    outcomes = [
        outcome for name in args.classes for outcome in run_class(FAULT_CLASSES[name], args.out / name, args.seed, args.cases)
    ]
    print(f"{'fault class':<16} {'tried':>6} {'held':>6}")
    for name in args.classes:
        mine = [o for o in outcomes if o.fault_class == name]
        print(f"{name:<16} {len(mine):>6} {sum(o.held for o in mine):>6}")
    for o in outcomes:
        if not o.held:
            print(f"NOT HELD  {o.fault_class}: {o.case}: {o.detail}")
    (args.out / "faults.json").write_text(json.dumps([o.__dict__ for o in outcomes], indent=1) + "\n")
    return int(not all(o.held for o in outcomes))


if __name__ == "__main__":
    raise SystemExit(main())
