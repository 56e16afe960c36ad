"""With no interventions, vlmkit's own loops give exactly the tokens of the model's own ``generate``."""

from __future__ import annotations

import threading

import pytest

import vlmkit
from vlmkit.testing import FAMILIES, tokens_of


def hf_generate(model, processor, vlm, images, prompts, **kwargs) -> list[list[int]]:
    processor.tokenizer.padding_side = "left"
    inputs = processor(
        images=images, text=[vlm.adapter.build_prompt(p) for p in prompts], return_tensors="pt", padding=True
    )
    output = model.generate(**inputs, do_sample=False, **kwargs)
    eos, pad = set(vlm.adapter.eos_token_ids), processor.tokenizer.pad_token_id
    rows = []
    for row in output[:, inputs["input_ids"].shape[1] :].tolist():
        tokens = []
        for token in row:  # HF pads finished rows; vlmkit stops them at EOS
            tokens.append(token)
            if token in eos:
                break
        while tokens and tokens[-1] == pad and pad not in eos:
            tokens.pop()
        rows.append(tokens)
    return rows


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_generate_matches_hf(tiny, images, prompts, family, batch, num_beams, decode):
    model, processor = tiny(family)
    vlm = vlmkit.wrap(model, processor, decode=decode)
    prompts = prompts[:batch]
    ours = vlm.generate(images[:batch], prompts, max_new_tokens=10, num_beams=num_beams)
    theirs = hf_generate(model, processor, vlm, images[:batch], prompts, max_new_tokens=10, num_beams=num_beams)
    assert [g.token_ids for g in ours] == theirs
    for generation in ours:
        assert generation.stats["new_tokens"] == len(generation.token_ids)
        assert generation.stats["visual_tokens_kept"] == generation.stats["visual_tokens_in"] > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_one_by_one(tiny, images, prompts, family):
    vlm = vlmkit.wrap(*tiny(family))
    batched = vlm.generate(images, prompts, max_new_tokens=8)
    single = [vlm.generate(image, prompt, max_new_tokens=8)[0] for image, prompt in zip(images, prompts)]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_batches_equals_generate(tiny, images, prompts, family):
    """The pipelined loop answers as batch-by-batch calls do, with the batches taken (images loaded, processor run)
    on its worker thread; an image shared within a batch is still encoded once per batch."""
    vlm = vlmkit.wrap(*tiny(family))
    batches = [([images[0], images[0], images[1]], prompts[:3]), ([images[2]], prompts[:1]), (images[:2], prompts[1:3])]
    taken_on = []

    def source():
        for batch in batches:
            taken_on.append(threading.current_thread())
            yield batch

    pipelined = [tokens_of(answers) for answers in vlm.generate_batches(source(), max_new_tokens=6)]
    assert pipelined == [tokens_of(vlm.generate(*batch, max_new_tokens=6)) for batch in batches]
    assert len(taken_on) == len(batches) and threading.main_thread() not in taken_on
