"""The cached forward equals the full-sequence forward (DESIGN §8: the full forward is the oracle)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from modus_mega.inference.kv_cache import CachedRequest, KVCache, Run, forward_over_cache, forward_over_caches
from modus_mega.model.init import init_weights
from modus_mega.model.inputs import TOKEN_TEXT, TOKEN_VAE, TOKEN_VIT, ModelInputs
from modus_mega.model.modus import ModusModel
from modus_mega.ops.attention_reference import ReferenceAttention
from modus_mega.ops.mask import lo_hi_for_layout


@dataclass
class Segment:
    """One run of a test sequence: causal text, or a full / noise image split (markers included)."""

    mode: str  # causal | full | noise
    kind: int  # token type of the split's inner tokens (TOKEN_VAE / TOKEN_VIT); TOKEN_TEXT for causal
    length: int  # tokens, markers included


SEQUENCE = [
    Segment("causal", TOKEN_TEXT, 5),  # <start:caption> + 4 caption tokens
    Segment("causal", TOKEN_TEXT, 1),  # <start:rgb>
    Segment("full", TOKEN_VAE, 6),  # clean VAE split: 2 x 2 latent patches
    Segment("full", TOKEN_VIT, 6),  # ViT split: 2 x 2 patches
    Segment("causal", TOKEN_TEXT, 1),  # <start:depth>
    Segment("noise", TOKEN_VAE, 6),  # the noisy target split
]


def _sequence(model: ModusModel, segments: list[Segment], seed: int = 0) -> tuple[ModelInputs, list[Run]]:
    """Random inputs of ``segments`` with BAGEL's position rule; the runs of their layout."""
    gen = torch.Generator().manual_seed(seed)
    cfg, vocab = model.cfg, model.vocab
    ids, types, positions, runs = [], [], [], []
    vit, vae, vit_patches, vae_tokens, timesteps = [], [], [], [], []
    patch_dim = cfg.vit.patch_size**2 * cfg.vit.num_channels
    position = 0
    for seg in segments:
        if seg.mode == "causal":
            ids += torch.randint(0, vocab.text.stop, (seg.length,), generator=gen).tolist()
            types += [TOKEN_TEXT] * seg.length
            positions += range(position, position + seg.length)
            position += seg.length
        else:
            inner = seg.length - 2
            ids += [vocab.vision_start_id] + [0] * inner + [vocab.vision_end_id]
            types += [TOKEN_TEXT] + [seg.kind] * inner + [TOKEN_TEXT]
            positions += [position] * seg.length
            position += seg.mode != "noise"
            if seg.kind == TOKEN_VIT:
                vit.append(inner)
                vit_patches.append(torch.randn(inner, patch_dim, generator=gen))
            else:
                vae.append(inner)
                vae_tokens.append(torch.randn(inner, cfg.patch_latent_dim, generator=gen))
                timesteps.append(torch.full((inner,), 0.7 if seg.mode == "noise" else 0.0))
        runs.append((seg.mode, seg.length))
    grid = torch.tensor([0, 1, cfg.vit.max_patches_per_side, cfg.vit.max_patches_per_side + 1])
    latent_grid = torch.tensor([0, 1, cfg.max_latent_size, cfg.max_latent_size + 1])
    lo, hi = lo_hi_for_layout([runs])
    inputs = ModelInputs(
        input_ids=torch.tensor(ids), token_type=torch.tensor(types), position_ids=torch.tensor(positions),
        attn_lo=lo, attn_hi=hi,
        vit_patches=torch.cat(vit_patches) if vit_patches else torch.zeros(0, patch_dim),
        vit_position_ids=grid.repeat(len(vit)),
        vit_cu_seqlens=torch.tensor([0, *torch.tensor(vit).cumsum(0).tolist()], dtype=torch.int32),
        vae_tokens=torch.cat(vae_tokens),
        vae_timesteps=torch.cat(timesteps),
        vae_position_ids=latent_grid.repeat(len(vae)),
    )  # fmt: skip
    return inputs, runs


def _slice(inputs: ModelInputs, start: int, stop: int) -> ModelInputs:
    """The tokens [start, stop) of ``inputs`` (whole image splits only)."""
    types = inputs.token_type

    def rows(kind: int) -> slice:
        before = int((types[:start] == kind).sum())
        return slice(before, before + int((types[start:stop] == kind).sum()))

    vit, vae = rows(TOKEN_VIT), rows(TOKEN_VAE)
    cu = inputs.vit_cu_seqlens
    inside = cu[(cu >= vit.start) & (cu <= vit.stop)] - vit.start
    return ModelInputs(
        input_ids=inputs.input_ids[start:stop], token_type=types[start:stop], position_ids=inputs.position_ids[start:stop],
        attn_lo=inputs.attn_lo[start:stop], attn_hi=inputs.attn_hi[start:stop],
        vit_patches=inputs.vit_patches[vit], vit_position_ids=inputs.vit_position_ids[vit],
        vit_cu_seqlens=inside.to(torch.int32) if vit.stop > vit.start else torch.zeros(1, dtype=torch.int32),
        vae_tokens=inputs.vae_tokens[vae], vae_timesteps=inputs.vae_timesteps[vae], vae_position_ids=inputs.vae_position_ids[vae],
    )  # fmt: skip


@pytest.fixture(scope="module")
def model() -> ModusModel:
    from modus_mega.config import load_config
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs" / "tiny.json")
    model = ModusModel(cfg.model)
    init_weights(model, 0, 0.2)  # a larger std than training's: outputs that depend strongly on the context
    return model.eval()


def _full(model: ModusModel, inputs: ModelInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at every causal token and velocities at every noisy 2D token, from one full forward."""
    ce = torch.nonzero(inputs.token_type == TOKEN_TEXT, as_tuple=True)[0]
    mse = torch.nonzero((inputs.token_type == TOKEN_VAE), as_tuple=True)[0]
    with torch.no_grad():
        return model(inputs, ce, mse, ReferenceAttention())


@pytest.mark.parametrize("chunking", ["one_at_a_time", "chunks"])
def test_cached_forward_equals_the_full_forward(model: ModusModel, chunking: str) -> None:
    inputs, runs = _sequence(model, SEQUENCE)
    full_logits, full_velocity = _full(model, inputs)
    text_rows = torch.nonzero(inputs.token_type == TOKEN_TEXT, as_tuple=True)[0].tolist()
    vae_rows = torch.nonzero(inputs.token_type == TOKEN_VAE, as_tuple=True)[0].tolist()

    cache, start, logits, velocity = KVCache(), 0, {}, {}
    pieces: list[tuple[int, Run]] = []
    for mode, length in runs:
        if mode == "causal" and chunking == "one_at_a_time":
            pieces += [(1, ("causal", 1))] * length
        else:
            pieces.append((length, (mode, length)))
    for length, run in pieces:
        new = _slice(inputs, start, start + length)
        ce = torch.nonzero(new.token_type == TOKEN_TEXT, as_tuple=True)[0]
        mse = torch.nonzero(new.token_type == TOKEN_VAE, as_tuple=True)[0]
        with torch.no_grad():
            out_l, out_v = forward_over_cache(model, ReferenceAttention(), cache, new, [run], ce, mse, write=run[0] != "noise")
        logits |= {start + int(i): row for i, row in zip(ce, out_l)}
        velocity |= {start + int(i): row for i, row in zip(mse, out_v)}
        start += length
    assert cache.num_tokens == inputs.token_type.numel() - SEQUENCE[-1].length  # the noisy split was never cached
    torch.testing.assert_close(torch.stack([logits[i] for i in text_rows]), full_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack([velocity[i] for i in vae_rows]), full_velocity, rtol=1e-5, atol=1e-5)


def test_a_noisy_split_never_touches_the_cache_or_later_tokens(model: ModusModel) -> None:
    """Run the noisy split twice with other noise: the cache is unchanged, and a token after it sees only the context."""
    context = SEQUENCE[:-1]
    inputs, runs = _sequence(model, context + [SEQUENCE[-1], Segment("causal", TOKEN_TEXT, 1)])
    n_context = sum(s.length for s in context)
    cache = KVCache()
    with torch.no_grad():
        forward_over_cache(model, ReferenceAttention(), cache, _slice(inputs, 0, n_context), runs[: len(context)],
                           torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), write=True)  # fmt: skip
    before = {layer: (k.clone(), v.clone()) for layer, (k, v) in cache.layers.items()}
    noisy = _slice(inputs, n_context, n_context + SEQUENCE[-1].length)
    mse = torch.nonzero(noisy.token_type == TOKEN_VAE, as_tuple=True)[0]
    outs = []
    for scale in (1.0, 5.0):
        noisy.vae_tokens = noisy.vae_tokens * scale
        with torch.no_grad():
            outs.append(forward_over_cache(model, ReferenceAttention(), cache, noisy, [runs[-2]], mse[:0], mse, write=False)[1])
    assert not torch.allclose(outs[0], outs[1])  # the split's own tokens do change its output
    assert cache.num_tokens == n_context and all(
        torch.equal(k, before[layer][0]) and torch.equal(v, before[layer][1]) for layer, (k, v) in cache.layers.items()
    )
    # A later token (the next segment's marker reuses the noisy split's position) sees the context only:
    # equal to the full forward of the sequence without the noisy split.
    last = _slice(inputs, inputs.token_type.numel() - 1, inputs.token_type.numel())
    with torch.no_grad():
        cached, _ = forward_over_cache(model, ReferenceAttention(), cache, last, [runs[-1]], torch.tensor([0]), mse[:0], write=True)
    without, _ = _sequence(model, context + [Segment("causal", TOKEN_TEXT, 1)])
    without.input_ids[-1], without.position_ids[-1] = last.input_ids[0], last.position_ids[0]
    full_logits, _ = _full(model, without)
    torch.testing.assert_close(cached[0], full_logits[-1], rtol=1e-5, atol=1e-5)


def test_a_noisy_split_cannot_be_written(model: ModusModel) -> None:
    inputs, runs = _sequence(model, SEQUENCE[-1:])
    with pytest.raises(ValueError, match="never written"):
        forward_over_cache(model, ReferenceAttention(), KVCache(), inputs, runs, torch.zeros(0, dtype=torch.long),
                           torch.zeros(0, dtype=torch.long), write=True)  # fmt: skip


def _request(inputs: ModelInputs, runs: list[Run], start: int, cache: KVCache, write: bool) -> CachedRequest:
    """The tokens of ``inputs`` from ``start`` on (the runs from that run on) as a request over ``cache``."""
    first = next(i for i in range(len(runs) + 1) if sum(n for _, n in runs[:i]) == start)
    new = _slice(inputs, start, inputs.token_type.numel())
    ce = torch.nonzero(new.token_type == TOKEN_TEXT, as_tuple=True)[0]
    mse = torch.nonzero(new.token_type == TOKEN_VAE, as_tuple=True)[0]
    return CachedRequest(cache, new, runs[first:], ce, mse, write)


def test_a_packed_batch_of_requests_equals_the_requests_run_one_by_one(model: ModusModel) -> None:
    """Two requests with contexts of different lengths: their prefill, a 1D step (one and two new tokens) and a
    2D flow step run packed in one forward equal the same requests run alone (fp32 summation order: 1e-5)."""
    context_a = SEQUENCE[:-1]  # 25 tokens
    context_b = [Segment("causal", TOKEN_TEXT, 3), Segment("full", TOKEN_VAE, 6), Segment("causal", TOKEN_TEXT, 1)]
    steps = {
        "1d": ([Segment("causal", TOKEN_TEXT, 1)], [Segment("causal", TOKEN_TEXT, 2)], True),
        "2d": ([Segment("noise", TOKEN_VAE, 6)], [Segment("noise", TOKEN_VAE, 6)], False),
    }
    alone = {"a": KVCache(), "b": KVCache()}
    packed = {"a": KVCache(), "b": KVCache()}
    sequences = {"a": _sequence(model, context_a, seed=1), "b": _sequence(model, context_b, seed=2)}
    with torch.no_grad():
        prefill_alone = [forward_over_caches(model, ReferenceAttention(), [_request(*sequences[n], 0, alone[n], True)])[0] for n in "ab"]
        prefill = forward_over_caches(model, ReferenceAttention(), [_request(*sequences[n], 0, packed[n], True) for n in "ab"])
    assert [logits.shape[0] for logits, _ in prefill] == [11, 6]  # every text-type token of each context
    for name, (logits, _), (expected, _) in zip("ab", prefill, prefill_alone):
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        assert packed[name].runs == alone[name].runs
        for layer, (k, v) in alone[name].layers.items():
            torch.testing.assert_close(packed[name].layers[layer][0], k, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(packed[name].layers[layer][1], v, rtol=1e-5, atol=1e-5)
    for family, (new_a, new_b, write) in steps.items():
        requests = {
            "a": _sequence(model, context_a + new_a, seed=3),
            "b": _sequence(model, context_b + new_b, seed=4),
        }
        starts = {"a": sum(s.length for s in context_a), "b": sum(s.length for s in context_b)}
        with torch.no_grad():
            one_by_one = [
                forward_over_caches(model, ReferenceAttention(), [_request(*requests[n], starts[n], alone[n].copy(), write)])[0]
                for n in "ab"
            ]  # fmt: skip
            together = forward_over_caches(
                model, ReferenceAttention(), [_request(*requests[n], starts[n], packed[n].copy(), write) for n in "ab"]
            )
        for (l1, v1), (l2, v2) in zip(one_by_one, together):
            assert l1.numel() + v1.numel() > 0, family
            torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v2, v1, rtol=1e-5, atol=1e-5)


def test_a_written_cache_cannot_appear_twice_in_one_packed_forward(model: ModusModel) -> None:
    inputs, runs = _sequence(model, SEQUENCE[:3])
    cache = KVCache()
    with pytest.raises(ValueError, match="copy"):
        forward_over_caches(model, ReferenceAttention(), [_request(inputs, runs, 0, cache, True), _request(inputs, runs, 0, cache, False)])
