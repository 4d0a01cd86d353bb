"""One checkpointer for both DeepSpeed jobs: hypernet (a checkpoint per epoch) and pretrain (per step).

It owns, for both: the tag names (`epoch00007`, `step00000040`; no other module spells or globs them), the save
(every rank's part, then the commit), the commit (rank 0, once every rank has written: the sha256 of every file of
the tag, then `latest`), keeping the newest `<section>.keep_checkpoints` tags, the one line a full disk gives, and,
in the stage before anything is launched, the plan of how a job starts over the checkpoints it finds:

- resume: the tag `latest` names, verified against its recorded sha256 and its provenance (runtime/job.py), written
  by as many ranks as this launch has (pretrain can go through a universal checkpoint instead);
- a fresh run over checkpoints of a run that did not finish (no manifest: killed, stopped on purpose, or failed) is
  refused: that training is only in the checkpoints, and a forgotten `resume=true` must not destroy it;
- a fresh run over checkpoints of a finished run (its manifest exists: the inputs changed, so the stage is being
  rebuilt) removes them, as every stage replaces its stale outputs; so is a directory no `latest` names (nothing
  in it was ever committed).

The file layout (`latest`, `hyperofa.json`, `hyperofa.sha256.json`, RNG files) is formats/jobdir.py's.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from ..errors import HyperofaError
from ..formats.files import LOW_SPACE, disk_full, free_bytes
from ..formats.jobdir import (
    PROVENANCE, checkpoint_dir, latest_tag, read_client_info, write_checkpoint_hashes, write_client_info,
    write_latest, write_rng,
)
from .job import check_resume, fresh_provenance, weights_only_loads


@dataclass(frozen=True)
class JobKind:
    unit: str  # what a tag counts: "epoch" or "step"
    digits: int
    universal: bool  # whether a resume on another rank count can go through a universal checkpoint


KINDS = {"hypernet": JobKind("epoch", 5, universal=False), "pretrain": JobKind("step", 8, universal=True)}
UNIVERSAL_SUFFIX = "_universal"


def universal_tag(tag: str) -> str:
    """Where `ds_to_universal` puts its conversion of checkpoint `tag` (docs/DISTRIBUTED.md §2.4)."""
    return tag + UNIVERSAL_SUFFIX


def checkpoints_to_write(saves_left: int, kept: int, keep: Optional[int]) -> int:
    """Checkpoints that lie on disk beyond the `kept` ones at the peak, with `saves_left` still to come: all of
    them when every checkpoint is kept, else up to keep + 1 (the newest is committed before the oldest goes)."""
    if saves_left <= 0:
        return 0
    if keep is None:
        return saves_left
    return min(saves_left, max(1, keep + 1 - kept))


@dataclass(frozen=True)
class StartPlan:
    """How the stage starts its job: resume from `resume_tag` (None: a fresh start), through a universal
    checkpoint or not; the provenance the job records; whether the checkpoints directory is removed first."""

    resume_tag: Optional[str]
    universal: bool
    provenance: dict[str, Any]
    clear: bool


class Checkpointer:
    """The checkpoints of one job directory, as the stage (rank 0, no process group) or a rank sees them."""

    def __init__(self, out: Path, section: str, *, keep: Optional[int] = None, rank: int = 0,
                 barrier: Callable[[], None] = lambda: None):
        self.section = section
        self.kind = KINDS[section]
        self.dir = checkpoint_dir(Path(out))
        self.keep = keep
        self.rank = rank
        self.barrier = barrier
        self._pattern = re.compile(rf"{self.kind.unit}(\d{{{self.kind.digits}}})")

    # --- names ---------------------------------------------------------------------------------------------------

    def tag(self, position: int) -> str:
        return f"{self.kind.unit}{position:0{self.kind.digits}d}"

    def position(self, tag: str) -> Optional[int]:
        found = self._pattern.fullmatch(tag)
        return int(found.group(1)) if found else None

    def tags(self) -> list[str]:
        """The tag directories present (committed or not), oldest first; universal conversions not included."""
        if not self.dir.is_dir():
            return []
        found = [p.name for p in self.dir.iterdir() if p.is_dir() and self.position(p.name) is not None]
        return sorted(found, key=lambda name: self.position(name))

    def latest(self) -> Optional[str]:
        return latest_tag(self.dir)

    def where(self, tag: Optional[str] = None) -> Path:
        return self.dir / tag if tag else self.dir

    # --- the stage, before launch ----------------------------------------------------------------------------

    def plan_start(self, *, resume: bool, finished: bool, world: int, fingerprint: dict[str, Any],
                   allow_change: bool, universal: bool = False,
                   convert: Optional[Callable[[Path, str], str]] = None) -> StartPlan:
        """Check the checkpoints against this launch (nothing is removed here; `clear` says the stage must).

        `finished`: the stage's manifest exists, so the checkpoints belong to a run whose result was written."""
        last = self.latest()
        if not resume:
            if last is not None and not finished:
                raise HyperofaError(
                    f"{self.dir}: checkpoints of an earlier run exist and it did not finish (`latest` names {last}); "
                    f"set {self.section}.resume=true to continue it, or remove the directory to start over"
                )
            return StartPlan(None, False, fresh_provenance(fingerprint), clear=True)
        if last is None:
            raise HyperofaError(f"{self.dir}: no checkpoint to resume from ({self.section}.resume=true)")
        provenance = check_resume(self.dir, last, fingerprint, allow=allow_change, position=self.kind.unit,
                                  allow_key=f"{self.section}.allow_config_change")
        if universal and self.kind.universal and convert is not None:
            return StartPlan(convert(self.dir, last), True, provenance, clear=False)
        self.check_world(last, (read_client_info(self.dir, last) or {}).get("world_size"), world)
        return StartPlan(last, False, provenance, clear=False)

    def check_world(self, tag: str, written_by: Any, world: int) -> None:
        """A ZeRO checkpoint is sharded by rank: it loads only on the rank count that wrote it."""
        if written_by is None or written_by == world:
            return
        remedy = (f"set {self.section}.universal=true to resume through a universal checkpoint" if self.kind.universal
                  else f"resume with {written_by} ranks")
        raise HyperofaError(f"{self.dir / tag}: written by {written_by} ranks, this launch has {world}; {remedy}")

    def failure(self, code: int, out: Path) -> str:
        """The stage's one line for a job that exited non-zero without a report of its own."""
        last = self.latest()
        kept = f"; the last checkpoint is {self.dir / last} (resume with {self.section}.resume=true)" if last else ""
        free = free_bytes(out)
        full = f": {out} is on a full filesystem ({free} bytes free)" if free < LOW_SPACE else ""
        return f"the {self.section} training job exited with status {code}{full}{kept}"

    # --- the ranks ---------------------------------------------------------------------------------------------

    def save(self, engine: Any, position: int, client_state: dict[str, Any], *, info: dict[str, Any],
             provenance: Any, rng: Optional[dict[str, Any]] = None) -> str:
        """Every rank: its part of the tag (its RNG states when given; rank 0 also `hyperofa.json`: `info` and the
        provenance), then the commit, then (rank 0) the oldest tags beyond `keep` go. A full disk is one line
        naming the tag and the bytes free, and `latest` keeps naming the last whole checkpoint."""
        tag = self.tag(position)
        with self._space_for(tag):
            (self.dir / tag).mkdir(parents=True, exist_ok=True)
            if rng is not None:
                write_rng(self.dir, tag, self.rank, rng)
            if self.rank == 0:  # before `latest` can name the tag, so every tag `latest` names has it
                write_client_info(self.dir, tag, {**info, PROVENANCE: provenance})
            engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
        self.commit(tag)
        if self.rank == 0:
            self.prune()
        return tag

    def commit(self, tag: str) -> None:
        """Once every rank is past its save (its files of `tag` written), rank 0 records the sha256 of every file
        of the tag (what a resume verifies before it unpickles anything) and points `latest` at it; then every
        rank continues. DeepSpeed's own `save_latest` would name the tag as soon as rank 0's part is saved."""
        self.barrier()
        if self.rank == 0:
            with self._space_for(tag):
                write_checkpoint_hashes(self.dir, tag)
                write_latest(self.dir, tag)
        self.barrier()

    def prune(self) -> None:
        """Keep the newest `keep` tags (all when unset); never the one `latest` names, nor an unfinished newer one
        counted in its place. A tag's universal conversion goes with it."""
        if self.keep is None:
            return
        last = self.latest()
        tags = [t for t in self.tags() if last is None or self.position(t) <= self.position(last)]
        for old in tags[: -self.keep]:
            for path in (self.dir / old, self.dir / universal_tag(old)):
                try:
                    shutil.rmtree(path)
                except FileNotFoundError:
                    pass
                except OSError as exc:  # training goes on; the old checkpoint only takes space
                    print(f"hyperofa {self.section}: warning: could not remove {path}: {exc}", file=sys.stderr,
                          flush=True)

    def load(self, engine: Any, tag: Optional[str], world: int, **options: Any) -> tuple[str, dict[str, Any]]:
        """Every rank: (tag, client state) of the tag the stage planned (None: the one `latest` names, for a launch
        by hand), loaded with torch's weights-only unpickler; the rank count is checked again here for a launch
        by hand (the stage checked it before launch)."""
        tag = tag or self.latest()
        if tag is None:
            raise HyperofaError(f"{self.dir}: no checkpoint to resume from ({self.section}.resume=true)")
        if not tag.endswith(UNIVERSAL_SUFFIX):
            self.check_world(tag, (read_client_info(self.dir, tag) or {}).get("world_size"), world)
        with weights_only_loads(self.dir):
            path, client = engine.load_checkpoint(str(self.dir), tag=tag, **options)
        if path is None or client is None:
            raise HyperofaError(f"{self.dir / tag}: no checkpoint to resume from ({self.section}.resume=true)")
        return tag, client

    @contextlib.contextmanager
    def _space_for(self, tag: str) -> Iterator[None]:
        """A failed write of checkpoint `tag` on a full filesystem becomes one line; any other error passes."""
        try:
            yield
        except Exception as exc:  # torch's writer reports a full disk as "file write failed", without an errno
            if not disk_full(self.dir, exc):
                raise
            last = self.latest()
            kept = f"`latest` still names {self.dir / last}" if last else "no checkpoint was written before"
            raise HyperofaError(
                f"{self.dir / tag}: cannot write the checkpoint: no space left on device ({free_bytes(self.dir)} "
                f"bytes free); {kept}"
            ) from None
