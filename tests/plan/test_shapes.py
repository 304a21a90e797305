"""Parameter placement: totals equal the model builds, tp shards equal an independent formula."""

from __future__ import annotations

import pytest

from modus_mega.config import ModusConfig
from modus_mega.model.params import count_parameters
from modus_mega.plan.shapes import ModelShape, ParamCounts, _classify, model_shape


def _sincos_tables(cfg: ModusConfig) -> int:
    """Frozen 2D sin-cos tables: latent and ViT position tables at LLM width."""
    model = cfg.model
    return (model.max_latent_size**2 + model.vit.max_patches_per_side**2) * model.llm.hidden_size


def test_totals_equal_the_model_build(tiny_config: ModusConfig) -> None:
    shape = model_shape(tiny_config.model)
    count = count_parameters(tiny_config.model)
    total = shape.total()
    assert total.trainable(1) + total.frozen(1) == count.llm_total + count.vision + count.generation_io
    assert total.frozen(1) == _sincos_tables(tiny_config)
    assert shape.vae == count.vae


def test_7b_totals_equal_the_model_build(config_7b: ModusConfig, shape_7b: ModelShape) -> None:
    count = count_parameters(config_7b.model)
    total = shape_7b.total()
    assert total.trainable(1) + total.frozen(1) == count.llm_total + count.vision + count.generation_io
    assert shape_7b.vae == count.vae
    assert shape_7b.expert_linear_weights * config_7b.model.llm.num_layers < count.per_expert


@pytest.mark.parametrize("tp", [1, 2])
def test_tp_shard_equals_independent_formula(tiny_config: ModusConfig, tp: int) -> None:
    cfg = tiny_config.model
    llm = cfg.llm
    d, h, hkv, dh, inner = llm.hidden_size, llm.num_heads, llm.num_kv_heads, llm.head_dim, llm.intermediate_size
    # One expert of one layer, written out from the Qwen2 layer definition.
    split = d * h * dh + h * dh + 2 * (d * hkv * dh + hkv * dh) + h * dh * d + 3 * d * inner
    whole = 2 * d + 2 * dh  # input / post-attention norms, q_norm / k_norm
    count = count_parameters(cfg)
    vocab_tables = count.embedding + count.lm_head
    towers = count.vision + count.generation_io - _sincos_tables(tiny_config)  # replicated, trainable
    expected = llm.num_layers * 2 * (split // tp + whole) + vocab_tables // tp + 2 * d + towers
    assert model_shape(cfg).total().trainable(tp) == expected


@pytest.mark.parametrize("pp", [1, 2])
def test_stages_partition_the_model(tiny_config: ModusConfig, pp: int) -> None:
    shape = model_shape(tiny_config.model)
    stages = [shape.stage(s, pp) for s in range(pp)]
    assert sum(stages, ParamCounts()) == shape.total()
    assert stages[0].sharded_trainable >= shape.embedding_weight
    assert [shape.vae_params(s) for s in range(pp)] == [shape.vae] * pp  # every rank encodes its micro-batches


def test_frozen_1d_expert_is_counted_frozen(tiny_config: ModusConfig) -> None:
    free = model_shape(tiny_config.model).total()
    tiny_config.model.llm.freeze_1d_expert = True
    frozen = model_shape(tiny_config.model).total()
    moved = frozen.frozen(1) - free.frozen(1)
    assert moved > 0 and free.trainable(1) - frozen.trainable(1) == moved
    assert moved == count_parameters(tiny_config.model).per_expert - tiny_config.model.llm.hidden_size  # minus final norm


def test_unknown_parameter_is_an_error() -> None:
    with pytest.raises(ValueError, match="modus_mega/plan/shapes.py"):
        _classify("adapter.weight")


@pytest.mark.parametrize("pp", [1, 2])
@pytest.mark.parametrize("freeze_1d_expert", [False, True])
def test_stage_tensors_add_up_to_the_stage_counts(tiny_config: ModusConfig, pp: int, freeze_1d_expert: bool) -> None:
    tiny_config.model.llm.freeze_1d_expert = freeze_1d_expert
    tiny_config.model.llm.tie_word_embeddings = pp == 2  # the tied copy on the last stage
    shape = model_shape(tiny_config.model)
    for stage in range(pp):
        tensors, counts = shape.stage_tensors(stage, pp), shape.stage(stage, pp)
        for tp in (1, 2):
            assert sum(t.local_numel(tp) for t in tensors if t.trainable) == counts.trainable(tp)
            assert sum(t.local_numel(tp) for t in tensors if not t.trainable) == counts.frozen(tp)
        assert sum(t.trainable for t in tensors) == counts.trainable_tensors
