"""The reference engine's model over its paged KV cache: greedy output equals transformers
token for token, and chunked prefill, batching and scattered blocks change no logits."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dynamo_bus.engines.reference.batch import ForwardBatch, KVCache  # noqa: E402
from dynamo_bus.engines.reference.model import CausalLM  # noqa: E402
from dynamo_bus.engines.reference.packed import PackedLinear  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "Once upon a time, in a small village by the sea, there lived"]
NEW_TOKENS = 32
BLOCK = 16
LONG = ("The history of the printing press begins in the fifteenth century, when Johannes "
        "Gutenberg combined movable metal type, oil-based ink and a wooden screw press. Within "
        "a few decades, printing shops had spread across Europe, and books became cheaper. "
        "Literacy rose, scholars shared their findings faster, and new ideas travelled widely.")


@pytest.fixture(scope="module", autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def model(fp32_dir: Path) -> CausalLM:
    return CausalLM.from_dir(fp32_dir, torch.float32)


@pytest.fixture(scope="module")
def tokenizer(fp32_dir: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(fp32_dir)


def _cache(model: CausalLM, blocks: int = 64) -> KVCache:
    return KVCache.allocate(model.config, blocks, BLOCK, torch.float32)


def _table(n_tokens: int, first: int = 0) -> list[int]:
    return list(range(first, first + -(-n_tokens // BLOCK)))


def _prefill(model: CausalLM, ids: list[int], table: list[int], chunk: int | None = None,
             kv: KVCache | None = None) -> Any:
    """Prefill ``ids`` (in chunks of ``chunk`` tokens if given); the last token's logits."""
    kv = kv if kv is not None else _cache(model)
    step = chunk or len(ids)
    for start in range(0, len(ids), step):
        logits = model(ForwardBatch.build([(ids[start:start + step], start, table)], BLOCK), kv)
    return logits[0]


def test_greedy_matches_transformers(model: CausalLM, tokenizer: Any, fp32_dir: Path) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(fp32_dir, dtype=torch.float32).eval()
    eos = set(hf.generation_config.eos_token_id if isinstance(
        hf.generation_config.eos_token_id, list) else [hf.generation_config.eos_token_id])
    lengths = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        with torch.inference_mode():
            expected = hf.generate(torch.tensor([ids]), do_sample=False,
                                   max_new_tokens=NEW_TOKENS)[0, len(ids):].tolist()
        kv, table = _cache(model), _table(len(ids) + NEW_TOKENS)
        got = [int(_prefill(model, ids, table, kv=kv).argmax())]
        # Decode one token per forward, as the engine will, stopping where transformers does.
        while len(got) < NEW_TOKENS and got[-1] not in eos:
            batch = ForwardBatch.build([([got[-1]], len(ids) + len(got) - 1, table)], BLOCK)
            got.append(int(model(batch, kv)[0].argmax()))
        assert got == expected, prompt
        lengths.append(len(got))
    assert max(lengths) == NEW_TOKENS, lengths  # not a vacuous match on an early EOS


def test_chunked_prefill_matches_single(model: CausalLM, tokenizer: Any) -> None:
    ids = tokenizer(LONG).input_ids
    table = _table(len(ids))
    whole = _prefill(model, ids, table)
    chunked = _prefill(model, ids, table, chunk=7)
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-4)


def test_batched_sequences_match_alone(model: CausalLM, tokenizer: Any) -> None:
    short, long = tokenizer(PROMPTS[0]).input_ids, tokenizer(LONG).input_ids
    t_short, t_long = _table(len(short) + 1), _table(len(long) + 1, first=20)
    alone = [_prefill(model, short, t_short), _prefill(model, long, t_long)]
    kv = _cache(model)
    both = model(ForwardBatch.build([(short, 0, t_short), (long, 0, t_long)], BLOCK), kv)
    torch.testing.assert_close(both, torch.stack(alone), atol=1e-4, rtol=1e-4)
    # A mixed step: one sequence decodes while the other prefills a chunk after its prefix.
    nxt = [int(x) for x in both.argmax(-1)]
    kv2 = _cache(model)
    model(ForwardBatch.build([(long[:20], 0, t_long)], BLOCK), kv2)
    model(ForwardBatch.build([(short, 0, t_short)], BLOCK), kv2)
    mixed = model(ForwardBatch.build([([nxt[0]], len(short), t_short),
                                      (long[20:], 20, t_long)], BLOCK), kv2)
    solo = model(ForwardBatch.build([([nxt[0]], len(short), t_short)], BLOCK), kv)
    torch.testing.assert_close(mixed[0], solo[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mixed[1], alone[1], atol=1e-4, rtol=1e-4)


def test_scattered_blocks_match_contiguous(model: CausalLM, tokenizer: Any) -> None:
    ids = tokenizer(LONG).input_ids
    assert len(ids) > 3 * BLOCK
    contiguous = _table(len(ids))
    scattered = random.Random(0).sample(range(64), len(contiguous))
    assert scattered != sorted(scattered)
    expected = _prefill(model, ids, contiguous)
    torch.testing.assert_close(_prefill(model, ids, scattered), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_prefill(model, ids, scattered, chunk=7), expected,
                               atol=1e-4, rtol=1e-4)


TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=64)


@pytest.mark.parametrize("kind, extra", [
    ("qwen2", dict(tie_word_embeddings=True)),
    ("llama", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False)),
    ("llama", dict(rope_parameters=LLAMA3_ROPE)),
    ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
], ids=["qwen2-bias", "llama-bias-untied", "llama3-rope", "linear-rope"])
def test_family_variants_match_transformers(kind: str, extra: dict[str, Any],
                                            tmp_path: Path) -> None:
    """Tiny random Qwen2 / Llama variants saved by transformers load and give its logits."""
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(kind, **TINY, **extra)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if kind == "qwen2" or extra.get("attention_bias"):
        # Random init leaves biases at zero, which would not show a missing bias.
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                torch.nn.init.normal_(p, std=0.5)
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, TINY["vocab_size"], (1, 150), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = hf(ids).logits[0, -1]
    ours = CausalLM.from_dir(tmp_path, torch.float32)
    kv = KVCache.allocate(ours.config, 16, BLOCK, torch.float32)
    got = _prefill(ours, ids[0].tolist(), _table(150), chunk=40, kv=kv)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_unknown_rope_scaling_is_refused(tmp_path: Path) -> None:
    config = transformers.AutoConfig.for_model("llama", **TINY)
    config.save_pretrained(tmp_path)
    raw = (tmp_path / "config.json").read_text()
    (tmp_path / "config.json").write_text(raw.replace('"rope_type": "default"',
                                                      '"rope_type": "yarn", "factor": 4.0'))
    with pytest.raises(NotImplementedError, match="yarn"):
        CausalLM.from_dir(tmp_path)


def test_sharded_checkpoint_loads(tmp_path: Path) -> None:
    """A directory saved in several safetensors shards (with its index) loads whole."""
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model("llama", **TINY)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ids = torch.randint(0, TINY["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = hf(ids).logits[0, -1]
    ours = CausalLM.from_dir(tmp_path, torch.float32)
    kv = KVCache.allocate(ours.config, 8, BLOCK, torch.float32)
    torch.testing.assert_close(_prefill(ours, ids[0].tolist(), _table(40), kv=kv), expected,
                               atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(PackedLinear.plan(torch.bfloat16, torch.device("cpu")) is None,
                    reason="this PyTorch has no oneDNN (no packed linears)")
def test_packed_linears_as_accurate_as_plain(model: CausalLM, fp32_dir: Path,
                                             tokenizer: Any) -> None:
    """bfloat16 with oneDNN-packed linears (gate and up apart, silu fused into gate's
    matmul; multiplied natively or widened to float32, whichever this CPU does faster,
    single rows in bfloat16 where oneDNN supports it) is as close to float32 as plain
    bfloat16 is, and picks float32's greedy token wherever that is not a near tie:
    prefill, then decodes in a batch and alone (every model fed float32's tokens)."""
    plain = CausalLM.from_dir(fp32_dir, torch.bfloat16)
    packed = CausalLM.from_dir(fp32_dir, torch.bfloat16)
    assert packed.pack_linears() == 5 * packed.config.num_layers + 1  # qkv o gate up down
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
    # Single rows keep a bfloat16 weight only when the linears are widened and oneDNN
    # can pack bfloat16 at all (AVX-512 or AVX-NE-CONVERT); on an AVX2-only CPU packing
    # one fails, so there the alone-decodes below check the widened float32 path instead.
    widened = PackedLinear.plan(torch.bfloat16, torch.device("cpu")) == (torch.float32, 32)
    narrow = widened and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert {m.narrow is not None for m in packed.modules()
            if isinstance(m, PackedLinear)} == {narrow}
    models = (model, plain, packed)
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    tables = [_table(len(ids) + 10, first=8 * i) for i, ids in enumerate(prompts)]
    caches = [KVCache.allocate(model.config, 32, BLOCK, m.model.embed_tokens.weight.dtype)
              for m in models]
    batch = ForwardBatch.build([(ids, 0, t) for ids, t in zip(prompts, tables, strict=True)],
                               BLOCK)
    errors: dict[str, list[float]] = {"plain": [], "packed": []}
    for j in range(9):  # the prefill, five steps of all three together, three of one alone
        want, *rest = (m(batch, kv).float() for m, kv in zip(models, caches, strict=True))
        scale = want.abs().amax(-1)
        for name, got in zip(errors, rest, strict=True):
            errors[name].append(float(((got - want).abs().amax(-1) / scale).max()))
        top2 = want.topk(2, -1).values
        clear = (top2[:, 0] - top2[:, 1]) > 0.05 * scale
        assert torch.equal(rest[1].argmax(-1)[clear], want.argmax(-1)[clear]), j
        tokens = want.argmax(-1).tolist()
        decoding = prompts[:1] if j >= 5 else prompts  # a single row takes its own path
        batch = ForwardBatch.build([([tok], len(ids) + j, t) for tok, ids, t in zip(
            tokens, decoding, tables, strict=False)], BLOCK)
    assert max(errors["packed"]) < 1.5 * max(errors["plain"]), errors
