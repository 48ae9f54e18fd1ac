import pytest
import torch

from sdattn.hooks import AttentionHook, HookSet, installed
from sdattn.layers import LayerSelector, enumerate_layers
from sdattn.sampling import sample


def _inputs(pipe, batch=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    ctx = torch.randn(batch, pipe.tokenizer.model_max_length, pipe.unet.config.cross_attention_dim, generator=g)
    return x, ctx


@torch.no_grad()
def test_noop_hooks_on_every_layer_equal_unhooked(tiny_pipe):
    x, ctx = _inputs(tiny_pipe)
    ref = tiny_pipe.unet(x, 500, encoder_hidden_states=ctx).sample
    layers = enumerate_layers(tiny_pipe.unet)
    with HookSet(tiny_pipe.unet, layers, AttentionHook):
        hooked = tiny_pipe.unet(x, 500, encoder_hidden_states=ctx).sample
    assert (hooked - ref).abs().max() <= 1e-5


class _Boom(AttentionHook):
    def attend(self, attn, q, k, v, mask):
        raise RuntimeError("boom")


@torch.no_grad()
def test_processors_restored_after_exception(tiny_pipe):
    before = dict(tiny_pipe.unet.attn_processors)
    layers = LayerSelector(kinds="self", indices="4-14").select(enumerate_layers(tiny_pipe.unet))
    x, ctx = _inputs(tiny_pipe)
    with pytest.raises(RuntimeError, match="boom"):
        with HookSet(tiny_pipe.unet, layers, _Boom):
            tiny_pipe.unet(x, 500, encoder_hidden_states=ctx)
    after = tiny_pipe.unet.attn_processors
    assert all(after[k] is before[k] for k in before)


def test_only_selected_layers_are_hooked_and_others_keep_sdpa(tiny_pipe):
    layers = LayerSelector(kinds="cross", indices=[3, 6]).select(enumerate_layers(tiny_pipe.unet))
    before = dict(tiny_pipe.unet.attn_processors)
    with HookSet(tiny_pipe.unet, layers, AttentionHook) as hooks:
        now = tiny_pipe.unet.attn_processors
        hooked = {k for k, v in now.items() if isinstance(v, AttentionHook)}
        assert hooked == {x.name for x in layers} == set(hooks.hooks)
        assert all(now[k] is before[k] for k in before if k not in hooked)
        assert all(type(v).__name__ == "AttnProcessor2_0" for k, v in now.items() if k not in hooked)


def test_unknown_layer_name_is_rejected(tiny_pipe):
    from sdattn.errors import UserError

    with pytest.raises(UserError, match="no attention layer"):
        with installed(tiny_pipe.unet, {"nope.processor": AttentionHook(None, None)}):
            pass


class _StepRecorder(AttentionHook):
    seen: list

    def attend(self, attn, q, k, v, mask):
        self.seen.append((self.state.step, self.state.timestep, q.shape[0], self.state.layout.cond_rows))
        return super().attend(attn, q, k, v, mask)


def test_sampler_tells_hooks_the_step_and_batch_layout(tiny_pipe):
    layer = LayerSelector(kinds="self", indices=[1]).select(enumerate_layers(tiny_pipe.unet))
    seen: list = []

    def factory(layer, state):
        h = _StepRecorder(layer, state)
        h.seen = seen
        return h

    with HookSet(tiny_pipe.unet, layer, factory) as hooks:
        sample(tiny_pipe, ["a red car", "a dog"], seeds=[0, 1], num_inference_steps=4, callbacks=[hooks],
               progress=False, decode_images=False)
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert [s[1] for s in seen] == sorted((s[1] for s in seen), reverse=True)
    assert all(s[2] == 4 and s[3] == slice(2, 4) for s in seen)
