"""SNOOPI (methods/diffusion/snoopi.py): the PG-SB gradient at a given guidance scale on tiny tensors worked out by
hand (both teachers guided at the same scale), the per-step scale distribution, the LoRA teacher's loss from its
formula in plain torch, NASA's attention combination on a tiny diffusers attention layer worked by hand, NASA on a
tiny cross-attention UNet, and short runs through the real training loop on both smoke tasks (1:1 updates, one-step
sampler, NASA recorded as not applicable, exact resume with the random scales)."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from bench.api import TaskEnv
from bench.diffusion import Generator, Sampler, Schedule
from bench.methods.diffusion.snoopi import (NO_CROSS_ATTENTION, SNOOPI, NASAProcessor, apply_nasa, draw_guidance,
                                            lora_teacher_loss, vsd_gradient)
from bench.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


class TableNet(torch.nn.Module):
    """eps(x, tau, c) = table[c]: a constant 2-pixel prediction per condition (id 1 is the null condition)."""

    def __init__(self, rows):
        super().__init__()
        self.register_buffer("table", torch.tensor(rows))

    def null_condition(self, cond):
        return torch.full_like(cond, 1)

    def forward(self, x, timestep, cond, guidance=None):
        return x * 0 + self.table[cond].reshape(-1, 1, 1, 2)


def _eps_generator(rows):
    # an epsilon-parameterised generator: its eps is the network output itself
    return Generator(TableNet(rows), schedule=Schedule("flow"), prediction="epsilon", sampler=Sampler())


class _Ctx:
    def __init__(self, teacher):
        self.teacher, self.examples = teacher, []

    def run_teacher(self, fn, n_examples, index=0):
        self.examples.append(n_examples)
        with torch.no_grad():
            return fn(self.teacher)


def test_vsd_gradient_by_hand():
    # sigma = (0.5, 0.2): sigma^2 = (0.25, 0.04); eps_teacher - eps_lora = (2, -1) and (10, 0)
    grad = vsd_gradient(torch.tensor([[2.0, 0.0], [10.0, 5.0]]), torch.tensor([[0.0, 1.0], [0.0, 5.0]]),
                        torch.tensor([0.5, 0.2]))
    assert torch.allclose(grad, torch.tensor([[0.5, -0.25], [0.4, 0.0]]))
    nan = vsd_gradient(torch.tensor([[float("nan"), 1.0]]), torch.zeros(1, 2), torch.tensor([1.0]))
    assert torch.equal(nan, torch.tensor([[0.0, 1.0]]))  # nan_to_num, as the code


def test_pg_sb_loss_guides_both_teachers_at_the_drawn_scale():
    # kappa_min = kappa_max = 3 pins the draw; the steps 500..500 pin t = 0.5 (flow: sigma_t = 0.5).
    # teacher:      eps(c=0) = (1, 2),   eps(null) = (0, 0)   -> guided at 3: 0 + 3 (1, 2) = (3, 6)
    # LoRA teacher: eps(c=0) = (1, 1),   eps(null) = (0.5, -1) -> guided at 3: (0.5 + 1.5, -1 + 6) = (2, 5)
    # grad = sigma^2 ((3, 6) - (2, 5)) = 0.25 (1, 1); loss = 0.5 mean(grad^2) = 0.03125, d loss/dx = grad / 2
    # (were the LoRA teacher unguided, (1, 1): grad = 0.25 (2, 5); were both at the task's 2, grad = 0.25 (1, 2.5))
    method = SNOOPI(SNOOPI.Params(kappa_min=3.0, kappa_max=3.0, min_step_percent=0.5, max_step_percent=0.501))
    teacher = _eps_generator([[1.0, 2.0], [0.0, 0.0]])
    method.fake = _eps_generator([[1.0, 1.0], [0.5, -1.0]])
    ctx = _Ctx(teacher)
    x = torch.tensor([[0.3, -0.7]]).reshape(1, 1, 1, 2).requires_grad_(True)
    loss = method._vsd_loss(x, torch.tensor([0]), ctx)
    assert method.kappa == 3.0
    assert loss.item() == pytest.approx(0.03125)
    loss.backward()
    assert torch.allclose(x.grad, torch.full_like(x, 0.125))
    assert ctx.examples == [2]  # one guided teacher pass: conditional and null halves of 1 example


def test_guidance_scale_distribution():
    torch.manual_seed(0)
    draws = torch.tensor([draw_guidance(0.5, 4.0) for _ in range(4000)])
    assert draws.min() >= 0.5 and draws.max() <= 4.0
    # U(0.5, 4): mean 2.25, variance 3.5^2 / 12 = 1.0208, each quarter of the range holds a quarter of the draws
    assert draws.mean().item() == pytest.approx(2.25, abs=0.05)
    assert draws.var().item() == pytest.approx(3.5 ** 2 / 12, abs=0.05)
    quarters = torch.histc(draws, bins=4, min=0.5, max=4.0) / len(draws)
    assert torch.allclose(quarters, torch.full((4,), 0.25), atol=0.03)
    torch.manual_seed(1)
    u = torch.rand(()).item()
    torch.manual_seed(1)
    assert draw_guidance(0.5, 4.0) == pytest.approx(0.5 + 3.5 * u)  # one uniform draw from torch's generator
    assert draw_guidance(2.0, 2.0) == 2.0  # a fixed scale: SwiftBrush
    with pytest.raises(ValueError, match="kappa_min"):
        SNOOPI.Params(kappa_min=3.0, kappa_max=2.0)


def test_lora_teacher_loss_from_its_formula():
    # eps_pred = (0.5, -0.5) everywhere; loss = mean(((1 - k / 1000)(eps_pred - eps))^2) with the same draws
    fake = _eps_generator([[0.5, -0.5], [9.0, 9.0]])
    x = torch.randn(3, 1, 1, 2)
    torch.manual_seed(7)
    loss = lora_teacher_loss(fake, x, torch.tensor([0, 0, 0]), null_prob=0.0)
    torch.manual_seed(7)
    k = torch.randint(0, 1000, (3,))
    eps = torch.randn(3, 1, 1, 2)
    alpha = (1 - k.float() / 1000).reshape(3, 1, 1, 1)
    expected = (alpha * (torch.tensor([0.5, -0.5]).reshape(1, 1, 1, 2) - eps)).pow(2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # null_prob -> 1: the whole batch trains on the null condition's row (9, 9)
    torch.manual_seed(7)
    null_loss = lora_teacher_loss(fake, x, torch.tensor([0, 0, 0]), null_prob=0.999999)
    assert null_loss.item() == pytest.approx((alpha * (9.0 - eps)).pow(2).mean().item(), rel=1e-6)


def _identity_attention():
    """A 1-head cross-attention layer with W_q = W_k = I, W_v = 2 I, W_out = I (no biases)."""
    from diffusers.models.attention_processor import Attention

    attn = Attention(query_dim=2, cross_attention_dim=2, heads=1, dim_head=2, bias=False)
    with torch.no_grad():
        for lin, scale in ((attn.to_q, 1.0), (attn.to_k, 1.0), (attn.to_v, 2.0), (attn.to_out[0], 1.0)):
            lin.weight.copy_(scale * torch.eye(2))
        attn.to_out[0].bias.zero_()
    return attn.eval()


def test_nasa_attention_on_a_tiny_layer_by_hand():
    # q = (sqrt(2) ln 3, 0), d = 2 so scores are q.k / sqrt(2)
    # positive tokens (1, 0), (0, 1): scores (ln 3, 0) -> weights (3/4, 1/4); V+ = (2, 0), (0, 2) -> Z+ = (1.5, 0.5)
    # negative tokens (0, 2), (2, 0): scores (0, 2 ln 3) -> weights (1/10, 9/10); V- = (0, 4), (4, 0) -> Z- = (3.6, 0.4)
    # alpha = 0.5: Z = Z+ - 0.5 Z- = (-0.3, 0.3); the identity output projection keeps it
    attn = _identity_attention()
    hidden = torch.tensor([[[math.sqrt(2) * math.log(3), 0.0]]])
    positive = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    negative = torch.tensor([[[0.0, 2.0], [2.0, 0.0]]])
    plain = attn(hidden, encoder_hidden_states=positive)
    assert torch.allclose(plain, torch.tensor([[[1.5, 0.5]]]), atol=1e-6)  # the stock processor: Z+
    attn.set_processor(NASAProcessor(negative, 0.5))
    with torch.no_grad():
        steered = attn(hidden, encoder_hidden_states=positive)
    assert torch.allclose(steered, torch.tensor([[[-0.3, 0.3]]]), atol=1e-6)
    attn.set_processor(NASAProcessor(negative, 0.0))
    assert torch.allclose(attn(hidden, encoder_hidden_states=positive), plain, atol=1e-6)  # alpha 0: no steering
    # a batch of 2 shares the one negative prompt
    attn.set_processor(NASAProcessor(negative, 0.5))
    two = attn(hidden.repeat(2, 1, 1), encoder_hidden_states=positive.repeat(2, 1, 1))
    assert torch.allclose(two, torch.tensor([[[-0.3, 0.3]], [[-0.3, 0.3]]]), atol=1e-6)


def _tiny_cross_attention_generator():
    from diffusers import UNet2DConditionModel

    from bench.tasks.generative.pipeline import LatentUNet

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=2)
    net = LatentUNet(unet, torch.zeros(1, 5, 16))
    return Generator(net, schedule=Schedule("vp_discrete"), prediction="epsilon",
                     sampler=Sampler("consistency", 1, (0.999,)))


def test_nasa_goes_on_the_cross_attention_layers_of_a_text_unet():
    gen = _tiny_cross_attention_generator()
    x, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    t = torch.full((2,), 0.999)
    with torch.no_grad():
        before = gen.denoise(x, t, cond)
    negative = torch.randn(1, 5, 16)
    task = SimpleNamespace(pipeline=SimpleNamespace(encode_prompts=lambda prompts: negative.repeat(len(prompts), 1, 1)))
    method = SNOOPI(SNOOPI.Params(nasa_alpha=0.3))
    out = method.finalize_student(gen, SimpleNamespace(task=task))
    names = [n for n, m in out.net.named_modules() if isinstance(getattr(m, "processor", None), NASAProcessor)]
    assert names and all(n.endswith("attn2") for n in names)  # cross-attention only, self-attention untouched
    assert method.nasa["applied"] and method.nasa["layers"] == len(names) == 4  # down 1, mid 1, up 2
    with torch.no_grad():
        after = gen.denoise(x, t, cond)
    assert not torch.allclose(before, after)
    apply_nasa(gen.net, negative, 0.0)  # alpha 0 is the plain network again
    with torch.no_grad():
        assert torch.allclose(gen.denoise(x, t, cond), before, atol=1e-5)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    from bench.tasks.coco_fid import CocoFID

    return CocoFID(CocoFID.Params(teacher_steps=3, eval_images=8, nfe=[1, 4]),
                   TaskEnv("smoke", "val", None, tmp_path_factory.mktemp("snoopi-coco")))


def _run(task, method, steps, **kw):
    cfg = replace(task.training(), steps=steps, batch_size=4)
    return train(method, task, task.student(0), task.teacher(), cfg, seed=0, **kw)


def test_one_to_one_updates_random_scales_and_one_step_sampler(coco):
    method = SNOOPI(SNOOPI.Params())
    model, result = _run(coco, method, 3)
    assert result.updates == {"student": 3, "fake": 3}  # no TTUR: both networks every step
    kappas = [e["kappa"] for e in result.loss_log]
    assert len(kappas) == 3 and len(set(kappas)) == 3 and all(0.5 <= k <= 4.0 for k in kappas)
    # the teacher runs once per step, guided: B examples x 2 (conditional and null halves)
    assert result.teacher_forward_passes == 3 and result.teacher_examples == 3 * 4 * 2
    assert model.sampler.kind == "consistency" and model.sampler.timesteps == (0.999,)
    assert model.steps_options == (1,) and model.sampler.nfe == 1
    metrics = coco.evaluate(model)  # evaluated at its one step only: no 4-step number
    primary = next(m.name for m in coco.quality_metrics() if m.primary)
    assert metrics["nfe"] == 1.0 and metrics["steps"] == 1.0 and math.isfinite(metrics[primary])
    assert math.isfinite(metrics[f"{primary}@1"]) and math.isnan(metrics[f"{primary}@4"])
    info = method.record_info()
    assert info["nasa"] == {"applied": False, "reason": NO_CROSS_ATTENTION}  # class-conditional CondUNet
    assert info["vsd_steps"] == [20, 980]
    assert SNOOPI.check_task(SNOOPI.Params(), "coco_fid", type(coco.params)(nfe=[4])) is not None


def test_resume_is_exact_with_the_random_scales(coco, tmp_path):
    full_model, full = _run(coco, SNOOPI(SNOOPI.Params()), 3)
    ckpt = tmp_path / "state.pt"

    def stop_at_2(step, total, losses):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(coco, SNOOPI(SNOOPI.Params()), 3, checkpoint_path=ckpt, checkpoint_every=1, on_step=stop_at_2)
    model, resumed = _run(coco, SNOOPI(SNOOPI.Params()), 3, checkpoint_path=ckpt, checkpoint_every=1)
    assert resumed.resumed_from_step == 1 and resumed.loss_log[-1]["kappa"] == full.loss_log[-1]["kappa"]
    for a, b in zip(full_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_runs_on_the_prompt_conditioned_geneval_smoke_task(tmp_path):
    from bench.tasks.geneval import GenEval

    task = GenEval(GenEval.Params(teacher_steps=3, nfe=[1, 4]), TaskEnv("smoke", "val", None, tmp_path))
    method = SNOOPI(SNOOPI.Params())
    model, result = _run(task, method, 1)
    assert result.updates == {"student": 1, "fake": 1} and model.steps_options == (1,)
    assert method.record_info()["nasa"]["applied"] is False  # prompt tokens, but no cross-attention
