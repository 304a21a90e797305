"""The Gradio page of the demo: a form, a generate button, the rendered outputs and a download.

The page is a thin skin over ``DemoSession``: its one event, ``/generate`` (also the HTTP API
name ``gradio_client`` calls), maps the form to a ``DemoRequest`` and the result to the
outputs. A refused request (``ValueError``) becomes the status message with empty outputs,
so a bad input never breaks the page or the API.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from modus_mega.demo.examples import Example
from modus_mega.demo.session import CONDITIONS, FITTED, DemoRequest, DemoSession
from modus_mega.modalities import image_modalities, modality_names

API_NAME = "generate"  # the event's name in the HTTP API (/generate)
TITLE = "MODUS: any-to-any generation"
DEFAULT_TARGETS = ["depth", "caption"]


def build_app(session: DemoSession, examples: list[Example], out_root: Path) -> gr.Blocks:
    """The page for ``session``; each request writes its outputs into a fresh directory under ``out_root``."""
    out_root.mkdir(parents=True, exist_ok=True)

    def generate(
        image: str | None, caption: str, conditions: list[str], targets: list[str], steps: float, guidance: float,
        seed: float, chain: bool, expression: str, image_modality: str,
    ) -> tuple[list[tuple[str, str]], str, str | None, str]:  # fmt: skip
        """Gallery (png, label) pairs, 1D texts, the zip, and the status message of one form submission."""
        request = DemoRequest(
            Path(image) if image else None, caption or "", list(conditions or []), list(targets or []),
            int(steps), float(guidance), int(seed), bool(chain), expression or "", image_modality or FITTED,
        )  # fmt: skip
        try:
            result = session.generate(request, Path(tempfile.mkdtemp(prefix="request_", dir=out_root)))
        except ValueError as e:
            return [], "", None, f"**Cannot generate:** {e}"
        gallery = [(str(path), label) for path, label in result.pictures]
        texts = "\n".join(f"{name}: {text}" for name, text in result.texts.items())
        archive = str(result.archive) if result.archive else None
        return gallery, texts, archive, f"Generated {', '.join(request.targets)}."

    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(f"# {TITLE}\nUpload or pick a picture and/or type a caption, tick the conditions and targets, generate.")
        with gr.Row():
            with gr.Column():
                # a File, not an Image: gr.Image decodes uploads itself (to 8-bit RGB, and fails on a broken file
                # before the handler can answer); the picture is shown in the gallery as its condition
                image = gr.File(label="picture", file_types=["image", ".npy"], type="filepath")
                image_modality = gr.Dropdown(list(image_modalities()), value=FITTED,
                                             label="the picture is (rgb is fitted to the size; others must match it)")
                caption = gr.Textbox(label="caption")
                conditions = gr.CheckboxGroup(list(CONDITIONS), value=[CONDITIONS[0]], label="condition modalities")
                targets = gr.CheckboxGroup(list(modality_names()), value=DEFAULT_TARGETS, label="targets (generated in this order)")
                with gr.Row():
                    steps = gr.Slider(1, 50, value=8, step=1, label="flow steps")
                    guidance = gr.Number(1.0, label="guidance scale (1: none)")
                    seed = gr.Number(0, precision=0, label="seed")
                chain = gr.Checkbox(False, label="chained: each finished target conditions the next")
                expression = gr.Textbox(label="referring expression (grounding target)")
                button = gr.Button("Generate", variant="primary")
            with gr.Column():
                status = gr.Markdown()
                gallery = gr.Gallery(label="outputs", format="png", columns=3)
                texts = gr.Textbox(label="generated text", lines=3)
                download = gr.File(label="download (PNGs, .ply point cloud, JSON)")
        if examples:
            gr.Examples([[str(e.image), e.caption] for e in examples], [image, caption], label="synthetic scenes")
        inputs: list[Any] = [image, caption, conditions, targets, steps, guidance, seed, chain, expression, image_modality]
        button.click(generate, inputs, [gallery, texts, download, status], api_name=API_NAME)
    return app
