"""The hidden work folder next to the output: what a long compression has done so far, so it can resume.

``.NAME.compress-work/`` (NAME: the output folder's name) holds

* ``settings.json``: everything that decides the result (source identity, layers, width, healing, calibration
  text digest, seed, ...), but not the budget: a run with more budget continues where the last one stopped;
* ``plan.json``: the layer scores and the choice (written once the scoring is done);
* ``stage-*``: checkpoints of the student model, each a folder written under a temporary name and renamed, then
  named in ``latest.json`` (replaced atomically).  Only the newest complete one is kept.

A run whose settings match an existing work folder resumes from its latest checkpoint; one whose settings differ
starts afresh (or is refused with ``resume=True``).  The folder is removed once the output is in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from edgelm.errors import InvalidParameterError
from edgelm.home import write_atomic


def _write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True))


def source_identity(source: Path) -> dict[str, Any]:
    """What identifies a checkpoint folder cheaply: its config and the size and mtime of each weight file."""
    files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix in (".safetensors", ".json"))
    return {"path": str(source.resolve()),
            "files": {p.name: [p.stat().st_size, int(p.stat().st_mtime)] for p in files}}


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


class WorkDir:
    def __init__(self, output: Path, settings: dict[str, Any]) -> None:
        self.output = output
        self.path = output.parent / f".{output.name}.compress-work"
        self.settings = settings
        self.key = digest(settings)

    # --- opening -------------------------------------------------------------------------------------------

    def existing_key(self) -> str | None:
        try:
            return json.loads((self.path / "settings.json").read_text(encoding="utf-8")).get("key")
        except (OSError, ValueError):
            return None

    def open(self, resume: bool | None) -> bool:
        """Prepare the folder; True when an earlier run's state is there to continue from.

        resume=None: continue when the settings match, else start afresh; True: continuing is required;
        False: always start afresh."""
        found = self.existing_key()
        if resume is True and found != self.key:
            why = "there is none" if found is None else "it was made with other settings"
            raise InvalidParameterError(
                f"resume was asked for, but no work folder of these settings is next to the output ({self.path}: "
                f"{why}).", fix="Repeat the options of the interrupted run, or drop --resume to start afresh.",
                parameter="resume", value=True)
        if found is not None and found == self.key and resume is not False:
            return True
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True)
        _write_json(self.path / "settings.json", {"key": self.key, "settings": self.settings})
        return False

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    # --- small records ---------------------------------------------------------------------------------------

    def read(self, name: str) -> Any:
        try:
            return json.loads((self.path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def write(self, name: str, data: Any) -> None:
        _write_json(self.path / name, data)

    # --- checkpoints -----------------------------------------------------------------------------------------

    def latest(self) -> tuple[Path, dict[str, Any]] | None:
        """(folder, its state record) of the newest complete checkpoint, or None."""
        rec = self.read("latest.json")
        if not rec:
            return None
        folder = self.path / rec["folder"]
        if not (folder / "state.json").is_file():
            return None
        return folder, json.loads((folder / "state.json").read_text(encoding="utf-8"))

    def checkpoint(self, name: str, write: Any, state: dict[str, Any]) -> Path:
        """Write a checkpoint: ``write(folder)`` fills a temporary folder, then it is renamed and named in
        latest.json; the previous checkpoint is removed after that.  An interruption at any point leaves the
        previous complete checkpoint in force."""
        previous = self.latest()
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.path))
        try:
            write(tmp)
            _write_json(tmp / "state.json", state)  # last: a folder without it is incomplete
            final = self.path / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.write("latest.json", {"folder": name})
        if previous is not None and previous[0] != final:
            shutil.rmtree(previous[0], ignore_errors=True)
        return final
