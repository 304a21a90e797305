"""The validation loss: the training objective on held-out shards, without gradient or update.

When. Every ``training.eval_every`` optimizer steps and once at the end (``due``); the
record's ``step`` is the number of optimizer steps applied, so validation at step k scores
the weights the training record of step k is computed with.

What. The held-out set is a pure function of ``data.val_shards``, the data seed and
``training.eval_batches``, the same at every dp layout: the split is read by R readers,
one per held-out shard (reader v is a ``PackedLoader`` at dp coordinates (v, R), which
starts on shard v's turn of the epoch shuffle), and each reader contributes its first
``eval_batches`` micro-batches. Dp rank r evaluates readers r, r + dp, ..., so every dp
size dividing R splits the same micro-batches (a ValueError names the fix otherwise).
Each evaluation rebuilds the readers from the start (the same batches every time), reads
in the training process (``num_workers`` 0) and otherwise prepares documents exactly as
training does.

Noise. A micro-batch's VAE posterior sample and flow noise come from a generator seeded
by ("validation", training.seed, reader, index): fixed across evaluations and layouts,
and independent of the training step.

Sums. Each rank's micro-batches go through ``TrainEngine.evaluate`` (the step's own loss,
through DeepSpeed's ``eval_batch`` at pp > 1), normalised by the held-out set's global
target counts and summed over dp: ``val/loss`` is the objective over the whole held-out
set, ``val/ce`` / ``val/mse`` the mean per target token, ``val/loss/<modality>`` the mean
per target token of each target modality (``losses.loss_means``).
"""

from __future__ import annotations

from dataclasses import replace
from itertools import islice

import torch

from modus_mega.config import ModusConfig
from modus_mega.data.loader import PackedLoader
from modus_mega.losses import loss_means
from modus_mega.model.inputs import StepInputs, target_counts
from modus_mega.parallel.context import ParallelContext
from modus_mega.seeding import derive_seed
from modus_mega.training.engine import TrainEngine
from modus_mega.training.metrics import VAL_PREFIX
from modus_mega.training.prepare import prepare_step_inputs
from modus_mega.vocab import Vocabulary

def validation_generator(seed: int, reader: int, index: int, device: torch.device) -> torch.Generator:
    """The generator of one held-out micro-batch's noise: (seed, reader, index), never the training step."""
    return torch.Generator(device=device).manual_seed(derive_seed("validation", seed, reader, index))


class Validation:
    """The held-out readers of this dp rank and the evaluation that runs them (module docstring)."""

    def __init__(self, cfg: ModusConfig, ctx: ParallelContext, vocab: Vocabulary) -> None:
        self.cfg, self.ctx, self.vocab = cfg, ctx, vocab
        self.data = replace(cfg.data, source="shards", shards=cfg.data.val_shards, num_workers=0)
        self.num_readers = self._loader(0, 1).source.num_shards
        if self.num_readers % ctx.dp:
            raise ValueError(
                f"data.val_shards={cfg.data.val_shards} holds {self.num_readers} shards, which {ctx.dp} data-parallel "
                "ranks cannot share evenly (one reader per held-out shard, the same at every layout); write the "
                "held-out split in a multiple of dp shards (python -m modus_mega.datasets.synth --split val "
                "--samples-per-shard N)"
            )

    @classmethod
    def build(cls, cfg: ModusConfig, ctx: ParallelContext, vocab: Vocabulary) -> Validation | None:
        """The run's validation, or None when ``training.eval_every`` is 0 (no validation)."""
        return cls(cfg, ctx, vocab) if cfg.training.eval_every > 0 else None

    def due(self, step: int) -> bool:
        """Whether to validate once ``step`` optimizer steps are applied: every ``eval_every``, and at the end."""
        return step % self.cfg.training.eval_every == 0 or step == self.cfg.training.steps

    def _loader(self, reader: int, num_readers: int) -> PackedLoader:
        return PackedLoader(self.data, self.cfg.training.timesteps, self.cfg.model, self.vocab, reader, num_readers)

    def micro_batches(self, engine: TrainEngine) -> list[StepInputs]:
        """This dp rank's held-out micro-batches, prepared (encoded and noised) on its device."""
        prepared = []
        for reader in range(self.ctx.dp_rank, self.num_readers, self.ctx.dp):
            batches = islice(self._loader(reader, self.num_readers), self.cfg.training.eval_batches)
            for index, batch in enumerate(batches):
                generator = validation_generator(self.cfg.training.seed, reader, index, self.ctx.device)
                prepared.append(prepare_step_inputs(batch.to(self.ctx.device), engine.vae, self.cfg.model, generator))
        return prepared

    def evaluate(self, engine: TrainEngine, step: int) -> dict[str, float]:
        """The validation record of ``step``: ``val/loss``, ``val/ce``, ``val/mse``, ``val/loss/<modality>``.

        A collective over every rank (counts and sums are all-reduced over dp).
        """
        micro = self.micro_batches(engine)
        global_ce, global_mse = self.ctx.all_reduce_dp(target_counts(micro))
        sums = engine.evaluate(micro, (int(global_ce), int(global_mse)))  # [NUM_LOSS_SUMS] of this dp rank
        totals = self.ctx.all_reduce_dp(sums.tolist())
        means = loss_means(totals, global_ce, global_mse)
        return {"step": step, **{VAL_PREFIX + key: value for key, value in means.items()}}
