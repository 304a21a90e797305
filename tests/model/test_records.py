"""The micro-batch records: declared once (``model/inputs.py``), moved and flattened by their fields."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import pytest
import torch

from modus_mega.data.documents import IGNORE_LABEL
from modus_mega.losses import LossTargets
from modus_mega.model.inputs import ModelInputs, map_tensors, record_from_tensors, record_tensors
from modus_mega.parallel.pipeline import stage_micro_batch
from modus_mega.vocab import build_vocabulary
from tests.model.helpers import packed_batch, step_inputs


@pytest.fixture
def step(tiny_config):
    return step_inputs(tiny_config, build_vocabulary(tiny_config.model.vocab), num_samples=6)


def _same(a, b) -> bool:
    return type(a) is type(b) and all(torch.equal(getattr(a, f.name), getattr(b, f.name)) for f in fields(a))


def test_both_records_round_trip_through_their_tensors(step) -> None:
    for record in (step.model, step.targets):
        tensors = record_tensors(record)
        assert len(tensors) == len(fields(record))
        assert _same(record_from_tensors(type(record), tensors), record)


def test_a_wrong_number_of_tensors_is_refused_naming_the_fields(step) -> None:
    with pytest.raises(ValueError, match=r"5 tensors for LossTargets's 6 fields .*'ce_index'"):
        record_from_tensors(LossTargets, record_tensors(step.targets)[:5])


def test_a_field_added_to_a_record_travels_through_the_pipeline_unchanged(step) -> None:
    """What DeepSpeed loads on the first and last stage follows the records' fields, nothing else."""

    @dataclass
    class WithDepthHint(ModelInputs):
        depth_hint: torch.Tensor  # a made-up new model input

    hint = torch.arange(step.model.token_type.numel())
    extended = WithDepthHint(**{f.name: getattr(step.model, f.name) for f in fields(ModelInputs)}, depth_hint=hint)
    inputs, labels = stage_micro_batch(replace(step, model=extended))
    assert _same(record_from_tensors(WithDepthHint, inputs), extended)
    assert _same(record_from_tensors(LossTargets, labels), step.targets)  # positions included


def test_prepare_passes_the_packers_inputs_through_and_makes_only_the_2d_tokens(tiny_config, step) -> None:
    batch = packed_batch(tiny_config, build_vocabulary(tiny_config.model.vocab), num_samples=6)
    assert batch.model.vae_tokens.numel() == 0  # images until the VAE encodes them
    for f in fields(ModelInputs):
        if f.name != "vae_tokens":
            assert torch.equal(getattr(step.model, f.name), getattr(batch.model, f.name)), f.name
    assert step.model.vae_tokens.shape == (step.model.vae_timesteps.numel(), tiny_config.model.patch_latent_dim)
    assert torch.equal(step.targets.ce_index, torch.nonzero(batch.ce_labels != IGNORE_LABEL, as_tuple=True)[0])


def test_moving_a_packed_batch_moves_every_tensor_and_keeps_its_counts(tiny_config) -> None:
    batch = packed_batch(tiny_config, build_vocabulary(tiny_config.model.vocab))
    moved = map_tensors(batch.to("meta"), lambda t: t)
    assert all(t.is_meta for t in record_tensors(moved.model))
    assert moved.ce_labels.is_meta and moved.vae_images.is_meta and moved.vae_grid.is_meta
    assert (moved.num_real_tokens, moved.num_documents) == (batch.num_real_tokens, batch.num_documents)
