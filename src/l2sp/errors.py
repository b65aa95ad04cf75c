"""The one exception type l2sp raises for bad input: a single line saying what is wrong and how to fix it."""


class L2SPError(ValueError):
    """Bad input to l2sp. The message is one line: what is wrong, then what to do about it.

    The CLI prints it as ``l2sp: error: <message>`` and exits with status 2, without a traceback.
    """
