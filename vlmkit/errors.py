"""vlmkit's exception types. Every message says what went wrong and what to do about it."""


class VlmkitError(Exception):
    """Base class of every error vlmkit raises on purpose."""


class InputError(VlmkitError, ValueError):
    """Bad user input: an unreadable image, an empty prompt, mismatched lists."""


class ConfigError(VlmkitError, ValueError):
    """A bad method name, option or budget."""


class ModelNotSupported(VlmkitError, TypeError):
    """The model class has no vlmkit adapter."""


class DataError(VlmkitError, ValueError):
    """A malformed benchmark or annotation file."""


class JudgeError(VlmkitError, RuntimeError):
    """The MMHal-Bench judge endpoint failed after all retries."""
