"""Stage 1b: fine-tune the VAE *decoder* on full-size renders with the encoder frozen.

Stage 1 trains the VAE on random crops (cheap steps). GroupNorm statistics differ between crops
and full images, so the decoder is then fine-tuned on full 64x64 renders, as SD fine-tuned its
decoder ("ft-MSE"). The encoder and ``scaling_factor`` stay exactly as they were, so the latent
space the UNet is trained in does not change; this stage may run before, during or after stage 2.

    # from a stage-1 Lightning checkpoint, or a diffusers vae folder / pipeline folder
    python -m toyworld.finetune_decoder --vae outputs/train_toy/checkpoints/vae/last.ckpt \
        --out outputs/train_toy/vae_ft --minutes 14
    # put the decoder into a pipeline (checks the encoder is the pipeline's own)
    python -m toyworld.finetune_decoder --install outputs/train_toy/vae_ft --into models/toy
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from sdattn.env import set_process_defaults
from toyworld.evaluate import classify_image
from toyworld.model import build_vae
from toyworld.train import RenderStream, StepBudget, cosine_lr, fit_quietly
from toyworld.world import load_world


def load_vae(src: str | Path, channels=(16, 32, 32), image_size: int = 64):
    """AutoencoderKL from a stage-1 Lightning checkpoint, a vae folder or a pipeline folder."""
    from diffusers import AutoencoderKL

    p = Path(src)
    if p.suffix == ".ckpt":
        vae = build_vae(image_size, list(channels))
        sd = torch.load(p, map_location="cpu", weights_only=False)["state_dict"]
        vae.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("vae.")})
        return vae
    if (p / "vae").is_dir():
        p = p / "vae"
    return AutoencoderKL.from_pretrained(str(p), local_files_only=True)


class DecoderModule(L.LightningModule):
    def __init__(self, vae, lr: float, progress: StepBudget, warmup: int = 50):
        super().__init__()
        self.vae, self.lr, self.progress, self.warmup = vae, lr, progress, warmup
        self.vae.encoder.requires_grad_(False).eval()
        self.vae.quant_conv.requires_grad_(False)

    def training_step(self, batch, _):
        x, _prompts = batch
        lr = cosine_lr(self.lr, self.global_step, self.progress(self.global_step), self.warmup)
        for g in self.optimizers().optimizer.param_groups:
            g["lr"] = lr
        with torch.no_grad():
            z = self.vae.encode(x).latent_dist.sample()
        rec = self.vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        mse = (rec - x).pow(2).mean()
        loss = l1 + mse
        self.log_dict({"dec/loss": loss, "dec/l1": l1, "dec/lr": lr}, prog_bar=True, on_step=True)
        return loss

    def configure_optimizers(self):
        params = list(self.vae.decoder.parameters()) + list(self.vae.post_quant_conv.parameters())
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)


def finetune_decoder(vae, minutes: float, steps: int = 100000, batch: int = 16, lr: float = 5e-4,
                     seed: int = 0, work_dir: str | Path = "outputs/train_toy", progress_every: int = 25,
                     grammar=None):
    """Fine-tune ``vae``'s decoder in place for ``minutes`` (or ``steps``); returns the step count."""
    world = load_world(grammar)
    vae.train()
    mod = DecoderModule(vae, lr, StepBudget(steps, minutes * 60))
    from lightning.pytorch.loggers import CSVLogger

    tr = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_time={"seconds": max(1, int(minutes * 60))},
                   logger=CSVLogger(str(work_dir), name="csv-decoder"), enable_checkpointing=False,
                   callbacks=[TQDMProgressBar(refresh_rate=progress_every)], log_every_n_steps=progress_every,
                   num_sanity_val_steps=0)
    loader = torch.utils.data.DataLoader(RenderStream(world, batch, seed + 31), batch_size=None, num_workers=0)
    fit_quietly(tr, mod, loader)
    vae.eval().requires_grad_(False)
    return int(tr.global_step)


@torch.no_grad()
def recon_report(vae, n: int = 100, seed: int = 5, grammar=None) -> dict:
    world = load_world(grammar)
    rng = np.random.default_rng(seed)
    rs = [world.render_random(rng=rng) for _ in range(n)]
    x = torch.from_numpy(np.stack([r.image for r in rs])).permute(0, 3, 1, 2).float() / 127.5 - 1
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    mae = float((rec - x).abs().mean() * 127.5)
    imgs = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    c_ok = s_ok = 0
    for r, im in zip(rs, imgs):
        c, s, _ = classify_image(im, world)
        c_ok += c == r.color
        s_ok += s == r.shape
    return {"recon_mae_255": mae, "checker_color_on_recon": c_ok / n, "checker_shape_on_recon": s_ok / n}


def install(vae_dir: str | Path, pipeline_dir: str | Path) -> None:
    """Copy a fine-tuned vae into a pipeline after checking its encoder is the pipeline's own."""
    from safetensors.torch import load_file

    new, old = Path(vae_dir), Path(pipeline_dir) / "vae"
    a, b = load_file(str(new / "diffusion_pytorch_model.safetensors")), load_file(
        str(old / "diffusion_pytorch_model.safetensors"))
    enc = [k for k in a if k.startswith(("encoder.", "quant_conv."))]
    bad = [k for k in enc if not torch.equal(a[k], b[k])]
    if bad:
        raise ValueError(f"encoder of {new} differs from {old} ({len(bad)} tensors): not the same latent space")
    ca, cb = json.loads((new / "config.json").read_text()), json.loads((old / "config.json").read_text())
    skip = {"scaling_factor", "_diffusers_version", "_name_or_path"}
    diff = [k for k in set(ca) | set(cb) if k not in skip and ca.get(k) != cb.get(k)]
    if diff:
        raise ValueError(f"vae configs differ in {diff}")
    # weights only: the pipeline keeps its config (and scaling_factor = 1/std of this same encoder)
    shutil.copy2(new / "diffusion_pytorch_model.safetensors", old / "diffusion_pytorch_model.safetensors")
    meta = Path(pipeline_dir) / "toy_model.json"
    if meta.exists() and (new / "decoder_finetune.json").exists():
        m = json.loads(meta.read_text())
        m["decoder_finetune"] = json.loads((new / "decoder_finetune.json").read_text())
        meta.write_text(json.dumps(m, indent=2))
    print(f"[toyworld] installed decoder {new} -> {old}")


def main(argv=None):
    set_process_defaults()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vae", help="stage-1 .ckpt, vae folder or pipeline folder")
    ap.add_argument("--scaling-factor", type=float, default=None,
                    help="scaling_factor to record (default: the source's, or the pipeline's)")
    ap.add_argument("--out", default="outputs/train_toy/vae_ft")
    ap.add_argument("--minutes", type=float, default=14)
    ap.add_argument("--steps", type=int, default=100000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--install", help="vae folder to install (with --into)")
    ap.add_argument("--into", help="pipeline folder")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.install:
        install(a.install, a.into)
        return
    vae = load_vae(a.vae)
    vae.eval()
    before = recon_report(vae)
    print(f"[toyworld] decoder before: {before}", flush=True)
    t0 = time.time()
    steps = finetune_decoder(vae, a.minutes, a.steps, a.batch, a.lr, a.seed,
                             work_dir=Path(a.out).parent)
    after = recon_report(vae)
    print(f"[toyworld] decoder after {steps} steps: {after}", flush=True)
    if a.scaling_factor is not None:
        vae.register_to_config(scaling_factor=a.scaling_factor)
    out = Path(a.out)
    vae.save_pretrained(str(out), safe_serialization=True)
    (out / "decoder_finetune.json").write_text(json.dumps(
        {"source": str(a.vae), "steps": steps, "minutes": round((time.time() - t0) / 60, 2), "batch": a.batch,
         "lr": a.lr, "before": before, "after": after}, indent=2))


if __name__ == "__main__":
    main()
