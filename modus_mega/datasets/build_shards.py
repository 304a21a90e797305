"""Build MODUS shards from a folder of real images, with pseudo-labels from local models.

    python -m modus_mega.datasets.build_shards --images DIR --out DIR [--weights-dir W]
        [--labelers depth,normal,seg,sam,detection,dinov2,clip,caption] [--image-size 512]

Every readable image (jpg, jpeg, png, webp, found recursively, sorted by path) is resized so
its shorter side is ``--image-size`` and centre-cropped to a square; the sample stores it as
``rgb`` plus ``canny`` (OpenCV, always), and whatever the requested labelers produce from
the models in ``W/{labeler}`` (``labelers.py``). Image ``i`` of the sorted list gets the key
``{i:09d}`` and goes to shard ``i // samples_per_shard``, so the output does not depend on
``--workers``. An undecodable image is skipped and counted; a labeler whose weights
directory is missing is skipped and counted for every sample (a directory that exists but
does not load is an error, raised before any image is read). The run ends with a table of
per-modality counts and skip reasons, also stored in ``index.json`` under ``generator``.

Output: ``OUT/index.json``, ``OUT/{prefix}-{shard:06d}.tar`` (shards left empty by skipped
images are not written) and ``OUT/sources.tsv`` (key, image path relative to ``--images``).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import queue
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from modus_mega.cli import add_debug_argument, run_cli
from modus_mega.datasets.labelers import (
    DERIVED_FROM,
    LABELER_MODALITIES,
    LABELER_NAMES,
    WEIGHTLESS_LABELERS,
    Labeler,
    LabelerOptions,
    build_labeler,
)
from modus_mega.data.shard_format import shard_name
from modus_mega.data.shard_writer import encode_modality, write_index, write_shard
from modus_mega.modalities.faults import SkipReason
from modus_mega.modalities.values import Payload

PROG = "python -m modus_mega.datasets.build_shards"
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp")
CANNY_THRESHOLDS: tuple[int, int] = (100, 200)  # cv2.Canny hysteresis thresholds, as in synth.py
SOURCES_FILENAME = "sources.tsv"
ALWAYS_WRITTEN: tuple[str, ...] = ("rgb", "canny")
ShardPlan = tuple[int, list[tuple[int, Path]]]  # (shard index, [(image index, image path)])

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildConfig:
    """Everything that decides the bytes written (besides the images and the models)."""

    image_size: int = 512  # side of the square samples, pixels
    samples_per_shard: int = 256  # images per shard before skipping
    batch_size: int = 16  # images per labeler call
    rgb_format: str = "jpg"  # how rgb is stored: jpg (quality 95) or png
    prefix: str = "images"  # shard names: {prefix}-{shard:06d}.tar
    labelers: tuple[str, ...] = LABELER_NAMES  # labelers to run, in LABELER_NAMES order
    weights: dict[str, Path | None] = field(default_factory=dict)  # labeler -> its weights directory
    options: LabelerOptions = field(default_factory=LabelerOptions)  # model settings


@dataclass
class BuildStats:
    """Counts of a build: images, and per modality the samples written and skipped by reason."""

    images_found: int = 0
    images_written: int = 0
    image_skips: Counter[str] = field(default_factory=Counter)  # reason -> images
    written: Counter[str] = field(default_factory=Counter)  # modality -> samples holding it
    skipped: dict[str, Counter[str]] = field(default_factory=dict)  # modality -> reason -> samples

    def skip(self, modality: str, reason: str, count: int = 1) -> None:
        """Count ``count`` samples that lack ``modality`` because of ``reason``."""
        self.skipped.setdefault(modality, Counter())[reason] += count

    def merge(self, other: BuildStats) -> None:
        """Add ``other``'s counts (from another worker)."""
        self.images_found += other.images_found
        self.images_written += other.images_written
        self.image_skips.update(other.image_skips)
        self.written.update(other.written)
        for modality, reasons in other.skipped.items():
            self.skipped.setdefault(modality, Counter()).update(reasons)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot (stored in index.json)."""
        return {
            "images_found": self.images_found,
            "images_written": self.images_written,
            "image_skips": dict(sorted(self.image_skips.items())),
            "written": dict(self.written),
            "skipped": {m: dict(sorted(r.items())) for m, r in self.skipped.items()},
        }

    def summary(self, modalities: Sequence[str]) -> str:
        """A table: images found / written / skipped, then per modality written, skipped, why."""
        skips = ", ".join(f"{k}={v}" for k, v in sorted(self.image_skips.items())) or "none"
        lines = [
            f"images: {self.images_found} found, {self.images_written} written, "
            f"{sum(self.image_skips.values())} skipped ({skips})",
            f"{'modality':<17}{'written':>8}{'skipped':>8}  reasons",
        ]
        for name in modalities:
            reasons = self.skipped.get(name, Counter())
            why = "; ".join(f"{r} ({n})" for r, n in sorted(reasons.items()))
            lines.append(f"{name:<17}{self.written[name]:>8}{sum(reasons.values()):>8}  {why}".rstrip())
        return "\n".join(lines)


class ImageError(ValueError):
    """An image file that cannot be used as a sample."""


def find_images(root: str | os.PathLike[str]) -> list[Path]:
    """Image files under ``root`` (recursive, by suffix, case-insensitive), sorted by path."""
    base = Path(root)
    if not base.is_dir():
        raise ValueError(f"--images {base} is not a directory")
    return sorted(p for p in base.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_square_image(path: Path, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: the image upright (EXIF), shorter side resized to ``size``, centre-cropped.

    Area interpolation when shrinking (no aliasing), bicubic when enlarging. Raises
    ``ImageError`` for a file that does not decode completely.
    """
    try:
        with Image.open(path) as image:
            image.load()  # raises on truncated data
            rgb = np.asarray(ImageOps.exif_transpose(image).convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"{path}: cannot decode image ({err})") from None
    height, width = rgb.shape[:2]
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    resized = cv2.resize(rgb, (new_w, new_h), interpolation=interpolation)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.ascontiguousarray(resized[top : top + size, left : left + size])


def canny_edges(rgb: np.ndarray) -> np.ndarray:
    """bool [H, W]: OpenCV Canny of the grey image with ``CANNY_THRESHOLDS``."""
    return cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), *CANNY_THRESHOLDS) > 0


def encode_sample(values: dict[str, Payload], rgb_format: str) -> dict[str, bytes]:
    """Shard files of one sample; depth is float32 ``.npy`` metres (0 = invalid), the rest as shard_writer writes it."""
    files: dict[str, bytes] = {}
    for name, value in values.items():
        files.update(encode_modality(name, value, image_format=rgb_format, float_maps_as_npy=True))
    return files


def sample_key(index: int) -> str:
    """The webdataset key of image ``index`` of the sorted image list."""
    return f"{index:09d}"


class ShardBuilder:
    """Labels images and writes shards; one per process (it holds the loaded models)."""

    def __init__(self, config: BuildConfig) -> None:
        """Load every available labeler; record why each unavailable one is skipped.

        Raises ``ValueError`` for a weights directory that exists but does not load.
        """
        self.config = config
        self.labelers: list[Labeler] = []
        self.unavailable: dict[str, str] = {}  # labeler -> reason its modalities are skipped
        for name in LABELER_NAMES:
            if name not in config.labelers:
                continue
            weights = config.weights.get(name)
            if name in DERIVED_FROM and DERIVED_FROM[name] in self.unavailable:
                self.unavailable[name] = f"{DERIVED_FROM[name]} unavailable"
            elif name in WEIGHTLESS_LABELERS:
                self.labelers.append(build_labeler(name, None, config.options))
            elif weights is None:
                self.unavailable[name] = "no weights directory (pass --weights-dir or --weights NAME=DIR)"
            elif not weights.is_dir():
                self.unavailable[name] = f"weights directory {weights} not found"
            else:
                self.labelers.append(build_labeler(name, weights, config.options))

    def provenance(self) -> dict[str, Any]:
        """How the labels were made (for index.json)."""
        return {
            "labelers": {labeler.name: labeler.provenance() for labeler in self.labelers},
            "unavailable": dict(self.unavailable),
        }

    def label_batch(self, images: list[np.ndarray], stats: BuildStats) -> list[dict[str, Payload]]:
        """All modality values of a batch of square rgb images, counting what is skipped and why."""
        samples: list[dict[str, Payload]] = [{"rgb": image, "canny": canny_edges(image)} for image in images]
        for name, reason in self.unavailable.items():
            for modality in LABELER_MODALITIES[name]:
                stats.skip(modality, reason, len(images))
        for labeler in self.labelers:
            ready = [i for i, sample in enumerate(samples) if labeler.source in sample]
            if len(ready) < len(samples):
                for modality in labeler.modalities:
                    stats.skip(modality, f"no {labeler.source}", len(samples) - len(ready))
            if not ready:
                continue
            inputs = [samples[i][labeler.source] for i in ready]
            assert all(isinstance(x, np.ndarray) for x in inputs)
            for i, labels in zip(ready, labeler(inputs)):  # type: ignore[arg-type]
                samples[i].update(labels.values)
                for modality, reason in labels.skipped.items():
                    stats.skip(modality, reason)
        for sample in samples:
            stats.written.update(sample.keys())
        return samples

    def shard_samples(
        self,
        image_root: Path,
        items: Sequence[tuple[int, Path]],
        stats: BuildStats,
        sources: list[tuple[str, str]],
        progress: Callable[[int], Any],
    ) -> Iterator[tuple[str, dict[str, bytes]]]:
        """``(key, files)`` of the readable images among ``items`` ((index, path) pairs), batch by batch.

        Appends ``(key, path relative to image_root)`` to ``sources``; calls ``progress(n)``
        after each batch of n images.
        """
        size, batch_size = self.config.image_size, self.config.batch_size
        for start in range(0, len(items), batch_size):
            keys, images = [], []
            for index, path in items[start : start + batch_size]:
                stats.images_found += 1
                try:
                    images.append(load_square_image(path, size))
                except ImageError as err:
                    logger.warning("skipped image (%s): %s", SkipReason.UNDECODABLE.value, err)
                    stats.image_skips[SkipReason.UNDECODABLE.value] += 1
                    continue
                keys.append(sample_key(index))
                sources.append((keys[-1], path.relative_to(image_root).as_posix()))
            if images:
                for key, values in zip(keys, self.label_batch(images, stats)):
                    stats.images_written += 1
                    yield key, encode_sample(values, self.config.rgb_format)
            progress(len(items[start : start + batch_size]))

    def write_shards(
        self, image_root: Path, out: Path, shards: Sequence[ShardPlan], progress: Callable[[int], Any]
    ) -> tuple[BuildStats, dict[str, int], list[tuple[str, str]]]:
        """Write the planned shards into ``out``; returns stats, samples per shard file, sources."""
        stats, counts, sources = BuildStats(), {}, []
        for shard_index, items in shards:
            path = out / shard_name(self.config.prefix, shard_index)
            count = write_shard(path, self.shard_samples(image_root, items, stats, sources, progress))
            if count:
                counts[path.name] = count
            else:  # every image of this shard was unreadable: an empty shard would only fail readers
                path.unlink()
        return stats, counts, sources


def _worker(
    config: BuildConfig,
    image_root: str,
    out: str,
    shards: list[ShardPlan],
    worker: int,
    workers: int,
    updates: Any,  # a Manager queue of image counts, for the progress bar
) -> tuple[BuildStats, dict[str, int], list[tuple[str, str]], dict[str, Any]]:
    """One worker process: its own models, a round-robin share of the shards."""
    cv2.setNumThreads(1)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    options = config.options
    if options.device == "cuda" and torch.cuda.device_count() > 1:  # spread the workers over the GPUs
        options = replace(options, device=f"cuda:{worker % torch.cuda.device_count()}")
        config = replace(config, options=options)
    builder = ShardBuilder(config)
    stats, counts, sources = builder.write_shards(Path(image_root), Path(out), shards, updates.put)
    return stats, counts, sources, builder.provenance()


def build_dataset(
    images: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: BuildConfig,
    workers: int = 1,
    progress: bool = True,
) -> tuple[BuildStats, list[str]]:
    """Label every image under ``images`` into shards + ``index.json`` + ``sources.tsv`` in ``out``.

    Returns the counts and the modality names the summary lists. Raises ``ValueError`` for bad
    arguments (with the fix) and for a weights directory that exists but does not load.
    """
    if config.image_size < 8 or config.samples_per_shard < 1 or config.batch_size < 1 or workers < 1:
        raise ValueError(
            f"need image_size >= 8, samples_per_shard >= 1, batch_size >= 1, workers >= 1; got "
            f"{config.image_size}, {config.samples_per_shard}, {config.batch_size}, {workers}"
        )
    unknown = [n for n in config.labelers if n not in LABELER_NAMES]
    if unknown:
        raise ValueError(f"unknown labelers {unknown}; choose from {', '.join(LABELER_NAMES)}")
    for name, source in DERIVED_FROM.items():
        if name in config.labelers and source not in config.labelers:
            raise ValueError(f"the {name} labeler is derived from {source}: add {source} to --labelers")
    image_root = Path(images)
    paths = find_images(image_root)
    if not paths:
        raise ValueError(f"no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images under {image_root}")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    step = config.samples_per_shard
    indexed = list(enumerate(paths))
    shards = [(s, indexed[start : start + step]) for s, start in enumerate(range(0, len(paths), step))]
    workers = min(workers, len(shards))
    stats, counts, sources = BuildStats(), {}, []
    with tqdm(total=len(paths), unit="image", desc=f"build_shards -> {root}", disable=not progress) as bar:
        if workers == 1:
            builder = ShardBuilder(config)
            stats, counts, sources = builder.write_shards(image_root, root, shards, bar.update)
            provenance = builder.provenance()
        else:
            # spawn, not fork: forking a process whose threads (torch, tokenizers) hold locks deadlocks.
            context = multiprocessing.get_context("spawn")
            with context.Manager() as manager, ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                updates = manager.Queue()
                futures = [
                    pool.submit(_worker, config, str(image_root), str(root), shards[w::workers], w, workers, updates)
                    for w in range(workers)
                ]
                pending = set(futures)
                while pending:
                    _, pending = wait(pending, timeout=0.2)
                    _drain(updates, bar)
                _drain(updates, bar)
                for future in futures:
                    part_stats, part_counts, part_sources, provenance = future.result()
                    stats.merge(part_stats)
                    counts.update(part_counts)
                    sources.extend(part_sources)
    labelled = [m for name in LABELER_NAMES if name in config.labelers for m in LABELER_MODALITIES[name]]
    modalities = [*ALWAYS_WRITTEN, *labelled]
    generator = {
        "name": "modus_mega.datasets.build_shards",
        "images": str(image_root.resolve()),
        "image_size": config.image_size,
        "canny_thresholds": list(CANNY_THRESHOLDS),
        **provenance,
        "counts": stats.as_dict(),
    }
    (root / SOURCES_FILENAME).write_text("".join(f"{key}\t{path}\n" for key, path in sorted(sources)))
    write_index(root, sorted(counts.items()), extra={"generator": generator})
    return stats, modalities


def _drain(updates: Any, bar: tqdm) -> None:
    while True:
        try:
            bar.update(updates.get_nowait())
        except queue.Empty:
            return


def _parse_weights(pairs: Sequence[str], weights_dir: str | None, names: Sequence[str]) -> dict[str, Path | None]:
    """Weights directory per labeler: ``--weights NAME=DIR`` overrides ``--weights-dir``/NAME."""
    weights: dict[str, Path | None] = {n: (Path(weights_dir) / n if weights_dir else None) for n in names}
    with_weights = [n for n in LABELER_NAMES if n not in WEIGHTLESS_LABELERS]
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or name not in with_weights:
            raise ValueError(f"--weights {pair!r}: expected NAME=DIR with NAME one of {', '.join(with_weights)}")
        weights[name] = Path(path)
    return weights


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry: ``python -m modus_mega.datasets.build_shards --images DIR --out DIR``; a user error is
    one line and exit status 2 (``modus_mega/cli.py``)."""
    return run_cli(_main, argv, prog=PROG)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Turn a folder of images into MODUS webdataset shards: rgb + Canny, plus pseudo-labels "
        "from local model directories (missing ones are skipped and counted).",
    )
    add = parser.add_argument
    add("--images", required=True, help="folder of jpg/jpeg/png/webp images (searched recursively)")
    add("--out", required=True, help="output directory for the .tar shards, index.json and sources.tsv")
    add("--labelers", default=",".join(LABELER_NAMES),
        help=f"comma-separated labelers to run (default: all of {','.join(LABELER_NAMES)}); normal needs depth")
    add("--weights-dir", help="directory with one model directory per labeler, named after it (W/depth, W/seg, ...)")
    add("--weights", action="append", default=[], metavar="NAME=DIR",
        help="model directory of one labeler, overriding --weights-dir (repeatable)")
    add("--image-size", type=int, default=512,
        help="side of the square samples: shorter side resized, centre crop (default 512)")
    add("--samples-per-shard", type=int, default=256, help="images per .tar shard (default 256)")
    add("--batch-size", type=int, default=16, help="images per model call (default 16)")
    add("--workers", type=int, default=1, help="processes, each with its own models (default 1)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device for the models (default cuda if available; workers spread over the GPUs)")
    add("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="model dtype (default float32)")
    add("--rgb-format", choices=("jpg", "png"), default="jpg", help="storage of rgb (default jpg)")
    add("--prefix", default="images", help="shard name prefix: PREFIX-000000.tar (default images)")
    add("--depth-kind", choices=("auto", "metric", "relative"), default="auto",
        help="whether the depth model outputs metres or relative disparity (default: from its config)")
    add("--relative-depth-range", type=float, nargs=2, default=(1.0, 50.0), metavar=("NEAR", "FAR"),
        help="metres a relative depth map is pinned to (default 1 50)")
    add("--fov", type=float, default=60.0,
        help="assumed horizontal field of view in degrees, for normals from depth (default 60)")
    add("--detection-threshold", type=float, default=0.5, help="minimum detection score (default 0.5)")
    add("--caption-max-tokens", type=int, default=30, help="caption length limit in tokens (default 30)")
    add("--sam-points-per-side", type=int, default=32, help="SAM prompt grid side (default 32)")
    add("--quiet", action="store_true", help="no progress bar")
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    names = tuple(n.strip() for n in args.labelers.split(",") if n.strip())
    unknown = [n for n in names if n not in LABELER_NAMES]
    if unknown:
        raise ValueError(f"--labelers: unknown {unknown}; choose from {', '.join(LABELER_NAMES)}")
    options = LabelerOptions(
        device=args.device,
        dtype=getattr(torch, args.dtype),
        depth_kind=args.depth_kind,
        relative_depth_range=tuple(args.relative_depth_range),
        fov_degrees=args.fov,
        detection_threshold=args.detection_threshold,
        caption_max_new_tokens=args.caption_max_tokens,
        sam_points_per_side=args.sam_points_per_side,
    )
    config = BuildConfig(
        image_size=args.image_size,
        samples_per_shard=args.samples_per_shard,
        batch_size=args.batch_size,
        rgb_format=args.rgb_format,
        prefix=args.prefix,
        labelers=tuple(n for n in LABELER_NAMES if n in names),
        weights=_parse_weights(args.weights, args.weights_dir, names),
        options=options,
    )
    stats, modalities = build_dataset(args.images, args.out, config, args.workers, progress=not args.quiet)
    print(stats.summary(modalities))
    print(f"index: {Path(args.out) / 'index.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
