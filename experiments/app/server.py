"""Serving the page: loopback by default, uploads and results in a temporary folder removed on exit,
one queued job at a time on the one model."""

from __future__ import annotations

import os
import signal
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from omegaconf import DictConfig

from sdattn.errors import UserError, first_line

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_port(host: str, port: int) -> None:
    """A one-line error when ``port`` cannot be bound on ``host`` (in use, or not a port)."""
    if not 1 <= port <= 65535:
        raise UserError(f"app.port={port} is not a port: allowed 1..65535, or null for the first free one from 7860")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            s.bind((host, port))
    except OSError as e:
        raise UserError(f"app.port={port} cannot be served on {host}: {e.strerror or e}; give another app.port "
                        "(or app.port=null for the first free one from 7860)") from None


@contextmanager
def restored_env(name: str, value: str | None) -> Iterator[None]:
    """On exit, environment variable ``name`` is ``value`` again (unset when None)."""
    try:
        yield
    finally:
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@contextmanager
def running(cfg: DictConfig) -> Iterator[tuple[object, str, object]]:
    """The page on the configured model, serving in a background thread: yields (Gradio Blocks, local URL,
    its :class:`~experiments.app.backend.Backend`);
    on exit the server stops and its temporary folder (uploads, shown images) is removed."""
    a = cfg.app
    if str(a.host) not in LOOPBACK:
        print(f"app.host={a.host}: the page is reachable from other machines (no login); "
              "app.host=127.0.0.1 keeps it on this one")
    if a.port is not None:
        check_port(str(a.host), int(a.port))  # before the model loads
    previous = os.environ.get("GRADIO_TEMP_DIR")
    with tempfile.TemporaryDirectory(prefix="sdattn-app-") as tmp, restored_env("GRADIO_TEMP_DIR", previous):
        os.environ["GRADIO_TEMP_DIR"] = tmp  # read by gradio when imported and for every upload
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no telemetry calls
        from .backend import Backend
        from .ui import THEME, build

        backend = Backend(cfg)
        if a.warmup:  # the first UNet calls are slow (allocations, kernels): pay for them before serving
            backend.record(str(a.prompt), int(cfg.seed), int(a.self_layer))
        page = build(backend).queue(default_concurrency_limit=1)  # one model: one job at a time, in order
        try:
            try:
                page.launch(server_name=str(a.host), server_port=None if a.port is None else int(a.port),
                            share=bool(a.share), inbrowser=bool(a.open_browser), show_error=True, ssr_mode=False,
                            theme=THEME, prevent_thread_lock=True, quiet=True)
            except OSError as e:  # taken since the check, or no free port from 7860 on
                raise UserError(f"app.port={a.port} cannot be served on {a.host} ({first_line(e).split('. ')[0]}); "
                                "give another app.port (or app.port=null for the first free one)") from None
            print(f"serving on {page.local_url}" + (f" and {page.share_url}" if page.share_url else "")
                  + f"; uploads and shown images go to {tmp} (removed when the app stops); Ctrl-C stops it",
                  flush=True)
            yield page, page.local_url, backend
        finally:
            page.close()


def serve(cfg: DictConfig) -> dict:
    """Serve until Ctrl-C (or SIGTERM); returns the URL it served on."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with running(cfg) as (page, url, _):
            page.block_thread()  # returns on Ctrl-C / SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    return {"url": url}
