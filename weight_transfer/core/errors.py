"""The typed errors of the weight bridge. Each is a `vit_config.VitParityError` (a
`ValueError`): bad input, named; the CLI turns them into one line and exit code 2."""

from __future__ import annotations

from vit_config import VitParityError


class CheckpointError(VitParityError):
    """A checkpoint file that cannot be read, trusted or written, with the path and the reason."""


class LayoutError(VitParityError):
    """The keys match no known layout, or a layout was asked for by an unknown name."""


class NonFiniteError(VitParityError):
    """A weight holds NaN or Inf, or a cast would make it so (refused unless allowed)."""


class TransferError(VitParityError):
    """A state that does not fit the target: every missing, unexpected and mis-shaped key at
    once."""

    SHOWN = 40  # the message lists this many; `.problems` holds them all

    def __init__(self, problems: list[str], *, missing=(), unexpected=(), mismatched=()):
        self.problems = list(problems)
        self.missing, self.unexpected, self.mismatched = (
            list(missing),
            list(unexpected),
            list(mismatched),
        )
        shown = self.problems[: self.SHOWN]
        more = len(self.problems) - len(shown)
        listing = "\n".join(f"  - {p}" for p in shown) + (
            f"\n  ... and {more} more" if more else ""
        )
        super().__init__(f"{len(self.problems)} problem(s) mapping the weights:\n{listing}")


class AssumedConfigWarning(UserWarning):
    """A checkpoint could not say something (heads, epsilon, activation, image size, pooling)
    and a value was assumed; the message names each assumption and why."""
