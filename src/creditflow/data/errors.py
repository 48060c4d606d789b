"""Errors raised by the data package.

Both subclass ``ValueError`` so callers that already catch bad-input errors keep working;
catch ``DatasetError`` to handle every data problem in one place.
"""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset file is missing, truncated, corrupt or in the wrong format.

    The message is one line naming the file and what was wrong with it.
    """


class DatasetNotFound(DatasetError):
    """No copy of a dataset was found and none could be downloaded.

    The message lists every place looked in and how to get the files.
    """


class ChecksumError(DatasetError):
    """A downloaded file did not match its published checksum (nothing was kept)."""
