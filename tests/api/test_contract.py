"""``/openapi.json`` is the truth: schemathesis, every check on, against a live server.

Each operation gets a few generated cases (examples, coverage edge cases, then fuzzing;
positive and negative), sent over HTTP to a real server, and every answer is checked
against the document: status documented, content type, body schema, headers; valid data
accepted, invalid data refused; no 5xx; authentication not ignored; 405s name their
methods. A route, status, field or rule that drifts from the document fails here.

One exception is made, by error code: rules that depend on the stored state or compare two
fields (``since`` before ``until``, a grace shorter than the period, a project policy's
lifetime cap) refuse values no JSON Schema can rule out, and the token endpoint answers
``400 invalid_grant`` for a well-formed token that is no grant, as RFC 6749 §5.2 says.
Those answers are let through positive-data acceptance, and only those.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.conftest import listening_socket, port_of
from tokenward.api.contract import OPERATIONS

#: 422 (or 409) codes of rules JSON Schema cannot state: across fields, or against state
RULES_NO_SCHEMA_STATES = frozenset(
    {
        "invalid_time_range",  # since must be before until
        "invalid_grace",  # a rotation's grace shorter than its period
        "lifetime_exceeds_policy",  # the project's stored lifetime cap
        "invalid_expiry",  # expires_at in the future: against the clock
        "invalid_not_before",  # not_before at most 3660 days from now: the clock too
        "unknown_scope",  # strict: a scope no route policy and no token of the project uses
    }
)
#: 400 codes of the token endpoint for a well-formed value that is no valid grant (§5.2)
OAUTH_GRANT_ERRORS = frozenset({"invalid_grant", "invalid_scope", "invalid_target"})
#: generated cases per operation and mode (positive, negative); more for a deeper local run
EXAMPLES = int(os.environ.get("TOKENWARD_TEST_CONTRACT_EXAMPLES", "25"))


@dataclass
class ContractServer:
    url: str
    admin_token: str


@pytest.fixture(scope="module")
def contract_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ContractServer]:
    import uvicorn

    from tokenward.app import create_asgi
    from tokenward.bootstrap import initialize
    from tokenward.settings import Settings

    data_dir: Path = tmp_path_factory.mktemp("contract")
    sock = listening_socket()
    settings = Settings(
        data_dir=data_dir,
        secret_key=secrets.token_hex(32),
        port=port_of(sock),
        # generated cases send many bad credentials from one address: not what is tested
        auth_failure_limit="1000000/minute",
    )
    result = asyncio.run(initialize(settings))
    server = uvicorn.Server(uvicorn.Config(create_asgi(settings), log_level="error"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield ContractServer(f"http://127.0.0.1:{port_of(sock)}", result.admin_token or "")
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def contract_schema(contract_server: ContractServer) -> Any:
    # The admin credential, for operations whose document says bearer: schemathesis applies
    # it itself, so it knows when a negative case leaves it out on purpose.
    auth = {"openapi": {"bearer": {"bearer": contract_server.admin_token}}}
    config = SchemathesisConfig.from_dict({"auth": auth})
    return schemathesis.openapi.from_url(f"{contract_server.url}/openapi.json", config=config)


def _error_code(response: Any) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("error") if isinstance(body, dict) else None


def accepts_valid_data_but_for_rules_no_schema_states(
    ctx: Any, response: Any, case: Any
) -> bool | None:
    """positive_data_acceptance, less the answers of the rules listed above."""
    code = _error_code(response)
    if response.status_code in (409, 422) and code in RULES_NO_SCHEMA_STATES:
        return None
    operation_id = case.operation.definition.raw.get("operationId")
    if operation_id == "token" and response.status_code == 400 and code in OAUTH_GRANT_ERRORS:
        return None
    return positive_data_acceptance(ctx, response, case)  # type: ignore[no-any-return]


@pytest.mark.parametrize("mode", list(GenerationMode))
@pytest.mark.parametrize("operation_id", sorted(OPERATIONS))
def test_the_server_answers_as_its_openapi_document_says(
    operation_id: str, mode: GenerationMode, contract_schema: Any
) -> None:
    operation = contract_schema.find_operation_by_id(operation_id)
    raw = operation.definition.raw
    if mode == GenerationMode.NEGATIVE and not (raw.get("parameters") or "requestBody" in raw):
        pytest.skip("no input to make invalid")

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,  # the same cases on every run: a failure is a drift, not luck
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def answers_as_documented(case: Any) -> None:
        if OPERATIONS[operation_id].auth == "client" and isinstance(case.body, dict):
            # schemathesis authenticates with the bearer scheme; client_secret_post as well
            # would be two methods (refused, RFC 6749 §2.3)
            case.body.pop("client_secret", None)
        case.call_and_validate(
            excluded_checks=[positive_data_acceptance],
            additional_checks=[accepts_valid_data_but_for_rules_no_schema_states],
        )

    answers_as_documented()


def test_the_document_covers_every_route_once(contract_schema: Any) -> None:
    raw = contract_schema.raw_schema
    ids = [op["operationId"] for item in raw["paths"].values() for op in item.values()]
    assert sorted(ids) == sorted(OPERATIONS)  # stable, unique operationIds, none missing
    assert raw["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": raw["components"]["securitySchemes"]["bearer"]["description"],
    }
    for item in raw["paths"].values():
        for op in item.values():
            for status, answer in op["responses"].items():
                if status.startswith(("4", "5")) and op["operationId"] != "readyz":
                    schema_ref = answer["content"]["application/json"]["schema"]["$ref"]
                    assert schema_ref == "#/components/schemas/ErrorBody", (op, status)
            assert "500" not in op["responses"]
