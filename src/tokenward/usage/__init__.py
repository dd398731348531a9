"""Usage analytics: access decisions counted per minute and hour, and queried over a range.

* :mod:`.tables` — the counts and the rollup's watermark
* :mod:`.rollup` — keeps the counts from the audit log, behind it, in bounded ticks
* :mod:`.query`  — requests, allowed and denied by reason, per minute, hour or day
"""

from tokenward.usage.query import UsageFilter, UsageReport, usage
from tokenward.usage.rollup import UsageRollup

__all__ = ["UsageFilter", "UsageReport", "UsageRollup", "usage"]
