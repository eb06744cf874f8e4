"""Generation: cached greedy decoding == full recomputation, seeded sampling, filtering, EOS, limits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepsuite.generation.generate import generate
from deepsuite.generation.kv_cache import KVCache
from deepsuite.generation.sampling import filter_logits, sample_next_token
from deepsuite.generation.text import GenerationError, encode_prompt, generate_text
from deepsuite.models.gpt.config import GPTConfig
from deepsuite.models.gpt.model import GPT

ARGS = GPTConfig(vocab_size=97, max_seq_len=48, d_model=32, n_layers=2, n_heads=4, dropout=0.1)


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    m = GPT(ARGS)
    m.init_weights()
    with torch.no_grad():  # larger weights than the GPT-2 init so that logits are well separated
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m.train()


def greedy_without_cache(m: GPT, ids: torch.Tensor, n: int) -> torch.Tensor:
    m.eval()
    with torch.no_grad():
        for _ in range(n):
            logits = m(ids)  # full recomputation, no cache
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize(("batch", "prompt_len"), [(1, 1), (3, 5), (2, 17)])
def test_greedy_with_cache_equals_recomputation(model, batch, prompt_len):
    g = torch.Generator().manual_seed(batch * 100 + prompt_len)
    prompt = torch.randint(0, ARGS.vocab_size, (batch, prompt_len), generator=g)
    out = model.generate(prompt, max_new_tokens=12, temperature=0)
    assert model.training, "generate must restore the previous train/eval mode"
    assert out.shape == (batch, prompt_len + 12)
    assert torch.equal(out[:, :prompt_len], prompt)
    assert torch.equal(out, greedy_without_cache(model, prompt, 12))
    model.train()


def test_cached_logits_equal_full_forward(model):
    model.eval()
    ids = torch.randint(0, ARGS.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 20)
        parts = [model(ids[:, :7], cache=cache, start_pos=0)]
        parts += [model(ids[:, t : t + 1], cache=cache, start_pos=t) for t in range(7, 10)]
        parts.append(model(ids[:, 10:], cache=cache, start_pos=10))  # multi-token chunk after a prefix
    model.train()
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_seeded_sampling_is_reproducible(model):
    prompt = torch.randint(0, ARGS.vocab_size, (3, 4), generator=torch.Generator().manual_seed(2))

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return model.generate(prompt, 20, temperature=0.9, top_k=20, top_p=0.9, generator=g)

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_eos_stops_rows_and_pads():
    class Scripted(torch.nn.Module):
        """Row r emits token 5 (EOS) at step r, otherwise token 1."""

        args = GPTConfig(vocab_size=8, max_seq_len=32, d_model=4, n_layers=1, n_heads=1)

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.calls = 0

        def new_cache(self, batch_size, max_seq_len, device, dtype):
            return None

        def forward(self, input_ids, cache=None, start_pos=0):
            b, t = input_ids.shape
            step = start_pos + t - 3  # prompt length 3 -> step 0 after prefill
            logits = torch.zeros(b, t, 8)
            logits[:, -1, 1] = 1.0
            for r in range(b):
                if r == step:
                    logits[r, -1, 5] = 2.0
            self.calls += 1
            return logits

    m = Scripted()
    out = generate(m, torch.zeros(3, 3, dtype=torch.long), max_new_tokens=10, temperature=0, eos_token_id=5)
    assert out[:, 3:].tolist() == [[5, 5, 5], [1, 5, 5], [1, 1, 5]]
    assert m.calls == 3  # stopped as soon as every row was done


def test_length_limit_and_bad_arguments(model):
    prompt = torch.zeros(1, 40, dtype=torch.long)
    with pytest.raises(ValueError, match="max_seq_len=48"):
        model.generate(prompt, max_new_tokens=9)
    assert model.generate(prompt, max_new_tokens=8, temperature=0).shape == (1, 48)
    assert torch.equal(model.generate(prompt, 0), prompt)
    for kwargs in ({"temperature": -1.0}, {"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            model.generate(prompt[:, :2], 2, **kwargs)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 49, dtype=torch.long))


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    keep = lambda out: (out > float("-inf")).squeeze(0).tolist()  # noqa: E731
    assert keep(filter_logits(logits, top_k=2)) == [True, True, False, False, False]
    # cumulative 0.5, 0.7, 0.85: top_p=0.7 keeps the first two, 0.71 the first three
    assert keep(filter_logits(logits, top_p=0.7)) == [True, True, False, False, False]
    assert keep(filter_logits(logits, top_p=0.71)) == [True, True, True, False, False]
    assert keep(filter_logits(logits, top_p=0.3)) == [True, False, False, False, False]
    assert keep(filter_logits(logits, top_k=4, top_p=0.99)) == [True, True, True, True, False]
    shuffled = logits[:, [3, 0, 4, 2, 1]]
    assert keep(filter_logits(shuffled, top_p=0.7)) == [False, True, False, False, True]


def test_sample_next_token():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    assert sample_next_token(logits, temperature=0).tolist() == [1, 0]
    assert sample_next_token(logits, temperature=1.0, top_k=1).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next_token(logits, 1.0, generator=g) for _ in range(4000)])
    freq = (draws[:, 0] == 1).float().mean().item()
    expected = torch.softmax(logits[0], -1)[1].item()
    assert abs(freq - expected) < 0.03


def test_kv_cache_bounds():
    cache = KVCache(1, batch_size=2, n_heads=2, max_seq_len=4, head_dim=3)
    k = torch.ones(2, 2, 3, 3)
    kk, _ = cache.update(0, k, k, start_pos=0)
    assert kk.shape == (2, 2, 3, 3) and cache.length == 3
    with pytest.raises(ValueError, match="holds 4 positions"):
        cache.update(0, k, k, start_pos=2)
    with pytest.raises(ValueError, match="batch size 2"):
        cache.update(0, k[:1], k[:1], start_pos=0)


def test_generate_text_stops_at_the_end_of_the_document() -> None:
    """`generate_text` (the CLI and the end-of-training sample) ends at the tokenizer's EOS: what the
    model writes after it belongs to an unrelated next document."""
    from types import SimpleNamespace

    class Scripted(nn.Module):
        """Greedy output 7, EOS (2), then 7s forever."""

        def __init__(self) -> None:
            super().__init__()
            self.args = SimpleNamespace(max_seq_len=32)
            self.w = nn.Parameter(torch.zeros(1))

        def new_cache(self, batch_size, max_seq_len, device, dtype):
            return None

        def forward(self, input_ids, cache=None, start_pos=0):
            b, t = input_ids.shape
            logits = torch.zeros(b, t, 10)
            logits[:, -1, 2 if start_pos + t == 3 else 7] = 1.0  # prompt of 2 -> 7, then EOS, then 7s
            return logits

        def generate(self, input_ids, max_new_tokens, **kwargs):
            return generate(self, input_ids, max_new_tokens, **kwargs)

    class Tok:
        eos_id = 2

        def encode(self, text: str) -> list[int]:
            return [5, 6]

        def decode(self, ids) -> str:
            return " ".join(str(i) for i in ids if i != self.eos_id)

    assert generate_text(Scripted(), Tok(), "hi", 6, temperature=0.0) == "5 6 7"
    assert generate_text(Scripted(), Tok(), "hi", 6, temperature=0.0, stop_at_eos=False) == "5 6 7 7 7 7 7"


def test_encode_prompt_fits_the_request_to_the_model(model: GPT) -> None:
    """A request is shortened to what fits under max_seq_len (48); a prompt that leaves no room, ids
    outside the vocabulary (97) and speculative decoding without an MTP module are refused."""

    class Tok:
        eos_id = 0

        def __init__(self, n: int, top: int = 5) -> None:
            self.ids = [top] * n

        def encode(self, text: str) -> list[int]:
            return self.ids

    assert encode_prompt(model, Tok(10), "x", 8) == ([5] * 10, 8)
    assert encode_prompt(model, Tok(40), "x", 100) == ([5] * 40, 8)
    assert encode_prompt(model, Tok(0), "", 4) == ([0], 4)  # an empty prompt starts from EOS
    assert encode_prompt(model, Tok(48), "x", 0) == ([5] * 48, 0)
    with pytest.raises(GenerationError, match="is 48 tokens and the model's max_seq_len is 48"):
        encode_prompt(model, Tok(48), "x", 1)
    with pytest.raises(GenerationError, match="token id 97 but the model's vocab_size is 97"):
        encode_prompt(model, Tok(3, top=97), "x", 1)
    with pytest.raises(GenerationError, match="drafts with the MTP module, but this GPT has none"):
        encode_prompt(model, Tok(3), "x", 1, speculative=True)
