"""Progress on stderr: a live bar with samples/s on a terminal, nothing otherwise (the caller logs a summary)."""

from __future__ import annotations

from types import TracebackType

from dscompile import console


def _speed_column():
    from rich.progress import ProgressColumn
    from rich.text import Text

    class Speed(ProgressColumn):
        def render(self, task) -> Text:  # task.speed is None until two updates arrived
            return Text(f"{task.speed:.1f} samples/s" if task.speed else "… samples/s")

    return Speed()


class Progress:
    def __init__(self, description: str, total: int | None, enabled: bool = True) -> None:
        self.description, self.total = description, total
        self._bar = None
        self._task = None
        self.enabled = enabled and console.stderr_is_terminal()

    def __enter__(self) -> Progress:
        if self.enabled:
            from rich import progress as rp

            self._bar = rp.Progress(
                rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(),
                rp.TextColumn("samples"), _speed_column(),
                rp.TimeElapsedColumn(), rp.TimeRemainingColumn(),
                console=console.err, transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total)
        return self

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()
