"""A site's machine-readable refusal to train, and the privacy report a client sends.

A refusing client replies with a ``refusal`` ConfigRecord (``code``, ``reason``) and no
update; both refusals and successful replies carry a ``privacy`` ConfigRecord with the
client's cumulative ε so that the server can record every site's spending.
"""

from __future__ import annotations

import dataclasses

from flwr.app import ConfigRecord, RecordDict

from sepal import wire

BUDGET_EXHAUSTED = "budget-exhausted"  # the next round would take ε past dp-max-epsilon
INVALID_SETTING = "invalid-setting"    # the privacy settings are impossible on this site
LEDGER_UNAVAILABLE = "ledger-unavailable"  # the ε already spent in this run is unknown here
CODES = (BUDGET_EXHAUSTED, INVALID_SETTING, LEDGER_UNAVAILABLE)


@dataclasses.dataclass(frozen=True)
class Refusal:
    code: str
    reason: str

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({"code": self.code, "reason": self.reason})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> Refusal:
        code, reason = record.get("code"), record.get("reason")
        if code not in CODES or not isinstance(reason, str):
            raise wire.UploadError(f"malformed refusal: code {code!r} (known: {CODES}), "
                                   f"reason {reason!r}")
        return cls(code, reason)


class PrivacyRefusal(Exception):
    """Raised on a client that must not train this round; becomes its reply."""

    def __init__(self, refusal: Refusal, report: ConfigRecord | None = None):
        super().__init__(f"{refusal.code}: {refusal.reason}")
        self.refusal = refusal
        self.report = report

    def content(self) -> RecordDict:
        content = RecordDict({wire.REFUSAL_KEY: self.refusal.to_record()})
        if self.report is not None:
            content[wire.PRIVACY_KEY] = self.report
        return content


def read_reply_privacy(content: RecordDict) -> tuple[ConfigRecord | None, Refusal | None]:
    """A reply's privacy report and refusal (either may be absent); UploadError if one is
    malformed: a report needs an ``epsilon`` >= 0 and a ``delta`` in (0, 1)."""
    report = _config_record(content, wire.PRIVACY_KEY)
    if report is not None:
        epsilon, delta = report.get("epsilon"), report.get("delta")
        if not isinstance(epsilon, float) or not epsilon >= 0:  # NaN fails too
            raise wire.UploadError(f"privacy report without a float 'epsilon' >= 0: "
                                   f"{epsilon!r}")
        if not isinstance(delta, float) or not 0 < delta < 1:
            raise wire.UploadError(f"privacy report without a float 'delta' in (0, 1): "
                                   f"{delta!r}")
    refusal_record = _config_record(content, wire.REFUSAL_KEY)
    refusal = Refusal.from_record(refusal_record) if refusal_record is not None else None
    return report, refusal


def _config_record(content: RecordDict, key: str) -> ConfigRecord | None:
    if key not in content:
        return None
    record = content[key]
    if not isinstance(record, ConfigRecord):
        raise wire.UploadError(f"record '{key}' is a {type(record).__name__}, expected a "
                               "ConfigRecord")
    return record
