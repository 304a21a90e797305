"""The shard builder for real images: every labeler on a tiny random-weight model, the geometry
helpers against exact references, and the CLI end to end (corrupt images, missing weights)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

from modus_mega.datasets import build_shards, labelers, synth
from modus_mega.datasets.labelers import LabelerOptions
from modus_mega.data.shard_format import SkipCounter
from modus_mega.data.shard_reader import iter_shard, read_index

SIZE = 32  # sample side in the end-to-end tests
RESOLUTION = 32  # input side of the tiny models
CAPTION_WORDS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "a", "photo", "of", "cat", "dog", "red", "blue", "on", "grass"]


# ----------------------------------------------------------------------------- tiny checkpoints


def _save(model: torch.nn.Module, processor: object, path: Path) -> Path:
    model.save_pretrained(path)
    processor.save_pretrained(path)  # type: ignore[attr-defined]
    return path


def _tiny_depth(path: Path) -> Path:
    config = tf.DPTConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=RESOLUTION,
        patch_size=8, backbone_out_indices=[0, 1], neck_hidden_sizes=[8, 16], reassemble_factors=[2, 1],
        fusion_hidden_size=8, head_hidden_size=8, initializer_range=0.2,  # 0.02 gives a map with no contrast
    )
    model = tf.DPTForDepthEstimation(config)
    processor = tf.DPTImageProcessor(size={"height": RESOLUTION, "width": RESOLUTION}, keep_aspect_ratio=False)
    return _save(model, processor, path)


def _tiny_seg(path: Path) -> Path:
    classes = {i: f"class{i}" for i in range(5)}
    config = tf.SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], num_attention_heads=[1, 2],
        patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2], decoder_hidden_size=16,
        id2label=classes, label2id={v: k for k, v in classes.items()},
    )
    processor = tf.SegformerImageProcessor(size={"height": RESOLUTION, "width": RESOLUTION})
    return _save(tf.SegformerForSemanticSegmentation(config), processor, path)


def _tiny_dinov2(path: Path) -> Path:
    config = tf.Dinov2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, patch_size=8, image_size=RESOLUTION
    )
    processor = tf.BitImageProcessor(  # DINOv2's recipe: resize larger, centre-crop (which the labeler skips)
        size={"shortest_edge": 40}, crop_size={"height": RESOLUTION, "width": RESOLUTION}, do_center_crop=True,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    )
    return _save(tf.Dinov2Model(config), processor, path)


def _tiny_clip(path: Path) -> Path:
    config = tf.CLIPVisionConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=RESOLUTION,
        patch_size=8, projection_dim=12,
    )
    processor = tf.CLIPImageProcessor(size={"shortest_edge": RESOLUTION}, crop_size={"height": RESOLUTION, "width": RESOLUTION})
    return _save(tf.CLIPVisionModelWithProjection(config), processor, path)


def _tiny_caption(path: Path, eos_bias: float) -> Path:
    """A BLIP captioner; ``eos_bias`` -inf never ends early, +inf ends at once (an empty caption)."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(CAPTION_WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = tf.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]"
    )
    eos = tokenizer.eos_token_id
    config = tf.BlipConfig(
        vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=RESOLUTION, patch_size=8),
        text_config=dict(
            vocab_size=len(CAPTION_WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, encoder_hidden_size=16, max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=eos, sep_token_id=eos, pad_token_id=tokenizer.pad_token_id,
        ),
        projection_dim=16,
    )
    model = tf.BlipForConditionalGeneration(config)
    with torch.no_grad():
        model.text_decoder.cls.predictions.decoder.bias[eos] = eos_bias
    tokenizer.save_pretrained(path)
    return _save(model, tf.BlipImageProcessor(size={"height": RESOLUTION, "width": RESOLUTION}), path)


def _tiny_detection(path: Path) -> Path:
    classes = {0: "cat", 1: "dog", 2: "car"}
    config = tf.YolosConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=[RESOLUTION, RESOLUTION],
        patch_size=8, num_detection_tokens=6, id2label=classes, label2id={v: k for k, v in classes.items()},
    )
    processor = tf.YolosImageProcessor(size={"shortest_edge": RESOLUTION, "longest_edge": RESOLUTION})
    return _save(tf.YolosForObjectDetection(config), processor, path)


def _tiny_sam(path: Path) -> Path:
    config = tf.SamConfig(
        vision_config=tf.SamVisionConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=64, patch_size=8, output_channels=16,
            window_size=0, global_attn_indexes=[0], mlp_dim=32, num_pos_feats=8,
        ),
        prompt_encoder_config=tf.SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4),
        mask_decoder_config=tf.SamMaskDecoderConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=32, iou_head_hidden_dim=16),
    )
    processor = tf.SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
    return _save(tf.SamModel(config), processor, path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights directory with one tiny random checkpoint per model labeler."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    _tiny_depth(root / "depth")
    _tiny_seg(root / "seg")
    _tiny_dinov2(root / "dinov2")
    _tiny_clip(root / "clip")
    _tiny_caption(root / "caption", eos_bias=-1e4)
    _tiny_caption(root / "caption_empty", eos_bias=1e4)
    _tiny_detection(root / "detection")
    _tiny_sam(root / "sam")
    return root


def _images(count: int, size: int = 40, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [cv2.GaussianBlur(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), (5, 5), 0) for _ in range(count)]


def _reference_pixels(image: np.ndarray, side: int, mean: list[float], std: list[float]) -> torch.Tensor:
    """[1, 3, side, side]: the whole image resized (PIL bicubic) and normalised, built by hand."""
    resized = np.asarray(Image.fromarray(image).resize((side, side), Image.BICUBIC), dtype=np.float32) / 255.0
    return torch.from_numpy(((resized - np.array(mean)) / np.array(std)).astype(np.float32)).permute(2, 0, 1)[None]


# ----------------------------------------------------------------------------- geometry


def test_relative_depth_inverts_an_affine_disparity() -> None:
    near, far = 2.0, 40.0
    depth = np.geomspace(near, far, 64, dtype=np.float64).reshape(8, 8)
    disparity = 3.0 / depth + 0.7  # unknown scale and shift, as a relative model predicts
    assert np.allclose(labelers.relative_to_depth(disparity, near, far), depth, rtol=1e-5)
    with_nan = disparity.copy()
    with_nan[0, 0] = np.nan
    assert labelers.relative_to_depth(with_nan, near, far)[0, 0] == 0.0
    assert labelers.relative_to_depth(np.full((4, 4), 0.3), near, far) is None  # no contrast: no scale
    with pytest.raises(ValueError, match="near < far"):
        labelers.relative_to_depth(disparity, far, near)


def test_normals_of_a_tilted_plane_are_exact() -> None:
    height, width, fov = 24, 32, 70.0
    focal = (width / 2) / math.tan(math.radians(fov) / 2)
    u = (np.arange(width) + 0.5 - width / 2) / focal
    v = (np.arange(height) + 0.5 - height / 2) / focal
    rays = np.stack(np.broadcast_arrays(u[None, :], v[:, None], 1.0), axis=-1)  # OpenCV frame, z = 1
    plane = np.array([0.3, -0.5, -0.8]) / np.linalg.norm([0.3, -0.5, -0.8])  # faces the camera (n_z < 0)
    depth = -5.0 / (rays @ plane)  # points p = z * ray with p . n = -5
    assert (depth > 0).all()
    normal, valid = labelers.normals_from_depth(depth, depth > 0, fov)
    assert valid.all()
    expected = plane * np.array([1.0, -1.0, -1.0])  # x right, y up, z towards the camera
    assert np.abs(normal - expected).max() < 1e-5


def test_normals_from_rendered_depth_match_rendered_normals() -> None:
    # The synthetic renderer's analytic normals are an independent reference.
    for index in range(2):
        scene, rendering, _ = synth.generate_sample(index, synth.SynthConfig(image_size=96))
        camera = scene.camera
        assert camera.cx == camera.width / 2 and camera.fx == camera.fy
        fov = math.degrees(2 * math.atan(camera.width / 2 / camera.fx))
        normal, valid = labelers.normals_from_depth(rendering.depth, rendering.depth > 0, fov)
        assert np.array_equal(valid, rendering.depth > 0)  # every surface pixel has a neighbour on its surface here
        cosine = np.clip((normal * rendering.normal).sum(-1), -1, 1)[valid]
        error = np.degrees(np.arccos(cosine))
        assert np.median(error) < 1.0
        assert np.percentile(error, 90) < 10.0  # one-sided differences at occlusion edges stay on their surface


def test_box_nms_is_greedy_by_score() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [6, 0, 16, 10], [20, 20, 30, 30]], dtype=np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    # IoU(0, 1) = 0.82: box 1 goes; IoU(0, 2) = 0.25: box 2 survives 0.5 but not 0.2 (box 1, dropped, suppresses nothing)
    assert labelers.box_nms(boxes, scores, 0.5).tolist() == [0, 2, 3]
    assert labelers.box_nms(boxes, scores, 0.2).tolist() == [0, 3]


def test_paint_instances_puts_small_masks_on_top_and_renumbers() -> None:
    masks = np.zeros((3, 6, 6), dtype=bool)
    masks[0] = True  # the whole image
    masks[1, 1:3, 1:3] = True  # a part on top of it
    masks[2, 1, 1] = True  # a smaller part on top of that
    labels = labelers.paint_instances(masks)
    assert labels[0, 0] == 1 and labels[1, 2] == 2 and labels[1, 1] == 3
    hidden = np.zeros((5, 6, 6), dtype=bool)
    hidden[0, 1:3, 1:3] = True  # entirely covered by the four single pixels below: it keeps no pixel
    for k, (y, x) in enumerate([(1, 1), (1, 2), (2, 1), (2, 2)]):
        hidden[1 + k, y, x] = True
    labels = labelers.paint_instances(hidden)
    assert sorted(np.unique(labels).tolist()) == [0, 1, 2, 3, 4]  # 0 uncovered, then contiguous ids
    assert sorted(labels[1:3, 1:3].ravel().tolist()) == [1, 2, 3, 4]
    assert np.unique(labelers.paint_instances(np.stack([masks[0], masks[0]]))).tolist() == [1]  # full cover: no 0


def test_instance_boundaries_follow_the_synth_rule() -> None:
    labels = np.array([[0, 0, 1], [0, 2, 1], [2, 2, 1]])
    expected = np.array([[False, True, False], [True, True, False], [False, True, False]])
    assert np.array_equal(labelers.instance_boundaries(labels), expected)


# ----------------------------------------------------------------------------- labelers


def test_depth_labeler_pins_the_disparity_range(weights: Path) -> None:
    options = LabelerOptions(relative_depth_range=(2.0, 30.0))
    labeler = labelers.DepthLabeler(weights / "depth", options)
    assert labeler.kind == "relative"
    images = _images(2, size=SIZE)
    results = labeler(images)
    model = tf.DPTForDepthEstimation.from_pretrained(weights / "depth")
    mean, std = labeler.processor.image_mean, labeler.processor.image_std
    for image, result in zip(images, results):
        depth = result.values["depth"]
        assert depth.shape == (SIZE, SIZE) and depth.dtype == np.float32
        assert np.isclose(depth.min(), 2.0, rtol=1e-4) and np.isclose(depth.max(), 30.0, rtol=1e-4)
        with torch.no_grad():
            disparity = model(pixel_values=_reference_pixels(image, RESOLUTION, mean, std)).predicted_depth  # [1, h, w]
        reference = F.interpolate(disparity[None], size=(SIZE, SIZE), mode="bicubic", align_corners=False)[0, 0].numpy()
        # inverse depth is affine in the disparity: nearer where the model says nearer
        assert np.corrcoef(1.0 / depth.ravel(), reference.ravel())[0, 1] > 0.999
    metric = labelers.DepthLabeler(weights / "depth", LabelerOptions(depth_kind="metric"))(images[:1])[0]
    assert metric.values["depth"].max() > 0 and (metric.values["depth"] >= 0).all()
    with pytest.raises(ValueError, match="0 < near < far"):  # refused before any image is labelled
        labelers.DepthLabeler(weights / "depth", LabelerOptions(relative_depth_range=(5.0, 1.0)))


def test_segmentation_labeler_matches_the_processor_postprocessing(weights: Path) -> None:
    labeler = labelers.SegmentationLabeler(weights / "seg", LabelerOptions())
    images = _images(2, size=SIZE)
    results = labeler(images)
    with torch.no_grad():
        outputs = labeler.model(**labeler.processor(images=images, return_tensors="pt"))
    reference = labeler.processor.post_process_semantic_segmentation(outputs, target_sizes=[(SIZE, SIZE)] * 2)
    for result, expected in zip(results, reference):
        seg = result.values["seg"]
        assert seg.dtype == np.int32 and seg.shape == (SIZE, SIZE)
        assert np.array_equal(seg, expected.numpy())
    assert labeler.provenance()["classes"][3] == "class3"


def test_dinov2_labeler_covers_the_whole_image(weights: Path) -> None:
    labeler = labelers.Dinov2Labeler(weights / "dinov2", LabelerOptions())
    images = _images(2, size=48)
    results = labeler(images)
    for image, result in zip(images, results):
        pixels = _reference_pixels(image, RESOLUTION, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # no centre crop
        with torch.no_grad():
            tokens = labeler.model(pixel_values=pixels).last_hidden_state[0].numpy()  # [1 + 16, D]
        local = result.values["dinov2_local"]
        assert local.shape == (4, 4, 16) and result.values["dinov2_global"].shape == (16,)
        assert np.allclose(result.values["dinov2_global"], tokens[0], atol=1e-4)
        assert np.allclose(local[1, 2], tokens[1 + 1 * 4 + 2], atol=1e-4)  # row-major grid
        assert np.allclose(local.reshape(16, 16), tokens[1:], atol=1e-4)


def test_clip_labeler_is_the_normalised_image_embedding(weights: Path) -> None:
    labeler = labelers.ClipLabeler(weights / "clip", LabelerOptions())
    image = _images(1, size=48)[0]
    (result,) = labeler([image])
    pixels = _reference_pixels(image, RESOLUTION, labeler.processor.image_mean, labeler.processor.image_std)
    with torch.no_grad():
        embed = labeler.model(pixel_values=pixels).image_embeds[0].numpy()
    clip = result.values["clip_global"]
    assert clip.shape == (12,) and np.isclose(np.linalg.norm(clip), 1.0, atol=1e-5)
    assert np.allclose(clip, embed / np.linalg.norm(embed), atol=1e-4)


def test_caption_labeler_decodes_and_reports_empty_captions(weights: Path) -> None:
    images = _images(2, size=SIZE)
    labeler = labelers.CaptionLabeler(weights / "caption", LabelerOptions(caption_max_new_tokens=5))
    results = labeler(images)
    with torch.no_grad():
        ids = labeler.model.generate(**labeler.processor(images=images, return_tensors="pt"), max_new_tokens=5, do_sample=False)
    for result, row in zip(results, ids.tolist()):
        words = [CAPTION_WORDS[i] for i in row if not CAPTION_WORDS[i].startswith("[")]
        assert len(words) == 5  # end-of-sequence is suppressed in this model
        assert result.values["caption"] == [" ".join(words)]
    empty = labelers.CaptionLabeler(weights / "caption_empty", LabelerOptions(caption_max_new_tokens=5))(images)
    assert all(r.values == {} and r.skipped == {"caption": labelers.EMPTY_OUTPUT} for r in empty)


def test_detection_labeler_boxes_lie_in_the_image(weights: Path) -> None:
    options = LabelerOptions(detection_threshold=0.0, max_detections=4)
    labeler = labelers.DetectionLabeler(weights / "detection", options)
    image = _images(1, size=SIZE)[0]
    (result,) = labeler([image])
    detections = result.values["detection"]
    assert detections.width == SIZE and detections.height == SIZE
    assert 1 <= len(detections.classes) <= 4 and set(detections.classes) <= {"cat", "dog", "car"}
    assert (detections.boxes >= 0).all() and (detections.boxes <= SIZE).all()
    assert (detections.boxes[:, 2:] > detections.boxes[:, :2]).all()
    assert (np.diff(detections.scores) <= 0).all()
    (none,) = labelers.DetectionLabeler(weights / "detection", LabelerOptions(detection_threshold=1.01))([image])
    assert len(none.values["detection"].classes) == 0  # nothing detected is a valid answer


def test_sam_labeler_paints_instances_and_their_edges(weights: Path) -> None:
    image = _images(1, size=SIZE)[0]
    keep_all = LabelerOptions(sam_points_per_side=3, sam_points_per_batch=4, sam_pred_iou_threshold=-1e9,
                              sam_stability_threshold=-1.0, sam_nms_threshold=1.0)
    (result,) = labelers.SamLabeler(weights / "sam", keep_all)([image])
    instances, edges = result.values["sam_seg"], result.values["sam_edge"]
    assert instances.dtype == np.int32 and instances.shape == (SIZE, SIZE)
    ids = np.unique(instances)
    assert ids.max() >= 1 and np.array_equal(ids, np.arange(ids.min(), ids.max() + 1))  # contiguous ids
    right = np.zeros_like(edges)
    right[:, :-1] = np.diff(instances, axis=1) != 0
    below = np.zeros_like(edges)
    below[:-1, :] = np.diff(instances, axis=0) != 0
    assert np.array_equal(edges, right | below)
    strict = LabelerOptions(sam_points_per_side=2, sam_pred_iou_threshold=1e9)
    (nothing,) = labelers.SamLabeler(weights / "sam", strict)([image])
    assert not nothing.values["sam_seg"].any() and not nothing.values["sam_edge"].any()


def test_a_directory_that_does_not_load_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=str(tmp_path)):
        labelers.SegmentationLabeler(tmp_path, LabelerOptions())


# ----------------------------------------------------------------------------- end to end


def _image_folder(root: Path) -> dict[str, bool]:
    """A few images in several formats and sizes, one truncated and one not an image at all."""
    root.mkdir()
    (root / "nested").mkdir()
    pictures = _images(4, size=48, seed=1)
    Image.fromarray(pictures[0]).save(root / "a.jpg", quality=95)
    Image.fromarray(pictures[1][:, :40]).save(root / "b.png")  # not square
    Image.fromarray(pictures[2]).convert("L").save(root / "nested" / "c.webp")  # grey
    Image.fromarray(pictures[3]).convert("RGBA").resize((20, 20)).save(root / "nested" / "d.PNG")  # small: enlarged
    data = (root / "a.jpg").read_bytes()
    (root / "broken.jpg").write_bytes(data[: len(data) // 2])  # truncated JPEG
    (root / "text.png").write_text("not an image")
    (root / "notes.txt").write_text("ignored: not an image suffix")
    return {"a.jpg": True, "b.png": True, "broken.jpg": False, "nested/c.webp": True, "nested/d.PNG": True, "text.png": False}


def _read_all(out: Path) -> list:
    counter = SkipCounter()
    samples = [s for info in read_index(out) for s in iter_shard(info.path, counter, expected_samples=info.num_samples)]
    assert counter.num_skipped == 0 and not counter.ignored_files
    return samples


def test_cli_builds_readable_shards_and_counts_skips(tmp_path: Path, weights: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images, out = tmp_path / "images", tmp_path / "out"
    expected = _image_folder(images)
    argv = [
        "--images", str(images), "--out", str(out), "--weights-dir", str(weights),
        "--labelers", "depth,normal,seg,dinov2,clip,caption,detection", "--image-size", str(SIZE),
        "--samples-per-shard", "2", "--batch-size", "2", "--device", "cpu", "--rgb-format", "png", "--caption-max-tokens", "4",
        "--quiet",
    ]
    assert build_shards.main(argv) == 0
    printed = capsys.readouterr().out
    assert "images: 6 found, 4 written, 2 skipped (undecodable=2)" in printed
    # Keys are positions in the sorted image list, so the source of every sample is known.
    ordered = sorted(expected)  # a.jpg, b.png, broken.jpg, nested/c.webp, nested/d.PNG, text.png
    sources = dict(line.split("\t") for line in (out / "sources.tsv").read_text().splitlines())
    assert sources == {f"{i:09d}": name for i, name in enumerate(ordered) if expected[name]}
    samples = _read_all(out)
    assert sorted(s.key for s in samples) == sorted(sources)
    for sample in samples:
        assert set(sample.modalities) == {
            "rgb", "depth", "normal", "seg", "canny", "caption", "detection", "dinov2_global", "dinov2_local", "clip_global"
        }
        assert sample.image_size == (SIZE, SIZE)
        assert sample.valid["depth"].all() and sample.valid["normal"].any()
        rgb = sample.modalities["rgb"]
        assert np.array_equal(rgb, build_shards.load_square_image(images / sources[sample.key], SIZE))
        assert np.array_equal(sample.modalities["canny"], cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), 100, 200) > 0)
    # b.png is 48 x 40: shorter side 40 -> 32, so 38 x 32, centre rows 3..35
    b = next(s for s in samples if sources[s.key] == "b.png").modalities["rgb"]
    original = np.asarray(Image.open(images / "b.png"))
    assert np.array_equal(b, cv2.resize(original, (32, 38), interpolation=cv2.INTER_AREA)[3:35])
    # Shard 1 held broken.jpg and nested/c.webp; shards never hold more than samples_per_shard.
    index = json.loads((out / "index.json").read_text())
    assert [s["num_samples"] for s in index["shards"]] == [2, 1, 1]
    counts = index["generator"]["counts"]
    assert counts["image_skips"] == {"undecodable": 2} and counts["written"]["dinov2_local"] == 4
    assert index["generator"]["labelers"]["depth"]["kind"] == "relative"


def test_missing_weights_skip_their_modalities_with_a_count(tmp_path: Path, weights: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images, out = tmp_path / "images", tmp_path / "out"
    _image_folder(images)
    argv = [
        "--images", str(images), "--out", str(out), "--labelers", "depth,normal,seg,clip",
        "--weights", f"seg={weights / 'seg'}", "--weights", f"clip={tmp_path / 'absent'}",
        "--image-size", str(SIZE), "--device", "cpu", "--quiet",
    ]
    assert build_shards.main(argv) == 0
    printed = capsys.readouterr().out
    rows = {line.split()[0]: line for line in printed.splitlines()[2:] if line.strip() and not line.startswith("index")}
    assert rows["seg"].split()[1:3] == ["4", "0"]
    assert rows["depth"].split()[1:3] == ["0", "4"] and "no weights directory" in rows["depth"]
    assert rows["normal"].split()[1:3] == ["0", "4"] and "depth unavailable" in rows["normal"]
    assert rows["clip_global"].split()[1:3] == ["0", "4"] and f"{tmp_path / 'absent'} not found" in rows["clip_global"]
    for sample in _read_all(out):
        assert set(sample.modalities) == {"rgb", "canny", "seg"}


def test_empty_labels_are_counted_and_the_sample_is_kept(tmp_path: Path, weights: Path) -> None:
    images, out = tmp_path / "images", tmp_path / "out"
    _image_folder(images)
    config = build_shards.BuildConfig(
        image_size=SIZE, labelers=("caption", "sam"), weights={"caption": weights / "caption_empty", "sam": weights / "sam"},
        options=LabelerOptions(caption_max_new_tokens=3, sam_points_per_side=2),
    )
    stats, modalities = build_shards.build_dataset(images, out, config, progress=False)
    assert stats.skipped["caption"] == {labelers.EMPTY_OUTPUT: 4}
    assert stats.written["sam_seg"] == stats.written["sam_edge"] == stats.written["rgb"] == 4
    assert modalities == ["rgb", "canny", "sam_seg", "sam_edge", "caption"]
    assert all("caption" not in s.modalities for s in _read_all(out))


def test_workers_do_not_change_the_output(tmp_path: Path) -> None:
    images = tmp_path / "images"
    _image_folder(images)
    config = build_shards.BuildConfig(image_size=SIZE, samples_per_shard=1, labelers=())
    build_shards.build_dataset(images, tmp_path / "one", config, workers=1, progress=False)
    build_shards.build_dataset(images, tmp_path / "two", config, workers=2, progress=False)
    one, two = sorted((tmp_path / "one").glob("*.tar")), sorted((tmp_path / "two").glob("*.tar"))
    assert [p.name for p in one] == [p.name for p in two] == [f"images-{i:06d}.tar" for i in (0, 1, 3, 4)]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(one, two))
    assert (tmp_path / "one" / "sources.tsv").read_text() == (tmp_path / "two" / "sources.tsv").read_text()


def test_bad_arguments_name_the_fix(tmp_path: Path) -> None:
    images, empty = tmp_path / "images", tmp_path / "empty"
    _image_folder(images)
    empty.mkdir()
    with pytest.raises(ValueError, match="add depth to --labelers"):
        build_shards.build_dataset(images, tmp_path / "out", build_shards.BuildConfig(labelers=("normal",)))
    with pytest.raises(ValueError, match="NAME=DIR"):
        build_shards._parse_weights(["normal=/x"], None, ("normal",))
    with pytest.raises(ValueError, match="no jpg/jpeg/png/webp images"):
        build_shards.build_dataset(empty, tmp_path / "out", build_shards.BuildConfig(labelers=()), progress=False)
