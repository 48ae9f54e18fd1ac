"""Weights fingerprints (sdattn.fingerprint) and the benchmark refusing rows of other weights under the
same model path or CLIP folder."""

import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from evaluation.metric_models import TOY_CLIP_PATH, clip_fingerprint
from evaluation.records import read_pairs
from evaluation.structure import structure_fingerprint
from experiments.run import dispatch
from sdattn.errors import UserError
from sdattn.fingerprint import hub_fingerprint, path_fingerprint, settings_fingerprint, source_fingerprint

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


def change_one_tensor(file: Path) -> None:
    """Add 1 to the first tensor of a safetensors file (same size, same metadata)."""
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(file)
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1
    save_file(tensors, file, metadata=metadata)


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """The tiny pipeline saved with save_pretrained (read-only here: tests copy it before changing it)."""
    from sdattn.models import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("saved") / "tiny"
    build_tiny_pipeline(Path(__file__).resolve().parents[1] / "datasets" / "tiny_vocab.txt").save_pretrained(folder)
    return folder


def test_folder_fingerprint_follows_the_weights_only(saved_tiny, tmp_path):
    folder = shutil.copytree(saved_tiny, tmp_path / "tiny")
    before = path_fingerprint(folder)
    assert before.startswith("sha256:") and before == path_fingerprint(saved_tiny)  # contents, not the path
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x").write_text("hub bookkeeping")
    (folder / "sdattn.yaml").write_text("steps: 3\n")  # settings reach the meta through the config
    assert path_fingerprint(folder) == before
    change_one_tensor(folder / UNET_FILE)  # after its digest was cached: the stat key changed
    changed = path_fingerprint(folder)
    assert changed != before and (folder / UNET_FILE).stat().st_size == (saved_tiny / UNET_FILE).stat().st_size
    shutil.copy(saved_tiny / UNET_FILE, folder / UNET_FILE)
    assert path_fingerprint(folder) == before
    (folder / "unet" / "extra.safetensors").write_bytes(b"")  # a new file counts
    assert path_fingerprint(folder) != before


def test_single_file_settings_and_hub_fingerprints(saved_tiny, tmp_path, monkeypatch):
    import huggingface_hub.constants

    single = saved_tiny / UNET_FILE
    assert source_fingerprint(single) == path_fingerprint(single) != path_fingerprint(saved_tiny)
    a = settings_fingerprint({"seed": 0, "sample_size": 16})
    assert a == settings_fingerprint({"sample_size": 16, "seed": 0})
    assert a != settings_fingerprint({"seed": 1, "sample_size": 16})
    # a hub id: the cached revision (what refs/main points to)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--org--model"
    for commit in ("abc123", "def456"):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "model_index.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert source_fingerprint("org/model", "model_index.json") == "hub:org/model@abc123"
    (repo / "refs" / "main").write_text("def456")
    assert hub_fingerprint("org/model", "model_index.json") == "hub:org/model@def456"
    assert hub_fingerprint("org/other", "model_index.json") == "hub:org/other@uncached"


def test_metric_model_fingerprints(tmp_path):
    if not (TOY_CLIP_PATH / "config.json").exists():
        pytest.skip("the toy CLIP is not in models/toy_clip")
    assert clip_fingerprint("toy") == path_fingerprint(TOY_CLIP_PATH)
    copy = shutil.copytree(TOY_CLIP_PATH, tmp_path / "clip")
    assert clip_fingerprint(str(copy)) == clip_fingerprint("toy")
    change_one_tensor(copy / "model.safetensors")
    assert clip_fingerprint(str(copy)) != clip_fingerprint("toy")
    assert clip_fingerprint("tiny-random") is None  # its name and fixed seed identify it
    assert structure_fingerprint(None) is None and structure_fingerprint("tiny-random") is None
    assert structure_fingerprint(str(copy)) == clip_fingerprint(str(copy))


def test_benchmark_refuses_rows_of_other_weights_under_the_same_path(saved_tiny, tmp_path, compose_cfg):
    if not (TOY_CLIP_PATH / "config.json").exists():
        pytest.skip("the toy CLIP is not in models/toy_clip")
    model = shutil.copytree(saved_tiny, tmp_path / "model")
    clip = shutil.copytree(TOY_CLIP_PATH, tmp_path / "clip")
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps([{"soure_prompt": "a red car", "edit_prompt": "a blue car"}]))

    def bench():
        return dispatch(compose_cfg(
            "experiment=table4", "data=car_fake_edit", f"data.path={data}", "model=local", f"model.path={model}",
            "model.steps=2", f"metrics.clip={clip}", "method=fpe", "logger=none", f"paths.log_dir={tmp_path / 'logs'}"))

    first = bench()
    meta = json.loads((Path(first["out_dir"]) / "meta.json").read_text())
    assert meta["model_fingerprint"] == path_fingerprint(model) and meta["clip_fingerprint"] == path_fingerprint(clip)
    pairs = Path(first["out_dir"]) / "pairs.jsonl"
    rows = pairs.read_text()
    assert [r["status"] for r in read_pairs(pairs)] == ["ok"]
    again = bench()  # same weights: resumed, nothing edited
    assert again["summary"].resumed == 1 and again["summary"].edited == [] and pairs.read_text() == rows

    saved_clip = (clip / "model.safetensors").read_bytes()
    change_one_tensor(clip / "model.safetensors")  # the CLIP scorer retrained in place
    with pytest.raises(UserError, match=r"holds rows made with other settings \(clip_fingerprint\);") as e:
        bench()
    assert "\n" not in str(e.value)
    (clip / "model.safetensors").write_bytes(saved_clip)  # the same contents again: resumes
    assert bench()["summary"].resumed == 1

    change_one_tensor(model / UNET_FILE)  # the model retrained in place
    with pytest.raises(UserError, match=r"holds rows made with other settings \(model_fingerprint\);"):
        bench()
    assert pairs.read_text() == rows and json.loads((Path(first["out_dir"]) / "meta.json").read_text()) == meta


def test_probe_feature_cache_follows_the_weights(saved_tiny, tmp_path, compose_cfg, capsys):
    model = shutil.copytree(saved_tiny, tmp_path / "model")
    probe = ["model=tiny", f"model.path={model}", "probe=cross_attn", "probe.n_per_class=2", "probe.layers=[3]",
             "probe.num_inference_steps=1", "probe.batch_size=40", "probe.shard=0/1", "logger=none"]

    def capture() -> str:  # a one-shard run: captures into the cache, trains no probes
        dispatch(compose_cfg(*probe))
        return capsys.readouterr().out

    first = capture()
    n = int(first.split("probe capture shard 0/1: ")[1].split(" of ")[0])
    assert n > 0 and f"{n} of {n} prompts captured now, 0 already cached" in first
    assert f"0 of {n} prompts captured now, {n} already cached" in capture()  # same weights: cache hit
    change_one_tensor(model / UNET_FILE)  # the model retrained in place, same path and settings
    assert f"{n} of {n} prompts captured now, 0 already cached" in capture()
    assert len(list((tmp_path / "cache" / "features").iterdir())) == 2
