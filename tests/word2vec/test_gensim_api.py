"""word2vec's gensim parity beyond gensim's own test file (test_gensim_suite.py): the Huffman tree, online
vocabulary, prepare_vocab's report, in-memory conversion both ways, queries on the same vectors, files
(separate arrays, mmap), vectors_lockf on every road, train()'s checks and gensim's warnings, the corpus
readers, the road said once when it is not the fast one, and the C path's build cache."""

from __future__ import annotations

import bz2
import ctypes
import gzip
import logging
import math
import warnings

import numpy as np
import pytest
from helpers import DEVICE, HAS_TRITON

from embedattn.word2vec import KeyedVectors, LineSentence, PathLineSentences, Word2Vec, _cpu
from embedattn.word2vec import model as model_mod
from embedattn.word2vec._corpus import huffman_tree, line_sentences

gensim = pytest.importorskip("gensim")
from gensim.models import Word2Vec as GW2V  # noqa: E402
from gensim.test.utils import common_texts, datapath  # noqa: E402


def _lee():
    return list(line_sentences(datapath("lee_background.cor")))


def _split_lee():
    sents = _lee()
    terro = [s for s in sents if "terrorism" in s]
    return [s for s in sents if "terrorism" not in s], terro


# ----------------------------------------------------------------------------- vocabulary
@pytest.mark.parametrize("min_count", [1, 5])
def test_huffman_tree_equals_gensims(min_count):
    # ties in the counts leave gensim's heap in heapq's order: the same tree, so syn1's rows are gensim's
    g = GW2V(vector_size=4, min_count=min_count, hs=1, negative=0)
    g.build_vocab(_lee())
    off, pts, cds = huffman_tree(g.wv.expandos["count"])
    m = Word2Vec(vector_size=4, min_count=min_count, hs=1, negative=0, device="cpu")
    m.build_vocab(_lee())
    for i in range(len(g.wv)):
        assert np.array_equal(cds[off[i]:off[i + 1]], g.wv.get_vecattr(i, "code"))
        assert np.array_equal(pts[off[i]:off[i + 1]], g.wv.get_vecattr(i, "point"))
        assert np.array_equal(m.wv.get_vecattr(i, "point"), g.wv.get_vecattr(i, "point"))
    assert huffman_tree([7])[0].tolist() == [0, 0]  # one word: an empty path


@pytest.mark.parametrize("kw", [{"min_count": 3}, {"min_count": 1, "sample": 1e-4}, {"min_count": 2, "hs": 1}])
def test_online_vocab_equals_gensims(kw):
    # build_vocab(update=True) as gensim: new words appended, counts added, the update corpus's downsampling
    others, terro = _split_lee()
    g, m = GW2V(vector_size=8, **kw), Word2Vec(vector_size=8, device="cpu", **kw)
    for model in (g, m):
        model.build_vocab(others)
        model.build_vocab(terro, update=True)
    assert m.wv.index_to_key == g.wv.index_to_key and "terrorism" in m.wv
    assert m.wv.expandos["count"].tolist() == g.wv.expandos["count"].tolist()
    assert np.abs(m.wv.expandos["sample_int"].astype(np.int64) - g.wv.expandos["sample_int"]).max() <= 1
    assert m.wv.vectors.shape == g.wv.vectors.shape and m.syn1neg.shape == g.syn1neg.shape
    if m.hs:
        assert all(np.array_equal(m.wv.get_vecattr(i, "code"), g.wv.get_vecattr(i, "code")) for i in range(len(g.wv)))
    with pytest.raises(RuntimeError, match="online vocabulary-update"):
        Word2Vec(device="cpu").build_vocab(terro, update=True)


@pytest.mark.parametrize("kw", [{"min_count": 4, "max_final_vocab": 4, "sample": 0}, {"min_count": 2},
                                {"min_count": 1, "sample": 1e-2}, {"min_count": 1, "max_final_vocab": 6}])
def test_prepare_vocab_report_equals_gensims(kw):
    g, m = GW2V(vector_size=4, **kw), Word2Vec(vector_size=4, device="cpu", **kw)
    assert m.scan_vocab(common_texts) == g.scan_vocab(common_texts)
    assert m.raw_vocab == dict(g.raw_vocab)
    assert m.prepare_vocab(dry_run=True) == g.prepare_vocab(dry_run=True)
    assert m.prepare_vocab() == g.prepare_vocab()
    assert m.effective_min_count == g.effective_min_count and m.wv.index_to_key == g.wv.index_to_key


# ----------------------------------------------------------------------------- gensim, in memory
@pytest.mark.parametrize("kw", [{"sg": 1, "hs": 1, "negative": 5}, {"hs": 1, "negative": 0}, {}])
def test_from_gensim_and_to_gensim(kw):
    sents = _lee()[:150]
    g = GW2V(sents, vector_size=12, min_count=2, epochs=2, seed=3, workers=1, **kw)
    m = Word2Vec.from_gensim(g, device="cpu")
    assert m.wv.index_to_key == g.wv.index_to_key and np.array_equal(m.wv.vectors, g.wv.vectors)
    for ours, theirs in ((m.syn1neg, getattr(g, "syn1neg", None)), (m.syn1, getattr(g, "syn1", None))):
        assert (ours is None) == (theirs is None) and (ours is None or np.array_equal(ours, theirs))
    assert (m.sg, m.hs, m.negative, m.window, m.corpus_count) == (g.sg, g.hs, g.negative, g.window, g.corpus_count)
    assert m.wv.most_similar("the", topn=5) == g.wv.most_similar("the", topn=5)
    m.train(sents, total_examples=len(sents), epochs=1)  # embedattn trains on
    back = m.to_gensim()
    assert back.wv.index_to_key == m.wv.index_to_key and np.array_equal(back.wv.vectors, m.wv.vectors)
    assert back.wv.most_similar("the", topn=5) == m.wv.most_similar("the", topn=5)
    assert np.array_equal(back.wv.expandos["sample_int"], g.wv.expandos["sample_int"])
    if m.hs:
        assert np.array_equal(back.syn1, m.syn1)
        # gensim looks log sigmoid up in a 1000-entry table (index rounded down: about 2% lower here)
        np.testing.assert_allclose(m.score(sents[:20]), back.score(sents[:20], 20), rtol=3e-2)
    back.train(sents, total_examples=len(sents), epochs=1)  # and so does gensim
    assert not np.array_equal(back.wv.vectors, m.wv.vectors)


def test_queries_on_the_same_vectors_equal_gensims():
    g = GW2V(_lee()[:200], vector_size=16, min_count=2, epochs=2, seed=1, workers=1)
    m = Word2Vec.from_gensim(g, device="cpu")
    for args in ((["the", "of"], ["and"]), (["government"], None)):
        ours, theirs = m.wv.most_similar_cosmul(*args, topn=6), g.wv.most_similar_cosmul(*args, topn=6)
        assert [w for w, _ in ours] == [w for w, _ in theirs]
        np.testing.assert_allclose([s for _, s in ours], [s for _, s in theirs], rtol=1e-5)
    ours, theirs = m.predict_output_word(["the", "government"], topn=5), g.predict_output_word(["the", "government"],
                                                                                                 topn=5)
    assert [w for w, _ in ours] == [w for w, _ in theirs]
    np.testing.assert_allclose([p for _, p in ours], [p for _, p in theirs], rtol=1e-5)
    assert m.predict_output_word(["zzz"]) is None
    kv = KeyedVectors._from_arrays(list(g.wv.index_to_key), g.wv.vectors.copy())
    kv.unit_normalize_all()
    np.testing.assert_allclose(np.linalg.norm(kv.vectors, axis=1), 1, rtol=1e-6)
    pytest.importorskip("ot")
    d1, d2 = ["the", "government", "said"], ["police", "the", "were", "zzz"]
    assert m.wv.wmdistance(d1, d2) == pytest.approx(g.wv.wmdistance(d1, d2), rel=1e-6)
    assert m.wv.wmdistance(d1, d1) == 0.0 and m.wv.wmdistance(["zzz"], d1) == math.inf


# ----------------------------------------------------------------------------- files
def test_save_separate_arrays_and_mmap(tmp_path):
    m = Word2Vec(_lee()[:100], vector_size=8, min_count=2, hs=1, epochs=1, device="cpu")
    path = tmp_path / "w2v.model"
    m.save(path, sep_limit=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["w2v.model"] + [f"w2v.model.{k}.npy" for k in ("vectors", "syn1neg", "syn1", "count", "keep",
                                                         "vectors_lockf")])
    m2 = Word2Vec.load(path, mmap="r")
    assert isinstance(m2.wv.vectors, np.memmap) and not m2.wv.vectors.flags.writeable
    assert np.array_equal(m2.wv.vectors, m.wv.vectors) and np.array_equal(m2.syn1, m.syn1)
    m2.train(_lee()[:100], total_examples=100, epochs=1)  # training copies the read-only map
    m.save(path, separately=["vectors"])
    assert isinstance(Word2Vec.load(path, mmap="r").wv.vectors, np.memmap)
    with pytest.raises(ValueError, match="separately"):
        m.save(path, separately=["nope"])
    with pytest.raises(AttributeError, match="on the class"):
        m.load(path)  # gensim's: load is called on the class
    m.wv.save(tmp_path / "kv")
    with pytest.raises(AttributeError, match="KeyedVectors"):
        Word2Vec.load(tmp_path / "kv")
    with pytest.raises(TypeError):
        Word2Vec.load(tmp_path / "kv")
    with pytest.raises(ValueError, match="from_gensim"):  # a gensim pickle is refused, with the way over
        Word2Vec.load(datapath("word2vec_old"))


# ----------------------------------------------------------------------------- training
_ROADS = ["c"] + (["triton"] if HAS_TRITON else [])


@pytest.mark.parametrize("road", _ROADS)
@pytest.mark.parametrize("sg,hs", [(0, 1), (1, 0)])
def test_vectors_lockf_is_honoured(road, sg, hs):
    sents = [["a", "b", "c", "d", "e", "f"], ["b", "c", "a", "e"], ["f", "e", "d", "a"]] * (3 if road == "c" else 1)
    kw = dict(vector_size=8, min_count=1, sample=0, sg=sg, hs=hs, negative=3, window=2, epochs=2, seed=2)
    kw.update(device=DEVICE, backend="triton") if road == "triton" else kw.update(device="cpu", workers=1)
    m = Word2Vec(**kw)
    m.build_vocab(sents)
    before = m.wv.vectors.copy()
    m.wv.vectors_lockf = np.ones(len(m.wv), dtype=np.float32)
    m.wv.vectors_lockf[[0, 3]] = 0.0
    m.train(sents, total_examples=len(sents), epochs=2)
    assert np.array_equal(m.wv.vectors[[0, 3]], before[[0, 3]])
    assert (np.abs(m.wv.vectors - before).max(axis=1) > 0).sum() == len(m.wv) - 2
    m.wv.vectors_lockf = np.zeros(1, dtype=np.float32)  # one factor for all (gensim's default shape)
    frozen = m.wv.vectors.copy()
    m.train(sents, total_examples=len(sents), epochs=1)
    assert np.array_equal(m.wv.vectors, frozen)
    if sg and not hs and road == "c":
        mb = Word2Vec(**{**kw, "trainer": "minibatch"})
        mb.build_vocab(sents)
        mb.wv.vectors_lockf = np.zeros(1, dtype=np.float32)
        with pytest.raises(ValueError, match="vectors_lockf"):
            mb.train()


def test_train_checks_and_warnings(caplog):
    m = Word2Vec(min_count=1, device="cpu")
    m.build_vocab(common_texts)
    for kw in ({}, {"epochs": 2}, {"total_examples": 9}, {"total_examples": 9, "epochs": 0}):
        with pytest.raises(ValueError, match="total_examples|epochs"):
            m.train(common_texts, **kw)
    with caplog.at_level(logging.WARNING):
        Word2Vec(common_texts, min_count=1, hs=1, negative=5, device="cpu")
        assert "Both hierarchical softmax and negative sampling are activated" in caplog.text
        m.train(common_texts, total_examples=9, epochs=1)
        assert "Effective 'alpha' higher" not in caplog.text
        m.alpha = 0.05
        m.train(common_texts, total_examples=9, epochs=1)
        assert "Effective 'alpha' higher than previous training cycles" in caplog.text
        m.build_vocab(["human", "machine"])  # strings, not token lists: gensim's warning, then its characters
        assert "Each 'sentences' item should be a list of words" in caplog.text
        assert "h" in m.wv
    for bad in ([], [["a"]] * 3):
        with pytest.raises(RuntimeError, match="build vocabulary"):
            Word2Vec(bad, min_count=5, device="cpu")
        with pytest.raises(ValueError, match="build vocabulary"):
            Word2Vec(bad, min_count=5, device="cpu")
    with pytest.raises(RuntimeError, match="build vocabulary"):
        Word2Vec(device="cpu").train(common_texts, total_examples=9, epochs=1)


def test_total_words_sets_the_schedule():
    # gensim's schedule runs over epochs x total_words: a larger total leaves the rate higher at the end
    m = Word2Vec(min_count=1, alpha=0.05, min_alpha=0.001, device="cpu")
    m.build_vocab(common_texts)
    m.train(common_texts, total_words=29, epochs=2)
    assert m.min_alpha_yet_reached == pytest.approx(0.001)
    m.alpha = 0.05
    m.train(common_texts, total_words=58, epochs=2)
    assert m.min_alpha_yet_reached == pytest.approx(0.05 - 0.049 / 2)


# ----------------------------------------------------------------------------- corpus readers
def test_line_sentence_streams_and_paths(tmp_path):
    text = "a b c\n\nd e  f g\nh\n"
    want = [["a", "b", "c"], ["d", "e", "f", "g"], ["h"]]
    plain = tmp_path / "c.txt"
    plain.write_text(text)
    (tmp_path / "c.txt.bz2").write_bytes(bz2.compress(text.encode()))
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress(text.encode()))
    with open(plain, "rb") as fb, open(plain, encoding="utf8") as ft, bz2.BZ2File(tmp_path / "c.txt.bz2") as fz, \
            gzip.GzipFile(tmp_path / "c.txt.gz") as fg:
        for source in (plain, str(tmp_path / "c.txt.bz2"), fb, ft, fz, fg):
            ls = LineSentence(source)
            assert list(ls) == want and list(ls) == want  # restartable
    assert list(LineSentence(plain, max_sentence_length=2, limit=3)) == [["a", "b"], ["c"], ["d", "e"], ["f", "g"]]
    with pytest.raises(TypeError, match="path or an open file"):
        LineSentence(123)
    (tmp_path / "sub").mkdir()
    assert list(PathLineSentences(tmp_path)) == want * 3  # c.txt, c.txt.bz2, c.txt.gz in name order
    assert list(PathLineSentences(plain)) == want
    with pytest.raises(ValueError, match="neither a file nor a path"):
        PathLineSentences(tmp_path / "missing")


# ----------------------------------------------------------------------------- roads and the C build
def test_slow_road_is_said_once(monkeypatch):
    monkeypatch.setattr(_cpu, "_state", {"fn": None, "error": "no C compiler (test)"})
    monkeypatch.setattr(model_mod, "_ANNOUNCED", set())
    with pytest.warns(RuntimeWarning, match="NumPy reference.*no C compiler \\(test\\)"):
        m = Word2Vec(common_texts, min_count=1, hs=1, negative=0, epochs=1, device="cpu")
    assert m.running_training_loss > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Word2Vec(common_texts, min_count=1, hs=1, negative=0, epochs=1, device="cpu")  # said once
    with pytest.warns(RuntimeWarning, match="minibatch trainer"):
        Word2Vec(common_texts, min_count=1, sg=1, epochs=1, device="cpu")


def test_c_build_is_keyed_by_source_compiler_and_target(monkeypatch):
    if _cpu.load() is None:
        pytest.skip(f"no C compiler: {_cpu.build_error()}")
    cc = _cpu._compiler()
    key = _cpu.cache_key.__wrapped__(cc)
    path = _cpu.build()
    assert key == _cpu.cache_key(cc) and f"w2v_{key}.so" in path
    lib = ctypes.CDLL(path)
    lib.w2v_abi.restype = ctypes.c_int64
    assert lib.w2v_abi() == (_cpu.ABI_VERSION << 32 | ctypes.sizeof(_cpu.W2VArgs))  # the struct the binding passes
    # another target, another library (the key holds the compiler's predefined macros under the flags)
    monkeypatch.setattr(_cpu, "FLAGS", tuple(f for f in _cpu.FLAGS if f != "-march=native") + ("-mno-sse3",))
    try:
        other = _cpu.cache_key.__wrapped__(cc)
    except RuntimeError:
        pytest.skip("the compiler does not take -mno-sse3 (not x86)")
    assert other != key
