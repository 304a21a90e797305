"""A request's generated targets written as files a person can open, plus one contact sheet.

Per target modality ``m`` in the request's output directory:

- 2D maps: ``m.png`` in the modality's own rendering (``render_for_people``: depth colour-mapped,
  labels in their palette, edges white on black, ...); depth also as ``depth.ply``, a point
  cloud through a pinhole camera of ``DEFAULT_FOV_DEGREES`` horizontal field of view
  (``inference/pictures.py``) whose per-image normalised log-depth is read back with the
  nominal range ``DEPTH_RANGE_M`` (generated depth has no metric scale), coloured by the rgb
  (generated, else the condition) when there is one; pixels at the far end (+1: sky and
  invalid pixels, and the farthest valid depth, which the per-image normalisation maps there
  too) are left out;
- captions: ``m.txt``;
- detection / grounding: ``m.png``, the boxes drawn on the generated rgb (else the rgb
  condition, else the first 2D condition, else a grey canvas), and ``m.json`` with the boxes
  in pixels;
- global features: ``m.npy`` [D], decoded by the modality's VQ decoder;
- local features: ``m.npy`` [gh, gw, D] and ``m.png``, their first three principal components.

1D ids are decoded through ``ModalityTokenizers.decode`` (boxes in pixels of the generated
size, features through the VQ decoder). ``contact_sheet.png`` holds one row per request:
the conditions, the generated targets, and the ground truth where it is known (the tile
labels say which). The same ``picture`` view serves all three, so a condition and a
generated target of one modality look alike.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from modus_mega.data.documents import Sample
from modus_mega.inference.generator import GeneratedTarget
from modus_mega.inference.pictures import DEFAULT_FOV_DEGREES, contact_sheet, draw_boxes, pca_picture, write_point_cloud
from modus_mega.modalities import modality, render_for_people
from modus_mega.modalities.pictures import image_to_depth
from modus_mega.modalities.values import Detections, Groundings, Payload
from modus_mega.tokenizers import ModalityTokenizers
from modus_mega.tokenizers.vq import FeatureQuantizer
from modus_mega.vocab import Vocabulary

DEPTH_RANGE_M = (1.0, 10.0)  # (near, far) metres given to a generated depth map for its point cloud
_FAR_END = 0.999  # depth images at or above this are the far end (sky / invalid), left out of the cloud
_BACKDROPS = ("rgb",)  # 2D modalities preferred as the canvas of boxes, in order
_POINT_CLOUDS = ("depth",)  # 2D modalities also written as a .ply point cloud
SheetRow = list[tuple[str, np.ndarray]]  # one request's labelled pictures on a contact sheet, uint8 [H, W, 3] each


@dataclass
class Request:
    """One generation request and what is known about it."""

    conditions: Sample  # the condition values (2D images [3, H, W] in [-1, 1], 1D ids)
    order: list[str]  # condition names in the order they enter the context
    targets: list[str]  # target names in generation order
    expressions: dict[str, list[int]] = field(default_factory=dict)  # grounding target -> expression ids
    truth: Sample | None = None  # ground truth of the targets, when known (held-out scenes)


@dataclass
class OutputContext:
    """What decoding and drawing a request's ids and images needs."""

    tokenizers: ModalityTokenizers | None  # text, boxes; None: such ids are shown undecoded
    size: tuple[int, int]  # (H, W) pixels of the generated images (boxes refer to it)
    feature_grid: tuple[int, int]  # (gh, gw) of local features
    fov_degrees: float = DEFAULT_FOV_DEGREES
    vocab: Vocabulary | None = None  # with ``quantizers``: decodes feature ids without a text tokenizer
    quantizers: dict[str, FeatureQuantizer] = field(default_factory=dict)  # feature modality -> its VQ decoder


def decode_ids(name: str, ids: list[int], ctx: OutputContext) -> Payload | None:
    """The payload of 1D modality ``name``'s ids (text, pixel boxes, feature vectors); None without its decoder.

    Features decode through their quantizer (the VQ decoder), text and boxes through the tokenizers.
    """
    grid = ctx.feature_grid if modality(name).kind == "feature_local" else None
    if name in ctx.quantizers and ctx.vocab is not None:
        return ctx.quantizers[name].detokenize(ids, ctx.vocab, grid)
    if ctx.tokenizers is None:
        return None
    height, width = ctx.size
    return ctx.tokenizers.decode(name, ids, width=width, height=height, grid=grid)


def text_tile(text: str, size: int = 160) -> np.ndarray:
    """uint8 [size, size, 3]: ``text`` wrapped in black on white (captions on a contact sheet)."""
    tile = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(tile)
    lines = textwrap.wrap(text, width=max(8, size // 7)) or [""]
    draw.multiline_text((4, 4), "\n".join(lines[: size // 12]), fill=(0, 0, 0), font=ImageFont.load_default())
    return np.asarray(tile)


def backdrop(images: dict[str, np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3]: the picture boxes are drawn on; ``images`` maps 2D names to model images [3, H, W]."""
    for name in [*_BACKDROPS, *images]:
        if name in images:
            return render_for_people(name, images[name])
    return np.full((*size, 3), 128, np.uint8)


def picture(name: str, image: np.ndarray | None, payload: Payload | None, canvas: np.ndarray) -> np.ndarray:
    """uint8 [h, w, 3] view of one modality's value: a 2D model ``image`` [3, H, W] or a 1D ``payload``.

    ``canvas`` [H, W, 3] carries boxes. A 1D value that could not be decoded (no tokenizer)
    is a tile saying so.
    """
    row = modality(name)
    if row.family == "2d":
        assert image is not None
        return render_for_people(name, image)
    if payload is None:
        return text_tile(f"{name}: no tokenizer to decode it")
    if isinstance(payload, Detections):
        return draw_boxes(canvas, payload.boxes, payload.classes)
    if isinstance(payload, Groundings):
        return draw_boxes(canvas, payload.boxes, payload.expressions)
    if isinstance(payload, list):
        return text_tile(" / ".join(payload))
    if row.kind == "feature_local":
        return pca_picture(payload)
    return text_tile(f"{name}: {payload.shape[-1]}-d feature, |f| = {float(np.linalg.norm(payload)):.3g}")


def _images_of(sample: Sample) -> dict[str, np.ndarray]:
    return {name: image.float().numpy() for name, image in sample.images.items()}


def write_request(out_dir: Path, request: Request, targets: list[GeneratedTarget], ctx: OutputContext) -> SheetRow:
    """Write ``targets`` of ``request`` into ``out_dir`` (see the module docstring); returns its contact-sheet row."""
    out_dir.mkdir(parents=True, exist_ok=True)
    conditions = _images_of(request.conditions)
    generated = {t.name: t.image.float().numpy() for t in targets if t.image is not None}
    canvas = backdrop({**conditions, **generated}, ctx.size)  # a generated rgb replaces the condition's
    row = [(f"cond {name}", _view(name, request.conditions, canvas, ctx)) for name in request.order]
    for target in targets:
        image = generated.get(target.name)
        payload = decode_ids(target.name, target.ids, ctx) if target.ids is not None else None
        view = picture(target.name, image, payload, canvas)
        _write_target(out_dir, target.name, image, payload, view, generated.get("rgb", conditions.get("rgb")), ctx)
        row.append((f"gen {target.name}", view))
    if request.truth is not None:
        truth_canvas = backdrop(_images_of(request.truth), ctx.size)
        known = [n for n in request.targets if n in request.truth.available()]
        row += [(f"truth {name}", _view(name, request.truth, truth_canvas, ctx)) for name in known]
    return row


def _view(name: str, sample: Sample, canvas: np.ndarray, ctx: OutputContext) -> np.ndarray:
    """The picture of modality ``name`` as ``sample`` holds it (a condition or a ground truth)."""
    if modality(name).family == "2d":
        return picture(name, sample.images[name].float().numpy(), None, canvas)
    return picture(name, None, decode_ids(name, sample.tokens[name], ctx), canvas)


def _write_target(
    out_dir: Path, name: str, image: np.ndarray | None, payload: Payload | None, view: np.ndarray,
    rgb: np.ndarray | None, ctx: OutputContext,
) -> None:  # fmt: skip
    """The files of one generated target (the module docstring lists them)."""
    kind = modality(name).kind
    if image is not None or isinstance(payload, (Detections, Groundings)) or (kind == "feature_local" and payload is not None):
        Image.fromarray(_readable(view, ctx.size)).save(out_dir / f"{name}.png")
    if name in _POINT_CLOUDS and image is not None:
        depth = np.where(image.mean(0) < _FAR_END, image_to_depth(image, *DEPTH_RANGE_M), 0.0)  # [H, W], 0 = left out
        colours = render_for_people("rgb", rgb) if rgb is not None else None
        write_point_cloud(out_dir / f"{name}.ply", depth, colours, ctx.fov_degrees)
    if isinstance(payload, list):
        (out_dir / f"{name}.txt").write_text("\n".join(payload) + "\n")
    elif isinstance(payload, Detections):
        _write_json(out_dir / f"{name}.json", {"boxes": payload.boxes.tolist(), "classes": payload.classes})
    elif isinstance(payload, Groundings):
        _write_json(out_dir / f"{name}.json", {"boxes": payload.boxes.tolist(), "expressions": payload.expressions})
    elif isinstance(payload, np.ndarray):
        np.save(out_dir / f"{name}.npy", payload)


def _readable(view: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A small view (a local-feature grid) enlarged with nearest neighbours to the generated size."""
    if view.shape[0] >= size[0]:
        return view
    return np.asarray(Image.fromarray(view).resize((size[1], size[0]), Image.Resampling.NEAREST))


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1) + "\n")


def write_contact_sheet(path: Path, rows: list[SheetRow]) -> Path:
    """Write the contact sheet of ``rows`` (one per request) as a PNG at ``path``; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(contact_sheet(rows)).save(path)
    return path
