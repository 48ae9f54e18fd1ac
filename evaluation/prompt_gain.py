"""How much a prompt helps the model denoise an image: the model's own recognition of its prompt in the image.

The diffusion model as a zero-shot classifier (Li et al., ICCV 2023; Clark & Jaini, NeurIPS 2023): noise the
image's latent at several timesteps, predict the noise with the prompt and with the empty prompt, and compare
the two errors. The gain

    gain(image, prompt) = E_{t, ε} [ ‖ε_θ(z_t, "") − ε‖² − ‖ε_θ(z_t, prompt) − ε‖² ]   (mean over elements)

is positive when the prompt describes what the model sees in the image, near zero or negative when it does not
(e.g. "a pink car" on a pink blob). The same noise draws serve both predictions, so the difference is paired.
"""

from __future__ import annotations

import torch

from sdattn.sampling import ddim_scheduler, encode_prompts


def gain_timesteps(num_train_timesteps: int, n: int) -> torch.Tensor:
    """``n`` training timesteps evenly spread over the schedule (the centres of ``n`` equal bins) → (n,) long."""
    if n < 1:
        raise ValueError(f"prompt gain: {n} timesteps; at least 1")
    return ((torch.arange(n) + 0.5) * num_train_timesteps / n).long()


@torch.no_grad()
def prompt_gain(pipe, z0: torch.Tensor, prompt: str, timesteps: int, draws: int, seed: int, batch: int) -> float:
    """The gain of ``prompt`` on latent ``z0`` (1, C, h, w) (module docstring): ``timesteps`` × ``draws`` noised
    copies (noise from ``torch.Generator().manual_seed(seed)``), UNet calls in chunks of ``batch`` rows."""
    unet, sched = pipe.unet, ddim_scheduler(pipe)  # add_noise / get_velocity of the model's own schedule
    ts = gain_timesteps(int(sched.config.num_train_timesteps), timesteps).repeat_interleave(draws)  # (n,)
    ts = ts.to(unet.device)
    z0 = z0.to(unet.device, torch.float32).expand(len(ts), -1, -1, -1)  # (n, C, h, w)
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(int(seed))).to(z0)
    z_t = sched.add_noise(z0, noise, ts)
    target = sched.get_velocity(z0, noise, ts) if sched.config.get("prediction_type") == "v_prediction" else noise
    context = encode_prompts(pipe, ["", prompt]).to(unet.device, unet.dtype)  # (2, L, D)
    total = torch.zeros(2, dtype=torch.float64)
    rows = max(1, batch // 2)  # noised latents per call, each with both prompts
    for i in range(0, len(ts), rows):
        sl = slice(i, i + rows)
        k = len(ts[sl])
        pred = unet(z_t[sl].repeat(2, 1, 1, 1).to(unet.dtype), ts[sl].repeat(2),
                    encoder_hidden_states=context.repeat_interleave(k, 0)).sample.float()  # (2k, C, h, w)
        err = ((pred - target[sl].repeat(2, 1, 1, 1)) ** 2).flatten(1).mean(1).view(2, k)  # (2, k)
        total += err.sum(1).double().cpu()
    return float((total[0] - total[1]) / len(ts))
