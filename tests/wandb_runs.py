"""Reading W&B offline runs as a user's `wandb sync` would upload them: the records of
``wandb/offline-run-*/run-*.wandb`` (a LevelDB-style log of protobuf ``Record``\\ s: a 7-byte file header,
then 32 KiB blocks of records, each with a 7-byte header — checksum, length, type full/first/middle/last).
wandb ≥ 0.20 no longer ships a Python reader (its core is in Go), so the tests read the format here."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _chunks(data: bytes):
    if len(data) < HEADER:  # a file W&B's service has only just created: nothing written yet
        return
    ident, magic, _version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1, "not a W&B run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if left < HEADER or (kind == 0 and length == 0):  # block padding
            pos += left
            continue
        if pos + HEADER + length > len(data):  # a record still being written: read again later
            return
        chunk, pos = data[pos + HEADER:pos + HEADER + length], pos + HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk


def _items(items) -> dict:
    return {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in items}


def read_run(path: str | Path) -> dict:
    """{"group", "job_type", "name", "tags", "config": {key: value}, "summary": {key: value},
    "history": [{key: value} per log call], "dir": the offline run's folder, "complete": its exit record
    was written} of one ``.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    out = {"config": {}, "summary": {}, "history": [], "dir": Path(path).parent, "complete": False}
    for raw in _chunks(Path(path).read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out.update(group=r.run_group, job_type=r.job_type, name=r.display_name, tags=list(r.tags))
            out["config"].update(_items(r.config.update))
        elif kind == "config":
            out["config"].update(_items(rec.config.update))
        elif kind == "summary":
            out["summary"].update(_items(rec.summary.update))
        elif kind == "history":
            out["history"].append(_items(rec.history.item))
        elif kind == "exit":
            out["complete"] = True
    out["config"].pop("_wandb", None)
    out["config"] = {k: v.get("value", v) if isinstance(v, dict) and set(v) <= {"value", "desc"} else v
                     for k, v in out["config"].items()}
    return out


def offline_runs(folder: str | Path, wait_s: float = 30.0) -> list[dict]:
    """Every offline run under ``folder``, oldest first, once each file holds its exit record (W&B's
    service may still be writing the end of a file when ``run.finish()`` has returned)."""
    deadline = time.monotonic() + wait_s
    while True:
        runs = [read_run(p) for p in sorted(Path(folder).rglob("offline-run-*/run-*.wandb"))]
        if all(r["complete"] for r in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.2)
