"""Which bucket a dynamic size is padded to.

A bucket list comes from the config: the user's ``bucket_sizes``, or powers of two up to
``max_bucket``; ``dim_buckets`` overrides both for one input dim (``batch``, ``seq`` or a
position). :meth:`BucketPolicy.bucket` answers, for a real size ``n``:

* the bucket ``b >= n`` to pad to, when padding wastes at most ``max_pad_waste`` of ``b``;
* ``n`` itself (capture the exact shape) when the nearest bucket wastes more, or when ``n`` is
  above the largest bucket and ``above_largest="exact"``;
* ``None`` when ``n`` is above the largest bucket and ``above_largest="uncaptured"``.
"""

from __future__ import annotations

import bisect

from hpuopt.config import Config


class BucketPolicy:
    def __init__(self, config: Config, dim: int | None = None) -> None:
        """The policy of input dim ``dim``: its ``dim_buckets`` entry, else the global one."""
        rule = config.dim_bucket_rules().get(dim) if dim is not None else None
        if rule is not None:
            self.sizes, self.max_bucket = rule
        else:
            self.sizes = tuple(config.bucket_sizes)
            self.max_bucket = self.sizes[-1] if self.sizes else config.max_bucket
        self.max_waste = config.max_pad_waste
        self.exact_above = config.above_largest == "exact"

    def next_bucket(self, n: int) -> int | None:
        """The smallest bucket holding ``n``, or ``None`` above the largest."""
        if n > self.max_bucket:
            return None
        if self.sizes:
            return self.sizes[bisect.bisect_left(self.sizes, n)]
        return 1 if n <= 1 else 1 << (n - 1).bit_length()

    def bucket(self, n: int) -> int | None:
        b = self.next_bucket(n)
        if b is None:
            return n if self.exact_above else None
        if b == n or n == 0 or (b - n) / b > self.max_waste:
            return n
        return b

    def describe(self) -> str:
        if self.sizes:
            return "buckets " + ", ".join(map(str, self.sizes))
        return f"powers of two up to {self.max_bucket}"
