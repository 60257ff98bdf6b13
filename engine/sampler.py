"""Batched sampling with per-request parameters.

Order (as vLLM/HF): penalties on raw logits, then temperature, then min-p / top-k / top-p
filtering, then a draw. Greedy rows (temperature 0) take the argmax of the penalised logits.
Seeded requests draw from their own generator so their output does not depend on the batch.

Every value SamplingParams admits samples a valid token: penalties may push logits to +-inf
(a repetition penalty of 1e-30), and a vanishing temperature (1e-40) overflows a plain
`logits / temperature`; so logits are made finite, shifted so each row's maximum is 0 and only
then divided by a temperature floored at the smallest normal float32 (a temperature that small
is argmax among the tied maxima, which is what the limit means).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.request import Request

# (sampled token logprob, [(token id, logprob)] top-N) for one row.
Logprobs = tuple[float, list[tuple[int, float]]]


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[Logprobs | None]  # per row; None when not asked


class Sampler:
    def __init__(self, seed: int = 0):
        self.default_generator = torch.Generator().manual_seed(seed)
        self.generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SampleResult:
        # A copy: penalties write in place, and the engine may draw the rows again one by one.
        logits = logits.to(torch.float32, copy=True)
        self._apply_penalties(logits, requests)
        # A NaN is no preference; +inf (a penalty's overflow) the largest finite logit.
        logits = torch.nan_to_num(logits, nan=-torch.inf, posinf=torch.finfo(logits.dtype).max)
        want_logprobs = any(r.sampling.logprobs is not None for r in requests)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        tokens = torch.empty(len(requests), dtype=torch.long)
        greedy = torch.tensor([r.sampling.greedy for r in requests])
        if greedy.any():
            tokens[greedy] = logits[greedy].argmax(dim=-1)
        if not greedy.all():
            idx = (~greedy).nonzero().flatten()
            probs = self._filtered_probs(logits[idx], [requests[i] for i in idx.tolist()])
            for row, i in enumerate(idx.tolist()):
                gen = self._generator(requests[i])
                tokens[i] = torch.multinomial(probs[row], 1, generator=gen)[0]
        return SampleResult(tokens.tolist(), self._logprobs(raw_logprobs, tokens, requests))

    def _generator(self, req: Request) -> torch.Generator:
        seed = req.sampling.seed
        if seed is None:
            return self.default_generator
        gen = self.generators.get(req.request_id)
        if gen is None:
            gen = self.generators[req.request_id] = torch.Generator().manual_seed(seed)
        return gen

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, requests: list[Request]) -> None:
        for i, req in enumerate(requests):
            sp = req.sampling
            if sp.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(req.token_ids)), dtype=torch.long)
                vals = logits[i, seen]
                logits[i, seen] = torch.where(
                    vals > 0, vals / sp.repetition_penalty, vals * sp.repetition_penalty
                )
            if (sp.presence_penalty or sp.frequency_penalty) and req.num_output_tokens:
                out = torch.tensor(req.output_token_ids, dtype=torch.long)
                counts = torch.bincount(out, minlength=logits.shape[1]).float()
                logits[i] -= sp.frequency_penalty * counts + sp.presence_penalty * (counts > 0)

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        temps = torch.tensor([r.sampling.temperature for r in requests]).unsqueeze(1)
        temps = temps.clamp_min(torch.finfo(temps.dtype).tiny)
        # Shifted so that each row's maximum is exactly 0: dividing by any temperature then
        # leaves the maxima at 0 and sends the rest towards -inf, never to NaN. A row with no
        # finite logit at all (every token masked) falls back to uniform.
        top = logits.max(dim=-1, keepdim=True).values
        logits = torch.where(top.isfinite(), (logits - top) / temps, torch.zeros_like(logits))
        probs = torch.softmax(logits, dim=-1)
        min_p = torch.tensor([r.sampling.min_p for r in requests]).unsqueeze(1)
        probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        vocab = probs.shape[1]
        top_k = torch.tensor([r.sampling.top_k or vocab for r in requests]).unsqueeze(1)
        ranks = torch.arange(vocab).unsqueeze(0)
        sorted_probs = sorted_probs.masked_fill(ranks >= top_k, 0.0)
        top_p = torch.tensor([r.sampling.top_p for r in requests]).unsqueeze(1)
        # Keep the smallest set whose mass reaches top_p (the top token always stays).
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        total = sorted_probs.sum(dim=-1, keepdim=True)
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p * total, 0.0)
        filtered = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
        return filtered / filtered.sum(dim=-1, keepdim=True)

    @staticmethod
    def _logprobs(raw: torch.Tensor | None, tokens: torch.Tensor, requests: list[Request]
                  ) -> list[Logprobs | None]:
        results: list[Logprobs | None] = []
        if raw is None:
            return [None for _ in requests]
        for i, req in enumerate(requests):
            n = req.sampling.logprobs
            if n is None:
                results.append(None)
                continue
            top = raw[i].topk(n) if n else None
            pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            results.append((raw[i, tokens[i]].item(), pairs))
        return results
