"""`ahcli explain`: head probabilities agree with `evaluate`, attention weights sum to 1 per modality, the
transcript tokens map back to text, and the per-block attribution adds up where the model is linear."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ahflows.explain import block_names, explain_video, fusion_attribution, time_bins, words, Token


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def case(report_run_case):
    return report_run_case


def _evaluate_probs(run_dir, cache, split):
    from extract.store import CacheReader
    from heads.runs import load_run
    from heads.infer import data_needs
    from heads.data import load_split
    from heads.infer import predict_split

    reader = CacheReader(cache)
    run = load_run(run_dir, cache=reader)
    needs = data_needs([run])
    data = load_split(reader, split, layers=needs.layers, device="cpu", modalities=needs.modalities)
    ids, probs, _ = predict_split(run, data, windows=5)
    return dict(zip(ids, probs))


def _check_sums(exp) -> None:
    assert set(exp.attention_sums) == {"video", "audio", "text"}
    assert len(exp.attention_sums["video"]) == exp.windows_used
    for m, sums in exp.attention_sums.items():
        assert np.allclose(sums, 1.0, atol=1e-5), (m, sums)
    for w in exp.video:
        assert sum(w.slice_weights) == pytest.approx(1.0, abs=1e-5)
        assert w.start_s <= w.peak_s <= w.end_s
    assert sum(exp.audio_weights) == pytest.approx(1.0, abs=1e-5)
    assert sum(b.weight for b in exp.audio_bins) == pytest.approx(1.0, abs=1e-5)
    assert sum(t.weight for t in exp.text[0].tokens) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("which", ["run_b", "run_a"])
def test_explain_matches_evaluate_and_weights_sum_to_one(case, which):
    from extract.store import CacheReader

    run = getattr(case, which)
    vid = CacheReader(case.cache).video_ids("test")[0]
    exp = explain_video(run, case.cache, vid, data_root=case.data)
    assert exp.probs.blended == pytest.approx(_evaluate_probs(run, case.cache, "test")[vid], abs=1e-5)
    assert exp.probs.flagged == (exp.probs.blended >= exp.probs.threshold)
    assert 0 <= exp.probs.full <= 1 and 0 <= exp.probs.text <= 1
    assert [b.name for b in exp.blocks] == ["v", "a", "t", "v-a", "v-t", "a-t"]
    pairs = {b.name: b.contribution for b in exp.blocks if b.pair}
    sign = 1 if exp.probs.full_logit >= 0 else -1
    along = {k: v * sign for k, v in pairs.items() if v * sign > 0}
    assert exp.top_pair == (max(along, key=along.get) if along else max(pairs, key=lambda k: abs(pairs[k])))
    _check_sums(exp)


def test_transcript_tokens_map_to_words(case):
    from extract.store import CacheReader
    from ahflows.explain import transcript_of

    reader = CacheReader(case.cache)
    vid = reader.video_ids("val")[0]
    exp = explain_video(case.run_b, case.cache, vid, data_root=case.data, top_k=5)
    tw = exp.text[0]
    assert tw.window is None and all(t.text is not None for t in tw.tokens)
    assert tw.tokens[0].special and tw.tokens[-1].special                   # <s> ... </s>
    transcript, _ = transcript_of(case.data, vid, "val", reader.meta(vid)["duration"])
    assert "".join(t.text for t in tw.tokens if not t.special).strip() == transcript.strip()
    assert len(tw.top) == 5 and all(not t.special for t in tw.top)
    assert [t.weight for t in tw.top] == sorted((t.weight for t in tw.top), reverse=True)
    assert tw.top_words and all(w.text.lower() in transcript.lower() for w in tw.top_words)
    assert not exp.notes


def test_without_data_root_tokens_are_positions(case):
    from extract.store import CacheReader

    vid = CacheReader(case.cache).video_ids("test")[1]
    exp = explain_video(case.run_b, case.cache, vid)
    assert all(t.text is None for t in exp.text[0].tokens)
    assert any("--data" in n for n in exp.notes)


def test_attribution_is_exact_for_a_linear_head():
    """With the FFN and head replaced by one linear map, gradient x input per block sums to the logit and
    each block's value is w_block . f_block."""
    from heads.config import ModelConfig
    from heads.model import build_model

    cfg = ModelConfig(input_dims={"video": 8, "audio": 8, "text": 8}, dim=4, head_hidden=4)
    model = build_model(cfg, seed=0)
    lin = torch.nn.Linear(cfg.fusion_dim, 1, bias=False)
    model.ffn, model.head = torch.nn.Identity(), lin
    g = torch.Generator().manual_seed(0)
    emb = {m: torch.randn(3, 4, generator=g) for m in cfg.present}
    logit, blocks = fusion_attribution(model, emb)
    assert torch.allclose(blocks.sum(1), logit, atol=1e-5)
    f = model.fuse(emb)
    w = lin.weight.detach()[0]
    for k, name in enumerate(block_names(cfg)):
        sl = slice(4 * k, 4 * (k + 1))
        assert torch.allclose(blocks[:, k], (f[:, sl] * w[sl]).sum(1), atol=1e-5), name


def test_leading_pair_follows_the_logit_direction():
    from ahflows.explain import Block, leading_pair

    blocks = [Block("v", 3.0, False), Block("v-a", -0.5, True), Block("v-t", 0.2, True), Block("a-t", 0.1, True)]
    assert leading_pair(blocks, 1.0) == "v-t"           # flagged: the pair pushing towards A/H, not the larger |v-a|
    assert leading_pair(blocks, -1.0) == "v-a"          # not flagged: the pair pushing away
    assert leading_pair([Block("v-a", -0.5, True), Block("v-t", -0.2, True)], 1.0) == "v-a"
    assert leading_pair([Block("v", 1.0, False)], 1.0) is None


def test_time_bins_and_words():
    bins = time_bins([0.25] * 4, step_s=0.02)
    assert sum(b.weight for b in bins) == pytest.approx(1.0) and bins[0].start_s == 0.0
    toks = [Token(0, "<s>", 0.1, True), Token(1, "I", 0.2), Token(2, " hes", 0.3), Token(3, "itate", 0.1),
            Token(4, ",", 0.05), Token(5, " maybe", 0.25), Token(6, "</s>", 0.0, True)]
    ws = words(toks)
    assert [(w.text, w.positions) for w in ws] == [("I", [1]), ("hesitate", [2, 3]), ("maybe", [5])]
    assert ws[1].weight == pytest.approx(0.4)


def test_cli_explain_json_and_unknown_video(case):
    from ahcli.app import app
    from extract.store import CacheReader

    vid = CacheReader(case.cache).video_ids("test")[0]
    res = CliRunner().invoke(app, ["explain", str(case.run_b), str(case.cache), vid, "--data", str(case.data),
                                   "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["video_id"] == vid and d["top_pair"] in {"v-a", "v-t", "a-t"}
    assert abs(sum(d["audio_weights"]) - 1) < 1e-5
    text = CliRunner().invoke(app, ["explain", str(case.run_b), str(case.cache), vid, "--data", str(case.data)])
    assert text.exit_code == 0 and "top conflict pair" in text.stdout and "most attended words" in text.stdout
    bad = CliRunner().invoke(app, ["explain", str(case.run_b), str(case.cache), "Videos/1/Visite_1/nope.mp4"])
    assert bad.exit_code != 0 and "no complete video" in str(bad.exception)
