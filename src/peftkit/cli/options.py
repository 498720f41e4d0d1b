"""What several commands share: the help formatter, option parsers, and how results are printed."""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help when it has a real default the help does not already state."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "(default" in text or action.option_strings == []:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def target_modules(text: str) -> str | list[str]:
    """'all-linear' and regexes stay strings; 'query,value' becomes a list of names."""
    if text == "all-linear" or any(c in text for c in "*()[]|^$+?\\"):
        return text
    return comma_list(text)


def byte_count(text: str) -> int:
    """'256MiB', '1.5GB', '0' or a plain number of bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    lowered = text.strip().lower()
    for unit, factor in units.items():  # noqa: B007  (factor is read after the break)
        if lowered.endswith(unit):
            number = lowered[: -len(unit)].strip()
            break
    else:
        number, factor = lowered, 1
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 256MiB, 1GB or 1000000, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a size must be >= 0, got {text!r}")
    return int(value * factor)


def print_rows(rows) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
