"""The driver's progress line: epoch, step, loss, accuracy, polled from the training's rank 0."""

from __future__ import annotations

import sys
import threading
from typing import Callable

BAR = 24


def render(state: dict, epochs: int, eval_name: str) -> str:
    step, total = state.get("step", 0), state.get("total_steps") or 0
    filled = BAR * step // total if total else 0
    parts = [f"epoch {state.get('epoch', 0)}/{epochs}", "[" + "#" * filled + "." * (BAR - filled) + "]",
             f"step {step}/{total or '?'}"]
    if "loss" in state:
        parts.append(f"loss {state['loss']:.4f}")
    if "acc" in state:
        parts.append(f"{eval_name} acc {100 * state['acc']:.2f}%")
    return "  ".join(parts)


class ProgressPrinter:
    """Polls `get_state` in a background thread while the training runs. On a terminal the line
    is redrawn in place; otherwise (CI, log files) one line is printed per finished epoch."""

    def __init__(self, get_state: Callable[[], dict], epochs: int, eval_name: str, interval: float = 0.5,
                 stream=None):
        self.get_state, self.epochs, self.eval_name = get_state, epochs, eval_name
        self.interval = interval
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._last_epoch = None

    def _show(self, state: dict) -> None:
        if not state:
            return
        line = render(state, self.epochs, self.eval_name)
        if self.tty:
            self.stream.write("\r" + line + "\033[K")
            self.stream.flush()
        elif state.get("epoch") != self._last_epoch and "acc" in state:
            self._last_epoch = state.get("epoch")
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
