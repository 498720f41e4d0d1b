class PeftkitError(Exception):
    """An error in the user's input, with a message that names the problem and the way out."""
