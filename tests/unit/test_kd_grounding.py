"""KD (methods/kd.py) on the grounding domain: feature distillation of normalised frame features, against
values worked out by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from bench.api import Outputs
from bench.methods.kd import KD, feature_distance

pytestmark = pytest.mark.usefixtures("one_thread")

R2 = 1 / math.sqrt(2)


def pairs():
    # (B=1, F=2, D=2) frames: z0 = (1, 0) vs t0 = (0, 1): cos 0; z1 = (1, 0) vs t1 = (1, 1)/sqrt2: cos 0.7071068
    z = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    t = torch.tensor([[[0.0, 1.0], [R2, R2]]])
    return z, t


def test_cosine_distance_by_hand():
    z, t = pairs()
    # (1 - 0) and (1 - 0.7071068) -> mean (1 + 0.2928932) / 2 = 0.6464466
    assert feature_distance(z, t, "cosine").item() == pytest.approx(0.6464466, abs=1e-6)
    assert feature_distance(z[:, :1], t[:, :1], "cosine").item() == pytest.approx(1.0, abs=1e-6)
    assert feature_distance(z[:, 1:], t[:, 1:], "cosine").item() == pytest.approx(1 - R2, abs=1e-6)
    # unnormalised inputs are normalised first: (3, 0) vs (0, 5) and (2, 0) vs (4, 4) -> the same 0.6464466
    zs = torch.tensor([[[3.0, 0.0], [2.0, 0.0]]])
    ts = torch.tensor([[[0.0, 5.0], [4.0, 4.0]]])
    assert feature_distance(zs, ts, "cosine").item() == pytest.approx(0.6464466, abs=1e-6)
    # anti-parallel: (1, 0) vs (-2, 0): cos -1 -> distance 2 (the sign counts); squared distance ||(2, 0)||^2 = 4
    anti_z, anti_t = torch.tensor([[1.0, 0.0]]), torch.tensor([[-2.0, 0.0]])
    assert feature_distance(anti_z, anti_t, "cosine").item() == pytest.approx(2.0, abs=1e-6)
    assert feature_distance(anti_z, anti_t, "mse").item() == pytest.approx(4.0, abs=1e-6)


def test_mse_distance_by_hand():
    z, t = pairs()
    # ||(1, 0) - (0, 1)||^2 = 2; ||(1, 0) - (0.7071, 0.7071)||^2 = 0.0857864 + 0.5 = 0.5857864 (= 2 - sqrt2)
    assert feature_distance(z[:, :1], t[:, :1], "mse").item() == pytest.approx(2.0, abs=1e-6)
    assert feature_distance(z, t, "mse").item() == pytest.approx((2 + 2 - math.sqrt(2)) / 2, abs=1e-6)
    # normalised first: (3, 0) vs (0, 5) is still 2, not 9 + 25
    assert feature_distance(torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 5.0]]), "mse").item() == \
        pytest.approx(2.0, abs=1e-6)


class GroundingCtx:
    def __init__(self, z, t, label):
        self.z, self.t, self.label = z, t, label
        self.task = SimpleNamespace(domain="grounding")

    def student_outputs(self, batch):
        return Outputs(logits=self.z, extras={"text": torch.eye(2), "scale": torch.tensor(10.0)})

    def teacher_outputs(self, batch, index=0):
        return Outputs(logits=self.t)

    def label_loss(self, out, batch):
        return self.label

    def problem(self):
        return "classification"


def test_kd_grounding_default_is_the_pure_feature_distance():
    z, t = pairs()
    z = (2 * z).requires_grad_(True)  # unnormalised student features
    t = t.clone().requires_grad_(True)
    method = KD(KD.Params())
    loss = method.training_step({}, GroundingCtx(z, t, torch.tensor(5.0)))["student"]
    assert loss.item() == pytest.approx(0.6464466, abs=1e-6)  # alpha 1: no label term (5.0 would show)
    info = method.record_info()
    assert info["feature_loss"] == "cosine" and info["alpha"] == 1.0 and info["domain"] == "grounding"
    assert "temperature" not in info
    loss.backward()
    assert t.grad is None and z.grad is not None
    mse = KD(KD.Params(feature_loss="mse"))
    assert mse.training_step({}, GroundingCtx(z, t, torch.tensor(5.0)))["student"].item() == \
        pytest.approx((4 - math.sqrt(2)) / 2, abs=1e-6)
    assert mse.record_info()["feature_loss"] == "mse"


def test_kd_grounding_alpha_mixes_in_the_label_loss():
    z, t = pairs()
    # alpha 0.5: 0.5 * 5.0 + 0.5 * 0.6464466 = 2.8232233
    method = KD(KD.Params(alpha=0.5))
    loss = method.training_step({}, GroundingCtx(z, t, torch.tensor(5.0)))["student"]
    assert loss.item() == pytest.approx(2.8232233, abs=1e-6)
    assert method.record_info()["alpha"] == 0.5
    # alpha 0.2 with mse: 0.8 * 5.0 + 0.2 * 1.2928932 = 4.2585786
    loss = KD(KD.Params(alpha=0.2, feature_loss="mse")).training_step({}, GroundingCtx(z, t, torch.tensor(5.0)))
    assert loss["student"].item() == pytest.approx(4.2585786, abs=1e-6)


def test_a_temperature_on_a_grounding_task_is_refused_before_anything_runs():
    from bench.methods.kd import KD
    from bench.tasks.charades_sta import CharadesSTA

    tp = CharadesSTA.Params()
    assert "kd.temperature does not apply to charades_sta" in KD.check_task(KD.Params(temperature=2.0),
                                                                            "charades_sta", tp)
    assert KD.check_task(KD.Params(), "charades_sta", tp) is None
    assert KD.check_task(KD.Params(temperature=2.0), "glue", tp) is None
