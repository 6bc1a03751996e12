"""The OpenAPI 3.1 document of the admin's JSON API, served at ``/api/openapi.json``.

It describes what ``_core`` does, limit for limit: the same constants bound the
parameters here and there, and ``tests/real_servers/test_admin_servers.py`` runs
schemathesis against a live server from this document (every operation, valid and
invalid input, response schemas checked).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from .._version import __version__
from ..guard._readout import DECISIONS, STAGES
from ..store._model import GUARD_ACTIONS, OPERATOR_ACTIONS
from ._core import CSRF_HEADER, HISTORY_LIMIT, MAX_BODY, MAX_VERSION, SERIES_MINUTES, WINDOW_SECONDS

_EXAMPLE = "checkout-v2"

_DESCRIPTION = f"""\
The JSON API of the canarymw operator page: read the rollouts of one store (their state,
per-variant numbers, the guard's verdict, the audit log, time series) and change them
(set, promote, rollback, pause, resume, reset) with the same rules as the `canarymw` command:
every change is audited with the caller's name and is a compare-and-set on the
rollout's version (a stale `expected_version` gets 409, never a silent overwrite).

Authentication is required for everything, this document included: a bearer token
(`Authorization: Bearer ...`, for scripts and the CLI) or HTTP basic auth (people),
or the application's own login when it is mounted with `CallableAuth`. The role
`read` may use every GET; `operate` may also POST `/api/action`. Credentials a browser
sends on its own (basic auth, a login cookie) need a CSRF token with every POST: the
`{CSRF_HEADER}` request header (or a `csrf` field in the body); GET responses under
`/api/` give the token to such callers in their own `{CSRF_HEADER}` header. A bearer
token needs none.

Every GET also answers HEAD. Errors are JSON objects with `error` (one sentence) and
`status`. Every response carries `Cache-Control: no-store`, `X-Content-Type-Options:
nosniff` and a Content-Security-Policy with `frame-ancestors 'none'`. Request bodies
are at most {MAX_BODY} bytes. Times are Unix seconds, latencies seconds, rates
fractions from 0 to 1, percents from 0 to 100; `null` stands for "no data"."""


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _response(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/responses/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


_NUMBER: dict[str, Any] = {"type": "number"}
_RATE: dict[str, Any] = {"type": ["number", "null"], "minimum": 0, "maximum": 1}
_SECONDS: dict[str, Any] = {"type": ["number", "null"], "minimum": 0}
_COUNT: dict[str, Any] = {"type": "integer", "minimum": 0}
_PERCENT: dict[str, Any] = {"type": "number", "minimum": 0, "maximum": 100}
# No control characters (the API also refuses other unprintable ones: format characters,
# separators other than the space, surrogates, unassigned code points).
_TEXT = "[^\\u0000-\\u001f\\u007f-\\u009f]"
_NAME: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": 200,
    "pattern": f"^{_TEXT}*[^\\s\\u0000-\\u001f\\u007f-\\u009f]{_TEXT}*$",
    "description": (
        "The rollout's name: printable text of 1 to 200 characters, not only spaces (Python's "
        "str.isprintable)."
    ),
    "examples": [_EXAMPLE],
}


def _schemas() -> dict[str, Any]:
    variant = {
        "type": "object",
        "description": "One variant's outcomes over the report's window, summed over every process.",
        "required": [
            "requests",
            "errors",
            "exceptions",
            "disconnects",
            "error_rate",
            "success_rate",
            "latency_mean",
            "p50",
            "p95",
            "p99",
        ],
        "properties": {
            "requests": _COUNT,
            "errors": {
                **_COUNT,
                "description": "Outcomes judged unsuccessful (5xx, exceptions, no response).",
            },
            "exceptions": _COUNT,
            "disconnects": _COUNT,
            "error_rate": {**_RATE, "description": "errors / requests; null without requests."},
            "success_rate": {**_RATE, "description": "1 - error_rate; null without requests."},
            "latency_mean": _SECONDS,
            "p50": _SECONDS,
            "p95": _SECONDS,
            "p99": _SECONDS,
        },
    }
    state = {
        "type": "object",
        "description": "A rollout's shared state in the store (the version grows with every change).",
        "required": ["percent", "paused", "version", "updated_at", "updated_by", "reason", "held"],
        "properties": {
            "percent": {**_PERCENT, "description": "Share of cohorts sent to new."},
            "paused": {"type": "boolean", "description": "Held by an operator."},
            "version": {"type": "integer", "minimum": 0},
            "updated_at": _NUMBER,
            "updated_by": {
                "type": "string",
                "description": "code (seeded), deploy, the guard, or the operator's name.",
            },
            "reason": {"type": "string"},
            "code_percent": {"type": ["number", "null"], "minimum": 0, "maximum": 100},
            "held": {
                "type": "boolean",
                "description": "An operator paused or rolled back since the code percent was last applied.",
            },
            "stage": {
                "enum": [*STAGES, None],
                "description": "A guarded rollout's stage; null without a guard.",
            },
            "verdict": {"type": ["string", "null"]},
            "stage_since": {"type": ["number", "null"]},
            "guard_since": {"type": ["number", "null"]},
            "guard": {
                "type": ["object", "null"],
                "description": "The guard's settings (steps, bake time, levels); null without a guard.",
            },
            "epoch": {"type": "string"},
            "assignment": {
                "type": "integer",
                "minimum": 0,
                "description": (
                    "The assignment epoch: one up at each reset and each drop to 0%; what the "
                    "drain and pin policies recorded for a visitor counts only within it."
                ),
            },
        },
    }
    interval = _nullable(
        {
            "type": "object",
            "required": ["percent", "low", "estimate", "high"],
            "properties": {
                "percent": _PERCENT,
                "low": _RATE,
                "estimate": _RATE,
                "high": _RATE,
            },
        }
    )
    evidence = _nullable(
        {
            "type": "object",
            "required": ["errors", "latency"],
            "properties": {"errors": _NUMBER, "latency": {"type": ["number", "null"]}},
        }
    )
    guard = {
        "type": "object",
        "description": (
            "What the guard of a guarded rollout sees and will do: judged live from the store's "
            "counters while it ramps (live true), else the sentence behind its last action."
        ),
        "required": ["stage", "live", "decision", "sentence", "controller", "outlook", "error"],
        "properties": {
            "stage": {"enum": [*STAGES, None]},
            "stage_since": {"type": ["number", "null"]},
            "guard_since": {"type": ["number", "null"]},
            "steps": {"type": ["array", "null"], "items": _PERCENT},
            "live": {"type": "boolean"},
            "decision": {
                "enum": [*DECISIONS, None],
                "description": "The live verdict's decision; null unless live.",
            },
            "sentence": {"type": ["string", "null"]},
            "notes": {"type": "array", "items": {"type": "string"}},
            "e_values": evidence,
            "harm_at": evidence,
            "step_requests": {"type": ["integer", "null"], "minimum": 0},
            "controller": _nullable(
                {
                    "type": "object",
                    "description": "The process holding the rollout's controller lease.",
                    "required": ["holder", "token", "expires_in"],
                    "properties": {
                        "holder": {"type": "string"},
                        "token": {"type": "integer"},
                        "expires_in": _NUMBER,
                    },
                }
            ),
            "blended": _nullable(
                {
                    "type": "object",
                    "description": "The blended success estimate with its interval now, next step, at 100%.",
                    "required": ["confidence", "now", "next", "full"],
                    "properties": {
                        "confidence": _NUMBER,
                        "now": interval,
                        "next": interval,
                        "full": interval,
                    },
                }
            ),
            "outlook": {"type": ["string", "null"], "description": "What the guard does next and when."},
            "error": {"type": ["string", "null"]},
        },
    }
    rollout = {
        "type": "object",
        "required": ["state", "age", "variants", "success", "guard"],
        "properties": {
            "state": _ref("RolloutState"),
            "age": {"type": "number", "minimum": 0, "description": "Seconds since the state last changed."},
            "variants": {
                "type": "object",
                "description": "old and new always (first), then any other variant that counted outcomes.",
                "required": ["old", "new"],
                "additionalProperties": _ref("VariantSummary"),
            },
            "success": {
                "type": "object",
                "required": ["blended", "measured"],
                "properties": {
                    "blended": {
                        **_RATE,
                        "description": "s = s_new * w + s_old * (1 - w) with w = percent / 100.",
                    },
                    "measured": {**_RATE, "description": "The success rate of all requests together."},
                },
            },
            "guard": _nullable(_ref("Guard")),
            "shadow": {
                "type": ["object", "null"],
                "description": (
                    "Shadow comparisons over the window (copies of requests sent to a shadow app "
                    "and compared with the primary's response), or null without any. Never a "
                    "variant: no success rate counts them."
                ),
                "properties": {
                    "copies": _COUNT,
                    "compared": _COUNT,
                    "mismatches": _COUNT,
                    "failures": _COUNT,
                    "dropped": _COUNT,
                    "mismatch_rate": {**_RATE, "description": "mismatches / compared."},
                    "p50": {"type": ["number", "null"]},
                    "p95": {"type": ["number", "null"]},
                },
            },
        },
    }
    lost = {
        "type": "object",
        "description": "A process that stopped without its final flush (killed).",
        "required": ["process", "last_flush_at", "last_batch"],
        "properties": {
            "process": {"type": "string", "description": "HOST:PID:RANDOM"},
            "host": {"type": "string"},
            "pid": {"type": ["integer", "null"]},
            "last_flush_at": _NUMBER,
            "flushed": _COUNT,
            "last_batch": {**_COUNT, "description": "Outcomes its last flush added: what it likely lost."},
            "interval": _NUMBER,
            "rollouts": {"type": "array", "items": {"type": "string"}},
        },
    }
    processes = {
        "type": "object",
        "description": (
            "The ledger of the processes that added counters in the window: how many ran, how many "
            "stopped gracefully, and which stopped without their final flush."
        ),
        "required": ["since", "reported", "running", "closed", "lost", "lost_outcomes_estimate"],
        "properties": {
            "since": _NUMBER,
            "reported": _COUNT,
            "running": _COUNT,
            "closed": _COUNT,
            "lost": {"type": "array", "items": lost},
            "lost_outcomes_estimate": _COUNT,
        },
    }
    report = {
        "type": "object",
        "description": "What `canarymw status --json` prints.",
        "required": ["at", "window", "rollouts"],
        "properties": {
            "at": _NUMBER,
            "window": {"type": "number", "description": "Seconds of outcome counters summarised."},
            "rollouts": {"type": "object", "additionalProperties": _ref("RolloutReport")},
            "processes": processes,
        },
    }
    change = {
        "type": "object",
        "description": "One entry of a rollout's audit log.",
        "required": [
            "rollout",
            "version",
            "at",
            "by",
            "action",
            "reason",
            "percent_before",
            "percent_after",
            "paused_before",
            "paused_after",
        ],
        "properties": {
            "rollout": {"type": "string"},
            "version": {"type": "integer", "description": "The state's version after this change."},
            "at": _NUMBER,
            "by": {"type": "string"},
            "action": {
                "type": "string",
                "description": (
                    "seed, restore, deploy, deploy-held, an operator's action, or the guard's "
                    f"({', '.join(GUARD_ACTIONS)})."
                ),
            },
            "reason": {"type": "string"},
            "percent_before": {"type": ["number", "null"]},
            "percent_after": _NUMBER,
            "paused_before": {"type": ["boolean", "null"]},
            "paused_after": {"type": "boolean"},
            "extra": {"type": "object"},
        },
    }
    point = {
        "type": "object",
        "required": ["requests", "errors", "p95"],
        "properties": {"requests": _COUNT, "errors": _COUNT, "p95": _SECONDS},
    }
    common = {
        "name": _NAME,
        "reason": {
            "type": ["string", "null"],
            "maxLength": 500,
            "pattern": "^[^\\u0000-\\u0009\\u000b-\\u001f\\u007f-\\u009f]*$",
            "description": "Why: kept in the audit log (printable text; newlines allowed).",
        },
        "expected_version": {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_VERSION,
            "description": "The rollout's version the change was made against; another one gets 409.",
        },
        "csrf": {
            "type": "string",
            "description": f"The CSRF token, for ambient credentials without the {CSRF_HEADER} header.",
        },
    }
    required = ["name", "action", "expected_version"]
    return {
        "Error": {
            "type": "object",
            "required": ["error", "status"],
            "properties": {
                "error": {"type": "string", "description": "One sentence saying what is wrong."},
                "status": {"type": "integer", "description": "The HTTP status, again."},
                "rollout": {"type": ["string", "null"]},
                "current_version": {
                    "type": ["integer", "null"],
                    "description": "409 only: the rollout's version now.",
                },
            },
        },
        "VariantSummary": variant,
        "RolloutState": state,
        "Guard": guard,
        "RolloutReport": rollout,
        "Report": report,
        "Change": change,
        "History": {
            "type": "object",
            "required": ["rollout", "changes"],
            "properties": {
                "rollout": {"type": "string"},
                "changes": {"type": "array", "items": _ref("Change"), "description": "Oldest first."},
            },
        },
        "Series": {
            "type": "object",
            "required": ["rollout", "window_seconds", "since", "points"],
            "properties": {
                "rollout": {"type": "string"},
                "window_seconds": {"type": "integer", "description": "Seconds per point."},
                "since": _NUMBER,
                "points": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["window", "variants"],
                        "properties": {
                            "window": {"type": "integer", "description": "Unix time the window starts."},
                            "variants": {
                                "type": "object",
                                "properties": {"old": point, "new": point},
                                "additionalProperties": False,
                            },
                        },
                    },
                },
            },
        },
        "SetAction": {
            "type": "object",
            "description": "Send percent of cohorts to new (ends a hold from an earlier rollback or pause).",
            "required": [*required, "percent"],
            "properties": {
                "action": {"const": "set"},
                "percent": {**_PERCENT, "description": "A finite number from 0 to 100."},
                **common,
            },
        },
        "OtherAction": {
            "type": "object",
            "description": (
                "promote (percent 100), rollback (percent 0, held against deploys), pause (held as "
                "it is), resume (lifts a pause), reset (a new assignment epoch: what the drain and "
                "pin policies recorded is void): these take no percent."
            ),
            "required": required,
            "properties": {
                "action": {"enum": [a for a in OPERATOR_ACTIONS if a != "set"]},
                "percent": {"type": "null"},
                **common,
            },
        },
        "ActionRequest": {
            "oneOf": [_ref("SetAction"), _ref("OtherAction")],
            "discriminator": {
                "propertyName": "action",
                "mapping": {
                    a: "#/components/schemas/" + ("SetAction" if a == "set" else "OtherAction")
                    for a in OPERATOR_ACTIONS
                },
            },
        },
        "ActionResult": {
            "type": "object",
            "required": ["rollout", "action", "state"],
            "properties": {
                "rollout": {"type": "string"},
                "action": {"enum": list(OPERATOR_ACTIONS)},
                "state": _ref("RolloutState"),
            },
        },
    }


def _responses() -> dict[str, Any]:
    def error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
        got: dict[str, Any] = {
            "description": description,
            "content": {"application/json": {"schema": _ref("Error")}},
        }
        if headers:
            got["headers"] = headers
        return got

    return {
        "BadRequest": error("A parameter or a field is missing or not valid; the sentence says which."),
        "Unauthorized": error(
            "No credentials, or ones the admin does not know.",
            {
                "WWW-Authenticate": {
                    "description": "A challenge per scheme the admin takes (Basic, Bearer).",
                    "schema": {"type": "string"},
                    "required": True,
                }
            },
        ),
        "Forbidden": error(
            "The caller's role is read, or the CSRF token that ambient credentials need is missing or stale."
        ),
        "NotFound": error("The store has no rollout of that name."),
        "MethodNotAllowed": error(
            "The path takes another method.",
            {
                "Allow": {
                    "description": "The methods the path takes.",
                    "schema": {"type": "string"},
                    "required": True,
                }
            },
        ),
        "Conflict": error(
            "The rollout is no longer at expected_version: someone else changed it meanwhile. "
            "current_version says where it is now; look at it again and retry."
        ),
        "TooLarge": error(f"The request body is over {MAX_BODY} bytes."),
        "UnsupportedMediaType": error("The body is not application/json."),
        "Unavailable": error("The store cannot be reached (or answered too slowly)."),
    }


_CSRF_OUT = {
    CSRF_HEADER: {
        "description": (
            "For callers with ambient credentials (basic auth, a login cookie) and the operate "
            "role: the CSRF token their POSTs need (valid for an hour or two)."
        ),
        "schema": {"type": "string"},
    }
}


def _get(
    summary: str, description: str, schema: str, parameters: list[Any], *, named: bool
) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "200": {
            "description": "OK",
            "headers": _CSRF_OUT,
            "content": {"application/json": {"schema": _ref(schema) if schema else {"type": "object"}}},
        }
    }
    if parameters:
        responses["400"] = _response("BadRequest")
    responses["401"] = _response("Unauthorized")
    if named:
        responses["404"] = _response("NotFound")
    responses["405"] = _response("MethodNotAllowed")
    responses["503"] = _response("Unavailable")
    return {
        "summary": summary,
        "description": description,
        "operationId": summary.lower().replace(" ", "_").replace("'", ""),
        "parameters": parameters,
        "responses": responses,
    }


def _parameters() -> dict[str, Any]:
    low, high, default = HISTORY_LIMIT
    m_low, m_high, m_default = SERIES_MINUTES
    w_low, w_high = WINDOW_SECONDS
    return {
        "name": {
            "name": "name",
            "in": "query",
            "required": True,
            "description": "The rollout.",
            "schema": _NAME,
        },
        "limit": {
            "name": "limit",
            "in": "query",
            "required": False,
            "description": "The newest N entries (ASCII digits).",
            "schema": {"type": "integer", "minimum": low, "maximum": high, "default": default},
        },
        "minutes": {
            "name": "minutes",
            "in": "query",
            "required": False,
            "description": "How far back (ASCII digits).",
            "schema": {"type": "integer", "minimum": m_low, "maximum": m_high, "default": m_default},
        },
        "window": {
            "name": "window",
            "in": "query",
            "required": False,
            "description": (
                "Seconds of outcome counters to summarise (digits, optionally with a decimal "
                "fraction; default: the admin's window, 300 unless configured)."
            ),
            "schema": {"type": "number", "minimum": w_low, "maximum": w_high},
        },
    }


def document(root: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the JSON API of an admin mounted at ``root``."""

    def param(name: str) -> dict[str, str]:
        return {"$ref": f"#/components/parameters/{name}"}

    action = {
        "summary": "Change a rollout",
        "description": (
            "Apply an operator's action, as the canarymw command does: audited with the caller's "
            "name and reason, and a compare-and-set on expected_version. An action that changes "
            "nothing (pausing a paused rollout) writes nothing and returns the state. Needs the "
            "operate role, and a CSRF token with ambient credentials. Unknown fields are ignored."
        ),
        "operationId": "change_rollout",
        "parameters": [
            {
                "name": CSRF_HEADER,
                "in": "header",
                "required": False,
                "description": "The CSRF token (ambient credentials only; a bearer token needs none).",
                "schema": {"type": "string"},
            }
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": _ref("ActionRequest"),
                    "examples": {
                        "set": {
                            "value": {
                                "name": _EXAMPLE,
                                "action": "set",
                                "percent": 25,
                                "reason": "error rate flat for an hour",
                                "expected_version": 3,
                            }
                        },
                        "rollback": {
                            "value": {
                                "name": _EXAMPLE,
                                "action": "rollback",
                                "reason": "p95 doubled",
                                "expected_version": 4,
                            }
                        },
                    },
                }
            },
        },
        "responses": {
            "200": {
                "description": "The rollout's state after the change.",
                "content": {"application/json": {"schema": _ref("ActionResult")}},
            },
            "400": _response("BadRequest"),
            "401": _response("Unauthorized"),
            "403": _response("Forbidden"),
            "404": _response("NotFound"),
            "405": _response("MethodNotAllowed"),
            "409": _response("Conflict"),
            "413": _response("TooLarge"),
            "415": _response("UnsupportedMediaType"),
            "503": _response("Unavailable"),
        },
    }
    paths = {
        "/api/openapi.json": {
            "get": _get("This document", "The OpenAPI document of this API.", "", [], named=False)
        },
        "/api/rollouts": {
            "get": _get(
                "Every rollout",
                "The report of every rollout in the store: what `canarymw status --json` prints.",
                "Report",
                [param("window")],
                named=False,
            )
        },
        "/api/rollout": {
            "get": _get(
                "One rollout",
                "The report of one rollout: what `canarymw status NAME --json` prints.",
                "Report",
                [param("name"), param("window")],
                named=True,
            )
        },
        "/api/history": {
            "get": _get(
                "A rollout's audit log",
                "Who changed what, when and why, oldest first.",
                "History",
                [param("name"), param("limit")],
                named=True,
            )
        },
        "/api/series": {
            "get": _get(
                "A rollout's time series",
                "Requests, errors and p95 latency of old and new per counter window (10 s).",
                "Series",
                [param("name"), param("minutes")],
                named=True,
            )
        },
        "/api/action": {"post": action},
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "canarymw admin",
            "version": __version__,
            "description": _DESCRIPTION,
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "servers": [{"url": quote(root, safe="/") or "/", "description": "Where the admin is mounted."}],
        "security": [{"bearer": []}, {"basic": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token of BearerAuth (at least 32 characters); no CSRF token needed.",
                },
                "basic": {
                    "type": "http",
                    "scheme": "basic",
                    "description": "A user of BasicAuth (HTTPS only); POSTs need the CSRF token.",
                },
            },
            "parameters": _parameters(),
            "schemas": _schemas(),
            "responses": _responses(),
        },
    }
