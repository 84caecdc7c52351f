"""The project's own error types: the CLI turns these into one line on stderr and exit code 2."""


class RespiscanError(Exception):
    """Bad input or an impossible request; the message names the file and the problem."""


class ImageReadError(RespiscanError):
    """An image file could not be read as an image."""
