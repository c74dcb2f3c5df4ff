"""MEAL V2 — Shen & Savvides, "MEAL V2: Boosting Vanilla ResNet-50 to 80%+ Top-1 Accuracy on ImageNet
without Tricks" (arXiv 2009.08453, 2020). Official code: szq0214/MEAL-V2 @ 59e6bca,
``extensions/teacher_wrapper.py`` (the ensemble), ``extensions/kd_loss.py`` (``KLLoss``), ``loss.py``
(``discriminatorLoss``), ``models/discriminator.py`` and ``train.py`` (the loop and optimiser).

What is implemented, following the official code:

* Soft target: the average of the teachers' softmax probabilities at temperature 1,
  p_bar = (1/K) sum_k softmax(z_k) (``ModelDistillationWrapper`` with ``combine=True``). It is the only
  target: no one-hot label enters the loss anywhere (the paper's central claim).
* Similarity loss: L_sim = -sum_c p_bar_c log softmax(z_s)_c, averaged over the batch (``KLLoss``: the
  cross-entropy, i.e. KL(p_bar || q) up to p_bar's constant entropy).
* Discriminator D: 1x1 convolutions on the logit vector, C -> C/K -> C/K^2 -> 2 with K = 8 and a ReLU
  after every layer, the last one included (``Discriminator(outputs_size=1000, K=8)``: 1000 -> 125 ->
  15 -> 2). Its input is the batch concatenation [z_s ; z_bar_t] of the student's logits (target [1, 0])
  and the teachers' *mean logits* (target [0, 1]); L_D = BCE-with-logits, averaged over the 2B x 2
  entries (``discriminatorLoss``).
* Joint minimisation, as the official code does it: L = L_sim + L_D is minimised by one optimiser over
  the student and D together, with no gradient reversal and no alternation (train.py; the maintainers
  confirm it in issue szq0214/MEAL-V2#6). Here the student's optimiser receives L_sim + L_D and D's
  optimiser L_D, which gives both exactly the gradients of the joint loss. D's learning rate equals the
  student's, as in the official code, where ``_set_learning_rate`` overwrites the nominal ``d_lr``
  every epoch (issue #9).
* Weight decay 0 (``create_optimizer(..., weight_decay=0)``), for the student and D.

Deviations: the optimiser and schedule are the task's (the harness keeps them equal across methods), not
MEAL V2's SGD 0.01 -> 0.001 over 180 epochs at batch 512; the student starts from the task's
initialisation, not from ImageNet-pretrained timm weights; D's hidden widths are floored at ``min_width``
= 8, each layer separately: C -> max(C // K, 8) -> max(max(C // K, 8) // K, 8) -> 2, where the official
code has C -> C // K -> C // K // K -> 2. The floor keeps small label spaces from a zero-width layer
(CIFAR-10: 10 -> 8 -> 8 -> 2 where the official code would give 10 -> 1 -> 0), but it changes the
discriminator of *every* label space below 512 = 8 K^2 classes, not only of those below K^2: from 64 to
511 classes the second hidden layer is 8 wide instead of C // 64 (100 classes: 100 -> 12 -> 8 -> 2, the
official code 100 -> 12 -> 1 -> 2). From 512 classes on (1,000: 125 -> 15) it is the official shape.
With a one-teacher pool the "ensemble" is that teacher.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from bench.api import Method, Params, TeacherCandidate

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch, StepContext, Task


def ensemble_target(teacher_logits: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean of the teachers' softmax probabilities, mean of their logits), both detached, float32."""
    import torch

    stacked = torch.stack([z.detach().float() for z in teacher_logits])
    return stacked.softmax(-1).mean(0), stacked.mean(0)


def similarity_loss(student_logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """-sum_c p_c log softmax(z_s)_c, averaged over the batch (``KLLoss``)."""
    import torch.nn.functional as F

    return -(target_probs * F.log_softmax(student_logits.float(), dim=-1)).sum(-1).mean()


def discriminator_labels(batch_size: int) -> torch.Tensor:
    """[1, 0] for each of the ``batch_size`` student rows, then [0, 1] for each teacher row."""
    import torch

    return torch.tensor([[1.0, 0.0]] * batch_size + [[0.0, 1.0]] * batch_size)


def discriminator_loss(disc: nn.Module, student_logits: torch.Tensor, teacher_mean_logits: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits of D on [z_s ; z_bar_t] against `discriminator_labels` (``discriminatorLoss``)."""
    import torch
    import torch.nn.functional as F

    inputs = torch.cat([student_logits.float(), teacher_mean_logits.float()], 0)
    labels = discriminator_labels(student_logits.shape[0]).to(inputs.device)
    return F.binary_cross_entropy_with_logits(disc(inputs), labels)


class MEALV2(Method):
    """Shen & Savvides 2020: averaged ensemble softmax as the only target + a jointly trained logit discriminator."""

    name = "meal_v2"
    version = "1"
    domains = frozenset({"classification"})
    # train.py create_optimizer(model, d_params, momentum=0.9, weight_decay=0).
    optim_overrides: ClassVar[dict[str, Any]] = {"weight_decay": 0.0}

    class Params(Params):
        # teachers: None = the whole pool of the task (the paper's ensembles are two teachers: gluon_senet154 +
        # gluon_resnet152_v1s; README). use_discriminator: train.py always adds discriminatorLoss.
        teachers: list[str] | None = Field(None, description="pool teachers forming the ensemble (default: all)")
        use_discriminator: bool = Field(True, description="add the jointly minimised logit discriminator loss")
        # K = 8: train.py create_discriminator_criterion, Discriminator(outputs_size=1000, K=8).
        reduction: int = Field(8, ge=2, le=64, description="width reduction K between discriminator layers")
        min_width: int = Field(8, ge=2, le=1024, description="floor of each discriminator hidden width (a deviation: "
                                                             "it widens the second layer below 512 classes; none "
                                                             "at 512 and above, e.g. 1,000)")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.disc: nn.Module | None = None
        self.info: dict[str, Any] = {}

    def unsupported(self, task: Task) -> str | None:
        if task.problem() != "classification":
            return "MEAL V2 matches class distributions; this subtask is a regression"
        return None

    def select_teachers(self, pool: list[TeacherCandidate], student_params: int) -> list[str]:
        names = [c.name for c in pool]
        chosen = list(self.params.teachers or names)
        unknown = [t for t in chosen if t not in names]
        if unknown:
            from bench import BenchError

            raise BenchError(f"meal_v2.teachers: {unknown} not in the task's teacher pool {names}")
        self.info["ensemble"] = chosen
        return chosen

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"discriminator": self.disc} if self.disc is not None else {}

    def _build_discriminator(self, num_classes: int, seed: int) -> None:
        import torch
        from bench.methods._modules import LogitDiscriminator

        rng = torch.random.get_rng_state()  # D's initialisation must not shift the cell's random stream
        torch.manual_seed(seed + 7)
        self.disc = LogitDiscriminator(num_classes, self.params.reduction, self.params.min_width)
        torch.random.set_rng_state(rng)
        self.info["num_classes"] = num_classes

    def init_student(self, teacher: nn.Module, student: nn.Module, ctx: StepContext) -> nn.Module:
        if self.params.use_discriminator and self.disc is None:
            import torch

            with torch.no_grad():
                classes = ctx.task.forward(student, ctx.task.example_inputs(2)).logits.shape[-1]
            self.info["seed"] = ctx.seed
            self._build_discriminator(int(classes), ctx.seed)
        return student

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        out = ctx.student_outputs(batch)
        teacher_logits = [ctx.teacher_outputs(batch, index=k).logits for k in range(len(ctx.teachers))]
        target, mean_logits = ensemble_target(teacher_logits)
        sim = similarity_loss(out.logits, target)
        if self.disc is None:
            return {"student": sim}
        d = discriminator_loss(self.disc, out.logits, mean_logits)
        # Joint minimisation of L_sim + L_D: the student gets the gradient of both, D of L_D.
        return {"student": sim + d, "discriminator": d}

    def state_dict(self) -> dict[str, Any]:
        return {"info": dict(self.info)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The harness restores D's weights into the module rebuilt here (it checkpoints extra modules).
        self.info = dict(state["info"])
        if self.params.use_discriminator and "num_classes" in self.info:
            self._build_discriminator(self.info["num_classes"], self.info["seed"])

    def record_info(self) -> dict[str, Any]:
        return {**self.info, "discriminator": self.disc is not None, "weight_decay": 0.0}
