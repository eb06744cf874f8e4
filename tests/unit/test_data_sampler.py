"""The training sampler: deterministic, resumable, the same global batch whatever the rank split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deepsuite.data import DataError, TokenShards, WindowSampler, eval_starts, rank_slice, windows_batch


def fake_shards(folder: Path, sizes: list[int], vocab: int = 1000) -> TokenShards:
    """A prepared-data folder whose token i is i % vocab, split into shards of `sizes`."""
    folder.mkdir(parents=True, exist_ok=True)
    shards, start = [], 0
    for k, n in enumerate(sizes):
        np.arange(start, start + n, dtype=np.uint16).__imod__(vocab).tofile(folder / f"train_{k:03d}.bin")
        shards.append({"file": f"train_{k:03d}.bin", "tokens": n})
        start += n
    meta = {
        "format": 1,
        "vocab_size": vocab,
        "dtype": "uint16",
        "tokenizer": "tokenizer.model",
        "splits": {"train": {"tokens": start, "documents": 1, "shards": shards}},
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    return TokenShards(folder, "train")


@pytest.fixture
def shards(tmp_path: Path) -> TokenShards:
    return fake_shards(tmp_path, [500, 300, 237])


def test_same_seed_same_order_other_seed_other_order(shards: TokenShards) -> None:
    a = WindowSampler(shards, seq_len=16, seed=3).next_starts(40)
    b = WindowSampler(shards, seq_len=16, seed=3).next_starts(40)
    c = WindowSampler(shards, seq_len=16, seed=4).next_starts(40)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_each_epoch_visits_every_window_once(shards: TokenShards) -> None:
    s = WindowSampler(shards, seq_len=16, seed=0)
    n = s.n_windows
    assert n == (len(shards) - 16) // 16
    first = s.next_starts(n)
    assert {k: s.state_dict()[k] for k in ("epoch", "index")} == {"epoch": 1, "index": 0}
    offset = int(first.min() % 16)
    assert sorted(first.tolist()) == [offset + 16 * i for i in range(n)]
    assert int(first.max()) + 17 <= len(shards)
    second = s.next_starts(n)
    assert not np.array_equal(first, second)  # a new order (and offset) each epoch


def test_resume_from_state_continues_exactly(shards: TokenShards) -> None:
    full = WindowSampler(shards, seq_len=8, seed=1)
    expected = full.next_starts(300)  # crosses several epochs
    part = WindowSampler(shards, seq_len=8, seed=1)
    head = part.next_starts(137)
    state = json.loads(json.dumps(part.state_dict()))  # what a checkpoint stores
    resumed = WindowSampler(shards, seq_len=8, seed=1)
    resumed.load_state_dict(state)
    np.testing.assert_array_equal(np.concatenate([head, resumed.next_starts(163)]), expected)


def test_global_batch_is_independent_of_the_rank_split(shards: TokenShards) -> None:
    starts = WindowSampler(shards, seq_len=8, seed=2).next_starts(12)
    for world in (1, 2, 3, 4, 6):
        parts = [rank_slice(starts, r, world) for r in range(world)]
        np.testing.assert_array_equal(np.concatenate(parts), starts)
    with pytest.raises(ValueError, match="does not split"):
        rank_slice(starts, 0, 5)


def test_windows_are_aligned_inputs_and_labels(shards: TokenShards) -> None:
    starts = np.array([0, 490, 795, len(shards) - 9])  # two windows cross shard boundaries
    inputs, labels = windows_batch(shards, starts, 8)
    assert inputs.shape == labels.shape == (4, 8) and inputs.dtype == torch.int64
    torch.testing.assert_close(labels[:, :-1], inputs[:, 1:])
    expected = torch.tensor([(int(s) + t) % 1000 for s in starts for t in range(9)]).view(4, 9)
    torch.testing.assert_close(inputs, expected[:, :-1])
    torch.testing.assert_close(labels, expected[:, 1:])


def test_bad_state_and_too_little_data(shards: TokenShards, tmp_path: Path) -> None:
    s = WindowSampler(shards, seq_len=8, seed=0)
    with pytest.raises(DataError, match="does not fit this data"):
        s.load_state_dict({"epoch": 0, "index": 10_000})
    small = fake_shards(tmp_path / "small", [20])
    with pytest.raises(DataError, match=r"fewer than 2 × training\.seq_len"):
        WindowSampler(small, seq_len=16, seed=0)


def test_state_records_what_the_position_is_relative_to(shards: TokenShards) -> None:
    s = WindowSampler(shards, seq_len=8, seed=5)
    s.next_starts(3)
    state = s.state_dict()
    assert state["epoch"] == 0 and state["index"] == 3
    assert state["seq_len"] == 8 and state["seed"] == 5 and state["tokens"] == len(shards)
    assert state["data"] == WindowSampler(shards, seq_len=16, seed=0).data_fingerprint()


@pytest.mark.parametrize(
    ("seq_len", "seed", "message"),
    [
        (16, 1, r"trained with training.seq_len=8 but the config has training.seq_len=16"),
        (7, 1, r"trained with training.seq_len=8 but the config has training.seq_len=7"),
        (8, 2, r"trained with data.seed=1 but the config has data.seed=2"),
    ],
)
def test_resume_with_another_window_order_is_refused(
    shards: TokenShards, seq_len: int, seed: int, message: str
) -> None:
    """Another seq_len or seed gives another window order: the saved position would silently point
    into it (index 3 is valid for both), so loading is refused with the setting and the fix."""
    state = json.loads(json.dumps(WindowSampler(shards, seq_len=8, seed=1).state_dict()))
    state["index"] = 3
    other = WindowSampler(shards, seq_len=seq_len, seed=seed)
    with pytest.raises(DataError, match=message + r".*original value.*checkpoint.init_from"):
        other.load_state_dict(state)
    assert other.state_dict()["index"] == 0  # nothing loaded


def test_resume_on_other_data_is_refused(shards: TokenShards, tmp_path: Path) -> None:
    state = WindowSampler(shards, seq_len=8, seed=1).state_dict()
    same_size = fake_shards(tmp_path / "same_size", [537, 500])  # same token count, other shards
    bigger = fake_shards(tmp_path / "bigger", [500, 300, 400])
    for data in (same_size, bigger):
        with pytest.raises(
            DataError, match=r"trained on other data \(1,037 train tokens.*point data.out_dir"
        ):
            WindowSampler(data, seq_len=8, seed=1).load_state_dict(state)
    copy = fake_shards(tmp_path / "copy", [500, 300, 237])  # the same data in another folder
    WindowSampler(copy, seq_len=8, seed=1).load_state_dict(state)


def test_old_state_without_the_new_fields_still_loads(shards: TokenShards) -> None:
    s = WindowSampler(shards, seq_len=16, seed=9)
    s.load_state_dict({"epoch": 2, "index": 5})
    assert (s.epoch, s.index) == (2, 5)


def test_eval_windows_are_fixed_and_spread(shards: TokenShards) -> None:
    a = eval_starts(shards, 16, 5)
    np.testing.assert_array_equal(a, eval_starts(shards, 16, 5))
    assert a[0] == 0 and a[-1] == len(shards) - 17 and np.all(np.diff(a) > 0)
