"""The synthetic renderer: geometry consistency, exact labels, determinism, readable shards."""

from __future__ import annotations

import re

import cv2
import numpy as np
import pytest

from modus_mega.datasets import synth
from modus_mega.data.shard_format import SkipCounter, file_keys
from modus_mega.data.shard_reader import iter_shard, read_index
from modus_mega.modalities import MODALITY_NAMES

SIZE = 96


def _normals_from_depth(depth: np.ndarray, camera: synth.Camera) -> np.ndarray:
    """Normals [H-2, W-2, 3] from back-projected depth by central differences (the reference).

    Output frame: x right, y up, z towards the camera, oriented to face the camera.
    """
    height, width = depth.shape
    u = (np.arange(width) + 0.5 - camera.cx) / camera.fx
    v = (np.arange(height) + 0.5 - camera.cy) / camera.fy
    points = np.stack([depth * u[None, :], depth * v[:, None], depth], axis=-1)  # OpenCV frame
    tangent_u = points[1:-1, 2:] - points[1:-1, :-2]
    tangent_v = points[2:, 1:-1] - points[:-2, 1:-1]
    normal = np.cross(tangent_u, tangent_v)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True) + 1e-12
    facing = np.sign((normal * points[1:-1, 1:-1]).sum(-1, keepdims=True))
    return -normal * facing * np.array([1.0, -1.0, -1.0])


def _smooth_object_interior(instance: np.ndarray) -> np.ndarray:
    """bool [H-2, W-2]: object pixels whose 3x3 neighbourhood is one instance."""
    height, width = instance.shape
    centre = instance[1:-1, 1:-1]
    same = np.ones_like(centre, dtype=bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            same &= instance[1 + dy : height - 1 + dy, 1 + dx : width - 1 + dx] == centre
    return same & (centre >= synth.FIRST_OBJECT_INSTANCE)


def _angle_degrees(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.degrees(np.arccos(np.clip((a * b).sum(-1), -1.0, 1.0)))


@pytest.mark.parametrize("index", range(4))
def test_normals_agree_with_depth_gradients(index: int) -> None:
    scene, rendering, _ = synth.generate_sample(index, synth.SynthConfig(image_size=SIZE))
    interior = _smooth_object_interior(rendering.instance)
    assert interior.sum() > 50
    reference = _normals_from_depth(rendering.depth.astype(np.float64), scene.camera)
    error = _angle_degrees(reference, rendering.normal[1:-1, 1:-1])[interior]
    assert np.median(error) < 2.0
    ground = _smooth_ground(rendering.instance)  # the plane: exact away from its silhouette
    assert np.percentile(_angle_degrees(reference, rendering.normal[1:-1, 1:-1])[ground], 99) < 0.5


def _smooth_ground(instance: np.ndarray) -> np.ndarray:
    height, width = instance.shape
    same = np.ones((height - 2, width - 2), dtype=bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            same &= instance[1 + dy : height - 1 + dy, 1 + dx : width - 1 + dx] == synth.GROUND_INSTANCE
    return same


def test_culled_ray_casting_matches_brute_force() -> None:
    # The renderer only casts the rays inside each object's projected bounding sphere;
    # intersecting every ray with every object must give the same picture.
    for index in range(4):
        scene, rendering, _ = synth.generate_sample(index, synth.SynthConfig(image_size=SIZE))
        dx, dy, dz = scene.camera.ray_directions()
        origin = tuple(scene.camera.position)
        ground = np.where(dy < 0, -origin[1] / np.where(dy < 0, dy, -1.0), np.inf)
        hits = [np.where(ground <= synth.FAR_DEPTH, ground, np.inf)]
        hits += [synth._intersect(obj, origin, (dx, dy, dz)) for obj in scene.objects]
        hits_ = np.stack(hits)
        nearest = hits_.argmin(0)
        instance = np.where(np.isfinite(hits_.min(0)), nearest + synth.GROUND_INSTANCE, synth.SKY_INSTANCE)
        assert np.array_equal(instance.reshape(SIZE, SIZE), rendering.instance)
        depth = np.where(np.isfinite(hits_.min(0)), hits_.min(0), 0.0).reshape(SIZE, SIZE)
        assert np.allclose(depth, rendering.depth, rtol=1e-6)


def test_labels_are_consistent() -> None:
    for index in range(4):
        scene, rendering, values = synth.generate_sample(index, synth.SynthConfig(image_size=SIZE))
        sky = rendering.instance == synth.SKY_INSTANCE
        assert np.array_equal(sky, rendering.depth == 0)
        assert np.array_equal(sky, rendering.seg == synth.CLASS_NAMES.index("sky"))
        assert np.allclose(np.linalg.norm(rendering.normal[~sky], axis=-1), 1.0, atol=1e-5)
        cam = scene.camera
        u = (np.arange(SIZE) + 0.5 - cam.cx) / cam.fx
        v = (np.arange(SIZE) + 0.5 - cam.cy) / cam.fy
        rays = np.stack(np.broadcast_arrays(u[None, :], -v[:, None], -1.0), axis=-1)  # x right, y up, z back
        assert ((rendering.normal * rays).sum(-1)[~sky] < 1e-6).all()  # visible surfaces face the camera
        for k, obj in enumerate(scene.objects):
            mask = rendering.instance == synth.FIRST_OBJECT_INSTANCE + k
            assert (rendering.seg[mask] == synth.CLASS_NAMES.index(obj.shape)).all()
        grey = cv2.cvtColor(values["rgb"], cv2.COLOR_RGB2GRAY)
        assert np.array_equal(values["canny"], cv2.Canny(grey, 100, 200) > 0)
        edges = values["sam_edge"]
        # Every pixel whose right or lower neighbour is another instance is an edge, and only those.
        inst = rendering.instance
        expected = np.zeros_like(edges)
        for y in range(inst.shape[0]):
            for x in range(inst.shape[1]):
                right = x + 1 < inst.shape[1] and inst[y, x + 1] != inst[y, x]
                below = y + 1 < inst.shape[0] and inst[y + 1, x] != inst[y, x]
                expected[y, x] = right or below
        assert np.array_equal(edges, expected)


def test_boxes_enclose_instance_masks() -> None:
    checked = 0
    for index in range(6):
        scene, rendering, values = synth.generate_sample(index, synth.SynthConfig(image_size=SIZE))
        detections = values["detection"]
        names = [f"{o.colour} {o.shape}" for o in scene.objects]
        for box, cls in zip(detections.boxes, detections.classes):
            matches = [
                k for k, o in enumerate(scene.objects)
                if o.shape == cls and _mask_box(rendering.instance == synth.FIRST_OBJECT_INSTANCE + k) == tuple(box)
            ]
            assert len(matches) == 1, (names, box)
            rows, cols = np.nonzero(rendering.instance == synth.FIRST_OBJECT_INSTANCE + matches[0])
            x0, y0, x1, y1 = box
            assert x0 <= cols.min() and cols.max() + 1 <= x1 and y0 <= rows.min() and rows.max() + 1 <= y1
            checked += 1
        grounding = values["grounding"]
        for expression, box in zip(grounding.expressions, grounding.boxes):
            colour, shape = re.match(r"the (\w+) (\w+)", expression).groups()  # type: ignore[union-attr]
            k = names.index(f"{colour} {shape}")
            assert _mask_box(rendering.instance == synth.FIRST_OBJECT_INSTANCE + k) == tuple(box)
    assert checked >= 12


def _mask_box(mask: np.ndarray) -> tuple[float, ...]:
    rows, cols = np.nonzero(mask)
    return (float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1))


def test_relations_in_captions_are_true() -> None:
    checked = 0
    for index in range(10):
        scene, rendering, values = synth.generate_sample(index, synth.SynthConfig(image_size=SIZE))
        names = [f"{o.colour} {o.shape}" for o in scene.objects]
        for caption in values["caption"]:
            found = re.fullmatch(r"an? (\w+ \w+) (left of|right of|in front of|behind) an? (\w+ \w+)\.", caption)
            if not found:
                continue
            a, relation, b = found.groups()
            mask_a = rendering.instance == synth.FIRST_OBJECT_INSTANCE + names.index(a)
            mask_b = rendering.instance == synth.FIRST_OBJECT_INSTANCE + names.index(b)
            centre_a, centre_b = np.nonzero(mask_a)[1].mean(), np.nonzero(mask_b)[1].mean()
            depth_a, depth_b = np.median(rendering.depth[mask_a]), np.median(rendering.depth[mask_b])
            truth = {
                "left of": centre_a < centre_b,
                "right of": centre_a > centre_b,
                "in front of": depth_a < depth_b,
                "behind": depth_a > depth_b,
            }
            assert truth[relation], caption
            checked += 1
    assert checked >= 5


def test_generation_is_deterministic() -> None:
    config = synth.SynthConfig(image_size=32)
    _, _, first = synth.generate_sample(7, config)
    _, _, again = synth.generate_sample(7, config)
    _, _, other = synth.generate_sample(7, synth.SynthConfig(image_size=32, seed=1))
    for name in ("rgb", "depth", "normal", "seg", "sam_seg", "dinov2_local", "clip_global"):
        assert np.array_equal(first[name], again[name]), name
    assert not np.array_equal(first["rgb"], other["rgb"])
    assert first["caption"] == again["caption"]



def test_held_out_split_never_shares_a_scene_stream_with_train() -> None:
    """Every val scene's random stream differs from every train scene's (same seed), and train keeps its old keys."""
    train, val = synth.SynthConfig(image_size=32), synth.SynthConfig(image_size=32, split="val")

    def states(config: synth.SynthConfig, num: int) -> set[tuple[int, ...]]:
        return {tuple(np.random.SeedSequence(synth.scene_key(i, config)).generate_state(4)) for i in range(num)}

    assert not states(train, 2000) & states(val, 2000)
    assert np.random.default_rng(synth.scene_key(5, train)).random() == np.random.default_rng([0, 5]).random()
    _, _, train_sample = synth.generate_sample(3, train)
    _, _, val_sample = synth.generate_sample(3, val)
    assert not np.array_equal(train_sample["rgb"], val_sample["rgb"])


def test_dataset_bytes_do_not_depend_on_workers(tmp_path) -> None:
    config = synth.SynthConfig(image_size=32, feature_dim=8, feature_grid=2)
    synth.write_dataset(tmp_path / "a", 10, config, samples_per_shard=4, progress=False)
    synth.write_dataset(tmp_path / "b", 10, config, samples_per_shard=4, workers=2, progress=False)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["index.json", "synth-000000.tar", "synth-000001.tar", "synth-000002.tar"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_shards_decode_to_the_rendered_values(tmp_path) -> None:
    config = synth.SynthConfig(image_size=48, feature_dim=16, feature_grid=4, rgb_format="png")
    synth.write_dataset(tmp_path, 6, config, samples_per_shard=4, progress=False)
    shards = read_index(tmp_path)
    assert [s.num_samples for s in shards] == [4, 2]
    counter = SkipCounter()
    samples = [s for shard in shards for s in iter_shard(shard.path, counter, expected_samples=shard.num_samples)]
    assert counter.samples_ok == 6 and counter.num_skipped == 0 and not counter.ignored_files
    for i, sample in enumerate(samples):
        assert sample.key == synth.sample_key(i)
        scene, rendering, values = synth.generate_sample(i, config)
        assert set(sample.modalities) == set(values)
        assert set(values) >= set(MODALITY_NAMES) - {"grounding"}
        assert np.array_equal(sample.modalities["rgb"], values["rgb"])
        assert np.abs(sample.modalities["depth"] - values["depth"]).max() <= 0.0005 + 1e-6
        assert np.array_equal(sample.valid["depth"], values["depth"] > 0)
        sky = ~sample.valid["depth"]
        assert np.abs(sample.modalities["normal"][~sky] - values["normal"][~sky]).max() < 0.02
        for name in ("seg", "sam_seg", "canny", "sam_edge"):
            assert np.array_equal(sample.modalities[name], values[name]), name
        assert sample.modalities["caption"] == values["caption"]
        assert np.array_equal(sample.modalities["detection"].boxes, values["detection"].boxes)
        assert sample.modalities["detection"].classes == values["detection"].classes
        for name in ("dinov2_global", "dinov2_local", "clip_global", "imagebind_global", "imagebind_local"):
            assert np.array_equal(sample.modalities[name], values[name]), name
        assert sample.modalities["dinov2_local"].shape == (4, 4, 16)
        # Geometry survives storage: depth (mm PNG) and normals (8-bit PNG) still agree.
        interior = _smooth_object_interior(sample.modalities["sam_seg"])
        reference = _normals_from_depth(sample.modalities["depth"].astype(np.float64), scene.camera)
        error = _angle_degrees(reference, sample.modalities["normal"][1:-1, 1:-1])[interior]
        assert interior.sum() == 0 or np.median(error) < 4.0


def test_file_keys_cover_every_modality() -> None:
    keys = file_keys()
    assert set(keys) == set(MODALITY_NAMES)
    assert keys["detection"] == "det"
    assert len(set(keys.values())) == len(keys)


def test_cli_writes_shards(tmp_path) -> None:
    assert synth.main(["--out", str(tmp_path), "--num-samples", "3", "--image-size", "16", "--feature-grid", "2"]) == 0
    assert [s.num_samples for s in read_index(tmp_path)] == [3]
    with pytest.raises(SystemExit):
        synth.main(["--out", str(tmp_path), "--num-samples", "0"])
