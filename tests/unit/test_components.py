"""Separately costed model components (``Task.components``): the encoder-per-image and decoder-per-prompt
numbers segmentation rows report, from the efficiency probe to the leaderboard's columns."""

from __future__ import annotations

import torch
from torch import nn

from bench.api import Component, Task, TaskEnv
from bench.efficiency_cells import component_column_specs, efficiency_columns
from bench.measure.efficiency import component_costs


class TwoPart(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(8, 16, bias=False)  # 128 weights
        self.head = nn.Linear(16, 4)  # 64 weights + 4 biases
        self.prompt = nn.Linear(2, 16, bias=False)  # 32 weights


class TwoPartTask(Task):
    name = "twopart"
    domain = "segmentation"
    version = "1"
    subtasks = ("a",)

    def components(self) -> list[Component]:
        return [Component("encoder", "image", "encoder"), Component("decoder", "prompt", "prompt,head")]

    def component_inputs(self, name: str, batch_size: int):
        if name == "encoder":
            return {"x": torch.ones(batch_size, 8)}
        return {"emb": torch.ones(batch_size, 16), "p": torch.ones(batch_size, 2)}

    def component_forward(self, model, name, batch):
        if name == "encoder":
            return model.encoder(batch["x"])
        return model.head(batch["emb"] + model.prompt(batch["p"]))


def test_component_costs_count_each_part_per_its_unit(tmp_path):
    task = TwoPartTask(TwoPartTask.Params(), TaskEnv("smoke", "a", None, tmp_path))
    costs = component_costs(TwoPart(), task, "cpu")
    enc, dec = costs["encoder"], costs["decoder"]
    assert (enc["per"], dec["per"]) == ("image", "prompt")
    assert enc["params"] == 8 * 16
    assert dec["params"] == 2 * 16 + 16 * 4 + 4
    # A Linear is 2 FLOPs per multiply-accumulate: 2*in*out per row.
    assert enc["flops"] == 2 * 8 * 16
    assert dec["flops"] == 2 * 2 * 16 + 2 * 16 * 4
    assert enc["latency"] is None  # no timing protocol given: not timed


def test_component_cells_reach_the_leaderboard_columns():
    rec = {"efficiency": {"params": 10, "flops_per_sample": 2e9, "components": {
        "encoder": {"per": "image", "params": 3_000_000, "flops": 4e9, "latency": {"median_ms": 12.5}},
        "decoder": {"per": "prompt", "params": 500_000, "flops": 1e8, "latency": None}}}}
    cells = efficiency_columns(rec)
    assert cells["component.encoder.image.params_M"] == 3.0
    assert cells["component.encoder.image.gflops"] == 4.0
    assert cells["component.encoder.image.latency_ms"] == 12.5
    assert cells["component.decoder.prompt.gflops"] == 0.1
    assert cells["component.decoder.prompt.latency_ms"] is None
    labels = [label for _, label, _ in component_column_specs(cells)]
    assert labels == ["encoder params (M)", "encoder GFLOPs/image", "encoder ms/image",
                      "decoder params (M)", "decoder GFLOPs/prompt", "decoder ms/prompt"]
