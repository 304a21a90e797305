"""The MODUS objective: CE on the target's 1D tokens + flow-matching MSE on its 2D tokens.

A top-level module (below ``parallel/`` and ``training/``): the training step calls it
and a pipeline's last stage runs the loss it is given, so neither imports the other.

Each term is a SUM over this micro-batch's target tokens divided by the number of target
tokens in the whole global batch (all micro-batches of the step, all data-parallel
ranks), so gradient accumulation and data parallelism give the same gradient as one big
batch (DESIGN §3). The MSE of a token is the mean over its P latent dims (BAGEL).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from modus_mega.modalities import MODALITY_NAMES, NUM_MODALITIES

# (logits [N, V], labels [N]) -> per-token loss [N]; the vocab-parallel version lives in parallel/.
CrossEntropyFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class LossTargets:
    """What one micro-batch's loss needs besides the heads' outputs: its target positions and targets.

    The positions are where the heads run (``ModusModel.heads``); both ascend.
    """

    ce_index: Tensor  # [N_ce] long: positions whose next token is a 1D target token
    ce_labels: Tensor  # [N_ce] long: that token
    ce_modality: Tensor  # [N_ce] long: its target modality
    mse_index: Tensor  # [N_mse] long: positions of noisy 2D target tokens
    velocity_target: Tensor  # [N_mse, P]: eps - x0 of each
    mse_modality: Tensor  # [N_mse] long

    @property
    def counts(self) -> tuple[int, int]:
        """(N_ce, N_mse): this micro-batch's CE and MSE target tokens."""
        return self.ce_index.numel(), self.mse_index.numel()


# (logits [N_ce, V], velocity [N_mse, P], targets) -> the scalar a step back-propagates for one micro-batch.
# The training step builds it (``training/step.py``); a pipeline's last stage receives and runs it.
MicroBatchLoss = Callable[[Tensor, Tensor, LossTargets], Tensor]


def serial_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-token cross-entropy [N] in fp32."""
    return F.cross_entropy(logits.float(), labels, reduction="none")


@dataclass
class LossBreakdown:
    """The differentiable total plus detached sums for logging (divide sums by counts)."""

    loss: Tensor  # scalar: ce_weight * CE + mse_weight * MSE, normalised by global counts
    ce_sum: Tensor  # scalar, detached: summed per-token CE of this micro-batch
    mse_sum: Tensor  # scalar, detached: summed per-token MSE
    num_ce: int  # CE tokens in this micro-batch
    num_mse: int  # MSE tokens in this micro-batch
    modality_sum: Tensor  # [NUM_MODALITIES], detached: summed loss per target modality
    modality_count: Tensor  # [NUM_MODALITIES]: tokens per target modality


def modus_loss(
    logits: Tensor,
    velocity: Tensor,
    targets: LossTargets,
    global_num_ce: int,
    global_num_mse: int,
    ce_weight: float = 1.0,
    mse_weight: float = 1.0,
    cross_entropy: CrossEntropyFn = serial_cross_entropy,
) -> LossBreakdown:
    """Weighted CE + MSE over one micro-batch's target tokens.

    logits [N_ce, V] and velocity [N_mse, P]: the heads' outputs at ``targets``' positions
    (``ce_labels`` / ``ce_modality`` [N_ce], ``velocity_target`` [N_mse, P], ``mse_modality``
    [N_mse]). ``global_num_*`` count target tokens over the whole global batch; a zero
    count (no such target anywhere) makes that term exactly zero.
    """
    ce_tokens = cross_entropy(logits, targets.ce_labels)  # [N_ce]
    mse_tokens = (velocity.float() - targets.velocity_target.float()).pow(2).mean(dim=-1)  # [N_mse]
    ce = ce_tokens.sum() / max(global_num_ce, 1)
    mse = mse_tokens.sum() / max(global_num_mse, 1)
    loss = ce_weight * ce + mse_weight * mse

    per_token = torch.cat([ce_tokens.detach(), mse_tokens.detach()])
    modality = torch.cat([targets.ce_modality, targets.mse_modality]).long()
    modality_sum = torch.zeros(NUM_MODALITIES, device=per_token.device).index_add_(0, modality, per_token)
    modality_count = torch.bincount(modality, minlength=NUM_MODALITIES)
    return LossBreakdown(
        loss=loss,
        ce_sum=ce_tokens.detach().sum(),
        mse_sum=mse_tokens.detach().sum(),
        num_ce=ce_tokens.numel(),
        num_mse=mse_tokens.numel(),
        modality_sum=modality_sum,
        modality_count=modality_count,
    )


# Length of ``loss_sums``: [loss, ce_sum, mse_sum, per-modality sums..., per-modality counts...].
NUM_LOSS_SUMS = 3 + 2 * NUM_MODALITIES


def loss_sums(terms: LossBreakdown) -> Tensor:
    """One micro-batch's terms as [NUM_LOSS_SUMS] float64, the vector the loop sums over micro-batches and dp."""
    head = torch.stack([terms.loss.detach(), terms.ce_sum, terms.mse_sum]).double()
    return torch.cat([head, terms.modality_sum.double(), terms.modality_count.double()])


def loss_means(totals: list[float], global_num_ce: float, global_num_mse: float) -> dict[str, float]:
    """The logged losses of ``loss_sums`` summed over a batch (micro-batches, dp ranks): the inverse of its layout.

    ``loss`` (the objective, already normalised by the global counts), mean ``ce`` and
    ``mse`` per target token, and ``loss/<modality>`` for each target modality present.
    """
    from_modalities = 3 + NUM_MODALITIES
    loss, ce_sum, mse_sum = totals[:3]
    means = {"loss": loss, "ce": ce_sum / max(global_num_ce, 1), "mse": mse_sum / max(global_num_mse, 1)}
    for name, total, count in zip(MODALITY_NAMES, totals[3:from_modalities], totals[from_modalities:]):
        if count:
            means[f"loss/{name}"] = total / count
    return means
