"""Lock-step timing (experiments.interleave): turns at every UNet call, a twin that shares the weights
but not the attention processors, and nothing of one call leaking into the other."""

import torch

from editing.fpe import fpe_generated
from experiments.interleave import lockstep_pair, lockstep_ratios
from sdattn.models import twin_pipeline
from sdattn.sampling import sample

KW = dict(num_inference_steps=3, guidance_scale=7.5, progress=False)
FPE = dict(layers="all", self_replace_steps=0.8)


def test_calls_take_turns_at_every_module_call():
    a, b, order = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), []
    x = torch.zeros(1, 2)

    def calls(module, tag, n):
        def run():
            for _ in range(n):
                order.append(tag)
                module(x)
        return run

    cpu_a, cpu_b = lockstep_pair(calls(a, "a", 4), calls(b, "b", 6), (a, b))
    assert order == ["a", "b"] * 4 + ["b", "b"]  # strict turns; the longer call finishes alone
    assert cpu_a >= 0 and cpu_b >= 0
    assert not a._forward_pre_hooks and not b._forward_pre_hooks  # hooks removed


def test_an_error_in_one_call_is_raised_and_frees_the_other():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    x = torch.zeros(1, 2)

    def boom():
        a(x)
        raise ValueError("boom")

    try:
        lockstep_pair(boom, lambda: [b(x) for _ in range(3)], (a, b))
    except ValueError as e:
        assert str(e) == "boom"
    else:
        raise AssertionError("the error was swallowed")


def test_twin_shares_weights_not_processors_and_lockstep_calls_match_solo(tiny_pipe):
    twin = twin_pipeline(tiny_pipe)
    p0, p1 = dict(tiny_pipe.unet.named_parameters()), dict(twin.unet.named_parameters())
    assert p0.keys() == p1.keys() and all(p0[k] is p1[k] for k in p0)  # the same tensors
    assert twin.unet is not tiny_pipe.unet and twin.vae is tiny_pipe.vae
    # its own tokenizer: a call sets padding / truncation on the backend, which a second thread would read
    assert twin.tokenizer is not tiny_pipe.tokenizer
    assert twin.tokenizer("a red car").input_ids == tiny_pipe.tokenizer("a red car").input_ids
    solo_plain = sample(tiny_pipe, ["a white car", "a red car"], seeds=[0, 0], **KW).images
    solo_fpe = fpe_generated(tiny_pipe, "a white car", "a red car", 0, **FPE, **KW).images["edited"]
    out = {}
    base = {"plain": lambda: out.__setitem__("plain", sample(tiny_pipe, ["a white car", "a red car"],
                                                             seeds=[0, 0], **KW).images)}
    other = {"fpe": lambda: out.__setitem__("fpe", fpe_generated(twin, "a white car", "a red car", 0, **FPE,
                                                                 **KW).images["edited"])}
    res = lockstep_ratios(base, other, {"fpe": "plain"}, (tiny_pipe.unet, twin.unet), rounds=2)
    assert len(res["fpe"]["ratios"]) == 2 and res["fpe"]["ratio_min"] <= res["fpe"]["ratio"] <= res["fpe"]["ratio_max"]
    # FPE's hooks on the twin never reached the baseline's UNet, which ran between its steps
    assert torch.equal(out["plain"], solo_plain) and torch.equal(out["fpe"], solo_fpe)
    assert not torch.allclose(solo_fpe, solo_plain[1:], atol=1e-3)  # the hooks did act
