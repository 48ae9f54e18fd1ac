"""Shape-Guided Diffusion: one inside-outside attention call against the official formula (re-implemented
here from shape-guided-diffusion's utils.py), the background kept from the inversion, the attention mask,
and the refusal of generated pairs."""

import numpy as np
import pytest
import torch

from editing.baselines.shape_guided import (
    REAL_ONLY,
    InsideOutsideAttention,
    attention_mask,
    edited_tokens,
    shape_guided_latents,
    token_scales,
)
from editing.two_branch import model_layers
from evaluation.datasets import EditExample
from sdattn.errors import UserError
from sdattn.hooks import StepState
from sdattn.sampling import default_size, encode_image

SRC, TGT = "a photo of a cat", "a photo of a red dog"


def official_inside_outside(attn, hidden, context, obj, inside, fixed, cross_scale, self_scale):
    """The official attention call (utils.py ``mask_tokens_attn`` / ``mask_self_attn``): attention maps
    (B·H, N, K), then the in-place edits, then ``bmm`` with V and the output projection."""
    b, n, _ = hidden.shape
    ctx = hidden if context is None else context
    q, k, v = attn.to_q(hidden), attn.to_k(ctx), attn.to_v(ctx)
    heads, d = attn.heads, q.shape[-1] // attn.heads

    def split(x):  # (B, N, H·d) → (B·H, N, d), as the official head_to_batch_dim
        return x.view(b, -1, heads, d).permute(0, 2, 1, 3).reshape(b * heads, -1, d)

    q, k, v = split(q), split(k), split(v)
    a = (q @ k.transpose(1, 2) * attn.scale).softmax(-1)  # (B·H, N, K)
    segm = (1 - obj)[:, None]  # 1 on the background
    if context is not None:
        outside = [i for i in range(1, a.shape[-1]) if i not in inside]
        a[:, :, inside] = a[:, :, inside] * (1 - segm) * cross_scale
        a[:, :, outside] = a[:, :, outside] * segm * cross_scale
        a[:, :, fixed] = a[:, :, fixed] / cross_scale  # the fixed tokens are outside ones here
        a[:, :, [0]] = 0
    else:
        same = (segm @ segm.T) + ((1 - segm) @ (1 - segm).T)
        a = a * ((same - 1) * self_scale + 1)
    out = (a @ v).view(b, heads, n, -1).permute(0, 2, 1, 3).reshape(b, n, -1)
    return attn.to_out[1](attn.to_out[0](out))


@pytest.mark.parametrize("kind", ["cross", "self"])
def test_one_inside_outside_call_matches_the_official_formula(tiny_pipe, kind):
    torch.manual_seed(0)
    layer = next(x for x in model_layers(tiny_pipe) if x.kind == kind)
    attn = tiny_pipe.unet.get_submodule(layer.module_name)
    src_pos, tgt_pos, fixed = edited_tokens(tiny_pipe.tokenizer, SRC, TGT)
    assert tgt_pos and fixed and not set(tgt_pos) & set(fixed)
    length = tiny_pipe.tokenizer.model_max_length
    mask = (torch.rand(1, 1, layer.height, layer.width) > 0.5).float()
    hook = InsideOutsideAttention(layer, StepState(), mask, token_scales(length, tgt_pos, fixed, 2.5), 1.0)
    hidden = torch.randn(2, layer.tokens, attn.to_q.in_features)
    context = torch.randn(2, length, attn.to_k.in_features) if kind == "cross" else None
    with torch.no_grad():
        ours = hook(attn, hidden, context)
        ref = official_inside_outside(attn, hidden, context, mask.flatten(), tgt_pos, fixed, 2.5, 1.0)
        plain = attn.processor(attn, hidden, context)  # the installed SDPA processor
    assert (ours - ref).abs().max() <= 1e-5
    assert not torch.allclose(ours, plain, atol=1e-4)  # the masks change the call


def test_background_stays_the_source_and_the_object_changes(tiny_pipe):
    h, w = default_size(tiny_pipe)
    image = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(1))
    z0 = encode_image(tiny_pipe, image)
    mask = torch.zeros(1, 1, h, w)
    mask[..., : w // 2] = 1  # object: the left half
    out = shape_guided_latents(tiny_pipe, z0, mask, SRC, TGT, cross_attn_scale=2.5, self_attn_scale=1.0,
                               inversion="inside_outside", num_inference_steps=3, guidance_scale=4.5)
    half = z0.shape[-1] // 2
    assert torch.allclose(out[..., half:], z0[..., half:], atol=1e-6)  # outside: the source latents
    assert (out[..., :half] - z0[..., :half]).abs().mean() > 1e-2  # inside: edited


def test_benchmark_entry_real_only_dataset_or_attention_mask(tiny_pipe, make_method):
    edit = make_method("shape_guided", num_inference_steps=2)
    h, w = default_size(tiny_pipe)
    with pytest.raises(UserError, match=r"^shape_guided runs on real images only \(as in the paper\)$"):
        edit(tiny_pipe, EditExample("g", SRC, TGT), 0, None)
    assert REAL_ONLY == "shape_guided runs on real images only (as in the paper)"
    image = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(2))
    given = np.zeros((h, w), bool)
    given[: h // 2] = True
    src, edited = edit(tiny_pipe, EditExample("r", SRC, TGT, "x.png", extra={"object_mask": lambda: given}), 0, image)
    assert src is image and edited.shape == image.shape and 0 <= edited.min() and edited.max() <= 1
    src, edited = edit(tiny_pipe, EditExample("r", SRC, TGT, "x.png"), 0, image)  # mask from attention
    assert edited.shape == image.shape
    with pytest.raises(UserError, match="no object mask"):
        make_method("shape_guided", mask_source="dataset")(tiny_pipe, EditExample("r", SRC, TGT, "x.png"), 0, image)


def test_attention_mask_is_binary_at_a_quarter_of_the_latent_side(tiny_pipe):
    h, w = default_size(tiny_pipe)
    z0 = encode_image(tiny_pipe, torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(3)))
    src_pos = edited_tokens(tiny_pipe.tokenizer, SRC, TGT)[0]
    m = attention_mask(tiny_pipe, z0, SRC, src_pos, 2, 4, 0.5)
    assert m.shape == (1, 1, z0.shape[-2] // 4, z0.shape[-1] // 4)
    assert set(m.unique().tolist()) <= {0.0, 1.0} and m.sum() >= 1  # the maximum is always inside
    with pytest.raises(UserError, match="mask_resolution_divisor 3"):
        attention_mask(tiny_pipe, z0, SRC, src_pos, 2, 3, 0.5)
