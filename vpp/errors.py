"""The errors vpp raises on purpose.

Every error a user can cause carries enough to fix it: which field, and why.  The
service layer maps these classes to gRPC status codes in one place; the CLI prints
them as one line.
"""

from __future__ import annotations


class VppError(Exception):
    """Base class of the errors vpp raises on purpose."""


class SpecError(VppError, ValueError):
    """A spec, config or input is malformed.

    Parameters
    ----------
    field : str
        Dotted path of the offending field, e.g. ``assets[3].e_kwh``.
    reason : str
        What is wrong with it, in plain words.
    """

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


class UnknownAssetError(VppError, KeyError):
    """An asset id that is not enrolled."""

    def __init__(self, asset_id: str):
        self.asset_id = asset_id
        super().__init__(asset_id)

    def __str__(self) -> str:
        return f"unknown asset {self.asset_id!r}"


class GridModelError(VppError):
    """The network cannot be modelled (unsupported element, no slack, islanded bus)."""
