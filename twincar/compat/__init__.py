"""Every use of another library's private API, one module per library, each behind a version check.

Importing ``twincar.compat.lightning`` (or ``gradcam``, ``torch``) checks that the installed version is
one the private API was written against and fails in one sentence naming the supported range. Nothing
else in TwinCar touches another library's underscore names.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from twincar.errors import TwinCarError


class UnsupportedVersionError(TwinCarError, ImportError):
    """An installed library is outside the range TwinCar's compatibility code supports."""


def require(distribution: str, supported: str, why: str) -> str:
    """The installed version of ``distribution``; :class:`UnsupportedVersionError` when it is not in ``supported``."""
    try:
        installed = version(distribution)
    except PackageNotFoundError as e:
        raise UnsupportedVersionError(f"{distribution} is not installed: TwinCar needs {distribution}{supported}") \
            from e
    if Version(Version(installed).base_version) not in SpecifierSet(supported):
        raise UnsupportedVersionError(
            f"{distribution} {installed} is installed, but TwinCar's {why} supports {distribution}{supported} only: "
            f"pip install '{distribution}{supported}'"
        )
    return installed
