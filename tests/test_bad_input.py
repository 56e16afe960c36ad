"""Bad input gives one clear vlmkit error; odd but valid images are converted, not rejected."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from transformers import BertConfig, BertModel

import vlmkit
from vlmkit.errors import ConfigError, InputError, ModelNotSupported, VlmkitError
from vlmkit.images import load_image


@pytest.fixture(scope="module")
def vlm(tiny):
    return vlmkit.wrap(*tiny("llava"))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_corrupt_truncated_and_empty_files(vlm, tmp_path, images):
    good = png_bytes(images[0])
    cases = {"empty.png": b"", "truncated.png": good[: len(good) // 2], "garbage.jpg": b"not an image at all" * 10}
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(InputError, match=name.replace(".", r"\.")) as error:
            vlm.generate(path, "Describe the image.")
        assert "\n" not in str(error.value)
    with pytest.raises(InputError, match="no such file"):
        vlm.generate(tmp_path / "missing.png", "Describe the image.")


@pytest.mark.parametrize("size", [(20000, 20000), (9000, 8000)])
def test_huge_image_is_refused_before_decoding(vlm, tmp_path, size):
    path = tmp_path / "huge.png"
    Image.new("1", size).save(path)  # 1-bit: small in memory and on disk
    with pytest.raises(InputError, match="too large|above the limit"):
        vlm.generate(path, "Describe the image.")


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (30, 20), 128),
        Image.new("RGBA", (30, 20), (10, 200, 30, 128)),
        Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16)),
        Image.new("P", (30, 20)),
    ],
    ids=["grey", "rgba", "16-bit", "palette"],
)
def test_odd_modes_are_converted(vlm, image):
    assert load_image(image).mode == "RGB"
    assert load_image(png_bytes(image)).mode == "RGB"
    assert vlm.generate(image, "Describe the image.", max_new_tokens=2)[0].stats["new_tokens"] == 2


def test_sixteen_bit_grey_keeps_its_brightness():
    converted = load_image(Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)))
    assert np.asarray(converted).min() == 255


@pytest.mark.parametrize("prompt", ["", "   ", "\n"])
def test_empty_prompt(vlm, images, prompt):
    with pytest.raises(InputError, match="empty"):
        vlm.generate(images[0], prompt)


def test_mismatched_lists(vlm, images):
    with pytest.raises(InputError, match="3 images but 2 prompts"):
        vlm.generate(images, ["a", "b"])


@pytest.mark.parametrize("keep", [0, -3, 1.5, "many"])
def test_impossible_budget_options(keep):
    with pytest.raises(ConfigError, match="keep"):
        vlmkit.pruners.create("uniform", keep=keep)


def test_budget_larger_than_available(tiny, images):
    vlm = vlmkit.wrap(*tiny("llava"), pruner="uniform:keep=1000")
    with pytest.raises(ConfigError, match="larger than the 16 visual tokens"):
        vlm.generate(images[0], "Describe the image.")


def test_unknown_method_and_option(tiny):
    with pytest.raises(ConfigError, match="unknown pruner 'nope'"):
        vlmkit.pruners.create("nope")
    with pytest.raises(ConfigError, match="unknown decoder 'nope'"):
        vlmkit.decoders.create("nope")
    with pytest.raises(ConfigError, match="no option colour"):
        vlmkit.pruners.create_from_spec("uniform:keep=4,colour=red")
    with pytest.raises(ConfigError, match="unknown pruner"):
        vlmkit.wrap(*tiny("llava"), pruner="nope:keep=3")


def test_unsupported_model_class(tiny):
    _, processor = tiny("llava")
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ModelNotSupported, match="BertModel"):
        vlmkit.wrap(bert, processor)


def test_bad_generation_options(vlm, images):
    for options in ({"max_new_tokens": 0}, {"num_beams": 0}, {"top_p": 0.0}, {"do_sample": True, "temperature": 0}):
        with pytest.raises(VlmkitError):
            vlm.generate(images[0], "Describe the image.", **options)


def test_bad_batch_in_a_pipeline_raises_in_its_turn(vlm, images):
    """``generate_batches``: batches before a bad one are answered; the bad one raises when reached."""
    answers = vlm.generate_batches([(images[0], "Describe the image."), (images[1], " "), (images[2], "Why?")],
                                   max_new_tokens=2)
    assert len(next(answers)) == 1
    with pytest.raises(InputError, match="prompt 0 is empty"):
        next(answers)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        next(vlm.generate_batches([(images[0], "Describe the image.")], max_new_tokens=0))
