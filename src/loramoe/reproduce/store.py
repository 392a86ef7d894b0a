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
    # the same data and base wherever the checkout and the output folder are (their contents are in the inputs' sha256)
    fields["data"] = [Path(str(f)).name for f in fields["data"]]
    fields["model"] = Path(str(fields["model"])).name
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


def same_config(saved: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any]) -> bool:
    """Whether a saved configuration is the current one. A key the saved one lacks (a setting added to the library
    after the run was saved) matches when the current value is that setting's default: the run was trained the
    way the default trains, so a study saved by an older version still resumes."""
    if set(saved) - set(current):
        return False
    return all(saved[k] == v if k in saved else k in defaults and defaults[k] == v for k, v in current.items())


def load_done(path: Path, config: dict[str, Any], inputs: dict[str, Any],
              defaults: dict[str, Any] | None = None) -> dict[str, Any] | None:  # fmt: skip
    """The saved result at ``path`` if there is one; an error if it was made by another experiment.
    ``defaults``: the configuration's default values (see `same_config`)."""
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); delete it to recompute this run.") from None
    if not same_config(result.get("train_config") or {}, config, defaults or {}):
        raise ValueError(f"{path}: recorded with a different training configuration than this run's; "
                         "use another --out or delete the file to recompute it.")  # fmt: skip
    if result.get("inputs") != inputs:
        raise ValueError(f"{path}: recorded with another base model or other data than this run's; "
                         "use another --out or delete the file to recompute it.")  # fmt: skip
    return result
