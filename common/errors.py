"""The one exception type the `curate` command line prints without a traceback.

It lives in `common/`, below the four packages, so that every one of them may import it.
"""


class CurateError(Exception):
    """A problem the user can fix (bad input path, bad config value, missing model file).

    The message must say what is wrong and what to do about it.
    """
