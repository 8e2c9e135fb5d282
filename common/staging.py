"""Replace an output folder as a whole, never in place: build the new contents in a staging folder beside it,
then switch. Until the switch the old folder is untouched; a failure (an exception, a bad input found half way)
removes the staging folder and leaves the old one exactly as it was.

    with staged_folder(out_dir, owned=("manifest.json", "*.tar")) as tmp:
        ...write everything into tmp...
    # here out_dir holds the new contents; the old ones are gone

The switch exchanges the two folders in one `renameat2(RENAME_EXCHANGE)` call where the kernel and filesystem
offer it (Linux >= 3.15 on ext4, xfs, btrfs, tmpfs: readers see the old folder or the new one, never a mixture);
elsewhere (e.g. NFS) it is two renames, old -> aside, new -> in place, with the old folder put back if the second
fails. Either way a reader never sees a folder holding parts of both.

`owned` lists the names (glob patterns) a stage writes. An existing folder holding anything else is refused
rather than replaced, so pointing a stage at the wrong folder (the corpus, a parent folder) cannot delete it.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from fuxi.common.errors import DataError

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_STAGING_TAG = ".staging-"


def _renameat2():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):  # not Linux, or glibc < 2.28
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange(a: str | Path, b: str | Path) -> bool:
    """Atomically swap two existing paths; False when the platform or filesystem cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def switch_folder(new: str | Path, final: str | Path) -> None:
    """Put folder `new` in place of `final` (which may not exist) and delete the old contents. A `new` on
    another filesystem (a work dir on node-local scratch) is first copied beside `final`, so the switch itself
    is still a rename there; `new` is deleted once the copy is in place."""
    new, final = Path(new), Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if os.stat(new).st_dev != os.stat(final.parent).st_dev:
        beside = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}{_STAGING_TAG}{os.getpid()}-"))
        try:
            shutil.copytree(new, beside, dirs_exist_ok=True)
            os.chmod(beside, os.stat(new).st_mode & 0o7777)
            switch_folder(beside, final)
        except BaseException:
            shutil.rmtree(beside, ignore_errors=True)
            raise
        shutil.rmtree(new)
        return
    if not final.exists():
        os.rename(new, final)
        return
    if exchange(new, final):
        shutil.rmtree(new)  # now holds the old contents
        return
    aside = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
    os.rename(final, aside / "old")
    try:
        os.rename(new, final)
    except BaseException:
        os.rename(aside / "old", final)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside)


def unowned_entries(folder: Path, owned: tuple[str, ...]) -> list[str]:
    """Entries of `folder` that match none of the `owned` patterns (hidden temp files are always owned)."""
    return sorted(p.name for p in folder.iterdir()
                  if not p.name.startswith(".") and not any(fnmatch.fnmatch(p.name, pat) for pat in owned))


def refuse_foreign(final: Path, owned: tuple[str, ...]) -> None:
    """A DataError if `final` exists and is not a folder, or holds entries a stage writing `owned` did not."""
    if final.exists():
        if not final.is_dir():
            raise DataError(f"{final}: exists and is not a folder")
        foreign = unowned_entries(final, owned)
        if foreign:
            raise DataError(f"{final}: holds {foreign[:5]}{' ...' if len(foreign) > 5 else ''}, which this stage "
                            f"did not write; it replaces its output folder as a whole, so name a new or empty "
                            f"folder")


def _remove_abandoned(final: Path) -> None:
    """Staging folders of runs that died (SIGKILL, power loss) before they could clean up."""
    prefix = f".{final.name}{_STAGING_TAG}"
    for leftover in final.parent.glob(prefix + "*"):
        pid = leftover.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def staged_folder(final: str | Path, owned: tuple[str, ...]) -> Iterator[Path]:
    """Yield an empty staging folder beside `final`; on a clean exit it replaces `final`, on an error it is
    deleted and `final` is left as it was. `owned`: the entries this stage writes (see the module docstring)."""
    final = Path(final).absolute()
    refuse_foreign(final, owned)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(final)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}{_STAGING_TAG}{os.getpid()}-"))
    os.chmod(staging, 0o755)  # mkdtemp makes it 0700; the switched-in folder should look like a made one
    try:
        yield staging
        switch_folder(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
