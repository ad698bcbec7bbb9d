"""The one exception type the `curate` command line prints without a traceback.

It lives in `filters/` because that is the lowest layer: every package may import it.
"""


class CurateError(Exception):
    """A problem the user can fix (bad input path, bad config value, missing model file).

    The message must say what is wrong and what to do about it.
    """
