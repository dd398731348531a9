"""A scan's findings as SARIF 2.1.0 (what code-scanning services take: GitHub, GitLab).

One rule (``tokenward/token``), one result per finding with its file and line; the secret
itself is never in the log (the message names its hint and, when known, its id).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from tokenward import __version__
from tokenward.leaks.scanner import Finding

SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
RULE_ID = "tokenward/token"


def sarif_log(findings: Sequence[Finding], known: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The SARIF log; ``known`` maps a secret to what the server said of it (may be empty)."""
    results = []
    for finding in findings:
        info = known.get(finding.token) or {}
        said = f" ({info['id']}, {info.get('state')})" if info.get("id") else ""
        result: dict[str, Any] = {
            "ruleId": RULE_ID,
            "ruleIndex": 0,
            "level": "error",
            "message": {"text": f"tokenward token {finding.hint}{said} in the source"},
            "locations": [
                {
                    "physicalLocation": {
                        "artifactLocation": {"uri": quote(finding.path)},
                        "region": {"startLine": finding.line, "startColumn": finding.column},
                    }
                }
            ],
            # one alert per token and place, stable across runs (never the secret itself)
            "partialFingerprints": {"tokenHint/v1": f"{finding.hint}:{finding.path}"},
        }
        properties: dict[str, Any] = {"hint": finding.hint}
        if finding.blob:
            properties["gitObject"] = finding.blob
        if info.get("id"):
            properties.update(tokenId=info["id"], project=info.get("project"))
            properties["state"] = info.get("state")
        result["properties"] = properties
        results.append(result)
    return {
        "$schema": SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "tokenward",
                        "version": __version__,
                        "rules": [
                            {
                                "id": RULE_ID,
                                "name": "TokenwardToken",
                                "shortDescription": {"text": "A tokenward API token"},
                                "fullDescription": {
                                    "text": "A tokenward token (tw_live_… / tw_test_…) whose "
                                    "checksum is right: a real secret, committed or written "
                                    "where it should not be."
                                },
                                "help": {
                                    "text": "Revoke the token (tokenward scan --revoke, or "
                                    "tokenward token revoke ID), issue a new one and keep it "
                                    "in a secret store, not in the source."
                                },
                                "defaultConfiguration": {"level": "error"},
                                "properties": {"tags": ["security", "secret"]},
                            }
                        ],
                    }
                },
                "results": results,
            }
        ],
    }
