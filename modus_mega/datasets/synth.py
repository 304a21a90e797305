"""Procedural, self-consistent 15-modality data: a small numpy ray caster writes MODUS shards.

    python -m modus_mega.datasets.synth --out data/synth --num-samples 512 --image-size 64

Each sample is a random scene (spheres, cubes, cylinders on a checkered ground plane, one
directional light, a sky) seen by a pinhole camera. One ray per pixel gives EXACT labels:
z-depth and surface normals from the hit itself, the semantic class and instance of the hit
object; RGB is Lambert + Blinn-Phong shading with hard shadows. The remaining modalities are
derived from those: Canny of the RGB (OpenCV), SAM-style edges (instance boundaries), boxes
of the visible instance masks with their class names, captions and referring expressions
from the scene graph ("a red sphere left of a blue cube"), and features from a documented
deterministic stand-in encoder (``StandInEncoder``). Sample ``i`` depends only on
``(seed, split, i)``, so any shard layout or worker count yields the same data; the held-out
split (``--split val``) draws its scenes from keys the training split never uses.

Conventions (``docs/DATA.md``): world y up, ground plane y = 0; camera frame for rays x right,
y down, z forward (OpenCV); normals stored in the camera frame x right, y up, z towards the
camera; seg ids index ``CLASS_NAMES``; sam_seg ids are 0 sky, 1 ground, 2 + object index.

Shapes: H, W image height and width; P rays (H * W); M objects; g feature grid side; D width.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import sys
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

import cv2
import numpy as np
from tqdm import tqdm

from modus_mega.cli import add_debug_argument, run_cli
from modus_mega.data.shard_format import shard_name
from modus_mega.data.shard_writer import encode_modality, write_index, write_shard
from modus_mega.modalities import pictures
from modus_mega.modalities.values import Detections, Groundings, Payload

PROG = "python -m modus_mega.datasets.synth"
CLASS_NAMES: tuple[str, ...] = ("sky", "ground", "sphere", "cube", "cylinder")  # seg id = index
SHAPES: tuple[str, ...] = ("sphere", "cube", "cylinder")
SKY_INSTANCE, GROUND_INSTANCE, FIRST_OBJECT_INSTANCE = 0, 1, 2
COLOURS: dict[str, tuple[float, float, float]] = {  # linear albedo
    "red": (0.75, 0.08, 0.06),
    "green": (0.10, 0.55, 0.12),
    "blue": (0.08, 0.18, 0.75),
    "yellow": (0.85, 0.75, 0.10),
    "purple": (0.45, 0.12, 0.60),
    "orange": (0.90, 0.40, 0.05),
    "cyan": (0.10, 0.65, 0.70),
    "white": (0.85, 0.85, 0.85),
    "black": (0.04, 0.04, 0.04),
    "brown": (0.35, 0.20, 0.08),
}
MATERIALS: tuple[str, ...] = ("matte", "shiny")
FAR_DEPTH = 50.0  # metres; ground hits beyond this are left invalid (shown as sky)
_GROUND_TONES = ((0.55, 0.55, 0.52), (0.38, 0.38, 0.36))  # checker tiles of 1 m
_SKY_HORIZON, _SKY_ZENITH = np.array([0.80, 0.86, 0.95]), np.array([0.25, 0.45, 0.80])
_AMBIENT = 0.25
_EPS = 1e-6
_NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six")


# ----------------------------------------------------------------------------- scene


@dataclass(frozen=True)
class SceneObject:
    """One primitive resting on the ground."""

    shape: str  # one of SHAPES
    colour: str  # a key of COLOURS
    material: str  # one of MATERIALS
    centre: np.ndarray  # [3] world position of the centre
    size: np.ndarray  # [3] sphere (r, r, r); cube half extents; cylinder (r, half height, r)
    yaw: float  # rotation about the world up axis, radians (cubes)

    @property
    def name(self) -> str:
        """``"red sphere"``; unique within a scene."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Camera:
    """A pinhole camera; pixel (u, v) is sampled at its centre (u + 0.5, v + 0.5)."""

    width: int
    height: int
    fx: float  # focal length in pixels
    fy: float
    cx: float  # principal point in pixels
    cy: float
    rotation: np.ndarray  # [3, 3] camera-to-world; columns: right, down, forward (OpenCV)
    position: np.ndarray  # [3] world position

    def ray_directions(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World ray directions (x, y, z), each [P], row-major pixels, camera-frame z = 1.

        With camera-frame z = 1 the ray parameter t of a hit is its z-depth.
        """
        u = (np.arange(self.width) + 0.5 - self.cx) / self.fx  # [W]
        v = (np.arange(self.height) + 0.5 - self.cy) / self.fy  # [H]
        r = self.rotation
        return tuple(  # type: ignore[return-value]
            (u[None, :] * r[axis, 0] + v[:, None] * r[axis, 1] + r[axis, 2]).ravel() for axis in range(3)
        )

    def to_camera(self, point: np.ndarray) -> np.ndarray:
        """[3] world point -> [3] OpenCV camera-frame coordinates (x right, y down, z forward)."""
        return self.rotation.T @ (point - self.position)


@dataclass(frozen=True)
class Scene:
    """A scene graph: objects, camera and the direction towards the light."""

    objects: tuple[SceneObject, ...]
    camera: Camera
    light: np.ndarray  # [3] unit world vector pointing at the light


@dataclass
class Rendering:
    """Exact per-pixel buffers of one rendered scene."""

    rgb: np.ndarray  # uint8 [H, W, 3]
    depth: np.ndarray  # float32 [H, W] z-depth in metres, 0 where no surface (sky)
    normal: np.ndarray  # float32 [H, W, 3] camera frame x right, y up, z to camera; 0 on sky
    seg: np.ndarray  # int32 [H, W] index into CLASS_NAMES
    instance: np.ndarray  # int32 [H, W] 0 sky, 1 ground, 2 + object index


def _look_at(position: np.ndarray, target: np.ndarray) -> np.ndarray:
    forward = target - position
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, np.array([0.0, 1.0, 0.0]))
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    return np.stack([right, down, forward], axis=1)


def _footprint(shape: str, size: np.ndarray) -> float:
    return float(math.hypot(size[0], size[2]) if shape == "cube" else size[0])


def sample_scene(rng: np.random.Generator, width: int, height: int) -> Scene:
    """A random scene of 2-5 objects with unique (colour, shape) pairs, camera and light."""
    num_objects = int(rng.integers(2, 6))
    combos = rng.choice(len(COLOURS) * len(SHAPES), size=num_objects, replace=False)
    colour_names = list(COLOURS)
    objects: list[SceneObject] = []
    for combo in combos:
        shape = SHAPES[int(combo) % len(SHAPES)]
        colour = colour_names[int(combo) // len(SHAPES)]
        if shape == "sphere":
            size = np.full(3, rng.uniform(0.35, 0.8))
        elif shape == "cube":
            size = rng.uniform(0.3, 0.7, size=3)
        else:
            radius, half_height = rng.uniform(0.3, 0.6), rng.uniform(0.3, 0.9)
            size = np.array([radius, half_height, radius])
        radius = _footprint(shape, size)
        for _ in range(50):  # rejection sampling of non-overlapping footprints
            x, z = rng.uniform(-2.5, 2.5, size=2)
            if all(
                math.hypot(x - o.centre[0], z - o.centre[2]) > radius + _footprint(o.shape, o.size) + 0.1
                for o in objects
            ):
                centre = np.array([x, size[1], z])
                material = MATERIALS[int(rng.integers(len(MATERIALS)))]
                yaw = float(rng.uniform(0.0, math.pi / 2)) if shape == "cube" else 0.0
                objects.append(SceneObject(shape, colour, material, centre, size, yaw))
                break
    target = np.array([rng.uniform(-0.5, 0.5), 0.3, rng.uniform(-0.5, 0.5)])
    azimuth, elevation = rng.uniform(0.0, 2 * math.pi), math.radians(rng.uniform(20.0, 40.0))
    distance = rng.uniform(6.5, 9.0)
    offset = np.array([math.cos(elevation) * math.sin(azimuth), math.sin(elevation), math.cos(elevation) * math.cos(azimuth)])
    position = target + distance * offset
    focal = (width / 2) / math.tan(math.radians(rng.uniform(45.0, 60.0)) / 2)
    camera = Camera(width, height, focal, focal, width / 2, height / 2, _look_at(position, target), position)
    light_azimuth, light_elevation = rng.uniform(0.0, 2 * math.pi), math.radians(rng.uniform(35.0, 70.0))
    light = np.array(
        [
            math.cos(light_elevation) * math.sin(light_azimuth),
            math.sin(light_elevation),
            math.cos(light_elevation) * math.cos(light_azimuth),
        ]
    )
    return Scene(tuple(objects), camera, light)


# ----------------------------------------------------------------------------- ray casting
#
# Rays are kept as three component arrays (structure of arrays): numpy reductions over a
# trailing axis of size 3 are several times slower than elementwise arithmetic on [P] arrays.

Scalars = Union[np.ndarray, float]  # [P] or one value for all rays
Vec = tuple[Scalars, Scalars, Scalars]  # x, y, z components


def _safe(d: np.ndarray) -> np.ndarray:
    return np.where(np.abs(d) < 1e-12, 1e-12, d)


def _bounding_radius(obj: SceneObject) -> float:
    if obj.shape == "sphere":
        return float(obj.size[0])
    if obj.shape == "cube":
        return float(np.linalg.norm(obj.size))
    return float(math.hypot(obj.size[0], obj.size[1]))


def _intersect(obj: SceneObject, origin: Vec, direction: Vec) -> np.ndarray:
    """Ray parameter t [P] of the first hit in front of the origin, inf on a miss.

    Directions need not be unit length; origins must lie outside the object.
    """
    ox, oy, oz = origin[0] - obj.centre[0], origin[1] - obj.centre[1], origin[2] - obj.centre[2]
    dx, dy, dz = direction
    if obj.shape == "sphere":
        a = dx * dx + dy * dy + dz * dz
        b = 2.0 * (ox * dx + oy * dy + oz * dz)
        c = ox * ox + oy * oy + oz * oz - obj.size[0] ** 2
        disc = b * b - 4.0 * a * c
        t = (-b - np.sqrt(np.maximum(disc, 0.0))) / (2.0 * a)
        return np.where((disc >= 0) & (t > _EPS), t, np.inf)
    if obj.shape == "cube":
        cos, sin = math.cos(obj.yaw), math.sin(obj.yaw)
        local_o = (cos * ox - sin * oz, oy, sin * ox + cos * oz)  # R_yaw^T (o - centre)
        local_d = (cos * dx - sin * dz, dy, sin * dx + cos * dz)
        t_near = t_far = None
        for axis in range(3):
            inv = 1.0 / _safe(local_d[axis])
            t1 = (-obj.size[axis] - local_o[axis]) * inv
            t2 = (obj.size[axis] - local_o[axis]) * inv
            lo, hi = np.minimum(t1, t2), np.maximum(t1, t2)
            t_near = lo if t_near is None else np.maximum(t_near, lo)
            t_far = hi if t_far is None else np.minimum(t_far, hi)
        assert t_near is not None and t_far is not None
        return np.where((t_near <= t_far) & (t_near > _EPS), t_near, np.inf)
    radius, half_height = obj.size[0], obj.size[1]
    a = _safe(dx * dx + dz * dz)
    b = 2.0 * (ox * dx + oz * dz)
    c = ox * ox + oz * oz - radius**2
    disc = b * b - 4.0 * a * c
    t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / (2.0 * a)
    side_ok = (disc >= 0) & (t_side > _EPS) & (np.abs(oy + t_side * dy) <= half_height)
    t = np.where(side_ok, t_side, np.inf)
    for cap_y in (half_height, -half_height):
        t_cap = (cap_y - oy) / _safe(dy)
        cap_ok = (t_cap > _EPS) & ((ox + t_cap * dx) ** 2 + (oz + t_cap * dz) ** 2 <= radius**2)
        t = np.minimum(t, np.where(cap_ok, t_cap, np.inf))
    return t


def _surface_normal(obj: SceneObject, points: np.ndarray) -> np.ndarray:
    """Outward unit world normals [M, 3] of ``obj`` at surface points [M, 3]."""
    p = points - obj.centre
    if obj.shape == "sphere":
        return p / obj.size[0]
    if obj.shape == "cube":
        cos, sin = math.cos(obj.yaw), math.sin(obj.yaw)
        rot = np.array([[cos, 0.0, sin], [0.0, 1.0, 0.0], [-sin, 0.0, cos]])  # object-to-world
        local = p @ rot
        axis = np.abs(local / obj.size).argmax(1)  # the face whose slab the point lies on
        normal = np.zeros_like(local)
        rows = np.arange(len(local))
        normal[rows, axis] = np.sign(local[rows, axis])
        return normal @ rot.T
    radius, half_height = obj.size[0], obj.size[1]
    radial = np.hypot(p[:, 0], p[:, 2])
    on_cap = np.abs(p[:, 1]) / half_height > radial / radius
    side = np.stack([p[:, 0], np.zeros(len(p)), p[:, 2]], axis=1) / np.maximum(radial, 1e-12)[:, None]
    cap = np.zeros_like(p)
    cap[:, 1] = np.sign(p[:, 1])
    return np.where(on_cap[:, None], cap, side)


def _screen_rect(obj: SceneObject, cam: Camera) -> tuple[slice, slice]:
    """Rows and columns that can see ``obj``: the conservative projection of its bounding sphere."""
    x, y, z = cam.to_camera(obj.centre)
    radius = _bounding_radius(obj)
    if z - radius <= 1e-3:
        return slice(0, cam.height), slice(0, cam.width)
    near, far = z - radius, z + radius

    def extent(lo: float, hi: float, focal: float, centre: float, size: int) -> slice:
        # x / z over the bounding box of the sphere is extremal at its corners (z > 0).
        ratios = (lo / near, lo / far, hi / near, hi / far)
        first = math.floor(centre + focal * min(ratios) - 0.5) - 1
        last = math.ceil(centre + focal * max(ratios) - 0.5) + 1
        return slice(min(max(first, 0), size), min(max(last + 1, 0), size))

    return extent(y - radius, y + radius, cam.fy, cam.cy, cam.height), extent(x - radius, x + radius, cam.fx, cam.cx, cam.width)


def _shadowed(scene: Scene, points: np.ndarray) -> np.ndarray:
    """bool [S]: surface points [S, 3] (already offset along the normal) that see no light."""
    light = scene.light
    blocked = np.zeros(len(points), dtype=bool)
    px, py, pz = points[:, 0], points[:, 1], points[:, 2]
    for obj in scene.objects:
        cx, cy, cz = obj.centre[0] - px, obj.centre[1] - py, obj.centre[2] - pz
        along = cx * light[0] + cy * light[1] + cz * light[2]
        dist2 = cx * cx + cy * cy + cz * cz
        radius2 = _bounding_radius(obj) ** 2
        candidates = np.nonzero((dist2 - along * along <= radius2) & ((along >= 0) | (dist2 <= radius2)))[0]
        if candidates.size == 0:
            continue
        origin = (px[candidates], py[candidates], pz[candidates])
        direction = (float(light[0]), float(light[1]), float(light[2]))
        blocked[candidates] |= np.isfinite(_intersect(obj, origin, direction))
    return blocked


def render_scene(scene: Scene) -> Rendering:
    """Cast one ray per pixel; shade with Lambert + Blinn-Phong, hard shadows and gamma 2.2."""
    cam = scene.camera
    dx, dy, dz = cam.ray_directions()  # each [P]
    num_rays = dx.size
    pixel = np.arange(num_rays).reshape(cam.height, cam.width)
    t_ground = np.where(dy < 0, -cam.position[1] / _safe(dy), np.inf)
    depth = np.where(t_ground <= FAR_DEPTH, t_ground, np.inf)  # [P] nearest hit so far
    instance = np.where(np.isfinite(depth), GROUND_INSTANCE, SKY_INSTANCE)  # [P]
    origin = (cam.position[0], cam.position[1], cam.position[2])
    for k, obj in enumerate(scene.objects):
        rows, cols = _screen_rect(obj, cam)
        rays = pixel[rows, cols].ravel()  # only rays that can reach the object
        if rays.size == 0:
            continue
        t = _intersect(obj, origin, (dx[rays], dy[rays], dz[rays]))
        closer = t < depth[rays]
        depth[rays[closer]] = t[closer]
        instance[rays[closer]] = FIRST_OBJECT_INSTANCE + k

    surface = np.nonzero(instance != SKY_INSTANCE)[0]  # [S]
    t_s = depth[surface]
    dirs_s = np.stack([dx[surface], dy[surface], dz[surface]], axis=1)  # [S, 3]
    points = cam.position + t_s[:, None] * dirs_s  # [S, 3]
    inst_s = instance[surface]
    normal_s = np.zeros((surface.size, 3))
    normal_s[:, 1] = 1.0  # ground
    albedo_s = np.asarray(_GROUND_TONES)[(np.floor(points[:, 0]) + np.floor(points[:, 2])).astype(np.int64) % 2]
    shiny_s = np.zeros(surface.size, dtype=bool)
    seg = np.full(num_rays, CLASS_NAMES.index("sky"), dtype=np.int32)
    seg[surface] = CLASS_NAMES.index("ground")
    for k, obj in enumerate(scene.objects):
        mask = inst_s == FIRST_OBJECT_INSTANCE + k
        if not mask.any():
            continue
        normal_s[mask] = _surface_normal(obj, points[mask])
        albedo_s[mask] = COLOURS[obj.colour]
        shiny_s[mask] = obj.material == "shiny"
        seg[surface[mask]] = CLASS_NAMES.index(obj.shape)

    lit = ~_shadowed(scene, points + 1e-4 * normal_s)
    lambert = np.clip(normal_s @ scene.light, 0.0, None) * lit
    view = dirs_s / np.linalg.norm(dirs_s, axis=1, keepdims=True)
    half = scene.light - view
    half /= np.linalg.norm(half, axis=1, keepdims=True)
    specular = np.where(shiny_s & lit, 0.6 * np.clip((normal_s * half).sum(1), 0.0, None) ** 40, 0.0)
    colour_s = albedo_s * (_AMBIENT + (1.0 - _AMBIENT) * lambert)[:, None] + specular[:, None]
    elevation = np.clip(dy / np.sqrt(dx * dx + dy * dy + dz * dz), 0.0, 1.0)  # [P] sine of elevation
    colour = _SKY_HORIZON + (_SKY_ZENITH - _SKY_HORIZON) * np.sqrt(elevation)[:, None]  # [P, 3]
    colour[surface] = colour_s
    rgb = np.round(np.clip(colour, 0.0, 1.0) ** (1 / 2.2) * 255.0).astype(np.uint8)

    normal = np.zeros((num_rays, 3))
    # R^T n is the OpenCV camera frame; flipping y and z gives x right, y up, z towards camera.
    normal[surface] = (normal_s @ cam.rotation) * np.array([1.0, -1.0, -1.0])
    shape2 = (cam.height, cam.width)
    return Rendering(
        rgb=rgb.reshape(*shape2, 3),
        depth=np.where(np.isfinite(depth), depth, 0.0).reshape(shape2).astype(np.float32),
        normal=normal.reshape(*shape2, 3).astype(np.float32),
        seg=seg.reshape(shape2),
        instance=instance.reshape(shape2).astype(np.int32),
    )


# ----------------------------------------------------------------------------- annotations


@dataclass(frozen=True)
class VisibleObject:
    """An object with at least ``min_pixels`` visible pixels, measured on the rendering."""

    obj: SceneObject
    box: np.ndarray  # [4] float32 x0 y0 x1 y1: the tight box of the visible mask (pixel edges)
    centre_x: float  # mean column of the visible mask
    depth: float  # median depth of the visible mask, metres


def visible_objects(scene: Scene, rendering: Rendering, min_pixels: int | None = None) -> list[VisibleObject]:
    """The scene's objects that are visible enough to be annotated, in scene order."""
    height, width = rendering.instance.shape
    min_pixels = max(4, height * width // 2000) if min_pixels is None else min_pixels
    visible: list[VisibleObject] = []
    for k, obj in enumerate(scene.objects):
        rows, cols = np.nonzero(rendering.instance == FIRST_OBJECT_INSTANCE + k)
        if rows.size < min_pixels:
            continue
        box = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=np.float32)
        depth = float(np.median(rendering.depth[rows, cols]))
        visible.append(VisibleObject(obj, box, float(cols.mean()), depth))
    return visible


def relation(a: VisibleObject, b: VisibleObject, width: int) -> str:
    """Where ``a`` is relative to ``b`` in the image: left of / right of / in front of / behind."""
    dx = (a.centre_x - b.centre_x) / width
    if abs(dx) > 0.1:
        return "left of" if dx < 0 else "right of"
    return "in front of" if a.depth < b.depth else "behind"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def describe(
    scene: Scene, rendering: Rendering, rng: np.random.Generator
) -> tuple[list[str], Detections, Groundings | None]:
    """Captions, detections and referring expressions derived from the scene graph.

    Only visible objects are mentioned. Referring expressions name the unique (colour, shape)
    and, half of the time, a true spatial relation to another visible object. Grounding is
    None when nothing is visible.
    """
    height, width = rendering.instance.shape
    visible = visible_objects(scene, rendering)
    detections = Detections(
        boxes=np.stack([v.box for v in visible]) if visible else np.zeros((0, 4), np.float32),
        classes=[v.obj.shape for v in visible],
        scores=np.ones(len(visible), dtype=np.float32),
        width=width,
        height=height,
    )
    if not visible:
        return ["an empty checkered floor under the sky.", "no objects on a checkered floor."], detections, None
    listed = [f"{_article(v.obj.material)} {v.obj.material} {v.obj.name}" for v in visible]
    captions = [f"{_join(listed)} on a checkered floor.", f"{_NUMBER_WORDS[min(len(visible), 6)]} objects: {_join([v.obj.name for v in visible])}."]
    expressions: list[str] = []
    for i, v in enumerate(visible):
        others = [w for j, w in enumerate(visible) if j != i]
        phrase = f"the {v.obj.name}"
        if others and rng.random() < 0.5:
            anchor = others[int(rng.integers(len(others)))]
            phrase += f" {relation(v, anchor, width)} the {anchor.obj.name}"
            captions.append(f"{_article(v.obj.colour)} {v.obj.name} {relation(v, anchor, width)} {_article(anchor.obj.colour)} {anchor.obj.name}.")
        expressions.append(phrase)
    groundings = Groundings(boxes=np.stack([v.box for v in visible]), expressions=expressions, width=width, height=height)
    return captions, detections, groundings


# ----------------------------------------------------------------------------- stand-in features


@dataclass(frozen=True)
class FeatureSpec:
    """What one stand-in feature extractor looks at."""

    family: str  # dinov2 / clip / imagebind: one spec serves its _global and _local modality
    inputs: tuple[str, ...]  # rendered planes it pools: rgb, depth, normal, seg (class one-hot)
    unit_norm: bool  # global vector L2-normalised (as CLIP and ImageBind embeddings are)


FEATURE_SPECS: tuple[FeatureSpec, ...] = (
    FeatureSpec("dinov2", ("rgb", "depth", "normal"), unit_norm=False),  # appearance + geometry
    FeatureSpec("clip", ("rgb", "seg"), unit_norm=True),  # appearance + semantics
    FeatureSpec("imagebind", ("rgb", "depth"), unit_norm=True),  # appearance + depth
)


def _area_pool(planes: np.ndarray, cells: int) -> np.ndarray:
    """Mean of [H, W, C] over a cells x cells grid of (nearly) equal areas -> [cells, cells, C]."""
    height, width = planes.shape[:2]
    rows = np.linspace(0, height, cells + 1).round().astype(np.int64)
    cols = np.linspace(0, width, cells + 1).round().astype(np.int64)
    summed = np.add.reduceat(np.add.reduceat(planes, rows[:-1], axis=0), cols[:-1], axis=1)
    counts = np.diff(rows)[:, None, None] * np.diff(cols)[None, :, None]
    return summed / counts



def _seg_one_hot(rendering: Rendering) -> np.ndarray:
    return (rendering.seg[None] == np.arange(len(CLASS_NAMES))[:, None, None]).astype(np.float32)


# What a synthetic feature extractor sees of each input map: float32 [C, H, W] planes.
_INPUT_PLANES: dict[str, Callable[[Rendering], np.ndarray]] = {
    "rgb": lambda rendering: pictures.rgb_to_image(rendering.rgb),
    "depth": lambda rendering: pictures.depth_to_image(rendering.depth)[:1],
    "normal": lambda rendering: pictures.normal_to_image(rendering.normal),
    "seg": _seg_one_hot,
}


class StandInEncoder:
    """A fixed, deterministic stand-in for a pretrained feature extractor.

    The image is described by its rendered planes in [-1, 1] (rgb, log-depth, normals, class
    one-hot), area-pooled to a (2g x 2g) grid; each of the g x g cells concatenates its 2 x 2
    sub-cells into a descriptor, and a fixed random two-layer MLP (tanh) maps it to the local
    feature [g, g, D]. The global feature is another fixed MLP of the mean and standard
    deviation of the cell descriptors, L2-normalised for CLIP/ImageBind-like families.
    Weights come from ``crc32(family)``, so every process and run agrees; features therefore
    vary smoothly with the scene, as real features do, and the tokenizers have real
    structure to learn.
    """

    def __init__(self, spec: FeatureSpec, dim: int, grid: int) -> None:
        self.spec, self.dim, self.grid = spec, dim, grid
        channels = sum({"rgb": 3, "depth": 1, "normal": 3, "seg": len(CLASS_NAMES)}[p] for p in spec.inputs)
        in_local, in_global, hidden = 4 * channels, 8 * channels, 2 * dim
        rng = np.random.default_rng(zlib.crc32(spec.family.encode()))
        self.local_w1 = rng.normal(0.0, 1.5 / math.sqrt(in_local), (in_local, hidden))
        self.local_b1 = rng.normal(0.0, 0.2, hidden)
        self.local_w2 = rng.normal(0.0, 1.0 / math.sqrt(hidden), (hidden, dim))
        self.global_w1 = rng.normal(0.0, 1.5 / math.sqrt(in_global), (in_global, hidden))
        self.global_b1 = rng.normal(0.0, 0.2, hidden)
        self.global_w2 = rng.normal(0.0, 1.0 / math.sqrt(hidden), (hidden, dim))

    def _planes(self, rendering: Rendering) -> np.ndarray:
        planes = [_INPUT_PLANES[name](rendering) for name in self.spec.inputs]
        return np.concatenate(planes).transpose(1, 2, 0).astype(np.float64)  # [H, W, C]

    def __call__(self, rendering: Rendering) -> tuple[np.ndarray, np.ndarray]:
        """(global float32 [D], local float32 [g, g, D]) features of a rendering."""
        pooled = _area_pool(self._planes(rendering), 2 * self.grid)  # [2g, 2g, C]
        g, c = self.grid, pooled.shape[-1]
        cells = pooled.reshape(g, 2, g, 2, c).transpose(0, 2, 1, 3, 4).reshape(g, g, 4 * c)  # [g, g, 4C]
        local = np.tanh(cells @ self.local_w1 + self.local_b1) @ self.local_w2  # [g, g, D]
        flat = cells.reshape(-1, 4 * c)
        summary = np.concatenate([flat.mean(0), flat.std(0)])  # [8C]
        global_ = np.tanh(summary @ self.global_w1 + self.global_b1) @ self.global_w2  # [D]
        if self.spec.unit_norm:
            global_ /= np.linalg.norm(global_) + 1e-12
        return global_.astype(np.float32), local.astype(np.float32)


# ----------------------------------------------------------------------------- samples and shards


# The dataset splits, in the order of their number in ``scene_key``.
SPLITS = ("train", "val")


@dataclass(frozen=True)
class SynthConfig:
    """Everything that determines the generated data."""

    image_size: int = 64  # side of the square images, pixels
    seed: int = 0  # sample i depends only on (seed, split, i)
    split: Literal["train", "val"] = "train"  # val: a held-out split whose scene keys never meet train's (scene_key)
    feature_dim: int = 64  # width D of every stand-in feature
    feature_grid: int = 8  # local features are [feature_grid, feature_grid, D]
    rgb_format: str = "jpg"  # how rgb is stored: jpg (quality 95) or png (lossless)


def scene_key(index: int, config: SynthConfig) -> list[int]:
    """The entropy of sample ``index``'s random stream: ``[seed, index, split number]``.

    The split number (train 0, val 1) makes every held-out key differ from every training
    key of the same seed; numpy pads a key with zeros, so train's keys are the ``[seed,
    index]`` they always were and existing datasets are unchanged.
    """
    return [config.seed, index, SPLITS.index(config.split)]


def generate_sample(index: int, config: SynthConfig, encoders: Sequence[StandInEncoder] | None = None) -> tuple[Scene, Rendering, dict[str, Payload]]:
    """Scene, rendering and all decoded modality values (``RawSample`` types) of sample ``index``."""
    rng = np.random.default_rng(scene_key(index, config))
    scene = sample_scene(rng, config.image_size, config.image_size)
    rendering = render_scene(scene)
    captions, detections, groundings = describe(scene, rendering, rng)
    instance = rendering.instance
    boundary = np.zeros_like(instance, dtype=bool)
    boundary[:, :-1] |= instance[:, :-1] != instance[:, 1:]  # differs from the right neighbour
    boundary[:-1, :] |= instance[:-1, :] != instance[1:, :]  # differs from the lower neighbour
    grey = cv2.cvtColor(rendering.rgb, cv2.COLOR_RGB2GRAY)
    values: dict[str, Payload] = {
        "rgb": rendering.rgb,
        "depth": rendering.depth,
        "normal": rendering.normal,
        "seg": rendering.seg,
        "sam_seg": rendering.instance,
        "canny": cv2.Canny(grey, 100, 200) > 0,
        "sam_edge": boundary,
        "caption": captions,
        "detection": detections,
    }
    if groundings is not None:
        values["grounding"] = groundings
    for encoder in encoders if encoders is not None else make_encoders(config):
        global_, local = encoder(rendering)
        values[f"{encoder.spec.family}_global"] = global_
        if encoder.spec.family != "clip":  # MODUS has no clip_local modality
            values[f"{encoder.spec.family}_local"] = local
    return scene, rendering, values


def make_encoders(config: SynthConfig) -> list[StandInEncoder]:
    """The three stand-in encoders (DINOv2-, CLIP- and ImageBind-like) for ``config``."""
    return [StandInEncoder(spec, config.feature_dim, config.feature_grid) for spec in FEATURE_SPECS]


def sample_files(index: int, config: SynthConfig, encoders: Sequence[StandInEncoder] | None = None) -> dict[str, bytes]:
    """The shard files (``{'rgb.jpg': bytes, ...}``) of sample ``index``."""
    _, _, values = generate_sample(index, config, encoders)
    files: dict[str, bytes] = {}
    for name, value in values.items():
        files.update(encode_modality(name, value, image_format=config.rgb_format))
    return files


def sample_key(index: int) -> str:
    """The webdataset key of sample ``index``."""
    return f"{index:09d}"


def _write_one_shard(out: str, prefix: str, shard_index: int, first: int, stop: int, config: SynthConfig) -> tuple[str, int]:
    cv2.setNumThreads(1)  # workers are processes; OpenCV threads would oversubscribe the cores
    encoders = make_encoders(config)
    name = shard_name(prefix, shard_index)
    samples = ((sample_key(i), sample_files(i, config, encoders)) for i in range(first, stop))
    return name, write_shard(Path(out) / name, samples)


def write_dataset(
    out: str | os.PathLike[str],
    num_samples: int,
    config: SynthConfig,
    samples_per_shard: int = 256,
    prefix: str = "synth",
    workers: int = 1,
    progress: bool = True,
) -> Path:
    """Generate ``num_samples`` samples into ``{prefix}-{i:06d}.tar`` shards plus ``index.json``.

    Returns the index path. The bytes written depend only on the arguments, not on ``workers``.
    """
    if num_samples <= 0 or samples_per_shard <= 0:
        raise ValueError(f"num_samples ({num_samples}) and samples_per_shard ({samples_per_shard}) must be positive")
    if config.image_size < 8 or config.feature_grid < 1 or config.feature_dim < 1:
        raise ValueError(f"need image_size >= 8, feature_grid >= 1, feature_dim >= 1; got {config}")
    if 2 * config.feature_grid > config.image_size:
        raise ValueError(f"feature_grid {config.feature_grid} needs image_size >= {2 * config.feature_grid}")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    ranges = [(i, start, min(start + samples_per_shard, num_samples)) for i, start in enumerate(range(0, num_samples, samples_per_shard))]
    counts: dict[str, int] = {}
    with tqdm(total=num_samples, unit="sample", desc=f"synth -> {root}", disable=not progress) as bar:
        if workers <= 1:
            encoders = make_encoders(config)
            for shard_index, first, stop in ranges:
                name = shard_name(prefix, shard_index)

                def samples(first: int = first, stop: int = stop):  # type: ignore[no-untyped-def]
                    for i in range(first, stop):
                        yield sample_key(i), sample_files(i, config, encoders)
                        bar.update(1)

                counts[name] = write_shard(root / name, samples())
        else:
            # spawn, not fork: forking a process whose threads (torch, tokenizers) hold locks deadlocks.
            with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = [pool.submit(_write_one_shard, str(root), prefix, *r, config) for r in ranges]
                for future in as_completed(futures):
                    name, count = future.result()
                    counts[name] = count
                    bar.update(count)
    generator = {"name": "modus_mega.datasets.synth", **config.__dict__, "classes": list(CLASS_NAMES)}
    return write_index(root, sorted(counts.items()), extra={"generator": generator})


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry: ``python -m modus_mega.datasets.synth --out DIR --num-samples N``; a user error is
    one line and exit status 2 (``modus_mega/cli.py``)."""
    return run_cli(_main, argv, prog=PROG)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Render procedural 3D scenes into MODUS webdataset shards (all 15 modalities, exact labels).",
    )
    parser.add_argument("--out", required=True, help="output directory for the .tar shards and index.json")
    parser.add_argument("--num-samples", type=int, required=True, help="number of samples to generate")
    parser.add_argument("--image-size", type=int, default=512, help="side of the square images in pixels (default 512)")
    parser.add_argument("--samples-per-shard", type=int, default=256, help="samples per .tar shard (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed; sample i depends only on (seed, split, i)")
    parser.add_argument(
        "--split", choices=SPLITS, default="train", help="val: a held-out split, scenes disjoint from train's (default train)"
    )
    parser.add_argument("--feature-dim", type=int, default=64, help="width of the stand-in features (default 64)")
    parser.add_argument("--feature-grid", type=int, default=8, help="local features are GRID x GRID x DIM (default 8)")
    parser.add_argument("--rgb-format", choices=("jpg", "png"), default="jpg", help="storage of rgb (default jpg)")
    parser.add_argument("--prefix", default="synth", help="shard name prefix: PREFIX-000000.tar (default synth)")
    parser.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel (default 1)")
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    config = SynthConfig(
        image_size=args.image_size,
        seed=args.seed,
        split=args.split,
        feature_dim=args.feature_dim,
        feature_grid=args.feature_grid,
        rgb_format=args.rgb_format,
    )
    index = write_dataset(args.out, args.num_samples, config, args.samples_per_shard, args.prefix, args.workers)
    print(f"wrote {args.num_samples} samples; index: {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
