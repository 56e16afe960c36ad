"""Image-prefix reuse: rows that ask about the same image share one prefill of the prompt up to the image's last
visual token, and decode exactly what they decode without sharing."""

from __future__ import annotations

import pytest

import vlmkit
from vlmkit.runtime.engine import Engine
from vlmkit.testing import FAMILIES

QUESTIONS = ["Is there a dog in the image?", "What color is the table?", "Describe the image.", "How many cups?",
             "Is there a cat?"]


def _run(tiny, family, images, share, monkeypatch=None, decode="dynamic", **kwargs):
    vlm = vlmkit.wrap(*tiny(family), decode=decode)
    vlm.engine.share_image_prefix = share
    calls = []
    if monkeypatch is not None:  # record each shared prefill's leading rows and each vision-tower batch size
        shared, encode = Engine._prefill_shared, vlm.adapter.encode_images
        monkeypatch.setattr(Engine, "_prefill_shared", lambda self, *a: calls.append(a[-1]) or shared(self, *a))
        monkeypatch.setattr(vlm.adapter, "encode_images", lambda b, *a: calls.append(b.batch_size) or encode(b, *a))
    return vlm.generate(images, QUESTIONS, max_new_tokens=8, **kwargs), calls


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_beams,decode", [(1, "dynamic"), (2, "dynamic"), (1, "static")])
def test_shared_prefixes_decode_the_unshared_tokens(tiny, images, family, num_beams, decode, monkeypatch):
    a, b = images[0], images[1]
    batch = [a, a, b, a, b]  # two images, asked about 3 and 2 times
    shared, calls = _run(tiny, family, batch, True, monkeypatch, decode=decode, num_beams=num_beams)
    plain, _ = _run(tiny, family, batch, False, num_beams=num_beams)
    assert calls == [2, [0, 2]]  # each image encoded once; one prefill per image, rows 0 and 2 lead their groups
    assert [g.token_ids for g in shared] == [g.token_ids for g in plain]
    for mine, theirs in zip(shared, plain):
        for key in ("visual_tokens_in", "visual_tokens_by_layer", "kept_visual_indices", "visual_tokens_kept"):
            assert mine.stats[key] == theirs.stats[key]


def test_equal_but_distinct_images_or_interventions_do_not_share(tiny, images, monkeypatch):
    copies = [images[0].copy() for _ in QUESTIONS]  # equal pixels, distinct objects: not known to be one image
    _, calls = _run(tiny, "llava", copies, True, monkeypatch)
    assert calls == [len(QUESTIONS)]  # every row's image encoded, no shared prefill
    vlm = vlmkit.wrap(*tiny("llava"), pruner="fastv:keep=4")  # in-LLM pruners read the whole prompt's attention
    monkeypatch.setattr(Engine, "_prefill_shared", lambda *a: pytest.fail("shared with an intervention"))
    vlm.generate([images[0]] * len(QUESTIONS), QUESTIONS, max_new_tokens=2)
