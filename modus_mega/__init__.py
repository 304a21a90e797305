"""modus_mega: trains MODUS, one any-to-any mixture-of-transformers over 15 modalities."""

__version__ = "0.1.0"
