"""Running a catalogue variant through inductor_flex and through the float64 oracle.

The oracle is ``reference.attention_reference`` on float64 copies of every input (captured
buffers included), differentiated by plain torch autograd: independent of our operators,
joint graph and backward implementation. The *same-dtype eager error* is the same reference
run in the test dtype; an implementation passes when its error is at most twice that (plus a
floor of a few units of round-off) and it holds no NaN.
"""

import math

import torch

from inductor_flex import AuxRequest, create_block_mask, flex_attention
from inductor_flex.block_mask import full_block_mask
from inductor_flex.reference import attention_reference

MODES = {
    "eager": flex_attention,
    "aot_eager": torch.compile(flex_attention, backend="aot_eager", fullgraph=True),
    "inductor": torch.compile(flex_attention, fullgraph=True),
}


def max_error(actual, gold):
    return (actual.double() - gold.double()).abs().max().item() if actual.numel() else 0.0


def assert_within(name, actual, gold, baseline, factor=2.0, terms_per_element=1, accumulated_terms=0,
                  modelled_round_off=0.0):
    """actual's error vs gold is at most ``factor`` × baseline's error (plus round-off floor).

    ``terms_per_element``: how many products each element sums (a captured buffer's gradient
    sums over every position that reads it); the round-off floor grows with its square root.
    ``accumulated_terms``: how many terms a kernel sums in its float32 (float64) accumulator
    before the one rounding to actual's dtype; adds that accumulator's round-off, which only
    matters when actual is itself float32 (float64).
    ``modelled_round_off``: an absolute allowance for a round-off source the caller models
    (and explains), added to the floor.
    """
    assert actual.shape == gold.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(gold.shape)}"
    assert not torch.isnan(actual).any(), f"{name}: NaN"
    finite = torch.isfinite(gold)
    # NaN in the oracle's gradients is eager autograd's 0 × inf (a score_mod output of -inf
    # scaled by a learnable tensor); our kernels give such positions no gradient, so there
    # actual must merely be finite (test_edge_cases checks the value with a finite stand-in).
    undefined = torch.isnan(gold)
    assert torch.equal(torch.isfinite(actual) & ~undefined, finite), f"{name}: infinities differ from the oracle"
    actual, gold, baseline = actual[finite], gold[finite], baseline[finite]
    # A few units of round-off of actual's dtype at the result's magnitude. In float64 the
    # same-dtype eager run *is* the oracle (error 0), so only this floor remains: it allows for
    # a different summation order over a few hundred terms.
    ulps = 64 if actual.dtype == torch.float64 else 4
    magnitude = max(1.0, gold.abs().max().item() if gold.numel() else 1.0)
    accumulator = torch.float64 if actual.dtype == torch.float64 else torch.float32
    floor = ulps * magnitude * (torch.finfo(actual.dtype).eps * math.sqrt(terms_per_element)
                                + torch.finfo(accumulator).eps * math.sqrt(accumulated_terms))
    floor += modelled_round_off
    assert math.isfinite(floor), f"{name}: the round-off floor is {floor} (a bug of the test's model, not of the kernel)"
    err, base = max_error(actual, gold), max_error(baseline, gold)
    assert err <= factor * base + floor, f"{name}: error {err:.3e} > {factor} × eager error {base:.3e}"


def _gold_copies(tensors):
    copies = {}
    for name, t in tensors.items():
        if t.is_floating_point():
            copies[name] = t.detach().double().requires_grad_(t.requires_grad)
        else:
            copies[name] = t
    return copies


def _same_dtype_copies(tensors):
    return {name: t.detach().clone().requires_grad_(t.requires_grad) for name, t in tensors.items()}


def _reference_run(variant, inputs, buffers, block_mask_fields, scale, grad_out, grad_lse):
    """Reference forward + autograd backward over ``inputs`` (q, k, v) and ``buffers``."""
    score_mod, mask_mod = variant.build(buffers)
    fields = block_mask_fields[:-1] + (mask_mod or block_mask_fields[-1],)
    out, lse, _ = attention_reference(
        inputs["q"], inputs["k"], inputs["v"], score_mod or (lambda s, b, h, q, k: s), fields, scale
    )
    differentiable = [t for t in (*inputs.values(), *buffers.values()) if t.requires_grad]
    if not differentiable:
        return out, lse, {}
    loss = (out.double() * grad_out.double()).sum() + (torch.where(torch.isfinite(lse), lse, 0).double() * grad_lse).sum()
    grads = torch.autograd.grad(loss, differentiable, allow_unused=True)
    named = [n for n, t in (*inputs.items(), *buffers.items()) if t.requires_grad]
    return out, lse, dict(zip(named, grads))


def gold_and_baseline(variant, inputs, buffers, fields, scale, grad_out, grad_lse):
    """The reference run in float64 (the oracle) and in the inputs' own dtype (the baseline whose
    error the kernels may double): each ``(out, lse, grads)``."""
    gold = _reference_run(variant, _gold_copies(inputs), _gold_copies(buffers), fields, scale, grad_out, grad_lse)
    baseline = _reference_run(variant, _same_dtype_copies(inputs), _same_dtype_copies(buffers), fields, scale,
                              grad_out, grad_lse)
    return gold, baseline


def make_case(variant, *, B, Hq, Hkv, L, S, E, Ev, dtype, device, backward):
    """Fresh random captured buffers (learnable ones requiring grad) and q, k, v for a case."""
    buffers = variant.make_buffers(B, Hq, L, S, device)
    for name in variant.learnable:
        buffers[name].requires_grad_(backward)
    inputs = {
        "q": torch.randn(B, Hq, L, E, device=device, dtype=dtype, requires_grad=backward),
        "k": torch.randn(B, Hkv, S, E, device=device, dtype=dtype, requires_grad=backward),
        "v": torch.randn(B, Hkv, S, Ev, device=device, dtype=dtype, requires_grad=backward),
    }
    return buffers, inputs


def run_variant(variant, *, B=2, Hq=4, Hkv=2, L=67, S=67, E=16, Ev=16, dtype=torch.float32,
                mode="eager", block_size=16, device="cpu", backward=True, check_torch=False):
    """Run one case through ``mode`` and assert forward (out, lse) and gradients against the oracle."""
    return check_call(MODES[mode], variant, B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, E=E, Ev=Ev, dtype=dtype,
                      device=device, block_size=block_size, mask_heads=Hq, backward=backward,
                      check_torch=check_torch, label=f"{variant.name}[{mode}]")


def _check_against_torch(variant, inputs, buffers, B, Hq, L, S, block_size, out, lse, gold_out, gold_lse):
    """torch's own flex_attention on the same inputs: we must be at least as accurate (within 2×)."""
    from torch.nn.attention import flex_attention as torch_flex

    detached = {n: t.detach() for n, t in buffers.items()}
    score_mod, mask_mod = variant.build(detached)
    torch_mask = (
        torch_flex.create_block_mask(mask_mod, B, Hq, L, S, device=out.device.type, BLOCK_SIZE=block_size)
        if mask_mod else None
    )
    q, k, v = (inputs[n].detach() for n in "qkv")
    torch_out, torch_aux = torch_flex.flex_attention(
        q, k, v, score_mod=score_mod, block_mask=torch_mask, enable_gqa=q.size(1) != k.size(1),
        return_aux=torch_flex.AuxRequest(lse=True),
    )
    assert_within(f"{variant.name} out vs torch", out.detach(), gold_out.detach(), torch_out)
    assert_within(f"{variant.name} lse vs torch", lse.detach(), gold_lse.detach(), torch_aux.lse)


def check_call(compiled, variant, *, B, Hq, Hkv, L, S, E, dtype, device, block_size, Ev=None, mask_heads=None,
               backward=True, check_torch=False, label=None):
    """One call of ``compiled`` (flex_attention's signature) on fresh data, and its outputs and
    gradients asserted against the float64 oracle. The block mask has ``mask_heads`` heads
    (None: one, broadcast over the query heads)."""
    Ev = E if Ev is None else Ev
    buffers, inputs = make_case(variant, B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, E=E, Ev=Ev, dtype=dtype,
                                device=device, backward=backward)
    score_mod, mask_mod = variant.build(buffers)
    block_mask = (
        create_block_mask(mask_mod, B, mask_heads, L, S, device=device, BLOCK_SIZE=block_size) if mask_mod else None
    )
    out, aux = compiled(inputs["q"], inputs["k"], inputs["v"], score_mod=score_mod, block_mask=block_mask,
                        enable_gqa=Hq != Hkv, return_aux=AuxRequest(lse=True))
    grad_out = torch.randn_like(out)
    grad_lse = torch.randn_like(aux.lse, dtype=torch.float64) * 0.1
    ours = {}
    if backward:
        finite_lse = torch.where(torch.isfinite(aux.lse), aux.lse, 0).double()
        loss = (out.double() * grad_out.double()).sum() + (finite_lse * grad_lse).sum()
        differentiable = {n: t for n, t in (*inputs.items(), *buffers.items()) if t.requires_grad}
        ours = dict(zip(differentiable, torch.autograd.grad(loss, list(differentiable.values()))))

    fields = (block_mask or full_block_mask(L, S, device=device)).as_tuple()
    scale = 1.0 / math.sqrt(E)
    (gold_out, gold_lse, gold_grads), (base_out, base_lse, base_grads) = gold_and_baseline(
        variant, inputs, buffers, fields, scale, grad_out, grad_lse)
    label = label or f"{variant.name} B={B} L={L} S={S}"
    # Each output element sums S products, each dq element S, each dk/dv element the L queries
    # of every head in its group, in a float32 accumulator: the round-off floor counts them
    # (float32 kernels that tile these sums unlike eager's BLAS land at 2-3x its few-ulp error).
    assert_within(f"{label} out", out, gold_out, base_out, accumulated_terms=S)
    assert_within(f"{label} lse", aux.lse, gold_lse, base_lse)
    positions = B * Hq * L * S
    summed = {"q": S, "k": L * (Hq // Hkv), "v": L * (Hq // Hkv)}
    for name, grad in ours.items():
        if name in buffers:
            # Each term is dS = P·(dP − Σ dO·O), and O came out of an S-term float32 accumulator.
            assert_within(f"{label} d{name}", grad, gold_grads[name], base_grads[name],
                          terms_per_element=positions // grad.numel(), accumulated_terms=S)
        else:
            assert_within(f"{label} d{name}", grad, gold_grads[name], base_grads[name], accumulated_terms=summed[name])
    if check_torch:
        _check_against_torch(variant, inputs, buffers, B, Hq, L, S, block_size, out, aux.lse, gold_out, gold_lse)
    return out


def check_captures_computed_in_the_graph(device, dtype, B=2, H=4, L=75, S=75, E=16, zero_dim_weight=True):
    """Captured tensors computed inside the compiled function from learnable leaves
    (``slopes = raw * raw / 2``, a 0-d ``weight = raw_w / 4 + 1``; plain arithmetic, which Triton's
    interpreter can run): the leaves get their gradients, checked against the same function run
    eagerly in float64 (and in ``dtype``, the baseline). ``zero_dim_weight=False``: the weight
    is a 1-element tensor read at [0] (Triton's interpreter harness cannot pass a 0-d CPU tensor
    to our kernels, see test_backward_interpreter.py)."""

    def attention(q, k, v, raw_slopes, raw_weight, flex):
        slopes, weight = raw_slopes * raw_slopes * 0.5, raw_weight * 0.25 + 1.0

        def score_mod(score, b, h, q_idx, kv_idx):
            return score * (weight if zero_dim_weight else weight[0]) + slopes[h] * (kv_idx - q_idx)

        return flex(q, k, v, score_mod=score_mod)

    leaves = {"q": torch.randn(B, H, L, E), "k": torch.randn(B, H, S, E), "v": torch.randn(B, H, S, E),
              "raw_slopes": torch.rand(H) * 0.4 + 0.1, "raw_weight": torch.randn(() if zero_dim_weight else (1,))}
    grad_out = torch.randn(B, H, L, E, dtype=torch.float64, device=device)

    def run(fn, cast, flex):
        tensors = [t.to(device=device, dtype=cast(t)).requires_grad_() for t in leaves.values()]
        out = fn(*tensors, flex)
        return out, torch.autograd.grad((out.double() * grad_out).sum(), tensors)

    in_dtype = lambda t: dtype if t.dim() == 4 else torch.float32  # noqa: E731 (learnable leaves stay float32)
    out, grads = run(torch.compile(attention, fullgraph=True), in_dtype, flex_attention)
    gold_out, gold_grads = run(attention, lambda t: torch.float64, flex_attention)
    base_out, base_grads = run(attention, in_dtype, flex_attention)
    assert_within("out", out, gold_out, base_out, accumulated_terms=S)
    for name, grad, gold, base in zip(leaves, grads, gold_grads, base_grads):
        assert grad is not None, f"d{name}: no gradient"
        assert_within(f"d{name}", grad, gold, base, terms_per_element=B * H * L * S // grad.numel(),
                      accumulated_terms=S)


def check_chained_reads(attend, device, dtype=torch.float32, B=2, H=2, L=40, S=33, E=16):
    """Learnable tensors read through chained indexing (``pair[q_idx][kv_idx]``,
    ``table[b][h][q_idx]``, one row ``heads[h]`` read at two positions), by ``attend`` (a
    flex_attention, eager or compiled), against dense float64 attention with the same biases.
    The reference's vmap cannot differentiate chained reads, hence the dense gold; the baseline
    is the dense computation in ``dtype``."""

    def score_mod_of(pair, table, heads):
        def chained(score, b, h, q_idx, kv_idx):
            return (score + pair[q_idx][kv_idx] + table[b][h][q_idx] + 0.5 * table[b, h][kv_idx % L]
                    + heads[h][q_idx] - heads[h][kv_idx])
        return chained

    def dense_bias(pair, table, heads):
        rows, cols = torch.arange(L, device=device), torch.arange(S, device=device)
        by_table = table[:, :, rows, None] + 0.5 * table[:, :, None, cols % L]
        return pair[None, None] + by_table + (heads[:, rows, None] - heads[:, None, cols])[None]

    q, k, v = (torch.randn(B, H, n, E, device=device) for n in (L, S, S))
    buffers = [torch.randn(L, S, device=device), torch.randn(B, H, L, device=device) * 0.5,
               torch.randn(H, max(L, S), device=device) * 0.5]
    grad_out = torch.randn(B, H, L, E, device=device, dtype=torch.float64)
    scale = E ** -0.5

    def dense(cast):
        tensors = [t.to(cast).requires_grad_() for t in (q, k, v, *buffers)]
        scores = tensors[0] @ tensors[1].transpose(-1, -2) * scale + dense_bias(*tensors[3:])
        out = torch.softmax(scores.float() if cast != torch.float64 else scores, -1).to(cast) @ tensors[2]
        return out, torch.autograd.grad((out.double() * grad_out).sum(), tensors)

    tensors = [t.to(dtype).requires_grad_() for t in (q, k, v)] + [t.clone().requires_grad_() for t in buffers]
    out = attend(*tensors[:3], score_mod=score_mod_of(*tensors[3:]))
    grads = torch.autograd.grad((out.double() * grad_out).sum(), tensors)
    (gold_out, gold_grads), (base_out, base_grads) = dense(torch.float64), dense(dtype)
    assert_within("out", out, gold_out, base_out, accumulated_terms=S)
    for name, grad, gold, base in zip(("q", "k", "v", "pair", "table", "heads"), grads, gold_grads, base_grads):
        assert_within(f"d{name}", grad, gold, base, terms_per_element=B * H * L * S // grad.numel(),
                      accumulated_terms=S)
