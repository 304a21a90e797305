"""Why a sample is skipped: the reasons every reader and decoder counts under.

They sit with the modality table because the codecs (``modalities/codecs.py``) raise them;
the shard reader, the loader and the training log read them from here.
"""

from __future__ import annotations

import enum


class SkipReason(str, enum.Enum):
    """Why a sample was skipped. Values are the names that appear in logs."""

    TRUNCATED_TAR = "truncated_tar"  # the shard ends (or breaks) inside or before this sample
    UNDECODABLE = "undecodable"  # an image, array or text file that cannot be decoded
    BAD_SHAPE = "bad_shape"  # wrong rank or channel count for its modality
    BAD_VALUE = "bad_value"  # decodable but out of range (negative depth, 8-bit depth PNG, ...)
    SIZE_MISMATCH = "size_mismatch"  # 2D modalities (or box annotations) disagree on H x W
    NONFINITE = "nonfinite"  # NaN or inf in a feature, normal or box
    BAD_ANNOTATION = "bad_annotation"  # malformed caption / det / grounding JSON
    DUPLICATE_FILE = "duplicate_file"  # two files for one modality in one sample
    NO_USABLE_MODALITY = "no_usable_modality"  # nothing MODUS can read in the sample
    NO_USABLE_TARGET = "no_usable_target"  # used by the document builder: no allowed target present
    TOO_LARGE = "too_large"  # a header claims more pixels or bytes than data.max_image_pixels / max_array_bytes
    OUT_OF_MEMORY = "out_of_memory"  # MemoryError while reading or preparing the sample
    UNEXPECTED_ERROR = "unexpected_error"  # any other exception from one sample (named at debug level)
    IGNORED_FILES = "ignored_files"  # not a sample: files with an unknown key or extension, which are dropped


class SampleError(ValueError):
    """A sample that must be skipped, with the reason it is counted under."""

    def __init__(self, reason: SkipReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
