"""Typed errors. Every message names the offending file/row/value and how to fix it.

The CLI catches ``MicroMILError`` and prints its message once, exiting non-zero; anything
else is a bug and keeps its traceback.
"""


class MicroMILError(Exception):
    """Base class of every error a user can cause and fix."""


class ConfigError(MicroMILError, ValueError):
    """A config file, --set override or CLI flag has an invalid value."""


class SiteDataError(MicroMILError, ValueError):
    """A site folder (patients.csv, images/, features/) is missing or malformed."""


class FeatureError(SiteDataError):
    """A feature file is unreadable, empty, non-finite or of the wrong dimension."""


class ImageError(SiteDataError):
    """An image file is unreadable or corrupt."""


class UnknownNameError(MicroMILError, KeyError):
    """A model, encoder, dataset or strategy name is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(MicroMILError):
    """A checkpoint file is missing, corrupt or incompatible with the requested use."""


def unknown_name(kind: str, name: str, valid: "list[str] | tuple[str, ...]") -> UnknownNameError:
    """Build the one error used for every registry lookup miss."""
    return UnknownNameError(
        f"unknown {kind} {name!r}; valid {kind} names: {', '.join(sorted(valid))}"
    )


class TrainingError(MicroMILError):
    """Training diverged (non-finite loss) or cannot proceed with the given data."""


class PrivacyBudgetExhausted(MicroMILError):
    """A site's next round would exceed its privacy budget, so it does not train."""
