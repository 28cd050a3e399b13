"""The word2vec trainer: its steps against the float64 minibatch reference, pair generation, vocabulary,
I/O readable by gensim, evaluation equal to gensim's, the CLI, and training quality on gensim's data.

The head500 quality run against gensim (20 epochs each) takes minutes: it is marked slow and runs
with EMBEDATTN_SLOW=1. CI runs gensim's own Lee-corpus sanity check and a synthetic-topic check.
"""

from __future__ import annotations

import math
import os
import random
import shutil

import pytest
import torch
from helpers import DEVICE, HAS_TRITON, ON_CUDA, max_err

from embedattn.word2vec import Word2Vec
from embedattn.word2vec._corpus import build_vocab, line_sentences
from embedattn.word2vec._train import (
    CompiledStep,
    autograd_sgns_step,
    keep_probability,
    skipgram_pairs,
    torch_sgns_step,
)

gensim = pytest.importorskip("gensim")
from gensim.test.utils import datapath  # noqa: E402

slow = pytest.mark.skipif(not os.environ.get("EMBEDATTN_SLOW"), reason="slow: set EMBEDATTN_SLOW=1")


def _step_reference(inp, tgt, neg, wi, wo, lr, skip_target=True):
    """One minibatch of word2vec.c updates in float64, all computed from the same snapshot, summed.
    ``skip_target``: a negative equal to the target is skipped (word2vec.c, the fused steps)."""
    wi64, wo64 = wi.double(), wo.double()
    v = wi64[inp]
    ids = torch.cat([tgt[:, None], neg], 1)
    live = (ids != tgt[:, None]).double() if skip_target else torch.ones(ids.shape, dtype=torch.float64)
    live[:, 0] = 1
    u = wo64[ids]
    s = (u * v[:, None]).sum(-1)
    label = torch.zeros_like(s)
    label[:, 0] = 1
    g = (label - torch.sigmoid(s)) * lr * live
    loss = -(torch.nn.functional.logsigmoid(torch.where(label > 0, s, -s)) * live).sum()
    wi64 = wi64.index_add(0, inp, (g[:, :, None] * u).sum(1))
    wo64 = wo64.index_add(0, ids.reshape(-1), (g[:, :, None] * v[:, None]).reshape(-1, v.shape[1]))
    return loss, wi64, wo64


def _step_inputs(B=45, K=4, V=9, D=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    inp, tgt = torch.randint(0, V, (B,), generator=g), torch.randint(0, V, (B,), generator=g)
    neg = torch.randint(0, V, (B, K), generator=g)
    wi, wo = torch.randn(V, D, generator=g) * 0.3, torch.randn(V, D, generator=g) * 0.3
    return inp, tgt, neg, wi, wo


def test_torch_step_matches_reference_per_chunk():
    inp, tgt, neg, wi, wo = _step_inputs()
    # chunk 16: three minibatches applied in order, colliding ids inside each (V = 9)
    ref_loss, ri, ro = 0.0, wi.double(), wo.double()
    for s in range(0, inp.numel(), 16):
        loss, ri, ro = _step_reference(inp[s:s + 16], tgt[s:s + 16], neg[s:s + 16], ri, ro, 0.05)
        ref_loss += loss
    assert (neg == tgt[:, None]).any()  # the skip rule is exercised
    a, b = wi.clone(), wo.clone()
    out = torch_sgns_step(inp, tgt, neg, a, b, 0.05, chunk=16)
    assert abs(out.item() - ref_loss.item()) < 1e-4
    assert max_err(a, ri) < 1e-5 and max_err(b, ro) < 1e-5


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="needs a C++ compiler")
@pytest.mark.parametrize("cpp_wrapper", [False, pytest.param(True, marks=[pytest.mark.slow, slow])])
def test_compiled_step_matches_reference(cpp_wrapper):
    # torch.compile's CPU codegen (the trainer's fast path): groups of 2 x 8 pairs, then an eager tail.
    # The trainer uses cpp_wrapper=True (same math, a C++ wrapper that drops the GIL), which compiles
    # several times slower: it runs with the slow tests.
    inp, tgt, neg, wi, wo = _step_inputs(B=37, seed=2)
    ref_loss, ri, ro = 0.0, wi.double(), wo.double()
    for s in range(0, inp.numel(), 8):
        loss, ri, ro = _step_reference(inp[s:s + 8], tgt[s:s + 8], neg[s:s + 8], ri, ro, 0.05)
        ref_loss += loss
    a, b = wi.clone(), wo.clone()
    step = CompiledStep(a, b, negative=4, chunk=8, group=2, cpp_wrapper=cpp_wrapper)
    assert step.ok
    assert torch.equal(a, wi) and torch.equal(b, wo)  # the warm-up call changed nothing
    out = step(inp, tgt, neg, a, b, 0.05)
    assert abs(out.item() - ref_loss.item()) < 1e-4
    assert max_err(a, ri) < 1e-5 and max_err(b, ro) < 1e-5


@pytest.mark.parametrize("backend", ["reference"] + (["triton"] if HAS_TRITON else []))
def test_autograd_step_matches_reference(backend):
    inp, tgt, neg, wi, wo = _step_inputs(B=21, seed=1)
    loss_r, ri, ro = _step_reference(inp, tgt, neg, wi, wo, 0.05, skip_target=False)
    a, b = wi.to(DEVICE), wo.to(DEVICE)
    loss = autograd_sgns_step(inp.to(DEVICE), tgt.to(DEVICE), neg.to(DEVICE), a, b, 0.05, backend=backend)
    assert abs(loss.item() - loss_r.item()) < 1e-4
    assert max_err(a.cpu(), ri) < 1e-5 and max_err(b.cpu(), ro) < 1e-5


def test_skipgram_pairs():
    ids = torch.arange(10, 20)
    sent = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    g = torch.Generator().manual_seed(0)
    # window 1: the reduced window is always 1, so the pairs are exactly the in-sentence neighbours
    inp, tgt = skipgram_pairs(ids, sent, 0, 10, 1, g)
    got = sorted(zip(inp.tolist(), tgt.tolist()))
    want = sorted((ids[j].item(), ids[i].item()) for i in range(10) for j in (i - 1, i + 1)
                  if 0 <= j < 10 and sent[i] == sent[j])
    assert got == want
    # window 3 over a range of centres: every pair within 3 and in one sentence, neighbours always in
    inp, tgt = skipgram_pairs(ids, sent, 2, 8, 3, g)
    pos_in, pos_t = inp - 10, tgt - 10
    assert ((pos_in - pos_t).abs() <= 3).all() and (pos_in != pos_t).all()
    assert (sent[pos_in] == sent[pos_t]).all()
    assert ((pos_t >= 2) & (pos_t < 8)).all()
    pairs = set(zip(pos_in.tolist(), pos_t.tolist()))
    assert all((i + 1, i) in pairs for i in range(2, 8) if i + 1 < 10 and sent[i + 1] == sent[i])
    # the reduced window is uniform in 1..window: mean pair count per interior centre is 2 * 2.5
    ids = torch.arange(4000)
    inp, _ = skipgram_pairs(ids, torch.zeros(4000, dtype=torch.long), 100, 3900, 4, g)
    assert abs(inp.numel() / 3800 - 5.0) < 0.15


def test_skipgram_pairs_splits():
    # the trainer draws a group of batches at once and cuts it at the batch bounds by these offsets
    ids, sent = torch.arange(300), torch.arange(300) // 17
    g = torch.Generator().manual_seed(3)
    splits = [5, 5, 40, 41, 200, 250]
    inp, tgt, offs = skipgram_pairs(ids, sent, 5, 250, 3, g, splits)
    assert offs[0] == 0 and offs[-1] == tgt.numel() and len(offs) == len(splits)
    for i in range(len(splits) - 1):
        centre = tgt[offs[i]:offs[i + 1]]
        assert ((centre >= splits[i]) & (centre < splits[i + 1])).all()


@pytest.mark.parametrize("group_words", [1, 1 << 18])
def test_training_applies_batch_by_batch(group_words):
    # whether pairs are drawn per batch or for a group of batches, each batch is one step call with
    # its own (decaying) learning rate, and every pair of the epoch is used once
    sents, _ = _topic_corpus(n_sent=50)
    m = Word2Vec(vector_size=8, window=2, min_count=1, epochs=2, sample=0, batch_words=100, workers=1,
                 device="cpu", backend="reference", compile=False)
    m._group_words = group_words
    m.build_vocab(sents)
    calls = []

    def step(inp, tgt, neg, wi, wo, lr):
        assert inp.shape == tgt.shape == neg.shape[:1] and neg.shape[1] == 5
        calls.append((inp.numel(), lr))
        return torch_sgns_step(inp, tgt, neg, wi, wo, lr)

    m._step_fn = lambda: step
    m.train()
    assert len(calls) == 2 * math.ceil(600 / 100)  # 600 words, no subsampling: every batch has pairs
    lrs = [lr for _, lr in calls]
    assert lrs == sorted(lrs, reverse=True) and len(set(lrs)) == len(lrs)
    # per 12-word sentence: 2 x 11 pairs at distance 1, 2 x 10 at distance 2 kept half the time
    assert sum(n for n, _ in calls) == pytest.approx(2 * 50 * (22 + 10), rel=0.05)


def test_keep_probability_is_gensims():
    counts = torch.tensor([1000, 100, 10, 1])
    p = keep_probability(counts, 1e-2)
    t = 1e-2 * 1111
    for c, pc in zip(counts.tolist(), p.tolist()):
        assert abs(pc - (math.sqrt(c / t) + 1) * t / c) < 1e-12
    assert (keep_probability(counts, 0) == 1).all()


def test_vocab():
    sents = [["a", "b", "a", "c"], ["b", "a", "d"], []]
    vocab, ids, sid, raw = build_vocab(sents, min_count=2, max_vocab_size=None)
    assert vocab.index_to_key == ["a", "b"] and vocab.counts.tolist() == [3, 2] and raw == 7
    assert ids.tolist() == [0, 1, 0, 1, 0] and sid.tolist() == [0, 0, 0, 1, 1]
    vocab, *_ = build_vocab(sents, min_count=1, max_vocab_size=3)
    assert vocab.index_to_key == ["a", "b", "c"]


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        ({"sentences": []}, ValueError, "corpus is empty"),
        ({"sentences": [[], []]}, ValueError, "corpus is empty"),
        ({"sentences": [["a", "b"]], "min_count": 2}, ValueError, "vocabulary is empty"),
        ({"sentences": "a b c"}, TypeError, "not a str"),
        ({"sentences": [[1, 2]]}, TypeError, "str tokens"),
        ({"sentences": [["a"]], "negative": 0}, ValueError, "negative"),
        ({"sentences": [["a"]], "vector_size": 0}, ValueError, "vector_size"),
        ({"sentences": [["a"]], "workers": 0}, ValueError, "workers"),
        ({"sentences": [["a"]], "in_flight": 0}, ValueError, "in_flight"),
        ({"sentences": [["a"]], "corpus_file": "x"}, ValueError, "not both"),
    ],
)
def test_bad_input(kwargs, err, match):
    with pytest.raises(err, match=match):
        Word2Vec(**kwargs)


def test_empty_corpus_file(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("\n\n")
    with pytest.raises(ValueError, match="corpus is empty"):
        Word2Vec(corpus_file=str(f))
    with pytest.raises(FileNotFoundError):
        Word2Vec(corpus_file=str(tmp_path / "missing.txt"))


def _topic_corpus(n_sent=400, seed=0):
    """Sentences drawn from one of four disjoint 'topics' of 8 words each: words of a topic co-occur."""
    rng = random.Random(seed)
    topics = [[f"t{t}w{i}" for i in range(8)] for t in range(4)]
    return [[rng.choice(topics[s % 4]) for _ in range(12)] for s in range(n_sent)], topics


def _topic_purity(model, topics):
    good = 0
    for topic in topics:
        for w in topic:
            near = [x for x, _ in model.most_similar(w, topn=7)]
            good += sum(x in topic for x in near)
    return good / (32 * 7)


@pytest.mark.parametrize("fused", [True, False])
def test_trains_topics_cpu(fused):
    sents, topics = _topic_corpus()
    m = Word2Vec(sents, vector_size=16, window=3, min_count=1, epochs=5, sample=0, seed=1, fused=fused,
                 alpha=0.05, batch_words=500)
    assert _topic_purity(m, topics) > 0.9
    assert m.mean_pair_loss < 2.0  # from 6 log 2 = 4.16 at the zero-initialised start
    assert m.wv["t0w0"].shape == (16,)


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
@pytest.mark.parametrize("in_flight", [None, 64])
def test_trains_topics_triton_sgns_step(in_flight):
    # the fused Triton step (interpreted on the CPU, so a small corpus); on CUDA, the real kernel.
    # in_flight: the one-launch-per-batch Hogwild kernel instead of a launch per 256-pair minibatch
    sents, topics = _topic_corpus(n_sent=60 if not ON_CUDA else 400)
    m = Word2Vec(sents, vector_size=16, window=2, min_count=1, epochs=3 if not ON_CUDA else 5, sample=0,
                 seed=1, alpha=0.05, batch_words=500, device=DEVICE, backend="triton", in_flight=in_flight)
    assert m.syn1neg.device.type == DEVICE
    assert _topic_purity(m, topics) > 0.85


def test_save_word2vec_format_is_read_by_gensim(tmp_path):
    from gensim.models import KeyedVectors as GKV

    sents, _ = _topic_corpus(n_sent=40)
    sents[0] = sents[0] + ["naïve", "日本"]  # non-ASCII words survive both formats
    m = Word2Vec(sents, vector_size=7, min_count=1, epochs=1, seed=0)
    for binary in (False, True):
        path = tmp_path / ("v.bin" if binary else "v.txt")
        m.save_word2vec_format(str(path), binary=binary)
        kv = GKV.load_word2vec_format(str(path), binary=binary)
        assert kv.index_to_key == m.wv.index_to_key
        ours = m.wv.vectors.cpu()
        assert max_err(torch.from_numpy(kv.vectors), ours) <= (0 if binary else 1e-6 * ours.abs().max().item())


def test_evaluation_and_most_similar_equal_gensims(tmp_path):
    from gensim.models import KeyedVectors as GKV

    sents = list(line_sentences(datapath("lee_background.cor")))
    # one worker: deterministic vectors (two Hogwild threads vary run to run, and a near tie between
    # two similarities can then rank differently in float32 here and in gensim: a rare flake)
    m = Word2Vec(sents, vector_size=20, min_count=2, epochs=1, seed=0, workers=1)
    path = tmp_path / "v.bin"
    m.save_word2vec_format(str(path), binary=True)
    kv = GKV.load_word2vec_format(str(path), binary=True)
    ws = datapath("wordsim353.tsv")
    ours = m.evaluate_word_pairs(ws)
    (pearson, _), spearman, oov = kv.evaluate_word_pairs(ws)
    assert abs(ours.spearman - spearman.statistic) < 1e-6
    assert abs(ours.pearson - pearson) < 1e-6
    assert abs(ours.oov_ratio - oov) < 1e-9
    for word in ("the", "government", "said"):
        a, b = m.most_similar(word, topn=5), kv.most_similar(word, topn=5)
        assert [w for w, _ in a] == [w for w, _ in b]
        assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-5
    with pytest.raises(KeyError, match="not in vocabulary"):
        m.wv["zzzunknownzzz"]


def test_lee_sanity_check():
    # gensim's own skip-gram sanity check (test_word2vec.py): 'bombings' within the 50 nearest of 'attacks'
    from gensim.utils import simple_preprocess

    with open(datapath("lee_background.cor"), encoding="utf8") as f:
        sents = [simple_preprocess(line) for line in f]
    m = Word2Vec(sents, window=4, negative=15, min_count=5, epochs=10, seed=42)
    near = [w for w, _ in m.most_similar("attacks", topn=50)]
    assert "bombings" in near


def test_cli(tmp_path, capsys):
    from embedattn.word2vec.__main__ import main

    sents, _ = _topic_corpus(n_sent=60)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(" ".join(s) for s in sents))
    out = tmp_path / "v.txt"
    rc = main(["--corpus", str(corpus), "--out", str(out), "--min-count", "1", "--epochs", "2",
               "--vector-size", "8", "--device", "cpu"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "words/s" in captured.out and "loss" in captured.err and "lr" in captured.err
    assert out.read_text().splitlines()[0] == "32 8"
    empty = tmp_path / "e.txt"
    empty.write_text("")
    assert main(["--corpus", str(empty), "--out", str(out), "--quiet"]) == 2
    assert "corpus is empty" in capsys.readouterr().err


@pytest.mark.slow
@slow
def test_head500_wordsim_matches_gensim():
    """The quality target: WordSim-353 Spearman on head500 (min_count 3, 20 epochs) within 0.05 of
    gensim's skip-gram with the same settings."""
    from gensim.models import Word2Vec as GW2V

    corpus = datapath("head500.noblanks.cor.bz2")
    sents = list(line_sentences(corpus))
    ws = datapath("wordsim353.tsv")
    ours = Word2Vec(sents, min_count=3, epochs=20, seed=0, workers=2, device=DEVICE).evaluate_word_pairs(ws)
    theirs = GW2V(sents, sg=1, min_count=3, epochs=20, seed=0, workers=2).wv.evaluate_word_pairs(ws)
    print(f"head500 wordsim353 spearman: embedattn {ours.spearman:.4f} gensim {theirs[1].statistic:.4f}")
    assert ours.spearman >= theirs[1].statistic - 0.05


@pytest.mark.parametrize("n", [16_777_217, 16_777_219, 100_000_003])
def test_batch_bounds_cover_large_corpora_exactly(n):
    # float32 bounds (torch.linspace's default) rounded the end past n above 2**24 kept words, so the
    # last batch indexed past the corpus (IndexError; a device assert on CUDA), or dropped its tail
    from embedattn.word2vec.model import _batch_bounds

    for n_batches in (1, 2, 7, 1700):
        b = _batch_bounds(n, n_batches)
        assert len(b) == n_batches + 1 and b[0] == 0 and b[-1] == n
        assert all(x <= y for x, y in zip(b, b[1:]))
