"""Checkpoint interchange: BAGEL's release layout and the Hugging Face layout, in and out.

``keymap`` is the one name map MODUS <-> BAGEL; ``source`` reads any layout lazily as
named tensors and loads them into (sharded) modules; ``hf`` and ``bagel`` write and read
their layouts; ``python -m modus_mega.convert --help`` is the command line.
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
]
