"""Errors a user can cause. The CLI prints them as one line and exits 2; the UI shows them as a warning."""


class UserError(Exception):
    """Bad input: the message is shown to the user as is."""


class ModelUnavailable(UserError):
    """A model could not be loaded (unknown id, no hub, no CUDA for quantisation)."""


class NotSupported(UserError):
    """A method cannot run on this model's architecture."""
