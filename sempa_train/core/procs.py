"""Run a heavy stage in a fresh process, so the memory it took (GPU memory included) is returned when it ends.

``call_in_subprocess(fn, *args)`` spawns a new interpreter, calls ``fn`` there and returns its
(picklable) result; an exception in the child comes back as ``SubprocessError`` with the child's
error and the end of its traceback. Used for the vLLM engine (which keeps GPU memory until its
process exits) and, by the Prefect flows, for training and evaluation.
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Callable
from multiprocessing import get_context
from typing import Any, TypeVar

T = TypeVar("T")


class SubprocessError(RuntimeError):
    """A function called with ``call_in_subprocess`` raised, or its process died."""


def call_in_subprocess(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn(*args, **kwargs)`` in a spawned process and return its result."""
    ctx = get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, args, kwargs, sender, logging.getLogger("sempa_train").level),
                       name=f"sempa-{getattr(fn, '__name__', 'stage')}")
    proc.start()
    sender.close()
    try:
        status, payload = receiver.recv()
    except EOFError:
        status, payload = "error", "the process died before returning (killed, or out of memory?)"
    proc.join(timeout=60)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if status == "error":
        raise SubprocessError(f"{getattr(fn, '__name__', fn)} failed in its subprocess (exit code "
                              f"{proc.exitcode}): {payload}")
    return payload


def _child(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], sender: Any, level: int) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("sempa_train").setLevel(level or logging.INFO)
    try:
        message: tuple[str, Any] = ("ok", fn(*args, **kwargs))
    except BaseException as e:  # report everything, KeyboardInterrupt included
        tail = "".join(traceback.format_exception(e)[-3:]).strip()
        message = ("error", f"{type(e).__name__}: {e}\n{tail}")
    try:
        sender.send(message)
    except Exception as e:  # an unpicklable result
        sender.send(("error", f"result could not be sent back: {e}"))
    sender.close()
    os._exit(0)  # skip interpreter teardown: engine threads (vLLM) can block a normal exit
