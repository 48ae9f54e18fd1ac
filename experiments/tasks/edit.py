"""Editing task: FPE on a generated image (Alg. 1) or a real image (Alg. 2)."""

from __future__ import annotations

from omegaconf import DictConfig
from safetensors.torch import save_file

from editing.fpe import fpe_generated, fpe_real
from editing.grid import labelled_grid, to_pil
from editing.images import load_image, read_rgb
from editing.inversion import image_size
from evaluation.reconstruction import reconstruction_line, reconstruction_psnr, reconstruction_warning, round_trip_psnr
from experiments.common import load_model, output_dir, plain
from sdattn.errors import UserError


def report_reconstruction(value: float, cfg: DictConfig) -> None:
    """The real image's reconstruction quality, and a warning line when the model cannot represent it."""
    print(reconstruction_line(value, cfg.min_reconstruction_psnr))
    warning = reconstruction_warning(value, cfg.min_reconstruction_psnr, str(cfg.model.name))
    if warning:
        print(warning)


def run(cfg: DictConfig) -> dict:
    """Writes the images, ``grid.png`` and ``latents.safetensors``; returns their paths and the result."""
    e = cfg.edit
    out = output_dir(cfg)
    common = dict(layers=plain(e.layers), self_replace_steps=plain(e.self_replace_steps),
                  num_inference_steps=e.num_inference_steps, guidance_scale=e.guidance_scale, progress=cfg.progress)
    if e.mode == "generated":
        pipe = load_model(cfg)
        result = fpe_generated(pipe, e.source_prompt, e.target_prompt, cfg.seed, negative_prompt=e.negative_prompt,
                               **common)
        names = {"source": e.source_prompt, "edited": e.target_prompt}
        latents = {"source": result.latents["source"], "edited": result.latents["edited"]}
    elif e.mode == "real":
        if not e.get("image"):
            raise UserError("edit.image is required for edit=fpe_real: give edit.image=path/to/photo.jpg")
        read_rgb(e.image)  # a missing or unreadable image fails before the model loads (the CLI checked it already)
        pipe = load_model(cfg)
        image = load_image(e.image, image_size(pipe), cfg.resize)
        report_reconstruction(round_trip_psnr(pipe, image), cfg)  # before the edit: can the model represent it?
        result = fpe_real(pipe, image, e.target_prompt, e.source_prompt, e.inversion,
                          null_text=plain(e.null_text), **common)
        print(reconstruction_line(reconstruction_psnr(result.images["reconstruction"], image),
                                  cfg.min_reconstruction_psnr, f"the {e.inversion} inversion"))
        names = {"input": "input", "reconstruction": f"reconstruction ({e.inversion})", "edited": e.target_prompt}
        latents = {k: result.latents[k] for k in ("inverted", "reconstruction", "edited")}
    else:
        raise UserError(f"edit.mode {e.mode!r} is not one of ['generated', 'real']")
    files = {}
    for name in names:
        files[name] = out / f"{name}.png"
        to_pil(result.images[name]).save(files[name])
    files["grid"] = out / "grid.png"
    labelled_grid([[(result.images[n], cap) for n, cap in names.items()]]).save(files["grid"])
    files["latents"] = out / "latents.safetensors"
    save_file({k: v.contiguous().cpu() for k, v in latents.items()}, str(files["latents"]))
    print(f"FPE ({e.mode}) on {len(result.info['layers'])} self layers; files in {out}")
    return {"files": files, "result": result}
