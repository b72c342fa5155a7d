"""The service's one output folder (``serve --output_dir``): ``save_disk_path`` is resolved inside it.

A request's ``save_disk_path`` (xDiT's field, still accepted) names a folder *inside* the output
folder fixed when the service starts: a relative path is taken from it; an absolute path, a ``..``
or a symlink that leads anywhere else is refused (400) and nothing is written or created. The check
runs when the request arrives (before it is queued) and again when the image is written, where the
folder is walked one component at a time with ``O_NOFOLLOW`` from the output folder itself: a
symlink swapped in between cannot redirect the write either.
"""
from __future__ import annotations

import os

from .serve_request import RequestError

_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)


class OutputFolder:
    """Writes confined to ``root`` (created if missing, then fixed as its real path)."""

    def __init__(self, root: str):
        os.makedirs(root, exist_ok=True)
        self.root = os.path.realpath(root)

    def resolve(self, requested: str) -> tuple[str, ...]:
        """The components below :attr:`root` of the folder ``requested`` names; RequestError if it escapes."""
        target = os.path.realpath(os.path.join(self.root, requested))  # an absolute ``requested`` replaces root
        if os.path.commonpath([self.root, target]) != self.root:
            raise RequestError(f"save_disk_path {requested!r} leads outside the service's output folder "
                               f"{self.root} (--output_dir): give a folder inside it, e.g. a relative path "
                               "such as \"images\"; nothing was written")
        rel = os.path.relpath(target, self.root)
        return () if rel == "." else tuple(rel.split(os.sep))

    def prepare(self, requested: str) -> tuple[str, ...]:
        """:meth:`resolve`, then create the folder (RequestError if it cannot be made there)."""
        parts = self.resolve(requested)
        try:
            os.close(self._open(parts))
        except OSError as e:
            raise RequestError(f"save_disk_path {requested!r}: cannot create it inside {self.root}: "
                               f"{e.strerror or e}") from None
        return parts

    def save(self, requested: str, name: str, data: bytes) -> str:
        """Write ``data`` as ``name`` (``name_1``... if taken) into the folder ``requested``; the file's path."""
        parts = self.resolve(requested)
        fd = self._open(parts)
        try:
            stem, ext = os.path.splitext(name)
            for i in range(1000):
                fname = name if i == 0 else f"{stem}_{i}{ext}"
                try:
                    out = os.open(fname, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644,
                                  dir_fd=fd)
                    break
                except FileExistsError:
                    continue
            else:
                raise FileExistsError(f"{name} and 999 numbered variants exist")
            with os.fdopen(out, "wb") as f:
                f.write(data)
        finally:
            os.close(fd)
        return os.path.join(self.root, *parts, fname)

    def _open(self, parts: tuple[str, ...]) -> int:
        """A descriptor of root/parts, making missing folders; never follows a symlink."""
        fd = os.open(self.root, _DIR_FLAGS)
        try:
            for part in parts:
                try:
                    os.mkdir(part, 0o777, dir_fd=fd)
                except FileExistsError:
                    pass
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd
