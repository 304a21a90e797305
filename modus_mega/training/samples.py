"""Samples during training (``training.sample_every``): a fixed set of held-out requests, generated now and then.

Every ``sample_every`` optimizer steps rank 0 generates ``NUM_SCENES`` held-out scenes with
the current weights (the EMA where this rank holds all of it: ``training.ema_decay > 0`` and
dp = 1 or an unpartitioned EMA; else the live weights, said once in the log), writes their
contact sheet (conditions | generated | ground truth, ``inference/outputs.py``) to
``run_dir/samples/step_XXXXXXXX.png`` (the number of steps done; each target's own files
go to ``run_dir/samples/latest/<scene>/``, overwritten each time) and logs it to wandb as
``samples``. Without a text tokenizer at hand, 1D conditions show as undecoded tiles. The
other ranks go on to the next step, which waits for rank 0 at its first collective (keep
the set small: the watchdog's ``parallel.collective_timeout_s`` covers it).

The scenes come from the run's own kind of data, seeded apart from it: procedural scenes
(``data/procedural.py``) for ``data.source = procedural``, synthetic 15-modality scenes
(``datasets/synth.py``) otherwise, both with a seed derived from ``data.seed`` under
another name, so no held-out scene is a training scene. Requests: rgb -> the first two 2D
modalities the run trains as targets (``data.target_weights`` > 0) that the scene has; a run
that trains no 2D target besides rgb samples caption -> rgb (procedural scenes carry their
caption ids). Targets are 2D only, so no tokenizer is needed.

Generation needs the whole serial model on one rank: at tp > 1, pp > 1 or ZeRO-3 the
sampler logs once that samples need tp = pp = 1 and ZeRO <= 2 and stays off. The serial copy
is built (meta device, then the weights) for each sampling and freed after, in the
engine's compute dtype on the training device: rank 0 needs room for one more copy of the
weights in that dtype while it samples (tested on CPU in fp32 only).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from modus_mega.config import ModusConfig
from modus_mega.convert.hf import load_model
from modus_mega.convert.source import LazyTensor, ModuleSource, TensorSource
from modus_mega.data.documents import Sample
from modus_mega.data.procedural import procedural_sample
from modus_mega.datasets.synth import SynthConfig, generate_sample
from modus_mega.inference.generator import Generator, Settings
from modus_mega.inference.outputs import OutputContext, Request, SheetRow, write_contact_sheet, write_request
from modus_mega.modalities import image_modalities, modality, to_image
from modus_mega.ops.attention import get_attention_backend
from modus_mega.parallel.context import ParallelContext
from modus_mega.seeding import derive_seed
from modus_mega.parallel.ema import assemble_ema
from modus_mega.training.engine import TrainEngine
from modus_mega.training.observability import WandbRun

logger = logging.getLogger(__name__)

NUM_SCENES = 2  # held-out scenes per sampling (one contact-sheet row each)
MAX_TARGETS = 2  # 2D targets per scene
SAMPLE_STEPS = 20  # flow steps per target
SAMPLES_DIR = "samples"  # under training.run_dir


def held_out_requests(cfg: ModusConfig) -> list[Request]:
    """The fixed held-out requests of a run (the module docstring has the rule); [] if none fits."""
    seed = derive_seed("training-samples", cfg.data.seed) % 2**31  # the scene generators take seeds below 2**63 / 1e6
    size = cfg.data.image_size
    if cfg.data.source == "procedural":
        scenes = [procedural_sample(i, size, seed) for i in range(NUM_SCENES)]
    else:
        synth = SynthConfig(image_size=size, seed=seed)
        scenes = [_synth_scene(i, synth) for i in range(NUM_SCENES)]
    trained = [n for n in image_modalities() if n != "rgb" and cfg.data.target_weights.get(n, 0.0) > 0]
    requests = []
    for scene in scenes:
        targets = [n for n in trained if n in scene.images][:MAX_TARGETS]
        if targets and "rgb" in scene.images:
            requests.append(Request(scene, ["rgb"], targets, truth=scene))
        elif "caption" in scene.tokens and cfg.data.target_weights.get("rgb", 0.0) > 0:
            requests.append(Request(scene, ["caption"], ["rgb"], truth=scene))
    return requests


def _synth_scene(index: int, synth: SynthConfig) -> Sample:
    """Synthetic scene ``index`` with its 2D modalities as model images (no features: they are not drawn)."""
    _, _, values = generate_sample(index, synth, encoders=[])
    images = {
        name: torch.from_numpy(to_image(name, value, None)).float()
        for name, value in values.items()
        if modality(name).family == "2d"
    }
    return Sample(key=f"held-out-{index}", images=images)


class TrainingSampler:
    """Writes the held-out contact sheet every ``training.sample_every`` steps (rank 0)."""

    def __init__(self, cfg: ModusConfig, ctx: ParallelContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.every = cfg.training.sample_every
        self.requests: list[Request] = []
        self._said_live_weights = False
        if not self.every or not ctx.is_main:
            return
        parallel = cfg.parallel
        if parallel.tp > 1 or parallel.pp > 1 or parallel.zero_stage == 3:
            logger.warning("training.sample_every: samples need tp = pp = 1 and ZeRO <= 2 (this run: tp=%d pp=%d zero=%d); "
                           "no samples are generated", parallel.tp, parallel.pp, parallel.zero_stage)  # fmt: skip
            return
        self.requests = held_out_requests(cfg)
        if not self.requests:
            logger.warning("training.sample_every: the run trains no 2D target the held-out scenes have; no samples")

    def after_step(self, steps_done: int, engine: TrainEngine, tracker: WandbRun | None) -> Path | None:
        """After optimizer step ``steps_done`` (1-based): write the contact sheet if it is due; returns its path."""
        if not self.requests or steps_done % self.every:
            return None
        path = Path(self.cfg.training.run_dir) / SAMPLES_DIR / f"step_{steps_done:08d}.png"
        rows = self.generate(engine)
        write_contact_sheet(path, rows)
        if tracker is not None:
            tracker.log_image("samples", path, steps_done - 1)  # the step of the metrics record just logged
        return path

    @torch.no_grad()
    def generate(self, engine: TrainEngine) -> list[SheetRow]:
        """The contact-sheet rows of every held-out request, generated with a serial copy of the current weights."""
        cfg = self.cfg.model
        model, _ = load_model(cfg, self._weights(engine), False, self.ctx.device, engine.step.compute_dtype)
        attention = get_attention_backend(cfg.attention_backend, self.ctx.device, head_dim=cfg.llm.head_dim,
                                          dtype=engine.step.compute_dtype)  # fmt: skip
        generator = Generator(model, engine.vae, attention, self.cfg.data)
        size = (self.cfg.data.image_size, self.cfg.data.image_size)
        settings = Settings(image_size=size, steps=SAMPLE_STEPS, seed=derive_seed("training-samples", self.cfg.training.seed))
        ctx = OutputContext(None, size, settings.feature_grid)
        rows = []
        scratch = Path(self.cfg.training.run_dir) / SAMPLES_DIR / "latest"
        for request in self.requests:
            generation = generator.generate(request.conditions, request.order, request.targets, settings)
            rows.append(write_request(scratch / request.conditions.key, request, generation.targets, ctx))
        return rows

    def _weights(self, engine: TrainEngine) -> TensorSource:
        """The model's tensors: the EMA where this rank holds all of it, else the live weights."""
        source = ModuleSource({"": engine.model})
        if engine.ema is None:
            return source
        try:
            ema = assemble_ema([engine.ema.state_dict()])
        except ValueError:
            if not self._said_live_weights:
                logger.warning("training.sample_every: the EMA is partitioned over data-parallel ranks; samples use the live weights")
                self._said_live_weights = True
            return source
        return _Overlay(source, ema)


class _Overlay(TensorSource):
    """``base``'s tensors with some replaced (the EMA of the trainable ones)."""

    def __init__(self, base: TensorSource, replaced: dict[str, torch.Tensor]) -> None:
        self.base, self.replaced, self.label = base, replaced, f"{base.label} with its EMA"

    def names(self) -> list[str]:
        return self.base.names()

    def shape(self, name: str) -> torch.Size:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def lazy(self, name: str) -> LazyTensor:
        return self.replaced[name] if name in self.replaced else self.base.lazy(name)
