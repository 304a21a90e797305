"""MODUS as a ``transformers`` model: ``AutoConfig`` / ``AutoModel`` support.

Importing this package registers ``ModusHFConfig`` (``model_type = "modus"``) and
``ModusHFModel`` with ``AutoConfig`` and ``AutoModel``, after which
``AutoModel.from_pretrained(dir)`` loads a directory that ``python -m modus_mega.convert
to-hf`` (or ``save_pretrained``) wrote::

    import modus_mega.hf  # registers the Auto classes
    model = transformers.AutoModel.from_pretrained("ckpt/hf")

Registration happens here, not in ``modus_mega/__init__.py``, so ``import modus_mega``
stays cheap (no ``transformers`` import); ``modus_mega.convert`` imports this package for
the config class, so loading any converter registers the classes too.
"""

from transformers import AutoConfig, AutoModel

from modus_mega.hf.config import MODEL_TYPE, ModusHFConfig
from modus_mega.hf.modeling import ModusHFModel

AutoConfig.register(MODEL_TYPE, ModusHFConfig, exist_ok=True)
AutoModel.register(ModusHFConfig, ModusHFModel, exist_ok=True)

__all__ = ["ModusHFConfig", "ModusHFModel"]
