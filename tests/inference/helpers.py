"""The tiny random model the generation tests share."""

from __future__ import annotations

from modus_mega.config import load_config
from modus_mega.encoders.vae import FluxAutoEncoder
from modus_mega.inference.generator import Generator
from modus_mega.model.init import init_weights
from modus_mega.model.modus import ModusModel
from modus_mega.ops.attention_reference import ReferenceAttention
from modus_mega.tokenizers.vq import FeatureQuantizer
from tests.conftest import REPO


def tiny_generator(quantizers: dict[str, FeatureQuantizer] | None = None) -> Generator:
    """A ``Generator`` over configs/tiny.json with weights drawn at std 0.05 (seed 0), in eval mode."""
    cfg = load_config(REPO / "configs" / "tiny.json")
    model = ModusModel(cfg.model)
    init_weights(model, 0, 0.05)
    vae = FluxAutoEncoder(cfg.model.vae)
    init_weights(vae, 0, 0.05, prefix="vae.")
    return Generator(model.eval(), vae.eval(), ReferenceAttention(), cfg.data, quantizers or {})
