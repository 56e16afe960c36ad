"""Image-prefix reuse: rows that ask about the same image share one prefill of the prompt up to the image's last
visual token, and decode exactly what they decode without sharing."""

from __future__ import annotations

import pytest
import torch

import vlmkit
from vlmkit.runtime.engine import Engine
from vlmkit.testing import FAMILIES, tiny_model, tokens_of

QUESTIONS = ["Is there a dog in the image?", "What color is the table?", "Describe the image.", "How many cups?",
             "Is there a cat?"]


def _run(tiny, family, images, share, monkeypatch=None, decode="dynamic", pruner=None, **kwargs):
    vlm = vlmkit.wrap(*tiny(family), decode=decode, pruner=pruner)
    vlm.engine.share_image_prefix = share
    calls = []
    if monkeypatch is not None:  # record each shared prefill's leading rows and each vision-tower batch size
        shared, encode = Engine._prefill_shared, vlm.adapter.encode_images
        monkeypatch.setattr(Engine, "_prefill_shared", lambda self, *a: calls.append(a[-1]) or shared(self, *a))
        monkeypatch.setattr(vlm.adapter, "encode_images", lambda b, *a: calls.append(b.batch_size) or encode(b, *a))
    return vlm.generate(images, QUESTIONS, max_new_tokens=8, **kwargs), calls


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_beams,decode", [(1, "dynamic"), (2, "dynamic"), (1, "static"), (2, "static")])
def test_shared_prefixes_decode_the_unshared_tokens(tiny, images, family, num_beams, decode, monkeypatch):
    a, b = images[0], images[1]
    batch = [a, a, b, a, b]  # two images, asked about 3 and 2 times
    shared, calls = _run(tiny, family, batch, True, monkeypatch, decode=decode, num_beams=num_beams)
    plain, _ = _run(tiny, family, batch, False, num_beams=num_beams)
    assert calls == [2, [0, 2]]  # each image encoded once; one prefill per image, rows 0 and 2 lead their groups
    assert tokens_of(shared) == tokens_of(plain)
    for mine, theirs in zip(shared, plain):
        for key in ("visual_tokens_in", "visual_tokens_by_layer", "kept_visual_indices", "visual_tokens_kept"):
            assert mine.stats[key] == theirs.stats[key]


@pytest.mark.parametrize("family,pruner", [("llava", "uniform:keep=6"), ("llava", "visionzip:keep=6"),
                                           ("qwen2_5_vl", "divprune:keep=4"), ("llava", "random:keep=6")])
def test_vision_side_pruners_share_what_they_select_alike(tiny, images, family, pruner, monkeypatch):
    """Rows share a prefill only when the pruner chose the same tokens for their image (random draws per row)."""
    a, b = images[0], images[1]
    batch = [a, a, b, a, b]
    shared, calls = _run(tiny, family, batch, True, monkeypatch, pruner=pruner)
    plain, _ = _run(tiny, family, batch, False, pruner=pruner)
    assert tokens_of(shared) == tokens_of(plain)
    assert [g.stats["kept_visual_indices"] for g in shared] == [g.stats["kept_visual_indices"] for g in plain]
    first_rows: dict = {}  # (image, kept tokens) -> the first row that has them
    for row, (image, generation) in enumerate(zip(batch, plain)):
        first_rows.setdefault((id(image), tuple(generation.stats["kept_visual_indices"])), row)
    leaders = sorted(first_rows.values())
    assert calls == [2] + ([leaders] if len(leaders) < len(batch) else [])
    if not pruner.startswith("random"):
        assert leaders == [0, 2]


def test_equal_but_distinct_images_or_interventions_do_not_share(tiny, images, monkeypatch):
    copies = [images[0].copy() for _ in QUESTIONS]  # equal pixels, distinct objects: not known to be one image
    _, calls = _run(tiny, "llava", copies, True, monkeypatch)
    assert calls == [len(QUESTIONS)]  # every row's image encoded, no shared prefill
    # in-LLM pruners read the whole prompt's attention: the image is encoded once, the prefill is not shared
    batch = [images[0]] * len(QUESTIONS)
    shared, calls = _run(tiny, "llava", batch, True, monkeypatch, pruner="fastv:keep=4")
    plain, _ = _run(tiny, "llava", batch, False, pruner="fastv:keep=4")
    assert calls == [1] and tokens_of(shared) == tokens_of(plain)


@pytest.mark.parametrize("family", FAMILIES)
def test_repeated_image_objects_decode_what_equal_copies_decode(tiny, images, family):
    """One image object asked about 3 times is processed, encoded and prefilled once; copies of it, every step."""
    a, b = images[0], images[1]
    repeated, _ = _run(tiny, family, [a, a, b, a, b], True)
    copies, _ = _run(tiny, family, [image.copy() for image in (a, a, b, a, b)], True)
    assert tokens_of(repeated) == tokens_of(copies)
    assert [g.stats["visual_tokens_by_layer"] for g in repeated] == [g.stats["visual_tokens_by_layer"] for g in copies]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pruner", [None, "divprune:keep=4"])
def test_a_shared_prefill_in_a_static_segment_decodes_the_unshared_tokens(tiny, images, family, pruner):
    """``prefill="static"``: the shared prefill runs as one bucketed segment over all layers with the segment table
    in a buffer; later batches of the same bucket (other groups, other questions) reuse the segment."""
    a, b = images[0], images[1]
    vlm = vlmkit.wrap(*tiny(family), pruner=pruner, prefill="static")
    plain = vlmkit.wrap(*tiny(family), pruner=pruner, prefill="dynamic")
    plain.engine.share_image_prefix = False
    segments = []
    batches = [([a, a, b, a, b], QUESTIONS), ([b, a, a, b, b], QUESTIONS), ([a, b, b, a, a], QUESTIONS[::-1])]
    for batch, questions in batches:
        shared = vlm.generate(batch, questions, max_new_tokens=8)
        unshared = plain.generate(batch, questions, max_new_tokens=8)
        assert tokens_of(shared) == tokens_of(unshared)
        for mine, theirs in zip(shared, unshared):
            for key in ("visual_tokens_by_layer", "kept_visual_indices"):
                assert mine.stats[key] == theirs.stats[key]
        ((key, segment),) = vlm.engine.static_prefills.items.items()
        assert key[:2] == (0, len(vlm.adapter.layers)) and segment.segments is not None
        segments.append(segment)
    assert segments[0] is segments[1] is segments[2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_cuda_shared_prefixes_with_graphs_give_the_eager_tokens(images, family):
    """On a GPU the shared prefill replays as a graph segment and a recurring batch of short answers over shared
    prefixes decodes as a graph (the shared-prefix kernel); the tokens are those of the eager walk over the same
    shared layout."""
    model, processor = tiny_model(family, dtype=torch.bfloat16)
    model.cuda()
    a, b = images[0], images[1]
    batch = [a, a, b, a, b]
    fast = vlmkit.wrap(model, processor)
    runs = [tokens_of(fast.generate(batch, QUESTIONS, max_new_tokens=3)) for _ in range(2)]
    (decoder,) = fast.engine.static_decoders.items.values()
    assert decoder.graph is not None  # the second call of the layout decoded as a graph
    (segment,) = fast.engine.static_prefills.items.values()
    assert segment.graph is not None and segment.segments is not None  # the shared prefill replayed as a graph
    slow = vlmkit.wrap(model, processor, decode="dynamic", prefill="dynamic")
    assert runs[0] == runs[1] == tokens_of(slow.generate(batch, QUESTIONS, max_new_tokens=3))
