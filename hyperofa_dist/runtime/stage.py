"""The shape every stage shares: inputs -> fingerprint -> (up to date? stop) -> compute -> write -> manifest.

A stage's `run(config, tracker)` opens a `StageShell` with the stage directory and the inputs that decide its
result, in one shape for every stage: `{"config": config.fingerprint(<the sections and keys it reads>), <input>:
its identity by content, ...}` (the config is never spread at the top level, where a section could shadow an input
of the same name); the shell takes the stage's lock (one writer per stage
directory), answers whether the manifest already matches, opens the stage's MLflow run (named and tagged by the
stage; none when up to date), and writes the manifest last. What is computed in between is the stage's own pure
code.

"Up to date" is verified, not assumed: the manifest must record these inputs and every output it lists must be
there with its recorded size and sha256 (hashes cached by size and mtime, formats/rundir.py). A damaged output
rebuilds the stage, and the shell says which file. Inputs are recorded portably (paths inside the run directory
relative to it), so a moved run directory stays up to date.

    with StageShell.open(config, tracker, "mapping", Stage(run_dir, "mapping"), inputs) as shell:
        if shell.up_to_date:
            return 0
        ...validate, compute...
        shell.begin()                 # the stage directory is touched only now
        ...write outputs...
        shell.finish(outputs=[...], counts={...})
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from ..errors import HyperofaError
from ..formats.files import digest
from ..formats.rundir import Stage, portable
from ..formats.tokenizer import take_conversions


def say(command: str, text: str) -> None:
    """A progress or result line of a stage, on stderr (stdout carries only results: tables, bench JSON)."""
    print(f"hyperofa {command}: {text}", file=sys.stderr, flush=True)


CONFIG_INPUT = "config"  # the key of a stage's inputs that holds its config fingerprint


def check_inputs_shape(inputs: dict[str, Any], name: str) -> None:
    """A stage's inputs hold its config fingerprint under "config" (a programming error otherwise, not bad input)."""
    if not isinstance(inputs.get(CONFIG_INPUT), dict):
        raise TypeError(f"stage {name}: inputs must hold config.fingerprint(...) under {CONFIG_INPUT!r}, got keys "
                        f"{sorted(inputs)}")


def inputs_digest(config: Any, inputs: dict[str, Any]) -> str:
    """The digest a stage's manifest records for these inputs (paths inside the run directory made portable)."""
    return digest(portable(inputs, config.run_dir))


@dataclass
class StageShell:
    config: Any
    name: str  # the command name, for messages
    stage: Stage
    inputs: dict[str, Any]
    run: Any = None  # the stage's tracker run
    up_to_date: bool = False
    manifest: Optional[dict[str, Any]] = field(default=None)

    @property
    def digest(self) -> str:
        return digest(self.inputs)

    @property
    def path(self):
        return self.stage.path

    @classmethod
    @contextlib.contextmanager
    def open(
        cls,
        config: Any,
        tracker: Any,
        name: str,
        stage: Stage,
        inputs: dict[str, Any],
        *,
        run_name: Optional[str] = None,
        tags: Optional[dict[str, Any]] = None,
        resume_run_id: Optional[str] = None,
    ) -> Iterator["StageShell"]:
        """The stage's MLflow run is named `run_name` (default: the command name) and tagged with `tags`. An
        up-to-date stage opens no run: the command's parent run lists it in `hyperofa.reused`, so a re-run adds
        nothing else to the experiment. `resume_run_id`: the run of the interrupted job this one continues. The
        stage's lock is held until the block ends."""
        from ..tracking import NullTracker

        check_inputs_shape(inputs, name)
        shell = cls(config, name, stage, portable(inputs, config.run_dir))
        _refuse_non_directory(stage.path, name)
        with stage.lock(name) as lock:
            if lock.note:
                shell.say(lock.note)
            shell.up_to_date, damaged = stage.check(shell.digest)
            if shell.up_to_date:
                take_conversions()  # a converted tokenizer remade for an up-to-date stage: its record lies beside it
                shell.manifest = stage.manifest()
                shell.run = NullTracker()
                tracker.reused(run_name or name)
                shell.say(f"up to date ({stage.manifest_path})")
                yield shell
                return
            if damaged:
                more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
                shell.say(f"{damaged[0]}{more}; rebuilding the stage")
            with tracker.stage(run_name or name, config, tags=tags, resume_run_id=resume_run_id) as run:
                shell.run = run
                yield shell

    def say(self, text: str) -> None:
        say(self.name, text)

    def begin(self) -> None:
        """Open the stage directory for writing: the manifest goes first, so the stage never looks complete while
        its outputs are being replaced."""
        self.stage.manifest_path.unlink(missing_ok=True)
        self.stage.begin(self.digest)

    def finish(
        self,
        outputs: Iterable[Any],
        counts: Optional[dict[str, Any]] = None,
        extra: Optional[dict[str, Any]] = None,
    ) -> dict[str, Any]:
        """Hash the outputs and write the manifest, last: from now on the stage is complete. Tokenizers this
        stage converted (SentencePiece-only directories, formats/tokenizer.py) are recorded in it."""
        conversions = take_conversions()
        if conversions:
            extra = {**(extra or {}), "tokenizer_conversions": conversions}
        self.manifest = self.stage.write_manifest(
            config=self.config.effective(), inputs=self.inputs, outputs=outputs, counts=counts, extra=extra
        )
        if extra and "outputs" in extra:  # hashed by whoever wrote them (prepare's tasks): remember them as verified
            self.stage.remember_hashes(self.manifest["outputs"])
        return self.manifest


def _refuse_non_directory(path: Path, name: str) -> None:
    """The stage directory, or its nearest existing parent, is a directory: a file there (`<run.dir>/mapping`
    written by hand, a stray download) would fail the stage only when it writes, after all its work."""
    for where in (path, *path.parents):
        if where.is_dir():
            return
        if where.exists() or where.is_symlink():
            raise HyperofaError(f"{where}: exists and is not a directory; stage {name} writes {path} (move it away)")
