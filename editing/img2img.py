"""Start-late denoising (img2img convention) shared by SDEdit and DiffEdit: the strength → step count
and a DDIM scheduler whose timesteps start at an index."""

from __future__ import annotations

from diffusers import DDIMScheduler

from sdattn.errors import UserError


class FromStep(DDIMScheduler):
    """DDIM with the model's settings whose timesteps start at index ``t_start`` (img2img)."""

    t_start: int = 0

    def set_timesteps(self, num_inference_steps, device=None):
        super().set_timesteps(num_inference_steps, device)
        self.timesteps = self.timesteps[self.t_start:]


def strength_steps(name: str, strength: float, num_steps: int) -> int:
    """diffusers ``get_timesteps``: ``min(int(N·strength), N)`` steps at the end of the schedule;
    ``method.<name>`` outside (0, 1] is a UserError."""
    if not 0.0 < strength <= 1.0:
        raise UserError(f"method.{name} {strength} is outside (0, 1]")
    return min(int(num_steps * strength), num_steps)


def sdedit_start(num_steps: int, strength: float) -> int:
    """diffusers img2img: ``init = min(int(N·strength), N)``, start index ``N − init``."""
    return num_steps - strength_steps("strength", strength, num_steps)
