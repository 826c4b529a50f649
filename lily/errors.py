"""Exceptions raised by lily. Each message names the field, module or tensor at fault and the fix."""


class LilyError(Exception):
    """Base class of every error lily raises on purpose."""


class ConfigError(LilyError, ValueError):
    """A `LilyConfig` field has an invalid value, or a config does not fit the model."""


class TargetError(LilyError, ValueError):
    """`target_modules` selects nothing, or selects a module lily cannot adapt."""


class InjectionError(LilyError, RuntimeError):
    """The model is in the wrong state for the call (no adapter, or one already injected)."""


class CheckpointError(LilyError, ValueError):
    """An adapter directory is missing, corrupt, or does not fit the model."""


class MergeError(LilyError, RuntimeError):
    """The adapter cannot be merged into (or unmerged from) the base weights."""


class DataError(LilyError, ValueError):
    """A dataset is missing, malformed, or does not fit the task."""
