"""The package versions the scripts need, checked at start-up before anything heavy is imported.

The lower bounds are requirements.txt's (a test keeps the two equal) and are measured: `make test-compat` runs the
whole pipeline on exactly those versions. pip keeps an older preinstalled package (Kaggle and Colab images ship
some) when a range allows it and `pip check` says nothing, so the scripts check themselves and name the fix.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version

MINIMUM_VERSIONS = {
    "torch": "2.6",
    "transformers": "4.57.1",
    "accelerate": "1.3.0",
    "datasets": "3.4.0",
    "albumentations": "2.0.1",
    "huggingface-hub": "0.34.0",
}


def version_problem(package: str, minimum: str) -> str | None:
    """What is wrong with the installed ``package`` for a lower bound of ``minimum``, or None."""
    try:
        installed = version(package)
    except PackageNotFoundError:
        return f"{package} is not installed; roadseg needs {package}>={minimum}: pip install '{package}>={minimum}'"
    # A local build tag (torch 2.6.0+cu124) or a pre-release of the bound itself still counts as that version.
    if Version(installed).release < Version(minimum).release:
        return (f"{package} {installed} is installed, but roadseg needs {package}>={minimum}: "
                f"pip install -U '{package}>={minimum}'")
    return None


def check_versions(script: str) -> None:
    """Exit with one line naming the first package that is missing or too old, and the pip command that fixes it."""
    for package, minimum in MINIMUM_VERSIONS.items():
        problem = version_problem(package, minimum)
        if problem is not None:
            print(f"{script}: error: {problem}", file=sys.stderr)
            raise SystemExit(1)
