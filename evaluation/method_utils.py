"""Small helpers every editing method shares: config access and a DDIM scheduler that starts late."""

from __future__ import annotations

from diffusers import DDIMScheduler

from sdattn.errors import UserError


def cfg_get(cfg, key, default=None):
    """``cfg[key]`` for a DictConfig / dict / None, as a plain Python object (``default`` when unset)."""
    if cfg is None:
        return default
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return OmegaConf.to_object(value)
    except ImportError:  # pragma: no cover
        pass
    return default if value is None else value


def steps_guidance(cfg) -> tuple[int, float]:
    """(num_inference_steps, guidance_scale) of a method config (50, 7.5 when unset)."""
    return int(cfg_get(cfg, "num_inference_steps", 50)), float(cfg_get(cfg, "guidance_scale", 7.5))


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
