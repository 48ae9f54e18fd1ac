import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PHOTO = SHARED / "benchmarks" / "fpe" / "000141.jpg"  # the real photo in ../shared beside the checkout (as in CI)
needs_photo = pytest.mark.skipif(not PHOTO.is_file(), reason="../shared/benchmarks/fpe/000141.jpg is missing")

torch.set_num_threads(1)  # small models: one thread is fastest and immune to a busy second core


@pytest.fixture(scope="session")
def tiny_pipe():
    from sdattn.models import build_tiny_pipeline

    return build_tiny_pipeline(ROOT / "datasets" / "tiny_vocab.txt", seed=0)


@pytest.fixture
def compose_cfg(tmp_path):
    """compose_cfg(*overrides) → a run config on the tiny model (unless overridden) writing under tmp_path."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import experiments.run  # noqa: F401  (registers the project_root resolver)

    def _compose(*overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose("run", overrides=["model=tiny", f"paths.output_dir={tmp_path / 'out'}",
                                            f"paths.cache_dir={tmp_path / 'cache'}", "progress=false",
                                            *overrides])
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def toy_pipe():
    """The shipped toy-world model (a trained, smooth model: what inversion tests need)."""
    from sdattn.models import load_pipeline

    path = ROOT / "models" / "toy"
    if not (path / "model_index.json").exists():
        pytest.skip("the toy-world model is not in models/toy")
    return load_pipeline(path=str(path))


@pytest.fixture
def make_method(compose_cfg):
    """make_method(name, **settings) → the edit callable of ``configs/method/<name>.yaml`` on the tiny
    model's defaults, ``settings`` merged over the config's (nested dicts merge key by key)."""
    from omegaconf import OmegaConf

    from editing.methods import build_method

    def _make(name: str, **settings):
        node = OmegaConf.create(OmegaConf.to_container(compose_cfg(f"method={name}").method, resolve=True))
        return build_method(OmegaConf.merge(node, settings))[1]

    return _make


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """plugin(module, code, group, name, yaml) → the ``hydra.searchpath=...`` override that finds
    ``<group>/<name>.yaml`` (``yaml``) in another config dir, with ``<module>.py`` (``code``) importable:
    a method or metric added the way a user adds one."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def _add(module: str, code: str, group: str, name: str, yaml: str) -> str:
        (tmp_path / f"{module}.py").write_text(code)
        (tmp_path / "conf" / group).mkdir(parents=True, exist_ok=True)
        (tmp_path / "conf" / group / f"{name}.yaml").write_text(yaml)
        return f"hydra.searchpath=[file://{tmp_path / 'conf'}]"

    return _add
