"""The forward function `run_gpu_checks.py` measures in the isolated memory child: at module level in an
importable module, so that the child unpickles it by reference."""


def forward_x(model, inputs):
    return model(inputs["x"])
