"""The one key map between MODUS parameter names and BAGEL-7B-MoT's checkpoint names.

MODUS names are ``ModusModel``'s own (``layers.{i}.experts.{e}.q_proj.weight`` ...), and the
frozen VAE's tensors carry the ``vae.`` prefix followed by FLUX's own names. Expert 0 is
BAGEL's "und" weights (no suffix), expert 1 its ``*_moe_gen`` weights:

    MODUS                                        BAGEL (ema.safetensors)
    embed_tokens.weight                          language_model.model.embed_tokens.weight
    lm_head.weight                               language_model.lm_head.weight
    final_norms.{0|1}.weight                     language_model.model.norm{|_moe_gen}.weight
    layers.{i}.experts.{e}.{q,k,v,o}_proj.*      language_model.model.layers.{i}.self_attn.{q,k,v,o}_proj{sfx}.*
    layers.{i}.experts.{e}.{q,k}_norm.weight     language_model.model.layers.{i}.self_attn.{q,k}_norm{sfx}.weight
    layers.{i}.experts.{e}.{input_layernorm,post_attention_layernorm}.weight
                                                 language_model.model.layers.{i}.{same}{sfx}.weight
    layers.{i}.experts.{e}.mlp.{gate,up,down}_proj.weight
                                                 language_model.model.layers.{i}.mlp{sfx}.{gate,up,down}_proj.weight
    vit.{rest}                                   vit_model.vision_model.{rest}
    time_embedder, vae2llm, llm2vae, latent_pos_embed, connector, vit_pos_embed: the same names
    vae.{rest}                                   {rest} in ae.safetensors (FLUX's names)

The Hugging Face layout stores MODUS names unchanged. The vocabulary tensors
(``VOCAB_TENSORS``) have one row per token id; BAGEL's rows are the first
``text_vocab_size`` rows of ours (``modus_mega/vocab.py``), MODUS's new tokens follow.
"""

from __future__ import annotations

import re
from modus_mega.model.mot import EXPERT_1D, EXPERT_2D

VAE_PREFIX = "vae."  # MODUS name of a VAE tensor = VAE_PREFIX + its FLUX name
VOCAB_TENSORS = ("embed_tokens.weight", "lm_head.weight")  # [vocabulary rows, hidden]
BAGEL_LLM_PREFIX = "language_model."
BAGEL_VIT_PREFIX = "vit_model.vision_model."

# Placeholder patterns of the templates below; every template is matched in full.
_FIELDS = {
    "i": r"\d+",
    "proj": r"q_proj|k_proj|v_proj|o_proj",
    "qk_norm": r"q_norm|k_norm",
    "layernorm": r"input_layernorm|post_attention_layernorm",
    "mlp": r"gate_proj|up_proj|down_proj",
    "kind": r"weight|bias",
    "rest": r".+",
}
_EXPERT_SUFFIX = {EXPERT_1D: "", EXPERT_2D: "_moe_gen"}
# Modules whose names BAGEL and MODUS share verbatim.
_SHARED_MODULES = ("time_embedder", "vae2llm", "llm2vae", "latent_pos_embed", "connector", "vit_pos_embed")


def _compile(template: str) -> re.Pattern[str]:
    """A template such as ``layers.{i}.mlp`` as a full-match regex with named groups."""
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    regex = "".join(re.escape(part) if n % 2 == 0 else f"(?P<{part}>{_FIELDS[part]})" for n, part in enumerate(parts))
    return re.compile(regex)


class _Rule:
    """One name pattern on each side; the fields captured on one side fill the other."""

    def __init__(self, ours: str, bagel: str) -> None:
        self.ours, self.bagel = ours, bagel
        self._ours_re, self._bagel_re = _compile(ours), _compile(bagel)

    def to_bagel(self, name: str) -> str | None:
        match = self._ours_re.fullmatch(name)
        return self.bagel.format(**match.groupdict()) if match else None

    def to_ours(self, name: str) -> str | None:
        match = self._bagel_re.fullmatch(name)
        return self.ours.format(**match.groupdict()) if match else None


def _rules() -> tuple[_Rule, ...]:
    llm = BAGEL_LLM_PREFIX + "model."
    rules = [
        _Rule("embed_tokens.weight", llm + "embed_tokens.weight"),
        _Rule("lm_head.weight", BAGEL_LLM_PREFIX + "lm_head.weight"),
        _Rule("vit.{rest}", BAGEL_VIT_PREFIX + "{rest}"),
    ]
    for e, sfx in _EXPERT_SUFFIX.items():
        layer = llm + "layers.{i}."
        expert = "layers.{i}.experts.%d." % e
        rules += [
            _Rule(f"final_norms.{e}.weight", f"{llm}norm{sfx}.weight"),
            _Rule(expert + "{proj}.{kind}", layer + "self_attn.{proj}" + sfx + ".{kind}"),
            _Rule(expert + "{qk_norm}.weight", layer + "self_attn.{qk_norm}" + sfx + ".weight"),
            _Rule(expert + "{layernorm}.weight", layer + "{layernorm}" + sfx + ".weight"),
            _Rule(expert + "mlp.{mlp}.weight", layer + "mlp" + sfx + ".{mlp}.weight"),
        ]
    rules += [_Rule(module + ".{rest}", module + ".{rest}") for module in _SHARED_MODULES]
    return tuple(rules)


_RULES = _rules()


def ours_to_bagel(name: str) -> str:
    """BAGEL's ``ema.safetensors`` key of the MODUS parameter ``name`` (VAE tensors excluded)."""
    for rule in _RULES:
        mapped = rule.to_bagel(name)
        if mapped is not None:
            return mapped
    raise KeyError(
        f"MODUS tensor {name!r} has no BAGEL counterpart; the key map in modus_mega/convert/keymap.py "
        "covers the decoder, the ViT and the 2D in/out modules (VAE tensors go to ae.safetensors)"
    )


def bagel_to_ours(name: str) -> str:
    """The MODUS name of BAGEL's ``ema.safetensors`` key ``name``."""
    for rule in _RULES:
        mapped = rule.to_ours(name)
        if mapped is not None:
            return mapped
    raise KeyError(
        f"BAGEL tensor {name!r} has no MODUS counterpart; the key map in modus_mega/convert/keymap.py "
        "knows language_model.*, vit_model.vision_model.* and " + ", ".join(f"{m}.*" for m in _SHARED_MODULES)
    )


def is_vae_name(name: str) -> bool:
    """True for MODUS names of VAE tensors (``vae.`` + FLUX name)."""
    return name.startswith(VAE_PREFIX)
