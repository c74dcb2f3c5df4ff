"""Distiller — He, Shi, Mueller, Zha, Li and Karypis, "Distiller: A Systematic Study of Model Distillation
Methods in Natural Language Processing" (SustaiNLP workshop at EMNLP 2021; arXiv 2109.11105, v2 titled
"Towards Automated Distillation: ..."). Official code: github.com/Cli212/Distiller @ a6a48f7 (read:
``src/Distiller/textbrewer/losses.py`` ``mi_loss`` / ``interpolated_lower_bound`` / ``compute_log_loomean``,
``src/Distiller/textbrewer/distiller_general.py`` ``compute_loss``, ``src/Distiller/utils.py``
``cal_layer_mapping`` / ``transformer_critic`` / ``Critic``, ``src/Distiller/configs.py``,
``experiments/distiller.py``, ``experiments/distillation.sh``, ``ray_directory/run.{py,sh}``,
``experiments/auto_distiller_exp.py``). The paper's full text could not be read here (only its abstract);
the loss, its defaults and the critic follow the official code, whose ``utils.py`` and ``losses.py`` are
unchanged since before the paper's arXiv v1 (2021-09-23).

What is implemented (the official default pipeline: intermediate strategy ``skip``, feature ``hidden``,
``intermediate_loss_type mi``):

* Layer mapping ``skip`` (``cal_layer_mapping``): student hidden state i (0 = the embedding output, then
  every layer) is matched to teacher hidden state int(i * N_T / N_S), i = 0..N_S; ``last`` maps i to
  N_T - N_S + i.
* MI-alpha for every mapped pair: a critic f scores every student example against every teacher example
  of the batch, scores[i, j] = f(h_S,i, h_T,j), and a baseline network gives log a(h_T,i). With
  m_ij = log mean_{k != j} exp(scores[i, k]) (the leave-one-out InfoNCE baseline) and
  l_ij = log(alpha * exp(m_ij) + (1 - alpha) * exp(log a_i)),

      I_alpha = 1 + mean_{i != j} (scores[i, i] - l_ij) - mean_{i != j} exp(scores[i, j] - l_ii),

  the interpolated bound of Poole et al. (ICML 2019, arXiv 1905.06922) as ported in the official
  ``interpolated_lower_bound``. alpha = 1 gives InfoNCE (with B - 1 samples, averaged over which one is
  left out); alpha = 0 gives TUBA with the learned baseline (NWJ when log a = 1). The loss of a pair is
  -I_alpha; the critic and the baseline are trained jointly with the student on the same loss.
* The critic (``transformer_critic``, ``hidden_size=512, out_dim=16, num_layers=2``; nhead 8, dropout 0.1):
  per side a 2-layer Transformer encoder over the tokens (sinusoidal positions, feed-forward 512, its
  output times sqrt(d_model), then a linear map to 16 dims per token); each output channel is L2-normalised
  over the tokens and the (tokens x 16) maps of a student and a teacher example are dot-multiplied. The
  baseline is a third such encoder (teacher side, 1 output dim) averaged over the tokens. One critic and
  one baseline serve every layer pair (as in the code).
* Loss (``compute_loss``): kd_loss_weight * KD + sum over pairs of inter_loss_weight * (-I_alpha) +
  hard_label_weight * CE. KD is ``kd_ce_loss``, -sum softmax(z_T / T) log softmax(z_S / T) (no T^2), on
  classification subtasks and ``kd_mse_loss``, mse(z_S / T, z_T / T), on STS-B (``ray_directory/run.py``
  sets ``kd_loss_type mse`` for stsb and ``ce`` for the others).
* Hidden states are caught by forward hooks on the encoder's embeddings and layers around the task's own
  ``forward`` (removed after each call). The teacher's are needed on every batch, so the teacher runs on
  every step (``StepContext.run_teacher``, counted in the record) instead of coming from the logit cache.

Defaults and their sources: alpha 0.9 (``experiments/distillation.sh``, ``ray_directory/run.sh`` and the
GLUE sweep ``"intermediate_loss_type": ["mse", "mi_0.9", "ce"]`` in ``run.py``; ``configs.py``'s own
default is 0.5); temperature 1, kd_loss_weight 1, inter_loss_weight 1, hard_label_weight 0 (the scripts and
``configs.py``); layer mapping ``skip``, critic sizes as above (``experiments/distiller.py``).

AutoDistiller is not run. It does not fit the budget: it recommends pipelines for a new dataset from a
tabular model (the repository's ``autodistiller_experiments/*.csv``: about 1,200 runs of the authors' sweep,
over their datasets and BERT/ELECTRA/TinyBERT pairs, with dataset features of 50 sampled examples), and
``auto_distiller_exp.py`` then trains each recommended candidate pipeline in full and keeps the best on dev.
A cell here has one training budget, the sweep data is neither a model nor ours to ship, and the
recommended pipelines use parts the harness does not have offline (contextual and back-translation
augmentation models, mixup). The cell therefore runs the default pipeline above.

Deviations:

* Samples of the MI estimate are the batch's examples. In the official code the critic's encoders get the
  hidden states batch-first, but its ``nn.TransformerEncoder`` is sequence-first, so its outputs come back
  (tokens, batch, 16). The normalisation (``dim=1``), ``view(shape[0], -1)``, the product and the
  baseline's ``mean(1)`` are all written for batch-first tensors, so the score matrix there is tokens x
  tokens: token positions, not examples, are scored against each other. Here the encoder outputs are kept
  batch-first, so each op does what it was written for, and scores are examples x examples, the in-batch
  negatives the paper's framing (MI between teacher and student representations of an input) describes.
  For the same reason the positional encoding is indexed by token (the code adds the batch index's).
* Padding is masked. The official ``src_key_padding_mask`` is a no-op: the 0/1 mask is filled twice in a
  row and ends all False. Here pad tokens are masked in the critic's attention, zeroed before the
  normalisation, and left out of the baseline's mean, so the loss does not depend on padding. The official
  code pads every example to max_seq_length (128; 64 for SST-2 and CoLA); the task pads each batch to its
  longest example.
* nhead: 8, or the largest divisor of a model's hidden size below 8 when 8 does not divide it (recorded).
* Optimisation is the task's, as for every method: the critic has its own AdamW with the task's settings and
  is clipped on its own. The official code runs one AdamW over the student, critic and baseline at the
  student's lr (5e-5 in the scripts), weight decay 0.1 except biases, no clipping, 20 epochs, fp16.
* Not in the default pipeline, and not run: data augmentation (contextual, back-translation, random), mixup,
  the EMD layer mapping with its per-pair MLP critics, attention-map matching, and the other intermediate
  losses of the search space (mse, ce, cos, pkd).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Literal

from pydantic import Field

from bench.api import Method, Params

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch, StepContext, Task

#: why AutoDistiller is not run (module docstring), kept in every record
AUTODISTILLER = ("not run: it recommends pipelines from a tabular model fitted to the authors' ~1,200-run sweep "
                 "and then trains every recommended candidate in full (auto_distiller_exp.py), beyond one "
                 "cell's budget; its pipelines also need augmentation models and mixup the harness lacks")


# --------------------------------------------------------------------------------------------------
# Layer mapping and the MI-alpha bound
# --------------------------------------------------------------------------------------------------


def layer_pairs(n_teacher: int, n_student: int, strategy: str = "skip") -> list[tuple[int, int]]:
    """(teacher, student) hidden-state indices (0 = embeddings) matched by ``cal_layer_mapping``."""
    if strategy == "skip":
        k = n_teacher / n_student
        return [(int(i * k), i) for i in range(n_student + 1)]
    if strategy == "last":
        return [(n_teacher - n_student + i, i) for i in range(n_student + 1)]
    raise ValueError(f"unknown layer mapping {strategy!r}; valid: skip, last")


def mi_alpha_bound(scores: torch.Tensor, log_baseline: torch.Tensor, alpha: float) -> torch.Tensor:
    """I_alpha of Poole et al. (module docstring) for critic ``scores`` [B, B] (row: student example, column:
    teacher example, positives on the diagonal) and ``log_baseline`` [B] (one per row)."""
    import torch

    b = scores.shape[0]
    if b < 2 or scores.shape != (b, b) or log_baseline.shape != (b,):
        raise ValueError(f"MI-alpha needs a [B, B] score matrix with B >= 2 and a [B] baseline; got "
                         f"{tuple(scores.shape)} and {tuple(log_baseline.shape)}")
    eye = torch.eye(b, dtype=torch.bool, device=scores.device)
    # loo[i, j] = log mean_{k != j} exp(scores[i, k]): row i's log-mean-exp with column j held out.
    held_out = scores[:, None, :].expand(b, b, b).masked_fill(eye[None], float("-inf"))
    loo = torch.logsumexp(held_out, dim=-1) - math.log(b - 1)
    base = log_baseline[:, None].expand(b, b)
    if alpha >= 1.0:
        interp = loo
    elif alpha <= 0.0:
        interp = base
    else:
        interp = torch.logaddexp(math.log(alpha) + loo, math.log1p(-alpha) + base)
    off = ~eye
    joint = (scores.diagonal()[:, None] - interp)[off].mean()
    marginal = (scores - interp.diagonal()[:, None])[off]
    marg = torch.exp(torch.logsumexp(marginal, dim=0) - math.log(b * (b - 1)))
    return 1.0 + joint - marg


def token_scores(z_s: torch.Tensor, z_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Critic scores [B, B] from per-token projections [B, L, C]: every channel L2-normalised over the (unmasked)
    tokens, then the flattened (L x C) maps of student i and teacher j dot-multiplied."""
    import torch.nn.functional as F

    m = mask.to(z_s.dtype)[..., None]
    u_s = F.normalize(z_s * m, dim=1).flatten(1)
    u_t = F.normalize(z_t * m.to(z_t.dtype), dim=1).flatten(1)
    return u_s @ u_t.T


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` [B, L] over the tokens where ``mask`` [B, L] is 1."""
    m = mask.to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def mi_alpha_loss(h_s: torch.Tensor, h_t: torch.Tensor, mask: torch.Tensor, critic: nn.Module,
                  alpha: float) -> torch.Tensor:
    """-I_alpha between student and teacher hidden states [B, L, d] of one layer pair (``mi_loss``)."""
    scores, log_baseline = critic(h_s, h_t.detach(), mask)
    return -mi_alpha_bound(scores.float(), log_baseline.float(), alpha)


def kd_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            regression: bool) -> torch.Tensor:
    """``kd_ce_loss`` (classification) or ``kd_mse_loss`` (regression) at ``temperature``, no T^2 factor."""
    import torch.nn.functional as F

    z_s = student_logits.float() / temperature
    z_t = teacher_logits.detach().float() / temperature
    if regression:
        return F.mse_loss(z_s, z_t)
    return -(F.softmax(z_t, dim=-1) * F.log_softmax(z_s, dim=-1)).sum(-1).mean()


# --------------------------------------------------------------------------------------------------
# The critic (torch modules, defined on first use so that `bench ls` does not import torch)
# --------------------------------------------------------------------------------------------------


def _define_modules() -> dict[str, type]:
    import torch
    from torch import nn

    class TokenEncoder(nn.Module):
        """``transformer_encoder`` batch-first: sinusoidal positions (by token), dropout, a post-norm Transformer
        encoder with a final LayerNorm, output x sqrt(d_model), a linear map to ``out_dim`` per token."""

        def __init__(self, d_model: int, out_dim: int, nhead: int = 8, hidden: int = 512, num_layers: int = 2,
                     dropout: float = 0.1) -> None:
            super().__init__()
            layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=hidden, dropout=dropout,
                                               batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(d_model),
                                                 enable_nested_tensor=False)
            self.drop = nn.Dropout(dropout)
            self.decoder = nn.Linear(d_model, out_dim)
            self.d_model = d_model

        def positions(self, length: int, device: Any, dtype: Any) -> torch.Tensor:
            pos = torch.arange(length, dtype=torch.float32, device=device)[:, None]
            div = torch.exp(torch.arange(0, self.d_model, 2, dtype=torch.float32, device=device)
                            * (-math.log(10000.0) / self.d_model))
            pe = torch.zeros(length, self.d_model, device=device)
            pe[:, 0::2] = torch.sin(pos * div)
            pe[:, 1::2] = torch.cos(pos * div)[:, : self.d_model // 2]
            return pe.to(dtype)

        def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            x = self.drop(h + self.positions(h.shape[1], h.device, h.dtype))
            x = self.encoder(x, src_key_padding_mask=mask == 0) * math.sqrt(self.d_model)
            return self.decoder(x)

    class MICritic(nn.Module):
        """Scores [B, B] (``token_scores`` of the two encoders' outputs) and log-baselines [B] (the baseline
        encoder's single output averaged over the teacher's tokens)."""

        def __init__(self, student: nn.Module, teacher: nn.Module, baseline: nn.Module) -> None:
            super().__init__()
            self.student, self.teacher, self.baseline = student, teacher, baseline

        def forward(self, h_s: torch.Tensor, h_t: torch.Tensor, mask: torch.Tensor):
            scores = token_scores(self.student(h_s, mask), self.teacher(h_t, mask), mask)
            log_baseline = masked_mean(self.baseline(h_t, mask)[..., 0], mask)
            return scores, log_baseline

    out = {"TokenEncoder": TokenEncoder, "MICritic": MICritic}
    for name, cls in out.items():
        cls.__qualname__ = name  # picklable as bench.methods.distiller.<name> (module __getattr__)
    return out


_MODULES: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    if name in ("TokenEncoder", "MICritic"):
        if not _MODULES:
            _MODULES.update(_define_modules())
        return _MODULES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def heads_for(d_model: int, wanted: int) -> int:
    """``wanted`` attention heads, or the largest divisor of ``d_model`` below it."""
    return max(h for h in range(1, wanted + 1) if d_model % h == 0)


# --------------------------------------------------------------------------------------------------
# Hidden states through the task's forward
# --------------------------------------------------------------------------------------------------


@contextmanager
def hidden_states_of(model: nn.Module) -> Iterator[dict[str, Any]]:
    """While active, ``seen["hidden_states"]`` collects the hidden states of the BERT-family ``model``'s call (the
    embedding output, then every layer's output: what ``output_hidden_states`` returns), so the task's own
    ``forward`` is used unchanged. They are caught by forward hooks removed on exit, not by
    ``output_hidden_states``: transformers would then install permanent hooks (local functions) on the model, and
    the harness could no longer pickle the student into its checkpoints."""
    from bench import BenchError

    base = getattr(model, "base_model", None)
    emb = getattr(base, "embeddings", None)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if emb is None or layers is None:
        raise BenchError("distiller matches hidden states of BERT-family encoders (base_model.embeddings and "
                         f"base_model.encoder.layer); {type(model).__name__} has none")
    states: list[torch.Tensor] = []

    def keep(module: nn.Module, args: tuple, out: Any) -> None:
        states.append(out[0] if isinstance(out, tuple) else out)

    handles = [emb.register_forward_hook(keep)] + [layer.register_forward_hook(keep) for layer in layers]
    try:
        yield {"hidden_states": states, "expected": len(layers) + 1}
    finally:
        for h in handles:
            h.remove()


def forward_hidden(task: Task, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """(logits, hidden states) of ``model`` on ``batch`` through ``task.forward``."""
    from bench import BenchError

    with hidden_states_of(model) as seen:
        logits = task.forward(model, batch).logits
    if len(seen["hidden_states"]) != seen["expected"]:
        raise BenchError(f"distiller: caught {len(seen['hidden_states'])} hidden states in one forward, expected "
                         f"{seen['expected']} (embeddings + every layer)")
    return logits, tuple(seen["hidden_states"])


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


class Distiller(Method):
    """He et al. 2021 (SustaiNLP, arXiv 2109.11105): hidden-state distillation with the MI-alpha bound through a
    learned Transformer critic (skip layer mapping), plus prediction-layer KD and a (zero-weighted) label CE."""

    name = "distiller"
    version = "1"
    domains = frozenset({"classification"})

    class Params(Params):
        # 0.9: experiments/distillation.sh, ray_directory/run.sh and the GLUE sweep ("mi_0.9"); configs.py: 0.5.
        alpha: float = Field(0.9, ge=0, le=1, description="MI-alpha interpolation: 1 InfoNCE, 0 TUBA/NWJ")
        # configs.py / the scripts: --temperature 1, --kd_loss_weight 1, --inter_loss_weight 1,
        # --hard_label_weight 0.
        temperature: float = Field(1.0, gt=0, description="temperature of the prediction-layer KD term")
        kd_weight: float = Field(1.0, ge=0, description="weight of the prediction-layer KD term (kd_loss_weight)")
        inter_weight: float = Field(1.0, ge=0, description="weight of each layer pair's -MI-alpha "
                                                           "(inter_loss_weight)")
        hard_label_weight: float = Field(0.0, ge=0, description="weight of the label loss (CE; MSE on STS-B)")
        # configs.py --layer_mapping_strategy / --intermediate_strategy skip (the scripts); EMD is not ported.
        layer_mapping: Literal["skip", "last"] = Field("skip", description="student-to-teacher hidden-state "
                                                                           "mapping (cal_layer_mapping)")
        # experiments/distiller.py: Critic(type='transformer', hidden_size=512, out_dim=16, num_layers=2), nhead 8,
        # dropout 0.1 (Critic defaults); the baseline: the same with out_dim=1.
        critic_dim: int = Field(16, ge=1, le=1024, description="critic output channels per token")
        critic_hidden: int = Field(512, ge=1, le=8192, description="feed-forward width of the critic's encoders")
        critic_layers: int = Field(2, ge=1, le=12, description="Transformer layers per critic encoder")
        critic_heads: int = Field(8, ge=1, le=64, description="attention heads per critic encoder (capped to a "
                                                              "divisor of the hidden size)")
        critic_dropout: float = Field(0.1, ge=0, lt=1, description="dropout in the critic's encoders")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.critic: nn.Module | None = None
        self.pairs: list[tuple[int, int]] = []
        self.info: dict[str, Any] = {}
        self.last: dict[str, float] = {}

    def unsupported(self, task: Task) -> str | None:
        if not type(task).__module__.startswith("bench.tasks.glue"):
            return ("Distiller matches the hidden states of BERT-family text encoders (the paper's GLUE setting); "
                    f"task {task.name} is not GLUE")
        return None

    def create_modules(self, ctx: StepContext) -> None:
        import torch

        p = self.params
        s_cfg, t_cfg = ctx.student.config, ctx.teacher.config
        d_s, d_t = int(s_cfg.hidden_size), int(t_cfg.hidden_size)
        self.pairs = layer_pairs(int(t_cfg.num_hidden_layers), int(s_cfg.num_hidden_layers), p.layer_mapping)
        h_s, h_t = heads_for(d_s, p.critic_heads), heads_for(d_t, p.critic_heads)
        enc, critic_cls = __getattr__("TokenEncoder"), __getattr__("MICritic")
        rng = torch.random.get_rng_state()  # the critic's initialisation must not shift the cell's random stream
        torch.manual_seed(ctx.seed + 2109)
        kw = {"hidden": p.critic_hidden, "num_layers": p.critic_layers, "dropout": p.critic_dropout}
        self.critic = critic_cls(enc(d_s, p.critic_dim, h_s, **kw), enc(d_t, p.critic_dim, h_t, **kw),
                                 enc(d_t, 1, h_t, **kw))
        torch.random.set_rng_state(rng)
        self.info = {
            "alpha": p.alpha, "temperature": p.temperature, "kd_weight": p.kd_weight,
            "inter_weight": p.inter_weight, "hard_label_weight": p.hard_label_weight,
            "layer_mapping": p.layer_mapping, "pairs_teacher_student": [list(x) for x in self.pairs],
            "kd_loss": "mse" if ctx.problem() == "regression" else "ce",
            "critic": {"type": "transformer", "out_dim": p.critic_dim, "hidden": p.critic_hidden,
                       "layers": p.critic_layers, "heads_student": h_s, "heads_teacher": h_t,
                       "params": sum(x.numel() for x in self.critic.parameters())},
            "autodistiller": AUTODISTILLER,
        }

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"critic": self.critic} if self.critic is not None else {}

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        p = self.params
        mask = batch["attention_mask"]
        with hidden_states_of(ctx.student) as seen:
            out = ctx.student_outputs(batch)
        hs_s = seen["hidden_states"]
        t_logits, hs_t = ctx.run_teacher(lambda t: forward_hidden(ctx.task, t, batch), len(batch["index"]))
        if len(hs_s) != seen["expected"] or len(hs_s) <= max(s for _, s in self.pairs) \
                or len(hs_t) <= max(t for t, _ in self.pairs):
            from bench import BenchError

            raise BenchError(f"distiller: hidden states ({len(hs_s)} student, {len(hs_t)} teacher) do not "
                             f"cover the layer pairs {self.pairs}")
        kd = kd_term(out.logits, t_logits, p.temperature, regression=ctx.problem() == "regression")
        mi = [mi_alpha_loss(hs_s[s], hs_t[t], mask, self.critic, p.alpha) for t, s in self.pairs]
        inter = sum(mi)
        label = ctx.label_loss(out, batch)
        total = p.kd_weight * kd + p.inter_weight * inter + p.hard_label_weight * label
        self.last = {"kd": float(kd.detach()), "mi_alpha_mean": -float(inter.detach()) / len(mi),
                     "label": float(label.detach())}
        # One objective for both (the official code puts the critic's parameters in the student's optimiser).
        return {"student": total, "critic": total}

    def on_step_end(self, ctx: StepContext) -> dict[str, float]:
        return dict(self.last)

    def state_dict(self) -> dict[str, Any]:
        return {"info": dict(self.info), "last": dict(self.last)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # create_modules rebuilds the critic in resumed runs; the harness then loads its saved weights.
        self.info = {**state["info"], **self.info}
        self.last = dict(state.get("last", {}))

    def record_info(self) -> dict[str, Any]:
        return {**self.info, "final": dict(self.last)}

    def table_notes(self, task: Task) -> list[str]:
        return [f"MI-alpha (alpha {self.params.alpha:g}) is estimated over the batch's examples with padding "
                "masked; the official critic's tensor layout scores token positions and leaves padding unmasked "
                "(see the method's docstring). AutoDistiller's pipeline recommendation and data augmentation "
                "are not run."]
