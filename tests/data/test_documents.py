"""Documents and packed micro-batches keep the contract of DESIGN §3-5."""

from __future__ import annotations

import torch

from modus_mega.data.documents import IGNORE_LABEL, DocumentBuilder, TokenGeometry
from modus_mega.data.packing import Packer
from modus_mega.data.procedural import procedural_sample
from modus_mega.modalities import MODALITY_ID, MODALITY_NAMES
from modus_mega.model.inputs import TOKEN_TEXT, TOKEN_VAE, TOKEN_VIT
from modus_mega.ops.mask import dense_mask_from_layout, dense_mask_from_lo_hi
from modus_mega.vocab import build_vocabulary


def make_docs(cfg, count: int = 40, mode: str = "both"):
    cfg.data.condition_mode_2d = mode
    cfg.data.max_conditions = 2
    vocab = build_vocabulary(cfg.model.vocab)
    builder = DocumentBuilder(cfg.data, cfg.training.timesteps, cfg.model, vocab)
    docs = [builder.build(procedural_sample(i, cfg.data.image_size, 0), torch.Generator().manual_seed(i)) for i in range(count)]
    return vocab, docs


def runs(doc):
    """(mode, start, stop) of each attention run of a document."""
    start = 0
    for mode, length in doc.layout:
        yield mode, start, start + length
        start += length


def test_document_invariants(tiny_config) -> None:
    vocab, docs = make_docs(tiny_config)
    assert {d.target for d in docs} == {"caption", "rgb"}
    for doc in docs:
        n = len(doc)
        assert len(doc.token_type) == len(doc.position_ids) == len(doc.ce_labels) == len(doc.modality_ids) == n
        assert sum(length for _, length in doc.layout) == n
        assert doc.position_ids[0] == 0 and doc.input_ids[0] in vocab.start_markers
        # Segments open with their own start marker; the target's segment is last.
        markers = [i for i, t in enumerate(doc.input_ids) if t in vocab.start_markers and doc.token_type[i] == TOKEN_TEXT]
        names = [MODALITY_NAMES[doc.input_ids[i] - vocab.start_markers.start] for i in markers]
        assert names[-1] == doc.target and len(set(names)) == len(names)
        for i, name in zip(markers, names):
            assert doc.modality_ids[i] == MODALITY_ID[name]
        for mode, start, stop in runs(doc):
            positions = doc.position_ids[start:stop]
            if mode == "causal":
                assert all(doc.token_type[i] == TOKEN_TEXT for i in range(start, stop))
                if start > 0:  # after a clean split (a noisy one only ever ends the document)
                    assert positions[0] == doc.position_ids[start - 1] + 1
                assert positions == list(range(positions[0], positions[0] + len(positions)))
                continue
            # An image split: markers around same-type tokens, one shared position.
            assert doc.input_ids[start] == vocab.vision_start_id and doc.input_ids[stop - 1] == vocab.vision_end_id
            assert doc.token_type[start] == doc.token_type[stop - 1] == TOKEN_TEXT
            inner = set(doc.token_type[start + 1 : stop - 1])
            assert inner in ({TOKEN_VAE}, {TOKEN_VIT})
            assert len(set(positions)) == 1
            if mode == "noise":
                assert stop == n, "a noisy target split ends the document"
                assert inner == {TOKEN_VAE}
        # Flow times: the target's VAE split is noisy (t > 0); conditions are clean.
        noisy = [t for t in doc.vae_timesteps if t > 0]
        assert len(noisy) == (1 if doc.target == "rgb" else 0)
        # CE labels: the next token, only inside the 1D target, ending with <end_of_segment>.
        labelled = [i for i, label in enumerate(doc.ce_labels) if label != IGNORE_LABEL]
        if doc.target == "caption":
            assert labelled == list(range(markers[-1], n - 1))
            assert all(doc.ce_labels[i] == doc.input_ids[i + 1] for i in labelled)
            assert doc.input_ids[-1] == vocab.end_of_segment_id
        else:
            assert labelled == []


def test_condition_modes(tiny_config) -> None:
    for mode, allowed in (("vae", {TOKEN_TEXT, TOKEN_VAE}), ("vit", {TOKEN_TEXT, TOKEN_VIT})):
        _, docs = make_docs(tiny_config, mode=mode)
        for doc in docs:
            if doc.target == "caption":
                assert set(doc.token_type) <= allowed


def test_packing_lays_documents_back_to_back(tiny_config) -> None:
    vocab, docs = make_docs(tiny_config, count=30)
    g = TokenGeometry.of(tiny_config.model)
    budget = 2 * max(len(d) for d in docs)
    packer = Packer(budget, g.vit_patch, g.vit_max_side, g.vae_cell, tiny_config.model.max_latent_size)
    batches = list(packer.pack(iter(docs)))
    assert sum(b.num_documents for b in batches) == len(docs)
    assert sum(b.num_real_tokens for b in batches) == sum(len(d) for d in docs)
    for batch in batches:
        assert batch.model.input_ids.numel() == budget
        assert (batch.model.token_type == TOKEN_VAE).sum() == batch.model.vae_timesteps.numel() == batch.model.vae_position_ids.numel()
        assert (batch.model.token_type == TOKEN_VIT).sum() == batch.model.vit_patches.shape[0] == int(batch.model.vit_cu_seqlens[-1])
        assert batch.vae_grid.prod(dim=1).sum() == batch.model.vae_timesteps.numel()
    efficiency = sum(b.num_real_tokens for b in batches[:-1]) / (budget * max(1, len(batches) - 1))
    assert efficiency > 0.8


def test_packed_mask_is_the_dense_rule_with_private_padding(tiny_config) -> None:
    _, docs = make_docs(tiny_config, count=5)
    g = TokenGeometry.of(tiny_config.model)
    budget = sum(len(d) for d in docs) + 7
    batch = Packer(budget, g.vit_patch, g.vit_max_side, g.vae_cell, tiny_config.model.max_latent_size).collate(docs)
    expected = torch.eye(budget, dtype=torch.bool)
    real = batch.num_real_tokens
    expected[:real, :real] = dense_mask_from_layout([d.layout for d in docs])
    assert torch.equal(dense_mask_from_lo_hi(batch.model.attn_lo, batch.model.attn_hi), expected)


def test_overlong_documents_are_dropped_and_counted(tiny_config) -> None:
    _, docs = make_docs(tiny_config, count=10)
    g = TokenGeometry.of(tiny_config.model)
    budget = sorted(len(d) for d in docs)[5]
    packer = Packer(budget, g.vit_patch, g.vit_max_side, g.vae_cell, tiny_config.model.max_latent_size)
    batches = list(packer.pack(iter(docs)))
    too_long = sum(len(d) > budget for d in docs)
    assert packer.dropped["longer_than_token_budget"] == too_long > 0
    assert sum(b.num_documents for b in batches) == len(docs) - too_long


def test_target_weights_and_condition_dropout(tiny_config) -> None:
    tiny_config.data.target_weights = {"caption": 3.0, "rgb": 1.0}
    tiny_config.data.condition_dropout = 0.5
    vocab, docs = make_docs(tiny_config, count=400)
    caption_share = sum(d.target == "caption" for d in docs) / len(docs)
    assert 0.68 < caption_share < 0.82  # expected 0.75
    segments = [sum(1 for t in d.input_ids if t in vocab.start_markers) for d in docs]
    unconditional = sum(n == 1 for n in segments) / len(docs)
    # dropout 0.5, plus a third of the rest drawing zero of two possible conditions: about 0.67
    assert 0.58 < unconditional < 0.76
