"""LoRA-enhanced guidance distillation — Golnari, "LoRA-Enhanced Distillation on Guided Diffusion Models"
(arXiv 2312.06899, 2023), applying Low-Rank Adaptation (Hu et al., "LoRA: Low-Rank Adaptation of Large Language
Models", ICLR 2022, arXiv 2106.09685) to the first stage of Meng, Rombach, Gao, Kingma, Ermon, Ho & Salimans,
"On Distillation of Guided Diffusion Models" (CVPR 2023, arXiv 2210.03142).

Sources read: of arXiv 2312.06899 only the abstract was readable here (Hugging Face papers page, paperswithcode,
arXiv listings); paperswithcode lists no code and no official repository was found: **no official code released**.
Of arXiv 2210.03142 the abstract and introduction (two-stage approach: "a single student model to match the
combined output of the two diffusion models of the teacher", then progressive distillation; one student
conditioned on the guidance strength w). LoRA defaults: huggingface/diffusers @ 000280f,
``examples/text_to_image/train_text_to_image_lora.py`` (the 2023 Stable Diffusion LoRA recipe: ``--rank 4``,
``LoRAAttnProcessor(rank=...)`` with no network alpha, i.e. scale 1 = alpha / rank with alpha = rank; the UNet
frozen, ``unet.requires_grad_(False)``; AdamW over the LoRA layers only, ``--learning_rate 1e-4`` constant,
``--adam_weight_decay 1e-2``, ``--max_grad_norm 1.0``) and the installed diffusers 0.42.1
``models/lora.py`` ``LoRALinearLayer`` (down ~ N(0, (1/rank)^2), up = 0).

What is implemented (one training step):

* **Student = frozen teacher + LoRA.** The student's network is the teacher's network with every ``nn.Linear``
  and ``nn.Conv2d`` wrapped (`LoRALinear`, `LoRAConv2d`): y = W x + (alpha / r) B (A x), A: r x in (for a conv,
  a conv with the base kernel, stride and padding into r channels), B: out x r (a 1 x 1 conv), B = 0 at the
  start so the student is exactly the teacher. The base weights are **the teacher's own tensors** (shared, not
  copied, requires_grad False): only A and B (and the w-embedding below) train, so there is no second full copy
  of the model in memory, no gradients and no optimiser state for it — the memory saving the paper reports.
* **w-conditioning** (Meng et al.'s student x_eta(z_t, w)): the task network's guidance embedding
  (``CondUNet(guidance_embed=True)``: sinusoidal embedding of 1000 w through a 2-layer MLP added to the
  condition vector — the same mechanism the consistency method uses for LCM's w-embedding) is added to the
  student; it is new (the teacher has none), so it trains in full, its last layer zeroed so the student still
  starts as the teacher. ``w_conditioning=False`` gives a student distilled at the task's one guidance scale,
  with nothing but A and B trainable.
* **Target** (Meng et al.'s first stage): data x0 from the training batch, t ~ U(0, t_max], x_t = alpha_t x0 +
  sigma_t eps; guidance scale s ~ U[``scale_min``, ``scale_max``] per sample; the teacher's classifier-free-guided
  prediction D(null) + s (D(c) - D(null)) (two network passes, one batched call, no gradient).
* **Loss.** Mean squared error between the student's one-pass prediction at (x_t, t, c, s) and that target, in
  the network's own parameterisation (guidance is affine in the prediction, so the target is exactly the guided
  output whatever the parameterisation).
* **Sampler.** The teacher's reference sampler (deterministic ``ode``; Euler under the flow schedule) at the
  teacher's step count (``sample_steps``; any other count of the task's ``nfe`` is also offered) with the
  student given the scale as an input (``Sampler.guidance_input``) and ``guidance`` 1: one network pass per step
  (``Sampler.nfe`` counts two only where ``guidance`` != 1), so the NFE halves against the guided teacher.
* **Memory record** (``record_info``): trainable parameters (A, B, w-embedding) against a full trainable copy
  (every parameter of the student network without adapters), and AdamW's moment bytes (exp_avg + exp_avg_sq:
  2 x 4 bytes per fp32 trainable parameter) and gradient bytes for both. The harness's training-step memory
  probe (``efficiency.training_memory``) runs on the evaluated student; with ``merge=False`` (default) it keeps
  its adapters and frozen base, so that probe measures a LoRA training step. (At the smoke tier the networks
  are so small that activations dominate: the adapters' extra activations made that probe's peak *larger* than a
  full student's, 61.7 MB against 55.2 MB at batch 16, while AdamW state fell from 1.35 MB to 0.28 MB; the saving
  is in parameters, gradients and optimiser state, and grows with the model.)

Defaults and sources: ``rank`` 4 and ``alpha`` 4 (diffusers' 2023 LoRA script: rank 4, scale 1; the paper's own
values could not be read); ``scale_min`` 1, ``scale_max`` 5 (Meng et al.'s pixel-space guidance range w in [0, 4]
written in their form (1 + w) D(c) - w D(null), i.e. adapter scale 1 + w; taken from memory of the paper, its
experiment section was not readable here); sampling at the task's guidance; ``init`` "gaussian" (A ~ N(0, 1/r^2),
diffusers' ``LoRALinearLayer``; Hu et al.: "random Gaussian initialization for A and zero for B"); optimiser: the
task's AdamW with the LoRA script's weight decay 1e-2 and clipping 1.0 (``optim_overrides``), lr 1e-4 constant
(the task's, equal to the script's).

Deviations:

* The paper's text beyond the abstract was not available: its rank, alpha, target layers, loss weighting,
  guidance range and schedule are unknown; the values above come from the sources named.
* Pixel space, the task's tiny attention-free UNets and flow-matching teacher instead of Stable Diffusion latents:
  LoRA goes on every conv and linear layer (the 2023 diffusers recipe put it on attention projections, which these
  networks do not have); ``target_convs=False`` restricts it to linear layers.
* Meng et al. write the stage-one loss in x-space with a weighting w(lambda_t); here it is the network's own
  parameterisation (for the flow velocity, x-space error times 1 / t^2), as diffusers' LoRA training regresses
  the network's prediction.
* Only the first (guidance) stage of Meng et al.: no progressive step distillation afterwards; the student samples
  at the teacher's step count (and the task's counts) with half the NFE.
* The w-embedding is the task network's 2-layer MLP on the sinusoidal embedding (Meng et al.: a Fourier
  embedding of w), trained in full; the scale given to it is the adapter's scale s (= 1 + Meng's w).
* Full tier: the pipeline UNet has no guidance input, so ``w_conditioning`` must be false there (a fixed-scale
  student); the run then fails with that message otherwise.
* The harness's step budget, batch and data order; no mixed precision; no EMA.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from bench import BenchError
from bench.api import Method, Params

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch, StepContext


def _module():
    from torch import nn

    return nn.Module


class LoRALinear(_module()):  # type: ignore[misc]
    """``base(x) + (alpha / rank) B(A(x))`` around a frozen ``nn.Linear`` (A: in -> rank, B: rank -> out, B = 0)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, init: str = "gaussian") -> None:
        super().__init__()
        from torch import nn

        self.base = base
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        w = base.weight
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=w.device, dtype=w.dtype)
        _init(self.lora_A, self.lora_B, rank, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.lora_B(self.lora_A(x))

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) B A: the update folded into W by `merge_lora`."""
        return self.scale * (self.lora_B.weight @ self.lora_A.weight)


class LoRAConv2d(_module()):  # type: ignore[misc]
    """``base(x) + (alpha / rank) B(A(x))`` around a frozen ``nn.Conv2d``: A is a conv with the base's kernel,
    stride, padding and dilation into ``rank`` channels, B a 1 x 1 conv back to the output channels (B = 0)."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, init: str = "gaussian") -> None:
        super().__init__()
        from torch import nn

        if base.groups != 1:
            raise BenchError(f"LoRA on a grouped convolution (groups={base.groups}) is not supported")
        self.base = base
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        w = base.weight
        self.lora_A = nn.Conv2d(base.in_channels, rank, base.kernel_size, stride=base.stride, padding=base.padding,
                                dilation=base.dilation, bias=False, padding_mode=base.padding_mode,
                                device=w.device, dtype=w.dtype)
        self.lora_B = nn.Conv2d(rank, base.out_channels, 1, bias=False, device=w.device, dtype=w.dtype)
        _init(self.lora_A, self.lora_B, rank, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.lora_B(self.lora_A(x))

    def delta_weight(self) -> torch.Tensor:
        import torch

        return self.scale * torch.einsum("or,rikl->oikl", self.lora_B.weight[:, :, 0, 0], self.lora_A.weight)


def _init(a: nn.Module, b: nn.Module, rank: int, init: str) -> None:
    import torch

    with torch.no_grad():
        if init == "gaussian":  # diffusers LoRALinearLayer: down ~ N(0, (1 / rank)^2)
            torch.nn.init.normal_(a.weight, std=1.0 / rank)
        # "kaiming": the layer's own default init (peft / loralib's kaiming-uniform A)
        b.weight.zero_()


LORA_TYPES = (LoRALinear, LoRAConv2d)


def add_lora(net: nn.Module, rank: int, alpha: float, *, convs: bool = True, init: str = "gaussian",
             skip: tuple[str, ...] = ()) -> list[str]:
    """Freeze every parameter of ``net`` and wrap each ``nn.Linear`` (and ``nn.Conv2d`` with ``convs``) in place,
    except inside the submodules named in ``skip``; returns the wrapped modules' names."""
    from torch import nn

    for p in net.parameters():
        p.requires_grad_(False)
    targets = [(name, m) for name, m in net.named_modules()
               if (type(m) is nn.Linear or (convs and type(m) is nn.Conv2d))
               and not any(name == s or name.startswith(s + ".") for s in skip)]
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        wrapper = LoRALinear(m, rank, alpha, init) if isinstance(m, nn.Linear) else LoRAConv2d(m, rank, alpha, init)
        setattr(parent, child, wrapper)
    return [name for name, _ in targets]


def merge_lora(net: nn.Module) -> int:
    """Replace every LoRA wrapper of ``net`` by a plain layer whose weight is W + (alpha / r) B A, in new tensors
    (the base weights may be the teacher's own); returns how many were merged. The merged weights are frozen."""
    import torch

    wrappers = [(name, m) for name, m in net.named_modules() if isinstance(m, LORA_TYPES)]
    for name, m in wrappers:
        merged = copy.deepcopy(m.base)  # a fresh copy: the shared base is never written
        with torch.no_grad():
            merged.weight.add_(m.delta_weight().to(merged.weight.dtype))
        for p in merged.parameters():
            p.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent_name) if parent_name else net, child, merged)
    return len(wrappers)


def share_copy(net: nn.Module) -> nn.Module:
    """A new module tree of ``net`` whose parameters and buffers are ``net``'s own tensors (nothing is copied):
    wrapping its layers never touches ``net``'s tree, and its base weights cost no memory."""
    memo = {id(t): t for t in itertools.chain(net.parameters(), net.buffers())}
    return copy.deepcopy(net, memo)


def guided_target(teacher: Any, x_t: torch.Tensor, t: torch.Tensor, cond: Any, scale: Any) -> torch.Tensor:
    """The teacher's classifier-free-guided prediction D(null) + s (D(c) - D(null)) at (x_t, t) (two passes)."""
    return teacher.predict(x_t, t, cond, guidance=scale)


def distill_loss(student_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the student's one-pass prediction and the guided teacher's."""
    return (student_pred.float() - target.float()).pow(2).mean()


def memory_accounting(net: nn.Module) -> dict[str, Any]:
    """Trainable parameters of the LoRA student against a full trainable copy, with gradient and AdamW moment bytes
    (exp_avg and exp_avg_sq: two tensors the size of each trainable parameter; the per-tensor step counters left out)."""
    lora = {id(p) for m in net.modules() if isinstance(m, LORA_TYPES)
            for p in itertools.chain(m.lora_A.parameters(), m.lora_B.parameters())}
    params = list(net.parameters())
    trainable = [p for p in params if p.requires_grad]
    full = [p for p in params if id(p) not in lora]  # the network without adapters, all of it trained
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    count = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
    out = {"trainable_params": count(trainable), "adapter_params": count(p for p in params if id(p) in lora),
           "other_trainable_params": count(p for p in trainable if id(p) not in lora),
           "frozen_params": count(p for p in params if not p.requires_grad),
           "full_copy_trainable_params": count(full),
           "gradient_bytes": nbytes(trainable), "full_copy_gradient_bytes": nbytes(full),
           "adamw_state_bytes": 2 * nbytes(trainable), "full_copy_adamw_state_bytes": 2 * nbytes(full)}
    out["trainable_fraction_of_full_copy"] = out["trainable_params"] / max(1, out["full_copy_trainable_params"])
    out["adamw_state_bytes_saved"] = out["full_copy_adamw_state_bytes"] - out["adamw_state_bytes"]
    return out


class LoRADistill(Method):
    """Golnari 2023 (arXiv 2312.06899): Meng et al. 2023's guidance distillation with the student the frozen
    teacher plus LoRA adapters (see the module docstring)."""

    name = "lora_distill"
    version = "1"
    domains = frozenset({"diffusion"})
    # train_text_to_image_lora.py (diffusers @ 000280f): --adam_weight_decay 1e-2, --max_grad_norm 1.0 (lr 1e-4
    # constant is the task's)
    optim_overrides = {"weight_decay": 1e-2, "grad_clip": 1.0}

    class Params(Params):
        # diffusers' 2023 LoRA script: --rank 4, no network alpha (scale 1, i.e. alpha = rank)
        rank: int = Field(4, ge=1, le=1024, description="LoRA rank r of every adapter (diffusers' --rank default)")
        alpha: float = Field(4.0, gt=0.0, description="LoRA alpha: the update is (alpha / r) B A (diffusers: scale 1)")
        init: Literal["gaussian", "kaiming"] = Field(
            "gaussian", description="initialisation of A (B is always 0): N(0, 1/r^2) as diffusers' LoRALinearLayer, "
                                    "or the layer's default kaiming-uniform (peft, loralib)")
        target_convs: bool = Field(True, description="adapters on conv layers too (False: linear layers only)")
        # Meng et al. 2023: one student conditioned on the guidance strength
        w_conditioning: bool = Field(True, description="the student takes the guidance scale as an input (a trained "
                                                       "w-embedding, Meng et al.); False: distilled at the task's "
                                                       "one guidance scale, only the adapters train")
        # Meng et al.'s pixel-space w in [0, 4] in their (1 + w) D(c) - w D(null) form = adapter scale 1 + w
        scale_min: float = Field(1.0, ge=0.0, le=50.0, description="smallest teacher guidance scale s (D(null) + s "
                                                                   "(D(c) - D(null))) drawn per sample")
        scale_max: float = Field(5.0, ge=0.0, le=50.0, description="largest guidance scale s drawn per sample")
        sample_guidance: float | None = Field(None, ge=0.0, le=50.0, description="the scale given to the student at "
                                                                                 "sampling (None: the task's guidance)")
        sample_steps: int | None = Field(None, ge=1, le=1000, description="the student's own sampler steps (None: the "
                                                                          "teacher's reference sampler steps)")
        merge: bool = Field(False, description="fold B A into the base weights for evaluation (one plain network; "
                                               "the training-memory probe then has no adapters to train)")

        @model_validator(mode="after")
        def _range(self):
            if self.scale_min > self.scale_max:
                raise ValueError(f"scale_min {self.scale_min} must not exceed scale_max {self.scale_max}")
            return self

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.memory: dict[str, Any] = {}
        self.wrapped: list[str] = []
        self.sample_scale: float | None = None
        self.teacher_nfe: int | None = None

    @classmethod
    def check_task(cls, params: Params, task: str, task_params: Params) -> str | None:
        s = params.sample_guidance if params.sample_guidance is not None else getattr(task_params, "guidance", None)
        if params.w_conditioning and s is not None and not params.scale_min <= s <= params.scale_max:
            return (f"lora_distill samples at guidance {s:g}, outside the scales it trains on [{params.scale_min:g}, "
                    f"{params.scale_max:g}]; widen lora_distill.scale_min/scale_max or set sample_guidance")
        if not params.w_conditioning and params.sample_guidance is not None:
            return "lora_distill.sample_guidance needs w_conditioning (a fixed-scale student samples at the task's)"
        return None

    def init_student(self, teacher: Any, student: Any, ctx: StepContext) -> Any:
        from bench.diffusion import Generator

        p = self.params
        net = share_copy(teacher.net)  # the teacher's own weights, frozen below
        proj = None
        if p.w_conditioning:
            if not hasattr(net, "guidance_proj"):
                raise BenchError("lora_distill: this task's network has no guidance embedding to train (the full tier's "
                                 "pipeline UNet); set lora_distill.w_conditioning=false for a student distilled at "
                                 "the task's guidance scale")
            built = ctx.task._build("student", ctx.seed, guidance_embed=True)  # the task's w-embedding module
            proj = built.net.guidance_proj
        self.wrapped = add_lora(net, p.rank, p.alpha, convs=p.target_convs, init=p.init)
        if not self.wrapped:
            raise BenchError("lora_distill: the teacher's network has no linear or conv layer to adapt")
        if proj is not None:
            import torch

            with torch.no_grad():  # zero last layer: the student starts exactly as the teacher at every w
                proj[-1].weight.zero_()
                proj[-1].bias.zero_()
            for q in proj.parameters():
                q.requires_grad_(True)
            net.guidance_proj = proj
            if isinstance(getattr(net, "config_dict", None), dict):
                net.config_dict = {**net.config_dict, "guidance_embed": True}
        self.memory = memory_accounting(net)
        ts = teacher.sampler
        self.teacher_nfe = ts.nfe
        self.sample_scale = float(p.sample_guidance if p.sample_guidance is not None else ts.guidance)
        steps = p.sample_steps or ts.steps
        sampler = replace(ts, steps=steps, timesteps=ts.timesteps if steps == ts.steps else None, guidance=1.0,
                          guidance_input=self.sample_scale if p.w_conditioning else None)
        how = f"w-embedding s = {self.sample_scale:g}" if p.w_conditioning else f"distilled at s = {ts.guidance:g}"
        return Generator(net, schedule=teacher.schedule, prediction=teacher.prediction, sampler=sampler,
                         description=f"LoRA guidance-distilled student (rank {p.rank}, frozen teacher weights), "
                                     f"{ts.kind} sampler at {steps} step(s), one pass per step, {how}")

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        import torch

        p = self.params
        g = ctx.student
        x0, cond = batch["x0"], batch["cond"]
        b = x0.shape[0]
        t = g.schedule.t_max() * (1.0 - torch.rand(b, device=x0.device, dtype=x0.dtype))  # U(0, t_max]
        x_t = g.add_noise(x0, torch.randn_like(x0), t)
        if p.w_conditioning:
            s = (p.scale_min + (p.scale_max - p.scale_min) * torch.rand(b)).to(device=x0.device, dtype=x0.dtype)
            pred = g.predict(x_t, t, cond, guidance_input=s)
        else:
            s = ctx.teacher.sampler.guidance
            pred = g.predict(x_t, t, cond)
        target = ctx.run_teacher(lambda teacher: guided_target(teacher, x_t, t, cond, s), n_examples=2 * b)
        return {"student": distill_loss(pred, target)}

    def finalize_student(self, student: Any, ctx: StepContext) -> Any:
        if self.params.merge:
            merge_lora(student.net)
            student.description += "; adapters merged into the weights"
        return student

    def record_info(self) -> dict[str, Any]:
        p = self.params
        return {"memory": self.memory, "lora": {"rank": p.rank, "alpha": p.alpha, "scale": p.alpha / p.rank,
                                                "init": p.init, "layers": len(self.wrapped), "merged": p.merge},
                "base_weights": "shared with the frozen teacher (not copied)",
                "w_conditioning": p.w_conditioning,
                "teacher_scales": [p.scale_min, p.scale_max] if p.w_conditioning else "the task's guidance",
                "sample_guidance": self.sample_scale, "teacher_nfe": self.teacher_nfe,
                "loss": "MSE to the guided teacher prediction in the network's parameterisation"}
