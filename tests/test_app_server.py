"""The attention explorer served on the toy model on a free local port: its API through gradio_client, then
one real browser (Playwright driving the system Chromium); the command itself (``python -m experiments.run
task=app``) in a slow test. Skipped with the reason where the app extra, Playwright or Chromium is missing."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest

from .conftest import ROOT, SHARED

pytest.importorskip("gradio", reason="the app extra is not installed: pip install '.[app]'")
gradio_client = pytest.importorskip("gradio_client", reason="the app extra is not installed: pip install '.[app]'")

PROMPT = "a red star in the park"
STARTUP_S = 240  # the command: imports, model load and warm-up on a busy 2-core CPU
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The page served in this process on a free port (as ``task=app`` serves it, without the CLI's start-up):
    ``url`` and its temporary folder; ``stop()`` closes it."""

    def __init__(self, out: Path):
        if not (ROOT / "models" / "toy" / "model_index.json").exists():
            pytest.skip("the toy-world model is not in models/toy")
        from experiments.app.backend import compose_run
        from experiments.app.server import running

        overrides = ["task=app", f"app.port={free_port()}", "logger=none", f"paths.output_dir={out}"]
        self.stack = ExitStack()
        page, self.url, _ = self.stack.enter_context(running(compose_run(overrides)))
        self.url = self.url.rstrip("/")
        self.tmp = Path(os.environ["GRADIO_TEMP_DIR"])

    def stop(self) -> None:
        self.stack.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("app-run"))
    yield s
    s.stop()


@pytest.fixture
def client(server, tmp_path):
    return gradio_client.Client(server.url, verbose=False, download_files=str(tmp_path))


def generate(client, prompt: str, seed: int = 0):
    """/generate with the page's defaults: all 7 cross layers, every step, mean over heads, self layer 6."""
    return client.predict(prompt, seed, [1, 2, 3, 4, 5, 6, 7], 0, 24, "mean", 6, 0, 24, "mean", 6,
                          api_name="/generate")


def test_maps_for_every_word(client):
    image, words, comps, pixel, status = generate(client, PROMPT)
    assert [w["caption"] for w in words] == PROMPT.split()
    arrays = [np.asarray(_image(w["image"])) for w in words]
    assert all(a.shape == arrays[0].shape for a in arrays) and Path(image).is_file()
    assert np.abs(arrays[1].astype(int) - arrays[2].astype(int)).max() > 30  # "red" and "star" differ
    assert len(comps) == 6 and "6 words × 7 cross layers × 25 steps" in status
    one_head, status = client.predict([6], 5, 10, "2", api_name="/cross_maps")  # controls: no new sampling
    assert len(one_head) == 6 and "cross maps" in status
    shown, status = client.predict(0.5, 0.5, api_name="/pixel")
    assert Path(shown).is_file() and "(0.50, 0.50)" in status


def test_fpe_edit_returned(client):
    grid, scores, status = client.predict("a white car", "a red car", 42, None, ["fpe"], "fpe: {layers: 2-5}",
                                          api_name="/edit")
    assert [g["caption"] for g in grid] == ["fpe: source", "fpe: edited", "plain target (same noise, no edit)"]
    rows = {r[0]: r for r in scores["data"]}
    assert rows["fpe"][1] > 0 and 0 < rows["fpe"][2] <= 100 and rows["fpe"][4] == ""
    assert "1 of 1 methods edited" in status


def test_bad_inputs_show_one_line_and_the_server_keeps_serving(client, server, tmp_path):
    with pytest.raises(gradio_client.exceptions.AppError, match=r"error: prompt 'a purple unicorn' has words "
                       r"outside this model's vocabulary: \['unicorn'\]"):
        generate(client, "a purple unicorn")
    junk = tmp_path / "holiday.png"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(gradio_client.exceptions.AppError, match="'holiday.png' cannot be read as an image"):
        client.predict("", "a red car", 0, gradio_client.handle_file(str(junk)), ["fpe"], "", api_name="/edit")
    assert list(server.tmp.rglob("holiday.png")), "the upload is kept in the app's temporary folder"
    with pytest.raises(gradio_client.exceptions.AppError, match="error: .*self_replace_steps"):
        client.predict("a white car", "a red car", 0, None, ["fpe"], "fpe: {self_replace_steps: 2}", api_name="/edit")
    image, words, *_ = generate(client, "a blue circle")  # still serving
    assert [w["caption"] for w in words] == ["a", "blue", "circle"]


def test_real_photo_and_probe_run(client, tmp_path):
    photo = SHARED / "benchmarks" / "fpe" / "000141.jpg"
    if photo.is_file():
        grid, scores, _ = client.predict("", "a red car", 0, gradio_client.handle_file(str(photo)), ["fpe"], "",
                                         api_name="/edit")
        assert [g["caption"] for g in grid][2] == "plain target (same seed, no edit)"
    folder = tmp_path / "probe-run"  # what the probe task leaves (config as Hydra saves it, one table)
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(
        "task: null\nedit: null\nprobe: {name: cross_attn, kind: cross}\n"
        "model: {name: tiny, settings: {source: SD-1.x defaults (sd1x.yaml)}}\n")
    (folder / "cross_attn.csv").write_text("class,L3,L6,Avg\nred,81.2 ± 3.4,40.0 ± 0.0,60.6 ± 1.7\n")
    heat, text = client.predict(None, str(folder), api_name="/probe")
    assert _image(heat).size[0] > 100 and "81.2" in text and "60.6" in text


def _image(path):
    from PIL import Image

    return Image.open(path).convert("RGB")


def chromium() -> str:
    found = os.environ.get("SDATTN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("no Chromium here (Debian: apt-get install -y chromium; or SDATTN_CHROMIUM=<binary>)")
    return found


def test_in_a_real_browser(server, tmp_path):
    """Open the page, generate, see per-word maps that differ, run an FPE edit and see the edited image.
    SDATTN_APP_SCREENSHOT=<file.png> keeps the screenshot of the Maps tab (docs/app.png is one)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: pip install playwright")
    from PIL import Image

    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=chromium(),
                                                       headless=True, args=CHROMIUM_ARGS,
                                                       viewport={"width": 1400, "height": 1100})
        try:
            page = context.new_page()
            page.goto(server.url)
            page.get_by_label("prompt", exact=True).fill(PROMPT)
            page.locator("#maps-generate").click()
            page.wait_for_function("document.querySelectorAll('#maps-words img').length == 6", timeout=120_000)
            srcs = page.locator("#maps-words img").evaluate_all("els => els.map(e => e.src)")
            maps = [np.asarray(Image.open(BytesIO(page.request.get(s).body())).convert("RGB")) for s in srcs]
            assert maps[1].shape == maps[2].shape and np.abs(maps[1].astype(int) - maps[2].astype(int)).max() > 30
            page.wait_for_function("document.querySelectorAll('#maps-components img').length == 6")
            page.locator("#maps-image img").click()  # the centre: what it attends to
            page.wait_for_function("document.querySelectorAll('#maps-pixel img').length == 1", timeout=60_000)
            shot = tmp_path / "app.png"
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get("SDATTN_APP_SCREENSHOT"):  # a 256-colour PNG: a third of the size, same look
                Image.open(shot).convert("RGB").quantize(256).save(os.environ["SDATTN_APP_SCREENSHOT"], optimize=True)
            page.get_by_role("tab", name="Edit").click()
            page.locator("#edit-run").click()
            page.wait_for_function("[...document.querySelectorAll('#edit-grid img')].filter("
                                   "e => e.complete && e.naturalWidth > 0).length == 3", timeout=120_000)
            page.locator("#edit-grid").get_by_text("fpe: edited").first.wait_for(timeout=10_000)
        finally:
            context.close()


def test_stops_cleanly_and_removes_its_temporary_folder(server):
    """Last in this file: the server stops; uploads and shown images are gone with its temporary folder."""
    assert server.tmp.is_dir()
    server.stop()
    assert not server.tmp.exists()


@pytest.mark.slow
def test_the_command_serves_and_stops_on_sigterm(tmp_path):
    """``python -m experiments.run task=app`` as a user starts it: it serves the page on the port asked, and
    SIGTERM (as Ctrl-C) stops it with exit status 0 and its temporary folder removed."""
    import urllib.request

    if not (ROOT / "models" / "toy" / "model_index.json").exists():
        pytest.skip("the toy-world model is not in models/toy")
    port = free_port()
    cmd = [sys.executable, "-m", "experiments.run", "task=app", f"app.port={port}", "threads=1", "logger=none",
           f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, found = [], None
    try:
        deadline = time.monotonic() + STARTUP_S
        while found is None and time.monotonic() < deadline and (line := proc.stdout.readline()):
            lines.append(line)
            found = re.search(r"serving on (http://127\.0\.0\.1:(\d+))/?;.* go to (\S+) \(removed", line)
        assert found, "the app did not start:\n" + "".join(lines[-20:])
        assert int(found[2]) == port
        assert urllib.request.urlopen(found[1], timeout=30).status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(120)
    assert rc == 0 and not Path(found[3]).exists()
