"""Token choice: greedy, seeded sampling (temperature / top-k / top-p) and beam search."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0


def warp_logits(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p (the order HF applies them)."""
    if config.temperature != 1.0:
        logits = logits / config.temperature
    if config.top_k > 0:
        kth = torch.topk(logits, min(config.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - config.top_p)
        remove_sorted[..., -1:] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def choose_tokens(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from ``[B, V]`` logits."""
    if not config.do_sample:
        return logits.argmax(dim=-1)
    probs = warp_logits(logits, config).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class BeamSearch:
    """Beam search with HF transformers' semantics (vectorised, ``early_stopping=False``, length penalty).

    It follows ``GenerationMixin._beam_search`` step by step, so that vlmkit and HF pick the same beams: the top
    ``2 * num_beams`` continuations are scored, finished ones (EOS or the length limit) compete for the
    ``num_beams`` final slots with ``score / length ** length_penalty``, and the best unfinished ones keep running.
    """

    def __init__(self, batch_size: int, num_beams: int, max_new_tokens: int, eos_ids: list[int],
                 length_penalty: float, device: torch.device):
        self.batch, self.beams, self.max_new = batch_size, num_beams, max_new_tokens
        self.eos = torch.tensor(eos_ids, device=device, dtype=torch.long)
        self.length_penalty = length_penalty
        self.keep = max(2, 1 + len(eos_ids)) * num_beams
        self.top_beam_mask = torch.arange(self.keep, device=device) < num_beams
        self.running = torch.zeros(batch_size, num_beams, max_new_tokens, dtype=torch.long, device=device)
        self.running_scores = torch.zeros(batch_size, num_beams, device=device)
        self.running_scores[:, 1:] = -1e9
        self.finished = torch.zeros_like(self.running)
        self.finished_scores = torch.full((batch_size, num_beams), -1e9, device=device)
        self.finished_lengths = torch.zeros(batch_size, num_beams, dtype=torch.long, device=device)
        self.is_finished = torch.zeros(batch_size, num_beams, dtype=torch.bool, device=device)
        self.can_improve = torch.ones(batch_size, 1, dtype=torch.bool, device=device)
        self.length = 0
        self.done = False

    @staticmethod
    def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        while index.dim() < tensor.dim():
            index = index.unsqueeze(-1)
        return torch.take_along_dim(tensor, index, dim=1)

    def step(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Take ``[B * beams, V]`` logits; return the flat beam index to reorder the cache by and the next tokens."""
        vocab = logits.shape[-1]
        log_probs = logits.float().log_softmax(-1).view(self.batch, self.beams, vocab)
        log_probs = (log_probs + self.running_scores[:, :, None]).view(self.batch, -1)
        top_scores, top_index = torch.topk(log_probs, self.keep)
        source_beam, token = top_index // vocab, top_index % vocab
        candidates = self._gather(self.running, source_beam).clone()
        candidates[:, :, self.length] = token
        new_length = self.length + 1
        hits_stop = torch.isin(token, self.eos) | (new_length >= self.max_new)

        # running beams for the next step: the best candidates that did not stop
        running_scores = top_scores + hits_stop.float() * -1e9
        best = torch.topk(running_scores, self.beams).indices
        self.running = self._gather(candidates, best)
        self.running_scores = self._gather(running_scores, best)
        parent = self._gather(source_beam, best)

        # finished hypotheses: only the top `beams` candidates may finish, scored with the length penalty
        just_finished = hits_stop & self.top_beam_mask[None, :]
        final_scores = top_scores / (new_length**self.length_penalty)
        final_scores = final_scores + (~self.can_improve).float() * -1e9 + (~just_finished).float() * -1e9
        merged_scores = torch.cat([self.finished_scores, final_scores], dim=1)
        merged = torch.cat([self.finished, candidates], dim=1)
        merged_lengths = torch.cat([self.finished_lengths, torch.full_like(token, new_length)], dim=1)
        merged_is_finished = torch.cat([self.is_finished, just_finished], dim=1)
        keep = torch.topk(merged_scores, self.beams).indices
        self.finished = self._gather(merged, keep)
        self.finished_scores = self._gather(merged_scores, keep)
        self.finished_lengths = self._gather(merged_lengths, keep)
        self.is_finished = self._gather(merged_is_finished, keep)

        self.length = new_length
        best_running = self.running_scores[:, :1] / (self.length**self.length_penalty)
        worst_finished = torch.where(self.is_finished, self.finished_scores.min(dim=1, keepdim=True).values, -1e9)
        self.can_improve = self.can_improve & (best_running > worst_finished).any(-1, keepdim=True)
        self.done = not bool(self.can_improve.any()) or bool(hits_stop.all()) or self.length >= self.max_new
        flat_parent = (parent + torch.arange(self.batch, device=parent.device)[:, None] * self.beams).view(-1)
        return flat_parent, self.running[:, :, self.length - 1].reshape(-1)

    def best(self) -> list[list[int]]:
        """The best finished hypothesis of each batch row."""
        return [self.finished[b, 0, : self.finished_lengths[b, 0]].tolist() for b in range(self.batch)]
