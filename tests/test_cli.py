"""The CLI on the real loading path: a tiny model saved to a folder and loaded with from_pretrained."""

from __future__ import annotations

import json
import subprocess

import pytest

from vlmkit.cli import main
from vlmkit.registry import parse_spec


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-qwen")
    assert main(["tiny", "qwen2_vl", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def image_path(tmp_path_factory, images):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    images[0].save(path)
    return path


def test_generate_from_local_folder(model_dir, image_path, capsys):
    code = main(["generate", "--model", str(model_dir), "--image", str(image_path), "--prompt", "Describe the image.",
                 "--max-new-tokens", "5", "--pruner", "uniform:keep=0.5", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["stats"]["new_tokens"] == len(result["token_ids"]) == 5
    assert result["stats"]["visual_tokens_kept"] == result["stats"]["visual_tokens_in"] // 2


def test_load_with_device_map(model_dir, image_path):
    import vlmkit

    vlm = vlmkit.load(model_dir, device_map="auto", dtype="float32")
    assert vlm.generate(image_path, "Describe the image.", max_new_tokens=3)[0].stats["new_tokens"] == 3


def test_errors_are_one_line(model_dir, image_path, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff garbage")
    cases = [
        (["--image", str(broken), "--prompt", "Describe."], "broken.jpg"),
        (["--image", str(image_path), "--prompt", " "], "empty"),
        (["--image", str(image_path), "--prompt", "Hi", "--pruner", "uniform:keep=9999"], "larger than"),
        (["--image", str(image_path), "--prompt", "Hi", "--decoder", "nope"], "unknown decoder"),
    ]
    for extra, needle in cases:
        assert main(["generate", "--model", str(model_dir), *extra]) == 2
        errors = capsys.readouterr().err.strip().splitlines()
        assert errors[-1].startswith("vlmkit: error:") and needle in errors[-1]


def test_console_script_prints_no_traceback(model_dir, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"")
    process = subprocess.run(
        ["vlmkit", "generate", "--model", str(model_dir), "--image", str(broken), "--prompt", "Hi"],
        capture_output=True, text=True, timeout=300,
    )
    assert process.returncode == 2
    assert "Traceback" not in process.stderr
    assert process.stderr.strip().splitlines()[-1] == "vlmkit: error: image 'broken.png' is empty (0 bytes)"


def test_missing_model_folder_is_a_clear_error(image_path, tmp_path, capsys):
    code = main(["generate", "--model", str(tmp_path / "nothing-here"), "--image", str(image_path), "--prompt", "Hi"])
    assert code == 2
    assert "cannot load model" in capsys.readouterr().err


def test_unknown_builtin(image_path, capsys):
    assert main(["generate", "--model", "builtin:nope", "--image", str(image_path), "--prompt", "Hi"]) == 2
    assert "no built-in model 'nope'" in capsys.readouterr().err


def test_spec_parsing():
    assert parse_spec("fastv:keep=64,layer=2,ratio=0.5,debias=true,mode=exp,layers=2|8|16") == (
        "fastv", {"keep": 64, "layer": 2, "ratio": 0.5, "debias": True, "mode": "exp", "layers": [2, 8, 16]}
    )
    assert parse_spec("vista") == ("vista", {})
