"""``dyvte``: dynamic visual-token exit, all visual tokens leave the sequence after a per-sample layer (DyVTE).

Wu et al., "Accelerating MLLMs via Dynamic Visual-Token Exit and the Empirical Findings", arXiv 2411.19628,
NeurIPS 2025 (DoubtedSteam/DyVTE @b4a3396). After each LLM layer ``l`` of the prefill a gate
``Linear(2d, hidden) -> GELU -> Linear(hidden, 2)`` (no biases) reads ``[mean of the question tokens' hidden states
except the last one; the last prompt token's hidden state]``; at the first layer where ``logit[1] > logit[0]`` the
row's visual tokens all leave (positions of the rest unchanged). Rows exit independently.

Two modes:

* ``gates=<file>``: trained gates (``torch.save`` of :class:`VisualGates`' ``state_dict``). **No trained gates are
  shipped yet**: they are trained on the built-in world model, which does not exist yet; the labelling rule of the
  paper is :func:`exit_label`. The training script is not written yet either.
* ``exit_layer=k`` (training-free, not a documented DyVTE mode; spec 5f): every row exits after layer ``k``.

Deviation: none in the gate; the code's rows without a firing gate keep their visual tokens, as here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vlmkit.errors import ConfigError
from vlmkit.pruners import register
from vlmkit.pruners.base import Pruner
from vlmkit.runtime.hooks import GenerationContext, LayerState


class VisualGates(nn.Module):
    """One gate per LLM layer; ``forward(layer, features [B, 2d]) -> logits [B, 2]``."""

    def __init__(self, num_layers: int, width: int, hidden: int = 2048):
        super().__init__()
        self.gates = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * width, hidden, bias=False), nn.GELU(), nn.Linear(hidden, 2, bias=False))
            for _ in range(num_layers)
        )
        for gate in self.gates:  # init_weight.py: Xavier-uniform
            for module in gate:
                if isinstance(module, nn.Linear):
                    nn.init.xavier_uniform_(module.weight)

    def forward(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        return self.gates[layer](features)


def gate_features(state: LayerState) -> torch.Tensor:
    """``[B, 2d]``: mean hidden state of the question tokens but the last, and the last prompt token's state."""
    question = state.text_after_visual & ~state.last_token
    total = (state.hidden.float() * question.unsqueeze(-1)).sum(dim=1)
    mean = total / question.sum(dim=1, keepdim=True).clamp(min=1)
    return torch.cat([mean, state.hidden[:, -1].float()], dim=-1)


def exit_label(logits_full: torch.Tensor, logits_exit: torch.Tensor, answer: torch.Tensor, agree: float = 0.99,
               ce_ratio: float = 1.03) -> torch.Tensor:
    """The paper's training label per sample (``[B]`` long, 1 = exit): the answer-token argmax predictions without
    visual tokens agree with the full model's on more than ``agree`` of the answer tokens **and** the answer's cross
    entropy without them is below ``ce_ratio`` times the full one. Logits ``[B, T, V]``, ``answer [B, T]`` (-100 =
    ignore)."""
    mask = answer != -100
    same = ((logits_full.argmax(-1) == logits_exit.argmax(-1)) & mask).sum(1) / mask.sum(1).clamp(min=1)

    def cross_entropy(logits):
        loss = nn.functional.cross_entropy(logits.transpose(1, 2).float(), answer, reduction="none", ignore_index=-100)
        return loss.sum(1) / mask.sum(1).clamp(min=1)

    return ((same > agree) & (cross_entropy(logits_exit) < ce_ratio * cross_entropy(logits_full))).long()


@register("dyvte")
class DyVTE(Pruner):
    def __init__(self, exit_layer: int | None = None, gates: str | None = None, hidden: int = 2048):
        super().__init__(keep=1.0)
        if (exit_layer is None) == (gates is None):
            raise ConfigError("dyvte: give exactly one of exit_layer=K (training-free) or gates=FILE (trained gates)")
        if exit_layer is not None and exit_layer < 0:
            raise ConfigError(f"dyvte: exit_layer must be >= 0, got {exit_layer}")
        if gates is not None and not Path(gates).is_file():
            raise ConfigError(f"dyvte: no gate file {gates}; trained gates are not shipped yet, use exit_layer=K")
        self.exit_layer, self.gates_path, self.hidden = exit_layer, gates, hidden
        self.gates: VisualGates | None = None

    def prepare(self, ctx: GenerationContext, inputs) -> None:
        num_layers = len(ctx.adapter.layers)
        if self.exit_layer is not None and self.exit_layer >= num_layers - 1:
            raise ConfigError(f"dyvte: exit_layer={self.exit_layer} leaves no layer to skip of {num_layers}")
        if self.gates_path is not None and self.gates is None:
            gates = VisualGates(num_layers, ctx.adapter.text_config.hidden_size, self.hidden)
            gates.load_state_dict(torch.load(self.gates_path, map_location="cpu"))
            self.gates = gates.to(ctx.adapter.device).eval()
        ctx.scratch[self.name] = {"exit_layer": [None] * inputs.input_ids.shape[0]}
        ctx.report("dyvte_exit_layer", ctx.scratch[self.name]["exit_layer"])  # filled in by after_layer

    def after_layer(self, ctx: GenerationContext, layer: int, state: LayerState, attention) -> torch.Tensor | None:
        if self.exit_layer is not None:
            exits = torch.full((state.valid.shape[0],), layer == self.exit_layer, device=state.valid.device)
        else:
            exits = self.gates(layer, gate_features(state).to(next(self.gates.parameters()).dtype)).argmax(-1) == 1
        exits &= state.is_visual.any(dim=1)
        if not bool(exits.any()):
            return None
        record = ctx.scratch[self.name]["exit_layer"]
        for row in exits.nonzero().squeeze(-1).tolist():
            record[row] = layer
        return ~(state.is_visual & exits[:, None])
