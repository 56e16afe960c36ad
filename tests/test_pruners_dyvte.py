"""DyVTE: the training-free fixed-layer exit, gate-driven per-row exits, the labelling rule, gate training (the
labels are what inference sees) and the gates shipped for world-tiny."""

from __future__ import annotations

import pytest
import torch

import vlmkit
from vlmkit.api import BUILTIN_DIR
from vlmkit.errors import ConfigError
from vlmkit.pruners.dyvte import GATES_FILE, VisualGates, exit_label, gate_features, load_gates
from vlmkit.pruners.dyvte_train import GateTrainConfig, branched_pass, collect, train_gates
from vlmkit.runtime.hooks import Intervention


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
    with pytest.raises(ConfigError, match="no gate file .*gates=builtin"):
        vlmkit.pruners.create("dyvte", gates="/nonexistent/gates.pt")


class _ForceAnswers(Intervention):
    """Teacher forcing through the runtime: records each step's logits, then makes greedy pick the answer token."""

    name = "force-answers"

    def __init__(self, answers):
        self.answers, self.logits = answers, []

    def edit_logits(self, ctx, logits, hidden_by_layer):
        step = len(self.logits)
        self.logits.append(logits.clone())
        forced = torch.full_like(logits, -1e9)
        for row, answer in enumerate(self.answers):
            forced[row, answer[min(step, len(answer) - 1)]] = 0.0
        return forced


class _Features(Intervention):
    name = "features"

    def __init__(self):
        self.by_layer = []

    def after_layer(self, ctx, layer, state, attention):
        self.by_layer.append(gate_features(state))


def _answers(processor, texts):
    tokenizer = processor.tokenizer
    return [tokenizer(" " + text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for text in texts]


ANSWERS = ["yes .", "a red dog .", "two"]


def test_exit_label_rule_cases():
    answer = torch.tensor([[1, 2, -100, -100], [3, 1, 2, -100]])
    full = torch.nn.functional.one_hot(torch.tensor([[1, 2, 0, 0], [3, 1, 2, 0]]), 5).float() * 4
    exit_ = full.clone()
    exit_[0, 3] = torch.tensor([0, 0, 0, 9.0, 0])  # ignored position (-100): may disagree freely
    exit_[1, 0, 3] = 4.2  # row 1 gets more confident: lower cross entropy, same argmax
    assert exit_label(full, exit_, answer).tolist() == [1, 1]  # rows are labelled independently
    exit_[1, 2] = torch.tensor([0, 0, 2.0, 0, 0])  # same argmax, but the row's CE more than doubles: keep
    assert exit_label(full, exit_, answer).tolist() == [1, 0]
    assert exit_label(full, exit_, answer, ce_ratio=10.0).tolist() == [1, 1]
    # agreement must be strictly above 99%: 1 disagreement in 100 answer tokens is not enough
    tokens = torch.arange(100) % 5
    full = torch.nn.functional.one_hot(tokens, 5).float()[None] * 8
    exit_ = full.clone()
    exit_[0, 0] = torch.nn.functional.one_hot((tokens[0] + 1) % 5, 5).float() * 8
    assert exit_label(full, exit_, tokens[None]).item() == 0
    assert exit_label(full, exit_, tokens[None], agree=0.98, ce_ratio=100.0).item() == 1
    # a model that is exactly certain (CE 0) never passes the strict CE rule, even against itself
    certain = torch.nn.functional.one_hot(tokens, 5).float()[None] * 1e4
    assert exit_label(certain, certain, tokens[None]).item() == 0


def test_branched_pass_is_what_inference_sees(tiny, images, prompts):
    """The training labels' copy B equals generation with the visual tokens dropped after layer l (teacher forced,
    decoding on the shortened KV cache), and the features equal those the pruner computes at inference."""
    model, processor = tiny("llava")
    answers = _answers(processor, ANSWERS)
    branched = branched_pass(vlmkit.wrap(model, processor), images, prompts, answers)
    assert branched.features.shape == (3, 4, 2 * model.config.text_config.hidden_size)
    assert len(branched.exits) == 3 and branched.labels().shape == (3, 4)
    mask = branched.targets != -100
    assert mask.sum(1).tolist() == [len(a) for a in answers]
    for layer, spec in [(None, None), (0, "dyvte:exit_layer=0"), (2, "dyvte:exit_layer=2")]:
        forced, features = _ForceAnswers(answers), _Features()
        vlm = vlmkit.wrap(model, processor, pruner=spec or features, decoders=[forced])
        vlm.generate(images, prompts, max_new_tokens=max(len(a) for a in answers))
        expected = branched.full if layer is None else branched.exits[layer]
        torch.testing.assert_close(torch.stack(forced.logits, 1)[mask], expected[mask], atol=1e-4, rtol=1e-4)
        if layer is None:
            torch.testing.assert_close(torch.stack(features.by_layer, 1), branched.features, atol=1e-4, rtol=1e-4)


def test_gate_training_reduces_the_loss_and_drives_the_pruner(tiny, images, prompts, tmp_path):
    model, processor = tiny("llava")
    samples = [(image, prompt, answer) for image, prompt, answer in zip(images, prompts, _answers(processor, ANSWERS))]
    data = collect(vlmkit.wrap(model, processor), samples * 2, batch_size=3)
    assert data.features.shape == (6, 4, 128)
    assert set(data.labels[:, :3].unique().tolist()) <= {0, 1} and (data.labels[:, 3] == -100).all()

    def loss(gates):
        with torch.no_grad():
            return sum(torch.nn.functional.cross_entropy(gates(l, data.features[:, l]), data.labels[:, l]).item()
                       for l in range(3))

    config = GateTrainConfig(hidden=8, steps=30, batch_size=6, lr=1e-2)
    initial, _ = train_gates(data, GateTrainConfig(hidden=8, steps=0))
    trained, log = train_gates(data, config)
    assert loss(trained) < loss(initial) and log[-1]["step"] == 30
    # labels "keep at layer 0, exit from layer 1": the trained gates make the pruner exit every row after layer 1
    data.labels[:, 0], data.labels[:, 1:3] = 0, 1
    trained, _ = train_gates(data, GateTrainConfig(hidden=8, steps=60, batch_size=6, lr=1e-2))
    torch.save({"state_dict": trained.state_dict(), "meta": {"test": True}}, tmp_path / "gates.pt")
    outputs = vlmkit.wrap(model, processor, pruner=f"dyvte:gates={tmp_path / 'gates.pt'}").generate(
        images, prompts, max_new_tokens=3)
    for generation in outputs:
        assert generation.stats["dyvte_exit_layer"] == 1
        assert generation.stats["visual_tokens_by_layer"] == [16, 16, 0, 0]


def test_shipped_world_tiny_gates():
    from vlmkit.world import render, sample_scene
    from vlmkit.world.tasks import presence_sample

    path = BUILTIN_DIR / "world-tiny" / GATES_FILE
    assert path.stat().st_size < 2_000_000
    meta = torch.load(path, weights_only=True)["meta"]
    assert meta["model"] == "builtin:world-tiny" and meta["config"]["samples"] >= 100
    gates = load_gates(path, 6, 256)
    assert len(gates.gates) == 6 and (gates.gates[5][2].weight == 0).all()  # the last gate never fires
    with pytest.raises(ConfigError, match="6 layers of width 256, but this model has 4 layers of width 64"):
        load_gates(path, 4, 64)
    vlm = vlmkit.load("builtin:world-tiny", device="cpu", dtype="float32", pruner="dyvte:gates=builtin")
    scenes = [sample_scene(10_000_000 + i, 0) for i in range(4)]  # val split
    questions = [presence_sample(scene, category, short=True).prompt
                 for scene, category in zip(scenes, ["dog", "person", "car", "cup"])]
    outputs = vlm.generate([render(scene) for scene in scenes], questions, max_new_tokens=2)
    for generation in outputs:
        layer, by_layer = generation.stats["dyvte_exit_layer"], generation.stats["visual_tokens_by_layer"]
        assert layer is None or 0 <= layer < 5
        assert by_layer == ([576] * 6 if layer is None else [576] * (layer + 1) + [0] * (5 - layer))
        assert generation.text.lower() in ("yes", "no")
    assert vlmkit.pruners.create("dyvte", gates="builtin:world-tiny").gates_path == str(path)


def test_gates_for_another_model_are_a_config_error(tiny, images, prompts):
    model, processor = tiny("llava")
    for spec in ("dyvte:gates=builtin:world-tiny", "dyvte:gates=builtin"):
        with pytest.raises(ConfigError, match="layers of width|no dyvte_gates.pt next to"):
            vlmkit.wrap(model, processor, pruner=spec).generate(images[:1], prompts[:1], max_new_tokens=1)
    with pytest.raises(ConfigError, match="no built-in model"):
        vlmkit.pruners.create("dyvte", gates="builtin:no-such-model")
