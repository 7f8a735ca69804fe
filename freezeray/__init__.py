"""The base floor under ``surgery``, ``pipeline`` and ``jobs``: what all three share and
that is neither model surgery nor Ray. It imports none of them, nor torch, nor Ray, so a
read task that decodes images or touches storage pays for neither.

* :mod:`freezeray.errors`: the error hierarchy, each kind with the CLI's exit code;
* :mod:`freezeray.storage`: URIs on any fsspec filesystem, with retries;
* :mod:`freezeray.schema`: the pydantic base of every configuration object;
* :mod:`freezeray.images`: preprocessing as data, and torch-free decoding and resizing;
* :mod:`freezeray.lazy`: packages whose names are imported on first use.
"""
