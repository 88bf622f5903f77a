"""compress.distill: a smaller student trained on the teacher's logits.

    distillery distill --teacher runs/finetune/model --data data/split --out runs/distill

The student keeps the teacher's tokenizer, width and heads, with fewer blocks (`n_layer`) and
optionally a narrower feed-forward (`ffn_hidden`). With `init: teacher` it starts pruned from the
teacher, as in Minitron (arXiv 2407.14679): blocks taken evenly spaced from the teacher's (the
first and the last always kept), feed-forward neurons kept by importance. Departure: Minitron
ranks neurons by their activations on a calibration set; here by weight magnitude,
|w_gate_i| * |w_up_i| * |c_proj_:,i| (no data pass needed).

Loss per token (Hinton et al. 2015), on the rows' whole text:
    kd_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - kd_weight) * CE
With `teacher_data`, the training rows also include the teacher's greedy solutions to the
training prompts that reach the right answer (DeepSeek-R1 built its distillation set the same
way, by rejection sampling from the large model, and then only fine-tuned the students).

It runs on the same DeepSpeed engine as the training stages (resume, metrics.jsonl, loss.png,
model/); then the held-out accuracy of teacher and student and their sizes go to metrics.json.
"""

from __future__ import annotations

import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from components.artifacts import finish, holds, sha256_file
from components.compress.config import DistillConfig
from components.config import ConfigError
from components.console import log
from components.data.load import DataError
from components.model import ModelConfig, Transformer, fused
from components.train.batches import IGNORE, RowBatches
from components.train.engine import train
from components.model.folder import load_pretrained


def student_config(teacher: ModelConfig, cfg: DistillConfig) -> ModelConfig:
    n_layer = cfg.n_layer or -(-teacher.n_layer // 2)
    if n_layer > teacher.n_layer:
        raise ConfigError(f"distill.n_layer: {n_layer} blocks is more than the teacher's {teacher.n_layer}")
    hidden = cfg.ffn_hidden or teacher.hidden
    if cfg.init == "teacher" and hidden > teacher.hidden:
        raise ConfigError(f"distill.ffn_hidden: {hidden} is wider than the teacher's {teacher.hidden}; "
                         f"init: teacher can only prune")
    return replace(teacher, n_layer=n_layer, ffn_hidden=hidden)


def kept_blocks(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher block indices, first and last included: 4 -> 2 gives [0, 3]."""
    if student_layers == 1:
        return [teacher_layers - 1]
    step = (teacher_layers - 1) / (student_layers - 1)
    return [round(i * step) for i in range(student_layers)]


def _ffn_keep(state: dict[str, torch.Tensor], prefix: str, hidden: int) -> torch.Tensor:
    """The `hidden` most important neurons of a SwiGLU at `prefix`, in their original order."""
    gate, up, down = (state[f"{prefix}.{n}.weight"] for n in ("w_gate", "w_up", "c_proj"))
    score = gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0)  # (H,)
    return score.topk(hidden).indices.sort().values


def prune_from_teacher(teacher_cfg: ModelConfig, state: dict[str, torch.Tensor],
                       student_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The student's initial state dict: embeddings and final norm as the teacher's, blocks copied
    from `kept_blocks`, each SwiGLU cut to the student's width by neuron importance."""
    out: dict[str, torch.Tensor] = {}
    blocks = kept_blocks(teacher_cfg.n_layer, student_cfg.n_layer)
    prunes = student_cfg.hidden < teacher_cfg.hidden
    for key, value in state.items():
        if not key.startswith("blocks."):
            out[key] = value.clone()
    for new, old in enumerate(blocks):
        src = f"blocks.{old}."
        keep: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if not key.startswith(src):
                continue
            rest = key[len(src):]
            value = value.clone()
            if prunes and rest.endswith(("w_gate.weight", "w_up.weight", "c_proj.weight")) and ".attn." not in key:
                ffn_prefix = key.rsplit(".", 2)[0]  # blocks.i.ffn or blocks.i.ffn.experts.e / .shared
                if ffn_prefix not in keep:
                    keep[ffn_prefix] = _ffn_keep(state, ffn_prefix, student_cfg.hidden)
                value = value[:, keep[ffn_prefix]] if rest.endswith("c_proj.weight") else value[keep[ffn_prefix]]
            out[f"blocks.{new}.{rest}"] = value
    return out


class Distillation:
    """The engine's objective: the student (the engine) against a frozen teacher, per token."""

    def __init__(self, batches: RowBatches, teacher: Transformer, temperature: float, kd_weight: float):
        self.batches, self.teacher = batches, teacher.eval().requires_grad_(False)
        self.t, self.alpha = temperature, kd_weight

    def step(self, engine, step: int, rank: int, world: int) -> dict[str, Any]:
        tokens, total, kl_sum, ce_sum = 0, 0.0, 0.0, 0.0
        accum = engine.gradient_accumulation_steps()
        for micro in range(accum):
            b = self.batches.get(step, micro * world + rank)
            if fused.active(engine.module.cfg.kernels, b.idx):  # kernels/fused_linear_ce.py: no (B, T, V) logits
                h, ce = engine(b.idx, b.targets, b.weights, output="hidden")  # (B, T, C), weighted token mean
                with torch.no_grad():
                    h_t, _ = self.teacher(b.idx, output="hidden")
                kl = fused.linear_kl(h.flatten(0, 1), engine.module.lm_head.weight, h_t.flatten(0, 1),
                                     self.teacher.lm_head.weight, b.targets.flatten(),
                                     b.weights.float().view(-1, 1).expand_as(b.targets).flatten(), self.t, IGNORE)
            else:
                logits, ce = engine(b.idx, b.targets, b.weights)  # (B, T, V), weighted token mean
                with torch.no_grad():
                    t_logits, _ = self.teacher(b.idx)
                kl = distill_kl(logits, t_logits, b.targets, b.weights, self.t)
            loss = self.alpha * self.t ** 2 * kl + (1 - self.alpha) * ce
            engine.backward(loss)
            engine.step()
            tokens += b.tokens
            total, kl_sum, ce_sum = total + loss.item(), kl_sum + kl.item(), ce_sum + ce.item()
        return {"loss": total / accum, "kl": kl_sum / accum, "ce": ce_sum / accum, "tokens": tokens}

    def fingerprint(self) -> str | None:
        return self.batches.fingerprint()

    def modules(self) -> dict[str, torch.nn.Module]:
        return {}  # the teacher is an input (its hash is in the run's fingerprint), not state


def distill_kl(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
               temperature: float) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) per token, averaged as the model's loss is:
    over tokens whose target is not IGNORE, each weighted by its sequence's weight."""
    log_s = F.log_softmax(student.float() / temperature, dim=-1)  # (B, T, V)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # (B, T)
    w = (targets != IGNORE).float() * weights.float().view(-1, 1)
    return (kl * w).sum() / w.sum().clamp_min(1e-12)


def teacher_rows(teacher: Transformer, tok, rows: list[dict], max_new_tokens: int = 160,
                 batch: int = 64) -> list[dict]:
    """The teacher's greedy solutions to `rows`' prompts that reach the reference answer, as new
    rows {id, prompt, response, answer} (rejection sampling)."""
    from components.train.evaluate import EvaluateConfig, evaluate_model

    _, answers = evaluate_model(teacher, tok, rows, EvaluateConfig(max_rows=0, samples=0,
                                                                   max_new_tokens=max_new_tokens), batch=batch,
                                desc="distill: teacher solutions")
    out = []
    for row, ans in zip(rows, answers):
        if ans["correct"]:
            out.append({"id": f"{row.get('id')}-teacher", "prompt": row.get("prompt"),
                        "response": ans["completion"].strip(), "answer": ans["reference"]})
    return out


@holds("out_dir")
def run(cfg: DistillConfig, teacher_dir: str | os.PathLike, data_dir: str | os.PathLike,
        out_dir: str | os.PathLike, progress: bool = True, fresh: bool = False,
        eval_rows: int = 200, student_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Distill the teacher model folder into a student at `out_dir` (resumable like a stage).
    `student_dir`: a model folder to start the student from (another pretrained model, e.g. a
    smaller one of the teacher's family, imported), instead of pruning the teacher; it must share
    the teacher's tokenizer, id for id."""
    from components.train.evaluate import EvaluateConfig, evaluate_model, problems
    from components.data.split import read_split
    from components.train.batches import val_batches
    from components.train.stages import prepare_output

    out, data_dir = Path(out_dir), Path(data_dir)
    t_cfg, t_state, tok = load_pretrained(teacher_dir)  # bad input is refused before --fresh removes anything
    teacher = Transformer(t_cfg)
    teacher.load_state_dict(t_state)
    if student_dir is not None:
        s_cfg, s_state, s_tok = load_pretrained(student_dir)
        probe = "Ann has 3 apples. <|im_end|> 12 + 30 = 42, héllo"
        if (s_tok.kind, s_tok.vocab_size, s_tok.encode(probe), s_tok.eos_id) != (
                tok.kind, tok.vocab_size, tok.encode(probe), tok.eos_id) or s_cfg.vocab_size != t_cfg.vocab_size:
            raise DataError(f"{student_dir}: the student's tokenizer is not the teacher's ({teacher_dir}); "
                            f"distillation compares their logits id for id")
    else:
        s_cfg = student_config(t_cfg, cfg)
    rows = read_split(data_dir, "train.jsonl")
    if not rows:
        raise DataError(f"{data_dir / 'train.jsonl'}: no rows to distill on")
    prepare_output(out, (teacher_dir, data_dir), fresh)
    if student_dir is not None:
        init = s_state
    else:
        init = prune_from_teacher(t_cfg, t_state, s_cfg) if cfg.init == "teacher" else None
    rank0 = os.environ.get("RANK", "0") == "0"
    extra = teacher_rows(teacher, tok, rows) if cfg.teacher_data else []
    if rank0 and cfg.teacher_data:
        log.info(f"distill: {len(extra)} of {len(rows)} teacher solutions were correct and join the data")
    # as the stages saw them: `prompt \n response <eos>`, or an imported model's chat template
    ids = [tok.pair_ids(r.get("prompt") or "", r.get("response") or "")[0] for r in rows + extra]
    weights = [float(r.get("weight", 1.0)) for r in rows] + [1.0] * len(extra)
    batches = RowBatches(ids, weights, s_cfg.block_size, cfg.micro_batch, cfg.seed, tok.pad_id)
    val = val_batches(read_split(data_dir, "val.jsonl"), tok, s_cfg.block_size, cfg.micro_batch, cfg.seed)
    teacher_hash = sha256_file(Path(teacher_dir) / "model.safetensors")
    summary = train(s_cfg, cfg.train_config(), Distillation(batches, teacher, cfg.temperature, cfg.kd_weight),
                    val, tok, out, progress=progress, init=init,
                    stage={"name": "distill", **asdict(cfg), "teacher": teacher_hash[:16]})
    if torch.distributed.get_rank() != 0:
        return summary
    from components.model.folder import load_model

    student, _ = load_model(out / "model")
    test = problems(data_dir, EvaluateConfig(max_rows=eval_rows)) if (data_dir / "test.jsonl").is_file() else []
    ecfg = EvaluateConfig(max_rows=eval_rows, samples=0)
    report = {"teacher_params": teacher.num_params(), "student_params": student.num_params(),
              "teacher_bytes": (Path(teacher_dir) / "model.safetensors").stat().st_size,
              "student_bytes": (out / "model" / "model.safetensors").stat().st_size,
              "teacher_layers": t_cfg.n_layer, "student_layers": s_cfg.n_layer, "teacher_rows": len(extra)}
    report["param_ratio"] = report["student_params"] / report["teacher_params"]
    if test:
        t_res, _ = evaluate_model(teacher, tok, test, ecfg, desc="distill: evaluate teacher")
        s_res, _ = evaluate_model(student, tok, test, ecfg, desc="distill: evaluate student")
        report.update(teacher_accuracy=t_res["accuracy"], student_accuracy=s_res["accuracy"], test_rows=len(test))
        if t_res["accuracy"] > 0:
            report["accuracy_ratio"] = s_res["accuracy"] / t_res["accuracy"]
    summary.update(report)
    finish(out, "compress.distill", {"teacher": Path(teacher_dir) / "model.safetensors",
                                     "train": data_dir / "train.jsonl"},
           {"distill": asdict(cfg), "model": asdict(s_cfg)}, summary,
           {"model": out / "model", "metrics": out / "metrics.jsonl"})
    return summary

