"""The objective against hand-computed values, and its support: target tokens only."""

from __future__ import annotations

import math

import torch

from modus_mega.losses import LossTargets, loss_means, loss_sums, modus_loss
from modus_mega.modalities import MODALITY_ID
from modus_mega.model.init import init_weights
from modus_mega.model.modus import ModusModel
from tests.model.helpers import step_inputs


def test_ce_and_mse_equal_hand_computed_values() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = torch.tensor([0, 1])
    velocity = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]])
    target = torch.tensor([[0.0, 2.0], [1.0, 1.0], [3.0, 1.0]])
    caption, rgb = MODALITY_ID["caption"], MODALITY_ID["rgb"]

    def ce(row: list[float], label: int) -> float:
        return -row[label] + math.log(sum(math.exp(x) for x in row))

    ce_tokens = [ce([2.0, 0.0, -1.0], 0), ce([0.5, 0.5, 3.0], 1)]
    mse_tokens = [(1 + 0) / 2, (1 + 1) / 2, (0 + 4) / 2]
    # global counts larger than this micro-batch's: the sums are divided by the global counts
    targets = LossTargets(
        ce_index=torch.arange(2), ce_labels=labels, ce_modality=torch.tensor([caption, caption]),
        mse_index=torch.arange(2, 5), velocity_target=target, mse_modality=torch.tensor([rgb] * 3),
    )  # fmt: skip
    out = modus_loss(logits, velocity, targets, global_num_ce=4, global_num_mse=6, ce_weight=0.5, mse_weight=2.0)
    expected = 0.5 * sum(ce_tokens) / 4 + 2.0 * sum(mse_tokens) / 6
    assert math.isclose(float(out.loss), expected, rel_tol=1e-6)
    assert math.isclose(float(out.ce_sum), sum(ce_tokens), rel_tol=1e-6)
    assert math.isclose(float(out.mse_sum), sum(mse_tokens), rel_tol=1e-6)
    assert math.isclose(float(out.modality_sum[caption]), sum(ce_tokens), rel_tol=1e-6)
    assert out.modality_count[rgb] == 3 and out.modality_count[caption] == 2

    means = loss_means(loss_sums(out).tolist(), global_num_ce=4, global_num_mse=6)  # the logged values
    assert means.keys() == {"loss", "ce", "mse", "loss/caption", "loss/rgb"}
    assert math.isclose(means["loss"], expected, rel_tol=1e-6)
    assert math.isclose(means["ce"], sum(ce_tokens) / 4, rel_tol=1e-6)
    assert math.isclose(means["mse"], sum(mse_tokens) / 6, rel_tol=1e-6)
    assert math.isclose(means["loss/caption"], sum(ce_tokens) / 2, rel_tol=1e-6)
    assert math.isclose(means["loss/rgb"], sum(mse_tokens) / 3, rel_tol=1e-6)


def test_empty_terms_are_exactly_zero() -> None:
    none = torch.zeros(0, dtype=torch.long)
    targets = LossTargets(ce_index=none, ce_labels=none, ce_modality=none, mse_index=none,
                          velocity_target=torch.zeros(0, 4), mse_modality=none)  # fmt: skip
    out = modus_loss(torch.zeros(0, 5), torch.zeros(0, 4), targets, 0, 0)
    assert float(out.loss) == 0.0


def test_tokens_outside_the_target_get_zero_gradient(tiny_config) -> None:
    """d loss / d final hidden state is exactly zero at every non-target position."""
    model = ModusModel(tiny_config.model)
    init_weights(model, seed=3, std=0.1)
    batch = step_inputs(tiny_config, model.vocab, num_samples=6)
    assert batch.targets.ce_index.numel() and batch.targets.mse_index.numel(), "need both target families"
    ctx = model.build_context(batch.model)
    hidden = model.decode(model.embed(batch.model), ctx).detach().requires_grad_(True)
    logits, velocity = model.heads(hidden, batch.targets.ce_index, batch.targets.mse_index)
    out = modus_loss(
        logits, velocity + 0.1, batch.targets, *batch.targets.counts,
    )  # fmt: skip
    out.loss.backward()
    supervised = torch.zeros(hidden.shape[0], dtype=torch.bool)
    supervised[batch.targets.ce_index] = True
    supervised[batch.targets.mse_index] = True
    assert torch.all(hidden.grad[~supervised] == 0)
    assert torch.all(hidden.grad[supervised].abs().sum(dim=1) > 0)
