"""The MODUS shard format: names, versions, the decoded sample types and the skip counter.

One sample is one key with one file per modality, ``{key}.{file_key}.{format}`` (for example
``000000042.rgb.jpg``, ``000000042.det.json``); any subset of the modalities may be present;
file keys and formats are columns of the modality table (``modus_mega/modalities``).
``docs/DATA.md`` is the specification; ``shard_reader.py`` reads it, ``shard_writer.py``
writes it, and both share the definitions here.

Shapes: H, W image height and width in pixels.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modus_mega import modalities
from modus_mega.modalities import image_modalities, modality_names
from modus_mega.modalities.codecs import MaskCodec
from modus_mega.modalities.faults import SkipReason
from modus_mega.modalities.values import Payload

logger = logging.getLogger(__name__)

FORMAT_NAME = "modus-webdataset"
FORMAT_VERSION = 1
INDEX_FILENAME = "index.json"
DEPTH_VALID_KEY = "depth_valid"  # optional per-pixel validity mask of `depth`
DEPTH_VALID_CODEC = MaskCodec()


def shard_name(prefix: str, index: int) -> str:
    """The file name of shard ``index`` of a dataset: ``{prefix}-{index:06d}.tar``."""
    return f"{prefix}-{index:06d}.tar"


def file_keys() -> dict[str, str]:
    """Modality name -> the file key its files are stored under (``detection`` -> ``det``)."""
    return {m.name: m.file_key for m in modalities.MODALITIES}  # the table as it is now (tests may extend it)


# ----------------------------------------------------------------------------- skip counting


@dataclass
class SkipCounter:
    """Counts of good samples, skipped samples by reason, ignored files and failed shards.

    One counter per reader (per worker); ``merge`` combines them for the log.
    """

    samples_ok: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # SkipReason value -> samples
    ignored_files: Counter[str] = field(default_factory=Counter)  # unknown file key -> files
    failed_shards: list[str] = field(default_factory=list)  # shards that yielded no sample

    def skip(self, reason: SkipReason, detail: str) -> None:
        """Count one skipped sample under ``reason``; ``detail`` names the sample and the fault."""
        self.skipped[reason.value] += 1
        logger.debug("skipped sample (%s): %s", reason.value, detail)

    @property
    def num_skipped(self) -> int:
        """Total skipped samples over all reasons."""
        return sum(self.skipped.values())

    def merge(self, other: SkipCounter) -> None:
        """Add ``other``'s counts into this counter (e.g. from another worker)."""
        self.samples_ok += other.samples_ok
        self.skipped.update(other.skipped)
        self.ignored_files.update(other.ignored_files)
        self.failed_shards.extend(s for s in other.failed_shards if s not in self.failed_shards)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot for logs and checkpoints."""
        return {
            "samples_ok": self.samples_ok,
            "skipped": dict(sorted(self.skipped.items())),
            "ignored_files": dict(sorted(self.ignored_files.items())),
            "failed_shards": list(self.failed_shards),
        }

    def summary(self) -> str:
        """One log line: good samples, skips by reason, failed shards."""
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        text = f"{self.samples_ok} samples ok, {self.num_skipped} skipped ({reasons})"
        if self.failed_shards:
            text += f"; failed shards: {', '.join(self.failed_shards)}"
        return text


# ----------------------------------------------------------------------------- decoded samples


@dataclass
class RawSample:
    """One decoded, validated sample; only the modalities present in the shard.

    Value types by modality (H x W identical across all 2D modalities of a sample):
    rgb uint8 [H, W, 3]; depth float32 [H, W] metres (0 where invalid); normal float32
    [H, W, 3] unit vectors in the camera frame x right, y up, z towards the camera (0 where
    invalid); seg, sam_seg int32 [H, W] class / instance ids; canny, sam_edge bool [H, W];
    caption list[str] (>= 1 non-empty); detection ``Detections``; grounding ``Groundings``
    (>= 1 entry); *_global float32 [D]; *_local float32 [gh, gw, D].
    """

    key: str  # the webdataset key
    shard: str  # the shard it was read from ("" when decoded outside a shard)
    index: int  # position of the sample in its shard, skipped samples included (for resume)
    modalities: dict[str, Payload]  # modality name -> decoded value
    valid: dict[str, np.ndarray]  # 2D modality -> bool [H, W] validity mask (depth, normal)

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(H, W) shared by the sample's 2D modalities, or None if it has none."""
        for name in image_modalities():
            if name in self.modalities:
                value = self.modalities[name]
                assert isinstance(value, np.ndarray)
                return int(value.shape[0]), int(value.shape[1])
        return None


@dataclass
class PreparedSample:
    """A sample ready for the document builder: 2D modalities rendered, 1D payloads raw."""

    key: str
    images: dict[str, np.ndarray]  # 2D modality -> float32 [3, H, W] in [-1, 1] (modalities/pictures.py)
    payloads: dict[str, Payload]  # 1D modality -> caption list / Detections / Groundings / features


def in_table_order(values: dict[str, Payload]) -> dict[str, Payload]:
    """``values`` reordered as the modality table lists them."""
    return {name: values[name] for name in modality_names() if name in values}
