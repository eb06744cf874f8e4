"""LM heads: projections, weight tying, MTP sharing, the vocab-split head, meta-device init."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepsuite.heads import LM_IGNORE_INDEX, CombinedLMHead, LMHead, MTPHead, SplitLanguageModellingHead

D, V = 8, 19


def test_ignore_index():
    assert LM_IGNORE_INDEX == -100


@pytest.mark.parametrize("bias", [False, True])
def test_lm_head_forward_and_loss(bias):
    torch.manual_seed(0)
    head = LMHead(D, V, bias=bias).double()
    if bias:
        nn.init.normal_(head.bias)
    assert head.weight.shape == (V, D)
    hidden = torch.randn(2, 5, D, dtype=torch.float64)
    torch.testing.assert_close(head(hidden), hidden @ head.weight.T + (head.bias if bias else 0))
    labels = torch.randint(0, V, (2, 5))
    labels[1, 2] = LM_IGNORE_INDEX
    expected = F.cross_entropy(head(hidden).flatten(0, 1), labels.flatten(), label_smoothing=0.1)
    for backend in ("chunked", "naive"):
        loss = head.loss(hidden, labels, backend=backend, chunk_size=3, label_smoothing=0.1)
        torch.testing.assert_close(loss, expected)


def test_lm_head_tying_shares_storage_and_grads():
    embedding = nn.Embedding(V, D)
    head = LMHead(D, V, tie_weights=True)
    head.tie_embedding_weights(embedding)
    assert head.weight is embedding.weight
    assert head.weight.data_ptr() == embedding.weight.data_ptr()
    assert head.is_tied
    # both uses of the one parameter contribute to its gradient
    ids = torch.tensor([[1, 2, 3]])
    head(embedding(ids)).sum().backward()
    assert embedding.weight.grad is not None
    # named_parameters lists the shared weight once
    model = nn.ModuleDict({"embedding": embedding, "head": head})
    assert len(list(model.parameters())) == 1
    with pytest.raises(ValueError, match="cannot tie"):
        LMHead(D, V + 1).tie_embedding_weights(embedding)


def test_meta_build_to_empty_init_weights_reties():
    with torch.device("meta"):
        embedding = nn.Embedding(V, D)
        head = CombinedLMHead(D, V, mtp_depth=2, tie_weights=True)
        head.tie_embedding_weights(embedding)
        split = SplitLanguageModellingHead({"a": 5, "b": 7}, ["b", "a"], D)
        own_mtp = MTPHead(D, V, mtp_depth=2)
        model = nn.ModuleDict({"embedding": embedding, "head": head, "split": split, "mtp": own_mtp})
    model.to_empty(device="cpu")
    for module in (head, split, own_mtp):
        module.init_weights()
    nn.init.normal_(embedding.weight)
    assert head.lm_head.weight is embedding.weight
    assert head.mtp_head is not None and head.mtp_head.head(2).weight is embedding.weight
    for p in (*split.parameters(), *own_mtp.parameters()):
        assert p.device.type == "cpu" and torch.isfinite(p).all()
        assert 0.005 < p.std().item() < 0.05  # normal(0, 0.02)


def test_mtp_head_shared_and_own():
    main = LMHead(D, V)
    shared = MTPHead(D, V, mtp_depth=2, shared_head=main)
    assert list(shared.parameters()) == []  # held by reference, not registered
    hidden = [torch.randn(2, 5 - k, D) for k in (1, 2)]
    out = shared(hidden)
    assert [o.shape for o in out] == [(2, 4, V), (2, 3, V)]
    for h, o in zip(hidden, out):
        torch.testing.assert_close(o, main(h))
    own = MTPHead(D, V, mtp_depth=2)
    assert len(list(own.parameters())) == 2
    assert not torch.equal(own.head(1).weight, own.head(2).weight)
    with pytest.raises(ValueError, match="expected 2 hidden states"):
        own(hidden[:1])
    with pytest.raises(ValueError, match="shared_head"):
        MTPHead(D + 1, V, shared_head=main)


def test_combined_head_train_and_eval():
    head = CombinedLMHead(D, V, use_mtp=True, mtp_depth=1)
    hidden = torch.randn(2, 6, D)
    mtp_hidden = [hidden[:, :-1]]
    main_logits, mtp_logits = head(hidden, mtp_hidden)
    torch.testing.assert_close(main_logits, hidden @ head.weight.T)
    assert mtp_logits is not None and mtp_logits[0].shape == (2, 5, V)
    torch.testing.assert_close(mtp_logits[0], main_logits[:, :-1])  # shared output head
    assert head(hidden, None)[1] is None
    head.eval()
    assert head(hidden, mtp_hidden)[1] is None
    head.train()
    assert CombinedLMHead(D, V, use_mtp=False)(hidden, mtp_hidden)[1] is None
    assert list(dict(head.named_parameters())) == ["lm_head.weight"]


def test_split_head_matches_concatenated_linear():
    torch.manual_seed(0)
    sizes = {"regular": 13, "special": 4, "image": 6}
    order = ["special", "regular", "image"]
    split = SplitLanguageModellingHead(sizes, order, D).double()
    split.loss_chunk_size = 5
    assert split.vocab_size == 23
    reference = nn.Linear(D, 23, bias=False).double()
    with torch.no_grad():
        reference.weight.copy_(torch.cat([split.lm_head[name].weight for name in order]))

    hidden = torch.randn(3, 4, D, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 23, (3, 4))
    labels[0, 0] = labels[2, 3] = LM_IGNORE_INDEX
    loss = split(hidden, labels)
    assert loss.shape == (3, 4)
    assert loss[0, 0] == 0 and loss[2, 3] == 0
    hidden_ref = hidden.detach().clone().requires_grad_()
    expected = F.cross_entropy(
        reference(hidden_ref).flatten(0, 1), labels.flatten(), reduction="none", ignore_index=LM_IGNORE_INDEX
    ).view(3, 4)
    torch.testing.assert_close(loss, expected)

    upstream = torch.randn(3, 4, dtype=torch.float64)
    loss.backward(upstream)
    expected.backward(upstream)
    torch.testing.assert_close(hidden.grad, hidden_ref.grad)
    start = 0
    for name in order:
        n = sizes[name]
        torch.testing.assert_close(split.lm_head[name].weight.grad, reference.weight.grad[start : start + n])
        start += n


def test_split_head_validates_order():
    with pytest.raises(ValueError, match=r"missing from split_order: \['image'\]"):
        SplitLanguageModellingHead({"regular": 3, "image": 2}, ["regular"], D)
    with pytest.raises(ValueError, match=r"not in split_vocab_size: \['audio'\]"):
        SplitLanguageModellingHead({"regular": 3}, ["regular", "audio"], D)
    with pytest.raises(ValueError, match=r"repeated: \['regular'\]"):
        SplitLanguageModellingHead({"regular": 3}, ["regular", "regular"], D)
    with pytest.raises(ValueError, match=">= 1"):
        SplitLanguageModellingHead({"regular": 0}, ["regular"], D)
