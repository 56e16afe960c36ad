"""``dyvte``: dynamic visual-token exit, all visual tokens leave the sequence after a per-sample layer (DyVTE).

Wu et al., "Accelerating MLLMs via Dynamic Visual-Token Exit and the Empirical Findings", arXiv 2411.19628,
NeurIPS 2025 (DoubtedSteam/DyVTE @b4a3396). After each LLM layer ``l`` of the prefill a gate
``Linear(2d, hidden) -> GELU -> Linear(hidden, 2)`` (no biases) reads ``[mean of the question tokens' hidden states
except the last one; the last prompt token's hidden state]``; at the first layer where ``logit[1] > logit[0]`` the
row's visual tokens all leave (positions of the rest unchanged). Rows exit independently.

Two modes:

* ``gates=FILE`` / ``gates=builtin``: trained gates (``torch.save`` of :class:`VisualGates`' ``state_dict``, or of
  ``{"state_dict", "meta"}``; the gate width comes from the file). ``gates=builtin`` loads ``dyvte_gates.pt`` next to
  the loaded model's checkpoint folder, ``gates=builtin:NAME`` that of a built-in model; shipped for
  ``builtin:world-tiny`` (hidden 64, 0.8 MB). Gates for another number of layers or width are a ``ConfigError``.
  Training (labels by the paper's rule :func:`exit_label`, LLM frozen): :mod:`vlmkit.pruners.dyvte_train`,
  ``vlmkit world train-dyvte-gates --out FILE``.
* ``exit_layer=k`` (training-free, not a documented DyVTE mode; spec 5f): every row exits after layer ``k``.

The shipped world-tiny gates exit late and only on short answers: the 6-layer model reads the image up to its last
layer (exiting after layer 4 is "safe" by the paper's rule for 15% of training answers, after layers 0-2 for 3-5%).
Measured on the world (CPU, ``vlmkit eval pope --limit 60 --pruner dyvte:gates=builtin``): 31% of POPE questions
exit (after layer 3 or 4), visual tokens 535 of 576 averaged over layers, mean F1 87.3 vs 90.9 dense; no caption
exits, so CHAIR equals dense (``docs/pruners.md``).

Deviations: none in the gate; the code's rows without a firing gate keep their visual tokens, as here. The last
layer's gate is never consulted (an exit after the last layer removes nothing), so ``dyvte_exit_layer`` is ``None``
for rows that keep their visual tokens to the end.
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


GATES_FILE = "dyvte_gates.pt"  # the gates shipped next to a built-in checkpoint (``gates=builtin``)


def load_gates(path: str | Path, num_layers: int, width: int, hidden: int | None = None) -> VisualGates:
    """Gates from ``path`` (a :class:`VisualGates` ``state_dict``, or ``{"state_dict": ..., "meta": ...}`` as the
    trainer writes) for a language model of ``num_layers`` layers and hidden size ``width``; the gate width comes
    from the file (``hidden``, when given, must match it). A file for another model is a ``ConfigError``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001  (pickle, zip or I/O errors all mean an unusable file)
        raise ConfigError(f"dyvte: cannot read gate file {path}: {error}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    firsts = sorted((key for key in state if key.startswith("gates.") and key.endswith(".0.weight")),
                    key=lambda key: int(key.split(".")[1])) if isinstance(state, dict) else []
    if not firsts:
        raise ConfigError(f"dyvte: {path} holds no DyVTE gates (expected a VisualGates state_dict)")
    file_hidden, file_features = state[firsts[0]].shape
    if len(firsts) != num_layers or file_features != 2 * width:
        raise ConfigError(f"dyvte: gates {path} are for a model with {len(firsts)} layers of width "
                          f"{file_features // 2}, but this model has {num_layers} layers of width {width}; train gates for it "
                          "(vlmkit.pruners.dyvte_train) or use exit_layer=K")
    if hidden is not None and hidden != file_hidden:
        raise ConfigError(f"dyvte: hidden={hidden} but the gates in {path} are {file_hidden} wide; drop hidden=")
    gates = VisualGates(num_layers, width, file_hidden)
    try:
        gates.load_state_dict(state)
    except RuntimeError as error:
        raise ConfigError(f"dyvte: gates {path} do not match the gate architecture: {error}") from None
    return gates


def _shipped() -> str:
    from vlmkit.api import BUILTIN_DIR

    names = sorted(p.parent.name for p in BUILTIN_DIR.glob(f"*/{GATES_FILE}"))
    return ", ".join(f"builtin:{name}" for name in names) or "no model"


@register("dyvte")
class DyVTE(Pruner):
    def __init__(self, exit_layer: int | None = None, gates: str | None = None, hidden: int | None = None):
        super().__init__(keep=1.0)
        if (exit_layer is None) == (gates is None):
            raise ConfigError("dyvte: give exactly one of exit_layer=K (training-free) or gates=FILE|builtin "
                              "(trained gates)")
        if exit_layer is not None and exit_layer < 0:
            raise ConfigError(f"dyvte: exit_layer must be >= 0, got {exit_layer}")
        if gates is not None:
            gates = str(gates)
            if gates.startswith("builtin:"):  # the gates shipped with a built-in model
                from vlmkit.api import resolve_model

                gates = str(Path(resolve_model(gates)) / GATES_FILE)
                if not Path(gates).is_file():
                    raise ConfigError(f"dyvte: no gates are shipped for {gates}; shipped: {_shipped()}")
            elif gates != "builtin" and not Path(gates).is_file():
                raise ConfigError(f"dyvte: no gate file {gates}; use gates=builtin (gates shipped next to the model's "
                                  f"checkpoint: {_shipped()}), train some with `vlmkit world train-dyvte-gates --out "
                                  "FILE`, or use exit_layer=K")
        self.exit_layer, self.gates_path, self.hidden = exit_layer, gates, hidden
        self.gates: VisualGates | None = None
        self._loaded_for: tuple | None = None  # (file, layers, width) of the loaded gates

    def prepare(self, ctx: GenerationContext, inputs) -> None:
        num_layers = len(ctx.adapter.layers)
        if self.exit_layer is not None and self.exit_layer >= num_layers - 1:
            raise ConfigError(f"dyvte: exit_layer={self.exit_layer} leaves no layer to skip of {num_layers}")
        if self.gates_path is not None:
            path = self.gates_path
            if path == "builtin":
                source = getattr(ctx.adapter.model, "name_or_path", "") or ""
                path = str(Path(source) / GATES_FILE)
                if not source or not Path(path).is_file():
                    raise ConfigError(f"dyvte: gates=builtin found no {GATES_FILE} next to the model's checkpoint "
                                      f"({source or 'unknown folder'}); gates are shipped for {_shipped()}")
            width = ctx.adapter.text_config.hidden_size
            if self._loaded_for != (path, num_layers, width):
                self.gates = load_gates(path, num_layers, width, self.hidden)
                self._loaded_for = (path, num_layers, width)
            self.gates = self.gates.to(ctx.adapter.device).eval()
        ctx.scratch[self.name] = {"exit_layer": [None] * inputs.input_ids.shape[0]}
        ctx.report("dyvte_exit_layer", ctx.scratch[self.name]["exit_layer"])  # filled in by after_layer

    def prefill_layers(self, num_layers: int) -> set[int] | None:
        """A fixed exit layer; the gates may exit after any layer."""
        return None if self.exit_layer is None else {self.exit_layer}

    def after_layer(self, ctx: GenerationContext, layer: int, state: LayerState, attention) -> torch.Tensor | None:
        if self.exit_layer is not None:
            exits = torch.full((state.valid.shape[0],), layer == self.exit_layer, device=state.valid.device)
        elif layer == len(ctx.adapter.layers) - 1:  # an exit after the last layer removes nothing
            return None
        else:
            exits = self.gates(layer, gate_features(state).to(next(self.gates.parameters()).dtype)).argmax(-1) == 1
        exits &= state.is_visual.any(dim=1)
        if not bool(exits.any()):
            return None
        record = ctx.scratch[self.name]["exit_layer"]
        for row in exits.nonzero().squeeze(-1).tolist():
            record[row] = layer
        return ~(state.is_visual & exits[:, None])
