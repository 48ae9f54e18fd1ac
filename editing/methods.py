"""Edit methods as the project runs them, whatever the method: one ``configs/method/<name>.yaml``
(``_target_`` + every setting) built into an editor ``edit(pipe, pair, seed, image=None) -> (source,
edited)``, and one pair through an editor — timed, with the final latents the model decoded. The benchmark
runs editors over datasets (:mod:`evaluation.runner`); the edit command runs one or several on one pair
(``task=edit``, :mod:`evaluation.compare`)."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.utils import get_object
from omegaconf import OmegaConf
from safetensors.torch import save_file

from sdattn.config import instantiate
from sdattn.errors import UserError, first_line
from sdattn.files import atomic_save
from sdattn.sampling import encode_image

from .grid import labelled_grid, to_pil
from .inversion import reused_inversion_seconds


@dataclass(frozen=True)
class Pair:
    """One edit as editors read it (the benchmark's examples have the same fields)."""

    source_prompt: str
    target_prompt: str
    id: str = "pair"
    extra: dict = field(default_factory=dict)


def method_settings(spec: dict) -> dict:
    """A method's settings (a resolved ``configs/method/`` node as plain Python) without Hydra's
    ``_target_`` / ``_partial_`` keys: what identifies them (the record store's meta)."""
    return {k: v for k, v in spec.items() if not k.startswith("_")}


def with_settings(spec: dict, settings: dict | None) -> dict:
    """``spec`` with ``settings`` over it: nested dicts merge key by key, anything else is replaced."""
    out = dict(spec)
    for key, value in (settings or {}).items():
        both_dicts = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = with_settings(out[key], value) if both_dicts else value
    return out


def build_method(spec) -> tuple[str, Callable]:
    """(name, edit) of a method config (a node, resolved here, or plain Python): ``_target_`` instantiated
    with the config's settings; ``edit(pipe, pair, seed, image=None) -> (source, edited)``. ``name`` is the
    label of the results, not an argument."""
    spec = dict(OmegaConf.to_container(spec, resolve=True) if OmegaConf.is_config(spec) else spec)
    name = str(spec.pop("name"))
    if "_target_" not in spec:
        raise UserError(f"method {name!r} has no _target_: give the editor's function (with _partial_: true) "
                        "or class, e.g. _target_: editing.fpe.edit_fpe")
    try:
        target = get_object(spec["_target_"])
    except Exception as e:  # noqa: BLE001 - any import failure is the same one-line error
        raise UserError(f"method {name!r}: _target_ {spec['_target_']!r} cannot be imported "
                        f"({first_line(e)})") from None
    check_settings(name, target, {k: v for k, v in spec.items() if not k.startswith("_")})
    return name, instantiate(spec, _convert_="all")


def check_settings(name: str, target: Callable, settings: dict) -> None:
    """Every setting is a keyword of ``target`` and every keyword-only one without a default is given
    (the YAML is the only place the defaults live)."""
    params = inspect.signature(target).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(settings) - set(params))
    if unknown:
        raise UserError(f"method.{unknown[0]} is not a setting of method {name!r}; settings: "
                        f"{', '.join(k for k, p in params.items() if p.kind is p.KEYWORD_ONLY)}")
    missing = [k for k, p in params.items() if p.kind is p.KEYWORD_ONLY and p.default is p.empty and k not in settings]
    if missing:
        raise UserError(f"method {name!r} lacks the setting(s) {', '.join(missing)} (configs/method/{name}.yaml)")


class DecodedLatents:
    """Records what ``pipe``'s VAE decodes while active (torch forward hooks on its first decoding module
    and on its decoder): the latents (B, C, h, w), scaled as the sampler's, and the images they became
    (B, 3, H, W) in [0, 1], so an editor's returned image can be traced to its final latent."""

    def __init__(self, pipe):
        self.vae = pipe.vae
        self.latents: list[torch.Tensor] = []
        self.images: list[torch.Tensor] = []

    @contextmanager
    def recording(self) -> Iterator[DecodedLatents]:
        vae, scale = self.vae, float(self.vae.config.scaling_factor)
        first = vae.post_quant_conv if getattr(vae, "post_quant_conv", None) is not None else vae.decoder
        def latents_in(module, args):
            self.latents.append(args[0].detach().float().cpu() * scale)  # (B, C, h, w), as the sampler's

        def images_out(module, args, out):
            self.images.append((out.detach().float() / 2 + 0.5).clamp(0, 1).cpu())  # (B, 3, H, W), as decode's

        handles = [first.register_forward_pre_hook(latents_in), vae.decoder.register_forward_hook(images_out)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def latent_of(self, image: torch.Tensor, atol: float = 1e-5) -> torch.Tensor | None:
        """The latent (1, C, h, w) decoded into ``image`` (1, 3, H, W) (the last such decode), or None."""
        for z, x in zip(reversed(self.latents), reversed(self.images)):
            for i in range(x.shape[0]):
                if x[i].shape == image.shape[1:] and torch.allclose(x[i], image[0].float().cpu(), atol=atol, rtol=0):
                    return z[i:i + 1]
        return None


@dataclass
class MethodRun:
    """One editor on one pair: images (1, 3, H, W) in [0, 1], the final latents the model decoded
    (``source`` / ``edited``; ``input``: the real image's VAE latent), and the time it took — the whole
    edit, inversion included (an inversion shared with an earlier method counts its own cost)."""

    name: str
    source: torch.Tensor
    edited: torch.Tensor
    latents: dict[str, torch.Tensor]
    seconds: float
    shared_inversion_s: float = 0.0  # of ``seconds``: inversions computed by an earlier method
    info: dict = field(default_factory=dict)  # what the editor reports of its edit (PnP: inversion cached?)


def timed_edit(pipe, edit: Callable, example, seed: int, image: torch.Tensor | None,
               timer: Callable[[], float] = time.perf_counter) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``edit(pipe, example, seed, image)`` → (source, edited, seconds by ``timer``), with
    ``torch.cuda.synchronize()`` before and after on CUDA (the time covers the whole edit)."""
    cuda = getattr(pipe, "device", torch.device("cpu")).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = timer()
    source, edited = edit(pipe, example, seed, image)
    if cuda:
        torch.cuda.synchronize()
    return source, edited, timer() - t0


def run_method(pipe, name: str, edit: Callable, pair: Pair, seed: int, image: torch.Tensor | None = None,
               warmup: bool = False) -> MethodRun:
    """``edit(pipe, pair, seed, image)`` once (after an uncounted warm-up edit with ``warmup``), timed by
    :func:`timed_edit`. ``image`` (1, 3, H, W) in [0, 1] for a real-image edit."""
    if warmup:
        edit(pipe, pair, seed, image)
    reused0 = reused_inversion_seconds()
    decoded = DecodedLatents(pipe)
    with decoded.recording():
        source, edited, seconds = timed_edit(pipe, edit, pair, seed, image)
    shared = reused_inversion_seconds() - reused0
    latents = {"input": encode_image(pipe, image).cpu()} if image is not None else {}
    for key, img in (("source", source), ("edited", edited)):
        z = None if key == "source" and image is not None else decoded.latent_of(img)
        if z is not None:
            latents[key] = z
    return MethodRun(name, source, edited, latents, seconds + shared, shared, dict(getattr(edit, "info", {})))


def save_run(run: MethodRun, folder: str | Path, captions: tuple[str, str], cell: int = 256) -> dict[str, Path]:
    """``source.png``, ``edited.png``, ``grid.png`` (source | edited, captioned) and ``latents.safetensors``
    of ``run`` in ``folder``, each written atomically; → {name: path}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"source": folder / "source.png", "edited": folder / "edited.png", "grid": folder / "grid.png",
             "latents": folder / "latents.safetensors"}
    grid = labelled_grid([[(run.source, captions[0]), (run.edited, captions[1])]], cell=cell)
    for key, pil in (("source", to_pil(run.source)), ("edited", to_pil(run.edited)), ("grid", grid)):
        atomic_save(files[key], lambda tmp, pil=pil: pil.save(tmp, format="PNG"))
    tensors = {k: v.contiguous().cpu() for k, v in run.latents.items()}
    atomic_save(files["latents"], lambda tmp: save_file(tensors, str(tmp)))
    return files
