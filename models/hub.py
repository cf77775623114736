"""Pretrained weights by hub id or local path: may they be fetched, and what to say if not.

Every pretrained part loads through its own library (diffusers / transformers
``from_pretrained``, open_clip, torch-fidelity), which downloads what is not local into its
cache. Downloads are allowed unless offline mode is on (``HF_HUB_OFFLINE`` or
``TRANSFORMERS_OFFLINE`` set, as huggingface_hub reads them); then a hub id must already be in
the local cache, and :func:`require_cached` turns "not there" into one line naming what to
fetch and how, before any library is called. A local path always wins over a hub id.
"""

from __future__ import annotations

import os
from pathlib import Path

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = {"1", "ON", "YES", "TRUE"}


class NotCachedError(FileNotFoundError):
    """Offline mode is on and the weights are neither a local path nor in the local cache."""


def offline_reason() -> str | None:
    """``"HF_HUB_OFFLINE=1"`` (or the variable that is set) when downloads are off, else None.

    Read from the environment now and from huggingface_hub (which read it at import), so a
    variable set after the import still counts here.
    """
    for var in OFFLINE_VARS:
        if os.environ.get(var, "").upper() in _TRUE:
            return f"{var}={os.environ[var]}"
    from huggingface_hub import constants

    return "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else None


def is_local(name: str | os.PathLike) -> bool:
    """A file or folder on this machine (a hub id never is)."""
    return Path(name).expanduser().exists()


def in_hub_cache(repo_id: str, filename: str) -> bool:
    """``filename`` of the hub repo ``repo_id`` is in the local huggingface_hub cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except ValueError:  # not a valid repo id (HFValidationError is a ValueError)
        return False


def snapshot_command(repo_id: str) -> str:
    """The shell command that puts ``repo_id`` into the local cache."""
    return (f"python -c \"from huggingface_hub import snapshot_download; "
            f"snapshot_download('{repo_id}')\"")


def not_cached_line(what: str, reason: str, fetch: str, override: str) -> str:
    """The one line for weights that offline mode keeps from being fetched."""
    return (f"{what} is not in the local cache and {reason}: run `{fetch}` on a machine with "
            f"internet (then copy its cache here), or {override}")


def require_cached(what: str, name: str, override: str, filename: str = "config.json",
                   subfolder: str | None = None) -> None:
    """Raise :class:`NotCachedError` (one line) when offline and ``name`` cannot be had.

    ``name`` is a local path or a hub id; ``filename`` (in ``subfolder``) a file of that repo
    every load needs. A path that does not exist raises FileNotFoundError naming it. Online
    nothing else is checked here: the library downloads or fails itself.
    """
    if subfolder:
        filename = f"{subfolder}/{filename}"
    if not is_local(name) and looks_like_path(name):
        raise FileNotFoundError(f"{what}: no such file or folder {name!r} (a local path; a hub "
                                f"id is org/name)")
    reason = offline_reason()
    if reason is None or is_local(name) or in_hub_cache(name, filename):
        return
    raise NotCachedError(not_cached_line(f"{what} {name}", reason, snapshot_command(name),
                                         override))


def looks_like_path(name: str) -> bool:
    """A string meant as a path, not a hub id (``org/name`` has exactly one slash)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


_NETWORK_ERRORS = {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError",
                   "ConnectTimeout", "ReadTimeout", "TimeoutException", "NetworkError",
                   "ProxyError", "URLError", "RemoteDisconnected"}


def is_download_failure(err: BaseException) -> bool:
    """The error, or one it was raised from, is a failed connection (not a wrong name/file).

    Libraries wrap the hub's errors in their own (OSError, RuntimeError, FileNotFoundError),
    so the chain is walked; a missing repo or file on the hub is not a download failure.
    """
    seen: set[int] = set()
    stack: list[BaseException | None] = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ConnectionError | TimeoutError) or any(
                c.__name__ in _NETWORK_ERRORS for c in type(e).__mro__):
            return True
        stack += [e.__cause__, e.__context__]
    return False
