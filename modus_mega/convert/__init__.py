"""Checkpoint interchange: BAGEL's release layout and the Hugging Face layout, in and out.

``keymap`` is the one name map MODUS <-> BAGEL; ``source`` reads any layout lazily as
named tensors and loads them into (sharded) modules; ``hf`` and ``bagel`` write and read
their layouts; ``text_model`` writes the 1D expert as a stock ``Qwen3ForCausalLM``;
``python -m modus_mega.convert --help`` is the command line.

Everything is imported from its module (``modus_mega.convert.hf.save_pretrained``); this
package imports nothing, so a command that needs one light module (``release``, which
``launch/pretrain.py`` checks a config with before importing the training stack) does not
pay for ``transformers``' modelling code. Training runs, in and out: ``run_init`` starts a
fresh run from ``init.bagel_dir`` at any tp x pp, ``deepspeed_run.DeepSpeedRunSource``
reads a run's latest checkpoint at any tp, pp and ZeRO stage (its EMA weights too).
"""
