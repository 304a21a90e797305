"""Caption tokenizer: a Hugging Face tokenizer from a local directory, in the text id range.

The text range of the extended vocabulary is ``[0, text_vocab_size)``, the pretrained
vocabulary itself, so text ids pass through unchanged; this wrapper checks that every id the
tokenizer can emit fits in the range, adds no special tokens (the document builder wraps
segments in ``<start:caption>`` ... ``end_of_segment``), and never touches the network.

``train_tiny_text_tokenizer`` trains a byte-level BPE (the Qwen2 scheme, so any string
encodes without an unknown token) for tests and CPU runs, e.g. on the synthetic captions.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from modus_mega.vocab import Vocabulary

_BYTE_ALPHABET = 256  # byte-level BPE starts from one token per byte


class TextTokenizer:
    """Text <-> ids in ``vocab.text`` through a local Hugging Face tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab: Vocabulary, source: str = "<memory>") -> None:
        if len(tokenizer) > len(vocab.text):
            raise ValueError(
                f"text tokenizer {source} has {len(tokenizer)} tokens but model.vocab.text_vocab_size is "
                f"{len(vocab.text)}; raise text_vocab_size or use a smaller tokenizer"
            )
        self.tokenizer = tokenizer
        self.vocab = vocab

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], vocab: Vocabulary) -> TextTokenizer:
        """Load the tokenizer files in directory ``path`` (no hub download is ever attempted)."""
        directory = Path(path)
        if not directory.is_dir():
            raise ValueError(
                f"text tokenizer directory {directory} does not exist; point it at a checkpoint's tokenizer "
                "files or create one with modus_mega.tokenizers.text.train_tiny_text_tokenizer"
            )
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        return cls(tokenizer, vocab, source=str(directory))

    def __len__(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added), all inside ``vocab.text``."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; raises ValueError if an id lies outside the text range."""
        bad = [i for i in ids if i not in self.vocab.text]
        if bad:
            raise ValueError(f"ids {bad[:8]} lie outside the text range [0, {self.vocab.text.stop})")
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def train_tiny_text_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike[str]) -> Path:
    """Train a byte-level BPE of ``vocab_size`` tokens on ``texts`` and save it to ``out_dir``.

    Deterministic for the same texts. The saved directory loads with
    ``TextTokenizer.from_pretrained`` (``tokenizer.json`` + ``tokenizer_config.json``).
    """
    if vocab_size < _BYTE_ALPHABET:
        raise ValueError(f"a byte-level BPE needs vocab_size >= {_BYTE_ALPHABET}, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(str(out))
    return out
