"""MiniMA's structured pruning of causal LMs (methods/_lm_pruning.py): mask gradients equal the explicit
masks', identity when nothing is pruned, exact layer dropping, width pruning into the smoke student."""

from __future__ import annotations

import pytest
import torch
from bench.methods import _lm_pruning as lp
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

pytestmark = pytest.mark.usefixtures("one_thread")


def _llama(layers=4, hidden=32, heads=4, ffn=48, kv=None, seed=0, vocab=40):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv or heads, max_position_embeddings=64,
                      tie_word_embeddings=True)
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg).eval()


def _gpt2(layers=4, hidden=32, heads=4, ffn=48, seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=40, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=ffn, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg).eval()


def _batches(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 40, (3, 12), generator=g)} for _ in range(n)]


def _loss(model, batch):
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


@pytest.mark.parametrize("make", [_llama, _gpt2])
def test_head_and_neuron_importance_equal_explicit_mask_gradients(make):
    teacher = make()
    d = lp.lm_dims(teacher)
    scores = lp.importance(teacher, _batches(), _loss)
    # Explicit masks (ones, requires_grad) multiplying each head's output before the output projection and
    # each FFN neuron before the down projection, as in MiniMA's modeling_sparsellama.py.
    model = teacher
    heads = torch.zeros(d["layers"], d["heads"])
    neurons = torch.zeros(d["layers"], d["ffn"])
    for batch in _batches():
        hm = torch.ones(d["layers"], d["heads"], requires_grad=True)
        nm = torch.ones(d["layers"], d["ffn"], requires_grad=True)
        hooks = []
        for i, blk in enumerate(lp._blocks(model)):
            o = blk.self_attn.o_proj if d["arch"] == "llama" else blk.attn.c_proj
            down = blk.mlp.down_proj if d["arch"] == "llama" else blk.mlp.c_proj
            hooks.append(o.register_forward_pre_hook(
                lambda m, a, i=i, hm=hm: (a[0] * hm[i].repeat_interleave(d["head_dim"]),)))
            hooks.append(down.register_forward_pre_hook(lambda m, a, i=i, nm=nm: (a[0] * nm[i],)))
        _loss(model, batch).backward()
        for h in hooks:
            h.remove()
        heads += hm.grad.abs()
        neurons += nm.grad.abs()
    assert torch.allclose(scores["heads"], heads / 2, rtol=1e-4, atol=1e-7)
    assert torch.allclose(scores["neurons"], neurons / 2, rtol=1e-4, atol=1e-7)


def test_a_dead_hidden_dimension_has_no_importance():
    teacher = _llama()
    with torch.no_grad():  # dimension 5 carries nothing anywhere in the residual stream
        teacher.model.embed_tokens.weight[:, 5] = 0
        for blk in teacher.model.layers:
            blk.self_attn.o_proj.weight[5] = 0
            blk.mlp.down_proj.weight[5] = 0
    scores = lp.importance(teacher, _batches(), _loss)
    assert scores["hidden"][5].item() == pytest.approx(0.0, abs=1e-9)
    assert (scores["hidden"] > 0).sum() == 31


@pytest.mark.parametrize("make", [_llama, _gpt2])
def test_nothing_pruned_is_the_identity(make):
    teacher, student = make(), make(seed=9)
    assert lp.why_not_prunable(teacher, student) is None
    state = lp.pruned_state_dict(teacher, student, lp.importance(teacher, _batches(1), _loss))
    for k, v in teacher.state_dict().items():
        if k in state:
            assert torch.equal(state[k], v), k


@pytest.mark.parametrize("make", [_llama, _gpt2])
def test_layer_pruning_keeps_the_middle_block_exactly(make):
    teacher, student = make(layers=4), make(layers=2, seed=9)
    state = lp.pruned_state_dict(teacher, student, lp.importance(teacher, _batches(1), _loss))
    student.load_state_dict(state, strict=True)
    # reference: the teacher with layers [1, 2] only (MiniMA layers[d:-d], d = 1)
    ref = make(layers=4)
    blocks = ref.model.layers if hasattr(ref, "model") else ref.transformer.h
    kept = torch.nn.ModuleList([blocks[1], blocks[2]])
    if hasattr(ref, "model"):
        ref.model.layers = kept
        for i, b in enumerate(kept):
            b.self_attn.layer_idx = i
    else:
        ref.transformer.h = kept
        for i, b in enumerate(kept):
            b.attn.layer_idx = i
    ref.config.num_hidden_layers = 2
    x = torch.randint(0, 40, (2, 10))
    with torch.no_grad():
        assert torch.allclose(student(input_ids=x).logits, ref(input_ids=x).logits, atol=1e-5)


@pytest.mark.parametrize("make", [_llama, _gpt2])
def test_width_pruning_drops_the_least_important_units(make):
    teacher = make(layers=4, hidden=32, heads=4, ffn=48)
    d = lp.lm_dims(teacher)
    with torch.no_grad():  # head 2 of layer 1 and neuron 7 of layer 1 contribute nothing
        if d["arch"] == "llama":
            teacher.model.layers[1].self_attn.o_proj.weight[:, 16:24] = 0
            teacher.model.layers[1].mlp.down_proj.weight[:, 7] = 0
        else:
            teacher.transformer.h[1].attn.c_proj.weight[16:24] = 0
            teacher.transformer.h[1].mlp.c_proj.weight[7] = 0
    student = make(layers=2, hidden=24, heads=3, ffn=40, seed=9)
    scores = lp.importance(teacher, _batches(), _loss)
    assert scores["heads"][1, 2] == 0 and scores["neurons"][1, 7] == 0
    state = lp.pruned_state_dict(teacher, student, scores)
    student.load_state_dict(state, strict=True)  # every shape fits
    # layer 1 of the teacher is the student's layer 0: its kept heads are 0, 1, 3 (head 2 dropped)
    if d["arch"] == "llama":
        w_t = teacher.model.layers[1].self_attn.o_proj.weight
        keep_d = torch.sort(torch.topk(scores["hidden"], 24).indices).values
        expected = w_t[keep_d][:, torch.cat([torch.arange(0, 16), torch.arange(24, 32)])]
        assert torch.equal(student.model.layers[0].self_attn.o_proj.weight, expected)
    with torch.no_grad():
        assert torch.isfinite(student(input_ids=torch.randint(0, 40, (1, 8))).logits).all()


def test_reasons_not_to_prune():
    assert "grouped-query" in lp.why_not_prunable(_llama(heads=4, kv=2), _llama(heads=2, kv=1, layers=2, hidden=16))
    assert lp.why_not_prunable(_llama(heads=4, kv=2), _llama(heads=4, kv=2, layers=2, hidden=32)) is None
    assert "vocab" in lp.why_not_prunable(_llama(), _llama(vocab=41, layers=2))
    assert "more layers" in lp.why_not_prunable(_llama(layers=2), _llama(layers=4))
    assert "model_type" in lp.why_not_prunable(_llama(), _gpt2())
    assert lp.lm_dims(torch.nn.Linear(2, 2)) is None


def test_minima_prunes_the_smoke_teacher_into_the_smoke_student(tmp_path):
    from bench.methods.minima import MiniMA
    from bench.tasks.lm import LM

    from bench.api import TaskEnv
    from bench.train import HarnessContext

    task = LM(LM.Params(teacher_steps=20), TaskEnv(tier="smoke", subtask="corpus", data_root=None, cache_dir=tmp_path))
    method = MiniMA(MiniMA.Params())
    name = method.select_teacher(task.teacher_pool(), task.student_params())
    assert name == "llama-smoke-l4-h80"  # ~2.6x the student: the capacity-gap law's pick over the 9.4x one
    teacher = task.teacher(name)
    student = task.student(0)
    ctx = HarnessContext(task=task, student=student, teacher=teacher, total_steps=2, seed=0, device="cpu",
                         train_split=task.train_data(), batch_size=8)
    out = method.init_student(teacher, student, ctx)
    info = method.record_info()
    assert info["init"].startswith("pruned from the teacher: layers [1, 2] of 4, hidden 64/80, heads 4/5, ffn 176/216")
    assert info["importance_batches"] == 8
    batch = task.train_data().batch([0, 1])
    with torch.no_grad():  # the pruned student starts far closer to the teacher than a random one
        ce_pruned = task.label_loss(task.forward(out, batch), batch)
        ce_random = task.label_loss(task.forward(task.student(0), batch), batch)
    assert ce_pruned < ce_random
