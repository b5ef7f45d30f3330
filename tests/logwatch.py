"""Catch what a test must not let pass silently: errors our code logs and survives.

Protocol code rightly keeps a peer's bytes from raising out of
``dataReceived``: it logs the unexpected exception with its traceback and
closes the connection. A test that only checks that nothing was raised can
then never fail. :class:`LoudLog` collects every event logged with a
failure or at error/critical level, so the test can insist there were none.
"""

from __future__ import annotations

from twisted.logger import LogLevel, formatEvent, globalLogPublisher


class LoudLog:
    """Context manager: ``events`` are the failures and errors logged inside it."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def __call__(self, event: dict) -> None:
        if event.get("log_failure") is not None or event.get("log_level") in (
                LogLevel.error, LogLevel.critical):
            self.events.append(event)

    def __enter__(self) -> "LoudLog":
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc_info) -> None:
        globalLogPublisher.removeObserver(self)

    def describe(self) -> str:
        """The first loud event, with its traceback, for an assertion message."""
        if not self.events:
            return "nothing"
        event = self.events[0]
        failure = event.get("log_failure")
        text = formatEvent(event)
        if failure is not None:
            text += "\n" + failure.getTraceback()
        return f"{len(self.events)} loud log event(s); first: {text}"

    def assert_quiet(self) -> None:
        assert not self.events, self.describe()
