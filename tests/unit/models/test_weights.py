"""GGUF → model.safetensors: the file transformers loads from our directory must give the
same logits and greedy text as transformers' own GGUF loader, written once, atomically."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import gguf  # noqa: E402

from dynamo_bus.errors import ModelUnavailable  # noqa: E402
from dynamo_bus.models import weights  # noqa: E402
from dynamo_bus.models.modeldir import MARKER, ModelDir, resolve_model  # noqa: E402
from dynamo_bus.models.weights import (  # noqa: E402
    WEIGHTS_FILE,
    ensure_weights,
    read_header,
    reverse_permute,
    to_bf16_bits,
)

PROMPTS = ["The capital of France is", "def fibonacci(n):"]


def _copy(model_dir: ModelDir, dest: Path) -> ModelDir:
    """A copy of the cached directory (config + tokenizer, no weights), so tests never write
    into the user's cache; the GGUF is shared, read-only."""
    shutil.copytree(model_dir.path, dest, ignore=shutil.ignore_patterns("model.safetensors*"))
    return dataclasses.replace(model_dir, path=dest)


@pytest.fixture(scope="module")
def built(model_dir: ModelDir, tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelDir]:
    root = tmp_path_factory.mktemp("weights")
    out = {}
    for dtype in ("float32", "bfloat16"):
        copy = _copy(model_dir, root / dtype)
        ensure_weights(copy, dtype)
        out[dtype] = copy
    return out


@pytest.fixture(scope="module")
def reference(model_dir: ModelDir) -> Any:
    """transformers' own GGUF loader on the same file: the ground truth."""
    assert model_dir.gguf_path is not None
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir.gguf_path.parent, gguf_file=model_dir.gguf_path.name, dtype=torch.float32)
    return model.eval()


def _load(path: Path) -> Any:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    return model.eval()


def _ids(model_dir: ModelDir) -> list[Any]:
    tok = transformers.AutoTokenizer.from_pretrained(model_dir.path)
    return [tok(p, return_tensors="pt").input_ids for p in PROMPTS]


def test_reverse_permute_undoes_llama_cpp_permute() -> None:
    # llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, verbatim in numpy.
    def permute(w: np.ndarray, n_head: int) -> np.ndarray:
        return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
                .swapaxes(1, 2).reshape(w.shape))

    w = np.arange(3 * 64 * 5, dtype=np.float32).reshape(3 * 64, 5)
    assert np.array_equal(reverse_permute(permute(w, 3), 3), w)
    assert not np.array_equal(permute(w, 3), w)


def test_bf16_rounding_matches_torch() -> None:
    rng = np.random.default_rng(0)
    # Exact ties (1 + 2**-8 rounds down to even, 1 + 3 * 2**-8 up), overflow to inf, subnormals.
    edge = np.array([0.0, -0.0, 1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-9, 3.4e38, -3.4e38,
                     1e-40, np.inf, -np.inf], dtype=np.float32)
    values = np.concatenate([edge, rng.standard_normal(100_000).astype(np.float32)])
    ours = to_bf16_bits(values)
    theirs = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)
    assert np.isnan(torch.from_numpy(to_bf16_bits(np.array([np.nan], np.float32)).view(np.int16))
                    .view(torch.bfloat16).float().numpy()).all()


def test_tensors_equal_transformers_gguf_dequantization(built: dict[str, ModelDir],
                                                        reference: Any) -> None:
    ref = reference.state_dict()
    f32 = safetensors_torch.load_file(built["float32"].path / WEIGHTS_FILE)
    bf16 = safetensors_torch.load_file(built["bfloat16"].path / WEIGHTS_FILE)
    # Tied embeddings: no lm_head.weight in the file, as in the original HF checkpoint.
    assert set(f32) == set(bf16) == set(ref) - {"lm_head.weight"}
    for name, tensor in f32.items():
        assert tensor.dtype == torch.float32 and bf16[name].dtype == torch.bfloat16
        assert torch.equal(tensor, ref[name]), name
        assert torch.equal(bf16[name], ref[name].to(torch.bfloat16)), name


def test_float32_logits_and_greedy_text_match_gguf_loader(built: dict[str, ModelDir],
                                                          reference: Any) -> None:
    ours = _load(built["float32"].path)
    for ids in _ids(built["float32"]):
        with torch.no_grad():
            got, want = ours(ids).logits, reference(ids).logits
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=2)
            assert torch.equal(ours.generate(ids, **kwargs), reference.generate(ids, **kwargs))


def test_bfloat16_logits_close_to_gguf_loader(built: dict[str, ModelDir],
                                              reference: Any) -> None:
    ours = _load(built["bfloat16"].path)
    for ids in _ids(built["bfloat16"]):
        with torch.no_grad():
            got, want = ours(ids).logits[0, -1], reference(ids).logits[0, -1]
        # bf16 keeps 8 mantissa bits: close, and the same top prediction.
        assert (got - want).abs().max() < 0.05 * want.abs().max()
        assert got.argmax() == want.argmax()


def test_second_call_keeps_the_file(built: dict[str, ModelDir]) -> None:
    target = built["bfloat16"].path / WEIGHTS_FILE
    before = target.stat()
    assert ensure_weights(built["bfloat16"], "bfloat16") == target
    after = target.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


class _Rebuild(Exception):
    """Raised by a stubbed build step: proves ensure_weights decided to rebuild."""


def _stub_build(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_args: object) -> None:
        raise _Rebuild

    # The build's first step; stubbed since a real build costs seconds.
    monkeypatch.setattr(gguf, "GGUFReader", fail)


def test_truncated_other_dtype_or_new_gguf_is_rebuilt(built: dict[str, ModelDir], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    copy = dataclasses.replace(built["bfloat16"], path=tmp_path / "m")
    shutil.copytree(built["bfloat16"].path, copy.path)
    target = copy.path / WEIGHTS_FILE
    _stub_build(monkeypatch)
    assert ensure_weights(copy, "bfloat16") == target  # complete: no rebuild
    with pytest.raises(_Rebuild):
        ensure_weights(copy, "float32")
    assert copy.gguf_path is not None
    os.utime(copy.path / "config.json")  # unrelated files do not matter ...
    assert ensure_weights(copy, "bfloat16") == target
    gguf_copy = tmp_path / copy.gguf_path.name  # ... but a different GGUF does
    shutil.copyfile(copy.gguf_path, gguf_copy)
    with pytest.raises(_Rebuild):
        ensure_weights(dataclasses.replace(copy, gguf_path=gguf_copy), "bfloat16")
    with open(target, "r+b") as f:
        f.truncate(target.stat().st_size - 1)
    with pytest.raises(_Rebuild):
        ensure_weights(copy, "bfloat16")


def test_failed_build_keeps_the_old_file_and_no_temp_file(built: dict[str, ModelDir],
                                                           tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    copy = dataclasses.replace(built["bfloat16"], path=tmp_path / "m")
    shutil.copytree(built["bfloat16"].path, copy.path)
    before = sorted(copy.path.iterdir())
    old = (copy.path / WEIGHTS_FILE).stat()
    real = weights._hf_array
    calls = 0

    def fail_midway(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 20:  # after some tensors are already in the temp file
            raise _Rebuild
        return real(*args)

    monkeypatch.setattr(weights, "_hf_array", fail_midway)
    with pytest.raises(_Rebuild):
        ensure_weights(copy, "float32")
    assert sorted(copy.path.iterdir()) == before
    new = (copy.path / WEIGHTS_FILE).stat()
    assert (new.st_ino, new.st_size) == (old.st_ino, old.st_size)
    header, _ = read_header(copy.path / WEIGHTS_FILE)
    assert header["__metadata__"]["dtype"] == "bfloat16"
    assert header["model.norm.weight"]["dtype"] == "BF16"


def test_without_gguf_or_weights_is_a_clear_error(model_dir: ModelDir, tmp_path: Path) -> None:
    copy = dataclasses.replace(_copy(model_dir, tmp_path / "m"), gguf_path=None)
    with pytest.raises(ModelUnavailable, match=r"no model\.safetensors"):
        ensure_weights(copy)
    with pytest.raises(ValueError, match="dtype"):
        ensure_weights(copy, "float16")
    (copy.path / WEIGHTS_FILE).write_bytes(b"")
    assert ensure_weights(copy) == copy.path / WEIGHTS_FILE
    assert os.path.getsize(copy.path / WEIGHTS_FILE) == 0  # a shipped file is left alone


def test_built_directory_given_by_path_builds_its_weights(model_dir: ModelDir,
                                                          tmp_path: Path) -> None:
    copy = _copy(model_dir, tmp_path / "m")
    by_path = resolve_model(str(copy.path))
    assert by_path.gguf_path == model_dir.gguf_path
    assert ensure_weights(by_path, "bfloat16") == copy.path / WEIGHTS_FILE
    assert read_header(copy.path / WEIGHTS_FILE)[0]["__metadata__"]["dtype"] == "bfloat16"


def test_built_directory_whose_gguf_is_gone_names_the_command(model_dir: ModelDir,
                                                              tmp_path: Path) -> None:
    copy = _copy(model_dir, tmp_path / "m")
    (copy.path / MARKER).write_text(json.dumps({"format": 1, "gguf": str(tmp_path / "x.gguf")}))
    by_path = resolve_model(str(copy.path))
    assert by_path.gguf_path is None
    with pytest.raises(ModelUnavailable, match="`dynamo-bus model` fetches it again"):
        ensure_weights(by_path)
