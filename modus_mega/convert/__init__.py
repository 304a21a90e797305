"""Checkpoint interchange: BAGEL's release layout and the Hugging Face layout, in and out.

``keymap`` is the one name map MODUS <-> BAGEL; ``source`` reads any layout lazily as
named tensors and loads them into (sharded) modules; ``hf`` and ``bagel`` write and read
their layouts; ``text_model`` writes the 1D expert as a stock ``Qwen3ForCausalLM``;
``python -m modus_mega.convert --help`` is the command line.

Training runs, in and out (imported from their modules, not from here: they need the
training stack, DeepSpeed and Megatron, which inference does not): ``run_init`` starts a
fresh run from ``init.bagel_dir`` at any tp x pp, ``deepspeed_run.DeepSpeedRunSource``
reads a run's latest checkpoint at any tp, pp and ZeRO stage (its EMA weights too).
"""

from modus_mega.convert.bagel import (
    BagelSource,
    bagel_model_config,
    check_bagel_config,
    import_bagel,
    load_bagel_into,
    save_bagel,
    write_bagel,
)
from modus_mega.convert.hf import load_pretrained, open_hf, read_hf_config, save_pretrained, write_hf
from modus_mega.convert.keymap import bagel_to_ours, ours_to_bagel
from modus_mega.convert.source import (
    ModuleSource,
    SafetensorsSource,
    TensorSource,
    VocabRowsSource,
    extend_vocab_rows,
    load_into,
)
from modus_mega.convert.text_model import write_text_model

__all__ = [
    "BagelSource",
    "ModuleSource",
    "SafetensorsSource",
    "TensorSource",
    "VocabRowsSource",
    "bagel_model_config",
    "bagel_to_ours",
    "check_bagel_config",
    "extend_vocab_rows",
    "import_bagel",
    "load_bagel_into",
    "load_into",
    "load_pretrained",
    "open_hf",
    "ours_to_bagel",
    "read_hf_config",
    "save_bagel",
    "save_pretrained",
    "write_bagel",
    "write_hf",
    "write_text_model",
]
