"""SANA-Sprint — Chen, Xie, Zhao et al., "SANA-Sprint: One-Step Diffusion with Continuous-Time Consistency
Distillation" (ICCV 2025, arXiv 2503.09641). Official code read: huggingface/diffusers @ 58eb52c,
``examples/research_projects/sana/train_sana_sprint_diffusers.py`` (+ its ``.sh``/README recipe),
``src/diffusers/schedulers/scheduling_scm.py`` (SCMScheduler) and ``pipelines/sana/pipeline_sana_sprint.py``;
NVlabs/Sana ``train_scripts/train_scm_ladd.py``, ``diffusion/model/respace.py`` (``logit_normal_trigflow``),
``configs/sana_sprint_config/1024ms/SanaSprint_1600M_1024px_allqknorm_bf16_scm_ladd.yaml`` and the nets'
cfg-embedder initialisation.

**Training-free TrigFlow conversion** (``SanaTrigFlow.forward``). TrigFlow: ``x_t = cos t x0 + sin t z``,
``z ~ N(0, sigma_d^2)``; the networks see ``x_t / sigma_d = cos t x0' + sin t e`` (``x0' = x0 / sigma_d``, the
teacher's own data scale) and predict ``F`` with ``dx_t/dt = sigma_d F`` and ``x0 = cos t x_t - sin t sigma_d F``.
Dividing by ``cos t + sin t`` gives the flow point ``(1 - t_f) x0' + t_f e`` at ``t_f = sin t / (sin t + cos t)``;
with ``n = sqrt(t_f^2 + (1 - t_f)^2) = 1 / (sin t + cos t)`` the flow network's input is ``x_f = n x_t / sigma_d``
(MULTIPLIED by n: the reference note's "divided by n" is the flow -> TrigFlow direction), and from the flow
velocity ``v = e - x0'``: ``F = cos t e - sin t x0' = [(1 - 2 t_f) x_f + (1 - 2 t_f + 2 t_f^2) v] / n`` (derived
and unit-tested). ``sigma_d = 0.5`` as the scripts: like SANA's ``latents * scaling_factor * sigma_data``, the
task's pixels in [-1, 1] are multiplied by sigma_d and the noise is ``sigma_d e``, so the converted teacher
sees exactly its training inputs; sigma_d then only sets ``t = arctan(sigma / sigma_d)``, the weight and the
scale of the tangent relative to the normalisation constant 0.1, as in the scripts.

**sCM loss** (G phase): ``sigma = exp(N(0.2, 1.6^2))``, ``t = arctan(sigma / sigma_d)``; a CFG scale w per
sample from {4, 4.5, 5}, given to the student as the guidance input ``0.1 w``; the teacher direction
``dx_t/dt = sigma_d F_T^w`` (one guided teacher call, 2 NFE); ``F^-`` and ``cos t sin t dF^-/dt`` from ONE
``torch.func.jvp`` of the student along ``(cos t sin t dx_t/dt / sigma_d, cos t sin t)``; the tangent
``g = -cos^2 t (sigma_d F^- - dx_t/dt) - r (cos t sin t x_t + sigma_d cos t sin t dF^-/dt)`` (the script's
``F_theta_grad`` already carries ``cos t sin t``), r warmed up ``min(1, step / tangent_warmup_steps)`` over
harness steps (G and D steps both count, as ``global_step`` does), ``g / (||g|| + 0.1)`` per sample; loss
``mean(w(t) / e^{logvar} (F_theta - F^- - g)^2 + logvar)`` with ``w(t) = 1 / (sigma_d tan t)``; logvar from a learned
head (its own module and optimiser, key ``logvar``). ``train_largest_timestep``: the adversarial term re-noises
the data at a fresh t that is ``largest_timestep`` = 1.5708 (pi/2) with probability 0.5 and uses that x0
prediction. **LADD**: heads on the frozen teacher's features, forward hooks on blocks of
``teacher.net.unet`` (down blocks, mid block, up blocks, in order) at SANA's ``head_block_ids`` [2, 8, 14, 19]
of 20 as fractions of the depth; each head is SANA's ``DiscHead`` (spectral-norm Conv1d over the feature map
flattened to tokens, local batch norm of 8, LeakyReLU 0.2, a residual kernel-9 circular block, one logit per
token); the discriminator sees ``x_D = cos t_D x0_hat + sin t_D z`` through the converted teacher, ``t_D =
arctan(exp(N(-0.6, 1)) / sigma_d)``. G loss ``-mean(D(fake))``, total ``1 * L_sCM + 0.5 * L_adv``; D loss hinge
``0.5 (mean relu(1 - D(real)) + mean relu(1 + D(fake)))`` with misaligned pairs (real images of rolled
conditions counted as fakes, ``misaligned_pairs_D``). G and D alternate (``phase``): even harness steps update
the student (and logvar head), odd steps the discriminator heads. In the D phase the student's x0 is taken at
the batch's t, set to ``largest_timestep`` with probability 0.5 and re-noised: NVlabs' script uses
``largest_timestep`` there; the diffusers port substitutes ``largest_timestep_prob`` (0.5 rad) — a bug we do
not copy.

**Student** (``SanaTrigFlow(transformer, guidance=True)``): the teacher's architecture with a guidance input
(``task._build("student", seed, guidance_embed=True)``), teacher weights loaded with ``strict=False``; the new
guidance MLP initialised as NVlabs' cfg embedder (first linear N(0, 0.02), last linear zero: the student starts
as the teacher; the diffusers port zeroes both linears, which leaves only the last bias trainable). It is a flow
network inside the TrigFlow conversion, so the evaluated `Generator` wraps it (`TrigFlowStudent`): given the
task's flow (x_t, t) it converts to TrigFlow (``t = atan2(t_f, 1 - t_f)``, ``x = x_f / n``), runs the TrigFlow
student and returns ``x0 = cos t x - sin t F`` (prediction ``x0``, unit data scale). Sampler: consistency
(SCMScheduler: x0, then re-noise at the next angle), guidance input 0.1 * 4.5 (the pipeline's default
``guidance_scale``), angles of SCMScheduler's defaults converted to flow time ``t_f = sin t / (sin t + cos t)``:
2 steps (1.5708, 1.3) -> (1, 0.7827); 1, 3, 4 steps ``linspace(1.5708, 0, n + 1)[:-1]`` -> (1), (1, 0.634,
0.366), (1, 0.707, 0.5, 0.293) (1.5708 is pi/2 rounded up: t_f = 1); ``steps_options = (1, 2, 3, 4)``; the own
step count is the pipeline's default 2.

Deviations: pixel space and the task's small attention-free UNets (SANA: a 0.6B/1.6B linear DiT on DC-AE
latents, text prompts); the task's flow-matching teacher; the optimiser and learning rate are the task's (the
scripts: CAME 2e-6 / AdamW 1e-6, weight decay 0 / 1e-4), only the gradient clip 0.1 of both scripts is applied
(``optim_overrides``); ``tangent_warmup_steps`` 4000 of the README's 30,000 steps becomes the same fraction of
the cell's budget; the logvar head has its own time and guidance embeddings (SANA's ``logvar_linear`` reads the
student's own embedding) so that it has its own optimiser; UNet blocks stand in for transformer blocks.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from bench.api import Method, Params

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch, StepContext, Task

STEPS_OPTIONS = (1, 2, 3, 4)


# --------------------------------------------------------------------------------------------------
# TrigFlow <-> flow
# --------------------------------------------------------------------------------------------------


def flow_time(t):
    """Flow time of TrigFlow angle t: ``t_f = sin t / (sin t + cos t)`` (clamped to [0, 1])."""
    import torch

    t = torch.as_tensor(t)
    return (torch.sin(t) / (torch.sin(t) + torch.cos(t))).clamp(0.0, 1.0)


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def trigflow_from_flow(x: torch.Tensor, t: torch.Tensor, velocity) -> torch.Tensor:
    """TrigFlow prediction F at unit-scale TrigFlow input ``x = x_t / sigma_d`` and angle ``t`` [B] of a flow
    network ``velocity(x_f, t_f)`` (velocity eps - x0): ``x_f = n x``, ``F = [(1 - 2 t_f) x_f + (1 - 2 t_f +
    2 t_f^2) v] / n``, ``n = sqrt(t_f^2 + (1 - t_f)^2)`` (``SanaTrigFlow.forward``)."""
    import torch

    tf = flow_time(t)
    n = torch.sqrt(tf ** 2 + (1 - tf) ** 2)
    x_f = x * _col(n, x)
    v = velocity(x_f, tf)
    tf_, n_ = _col(tf, x), _col(n, x)
    return ((1 - 2 * tf_) * x_f + (1 - 2 * tf_ + 2 * tf_ ** 2) * v) / n_


def tangent(f_minus: torch.Tensor, dxt_dt: torch.Tensor, x_t: torch.Tensor, jvp_out: torch.Tensor,
            t: torch.Tensor, r: float, sigma_d: float, c: float = 0.1) -> torch.Tensor:
    """The normalised sCM tangent: ``g = -cos^2 t (sigma_d F^- - dx_t/dt) - r (cos t sin t x_t + sigma_d jvp)``,
    ``jvp`` = the student's JVP along (cos t sin t dx_t/dt / sigma_d, cos t sin t); returns ``g / (||g|| + c)``."""
    import torch

    ct, st = _col(torch.cos(t), x_t), _col(torch.sin(t), x_t)
    g = -ct * ct * (sigma_d * f_minus - dxt_dt) - r * (ct * st * x_t + sigma_d * jvp_out)
    norm = torch.linalg.vector_norm(g, dim=tuple(range(1, g.dim())), keepdim=True)
    return g / (norm + c)


def scm_loss(f_theta: torch.Tensor, f_minus: torch.Tensor, g: torch.Tensor, t: torch.Tensor, logvar: torch.Tensor,
             sigma_d: float) -> torch.Tensor:
    """``mean(1 / (sigma_d tan t) / e^{logvar} (F_theta - F^- - g)^2 + logvar)`` (the script's loss)."""
    import torch

    weight = 1.0 / (sigma_d * torch.tan(_col(t, f_theta)))
    lv = _col(logvar, f_theta)
    return ((weight / torch.exp(lv)) * (f_theta - f_minus - g) ** 2 + lv).mean()


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``0.5 (mean relu(1 - D(real)) + mean relu(1 + D(fake)))``."""
    import torch.nn.functional as F

    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def warmup_r(step: int, warmup_steps: int) -> float:
    """Tangent warm-up ``min(1, step / tangent_warmup_steps)``."""
    return min(1.0, step / max(1, warmup_steps))


def sample_angles(n: int, mean: float, std: float, sigma_d: float, device: Any = None) -> torch.Tensor:
    """``t = arctan(sigma / sigma_d)``, ``sigma = exp(N(mean, std^2))`` (``logit_normal_trigflow``)."""
    import torch

    sigma = (torch.randn(n, device=device) * std + mean).exp()
    return torch.atan(sigma / sigma_d)


def scm_timesteps(steps: int, max_t: float = 1.57080, intermediate: float = 1.3) -> tuple[float, ...]:
    """SCMScheduler's default angles for ``steps`` steps, converted to flow time (descending, last 0 dropped)."""
    import torch

    angles = [max_t, intermediate] if steps == 2 else torch.linspace(max_t, 0, steps + 1)[:-1].tolist()
    return tuple(float(flow_time(torch.tensor(a, dtype=torch.float64))) for a in angles)


# --------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------


def unet_blocks(unet: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """(name, block, output channels) of a diffusers UNet2DModel's down, mid and up blocks, in forward order."""
    ch = list(unet.config.block_out_channels)
    out = [(f"down.{i}", b, ch[i]) for i, b in enumerate(unet.down_blocks)]
    out.append(("mid", unet.mid_block, ch[-1]))
    out += [(f"up.{i}", b, list(reversed(ch))[i]) for i, b in enumerate(unet.up_blocks)]
    return out


_MODULES = ("TrigFlowStudent", "LogvarHead", "LADDHeads")


def __getattr__(name: str) -> Any:
    """The torch modules below are defined on first use (``bench ls`` imports no torch), under module-level
    names so that they pickle (the student travels in checkpoints and to measuring subprocesses)."""
    if name in _MODULES:
        return _modules()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _modules() -> dict[str, Any]:
    """The torch modules of this method by name (defined once)."""
    if "TrigFlowStudent" not in globals():
        _define_modules()
    return {k: globals()[k] for k in _MODULES}


def _define_modules() -> None:
    import torch
    from torch import nn
    from torch.nn.utils.parametrizations import spectral_norm

    from bench.tasks.generative.nets import sinusoidal

    class TrigFlowStudent(nn.Module):
        """The evaluated student: the task's flow contract ``forward(x_f, 1000 t_f, cond, guidance)`` around the
        TrigFlow student; returns its x0 prediction ``cos t x - sin t F`` (see the module docstring)."""

        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def null_condition(self, cond):
            return self.net.null_condition(cond)

        def trig(self, x: torch.Tensor, t: torch.Tensor, cond: Any, guidance: torch.Tensor | None) -> torch.Tensor:
            """F_theta at unit-scale TrigFlow input x (= x_t / sigma_d) and angle t [B]: a flow net in the conversion."""
            return trigflow_from_flow(x, t, lambda xf, tf: self.net(xf, 1000.0 * tf, cond, guidance=guidance))

        def forward(self, x_f: torch.Tensor, timestep: torch.Tensor, cond: Any, guidance: torch.Tensor | None = None):
            tf = (timestep / 1000.0).clamp(0.0, 1.0)  # bench's flow Schedule.model_time is 1000 t
            t = torch.atan2(tf, 1.0 - tf)
            x = x_f / _col(torch.sqrt(tf ** 2 + (1 - tf) ** 2), x_f)
            return _col(torch.cos(t), x) * x - _col(torch.sin(t), x) * self.trig(x, t, cond, guidance)

    class LogvarHead(nn.Module):
        """logvar(t, w): time and guidance embeddings (256-d sinusoids through 2-layer MLPs, diffusers'
        ``TimestepEmbedding``), summed, then ``Linear(dim, 1)``, Xavier-uniform weight, zero bias (``logvar_linear``)."""

        def __init__(self, dim: int = 64) -> None:
            super().__init__()
            self.t_mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
            self.g_mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
            self.out = nn.Linear(dim, 1)
            nn.init.xavier_uniform_(self.out.weight)
            nn.init.constant_(self.out.bias, 0.0)

        def forward(self, t: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
            return self.out(self.t_mlp(sinusoidal(t, 256)) + self.g_mlp(sinusoidal(guidance, 256))).squeeze(-1)

    class LocalBatchNorm(nn.Module):
        """SANA's ``BatchNormLocal``: batch norm over groups of ``virtual_bs`` samples (and tokens), affine."""

        def __init__(self, channels: int, virtual_bs: int = 8, eps: float = 1e-5) -> None:
            super().__init__()
            self.virtual_bs, self.eps = virtual_bs, eps
            self.weight = nn.Parameter(torch.ones(channels))
            self.bias = nn.Parameter(torch.zeros(channels))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = []
            for part in torch.tensor_split(x, max(1, math.ceil(x.shape[0] / self.virtual_bs))):
                mean = part.mean(dim=(0, 2), keepdim=True)
                var = part.var(dim=(0, 2), keepdim=True, unbiased=False)
                out.append((part - mean) / torch.sqrt(var + self.eps))
            return torch.cat(out) * self.weight[None, :, None] + self.bias[None, :, None]

    def block(channels: int, kernel: int) -> nn.Module:
        conv = nn.Conv1d(channels, channels, kernel, padding=kernel // 2, padding_mode="circular")
        return nn.Sequential(spectral_norm(conv, n_power_iterations=1, eps=1e-12, dim=0), LocalBatchNorm(channels),
                             nn.LeakyReLU(0.2))

    class DiscHead(nn.Module):
        """SANA's ``DiscHead``, ``c_dim = 0``: 1x1 block, residual kernel-9 block (/sqrt 2), 1x1 to one logit a token."""

        def __init__(self, channels: int) -> None:
            super().__init__()
            self.first = block(channels, 1)
            self.res = block(channels, 9)
            self.cls = spectral_norm(nn.Conv1d(channels, 1, 1), n_power_iterations=1, eps=1e-12, dim=0)

        def forward(self, feat: torch.Tensor) -> torch.Tensor:
            h = self.first(feat)
            h = (self.res(h) + h) / math.sqrt(2.0)
            return self.cls(h).reshape(feat.shape[0], -1)

    class LADDHeads(nn.Module):
        """The trainable part of LADD's discriminator: one head per hooked teacher block (the teacher stays
        frozen); a feature map [B, C, H, W] is read as H*W tokens, as SANA's heads read transformer tokens."""

        def __init__(self, channels: list[int]) -> None:
            super().__init__()
            self.heads = nn.ModuleList(DiscHead(c) for c in channels)

        def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat([h(f.flatten(2)) for h, f in zip(self.heads, feats)], dim=1)

    for cls in (TrigFlowStudent, LogvarHead, LADDHeads, LocalBatchNorm, DiscHead):
        cls.__qualname__ = cls.__name__
        cls.__module__ = __name__
        globals()[cls.__name__] = cls


# --------------------------------------------------------------------------------------------------
# Method
# --------------------------------------------------------------------------------------------------


class SanaSprint(Method):
    """Chen et al. 2025: sCM (continuous-time consistency, JVP tangent) + LADD on a TrigFlow-converted flow teacher."""

    name = "sana_sprint"
    version = "1"
    domains = frozenset({"diffusion"})
    # --gradient_clip 0.1 (diffusers script) / train.gradient_clip 0.1 (NVlabs yaml).
    optim_overrides: ClassVar[dict[str, Any]] = {"grad_clip": 0.1}
    # phase G on even harness steps (student + its logvar head), phase D on odd ones (the heads).
    update_every: ClassVar[dict[str, int]] = {"student": 2, "logvar": 2}

    class Params(Params):
        # --sigma_data 0.5 (diffusers) / scheduler.sigma_data 0.5 (yaml).
        sigma_d: float = Field(0.5, gt=0, description="TrigFlow data standard deviation sigma_d")
        # --logit_mean 0.2 --logit_std 1.6 (yaml logit_mean/logit_std): sigma = exp(N(0.2, 1.6^2)).
        p_mean: float = Field(0.2, description="mean of log sigma of the sCM times")
        p_std: float = Field(1.6, gt=0, description="std of log sigma of the sCM times")
        # --logit_mean_discriminator -0.6 --logit_std_discriminator 1.0.
        p_mean_d: float = Field(-0.6, description="mean of log sigma of the discriminator's times")
        p_std_d: float = Field(1.0, gt=0, description="std of log sigma of the discriminator's times")
        # --scm_cfg_scale 4 4.5 5 (yaml train.scm_cfg_scale).
        cfg_scales: tuple[float, ...] = Field((4.0, 4.5, 5.0), min_length=1, description="teacher CFG scales drawn "
                                                                                          "per sample")
        # --guidance_embeds_scale 0.1 (yaml model.cfg_embed_scale).
        guidance_embed_scale: float = Field(0.1, gt=0, description="factor on w before the student's guidance input")
        # --tangent_warmup_steps 4000 of the README's --max_train_steps 30000.
        tangent_warmup_fraction: float = Field(4000 / 30000, ge=0, le=1, description="share of the budget over "
                                                                                     "which r goes from 0 to 1")
        # g / (||g|| + 0.1): "0.1 was used in the paper" (script comment).
        tangent_norm_c: float = Field(0.1, gt=0, description="tangent normalisation constant c")
        # --scm_lambda 1.0 --adv_lambda 0.5.
        scm_lambda: float = Field(1.0, ge=0, description="weight of the sCM loss")
        adv_lambda: float = Field(0.5, ge=0, description="weight of the adversarial (LADD) generator loss")
        # README/yaml: --train_largest_timestep, largest_timestep 1.57080, largest_timestep_prob 0.5.
        train_largest_timestep: bool = Field(True, description="force t = largest_timestep for half of the "
                                                               "adversarial x0 predictions")
        largest_timestep: float = Field(1.5708, gt=0, le=1.5708, description="largest TrigFlow angle (pi/2)")
        largest_timestep_prob: float = Field(0.5, ge=0, le=1, description="probability of largest_timestep")
        # README/yaml: --misaligned_pairs_D / misaligned_pairs_D: true.
        misaligned_pairs_d: bool = Field(True, description="real images with rolled conditions as extra fakes for D")
        # --head_block_ids 2 8 14 19 of the 20-block SANA 1.6B, as fractions of the depth.
        head_block_fractions: tuple[float, ...] = Field((2 / 19, 8 / 19, 14 / 19, 1.0), min_length=1,
                                                        description="where the discriminator heads hook the "
                                                                    "teacher, as fractions of its block sequence")
        # pipeline_sana_sprint.py: num_inference_steps 2, guidance_scale 4.5.
        steps: int = Field(2, ge=1, le=4, description="the student's own sampler step count (1-4)")
        sample_guidance: float = Field(4.5, ge=1, description="CFG scale given to the student at sampling")
        logvar_dim: int = Field(64, ge=8, description="width of the logvar head's embeddings")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.disc: nn.Module | None = None
        self.logvar: nn.Module | None = None
        self.hooks: list[tuple[str, nn.Module]] = []
        self.info: dict[str, Any] = {}

    def unsupported(self, task: Task) -> str | None:
        if not hasattr(task, "_build"):
            return "SANA-Sprint needs a generative task that builds a guidance-embedding student"
        return None

    @classmethod
    def check_task(cls, params: Params, task: str, task_params: Params) -> str | None:
        nfe = list(getattr(task_params, "nfe", None) or [])
        if nfe and not any(n in STEPS_OPTIONS for n in nfe):
            return f"SANA-Sprint's student samples at 1-4 steps; {task}.nfe={nfe} offers none of them"
        return None

    # --- models ----------------------------------------------------------------------------------------
    def init_student(self, teacher: nn.Module, student: nn.Module, ctx: StepContext) -> nn.Module:
        import torch

        from bench.diffusion import Generator, Sampler, Schedule

        p = self.params
        built = ctx.task._build("student", ctx.seed, guidance_embed=True)
        missing, unexpected = built.net.load_state_dict(teacher.net.state_dict(), strict=False)
        if unexpected or any(not k.startswith("guidance_proj.") for k in missing):
            raise RuntimeError(f"SANA-Sprint: teacher -> student weights do not match (missing {missing}, "
                               f"unexpected {unexpected})")
        gp = built.net.guidance_proj
        with torch.no_grad():  # NVlabs cfg_embedder init: mlp[0] N(0, 0.02), mlp[2] zero
            torch.nn.init.normal_(gp[0].weight, std=0.02)
            torch.nn.init.zeros_(gp[0].bias)
            torch.nn.init.zeros_(gp[2].weight)
            torch.nn.init.zeros_(gp[2].bias)
        table = {n: scm_timesteps(n) for n in STEPS_OPTIONS}
        sampler = Sampler("consistency", steps=p.steps, timesteps=table[p.steps],
                          guidance_input=p.guidance_embed_scale * p.sample_guidance)
        self.info["timestep_table"] = {n: [round(v, 5) for v in ts] for n, ts in table.items()}
        return Generator(_modules()["TrigFlowStudent"](built.net), schedule=Schedule("flow"), prediction="x0", sampler=sampler,
                         steps_options=STEPS_OPTIONS, timestep_table=table,
                         description="SANA-Sprint TrigFlow student (sCM + LADD), consistency sampler on SCMScheduler "
                                     "angles, guidance input 0.1 w")

    def create_modules(self, ctx: StepContext) -> None:
        p = self.params
        blocks = unet_blocks(ctx.teacher.net.unet)
        ids = sorted({min(len(blocks) - 1, max(0, round(f * (len(blocks) - 1)))) for f in p.head_block_fractions})
        self.hooks = [(blocks[i][0], blocks[i][1]) for i in ids]
        mods = _modules()
        self.disc = mods["LADDHeads"]([blocks[i][2] for i in ids])
        self.logvar = mods["LogvarHead"](p.logvar_dim)
        self.info["head_blocks"] = [blocks[i][0] for i in ids]

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"disc": self.disc, "logvar": self.logvar}

    # --- pieces ----------------------------------------------------------------------------------------
    def teacher_direction(self, ctx: StepContext, x_t: torch.Tensor, t: torch.Tensor, cond: Any,
                          w: torch.Tensor) -> torch.Tensor:
        """dx_t/dt = sigma_d F_T^w(x_t / sigma_d, t), the converted teacher guided at per-sample scale w."""
        sd = self.params.sigma_d
        return ctx.run_teacher(
            lambda T: sd * trigflow_from_flow(x_t / sd, t, lambda xf, tf: T.velocity(xf, tf, cond, guidance=w)),
            n_examples=2 * x_t.shape[0])

    def disc_logits(self, ctx: StepContext, x: torch.Tensor, t: torch.Tensor, cond: Any, grad: bool) -> torch.Tensor:
        """LADD logits of TrigFlow samples ``x`` (sigma_d scale) at angles t: teacher features through hooks."""
        import torch

        sd = self.params.sigma_d
        feats: list[torch.Tensor] = []

        def keep(_module, _inputs, output):
            feats.append(output[0] if isinstance(output, tuple) else output)

        def run(T):
            handles = [blk.register_forward_hook(keep) for _, blk in self.hooks]
            try:
                with torch.enable_grad() if grad else torch.no_grad():
                    tf = flow_time(t)
                    n = torch.sqrt(tf ** 2 + (1 - tf) ** 2)
                    T.predict(x / sd * _col(n, x), tf, cond)
            finally:
                for h in handles:
                    h.remove()
            return list(feats)

        return self.disc(ctx.run_teacher(run, n_examples=x.shape[0]))

    def _draw_w(self, n: int, device: Any) -> torch.Tensor:
        import torch

        scales = torch.tensor(self.params.cfg_scales, device=device)
        return scales[torch.randint(0, len(scales), (n,), device=device)]

    def _x0(self, student: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Any, gin: torch.Tensor):
        import torch

        sd = self.params.sigma_d
        f = student.trig(x_t / sd, t, cond, gin)
        return _col(torch.cos(t), x_t) * x_t - _col(torch.sin(t), x_t) * f * sd, f

    def _largest(self, t: torch.Tensor) -> torch.Tensor:
        import torch

        p = self.params
        if not p.train_largest_timestep:
            return t
        mask = torch.rand_like(t) < p.largest_timestep_prob
        return torch.where(mask, torch.full_like(t, p.largest_timestep), t)

    # --- the step ----------------------------------------------------------------------------------------
    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        import torch

        p, sd = self.params, self.params.sigma_d
        student = ctx.student.net  # the TrigFlowStudent
        x0 = batch["x0"].float() * sd  # the scripts' model_input * sigma_data
        cond = batch["cond"]
        bsz, dev = x0.shape[0], x0.device
        t = sample_angles(bsz, p.p_mean, p.p_std, sd, dev)
        x_t = _col(torch.cos(t), x0) * x0 + _col(torch.sin(t), x0) * (torch.randn_like(x0) * sd)
        w = self._draw_w(bsz, dev)
        gin = w * p.guidance_embed_scale

        if ctx.updating("student"):  # phase G
            self.disc.eval()
            dxt_dt = self.teacher_direction(ctx, x_t, t, cond, w)
            cs = torch.cos(t) * torch.sin(t)
            with torch.no_grad():
                f_minus, jvp_out = torch.func.jvp(lambda xs, ts: student.trig(xs, ts, cond, gin),
                                                  (x_t / sd, t), (dxt_dt / sd * _col(cs, x_t), cs))
            f_theta = student.trig(x_t / sd, t, cond, gin)
            r = warmup_r(ctx.step, round(p.tangent_warmup_fraction * ctx.total_steps))
            g = tangent(f_minus.detach(), dxt_dt, x_t, jvp_out.detach(), t, r, sd, p.tangent_norm_c)
            loss_scm = scm_loss(f_theta, f_minus.detach(), g, t, self.logvar(t, gin), sd)
            if p.train_largest_timestep:
                t_new = self._largest(sample_angles(bsz, p.p_mean, p.p_std, sd, dev))
                x_new = _col(torch.cos(t_new), x0) * x0 + _col(torch.sin(t_new), x0) * (torch.randn_like(x0) * sd)
                x0_hat, _ = self._x0(student, x_new, t_new, cond, gin)
            else:
                x0_hat = _col(torch.cos(t), x_t) * x_t - _col(torch.sin(t), x_t) * f_theta * sd
            t_d = sample_angles(bsz, p.p_mean_d, p.p_std_d, sd, dev)
            x_d = _col(torch.cos(t_d), x0) * x0_hat + _col(torch.sin(t_d), x0) * (torch.randn_like(x0) * sd)
            adv = -self.disc_logits(ctx, x_d, t_d, cond, grad=True).mean()
            self.disc.train()
            total = p.scm_lambda * loss_scm + p.adv_lambda * adv
            self.info.update(r=r, scm_loss=float(loss_scm.detach()), adv_loss=float(adv.detach()),
                             g_norm_mean=float(torch.linalg.vector_norm(g.flatten(1), dim=1).mean()))
            return {"student": total, "logvar": total}

        # phase D: the student's x0 at the batch's t (pi/2 for half of them, re-noised), then hinge.
        with torch.no_grad():
            t_g = self._largest(t)
            if p.train_largest_timestep:
                x_t = _col(torch.cos(t_g), x0) * x0 + _col(torch.sin(t_g), x0) * (torch.randn_like(x0) * sd)
            x0_hat, _ = self._x0(student, x_t, t_g, cond, gin)
        t_fake = sample_angles(bsz, p.p_mean_d, p.p_std_d, sd, dev)
        t_real = t_fake
        fake = _col(torch.cos(t_fake), x0) * x0_hat + _col(torch.sin(t_fake), x0) * (torch.randn_like(x0) * sd)
        real = _col(torch.cos(t_real), x0) * x0 + _col(torch.sin(t_real), x0) * (torch.randn_like(x0) * sd)
        fake_cond = cond
        if p.misaligned_pairs_d and bsz > 1:
            shifted = torch.roll(x0, 1, 0)
            t_shift = sample_angles(bsz, p.p_mean_d, p.p_std_d, sd, dev)
            shifted = _col(torch.cos(t_shift), x0) * shifted + _col(torch.sin(t_shift), x0) * (torch.randn_like(x0) * sd)
            fake, t_fake = torch.cat([fake, shifted]), torch.cat([t_fake, t_shift])
            fake_cond = torch.cat([cond, cond])
        loss_d = hinge_d_loss(self.disc_logits(ctx, real, t_real, cond, grad=False),
                              self.disc_logits(ctx, fake, t_fake, fake_cond, grad=False))
        self.info["d_loss"] = float(loss_d.detach())
        return {"disc": loss_d}

    def record_info(self) -> dict[str, Any]:
        p = self.params
        return {**self.info, "sampler": f"consistency (SCMScheduler angles -> flow time), {p.steps} steps, guidance "
                                        f"input {p.guidance_embed_scale * p.sample_guidance:g}",
                "steps_options": list(STEPS_OPTIONS), "sigma_d": p.sigma_d, "cfg_scales": list(p.cfg_scales),
                "tangent_warmup": "fraction %.4f of the budget" % p.tangent_warmup_fraction,
                "d_phase_largest_timestep": "pi/2 as NVlabs train_scm_ladd.py (the diffusers port uses 0.5)"}
