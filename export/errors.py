"""The one exception type the exporter raises for bad input; the CLI prints it as a single line."""


class ExportError(Exception):
    """A problem with the user's input (path, checkpoint, options) or a failed verification."""
