"""A job folder copied while a worker writes it (a Colab user's `cp -r jobs /content/drive/...`, rsync, Drive's
own sync): the copy is taken file by file, a few files at each write of the worker (each create, rename, link
and delete in the folder is an event), so it holds whatever mix of before and after the order and the moments
give: a marker without its shard, a shard without its marker, a state record newer than the commits it implies,
a dead worker's claim, heartbeat and in-flight record, a temp file of a write not renamed yet.

`TornCopy`: the copier (`finish()`: the copy completed; `cut()`: left where it was, the VM dead); `watching(
monkeypatch, folder, on_event)`: calls `on_event()` at every event under `folder`; `restore_over`: a copy put back over a folder as `cp -r` (or `cp -a`, times kept) does: its files
overwrite theirs, the folder's other files stay."""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path


class TornCopy:
    """A copy of `src` into `dst` made as `cp -r` makes it, `step` files at each event from event `start` on: a
    folder is listed when the copy reaches it (so later files of a folder not reached yet are copied too), its
    entries taken in `order` ("sorted", "reversed" or "random" with `seed`); a file gone by the time it is reached
    is skipped (cp says so and goes on). `finish()` copies what is left at once."""

    def __init__(self, src: Path, dst: Path, order: str, start: int, step: int, seed: int = 0):
        self.src, self.dst, self.order, self.start, self.step = src, dst, order, start, step
        self.rng = random.Random(seed)
        self.queue: list[Path] | None = None
        self.events = 0
        self.last: Path | None = None  # the file copied last

    def __repr__(self) -> str:
        return f"{self.order}@{self.start}+{self.step}"

    def _listed(self, folder: Path) -> list[Path]:
        names = sorted(os.listdir(folder))
        if self.order == "reversed":
            names.reverse()
        elif self.order == "random":
            self.rng.shuffle(names)
        return [folder / n for n in names]

    def _next_file(self) -> bool:
        """Copy the next file (entering folders on the way); False when nothing is left."""
        assert self.queue is not None
        while self.queue:
            path = self.queue.pop(0)
            target = self.dst / path.relative_to(self.src)
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                self.queue[:0] = self._listed(path)
                continue
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue  # renamed or removed since its folder was listed
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            self.last = target
            return True
        return False

    def event(self) -> None:
        self.events += 1
        if self.events < self.start:
            return
        if self.queue is None:
            self.queue = [self.src]
        for _ in range(self.step):
            if not self._next_file():
                return

    def cut(self) -> Path:
        """The copy as it stands, the file copied last cut to half its bytes (a copy killed with the VM)."""
        if self.last is not None:
            data = self.last.read_bytes()
            self.last.write_bytes(data[: len(data) // 2])
        self.dst.mkdir(parents=True, exist_ok=True)
        return self.dst

    def finish(self) -> Path:
        if self.queue is None:
            self.queue = [self.src]
        while self._next_file():
            pass
        return self.dst


def watching(monkeypatch, folder: Path, on_event: Callable[[], None]) -> None:
    """Call `on_event()` after each create, rename, link and delete of a file or folder under `folder` (the
    worker's writes, each one a moment at which a copy may read the folder)."""
    root = os.path.realpath(folder) + os.sep
    busy = []

    def ours(path) -> bool:
        return not isinstance(path, int) and os.path.realpath(os.fsdecode(path)).startswith(root)

    def wrap(name: str, paths: int, creating: Callable[..., bool] = lambda *a: True):
        real = getattr(os, name)

        def call(*args, **kwargs):
            out = real(*args, **kwargs)
            if not busy and creating(*args) and any(ours(p) for p in args[:paths]):
                busy.append(1)
                try:
                    on_event()
                finally:
                    busy.pop()
            return out

        monkeypatch.setattr(os, name, call)

    for name in ("replace", "rename", "link"):
        wrap(name, 2)
    for name in ("unlink", "mkdir", "rmdir"):
        wrap(name, 1)
    wrap("open", 1, lambda path, flags, *a: bool(flags & os.O_CREAT))


def restore_over(backup: Path, folder: Path, keep_times: bool = False) -> None:
    """`cp -r backup/. folder/` (`cp -a` with `keep_times`): each file of the backup written over the folder's
    own, the folder's other files left as they are."""
    for path in sorted(backup.rglob("*")):
        target = folder / path.relative_to(backup)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            (shutil.copy2 if keep_times else shutil.copyfile)(path, target)
