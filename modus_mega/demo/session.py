"""One loaded checkpoint serving the browser demo's requests, with no Gradio in sight.

A ``DemoSession`` reads the checkpoint once (``generate/checkpoint.py``) and turns each
``DemoRequest`` (the form's fields) into the same calls as ``python -m modus_mega.generate``:
the conditions are read and the targets checked by ``generate/requests.py`` before the model
runs, and the outputs are written by ``inference/outputs.py`` into a fresh directory, then
zipped for download. The uploaded picture is the condition of the 2D modality the visitor
names (rgb by default). An rgb picture is centre-cropped and resized to the generation size
(resizing colours is harmless, and a visitor's photo is rarely the right size); any other
modality's file is read exactly as the command line reads it (its codec: a 16-bit depth PNG,
a label map), so it must already be the generation size. Every refusal is a ``ValueError``
whose message the page shows.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from modus_mega.generate.checkpoint import CheckpointFiles, load, load_tokenizers, locate
from modus_mega.generate.requests import check_targets, read_conditions
from modus_mega.inference.generator import Generator, Settings
from modus_mega.inference.guidance import GuidanceConfig
from modus_mega.inference.outputs import OutputContext, Request, write_request
from modus_mega.modalities import image_modalities, render_for_people
from modus_mega.ops.attention import get_attention_backend

IMAGE_CONDITION = "picture"  # the form's condition choice for the uploaded picture
FITTED = "rgb"  # the picture modality that is cropped and resized to the generation size
TEXT_CONDITION = "caption"  # the modality the typed text is
CONDITIONS = (IMAGE_CONDITION, TEXT_CONDITION)  # the conditions the form offers
REQUEST_FILE = "request.json"  # the request's settings, written next to its outputs
CONDITION_PREFIX = "condition_"  # file name prefix of a condition's picture in the output directory
ARCHIVE = "outputs.zip"  # every output file of a request, for download


@dataclass
class DemoRequest:
    """The form's fields: what to generate from what."""

    image: Path | None  # uploaded picture (rgb: any size and PIL format); None: none given
    caption: str  # typed caption ("" : none)
    conditions: list[str]  # which of CONDITIONS to condition on
    targets: list[str]  # modalities to generate, in order
    steps: int = 8  # flow steps per 2D target
    guidance: float = 1.0  # classifier-free guidance scale (1: none)
    seed: int = 0
    chain: bool = False  # each finished target becomes a condition of the next
    expression: str = ""  # referring expression of a grounding target
    image_modality: str = FITTED  # the 2D modality the picture is


@dataclass
class DemoResult:
    """Where a request's outputs are, and what the page shows of them."""

    out_dir: Path
    pictures: list[tuple[Path, str]]  # (png, label) per condition and per target with a picture
    texts: dict[str, str] = field(default_factory=dict)  # 1D target -> its decoded text (captions)
    archive: Path | None = None  # the zip of every output file


class DemoSession:
    """A checkpoint loaded once, generating each request into its own directory."""

    def __init__(self, ckpt: Path, ema: bool = False, size: int = 64, device: str = "cpu") -> None:
        self.files: CheckpointFiles = locate(ckpt, ema)
        self.size = (size, size)
        self.tokenizers, self.quantizers = load_tokenizers(self.files)
        device_ = torch.device(device)
        model, vae = load(self.files, device_)
        llm = self.files.model.llm
        attention = get_attention_backend(self.files.model.attention_backend, device_, head_dim=llm.head_dim, dtype=torch.float32)
        self.generator = Generator(model, vae, attention, self.files.data, self.quantizers)  # type: ignore[arg-type]

    def generate(self, request: DemoRequest, out_dir: Path) -> DemoResult:
        """Check ``request``, generate its targets and write every output into ``out_dir``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        specs = self._condition_specs(request, out_dir)
        conditions, order = read_conditions(specs, self.size, self.tokenizers)
        expression = request.expression.strip() or None
        check_targets(request.targets, self.tokenizers is not None, self.quantizers, self.files.has_vae, order, expression)
        if request.steps < 1:
            raise ValueError(f"steps is {request.steps}; use at least 1 flow step")
        settings = Settings(
            image_size=self.size, steps=int(request.steps), guidance=GuidanceConfig(scales=(float(request.guidance),)),
            chain=request.chain, seed=int(request.seed),
        )  # fmt: skip
        expressions = {}
        if expression and self.tokenizers is not None:
            expressions = {n: self.tokenizers.text.encode(expression) for n in request.targets if n == "grounding"}
        generation = self.generator.generate(conditions, order, request.targets, settings, expressions)
        ctx = OutputContext(self.tokenizers, self.size, settings.feature_grid)
        write_request(out_dir, Request(conditions, order, request.targets, expressions), generation.targets, ctx)
        (out_dir / REQUEST_FILE).write_text(json.dumps(asdict(request), indent=1, default=str) + "\n")
        pictures = [(_condition_png(out_dir, n, conditions.images[n]), f"condition {n}") for n in order if n in conditions.images]
        pictures += [(out_dir / f"{n}.png", n) for n in request.targets if (out_dir / f"{n}.png").is_file()]
        texts = {n: (out_dir / f"{n}.txt").read_text().strip() for n in request.targets if (out_dir / f"{n}.txt").is_file()}
        return DemoResult(out_dir, pictures, texts, _zip(out_dir))

    def _condition_specs(self, request: DemoRequest, out_dir: Path) -> list[str]:
        """The ``NAME=VALUE`` conditions of ``request`` (the uploaded picture saved at the generation size)."""
        unknown = [c for c in request.conditions if c not in CONDITIONS]
        if unknown:
            raise ValueError(f"condition {unknown[0]!r} is not offered here; choose among {', '.join(CONDITIONS)}")
        specs = []
        if IMAGE_CONDITION in request.conditions:
            name = request.image_modality
            if name not in image_modalities():
                raise ValueError(f"the picture's modality {name!r} is not a 2D modality; choose among {', '.join(image_modalities())}")
            if request.image is None:
                raise ValueError(f"the {IMAGE_CONDITION} condition is ticked but no image was given; upload or pick one")
            path = request.image
            if name == FITTED:
                path = out_dir / f"{CONDITION_PREFIX}{name}.png"  # a generated rgb.png must not replace it
                _fit(request.image, self.size).save(path)
            specs.append(f"{name}={path}")
        if TEXT_CONDITION in request.conditions:
            if not request.caption.strip():
                raise ValueError(f"the {TEXT_CONDITION} condition is ticked but the caption is empty; type one")
            specs.append(f"{TEXT_CONDITION}={request.caption.strip()}")
        return specs


def _condition_png(out_dir: Path, name: str, image: torch.Tensor) -> Path:
    """The rendering for people of 2D condition ``name`` (model image [3, H, W]) as a PNG in ``out_dir``."""
    path = out_dir / f"{CONDITION_PREFIX}{name}.png"
    Image.fromarray(render_for_people(name, image.float().numpy())).save(path)
    return path


def _fit(path: Path, size: tuple[int, int]) -> Image.Image:
    """The picture at ``path`` as RGB, centre-cropped to the aspect of ``size`` (H, W) and resized to it."""
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"the uploaded file {Path(path).name} is not a readable image ({e}); upload a PNG or JPEG") from None
    image = image.convert("RGB")
    height, width = size
    scale = min(image.width / width, image.height / height)
    crop_w, crop_h = round(width * scale), round(height * scale)
    left, top = (image.width - crop_w) // 2, (image.height - crop_h) // 2
    return image.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.Resampling.BICUBIC)


def _zip(out_dir: Path) -> Path:
    """Zip every file of ``out_dir`` (PNGs, point cloud, JSON, text) into ``out_dir/ARCHIVE``."""
    archive = out_dir / ARCHIVE
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(out_dir.iterdir()):
            if path.is_file() and path.name != ARCHIVE:
                zf.write(path, path.name)
    return archive
