"""AutoDistil — Xu, Mukherjee, Liu, Dey, Wang, Zhang, Awadallah & Gao, "AutoDistil: Few-shot Task-agnostic Neural
Architecture Search for Distilling Large Language Models" (arXiv 2201.12507, 2022; NeurIPS 2022 as "Few-shot
Task-agnostic Neural Architecture Search for Distilling Large Language Models"). Official code: microsoft/autodistil
@ ea5cc7f — ``Code/run_wiki_plus_book_NoAssist_RndSampl.py`` (SuperLM training: the sandwich of sub-networks and the
loss), ``Code/transformers/modeling_bert.py`` (``DynaLinear_v1`` and friends: weight sharing by leading slices,
``BertSelfAttention_v1``: the Q/K/V relations, ``BertEncoder_v1``: which layers a shallower student keeps),
``Code/run_yaml/KD_wiki_book_Seqlen128_PreModel_RndSampl_{Base,Small,Tiny}_256Subs.yaml`` (the K = 3 sub-spaces
and training settings), ``Code/finetune_plus_search_TaskProxy_glue.py`` (``cal_para_bert`` / ``cal_flops_bert``,
the costs), ``Code/run_yaml/Train_finalfinetuning_*.yaml`` with ``--training_phase final_finetuning`` (the chosen
student fine-tuned on the task's labels).

What is implemented (helpers in ``_autodistil_supernet``):

* **K sub-spaces** of the student space (layers, attention heads of the teacher's head size, hidden size, FFN
  width): the paper's base / small / tiny sub-spaces, each a 4 x 4 x 4 x 4 grid, ``linspace`` of fractions of the
  teacher's dimensions as the official configurations write them for BERT-base (base: layers 9-12 of 12, heads 9-12
  of 12, hidden 544-640 of 768, FFN ratio 2.5-4; small: 9-12, 7-10, 256-352, 2.5-4; tiny: 4-7, 7-10, 128-224,
  2-3.5), scaled to the cell's teacher and rounded (values that coincide after rounding are kept once).
* **One weight-sharing SuperLM per sub-space**, each initialised as a copy of the teacher (the official SuperLM
  starts from the teacher's checkpoint). A student's weights are the leading slices of its SuperLM's (first hidden
  dims, first heads, first FFN neurons), its layers the SuperLM's ``floor(i * L_teacher / L_student)``.
* **Task-agnostic training** (no labels) by self-attention relation distillation from the teacher's last layer
  (MiniLMv2-style): the last layer's queries, keys and values, each split into as many relation heads as the
  teacher has attention heads; relation = X X^T / sqrt(d_r); per step the *sandwich* of sub-networks of one SuperLM
  (the largest and smallest by parameters plus ``sandwich_random`` = 2 drawn at random, the official rule) each
  add their loss, summed (the official accumulates their gradients before one optimiser step). The loss, per
  sub-network, is the sum over Q, K, V of the mean squared difference of the relation scores (official:
  ``loss_mse`` of ``attention_scores_QQ/KK/VV``, ``--depth_lambda3 1`` with the logit and hidden terms at weight 0);
  ``relation_loss: kl`` gives MiniLMv2's KL between the relations' softmax distributions instead.
* **Search without retraining**: every student of every sub-space whose cost (``cost``: parameters, or forward
  FLOPs at the task's declared sequence length; ``budget`` x the cost of the task's own student, the cell's student
  budget) fits is scored by the same relation loss on held-out inputs (``search_batches`` fixed batches of the
  training split, which the SuperLM phase never trains on), its SuperLM in eval mode; the lowest loss wins.
* **Fine-tuning**: the chosen student, extracted from its SuperLM (the slices copied), is trained on the task's
  labels with the task's loss (``final_finetuning``: ``loss = model(**inputs)[0]``, no distillation).

The step budget: ``generations`` splits the cell's steps into ``superlm`` (``superlm_fraction`` = 1/2 of them; the
K SuperLMs train in turn, one per step, so each gets about a K-th) and ``finetune`` (the rest); the search runs at
the boundary and costs no optimiser steps (its teacher passes are counted; its wall time is in ``method_info``).
The record names the chosen student and lists every scored candidate (``method_info.candidates``).

Deviations (what differs at this harness's tiers, and why):

* Data and teacher: the SuperLMs learn from the task's training *inputs* (labels unused; the official README also
  shows MNLI inputs), not from Wikipedia + BookCorpus. The paper distils a *pre-trained* BERT-base and starts the
  SuperLMs from it; here ``teacher_weights: auto`` takes the task's teacher as it was before fine-tuning where the
  task has one (``Glue.pretrained_teacher``: the pretrained checkpoint at the small and full tiers) and the cell's
  fine-tuned teacher at the smoke tier, where nothing is pretrained (the task's "pretrained" teacher there is a
  random initialisation, with nothing to distil); the record says which (``method_info.relation_teacher``). Its
  forward passes are counted as teacher passes.
* Budget: at most ``superlm_fraction`` of one cell's steps, split over K SuperLMs, versus the paper's 15 passes over
  Wikipedia + BookCorpus per SuperLM; optimiser and schedule are the task's in both phases (official SuperLM
  training: AdamW 4e-5, batch 128 x 16 GPUs, no warm-up, weight decay 0.01; fine-tuning 2e-5, batch 32). The split
  is declared (no official split exists: the phases are separate runs).
* Search score: the paper's text was not readable here (only its abstract); the score reconstructed from it and
  from the released code is the task-agnostic relation loss on held-out data (the released ``TaskProxy`` and
  ``TaskSpecific`` scripts fine-tune every student on the task instead, which this budget cannot afford). Held-out
  means the first ``search_batches`` batches of ``calibration_batches``: their rows are dropped from SuperLM
  training batches (batches lose those rows); on a split too small to spare them (< 4x their size) they are not
  held out, and the record says so.
* Loss details: relations use the real tokens only (the official adds the -10000 attention mask to both sides,
  which cancels in the difference, and averages over padded positions too); the relation heads of a student
  width not divisible by the teacher's head count drop the last columns (as the official ``// 12``). The paper's
  own equation (KL, as MiniLMv2, or MSE, as the code) could not be read; the code's MSE is the default.
* Costs: parameters are counted exactly for the models built here (the official ``cal_para_bert`` approximates the
  Q/K/V width by the hidden size); FLOPs are 2 x the multiply-adds of the matrix products (as ``cal_flops_bert``
  counts them, with the exact Q/K/V width). The FFN width is ``round(hidden x ratio x FFN_t / (4 H_t))`` (official
  ``int(...)`` truncates, e.g. 1359 for 544 x 2.5 in floating point).
* Architecture: as the official slicing allows, the hidden size need not be a multiple of the heads; the chosen
  student is a Hugging Face ``BertForSequenceClassification`` whose self-attention projections are resized to
  ``heads x head size`` (``_autodistil_supernet.resize_attention``). It trains, evaluates, measures and pickles as
  any student, but ``from_pretrained`` cannot rebuild it from its config alone.
* The harness's ``training.estimated_flops`` prices every step as the final student's; the SuperLM phase runs
  2 + ``sandwich_random`` sub-networks per step, so ``method_info.superlm_flops`` gives that phase's own estimate.
* Only GLUE (BERT teachers and students); every other task is reported as skipped with the reason.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from bench.api import Generation, Method, Params

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch, StepContext, Task


class AutoDistil(Method):
    """Xu et al. 2022 (AutoDistil): K weight-sharing SuperLMs trained by self-attention relation distillation, a
    search for the best student within the cost budget without retraining, then task fine-tuning."""

    name = "autodistil"
    version = "1"
    domains = frozenset({"classification"})

    class Params(Params):
        # The paper's K = 3 sub-spaces (base, small, tiny: the *_256Subs.yaml files); a subset trains fewer SuperLMs.
        subspaces: tuple[Literal["base", "small", "tiny"], ...] = Field(
            ("base", "small", "tiny"), min_length=1, description="the sub-spaces, one SuperLM each (K = their number)")
        # The yamls' lists end in ",4": four values per dimension, 4^4 = 256 students per sub-space.
        points: int = Field(4, ge=1, le=16, description="values per dimension of each sub-space (linspace)")
        # Declared: the paper searches under a parameter or FLOPs constraint; here the cell's student budget.
        cost: Literal["params", "flops"] = Field("params", description="the cost the chosen student must meet")
        budget: float = Field(1.0, gt=0, le=100, description="the most a student may cost / the task student's cost")
        # Declared (no official split; module docstring).
        superlm_fraction: float = Field(0.5, ge=0, lt=1, description="share of the cell's steps spent training the "
                                                                     "SuperLMs (the rest fine-tunes the student)")
        # run_wiki_plus_book_NoAssist_RndSampl.py: [largest, smallest] + random.sample(middle, 2).
        sandwich_random: int = Field(2, ge=0, le=64, description="random sub-networks per step besides the largest "
                                                                 "and the smallest")
        # The official loss_mse; "kl": MiniLMv2's relation KL (module docstring).
        relation_loss: Literal["mse", "kl"] = Field("mse", description="distance between the relations")
        # The paper distils (and starts its SuperLMs from) a pre-trained BERT; "auto": the task's pretrained teacher
        # where it has one, the cell's fine-tuned teacher at the smoke tier (module docstring).
        teacher_weights: Literal["auto", "pretrained", "finetuned"] = Field(
            "auto", description="the teacher the SuperLMs copy and distil: before or after task fine-tuning")
        # Declared: 2 batches of the task's batch size (64 examples at batch 32) of held-out inputs.
        search_batches: int = Field(2, ge=1, le=1000, description="held-out batches that score the candidates")

        @field_validator("subspaces")
        @classmethod
        def _distinct(cls, v: tuple[str, ...]) -> tuple[str, ...]:
            if len(set(v)) != len(v):
                raise ValueError(f"sub-spaces listed twice: {list(v)}")
            return v

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.plan: dict[str, Any] = {}
        self.info: dict[str, Any] = {}
        self.heldout: set[int] = set()
        self.last: dict[str, float] = {}
        self._runner = None
        self._spaces = None
        self._base = None

    def unsupported(self, task: Task) -> str | None:
        if not type(task).__module__.startswith("bench.tasks.glue"):
            return ("AutoDistil searches BERT students inside weight-sharing SuperLMs cut from a BERT teacher by "
                    "self-attention relation distillation; only the GLUE task builds such models")
        return None

    # --- budget -------------------------------------------------------------------------------------
    def generations(self, total_steps: int) -> list[Generation]:
        s0 = min(total_steps - 1, round(total_steps * self.params.superlm_fraction))
        if s0 < 1:  # no SuperLM training: the search scores the teacher's own slices
            return [Generation(total_steps, fresh_student=False, name="finetune")]
        return [Generation(s0, fresh_student=False, name="superlm"),
                Generation(total_steps - s0, fresh_student=True, name="finetune")]

    # --- plan: the sub-spaces, costs and budget ------------------------------------------------------
    def _make_plan(self, teacher: nn.Module, student: nn.Module, ctx: StepContext) -> None:
        from bench import BenchError
        from bench.methods import _autodistil_supernet as S

        for role, m in (("teacher", teacher), ("student", student)):
            cfg = getattr(m, "config", None)
            if cfg is None or getattr(cfg, "model_type", None) != "bert" or not hasattr(m, "bert"):
                raise BenchError(f"autodistil: the {role} is not a Hugging Face BERT model ({type(m).__name__})")
        t, shape = S.arch_of(teacher), S.shape_of(teacher)
        if t.hidden % t.heads:
            raise BenchError(f"autodistil: the teacher's hidden size {t.hidden} is not a multiple of its {t.heads} "
                             f"heads")
        s_shape = S.shape_of(student)
        if (s_shape.vocab, s_shape.positions, s_shape.type_vocab, s_shape.labels) != \
                (shape.vocab, shape.positions, shape.type_vocab, shape.labels):
            raise BenchError("autodistil: the task's student and teacher differ in vocabulary, positions, token types "
                             "or labels; its students are slices of the teacher")
        seq = int(ctx.task.example_inputs(1)["input_ids"].shape[1])
        student_arch = S.arch_of(student)
        student_cost = (sum(p.numel() for p in student.parameters()) if self.params.cost == "params"
                        else S.n_flops(student_arch, s_shape, seq))
        self.plan = {"teacher": t.as_dict(), "shape": shape.__dict__, "seq": seq,
                     "task_student": student_arch.as_dict(), "task_student_cost": student_cost,
                     "budget": self.params.budget * student_cost}
        self._spaces = None

    def _space_list(self) -> list:
        from bench.methods import _autodistil_supernet as S

        if self._spaces is None:
            t = self.plan["teacher"]
            self._spaces = S.partition(t["layers"], t["heads"], t["hidden"], t["ffn"], self.params.subspaces,
                                       self.params.points)
        return self._spaces

    def _shape(self):
        from bench.methods import _autodistil_supernet as S

        return S.Shape(**self.plan["shape"])

    def _cost(self, arch) -> float:
        from bench.methods import _autodistil_supernet as S

        if self.params.cost == "params":
            return S.n_params(arch, self._shape())
        return S.n_flops(arch, self._shape(), self.plan["seq"])

    def _runner_(self):
        from bench.methods import _autodistil_supernet as S

        if self._runner is None:
            self._runner = S.SubnetRunner()
        return self._runner

    # --- the phases ---------------------------------------------------------------------------------
    def init_student(self, teacher: nn.Module, student: nn.Module, ctx: StepContext) -> nn.Module:
        from bench.methods import _autodistil_supernet as S

        if isinstance(ctx.previous, S.SuperLMContainer):  # the fine-tuning generation starts: search
            return self._search(ctx.previous, ctx)
        base = self._base_teacher(ctx)
        self._make_plan(base, student, ctx)
        supernets = S.SuperLMContainer(base, len(self._space_list()))
        if len(self.generations(ctx.total_steps)) == 1:
            supernets.to(ctx.device)
            self._held_out(ctx)
            return self._search(supernets, ctx)
        return supernets

    def _base_teacher(self, ctx: StepContext) -> nn.Module:
        """The teacher the SuperLMs copy and distil (``teacher_weights``), built once per process."""
        if self._base is not None:
            return self._base
        import torch

        from bench import BenchError

        mode = self.params.teacher_weights
        hook = getattr(ctx.task, "pretrained_teacher", None)
        tier = getattr(getattr(ctx.task, "env", None), "tier", None)
        base = None
        if hook is not None and (mode == "pretrained" or (mode == "auto" and tier != "smoke")):
            devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
            with torch.random.fork_rng(devices=devices):  # the task seeds its build; the cell's streams stay
                base = hook(ctx.teacher)
        fine = "the task's teacher, fine-tuned on the subtask"
        if base is not None:
            base = base.to(ctx.device).eval()
            for q in base.parameters():
                q.requires_grad_(False)
            self.info["relation_teacher"] = "the task's teacher before fine-tuning (Task.pretrained_teacher)"
        elif mode == "pretrained":
            raise BenchError("autodistil: teacher_weights=pretrained, but the task offers no pretrained teacher "
                             "here; use teacher_weights=auto or finetuned")
        else:
            base = ctx.teacher
            why = ("teacher_weights=finetuned" if mode == "finetuned" else
                   "smoke tier: nothing is pretrained" if tier == "smoke" and hook is not None else
                   "the task offers no pretrained teacher" if hook is None else
                   "the task does not know the teacher's pretrained state")
            self.info["relation_teacher"] = f"{fine} ({why})"
        self._base = base
        return base

    def _held_out(self, ctx: StepContext) -> None:
        """The example ids of the search batches, kept out of SuperLM training when the split can spare them."""
        ids = {int(i) for b in ctx.calibration_batches(self.params.search_batches) for i in b["index"].tolist()}
        self.heldout = ids if 4 * len(ids) <= len(ctx.task.train_data()) else set()

    def setup(self, ctx: StepContext) -> None:
        self._held_out(ctx)

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        from bench.methods import _autodistil_supernet as S

        if not isinstance(ctx.student, S.SuperLMContainer):  # fine-tuning: the task's label loss
            loss = ctx.label_loss(ctx.student_outputs(batch), batch)
            self.last = {"label": float(loss.detach())}
            return {"student": loss}
        return {"student": self._superlm_loss(batch, ctx)}

    def sandwich(self, k: int, step: int, seed: int) -> list:
        """The sub-networks of SuperLM ``k`` trained at ``step``: largest, smallest (by parameters), then
        ``sandwich_random`` others drawn without replacement (a function of seed and step: resume is exact)."""
        from bench.methods import _autodistil_supernet as S

        shape = self._shape()
        archs = sorted(self._space_list()[k].archs(), key=lambda a: (S.n_params(a, shape), a))
        middle = archs[1:-1]
        rng = random.Random(f"autodistil-{seed}-{step}")
        picked = [archs[-1], archs[0]] + rng.sample(middle, min(self.params.sandwich_random, len(middle)))
        return list(dict.fromkeys(picked))

    def _superlm_loss(self, batch: Batch, ctx: StepContext) -> torch.Tensor:
        from bench.methods import _autodistil_supernet as S
        from bench.train import select_rows

        if self.heldout:
            keep = [r for r, i in enumerate(batch["index"].tolist()) if i not in self.heldout]
            if keep and len(keep) < len(batch["index"]):
                batch = select_rows(batch, keep)
        spaces = self._space_list()
        k = ctx.generation_step % len(spaces)
        net = ctx.student.nets[k]
        head_dim = self.plan["teacher"]["hidden"] // self.plan["teacher"]["heads"]
        heads = self.plan["teacher"]["heads"]
        n = len(batch["index"])
        base = self._base_teacher(ctx)
        t_qkv = ctx.run_teacher(lambda t: S.teacher_qkv(base, batch), n)
        archs = self.sandwich(k, ctx.step, ctx.seed)
        loss = 0.0
        for arch in archs:
            _, qkv = self._runner_().run(net, arch, head_dim, batch)
            loss = loss + S.relation_loss(qkv, t_qkv, batch["attention_mask"], heads, self.params.relation_loss)
        seq = int(batch["input_ids"].shape[1])
        flops = sum(3 * S.n_flops(a, self._shape(), seq) for a in archs) * n  # forward + backward ~ 3 forwards
        self.info["superlm_flops"] = self.info.get("superlm_flops", 0) + flops
        self.last = {"relation": float(loss.detach()) / len(archs), "superlm": float(k)}
        return loss

    def _search(self, supernets: nn.Module, ctx: StepContext) -> nn.Module:
        import torch

        from bench import BenchError
        from bench.methods import _autodistil_supernet as S

        t0 = time.perf_counter()
        supernets.eval()
        p = self.params
        teacher = self.plan["teacher"]
        head_dim, heads = teacher["hidden"] // teacher["heads"], teacher["heads"]
        batches = ctx.calibration_batches(p.search_batches)
        base = self._base_teacher(ctx)
        t_qkv = [ctx.run_teacher(lambda t, b=b: S.teacher_qkv(base, b), len(b["index"])) for b in batches]
        budget = self.plan["budget"]
        candidates, spaces_info, search_flops = [], [], 0
        for k, space in enumerate(self._space_list()):
            archs = space.archs()
            feasible = [a for a in archs if self._cost(a) <= budget]
            spaces_info.append({**space.describe(), "feasible": len(feasible),
                                "steps": self._steps_of(k, ctx.total_steps)})
            for arch in feasible:
                with torch.no_grad():
                    losses = [float(S.relation_loss(self._runner_().run(supernets.nets[k], arch, head_dim, b)[1], t,
                                                    b["attention_mask"], heads, p.relation_loss))
                              for b, t in zip(batches, t_qkv)]
                    search_flops += sum(S.n_flops(arch, self._shape(), int(b["input_ids"].shape[1])) * len(b["index"])
                                        for b in batches)
                candidates.append(S.Candidate(space.name, arch, self._cost(arch), sum(losses) / len(losses)))
        try:
            best = S.choose(candidates, budget)
        except ValueError:
            cheapest = min(self._cost(a) for s in self._space_list() for a in s.archs())
            raise BenchError(f"autodistil: no student of the sub-spaces {list(p.subspaces)} costs at most "
                             f"{p.budget:g} x the task student's {p.cost} ({budget:,.0f}); the cheapest costs "
                             f"{cheapest:,.0f}") from None
        k_best = [s.name for s in self._space_list()].index(best.space)
        student = S.extract(supernets.nets[k_best], best.arch, head_dim)
        ranked = sorted(candidates, key=lambda c: (c.loss, c.cost))
        total = ctx.total_steps
        plan = self.generations(total)
        superlm_steps = plan[0].steps if len(plan) > 1 else 0
        self.info.update({
            "chosen_student": best.arch.name(), "chosen_arch": best.arch.as_dict(), "chosen_subspace": best.space,
            "chosen_cost": best.cost, "chosen_loss": best.loss, "chosen_params": S.n_params(best.arch, self._shape()),
            "task_student": S.Arch(**self.plan["task_student"]).name(),
            "task_student_cost": self.plan["task_student_cost"],
            "teacher_arch": S.Arch(**teacher).name(), "cost": p.cost, "budget_ratio": p.budget, "budget": budget,
            "sequence_length": self.plan["seq"], "subspaces": spaces_info, "scored": len(candidates),
            "candidates": {"columns": ["subspace", "arch", "cost", "loss"],
                           "rows": [[c.space, c.arch.name(), c.cost, round(c.loss, 6)] for c in ranked]},
            "split": {"total_steps": total, "superlm_steps": superlm_steps, "finetune_steps": total - superlm_steps,
                      "superlms": len(self._space_list())},
            "relation_loss": p.relation_loss, "relation_heads": heads, "search_batches": len(batches),
            "search_examples": sum(len(b["index"]) for b in batches), "search_held_out": bool(self.heldout),
            "search_forward_flops": search_flops, "search_wall_s": round(time.perf_counter() - t0, 3),
        })
        return student

    def _steps_of(self, k: int, total: int) -> int:
        """Training steps SuperLM ``k`` gets (the SuperLMs take turns, one per step)."""
        plan = self.generations(total)
        if len(plan) == 1:
            return 0
        n, K = plan[0].steps, len(self._space_list())
        return n // K + (1 if k < n % K else 0)

    # --- bookkeeping --------------------------------------------------------------------------------
    def on_step_end(self, ctx: StepContext) -> dict[str, float]:
        return dict(self.last)

    def state_dict(self) -> dict[str, Any]:
        return {"plan": dict(self.plan), "info": dict(self.info)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plan = dict(state["plan"])
        self.info = dict(state["info"])
        self._spaces = None

    def record_info(self) -> dict[str, Any]:
        return dict(self.info)

    def table_notes(self, task: Task) -> list[str]:
        i = self.info
        if "chosen_student" not in i:
            return []
        s = i["split"]
        return [f"student {i['chosen_student']} ({i['chosen_params']:,} parameters, sub-space "
                f"{i['chosen_subspace']}) chosen among {i['scored']} candidates of {s['superlms']} SuperLMs within "
                f"{i['budget_ratio']:g} x the task student's {i['cost']}; the SuperLMs trained {s['superlm_steps']} "
                f"steps by self-attention relation distillation (teacher: {i.get('relation_teacher', '?')}), the "
                f"student then {s['finetune_steps']} steps on labels; the paper pre-trains its SuperLMs on "
                f"Wikipedia + BookCorpus"]
