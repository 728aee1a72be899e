"""The heads' architecture: fused pooling equals the literal form, fusion and blending follow the paper."""
from __future__ import annotations

import itertools
import json

import pytest
import torch
from torch import nn

from heads.data import SplitData
from heads.tokens import Tokens
from extract.vocab import parse_modalities
from heads.model import AttentionPool, ConflictAwareModel, blend, build_model
from heads.config import ConfigError, ModelConfig

from heads_fixtures import tiny_model

ALL_SUBSETS = ["".join(c) for r in (1, 2, 3) for c in itertools.combinations("vat", r)]


def padded_tokens(seed: int = 0, din: int = 12):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 6, din, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6, [0] * 6, [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    x[~mask] = 50.0                                 # garbage in the padding must not matter
    return Tokens(x, 4, mask=mask)


def ragged_of(t: Tokens) -> Tokens:
    seg = torch.repeat_interleave(torch.arange(t.batch_size), t.mask.sum(1))
    return Tokens(t.values[t.mask], t.batch_size, segments=seg)


def test_fused_pooling_equals_literal_with_padding():
    torch.manual_seed(0)
    pool = AttentionPool(12, 8).double()
    nn.init.normal_(pool.query, std=0.5)            # sharp attention, so a wrong form would show
    dense = padded_tokens()
    outs = {}
    for form in ("fused", "literal"):
        pool.pooling = form
        outs[form, "dense"] = pool(dense)
        outs[form, "ragged"] = pool(ragged_of(dense))
    ref = outs["literal", "dense"]
    for key, val in outs.items():
        torch.testing.assert_close(val, ref, rtol=0, atol=1e-12, msg=str(key))
    # the all-padding row pools like one zero token: the bias
    torch.testing.assert_close(ref[2], pool.proj.bias.detach())


def test_fused_and_literal_gradients_agree():
    torch.manual_seed(1)
    pool = AttentionPool(12, 8).double()
    dense = padded_tokens(3)
    grads = {}
    for form in ("fused", "literal"):
        pool.zero_grad()
        pool.pooling = form
        pool(ragged_of(dense)).pow(2).sum().backward()
        grads[form] = [p.grad.clone() for p in pool.parameters()]
    for a, b in zip(grads["fused"], grads["literal"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_pooling_matches_equation_by_hand():
    torch.manual_seed(2)
    pool = AttentionPool(5, 3).double()
    x = torch.randn(1, 4, 5, dtype=torch.float64)
    y = x[0] @ pool.proj.weight.T + pool.proj.bias          # projected tokens
    a = torch.softmax(y @ pool.query, 0)                   # a_i = softmax(w . y_i)
    expected = (a[:, None] * y).sum(0)
    torch.testing.assert_close(pool(Tokens(x, 1))[0], expected)


def test_padding_values_never_matter_and_weights_sum_to_one():
    torch.manual_seed(3)
    pool = AttentionPool(12, 8).double()
    t = padded_tokens()
    t2 = Tokens(t.values.clone(), 4, mask=t.mask)
    t2.values[~t.mask] = -7.0
    torch.testing.assert_close(pool(t), pool(t2))
    w = pool.weights(t)
    assert torch.all(w[~t.mask] == 0)
    torch.testing.assert_close(w.sum(1), torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64))
    wr = pool.weights(ragged_of(t))
    sums = torch.zeros(4, dtype=torch.float64).index_add(0, ragged_of(t).segments, wr)
    torch.testing.assert_close(sums, torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64))


def test_whole_model_fused_equals_literal_on_a_batch():
    data = SplitData.synthetic(8, dims=(16, 12, 10), dtype=torch.float32)
    model = build_model(tiny_model(data), seed=0).double().eval()
    b = data.batch(torch.arange(8), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    tokens = {k: Tokens(t.values.double(), t.batch_size, t.mask, t.segments) for k, t in b.tokens.items()}
    lf, lt = model(tokens)
    model.set_pooling("literal")
    lf2, lt2 = model(tokens)
    torch.testing.assert_close(lf, lf2, rtol=0, atol=1e-10)
    torch.testing.assert_close(lt, lt2, rtol=0, atol=1e-10)
    # the padded form of the ragged tokens gives the same logits too
    padded = {k: t.to_padded() for k, t in tokens.items()}
    torch.testing.assert_close(model(padded)[0], lf, rtol=0, atol=1e-10)


def test_fusion_vector_is_v_a_t_and_the_three_conflicts():
    data = SplitData.synthetic(4, dims=(16, 12, 10), dtype=torch.float32)
    model = build_model(tiny_model(data), seed=0).eval()
    emb = model.embed(data.batch(torch.arange(4)).tokens)
    v, a, t = emb["video"], emb["audio"], emb["text"]
    expected = torch.cat([v, a, t, (v - a).abs(), (v - t).abs(), (a - t).abs()], -1)
    torch.testing.assert_close(model.fuse(emb), expected)
    l_full, l_text = model.heads(emb)
    torch.testing.assert_close(l_full, model.head(model.ffn(expected)).squeeze(-1))
    torch.testing.assert_close(l_text, model.text_head(t).squeeze(-1))


def test_no_conflict_fuses_only_the_embeddings():
    data = SplitData.synthetic(4, dims=(16, 12, 10), dtype=torch.float32)
    model = build_model(tiny_model(data, conflict=False), seed=0).eval()
    emb = model.embed(data.batch(torch.arange(4)).tokens)
    torch.testing.assert_close(model.fuse(emb), torch.cat([emb["video"], emb["audio"], emb["text"]], -1))
    assert model.cfg.fusion_dim == 3 * 16


@pytest.mark.parametrize("mods", ALL_SUBSETS)
def test_every_modality_subset_runs(mods):
    data = SplitData.synthetic(5, dims=(16, 12, 10), dtype=torch.float32)
    cfg = tiny_model(data, modalities=mods)
    k = len(mods)
    assert cfg.fusion_dim == 16 * (k + k * (k - 1) // 2)
    model = build_model(cfg, seed=0).eval()
    b = data.batch(torch.arange(5), modalities=cfg.present)
    assert set(b.tokens) == set(parse_modalities(mods))
    l_full, l_text = model(b.tokens)
    assert l_full.shape == (5,)
    if "t" in mods:
        assert l_text.shape == (5,) and model.text_head is not None
    else:
        assert l_text is None and model.text_head is None
    assert model.ffn[1].in_features == cfg.fusion_dim and model.ffn[1].out_features == 2 * cfg.fusion_dim


def test_paper_default_sizes():
    cfg = ModelConfig(input_dims={"video": 768, "audio": 768, "text": 768})
    with torch.device("meta"):
        m = ConflictAwareModel(cfg)
    assert [type(x) for x in m.ffn] == [nn.LayerNorm, nn.Linear, nn.GELU, nn.Dropout, nn.Linear]
    assert (m.ffn[1].in_features, m.ffn[1].out_features, m.ffn[4].out_features) == (6 * 768, 12 * 768, 6 * 768)
    assert [type(x) for x in m.head] == [nn.LayerNorm, nn.Linear, nn.GELU, nn.Dropout, nn.Linear]
    assert (m.head[1].in_features, m.head[1].out_features, m.head[4].out_features) == (6 * 768, 512, 1)
    assert m.head[3].p == 0.3 and m.text_head[3].p == 0.3 and m.ffn[3].p == 0.1
    assert m.text_head[1].in_features == 768
    assert m.pools["video"].proj.out_features == 768


def test_blend_follows_equation_9():
    lf, lt = torch.tensor([0.0, 2.0]), torch.tensor([1.0, -1.0])
    s = torch.sigmoid
    torch.testing.assert_close(blend(lf, lt, 0.6), 0.6 * s(lt) + 0.4 * s(lf))
    torch.testing.assert_close(blend(lf, lt, 0.0), s(lf))
    torch.testing.assert_close(blend(lf, lt, 1.0), s(lt))
    torch.testing.assert_close(blend(lf, None, 0.6), s(lf))     # no text head: alpha is 0


def test_model_config_json_round_trip_and_refusals():
    cfg = ModelConfig(input_dims={"video": 8, "text": 4}, modalities="tv", dim=32, conflict=False)
    assert cfg.modalities == "vt"
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ConfigError, match="unknown option"):
        ModelConfig.from_dict({**cfg.to_dict(), "heads": 3})
    with pytest.raises(Exception, match="subset of the letters"):
        ModelConfig(input_dims={"video": 8}, modalities="vx")
    with pytest.raises(ConfigError, match="no token width"):
        ModelConfig(input_dims={"video": 8}, modalities="va")


def test_seeded_initialisation_is_reproducible():
    cfg = ModelConfig(input_dims={"video": 8, "audio": 8, "text": 8}, dim=8, head_hidden=8)
    a, b = build_model(cfg, seed=5), build_model(cfg, seed=5)
    c = build_model(cfg, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.pools["video"].proj.weight, c.pools["video"].proj.weight)


def test_subset_and_prefix_layers_keep_rows_aligned():
    from heads.data import DataError

    data = SplitData.synthetic(6, windows=3, layers=("last", "prefix"), dtype=torch.float32)
    sub = data.subset([4, 1])
    assert sub.video_ids == [data.video_ids[4], data.video_ids[1]]
    for layer in ("last", "prefix"):
        a = sub.batch(torch.tensor([0, 1]), torch.tensor([2, 1]), layer=layer, text_source="window")
        b = data.batch(torch.tensor([4, 1]), torch.tensor([2, 1]), layer=layer, text_source="window")
        for m in a.tokens:
            torch.testing.assert_close(a.tokens[m].values, b.tokens[m].values)
            assert torch.equal(a.tokens[m].segments if a.tokens[m].ragged else a.tokens[m].values,
                               b.tokens[m].segments if b.tokens[m].ragged else b.tokens[m].values)
    with pytest.raises(DataError, match="layer 'middle'"):
        data.batch(torch.tensor([0]), layer="middle")


def test_ffn_width_as_a_multiple_or_absolute():
    """The paper's two readings of the fusion FFN: 2 x 6D hidden (the default) or an absolute width."""
    from heads.model import ConflictAwareModel

    dims = {"video": 768, "audio": 768, "text": 768}
    with torch.device("meta"):
        paper = ConflictAwareModel(ModelConfig(input_dims=dims))
        narrow = ConflictAwareModel(ModelConfig(input_dims=dims, ffn_hidden=1536))
    assert paper.ffn[1].out_features == 9216 and narrow.ffn[1].out_features == 1536
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(paper) == 89_497_090
    assert count(paper) - count(narrow) == 2 * 4608 * (9216 - 1536) + (9216 - 1536)
    with pytest.raises(ConfigError, match="ffn_hidden"):
        ModelConfig(input_dims=dims, ffn_hidden=0)
