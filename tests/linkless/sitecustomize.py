"""On PYTHONPATH, every Python process runs on a file system without hard links, as Colab's Drive mount likely
is: os.link fails with EPERM, so runner creates its exclusive files with O_EXCL and fills them after
(`make test-linkless` runs the fault campaign so)."""

import errno
import os


def _no_link(*args, **kwargs):
    raise OSError(errno.EPERM, "Operation not permitted (tests/linkless: no hard links)")


os.link = _no_link
