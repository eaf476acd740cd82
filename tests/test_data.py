"""Text sources, the weighted mixture and fixed contexts (esosae/data/text.py), on small local files."""


import pytest
import torch
from lm_helpers import WORDS, tiny_tokenizer, write_jsonl, write_txt

from esosae.data import text as data

BOS = 1


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def offline(monkeypatch):
    """The hub is unreachable, whatever the machine: hub names must fail fast and clearly."""
    monkeypatch.setattr(data, "hub_unavailable", lambda: "cannot reach huggingface.co: test")


def all_contexts(sources, tok, context_size=16, seed=0):
    return torch.cat(list(data.batches(data.contexts(sources, tok, BOS, context_size, seed), 8)))


def test_parse_weights_and_paths(tmp_path):
    a, b = write_txt(tmp_path / "a.txt", 5), write_jsonl(tmp_path / "b.jsonl", 3)
    sources = data.parse_sources(f"{a}:3, {b}")
    assert [(s.name, s.weight, s.files) for s in sources] == [(str(a), 3.0, (a.resolve(),)),
                                                              (str(b), 1.0, (b.resolve(),))]


@pytest.mark.parametrize("spec, msg", [("x.txt:0", "weight must be > 0"), ("a.txt,,b.txt", "empty entry")])
def test_parse_rejects_bad_entries(tmp_path, monkeypatch, spec, msg):
    monkeypatch.chdir(tmp_path)
    for name in ("x.txt", "a.txt", "b.txt"):
        write_txt(tmp_path / name, 2)
    with pytest.raises(data.DataError, match=msg):
        data.parse_sources(spec)


def test_missing_file_is_one_line_error(tmp_path):
    with pytest.raises(data.DataError) as e:
        data.parse_sources(str(tmp_path / "nope.jsonl"))
    assert "does not exist" in str(e.value) and "\n" not in str(e.value)


def test_hub_name_offline_fails_fast(offline):
    with pytest.raises(data.DataError) as e:
        data.parse_sources("monology/pile-uncopyrighted")
    msg = str(e.value)
    assert "hub is unavailable" in msg and "monology/pile-uncopyrighted" in msg and "\n" not in msg


def test_aliases_resolve_to_the_data_dir(tmp_path, monkeypatch):
    for rel in data.ALIASES["wikitext"].local + data.ALIASES["pile"].local:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("w1 w2\n")
    monkeypatch.setenv("ESOSAE_DATA_DIR", str(tmp_path))
    wiki, pile = data.parse_sources("wikitext:1,pile:2")
    assert pile.weight == 2.0 and [f.suffix for f in pile.files] == [".jsonl", ".jsonl"]
    assert [f.name for f in wiki.files] == ["wikitext103_tokens_valid.txt", "wikitext103_tokens_test.txt"]


def test_alias_without_local_copy_offline_is_an_error(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("ESOSAE_DATA_DIR", str(tmp_path))
    with pytest.raises(data.DataError, match="no local copy.*hub is unavailable"):
        data.parse_sources("wikitext")


def test_folder_collects_supported_files_sorted(tmp_path):
    write_txt(tmp_path / "b.txt", 3)
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "a.jsonl", 2)
    (tmp_path / "notes.md").write_text("ignored")
    (src,) = data.parse_sources(str(tmp_path))
    assert [f.name for f in src.files] == ["b.txt", "a.jsonl"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="holds no"):
        data.parse_sources(str(tmp_path / "empty"))


def test_contexts_start_with_bos_and_keep_lines_whole(tmp_path, tok):
    txt = write_txt(tmp_path / "a.txt", 200)
    ctx = all_contexts(data.parse_sources(str(txt)), tok)
    assert ctx.shape[1] == 17 and (ctx[:, 0] == BOS).all()
    assert not (ctx[:, 1:] == BOS).any(), "lines of one text are joined without separators"
    n_words = sum(len(line.split()) for line in txt.read_text().splitlines())
    assert n_words - 16 < ctx.numel() - len(ctx) <= n_words  # one map batch: only its tail is dropped


def test_documents_are_separated_by_bos_and_lines_are_not(tmp_path, tok):
    write_jsonl(tmp_path / "d.jsonl", 40)
    ctx = all_contexts(data.parse_sources(str(tmp_path / "d.jsonl")), tok)
    assert (ctx[:, 1:] == BOS).any()
    write_txt(tmp_path / "e.txt", 200, words=WORDS[:10])  # a folder mixing both kinds
    ctx = all_contexts(data.parse_sources(str(tmp_path)), tok)
    from_txt = (ctx[:, 1:] < 4 + 10).all(1)  # contexts made only of the .txt file's words
    assert from_txt.any() and not (ctx[from_txt, 1:] == BOS).any()


def test_parquet_and_missing_text_field(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [" ".join(WORDS)] * 4}), tmp_path / "t.parquet")
    assert len(all_contexts(data.parse_sources(str(tmp_path / "t.parquet")), tok)) > 0
    pq.write_table(pa.table({"body": ["w1 w2"]}), tmp_path / "u.parquet")
    with pytest.raises(data.DataError, match="no 'text' field"):
        all_contexts(data.parse_sources(str(tmp_path / "u.parquet")), tok)


@pytest.mark.parametrize("content,words", [("", "is empty"), ("\n \n", "is empty"), ("w1 w2\n", "is it empty?")])
def test_empty_dataset_is_one_line_error(tmp_path, tok, content, words):
    (tmp_path / "e.txt").write_text(content)
    with pytest.raises(data.DataError) as e:
        all_contexts(data.parse_sources(str(tmp_path / "e.txt")), tok)
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name,content,words", [
    ("latin1.txt", "caf\xe9 cr\xe8me\n".encode("latin-1"), "not UTF-8"),
    ("blob.txt", bytes(range(256)) * 4, "not a text file"),
    ("empty.jsonl", b"", "is empty"),
    ("broken.jsonl", b'{"text": "w1 w2"\n', "not valid JSON Lines"),
    ("notext.jsonl", b'{"body": "w1 w2"}\n', "'text' field"),
    ("list.jsonl", b'["w1 w2"]\n', "'text' field"),
])
def test_unreadable_text_files_are_named_before_anything_runs(tmp_path, name, content, words):
    """Found when the --dataset is resolved (before any directory is written or model loaded),
    not as a traceback mid-harvest."""
    (tmp_path / name).write_bytes(content)
    with pytest.raises(data.DataError) as e:
        data.parse_sources(str(tmp_path / name))
    assert words in str(e.value) and name in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(data.DataError, match=words):  # in a folder too
        data.parse_sources(str(tmp_path))


def test_mixture_is_deterministic_and_weighted(tmp_path, tok):
    a = write_txt(tmp_path / "a.txt", 600, seed=1, words=WORDS[:60])
    b = write_txt(tmp_path / "b.txt", 600, seed=2, words=WORDS[60:])
    sources = data.parse_sources(f"{a}:3,{b}:1")
    first, again, other = (all_contexts(sources, tok, seed=s) for s in (0, 0, 1))
    assert torch.equal(first, again) and not torch.equal(first, other)
    from_a = (first[:, 1:] < 4 + 60).all(1).float().mean().item()  # ids of WORDS[:60] are 4..63
    assert 0.65 < from_a < 0.85
