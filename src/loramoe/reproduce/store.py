"""Finished runs saved one small JSON file each, so that `loramoe reproduce` and its sweeps resume after an
interruption: a saved run is reused only when it was trained with the same configuration, base weights and
data, and a mismatch is an error rather than a silent mix of two experiments."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write to a temporary file in the same directory, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def fingerprint(config: Any) -> dict[str, Any]:
    """What makes a run this run: its training configuration without where it writes."""
    fields = config.to_dict()
    fields.pop("output_dir", None)
    fields["data"] = [Path(str(f)).name for f in fields["data"]]  # the same data wherever the output folder is
    return json.loads(json.dumps(fields, default=str))


def weights_sha256(model: torch.nn.Module) -> str:
    """Digest of every tensor of ``model``: a base re-trained in place (same path, new weights) is a new base."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def inputs_digest(base_sha256: str, files: list[Path]) -> dict[str, Any]:
    """The base weights and the data files' contents, which a configuration names only by path."""
    return {"base_weights_sha256": base_sha256,
            "data_sha256": {Path(f).name: hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files}}  # fmt: skip


def load_done(path: Path, config: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any] | None:
    """The saved result at ``path`` if there is one; an error if it was made by another experiment."""
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); delete it to recompute this run.") from None
    if result.get("train_config") != config:
        raise ValueError(f"{path}: recorded with a different training configuration than this run's; "
                         "use another --out or delete the file to recompute it.")  # fmt: skip
    if result.get("inputs") != inputs:
        raise ValueError(f"{path}: recorded with another base model or other data than this run's; "
                         "use another --out or delete the file to recompute it.")  # fmt: skip
    return result
