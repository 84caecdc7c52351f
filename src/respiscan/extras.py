"""Optional dependencies (pyproject's extras): imported only through `require`, so a missing one is one line.

Each extra is one registration in EXTRAS: its import names and their pip names. A missing package raises
MissingExtra, whose message is the whole story in one line (`respiscan export needs onnx: pip install
"respiscan[onnx]"`): the CLI prints it and exits 2, and `to_dict` gives the same error as JSON fields.
tests/test_extras.py checks that EXTRAS and pyproject.toml name the same packages.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from respiscan.errors import ImageReadError, RespiscanError


@dataclass(frozen=True)
class Extra:
    """One `pip install "respiscan[NAME]"` extra: import name -> pip name of each of its packages."""

    name: str
    packages: dict[str, str]

    @property
    def install(self) -> str:
        return f'pip install "respiscan[{self.name}]"'


EXTRAS: dict[str, Extra] = {e.name: e for e in (
    Extra("onnx", {"onnx": "onnx", "onnxruntime": "onnxruntime"}),  # ONNX export and the torch-free engine
    # decoders that pydicom imports itself: JPEG (baseline, extended, lossless, JPEG-LS), JPEG 2000 and HTJ2K
    Extra("dicom", {"pylibjpeg": "pylibjpeg", "libjpeg": "pylibjpeg-libjpeg", "openjpeg": "pylibjpeg-openjpeg"}),
    Extra("xrv", {"torchxrayvision": "torchxrayvision"}),  # chest X-ray backbones, xrv:densenet121-res224-*
    # `respiscan serve` (the REST API, its page, offline OpenAPI docs), DICOM SR out and `listen`
    Extra("serve", {"fastapi": "fastapi", "uvicorn": "uvicorn", "python_multipart": "python-multipart",
                    "fastapi_offline": "fastapi-offline", "highdicom": "highdicom", "pynetdicom": "pynetdicom"}),
    Extra("openvino", {"openvino": "openvino"}),  # the OpenVINO engine, one of those `export --choose-engine` times
)}


class MissingExtra(RespiscanError):
    """An optional package is not installed: one line naming what needs it, the package and the install."""

    def __init__(self, needed_by: str, package: str, extra: str):
        self.needed_by, self.package, self.extra = needed_by, package, extra
        self.install = EXTRAS[extra].install
        super().__init__(f"{needed_by} needs {package}: {self.install}")

    def to_dict(self) -> dict[str, str]:
        """The error as JSON fields, for a server's error response."""
        return {"error": str(self), "needed_by": self.needed_by, "package": self.package, "extra": self.extra,
                "install": self.install}


class MissingDicomDecoder(MissingExtra, ImageReadError):
    """No decoder for a DICOM file's compressed pixel data. Also an ImageReadError: readers that skip
    unreadable images skip this one too, with this message as the reason."""

    def __init__(self, path: object, syntax: str, package: str, tried: str | None = None):
        failed = f" ({tried} could not)" if tried else ""
        super().__init__(f"{path}: decoding {syntax} pixel data{failed}", package, "dicom")


def extra_of(module: str) -> Extra:
    """The extra that provides import name `module`."""
    for extra in EXTRAS.values():
        if module in extra.packages:
            return extra
    raise KeyError(f"{module!r} is in no extra of respiscan.extras.EXTRAS")


def require(module: str, needed_by: str) -> ModuleType:
    """Import the optional `module`, or raise MissingExtra saying that `needed_by` needs it and how to install.

    A package that is installed but fails to import (a broken build) says so instead of asking for an install.
    """
    extra = extra_of(module)
    package = extra.packages[module]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] != module:
            raise RespiscanError(f"{needed_by} needs {package}, which is installed but cannot import {e.name!r}; "
                                 f"reinstall it: {extra.install}") from e
        raise MissingExtra(needed_by, package, extra.name) from e
    except ImportError as e:
        first = " ".join(str(e).split()) or type(e).__name__
        raise RespiscanError(f"{needed_by} needs {package}, which is installed but fails to import ({first}); "
                             f"reinstall it: {extra.install}") from e
