"""GRPO: Group Relative Policy Optimization (DeepSeekMath arXiv 2402.03300, as used by DeepSeek-R1).

For each prompt q, sample a group of G completions o_1..o_G from the sampling policy pi_old,
score each with rule-based rewards r_i (components/train/rewards.py), and normalise within the
group:  A_i = (r_i - mean(r)) / (std(r) + eps),  the advantage of every token of o_i (r_i - mean(r)
with scale_advantages false, the default). The loss, per completion the mean over its tokens t,
then the mean over completions (or the mean over all a group's tokens: loss_norm token, the default):

    ratio_t = pi(o_t | q, o_<t) / pi_old(o_t | q, o_<t)
    L_t     = -min(ratio_t A_i, clip(ratio_t, 1 - eps_clip, 1 + eps_clip) A_i) + beta KL_t
    KL_t    = pi_ref / pi - log(pi_ref / pi) - 1            (the unbiased, non-negative k3 estimator)

pi_ref is a frozen copy of the starting policy, refreshed from the policy every
`ref_update_every` steps. Each sampled batch serves `updates_per_batch` (mu) optimizer steps: the
first has ratio 1, later ones see the ratio move and the clip bite.

Which prompts: a prompt the model always or never solves gives a group of equal rewards and no
gradient, so before the first step each training prompt's solve rate under the starting model is
estimated from `select_samples` completions and the stage trains on those within
[select_min, select_max] (`select`, written to <out>/selection.json). During the stage, dynamic
sampling (DAPO, arXiv 2503.14476) drops a sampled group whose rewards are all equal and draws
new prompts in its place, up to `resample_rounds` more draws per batch.

Rollouts: a step's prompts are drawn from one length bucket (the first uniformly over all
prompts, the rest uniformly among prompts of its token length), so every prompt is equally
likely and all prompts x G rows decode as one batch with the KV cache, with no padding. Batching
the step's groups is what makes sampling affordable: decoding a small model is bound by
per-token overhead, not arithmetic. Completions end at the tokenizer's eos (kept as the last
trained token), at `max_new_tokens`, or at the model's block_size, whichever comes first.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from components.data.load import DataError
from components.model.lora import merged_state
from components.train.batches import generator
from components.train.config import ReinforceConfig
from components.train.rewards import accuracy_reward, format_reward, parse_answer


# ---- the math ------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """(r - mean) / (std + eps) over the last dimension (one group per row), or r - mean without
    `scale` (Dr. GRPO, nanochat: the std division favours groups that barely differ); zero for a
    group whose rewards are all equal."""
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    return centred / (rewards.std(dim=-1, keepdim=True, unbiased=False) + eps) if scale else centred


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate exp(ref - logp) - (ref - logp) - 1: unbiased, >= 0,
    exactly 0 where the two agree."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip: float, kl_coef: float, norm: str = "sequence"
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss of one group. logp, old_logp, ref_logp, mask: (G, T) over completion tokens
    (mask 1 on real tokens); advantages (G,). `norm` "sequence": each completion's mean over its
    tokens, then the mean over completions (GRPO as published); "token": the mean over all the
    group's tokens (DAPO, arXiv 2503.14476), so a token that several completions share in the same
    context gets advantages that sum to zero instead of being weighted by 1 / length.
    Returns (loss, {kl, clipped fraction})."""
    ratio = torch.exp(logp - old_logp)
    a = advantages[:, None]
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    kl = kl_k3(logp, ref_logp)
    per_token = -surrogate + kl_coef * kl
    m = mask.float()
    lengths = m.sum(dim=1).clamp_min(1)
    if norm == "token":
        loss = (per_token * m).sum() / m.sum().clamp_min(1)
    else:
        loss = ((per_token * m).sum(dim=1) / lengths).mean()
    with torch.no_grad():
        clipped = (((ratio - 1).abs() > clip).float() * m).sum() / m.sum().clamp_min(1)
        mean_kl = ((kl * m).sum(dim=1) / lengths).mean()
    return loss, {"kl": float(mean_kl), "clipped": float(clipped)}


def token_logprobs(model, seq: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """log pi(seq[t] | seq[<t]) for the completion tokens t >= prompt_len: (B, T - prompt_len)."""
    logits, _ = model(seq[:, :-1])
    logits = logits[:, prompt_len - 1:].float()  # positions predicting the completion tokens
    return torch.log_softmax(logits, dim=-1).gather(-1, seq[:, prompt_len:, None]).squeeze(-1)


def completion_mask(completion: torch.Tensor, eos_id: int | tuple[int, ...]) -> torch.Tensor:
    """1 on each completion's tokens up to and including its first eos (any of the ids), 0 after: (G, T)."""
    stops = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), device=completion.device)
    is_eos = torch.isin(completion, stops).int()
    after = (is_eos.cumsum(dim=1) - is_eos) > 0  # strictly after the first eos
    return (~after).int()


# ---- prompt selection ----------------------------------------------------------------------

@torch.no_grad()
def solve_rates(model, tok, prompts: list[Prompt], samples: int, temperature: float, max_new_tokens: int,
                block_size: int, seed: int, marker: str = "####", rows_per_decode: int = 256) -> list[float]:
    """The share of `samples` completions (sampled at `temperature`) of each prompt that earn the
    accuracy reward: same-length prompts decode together, up to `rows_per_decode` rows at once."""
    from components.console import Progress

    model.eval()
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p.ids), []).append(i)
    rates = [0.0] * len(prompts)
    chunk = max(1, rows_per_decode // samples)
    bar = Progress(len(prompts), "reinforce: solve rates", "prompt", enabled=os.environ.get("RANK", "0") == "0")
    for length in sorted(by_len):
        members = by_len[length]
        for start in range(0, len(members), chunk):
            part = members[start:start + chunk]
            idx = torch.tensor([prompts[i].ids for i in part for _ in range(samples)], dtype=torch.long)
            out = model.generate(idx, min(max_new_tokens, block_size - length), temperature=temperature,
                                 eos_id=tok.eos_ids, generator=g)
            for j, row in enumerate(out[:, length:].tolist()):
                i = part[j // samples]
                rates[i] += accuracy_reward(tok.decode(tok.until_eos(row)), prompts[i].reference, marker) / samples
            bar.update(len(part))
    bar.close()
    return rates


# ---- the objective the engine runs ---------------------------------------------------------

@dataclass
class Prompt:
    ids: list[int]
    reference: str
    id: Any = None  # the row's id
    rate: float | None = None  # the solve rate under the starting model, when selection measured it


@dataclass
class Rollout:
    """One group, sampled: what the updates of this batch need."""
    seq: torch.Tensor  # (G, P + T)
    prompt_len: int
    mask: torch.Tensor  # (G, T)
    advantages: torch.Tensor  # (G,)
    old_logp: torch.Tensor | None  # (G, T), log-probs under the sampling policy
    ref_logp: torch.Tensor | None  # (G, T), and under the reference


MIN_COMPLETION = 16
"""Prompts longer than block_size - MIN_COMPLETION tokens are not used (no room to answer)."""


class GRPO:
    """The reinforcement stage's Objective for components/train/engine.train."""

    def __init__(self, cfg: ReinforceConfig, rows: list[dict], tokenizer, reference: torch.nn.Module,
                 block_size: int):
        from components.train.rewards import reference_answer

        self.cfg, self.tok, self.reference = cfg, tokenizer, reference.eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)
        self.block_size = block_size
        room = block_size - MIN_COMPLETION  # a prompt must leave room for an answer
        self.prompts = []
        for r in rows:
            ref = reference_answer(r, cfg.answer_marker)
            ids = tokenizer.prompt_ids(r.get("prompt") or "")
            if ref is not None and parse_answer(ref) is not None and 0 < len(ids) <= room:
                self.prompts.append(Prompt(ids, ref, r.get("id")))
        if not self.prompts:
            raise DataError(f"no training row has a verifiable answer and a prompt of at most {room} tokens "
                            f"(the model's block_size {block_size} less {MIN_COMPLETION} for the completion)")
        self.skipped = len(rows) - len(self.prompts)
        self.selection: dict[str, Any] | None = None
        if cfg.select_samples:
            self.select()
        self.by_length: dict[int, list[Prompt]] = {}
        for p in self.prompts:
            self.by_length.setdefault(len(p.ids), []).append(p)
        self.batch: list[Rollout] = []
        self.batch_stats: dict[str, float] = {}

    def select(self) -> None:
        """Keep the prompts at the edge of competence: each prompt's solve rate under the starting
        model (the reference, before any step) from `select_samples` completions, and the prompts
        with select_min <= rate <= select_max (of a seeded subset of `select_prompts`, if set).
        Every process computes the same rates (same seed)."""
        cfg = self.cfg
        if 0 < cfg.select_prompts < len(self.prompts):
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 11)
            pick = sorted(torch.randperm(len(self.prompts), generator=g)[:cfg.select_prompts].tolist())
            self.prompts = [self.prompts[i] for i in pick]
        rates = solve_rates(self.reference, self.tok, self.prompts, cfg.select_samples, cfg.temperature,
                            cfg.max_new_tokens, self.block_size, cfg.seed, cfg.answer_marker)
        for p, rate in zip(self.prompts, rates):
            p.rate = rate
        kept = [p for p in self.prompts if cfg.select_min <= p.rate <= cfg.select_max]
        bands = {"never": sum(r == 0 for r in rates), "sometimes": sum(0 < r < 1 for r in rates),
                 "always": sum(r == 1 for r in rates)}
        self.selection = {"samples": cfg.select_samples, "temperature": cfg.temperature,
                          "bounds": [cfg.select_min, cfg.select_max], "prompts": len(self.prompts),
                          "bands": bands, "kept": len(kept), "mean_rate": sum(rates) / len(rates),
                          "kept_mean_rate": sum(p.rate for p in kept) / len(kept) if kept else None,
                          "rows": [{"id": p.id, "rate": p.rate, "kept": cfg.select_min <= p.rate <= cfg.select_max}
                                   for p in self.prompts]}
        if not kept:
            raise DataError(
                f"reinforce: no training prompt has a solve rate within [{cfg.select_min}, {cfg.select_max}] under "
                f"the starting model ({bands['never']} never solved, {bands['sometimes']} sometimes, "
                f"{bands['always']} always, in {cfg.select_samples} samples each): reinforcement would have no "
                f"signal; train the base stage longer, widen reinforce.select_min/select_max, or set "
                f"reinforce.select_samples=0 to keep every prompt")
        self.prompts = kept

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256()
        for p in self.prompts:
            h.update(repr((p.ids, p.reference)).encode())
        return h.hexdigest()[:16]

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"reference": self.reference}

    def rewards(self, texts: list[str], reference: str, coin: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, accuracy, format) rewards of a group's completion texts. With reward "random"
        the total's accuracy term is a fair coin per completion (drawn from `coin`); the
        returned accuracy is the real one either way."""
        acc = torch.tensor([accuracy_reward(t, reference, self.cfg.answer_marker) for t in texts])
        fmt = torch.tensor([format_reward(t, self.cfg.answer_marker) for t in texts])
        scored = acc
        if self.cfg.reward == "random":
            scored = torch.randint(0, 2, (len(texts),), generator=coin).float()
        return self.cfg.accuracy_weight * scored + self.cfg.format_weight * fmt, acc, fmt

    def draw(self, step: int, rank: int, round: int = 0, count: int = 0) -> list[Prompt]:
        """This step's prompts on this rank (`count`, or prompts_per_step): the first uniformly over
        all prompts, the rest uniformly among those of the same token length (so each prompt's
        chance is equal). Dynamic sampling's later rounds draw anew from their own stream."""
        g = generator(self.cfg.seed, step, rank + 100_000 * round)
        first = self.prompts[int(torch.randint(0, len(self.prompts), (1,), generator=g))]
        bucket = self.by_length[len(first.ids)]
        rest = torch.randint(0, len(bucket), ((count or self.cfg.prompts_per_step) - 1,), generator=g).tolist()
        return [first, *(bucket[i] for i in rest)]

    @torch.no_grad()
    def sample(self, model, step: int, rank: int, world: int) -> None:
        """Sample this batch's groups (one per micro-batch) with the current policy, each draw's
        prompts in one batched decode. With dynamic sampling, groups of equal rewards are dropped
        and as many prompts as are missing drawn again (at most `resample_rounds` more times)
        until `prompts_per_step` groups have signal; flat groups fill what the rounds could not."""
        cfg, G, n = self.cfg, self.cfg.group_size, self.cfg.prompts_per_step
        g = generator(cfg.seed, step, 1_000_000 + rank)
        coin = generator(cfg.seed, step, 2_000_000 + rank)
        model.eval()
        t_gen = t_score = 0.0
        kept, flat_pool, totals, accs, fmts, lengths = [], [], [], [], [], []
        rounds = 1 + (cfg.resample_rounds if cfg.dynamic_sampling else 0)
        for rnd in range(rounds):
            prompts = self.draw(step, rank, rnd, n - len(kept))  # later rounds: as many as are missing
            P = len(prompts[0].ids)
            t0 = time.perf_counter()
            idx = torch.tensor([p.ids for p in prompts for _ in range(G)], dtype=torch.long)
            budget = min(cfg.max_new_tokens, self.block_size - P)
            seq = model.generate(idx, budget, temperature=cfg.temperature, top_k=cfg.top_k or None,
                                 eos_id=self.tok.eos_ids, generator=g)
            t1 = time.perf_counter()
            mask = completion_mask(seq[:, P:], self.tok.eos_ids)
            lengths.append(mask.sum(dim=1).float())
            for i, prompt in enumerate(prompts):
                rows = slice(i * G, (i + 1) * G)
                T = int(mask[rows].sum(dim=1).max())  # this group's longest completion
                s, m = seq[rows, :P + T], mask[rows, :T]
                texts = [self.tok.decode(c[k.bool()].tolist()) for c, k in zip(s[:, P:], m)]
                total, acc, fmt = self.rewards(texts, prompt.reference, coin)
                rollout = Rollout(s, P, m, group_advantages(total, scale=cfg.scale_advantages), None, None)
                flat = bool((total == total[0]).all())
                (flat_pool if flat and cfg.dynamic_sampling else kept).append(rollout)
                totals.append(total)
                accs.append(acc)
                fmts.append(fmt)
            t_gen += t1 - t0
            t_score += time.perf_counter() - t1
            if len(kept) >= n:
                break
        self.batch = (kept + flat_pool)[:n]
        for r in self.batch:
            r.old_logp = token_logprobs(model, r.seq, r.prompt_len).float()
            r.ref_logp = token_logprobs(self.reference, r.seq, r.prompt_len).float()
        model.train()
        sampled = len(totals)
        flat = sum(bool((t == t[0]).all()) for t in totals) / sampled  # groups with no signal
        means = torch.stack([torch.cat(totals).mean(), torch.cat(accs).mean(), torch.cat(fmts).mean(),
                             torch.cat(lengths).mean(), torch.tensor(flat), torch.tensor(1 - n / sampled),
                             torch.tensor(float(rnd + 1))]).float()
        if world > 1:  # every rank samples its own prompts: log the mean over all of them
            torch.distributed.all_reduce(means)
            means /= world
        keys = ("reward", "accuracy", "format", "length", "flat_groups", "dropped", "sample_rounds")
        self.batch_stats = {**dict(zip(keys, means.tolist())), "time_generate": t_gen, "time_score": t_score}

    def step(self, engine, step: int, rank: int, world: int) -> dict[str, Any]:
        cfg = self.cfg
        model = engine.module
        fresh = step % cfg.updates_per_batch == 0
        if fresh or not self.batch:
            self.sample(model, step - step % cfg.updates_per_batch, rank, world)
        if cfg.ref_update_every and step > 0 and step % cfg.ref_update_every == 0:
            self.reference.load_state_dict(merged_state(model))  # the policy (adapters merged, if LoRA)
        t0 = time.perf_counter()
        total, kls, clipped, tokens = 0.0, [], [], 0
        for r in self.batch:
            logp = token_logprobs(engine, r.seq, r.prompt_len)
            loss, info = grpo_loss(logp, r.old_logp, r.ref_logp, r.advantages, r.mask, cfg.clip, cfg.kl_coef,
                                   cfg.loss_norm)
            engine.backward(loss)
            engine.step()
            total += loss.item()
            kls.append(info["kl"])
            clipped.append(info["clipped"])
            tokens += int(r.mask.sum())
        stats = dict(self.batch_stats) if fresh else {k: v for k, v in self.batch_stats.items()
                                                       if not k.startswith("time_")}
        return {"loss": total / len(self.batch), "tokens": tokens, **stats, "kl": sum(kls) / len(kls),
                "clipped": sum(clipped) / len(clipped), "time_update": time.perf_counter() - t0,
                "resampled": fresh}
