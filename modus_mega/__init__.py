"""modus_mega: trains MODUS, one any-to-any mixture-of-transformers over 15 modalities."""

import logging

__version__ = "0.1.0"

# torchao (FP8) is imported by transformers as soon as it is installed, and at import it logs that
# its CUDA kernels do not load on a CPU machine and that torch deprecates one of its registrations:
# harmless, and four lines before every command's output. Its real errors still show.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)
