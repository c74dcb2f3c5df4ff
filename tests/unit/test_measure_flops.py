"""FLOP counting: hand-computed matmuls, CPU SDPA, and BERT pinned to its analytic count (±1%).

Convention under test (bench/measure/flops.py): 2 FLOPs per multiply-accumulate, only matmul-like work,
attention = QKᵀ + AV with no causal discount.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.measure import UncountedOpsError
from bench.measure.flops import FlopCount, count_flops, is_matmul_like, model_flops_per_sample


def test_linear_is_2mnk():
    m, k, n = 8, 32, 16
    layer = nn.Linear(k, n)
    x = torch.randn(m, k)
    result = count_flops(lambda: layer(x))
    assert result.flops == 2 * m * n * k
    assert result.macs == m * n * k
    assert result.by_op == {"aten.addmm": 2 * m * n * k}
    assert result.uncounted == [] and result.complete


def test_plain_matmul_and_matrix_vector():
    a, b, v = torch.randn(5, 7), torch.randn(7, 3), torch.randn(7)
    assert count_flops(lambda: a @ b).flops == 2 * 5 * 7 * 3
    # aten.mv has no formula in torch's registry; bench adds one
    assert count_flops(lambda: torch.mv(a, v)).flops == 2 * 5 * 7


def _sdpa_flops(b, h, lq, lk, d, dv=None):
    dv = d if dv is None else dv
    return 2 * b * h * lq * lk * d + 2 * b * h * lq * lk * dv  # QKᵀ + AV, 2 per MAC


def test_cpu_sdpa_counted():
    b, h, lq, lk, d = 2, 4, 16, 24, 8
    q, k, v = torch.randn(b, h, lq, d), torch.randn(b, h, lk, d), torch.randn(b, h, lk, d)
    result = count_flops(lambda: nn.functional.scaled_dot_product_attention(q, k, v))
    assert result.flops == _sdpa_flops(b, h, lq, lk, d)
    assert set(result.by_op) == {"aten._scaled_dot_product_flash_attention_for_cpu"}


def test_cpu_sdpa_causal_not_discounted_and_gqa_counts_query_heads():
    b, h, l, d = 1, 4, 10, 8
    q = torch.randn(b, h, l, d)
    kv = torch.randn(b, h, l, d)
    causal = count_flops(lambda: nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True))
    assert causal.flops == _sdpa_flops(b, h, l, l, d)
    kv2 = torch.randn(b, 2, l, d)  # 2 K/V heads shared by 4 query heads
    gqa = count_flops(lambda: nn.functional.scaled_dot_product_attention(q, kv2, kv2, enable_gqa=True))
    assert gqa.flops == _sdpa_flops(b, h, l, l, d)


def test_cpu_sdpa_backward_counted():
    b, h, l, d = 1, 2, 12, 8
    q = torch.randn(b, h, l, d, requires_grad=True)
    result = count_flops(lambda: nn.functional.scaled_dot_product_attention(q, q, q).sum().backward())
    fwd = _sdpa_flops(b, h, l, l, d)
    bwd = 2 * b * h * l * l * (3 * d + 2 * d)  # recomputed scores, dV, dP, dQ, dK
    assert result.by_op["aten._scaled_dot_product_flash_attention_for_cpu"] == fwd
    assert result.by_op["aten._scaled_dot_product_flash_attention_for_cpu_backward"] == bwd
    assert result.flops == fwd + bwd


def _bert_analytic_macs(d, layers, dff, seq):
    """Per-sample MACs of BertModel: per layer 4·d²·L (Q, K, V, output projections) + 2·d·dff·L (FFN)
    + 2·L²·d (QKᵀ and AV over all heads), plus the pooler's d×d dense on the [CLS] token only.
    Embedding look-ups, layer norms, softmax, GELU and biases are not matmuls and count 0."""
    per_layer = 4 * d * d * seq + 2 * d * dff * seq + 2 * seq * seq * d
    return layers * per_layer + d * d


def _bert(**kw):
    from transformers import BertConfig, BertModel

    config = BertConfig(attn_implementation="sdpa", **kw)
    return BertModel(config).eval()


def _bert_forward(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def test_tiny_bert_matches_analytic_count():
    pytest.importorskip("transformers")
    d, layers, heads, dff, seq, batch = 64, 2, 4, 128, 16, 3
    model = _bert(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=dff,
                  vocab_size=100, max_position_embeddings=64)
    inputs = {"input_ids": torch.randint(0, 100, (batch, seq)),
              "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    model.train()
    result = model_flops_per_sample(model, _bert_forward, inputs, batch_size=batch, strict=True)
    assert model.training  # flag restored
    expected = _bert_analytic_macs(d, layers, dff, seq)
    assert result.macs == pytest.approx(expected, rel=0.01)
    # the attention part is exactly the formula: the CPU SDPA kernel is counted, not zero
    assert result.by_op["aten._scaled_dot_product_flash_attention_for_cpu"] == layers * 2 * (2 * seq * seq * d)
    assert result.batch_size == batch and result.inputs["input_ids"] == [batch, seq]


def test_bert_base_is_11_17_gmacs_under_fake_tensors():
    """BERT-base at seq 128, batch 1: 11.17 GMACs (measurement.md §4.1; calflops 11.174 G), counted on
    fake tensors so no weights are allocated."""
    pytest.importorskip("transformers")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        model = _bert(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
        inputs = {"input_ids": torch.ones(1, 128, dtype=torch.long),
                  "attention_mask": torch.ones(1, 128, dtype=torch.long)}
        result = model_flops_per_sample(model, _bert_forward, inputs, batch_size=1, strict=True)
    assert result.macs == pytest.approx(11.17e9, rel=0.01)
    assert result.macs == pytest.approx(_bert_analytic_macs(768, 12, 3072, 128), rel=0.01)
    assert result.flops == 2 * result.macs


@torch.library.custom_op("bench_test::fused_matmul", mutates_args=())
def _fused_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a @ b


def test_uncounted_matmul_like_op_is_reported_and_strict_raises():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    result = count_flops(lambda: _fused_matmul(a, b))
    assert result.uncounted == ["bench_test.fused_matmul"]
    assert not result.complete
    with pytest.raises(UncountedOpsError, match="bench_test.fused_matmul"):
        count_flops(lambda: _fused_matmul(a, b), strict=True)


def test_transformer_fast_path_is_never_silently_zero():
    """nn.TransformerEncoderLayer's eval+no_grad fast path has no formula (measurement.md §4): either
    it is counted through its decomposition, or it is reported as uncounted."""
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    with torch.no_grad():
        result = count_flops(lambda: layer(torch.randn(1, 5, 16)))
    assert result.flops > 0 or "aten._transformer_encoder_layer_fwd" in result.uncounted


@pytest.mark.parametrize("name", [
    "aten.mm", "aten._int_mm", "aten.convolution", "aten.conv2d", "aten.conv_transpose2d",
    "aten._transformer_encoder_layer_fwd", "aten._native_multi_head_attention", "aten.einsum",
    "aten._scaled_dot_product_flash_attention_for_cpu", "mkldnn._linear_pointwise", "aten.mkldnn_rnn_layer",
])
def test_matmul_like_names(name):
    assert is_matmul_like(name)


@pytest.mark.parametrize("name", [
    "aten.add", "aten.convert_element_type", "aten.upsample_bilinear2d", "aten.upsample_linear1d",
    "aten.native_layer_norm", "aten.gelu", "aten.embedding", "aten._softmax",
])
def test_not_matmul_like_names(name):
    assert not is_matmul_like(name)


def test_flopcount_to_dict_is_json_ready():
    import json

    fc = FlopCount(flops=10, by_op={"aten.mm": 10}, uncounted=["aten.mv"], batch_size=2)
    data = json.loads(json.dumps(fc.to_dict()))
    assert data["macs"] == 5
    assert FlopCount.from_dict(data) == fc
