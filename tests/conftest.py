"""Shared test setup: offline by construction, temporary caches, and the real data root when present."""

from __future__ import annotations

import os
from pathlib import Path

import json

import numpy as np
import pytest

# Tests never touch the network: the Hugging Face libraries are told so before anything imports them.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (the README's test command runs one worker per core), each worker's torch takes its share
# of the cores: two workers of two threads each on a 2-core machine only wait on each other. Set before any
# test imports torch, which reads it once; records and profiles then say 1 thread.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

REPO = Path(__file__).resolve().parents[1]


@pytest.hookimpl(optionalhook=True)  # an xdist hook: pytest -p no:xdist must still collect
def pytest_xdist_make_scheduler(config, log):
    """Under ``--dist loadgroup``: the contract matrix's groups (`_contract_groups`) each go to one worker, so
    that a group's smoke matrix is built once; every other test is its own unit."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    from _contract_groups import scope_of

    class ContractGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope_of(nodeid)

    return ContractGroups(config, log)


def find_data_root() -> Path | None:
    root = Path(os.environ.get("BENCH_DATA") or REPO.parent / "shared" / "data")
    return root if root.is_dir() else None


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = find_data_root()
    if root is None or not (root / "glue").is_dir():
        pytest.skip(f"real data not found (set BENCH_DATA to the data root; looked at {root or REPO.parent / 'shared/data'})")
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One teacher cache per test session, so smoke teachers are trained once for all tests."""
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests: fastest for them, and immune to a busy shared CPU
    (two threads on a loaded 2-core machine wait on each other). Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def glue_smoke_task(tmp_path_factory):
    """The GLUE SST-2 smoke task (generated data, tiny models; building it trains nothing), shared by the
    measurement tests and the benchmarks."""
    from bench.api import TaskEnv
    from bench.tasks.glue import Glue

    return Glue(Glue.Params(), TaskEnv("smoke", "sst2", None, tmp_path_factory.mktemp("glue-cache")))


@pytest.fixture(scope="module")
def glue_smoke_student(glue_smoke_task):
    """(task, its seed-0 student in eval mode)."""
    return glue_smoke_task, glue_smoke_task.student(0).eval()


# --------------------------------------------------------------------------------------------------
# The generative tasks' full tier offline: a tiny Stable-Diffusion-shaped pipeline and COCO root
# --------------------------------------------------------------------------------------------------

def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's byte -> printable character table (its published definition)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_tiny_pipeline(folder) -> None:
    """A Stable-Diffusion-shaped pipeline with random weights (16 px images: 4 x 8 x 8 latents), saved with
    save_pretrained to ``folder/pipe``; its CLIP tokenizer has the 514-token byte vocabulary and no merges."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    chars = _bytes_to_unicode()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "tok").mkdir(parents=True)
    (folder / "tok" / "vocab.json").write_text(json.dumps(vocab))
    (folder / "tok" / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "tok" / "vocab.json"), str(folder / "tok" / "merges.txt"),
                              model_max_length=16)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                        projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipe")


def build_tiny_coco(root, n: int = 8) -> None:
    """A COCO root of ``n`` random val2014 and train2014 JPEGs, their caption CSV and train captions JSON."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "val2014").mkdir(parents=True)
    (root / "train2014").mkdir()
    (root / "annotations").mkdir()
    rows = ["image_id,text"]
    anns = []
    for i in range(1, n + 1):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
            root / "val2014" / f"COCO_val2014_{i:012d}.jpg")
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(
            root / "train2014" / f"COCO_train2014_{100 + i:012d}.jpg")
        rows.append(f'{i},"a photo of thing {i}, outdoors"')
        anns.append({"image_id": 100 + i, "id": i, "caption": f"a thing number {i}"})
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    (root / "annotations" / "captions_train2014.json").write_text(json.dumps({"annotations": anns}))


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """The folder of a tiny random Stable-Diffusion-shaped diffusers pipeline (`build_tiny_pipeline`)."""
    root = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_pipeline(root)
    return root / "pipe"


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory) -> Path:
    """A tiny COCO root (`build_tiny_coco`)."""
    root = tmp_path_factory.mktemp("tiny-coco") / "coco"
    build_tiny_coco(root)
    return root
