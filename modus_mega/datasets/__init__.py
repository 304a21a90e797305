"""Offline dataset building: tools that write MODUS shards and train the 1D tokenizers' files.

- ``synth``: procedural 15-modality scenes (a numpy ray caster), for tests and CPU runs.
- ``build_shards`` + ``labelers``: shards from your own images with local pseudo-labelers.
- ``train_text``, ``train_vq``: a small caption tokenizer and the feature codebooks, from shards.

They run before training, never inside it: the runtime (``modus_mega.data``) never imports
this package, which may import the runtime's shard writer and reader.
"""
