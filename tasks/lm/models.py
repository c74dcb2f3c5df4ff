"""Tokenizers and causal language models of the lm task, per tier.

* smoke and small: a byte-level BPE tokenizer (GPT-2's pre-tokenisation, Radford et al. 2019) trained
  offline with the ``tokenizers`` library on the tier's training documents, and Llama-architecture models
  (Touvron et al. 2023; pre-norm RMSNorm, rotary positions, SwiGLU FFN) or GPT-2 models built from configs.
  Dropout is 0 everywhere (TRL's GKD disables it for on-policy sampling; the tiny models need none).
  Every smoke/small model keeps a head dimension of 16 (smoke) / 32 (small) so that MiniMA can prune
  heads one to one.
* full: Hugging Face checkpoints by name or folder (``AutoModelForCausalLM``, ``AutoTokenizer``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bench import BenchError

if TYPE_CHECKING:
    from torch import nn

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class ModelSpec:
    """How to build one model: an architecture and its sizes (smoke/small), or a checkpoint (full)."""

    name: str
    arch: str = "llama"  # llama | gpt2
    sizes: dict[str, int] = field(default_factory=dict)  # layers, hidden, heads, ffn
    checkpoint: str | None = None
    layers: tuple[int, ...] | None = None  # keep these decoder layers of the checkpoint
    description: str = ""


def _spec(name: str, layers: int, hidden: int, heads: int, ffn: int, description: str) -> ModelSpec:
    return ModelSpec(name, "llama", {"layers": layers, "hidden": hidden, "heads": heads, "ffn": ffn},
                     description=description)


# Sizes: the default teacher is ~2.5-2.8x the student (MiniMA's law then picks it); the second pool member
# is much larger, so the capacity-gap choice is a real choice. FFN widths follow Llama's 8/3 x hidden.
SMOKE_TEACHERS = (
    _spec("llama-smoke-l4-h80", 4, 80, 5, 216, "tiny Llama, 4 layers, hidden 80, 5 heads"),
    _spec("llama-smoke-l6-h128", 6, 128, 8, 344, "tiny Llama, 6 layers, hidden 128, 8 heads"),
)
SMOKE_STUDENT = _spec("llama-smoke-l2-h64", 2, 64, 4, 176, "tiny Llama, 2 layers, hidden 64, 4 heads")
SMALL_TEACHERS = (
    _spec("llama-small-l4-h192", 4, 192, 6, 512, "Llama, 4 layers, hidden 192, 6 heads (trained by the task)"),
    _spec("llama-small-l6-h256", 6, 256, 8, 688, "Llama, 6 layers, hidden 256, 8 heads (trained by the task)"),
)
SMALL_STUDENT = _spec("llama-small-l2-h128", 2, 128, 4, 344, "Llama, 2 layers, hidden 128, 4 heads")
#: Position table / rotary range (4x the training length: prompts longer than a block still fit).
POSITIONS_FACTOR = 4


def as_arch(spec: ModelSpec, arch: str) -> ModelSpec:
    """``spec`` with another architecture family of the same sizes (``lm.architecture=gpt2``)."""
    if spec.checkpoint is not None or arch == spec.arch:
        return spec
    return ModelSpec(spec.name.replace(spec.arch, arch, 1), arch, dict(spec.sizes), description=
                     spec.description.replace("Llama", "GPT-2"))


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    with contextlib.suppress(AttributeError):
        hf_logging.disable_progress_bar()


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts`` (deterministic for the same texts and size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    # GPT-2 convention: one end-of-text token separates documents and doubles as padding.
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS)


def load_tokenizer_file(path: str):
    from tokenizers import Tokenizer

    return wrap_tokenizer(Tokenizer.from_file(path))


def checkpoint_tokenizer(checkpoint: str):
    from transformers import AutoTokenizer

    quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(checkpoint)
    except OSError as exc:
        raise BenchError(f"cannot load a tokenizer from {checkpoint!r}: {exc}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def config(spec: ModelSpec, vocab_size: int, max_length: int, eos_id: int):
    """The transformers config of a smoke/small spec."""
    s = spec.sizes
    positions = POSITIONS_FACTOR * max_length
    common = {"vocab_size": vocab_size, "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id,
              "tie_word_embeddings": True}
    if spec.arch == "llama":
        from transformers import LlamaConfig

        cfg = LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["ffn"], num_hidden_layers=s["layers"],
                          num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
                          max_position_embeddings=positions, attention_dropout=0.0, **common)
    elif spec.arch == "gpt2":
        from transformers import GPT2Config

        cfg = GPT2Config(n_embd=s["hidden"], n_inner=s["ffn"], n_layer=s["layers"], n_head=s["heads"],
                         n_positions=positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    else:
        raise BenchError(f"unknown lm architecture {spec.arch!r}; valid: llama, gpt2")
    cfg._attn_implementation = "sdpa"
    return cfg


def model_class(arch: str):
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    return {"llama": LlamaForCausalLM, "gpt2": GPT2LMHeadModel}[arch]


def build(spec: ModelSpec, vocab_size: int, max_length: int, eos_id: int, seed: int) -> nn.Module:
    """A freshly initialised model of ``spec`` (seeded), or the checkpoint (optionally some layers of it)."""
    import torch

    quiet_transformers()
    torch.manual_seed(seed)
    if spec.checkpoint is None:
        return model_class(spec.arch)(config(spec, vocab_size, max_length, eos_id))
    model = load(spec.checkpoint)
    if spec.layers is not None:
        keep_layers(model, spec.layers, spec.name)
    return model


def decoder_layers(model: nn.Module):
    """The ModuleList of decoder blocks of a Llama-family or GPT-2 model."""
    inner = getattr(model, "model", None) or getattr(model, "transformer", None)
    layers = getattr(inner, "layers", None) if inner is not None else None
    if layers is None and inner is not None:
        layers = getattr(inner, "h", None)
    if layers is None:
        raise BenchError(f"{type(model).__name__}: no decoder layers found (Llama-family .model.layers or "
                         f"GPT-2 .transformer.h)")
    return inner, layers


def keep_layers(model: nn.Module, layers: tuple[int, ...], name: str) -> None:
    import torch

    inner, blocks = decoder_layers(model)
    n = len(blocks)
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise BenchError(f"{name}: layers {bad} do not exist ({n} layers)")
    new = torch.nn.ModuleList(blocks[i] for i in layers)
    if hasattr(inner, "layers"):
        inner.layers = new
    else:
        inner.h = new
    cfg = model.config
    for attr in ("num_hidden_layers", "n_layer"):
        if hasattr(cfg, attr):
            setattr(cfg, attr, len(layers))
    for i, block in enumerate(new):  # attention caches are indexed by layer
        attn = getattr(block, "self_attn", None) or getattr(block, "attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = i
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in layers]


def count_params(spec: ModelSpec, vocab_size: int, max_length: int, eos_id: int) -> int:
    """Parameter count without allocating weights (meta device; tied embeddings counted once)."""
    import torch

    quiet_transformers()
    if spec.checkpoint is None:
        cfg = config(spec, vocab_size, max_length, eos_id)
    else:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(spec.checkpoint)
        if spec.layers is not None:
            for attr in ("num_hidden_layers", "n_layer"):
                if hasattr(cfg, attr):
                    setattr(cfg, attr, len(spec.layers))
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def save(model: nn.Module, folder: str) -> None:
    model.save_pretrained(folder, safe_serialization=True)


def load(folder: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    try:
        return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot load a causal language model from {folder!r}: {exc}") from exc


def generate(model: nn.Module, input_ids, attention_mask, *, max_new_tokens: int, temperature: float | None,
             pad_id: int) -> Any:
    """Exactly ``max_new_tokens`` new tokens after each prompt: greedy, or sampled at ``temperature`` with
    top-k 0 and top-p 1 (TRL GKDTrainer's sampling settings). No stop token: the corpus is packed
    documents separated by end-of-text, so an end-of-text token is followed by the next document, as in
    training; the length is the same for every row."""
    from transformers import GenerationConfig

    sample = temperature is not None
    gc = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=sample,
                          temperature=temperature if sample else None, top_k=0 if sample else None,
                          top_p=1.0 if sample else None, pad_token_id=pad_id, eos_token_id=None, bos_token_id=None,
                          use_cache=True)
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gc)
