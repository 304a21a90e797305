"""``ModusHFModel``: a ``transformers`` ``PreTrainedModel`` that wraps ``ModusModel``.

The wrapper adds no computation: ``forward`` is ``ModusModel.forward``. Its tensor names
are the checkpoint's own (``convert/hf.py``): ``ModusModel``'s state-dict names, and the
frozen VAE's under ``vae.`` when ``config.has_vae``. To keep those names, the wrapper
builds one ``ModusModel`` and registers that model's submodules as its own children
instead of nesting the model under a prefix; the ``ModusModel`` object (``.modus``) and the
wrapper share every parameter, and every ``nn.Module`` operation (``to``, loading,
casting) reaches both, since it acts on the shared submodules.

Weights: a checkpoint sets every tensor, and ``from_pretrained`` refuses one that lacks a
tensor or holds an extra one (``transformers`` would only warn and leave the tensor
uninitialised), as ``load_pretrained`` does. A freshly built wrapper keeps the weights of
the modules' constructors; the project's seeded initialisation is ``model/init.py``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from transformers import PreTrainedModel

from modus_mega.encoders.vae import FluxAutoEncoder
from modus_mega.hf.config import ModusHFConfig
from modus_mega.model.inputs import ModelInputs
from modus_mega.model.modus import ModusModel

_STRICT = ("missing_keys", "unexpected_keys", "mismatched_keys")  # loading-info entries that refuse a checkpoint


class ModusHFModel(PreTrainedModel):
    """MODUS for ``AutoModel.from_pretrained`` / ``save_pretrained``; ``forward`` is ``ModusModel``'s."""

    config_class = ModusHFConfig
    main_input_name = "inputs"
    _tied_weights_keys = {"lm_head.weight": "embed_tokens.weight"}  # used only when config.tie_word_embeddings
    _no_split_modules = ["MoTLayer"]  # a layer's two experts and shared attention stay on one device

    def __init__(self, config: ModusHFConfig) -> None:
        super().__init__(config)
        model = ModusModel(config.model_config())
        for name, child in model.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_modus", model)  # a plain attribute: its submodules are registered above
        self.vae = FluxAutoEncoder(model.cfg.vae) if config.has_vae else None
        self.post_init()

    @property
    def modus(self) -> ModusModel:
        """The wrapped model, sharing every parameter with this wrapper."""
        return self._modus

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """``transformers``' loader, strict: a missing, extra or mis-shaped tensor raises ValueError.

        Returns what ``PreTrainedModel.from_pretrained`` returns for the same arguments.
        """
        with_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = {kind: sorted(map(str, info[kind]))[:8] for kind in _STRICT if info.get(kind)}
        if problems:
            raise ValueError(
                f"refusing checkpoint {args[0] if args else kwargs.get('pretrained_model_name_or_path')}: {problems} "
                "(up to 8 names each); the checkpoint and its config.json disagree: export it again with "
                "`python -m modus_mega.convert to-hf`"
            )
        return (model, info) if with_info else model

    def _init_weights(self, module: nn.Module) -> None:
        """Leave constructor weights as they are (the module docstring says why)."""

    def forward(self, inputs: ModelInputs, ce_index: Tensor, mse_index: Tensor) -> tuple[Tensor, Tensor]:
        """``ModusModel.forward``: logits [N_ce, V] and velocities [N_mse, P] on one packed micro-batch."""
        return self.modus(inputs, ce_index, mse_index)
