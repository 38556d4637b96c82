"""One exception type for bad user input, so callers can tell it from bugs."""


class MusubiError(ValueError):
    """Bad input or settings. The message names the option or file and the fix."""
