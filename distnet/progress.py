"""The driver's progress line: epoch, step, loss, accuracy, polled from the training's rank 0."""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, fields
from typing import Callable

BAR = 24


@dataclass(frozen=True)
class Progress:
    """Where a training is, as rank 0 posts it: a log interval's update (step, total_steps, the
    last step's mean loss) or an epoch's (epoch, mean held-out accuracy); the board keeps them
    merged. None: not posted yet."""

    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    epoch: int | None = None
    acc: float | None = None

    def merged(self, update: Progress) -> Progress:
        """This, with what `update` posts."""
        return Progress(**{f.name: getattr(self, f.name) if getattr(update, f.name) is None else getattr(update, f.name)
                           for f in fields(self)})


def render(state: Progress, epochs: int, eval_name: str) -> str:
    step, total = state.step or 0, state.total_steps or 0
    filled = BAR * step // total if total else 0
    parts = [f"epoch {state.epoch or 0}/{epochs}", "[" + "#" * filled + "." * (BAR - filled) + "]",
             f"step {step}/{total or '?'}"]
    if state.loss is not None:
        parts.append(f"loss {state.loss:.4f}")
    if state.acc is not None:
        parts.append(f"{eval_name} acc {100 * state.acc:.2f}%")
    return "  ".join(parts)


class ProgressPrinter:
    """Polls `get_state` in a background thread while the training runs. On a terminal the line
    is redrawn in place; otherwise (CI, log files) one line is printed per finished epoch."""

    def __init__(self, get_state: Callable[[], Progress], epochs: int, eval_name: str, interval: float = 0.5,
                 stream=None):
        self.get_state, self.epochs, self.eval_name = get_state, epochs, eval_name
        self.interval = interval
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._last_epoch = None

    def _show(self, state: Progress) -> None:
        if state == Progress():
            return
        line = render(state, self.epochs, self.eval_name)
        if self.tty:
            self.stream.write("\r" + line + "\033[K")
            self.stream.flush()
        elif state.epoch != self._last_epoch and state.acc is not None:
            self._last_epoch = state.epoch
            print(line, file=self.stream, flush=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._show(self.get_state())
            except Exception:  # a dying cluster must not kill the driver's bookkeeping
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        try:
            self._show(self.get_state())
        except Exception:
            pass
        if self.tty:
            self.stream.write("\n")
