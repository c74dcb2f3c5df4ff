"""A two-example classification task and a recording method wrapper that drive a method's generations through
the harness loop (`bench.train.train`), shared by the SD-GT and defensive-distillation tests."""

from __future__ import annotations

import torch


class Split:
    """Two examples, one-hot inputs, so example i's logits are column i of the student's weight (+ bias)."""

    def __init__(self, labels):
        self.x, self.y = torch.eye(2), torch.tensor(labels)

    def __len__(self):
        return 2

    def batch(self, indices):
        idx = torch.tensor(list(indices))
        return {"x": self.x[idx], "labels": self.y[idx], "index": idx}


class TwoExampleTask:
    """The harness asks ``student(seed)`` for each fresh generation; the students are made in call order from
    ``inits`` (hand-made (W, b)) or, without it, drawn from a generator seeded with ``seed``."""

    name = "two_examples"

    def __init__(self, labels, inits=None):
        self.split, self.inits, self.seeds = Split(labels), inits, []

    def problem(self):
        return "classification"

    def teacher_outputs_cacheable(self):
        return True

    def teacher_store(self, teacher):
        return None

    def train_data(self):
        return self.split

    def student(self, seed):
        self.seeds.append(seed)
        lin = torch.nn.Linear(2, 2)
        with torch.no_grad():
            if self.inits is not None:
                w, b = self.inits[len(self.seeds) - 1]
                lin.weight.copy_(torch.tensor(w))
                lin.bias.copy_(torch.tensor(b))
            else:
                g = torch.Generator().manual_seed(seed)
                lin.weight.copy_(torch.randn(2, 2, generator=g))
                lin.bias.copy_(torch.randn(2, generator=g))
        return lin

    def forward(self, model, batch):
        from bench.api import Outputs

        return Outputs(logits=model(batch["x"]))

    def label_loss(self, outputs, batch):
        return torch.nn.functional.cross_entropy(outputs.logits, batch["labels"])


def weights(model):
    return model.weight.detach().clone(), model.bias.detach().clone()


def recorded(method_cls):
    """``method_cls`` itself, with what each step saw written down: the generation, the student's and the previous
    generation's weights before the step, the batch and the loss; and the student's weights after each step."""

    class Recorded(method_cls):
        def __init__(self, params):
            super().__init__(params)
            self.steps, self.after, self.starts = [], [], []

        def on_generation_start(self, index, ctx):
            super().on_generation_start(index, ctx)
            self.starts.append((index, ctx.student, ctx.previous))

        def training_step(self, batch, ctx):
            losses = super().training_step(batch, ctx)
            self.steps.append({"gen": ctx.generation, "student": weights(ctx.student),
                               "previous": None if ctx.previous is None else weights(ctx.previous),
                               "batch": batch, "loss": losses["student"].item()})
            return losses

        def on_step_end(self, ctx):
            self.after.append((ctx.generation, weights(ctx.student)))
            return super().on_step_end(ctx)

    return Recorded


def run(method, task, steps, lr):
    from bench.api import OptimConfig, TrainConfig
    from bench.train import train

    cfg = TrainConfig(steps=steps, batch_size=2, eval_batch_size=2,
                      optim=OptimConfig(name="sgd", lr=lr, momentum=0.0, weight_decay=0.0, schedule="constant",
                                        warmup_ratio=0.0, grad_clip=None))
    return train(method, task, task.student(0), None, cfg, seed=0)
