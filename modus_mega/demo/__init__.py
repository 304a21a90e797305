"""A browser demo of any-to-any generation: ``python -m modus_mega.demo --ckpt DIR`` (Gradio)."""
