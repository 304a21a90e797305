"""The browser demo served on a loopback port and driven through ``gradio_client``, a real HTTP client."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from PIL import Image

from modus_mega.data.shard_writer import encode_modality
from modus_mega.datasets.synth import SynthConfig, generate_sample
from modus_mega.demo.__main__ import build_parser, main
from modus_mega.demo.app import API_NAME, build_app
from modus_mega.demo.examples import write_examples
from modus_mega.demo.session import DemoRequest, DemoSession
from tests.inference.test_generate_cli import SIZE, checkpoints  # noqa: F401 (the tiny checkpoint fixture)

TIMEOUT_S = 60  # a request on the tiny model takes seconds; this only bounds a hang


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Client, str, Path]]:
    """The demo of the tiny checkpoint on a free loopback port, a client of it, its url, and an example picture."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    root = tmp_path_factory.mktemp("demo")
    examples = write_examples(root / "examples", SIZE, count=1)
    app = build_app(DemoSession(checkpoints["full"], size=SIZE), examples, root / "requests")
    app.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True, allowed_paths=[str(root)])
    try:
        yield Client(app.local_url, verbose=False), app.local_url, examples[0].image
    finally:
        app.close()


def _generate(client: Client, image: Path | None, conditions: list[str], targets: list[str], **extra: object) -> tuple:
    """One form submission through the HTTP API: (gallery, texts, zip, message)."""
    form = {"image": handle_file(str(image)) if image else None, "caption": "", "conditions": conditions,
            "targets": targets, "steps": 2, "guidance": 1.0, "seed": 0, "chain": False, "expression": "",
            "image_modality": "rgb"}  # fmt: skip
    form.update(extra)
    job = client.submit(*form.values(), api_name=f"/{API_NAME}")
    return job.result(timeout=TIMEOUT_S)


def test_each_target_family_comes_back_rendered(served: tuple[Client, str, Path]) -> None:
    client, _, picture = served
    gallery, texts, archive, message = _generate(client, picture, ["picture", "caption"], ["depth", "caption", "detection"],
                                                 caption="two green spheres", chain=True)  # fmt: skip
    assert message.startswith("Generated"), message
    labels = [item["caption"] for item in gallery]
    assert labels == ["condition rgb", "depth", "detection"]
    for item in gallery:
        assert Image.open(item["image"]).size == (SIZE, SIZE), item
    assert texts.startswith("caption: ")
    names = set(zipfile.ZipFile(archive).namelist())
    assert {"depth.png", "depth.ply", "detection.png", "detection.json", "caption.txt", "request.json"} <= names


def test_a_picture_of_another_size_is_fitted(served: tuple[Client, str, Path], tmp_path: Path) -> None:
    client, _, picture = served
    big = tmp_path / "big.jpg"
    Image.open(picture).resize((3 * SIZE, 2 * SIZE)).save(big)
    gallery, _, _, message = _generate(client, big, ["picture"], ["normal"])
    assert message.startswith("Generated"), message
    assert [Image.open(item["image"]).size for item in gallery] == [(SIZE, SIZE)] * 2


@pytest.mark.parametrize("side, message", [(SIZE, "Generated"), (2 * SIZE, "the generation size is")])
def test_a_depth_picture_is_read_exactly(served: tuple[Client, str, Path], tmp_path: Path, side: int, message: str) -> None:
    client, _, _ = served
    _, _, values = generate_sample(0, SynthConfig(image_size=side), encoders=[])
    (fmt, data), = encode_modality("depth", values["depth"]).items()
    (tmp_path / fmt).write_bytes(data)  # a 16-bit millimetre PNG, as in the shards
    gallery, _, _, status = _generate(client, tmp_path / fmt, ["picture"], ["normal"], image_modality="depth")
    assert message in status, status
    if side == SIZE:
        assert [item["caption"] for item in gallery] == ["condition depth", "normal"]


@pytest.mark.parametrize(
    "conditions, targets, extra, message",
    [
        (["picture"], [], {}, "no --target given"),
        (["picture"], ["dinov2_global"], {}, "needs its feature codebook"),
        (["picture"], ["grounding"], {}, "referring expression"),
        (["caption"], ["depth"], {}, "caption is empty"),
        (["picture"], ["depth"], {"image": None}, "no image was given"),
    ],
)
def test_a_bad_request_is_a_message(
    served: tuple[Client, str, Path], conditions: list[str], targets: list[str], extra: dict, message: str
) -> None:
    client, _, picture = served
    gallery, texts, archive, status = _generate(client, extra.pop("image", picture), conditions, targets, **extra)
    assert (gallery, texts, archive) == ([], "", None) and "Cannot generate" in status and message in status, status


def test_an_unreadable_image_is_a_message(served: tuple[Client, str, Path], tmp_path: Path) -> None:
    client, _, _ = served
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    *_, status = _generate(client, broken, ["picture"], ["depth"])
    assert "Cannot generate" in status and "not a readable image" in status, status


def test_a_target_without_its_tokenizer_is_refused_before_generating(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    session = DemoSession(checkpoints["bare"], size=SIZE)  # the same weights, no tokenizer files
    with pytest.raises(ValueError, match="needs the checkpoint's text tokenizer"):
        session.generate(DemoRequest(checkpoints["rgb"], "", ["picture"], ["caption"]), tmp_path / "out")
    assert not (tmp_path / "out" / "caption.txt").exists()
    with pytest.raises(ValueError, match="not a 2D modality"):  # the page's dropdown offers 2D modalities only
        session.generate(DemoRequest(checkpoints["rgb"], "", ["picture"], ["depth"], image_modality="caption"), tmp_path / "out")


def test_help_names_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--ckpt", "--ema", "--port", "--host"))
    assert build_parser().parse_args(["--ckpt", "x"]).host == "127.0.0.1"


def test_an_unreadable_checkpoint_is_one_line_and_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--ckpt", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "no such directory" in err, err


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no headless Chromium (Debian package chromium)")
def test_the_page_renders_in_a_browser(served: tuple[Client, str, Path], tmp_path: Path) -> None:
    _, url, _ = served
    shot = tmp_path / "page.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,900",
                    "--virtual-time-budget=10000", f"--screenshot={shot}", url], check=True, timeout=TIMEOUT_S)  # fmt: skip
    colours = Image.open(shot).convert("L").getextrema()
    assert colours[1] - colours[0] > 100  # a drawn page, not a blank one
