"""Checkpoints: a model, its optimizer and the training state in one ``.npz`` file.

The file holds plain arrays only (it is read with ``allow_pickle=False``):

* ``model/<name>``: every parameter and buffer (:meth:`Module.state_dict`);
* ``optimizer/<index>/<key>``: the optimizer's per-parameter buffers;
* ``info``: a JSON document (a 0-d unicode array) with the format version, the
  optimizer's settings and scalar state, and a free-form ``extra`` dict (epoch,
  schedule, random-generator states, history, configuration).

Writes are atomic: the file is written next to its destination under a
temporary name, flushed to disk, and renamed over the destination with
``os.replace``, so a crash leaves either the old checkpoint or the new one.
Loading reads and checks everything before it changes anything; a truncated
or corrupt file raises :class:`CheckpointError`.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the model and optimizer it is loaded into."""


@dataclass
class Checkpoint:
    """The contents of a checkpoint file, read into memory."""

    model_state: dict
    optimizer_state: dict | None = None
    extra: dict = field(default_factory=dict)


def save_checkpoint(path, model, optimizer=None, extra: dict | None = None) -> None:
    """Write ``model``'s and ``optimizer``'s state and ``extra`` (JSON-able) to ``path``."""
    path = Path(path)
    arrays = {f"model/{name}": value for name, value in model.state_dict().items()}
    info = {"format": FORMAT_VERSION, "extra": extra or {}, "optimizer": None}
    if optimizer is not None:
        state = optimizer.state_dict()
        scalars = {}
        for index, entries in state["state"].items():
            for key, value in entries.items():
                if isinstance(value, np.ndarray):
                    arrays[f"optimizer/{index}/{key}"] = value
                else:
                    scalars.setdefault(str(index), {})[key] = value
        info["optimizer"] = {"param_groups": state["param_groups"], "scalars": scalars}
    arrays["info"] = np.array(json.dumps(info))
    _atomic_savez(path, arrays)


def _atomic_savez(path: Path, arrays: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            np.savez(out, **arrays)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def load_checkpoint(path) -> Checkpoint:
    """Read a whole checkpoint into memory, or raise :class:`CheckpointError` saying why."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    with open(path, "rb") as handle:
        if handle.read(4) != b"PK\x03\x04":  # every .npz is a zip archive
            raise CheckpointError(
                f"checkpoint {path} is not an .npz archive (truncated or corrupt); nothing "
                "was loaded. Use an earlier checkpoint or train from scratch"
            )
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        info = json.loads(str(arrays.pop("info")))
    except KeyError:
        raise CheckpointError(
            f"checkpoint {path} has no 'info' entry: it is not an rbprop checkpoint"
        ) from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(error).__name__}: {error}); "
            "nothing was loaded. Use an earlier checkpoint or train from scratch"
        ) from None
    if not isinstance(info, dict) or info.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format {info.get('format')!r}, this version reads "
            f"{FORMAT_VERSION}"
        )

    model_state = {}
    optimizer_arrays: dict = {}
    for name, value in arrays.items():
        section, _, rest = name.partition("/")
        if section == "model":
            model_state[rest] = value
        elif section == "optimizer":
            index, _, key = rest.partition("/")
            optimizer_arrays.setdefault(int(index), {})[key] = value
        else:
            raise CheckpointError(f"checkpoint {path}: unexpected entry {name!r}")

    optimizer_state = None
    if info.get("optimizer") is not None:
        state = optimizer_arrays
        for index, entries in info["optimizer"]["scalars"].items():
            state.setdefault(int(index), {}).update(entries)
        optimizer_state = {"param_groups": info["optimizer"]["param_groups"], "state": state}
    return Checkpoint(model_state, optimizer_state, info.get("extra", {}))


def restore(checkpoint: Checkpoint, model, optimizer=None, path="checkpoint") -> None:
    """Load a checkpoint's state into ``model`` (and ``optimizer``), all or nothing."""
    try:
        model.check_state_dict(checkpoint.model_state)
        if optimizer is not None:
            if checkpoint.optimizer_state is None:
                raise ValueError("it holds no optimizer state")
            optimizer.check_state_dict(checkpoint.optimizer_state)
    except ValueError as error:
        raise CheckpointError(f"{path} does not fit this model/optimizer: {error}") from None
    model.load_state_dict(checkpoint.model_state)
    if optimizer is not None:
        optimizer.load_state_dict(checkpoint.optimizer_state)
