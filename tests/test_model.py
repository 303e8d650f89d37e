"""Model numerics: windowed attention vs. a direct computation, adaptive softmax, exact sizes."""

import math

import pytest
import torch
import torch.nn.functional as F

from micronet.model.band_attention import band_bias, band_softmax, skew, windows
from micronet.model.transformer import Memory, ModelConfig, TransformerLM, count_parameters

TINY = dict(vocab_size=50, d_model=16, n_layer=2, n_head=2, d_head=4, d_ff=24, n_seq=5, segment_len=5,
            cutoffs=[10, 30], bin_dims=[16, 8, 2])


def tiny_model(**kw) -> TransformerLM:
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(**{**TINY, **kw})).double()
    with torch.no_grad():  # non-zero biases so that every term is exercised
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.1)
    return model.eval()


def reference_forward(model: TransformerLM, idx: torch.Tensor) -> torch.Tensor:
    """Whole-sequence sliding-window attention written directly from the definition."""
    cfg = model.cfg
    B, T = idx.shape
    x = model.embed(idx) * math.sqrt(cfg.d_model)
    for layer in model.layers:
        a = layer.attn
        qkv = a.qkv(layer.ln1(x)).view(B, T, 3, cfg.n_head, cfg.d_head)
        q, k, v = qkv.unbind(2)  # (B, T, H, dh) each
        out = torch.zeros(B, T, cfg.n_head, cfg.d_head, dtype=x.dtype)
        for t in range(T):
            js = list(range(max(0, t - cfg.n_seq), t + 1))
            logits = torch.stack(
                [(q[:, t] * k[:, j]).sum(-1) + q[:, t] @ a.pos[:, t - j] for j in js], dim=-1
            ) / math.sqrt(cfg.d_head)  # (B, H, |js|)
            p = logits.softmax(-1)
            out[:, t] = sum(p[..., n, None] * v[:, j] for n, j in enumerate(js))
        x = x + a.out(out.reshape(B, T, -1))
        x = x + layer.ffn(layer.ln2(x))
    return x


def test_skew_places_rows_on_diagonals():
    x = torch.arange(12.0).view(3, 4)
    y = skew(x)
    assert y.shape == (3, 6)
    for i in range(3):
        assert torch.equal(y[i, i : i + 4], x[i])


def test_skew_gradient_is_exact():
    """The hand-written backward (inverse walk) against finite differences, with leading dims."""
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(skew, (x,))


@pytest.mark.parametrize("n_seq, L, n_valid", [(5, 5, 0), (5, 2, 0), (5, 2, 3), (4, 3, 4), (3, 7, 1)])
def test_band_kernels_match_autograd_definitions(n_seq, L, n_valid):
    """windows, band_bias and band_softmax against plain tensor code, values and finite differences."""
    B, S, H, dh = 2, 3, 2, 3
    C, W = n_seq + 1, n_seq + L
    kv = torch.randn(B, n_seq + S * L, 2, H, dh, dtype=torch.float64, requires_grad=True)
    k, v = windows(kv, n_seq, L)
    for s in range(S):
        assert torch.equal(k.view(B, S, H, W, dh)[:, s], kv[:, s * L : s * L + W, 0].transpose(1, 2))
        assert torch.equal(v.view(B, S, H, W, dh)[:, s], kv[:, s * L : s * L + W, 1].transpose(1, 2))
    assert torch.autograd.gradcheck(lambda t: windows(t, n_seq, L), (kv,))

    pos = torch.randn(B * S, H, L, C, dtype=torch.float64, requires_grad=True)
    q = torch.randn(B * S, H, L, dh, dtype=torch.float64, requires_grad=True)
    kk = torch.randn(B * S, H, W, dh, dtype=torch.float64, requires_grad=True)
    s_idx = torch.arange(S)[:, None, None]
    i = torch.arange(L)[None, :, None]
    j = torch.arange(W)[None, None, :]
    dist = n_seq + i - j  # query s*L + i, key s*L - n_seq + j
    visible = (dist >= 0) & (dist <= n_seq) & (s_idx * L - n_seq + j >= -n_valid)  # (S, L, W)
    gathered = pos.view(B, S, H, L, C).gather(-1, (n_seq - dist).clamp(0, n_seq)[None, :, None].expand(B, S, H, L, W))
    expect = gathered.masked_fill(~visible[None, :, None], float("-inf")).view(B * S, H, L, W)
    assert torch.equal(band_bias(pos, S, n_valid), expect)
    probs = band_softmax(q, kk, pos, S, n_valid)
    assert torch.allclose(probs, torch.softmax(q @ kk.transpose(-1, -2) + expect, -1), atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b, c: band_softmax(a, b, c, S, n_valid), (q, kk, pos))
    finite = visible[None, :, None].expand(B, S, H, L, W).reshape(B * S, H, L, W)
    assert torch.autograd.gradcheck(lambda c: band_bias(c, S, n_valid)[finite], (pos,))


@pytest.mark.parametrize("segment_len", [1, 3, 5, 8, 40])
def test_segmented_attention_equals_direct_computation(segment_len):
    model = tiny_model(segment_len=segment_len)
    idx = torch.randint(0, 50, (2, 23))
    ref = reference_forward(model, idx)
    with torch.no_grad():
        h, mem = model(idx)
    assert torch.allclose(h, ref, atol=1e-6, rtol=0)
    assert mem.n_valid == 5


@pytest.mark.parametrize("chunks", [[23], [1] * 23, [4, 7, 1, 11], [5, 5, 5, 5, 3]])
def test_memory_carried_across_chunks_equals_whole_sequence(chunks):
    model = tiny_model()
    idx = torch.randint(0, 50, (1, sum(chunks)))
    ref = reference_forward(model, idx)
    outs, mem, start = [], None, 0
    with torch.no_grad():
        for n in chunks:
            h, mem = model(idx[:, start : start + n], mem)
            mem = mem.detach()
            outs.append(h)
            start += n
    assert torch.allclose(torch.cat(outs, 1), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("segment_len", [1, 3, 5, 8, 40])
def test_training_path_equals_direct_computation_with_gradients(segment_len):
    """With gradients on CPU the attention takes the explicit band-softmax path, not SDPA: same
    outputs and the same parameter gradients as the definition."""
    model = tiny_model(segment_len=segment_len)
    idx = torch.randint(0, 50, (2, 23))
    ref = reference_forward(model, idx)
    w = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * w).sum(), list(model.parameters()), allow_unused=True)
    h, _ = model(idx)
    assert torch.allclose(h, ref, atol=1e-6, rtol=0)
    grads = torch.autograd.grad((h * w).sum(), list(model.parameters()), allow_unused=True)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        assert (g is None) == (r is None), name
        if g is not None:
            assert torch.allclose(g, r, atol=1e-8, rtol=1e-6), name


def test_training_path_with_partial_memory_equals_whole_sequence():
    model = tiny_model(segment_len=2)  # several segments reach before a 3-position memory
    idx = torch.randint(0, 50, (1, 11))
    ref = reference_forward(model, idx)
    with torch.no_grad():
        _, mem = model(idx[:, :3])
    assert mem.n_valid == 3
    h, _ = model(idx[:, 3:], mem)
    assert h.requires_grad and torch.allclose(h, ref[:, 3:], atol=1e-6, rtol=0)


def test_first_segment_masks_missing_past():
    model = tiny_model()
    idx = torch.randint(0, 50, (1, 6))
    with torch.no_grad():
        h_fresh, _ = model(idx)
        junk = Memory([torch.randn(1, 5, 2, 2, 4, dtype=torch.float64) for _ in range(2)], n_valid=0)
        h_junk, _ = model(idx, junk)  # n_valid = 0: the junk must be invisible
    assert torch.allclose(h_fresh, h_junk, atol=1e-12)


def test_gradient_flows_across_segments_within_a_chunk():
    model = tiny_model(segment_len=4).train()
    idx = torch.randint(0, 50, (1, 12))
    emb = model.embed.tables[0].weight
    h, _ = model(idx)
    h[:, -1].sum().backward()  # last segment only
    first_rows = idx[0, 5:8][idx[0, 5:8] < 10]  # tokens of the previous segment, within the window
    assert emb.grad is not None and emb.grad[first_rows].abs().sum() > 0


def test_adaptive_softmax_is_a_distribution_and_targets_agree():
    model = tiny_model()
    h = torch.randn(7, 16, dtype=torch.float64)
    lp = model.log_probs(h)
    assert lp.shape == (7, 50)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(7, dtype=torch.float64), atol=1e-12)
    target = torch.tensor([0, 9, 10, 29, 30, 49, 3])
    assert torch.allclose(model.target_log_probs(h, target), lp.gather(1, target[:, None]).squeeze(1), atol=1e-12)


def test_output_weights_are_tied_to_input_tables():
    model = tiny_model()
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith("softmax.") and "weight" in n and "proj" not in n and "cluster" not in n for n in names)
    table = model.embed.tables[1].weight  # words 10..29
    h = torch.randn(4, 16, dtype=torch.float64)
    before = model.softmax.tail_log_probs(h, 1).detach()
    with torch.no_grad():
        table[3] += 1.0  # word 13, through the *input* embedding only
    after = model.softmax.tail_log_probs(h, 1)
    # the output distribution moved, and exactly as a softmax over the edited input table says
    expected = torch.log_softmax(model.softmax.projs[1](h) @ table.T + model.softmax.biases[1], dim=-1)
    assert not torch.allclose(before, after) and torch.allclose(after, expected, atol=1e-12)
    assert torch.allclose(after[:, [0, 1, 2, 4]] - before[:, [0, 1, 2, 4]],
                          (after[:, 0] - before[:, 0])[:, None].expand(-1, 4), atol=1e-12)  # only word 13's logit
    model.zero_grad()
    after[:, 3].sum().backward()  # gradient of the output flows into the input table
    assert table.grad is not None and table.grad[3].abs().sum() > 0
    assert sum(p.numel() for p in model.parameters()) == count_parameters(model)  # no hidden copy


def test_original_parameter_counts_are_exact():
    assert count_parameters(TransformerLM(ModelConfig(vocab_size=267735))) == 8_304_213
    teacher = ModelConfig(vocab_size=267735, d_model=512, n_layer=16, n_head=8, d_head=64, d_ff=1536,
                          bin_dims=[512, 256, 16])
    assert count_parameters(TransformerLM(teacher)) == 53_859_529


@pytest.mark.parametrize("bad", [dict(d_model=0), dict(n_seq=-1), dict(cutoffs=[30, 10]), dict(bin_dims=[16, 8]),
                                 dict(dropout=1.0), dict(cutoffs=[10, 60])])
def test_bad_sizes_are_refused(bad):
    with pytest.raises(ValueError, match="model\\."):
        TransformerLM(ModelConfig(**{**TINY, **bad}))


def test_training_loss_matches_full_distribution():
    model = tiny_model()
    idx = torch.randint(0, 50, (2, 9))
    h, _ = model(idx[:, :-1])
    nll = -model.target_log_probs(h, idx[:, 1:]).mean()
    full = F.nll_loss(model.log_probs(h).reshape(-1, 50), idx[:, 1:].reshape(-1))
    assert torch.allclose(nll, full, atol=1e-12)
