"""Two made-up modalities defined by table rows alone: a 2D scalar map and a 1D global feature.

Kept apart from the test module so a subprocess can extend the table before it imports the
rest of modus_mega (``made_up_modality_entry.py``).
"""

from __future__ import annotations

from modus_mega import modalities
from modus_mega.modalities import Modality, geometry
from modus_mega.modalities.codecs import DepthCodec, FeatureCodec
from modus_mega.modalities.pictures import DEPTH_PICTURE

HEAT = Modality("heat", "2d", "image", "heat", DepthCodec(), geometry.NEAREST, DEPTH_PICTURE)
TOY = Modality("toy_global", "1d", "feature_global", "toy", FeatureCodec(local=False), geometry.keep)


def extended_table() -> tuple[Modality, ...]:
    """The current table plus the two made-up rows, appended (existing ids keep their values)."""
    return (*modalities.MODALITIES, HEAT, TOY)
