"""Any-to-any generation: given conditions, generate targets one after another (DESIGN §8).

For each target the conditional branch is the context (the conditions, and with ``chain``
every target finished before it) followed by the target's ``<start:m>`` marker:

- a 1D target is sampled token by token under its modality's grammar
  (``inference/constraints.py``); each token is appended to the cache; the segment ends at
  ``<end_of_segment>``, which is NOT appended (a finished 1D target continues the sequence as
  a condition does in training: its tokens without an end token);
- a 2D target is a noisy VAE split integrated from noise (t = 1) to data (t = 0)
  (``inference/flow_sampler.py``), run read-only over the cache at every step; the result is
  decoded by the VAE, snapped to its training form (labels, edges: the modality table's
  ``snap``), and appended re-encoded clean exactly as the document builder appends a
  condition of that modality.

Guidance (``inference/guidance.py``): each branch has its own sequence, cache and position
ids. The unconditional branch of a target keeps the conditions named in
``Settings.keep_unconditional`` (default none: the marker alone); extra conditional branches
(``Settings.branches``, one list of condition names per branch after the first) see only
their own conditions, not earlier generated targets. Scale 1 runs no unconditional pass.
All branches of a target step together in one packed forward (``forward_over_caches``), so
a guided output equals the branches run one by one up to fp32 summation order.

Randomness: a target's noise and its token sampling come from generators seeded by
(seed, target index), so the same seed gives bit-identical outputs and a target's output does
not depend on how many random numbers earlier targets drew.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from modus_mega.config import DataConfig, ModelConfig, TimestepConfig
from modus_mega.data.documents import Document, DocumentBuilder, Sample
from modus_mega.encoders.vae import FluxAutoEncoder, unpatchify_latents
from modus_mega.inference.constraints import (
    DetectionGrammar,
    FeatureGrammar,
    Grammar,
    GroundingGrammar,
    TextGrammar,
)
from modus_mega.inference.flow_sampler import FlowSolver, integrate_flow
from modus_mega.inference.guidance import GuidanceConfig, guide
from modus_mega.inference.sequence import Sequence, SequenceRunner
from modus_mega.inference.token_sampling import TokenSampling, sample_token
from modus_mega.modalities import modality, snap
from modus_mega.model.modus import ModusModel
from modus_mega.ops.attention import AttentionBackend
from modus_mega.seeding import derive_seed
from modus_mega.tokenizers.vq import FeatureQuantizer
from modus_mega.vocab import Vocabulary


@dataclass
class Settings:
    """How targets are generated (the command line's options)."""

    image_size: tuple[int, int] = (64, 64)  # (H, W) pixels of a generated 2D target
    steps: int = 30  # flow steps per 2D target
    shift: float = 1.0  # timestep shift of the sampling grid (MODUS trains with 1; BAGEL samples with 3)
    solver: FlowSolver = "euler"
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    sampling: TokenSampling = field(default_factory=TokenSampling)
    chain: bool = False  # each finished target becomes a condition of the next ones
    keep_unconditional: tuple[str, ...] = ()  # conditions the unconditional branch keeps
    branches: tuple[tuple[str, ...], ...] = ()  # conditions of the 2nd, 3rd ... conditional branch
    max_text_tokens: int = 64  # caption length cap
    max_boxes: int = 16  # detection boxes cap
    feature_grid: tuple[int, int] = (4, 4)  # patch grid of local features
    seed: int = 0


@dataclass
class GeneratedTarget:
    """One finished target: 1D ``ids`` (no end token) or a 2D ``image`` [3, H, W] in [-1, 1], snapped.

    A 2D target also keeps the ``latent`` tokens [N, P] the flow produced, before VAE decoding
    (what the model itself predicts: evaluation compares them with the encoded ground truth).
    """

    name: str
    ids: list[int] | None = None
    image: Tensor | None = None
    latent: Tensor | None = None


@dataclass
class Generation:
    """A request's targets, and the main branch's document after them (with ``chain``: every target appended)."""

    targets: list[GeneratedTarget]
    document: Document


@dataclass
class Generator:
    """Generates targets from conditions with one model (its tp = 1 serial form) and its VAE."""

    model: ModusModel
    vae: FluxAutoEncoder
    attention: AttentionBackend
    data: DataConfig  # the run's data config: how 2D conditions enter (condition_mode_2d)
    quantizers: dict[str, FeatureQuantizer] = field(default_factory=dict)  # for feature targets
    show_progress: bool = False  # a progress bar per target (tokens, or flow-model evaluations)

    def __post_init__(self) -> None:
        cfg: ModelConfig = self.model.cfg
        self.vocab: Vocabulary = self.model.vocab
        self.builder = DocumentBuilder(self.data, TimestepConfig(), cfg, self.vocab)  # a target's training t is never drawn here
        self.runner = SequenceRunner(self.model, self.vae, self.attention, cfg, self.vocab)

    # ------------------------------------------------------------------ requests

    def generate(
        self, conditions: Sample, order: list[str], targets: list[str], settings: Settings,
        expressions: dict[str, list[int]] | None = None,
    ) -> Generation:  # fmt: skip
        """Generate ``targets`` in order from ``conditions`` (given in ``order``).

        ``expressions``: the referring expression's text ids of a grounding target.
        """
        for name in targets:
            modality(name)  # unknown names fail here with the list of valid ones
        main = self._sequence(conditions, order)
        self.runner.flush(main)
        outputs: list[GeneratedTarget] = []
        for index, name in enumerate(targets):
            seq = main if settings.chain else _fork(main)
            conditional = [seq] + [self._sequence(conditions, list(b)) for b in settings.branches]
            unconditional = None
            if settings.guidance.needs_unconditional:
                unconditional = self._sequence(conditions, [c for c in order if c in settings.keep_unconditional])
            for s in conditional + ([unconditional] if unconditional else []):
                self.builder.add_marker(s.doc, name)
            if modality(name).family == "1d":
                out = self._generate_1d(name, index, conditional, unconditional, settings, (expressions or {}).get(name))
            else:
                out = self._generate_2d(name, index, conditional, unconditional, settings)
            outputs.append(out)
        return Generation(outputs, main.doc)

    def _sequence(self, conditions: Sample, order: list[str]) -> Sequence:
        """A fresh branch whose document holds ``order``'s conditions (not yet run: the next packed flush runs it)."""
        doc = Document(key=conditions.key, target="")
        for name in order:
            self.builder.add_condition(doc, conditions, name)
        return Sequence(doc)

    # ------------------------------------------------------------------ 1D

    def _generate_1d(
        self, name: str, index: int, branches: list[Sequence], unconditional: Sequence | None, settings: Settings,
        expression: list[int] | None,
    ) -> GeneratedTarget:  # fmt: skip
        grammar = self._grammar(name, settings, expression)
        generator = torch.Generator().manual_seed(derive_seed("generate-tokens", settings.seed, index))
        every = branches + ([unconditional] if unconditional else [])
        ids: list[int] = []
        bar = tqdm(desc=name, unit="tok", disable=not self.show_progress, leave=False)
        while True:
            logits = [out[-1].float().cpu() for out in self.runner.flush_all(every)]  # [V] per branch, one forward
            uncond = logits[len(branches)] if unconditional else None
            guided = guide(logits[: len(branches)], uncond, settings.guidance)
            token = sample_token(guided, grammar.allowed(ids), settings.sampling, generator)
            if token == self.vocab.end_of_segment_id:
                bar.close()
                return GeneratedTarget(name, ids=ids)
            ids.append(token)
            bar.update()
            for s in every:
                self.builder.add_condition_content(s.doc, name, [token], None)

    def _grammar(self, name: str, settings: Settings, expression: list[int] | None) -> Grammar:
        """The grammar of 1D target ``name`` (by its tokenizer kind in the modality table)."""
        vocab, kind = self.vocab, modality(name).kind
        if kind == "groundings":
            if not expression:
                raise ValueError(f"a {name} target needs its referring expression (e.g. --expression \"the red cube\")")
            return GroundingGrammar(vocab, tuple(expression))
        if kind in ("feature_global", "feature_local"):
            if name not in self.quantizers:
                raise ValueError(f"no codebook for {name}: train one with `python -m modus_mega.datasets.train_vq`")
            grid = settings.feature_grid
            count = self.quantizers[name].num_stages if kind == "feature_global" else grid[0] * grid[1]
            return FeatureGrammar(vocab, vocab.codebooks[name], count)
        grammars = {
            "text": lambda: TextGrammar(vocab, settings.max_text_tokens),
            "detections": lambda: DetectionGrammar(vocab, settings.max_boxes),
        }
        return grammars[kind]()

    # ------------------------------------------------------------------ 2D

    def _generate_2d(
        self, name: str, index: int, branches: list[Sequence], unconditional: Sequence | None, settings: Settings
    ) -> GeneratedTarget:
        cfg: ModelConfig = self.model.cfg
        cell = cfg.vae.downsample * cfg.latent_patch_size
        height, width = settings.image_size
        if height % cell or width % cell or max(height, width) // cell > cfg.max_latent_size:
            raise ValueError(
                f"a generated image of {height}x{width} px must be a multiple of {cell} px per side and at most "
                f"{cfg.max_latent_size * cell} px (model.max_latent_size); pick e.g. --size {cell * min(8, cfg.max_latent_size)}"
            )
        grid = (height // cell, width // cell)
        every = branches + ([unconditional] if unconditional else [])
        self.runner.flush_all(every)
        generator = torch.Generator().manual_seed(derive_seed("generate-noise", settings.seed, index))
        noise = torch.randn(grid[0] * grid[1], cfg.patch_latent_dim, generator=generator).to(self.runner.device)
        evaluations = settings.steps if settings.solver == "euler" else 2 * settings.steps - 1
        bar = tqdm(total=evaluations, desc=name, unit="eval", disable=not self.show_progress, leave=False)

        def velocity(x_t: Tensor, t: float) -> Tensor:
            bar.update()
            active = settings.guidance.active_at(t)
            run = branches + ([unconditional] if active and unconditional else [])
            outs = [v.float() for v in self.runner.noisy_split_velocities(run, x_t, t, grid)]  # one packed forward
            return guide(outs[: len(branches)], outs[len(branches)] if len(run) > len(branches) else None, settings.guidance, t)

        x0 = integrate_flow(velocity, noise, settings.steps, settings.shift, settings.solver)  # [N, P]
        bar.close()
        latent = unpatchify_latents(x0, *grid, cfg.latent_patch_size, cfg.vae.latent_channels)
        with torch.no_grad():
            decoded = self.vae.decode(latent[None])[0].clamp(-1, 1).float().cpu()  # [3, H, W]
        image = torch.from_numpy(np.ascontiguousarray(snap(name, decoded.numpy()))).float()
        for s in branches[:1]:  # the main branch continues with the target as a condition
            self.builder.add_condition_content(s.doc, name, None, image)
        return GeneratedTarget(name, image=image, latent=x0.float().cpu())


def _fork(seq: Sequence) -> Sequence:
    """A branch continuing from ``seq``'s context without changing it (the cache's tensors are shared, never mutated)."""
    return Sequence(copy.deepcopy(seq.doc), seq.cache.copy(), seq.num_cached, seq.vit_cached, seq.vae_cached)
