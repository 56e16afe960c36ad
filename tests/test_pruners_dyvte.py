"""DyVTE: the training-free fixed-layer exit, gate-driven per-row exits, and the labelling rule."""

from __future__ import annotations

import pytest
import torch

import vlmkit
from vlmkit.errors import ConfigError
from vlmkit.pruners.dyvte import VisualGates, exit_label


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_fixed_layer_exit(tiny, images, prompts, family):
    outputs = vlmkit.wrap(*tiny(family), pruner="dyvte:exit_layer=1").generate(images, prompts, max_new_tokens=4)
    for generation in outputs:
        n = generation.stats["visual_tokens_in"]
        assert generation.stats["visual_tokens_by_layer"] == [n, n, 0, 0]


def test_trained_gate_file_drives_the_exit(tiny, images, prompts, tmp_path):
    model, processor = tiny("llava")
    gates = VisualGates(4, model.config.text_config.hidden_size, hidden=8)
    for gate in gates.gates:  # zero output layers: logits tie, argmax is 0, no gate fires
        torch.nn.init.zeros_(gate[2].weight)
    path = tmp_path / "gates.pt"
    torch.save(gates.state_dict(), path)
    pruner = vlmkit.pruners.create("dyvte", gates=str(path), hidden=8)
    dense = [g.token_ids for g in vlmkit.wrap(model, processor).generate(images, prompts, max_new_tokens=4)]
    outputs = vlmkit.wrap(model, processor, pruner=pruner).generate(images, prompts, max_new_tokens=4)
    assert [g.token_ids for g in outputs] == dense  # logits tie -> argmax 0 -> nobody exits
    with torch.no_grad():
        # layer 2: hidden units u and -u (u = feature 0), logit[1] = GELU(u) + GELU(-u) > 0 = logit[0]
        pruner.gates.gates[2][0].weight.zero_()
        pruner.gates.gates[2][0].weight[0, 0], pruner.gates.gates[2][0].weight[1, 0] = 1.0, -1.0
        pruner.gates.gates[2][2].weight[1, :2] = 1.0
    outputs = vlmkit.wrap(model, processor, pruner=pruner).generate(images, prompts, max_new_tokens=4)
    for generation in outputs:
        assert generation.stats["visual_tokens_by_layer"] == [16, 16, 16, 0]


def test_exit_label_rule():
    answer = torch.tensor([[1, 2, 3, -100]])
    full = torch.nn.functional.one_hot(torch.tensor([[1, 2, 3, 0]]), 5).float() * 5
    assert exit_label(full, full.clone(), answer).item() == 1  # same predictions, same loss
    worse = full.clone()
    worse[0, 2] = torch.nn.functional.one_hot(torch.tensor(4), 5).float() * 5  # one answer token disagrees
    assert exit_label(full, worse, answer).item() == 0
    blurred = full * 0.5  # same argmax, cross entropy much higher
    assert exit_label(full, blurred, answer).item() == 0


def test_options():
    with pytest.raises(ConfigError, match="exactly one"):
        vlmkit.pruners.create("dyvte")
    with pytest.raises(ConfigError, match="not shipped"):
        vlmkit.pruners.create("dyvte", gates="/nonexistent/gates.pt")
