"""The one error type of the Data stage: a problem with the inputs or the output location the user can fix."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data or an unusable dataset location; the message names the file (and line) concerned."""


def find_data_error(exc: BaseException) -> DataError | None:
    """The DataError behind ``exc``, unwrapping what Ray adds when the error was raised inside a task or actor."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        cause = getattr(current, "cause", None)  # ray.exceptions.RayTaskError keeps the original exception here
        if isinstance(cause, BaseException) and cause is not current:
            stack.append(cause)
            continue
        if isinstance(current, DataError):
            message = current.args[0] if current.args and isinstance(current.args[0], str) else str(current)
            # a RayTaskError "as instance of cause" carries a traceback; keep the original message line
            marker = f"{DataError.__module__}.{DataError.__name__}: "
            if marker in message:
                message = message.split(marker, 1)[1].split("\n", 1)[0]
            return DataError(message)
        stack.extend([current.__cause__, current.__context__])
    return None
