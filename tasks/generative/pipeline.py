"""The full tier of the generative tasks: a diffusers text-to-image pipeline from a local folder as teacher.

The papers' teacher is Stable Diffusion 1.5 (DMD2, SiD-LSG, LCM, ...): a latent UNet conditioned on CLIP text
embeddings, an epsilon (or v) prediction on DDPM's discrete schedule, a VAE between latents and pixels. This
module turns such a folder (``DiffusionPipeline.save_pretrained`` layout: ``model_index.json``, ``unet/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) into the harness's conventions, loaded with
``local_files_only`` (nothing is downloaded):

* `LatentUNet`: the network contract of `bench.diffusion` around the pipeline's ``UNet2DConditionModel``
  (``net(x, timestep, cond)`` with ``cond`` the text encoder's hidden states; its null condition is the
  embedding of the empty prompt, as classifier-free guidance in diffusers' pipelines);
* `schedule_and_prediction`: the scheduler config -> `Schedule` (``vp_discrete`` with the config's betas, or
  ``flow`` for flow-matching schedulers) and the parameterisation (``epsilon``, ``v_prediction`` -> ``v``);
* the reference sampler is DDIM (``ode``) on a uniform grid of the continuous time, t_i = 1 - i / N, the UNet
  given the fractional DDPM step t (T - 1) with log alpha-bar interpolated between integer steps; diffusers'
  ``DDIMScheduler`` steps on integer "leading" timesteps (981, 961, ... for 50 steps): the same sampler on a
  slightly different grid, so the teacher row's FID is close to, not identical with, the pipeline's;
* `Pipeline`: the text encoder (prompt -> embeddings, batched, no gradient), the VAE (pixels <-> latents with
  the config's scaling factor) and the networks; generation batches are latents, images are decoded by the
  task before scoring. The efficiency probes count the denoiser through its whole sampler (the text encoder
  and the VAE decode are outside the per-image FLOPs; stated in the record's input description).
"""

from __future__ import annotations

import copy
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import BenchError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.diffusion import Schedule


def check_folder(folder: str) -> Path:
    path = Path(folder).expanduser()
    if not (path / "model_index.json").is_file():
        found = sorted(p.name for p in path.iterdir())[:8] if path.is_dir() else None
        raise BenchError(f"{folder!r} is not a diffusers pipeline folder: "
                         + (f"no model_index.json in it (found: {found or 'nothing'})" if found is not None
                            else "no such folder")
                         + "; expected a folder saved by DiffusionPipeline.save_pretrained (model_index.json, "
                           "unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    missing = [d for d in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (path / d).is_dir()]
    if missing:
        raise BenchError(f"pipeline folder {folder!r} lacks {', '.join(missing)}/ (a text-to-image pipeline needs "
                         f"unet/, vae/, text_encoder/, tokenizer/ and scheduler/)")
    return path


def schedule_and_prediction(config: dict[str, Any]) -> tuple[Schedule, str]:
    """The harness's schedule and parameterisation of a diffusers scheduler config."""
    from bench.diffusion import Schedule

    cls = str(config.get("_class_name", ""))
    if "FlowMatch" in cls:
        return Schedule("flow"), "flow"
    betas = config.get("beta_schedule", "linear")
    if betas not in ("linear", "scaled_linear") or config.get("trained_betas") is not None:
        raise BenchError(f"scheduler {cls or '?'} uses beta_schedule {betas!r}; bench reads DDPM schedules with "
                         f"linear or scaled_linear betas (Stable Diffusion's) and flow-matching schedulers")
    pred = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}.get(config.get("prediction_type", "epsilon"))
    if pred is None:
        raise BenchError(f"scheduler prediction_type {config.get('prediction_type')!r} is not supported; "
                         f"valid: epsilon, v_prediction, sample")
    return Schedule("vp_discrete", num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
                    beta_start=float(config.get("beta_start", 0.00085)), beta_end=float(config.get("beta_end", 0.012)),
                    beta_schedule=betas), pred


def _module():
    from torch import nn

    return nn.Module


class LatentUNet(_module()):  # type: ignore[misc]
    """``UNet2DConditionModel`` under the network contract: ``forward(x, timestep, cond)``; null condition =
    the empty prompt's embedding."""

    def __init__(self, unet: nn.Module, null_embedding: torch.Tensor) -> None:
        super().__init__()
        self.unet = unet
        self.register_buffer("null_embedding", null_embedding.detach().clone(), persistent=True)

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        return self.null_embedding.to(cond.dtype).expand(cond.shape[0], *self.null_embedding.shape[1:])

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor,
                guidance: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {}
        if guidance is not None:
            if getattr(self.unet.config, "time_cond_proj_dim", None) is None:
                raise BenchError("this UNet takes no guidance input (its config has no time_cond_proj_dim)")
            from .nets import sinusoidal

            kwargs["timestep_cond"] = sinusoidal(1000.0 * guidance, self.unet.config.time_cond_proj_dim).to(x.dtype)
        return self.unet(x, timestep, encoder_hidden_states=cond, **kwargs).sample


class Pipeline:
    """The components of a local diffusers text-to-image pipeline folder (see the module docstring)."""

    def __init__(self, folder: str, device: str = "cpu") -> None:
        self.folder = check_folder(folder)
        self.device = device

    @cached_property
    def _parts(self) -> dict[str, Any]:
        import json

        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        f = self.folder
        try:
            parts = {
                "unet": UNet2DConditionModel.from_pretrained(f / "unet", local_files_only=True),
                "vae": AutoencoderKL.from_pretrained(f / "vae", local_files_only=True),
                "text_encoder": CLIPTextModel.from_pretrained(f / "text_encoder", local_files_only=True),
                "tokenizer": AutoTokenizer.from_pretrained(f / "tokenizer", local_files_only=True),
                "scheduler": json.loads((f / "scheduler" / "scheduler_config.json").read_text()),
            }
        except (OSError, ValueError, KeyError) as exc:
            raise BenchError(f"cannot load the pipeline at {f}: {exc}") from None
        for name in ("unet", "vae", "text_encoder"):
            parts[name].to(self.device).eval().requires_grad_(False)
        return parts

    @property
    def unet(self) -> nn.Module:
        return self._parts["unet"]

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return self._parts["scheduler"]

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self._parts["vae"].config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self._parts["vae"].config.scaling_factor)

    def encode_prompts(self, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Text-encoder hidden states [N, L, D] of ``prompts`` (padded to the tokenizer's max length, as the
        Stable Diffusion pipelines encode them)."""
        import torch

        tok, enc = self._parts["tokenizer"], self._parts["text_encoder"]
        out = []
        with torch.inference_mode():
            for i in range(0, len(prompts), batch_size):
                ids = tok(prompts[i:i + batch_size], padding="max_length", max_length=tok.model_max_length,
                          truncation=True, return_tensors="pt").input_ids.to(self.device)
                out.append(enc(ids)[0].float().cpu())
        return torch.cat(out)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1]."""
        import torch

        with torch.inference_mode():
            return self._parts["vae"].decode(latents / self.scaling_factor).sample.clamp(-1, 1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> latents (the distribution's mean, scaled as the pipelines scale them)."""
        import torch

        with torch.inference_mode():
            return self._parts["vae"].encode(images).latent_dist.mean * self.scaling_factor

    def network(self, *, fresh: bool = False, seed: int = 0) -> LatentUNet:
        """The teacher's denoiser (``fresh``: the same architecture, newly initialised, for the student row)."""
        import torch

        if fresh:
            from diffusers import UNet2DConditionModel

            with torch.random.fork_rng():
                torch.manual_seed(seed)
                unet = UNet2DConditionModel.from_config(self.unet.config)
        else:
            unet = copy.deepcopy(self.unet)
        return LatentUNet(unet, self.encode_prompts([""])[:1])
