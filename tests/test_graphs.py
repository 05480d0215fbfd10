"""Expected graphs: what Dynamo captures, and the aot_eager forward and backward graphs.

Our operator must stay one intact node, with score_mod / mask_mod as subgraphs and the tensors
they close over lifted into explicit inputs.
"""

import re

import torch
from expecttest import TestCase
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from inductor_flex import create_block_mask, flex_attention


def _readable(gm):
    text = gm.print_readable(print_output=False, include_stride=False, include_device=False)
    lines = [line.rstrip() for line in text.splitlines()]
    # Source-location comments name files of this machine; blank lines carry nothing; the
    # source hash in the kernel options changes with every edit of the package.
    text = "\n".join(line for line in lines if line.strip() and not line.strip().startswith("# File"))
    return re.sub(r"'INDUCTOR_FLEX_VERSION': '[0-9a-f]+'", "'INDUCTOR_FLEX_VERSION': '<hash>'", text)


def _capture(fn, *args, **kwargs):
    graphs = {}

    def backend(gm, example_inputs):
        graphs["dynamo"] = _readable(gm)

        def compiler(name):
            def compile_graph(graph, inputs):
                graphs[name] = _readable(graph)
                return make_boxed_func(graph.forward)

            return compile_graph

        return aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"))(gm, example_inputs)

    out = torch.compile(fn, backend=backend, fullgraph=True)(*args, **kwargs)
    out.sum().backward()
    return graphs


def _alibi_case():
    slopes = torch.rand(4, requires_grad=True)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    mask = create_block_mask(causal, 1, 1, 64, 64, device="cpu", BLOCK_SIZE=32)
    q, k, v = (torch.randn(1, 4, 64, 16, requires_grad=True) for _ in range(3))
    return _capture(flex_attention, q, k, v, score_mod=alibi, block_mask=mask)


class TestCapturedGraphs(TestCase):
    def test_dynamo_graph_lifts_closure_and_keeps_operator(self):
        self.assertExpectedInline(_alibi_case()["dynamo"], """\
class GraphModule(torch.nn.Module):
    def forward(self, L_query_: "f32[1, 4, 64, 16]", L_key_: "f32[1, 4, 64, 16]", L_value_: "f32[1, 4, 64, 16]", L_block_mask_kv_num_blocks: "i32[1, 1, 2]", L_block_mask_q_indices: "i32[1, 1, 2, 2]", L_score_mod_closure_0_cell_contents: "f32[4]", L_block_mask_kv_indices: "i32[1, 1, 2, 2]", L_block_mask_full_kv_num_blocks: "i32[1, 1, 2]", L_block_mask_full_kv_indices: "i32[1, 1, 2, 2]", L_block_mask_q_num_blocks: "i32[1, 1, 2]", L_block_mask_full_q_num_blocks: "i32[1, 1, 2]", L_block_mask_full_q_indices: "i32[1, 1, 2, 2]"):
        l_query_ = L_query_
        l_key_ = L_key_
        l_value_ = L_value_
        l_block_mask_kv_num_blocks = L_block_mask_kv_num_blocks
        l_block_mask_q_indices = L_block_mask_q_indices
        l_score_mod_closure_0_cell_contents = L_score_mod_closure_0_cell_contents
        l_block_mask_kv_indices = L_block_mask_kv_indices
        l_block_mask_full_kv_num_blocks = L_block_mask_full_kv_num_blocks
        l_block_mask_full_kv_indices = L_block_mask_full_kv_indices
        l_block_mask_q_num_blocks = L_block_mask_q_num_blocks
        l_block_mask_full_q_num_blocks = L_block_mask_full_q_num_blocks
        l_block_mask_full_q_indices = L_block_mask_full_q_indices
        score_mod_0 = self.score_mod_0
        mask_mod_0 = self.mask_mod_0
        inductor_flex_attention = torch.ops.higher_order.inductor_flex_attention(l_query_, l_key_, l_value_, score_mod_0, (64, 64, l_block_mask_kv_num_blocks, l_block_mask_kv_indices, l_block_mask_full_kv_num_blocks, l_block_mask_full_kv_indices, l_block_mask_q_num_blocks, l_block_mask_q_indices, l_block_mask_full_q_num_blocks, l_block_mask_full_q_indices, 32, 32, mask_mod_0), 0.25, {'INDUCTOR_FLEX_VERSION': '<hash>'}, (l_score_mod_closure_0_cell_contents,), ());  l_query_ = l_key_ = l_value_ = score_mod_0 = l_block_mask_kv_num_blocks = l_block_mask_kv_indices = l_block_mask_full_kv_num_blocks = l_block_mask_full_kv_indices = l_block_mask_q_num_blocks = l_block_mask_q_indices = l_block_mask_full_q_num_blocks = l_block_mask_full_q_indices = mask_mod_0 = l_score_mod_closure_0_cell_contents = None
        out: "f32[1, 4, 64, 16]" = inductor_flex_attention[0];  inductor_flex_attention = None
        return (out,)
    class score_mod_0(torch.nn.Module):
        def forward(self, child: "f32[]", child_1: "i32[]", child_2: "i32[]", child_3: "i32[]", child_4: "i32[]", l_score_mod_closure_0_cell_contents: "f32[4]"):
            getitem: "f32[]" = l_score_mod_closure_0_cell_contents[child_2];  l_score_mod_closure_0_cell_contents = child_2 = None
            sub: "i32[]" = child_4 - child_3;  child_4 = child_3 = None
            mul: "f32[]" = getitem * sub;  getitem = sub = None
            add: "f32[]" = child + mul;  child = mul = None
            return add
    class mask_mod_0(torch.nn.Module):
        def forward(self, child: "i32[]", child_1: "i32[]", child_2: "i32[]", child_3: "i32[]"):
            ge: "b8[]" = child_2 >= child_3;  child_2 = child_3 = None
            return ge""")

    def test_aot_forward_graph(self):
        self.assertExpectedInline(_alibi_case()["forward"], """\
class GraphModule(torch.nn.Module):
    def forward(self, primals_1: "f32[1, 4, 64, 16]", primals_2: "f32[1, 4, 64, 16]", primals_3: "f32[1, 4, 64, 16]", primals_4: "i32[1, 1, 2]", primals_5: "i32[1, 1, 2, 2]", primals_6: "f32[4]", primals_7: "i32[1, 1, 2, 2]", primals_8: "i32[1, 1, 2]", primals_9: "i32[1, 1, 2, 2]", primals_10: "i32[1, 1, 2]", primals_11: "i32[1, 1, 2]", primals_12: "i32[1, 1, 2, 2]"):
        inductor_flex_score0 = self.inductor_flex_score0
        inductor_flex_mask0 = self.inductor_flex_mask0
        inductor_flex_attention = torch.ops.higher_order.inductor_flex_attention(primals_1, primals_2, primals_3, inductor_flex_score0, (64, 64, primals_4, primals_7, primals_8, primals_9, primals_10, primals_5, primals_11, primals_12, 32, 32, inductor_flex_mask0), 0.25, {'INDUCTOR_FLEX_VERSION': '<hash>'}, (primals_6,), ());  inductor_flex_score0 = inductor_flex_mask0 = None
        getitem: "f32[1, 4, 64, 16]" = inductor_flex_attention[0]
        getitem_1: "f32[1, 4, 64]" = inductor_flex_attention[1];  inductor_flex_attention = None
        detach: "f32[1, 4, 64, 16]" = torch.ops.aten.detach.default(getitem)
        detach_1: "f32[1, 4, 64]" = torch.ops.aten.detach.default(getitem_1);  getitem_1 = None
        return (getitem, primals_1, primals_2, primals_3, primals_4, primals_5, primals_6, primals_7, primals_8, primals_9, primals_10, primals_11, primals_12, detach, detach_1)
    class inductor_flex_score0(torch.nn.Module):
        def forward(self, arg0_1: "f32[]", arg1_1: "i32[]", arg2_1: "i32[]", arg3_1: "i32[]", arg4_1: "i32[]", arg5_1: "f32[4]"):
            index: "f32[]" = torch.ops.aten.index.Tensor(arg5_1, [arg2_1]);  arg5_1 = arg2_1 = None
            sub: "i32[]" = torch.ops.aten.sub.Tensor(arg4_1, arg3_1);  arg4_1 = arg3_1 = None
            mul: "f32[]" = torch.ops.aten.mul.Tensor(index, sub);  index = sub = None
            add: "f32[]" = torch.ops.aten.add.Tensor(arg0_1, mul);  arg0_1 = mul = None
            return add
    class inductor_flex_mask0(torch.nn.Module):
        def forward(self, arg0_1: "i32[]", arg1_1: "i32[]", arg2_1: "i32[]", arg3_1: "i32[]"):
            ge: "b8[]" = torch.ops.aten.ge.Tensor(arg2_1, arg3_1);  arg2_1 = arg3_1 = None
            return ge""")

    def test_aot_backward_graph_carries_joint_graph(self):
        self.assertExpectedInline(_alibi_case()["backward"], """\
class GraphModule(torch.nn.Module):
    def forward(self, primals_1: "f32[1, 4, 64, 16]", primals_2: "f32[1, 4, 64, 16]", primals_3: "f32[1, 4, 64, 16]", primals_4: "i32[1, 1, 2]", primals_5: "i32[1, 1, 2, 2]", primals_6: "f32[4]", primals_7: "i32[1, 1, 2, 2]", primals_8: "i32[1, 1, 2]", primals_9: "i32[1, 1, 2, 2]", primals_10: "i32[1, 1, 2]", primals_11: "i32[1, 1, 2]", primals_12: "i32[1, 1, 2, 2]", detach: "f32[1, 4, 64, 16]", detach_1: "f32[1, 4, 64]", tangents_1: "f32[1, 4, 64, 16]"):
        detach_2: "f32[1, 4, 64, 16]" = torch.ops.aten.detach.default(detach);  detach = None
        detach_3: "f32[1, 4, 64]" = torch.ops.aten.detach.default(detach_1);  detach_1 = None
        inductor_flex_score1 = self.inductor_flex_score1
        inductor_flex_joint0 = self.inductor_flex_joint0
        inductor_flex_mask1 = self.inductor_flex_mask1
        inductor_flex_attention_backward = torch.ops.higher_order.inductor_flex_attention_backward(primals_1, primals_2, primals_3, detach_2, detach_3, tangents_1, None, inductor_flex_score1, inductor_flex_joint0, (64, 64, primals_4, primals_7, primals_8, primals_9, primals_10, primals_5, primals_11, primals_12, 32, 32, inductor_flex_mask1), 0.25, {'INDUCTOR_FLEX_VERSION': '<hash>'}, (primals_6,), ());  primals_1 = primals_2 = primals_3 = detach_2 = detach_3 = tangents_1 = inductor_flex_score1 = inductor_flex_joint0 = primals_4 = primals_7 = primals_8 = primals_9 = primals_10 = primals_5 = primals_11 = primals_12 = inductor_flex_mask1 = primals_6 = None
        getitem_3: "f32[1, 4, 64, 16]" = inductor_flex_attention_backward[0]
        getitem_4: "f32[1, 4, 64, 16]" = inductor_flex_attention_backward[1]
        getitem_5: "f32[1, 4, 64, 16]" = inductor_flex_attention_backward[2]
        getitem_6 = inductor_flex_attention_backward[3];  inductor_flex_attention_backward = None
        getitem_7: "f32[4]" = getitem_6[0];  getitem_6 = None
        return (getitem_3, getitem_4, getitem_5, None, None, getitem_7, None, None, None, None, None, None)
    class inductor_flex_score1(torch.nn.Module):
        def forward(self, arg0_1: "f32[]", arg1_1: "i32[]", arg2_1: "i32[]", arg3_1: "i32[]", arg4_1: "i32[]", arg5_1: "f32[4]"):
            index: "f32[]" = torch.ops.aten.index.Tensor(arg5_1, [arg2_1]);  arg5_1 = arg2_1 = None
            sub: "i32[]" = torch.ops.aten.sub.Tensor(arg4_1, arg3_1);  arg4_1 = arg3_1 = None
            mul: "f32[]" = torch.ops.aten.mul.Tensor(index, sub);  index = sub = None
            add: "f32[]" = torch.ops.aten.add.Tensor(arg0_1, mul);  arg0_1 = mul = None
            return add
    class inductor_flex_joint0(torch.nn.Module):
        def forward(self, arg0_1: "f32[]", arg1_1: "i32[]", arg2_1: "i32[]", arg3_1: "i32[]", arg4_1: "i32[]", arg5_1: "f32[]", arg6_1: "f32[4]"):
            eq: "b8[]" = torch.ops.aten.eq.Scalar(arg5_1, 0)
            sub: "i32[]" = torch.ops.aten.sub.Tensor(arg4_1, arg3_1);  arg4_1 = arg3_1 = None
            mul_1: "f32[]" = torch.ops.aten.mul.Tensor(arg5_1, sub);  sub = None
            scalar_tensor: "f32[]" = torch.ops.aten.scalar_tensor.default(0.0, dtype = torch.float32, layout = torch.strided, device = device(type='cpu'))
            where: "f32[]" = torch.ops.aten.where.self(eq, scalar_tensor, mul_1);  eq = scalar_tensor = mul_1 = None
            zeros_and_scatter: "f32[4]" = torch.ops.flex_lib.zeros_and_scatter.default([4], [arg2_1], where);  arg2_1 = where = None
            return [arg5_1, None, None, None, None, zeros_and_scatter]
    class inductor_flex_mask1(torch.nn.Module):
        def forward(self, arg0_1: "i32[]", arg1_1: "i32[]", arg2_1: "i32[]", arg3_1: "i32[]"):
            ge: "b8[]" = torch.ops.aten.ge.Tensor(arg2_1, arg3_1);  arg2_1 = arg3_1 = None
            return ge""")


def test_mask_graphs_recognised_as_always_true():
    """The backward skips its ds mask on partial blocks only when the mask_mod is constant True."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from inductor_flex import noop_mask
    from inductor_flex.lowering.triton_backward import mask_always_true

    index = [torch.zeros((), dtype=torch.int32) for _ in range(4)]
    cases = {
        noop_mask: True,
        (lambda b, h, q_idx, kv_idx: torch.ones((), dtype=torch.bool)): True,
        (lambda b, h, q_idx, kv_idx: torch.full((), True)): True,
        (lambda b, h, q_idx, kv_idx: q_idx >= kv_idx): False,
        (lambda b, h, q_idx, kv_idx: q_idx >= 0): False,
        (lambda b, h, q_idx, kv_idx: b.new_zeros((), dtype=torch.bool)): False,
        (lambda b, h, q_idx, kv_idx: torch.full((), False)): False,
    }
    for mask_mod, expected in cases.items():
        assert mask_always_true(make_fx(mask_mod)(*index)) is expected, make_fx(mask_mod)(*index).graph
