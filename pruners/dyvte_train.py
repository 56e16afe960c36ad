"""Training DyVTE's per-layer exit gates (spec pruners.md §5a.3) with the VLM frozen.

``python -m vlmkit.pruners.dyvte_train --out FILE`` (or ``vlmkit world train-dyvte-gates --out FILE``) trains the
gates of ``builtin:world-tiny`` on CPU in a few minutes; the shipped ``dyvte_gates.pt`` next to the checkpoint
(``dyvte:gates=builtin``) was made by the defaults with ``--threads 1`` (3.8 min on 2 busy cores). Steps:

1. :func:`collect` runs each (image, prompt, answer) through the vlmkit engine **once**, teacher-forced on
   prompt + answer (copy A, full attention). After every layer ``l`` it records the gate features exactly as the
   pruner computes them at inference (:func:`~vlmkit.pruners.dyvte.gate_features` on the prompt's left-padded
   state, whose last token is the last prompt token; causal attention makes the prompt's states independent of
   the answer). Copy B for layer ``l`` starts from A's state after layer ``l``, drops every visual token and runs
   the remaining layers; the answer tokens' layers ``<= l`` keep seeing the image, as at inference where only
   layers ``> l`` lose the visual KV cache. The label is :func:`~vlmkit.pruners.dyvte.exit_label` of A's and B's
   answer logits.
2. :func:`train_gates`: each step draws one layer ``l`` uniformly and a mini-batch, and minimises the two-class
   cross entropy (class weights [1, 1]) of gate ``l``; AdamW without weight decay, 3% warm-up, cosine schedule.

Differences from the paper's recipe (DoubtedSteam/DyVTE @b4a3396): every layer is labelled for every sample
(one shared copy A instead of one random layer per batch; the loss still samples one layer per step); layers
``0..L-2`` only (an exit after the last layer removes nothing, the pruner never consults that gate, which is left
silent); the features are rescaled per dimension for training and the scale is folded into the first linear map
(exact, no bias needed); lr 1e-3 for a few hundred steps instead of 6e-5 for an epoch of LLaVA-665k.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vlmkit.models.base import PreparedBatch
from vlmkit.pruners.dyvte import GATES_FILE, VisualGates, exit_label, gate_features
from vlmkit.runtime.cache import LayeredKVCache
from vlmkit.runtime.engine import Engine
from vlmkit.runtime.hooks import GenerationContext, Intervention, LayerState

IGNORE = -100


@dataclass
class GateData:
    """Per sample and layer: gate features ``[N, L, 2d]`` and exit labels ``[N, L]`` (the last layer's label is
    -100: not trained); ``kinds`` names each sample's question type."""

    features: torch.Tensor
    labels: torch.Tensor
    kinds: list[str]

    def split(self, count: int) -> tuple[GateData, GateData]:
        """The first ``count`` samples and the rest."""
        return (GateData(self.features[:count], self.labels[:count], self.kinds[:count]),
                GateData(self.features[count:], self.labels[count:], self.kinds[count:]))


class _Snapshots(Intervention):
    """Keeps the sequence state after every layer of a pass (the tensors are replaced, never edited, by the walk)."""

    name = "dyvte-snapshots"

    def __init__(self):
        self.states: list[LayerState] = []

    def after_layer(self, ctx, layer, state, attention):
        self.states.append(LayerState(state.hidden, state.valid, state.is_visual, state.positions, state.source_index))


def _append_answers(batch: PreparedBatch, answers: Sequence[Sequence[int]],
                    pad_id: int) -> tuple[PreparedBatch, torch.Tensor]:
    """The prompt batch with each row's answer ids appended (re-padded on the left), and a bool ``[B, L]`` mask of
    the answer tokens."""
    rows = [batch.attention_mask[row].bool() for row in range(batch.batch_size)]
    lengths = [int(mask.sum()) + len(answer) for mask, answer in zip(rows, answers)]
    length, device = max(lengths), batch.input_ids.device
    input_ids = torch.full((batch.batch_size, length), pad_id, dtype=batch.input_ids.dtype, device=device)
    attention_mask = torch.zeros((batch.batch_size, length), dtype=batch.attention_mask.dtype, device=device)
    is_answer = torch.zeros((batch.batch_size, length), dtype=torch.bool, device=device)
    is_visual = torch.zeros_like(is_answer)
    extra = {key: torch.zeros((batch.batch_size, length), dtype=value.dtype, device=device)
             for key, value in batch.extra.items()}  # per-token inputs (mm_token_type_ids): 0 for answer text
    for row, (mask, answer) in enumerate(zip(rows, answers)):
        start = length - lengths[row]
        prompt = batch.input_ids[row][mask]
        answer = torch.tensor(list(answer), dtype=input_ids.dtype, device=device)
        input_ids[row, start:] = torch.cat([prompt, answer])
        attention_mask[row, start:] = 1
        is_answer[row, start + prompt.numel():] = True
        is_visual[row, start:start + prompt.numel()] = batch.is_visual[row][mask]
        for key, value in batch.extra.items():
            extra[key][row, start:start + prompt.numel()] = value[row][mask]
    return PreparedBatch(input_ids, attention_mask, is_visual, batch.vision_inputs, extra), is_answer


def _answer_logits(adapter, state: LayerState, predicts: torch.Tensor, width: int) -> torch.Tensor:
    """Logits ``[B, width, V]`` at the positions that predict an answer token, in answer order (rows padded)."""
    source = state.source_index.clamp(min=0)
    take = predicts.gather(1, source) & state.valid
    logits = adapter.lm_head(adapter.final_norm(state.hidden)).float().cpu()
    take = take.cpu()
    out = logits.new_zeros(logits.shape[0], width, logits.shape[-1])
    for row in range(logits.shape[0]):
        picked = logits[row][take[row]]
        out[row, :picked.shape[0]] = picked
    return out


@dataclass
class BranchedPass:
    """One batch through copy A and every copy B: gate features ``[B, L, 2d]``, the answer targets ``[B, T]``
    (-100 = padding), A's answer logits ``[B, T, V]`` and, per exit layer ``l = 0..L-2``, B's."""

    features: torch.Tensor
    targets: torch.Tensor
    full: torch.Tensor
    exits: list[torch.Tensor]

    def labels(self) -> torch.Tensor:
        """``[B, L]``: :func:`exit_label` per exit layer; -100 for the last layer (nothing to exit from)."""
        last = torch.full((self.targets.shape[0], 1), IGNORE, dtype=torch.long)
        return torch.cat([torch.stack([exit_label(self.full, b, self.targets) for b in self.exits], 1).cpu(), last], 1)


@torch.no_grad()
def branched_pass(vlm, images, prompts: Sequence[str], answers: Sequence[Sequence[int]]) -> BranchedPass:
    """Run one batch teacher-forced on prompt + answer (copy A), and copy B from every layer; ``answers`` are token
    ids (ending with EOS, as the model was trained)."""
    adapter = vlm.adapter
    num_layers = len(adapter.layers)
    pad = adapter.tokenizer.pad_token_id if adapter.tokenizer.pad_token_id is not None else 0
    batch, is_answer = _append_answers(adapter.prepare(list(images), list(prompts)), answers, pad)
    ctx = GenerationContext(adapter=adapter, prompts=list(prompts), images=list(images))
    snapshots = _Snapshots()
    engine = Engine(adapter, [snapshots], attention_backend=vlm.engine.attention_backend)
    final, _, _ = engine.run_layers(ctx, engine.initial_state(ctx, batch)[0], LayeredKVCache(num_layers), set())
    # a position predicts an answer token when the next one is an answer token; targets in answer order
    predicts = torch.zeros_like(is_answer)
    predicts[:, :-1] = is_answer[:, 1:]
    width = max(len(a) for a in answers)
    targets = torch.full((len(answers), width), IGNORE, dtype=torch.long)
    for row, answer in enumerate(answers):
        targets[row, :len(answer)] = torch.tensor(list(answer))
    is_prompt = batch.attention_mask.bool() & ~is_answer
    tail = Engine(adapter, attention_backend=vlm.engine.attention_backend)  # copy B: no intervention
    features, exits = [], []
    for layer, snapshot in enumerate(snapshots.states):
        prompt_state = Engine.compact(snapshot, is_prompt.gather(1, snapshot.source_index.clamp(min=0)))
        features.append(gate_features(prompt_state).float().cpu())  # as DyVTE.after_layer computes them
        if layer < num_layers - 1:
            exited, _, _ = tail.run_layers(ctx, Engine.compact(snapshot, ~snapshot.is_visual),
                                           LayeredKVCache(num_layers), set(), start=layer + 1)
            exits.append(_answer_logits(adapter, exited, predicts, width))
    return BranchedPass(torch.stack(features, dim=1), targets, _answer_logits(adapter, final, predicts, width),
                        exits)


def collect(vlm, samples: Sequence[tuple], batch_size: int = 8, progress: bool = False) -> GateData:
    """Gate features and labels for ``samples``: ``(image, prompt, answer ids[, kind])`` tuples."""
    features, labels, kinds = [], [], []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        branched = branched_pass(vlm, [s[0] for s in chunk], [s[1] for s in chunk], [s[2] for s in chunk])
        features.append(branched.features)
        labels.append(branched.labels())
        kinds += [s[3] if len(s) > 3 else "" for s in chunk]
        if progress:
            print(f"collected {start + len(chunk)}/{len(samples)}", flush=True)
    return GateData(torch.cat(features), torch.cat(labels), kinds)


@dataclass
class GateTrainConfig:
    hidden: int = 64
    steps: int = 600
    batch_size: int = 32
    lr: float = 1e-3
    warmup: float = 0.03
    seed: int = 0


def train_gates(data: GateData, config: GateTrainConfig | None = None) -> tuple[VisualGates, list[dict]]:
    """Train one gate per layer on ``data`` (spec loss: 2-class CE of gate ``l`` for a uniformly drawn layer ``l``
    per step). Returns the gates (the feature scale folded in, last gate silent) and the loss log."""
    config = config or GateTrainConfig()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    count, num_layers, features_width = data.features.shape
    gates = VisualGates(num_layers, features_width // 2, config.hidden)
    trained = [l for l in range(num_layers) if bool((data.labels[:, l] != IGNORE).any())]
    scale = data.features.flatten(0, 1).std(dim=0).clamp(min=1e-3)  # per-dimension; folded in below
    features = data.features / scale
    optimizer = torch.optim.AdamW(gates.parameters(), lr=config.lr, weight_decay=0.0)
    warmup = max(1, round(config.warmup * config.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (step + 1) / warmup if step < warmup else
                                                 0.5 * (1 + math.cos(math.pi * (step - warmup) /
                                                                     max(1, config.steps - warmup))))
    log, running = [], []
    for step in range(1, config.steps + 1):
        layer = trained[int(torch.randint(len(trained), (1,), generator=generator))]
        rows = torch.randint(count, (min(config.batch_size, count),), generator=generator)
        loss = nn.functional.cross_entropy(gates(layer, features[rows, layer]), data.labels[rows, layer],
                                           ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running.append(loss.item())
        if step % 50 == 0 or step == config.steps:
            log.append({"step": step, "loss": round(sum(running) / len(running), 4)})
            running = []
    with torch.no_grad():
        for gate in gates.gates:
            gate[0].weight.div_(scale)  # W (x / s) == (W / s) x: the gates read raw features
        for layer in range(num_layers):
            if layer not in trained:
                gates.gates[layer][2].weight.zero_()  # tied logits: never fires
    return gates.eval(), log


@torch.no_grad()
def evaluate_gates(gates: VisualGates, data: GateData) -> dict:
    """Per-layer accuracy and exit rate of the label, and the inference policy (first firing layer): mean exit layer
    (rows without an exit count as the last layer), rate of exits whose label says the exit was safe."""
    num_layers = data.features.shape[1]
    fires = torch.stack([gates(l, data.features[:, l]).argmax(-1) == 1 for l in range(num_layers)], dim=1)
    fires[:, -1] = False  # the pruner never consults the last gate
    labelled = data.labels != IGNORE
    accuracy = [round(float((fires[:, l].long() == data.labels[:, l]).float().mean()), 3)
                for l in range(num_layers) if bool(labelled[:, l].any())]
    label_rate = [round(float(data.labels[:, l].float().mean()), 3) for l in range(num_layers)
                  if bool(labelled[:, l].any())]
    exited = fires.any(dim=1)
    first = torch.where(exited, fires.float().argmax(dim=1), num_layers - 1)  # no exit: the last layer
    safe = data.labels.gather(1, first[:, None]).squeeze(1) == 1
    return {"samples": int(data.features.shape[0]), "accuracy_by_layer": accuracy, "exit_label_rate_by_layer":
            label_rate, "mean_exit_layer": round(float(first.float().mean()), 3),
            "exit_rate": round(float(exited.float().mean()), 3),
            "safe_exit_rate": round(float(safe[exited].float().mean()), 3) if bool(exited.any()) else None}


# ---- the built-in world -----------------------------------------------------------------------------------------

@dataclass
class WorldGateConfig:
    model: str = "builtin:world-tiny"
    samples: int = 400  # training samples (train split)
    held_out: int = 100  # more train-split samples, to report the gates' accuracy
    batch_size: int = 8
    seed: int = 0
    world_seed: int = 0
    threads: int | None = None  # torch CPU threads for the run (1 is fastest on busy shared cores)
    train: GateTrainConfig = field(default_factory=GateTrainConfig)


def world_samples(processor, count: int, seed: int, world_seed: int = 0) -> list[tuple]:
    """``count`` (image, prompt, answer ids, kind) from the world model's training mixture (40% captions, 30% yes/no
    presence, 30% MMHal-style; :func:`vlmkit.world.tasks.training_sample`) on train-split images ([0, 5e6))."""
    from vlmkit.world.render import render
    from vlmkit.world.scene import sample_scene
    from vlmkit.world.tasks import training_sample
    from vlmkit.world.train import TRAIN_IMAGE_IDS

    tokenizer = processor.tokenizer
    rng = np.random.default_rng([seed, 7])
    samples = []
    for _ in range(count):
        scene = sample_scene(int(rng.integers(TRAIN_IMAGE_IDS)), world_seed)
        sample = training_sample(scene, rng)
        answer = tokenizer(" " + sample.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        samples.append((render(scene), sample.prompt, answer, sample.kind))
    return samples


def train_world_gates(config: WorldGateConfig | None = None, out: str | Path | None = None,
                      progress: bool = True) -> tuple[VisualGates, dict]:
    """Collect, label and train gates for a world model on CPU; save them to ``out`` (``torch.save`` of
    ``{"state_dict", "meta"}``) when given. Returns the gates and the metadata (recipe, timings, metrics)."""
    import vlmkit

    config = config or WorldGateConfig()
    started, threads = time.time(), torch.get_num_threads()
    torch.manual_seed(config.seed)
    vlm = vlmkit.load(config.model, device="cpu", dtype="float32")
    samples = world_samples(vlm.processor, config.samples + config.held_out, config.seed, config.world_seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        data = collect(vlm, samples, config.batch_size, progress=progress)
        collected = time.time()
        train, held_out = data.split(config.samples)
        gates, log = train_gates(train, config.train)
    finally:
        torch.set_num_threads(threads)
    meta = {
        "model": config.model, "config": asdict(config), "torch": str(torch.__version__),
        "collect_s": round(collected - started, 1), "train_s": round(time.time() - collected, 1),
        "loss_log": log, "train": evaluate_gates(gates, train),
        "held_out": evaluate_gates(gates, held_out) if config.held_out else None,
        "kinds": {kind: train.kinds.count(kind) for kind in sorted(set(train.kinds))},
    }
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": gates.state_dict(), "meta": meta}, out)
    return gates, meta


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults, train = WorldGateConfig(), GateTrainConfig()
    parser.add_argument("--out", required=True, help=f"gate file to write (shipped: <checkpoint>/{GATES_FILE})")
    parser.add_argument("--model", default=defaults.model, help="world model (folder or builtin:NAME)")
    parser.add_argument("--samples", type=int, default=defaults.samples, help="training samples (train split)")
    parser.add_argument("--held-out", type=int, default=defaults.held_out, help="extra samples to report accuracy")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="collection batch size")
    parser.add_argument("--hidden", type=int, default=train.hidden, help="gate width (the paper: 2048)")
    parser.add_argument("--steps", type=int, default=train.steps)
    parser.add_argument("--lr", type=float, default=train.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: torch's; 1 is fastest on busy shared cores)")


def run(args: argparse.Namespace) -> int:
    config = WorldGateConfig(
        model=args.model, samples=args.samples, held_out=args.held_out, batch_size=args.batch_size, seed=args.seed,
        threads=args.threads, train=GateTrainConfig(hidden=args.hidden, steps=args.steps, lr=args.lr, seed=args.seed),
    )
    _, meta = train_world_gates(config, args.out)
    print(json.dumps({key: meta[key] for key in ("collect_s", "train_s", "train", "held_out")}, indent=1))
    print(f"saved the gates to {args.out}; use them with --pruner dyvte:gates={args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmkit.pruners.dyvte_train", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
