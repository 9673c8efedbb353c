"""nn.MultiheadAttention: its in-projection weights are used inside
F.multi_head_attention_forward and its out_proj's hooks never fire, so the
engine runs this decomposition of its forward instead, recording the four
linear pieces (q, k, v projections and out_proj) whose norms the linear
identity gives.

Supported: batch_first or not, packed (in_proj_weight) or separate
(q/k/v_proj_weight, kdim/vdim) projections, with or without bias,
attn_mask (bool or float, 2-D or 3-D), key_padding_mask, need_weights and
average_attn_weights. Refused with an error: add_bias_kv, add_zero_attn,
unbatched inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gradood.persample._grads import DenseLayerGradients, outer_product_sums
from gradood.persample._rules import CompositeRule, RuleResult, register_composite_rule, sum_of_outer_products_sq_norm


def _additive(mask, dtype):
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


@register_composite_rule(nn.MultiheadAttention)
class MultiheadAttentionRule(CompositeRule):
    def forward(
        self,
        module,
        record,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        name = type(module).__name__
        if module.bias_k is not None or module.add_zero_attn:
            raise ValueError(f"gradood.persample_grad_norms: {name} with add_bias_kv or add_zero_attn is not supported")
        if query.dim() != 3:
            raise ValueError(f"gradood.persample_grad_norms: {name} needs batched (3-D) inputs, got {query.dim()}-D")
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")  # as torch's MHA
        if not module.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        if module._qkv_same_embed_dim:
            w_q, w_k, w_v = module.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
        b_q = b_k = b_v = None
        if module.in_proj_bias is not None:
            b_q, b_k, b_v = module.in_proj_bias.chunk(3)
        q = record("q", query, F.linear(query, w_q, b_q))
        k = record("k", key, F.linear(key, w_k, b_k))
        v = record("v", value, F.linear(value, w_v, b_v))

        batch, target_length, embed = q.shape
        source_length, heads = k.shape[1], module.num_heads
        head_dim = embed // heads
        q = q.reshape(batch, target_length, heads, head_dim).transpose(1, 2)
        k = k.reshape(batch, source_length, heads, head_dim).transpose(1, 2)
        v = v.reshape(batch, source_length, heads, head_dim).transpose(1, 2)
        mask = _additive(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 3:
            mask = mask.reshape(batch, heads, target_length, source_length)
        padding = _additive(key_padding_mask, q.dtype)
        if padding is not None:
            padding = padding.reshape(batch, 1, 1, source_length)
            mask = padding if mask is None else mask + padding
        if need_weights:
            scores = (q * math.sqrt(1.0 / head_dim)) @ k.transpose(-2, -1)  # [B, H, Tq, Tk]
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            attended = weights @ v
        else:  # as torch's MHA: the fused kernel, which keeps no [B, H, Tq, Tk] weights for the backward
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        context = attended.transpose(1, 2).reshape(batch, target_length, embed)
        output = record("out", context, F.linear(context, module.out_proj.weight, module.out_proj.bias))
        if not module.batch_first:
            output = output.transpose(0, 1)
        if not need_weights:
            return output, None
        return output, weights.mean(dim=1) if average_attn_weights else weights

    def norms(self, module, pieces):
        def linear_norm(piece):
            inputs, grads = pieces[piece]
            return sum_of_outer_products_sq_norm(inputs, grads)

        squared = {}
        projections = {piece: linear_norm(piece) for piece in ("q", "k", "v")}
        weights = {piece: result.squared_norms["weight"] for piece, result in projections.items()}
        if module._qkv_same_embed_dim:
            squared["in_proj_weight"] = weights["q"] + weights["k"] + weights["v"]
        else:
            for piece in ("q", "k", "v"):
                squared[f"{piece}_proj_weight"] = weights[piece]
        if module.in_proj_bias is not None:
            squared["in_proj_bias"] = sum(pieces[piece][1].sum(1).square().sum(1) for piece in ("q", "k", "v"))
        out = linear_norm("out")
        squared["out_proj.weight"] = out.squared_norms["weight"]
        if module.out_proj.bias is not None:
            squared["out_proj.bias"] = pieces["out"][1].sum(1).square().sum(1)
        return RuleResult(squared, out.method)

    def grads(self, module, pieces):
        """Per-sample gradients in the module's own layout: in_proj_weight [3E, E] is
        the q, k, v projections' gradients stacked (or q/k/v_proj_weight apart)."""
        batch = pieces["out"][0].shape[0]
        numels = {name: parameter.numel() for name, parameter in module.named_parameters()}

        def weight(piece, start, end):
            inputs, grads = pieces[piece]
            return outer_product_sums(inputs[start:end], grads[start:end])

        def materialise(start, end):
            count = end - start
            chunk = {}
            if module._qkv_same_embed_dim:
                chunk["in_proj_weight"] = torch.cat([weight(p, start, end) for p in ("q", "k", "v")], 1).reshape(
                    count, -1
                )
            else:
                for piece in ("q", "k", "v"):
                    chunk[f"{piece}_proj_weight"] = weight(piece, start, end).reshape(count, -1)
            if module.in_proj_bias is not None:
                chunk["in_proj_bias"] = torch.cat([pieces[p][1][start:end].sum(1) for p in ("q", "k", "v")], 1)
            chunk["out_proj.weight"] = weight("out", start, end).reshape(count, -1)
            if module.out_proj.bias is not None:
                chunk["out_proj.bias"] = pieces["out"][1][start:end].sum(1)
            return chunk

        return DenseLayerGradients(batch, numels, materialise)
