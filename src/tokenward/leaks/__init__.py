"""Leak response: find tokens where they should not be, and act when one is reported.

* :mod:`tokenward.leaks.scanner`: ``tokenward scan`` — files, trees (``.gitignore``
  respected), standard input and git history, each candidate confirmed by its checksum;
* :mod:`tokenward.leaks.cli`: the ``tokenward scan`` command (starts without the rest of
  the CLI: it is a pre-commit hook);
* :mod:`tokenward.leaks.sarif`: the scan's findings as SARIF 2.1.0, for code scanning;
* :mod:`tokenward.leaks.response`: what the server does with a leaked token (look it up,
  revoke or quarantine it per the project's ``leak_action``, alert, emit ``token.leaked``);
* :mod:`tokenward.leaks.partner`: ``POST /v1/leaks``, reports signed by a secret-scanning
  partner (GitHub's format: ECDSA P-256 over the raw body, public keys by id).
"""
