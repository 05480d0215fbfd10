"""merge_attention_states: merging states over disjoint key sets equals attention over their union."""

import math

import pytest
import torch

import oracle
from inductor_flex import AuxRequest, create_block_mask, flex_attention, merge_attention_states
from inductor_flex.reference import attention_reference
from inductor_flex.block_mask import full_block_mask


def _state(q, k, v, mask_mod=None):
    """(out, lse) of plain attention of q over k/v in float64 (the reference), scale 1/sqrt(E)."""
    L, S = q.size(-2), k.size(-2)
    fields = (create_block_mask(mask_mod, None, None, L, S, device="cpu", BLOCK_SIZE=16) if mask_mod
              else full_block_mask(L, S, device="cpu")).as_tuple()
    out, lse, _ = attention_reference(q, k, v, lambda s, b, h, m, n: s, fields, 1.0 / math.sqrt(q.size(-1)))
    return out, lse


@pytest.mark.parametrize("pieces", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merging_pieces_equals_attention_over_the_concatenation(pieces, dtype):
    """Merged pieces vs the float64 oracle: no worse than 2× attention over the whole in the same dtype."""
    B, H, L, S, E, Ev = 2, 3, 5, 301, 16, 80
    q, k, v = (torch.randn(B, H, n, d).to(dtype) for n, d in ((L, E), (S, E), (S, Ev)))
    gold_out, gold_lse = _state(q.double(), k.double(), v.double())
    whole_out, whole_lse = _state(q, k, v)
    cuts = sorted(torch.randperm(S - 1)[: pieces - 1].add(1).tolist())
    bounds = list(zip([0, *cuts], [*cuts, S]))
    states = [_state(q, k[..., a:b, :], v[..., a:b, :]) for a, b in bounds]
    out, lse = merge_attention_states([s[0] for s in states], [s[1] for s in states])
    assert out.dtype == dtype and lse.dtype == torch.float32
    oracle.assert_within("merged out", out, gold_out, whole_out)
    oracle.assert_within("merged lse", lse, gold_lse, whole_lse)


def test_float64_states_merge_exactly():
    q, k, v = (torch.randn(1, 2, 4, 16, dtype=torch.float64) for _ in range(3))
    k2, v2 = torch.randn(1, 2, 7, 16, dtype=torch.float64), torch.randn(1, 2, 7, 16, dtype=torch.float64)
    gold = _state(q, torch.cat([k, k2], 2), torch.cat([v, v2], 2))
    out, lse = merge_attention_states(*zip(_state(q, k, v), _state(q, k2, v2)))
    assert lse.dtype == torch.float64
    torch.testing.assert_close(out, gold[0], atol=1e-13, rtol=1e-13)
    torch.testing.assert_close(lse, gold[1], atol=1e-13, rtol=1e-13)


def test_empty_states_weigh_nothing_and_empty_rows_stay_zero():
    out1, lse1 = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3)
    out2 = torch.full((1, 2, 3, 8), float("nan"))  # whatever an empty state holds is ignored
    lse2 = torch.full((1, 2, 3), float("-inf"))
    out, lse = merge_attention_states([out1, out2], [lse1, lse2])
    torch.testing.assert_close(out, out1)
    torch.testing.assert_close(lse, lse1)

    empty_out, empty_lse = merge_attention_states([torch.zeros(2, 4), torch.zeros(2, 4)],
                                                  [torch.full((2,), -math.inf), torch.full((2,), -math.inf)])
    assert torch.all(empty_out == 0) and not empty_out.isnan().any()
    assert torch.all(empty_lse == -math.inf)


def test_masked_rows_from_flex_attention_merge_without_nan():
    """Two flex_attention states with some rows empty in one, in both, or in neither."""

    def even_rows(b, h, q_idx, kv_idx):
        return q_idx % 2 == 0

    def first_rows(b, h, q_idx, kv_idx):
        return q_idx < 2

    q = torch.randn(1, 2, 6, 16)
    k1, v1, k2, v2 = (torch.randn(1, 2, 20, 16) for _ in range(4))
    aux = AuxRequest(lse=True)
    m1 = create_block_mask(even_rows, None, None, 6, 20, device="cpu", BLOCK_SIZE=16)
    m2 = create_block_mask(first_rows, None, None, 6, 20, device="cpu", BLOCK_SIZE=16)
    o1, a1 = flex_attention(q, k1, v1, block_mask=m1, return_aux=aux)
    o2, a2 = flex_attention(q, k2, v2, block_mask=m2, return_aux=aux)
    out, lse = merge_attention_states([o1, o2], [a1.lse, a2.lse])
    assert not out.isnan().any()
    empty = torch.tensor([False, False, False, True, False, True])  # odd rows >= 2: empty in both
    assert torch.all(out[:, :, empty] == 0) and torch.all(lse[:, :, empty] == -math.inf)

    def union(b, h, q_idx, kv_idx):  # over the concatenation: first half by m1's rule, second by m2's
        return torch.where(kv_idx < 20, q_idx % 2 == 0, q_idx < 2)

    gold = flex_attention(q.double(), torch.cat([k1, k2], 2).double(), torch.cat([v1, v2], 2).double(),
                          block_mask=create_block_mask(union, None, None, 6, 40, device="cpu", BLOCK_SIZE=16),
                          return_aux=aux)
    torch.testing.assert_close(out.double(), gold[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), gold[1].lse, atol=1e-5, rtol=1e-5)


def test_shared_prefix_broadcasts_over_the_batch():
    """Cascade decoding: one prefix KV (batch 1) for every sequence, plus each sequence's own suffix."""
    B, H, L, P, S, E = 4, 2, 1, 50, 13, 16
    q = torch.randn(B, H, L, E, dtype=torch.float64)
    prefix_k, prefix_v = torch.randn(1, H, P, E, dtype=torch.float64), torch.randn(1, H, P, E, dtype=torch.float64)
    own_k, own_v = torch.randn(B, H, S, E, dtype=torch.float64), torch.randn(B, H, S, E, dtype=torch.float64)
    prefix = _state(q, prefix_k, prefix_v)
    own = _state(q, own_k, own_v)
    out, lse = merge_attention_states([prefix[0], own[0]], [prefix[1], own[1]])
    gold = _state(q, torch.cat([prefix_k.expand(B, -1, -1, -1), own_k], 2),
                  torch.cat([prefix_v.expand(B, -1, -1, -1), own_v], 2))
    torch.testing.assert_close(out, gold[0])
    torch.testing.assert_close(lse, gold[1])


def test_states_with_a_batch_of_one_broadcast():
    out1, lse1 = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3)
    out2, lse2 = torch.randn(4, 2, 3, 8), torch.randn(4, 2, 3)
    out, lse = merge_attention_states([out1, out2], [lse1, lse2])
    assert out.shape == (4, 2, 3, 8) and lse.shape == (4, 2, 3)
    w1 = torch.sigmoid(lse1 - lse2).unsqueeze(-1)
    torch.testing.assert_close(out, w1 * out1 + (1 - w1) * out2)


def test_works_under_torch_compile():
    outs = [torch.randn(2, 2, 3, 8) for _ in range(3)]
    lses = [torch.randn(2, 2, 3) for _ in range(3)]
    lses[1][0, 0, 0] = -math.inf
    compiled = torch.compile(merge_attention_states, fullgraph=True)
    out, lse = compiled(outs, lses)
    eager = merge_attention_states(outs, lses)
    torch.testing.assert_close(out, eager[0])
    torch.testing.assert_close(lse, eager[1])


@pytest.mark.parametrize(
    "outputs,lses,error,match",
    [
        ([], [], ValueError, "at least one"),
        ([torch.zeros(2, 4)], [torch.zeros(2), torch.zeros(2)], ValueError, "one lse per output"),
        ([torch.zeros(2, 4)], [torch.zeros(4)], ValueError, "without its last"),
        ([torch.zeros(2, 4), torch.zeros(3, 4)], [torch.zeros(2), torch.zeros(3)], ValueError, "do not broadcast"),
        ([torch.zeros(2, 4), torch.zeros(2, 5)], [torch.zeros(2), torch.zeros(2)], ValueError, "do not broadcast"),
        ([torch.zeros(2, 4, dtype=torch.int64)], [torch.zeros(2)], TypeError, "floating point"),
        ([torch.zeros(2, 4)], ["lse"], TypeError, "must be tensors"),
        (torch.zeros(2, 2, 4), torch.zeros(2, 2), TypeError, "sequences of tensors"),
    ],
    ids=["none", "count", "lse-shape", "batch", "value-dim", "int", "not-tensor", "stacked"],
)
def test_bad_inputs_raise_clear_errors(outputs, lses, error, match):
    with pytest.raises(error, match=match):
        merge_attention_states(outputs, lses)
