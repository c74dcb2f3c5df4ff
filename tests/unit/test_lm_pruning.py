"""MiniMA's structured pruning of causal LMs (methods/_lm_pruning.py): mask gradients equal the explicit
masks' (heads, neurons, hidden dimensions; the hidden ones also in closed form on a residual-only model),
identity when nothing is pruned, exact layer dropping, width pruning into the smoke student."""

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


def _llama_residual_only():
    """One Llama layer whose attention and FFN outputs are zero (o_proj = down_proj = 0): every position's
    residual stream is its token's embedding row, so the hidden-dimension importance has a closed form."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=5, hidden_size=4, intermediate_size=4, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=True, rms_norm_eps=1e-6)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).eval()
    E = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, -1.0], [2.0, 1.0, 0.0, 1.0], [0.0, -1.0, 1.0, 1.0],
                      [1.0, 1.0, 1.0, 0.0]]) * 0.5
    w = torch.tensor([1.0, 0.5, 2.0, 1.5])
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(E)  # tied: also the output projection
        model.model.norm.weight.copy_(w)
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
    return model, E, w


def test_hidden_importance_by_hand_and_the_dimensions_kept():
    # MiniMA's hidden mask m (one per dimension, shared) multiplies the embedding output, the attention output,
    # the residual after the attention addition, the FFN output and the residual after the FFN addition. Here the
    # two sub-layer outputs are 0 and the residual stream is h = E[token] m^3, so at m = 1
    #   dL/dm_d = 3 sum_positions h_d g_d,   g = dL/dh at the final RMSNorm's input,
    # and, with r = sqrt(mean(h^2) + eps), y = w h / r, logits = E y (tied), L = mean CE over the N targets:
    #   u = E^T (softmax(logits) - onehot(target)) / N,   g = u w / r - h (sum_i u_i w_i h_i) / (D r^3).
    # The score is |dL/dm| per batch, averaged over the batches.
    model, E, w = _llama_residual_only()
    D, eps = 4, 1e-6
    batches = [{"input_ids": torch.tensor([[0, 2, 4, 1]])}, {"input_ids": torch.tensor([[3, 3, 0]])}]
    expected = torch.zeros(D, dtype=torch.float64)
    E64, w64 = E.double(), w.double()
    for batch in batches:
        ids = batch["input_ids"][0].tolist()
        pairs = list(zip(ids[:-1], ids[1:]))  # next-token targets
        c = torch.zeros(D, dtype=torch.float64)
        for token, target in pairs:
            h = E64[token]
            r = ((h ** 2).mean() + eps).sqrt()
            logits = E64 @ (w64 * h / r)
            p = logits.exp() / logits.exp().sum()
            u = E64.T @ (p - torch.eye(5, dtype=torch.float64)[target]) / len(pairs)
            g = u * w64 / r - h * (u * w64 * h).sum() / (D * r ** 3)
            c += 3 * h * g
        expected += c.abs()
    expected /= len(batches)
    scores = lp.importance(model, batches, _loss)["hidden"]
    assert torch.allclose(scores.double(), expected, rtol=1e-4, atol=1e-8), (scores, expected)
    ranked = expected.sort().values
    assert ranked[2] - ranked[1] > 1e-3, "a clear second place, so the kept pair is unambiguous"
    keep = sorted(expected.argsort(descending=True)[:2].tolist())
    # A two-dimensional student keeps the two most important dimensions, in their original order.
    torch.manual_seed(1)
    scfg = LlamaConfig(vocab_size=5, hidden_size=2, intermediate_size=2, num_hidden_layers=1, num_attention_heads=1,
                       num_key_value_heads=1, max_position_embeddings=16, tie_word_embeddings=True, head_dim=2)
    student = LlamaForCausalLM(scfg).eval()
    state = lp.pruned_state_dict(model, student, {"hidden": scores, "heads": torch.zeros(1, 2),
                                                  "neurons": torch.zeros(1, 4)})
    assert torch.equal(state["model.embed_tokens.weight"], E[:, keep])
    assert torch.equal(state["model.norm.weight"], w[keep])


def _plain_masked_logits(model, ids, m):
    """The model on one-token sequences (causal attention over a single position is its value path: softmax of
    one score is 1 and rotary at position 0 is the identity), with an explicit hidden mask ``m`` at MiniMA's five
    places, written out from the modules' weights."""
    d = lp.lm_dims(model)
    if d["arch"] == "llama":
        h = model.model.embed_tokens(ids) * m
        for blk in model.model.layers:
            att = blk.self_attn
            a = att.o_proj(att.v_proj(blk.input_layernorm(h))) * m
            h = (h + a) * m
            f = blk.mlp(blk.post_attention_layernorm(h)) * m
            h = (h + f) * m
        return model.lm_head(model.model.norm(h))
    tr = model.transformer
    h = (tr.wte(ids) + tr.wpe(torch.zeros_like(ids))) * m
    D = d["hidden"]
    for blk in tr.h:
        x = blk.ln_1(h)
        v = x @ blk.attn.c_attn.weight[:, 2 * D:] + blk.attn.c_attn.bias[2 * D:]  # Conv1D: x W + b, W [D, 3D]
        a = (v @ blk.attn.c_proj.weight + blk.attn.c_proj.bias) * m
        h = (h + a) * m
        f = blk.mlp(blk.ln_2(h)) * m
        h = (h + f) * m
    return model.lm_head(tr.ln_f(h))


def _one_token_loss(model, batch):
    import torch.nn.functional as F

    return F.cross_entropy(model(input_ids=batch["input_ids"]).logits[:, 0], batch["targets"])


@pytest.mark.parametrize("make", [_llama, _gpt2])
def test_hidden_importance_equals_the_explicit_mask_gradient(make):
    import torch.nn.functional as F

    teacher = make(layers=2, hidden=32, heads=4, ffn=48)
    g = torch.Generator().manual_seed(4)
    batches = [{"input_ids": torch.randint(0, 40, (6, 1), generator=g), "targets": torch.randint(0, 40, (6,), generator=g)}
               for _ in range(2)]
    with torch.no_grad():  # the written-out forward is the model's own at m = 1
        ids = batches[0]["input_ids"]
        assert torch.allclose(_plain_masked_logits(teacher, ids, torch.ones(32)), teacher(input_ids=ids).logits, atol=1e-5)
    expected = torch.zeros(32)
    for batch in batches:
        m = torch.ones(32, requires_grad=True)
        loss = F.cross_entropy(_plain_masked_logits(teacher, batch["input_ids"], m)[:, 0], batch["targets"])
        (grad,) = torch.autograd.grad(loss, m)
        expected += grad.abs() / len(batches)
    scores = lp.importance(teacher, batches, _one_token_loss)["hidden"]
    assert torch.allclose(scores, expected, rtol=1e-4, atol=1e-7)
    # The dimensions a 24-wide student keeps are the 24 of highest explicit-mask gradient.
    order = expected.argsort(descending=True)
    assert expected[order[23]] - expected[order[24]] > 1e-6
    keep = sorted(order[:24].tolist())
    student = make(layers=2, hidden=24, heads=3, ffn=40, seed=9)
    state = lp.pruned_state_dict(teacher, student, lp.importance(teacher, batches, _one_token_loss))
    emb = "model.embed_tokens.weight" if "model.embed_tokens.weight" in state else "transformer.wte.weight"
    assert torch.equal(state[emb], teacher.state_dict()[emb][:, keep])


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
