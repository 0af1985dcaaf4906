# SPDX-License-Identifier: MIT
#
# MIT License
#
# Copyright (c) 2026 The sqstore authors
#
# Permission is hereby granted, free of charge, to any person obtaining a copy
# of this software and associated documentation files (the "Software"), to deal
# in the Software without restriction, including without limitation the rights
# to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
# copies of the Software, and to permit persons to whom the Software is
# furnished to do so, subject to the following conditions:
#
# The above copyright notice and this permission notice shall be included in all
# copies or substantial portions of the Software.
#
# THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
# IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
# FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
# AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
# LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
# OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
# SOFTWARE.
"""Safe, fast storage for a quantum-cloud job exchange.

A frontend ("Alice") and a hardware or simulator operator ("Bob") never talk to
each other: they exchange backend configurations, jobs, job statuses, signed
results and public keys through a shared storage.  sqstore is the one module
both sides import for that.  Its documents and layouts are those of sqooler 0.9,
so a sqooler spooler or frontend and an sqstore one can share a storage.

A storage handle is a small dict of CRUD callables (``upload``, ``update``,
``get``, ``move``, ``delete``, ``list``, and ``swap``, a compare-and-swap) made
by a factory; every operation takes the handle first.  Usage::

    >>> import sqstore
    >>> store = sqstore.memory_storage()
    >>> sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    >>> job_id = sqstore.upload_job(store, {"experiment_0": {}}, "sim", "alice")
    >>> sqstore.upload_status(store, "sim", "alice", job_id).status
    'INITIALIZING'
    >>> nxt = sqstore.get_next_job_in_queue(store, "sim")
    >>> nxt.job_id == job_id, nxt.job_json_path
    (True, 'jobs/running')

Backends: ``memory_storage()`` (in-process), ``local_storage(root)`` (a
directory), ``mongodb_storage(uri)`` (a MongoDB deployment, through pymongo) and
``dropbox_storage(...)`` (a Dropbox app folder, through the official SDK);
``open_storage(url)`` picks one from a URL.  Layers (``read_only``,
``with_retry``, ``with_logging``, ``with_metrics``, composed by ``stack``) wrap
a handle; ``copy_storage`` moves a whole exchange between storages and
``work`` runs Bob's worker loop (also ``python -m sqstore copy`` / ``work``).

Claims are exactly-once and leased (`claim_jobs`, `requeue_expired`); writes are
atomic; names are validated before they reach a path or a query; results are
signed with Ed25519 in sqooler's JWS form or RFC 7515's.  PyNaCl, pymongo and
the Dropbox SDK are imported only by the functions that need them, so
``import sqstore`` loads attrs and cattrs alone.  Python >= 3.10.

The library ends at the ``# Programs`` banner; the programs below it (the demo
simulator, ``work``, ``copy_storage``, the command line, the bench) use only
the library, which names none of them: a vendor may cut the file there.
"""

from __future__ import annotations

# ============================================================================
# Imports
# ============================================================================
import base64
import binascii
import contextlib
import errno
import functools
import json
import math
import os
import re
import stat
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from typing import (
    TYPE_CHECKING,
    Annotated,
    Any,
    Literal,
    ParamSpec,
    Protocol,
    TypedDict,
    TypeVar,
    cast,
)

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override
from cattrs.preconf.json import make_converter

if TYPE_CHECKING:  # the CLI's modules load only when it runs: import sqstore stays fast
    import argparse

__version__ = "0.1.0"
__all__ = [
    "DEFAULT_HEARTBEAT",
    "DEFAULT_LEASE",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_SKEW",
    "DEFAULT_TIMEOUT",
    "DROPBOX_LAYOUT",
    "JWK",
    "LOCAL_LAYOUT",
    "LOCATIONS",
    "STATUSES",
    "AlreadyExistsError",
    "BackendConfig",
    "BackendDict",
    "BackendStatus",
    "BadSignatureError",
    "ConfigLike",
    "CredentialsError",
    "DataDict",
    "Doc",
    "ExperimentDict",
    "FlatJWS",
    "GateDict",
    "InvalidDocumentError",
    "InvalidNameError",
    "JWSDoc",
    "JWSHeader",
    "KeyLike",
    "Layer",
    "Layout",
    "Lease",
    "LeaseLostError",
    "LeasePolicy",
    "ListFn",
    "NextJob",
    "NotFinishedError",
    "NotFoundError",
    "QueueStats",
    "ReadOnlyError",
    "ResultDict",
    "ResultLike",
    "RunningJob",
    "SqstoreError",
    "StatusLike",
    "StatusMsg",
    "Storage",
    "StorageError",
    "TransientError",
    "backend_dict_to_qiskit",
    "backend_dict_to_qiskit_status",
    "cancel_job",
    "cancel_requested",
    "check_display_name",
    "check_handle",
    "check_name",
    "check_signing_key",
    "claim_job",
    "claim_jobs",
    "configure_converter",
    "create_job_id",
    "demo_config",
    "dropbox_storage",
    "from_doc",
    "generate_keypair",
    "get_attribute_id",
    "get_attribute_path",
    "get_backend_dict",
    "get_backend_status",
    "get_backends",
    "get_config",
    "get_file_queue",
    "get_job",
    "get_next_job_in_queue",
    "get_public_key",
    "get_public_key_from_kid",
    "get_result",
    "get_status",
    "is_signed",
    "is_stored",
    "job_id_from",
    "jwk_thumbprint",
    "lease_expired",
    "load_jwk",
    "local_storage",
    "locate",
    "locate_job",
    "long_backend_name",
    "memory_storage",
    "mongodb_storage",
    "new_job_id",
    "open_storage",
    "parse_jwk",
    "payload_of",
    "prune",
    "public_from_private",
    "queue_stats",
    "read_only",
    "redact_url",
    "renew_lease",
    "requeue_expired",
    "requeue_job",
    "running_jobs",
    "save_jwk",
    "sign_doc",
    "stack",
    "timestamp_queue",
    "to_doc",
    "update_config",
    "update_in_database",
    "upload_config",
    "upload_job",
    "upload_public_key",
    "upload_result",
    "upload_status",
    "verify_doc",
    "verify_job",
    "verify_result",
    "with_logging",
    "with_metrics",
    "with_retry",
    "wrap_ops",
]

# ============================================================================
# Constants
# ============================================================================
_STATUS_ORDER = ("INITIALIZING", "QUEUED", "DONE", "ERROR")
STATUSES = frozenset(_STATUS_ORDER)
"""The job states that sqooler 0.9 accepts."""

DEFAULT_TIMEOUT = 300.0
"""Seconds after the last queue check at which a backend counts as not operational."""

DEFAULT_HEARTBEAT = 60.0
"""Seconds between two writes of ``last_queue_check`` while a worker polls."""

DEFAULT_LEASE = 600.0
"""Seconds a claimed job belongs to its worker before it may be requeued."""

DEFAULT_SKEW = 120.0
"""Seconds past its time at which a lease counts as expired: the clock skew tolerated."""

DEFAULT_MAX_ATTEMPTS = 3
"""Claims of one job after which a sweep gives it up (its worker died each time)."""

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@+-]{0,127}")
_PATH_RE = re.compile(rf"{_NAME_RE.pattern}(?:/{_NAME_RE.pattern})*")
_DISPLAY_NAME_RE = re.compile(r"[a-z0-9]{1,64}")
_STORE_NAME_RE = re.compile(r"[a-z0-9]{1,32}")
_OBJECT_ID_RE = re.compile(r"[0-9a-f]{24}")  # a hex24 job id, a MongoDB ObjectId
_SIGNED_KEYS = frozenset({"header", "payload", "signature"})
_HEADER_KEYS = frozenset({"alg", "kid", "typ", "version"})
_NONE = "None"  # sqooler's spelling of "no job" in a next-job answer
_JSON = json.JSONEncoder(allow_nan=False)  # json.dumps would build one per call
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)

T = TypeVar("T")
_P = ParamSpec("_P")

# ============================================================================
# Errors
# ============================================================================


class SqstoreError(Exception):
    """Base class of every error sqstore raises on purpose."""


class NotFoundError(SqstoreError, FileNotFoundError):
    """A document that should exist does not (a ``FileNotFoundError``, as in sqooler)."""


class NotFinishedError(NotFoundError):
    """A job has no result yet because it is still queued or running.

    A `NotFoundError`, so code that catches sqooler's ``FileNotFoundError`` keeps
    working; ``status`` is the job's status now (``"INITIALIZING"`` or ``"QUEUED"``).
    """

    def __init__(self, message: str, status: str = "INITIALIZING") -> None:
        super().__init__(message)
        self.status = status


class AlreadyExistsError(SqstoreError, FileExistsError):
    """A document that must not exist yet does (a ``FileExistsError``, as in sqooler)."""


class InvalidDocumentError(SqstoreError, ValueError):
    """A stored or given document is not valid JSON or not of the expected shape.

    ``partial`` is true when the text is not JSON at all, as a document looks
    while another program rewrites it in place: reading it again may succeed.
    """

    partial: bool = False


class InvalidNameError(SqstoreError, ValueError):
    """A name (display name, username, job id, kid, path) is not allowed.

    ``kind`` says which name (``"display_name"``, ``"job_id"``, ...), ``shown`` is
    the name as a shortened ``repr`` (safe to print) and ``rule`` what such a name is.
    """

    kind: str = "name"
    shown: str = ""
    rule: str = ""


class TransientError(SqstoreError):
    """A failure that may pass (lost connection, rate limit): the only retried error."""


class StorageError(SqstoreError, OSError):
    """Any other failure of the storage itself (disk full, permission denied, ...)."""


class CredentialsError(SqstoreError, PermissionError):
    """The storage refused the credentials; the message says what to fix."""


class ReadOnlyError(SqstoreError, PermissionError):
    """A write reached a store opened read-only (`read_only`)."""


class LeaseLostError(SqstoreError):
    """A worker acted on a job whose lease it no longer holds."""


class BadSignatureError(SqstoreError, ValueError):
    """A signature does not verify, or the key to verify or sign with is wrong.

    ``payload`` holds the unverified payload where there is one: inspect it,
    never trust it.
    """

    def __init__(self, message: str, payload: Doc | None = None) -> None:
        super().__init__(message)
        self.payload = payload


# ============================================================================
# Records
# ============================================================================
Doc = dict[str, Any]
"""A JSON object as stored: str keys, JSON-serialisable values."""

ColdAtomType = Literal["fermion", "boson", "spin", "mixed"]
WireOrder = Literal["sequential", "interleaved"]
_KeyText = Annotated[str, "base64url"]  # a JWK member: text, read from ASCII bytes too


class _DocView(Mapping[str, Any]):
    """Lets a record also read as its JSON document, ``to_doc(record)``, read-only.

    pydantic validates a mapping as a model, so a record passes as the sqooler
    model of its shape (a frontend hands it to django-ninja as is), and
    ``dict(record)`` is its document.  Attributes, ``==``, hash and repr stay the
    record's: a record never equals a dict.
    """

    __slots__ = ()

    def __getitem__(self, key: str) -> Any:
        kind = _doc_fields(type(self)).get(key) if isinstance(key, str) else None
        if kind is None:
            return to_doc(self)[key]  # KeyError, as a dict
        return _converter.unstructure(getattr(self, key), unstructure_as=kind)

    def __iter__(self) -> Iterator[str]:
        return iter(to_doc(self))

    def __len__(self) -> int:
        return len(to_doc(self))


@attrs.frozen
class Layout:
    """Where each kind of document lives, and how job ids are made.

    Folder and id templates may use ``{display_name}``, ``{username}`` and
    ``{job_id}``.  The default is sqooler's local layout.
    """

    configs: str = "backends/configs"
    config_id: str = "{display_name}"
    public_keys: str = "backends/public_keys"
    queued: str = "jobs/queued/{display_name}"
    running: str = "jobs/running"
    finished: str = "jobs/finished/{display_name}"
    deleted: str = "jobs/deleted"
    leases: str = "jobs/leases"
    status: str = "status/{display_name}"
    results: str = "results/{display_name}"
    job_file: str = "{job_id}"
    status_file: str = "{job_id}"
    result_file: str = "{job_id}"
    job_ids: Literal["hex24", "dated"] = "hex24"
    signature_format: Literal["sqooler", "rfc7515"] = "sqooler"


LOCAL_LAYOUT = Layout()
"""sqooler's local layout (also the default of `memory_storage`)."""

DROPBOX_LAYOUT = Layout(
    configs="Backend_files/Config",  # a config is stored as Config/<display_name>/config.json
    public_keys="Backend_files/public_keys",
    queued="Backend_files/Queued_Jobs/{display_name}",
    running="Backend_files/Running_Jobs",
    finished="Backend_files/Finished_Jobs/{display_name}/{username}",
    deleted="Backend_files/Deleted_Jobs",
    leases="Backend_files/Leases",
    status="Backend_files/Status/{display_name}/None",  # sqooler 0.9 writes 'None' here
    results="Backend_files/Result/{display_name}/{username}",
    job_file="job-{job_id}",
    status_file="status-{job_id}",
    result_file="result-{job_id}",
    job_ids="dated",
)
"""sqooler's Dropbox layout: ``Backend_files/...``, ids ``YYYYMMDD_HHMMSS-<dn>-<user>-<5 hex>``."""


@attrs.frozen
class BackendConfig(_DocView):
    """A backend's configuration as Bob uploads it (sqooler's ``BackendConfigSchemaIn``)."""

    description: str
    version: str
    display_name: str | None
    cold_atom_type: ColdAtomType
    gates: tuple[Doc, ...]
    max_experiments: int
    max_shots: int
    simulator: bool
    supported_instructions: tuple[str, ...]
    num_wires: int
    wire_order: WireOrder
    num_species: int
    pending_jobs: int | None = None
    status_msg: str | None = None
    last_queue_check: datetime | None = None
    sign: bool = False
    kid: str | None = None
    require_signed_jobs: bool = False  # written only when set: see `cancel_job`'s section
    accepted_kids: tuple[str, ...] = ()


@attrs.frozen
class BackendDict(_DocView):
    """The Qiskit-shaped view of a backend that a frontend serves."""

    description: str
    display_name: str
    backend_version: str
    n_qubits: int
    backend_name: str
    basis_gates: tuple[str, ...]
    max_experiments: int
    max_shots: int
    simulator: bool
    gates: tuple[Doc, ...]
    supported_instructions: tuple[str, ...]
    cold_atom_type: ColdAtomType
    wire_order: WireOrder
    num_species: int
    conditional: bool = False
    coupling_map: str = "linear"
    dynamic_reprate_enabled: bool = False
    local: bool = False
    memory: bool = True
    open_pulse: bool = False
    url: str | None = None


@attrs.frozen
class BackendStatus(_DocView):
    """The Qiskit-shaped status of a backend."""

    backend_name: str
    backend_version: str
    operational: bool
    pending_jobs: int
    status_msg: str


@attrs.frozen
class StatusMsg(_DocView):
    """Where a job is in its life cycle (sqooler's ``StatusMsgDict``)."""

    job_id: str
    status: str = attrs.field(validator=attrs.validators.in_(_STATUS_ORDER))
    detail: str
    error_message: str


@attrs.frozen
class GateDict(_DocView):
    """One instruction: a gate name, the wires it acts on, its parameters."""

    name: str
    wires: tuple[int, ...]
    params: tuple[float, ...]


@attrs.frozen
class DataDict(_DocView):
    """The data of one experiment: measured outcomes, and the instructions run."""

    memory: tuple[str, ...]
    instructions: tuple[GateDict, ...] | None = None


@attrs.frozen
class ExperimentDict(_DocView):
    """The result of one experiment of a job."""

    header: Doc
    shots: int
    success: bool
    data: DataDict


@attrs.frozen(kw_only=True)
class ResultDict(_DocView):
    """A job's result, Qiskit-like (sqooler's ``ResultDict``); fields by keyword."""

    backend_name: str | None = None
    display_name: str
    backend_version: str
    job_id: str
    qobj_id: str | None = None
    success: bool = True
    status: str = attrs.field(validator=attrs.validators.in_(_STATUS_ORDER))
    header: Doc = attrs.field(factory=dict)
    results: tuple[ExperimentDict, ...] = ()


@attrs.frozen
class NextJob(_DocView):
    """The answer to "which job next?": ``"None"`` twice when the queue is empty."""

    job_id: str
    job_json_path: str


@attrs.frozen
class JWK(_DocView):
    """An Ed25519 JSON Web Key (RFC 8037), private when ``d`` is set.

    ``x`` and ``d`` are base64url text, as the stored JWK has them; the ASCII
    bytes that sqooler's pydantic ``JWK`` holds are read as that text.
    """

    x: _KeyText
    key_ops: Literal["sign", "verify"]
    kid: str
    d: _KeyText | None = attrs.field(default=None, repr=False)
    kty: Literal["OKP"] = "OKP"
    alg: Literal["EdDSA"] = "EdDSA"
    crv: Literal["Ed25519"] = "Ed25519"


@attrs.frozen(kw_only=True)
class JWSHeader(_DocView):
    """The header of sqooler's JWS, signed as compact JSON in this field order."""

    alg: str = "EdDSA"
    kid: str
    typ: str = "JWS"
    version: str = "0.1"


@attrs.frozen
class JWSDoc(_DocView):
    """A payload signed in sqooler's JWS form (padded base64url signature)."""

    header: JWSHeader
    payload: Doc
    signature: str


@attrs.frozen
class FlatJWS:
    """A payload signed in RFC 7515's flattened JSON serialization (unpadded base64url)."""

    protected: str
    payload: str
    signature: str
    header: Doc = attrs.field(factory=dict)  # the unprotected header, rarely used


@attrs.frozen
class Lease:
    """Who holds a claimed job, and until when (Unix seconds).

    ``holder`` is empty once a sweep has requeued the job; ``attempts`` counts
    its claims; ``finish`` is the final status document while its worker
    finishes it (so that a sweep can complete a finish whose worker died).
    """

    job_id: str
    display_name: str
    holder: str
    token: str
    expires: float
    attempts: int = 1
    finish: Doc | None = None


@attrs.frozen
class RunningJob:
    """A claimed job as `queue_stats` sees it: who holds it and how its lease stands.

    ``age`` is the seconds since the lease was taken or last renewed (assuming the
    workers' lease length), ``expires_in`` the seconds until it runs out (negative: past).
    """

    job_id: str
    holder: str
    age: float
    expires_in: float
    attempts: int


@attrs.frozen
class QueueStats:
    """A backend's queue at one instant (see `queue_stats`); times in seconds."""

    display_name: str
    queued: int
    oldest_queued_age: float | None
    running: tuple[RunningJob, ...]
    finished: int
    failed: int
    jobs_per_hour_last_hour: float
    jobs_per_hour_last_day: float
    median_seconds_to_done: float | None


_MAX_SECONDS = 1e9
"""The longest time a `LeasePolicy` takes (31 years): beyond it, timers and clocks overflow."""


def _seconds(*, zero: bool) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    """An attrs validator: seconds from 0.001 (or 0 if *zero*) to ``_MAX_SECONDS``."""
    least = 0.0 if zero else 0.001
    rule = f"{'0' if zero else '0.001'} to {_MAX_SECONDS:g} (seconds)"

    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not least <= value <= _MAX_SECONDS  # also NaN; an int of any size compares
        ):
            name = f"{type(instance).__name__}.{attribute.name}"
            raise ValueError(f"{name} must be {rule}, not {value!r}")

    return check


def _check_attempts(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        name = f"{type(instance).__name__}.{attribute.name}"
        raise ValueError(f"{name} must be a positive int, not {value!r}")


def _check_holder(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value or value == _ORPHAN):
        name = f"{type(instance).__name__}.{attribute.name}"
        raise ValueError(
            f"{name} must be None or a non-empty string but {_ORPHAN!r}, not {value!r}"
        )


@attrs.frozen
class LeasePolicy:
    """How a worker holds the jobs it claims, and how a sweep judges the leases of others.

    One value passed as ``policy=`` to the claim, lease, sweep and finish
    operations and to the worker loop, so that a worker says it once.  Times are
    seconds, from 0.001 (0 for *heartbeat* and *skew*) to 1e9; a bad value is a
    `ValueError` that names the field.

    Attributes:
        holder: who claims, renews and finishes: a non-empty string, or None
            for this process (``host:pid``).  A job claimed in one process and
            finished in another needs the same holder in both.
        lease_seconds: seconds a claimed job belongs to its holder, from the
            claim or the last `renew_lease`; also the grace a sweep gives a
            running job it finds without a lease before it requeues that job,
            and the lease length `queue_stats` assumes for a lease's age.
        heartbeat: seconds between two writes of the backend's
            ``last_queue_check`` by a claiming worker (0: at every claim); each
            write also sweeps the backend's expired leases (`requeue_expired`),
            and a long-lived claimer sweeps once per heartbeat of its own clock
            when none of its beats wrote (see `claim_jobs`).
        skew: seconds past its time at which a lease counts as expired, the
            clock difference between workers tolerated.
        max_attempts: claims after which a sweep gives a job up (its worker
            died or lost the lease each time) instead of requeueing it.
    """

    holder: str | None = attrs.field(default=None, validator=_check_holder)
    lease_seconds: float = attrs.field(default=DEFAULT_LEASE, validator=_seconds(zero=False))
    heartbeat: float = attrs.field(default=DEFAULT_HEARTBEAT, validator=_seconds(zero=True))
    skew: float = attrs.field(default=DEFAULT_SKEW, validator=_seconds(zero=True))
    max_attempts: int = attrs.field(default=DEFAULT_MAX_ATTEMPTS, validator=_check_attempts)


# ============================================================================
# Converter
# ============================================================================


def _parse_datetime(value: Any, _: Any) -> datetime:
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        text = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"not an ISO 8601 time: {value[:40]!r}") from None
    else:
        raise ValueError(f"not an ISO 8601 time: a {type(value).__name__}")
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _structure_object(value: Any, _: Any) -> Doc:
    """A JSON object from json.loads is already a Doc: check it, do not copy it."""
    if not isinstance(value, dict):
        raise ValueError(f"not a JSON object: a {type(value).__name__}")
    return value


def _tuple_of(kind: type, what: str) -> Callable[[Any, Any], tuple[Any, ...]]:
    """A hook for a JSON list of one kind of item (e.g. 100 measured shots): one pass, no copy."""

    def structure(value: Any, _: Any) -> tuple[Any, ...]:
        if not isinstance(value, (list, tuple)) or not set(map(type, value)) <= {kind}:
            raise ValueError(f"not a list of {what}")
        return tuple(value)

    return structure


def _key_text(value: Any, _: Any) -> str:
    """A JWK's x or d: text, or the ASCII bytes that sqooler's JWK holds."""
    if isinstance(value, bytes) and value.isascii():
        return value.decode("ascii")
    if not isinstance(value, str):
        raise ValueError(f"not base64url text: a {type(value).__name__}")
    return value


def _is_doc_view(kind: Any) -> bool:
    return _DocView in getattr(kind, "__mro__", ())


def configure_converter(converter: cattrs.Converter) -> None:
    """Teach a cattrs *converter* of your own to convert sqstore's records as records.

    The records that mirror a sqooler model are also read-only mappings, which a
    stock converter would structure as mappings (``StatusMsg(a_dict)``); after
    this, it structures and unstructures them field by field, and reads a JWK's
    bytes as text, as sqstore's own converter does.  sqstore never changes
    cattrs' global converter.

    >>> conv = cattrs.Converter()
    >>> configure_converter(conv)
    >>> status = StatusMsg("j1", "DONE", "ok", "None")
    >>> conv.structure(conv.unstructure(status), StatusMsg) == status
    True
    """
    # a record that reads as a mapping is still converted field by field, as a record
    converter.register_structure_hook_factory(_is_doc_view, converter.gen_structure_attrs_fromdict)
    converter.register_unstructure_hook_factory(
        _is_doc_view, converter.gen_unstructure_attrs_fromdict
    )
    converter.register_structure_hook_func(lambda t: t == _KeyText, _key_text)


_TRUE_WORDS = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE_WORDS = frozenset({"0", "off", "f", "false", "n", "no"})


def _structure_bool(value: Any, _: Any) -> bool:
    """A true/false field as sqooler's pydantic models read it: a bool, 0 or 1, or one of
    their words in any case (``"false"`` is False, where ``bool("false")`` is True)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _TRUE_WORDS | _FALSE_WORDS:
        return value.lower() in _TRUE_WORDS
    raise ValueError(f"not true or false: {value!r}")


def _make_converter() -> cattrs.Converter:
    """Liberal in what it reads: a stored document's unknown fields are ignored (sqooler
    0.4-0.8 wrote ``operational`` into every config; newer programs add their own).  A
    signed envelope stays exact: a field its signature does not cover is refused."""
    conv = make_converter()
    configure_converter(conv)
    for envelope in (JWSHeader, JWSDoc, FlatJWS):
        conv.register_structure_hook(
            envelope, make_dict_structure_fn(envelope, conv, _cattrs_forbid_extra_keys=True)
        )
    conv.register_unstructure_hook(datetime, datetime.isoformat)
    conv.register_structure_hook(datetime, _parse_datetime)
    conv.register_structure_hook(bool, _structure_bool)
    conv.register_structure_hook_func(lambda t: t == Doc, _structure_object)
    conv.register_structure_hook_func(lambda t: t == tuple[str, ...], _tuple_of(str, "strings"))
    conv.register_structure_hook_func(lambda t: t == tuple[Doc, ...], _tuple_of(dict, "objects"))
    conv.register_unstructure_hook(
        FlatJWS,
        make_dict_unstructure_fn(FlatJWS, conv, header=override(omit_if_default=True)),
    )
    omitted = override(omit_if_default=True)  # a config that takes any job stays as it was
    conv.register_unstructure_hook(
        BackendConfig,
        make_dict_unstructure_fn(
            BackendConfig, conv, require_signed_jobs=omitted, accepted_kids=omitted
        ),
    )
    return conv


_converter = _make_converter()


@functools.cache
def _doc_fields(cls: type) -> dict[str, Any]:
    """A record class's fields and their types: a `_DocView` reads one field, not the record."""
    return {field.name: field.type for field in attrs.fields(attrs.resolve_types(cls, globals()))}


def to_doc(record: Any) -> Doc:
    """Return the JSON document of *record*, as sqooler writes it.

    Raises:
        InvalidDocumentError: a value in *record* is nested too deeply to convert.

    >>> to_doc(StatusMsg("j1", "DONE", "ok", "None"))
    {'job_id': 'j1', 'status': 'DONE', 'detail': 'ok', 'error_message': 'None'}
    """
    try:
        doc: Doc = _converter.unstructure(record)
    except RecursionError:
        raise InvalidDocumentError(
            f"a {type(record).__name__} nested too deeply to convert"
        ) from None
    return doc


def _error_text(exc: BaseException, *, secret: bool = False) -> str:
    """What is wrong, field by field; with *secret*, only where (never a value or a key)."""
    if isinstance(exc, cattrs.BaseValidationError):
        fmt = functools.partial(_format_exception, secret=secret)
        return "; ".join(cattrs.transform_error(exc, format_exception=fmt))
    return "invalid value" if secret else str(exc)


def _format_exception(exc: BaseException, type_: Any, *, secret: bool = False) -> str:
    if isinstance(exc, KeyError):
        return "required field missing"
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        extra = exc.extra_fields
        return f"{len(extra)} unknown field(s)" if secret else f"unknown field(s) {sorted(extra)}"
    if secret:
        return "invalid value"
    if isinstance(exc, ValueError) and len(exc.args) > 1 and isinstance(exc.args[0], str):
        return exc.args[0]  # an attrs validator: (message, attribute, options, value)
    name = getattr(type_, "__name__", None) or str(type_)
    return f"invalid value ({exc}) for type {name}" if str(exc) else f"invalid value for {name}"


def from_doc(doc: Any, cls: type[T], *, where: str = "") -> T:
    """Structure *doc* into *cls*, or raise `InvalidDocumentError`.

    Fields that *cls* does not have are ignored: stored documents come from other
    programs and versions.  (What sqstore writes is checked strictly instead.)

    Raises:
        InvalidDocumentError: *doc* does not have the fields and types of *cls*.

    >>> from_doc({"job_id": "j1", "job_json_path": "jobs/running"}, NextJob)
    NextJob(job_id='j1', job_json_path='jobs/running')
    >>> from_doc({"job_id": "j1"}, NextJob)
    Traceback (most recent call last):
    ...
    sqstore.InvalidDocumentError: not a valid NextJob: required field missing @ $.job_json_path
    """
    try:
        return _converter.structure(doc, cls)
    except (cattrs.BaseValidationError, ValueError, TypeError, RecursionError) as exc:
        error: BaseException = exc
    prefix = f"{where}: " if where else ""
    secret = cls in _SECRET_RECORDS
    message = f"{prefix}not a valid {cls.__name__}: {_error_text(error, secret=secret)}"
    if secret:  # raised outside the except clause: the chain must not carry the key either
        raise InvalidDocumentError(message)
    raise InvalidDocumentError(message) from error


_SECRET_RECORDS: tuple[type, ...] = (JWK,)  # their values are never shown in an error


def _coerce(value: Any, cls: type[T], what: str) -> T:
    """Accept a record, a plain dict, or a pydantic model with the same fields.

    Strict in what sqstore is given to write: a field that *cls* does not have
    (also in the records nested in it) is refused, not silently dropped.  A
    rejected value is named by its type only: it may be a private key.
    """
    if isinstance(value, cls):
        return value
    if hasattr(value, "model_dump"):  # sqooler's pydantic models
        value = value.model_dump(mode="json")
    if not isinstance(value, Mapping):
        raise InvalidDocumentError(
            f"{what} must be a {cls.__name__} or a dict, not a {type(value).__name__}"
        )
    unknown = _unknown_fields(value, cls, "$")
    if unknown:
        secret = cls in _SECRET_RECORDS
        named = f"{len(unknown)} unknown field(s)" if secret else f"unknown field(s) {unknown}"
        raise InvalidDocumentError(
            f"{what}: not a valid {cls.__name__}: {named}; sqstore writes only the fields "
            "it knows (remove them)"
        )
    return from_doc(dict(value), cls, where=what)


@functools.cache
def _field_names(cls: type) -> frozenset[str]:
    return frozenset(_doc_fields(cls))


# The records nested in a record, by field: where `_unknown_fields` looks further.
_NESTED: dict[type, tuple[tuple[str, type], ...]] = {
    ResultDict: (("results", ExperimentDict),),
    ExperimentDict: (("data", DataDict),),
    DataDict: (("instructions", GateDict),),
}


def _unknown_fields(doc: Mapping[str, Any], cls: type, where: str) -> list[str]:
    """The paths of the fields in *doc*, and in the records nested in it, that *cls* lacks."""
    names = _field_names(cls)
    found = [f"{where}.{key}" for key in doc if key not in names]
    for name, inner in _NESTED.get(cls, ()):
        value = doc.get(name)
        if isinstance(value, Mapping):
            found += _unknown_fields(value, inner, f"{where}.{name}")
        elif isinstance(value, (list, tuple)):  # a record's own lists are tuples
            for i, item in enumerate(value):
                if isinstance(item, Mapping):
                    found += _unknown_fields(item, inner, f"{where}.{name}[{i}]")
    return found


def _keeping_unknown(doc: Doc, old: Mapping[str, Any], cls: type) -> Doc:
    """*doc* (a *cls* record's document) followed by the top-level fields of the stored
    document *old* that *cls* does not know: a rewrite keeps another program's fields."""
    names = _field_names(cls)
    kept = {key: value for key, value in old.items() if key not in names}
    return {**doc, **kept} if kept else doc


# ============================================================================
# Storage handle
# ============================================================================


class ListFn(Protocol):
    """``list(path)``: a folder's ids; ``list(path, n)``: a walk's next step (see `Storage`)."""

    def __call__(self, path: str, limit: int | None = None, /) -> list[str]: ...


class Storage(TypedDict):
    """The CRUD callables of one provider. Make with a factory, change with a layer.

    Paths are folders such as ``jobs/queued/sim``; ids name one document in a
    folder.  The callables raise `NotFoundError`, `AlreadyExistsError`,
    `InvalidNameError`, `InvalidDocumentError`, `TransientError`,
    `CredentialsError` or `StorageError`, never a backend's own exceptions.

    ``swap(path, id, old, new)`` is compare-and-swap: it replaces the document
    with *new* (deletes it when *new* is None) only if it is still *old*, and
    returns whether it did (`NotFoundError` when there is none).  It is atomic
    against every other ``swap`` and ``upload`` of that document, so a document
    that is only ever created with ``upload`` and changed with ``swap`` (a
    lease) has one history that every worker agrees on.

    ``list(path)`` returns every id in the folder, oldest first, as it is now.
    ``list(path, n)`` walks the folder in steps of at most *n* ids, so that a
    worker finds the next queued job in O(1) however long the queue: each call
    returns the next ids, oldest first, of this handle's last listing of the
    folder, and lists afresh (or, on MongoDB, reads the next ids in ``_id``
    order) once that listing is used up.  An id so returned may be gone by then;
    one added meanwhile comes in a later step (ids sort by creation time, so it
    would come later anyway), and so does an older one put back by another
    program (one this handle moves in restarts its walk of that folder);
    ``[]`` means the folder was empty when listed.

    ``move(src, dst, id)`` may return the document it moved, as ``get`` would
    read it at *dst*, when it had it in hand anyway (MongoDB's move into the
    running folder reads it); it returns None otherwise, and a caller that needs
    the document then reads it.
    The walk is the handle's: of several threads sharing it, each step goes to
    one of them.
    """

    name: str
    layout: Layout
    upload: Callable[[str, str, Doc], None]
    update: Callable[[str, str, Doc], None]
    get: Callable[[str, str], Doc]
    move: Callable[[str, str, str], Doc | None]
    delete: Callable[[str, str], None]
    list: ListFn
    swap: Callable[[str, str, Doc, Doc | None], bool]


_OPS = ("upload", "update", "get", "move", "delete", "list", "swap")
_WRITES = ("upload", "update", "move", "delete", "swap")
_HANDLE_KEYS = frozenset(("name", "layout", *_OPS))


class _Model(Protocol):
    """A pydantic model, such as sqooler's: sqstore reads it through ``model_dump``."""

    def model_dump(self, *, mode: str = ...) -> dict[str, Any]: ...


KeyLike = JWK | Mapping[str, Any] | _Model
"""A JWK as sqstore takes it: a `JWK`, a dict with its fields, or sqooler's ``JWK``."""

ConfigLike = BackendConfig | Mapping[str, Any] | _Model
"""A backend config: a `BackendConfig`, a dict with its fields, or sqooler's
``BackendConfigSchemaIn``."""

ResultLike = ResultDict | Mapping[str, Any] | _Model
"""A job's result: a `ResultDict`, a dict with its fields, or sqooler's ``ResultDict``."""

StatusLike = StatusMsg | Mapping[str, Any] | _Model
"""A job's status: a `StatusMsg`, a dict with its fields, or sqooler's ``StatusMsgDict``."""


def check_handle(store: Any) -> None:
    """Check that *store* is a storage handle: a mapping with the seven operations.

    What every operation checks first; a program or a layer of your own can check a
    handle it is given the same way.

    Raises:
        TypeError: *store* is not a mapping, or lacks one of ``upload``, ``update``,
            ``get``, ``move``, ``delete``, ``list`` and ``swap`` (named in the message).
    """
    if not isinstance(store, Mapping) or not store.keys() >= _HANDLE_KEYS:
        missing = sorted(_HANDLE_KEYS - set(store)) if isinstance(store, Mapping) else None
        raise TypeError(f"not a sqstore storage handle (missing keys: {missing})")


# ============================================================================
# Pure core
# ============================================================================


def check_name(value: Any, what: str = "name", *, pattern: re.Pattern[str] = _NAME_RE) -> str:
    """Return *value* if it is a safe name for a path segment or id, else raise.

    Allowed: up to 128 of ``A-Z a-z 0-9 _ . @ + -``, not starting with ``.``, ``@``,
    ``+`` or ``-``.  So ``..``, ``/``, ``\\``, NUL and empty names never reach a path.

    Raises:
        InvalidNameError: *value* is not a str or not of the allowed form.

    >>> check_name("job-20240101_120000")
    'job-20240101_120000'
    >>> check_name("../etc", "job_id")
    Traceback (most recent call last):
    ...
    sqstore.InvalidNameError: invalid job_id '../etc': ...
    """
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        raise _invalid_name(what, value, _name_rule(pattern))
    return value


def _invalid_name(what: str, value: Any, rule: str, *, use: str = "use ") -> InvalidNameError:
    """An `InvalidNameError` for *value*, shown only as a shortened ``repr``."""
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    error = InvalidNameError(f"invalid {what} {shown}: {use}{rule}")
    error.kind, error.shown, error.rule = what, shown, rule
    return error


def _name_rule(pattern: re.Pattern[str]) -> str:
    if pattern is _DISPLAY_NAME_RE:
        return "1 to 64 of a-z and 0-9"
    if pattern is _STORE_NAME_RE:
        return "1 to 32 of a-z and 0-9"
    return "1 to 128 of A-Z a-z 0-9 _ . @ + -, starting with a letter, digit or _"


def _reads(read: Callable[_P, T]) -> Callable[_P, T]:
    """Make *read* raise `NotFoundError` for a name that cannot exist, saying why.

    No such document can be stored, so a read finds none (sqooler raises
    ``FileNotFoundError``; a frontend answers 404); writes keep `InvalidNameError`.
    The name is checked before any storage call and shown only as a ``repr``.
    """

    missing = {  # what a read calls such a document, and such a name
        "display_name": ("backend", "a display name"),
        "username": ("user", "a username"),
        "job_id": ("job", "a job id"),
        "kid": ("public key", "a kid"),
        "path": ("folder", "a folder"),
        "id": ("document", "an id"),
    }

    @functools.wraps(read)
    def reading(*args: _P.args, **kwargs: _P.kwargs) -> T:
        try:
            return read(*args, **kwargs)
        except InvalidNameError as exc:
            noun, name = missing.get(exc.kind, ("document", f"a {exc.kind}"))
            if not exc.shown:
                raise NotFoundError(f"not found: {exc}") from None
            raise NotFoundError(f"no {noun} {exc.shown}: {name} is {exc.rule}") from None

    return reading


def check_display_name(value: Any) -> str:
    """Return *value* if it is a backend's name (its display name), else raise.

    A display name is narrower than `check_name`'s names: 1 to 64 of ``a-z 0-9``.

    Raises:
        InvalidNameError: *value* is not a str or not of that form.

    >>> check_display_name("sim")
    'sim'
    """
    return check_name(value, "display_name", pattern=_DISPLAY_NAME_RE)


def _check_path(path: Any) -> str:
    """Validate a folder path of '/'-separated safe names (never absolute)."""
    if not isinstance(path, str) or _PATH_RE.fullmatch(path) is None:
        raise _invalid_name("path", path, f"'/'-separated names, each {_name_rule(_NAME_RE)}")
    return path


def _fill(template: str, display_name: str = "", username: str = "", job_id: str = "") -> str:
    return template.format(display_name=display_name, username=username, job_id=job_id)


def new_job_id(layout: Layout, display_name: str, username: str, now_ns: int, salt: int) -> str:
    """Return a job id that sorts by creation time (*now_ns*, Unix nanoseconds).

    The ``hex24`` form is 8 hex digits of seconds, 8 of nanoseconds, 8 of *salt*:
    a valid MongoDB ObjectId whose order is the order of creation.  The ``dated``
    form is sqooler's Dropbox id, whose last 5 hex digits are the microseconds.

    >>> new_job_id(LOCAL_LAYOUT, "sim", "alice", 1_700_000_000_123_456_789, 0xABCDEF01)
    '6553f100075bcd15abcdef01'
    >>> new_job_id(DROPBOX_LAYOUT, "sim", "alice", 1_700_000_000_123_456_789, 0)
    '20231114_221320-sim-alice-1e240'
    """
    seconds, nanos = divmod(now_ns, 1_000_000_000)
    if layout.job_ids == "dated":
        stamp = time.strftime("%Y%m%d_%H%M%S", time.gmtime(seconds))
        return f"{stamp}-{display_name}-{username}-{nanos // 1000:05x}"
    return f"{seconds:08x}{nanos:08x}{salt & 0xFFFFFFFF:08x}"


def _job_fill(layout: Layout, template: str, display_name: str, job_id: str) -> str:
    """Fill *template* for a job; dated ids carry the username (``<time>-<dn>-<user>-<n>``).

    A hex24 id (from a local or MongoDB store) carries none: in a layout whose
    folders need one, its username is ``None``, sqooler's word for "unknown".
    """
    username = ""
    if layout.job_ids == "dated" and "{username}" in template:
        parts = job_id.split("-")
        if len(parts) == 4 and parts[2]:
            username = parts[2]
        elif _OBJECT_ID_RE.fullmatch(job_id):
            username = _NONE
        else:
            raise _invalid_name(
                "job_id",
                job_id,
                "<time>-<display_name>-<username>-<n> in this layout",
                use="expected ",
            )
    return _fill(template, display_name, username, job_id)


def _id_in_file(template: str, file_id: str) -> str | None:
    """The ``{job_id}`` in *file_id* made from *template*; None when it does not fit.

    >>> _id_in_file("job-{job_id}", "job-abc"), _id_in_file("job-{job_id}", "status-abc")
    ('abc', None)
    """
    prefix, _, suffix = template.partition("{job_id}")
    inner = len(file_id) - len(prefix) - len(suffix)
    if inner < 1 or not file_id.startswith(prefix) or not file_id.endswith(suffix):
        return None
    return file_id[len(prefix) : len(prefix) + inner]


LOCATIONS = (
    "config",
    "public_key",
    "user_key",
    "queued",
    "running",
    "finished",
    "deleted",
    "lease",
    "status",
    "result",
    "job_signature",
    "cancel_request",
    "submit_token",
)
"""The kinds of document `locate` places: a backend's config; the public key of a
backend or a user; a job in one of its four folders; a job's lease, status, result,
signature (of a signed submission) and cancel request; a submit token."""


def _folder_template(layout: Layout, kind: str) -> str:
    if kind not in LOCATIONS:
        raise ValueError(f"kind must be one of {', '.join(LOCATIONS)}, not {kind!r}")
    return _templates(layout)[kind][0]


def _id_template(layout: Layout, kind: str) -> str:
    return _templates(layout).get(kind, ("", "{job_id}"))[1]


@functools.lru_cache(maxsize=64)
def _templates(layout: Layout) -> dict[str, tuple[str, str]]:
    """The folder and file templates of each kind of `LOCATIONS` in *layout*, made once
    per layout (a `Layout` is frozen): `locate` runs at every storage call of a job."""
    return {
        "config": (layout.configs, layout.config_id),
        "public_key": (layout.public_keys, "{job_id}"),
        "user_key": (f"{layout.public_keys}/users", "{job_id}"),
        "queued": (layout.queued, layout.job_file),
        "running": (layout.running, layout.job_file),
        "finished": (layout.finished, layout.job_file),
        "deleted": (layout.deleted, layout.job_file),
        "lease": (layout.leases, "{job_id}"),
        "status": (layout.status, layout.status_file),
        "result": (layout.results, layout.result_file),
        "job_signature": (f"{layout.status}/signatures", "{job_id}"),
        "cancel_request": (f"{layout.leases}/cancel", "{job_id}"),
        "submit_token": (f"{layout.leases}/tokens/{{display_name}}", "{job_id}"),
    }


def locate(
    layout: Layout,
    kind: str,
    display_name: str = "",
    username: str | None = None,
    job_id: str = "",
) -> tuple[str, str]:
    """Return where a document of *kind* (one of `LOCATIONS`) lives: ``(folder, id)``.

    *job_id* is the job's id for a job's documents (the stored id is made from
    it by the layout's file template), the kid for ``public_key`` and
    ``user_key``, the token for ``submit_token``.  Without it the id is ``""``:
    the folder alone, e.g. to list it (a config's id is its backend's).  A folder
    that carries the username (Dropbox's finished jobs and results) takes
    *username*, else reads it from a dated *job_id*; a 24-hex id there goes
    under ``None``, sqooler's word for "unknown".  Pure: no storage is touched.

    Raises:
        InvalidNameError: a name that cannot be part of a path, or none where
            the place needs one.
        ValueError: an unknown *kind*.

    >>> locate(LOCAL_LAYOUT, "status", "sim", job_id="6553f100075bcd15abcdef01")
    ('status/sim', '6553f100075bcd15abcdef01')
    >>> locate(DROPBOX_LAYOUT, "result", "sim", job_id="20231114_221320-sim-alice-1e240")
    ('Backend_files/Result/sim/alice', 'result-20231114_221320-sim-alice-1e240')
    >>> locate(DROPBOX_LAYOUT, "queued", "sim")
    ('Backend_files/Queued_Jobs/sim', '')
    """
    folder, file = _folder_template(layout, kind), _id_template(layout, kind)
    if "{display_name}" in folder + file:
        check_display_name(display_name)
    if job_id:
        names = {"public_key": "kid", "user_key": "kid", "submit_token": "client_token"}
        check_name(job_id, names.get(kind, "job_id"))
    if username is not None:
        folder = _fill(folder, display_name, check_name(username, "username"))
    elif "{username}" in folder:
        folder = _job_fill(layout, folder, display_name, job_id)
    folder = _fill(folder, display_name)
    doc_id = _fill(file, display_name, job_id=job_id) if job_id or kind == "config" else ""
    return folder, doc_id


def job_id_from(layout: Layout, kind: str, stored_id: str) -> str | None:
    """The job id in a stored id of *kind* (the inverse of `locate`'s id), or None when
    *stored_id* is not one of that kind.

    >>> job_id_from(DROPBOX_LAYOUT, "queued", "job-20231114_221320-sim-alice-1e240")
    '20231114_221320-sim-alice-1e240'
    >>> job_id_from(DROPBOX_LAYOUT, "result", "job-abc") is None
    True
    """
    return _id_in_file(_id_template(layout, kind), stored_id)


def _b64url(data: bytes, *, pad: bool) -> str:
    text = base64.urlsafe_b64encode(data).decode("ascii")
    return text if pad else text.rstrip("=")


def _b64url_decode(text: Any, what: str) -> bytes:
    """Decode base64url with or without '=' padding (sqooler pads, RFC 7515 does not)."""
    if not isinstance(text, str):
        raise InvalidDocumentError(f"{what} must be a base64url string")
    stripped = text.rstrip("=")
    try:
        return base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
    except (binascii.Error, ValueError):
        raise InvalidDocumentError(f"{what} is not valid base64url") from None


def _key_bytes(jwk: JWK, field: Literal["x", "d"]) -> bytes:
    raw = _b64url_decode(getattr(jwk, field), f"JWK {jwk.kid!r} member {field!r}")
    if len(raw) != 32:
        raise InvalidDocumentError(f"JWK {jwk.kid!r} member {field!r} is not a 32-byte key")
    return raw


def generate_keypair(kid: str, *, seed: bytes | None = None) -> tuple[JWK, JWK]:
    """Return a new Ed25519 ``(private_jwk, public_jwk)`` pair for *kid*.

    Keys are padded base64url, as sqooler writes them; *seed* (32 bytes) makes the
    pair deterministic.

    >>> private, public = generate_keypair("k1", seed=bytes(32))
    >>> public.x, public.d is None, private.key_ops
    ('O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik=', True, 'sign')
    """
    from nacl.signing import SigningKey

    check_name(kid, "kid")
    key = SigningKey(seed) if seed is not None else SigningKey.generate()
    x = _b64url(bytes(key.verify_key), pad=True)
    private = JWK(x=x, key_ops="sign", kid=kid, d=_b64url(bytes(key), pad=True))
    return private, JWK(x=x, key_ops="verify", kid=kid)


@functools.lru_cache(maxsize=16)
def _signer(private_jwk: JWK) -> Callable[[bytes], bytes]:
    """Derive a private JWK's Ed25519 key (checking ``x`` against ``d``) once per process;
    return its sign: Bob signs every result and status with the same key."""
    from nacl.bindings import crypto_sign, crypto_sign_BYTES, crypto_sign_seed_keypair

    if private_jwk.key_ops != "sign" or private_jwk.d is None:
        raise BadSignatureError(f"JWK {private_jwk.kid!r} is not a private key for signing")
    public, secret = crypto_sign_seed_keypair(_key_bytes(private_jwk, "d"))
    if public != _key_bytes(private_jwk, "x"):
        raise BadSignatureError(f"JWK {private_jwk.kid!r}: public part x does not match d")
    return lambda data: crypto_sign(data, secret)[:crypto_sign_BYTES]  # signature + message


@functools.lru_cache(maxsize=64)
def _verify_key(public: bytes) -> Any:
    """PyNaCl's VerifyKey of a 32-byte public key, made once: a frontend verifies many
    results per key.  Keyed by the key's bytes, so it never answers for another key."""
    from nacl.signing import VerifyKey

    return VerifyKey(public)


def _ed25519_verify(public_jwk: JWK, data: bytes, signature: bytes) -> bool:
    """Return whether *signature* of *data* verifies with the JWK's ``x`` (PyNaCl)."""
    from nacl.exceptions import BadSignatureError as NaclBadSignature

    try:
        _verify_key(_key_bytes(public_jwk, "x")).verify(data, signature)
    except (NaclBadSignature, ValueError):
        return False
    return True


def public_from_private(private_jwk: KeyLike) -> JWK:
    """Return the public JWK of a private one, checking that ``x`` matches ``d``.

    Raises:
        BadSignatureError: the JWK has no private part, or ``x`` does not belong to ``d``.
    """
    private = _coerce(private_jwk, JWK, "private_jwk")
    _signer(private)
    return JWK(x=private.x, key_ops="verify", kid=private.kid)


def jwk_thumbprint(jwk: KeyLike) -> str:
    """Return the RFC 7638 SHA-256 thumbprint of an Ed25519 JWK, unpadded base64url.

    >>> jwk_thumbprint({"kty": "OKP", "crv": "Ed25519", "kid": "a", "key_ops": "verify",
    ...                 "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"})
    'kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k'
    """
    key = _coerce(jwk, JWK, "jwk")
    x = _b64url(_key_bytes(key, "x"), pad=False)
    canonical = _CANONICAL_JSON.encode({"crv": key.crv, "kty": key.kty, "x": x})
    import hashlib

    return _b64url(hashlib.sha256(canonical.encode()).digest(), pad=False)


def save_jwk(path: str | os.PathLike[str], jwk: KeyLike) -> None:
    """Write *jwk* to a new file *path* of mode 0600, as its JSON document; never replace one.

    The file appears whole or not at all (it is written under a temporary name,
    then linked into place); `load_jwk` and ``sqstore ... --key FILE`` read it.

    Raises:
        AlreadyExistsError: *path* exists: a key file is never overwritten.
        InvalidDocumentError: *jwk* is not a JWK.
        StorageError: the file cannot be written (the message names it).
    """
    text = _JSON.encode(to_doc(_coerce(jwk, JWK, "jwk"))) + "\n"
    target = os.fspath(path)
    temp = os.path.join(
        os.path.dirname(target), f".{os.path.basename(target)}.{os.urandom(6).hex()}.tmp"
    )
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.link(temp, target)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temp)
    except FileExistsError:
        raise AlreadyExistsError(f"{target} exists already: a key file is never replaced") from None
    except OSError as exc:
        raise StorageError(f"cannot write key file {target}: {exc.strerror}") from exc


def load_jwk(path: str | os.PathLike[str]) -> JWK:
    """Read the JWK in file *path*: its JSON document (as `save_jwk` and ``sqstore keygen``
    write it) or base64url of that JSON (as sqooler keeps ``PRIVATE_JWK_STR``).

    A private key is checked: its ``x`` must belong to its ``d``.  No message
    shows the key.

    Raises:
        NotFoundError: there is no file *path*.
        StorageError: the file cannot be read.
        InvalidDocumentError: the file holds no JWK.
        BadSignatureError: a private key whose ``x`` does not belong to its ``d``.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise NotFoundError(f"no key file {name}") from None
    except OSError as exc:
        raise StorageError(f"cannot read key file {name}: {exc.strerror}") from None
    return parse_jwk(data, name)


def parse_jwk(text: str | bytes, where: str = "key") -> JWK:
    """Return the JWK in *text*: its JSON document, or base64url of that JSON (the form
    in which sqooler keeps ``PRIVATE_JWK_STR`` in its environment).

    A private key is checked: its ``x`` must belong to its ``d``.  Messages start
    with *where* (say, the file or variable it came from) and never show the key.

    Raises:
        InvalidDocumentError: *text* holds no JWK.
        BadSignatureError: a private key whose ``x`` does not belong to its ``d``.

    >>> jwk = parse_jwk('{"kid": "k1", "key_ops": "verify", "kty": "OKP", "alg": "EdDSA", '
    ...                 '"crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}')
    >>> jwk.kid, jwk.d
    ('k1', None)
    """
    data = (text.encode() if isinstance(text, str) else text).strip()
    try:
        if not data.startswith(b"{"):
            with contextlib.suppress(UnicodeDecodeError, InvalidDocumentError):
                data = _b64url_decode(data.decode("ascii"), where).strip()
            if not data.startswith(b"{"):
                raise InvalidDocumentError(f"{where}: neither a JSON JWK nor a base64 one")
        key = _coerce(_parse_json(data, where), JWK, where)
        if key.d is not None:
            public_from_private(key)
    except (InvalidDocumentError, BadSignatureError) as exc:
        if where in str(exc):
            raise
        raise type(exc)(f"{where}: {exc}") from None
    return key


def _json_bytes(doc: Any, what: str) -> bytes:
    try:
        return _JSON.encode(doc).encode()
    except (TypeError, ValueError) as exc:
        raise InvalidDocumentError(f"{what} is not JSON-serialisable: {exc}") from None
    except RecursionError:
        raise InvalidDocumentError(f"{what} is nested too deeply") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


_JSON_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def _parse_json(text: str | bytes, what: str) -> Any:
    """Parse JSON text as strictly as it is written: no NaN or Infinity, bounded nesting.

    Raises:
        InvalidDocumentError: not JSON, a non-finite number, or nested too deeply.

    >>> _parse_json('[1, NaN]', "doc")
    Traceback (most recent call last):
    ...
    sqstore.InvalidDocumentError: doc: not valid JSON (NaN is not a JSON number)
    """
    try:
        if not isinstance(text, str):  # as json.loads decodes bytes
            # An object that starts with "{" and no NUL next is UTF-8 (as detect_encoding
            # says, without its look at every BOM first): what sqstore writes.
            utf8 = text[:1] == b"{" and text[1:2] != b"\0"
            text = text.decode("utf-8" if utf8 else json.detect_encoding(text), "surrogatepass")
        return _JSON_DECODER.decode(text)
    except (ValueError, UnicodeDecodeError) as exc:
        error = InvalidDocumentError(f"{what}: not valid JSON ({exc})")
        error.partial = isinstance(exc, json.JSONDecodeError)  # not a refused NaN
        raise error from None
    except RecursionError:
        raise InvalidDocumentError(f"{what}: nested too deeply to read") from None


def _sqooler_signing_input(header: JWSHeader, body: bytes) -> bytes:
    """sqooler's signing input: padded base64url of the compact header and of the body."""
    return _encoded_header(header) + b"." + base64.urlsafe_b64encode(body)


@functools.lru_cache(maxsize=64)
def _encoded_header(header: JWSHeader) -> bytes:
    """Padded base64url of the compact JSON header (one per key: made once)."""
    return base64.urlsafe_b64encode(_COMPACT_JSON.encode(to_doc(header)).encode())


def sign_doc(payload: Doc, private_jwk: KeyLike, *, fmt: str = "sqooler") -> Doc:
    """Return *payload* signed with Ed25519, in sqooler's JWS form or RFC 7515's.

    ``fmt="sqooler"``: ``{"header", "payload", "signature"}`` with padded base64url,
    readable by sqooler 0.9.  ``fmt="rfc7515"``: the flattened JSON serialization
    with an RFC 8037 ``EdDSA`` protected header, verifiable by any JOSE library.

    Raises:
        BadSignatureError: *private_jwk* is not a valid private key.
        InvalidDocumentError: *payload* is not a JSON object.
    """
    key = _coerce(private_jwk, JWK, "private_jwk")
    return _sign_payload(payload, key.kid, _signer(key), fmt)


def _sign_payload(payload: Doc, kid: str, sign: Callable[[bytes], bytes], fmt: str) -> Doc:
    if not isinstance(payload, dict):
        raise InvalidDocumentError("a signed payload must be a JSON object")
    body = _json_bytes(payload, "payload")
    if fmt == "sqooler":
        header = JWSHeader(kid=kid)
        signature = sign(_sqooler_signing_input(header, body))
        return {
            "header": to_doc(header),
            "payload": payload,
            "signature": _b64url(signature, pad=True),
        }
    if fmt == "rfc7515":
        protected = _b64url(
            json.dumps({"alg": "EdDSA", "kid": kid}, separators=(",", ":")).encode(), pad=False
        )
        encoded = _b64url(body, pad=False)
        signature = sign(f"{protected}.{encoded}".encode())
        return {
            "protected": protected,
            "payload": encoded,
            "signature": _b64url(signature, pad=False),
        }
    raise ValueError(f"unknown signature format {fmt!r}: use 'sqooler' or 'rfc7515'")


def is_signed(doc: Mapping[str, Any]) -> bool:
    """Return whether *doc* is a signed document (either format).

    >>> is_signed({"job_id": "j"}), is_signed({"header": {}, "payload": {}, "signature": ""})
    (False, True)
    """
    keys = doc.keys()
    return keys == _SIGNED_KEYS or ("protected" in keys and "signature" in keys)


def _open_signed(doc: Mapping[str, Any]) -> tuple[JWSDoc | FlatJWS, Doc, Doc]:
    """Return ``(envelope, payload, header)`` of a signed document, without verifying.

    Raises:
        InvalidDocumentError: *doc* is not a well-formed signed document.
    """
    if doc.keys() == _SIGNED_KEYS:
        header, payload, signature = doc["header"], doc["payload"], doc["signature"]
        if (  # the common, well-formed case, without the converter's generality
            isinstance(header, dict)
            and header.keys() == _HEADER_KEYS
            and all(type(value) is str for value in header.values())
            and type(payload) is dict
            and type(signature) is str
        ):
            return JWSDoc(JWSHeader(**header), payload, signature), payload, dict(header)
        jws = from_doc(dict(doc), JWSDoc)
        return jws, jws.payload, to_doc(jws.header)
    flat = from_doc(dict(doc), FlatJWS)
    header = _parse_json(_b64url_decode(flat.protected, "protected"), "the JWS header")
    payload = _parse_json(_b64url_decode(flat.payload, "payload"), "the JWS payload")
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise InvalidDocumentError("the JWS header and payload must be JSON objects")
    return flat, payload, {**flat.header, **header}


def _signing_input(envelope: JWSDoc | FlatJWS) -> tuple[bytes, bytes]:
    """Return ``(signing_input, signature)``: what the signature covers, and the signature."""
    signature = _b64url_decode(envelope.signature, "signature")
    if isinstance(envelope, JWSDoc):
        body = _json_bytes(envelope.payload, "payload")
        return _sqooler_signing_input(envelope.header, body), signature
    return f"{envelope.protected}.{envelope.payload}".encode(), signature


def payload_of(doc: Mapping[str, Any]) -> Doc:
    """Return the payload of a signed document without verifying it, or *doc* itself.

    Raises:
        InvalidDocumentError: *doc* looks signed but is malformed.
    """
    if not is_signed(doc):
        return dict(doc)
    header, payload = doc.get("header"), doc.get("payload")
    if (
        isinstance(header, dict)
        and isinstance(header.get("kid"), str)
        and isinstance(payload, dict)
    ):
        return payload  # a well-formed sqooler JWS: no need to structure the envelope
    return _open_signed(doc)[1]


def verify_doc(doc: Mapping[str, Any], public_jwks: Sequence[KeyLike]) -> Doc:
    """Return the payload of *doc* if one of *public_jwks* verifies its signature.

    When the header names a ``kid``, only the keys with that kid are tried (none
    listed: it does not verify); a header without one is tried with every key.
    Verification is PyNaCl's, never a comparison of strings.

    Raises:
        BadSignatureError: *doc* is unsigned, or no key verifies it (``payload`` set).
        InvalidDocumentError: *doc* is a malformed signed document.
    """
    payload, kid, signing_input, signature = _signed_parts(doc)
    keys = [_coerce(k, JWK, "public_jwk") for k in public_jwks]
    if kid is not None:
        keys = [key for key in keys if key.kid == kid]
    if any(_ed25519_verify(key, signing_input, signature) for key in keys):
        return payload
    raise BadSignatureError(f"signature of kid {kid!r} does not verify", payload)


def _signed_parts(doc: Mapping[str, Any]) -> tuple[Doc, str | None, bytes, bytes]:
    """``(payload, kid, signing input, signature)`` of a signed document, not verified.

    Raises:
        BadSignatureError: *doc* is unsigned, or its header is not EdDSA's.
        InvalidDocumentError: *doc* is a malformed signed document.
    """
    if not is_signed(doc):
        raise BadSignatureError("the document is not signed", dict(doc))
    envelope, payload, header = _open_signed(doc)
    kid = header.get("kid")
    if header.get("alg") != "EdDSA" or header.get("crit"):
        raise BadSignatureError(f"unsupported JWS header {header!r}", payload)
    return (payload, kid, *_signing_input(envelope))


def _long_backend_name(store_name: str, display_name: Any, simulator: bool) -> str:
    return f"{store_name}_{display_name}_{'simulator' if simulator else 'hardware'}"


def _operational(last_check: datetime | None, now: float, timeout: float) -> bool:
    return last_check is not None and now - last_check.timestamp() <= timeout


def demo_config(display_name: str, *, sign: bool = False) -> BackendConfig:
    """Return the configuration of the built-in qubit simulator (see `run_simulator`).

    >>> demo_config("sim").num_wires
    4
    """
    gates = tuple(
        {"name": g, "parameters": p, "qasm_def": "{}", "coupling_map": [[0]], "description": d}
        for g, p, d in _GATE_DOCS
    )
    return BackendConfig(
        description="sqstore's built-in qubit state-vector simulator",
        version="0.1.0",
        display_name=check_display_name(display_name),
        cold_atom_type="spin",
        gates=gates,
        max_experiments=50,
        max_shots=10_000,
        simulator=True,
        supported_instructions=(*(g for g, _, _ in _GATE_DOCS), "measure", "barrier"),
        num_wires=4,
        wire_order="sequential",
        num_species=1,
        sign=sign,
    )


_GATE_DOCS: tuple[tuple[str, list[str], str], ...] = (
    ("x", [], "Pauli X"),
    ("h", [], "Hadamard"),
    ("rx", ["theta"], "rotation about x"),
    ("rz", ["theta"], "rotation about z"),
    ("cz", [], "controlled Z"),
)


# ============================================================================
# Operations
# ============================================================================


# Reading documents -----------------------------------------------------------


# Seconds before reading a half-written document again: its writer may be descheduled
# between truncating and writing it (longer on a loaded machine): keep trying for 1.5 s.
_REREAD_PAUSES = (0.005, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8)


def _read(store: Storage, path: str, doc_id: str) -> Doc:
    """Get a document, reading again a few times while it is not JSON yet: a program
    that rewrites files in place (sqooler's local backend does, for every config and
    status) leaves a half-written one for an instant."""
    for pause in _REREAD_PAUSES:
        try:
            doc = store["get"](path, doc_id)
            break
        except InvalidDocumentError as exc:
            if not exc.partial:
                raise
            time.sleep(pause)
    else:
        doc = store["get"](path, doc_id)
    if not isinstance(doc, dict):
        raise InvalidDocumentError(f"{path}/{doc_id}: not a JSON object")
    return doc


def is_stored(store: Storage, path: str, doc_id: str) -> bool:
    """Whether a document is stored at *path*/*doc_id* (one that is not JSON counts).

    The question a read of a kind cannot answer: `get_status` answers a missing status
    with sqooler's ERROR status, and `get_result` a missing result with ``success=False``.
    One ``get``.

    Raises:
        InvalidNameError: *path* or *doc_id* is no valid folder or id.
        StorageError: the backend failed (`TransientError` when it may pass).
    """
    try:
        store["get"](path, doc_id)
    except NotFoundError:
        return False
    except InvalidDocumentError:
        pass
    return True


def _parse(raw: Doc, cls: type[T], where: str) -> T:
    """Structure a stored document, signed or not, naming *where* it is if it is bad."""
    try:
        return from_doc(payload_of(raw), cls)
    except InvalidDocumentError as exc:
        raise InvalidDocumentError(f"{where}: {exc}") from exc


# Configs ---------------------------------------------------------------------


def _read_config(store: Storage, display_name: str) -> tuple[Doc, BackendConfig]:
    path, doc_id = locate(store["layout"], "config", display_name)
    raw = _read(store, path, doc_id)
    return raw, _parse(raw, BackendConfig, f"{path}/{doc_id}")


def _config_kid(store: Storage, display_name: str) -> str:
    """The ``kid`` of a backend's config, read without structuring the whole config."""
    path, doc_id = locate(store["layout"], "config", display_name)
    kid = payload_of(_read(store, path, doc_id)).get("kid")
    if kid is None:
        raise NotFoundError(f"backend {display_name!r} has no kid: it publishes no key")
    if not isinstance(kid, str):
        raise InvalidDocumentError(f"{path}/{doc_id}: kid must be a string, not {kid!r}")
    return kid


def _doc_signer(store: Storage, private_jwk: Any) -> Callable[[Doc], Doc]:
    """Sign documents in the store's signature format, deriving the key only once."""
    key = _coerce(private_jwk, JWK, "private_jwk")
    sign, fmt = _signer(key), store["layout"].signature_format
    return lambda doc: _sign_payload(doc, key.kid, sign, fmt)


def check_signing_key(store: Storage, cfg: BackendConfig, private_jwk: KeyLike) -> JWK:
    """Return *private_jwk* if it is the signing key of the backend of config *cfg*.

    The key's kid must be the one the config names (when it names one), and if a
    public key is published under that kid, the key's public half must be it:
    otherwise what it signs could be verified by no one.  Before the key is
    published, the kid alone is checked.  One read (the published key) per call.
    A worker checks its key with it before it claims a job (as `work` does).

    Raises:
        BadSignatureError: not the backend's key (another kid, or not the
            published key of its kid), or a private key whose ``x`` is not its ``d``'s.
        InvalidDocumentError: *private_jwk* is not a JWK.
    """
    key = _coerce(private_jwk, JWK, "private_jwk")
    public = public_from_private(key)
    if cfg.kid is not None and key.kid != cfg.kid:
        raise BadSignatureError(
            f"JWK kid {key.kid!r} is not the kid {cfg.kid!r} of backend {cfg.display_name!r}"
        )
    try:
        published = get_public_key_from_kid(store, key.kid)
    except NotFoundError:
        return key
    if _key_bytes(published, "x") != _key_bytes(public, "x"):
        raise BadSignatureError(
            f"JWK {key.kid!r} is not the key published for backend {cfg.display_name!r}"
        )
    return key


def _backend_signer(
    store: Storage, cfg: BackendConfig, private_jwk: Any
) -> Callable[[Doc], Doc] | None:
    """How Bob signs for a backend: with *private_jwk* when its config says it signs.

    Raises:
        BadSignatureError: the backend signs and *private_jwk* is not its key.
    """
    if not cfg.sign or private_jwk is None:
        return None
    return _doc_signer(store, check_signing_key(store, cfg, private_jwk))


def _config_doc(
    store: Storage, config: Any, display_name: str, private_jwk: Any, old: Doc | None = None
) -> Doc:
    """The document of a config for *display_name*: signed with *private_jwk* if it signs,
    and keeping the fields unknown to sqstore of the payload *old* that it replaces."""
    cfg = _coerce(config, BackendConfig, "config_dict")
    if cfg.display_name != display_name:
        cfg = attrs.evolve(cfg, display_name=display_name)
    if not cfg.sign:
        return _keeping_unknown(to_doc(cfg), old or {}, BackendConfig)
    if private_jwk is None:
        raise BadSignatureError(f"backend {display_name!r} signs, but no private_jwk was given")
    key = _coerce(private_jwk, JWK, "private_jwk")
    doc = _keeping_unknown(to_doc(attrs.evolve(cfg, kid=key.kid)), old or {}, BackendConfig)
    return _doc_signer(store, key)(doc)


def upload_config(
    store: Storage, config_dict: ConfigLike, display_name: str, private_jwk: KeyLike | None = None
) -> None:
    """Upload a new backend configuration, signed when ``config_dict.sign`` is true.

    Args:
        store: the storage handle.
        config_dict: a `BackendConfig`, or a dict / sqooler model with its fields.
        display_name: the backend's short name (``a-z0-9``); overrides the config's.
        private_jwk: the backend's private key, needed when the config signs.

    Raises:
        AlreadyExistsError: the backend has a configuration already (use `update_config`).
        BadSignatureError: the config signs but no valid private key was given.
        InvalidDocumentError, InvalidNameError: bad config or display name.
    """
    check_handle(store)
    path, doc_id = locate(store["layout"], "config", display_name)
    store["upload"](path, doc_id, _config_doc(store, config_dict, display_name, private_jwk))


def update_config(
    store: Storage, config_dict: ConfigLike, display_name: str, private_jwk: KeyLike | None = None
) -> None:
    """Replace a backend's configuration.

    A signed configuration can only be replaced by the holder of the key that
    signed it: the old signature must verify with *private_jwk*'s public part.

    Raises:
        NotFoundError: the backend has no configuration (use `upload_config`).
        BadSignatureError: the old config is signed and *private_jwk* is missing or
            another key, or the new one signs and no key was given.
        InvalidDocumentError, InvalidNameError: bad config or display name.
    """
    check_handle(store)
    old = _read_config(store, display_name)[0]
    _write_config(store, old, config_dict, display_name, private_jwk)


def _write_config(
    store: Storage, old: Doc, config: Any, display_name: str, private_jwk: Any
) -> None:
    path, doc_id = locate(store["layout"], "config", display_name)
    cfg = _coerce(config, BackendConfig, "config_dict")
    if is_signed(old):
        if private_jwk is None:
            raise BadSignatureError(
                f"{path}/{doc_id} is signed: updating it needs the backend's private_jwk"
            )
        public = public_from_private(private_jwk)
        try:
            verify_doc(old, [public])
        except BadSignatureError:
            raise BadSignatureError(
                f"{path}/{doc_id} was signed with another key than {public.kid!r}"
            ) from None
        cfg = attrs.evolve(cfg, sign=True)
    if private_jwk is not None and cfg.sign:
        check_signing_key(store, _parse(old, BackendConfig, f"{path}/{doc_id}"), private_jwk)
    doc = _config_doc(store, cfg, display_name, private_jwk, payload_of(old))
    store["update"](path, doc_id, doc)


@_reads
def get_config(store: Storage, display_name: str) -> BackendConfig:
    """Return a backend's configuration (the payload, when it is signed).

    Raises:
        NotFoundError: the backend has no configuration, or *display_name* cannot
            be a backend's (the message says why).
        InvalidDocumentError: the stored configuration is malformed.
    """
    check_handle(store)
    return _read_config(store, display_name)[1]


def get_backends(store: Storage) -> list[str]:
    """Return the display names of every backend with a configuration, sorted."""
    check_handle(store)
    return store["list"](store["layout"].configs)


@_reads
def get_backend_dict(store: Storage, display_name: str) -> BackendDict:
    """Return the Qiskit-shaped backend dictionary a frontend serves.

    Raises:
        NotFoundError: the backend has no configuration, or *display_name* cannot
            be a backend's (the message says why).
    """
    check_handle(store)
    return _backend_dict(store["name"], get_config(store, display_name))


def _backend_dict(store_name: str, cfg: BackendConfig) -> BackendDict:
    return BackendDict(
        description=cfg.description,
        display_name=cfg.display_name or "",
        backend_version=cfg.version,
        n_qubits=cfg.num_wires,
        backend_name=_long_backend_name(store_name, cfg.display_name, cfg.simulator),
        basis_gates=tuple(str(g.get("name")) for g in cfg.gates),
        max_experiments=cfg.max_experiments,
        max_shots=cfg.max_shots,
        simulator=cfg.simulator,
        gates=cfg.gates,
        supported_instructions=cfg.supported_instructions,
        cold_atom_type=cfg.cold_atom_type,
        wire_order=cfg.wire_order,
        num_species=cfg.num_species,
    )


@_reads
def get_backend_status(
    store: Storage,
    display_name: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    now: Callable[[], float] = time.time,
) -> BackendStatus:
    """Return the Qiskit-shaped status of a backend.

    ``operational`` is true when the queue was checked at most *timeout* seconds ago;
    ``pending_jobs`` is the number of jobs in its queue now (one listing).

    Raises:
        NotFoundError: the backend has no configuration, or *display_name* cannot
            be a backend's (the message says why).
    """
    check_handle(store)
    cfg = get_config(store, display_name)
    status = backend_dict_to_qiskit_status(store, cfg, timeout=timeout, now=now)
    queued = store["list"](locate(store["layout"], "queued", display_name)[0])
    return attrs.evolve(status, pending_jobs=len(queued))


def timestamp_queue(
    store: Storage,
    display_name: str,
    private_jwk: KeyLike | None = None,
    *,
    min_interval: float = 0.0,
    now: Callable[[], float] = time.time,
) -> bool:
    """Record that Bob looked at the queue now (``last_queue_check``), re-signing if needed.

    Skips the write when the stored time is less than *min_interval* seconds old,
    so that polling an empty queue does not rewrite the configuration each time.

    Returns:
        Whether the configuration was written.

    Raises:
        NotFoundError: the backend has no configuration.
        BadSignatureError: the config is signed and *private_jwk* is not its key.
    """
    check_handle(store)
    raw, cfg = _read_config(store, display_name)
    current = now()
    last = cfg.last_queue_check
    if last is not None and current - last.timestamp() < min_interval:
        return False  # fresh enough, or our clock is behind the last writer's: never go back
    stamp = datetime.fromtimestamp(int(current), timezone.utc)
    _write_config(store, raw, attrs.evolve(cfg, last_queue_check=stamp), display_name, private_jwk)
    return True


def long_backend_name(store: Storage, display_name: str, simulator: bool) -> str:
    """Return a backend's full name, ``<store name>_<display_name>_simulator`` (or ``_hardware``).

    Raises:
        InvalidNameError: bad display name.

    >>> long_backend_name(memory_storage(), "sim", True)
    'memory_sim_simulator'
    """
    check_handle(store)
    return _long_backend_name(store["name"], check_display_name(display_name), simulator)


def backend_dict_to_qiskit(store: Storage, backend_config_info: Any) -> BackendDict:
    """Return the Qiskit-shaped backend dictionary of a configuration you hold.

    `get_backend_dict` is this applied to the stored configuration.

    Raises:
        InvalidDocumentError: *backend_config_info* is not a valid configuration.
    """
    check_handle(store)
    return _backend_dict(
        store["name"], _coerce(backend_config_info, BackendConfig, "backend_config_info")
    )


def backend_dict_to_qiskit_status(
    store: Storage,
    backend_dict: Any,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    now: Callable[[], float] = time.time,
) -> BackendStatus:
    """Return the Qiskit-shaped status of a configuration you hold (see `get_backend_status`).

    ``operational`` is true when ``last_queue_check`` is at most *timeout* seconds old.

    Raises:
        InvalidDocumentError: *backend_dict* is not a valid configuration.
    """
    check_handle(store)
    cfg = _coerce(backend_dict, BackendConfig, "backend_dict")
    return BackendStatus(
        backend_name=_long_backend_name(store["name"], cfg.display_name, cfg.simulator),
        backend_version=cfg.version,
        operational=_operational(cfg.last_queue_check, now(), timeout),
        pending_jobs=cfg.pending_jobs or 0,
        status_msg=cfg.status_msg or "",
    )


# sqooler's attribute names -> the kind (of `LOCATIONS`) of that folder, and of that document's id
_ATTRIBUTE_PATHS = {
    "configs": "config",
    "results": "result",
    "running": "running",
    "status": "status",
    "queue": "queued",
    "deleted": "deleted",
    "finished": "finished",
    "pks": "public_key",
}
_ATTRIBUTE_IDS = {"configs": "config", "job": "queued", "results": "result", "status": "status"}


def get_attribute_path(
    store: Storage,
    attribute_name: str,
    display_name: str | None = None,
    job_id: str | None = None,
    username: str | None = None,
) -> str:
    """Return the folder of a kind of document, as the handle's callables take it.

    *attribute_name* is sqooler's: ``configs``, ``results``, ``running``,
    ``status``, ``queue``, ``deleted``, ``finished`` or ``pks``.  A folder
    that depends on the backend needs *display_name*; one that depends on the
    user (Dropbox) takes it from *job_id*, else from *username*.

    Raises:
        InvalidNameError: an unknown attribute, or a bad or missing name.

    >>> get_attribute_path(memory_storage(), "queue", "sim")
    'jobs/queued/sim'
    """
    check_handle(store)
    kind = _ATTRIBUTE_PATHS.get(attribute_name)
    if kind is None:
        raise InvalidNameError(
            f"attribute {attribute_name!r} has no folder: use one of {sorted(_ATTRIBUTE_PATHS)}"
        )
    folder = _folder_template(store["layout"], kind)
    if "{" not in folder:  # one folder for every backend and job
        return folder
    if "{username}" not in folder:
        job_id = username = None
    elif job_id is not None:
        username = None  # the job's own
    elif username is None:
        raise InvalidNameError(
            f"the {attribute_name} folder of this layout needs a job_id or username"
        )
    dn: Any = display_name  # None too: locate names it in its error
    return locate(store["layout"], kind, dn, username, job_id or "")[0]


def get_attribute_id(
    store: Storage, attribute_name: str, job_id: str, display_name: str | None = None
) -> str:
    """Return the id under which the handle finds a job's document (or a backend's config).

    *attribute_name* is sqooler's: ``configs`` (needs *display_name*),
    ``job``, ``results`` or ``status``.

    Raises:
        InvalidNameError: an unknown attribute, or a bad or missing name.

    >>> get_attribute_id(memory_storage(layout=DROPBOX_LAYOUT), "status", "j1")
    'status-j1'
    """
    check_handle(store)
    kind = _ATTRIBUTE_IDS.get(attribute_name)
    if kind is None:
        raise InvalidNameError(
            f"attribute {attribute_name!r} has no id: use one of {sorted(_ATTRIBUTE_IDS)}"
        )
    if kind == "config":
        dn: Any = display_name  # None too: locate names it in its error
        return locate(store["layout"], kind, dn)[1]
    return _fill(_id_template(store["layout"], kind), job_id=check_name(job_id, "job_id"))


def get_file_queue(store: Storage, storage_path: str) -> list[str]:
    """Return the ids in folder *storage_path*, sorted (a queue: oldest first).

    Leading and trailing ``/`` are ignored, as sqooler ignores them.  A folder
    that does not exist holds nothing.

    Raises:
        InvalidNameError: *storage_path* is not a safe folder path.
    """
    check_handle(store)
    path = storage_path.strip("/") if isinstance(storage_path, str) else storage_path
    return _in_order(store["list"](_check_path(path)))


# Jobs: submit, signed submissions, submit tokens -----------------------------
# A job's signature is a detached signed document in ``<status folder>/signatures``,
# so the job itself stays the bare JSON that any sqooler spooler runs.  A submit
# token is a document that sqooler never reads, below the leases':
# ``<leases>/tokens/<dn>/<client_token>`` names the job submitted with it.


def create_job_id(store: Storage, display_name: str, username: str) -> str:
    """Return a new job id for the store's layout; ids sort by creation time.

    Raises:
        InvalidNameError: bad display name or username (a dated id's username has no ``-``).
    """
    check_handle(store)
    check_display_name(display_name)
    check_name(username, "username")
    if store["layout"].job_ids == "dated" and "-" in username:
        raise InvalidNameError(f"invalid username {username!r}: dated job ids need one without '-'")
    return new_job_id(
        store["layout"],
        display_name,
        username,
        time.time_ns(),
        int.from_bytes(os.urandom(4), "big"),
    )


def upload_job(
    store: Storage,
    job_dict: Doc,
    display_name: str,
    username: str,
    client_token: str | None = None,
    *,
    private_jwk: KeyLike | None = None,
) -> str:
    """Queue *job_dict* (stored as given) for a backend and return its job id.

    With *client_token* (a name the client picks for this submit), submitting
    again with the same token to the same backend returns the first job id and
    queues nothing more, so a client that lost the answer can safely retry.

    With *private_jwk* (a user's key, published with ``upload_public_key(...,
    role="user")``), the job is signed first, in a document of its own: see
    `verify_job` and a config's ``require_signed_jobs``.

    Raises:
        AlreadyExistsError: *client_token* was used for another job or user.
        BadSignatureError: *private_jwk* is not a private key.
        InvalidDocumentError: *job_dict* is not a JSON object.
        InvalidNameError: bad display name, username or client_token.
        TransientError: another submit with *client_token* is between its two
            writes (try again).
    """
    check_handle(store)
    if not isinstance(job_dict, dict):
        raise InvalidDocumentError(f"job_dict must be a JSON object, not {type(job_dict).__name__}")
    if client_token is not None:
        return _submit_once(store, job_dict, display_name, username, client_token, private_jwk)
    layout = store["layout"]
    for attempt in range(3):  # a fresh id if two submits met in one microsecond
        job_id = create_job_id(store, display_name, username)
        if private_jwk is not None:
            _sign_job(store, job_dict, display_name, username, job_id, private_jwk)
        try:
            store["upload"](*locate(layout, "queued", display_name, username, job_id), job_dict)
        except AlreadyExistsError:
            if attempt == 2:
                raise
            continue
        return job_id
    raise AssertionError("unreachable")


@_reads
def get_job(store: Storage, storage_path: str, job_id: str) -> Doc:
    """Return the job *job_id* stored in folder *storage_path* (e.g. ``jobs/running``).

    Raises:
        NotFoundError: no such job there, or no such job or folder can exist.
        InvalidDocumentError: the stored job is not a JSON object.
    """
    check_handle(store)
    _check_path(storage_path)
    doc_id = _fill(store["layout"].job_file, job_id=check_name(job_id, "job_id"))
    return _read(store, storage_path, doc_id)


_CANONICAL_JSON = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, sort_keys=True, allow_nan=False
)


def _job_digest(job: Any) -> str:
    """The SHA-256 of a job as stored: its JSON with sorted keys, compact (hex)."""
    import hashlib

    try:
        text = _CANONICAL_JSON.encode(json.loads(_JSON.encode(job)))
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidDocumentError(f"the job is not JSON: {exc}") from None
    return hashlib.sha256(text.encode()).hexdigest()


def _sign_job(
    store: Storage, job: Doc, display_name: str, username: str, job_id: str, private_jwk: Any
) -> None:
    """Store the signature of a job about to be queued (before it, so none runs unsigned)."""
    payload = {
        "job_id": job_id,
        "display_name": display_name,
        "username": username,
        "job_sha256": _job_digest(job),
    }
    path, doc_id = locate(store["layout"], "job_signature", display_name, job_id=job_id)
    signed = _doc_signer(store, private_jwk)(payload)
    try:
        store["upload"](path, doc_id, signed)
    except AlreadyExistsError:  # left by a submit that failed: this one is the job's
        store["update"](path, doc_id, signed)


_TOKEN_STALE = DEFAULT_SKEW + 60.0
"""Seconds after which a submit that wrote its token but not its job counts as dead."""


def _submit_holder() -> str:
    """Who is submitting: this process and thread (a retry from here is never concurrent)."""
    return f"{_default_holder()}:{threading.get_ident()}"


def _submit_once(
    store: Storage,
    job: Doc,
    display_name: str,
    username: str,
    client_token: str,
    private_jwk: KeyLike | None,
) -> str:
    """`upload_job` with a token: one job per token and backend, whatever the retries.

    The token document is created (create-only) before the job, naming the job's
    id and its submitter (*holder*), and its holder is cleared once the job is
    queued.  A later submit with the token returns that id; if the job was never
    queued, it queues it, when the holder is itself (an earlier attempt of this
    thread) or dead (the token is older than ``_TOKEN_STALE``).
    """
    check_name(client_token, "client_token")
    folder = locate(store["layout"], "submit_token", display_name, job_id=client_token)[0]
    digest, me = _job_digest(job), _submit_holder()
    for _ in range(5):
        job_id = create_job_id(store, display_name, username)
        mine: Doc = {"client_token": client_token, "job_id": job_id, "display_name": display_name}
        mine |= {"username": username, "digest": digest, "holder": me, "created": time.time()}
        try:
            store["upload"](folder, client_token, mine)
            return _queue_for_token(store, display_name, username, mine, job, private_jwk)
        except AlreadyExistsError:
            pass
        try:
            raw = store["get"](folder, client_token)
        except NotFoundError:
            continue  # removed meanwhile (pruned): a new submit
        found, holder, created = _token_fields(raw, f"{folder}/{client_token}")
        if raw.get("username") != username or raw.get("digest") != digest:
            raise AlreadyExistsError(
                f"{folder}/{client_token}: client_token {client_token!r} was used for "
                f"another job ({found}) or by another user"
            )
        if not holder:
            return found
        if holder != me and time.time() - created < _TOKEN_STALE:
            if locate_job(store, display_name, found) is not None:
                return found
            raise TransientError(
                f"{folder}/{client_token}: another submit with client_token {client_token!r} "
                "is under way; try again"
            )
        taken = {**raw, "holder": me, "created": time.time()}  # ours before, or a dead one's
        try:
            if store["swap"](folder, client_token, raw, taken):
                return _queue_for_token(
                    store, display_name, username, taken, job, private_jwk, fresh=False
                )
        except NotFoundError:
            continue
    raise TransientError(f"{folder}/{client_token}: the token keeps changing; try again")


def _token_fields(raw: Doc, where: str) -> tuple[str, str, float]:
    """The job id, holder and creation time of a stored token document."""
    job_id, holder, created = raw.get("job_id"), raw.get("holder"), raw.get("created")
    if (
        not isinstance(job_id, str)
        or _NAME_RE.fullmatch(job_id) is None
        or not isinstance(holder, str)
        or isinstance(created, bool)
        or not isinstance(created, (int, float))
    ):
        raise InvalidDocumentError(f"{where}: not a submit token document")
    return job_id, holder, float(created)


def _queue_for_token(
    store: Storage,
    display_name: str,
    username: str,
    doc: Doc,
    job: Doc,
    private_jwk: KeyLike | None,
    *,
    fresh: bool = True,
) -> str:
    """Queue the job a token document names, unless it is somewhere already, then mark
    the token done (no holder)."""
    layout, job_id = store["layout"], doc["job_id"]
    if fresh or _nowhere(store, display_name, job_id):
        if private_jwk is not None:
            _sign_job(store, job, display_name, username, job_id, private_jwk)
        with contextlib.suppress(AlreadyExistsError):  # an upload of ours answered too late
            store["upload"](*locate(layout, "queued", display_name, username, job_id), job)
    token = locate(layout, "submit_token", display_name, job_id=doc["client_token"])
    with contextlib.suppress(NotFoundError):  # pruned already: nothing to mark
        store["swap"](*token, doc, {**doc, "holder": ""})
    return str(job_id)


def _nowhere(store: Storage, display_name: str, job_id: str) -> bool:
    """Whether a job is in none of its folders (`_find_job`: looked for twice)."""
    try:
        _find_job(store, display_name, job_id)
    except NotFoundError:
        return True
    return False


# Claims and leases -----------------------------------------------------------


def _default_holder() -> str:
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def _lease_at(store: Storage, job_id: str) -> tuple[Doc, Lease] | None:
    """The stored lease of a job, as read (for `swap`) and as a record; None if none.

    Raises:
        InvalidDocumentError: the lease is not a lease, or names an invalid backend.
    """
    folder = store["layout"].leases
    try:
        raw = store["get"](folder, job_id)
    except NotFoundError:
        return None
    lease = from_doc(raw, Lease, where=f"{folder}/{job_id}")
    if lease.job_id != job_id or _DISPLAY_NAME_RE.fullmatch(lease.display_name) is None:
        raise InvalidDocumentError(f"{folder}/{job_id}: not the lease of job {job_id}")
    return raw, lease


def _lease_doc(raw: Doc, lease: Lease) -> Doc:
    """The document of *lease*, replacing the stored lease *raw* (whose unknown fields it keeps)."""
    return _keeping_unknown(to_doc(lease), raw, Lease)


def _swap_lease(store: Storage, found: tuple[Doc, Lease], **changes: Any) -> bool:
    """Change the lease *found* (as read) by *changes*; False if it changed meanwhile."""
    raw, lease = found
    new = _lease_doc(raw, attrs.evolve(lease, **changes))
    return store["swap"](store["layout"].leases, lease.job_id, raw, new)


def _expired(lease: Lease, now: float, skew: float) -> bool:
    return not lease.holder or now > lease.expires + skew


def lease_expired(lease: Lease, now: float, *, policy: LeasePolicy = LeasePolicy()) -> bool:
    """Return whether nobody holds *lease* at *now*: released, or past its time by more
    than ``policy.skew`` seconds (as `requeue_expired` and a claim's sweep judge it).

    >>> lease = Lease("6553f100075bcd15abcdef01", "sim", "host:1", "t", 100.0)
    >>> five = LeasePolicy(skew=5.0)
    >>> lease_expired(lease, 104.0, policy=five), lease_expired(lease, 106.0, policy=five)
    (False, True)
    """
    return _expired(lease, now, policy.skew)


def locate_job(store: Storage, display_name: str, job_id: str) -> str | None:
    """Return which of ``"queued"``, ``"running"``, ``"finished"`` or ``"deleted"`` holds
    job *job_id* of backend *display_name* now, or None if none does (one read each).

    Raises:
        InvalidNameError: *display_name* or *job_id* cannot be a name.
    """
    check_display_name(display_name)
    check_name(job_id, "job_id")
    for kind in ("running", "queued", "finished", "deleted"):
        if is_stored(store, *locate(store["layout"], kind, display_name, job_id=job_id)):
            return kind
    return None


def claim_jobs(
    store: Storage,
    display_name: str,
    private_jwk: KeyLike | None = None,
    *,
    policy: LeasePolicy = LeasePolicy(),
    now: Callable[[], float] = time.time,
    on_requeue: Callable[[list[str]], None] | None = None,
) -> Iterator[tuple[NextJob, Doc]]:
    """Claim a backend's queued jobs, oldest first, one per ``next()``, until none is left.

    Each claim is exactly-once: a create-only lease document (or a `swap` of a
    lease nobody holds) is the token, so of several workers racing for a job one
    wins and the others move on.  The lease is *policy*'s holder's for its
    ``lease_seconds`` from the claim (`renew_lease` extends it);
    `requeue_expired` returns the jobs of dead workers to the queue.  A job
    that cannot be read as a JSON object is set aside (moved to deleted, with
    an ERROR status) and the next one is tried;
    any other failure of one queued job skips that job only.  The queue is
    walked one id per step (``list(queue, 1)``), so a claim costs O(1) however
    long the queue, and a pass ends when the walk comes round to ids it has
    tried already.  ``last_queue_check`` is written at
    most every ``policy.heartbeat`` seconds (by the clock *now*, against the time
    stored by whichever worker wrote it last), and each time it is, expired
    leases of this backend are requeued (`requeue_expired` with *policy* and
    *now*); so are they once a heartbeat after this claimer's first beat, by
    *now*, when none of its beats wrote (another program, such as a sqooler
    spooler polling the backend, keeps the stamp fresh).  A loop of one-shot
    `claim_job` calls sweeps only when it writes the stamp: beside such a
    program it calls `requeue_expired` itself, or uses `work`.  *on_requeue*, if
    given, is called with the ids each such sweep requeued (when it requeued
    any); they are then claimed like any queued job.

    Yields:
        ``(NextJob, job)`` for each claimed job.

    Raises:
        NotFoundError: the backend has no configuration.
    """
    yield from _claims(store, display_name, private_jwk, policy, now, on_requeue, [])


def _claims(
    store: Storage,
    display_name: str,
    private_jwk: KeyLike | None,
    policy: LeasePolicy,
    now: Callable[[], float],
    on_requeue: Callable[[list[str]], None] | None,
    swept: list[float],
) -> Iterator[tuple[NextJob, Doc]]:
    """`claim_jobs`, whose claims also sweep once *swept* (the time they last swept, or
    empty before their first beat) is a heartbeat old: a caller that keeps *swept* from
    one claimer to the next (`work`) sweeps on its own clock even while another program
    keeps ``last_queue_check`` fresh."""
    check_handle(store)
    layout = store["layout"]
    queue = locate(layout, "queued", display_name)[0]
    holder = policy.holder or _default_holder()
    lease_seconds, skew = policy.lease_seconds, policy.skew
    next_beat = -math.inf
    beating, configs = _config_memo(store, display_name)  # the beat's read tells the policy

    def beat() -> None:
        nonlocal next_beat
        at = now()
        if at < next_beat:
            return
        try:
            wrote = timestamp_queue(
                beating, display_name, private_jwk, min_interval=policy.heartbeat, now=now
            )
        except InvalidDocumentError as exc:
            if not exc.partial:
                raise
            return  # being rewritten in place by another program: beat at the next job
        swept[:] = swept or [at]
        if wrote or at - swept[0] >= policy.heartbeat:
            requeued = requeue_expired(store, display_name, private_jwk, policy=policy, now=now)
            swept[:] = [at]
            if requeued and on_requeue is not None:
                on_requeue(requeued)
        next_beat = at + policy.heartbeat

    while True:
        beat()
        found = False
        for file_id in _queue_walk(store, queue):
            beat()
            try:
                claimed = _claim_one(
                    store, display_name, queue, file_id, holder, now(), lease_seconds, skew
                )
                if claimed is not None and _set_aside_or_give_back(
                    store, display_name, claimed, configs
                ):
                    found = True  # not run: the next one is tried
                    continue
            except (
                InvalidDocumentError,
                InvalidNameError,
                StorageError,
                NotFoundError,
                LeaseLostError,
            ):
                continue  # this job only: a foreign lease, an odd entry; the next one is tried
            if claimed is not None:
                found = True
                yield claimed
        if not found:
            return


def _queue_walk(store: Storage, queue: str) -> Iterator[str]:
    """The ids of *queue*, oldest first, one ``list(queue, 1)`` step at a time, until a
    step brings an id already walked (the handle's walk has come round) or none."""
    walked: set[str] = set()
    while True:
        step = store["list"](queue, 1)
        if not step or step[0] in walked:
            return
        walked.add(step[0])
        yield step[0]


def _claim_one(
    store: Storage,
    display_name: str,
    queue: str,
    file_id: str,
    holder: str,
    now: float,
    lease_seconds: float,
    skew: float,
) -> tuple[NextJob, Doc] | None:
    layout = store["layout"]
    job_id = check_name(_job_id_of(layout, file_id), "job_id")
    fresh = Lease(job_id, display_name, holder, os.urandom(8).hex(), now + lease_seconds)
    replaced: Doc | None = None  # the lease this claim took over, given back if it fails
    try:
        store["upload"](layout.leases, job_id, to_doc(fresh))
        lease_at = to_doc(fresh), fresh
    except AlreadyExistsError:
        found = _lease_at(store, job_id)  # released by a requeue, or its claimer died
        if found is None or not (_expired(found[1], now, skew) or found[1].holder == _ORPHAN):
            return None  # another worker holds it (an adopted job back in the queue has none)
        if is_stored(store, layout.running, file_id):
            return None  # a requeue's move is half done (MongoDB): the sweep completes it
        taken = attrs.evolve(fresh, attempts=found[1].attempts + 1)
        taken_doc = _lease_doc(found[0], taken)
        if not store["swap"](layout.leases, job_id, found[0], taken_doc):
            return None  # another worker took it first
        lease_at, replaced = (taken_doc, taken), found[0]
    try:
        moved = store["move"](queue, layout.running, file_id)
    except NotFoundError:  # gone meanwhile (a stale listing, or a worker without leases)
        with contextlib.suppress(NotFoundError):  # the lease it had goes back as it was
            store["swap"](layout.leases, job_id, lease_at[0], replaced)
        return None
    try:
        job = moved if isinstance(moved, dict) else get_job(store, layout.running, job_id)
    except (InvalidDocumentError, StorageError) as exc:
        status = StatusMsg(job_id, "ERROR", "The job is not a valid JSON object.", str(exc))
        _close(store, lease_at, display_name, job_id, _finished_at(to_doc(status), now))
        return None
    return NextJob(job_id, layout.running), job


def claim_job(
    store: Storage,
    display_name: str,
    private_jwk: KeyLike | None = None,
    *,
    policy: LeasePolicy = LeasePolicy(),
    now: Callable[[], float] = time.time,
) -> tuple[NextJob, Doc] | None:
    """Claim the oldest queued job of a backend for this worker, and read it.

    One step of `claim_jobs` (see there for the lease and the heartbeat, and
    `LeasePolicy` for *policy*).

    Returns:
        ``(NextJob, job)`` or None when the queue is empty.

    Raises:
        NotFoundError: the backend has no configuration.
    """
    return next(claim_jobs(store, display_name, private_jwk, policy=policy, now=now), None)


def _job_id_of(layout: Layout, file_id: str) -> str:
    return _id_in_file(layout.job_file, file_id) or file_id


def get_next_job_in_queue(
    store: Storage,
    display_name: str,
    private_jwk: KeyLike | None = None,
    *,
    policy: LeasePolicy = LeasePolicy(),
    now: Callable[[], float] = time.time,
) -> NextJob:
    """Claim the oldest queued job (see `claim_job`) and say where it now is.

    Returns:
        ``NextJob(job_id, "jobs/running")``, or ``NextJob("None", "None")`` when
        the queue is empty, as in sqooler.

    Raises:
        NotFoundError: the backend has no configuration.
    """
    claimed = claim_job(store, display_name, private_jwk, policy=policy, now=now)
    return NextJob(_NONE, _NONE) if claimed is None else claimed[0]


def _config_memo(store: Storage, display_name: str) -> tuple[Storage, list[Doc]]:
    """*store*, remembering in the list the last config of *display_name* it read: a
    claim learns its backend's policy from the read its heartbeat makes anyway."""
    where = locate(store["layout"], "config", display_name)
    seen: list[Doc] = []
    read = store["get"]

    def get(path: str, doc_id: str) -> Doc:
        doc = read(path, doc_id)
        if (path, doc_id) == where:
            seen[:] = [doc]
        return doc

    return {**store, "get": get}, seen


def _job_signature_problem(
    store: Storage,
    display_name: str,
    username: str | None,
    job_id: str,
    job: Doc,
    accepted: tuple[str, ...] = (),
) -> str:
    """Why a job's signature is not good (a user key, of *accepted* kids if any); "" if it is."""
    path, doc_id = locate(store["layout"], "job_signature", display_name, job_id=job_id)
    try:
        raw = _read(store, path, doc_id)
        kid = _open_signed(raw)[2].get("kid") if is_signed(raw) else None
    except NotFoundError:
        return "the job is not signed"
    except (InvalidDocumentError, StorageError) as exc:  # a claim must not hold the job
        return f"its signature cannot be read: {exc}"
    if not isinstance(kid, str):
        return "the job is not signed with a key id"
    if accepted and kid not in accepted:
        return f"it is signed with key {kid!r}, which this backend does not accept"
    try:
        key = get_public_key_from_kid(store, kid, role="user")
        payload = verify_doc(raw, [key])
    except NotFoundError:
        return f"it is signed with an unknown key {kid!r}"
    except StorageError as exc:
        return f"its key {kid!r} cannot be read: {exc}"
    except (BadSignatureError, InvalidDocumentError):
        return f"its signature does not verify with key {kid!r}"
    names = (payload.get("job_id"), payload.get("display_name"), payload.get("username"))
    if names[:2] != (job_id, display_name) or username not in (None, names[2]):
        return "its signature is that of another job"
    if payload.get("job_sha256") != _job_digest(job):
        return "the job was changed after it was signed"
    return ""


def _set_aside(
    store: Storage, display_name: str, claimed: tuple[NextJob, Doc], configs: list[Doc]
) -> bool:
    """Set aside (to deleted, with an ERROR status saying why) a just-claimed job that its
    backend does not run; return whether it did.

    A backend whose config sets ``require_signed_jobs`` (or lists
    ``accepted_kids``) runs only jobs signed with a published user key (one of
    those kids) over this very job.  The config is the one last read in
    *configs* (the claim's heartbeat reads it), else it is read now.
    """
    job_id, job = claimed[0].job_id, claimed[1]
    path, doc_id = locate(store["layout"], "config", display_name)
    if configs:  # read by the heartbeat, which parsed it: its two fields tell the policy
        policy = payload_of(configs[-1])
        if not (policy.get("require_signed_jobs") or policy.get("accepted_kids")):
            return False
    raw = configs[-1] if configs else _read(store, path, doc_id)
    cfg = _parse(raw, BackendConfig, f"{path}/{doc_id}")
    if not (cfg.require_signed_jobs or cfg.accepted_kids):
        return False
    why = _job_signature_problem(store, display_name, None, job_id, job, cfg.accepted_kids)
    if not why:
        return False
    status = StatusMsg(
        job_id, "ERROR", "The job was set aside: its signature is not accepted.", why
    )
    doc = _finished_at(to_doc(status), time.time())
    _close(store, _lease_at(store, job_id), display_name, job_id, doc)
    return True


def _set_aside_or_give_back(
    store: Storage, display_name: str, claimed: tuple[NextJob, Doc], configs: list[Doc]
) -> bool:
    """`_set_aside`, but a job it cannot decide on (a read failed) goes back to its queue
    at once, before the failure is raised, rather than wait in running for its lease."""
    try:
        return _set_aside(store, display_name, claimed, configs)
    except SqstoreError:
        with contextlib.suppress(SqstoreError):  # else its lease expires and a sweep does it
            requeue_job(store, display_name, claimed[0].job_id)
        raise


def renew_lease(
    store: Storage,
    job_id: str,
    *,
    policy: LeasePolicy = LeasePolicy(),
    now: Callable[[], float] = time.time,
) -> Lease:
    """Extend *policy*'s holder's lease on a running job by its ``lease_seconds`` from now.

    Raises:
        LeaseLostError: the lease is gone, held by another worker, or changed
            meanwhile (e.g. requeued by a sweep that found it expired).
    """
    check_handle(store)
    holder = policy.holder or _default_holder()
    found = _lease_at(store, check_name(job_id, "job_id"))
    if found is None or found[1].holder != holder:
        raise LeaseLostError(f"job {job_id}: lease not held by {holder!r}")
    renewed = attrs.evolve(found[1], expires=now() + policy.lease_seconds)
    try:
        if store["swap"](store["layout"].leases, job_id, found[0], _lease_doc(found[0], renewed)):
            return renewed
    except NotFoundError:
        pass
    raise LeaseLostError(f"job {job_id}: the lease changed while {holder!r} renewed it")


def requeue_expired(
    store: Storage,
    display_name: str | None = None,
    private_jwk: KeyLike | None = None,
    *,
    policy: LeasePolicy = LeasePolicy(),
    now: Callable[[], float] = time.time,
) -> list[str]:
    """Sweep the leases: return the running jobs of dead workers to their queue.

    A lease counts as expired ``policy.skew`` seconds after its time, so a worker
    whose clock is ahead by less than that requeues no live job.  For each expired
    lease (of *display_name*'s jobs, or of all): a job whose worker died while
    finishing it is finished (its lease holds the final status); a job claimed
    ``policy.max_attempts`` times already (a poison job that kills its worker) is moved
    to deleted with an ERROR status; any other running job goes back to its
    queue, unless its cancel was requested (`cancel_job`): then it ends
    cancelled.  A running job that has no lease (its lease was garbage, or it was
    moved there by a program that takes none) gets one that expires after
    ``policy.lease_seconds``, and is then requeued like the others if it is still
    there.  Every step is a `swap` of the lease as read, so of several sweeps
    and workers acting at once one wins, and a lease that changed meanwhile is
    left alone.  A document that cannot be read or placed is skipped: it
    stops nothing else.  Statuses written here are signed when *private_jwk* is
    given and the backend signs.

    Returns:
        The ids of the requeued jobs, in lease order.
    """
    check_handle(store)
    if display_name is not None:
        check_display_name(display_name)
    layout = store["layout"]
    requeued: list[str] = []
    current = now()
    skew, max_attempts, grace = policy.skew, policy.max_attempts, policy.lease_seconds
    leased = store["list"](layout.leases)
    for job_id in leased:
        try:
            found = _lease_at(store, job_id)
        except InvalidDocumentError:  # garbage in place of a lease: the job has none
            with contextlib.suppress(SqstoreError):
                store["delete"](layout.leases, job_id)
                _adopt(store, display_name, job_id, current + grace)
            continue
        except (InvalidNameError, StorageError):
            continue  # this lease only
        try:
            if found is not None and _sweep_lease(
                store, display_name, private_jwk, found, current, skew, max_attempts, grace
            ):
                requeued.append(job_id)
        except TransientError:
            raise
        except SqstoreError:
            continue  # this lease only: an unreadable config, a half-done move, ...
    held = set(leased)
    for file_id in store["list"](layout.running):
        job_id = _job_id_of(layout, file_id)
        if job_id not in held:
            with contextlib.suppress(InvalidDocumentError, InvalidNameError, StorageError):
                _adopt(store, display_name, job_id, current + grace)
    return requeued


_ORPHAN = "(no lease)"  # the holder of a lease that a sweep gave to a running job


def _adopt(store: Storage, display_name: str | None, job_id: str, expires: float) -> None:
    """Give a running job without a lease one that expires at *expires*, if its
    backend can be told: from a dated id, or from where its status is."""
    layout = store["layout"]
    check_name(job_id, "job_id")
    names = [display_name] if display_name is not None else get_backends(store)
    owners = [dn for dn in names if _owner(store, dn, job_id)]
    if len(owners) != 1 or not is_stored(
        store, *locate(layout, "running", owners[0], job_id=job_id)
    ):
        return
    lease = Lease(job_id, owners[0], _ORPHAN, os.urandom(8).hex(), expires)
    with contextlib.suppress(AlreadyExistsError):  # claimed or adopted meanwhile
        store["upload"](layout.leases, job_id, to_doc(lease))


def _sweep_lease(
    store: Storage,
    display_name: str | None,
    private_jwk: Any,
    found: tuple[Doc, Lease],
    now: float,
    skew: float,
    max_attempts: int,
    grace: float,
) -> bool:
    """Act on one lease as read (see `requeue_expired`); True if its job was requeued."""
    layout = store["layout"]
    raw, lease = found
    job_id, dn = lease.job_id, lease.display_name
    if (display_name is not None and dn != display_name) or not _expired(lease, now, skew):
        return False
    where = locate_job(store, dn, job_id)
    if where is None:  # the job is gone (deleted by hand, say): the lease guards nothing
        store["swap"](layout.leases, job_id, raw, None)
        return False
    if lease.finish is not None and not (
        where == "running"
        and payload_of(lease.finish).get("status") == "DONE"
        and not is_stored(store, *locate(layout, "result", dn, job_id=job_id))
    ):
        _close(store, found, dn, job_id, lease.finish)  # its worker died while finishing it
        return False
    if where != "running":
        if where != "queued":  # finished or gone: the lease guards nothing
            store["swap"](layout.leases, job_id, raw, None)
        return False  # queued: the next claim takes the lease over
    if not lease.holder:  # requeued, then moved to running by a program without leases
        _swap_lease(store, found, holder=_ORPHAN, expires=now + grace)
        return False
    try:
        cancelled_by = cancel_requested(store, job_id)  # asked while it ran: it ends here
    except StorageError:
        cancelled_by = None  # unreadable: it runs again, and its worker looks again
    if cancelled_by is not None or lease.attempts >= max_attempts:
        if cancelled_by is not None:
            why = "Its worker stopped before it ended; the job was not run again."
            status = _cancelled(job_id, cancelled_by, why)
        else:
            why = f"Its worker died or lost the lease {lease.attempts} times; not run again."
            status = StatusMsg(job_id, "ERROR", "The job was given up.", why)
        doc = _finished_at(to_doc(status), now)
        if private_jwk is not None and (
            sign := _backend_signer(store, get_config(store, dn), private_jwk)
        ):
            doc = sign(doc)
        _close(store, found, dn, job_id, doc)
        if cancelled_by is not None:
            _forget_cancel(store, job_id)
        return False
    if not _swap_lease(
        store, found, holder="", token=os.urandom(8).hex(), expires=now, finish=None
    ):
        return False  # another sweep or the worker acted first
    running, file_id = locate(layout, "running", dn, job_id=job_id)
    try:
        store["move"](running, locate(layout, "queued", dn)[0], file_id)
    except (NotFoundError, AlreadyExistsError):
        return False  # finished or requeued meanwhile
    return True


def running_jobs(store: Storage, display_name: str) -> dict[str, Lease | None]:
    """Return the running jobs of a backend, oldest first, each with its lease.

    The lease says who holds the job (``holder``), until when (``expires``,
    Unix seconds) and how often it was claimed (``attempts``); a running job
    without a lease (moved there by a program that takes none, such as
    sqooler) has None.  Such a job counts as the backend's when its id or its
    status says so.

    Raises:
        InvalidNameError: bad display name.
    """
    check_handle(store)
    check_display_name(display_name)
    layout = store["layout"]
    found: dict[str, Lease | None] = {}
    for file_id in store["list"](layout.running):
        job_id = _job_id_of(layout, file_id)
        try:
            at = _lease_at(store, job_id)
        except (InvalidDocumentError, InvalidNameError):
            at = None  # garbage in place of a lease: the job has none
        if at is not None:
            if at[1].display_name == display_name:
                found[job_id] = at[1]
        elif _owner(store, display_name, job_id):
            found[job_id] = None
    return found


def _owner(store: Storage, display_name: str, job_id: str) -> bool:
    """Whether a running job without a lease is *display_name*'s: from a dated id,
    or from where its status is."""
    if store["layout"].job_ids == "dated" and len(parts := job_id.split("-")) == 4:
        return parts[1] == display_name
    try:
        return is_stored(store, *locate(store["layout"], "status", display_name, job_id=job_id))
    except InvalidNameError:
        return False


def requeue_job(
    store: Storage,
    display_name: str,
    job_id: str,
    private_jwk: Any = None,
    *,
    now: Callable[[], float] = time.time,
) -> bool:
    """Put a running job back in its queue at once, whether or not its lease expired.

    For a job whose worker is known to be dead (or was stopped): its lease is
    swept as `requeue_expired` sweeps an expired one (a recorded finish or a
    requested cancel ends the job instead; statuses signed with *private_jwk*
    when given), at once and never giving the job up however often it was
    claimed.  A worker still running it loses its lease (its finish then fails
    with `LeaseLostError`).  A lease left on a queued job by a claim that
    stopped half-way is released.

    Returns:
        True if the job went back to its queue, False if it was finished instead.

    Raises:
        NotFoundError: the job is not a running job of *display_name*.
        InvalidNameError: bad display name or job id.
    """
    check_handle(store)
    check_display_name(display_name)
    check_name(job_id, "job_id")
    layout = store["layout"]
    for _ in range(5):  # a lease that changes meanwhile (a renewal, a sweep) is read again
        found = _lease_at(store, job_id)
        if found is None or found[1].display_name != display_name:
            if found is not None or not _owner(store, display_name, job_id):
                raise NotFoundError(f"job {job_id} is not a job of backend {display_name!r}")
            if not is_stored(store, *locate(layout, "running", display_name, job_id=job_id)):
                raise NotFoundError(f"job {job_id} of backend {display_name!r} is not running")
            _adopt(store, display_name, job_id, now())
            continue
        lease = found[1]
        where = locate_job(store, display_name, job_id)
        if where == "queued" and lease.holder:  # a claim that stopped before its move
            if _swap_lease(store, found, holder="", token=os.urandom(8).hex(), expires=now()):
                return True
            continue
        if where != "running":
            raise NotFoundError(f"job {job_id} of backend {display_name!r} is not running")
        if not lease.holder:  # released, then moved to running without a lease: hold it first
            _swap_lease(store, found, holder=_ORPHAN, expires=now())
            continue
        # every lease counts as expired (skew -inf), and no job is given up here
        if _sweep_lease(
            store, display_name, private_jwk, found, now(), -math.inf, sys.maxsize, 0.0
        ):
            return True
        if locate_job(store, display_name, job_id) in ("finished", "deleted"):
            return False  # its recorded finish was completed, or its cancel request honoured
    raise LeaseLostError(f"job {job_id}: its lease keeps changing; another worker acts on it")


# Cancel ----------------------------------------------------------------------
# A cancel request is a document keyed by job id in ``<leases>/cancel``.


def _cancelled(job_id: str, username: str, why: str) -> StatusMsg:
    return StatusMsg(job_id, "ERROR", f"Cancelled by {username}.", why)


def _cancelled_before(job_id: str, username: str) -> Doc:
    """The status of a job cancelled in the queue, finished now."""
    status = _cancelled(job_id, username, "The job was cancelled before it ran.")
    return _finished_at(to_doc(status), time.time())


def _check_job_names(store: Storage, display_name: str, username: str, job_id: str) -> str:
    """Check the names of a job; a dated job id must name this backend and this user."""
    check_display_name(display_name)
    check_name(username, "username")
    check_name(job_id, "job_id")
    parts = job_id.split("-")
    dated = store["layout"].job_ids == "dated" and len(parts) == 4
    if dated and (parts[1], parts[2]) != (display_name, username):
        raise NotFoundError(f"job {job_id} is not a job of {username!r} on {display_name!r}")
    return job_id


def _find_job(store: Storage, display_name: str, job_id: str) -> str:
    """Which of queued, running, finished or deleted holds a job; looked up twice, since
    a claim moving it from queued to running between two reads would hide it from one.

    Raises:
        NotFoundError: the backend has no such job.
    """
    for _ in range(2):
        if (where := locate_job(store, display_name, job_id)) is not None:
            return where
    raise NotFoundError(f"backend {display_name!r} has no job {job_id}")


def cancel_job(store: Storage, display_name: str, username: str, job_id: str) -> str:
    """Cancel a job for *username*: a queued job never runs, a running one is asked to stop.

    First a cancel request is stored (create-only), then the job is moved from
    the queue to deleted.  Of that move and a worker's claim exactly one wins:
    either the job never runs (``"cancelled"``: it is in deleted with an ERROR
    status whose detail is ``"Cancelled by <username>."``), or it is running
    and the request is there for its worker (``"requested"``): `work` hands it
    to the executor and ends the job as cancelled, dropping its result, unless
    the worker had begun to finish the job before it saw the request.  A job
    that had ended already is left as it is (``"finished"``).  A cancel stopped
    half-way (its process killed) is completed by calling it again.

    Returns:
        ``"cancelled"``, ``"requested"`` or ``"finished"``.

    Raises:
        InvalidNameError: bad display name, username or job id.
        NotFoundError: the backend has no such job (or a dated id names another
            backend or user).
    """
    check_handle(store)
    _check_job_names(store, display_name, username, job_id)
    layout = store["layout"]
    where = _find_job(store, display_name, job_id)
    if where in ("finished", "deleted"):
        return _after_the_end(store, display_name, username, job_id, where)
    path, doc_id = locate(layout, "cancel_request", job_id=job_id)
    request = {"job_id": job_id, "display_name": display_name, "username": username}
    with contextlib.suppress(AlreadyExistsError):  # asked before: that request stands
        store["upload"](path, doc_id, {**request, "requested": time.time()})
    queued, file_id = locate(layout, "queued", display_name, job_id=job_id)
    deleted = locate(layout, "deleted", display_name, job_id=job_id)[0]
    for _ in range(3):  # again if a sweep put the job back in the queue meanwhile
        if where != "queued":
            break
        try:
            store["move"](queued, deleted, file_id)
        except NotFoundError:  # claimed meanwhile: it runs, and its worker gets the request
            where = _find_job(store, display_name, job_id)
            continue
        _put_status(store, display_name, None, job_id, _cancelled_before(job_id, username))
        _forget_cancel(store, job_id)
        return "cancelled"
    if where in ("running", "queued"):
        return "requested"
    _forget_cancel(store, job_id)  # it ended meanwhile: nothing is left to ask
    return "finished"


def _after_the_end(
    store: Storage, display_name: str, username: str, job_id: str, where: str
) -> str:
    """Cancel a job that has ended: a request left behind is dropped, and a job in deleted
    whose status is not final was moved there by a cancel that stopped before writing
    its status, which is written now."""
    if cancel_requested(store, job_id) is None:
        return "finished"
    outcome = "finished"
    if where == "deleted" and _final_status(store, display_name, job_id) is None:
        _put_status(store, display_name, None, job_id, _cancelled_before(job_id, username))
        outcome = "cancelled"
    _forget_cancel(store, job_id)
    return outcome


@_reads
def cancel_requested(store: Storage, job_id: str) -> str | None:
    """Return who asked to cancel a job (see `cancel_job`), or None if nobody did.

    A worker loop of one's own (`claim_job` ... `update_in_database`) polls this;
    `work` does it for its executor.

    Raises:
        NotFoundError: *job_id* cannot be a job id.
    """
    check_handle(store)
    path, doc_id = locate(store["layout"], "cancel_request", job_id=check_name(job_id, "job_id"))
    try:
        doc = _read(store, path, doc_id)
    except NotFoundError:
        return None
    except InvalidDocumentError:
        return "someone"  # a request it is, even if it cannot be read
    who = doc.get("username")
    return who if isinstance(who, str) and _NAME_RE.fullmatch(who) else "someone"


def _forget_cancel(store: Storage, job_id: str) -> None:
    """Drop a job's cancel request once it is honoured (gone already: fine)."""
    with contextlib.suppress(NotFoundError, StorageError, TransientError):
        store["delete"](*locate(store["layout"], "cancel_request", job_id=job_id))


# Finish ----------------------------------------------------------------------


def _record_finish(
    store: Storage, lease_at: tuple[Doc, Lease] | None, job_id: str, status_doc: Doc
) -> tuple[Doc, Lease] | None:
    """Record a job's final status in its lease (a `swap` of the lease as read), so
    that a sweep can complete the finish if this worker dies; return the new lease.

    Raises:
        LeaseLostError: the lease changed since it was read (another worker has the job).
    """
    if lease_at is None or lease_at[1].finish == status_doc:
        return lease_at
    finishing = attrs.evolve(lease_at[1], finish=status_doc)
    doc = _lease_doc(lease_at[0], finishing)
    if not store["swap"](store["layout"].leases, job_id, lease_at[0], doc):
        raise LeaseLostError(f"job {job_id}: the lease changed; another worker has it")
    return doc, finishing


def _close(
    store: Storage,
    lease_at: tuple[Doc, Lease] | None,
    display_name: str,
    job_id: str,
    status_doc: Doc,
) -> None:
    """End a job's life: the DONE and ERROR steps of `update_in_database`, each safe to repeat.

    Raises:
        LeaseLostError: the lease changed since it was read (another worker has the job).
        NotFoundError: the job is neither running nor where it was to go.
    """
    layout = store["layout"]
    target, file_id = _end_of(layout, display_name, job_id, payload_of(status_doc).get("status"))
    lease_at = _record_finish(store, lease_at, job_id, status_doc)
    try:
        store["move"](layout.running, target, file_id)
    except NotFoundError:
        if not is_stored(store, target, file_id):  # not finished by an earlier run of this step
            raise NotFoundError(
                f"job {job_id} is neither in {layout.running} nor in {target}"
            ) from None
    _put_status(store, display_name, None, job_id, status_doc)
    if lease_at is not None:
        with contextlib.suppress(NotFoundError):  # dropped by a sweep that completed it
            store["swap"](layout.leases, job_id, lease_at[0], None)


def _end_of(layout: Layout, display_name: str, job_id: str, status: Any) -> tuple[str, str]:
    """Where a job goes when it ends with *status*: finished if DONE, else deleted."""
    kind = "finished" if status == "DONE" else "deleted"
    return locate(layout, kind, display_name, job_id=job_id)


def _put_status(
    store: Storage, display_name: str, username: str | None, job_id: str, doc: Doc
) -> None:
    path, doc_id = locate(store["layout"], "status", display_name, username, job_id)
    try:
        store["update"](path, doc_id, doc)
    except NotFoundError:
        try:
            store["upload"](path, doc_id, doc)
        except AlreadyExistsError:  # created meanwhile: ours is the newer word
            store["update"](path, doc_id, doc)


def _finished_at(doc: Doc, at: float) -> Doc:
    """A final (DONE or ERROR) status document, saying when the job finished."""
    if doc.get("status") in ("DONE", "ERROR"):
        doc["finished_at"] = datetime.fromtimestamp(at, timezone.utc).isoformat()
    return doc


def _status_doc(store: Storage, display_name: str, job_id: str) -> Doc | None:
    """A job's stored status (its payload); None if it has none, or garbage, or a bad id."""
    try:
        where = locate(store["layout"], "status", display_name, job_id=job_id)
        return payload_of(_read(store, *where))
    except (NotFoundError, InvalidDocumentError, InvalidNameError):
        return None


def _final_status(store: Storage, display_name: str, job_id: str) -> Doc | None:
    """A job's stored status if it is DONE or ERROR (None if not, or none, or garbage)."""
    status = _status_doc(store, display_name, job_id)
    return status if status is not None and status.get("status") in ("DONE", "ERROR") else None


def update_in_database(
    store: Storage,
    result_dict: ResultLike | None,
    status_msg_dict: StatusLike,
    job_id: str,
    display_name: str,
    private_jwk: KeyLike | None = None,
    *,
    policy: LeasePolicy = LeasePolicy(),
    now: Callable[[], float] = time.time,
) -> None:
    """Finish a running job: Bob's last step.

    DONE: upload the result (signed when the backend signs) and move the job to
    finished.  ERROR: move the job to deleted.  Then write the status (signed
    when the backend signs and *private_jwk* is given) and, for DONE and ERROR,
    release the lease (any other status only reports progress).  The job's
    lease must be this worker's (``policy.holder``, by default this process's
    ``host:pid``, as `claim_job` takes it); a job without a lease (moved to
    running by a program that takes none) is finished too.  Before anything
    moves, the final status is recorded in the lease, so a worker that dies at
    any later step leaves a job that `requeue_expired` finishes; re-running
    this step finishes it too.  A job without a lease that is finished already
    (in finished or deleted, with a DONE or ERROR status) is left as it is: a
    re-run changes nothing, and a worker that lost its lease and finishes after
    another worker did gets `LeaseLostError` (unless it finishes with the very
    same status).  A DONE or ERROR status says when (``finished_at``,
    from *now*), for `queue_stats` and `prune`.

    Raises:
        InvalidDocumentError: DONE without a result, a malformed status/result, or an
            earlier run of this step moved the job with the other outcome (that
            outcome is then completed, and stands).
        LeaseLostError: the lease is another worker's, or changed meanwhile, or
            another worker finished the job already.
        NotFoundError: the job is neither running nor already finished.
    """
    check_handle(store)
    layout = store["layout"]
    status = _coerce(status_msg_dict, StatusMsg, "status_msg_dict")
    file_id = locate(layout, "running", display_name, job_id=check_name(job_id, "job_id"))[1]
    cfg = _read_config(store, display_name)[1]
    sign = _backend_signer(store, cfg, private_jwk)
    holder = policy.holder or _default_holder()
    lease_at = _lease_at(store, job_id)
    if lease_at is not None and lease_at[1].holder != holder:
        raise LeaseLostError(f"job {job_id}: lease not held by {holder!r}")
    status_doc = _finished_at(to_doc(status), now())
    status_doc = status_doc if sign is None else sign(status_doc)
    if status.status not in ("DONE", "ERROR"):  # progress: the job keeps running and its lease
        if lease_at is None and not is_stored(store, layout.running, file_id):
            raise NotFoundError(f"job {job_id} is not in {layout.running}")
        _put_status(store, display_name, None, job_id, status_doc)
        return
    if lease_at is None and not is_stored(store, layout.running, file_id):
        # Finished already?  The status is read before the job is looked for: `prune`
        # removes a job before its status, so a job found after is not being removed.
        finished = _final_status(store, display_name, job_id)
        target = _end_of(layout, display_name, job_id, status.status)[0]
        if not is_stored(store, target, file_id):
            raise NotFoundError(f"job {job_id} is neither in {layout.running} nor in {target}")
        if finished is not None:  # that finish stands
            if {**finished, "finished_at": None} != {**to_doc(status), "finished_at": None}:
                raise LeaseLostError(f"job {job_id} was finished by another worker already")
            return  # by an earlier run of this step
    recorded = None if lease_at is None or lease_at[1].finish is None else lease_at[1].finish
    if (
        recorded is not None
        and payload_of(recorded).get("status") != status.status
        and not is_stored(store, layout.running, file_id)
    ):  # an earlier run of this step moved the job already: its outcome stands
        _close(store, lease_at, display_name, job_id, recorded)
        raise InvalidDocumentError(
            f"job {job_id} was finished as {payload_of(recorded).get('status')} already "
            f"(now completed); it cannot become {status.status}"
        )
    result = None
    if status.status == "DONE":
        if result_dict is None:
            raise InvalidDocumentError(f"job {job_id}: a DONE job needs a result_dict")
        result = _result_doc(result_dict, cfg, job_id, sign)
    lease_at = _record_finish(store, lease_at, job_id, status_doc)  # first: a sweep can finish
    if result is not None:
        path, doc_id = locate(layout, "result", display_name, job_id=job_id)
        try:
            store["upload"](path, doc_id, result)
        except AlreadyExistsError:  # a re-run after a crash or a requeue: latest wins
            store["update"](path, doc_id, result)
    _close(store, lease_at, display_name, job_id, status_doc)


# Results ---------------------------------------------------------------------


_UNFINISHED = ("INITIALIZING", "QUEUED")


def _unfinished_status(store: Storage, display_name: str, job_id: str) -> str | None:
    """A job's status value, or None when it has no readable status."""
    status = _status_doc(store, display_name, job_id)
    try:  # only a valid status document counts
        return None if status is None else from_doc(status, StatusMsg).status
    except InvalidDocumentError:
        return None


def upload_result(
    store: Storage,
    result_dict: ResultLike,
    display_name: str,
    job_id: str,
    private_jwk: KeyLike | None = None,
) -> bool:
    """Upload a job's result, signed when the backend's configuration says so.

    A result whose ``job_id`` differs from *job_id* is corrected, with a warning.

    Returns:
        True, as sqooler does.

    Raises:
        AlreadyExistsError: the job has a result already.
        BadSignatureError: the backend signs and no valid private key was given.
        NotFoundError: the backend has no configuration.
    """
    check_handle(store)
    path, doc_id = locate(
        store["layout"], "result", display_name, job_id=check_name(job_id, "job_id")
    )
    cfg = get_config(store, display_name)
    sign = _backend_signer(store, cfg, private_jwk)
    store["upload"](path, doc_id, _result_doc(result_dict, cfg, job_id, sign))
    return True


def _result_doc(
    result: Any, cfg: BackendConfig, job_id: str, sign: Callable[[Doc], Doc] | None
) -> Doc:
    res = _coerce(result, ResultDict, "result_dict")
    if res.job_id != job_id:
        warnings.warn(f"result for job {job_id} carried job_id {res.job_id!r}", stacklevel=3)
        res = attrs.evolve(res, job_id=job_id)
    if not cfg.sign:
        return to_doc(res)
    if sign is None:
        raise BadSignatureError(f"backend {cfg.display_name!r} signs, but no private_jwk was given")
    return sign(to_doc(res))


@_reads
def get_result(store: Storage, display_name: str, username: str, job_id: str) -> ResultDict:
    """Return a job's result, with ``backend_name`` filled in.

    A job without a result answers with a result of ``success=False`` and no
    experiments whose ``status`` is the job's: ``"INITIALIZING"`` or
    ``"QUEUED"`` while it waits or runs (one more read, of its status), and
    ``"ERROR"`` when it failed or is unknown, as in sqooler.  The signature is
    not checked here: use `verify_result`.

    Raises:
        InvalidDocumentError: the stored result is malformed.
        NotFoundError: the backend has no configuration, or a name given cannot
            exist (the message says which and why).
    """
    check_handle(store)
    check_name(username, "username")
    path, doc_id = locate(
        store["layout"], "result", display_name, job_id=check_name(job_id, "job_id")
    )
    raw: Doc | None = None
    with contextlib.suppress(NotFoundError):
        raw = _read(store, path, doc_id)
    if raw is None:
        status = _unfinished_status(store, display_name, job_id)
        if status == "DONE":  # it finished between the two reads
            with contextlib.suppress(NotFoundError):
                raw = _read(store, path, doc_id)
        if raw is None:
            return ResultDict(
                display_name=display_name,
                backend_version="",
                job_id=job_id,
                status=status if status in _UNFINISHED else "ERROR",
                success=False,
            )
    result = _parse(raw, ResultDict, f"{path}/{doc_id}")
    cfg = get_config(store, display_name)
    name = _long_backend_name(store["name"], cfg.display_name, cfg.simulator)
    return attrs.evolve(result, backend_name=name)


@_reads
def verify_result(
    store: Storage, display_name: str, job_id: str, *, public_jwk: KeyLike | None = None
) -> bool:
    """Return whether a job's result carries a valid signature of the backend's key.

    An unsigned or tampered result gives False, and so does a genuine result of
    another job or backend put in this one's place: the signed payload must name
    *job_id* (and *display_name*, where it names a backend).

    The key is the one published now: each call reads the backend's config (for
    its kid) and the key under that kid.  So a key replaced under its kid
    (sqooler 0.9 replaces a published key, e.g. after a leak) or a config that
    names a new kid counts from the next call, on this handle as on a new one,
    and what the old key signs no longer verifies.  No key is kept from one
    call to the next: a kid names whatever key is published under it (sqooler
    lets the kid be any name, even another key's thumbprint), and a handle has
    no cheaper way than reading the key to learn that it was replaced.  Only
    PyNaCl's key object is kept, in a small cache keyed by the key's 32 bytes:
    it cannot answer for another key.  A frontend that trusts a key it
    fetched once (`get_public_key`) may pass it as *public_jwk*: it is then
    used as given, and neither the config nor the key is read.

    Raises:
        NotFinishedError: the job has no result yet: it is queued or running.
        NotFoundError: no such result, the backend or its public key is missing, or
            a name given cannot exist.
        InvalidDocumentError: the stored result is not JSON.
    """
    check_handle(store)
    path, doc_id = locate(
        store["layout"], "result", display_name, job_id=check_name(job_id, "job_id")
    )
    try:
        raw = _read(store, path, doc_id)
    except NotFoundError as exc:
        status = _unfinished_status(store, display_name, job_id)
        if status is None or status not in _UNFINISHED:
            raise
        raise NotFinishedError(
            f"{path}/{doc_id}: job {job_id} has no result yet (status {status})", status
        ) from exc
    if public_jwk is None:
        key = get_public_key_from_kid(store, _config_kid(store, display_name))
    else:
        key = _coerce(public_jwk, JWK, "public_jwk")
    try:  # verify_doc(raw, [key]), without coercing a list of keys
        payload, kid, signing_input, signature = _signed_parts(raw)
    except (BadSignatureError, InvalidDocumentError):
        return False
    return (
        kid in (None, key.kid)
        and _ed25519_verify(key, signing_input, signature)
        and payload.get("job_id") == job_id
        and payload.get("display_name", display_name) == display_name
    )


@_reads
def verify_job(store: Storage, display_name: str, username: str, job_id: str) -> bool:
    """Return whether a finished job verifies end to end, from submission to result.

    The job (wherever it is now) must carry a valid signature of a published
    user key (see ``upload_job(..., private_jwk=)``) over this job of
    *username* on *display_name*, and its result must be signed by the backend
    and name this job (`verify_result`).  Unsigned, tampered or replayed
    documents give False.

    Raises:
        NotFoundError: no such job or result, or the backend's public key is
            missing, or a name given cannot exist.
        InvalidDocumentError: the stored job or result is not JSON.
    """
    check_handle(store)
    _check_job_names(store, display_name, username, job_id)
    layout = store["layout"]
    where = _find_job(store, display_name, job_id)
    job = get_job(store, locate(layout, where, display_name, job_id=job_id)[0], job_id)
    if _job_signature_problem(store, display_name, username, job_id, job):
        return False
    return verify_result(store, display_name, job_id)


# Status ----------------------------------------------------------------------


def upload_status(
    store: Storage,
    display_name: str,
    username: str,
    job_id: str,
    private_jwk: KeyLike | None = None,
) -> StatusMsg:
    """Create a job's first status (INITIALIZING), signed when the backend signs.

    The backend's config is read first, as sqooler does, so that a frontend's
    job for an unknown backend fails here: one read, which signing needs anyway.

    Raises:
        AlreadyExistsError: the job has a status already.
        BadSignatureError: the backend signs and *private_jwk* is not its key.
        InvalidNameError: bad display name, username or job id.
        NotFoundError: the backend has no configuration.
    """
    check_handle(store)
    job_id = check_name(job_id, "job_id")
    path, doc_id = locate(store["layout"], "status", display_name, username, job_id)
    sign = _backend_signer(store, _read_config(store, display_name)[1], private_jwk)
    status = StatusMsg(job_id, "INITIALIZING", "Got your json.", "None")
    doc = to_doc(status)
    store["upload"](path, doc_id, doc if sign is None else sign(doc))
    return status


@_reads
def get_status(store: Storage, display_name: str, username: str, job_id: str) -> StatusMsg:
    """Return a job's status; an ERROR status that says so when there is none.

    Raises:
        InvalidDocumentError: the stored status is malformed.
        NotFoundError: a name given cannot exist (the message says which and why).
    """
    check_handle(store)
    job_id = check_name(job_id, "job_id")
    path, doc_id = locate(store["layout"], "status", display_name, username, job_id)
    try:
        raw = _read(store, path, doc_id)
    except NotFoundError:
        return StatusMsg(
            job_id, "ERROR", "Could not find the status file.", f"Missing status file for {job_id}."
        )
    return _parse(raw, StatusMsg, f"{path}/{doc_id}")


# Keys ------------------------------------------------------------------------


def upload_public_key(
    store: Storage, public_jwk: KeyLike, display_name: str, role: str = "backend"
) -> None:
    """Publish a public key under its ``kid``: a backend's (after `upload_config`) or a user's.

    A backend's key must carry the kid its config names.  A user's key
    (``role="user"``, as sqooler after 0.9 has it) needs no config: *display_name*
    is then its owner's name, and the key goes, in the same form, to a folder of
    its own (``<public_keys>/users``; `get_public_key_from_kid` with
    ``role="user"`` reads it), so that no user can take a backend's kid.
    Publishing the same key again is a no-op; a different key for a published
    ``kid`` is refused (sqooler would silently replace it).

    Raises:
        AlreadyExistsError: another key is published under that kid.
        BadSignatureError: the key is private, not for verifying, or (a backend's)
            not the config's kid.
        InvalidNameError: bad display name (or user name) or kid.
        NotFoundError: a backend's key, and the backend has no configuration.
        ValueError: *role* is neither ``"backend"`` nor ``"user"``.
    """
    check_handle(store)
    _key_folder(store, role)
    key = _coerce(public_jwk, JWK, "public_jwk")
    if key.key_ops != "verify" or key.d is not None:
        raise BadSignatureError(f"JWK {key.kid!r} is not a public key for verifying")
    _key_bytes(key, "x")
    if role == "user":
        check_name(display_name, "username")
    else:
        cfg = _read_config(store, display_name)[1]
        if key.kid != cfg.kid:
            raise BadSignatureError(
                f"JWK kid {key.kid!r} is not the kid {cfg.kid!r} of backend {display_name!r}"
            )
    folder = _key_folder(store, role)
    try:
        store["upload"](folder, check_name(key.kid, "kid"), to_doc(key))
    except AlreadyExistsError:
        old = get_public_key_from_kid(store, key.kid, role)
        if _key_bytes(old, "x") != _key_bytes(key, "x"):
            raise AlreadyExistsError(
                f"{folder}/{key.kid}: another public key is published for kid {key.kid!r}"
            ) from None


def _key_folder(store: Storage, role: str) -> str:
    """Where the public keys of backends, or of users (``role="user"``), are published."""
    if role not in ("backend", "user"):
        raise ValueError(f"role must be 'backend' or 'user', not {role!r}")
    return locate(store["layout"], "public_key" if role == "backend" else "user_key")[0]


@_reads
def get_public_key_from_kid(store: Storage, kid: str, role: str = "backend") -> JWK:
    """Return the public key published under *kid*, a backend's or (``role="user"``) a user's.

    Raises:
        NotFoundError: no key under that kid, or no such kid can exist.
        InvalidDocumentError: the stored key is malformed.
        ValueError: *role* is neither ``"backend"`` nor ``"user"``.
    """
    check_handle(store)
    folder = _key_folder(store, role)
    return from_doc(_read(store, folder, check_name(kid, "kid")), JWK, where=f"{folder}/{kid}")


@_reads
def get_public_key(store: Storage, display_name: str) -> JWK:
    """Return the public key of a backend (the one named by its config's ``kid``).

    Raises:
        NotFoundError: no config, no kid in it, no key under that kid, or
            *display_name* cannot be a backend's.
    """
    check_handle(store)
    return get_public_key_from_kid(store, _config_kid(store, display_name))


# Retention and queue insight -------------------------------------------------
# A job's submission time is read from its id (see `new_job_id`, `_submitted_at`),
# its finish from ``finished_at`` in its final status (a field sqooler's readers ignore).


_YEAR = 366 * 86_400.0


def _finish_time(status: Doc) -> float | None:
    """The Unix time at which a status document says its job finished; None if it does not."""
    try:
        return _parse_datetime(status.get("finished_at"), datetime).timestamp()
    except ValueError:
        return None


def _submitted_at(layout: Layout, job_id: str) -> float | None:
    """When a job was submitted, as its id says (see `new_job_id`); None if it does not.

    A 24-hex id gives its first 8 hex digits as seconds (as a MongoDB ObjectId does)
    and the next 8 as nanoseconds when they can be; a dated id its UTC date and time
    and microseconds.  Ids made at random (sqooler's on a directory or MongoDB) give
    a time too, but an arbitrary one: callers ignore times that cannot be right.

    >>> _submitted_at(LOCAL_LAYOUT, '6553f100075bcd15abcdef01')
    1700000000.1234567
    >>> _submitted_at(DROPBOX_LAYOUT, '20231114_221320-sim-alice-1e240')
    1700000000.123456
    """
    if _OBJECT_ID_RE.fullmatch(job_id):
        nanos = int(job_id[8:16], 16)
        return int(job_id[:8], 16) + (nanos / 1e9 if nanos < 1_000_000_000 else 0.0)
    parts = job_id.split("-")
    if len(parts) != 4 or re.fullmatch(r"[0-9a-f]{5}", parts[3]) is None:
        return None
    try:
        stamp = datetime.strptime(parts[0], "%Y%m%d_%H%M%S").replace(tzinfo=timezone.utc)
    except ValueError:
        return None
    return stamp.timestamp() + int(parts[3], 16) / 1e6


def _plausible(seconds: float) -> bool:
    """Whether a time span between two events can be real (clocks may differ by a skew)."""
    return -DEFAULT_SKEW <= seconds <= _YEAR


def _status_ids(store: Storage, display_name: str) -> list[str]:
    """The job ids with a status of a backend (one listing)."""
    layout = store["layout"]
    found = (
        job_id_from(layout, "status", name)
        for name in store["list"](locate(layout, "status", display_name)[0])
    )
    return [job_id for job_id in found if job_id is not None]


def prune(
    store: Storage,
    display_name: str,
    older_than: float,
    keep_results: float | None = None,
    *,
    dry_run: bool = False,
    now: Callable[[], float] = time.time,
) -> dict[str, list[str]]:
    """Remove the jobs of a backend that finished (DONE or ERROR) *older_than* seconds ago.

    A job's finish time is the ``finished_at`` of its status, which
    `update_in_database` writes (and `cancel_job` and a claim or sweep that sets a
    job aside or gives it up); a job whose status has none (finished by another
    program, such as sqooler) is left alone.  For each job old enough, in this
    order: a DONE status is first replaced by an ERROR one saying the job was
    removed, so that no status ever promises a result that is gone; then go its
    submit tokens, its result, its job document (with its signature and any
    cancel request), and last its status.  So a prune
    stopped at any point is finished by running it again (the status is how it
    finds the job).  With *keep_results* (seconds, at least *older_than*), jobs
    finished between *older_than* and *keep_results* ago lose only their job
    document (the input) and keep their status, result and tokens.  A queued or
    running job is never touched, nor a job that has a lease (a worker is still
    finishing it, or a sweep must complete its finish).  With *dry_run*, nothing
    is written and the report says what would be removed.  Cost: one listing of
    the statuses, one read of each status old enough by its job id, and a few
    reads per job old enough (its lease, where the job is, its tokens once).

    Returns:
        ``{"jobs": [job ids], "statuses": [job ids], "results": [job ids],
        "tokens": [tokens]}``: what was (or would be) removed.

    Raises:
        InvalidNameError: bad display name.
        ValueError: *older_than* is negative, or *keep_results* is less than it.
    """
    check_handle(store)
    check_display_name(display_name)
    if not isinstance(older_than, (int, float)) or not older_than >= 0:
        raise ValueError(f"older_than must be a number of seconds >= 0, not {older_than!r}")
    keep = older_than if keep_results is None else keep_results
    if not isinstance(keep, (int, float)) or not keep >= older_than:
        raise ValueError(f"keep_results must be at least older_than, not {keep_results!r}")
    layout, current = store["layout"], now()
    report: dict[str, list[str]] = {"jobs": [], "statuses": [], "results": [], "tokens": []}
    tokens: dict[str, list[str]] | None = None

    def remove(kind: str, name: str, path: str, doc_id: str) -> None:
        try:
            if dry_run:
                if not is_stored(store, path, doc_id):
                    return
            else:
                store["delete"](path, doc_id)
        except NotFoundError:
            return
        report[kind].append(name)

    for job_id in _status_ids(store, display_name):
        submitted = _submitted_at(layout, job_id)
        if submitted is not None and 0 <= current - submitted < older_than:
            continue  # submitted too recently to have finished long enough ago
        try:
            status = _status_doc(store, display_name, job_id) or {}
            at = _finish_time(status)
            if at is None or at > current - older_than or status.get("status") not in STATUSES:
                continue
            status_at = locate(store["layout"], "status", display_name, job_id=job_id)
            if _lease_at(store, job_id) is not None:
                continue  # a finish under way, or one that a sweep must complete
            where = locate_job(store, display_name, job_id)
            if where in ("queued", "running"):
                continue
            everything = at <= current - keep
            if everything and status.get("status") == "DONE" and not dry_run:
                removed = StatusMsg(job_id, "ERROR", "The job was removed.", "Removed by prune.")
                store["update"](*status_at, _finished_at(to_doc(removed), at))
            if everything:
                if tokens is None:
                    tokens = _tokens_of_jobs(store, display_name)
                for token in tokens.get(job_id, ()):
                    remove(
                        "tokens", token, *locate(layout, "submit_token", display_name, job_id=token)
                    )
                remove("results", job_id, *locate(layout, "result", display_name, job_id=job_id))
            for path, doc_id in (  # what goes with the job, reported with it
                locate(layout, "job_signature", display_name, job_id=job_id),
                locate(layout, "cancel_request", job_id=job_id),
            ):
                if not dry_run:
                    with contextlib.suppress(NotFoundError):
                        store["delete"](path, doc_id)
            if where is not None:
                remove("jobs", job_id, *locate(layout, where, display_name, job_id=job_id))
            if everything:
                remove("statuses", job_id, *status_at)
        except (InvalidDocumentError, InvalidNameError, NotFoundError):
            continue  # this job only: a malformed status or lease, an id that does not fit
    return report


def _tokens_of_jobs(store: Storage, display_name: str) -> dict[str, list[str]]:
    """The submit tokens of a backend, by the job id each names (one read per token)."""
    folder = locate(store["layout"], "submit_token", display_name)[0]
    found: dict[str, list[str]] = {}
    for token in store["list"](folder):
        try:
            job_id = _token_fields(store["get"](folder, token), f"{folder}/{token}")[0]
        except (NotFoundError, InvalidDocumentError):
            continue
        found.setdefault(job_id, []).append(token)
    return found


@_reads
def queue_stats(
    store: Storage,
    display_name: str,
    *,
    policy: LeasePolicy = LeasePolicy(),
    known: dict[str, Doc] | None = None,
    now: Callable[[], float] = time.time,
) -> QueueStats:
    """Return the state of a backend's queue now.

    Queued jobs are counted from the queue's listing, and the oldest one's age is
    read from the job ids (an id that gives no believable time, such as
    sqooler's random ones, counts in the number but not in the age).  Running
    jobs are those whose lease is held (one read per lease, of any backend); a
    lease's age assumes the workers' lease length ``policy.lease_seconds``.  Finished
    (DONE) and failed (ERROR) jobs are counted from their statuses (one listing,
    and one read per status of a job neither queued nor running); jobs/hour over
    the last hour and the last day, and the median seconds from submission (the
    job id's time) to DONE, from the ``finished_at`` of those statuses, which
    sqstore writes into every final status: jobs finished by other programs count, but are
    not timed.  *known*, a dict kept between calls (``sqstore stats --watch``
    does), holds the final statuses read, so that they are read only once.

    Raises:
        NotFoundError: the backend has no configuration.
    """
    check_handle(store)
    get_config(store, display_name)
    layout, current, lease_seconds = store["layout"], now(), policy.lease_seconds
    known = {} if known is None else known
    queued = [
        _job_id_of(layout, name)
        for name in store["list"](locate(layout, "queued", display_name)[0])
    ]
    ages = []
    for job_id in queued:
        submitted = _submitted_at(layout, job_id)
        if submitted is not None and _plausible(current - submitted):
            ages.append(max(current - submitted, 0.0))
    running = []
    for job_id in store["list"](layout.leases):
        try:
            found = _lease_at(store, job_id)
        except SqstoreError:
            continue  # garbage in place of a lease: not a running job here
        if found is not None and found[1].display_name == display_name and found[1].holder:
            lease = found[1]
            age, left = current - (lease.expires - lease_seconds), lease.expires - current
            running.append(RunningJob(job_id, lease.holder, age, left, lease.attempts))
    busy = {*queued, *(r.job_id for r in running)}
    finishes: list[tuple[str, float | None, float | None]] = []  # status, finished, waited
    for job_id in _status_ids(store, display_name):
        if job_id in busy:
            continue
        status = known.get(job_id)
        if status is None:
            status = _final_status(store, display_name, job_id)
            if status is None:
                continue  # not final (read again next time), or none
            known[job_id] = status
        at, submitted = _finish_time(status), _submitted_at(layout, job_id)
        waited = None if at is None or submitted is None else at - submitted
        finishes.append((str(status.get("status")), at, waited))
    waits = [max(w, 0.0) for s, _, w in finishes if s == "DONE" and w is not None and _plausible(w)]
    hour = sum(1 for _, at, _ in finishes if at is not None and current - 3600 < at <= current)
    day = sum(1 for _, at, _ in finishes if at is not None and current - 86_400 < at <= current)
    import statistics

    return QueueStats(
        display_name=display_name,
        queued=len(queued),
        oldest_queued_age=max(ages, default=None),
        running=tuple(running),
        finished=sum(s == "DONE" for s, _, _ in finishes),
        failed=sum(s == "ERROR" for s, _, _ in finishes),
        jobs_per_hour_last_hour=float(hour),
        jobs_per_hour_last_day=day / 24,
        median_seconds_to_done=statistics.median(waits) if waits else None,
    )


# ============================================================================
# Backends
# ============================================================================


def _check_store_name(name: str) -> str:
    return check_name(name, "storage name", pattern=_STORE_NAME_RE)


def _checked(path: str, doc_id: str) -> str:
    """Validate a folder path and a document id; return ``path/id`` for messages."""
    return f"{_check_path(path)}/{check_name(doc_id, 'id')}"


def _dumps(doc: Any, where: str) -> str:
    if not isinstance(doc, dict):
        raise InvalidDocumentError(f"{where}: a document must be a JSON object")
    try:
        return json.dumps(doc, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidDocumentError(f"{where}: not JSON-serialisable: {exc}") from None
    except RecursionError:
        raise InvalidDocumentError(f"{where}: nested too deeply to write") from None


def _loads(text: str | bytes, where: str) -> Doc:
    doc = _parse_json(text, where)
    if not isinstance(doc, dict):
        raise InvalidDocumentError(f"{where}: not a JSON object")
    return doc


_DATED_ID_RE = re.compile(r"(.*?)([0-9]{8}_[0-9]{6})-.+-([0-9a-f]{5})")


def _in_order(names: Iterable[str]) -> list[str]:
    """*names* oldest first: sorted, except that a dated id (sqooler's Dropbox form,
    ``<prefix><YYYYMMDD_HHMMSS>-<dn>-<user>-<5 hex>``) sorts by its second and then
    its microseconds, not by its user, so that jobs of one second keep their order.

    >>> _in_order(["job-20231114_221320-sim-bob-00002", "job-20231114_221320-sim-alice-00003"])
    ['job-20231114_221320-sim-bob-00002', 'job-20231114_221320-sim-alice-00003']
    """

    def key(name: str) -> tuple[str, str, str, str]:
        dated = _DATED_ID_RE.fullmatch(name)
        return (dated[1], dated[2], dated[3], name) if dated else (name, "", "", name)

    return sorted(names, key=key)


def _walker(list_all: Callable[[str], Iterable[str]]) -> tuple[ListFn, Callable[[str], None]]:
    """``list`` for a backend that lists a whole folder at once (*list_all*, in any
    order): ``list(path)`` is its ids oldest first (`_in_order`), and ``list(path, n)``
    serves the rest of the last listing of *path*, *n* ids at a time (see `Storage`);
    and a function that makes the next step of a folder list it afresh."""
    rests: dict[str, list[str]] = {}  # folder -> the ids not served yet, newest first
    lock = threading.Lock()

    def list_ids(path: str, limit: int | None = None, /) -> list[str]:
        if limit is None:
            return _in_order(list_all(path))
        _check_limit(limit)
        _check_path(path)
        with lock:
            rest = rests.get(path)
            if not rest:
                rest = rests[path] = _in_order(list_all(path))[::-1]
            step = rest[: -limit - 1 : -1]
            del rest[-limit:]
        return step

    def forget(path: str) -> None:
        rests.pop(path, None)

    return list_ids, forget


def _handle(
    name: str,
    layout: Layout,
    upload: Callable[[str, str, Doc], None],
    update: Callable[[str, str, Doc], None],
    get: Callable[[str, str], Doc],
    move: Callable[[str, str, str], Doc | None],
    delete: Callable[[str, str], None],
    list_ids: ListFn,
    swap: Callable[[str, str, Doc, Doc | None], bool],
    forget: Callable[[str], None],
) -> Storage:
    """The handle of a backend's verbs, in `Storage`'s order.  After a move, the walk of
    the target folder (*forget*) starts afresh: a job this handle puts back in a queue
    (a requeue) comes in its next step, in order."""

    @functools.wraps(move)
    def moving(src: str, dst: str, doc_id: str) -> Doc | None:
        moved = move(src, dst, doc_id)
        forget(dst)
        return moved

    return Storage(
        name=name,
        layout=layout,
        upload=upload,
        update=update,
        get=get,
        move=moving,
        delete=delete,
        list=list_ids,
        swap=swap,
    )


def _check_limit(limit: Any) -> None:
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ValueError(f"a list step must be a whole number of at least 1, not {limit!r}")


def memory_storage(name: str = "memory", *, layout: Layout = LOCAL_LAYOUT) -> Storage:
    """Return an in-process store; its state lives in this handle only.

    Documents are kept as JSON text, so a read never aliases a write and a value
    that a real backend could not store is refused here too.  Thread-safe.
    """
    _check_store_name(name)
    folders: dict[str, dict[str, str]] = {}
    lock = threading.Lock()

    def upload(path: str, doc_id: str, doc: Doc) -> None:
        text = _dumps(doc, _checked(path, doc_id))
        with lock:
            folder = folders.setdefault(path, {})
            if doc_id in folder:
                raise AlreadyExistsError(f"{path}/{doc_id} already exists")
            folder[doc_id] = text

    def update(path: str, doc_id: str, doc: Doc) -> None:
        text = _dumps(doc, _checked(path, doc_id))
        with lock:
            if doc_id not in folders.get(path, {}):
                raise NotFoundError(f"{path}/{doc_id} does not exist")
            folders[path][doc_id] = text

    def get(path: str, doc_id: str) -> Doc:
        where = _checked(path, doc_id)
        try:
            text = folders[path][doc_id]
        except KeyError:
            raise NotFoundError(f"{where} does not exist") from None
        return _loads(text, where)

    def move(src: str, dst: str, doc_id: str) -> None:
        _checked(src, doc_id)
        _check_path(dst)
        with lock:
            if doc_id not in folders.get(src, {}):
                raise NotFoundError(f"{src}/{doc_id} does not exist")
            target = folders.setdefault(dst, {})
            if doc_id in target:
                raise AlreadyExistsError(f"{dst}/{doc_id} already exists")
            target[doc_id] = folders[src].pop(doc_id)

    def delete(path: str, doc_id: str) -> None:
        where = _checked(path, doc_id)
        with lock:
            if folders.get(path, {}).pop(doc_id, None) is None:
                raise NotFoundError(f"{where} does not exist")

    def list_all(path: str) -> list[str]:
        _check_path(path)
        with lock:
            return list(folders.get(path, ()))

    def swap(path: str, doc_id: str, old: Doc, new: Doc | None) -> bool:
        where = _checked(path, doc_id)
        text = None if new is None else _dumps(new, where)
        with lock:
            if doc_id not in folders.get(path, {}):
                raise NotFoundError(f"{where} does not exist")
            if _loads(folders[path][doc_id], where) != old:
                return False
            if text is None:
                del folders[path][doc_id]
            else:
                folders[path][doc_id] = text
            return True

    list_ids, forget = _walker(list_all)
    return _handle(name, layout, upload, update, get, move, delete, list_ids, swap, forget)


def _renameat2_noreplace() -> Callable[[int, str, int, str], None] | None:
    """Linux's ``renameat2(..., RENAME_NOREPLACE)`` (through libc), or None elsewhere:
    a create-only rename in one system call, where ``link`` + ``unlink`` take two."""
    if sys.platform != "linux":
        return None
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without it (glibc < 2.28, some musl)
        return None
    renameat2.argtypes = (
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    )
    renameat2.restype = ctypes.c_int

    def rename(source: int, name: str, target: int, new_name: str) -> None:
        if renameat2(source, os.fsencode(name), target, os.fsencode(new_name), 1) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), name)

    return rename


_TEMP_RE = re.compile(rf"\.{_NAME_RE.pattern}\.[0-9]+\.[0-9a-f]{{8}}\.tmp")
"""A temporary file of local_storage: ``.<id>.<pid>.<8 hex>.tmp``."""
_STALE_TEMP_SECONDS = 3600.0  # a temporary file this old has no live writer: list removes it
_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK  # a FIFO must not block a read


def _openat2_beneath() -> Callable[[int, str, int], int] | None:
    """Linux's ``openat2`` (through libc's ``syscall``), or None elsewhere: open a path
    below a folder in one system call that fails (``ELOOP``) if any component of it is
    a symbolic link, where opening one name at a time with ``O_NOFOLLOW`` takes one each."""
    if sys.platform != "linux":
        return None
    import ctypes

    try:
        syscall = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    syscall.restype = ctypes.c_long
    syscall.argtypes = (
        ctypes.c_long,
        ctypes.c_long,
        ctypes.c_char_p,
        ctypes.c_void_p,
        ctypes.c_size_t,
    )
    resolve = 0x04 | 0x08  # RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH
    cloexec = getattr(os, "O_CLOEXEC", 0)
    hows = {  # struct open_how {flags, mode, resolve}, for the two kinds of open made
        flags: (ctypes.c_uint64 * 3)(flags | cloexec, 0, resolve)
        for flags in (_FOLDER_FLAGS, _FILE_FLAGS)
    }

    def open_beneath(folder: int, name: str, flags: int) -> int:
        how = hows.get(flags) or (ctypes.c_uint64 * 3)(flags | cloexec, 0, resolve)
        # SYS_openat2; a name below the root is ASCII (`check_name`, `_check_path`)
        fd = syscall(437, folder, name.encode(), ctypes.addressof(how), 24)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), name)
        return int(fd)

    return open_beneath


def local_storage(
    root: str | os.PathLike[str],
    name: str = "local",
    *,
    layout: Layout = LOCAL_LAYOUT,
    durable: bool = False,
) -> Storage:
    """Return a store in directory *root*, in sqooler's local layout.

    Documents are ``<root>/<path>/<id>.json``, written to a temporary file in the
    same folder and then renamed into place: create-only with one ``renameat2``
    (``RENAME_NOREPLACE``) on Linux, or a ``link`` and an ``unlink`` where the
    system or file system has none; an update with a plain rename.  So a crash
    never leaves a partial document.  ``move`` is one ``rename`` (create-only
    where the system has one): of several racing movers exactly one wins.
    ``list`` sorts ids, which for sqstore's ids is the order of creation.  With
    *durable*, files and folders are fsynced, so a power loss cannot lose a
    write that returned.

    No symbolic link below *root* is ever followed (*root* itself may be one):
    a folder or document below it is opened in one ``openat2`` with
    ``RESOLVE_NO_SYMLINKS`` on Linux, else each folder relative to its parent
    with ``O_NOFOLLOW``, so a link planted in the tree makes the call fail with a
    `StorageError` naming it.
    ``move`` and ``delete`` act on a document that is a link, never on its
    target, so such an entry can be set aside.  A write that does not fit on the
    disk raises `StorageError` and leaves the old document.  ``list`` removes the
    temporary files of killed writers once they are an hour old.
    """
    _check_store_name(name)
    base = os.fspath(root)
    noreplace = _renameat2_noreplace()
    beneath = _openat2_beneath()

    def where(path: str, doc_id: str) -> tuple[str, str]:
        """(file name, 'path/id' for messages), after validating path and id."""
        return f"{doc_id}.json", _checked(path, doc_id)

    def fail(exc: OSError, what: str) -> SqstoreError:
        if exc.errno == errno.ENOENT:
            return NotFoundError(f"{what} does not exist")
        if exc.errno == errno.EEXIST:
            return AlreadyExistsError(f"{what} already exists")
        if exc.errno == errno.ENOSPC:
            return StorageError(f"{what}: no space left on device")
        if exc.errno == errno.EDQUOT:
            return StorageError(f"{what}: no space left on device (disk quota exceeded)")
        return StorageError(f"{what}: {exc.strerror or exc}")

    def symlink(what: str, link: str) -> StorageError:
        return StorageError(
            f"{what}: {link} is a symlink: sqstore never follows links inside its root"
        )

    def open_below(name: str, flags: int) -> int | None:
        """``<root>/<name>`` opened in one ``openat2`` that follows no link, or None
        where that cannot be had (no such call, a link on the way): the caller then
        takes the way that says why, one name at a time.

        Raises:
            FileNotFoundError: a name on the way is missing.
        """
        nonlocal beneath
        if beneath is None:
            return None
        top = os.open(base, _FOLDER_FLAGS)
        try:
            return beneath(top, name, flags)
        except FileNotFoundError:
            raise
        except OSError as exc:
            if exc.errno in (errno.ENOSYS, errno.EPERM, errno.EINVAL):
                beneath = None  # a kernel without it, or a sandbox that refuses it
            return None
        finally:
            os.close(top)

    def open_folder(path: str, what: str, create: bool = False) -> int:
        """Open ``<root>/<path>``, never following a link (in one call where the
        system can, else one name at a time); with *create*, make the folders that
        are missing."""
        try:
            fast = open_below(path, _FOLDER_FLAGS)
        except FileNotFoundError:
            if not create:
                raise
            fast = None
        if fast is not None:
            return fast
        try:
            fd = os.open(base, _FOLDER_FLAGS)
        except FileNotFoundError:
            if not create:
                raise
            os.makedirs(base, exist_ok=True)
            fd = os.open(base, _FOLDER_FLAGS)
        try:
            parts = path.split("/")
            for i, part in enumerate(parts):
                try:
                    sub = os.open(part, _FOLDER_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, dir_fd=fd)
                        if durable:
                            os.fsync(fd)
                    sub = os.open(part, _FOLDER_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
                except OSError as exc:  # Linux says ENOTDIR for a link, BSD EMLINK
                    if exc.errno in (errno.ENOTDIR, errno.ELOOP, errno.EMLINK) and stat.S_ISLNK(
                        os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode
                    ):
                        raise symlink(what, "/".join(parts[: i + 1])) from None
                    raise
                os.close(fd)
                fd = sub
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextlib.contextmanager
    def opened(path: str, what: str, create: bool = False) -> Iterator[int]:
        """The folder *path*, open for the block (see `open_folder`); an `OSError` in
        the block becomes the sqstore error for *what*."""
        try:
            folder = open_folder(path, what, create)
            try:
                yield folder
            finally:
                os.close(folder)
        except SqstoreError:
            raise
        except OSError as exc:
            raise fail(exc, what) from exc

    def exists(folder: int, name: str) -> bool:
        """Whether *name* is in *folder* (a link counts, whatever it points to)."""
        try:
            os.stat(name, dir_fd=folder, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def read(folder: int, name: str, path: str, what: str) -> bytes:
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=folder)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EMLINK):
                raise symlink(what, f"{path}/{name}") from None
            raise
        return read_open(fd, name, path, what)

    def read_open(fd: int, name: str, path: str, what: str) -> bytes:
        """The content of the open file *fd* (``<path>/<name>``), which it closes."""
        try:
            size = os.fstat(fd)
            if not stat.S_ISREG(size.st_mode):
                raise StorageError(f"{what}: {path}/{name} is not a regular file")
            chunks = [os.read(fd, size.st_size + 1)]
            if len(chunks[0]) > size.st_size:  # it grew since: read on to its end
                while chunks[-1]:
                    chunks.append(os.read(fd, 65536))
        finally:
            os.close(fd)
        return b"".join(chunks)

    def write_temp(folder: int, doc_id: str, data: bytes) -> str:
        """Write *data* to a new temporary file in *folder*; return its name."""
        temp = f".{doc_id}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        fd = os.open(temp, flags, 0o644, dir_fd=folder)
        try:
            written = os.write(fd, data)
            while written < len(data):  # a short write: the disk is (nearly) full
                more = os.write(fd, data[written:])
                if not more:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                written += more
            if durable:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(temp, dir_fd=folder)
            raise
        os.close(fd)
        return temp

    def replace(folder: int, doc_id: str, name: str, data: bytes) -> None:
        temp = write_temp(folder, doc_id, data)
        try:
            os.replace(temp, name, src_dir_fd=folder, dst_dir_fd=folder)
        except BaseException:
            os.unlink(temp, dir_fd=folder)
            raise
        if durable:
            os.fsync(folder)

    def rename_new(source: int, name: str, target: int, new_name: str) -> bool:
        """Rename unless *new_name* exists (`FileExistsError`), in one ``renameat2``
        with ``RENAME_NOREPLACE``; False (nothing done) where there is none."""
        nonlocal noreplace
        if noreplace is None:
            return False
        try:
            noreplace(source, name, target, new_name)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            noreplace = None  # this file system has no create-only rename
            return False
        return True

    def upload(path: str, doc_id: str, doc: Doc) -> None:
        file, what = where(path, doc_id)
        data = _dumps(doc, what).encode()
        with opened(path, what, create=True) as folder:
            temp = write_temp(folder, doc_id, data)
            try:
                renamed = rename_new(folder, temp, folder, file)
            except BaseException:
                os.unlink(temp, dir_fd=folder)
                raise
            if not renamed:
                try:
                    os.link(temp, file, src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=False)
                finally:
                    os.unlink(temp, dir_fd=folder)
            if durable:
                os.fsync(folder)

    def update(path: str, doc_id: str, doc: Doc) -> None:
        file, what = where(path, doc_id)
        data = _dumps(doc, what).encode()
        with opened(path, what) as folder:
            if stat.S_ISLNK(os.stat(file, dir_fd=folder, follow_symlinks=False).st_mode):
                raise symlink(what, f"{path}/{file}")
            replace(folder, doc_id, file, data)

    def get(path: str, doc_id: str) -> Doc:
        file, what = where(path, doc_id)
        try:
            fd = open_below(f"{path}/{file}", _FILE_FLAGS)
            data = None if fd is None else read_open(fd, file, path, what)
        except OSError as exc:
            raise fail(exc, what) from exc
        if data is not None:
            return _loads(data, what)
        with opened(path, what) as folder:
            data = read(folder, file, path, what)
        return _loads(data, what)

    def move(src: str, dst: str, doc_id: str) -> None:
        file, what = where(src, doc_id)
        _, target_what = where(dst, doc_id)
        with opened(src, what) as source:
            try:
                target = open_folder(dst, target_what)
            except FileNotFoundError:
                if not exists(source, file):
                    raise NotFoundError(f"{what} does not exist") from None
                target = open_folder(dst, target_what, create=True)
            try:
                try:
                    renamed = rename_new(source, file, target, file)
                except FileExistsError:
                    renamed = False
                if not renamed:
                    if exists(target, file):
                        if not exists(source, file):
                            raise NotFoundError(f"{what} does not exist")
                        raise AlreadyExistsError(f"{target_what} already exists")
                    os.rename(file, file, src_dir_fd=source, dst_dir_fd=target)
                if durable:
                    os.fsync(target)
                    os.fsync(source)
            finally:
                os.close(target)

    def delete(path: str, doc_id: str) -> None:
        file, what = where(path, doc_id)
        with opened(path, what) as folder:
            os.unlink(file, dir_fd=folder)
            if durable:
                os.fsync(folder)

    def sweep(folder: int, temp: str) -> None:
        """Remove the temporary file *temp* if it is so old that no writer is left."""
        try:
            info = os.stat(temp, dir_fd=folder, follow_symlinks=False)
            if stat.S_ISREG(info.st_mode) and time.time() - info.st_mtime > _STALE_TEMP_SECONDS:
                os.unlink(temp, dir_fd=folder)
        except OSError:
            pass  # removed by another lister, or a read-only storage: nothing to do

    def list_all(path: str) -> list[str]:
        ids = []
        try:
            with opened(_check_path(path), path) as folder:
                for entry in os.listdir(folder):
                    if entry.endswith(".json"):
                        if _NAME_RE.fullmatch(entry[:-5]):
                            ids.append(entry[:-5])
                    elif entry.endswith(".tmp") and _TEMP_RE.fullmatch(entry):
                        sweep(folder, entry)
        except NotFoundError:
            return []
        return ids

    def swap(path: str, doc_id: str, old: Doc, new: Doc | None) -> bool:
        """Under an exclusive ``flock`` of the folder's ``.sqstore.lock`` (released
        by the kernel when a holder dies): read, compare, then replace or unlink."""
        import fcntl

        file, what = where(path, doc_id)
        data = None if new is None else _dumps(new, what).encode()
        with opened(path, what) as folder:
            lock_flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
            try:
                lock = os.open(".sqstore.lock", lock_flags, 0o644, dir_fd=folder)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.EMLINK):
                    raise symlink(what, f"{path}/.sqstore.lock") from None
                raise
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if _loads(read(folder, file, path, what), what) != old:
                    return False
                if data is None:
                    os.unlink(file, dir_fd=folder)
                    if durable:
                        os.fsync(folder)
                else:
                    replace(folder, doc_id, file, data)
                return True
            finally:
                os.close(lock)  # closing the descriptor releases the lock

    list_ids, forget = _walker(list_all)
    return _handle(name, layout, upload, update, get, move, delete, list_ids, swap, forget)


_MONGO_SEGMENT_RE = re.compile(r"[A-Za-z0-9_-]{1,63}")
_MONGO_LIST_STEP = 64  # ids read at once by a step of list(path, n): fresh enough, few commands
_MONGO_NAME_FIELD = "_sqstore_name"  # names a keyed document that carries no name of its own


def _plain(value: Any, where: str) -> Any:
    """A BSON value as JSON: dates as ISO text (UTC), bytes as ASCII text.

    Raises:
        InvalidDocumentError: a value JSON cannot hold (NaN, infinities, other BSON
            types), or nesting too deep to read, as on every other backend.
    """
    try:
        return _plain_value(value, where)
    except RecursionError:
        raise InvalidDocumentError(f"{where}: nested too deeply to read") from None


def _plain_value(value: Any, where: str) -> Any:
    if isinstance(value, dict):
        plain = {}
        for key, item in value.items():  # a loop, not a comprehension: one frame per level
            plain[key] = _plain_value(item, where)
        return plain
    if isinstance(value, list):
        items = []
        for item in value:
            items.append(_plain_value(item, where))
        return items
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidDocumentError(f"{where}: {value} is not a JSON number")
    if value is None or isinstance(value, (str, int, float)):
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):  # sqooler stores a public key's x as BSON binary
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            pass
    raise InvalidDocumentError(f"{where}: {type(value).__name__} is not a JSON value")


def _plain_field(doc: Mapping[str, Any], dotted: str) -> Any:
    """The value at a dotted path of a document, or None."""
    value: Any = doc
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def mongodb_storage(
    uri_or_client: Any,
    name: str = "mongodb",
    *,
    layout: Layout = LOCAL_LAYOUT,
    timeout: float = 10.0,
    create_indexes: bool = True,
    retries: int = 3,
) -> Storage:
    """Return a store in a MongoDB deployment, in sqooler's MongoDB layout.

    A folder's first segment is the database and the rest, joined by ``.``, the
    collection (``jobs/queued/sim`` is collection ``queued.sim`` of database
    ``jobs``); a document's ``_id`` is ``ObjectId(id)`` for 24-hex ids (sqstore's
    and sqooler's job ids) and the id itself otherwise.  Configs and public keys
    are found, as sqooler finds them, by ``display_name`` (``payload.display_name``
    when signed) and by ``kid``; sqstore writes them under an ``_id`` derived from
    the name, so two racing uploads cannot both create one.

    Needs no transactions: ``upload`` is an insert (a duplicate ``_id`` fails);
    ``swap`` is one replace or delete whose filter matches the document only if
    it is exactly the old one (read first only when it is not); ``move`` into
    the running folder reads the source, inserts it into the target, then
    deletes the source, and returns the document it read (a claim needs no
    second read); a ``move`` into any other folder copies on the server (an
    aggregate ``$merge`` that only inserts) and then deletes the source, and
    says `NotFoundError` if the delete finds nothing.  Who wins a race to move
    one document into running:

    - the insert succeeds and the delete deletes: this mover;
    - the insert finds the same document there already (left by a move that
      stopped half-way, or by a racer): the delete decides; if it finds nothing,
      `NotFoundError`, and the copy is left to the one who made it;
    - the insert succeeds and the delete finds nothing: into the running folder
      (a claim), this mover, because the other was a sqooler 0.9 mover, which
      finds, deletes, then inserts, so its insert into running is bound to fail
      (sqstore's claims never race each other: the lease decides first), unless
      the job has a result already: then the sqooler mover won, ran the job and
      moved it on before this insert, which was of a stale copy, and the copy is
      deleted again; into any other folder, `NotFoundError`, and this mover's
      copy stays behind.

    A command whose answer is lost (the connection fails after the server may
    have acted) is sent again, up to *retries* times, then `TransientError`; a
    write that finds its own effect already applied counts as done: an upload
    that finds the same document there, a delete (and a move's delete) that
    finds nothing, an update (a replacement) in any case, a swap that finds the
    new document (or nothing, for a delete); a move's insert that finds the same
    document there lets the delete decide, as above.

    Give a ``mongodb://`` or ``mongodb+srv://`` URI or a ``pymongo.MongoClient``.
    A URI that names a database (``mongodb://host/mydb``) is refused: the
    databases are those of the layout, as sqooler's are, and ``?authSource=``
    says which one to log in against.
    *timeout* (seconds) bounds finding a server and connecting, unless the URI
    sets ``serverSelectionTimeoutMS`` or ``connectTimeoutMS`` itself.  With
    *create_indexes*, the indexes that find configs and keys are made
    (idempotently) now.

    Raises:
        SqstoreError: the ``pymongo`` package is not installed.
        TransientError: the server cannot be reached (when creating indexes).
        ValueError: a malformed URI, or one that names a database.
    """
    _check_store_name(name)
    try:
        import hashlib

        import pymongo  # type: ignore[import-not-found, import-untyped, unused-ignore]
        from bson import ObjectId  # type: ignore[import-not-found, import-untyped, unused-ignore]
        from bson.codec_options import CodecOptions  # type: ignore[import-not-found, import-untyped, unused-ignore]
        from bson.errors import InvalidBSON, InvalidDocument  # type: ignore[import-not-found, import-untyped, unused-ignore]
        from pymongo import errors  # type: ignore[import-not-found, import-untyped, unused-ignore]
    except ImportError as exc:
        raise SqstoreError(
            "mongodb_storage needs pymongo: pip install 'pymongo>=4.3' "
            "(or '.[mongodb]' in sqstore's checkout)"
        ) from exc
    client: Any = uri_or_client
    if isinstance(uri_or_client, str):
        _refuse_mongodb_database(uri_or_client)
        try:
            given = uri_or_client.lower()  # options in the URI win over *timeout*
            timeouts: dict[str, Any] = {
                option: int(timeout * 1000)
                for option in ("serverSelectionTimeoutMS", "connectTimeoutMS")
                if f"{option.lower()}=" not in given
            }
            client = pymongo.MongoClient(uri_or_client, **timeouts)
        except (errors.ConfigurationError, ValueError) as exc:
            info = _userinfo(uri_or_client.partition("://")[2])[0] or ""
            user, colon, password = info.partition(":")
            secret = password if colon else user  # as redact_url hides it
            message = str(exc).replace(secret, "***") if secret else str(exc)
            raise ValueError(f"mongodb_storage: bad MongoDB URI: {message}") from None
    codecs: Any = CodecOptions(tz_aware=True, tzinfo=timezone.utc)
    keyed = {layout.configs: ("display_name", "payload.display_name"), layout.public_keys: ("kid",)}
    collections: dict[str, Any] = {}

    def collection(path: str) -> Any:
        """The collection of folder *path*, after checking that it is one."""
        found = collections.get(path)
        if found is None:
            database, *rest = _check_path(path).split("/")
            if not rest or not all(map(_MONGO_SEGMENT_RE.fullmatch, (database, *rest))):
                raise InvalidNameError(
                    f"invalid MongoDB folder {path!r}: use database/collection[/...], "
                    "each part of letters, digits, '_' and '-'"
                )
            found = client.get_database(database, codec_options=codecs)[".".join(rest)]
            collections[path] = found
        return found

    def derived_id(path: str, doc_id: str) -> Any:
        return ObjectId(hashlib.sha256(f"{path}/{doc_id}".encode()).digest()[:12])

    def new_id(path: str, doc_id: str) -> Any:
        if path in keyed:
            return derived_id(path, doc_id)
        return ObjectId(doc_id) if _OBJECT_ID_RE.fullmatch(doc_id) else doc_id

    def key(path: str, doc_id: str) -> dict[str, Any]:
        """The query that finds document *doc_id* of *path* (names are checked first)."""
        _checked(path, doc_id)
        if path in keyed:
            fields = (*keyed[path], _MONGO_NAME_FIELD)
            return {"$or": [{"_id": derived_id(path, doc_id)}, *({f: doc_id} for f in fields)]}
        return {"_id": new_id(path, doc_id)}

    def stored(path: str, doc_id: str, doc: Doc) -> Doc:
        """*doc* as inserted: with its ``_id`` and, if a keyed one has no name, a name."""
        _dumps(doc, f"{path}/{doc_id}")  # the same JSON rules as every other backend
        body = {"_id": new_id(path, doc_id), **doc}
        if path in keyed and doc_id not in (_plain_field(doc, field) for field in keyed[path]):
            body[_MONGO_NAME_FIELD] = doc_id
        return body

    def call(what: str, request: Callable[[], T]) -> T:
        try:
            return request()
        except errors.DuplicateKeyError as exc:
            raise AlreadyExistsError(f"{what} already exists") from exc
        except errors.DocumentTooLarge as exc:
            raise InvalidDocumentError(
                f"{what}: larger than MongoDB's 16 MiB document limit; not sent"
            ) from exc
        except (InvalidDocument, OverflowError) as exc:
            raise InvalidDocumentError(f"{what}: MongoDB cannot store it: {exc}") from exc
        except (InvalidBSON, RecursionError) as exc:  # e.g. nested too deeply to decode
            raise InvalidDocumentError(f"{what}: cannot read it: {exc}") from exc
        except (errors.ConnectionFailure, errors.ExecutionTimeout, errors.WTimeoutError) as exc:
            raise TransientError(
                f"{what}: cannot reach MongoDB or it timed out ({type(exc).__name__})"
            ) from exc
        except errors.OperationFailure as exc:
            message = (exc.details or {}).get("errmsg") or str(exc)
            if exc.code in (13, 18):  # Unauthorized, AuthenticationFailed
                raise CredentialsError(
                    f"{what}: MongoDB refused the credentials ({message}): check the "
                    "user name, password and roles in the URI"
                ) from exc
            if isinstance(exc, errors.WriteError):
                raise InvalidDocumentError(f"{what}: MongoDB refused it: {message}") from exc
            raise StorageError(f"{what}: MongoDB said: {message}") from exc
        except errors.PyMongoError as exc:
            raise StorageError(f"{what}: {type(exc).__name__}: {exc}") from exc

    def send(request: Callable[[], T], again: Callable[[], T] | None = None) -> T:
        """*request*; after a failed connection, *again* (or *request*) up to *retries* times."""
        for attempt in range(retries + 1):
            try:
                return request() if attempt == 0 or again is None else again()
            except errors.ConnectionFailure:
                if attempt == retries:
                    raise
                time.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def read(path: str, doc_id: str, found: Any) -> Doc:
        what = f"{path}/{doc_id}"
        if found is None:
            raise NotFoundError(f"{what} does not exist")
        found.pop("_id", None)
        if path in keyed:
            found.pop(_MONGO_NAME_FIELD, None)
        return cast(Doc, _plain(found, what))

    def upload(path: str, doc_id: str, doc: Doc) -> None:
        what, query, body = f"{path}/{doc_id}", key(path, doc_id), stored(path, doc_id, doc)
        target = collection(path)
        if path in keyed and call(what, lambda: send(lambda: target.find_one(query, {"_id": 1}))):
            raise AlreadyExistsError(f"{what} already exists")  # written by sqooler

        def again() -> None:  # the first insert may have been applied
            try:
                target.insert_one(body)
            except errors.DuplicateKeyError:
                if target.find_one({"_id": body["_id"]}) != body:
                    raise

        call(what, lambda: send(lambda: target.insert_one(body) and None, again))

    def update(path: str, doc_id: str, doc: Doc) -> None:
        what, query, body = f"{path}/{doc_id}", key(path, doc_id), stored(path, doc_id, doc)
        del body["_id"]  # a replacement keeps the stored _id (sqooler's random one too)
        result = call(what, lambda: send(lambda: collection(path).replace_one(query, body)))
        if result.matched_count == 0:
            raise NotFoundError(f"{what} does not exist")

    def get(path: str, doc_id: str) -> Doc:
        query = key(path, doc_id)
        found = call(f"{path}/{doc_id}", lambda: send(lambda: collection(path).find_one(query)))
        return read(path, doc_id, found)

    def ran_already(src: str, doc_id: str) -> bool:
        """Whether the job of *doc_id*, claimed from queue *src*, has a result already."""
        prefix, _, suffix = layout.queued.partition("{display_name}")
        if "{username}" in layout.results or not (
            src.startswith(prefix) and src.endswith(suffix) and len(src) > len(prefix + suffix)
        ):
            return False
        display_name = src[len(prefix) : len(src) - len(suffix)]
        job_id = _id_in_file(layout.job_file, doc_id) or doc_id
        path = _fill(layout.results, display_name=display_name)
        result_id = _fill(layout.result_file, display_name=display_name, job_id=job_id)
        query = key(path, result_id)
        return send(lambda: collection(path).find_one(query, {"_id": 1})) is not None

    def copied(src: str, dst: str, doc_id: str) -> bool | None:
        """Copy the document on the server (an aggregate ``$merge`` that inserts only):
        True if no error (copied, or the source was missing), False if the target
        exists, None if this move cannot be done so (other databases, keyed folders,
        a server without ``$merge``)."""
        if src in keyed or dst in keyed or src.split("/")[0] != dst.split("/")[0]:
            return None
        query, target = key(src, doc_id), ".".join(_check_path(dst).split("/")[1:])
        collection(dst)  # checks the folder
        into = {"into": target, "whenMatched": "fail", "whenNotMatched": "insert"}
        pipeline = [{"$match": query}, {"$merge": into}]
        try:
            call(f"{dst}/{doc_id}", lambda: send(lambda: list(collection(src).aggregate(pipeline))))
        except AlreadyExistsError:
            return False
        except (InvalidDocumentError, StorageError) as exc:
            if isinstance(exc.__cause__, errors.OperationFailure):
                return None  # e.g. MongoDB before 4.2: read, insert and delete instead
            raise
        return True

    def move(src: str, dst: str, doc_id: str) -> Doc | None:
        what, query = f"{src}/{doc_id}", key(src, doc_id)
        source, target = collection(src), collection(dst)

        def drop_source(query: Doc) -> bool:
            """Delete the moved document from *src*; whether this move deleted it."""
            drop = functools.partial(source.delete_one, query)
            return bool(
                call(
                    what,
                    lambda: send(
                        lambda: drop().deleted_count,
                        lambda: drop().deleted_count or 1,  # an earlier try may have deleted it
                    ),
                )
            )

        if dst != layout.running and copied(src, dst, doc_id):
            if drop_source(query):
                return None
            raise NotFoundError(f"{what} does not exist")  # gone before, or another mover won
        found = call(what, lambda: send(lambda: source.find_one(query)))
        if found is None:
            raise NotFoundError(f"{what} does not exist")
        source_id = found.pop("_id")
        body = {"_id": new_id(dst, doc_id), **found}
        for _ in range(2):
            try:
                call(f"{dst}/{doc_id}", lambda: send(lambda: target.insert_one(body) and None))
                inserted = True
                break
            except AlreadyExistsError:
                there = call(
                    f"{dst}/{doc_id}", lambda: send(lambda: target.find_one(key(dst, doc_id)))
                )
                inserted = False
                if there is not None:
                    if {**there, "_id": body["_id"]} != body:
                        raise
                    break  # the same document: ours (an answer lost), a half-done move's, a racer's
        if drop_source({"_id": source_id}):
            return moved(dst, doc_id, found)
        if inserted and dst == layout.running:
            # A sqooler mover deleted the source.  If its copy has not come and gone
            # already (it ran: it has a result), its insert into running fails: ours won.
            if not call(what, lambda: ran_already(src, doc_id)):
                return moved(dst, doc_id, found)
            call(what, lambda: send(lambda: target.delete_one({"_id": body["_id"]})))
        raise NotFoundError(f"{what} does not exist")  # another mover won

    def moved(dst: str, doc_id: str, found: Doc) -> Doc | None:
        """The document just moved, as ``get`` would read it (None if it cannot be read)."""
        try:
            return read(dst, doc_id, dict(found))
        except InvalidDocumentError:
            return None  # a reader gets the error

    def delete(path: str, doc_id: str) -> None:
        query, source = key(path, doc_id), collection(path)
        deleted = call(
            f"{path}/{doc_id}",
            lambda: send(
                lambda: source.delete_one(query).deleted_count,
                lambda: source.delete_one(query).deleted_count or 1,  # an earlier try deleted it
            ),
        )
        if deleted == 0:
            raise NotFoundError(f"{path}/{doc_id} does not exist")

    def swap(path: str, doc_id: str, old: Doc, new: Doc | None) -> bool:
        """Read the document, then replace or delete it where every stored field
        still has the value read (one atomic command on the server)."""
        what, source = f"{path}/{doc_id}", collection(path)
        body = None if new is None else stored(path, doc_id, new)
        if path not in keyed and swapped_as_read(path, doc_id, old, body):
            return True
        found = call(what, lambda: send(lambda: source.find_one(key(path, doc_id))))
        if read(path, doc_id, dict(found) if found is not None else None) != old:
            return False
        unchanged = {"$and": [{field: {"$eq": value}} for field, value in found.items()]}
        if body is None:

            def deleted_again() -> bool:  # an earlier try may have deleted it
                return bool(source.delete_one(unchanged).deleted_count) or (
                    source.find_one({"_id": found["_id"]}) is None
                )

            remove = lambda: bool(source.delete_one(unchanged).deleted_count)  # noqa: E731
            return call(what, lambda: send(remove, deleted_again))
        del body["_id"]

        def replaced_again() -> bool:  # an earlier try may have replaced it
            if source.replace_one(unchanged, body).matched_count:
                return True
            now = source.find_one({"_id": found["_id"]})
            return now is not None and {k: v for k, v in now.items() if k != "_id"} == body

        replace = lambda: bool(source.replace_one(unchanged, body).matched_count)  # noqa: E731
        return call(what, lambda: send(replace, replaced_again))

    def swapped_as_read(path: str, doc_id: str, old: Doc, body: Doc | None) -> bool:
        """Replace or delete the document in one command if it is exactly *old* (the
        same fields, in the same order, with equal values: it is as it was read or
        written); False if not, and then `swap` reads it to tell a change from a
        different order or a missing document."""
        if not isinstance(old, dict) or "_id" in old:
            return False
        what, source, ident = f"{path}/{doc_id}", collection(path), key(path, doc_id)["_id"]
        exact = {"_id": ident, "$expr": {"$eq": ["$$ROOT", {"$literal": {"_id": ident, **old}}]}}
        if body is None:

            def deleted_again() -> bool:  # an earlier try may have deleted it
                return bool(source.delete_one(exact).deleted_count) or (
                    source.find_one({"_id": ident}, {"_id": 1}) is None
                )

            remove = lambda: bool(source.delete_one(exact).deleted_count)  # noqa: E731
            return call(what, lambda: send(remove, deleted_again))
        new = {k: v for k, v in body.items() if k != "_id"}

        def replaced_again() -> bool:  # an earlier try may have replaced it
            if source.replace_one(exact, new).matched_count:
                return True
            now = source.find_one({"_id": ident})
            return now is not None and {k: v for k, v in now.items() if k != "_id"} == new

        replace = lambda: bool(source.replace_one(exact, new).matched_count)  # noqa: E731
        return call(what, lambda: send(replace, replaced_again))

    def list_all(path: str) -> list[str]:
        source = collection(path)
        if path in keyed:
            fields = (*keyed[path], _MONGO_NAME_FIELD)
            projection = {f.split(".")[0]: 1 for f in fields}
            docs = call(path, lambda: send(lambda: list(source.find({}, projection))))
            names = (next(filter(None, (_plain_field(d, f) for f in fields)), None) for d in docs)
        else:
            docs = call(path, lambda: send(lambda: list(source.find({}, {"_id": 1}))))
            names = (str(d["_id"]) for d in docs)
        return [n for n in names if isinstance(n, str) and _NAME_RE.fullmatch(n)]

    walk, forget_walk = _walker(list_all)  # keyed folders: names are fields, not _ids
    rests: dict[str, list[Any]] = {}  # folder -> _ids read, not served yet, newest first
    after: dict[str, Any] = {}  # folder -> the last _id served
    lock = threading.Lock()

    def fetch(path: str, last: Any, count: int) -> list[Any]:
        """The next *count* valid ids after *last* (None: from the first), newest first:
        one sorted, limited ``find`` on the ``_id`` index, however long the folder."""
        source = collection(path)

        def page(query: dict[str, Any]) -> list[Any]:
            return list(source.find(query, {"_id": 1}).sort("_id", 1).limit(count))

        while True:
            query = {} if last is None else {"_id": {"$gt": last}}
            docs = call(path, functools.partial(send, functools.partial(page, query)))
            ids = [d["_id"] for d in docs]
            good = [i for i in ids if _NAME_RE.fullmatch(str(i))]
            if good or len(ids) < count:
                return good[::-1]
            last = ids[-1]  # a page of foreign names only: read on

    def list_ids(path: str, limit: int | None = None, /) -> list[str]:
        if limit is None or path in keyed:
            return walk(path, limit)
        _check_limit(limit)
        _check_path(path)
        count = max(limit, _MONGO_LIST_STEP)
        with lock:
            rest = rests.get(path)
            if not rest:
                rest = rests[path] = fetch(path, after.get(path), count)
                if not rest and after.pop(path, None) is not None:  # the end: come round
                    rest = rests[path] = fetch(path, None, count)
            step = rest[: -limit - 1 : -1]
            del rest[-limit:]
            if step:
                after[path] = step[-1]
        return [str(i) for i in step]

    def forget(path: str) -> None:
        rests.pop(path, None)
        after.pop(path, None)
        forget_walk(path)

    if create_indexes:
        for path, fields in keyed.items():
            for field in (*fields, _MONGO_NAME_FIELD):
                call(path, functools.partial(collection(path).create_index, field))
    return _handle(name, layout, upload, update, get, move, delete, list_ids, swap, forget)


def dropbox_storage(
    *,
    app_key: str | None = None,
    app_secret: str | None = None,
    refresh_token: str | None = None,
    client: Any = None,
    session: Any = None,
    name: str = "dropbox",
    layout: Layout = DROPBOX_LAYOUT,
    retries: int = 3,
    sleep: Callable[[float], None] = time.sleep,
) -> Storage:
    """Return a store in a Dropbox app folder, in sqooler's Dropbox layout.

    Give the app key, app secret and refresh token (a client is built with
    *session*, a ``requests.Session``, if given) or a ready ``dropbox.Dropbox``
    *client*.  One client serves every call, and each call is one HTTP request
    (``update`` is two: it checks that the file exists, then overwrites it; as
    on a local disk, the last of several writers wins; it is one, a write at
    the rev, when this handle wrote or read the file last and it has not
    changed since).
    ``upload`` adds with ``strict_conflict``, ``move`` is ``files_move_v2`` so
    that one of several racing movers wins, ``list`` follows every page.

    Rate limits (429, the token refresh's too), server errors (5xx) and broken
    connections are retried here, not by the SDK, *retries* times, waiting as
    long as ``Retry-After`` says or 0.25 s x 1, 2, 4, ... (through *sleep*), then
    raise `TransientError`; refused credentials raise `CredentialsError`.  A 5xx
    or a broken connection may come after the request took effect, so a retry
    that finds its own effect already there counts as done: an ``upload`` that
    conflicts with identical bytes, a ``delete`` or a deleting ``swap`` that
    finds nothing, a ``move`` whose source is gone and whose target exists, a
    ``swap`` whose new bytes are there (``update`` can simply be repeated).  On
    a first attempt, a conflict or a missing document keeps its meaning: a
    race lost.  What remains: if the lost attempt had *not* taken effect and
    another client did the same in between (moved the same job to the same
    place, uploaded the same bytes, deleted the document), the retry takes the
    other client's work for its own.

    Raises:
        SqstoreError: the ``dropbox`` package is not installed.
        ValueError: neither credentials nor a client were given, or *retries* < 0.
    """
    _check_store_name(name)
    if retries < 0:
        raise ValueError(f"retries must be at least 0, not {retries}")
    try:
        import dropbox  # type: ignore[import-not-found, import-untyped, unused-ignore]
        import requests  # type: ignore[import-not-found, import-untyped, unused-ignore]
        from dropbox import exceptions as dbx  # type: ignore[import-not-found, import-untyped, unused-ignore]
        from dropbox.files import WriteMode  # type: ignore[import-not-found, import-untyped, unused-ignore]
    except ImportError as exc:
        raise SqstoreError(
            "dropbox_storage needs the Dropbox SDK: pip install 'dropbox>=11.36' "
            "(or '.[dropbox]' in sqstore's checkout)"
        ) from exc
    # The SDK must repeat nothing itself: only here is it known that an answer was lost.
    if client is None:
        given = {"app_key": app_key, "app_secret": app_secret, "refresh_token": refresh_token}
        if missing := [key for key, value in given.items() if not value]:
            raise ValueError(f"dropbox_storage needs {', '.join(missing)} or a client")
        client = dropbox.Dropbox(
            app_key=app_key,
            app_secret=app_secret,
            oauth2_refresh_token=refresh_token,
            session=session,
            max_retries_on_error=0,
            max_retries_on_rate_limit=0,
        )
    else:  # clone() takes 0 for "keep the client's setting"; -1 means "never" just as well
        client = client.clone(max_retries_on_error=-1, max_retries_on_rate_limit=-1)
    configs = layout.configs
    lost_answer = (
        dbx.InternalServerError,
        requests.ConnectionError,
        requests.Timeout,
        requests.exceptions.ChunkedEncodingError,
    )

    def file_of(path: str, doc_id: str) -> str:
        if path == configs:  # sqooler keeps each config in a folder of its own
            return f"/{_checked(path, doc_id)}/config.json"
        return f"/{_checked(path, doc_id)}.json"

    def call(
        what: str,
        request: Callable[[], Any],
        api_error: Callable[[Any], Any],
        done: Callable[[Any], bool] | None = None,
    ) -> Any:
        """``request()``, retried; a route error goes to *api_error* to be translated,
        but first, once an answer may have been lost, to *done*: True if it is the
        lost attempt's own effect (then the call returns None)."""
        lost = False  # an earlier attempt may have taken effect
        failure: Exception | None = None
        for attempt in range(retries + 1):
            if attempt:
                wait = failure.backoff if isinstance(failure, dbx.RateLimitError) else None
                sleep(0.25 * 2 ** (attempt - 1) if wait is None else wait)
            try:
                return request()
            except dbx.ApiError as exc:
                if lost and done is not None and done(exc.error):
                    return None
                mapped = api_error(exc.error)
                if mapped is None:
                    raise StorageError(f"{what}: Dropbox said {exc.error}") from exc
                raise mapped from exc
            except dbx.AuthError as exc:
                raise CredentialsError(
                    f"{what}: Dropbox refused the credentials ({exc.error}): check the app "
                    "key, app secret and refresh token, and the app's files.content scopes"
                ) from exc
            except dbx.RateLimitError as exc:  # refused, so not applied
                failure = exc
            except lost_answer as exc:
                failure, lost = exc, lost or not isinstance(exc, requests.ConnectTimeout)
            except (dbx.DropboxException, requests.RequestException) as exc:
                raise StorageError(f"{what}: {type(exc).__name__}: {exc}") from exc
        if isinstance(failure, dbx.DropboxException):
            raise TransientError(f"{what}: Dropbox is busy ({type(failure).__name__})") from failure
        raise TransientError(f"{what}: cannot reach Dropbox ({failure})") from failure

    def not_found(what: str) -> Callable[[Any], SqstoreError | None]:
        def check(error: Any) -> SqstoreError | None:
            lookup = error.get_path() if error.is_path() else None
            if lookup is not None and lookup.is_not_found():
                return NotFoundError(f"{what} does not exist")
            return None

        return check

    def conflict(what: str) -> Callable[[Any], SqstoreError | None]:
        def check(error: Any) -> SqstoreError | None:
            if error.is_path() and error.get_path().reason.is_conflict():
                return AlreadyExistsError(f"{what} already exists")
            return None

        return check

    def gone(what: str) -> Callable[[Any], SqstoreError | None]:
        def check(error: Any) -> SqstoreError | None:
            if error.is_path_lookup() and error.get_path_lookup().is_not_found():
                return NotFoundError(f"{what} does not exist")
            return None

        return check

    seen: dict[str, tuple[str, bytes]] = {}  # file -> (rev, bytes) as this handle last saw it

    def remember(file: str, meta: Any, data: bytes) -> None:
        if len(seen) >= 4096:
            seen.clear()
        seen[file] = meta.rev, data

    def download(file: str, what: str) -> tuple[Any, bytes]:
        """The file's metadata and bytes (NotFoundError if absent)."""

        def fetch() -> tuple[Any, bytes]:
            meta, response = client.files_download(file)
            with contextlib.closing(response):
                return meta, response.content

        meta, data = cast(tuple[Any, bytes], call(what, fetch, not_found(what)))
        remember(file, meta, data)
        return meta, data

    def holds(file: str, what: str, data: bytes | None) -> bool:
        """Whether *file* now holds *data* (None: whether it is absent)."""
        try:
            return download(file, what)[1] == data
        except NotFoundError:
            return data is None

    def upload(path: str, doc_id: str, doc: Doc) -> None:
        file, what = file_of(path, doc_id), f"{path}/{doc_id}"
        data = _dumps(doc, what).encode()

        def ours(error: Any) -> bool:  # a conflict with our own bytes: the lost attempt
            return conflict(what)(error) is not None and holds(file, what, data)

        add = functools.partial(
            client.files_upload, data, file, mode=WriteMode.add, strict_conflict=True, mute=True
        )
        if (meta := call(what, add, conflict(what), ours)) is not None:
            remember(file, meta, data)

    def update(path: str, doc_id: str, doc: Doc) -> None:
        file, what = file_of(path, doc_id), f"{path}/{doc_id}"
        data = _dumps(doc, what).encode()
        if (known := seen.get(file)) is not None:  # at the rev this handle saw: one request
            at_rev = functools.partial(
                client.files_upload,
                data,
                file,
                mode=WriteMode.update(known[0]),
                strict_conflict=True,
                mute=True,
            )

            def ours(error: Any) -> bool:  # a conflict with our own bytes: the lost attempt
                return conflict(what)(error) is not None and holds(file, what, data)

            with contextlib.suppress(AlreadyExistsError, NotFoundError):  # changed since
                if (meta := call(what, at_rev, conflict(what), ours)) is not None:
                    remember(file, meta, data)
                return
        call(what, lambda: client.files_get_metadata(file), not_found(what))
        overwrite = functools.partial(
            client.files_upload, data, file, mode=WriteMode.overwrite, mute=True
        )
        if (meta := call(what, overwrite, lambda error: None)) is not None:  # harmless to repeat
            remember(file, meta, data)

    def get(path: str, doc_id: str) -> Doc:
        file, what = file_of(path, doc_id), f"{path}/{doc_id}"
        return _loads(download(file, what)[1], what)

    def move(src: str, dst: str, doc_id: str) -> None:
        source, target = file_of(src, doc_id), file_of(dst, doc_id)

        def lost(error: Any) -> SqstoreError | None:
            if error.is_from_lookup() and error.get_from_lookup().is_not_found():
                return NotFoundError(f"{src}/{doc_id} does not exist")
            if error.is_to() and error.get_to().is_conflict():
                return AlreadyExistsError(f"{dst}/{doc_id} already exists")
            return None

        def ours(error: Any) -> bool:  # the source gone and the target there: the lost attempt
            if not (error.is_from_lookup() and error.get_from_lookup().is_not_found()):
                return False
            try:
                there = f"{dst}/{doc_id}"
                call(there, lambda: client.files_get_metadata(target), not_found(there))
            except NotFoundError:
                return False
            return True

        call(f"{src}/{doc_id}", lambda: client.files_move_v2(source, target), lost, ours)

    def delete(path: str, doc_id: str) -> None:
        file, what = file_of(path, doc_id), f"{path}/{doc_id}"
        remove = functools.partial(client.files_delete_v2, file)
        call(what, remove, gone(what), lambda error: gone(what)(error) is not None)

    def swap(path: str, doc_id: str, old: Doc, new: Doc | None) -> bool:
        """Write or delete only at the ``rev`` at which the document was *old*: the rev
        this handle last saw it at, if it was *old* then (no request), else read now."""
        file, what = file_of(path, doc_id), f"{path}/{doc_id}"
        data = None if new is None else _dumps(new, what).encode()

        def ours(error: Any) -> bool:  # our lost attempt wrote or deleted it
            refused = conflict(what) if data is not None else gone(what)
            return refused(error) is not None and holds(file, what, data)

        known = seen.get(file)
        for fresh in (False, True) if known is not None else (True,):
            if fresh:
                meta, current = download(file, what)
                rev = meta.rev
            else:
                rev, current = cast(tuple[str, bytes], known)
            if _loads(current, what) != old:
                if fresh:
                    return False
                continue
            try:
                if data is None:
                    remove = functools.partial(client.files_delete_v2, file, parent_rev=rev)
                    call(what, remove, gone(what), ours)
                    seen.pop(file, None)
                else:
                    write = functools.partial(
                        client.files_upload,
                        data,
                        file,
                        mode=WriteMode.update(rev),
                        strict_conflict=True,
                        mute=True,
                    )
                    if (meta := call(what, write, conflict(what), ours)) is not None:
                        remember(file, meta, data)
                return True
            except (NotFoundError, AlreadyExistsError):
                if fresh:
                    return False  # changed (a new rev) or removed since it was read
        return False

    def list_all(path: str) -> list[str]:
        folder = f"/{_check_path(path)}"
        try:
            page = call(path, lambda: client.files_list_folder(folder), not_found(path))
        except NotFoundError:
            return []
        entries = list(page.entries)
        while page.has_more:
            more = functools.partial(client.files_list_folder_continue, page.cursor)
            page = call(path, more, lambda error: None)
            entries += page.entries
        if path == configs:
            names = [e.name for e in entries if isinstance(e, dropbox.files.FolderMetadata)]
        else:
            names = [e.name[:-5] for e in entries if e.name.endswith(".json")]
        return [n for n in names if _NAME_RE.fullmatch(n)]

    list_ids, forget = _walker(list_all)
    return _handle(name, layout, upload, update, get, move, delete, list_ids, swap, forget)


_DROPBOX_ENV = {
    "app_key": "SQSTORE_DROPBOX_APP_KEY",
    "app_secret": "SQSTORE_DROPBOX_APP_SECRET",
    "refresh_token": "SQSTORE_DROPBOX_REFRESH_TOKEN",
}
_DROPBOX_FILE_ENV = "SQSTORE_DROPBOX_CREDENTIALS"
_SECRET_QUERY_RE = re.compile(r"((?:pass|secret|token|key)[^=&]*=)[^&]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """Return *url* as it may be logged: any password or secret replaced by ``***``.

    >>> redact_url("mongodb://bob:s3cret@db:27017/?authSource=admin")
    'mongodb://bob:***@db:27017/?authSource=admin'
    >>> redact_url("mongodb://db/?tlsCertificateKeyFilePassword=pw")
    'mongodb://db/?tlsCertificateKeyFilePassword=***'
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    info, rest = _userinfo(rest)
    if info is not None:  # a user alone may be a token: hidden too
        user, colon, _ = info.partition(":")
        rest = (f"{user}:***" if colon else "***") + rest
    netloc, slash, tail = rest.partition("/")
    return f"{scheme}://{netloc}{slash}" + _SECRET_QUERY_RE.sub(r"\1***", tail)


def _userinfo(rest: str) -> tuple[str | None, str]:
    """Split what follows a URL's ``://`` into its user info (``user:password``; None
    without) and the rest, from the ``@`` on.  The last ``@`` ends it: a password may
    hold "/", "?" or "@" unescaped (better to hide too much)."""
    at = rest.rfind("@")
    return (None, rest) if at < 0 else (rest[:at], rest[at:])


_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")  # a URL's scheme (two letters or more)


def _local_root(url: str) -> str | None:
    """The directory a bare path (``~`` is the home directory) or ``file://`` URL names;
    None for other schemes."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        if found := _SCHEME_RE.match(url):  # mongodb:/host, memory:, dropbox:/ ...
            meant = f"{found.group()}//{url[found.end() :].lstrip('/')}"
            raise ValueError(  # only the URL meant is shown: it is the one redact_url reads
                f"not a storage URL: did you mean {redact_url(meant)}? (for a directory "
                "whose name holds ':', write ./NAME)"
            )
        return os.path.expanduser(url)
    if scheme != "file":
        return None
    if rest.startswith("localhost/"):
        rest = rest[len("localhost") :]
    if not rest.startswith("/"):
        raise ValueError(f"a file URL needs an absolute path: file:///path, not {url!r}")
    from urllib.parse import unquote

    return unquote(rest)


def _refuse_mongodb_database(uri: str) -> None:
    """Refuse a MongoDB URI that names a database: sqstore keeps its documents in the
    databases of sqooler's layout and would ignore it.  (The path is where pymongo,
    too, looks for it: after the first ``/`` of the part after ``://``.)"""
    path = uri.partition("://")[2].partition("/")[2].partition("?")[0]
    if path and "@" not in path:  # with "@", a password holds "/": pymongo refuses it
        raise ValueError(
            f"{redact_url(uri)}: sqstore keeps its documents in the databases sqooler uses "
            f"(backends, jobs, status, results), not in the database {path!r} the URL "
            f"names; leave it out (to log in against it, add ?authSource={path})"
        )


def _dropbox_credentials(url: str) -> dict[str, str]:
    """The app key, app secret and refresh token for a ``dropbox://`` URL: from the
    environment or the file it names, never from the URL, which must be bare."""
    if url.partition("://")[2].strip("/"):  # whatever is there might be a token: never repeat it
        raise ValueError(
            "a dropbox URL is just dropbox:// (the app folder); credentials come from "
            f"${_DROPBOX_ENV['refresh_token']} and friends, never from the URL"
        )
    path = os.environ.get(_DROPBOX_FILE_ENV)
    if path:
        try:
            with open(path, encoding="utf-8") as file:
                found = json.load(file)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not valid JSON"
            raise CredentialsError(f"${_DROPBOX_FILE_ENV}: cannot read {path}: {reason}") from None
        if not isinstance(found, dict):
            raise CredentialsError(f"${_DROPBOX_FILE_ENV}: {path} is not a JSON object")
        given = {key: found.get(key) for key in _DROPBOX_ENV}
        where = f"{path} (named by ${_DROPBOX_FILE_ENV})"
        missing = [key for key, value in given.items() if not isinstance(value, str) or not value]
    else:
        given = {key: os.environ.get(env) for key, env in _DROPBOX_ENV.items()}
        where = "the environment"
        missing = [_DROPBOX_ENV[key] for key, value in given.items() if not value]
    if missing:
        raise CredentialsError(
            f"dropbox:// needs {', '.join(missing)} in {where} "
            f"(or ${_DROPBOX_FILE_ENV} naming a JSON file with app_key, app_secret, refresh_token)"
        )
    return cast(dict[str, str], given)


def open_storage(url: str) -> Storage:
    """Return the store a URL names.

    ``file:///path`` or a bare path (a directory, `local_storage`; ``~`` is the
    home directory), ``memory://`` (`memory_storage`), ``mongodb://...`` or
    ``mongodb+srv://...`` (`mongodb_storage`; the URI carries the credentials,
    and no error message repeats them; it names no database), ``dropbox://``
    (`dropbox_storage` on the app folder; the app key, app secret and refresh
    token come from ``$SQSTORE_DROPBOX_APP_KEY``, ``$SQSTORE_DROPBOX_APP_SECRET``
    and ``$SQSTORE_DROPBOX_REFRESH_TOKEN``, or from the JSON file
    ``$SQSTORE_DROPBOX_CREDENTIALS`` names, never from the URL).
    Log a URL with `redact_url`.

    Raises:
        ValueError: the URL's scheme is not one of these, or it is malformed (e.g.
            ``mongodb:/host``, a MongoDB URL naming a database, a dropbox URL with a
            path).
        CredentialsError: ``dropbox://`` without credentials in the environment.
    """
    root = _local_root(url)
    if root is not None:
        return local_storage(root)
    scheme = url.partition("://")[0]
    if scheme == "memory":
        return memory_storage()
    if scheme in ("mongodb", "mongodb+srv"):
        return mongodb_storage(url)
    if scheme == "dropbox":
        credentials = _dropbox_credentials(url)
        return dropbox_storage(
            app_key=credentials["app_key"],
            app_secret=credentials["app_secret"],
            refresh_token=credentials["refresh_token"],
        )
    raise ValueError(
        f"unknown storage scheme {scheme!r}: use a path, file://, memory://, mongodb:// "
        "or dropbox://"
    )


# ============================================================================
# Layers
# ============================================================================
Layer = Callable[[Storage], Storage]
"""A function that returns a new handle with some operations wrapped (see `stack`)."""

_RETRY_SAFE = ("get", "list", "update", "upload", "delete", "swap")


def wrap_ops(
    store: Storage,
    wrap: Callable[[str, Callable[..., Any]], Callable[..., Any]],
    only: Sequence[str] = _OPS,
) -> Storage:
    """Return a new handle with each operation in *only* replaced by ``wrap(op, fn)``.

    The helper every layer here is made with: *wrap* gets the operation's name
    and its callable, and returns the callable to use instead (``functools.wraps``
    is applied for it).  *store* is not changed.  *only* defaults to all seven
    verbs: ``upload update get move delete list swap``.

    Raises:
        TypeError: *store* is not a storage handle.
        ValueError: *only* names something that is not one of the seven verbs.

    >>> seen = []
    >>> def spy(op, fn):
    ...     return lambda *args: seen.append(op) or fn(*args)
    >>> store = wrap_ops(memory_storage(), spy, only=("list",))
    >>> store["list"]("jobs/running"), seen
    ([], ['list'])
    """
    check_handle(store)
    if isinstance(only, str) or not set(only) <= set(_OPS):
        raise ValueError(f"only= takes verbs of {' '.join(_OPS)}, not {only!r}")
    wrapped = {op: functools.wraps(store[op])(wrap(op, store[op])) for op in only}  # type: ignore[literal-required]
    return cast(Storage, {**store, **wrapped})


def _where(op: str, args: tuple[Any, ...]) -> str:
    """``path/id`` of a call (``src/id -> dst`` for a move, the folder for a list)."""
    if op == "move":
        return f"{args[0]}/{args[2]} -> {args[1]}"
    if op == "list":
        return str(args[0]) if len(args) < 2 else f"{args[0]} (step of {args[1]})"
    return "/".join(str(a) for a in args[:2])


def stack(store: Storage, *layers: Layer) -> Storage:
    """Apply *layers* so that the first listed is the outermost (sees each call first).

    >>> counts: dict[str, int] = {}
    >>> store = stack(memory_storage(), read_only, functools.partial(with_metrics, counts=counts))
    >>> store["list"]("jobs/running"), counts
    ([], {'list': 1})
    """
    for layer in reversed(layers):
        store = layer(store)
    return store


def read_only(store: Storage) -> Storage:
    """Return *store* with every write (upload, update, move, delete) refused.

    Raises (from the writes):
        ReadOnlyError: always, naming the document; nothing is sent to the store.
    """

    def wrap(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def refuse(*args: Any) -> Any:
            raise ReadOnlyError(f"{op} {_where(op, args)}: storage {store['name']!r} is read-only")

        return refuse

    return wrap_ops(store, wrap, _WRITES)


def with_retry(
    store: Storage,
    *,
    attempts: int = 3,
    delay: float = 0.2,
    ops: Sequence[str] = ("get", "list"),
    sleep: Callable[[float], None] = time.sleep,
) -> Storage:
    """Return *store* with *ops* retried on `TransientError`, waiting *delay* x 1, 2, 4, ...

    Reads only by default.  Of the writes, ``update`` (a replacement) can be
    repeated as it is; a repeated ``upload`` that finds its own document
    already there counts as done (a different one is still `AlreadyExistsError`);
    a repeated ``delete`` that finds nothing counts as done, and so does a
    repeated ``swap`` that finds its *new* document (or, deleting, nothing).  ``move`` is never
    retried: it is how racing workers pick one winner, and a retry could not
    tell a move that went through from one that lost.

    Raises:
        ValueError: *ops* names ``move`` or an unknown operation, or *attempts* < 1.
    """
    if unsafe := sorted(set(ops) - set(_RETRY_SAFE)):
        raise ValueError(f"with_retry cannot repeat {', '.join(unsafe)} safely")
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, not {attempts}")

    def wrap(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def retrying(*args: Any) -> Any:
            for attempt in range(1, attempts + 1):
                try:
                    done = fn(*args)
                    if attempt > 1 and op == "swap" and done is False and args[3] is not None:
                        return store["get"](*args[:2]) == args[3]  # our swap went through?
                    return done
                except TransientError:
                    if attempt == attempts:
                        raise
                    sleep(delay * 2 ** (attempt - 1))
                except AlreadyExistsError:
                    if attempt == 1 or op != "upload" or store["get"](*args[:2]) != args[2]:
                        raise
                    return None  # our own earlier attempt went through
                except NotFoundError:
                    gone = op == "delete" or (op == "swap" and args[3] is None)
                    if attempt == 1 or not gone:
                        raise
                    return True if op == "swap" else None  # our earlier attempt removed it
            raise AssertionError("unreachable")

        return retrying

    return wrap_ops(store, wrap, ops)


def with_logging(store: Storage, *, logger: Any = None, level: int = 10) -> Storage:
    """Return *store* logging one line per operation, with its duration and outcome.

    Lines go to *logger* (default: ``logging.getLogger("sqstore")``) at *level*
    (default DEBUG), e.g. ``local get jobs/running/6553f1... 0.3 ms ok``; a
    failure is logged with its error type.  Documents are never logged, and the
    store's name is the only thing said of where it is.
    """
    if logger is None:
        import logging

        logger = logging.getLogger("sqstore")
    name = store["name"]

    def wrap(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def logged(*args: Any) -> Any:
            start = time.perf_counter()
            outcome = "ok"
            try:
                return fn(*args)
            except Exception as exc:
                outcome = type(exc).__name__
                raise
            finally:
                ms = (time.perf_counter() - start) * 1000
                logger.log(level, "%s %s %s %.1f ms %s", name, op, _where(op, args), ms, outcome)

        return logged

    return wrap_ops(store, wrap)


def with_metrics(store: Storage, *, counts: dict[str, int]) -> Storage:
    """Return *store* counting its operations into *counts*.

    Each call adds 1 to ``counts[op]``; a failed one also to ``counts["op:Error"]``
    (e.g. ``"get:NotFoundError"``).  Pass a ``collections.Counter`` or a dict.
    """

    def wrap(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any) -> Any:
            counts[op] = counts.get(op, 0) + 1
            try:
                return fn(*args)
            except Exception as exc:
                key = f"{op}:{type(exc).__name__}"
                counts[key] = counts.get(key, 0) + 1
                raise

        return counted

    return wrap_ops(store, wrap)


# ============================================================================
# Programs
# ============================================================================
# Built on the library above, which names nothing below this line (so its
# __all__ grows here): the demo simulator, Bob's worker loop, copying a whole
# storage, and the command line with the demo and the bench.

__all__ += ["copy_storage", "main", "run_simulator", "work"]


# The simulator ---------------------------------------------------------------


def _apply_gate(state: list[complex], name: str, wires: list[int], params: list[float]) -> None:
    n_states = len(state)
    if name == "cz":
        mask = (1 << wires[0]) | (1 << wires[1])
        for i in range(n_states):
            if i & mask == mask:
                state[i] = -state[i]
        return
    theta = params[0] if params else 0.0
    c, s = math.cos(theta / 2), math.sin(theta / 2)
    matrix = {
        "x": (0j, 1 + 0j, 1 + 0j, 0j),
        "h": (math.sqrt(0.5) + 0j, math.sqrt(0.5) + 0j, math.sqrt(0.5) + 0j, -math.sqrt(0.5) + 0j),
        "rx": (c + 0j, -1j * s, -1j * s, c + 0j),
        "rz": (complex(c, -s), 0j, 0j, complex(c, s)),
    }[name]
    bit = 1 << wires[0]
    for i in range(n_states):
        if not i & bit:
            a, b = state[i], state[i | bit]
            state[i] = matrix[0] * a + matrix[1] * b
            state[i | bit] = matrix[2] * a + matrix[3] * b


def run_simulator(job: Doc, job_id: str, display_name: str) -> ResultDict:
    """Run a sqooler-format *job* on a tiny state-vector simulator, return its result.

    Each experiment is ``{"instructions": [[name, wires, params], ...], "num_wires":
    n, "shots": k, ...}`` with gates ``x h rx rz cz``, ``measure`` and ``barrier``.

    Raises:
        InvalidDocumentError: the job is not of that form.

    >>> job = {"e": {"instructions": [["x", [0], []], ["measure", [0], []]],
    ...              "num_wires": 1, "shots": 3, "wire_order": "sequential", "seed": 1}}
    >>> run_simulator(job, "j1", "sim").results[0].data.memory
    ('1', '1', '1')
    """
    import random

    experiments = []
    for name, exp in job.items():
        try:
            n_wires, shots = int(exp["num_wires"]), int(exp["shots"])
            if not 1 <= n_wires <= 10 or not 0 <= shots <= 100_000:
                raise ValueError("num_wires must be 1..10 and shots 0..100000")
            state = [0j] * (1 << n_wires)
            state[0] = 1 + 0j
            measured: list[int] = []
            gates = []
            for gate, wires, params in exp["instructions"]:
                if any(not 0 <= w < n_wires for w in wires):
                    raise ValueError(f"wire out of range in {gate}")
                gates.append(GateDict(gate, tuple(wires), tuple(params)))
                if gate == "measure":
                    measured.extend(w for w in wires if w not in measured)
                elif gate != "barrier":
                    _apply_gate(state, gate, wires, params)
            rng = random.Random(exp.get("seed"))
            weights = [abs(a) ** 2 for a in state]
            samples = rng.choices(range(len(state)), weights, k=shots)
            memory = tuple(" ".join(str(s >> w & 1) for w in measured) for s in samples)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise InvalidDocumentError(f"job {job_id}: experiment {name!r}: {exc!r}") from None
        experiments.append(
            ExperimentDict({"name": name}, shots, True, DataDict(memory, tuple(gates)))
        )
    return ResultDict(
        display_name=display_name,
        backend_version="0.1.0",
        job_id=job_id,
        status="DONE",
        results=tuple(experiments),
    )


# The worker loop -------------------------------------------------------------


def _watch_cancel(store: Storage, job_id: str, cancel: threading.Event, who: list[str]) -> None:
    """Set *cancel* (and note who asked in *who*) once the job has a cancel request."""
    if cancel.is_set():
        return
    with contextlib.suppress(SqstoreError):  # unreadable now: the next look decides
        requester = cancel_requested(store, job_id)
        if requester is not None:
            who.append(requester)
            cancel.set()


def _run_executor(
    executor: Callable[..., Any], job: Doc, job_id: str, display_name: str, cancel: threading.Event
) -> Any:
    """Run *executor*, handing it *cancel* (a `threading.Event`) if it takes ``cancel=``."""
    import inspect

    try:
        params = list(inspect.signature(executor).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: the three arguments
        params = []
    if any(p.name == "cancel" or p.kind is p.VAR_KEYWORD for p in params):
        return executor(job, job_id, display_name, cancel=cancel)
    return executor(job, job_id, display_name)


def _honour_cancel(
    store: Storage,
    job_id: str,
    cancel: threading.Event,
    who: list[str],
    result: Any,
    status: StatusMsg,
) -> tuple[Any, StatusMsg]:
    """The result and status a worker finishes a job with: a job whose cancel request
    it sees (during the run, or in a last look now) ends ERROR and its result is dropped."""
    _watch_cancel(store, job_id, cancel, who)
    if not cancel.is_set():
        return result, status
    why = "Cancelled while running; " + (
        "its result was dropped." if result is not None else f"it ended: {status.error_message}"
    )
    return None, _cancelled(job_id, who[0], why)


def work(
    stores: Sequence[Storage],
    display_name: str,
    executor: Callable[[Doc, str, str], Any],
    private_jwk: KeyLike | None = None,
    *,
    policy: LeasePolicy = LeasePolicy(),
    now: Callable[[], float] = time.time,
    poll: float = 1.0,
    max_jobs: int | None = None,
    stop: threading.Event | None = None,
    log: Callable[[str], None] | None = None,
    logger: Any = None,
    burst: bool = False,
) -> int:
    """Run Bob's worker loop: serve a backend's queue on each of *stores* in turn.

    Round-robin, one job per store per pass (so one worker can serve several
    frontends): claim the oldest job (`claim_jobs`, one claimer per store kept
    from job to job, so its heartbeat does not read the config each time), run
    ``executor(job, job_id, display_name)``, and finish the job with its result
    and a DONE status, or with an ERROR status whose ``error_message`` is the
    exception's type and text.  *policy* (`LeasePolicy`) says who holds the
    jobs and for how long: while the executor runs, a thread renews the lease
    every third of ``policy.lease_seconds``.  Jobs whose lease expired (their
    worker died) are requeued by the claims' heartbeat (see `claim_jobs`): when
    a beat writes ``last_queue_check`` (at most every ``policy.heartbeat``
    seconds by the clock *now*, across the workers of a backend on a store),
    and at least once per heartbeat of *now* for each store whatever other
    programs write (not at once on start); each requeue is logged.
    Leases and statuses are timed by *now* too.  When no store has a job,
    waits *poll* seconds.  Returns after *max_jobs* jobs,
    or once *stop* is set, which never interrupts a running job (set it from a
    signal handler), or, with *burst*, once a pass over every store claims no
    job (a store that cannot be read counts as empty: its error is logged).
    Each finished job and each storage error is one line to *log* if given,
    else to *logger* (default: ``logging.getLogger("sqstore")``; a job at INFO,
    a failed job and a lost lease at WARNING, a storage error at ERROR), and
    the loop goes on; a job whose finishing failed keeps its lease and is
    requeued when that expires.  A cancel request (`cancel_job`) is looked for
    at each renewal and before finishing; an executor that takes a ``cancel``
    keyword gets it as a `threading.Event`, and a job cancelled while running
    ends ERROR without its result.

    Raises:
        ValueError: no store given.
        InvalidNameError: bad display name.
        BadSignatureError: a backend signs and *private_jwk* is not its key, or
            none is given (checked at the start, before any job is claimed).

    Returns:
        The number of jobs finished (DONE or ERROR).
    """
    if not stores:
        raise ValueError("work needs at least one store")
    for store in stores:
        check_handle(store)
    check_display_name(display_name)
    for store in stores:  # a wrong or missing key fails now, not at every claim
        try:
            cfg = get_config(store, display_name)
        except SqstoreError:
            continue  # no config (yet), or unreadable: the loop reports it
        if cfg.sign and private_jwk is None:
            raise BadSignatureError(
                f"backend {display_name!r} on {store['name']} signs: work needs its private key"
            )
        if cfg.sign and private_jwk is not None:
            check_signing_key(store, cfg, private_jwk)
    stop = stop or threading.Event()
    say = _reporter(log, logger)
    names = [store["name"] for store in stores]  # numbered where they repeat: local1, local2
    labels = [name if names.count(name) == 1 else f"{name}{i + 1}" for i, name in enumerate(names)]
    done = 0
    claimers: list[Iterator[tuple[NextJob, Doc]] | None] = [None] * len(stores)
    swept: list[list[float]] = [[] for _ in stores]  # when each store's claims last swept
    while not stop.is_set() and (max_jobs is None or done < max_jobs):
        idle = True
        for i, (store, label) in enumerate(zip(stores, labels, strict=True)):
            if stop.is_set() or (max_jobs is not None and done >= max_jobs):
                break
            try:
                claimed = _next_claim(
                    claimers,
                    i,
                    functools.partial(
                        _claims,
                        store,
                        display_name,
                        private_jwk,
                        policy,
                        now,
                        functools.partial(_say_requeued, say, label),
                        swept[i],
                    ),
                )
            except SqstoreError as exc:
                say(f"{label}: cannot claim: {type(exc).__name__}: {exc}", _ERROR)
                continue
            if claimed is not None:
                idle = False
                done += _work_one(
                    store, label, display_name, executor, private_jwk, claimed, policy, now, say
                )
        if idle and burst:
            break
        if idle:
            stop.wait(poll)
    return done


_INFO, _WARNING, _ERROR = 20, 30, 40  # logging's levels (logging loads only when used)


def _say_requeued(say: Callable[[str, int], None], label: str, requeued: list[str]) -> None:
    """Report the jobs a claim's heartbeat sweep requeued on the store labelled *label*."""
    say(f"{label}: requeued {', '.join(requeued)} (lease expired)", _INFO)


def _reporter(log: Callable[[str], None] | None, logger: Any) -> Callable[[str, int], None]:
    """How `work` reports a line at a level: to *log*, else to *logger* or sqstore's."""
    if log is not None:
        return lambda line, level: log(line)
    if logger is None:
        import logging

        logger = logging.getLogger("sqstore")
    return cast(Callable[[str, int], None], lambda line, level: logger.log(level, line))


def _next_claim(
    claimers: list[Iterator[tuple[NextJob, Doc]] | None],
    i: int,
    start: Callable[[], Iterator[tuple[NextJob, Doc]]],
) -> tuple[NextJob, Doc] | None:
    """The next job of store *i*'s `claim_jobs` (begun by *start* if there is none), or
    None when its queue is empty: one claimer per store, so that its heartbeat (a
    config read) comes every *heartbeat* seconds, not with every job."""
    claimer = claimers[i]
    if claimer is None:
        claimer = claimers[i] = start()
    try:
        claimed = next(claimer, None)
    except BaseException:
        claimers[i] = None
        raise
    if claimed is None:
        claimers[i] = None
    return claimed


def _work_one(
    store: Storage,
    label: str,
    display_name: str,
    executor: Callable[[Doc, str, str], Any],
    private_jwk: Any,
    claimed: tuple[NextJob, Doc],
    policy: LeasePolicy,
    now: Callable[[], float],
    say: Callable[[str, int], None],
) -> int:
    """Run and finish one claimed job, renewing its lease meanwhile; 1 if finished."""
    job_id, job = claimed[0].job_id, claimed[1]
    finished, cancel, cancelled_by = threading.Event(), threading.Event(), list[str]()

    def renew() -> None:
        while not finished.wait(policy.lease_seconds / 3):
            _watch_cancel(store, job_id, cancel, cancelled_by)
            try:
                renew_lease(store, job_id, policy=policy, now=now)
            except LeaseLostError:
                say(f"{label} {job_id}: lease lost; another worker may run the job", _WARNING)
                return
            except SqstoreError as exc:  # try again at the next third
                say(f"{label} {job_id}: cannot renew the lease: {exc}", _WARNING)

    renewer = threading.Thread(target=renew, name=f"renew-{job_id}", daemon=True)
    renewer.start()
    start = time.perf_counter()
    try:
        result = _run_executor(executor, job, job_id, display_name, cancel)
        status = StatusMsg(job_id, "DONE", "The job is done.", "None")  # sqooler's "no error"
    except Exception as exc:
        result = None
        status = StatusMsg(job_id, "ERROR", "The executor failed.", f"{type(exc).__name__}: {exc}")
    finally:
        finished.set()
        renewer.join()
    result, status = _honour_cancel(store, job_id, cancel, cancelled_by, result, status)
    ms = (time.perf_counter() - start) * 1000
    for attempt in range(_FINISH_TRIES):
        try:
            update_in_database(
                store, result, status, job_id, display_name, private_jwk, policy=policy, now=now
            )
            break
        except SqstoreError as exc:
            if (
                result is not None
                and isinstance(exc, InvalidDocumentError)
                and (malformed := _malformed_result(result))
            ):  # only the executor's own output turns a job into ERROR
                result = None
                status = StatusMsg(
                    job_id, "ERROR", "The executor's result is malformed.", malformed
                )
                continue
            if attempt + 1 == _FINISH_TRIES or isinstance(exc, (LeaseLostError, NotFoundError)):
                say(f"{label} {job_id}: cannot finish: {type(exc).__name__}: {exc}", _ERROR)
                return 0  # the lease expires and the job is requeued
            say(
                f"{label} {job_id}: cannot finish yet, trying again: {type(exc).__name__}: {exc}",
                _WARNING,
            )
            time.sleep(0.05 * 4**attempt)
    if cancelled_by:  # honoured: the request is done with
        _forget_cancel(store, job_id)
    why = f": {status.error_message}" if status.status == "ERROR" else ""
    say(f"{label} {job_id} {status.status} in {ms:.0f} ms{why}", _WARNING if why else _INFO)
    return 1


_FINISH_TRIES = 4  # a finish that fails for a passing reason (a torn read, a lost connection)


def _malformed_result(result: Any) -> str:
    """Why *result* cannot be stored as a job's result; "" when it can."""
    try:
        _json_bytes(to_doc(_coerce(result, ResultDict, "the executor's result")), "the result")
    except InvalidDocumentError as exc:
        return str(exc)
    return ""


# Copying a storage -----------------------------------------------------------


_COPY_KINDS = (
    "public_keys",
    "user_keys",
    "configs",
    "job_signatures",
    "submit_tokens",
    "cancel_requests",
    "jobs",
    "statuses",
    "results",
    "leases",
)
_COPY_COUNTS = ("copied", "present", "conflicts", "rejected")
# (what copy_storage counts it as, where `locate` puts it), in the order copied
_COPY_PLACES = (
    ("jobs", "queued"),
    ("statuses", "status"),
    ("jobs", "running"),
    ("jobs", "deleted"),
    ("jobs", "finished"),
    ("results", "result"),
    ("leases", "lease"),
)


def copy_storage(
    src: Storage,
    dst: Storage,
    *,
    verify: bool = False,
    progress: Callable[[dict[str, dict[str, int]]], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> dict[str, dict[str, int]]:
    """Copy every document of an exchange from *src* to *dst*: public keys (of backends
    and users), configs, job signatures, submit tokens, cancel requests, jobs, statuses,
    results and leases.

    Each document goes to the place *dst*'s layout gives it, under the same
    name and job id (e.g. from a sqooler Dropbox folder to MongoDB).  Nothing in
    *dst* is overwritten: a document already there and equal counts as
    ``present``, a different one as a ``conflict`` (left as it is), so an
    interrupted copy is finished by running it again.  With *verify*, a signed
    document is ``rejected`` unless its own backend's key verifies it: the key
    *src* publishes under the kid of that backend's config (a config whose own
    signature fails gives its backend no key); a signed document of no backend
    (a running or deleted job, a lease) needs the key its header names.  So is
    one that cannot be read.  *warn* is told of each conflict and
    rejection, *progress* gets the counts after each document.

    Finished jobs and results in a layout whose folders carry the username
    (Dropbox) are found through the job's status or queue entry; ids without a
    username go under ``None`` there (see `_job_fill`).

    Returns:
        ``{kind: {"copied": n, "present": n, "conflicts": n, "rejected": n}}``
        for kinds public_keys, user_keys, configs, job_signatures, submit_tokens,
        cancel_requests, jobs, statuses, results, leases.

    Raises:
        ValueError: the two layouts disagree on which folders are per backend.
    """
    check_handle(src)
    check_handle(dst)
    layouts = src_layout, dst_layout = src["layout"], dst["layout"]
    for _, place in _COPY_PLACES:
        per_backend = ["{display_name}" in _folder_template(lay, place) for lay in layouts]
        if per_backend[0] != per_backend[1]:
            raise ValueError(f"cannot copy: the {place} folder is per backend in one layout only")
    counts = {kind: dict.fromkeys(_COPY_COUNTS, 0) for kind in _COPY_KINDS}
    keys: list[Doc] = []
    clashing: list[Doc] = []  # source keys whose kid *dst* holds another key for

    def tell(kind: str, outcome: str, message: str = "") -> None:
        counts[kind][outcome] += 1
        if message and warn is not None:
            warn(message)
        if progress is not None:
            progress(counts)

    def one(
        kind: str,
        src_at: tuple[str, str],
        dst_at: tuple[str, str],
        dn: str | None = None,
        among: list[Doc] | None = None,
    ) -> Doc | None:
        """Copy one document; *among* the keys that verify it, if not its backend's."""
        where = "/".join(src_at)
        try:
            doc = src["get"](*src_at)
        except NotFoundError:
            return None
        except InvalidDocumentError as exc:
            tell(kind, "rejected", f"{where}: not copied: {exc}")
            return None
        try:
            if verify and is_signed(doc):
                if among is None:
                    among = keys if dn is None else keys_of.get(dn, [])
                verify_doc(doc, among)
        except (InvalidDocumentError, BadSignatureError) as exc:
            tell(kind, "rejected", f"{where}: not copied: {clash(doc, dn) or exc}")
            return None
        try:
            dst["upload"](*dst_at, doc)
        except AlreadyExistsError:
            if dst["get"](*dst_at) != doc:
                if kind == "public_keys":
                    clashing.append(doc)
                tell(kind, "conflicts", f"{where}: kept the different {'/'.join(dst_at)}")
                return None
            tell(kind, "present")
            return doc
        tell(kind, "copied")
        return doc

    def clash(doc: Doc, dn: str | None) -> str:
        """Why *doc* is not copied when the source key that verifies it is one whose kid
        the target holds another key for (a conflict); "" when that is not the cause."""
        own = clashing if dn is None else clashing_of.get(dn, [])
        try:
            verify_doc(doc, own)
        except (InvalidDocumentError, BadSignatureError):
            return ""
        kids = sorted({str(key.get("kid")) for key in own})
        return (
            f"its key {', '.join(map(repr, kids))} is in conflict: the target holds another "
            "key of that kid, which would not verify it"
        )

    def backend_keys(src_at: tuple[str, str], among: list[Doc]) -> list[Doc]:
        """The key *among* those given of the kid a config names, if the config is
        unsigned or its own signature verifies with it; else none."""
        try:
            doc = src["get"](*src_at)
            kid = payload_of(doc).get("kid")
            own = [key for key in among if key.get("kid") == kid and kid is not None]
            if is_signed(doc):
                verify_doc(doc, own)
        except (NotFoundError, InvalidDocumentError, BadSignatureError):
            return []
        return own

    def copy_all(kind: str, place: str, dn: str = "", among: list[Doc] | None = None) -> list[Doc]:
        """Copy every document the source lists at *place*; return those *dst* now holds."""
        src_folder, dst_folder = (locate(lay, place, dn)[0] for lay in layouts)
        copied = (
            one(kind, (src_folder, i), (dst_folder, i), among=among)
            for i in src["list"](src_folder)
        )
        return [doc for doc in copied if doc is not None]

    keys_of: dict[str, list[Doc]] = {}  # a backend's own key, for its documents
    clashing_of: dict[str, list[Doc]] = {}  # ... when that key is in conflict in *dst*
    keys += copy_all("public_keys", "public_key")
    user_keys = copy_all("user_keys", "user_key")
    display_names = []
    for dn in get_backends(src):
        try:
            src_at = locate(src_layout, "config", dn)
        except InvalidNameError as exc:
            tell("configs", "rejected", f"{src_layout.configs}/{dn}: not copied: {exc}")
            continue
        display_names.append(dn)
        keys_of[dn] = backend_keys(src_at, keys) if verify else []
        clashing_of[dn] = backend_keys(src_at, clashing) if verify and clashing else []
        one("configs", src_at, locate(dst_layout, "config", dn), dn)

    def copy_folder(kind: str, place: str, dn: str, ids: Sequence[str] | None) -> list[str]:
        """Copy the jobs *ids* of a *place* (all it lists when None); return their ids."""
        if ids is None:
            listed = src["list"](locate(src_layout, place, dn)[0])
            found = (job_id_from(src_layout, place, stored) for stored in listed)
            ids = [job_id for job_id in found if job_id is not None]
        for job_id in ids:
            try:
                src_at, dst_at = (locate(lay, place, dn, job_id=job_id) for lay in layouts)
            except InvalidNameError as exc:
                tell(kind, "rejected", f"{place} {job_id}: not copied: {exc}")
                continue
            one(kind, src_at, dst_at, dn or None)
        return list(ids)

    for dn in display_names:  # a job's signature and token before the job itself
        copy_all("job_signatures", "job_signature", dn, among=user_keys)
        copy_all("submit_tokens", "submit_token", dn)
    copy_all("cancel_requests", "cancel_request")
    for kind, place in _COPY_PLACES:  # running, deleted, leases: one folder for all
        if "{display_name}" not in _folder_template(src_layout, place):
            copy_folder(kind, place, "", None)
    for dn in display_names:
        known: set[str] = set()  # this backend's job ids seen so far
        for kind, place in _COPY_PLACES:
            template = _folder_template(src_layout, place)
            if "{display_name}" not in template:
                continue
            if "{username}" in template:  # not listable: look for the jobs seen so far
                copy_folder(kind, place, dn, sorted(known))
            else:
                known.update(copy_folder(kind, place, dn, None))
    return counts


# The command line ------------------------------------------------------------

_DEFAULT_STORAGE = "./sqstore-data"


class _UserError(Exception):
    """A mistake on the command line, or what the user asked for does not exist: one
    line to stderr, exit code 1."""


_SERVICES = {"mongodb": "MongoDB", "mongodb+srv": "MongoDB", "dropbox": "Dropbox"}


def _open(url: str, *, create: bool = False) -> Storage:
    """The storage *url* names, for a command.  A directory must exist unless *create*
    (reading a storage never creates it).  A server that cannot be reached, and a
    directory that cannot be read or written, are named by the URL (redacted)."""
    shown = redact_url(url)
    root = _local_root(url)
    if root is not None and not create and not os.path.isdir(root):
        why = "not a directory" if os.path.exists(root) else "no such directory"
        raise _UserError(f"no storage at {shown} ({why})")
    service = _SERVICES.get(url.partition("://")[0], "the storage")

    def unreachable(exc: TransientError) -> TransientError:
        why = type(exc.__cause__).__name__ if exc.__cause__ is not None else exc
        return TransientError(f"cannot reach {service} at {shown} ({why})")

    def wrap(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def named(*args: Any) -> Any:
            try:
                return fn(*args)
            except TransientError as exc:
                raise unreachable(exc) from exc
            except StorageError as exc:
                raise StorageError(f"{shown}: {exc}") from exc

        return named

    try:
        return wrap_ops(open_storage(url), wrap)
    except TransientError as exc:
        raise unreachable(exc) from exc


def _backend(store: Storage, url: str, display_name: str) -> BackendConfig:
    """The config of backend *display_name*; if there is none, an error that names the
    storage and the backends it has."""
    locate(store["layout"], "config", display_name)  # an invalid name is said as such
    try:
        return get_config(store, display_name)
    except NotFoundError:
        known = get_backends(store)
        has = f"known: {', '.join(known)}" if known else "it has none"
        raise _UserError(f"no backend {display_name!r} on {redact_url(url)} ({has})") from None
    except InvalidDocumentError as exc:  # as `backends` says it
        raise _UserError(f"backend {display_name!r} on {redact_url(url)}: {exc}") from None


def _no_job(store: Storage, url: str, display_name: str, job_id: str, user: str = "") -> str:
    of_user = f" of user {user!r}" if user and "{username}" in store["layout"].status else ""
    return f"no job {job_id!r}{of_user} on backend {display_name!r} at {redact_url(url)}"


def _job_status(store: Storage, args: argparse.Namespace) -> StatusMsg:
    """The status of the job the command names, which must exist."""
    _backend(store, args.storage, args.display_name)
    status = get_status(store, args.display_name, args.username, args.job_id)
    if not is_stored(
        store, *locate(store["layout"], "status", args.display_name, args.username, args.job_id)
    ):
        raise _UserError(
            _no_job(store, args.storage, args.display_name, args.job_id, args.username)
        )
    return status


_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _load_jwk(path: str) -> JWK:
    """Read a private JWK from a file, or with ``env:NAME`` from the variable NAME of the
    environment or of ``./.env`` (where sqooler keeps ``PRIVATE_JWK_STR``): JSON, or
    sqooler's base64url-of-JSON config string.  No message shows the key."""
    if path.startswith("env:"):
        text = _env_value(path).strip()
    else:
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read().strip()
        except OSError as exc:
            raise _UserError(f"cannot read key file {path}: {exc.strerror}") from None
    try:
        key = parse_jwk(text, path)
    except InvalidDocumentError as exc:
        raise _UserError(f"{path}: not a JWK: {str(exc).removeprefix(f'{path}: ')}") from None
    except BadSignatureError as exc:
        raise _UserError(str(exc)) from None
    try:
        public_from_private(key)  # a private key whose x belongs to its d
    except ValueError as exc:
        raise _UserError(f"{path}: {exc}") from None
    return key


def _env_value(spec: str) -> str:
    """The value of ``env:NAME``: NAME in the environment, else in ``./.env``."""
    name = spec.removeprefix("env:")
    if _ENV_NAME_RE.fullmatch(name) is None:
        raise _UserError(f"{spec}: {name!r} is not an environment variable name")
    value = os.environ.get(name)
    if value is None:
        value = _dotenv_value(".env", name)
    if value is None:
        raise _UserError(f"{spec}: the environment variable {name} is not set (nor in ./.env)")
    if not value.strip():
        raise _UserError(f"{spec}: the environment variable {name} is empty")
    return value


def _dotenv_value(path: str, name: str) -> str | None:
    """*name* in a ``.env`` file read as sqooler's python-decouple reads one: ``NAME=value``
    lines (the last one counts), ``#`` comments, a value optionally in matching quotes."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _UserError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise _UserError(f"cannot read {path}: not UTF-8 text") from None
    found = None
    for line in map(str.strip, lines):
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#") and key.strip() == name:
            value = value.strip()
            quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
            found = value[1:-1] if quoted else value
    return found


def _save_private(path: str, private: JWK) -> None:
    """`save_jwk`, its errors as one line each."""
    try:
        save_jwk(path, private)
    except AlreadyExistsError:
        raise _UserError(f"{path} exists already: refusing to overwrite a key") from None
    except StorageError as exc:
        raise _UserError(str(exc)) from None


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2))


def _cmd_keygen(store: Storage | None, args: argparse.Namespace) -> int:
    private, public = generate_keypair(args.kid)
    out = args.private_key or f"{args.kid}.jwk"
    _save_private(out, private)
    print(f"private key written to {out} (mode 0600)", file=sys.stderr)
    _print_json(to_doc(public))
    return 0


def _read_json_file(path: str, what: str) -> Doc:
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise _UserError(f"cannot read {what} {path}: {why}") from None
    return _loads(text, path)


def _cmd_submit(store: Storage, args: argparse.Namespace) -> int:
    _backend(store, args.storage, args.display_name)
    job = _read_json_file(args.job_file, "job file")
    key = _load_jwk(args.key) if args.key else None
    if key is not None:  # the user's public key, published once (again: a no-op)
        try:
            upload_public_key(store, public_from_private(key), args.username, role="user")
        except AlreadyExistsError:
            raise _UserError(
                f"{args.key}: another user key {key.kid!r} is published on "
                f"{redact_url(args.storage)}; use a key of another kid"
            ) from None
    try:
        job_id = upload_job(
            store, job, args.display_name, args.username, args.token, private_jwk=key
        )
    except AlreadyExistsError:  # only a token does that
        raise _UserError(
            f"token {args.token!r} on backend {args.display_name!r} at "
            f"{redact_url(args.storage)} was used for another job or by another user"
        ) from None
    try:
        upload_status(store, args.display_name, args.username, job_id)
    except AlreadyExistsError:
        if args.token is None:
            raise  # a retry with a token finds the status of its first run
    print(job_id)
    return 0


def _cmd_status(store: Storage, args: argparse.Namespace) -> int:
    _print_json(to_doc(_job_status(store, args)))
    return 0


def _cmd_result(store: Storage, args: argparse.Namespace) -> int:
    _backend(store, args.storage, args.display_name)
    check_name(args.job_id, "job_id")
    if not is_stored(
        store, *locate(store["layout"], "result", args.display_name, job_id=args.job_id)
    ):
        status = _job_status(store, args)
        job = f"job {args.job_id!r} on backend {args.display_name!r} at {redact_url(args.storage)}"
        if status.status == "ERROR":
            raise _UserError(f"{job} failed, it has no result: {status.error_message}")
        raise _UserError(f"{job} has no result yet: it is {status.status}")
    _print_json(to_doc(get_result(store, args.display_name, args.username, args.job_id)))
    return 0


def _cmd_verify(store: Storage, args: argparse.Namespace) -> int:
    _backend(store, args.storage, args.display_name)
    check_name(args.job_id, "job_id")
    if args.job:
        try:
            chain = verify_job(store, args.display_name, args.username, args.job_id)
        except NotFoundError as exc:  # never the result's check alone: the chain is asked for
            _refuse_without_result(store, args)
            raise _UserError(
                f"job {args.job_id!r} on backend {args.display_name!r} at "
                f"{redact_url(args.storage)}: cannot check the chain: {exc}"
            ) from None
        print(f"{args.job_id}: {'job and result verified' if chain else 'NOT VERIFIED'}")
        return 0 if chain else 1
    _refuse_without_result(store, args)
    ok = verify_result(store, args.display_name, args.job_id)
    print(f"{args.job_id}: {'valid signature' if ok else 'NOT VERIFIED'}")
    return 0 if ok else 1


def _refuse_without_result(store: Storage, args: argparse.Namespace) -> None:
    """Say why there is nothing to verify when the job has no result (or no job is there)."""
    if is_stored(store, *locate(store["layout"], "result", args.display_name, job_id=args.job_id)):
        return
    where = locate_job(store, args.display_name, args.job_id)
    if where is None:
        raise _UserError(_no_job(store, args.storage, args.display_name, args.job_id))
    raise _UserError(
        f"job {args.job_id!r} on backend {args.display_name!r} at "
        f"{redact_url(args.storage)} has no result to verify: it is {where}"
    )


def _cmd_cancel(store: Storage, args: argparse.Namespace) -> int:
    _backend(store, args.storage, args.display_name)
    try:
        outcome = cancel_job(store, args.display_name, args.username, args.job_id)
    except NotFoundError:
        no_job = _no_job(store, args.storage, args.display_name, args.job_id, args.username)
        raise _UserError(no_job) from None
    print(f"{args.job_id}: {outcome}")
    return 0


def _cmd_backends(store: Storage, args: argparse.Namespace) -> int:
    broken = []
    for display_name in get_backends(store):
        try:
            status = get_backend_status(store, display_name)
        except TransientError:
            raise
        except SqstoreError as exc:
            print(f"{display_name}\t-\tbroken")
            broken.append(f"backend {display_name!r} on {redact_url(args.storage)}: {exc}")
            continue
        state = "operational" if status.operational else "not operational"
        print(f"{display_name}\t{status.backend_name}\t{state}")
    sys.stdout.flush()
    for line in broken:
        print(f"sqstore: error: {line}", file=sys.stderr)
    return 1 if broken else 0


def _cmd_queue(store: Storage, args: argparse.Namespace) -> int:
    _backend(store, args.storage, args.display_name)
    layout = store["layout"]
    for stored in store["list"](locate(layout, "queued", args.display_name)[0]):
        print(job_id_from(layout, "queued", stored) or stored)
    return 0


def _update_or_upload(
    store: Storage, config: Any, display_name: str, private: JWK | None, key: str, shown: str
) -> str:
    """Update backend *display_name*'s config, or upload it if it has none; say which.  A
    config signed with another key than *private* (from *key*) is one line naming its kid."""
    try:
        update_config(store, config, display_name, private)
        return "updated"
    except NotFoundError:
        upload_config(store, config, display_name, private)
        return "uploaded"
    except BadSignatureError:
        if private is None:
            raise
        path = get_attribute_path(store, "configs", display_name)
        stored = store["get"](path, get_attribute_id(store, "configs", "", display_name))
        try:
            verify_doc(stored, [public_from_private(private)])
        except BadSignatureError:
            kid = get_config(store, display_name).kid
            raise _UserError(
                f"{key}: not the key of backend {display_name!r} on {shown}: its config is "
                f"signed with another key (kid {kid!r}): give that key with --key, or use another "
                "storage"
            ) from None
        raise


def _cmd_backend_add(store: Storage, args: argparse.Namespace) -> int:
    path, shown = args.config_file, redact_url(args.storage)
    try:
        cfg = _coerce(_read_json_file(path, "config file"), BackendConfig, path)
    except InvalidDocumentError as exc:
        raise _UserError(f"not a backend config: {exc}") from None  # exc names the file
    if not cfg.display_name:
        raise _UserError(f"{path}: the config has no display_name (the backend's name)")
    locate(store["layout"], "config", cfg.display_name)  # an invalid name is refused here
    display_name = cfg.display_name
    private = _load_jwk(args.key) if args.key else None
    if cfg.sign and private is None:
        raise _UserError(
            f"backend {display_name!r} signs (its config says so): give its private key "
            "with --key FILE"
        )
    public = None
    if cfg.sign and private is not None:
        if cfg.kid is not None and cfg.kid != private.kid:
            raise _UserError(f"{path} names kid {cfg.kid!r}, but {args.key} is {private.kid!r}")
        cfg = attrs.evolve(cfg, kid=private.kid)
        public = public_from_private(private)
    try:
        if public is not None and private is not None:  # before anything is written
            check_signing_key(store, cfg, private)
        done = _update_or_upload(store, cfg, display_name, private, args.key, shown)
    except BadSignatureError as exc:
        whose = f"{args.key}: not the key of" if args.key else "no --key for"
        raise _UserError(f"{whose} backend {display_name!r} on {shown}: {exc}") from None
    if public is not None:
        upload_public_key(store, public, display_name)
        print(f"backend {display_name!r} {done} on {shown}, signed; key {public.kid!r} published")
    else:
        print(f"backend {display_name!r} {done} on {shown}")
    return 0


def _cmd_backend_show(store: Storage, args: argparse.Namespace) -> int:
    _print_json(to_doc(_backend(store, args.storage, args.display_name)))
    return 0


# LeasePolicy's fields, by the option of `sqstore work`, `running` and `requeue` that sets each
_POLICY_OPTIONS = {
    "lease_seconds": "lease",
    "heartbeat": "heartbeat",
    "skew": "skew",
    "max_attempts": "max_attempts",
}


def _policy(args: argparse.Namespace, holder: str | None = None) -> LeasePolicy:
    """The one LeasePolicy of a command's lease options; a bad value names its option."""
    given = {f: getattr(args, o) for f, o in _POLICY_OPTIONS.items() if hasattr(args, o)}
    try:
        return LeasePolicy(holder=holder, **given)
    except ValueError as exc:
        text = str(exc).removeprefix(f"{LeasePolicy.__name__}.")
        field = text.split(" ", 1)[0]
        option = "--" + _POLICY_OPTIONS.get(field, field).replace("_", "-")
        raise _UserError(option + text.removeprefix(field)) from None


_POLICY_HELP = {
    "lease": (DEFAULT_LEASE, "seconds a claim lasts unless renewed; a running job found without"
              " a lease gets as long"),
    "heartbeat": (DEFAULT_HEARTBEAT, "seconds between liveness writes and sweeps"),
    "skew": (DEFAULT_SKEW, "seconds past its time before a lease counts as expired (the clock"
             " difference between workers tolerated)"),
    "max_attempts": (DEFAULT_MAX_ATTEMPTS, "claims after which a job whose worker keeps dying is"
                     " given up"),
}  # fmt: skip


def _policy_options(parser: argparse.ArgumentParser, *options: str) -> None:
    """Add these lease options (keys of ``_POLICY_HELP``) to a command, as `_policy` reads them."""
    for option in options:
        default, text = _POLICY_HELP[option]
        parser.add_argument(
            "--" + option.replace("_", "-"),
            type=type(default),
            default=default,
            metavar="N" if isinstance(default, int) else "SECONDS",
            help=f"{text} (default {default:g})",
        )


def _cmd_running(store: Storage, args: argparse.Namespace) -> int:
    policy = _policy(args)
    _backend(store, args.storage, args.display_name)
    now = time.time()
    for job_id, lease in running_jobs(store, args.display_name).items():
        if lease is None:
            print(f"{job_id}\t(no lease)\t-\t-\t-")
            continue
        try:
            clock = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lease.expires))
        except (OverflowError, OSError, ValueError):  # a time no calendar here holds
            clock = f"{lease.expires:g}"
        expired = lease_expired(lease, now, policy=policy)  # as requeue and a sweep judge it
        state = "expired" if expired else "overdue" if lease.expires < now else "live"
        print(f"{job_id}\t{lease.holder or '-'}\t{clock}\t{lease.attempts}\t{state}")
    return 0


def _cmd_requeue(store: Storage, args: argparse.Namespace) -> int:
    policy = _policy(args)
    _backend(store, args.storage, args.display_name)
    private = _load_jwk(args.key) if args.key else None
    if args.job_id is None:
        for job_id in requeue_expired(store, args.display_name, private, policy=policy):
            print(job_id)
        return 0
    try:
        requeued = requeue_job(store, args.display_name, args.job_id, private)
    except NotFoundError:
        where = locate_job(store, args.display_name, check_name(args.job_id, "job_id"))
        if where is None:
            raise _UserError(_no_job(store, args.storage, args.display_name, args.job_id)) from None
        raise _UserError(
            f"job {args.job_id!r} on backend {args.display_name!r} at "
            f"{redact_url(args.storage)} is not running: it is {where}"
        ) from None
    if not requeued:
        print(
            f"{args.job_id}: not requeued: it has ended (its worker died while finishing it, "
            "or it was cancelled); sqstore status shows how",
            file=sys.stderr,
        )
        return 0
    print(args.job_id)
    return 0


_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}


def _duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``12h`` or ``30d`` (an argparse type)."""
    import argparse

    number, unit = (text[:-1], text[-1]) if text[-1:] in _DURATION_UNITS else (text, "s")
    try:
        seconds = float(number) * _DURATION_UNITS[unit]
    except ValueError:
        seconds = math.nan
    if not seconds >= 0 or math.isinf(seconds):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90s, 15m, 12h, 30d")
    return seconds


def _cmd_prune(store: Storage, args: argparse.Namespace) -> int:
    _backend(store, args.storage, args.display_name)
    if args.keep_results is not None and args.keep_results < args.older_than:
        raise _UserError(
            f"--keep-results ({_age_text(args.keep_results)}) must be at least --older-than "
            f"({_age_text(args.older_than)})"
        )
    report = prune(
        store, args.display_name, args.older_than, args.keep_results, dry_run=args.dry_run
    )
    if args.json:
        _print_json(report)
        return 0
    verb = "would remove" if args.dry_run else "removed"
    print(f"{args.display_name}: {verb} " + ", ".join(f"{len(v)} {k}" for k, v in report.items()))
    for job_id in report["jobs"]:
        print(f"  {job_id}")
    return 0


def _age_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86_400.0), ("h", 3600.0), ("m", 60.0)):
        if abs(seconds) >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


def _stats_text(stats: QueueStats) -> str:
    oldest = f" (oldest {_age_text(stats.oldest_queued_age)})" if stats.queued else ""
    lines = [
        f"{stats.display_name}: {stats.queued} queued{oldest}, {len(stats.running)} running, "
        f"{stats.finished} finished, {stats.failed} failed",
        *(
            f"  running {r.job_id} held by {r.holder}: lease age {_age_text(r.age)}, "
            f"expires in {_age_text(r.expires_in)}, attempt {r.attempts}"
            for r in stats.running
        ),
        f"  {stats.jobs_per_hour_last_hour:g} jobs/h over the last hour, "
        f"{stats.jobs_per_hour_last_day:.2g} over the last day; median submission to DONE "
        f"{_age_text(stats.median_seconds_to_done)}",
    ]
    return "\n".join(lines)


def _cmd_stats(store: Storage, args: argparse.Namespace) -> int:
    known: dict[str, dict[str, Doc]] = {}  # final statuses read, kept while watching

    if args.display_name:
        _backend(store, args.storage, args.display_name)

    broken: dict[str, str] = {}  # a backend whose figures cannot be read: why

    def every() -> dict[str, QueueStats | None]:
        names = [args.display_name] if args.display_name else get_backends(store)
        found: dict[str, QueueStats | None] = {}
        for name in names:
            try:
                found[name] = queue_stats(store, name, known=known.setdefault(name, {}))
            except TransientError:
                raise
            except SqstoreError as exc:
                if args.display_name:
                    raise
                found[name] = None  # one broken config hides no other backend
                broken[name] = f"backend {name!r} on {redact_url(args.storage)}: {exc}"
        return found

    def text(stats: dict[str, QueueStats | None]) -> str:
        return "\n".join(
            _stats_text(one) if one else f"{name}: broken" for name, one in stats.items()
        )

    if args.watch is not None:
        if not sys.stdout.isatty():
            raise _UserError("stats --watch needs a terminal; scripts use --json")
        if not 0 < args.watch < math.inf:
            raise _UserError("--watch takes a number of seconds > 0")
        while True:  # until Ctrl-C
            print("\033[H\033[J" + (text(every()) or "no backends"), flush=True)  # redraw
            time.sleep(args.watch)
    stats = every()
    if args.json:
        docs = {name: one and to_doc(one) for name, one in stats.items()}
        _print_json(docs[args.display_name] if args.display_name else docs)
    else:
        print(text(stats))
    sys.stdout.flush()
    for line in broken.values():
        print(f"sqstore: error: {line}", file=sys.stderr)
    return 1 if broken else 0


def _demo_key(url: str, key_file: str | None, kid: str) -> JWK:
    """The demo backend's private key: *key_file*, or a 0600 file beside a directory's
    documents, or a fresh key for ``memory://``, or ``./sqstore-demo-key.jwk``."""
    root = _local_root(url)
    if key_file is not None and key_file.startswith("env:"):
        return _load_jwk(key_file)  # kept by its owner: never made here
    if key_file is None and url.startswith("memory://"):
        return generate_keypair(kid)[0]
    path = key_file or (os.path.join(root, ".demo-key.jwk") if root else "sqstore-demo-key.jwk")
    if os.path.exists(path):
        return _load_jwk(path)
    if root is not None and key_file is None:
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as exc:
            raise _UserError(f"cannot create the storage {url}: {exc.strerror}") from None
    private, _ = generate_keypair(kid)
    _save_private(path, private)
    return private


def _demo_jobs(count: int, shots: int) -> Iterator[Doc]:
    for i in range(count):
        theta = math.pi * (i + 1) / (count + 1)
        yield {
            "experiment_0": {
                "instructions": [
                    ["h", [0], []],
                    ["cz", [0, 1], []],
                    ["h", [1], []],
                    ["rx", [2], [theta]],
                    ["measure", [0, 1, 2], []],
                ],
                "num_wires": 3,
                "shots": shots,
                "wire_order": "sequential",
                "seed": i,
            }
        }


def _cmd_demo(store: Storage, args: argparse.Namespace) -> int:
    display_name, username = "sqsim", "alice"
    start = time.perf_counter()
    private = _demo_key(args.storage, args.key, "sqsim-demo")
    public = public_from_private(private)
    config = demo_config(display_name, sign=True)
    root = _local_root(args.storage)
    key = args.key or (os.path.join(root, ".demo-key.jwk") if root else "sqstore-demo-key.jwk")
    _update_or_upload(store, config, display_name, private, key, redact_url(args.storage))
    upload_public_key(store, public, display_name)
    print(f"Bob:   backend {display_name!r} configured, results signed by kid {public.kid!r}")

    job_ids = []
    for job in _demo_jobs(args.jobs, args.shots):
        job_id = upload_job(store, job, display_name, username)
        upload_status(store, display_name, username, job_id)
        job_ids.append(job_id)
    jobs = f"{len(job_ids)} job{'' if len(job_ids) == 1 else 's'}"
    print(f"Alice: submitted {jobs}")

    done = work([store], display_name, run_simulator, private, burst=True)
    print(f"Bob:   claimed and simulated {done} job{'' if done == 1 else 's'}")

    verified = 0
    for job_id in job_ids:
        status = get_status(store, display_name, username, job_id)
        result = get_result(store, display_name, username, job_id)
        ok = verify_result(store, display_name, job_id)
        verified += ok
        counts: dict[str, int] = {}
        for outcome in result.results[0].data.memory if result.results else ():
            counts[outcome] = counts.get(outcome, 0) + 1
        top = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())[:4])
        print(f"Alice: {job_id} {status.status:5} {'verified' if ok else 'NOT VERIFIED'}  {top}")
    elapsed = time.perf_counter() - start
    print(
        f"{verified}/{len(job_ids)} results verified; "
        f"{jobs.replace('job', 'round trip')} in {elapsed * 1000:.0f} ms on "
        f"{redact_url(args.storage)}"
    )
    return 0 if verified == len(job_ids) else 1


def _cmd_copy(store: Storage | None, args: argparse.Namespace) -> int:
    # The source is only read; a lost answer is asked again (an upload finding itself is done).
    src = stack(_open(args.src), read_only, with_retry)
    dst = with_retry(_open(args.dst, create=True), ops=("get", "list", "upload"))
    interactive = sys.stderr.isatty()
    seen = 0

    def progress(counts: dict[str, dict[str, int]]) -> None:
        nonlocal seen
        seen += 1
        if interactive and seen % 20 == 0:
            print(f"\r\033[Kcopy: {seen} documents", end="", file=sys.stderr, flush=True)

    def warn(message: str) -> None:
        if interactive:
            print("\r\033[K", end="", file=sys.stderr)
        print(f"sqstore: copy: {message}", file=sys.stderr)

    try:
        counts = copy_storage(src, dst, verify=args.verify, progress=progress, warn=warn)
    finally:
        if interactive:
            print("\r\033[K", end="", file=sys.stderr, flush=True)
    if args.json:
        _print_json(counts)
    else:
        wide = max(map(len, counts)) + 2
        print(f"{'kind':<{wide}}" + "".join(f"{name:>10}" for name in _COPY_COUNTS))
        for kind, row in counts.items():
            print(f"{kind:<{wide}}" + "".join(f"{row[name]:>10}" for name in _COPY_COUNTS))
    return 1 if any(row["conflicts"] or row["rejected"] for row in counts.values()) else 0


def _load_executor(spec: str) -> Callable[[Doc, str, str], Any]:
    """``module:function`` (the working directory is importable, as with ``python -m``)."""
    import importlib

    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise _UserError(f"executor {spec!r}: give it as module:function")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise _UserError(f"executor {spec!r}: {type(exc).__name__}: {exc}") from None
    if not callable(func):
        raise _UserError(f"executor {spec!r} is not callable")
    return cast(Callable[[Doc, str, str], Any], func)


def _cmd_work(store: Storage | None, args: argparse.Namespace) -> int:
    import logging
    import signal
    import socket

    assert store is not None
    holder = f"{socket.gethostname()}:{os.getpid()}"  # LeasePolicy's holder=None, named
    policy = _policy(args, holder)
    if not 0 < args.poll <= threading.TIMEOUT_MAX:  # (--heartbeat 0: a beat at every claim)
        raise _UserError(f"--poll must be positive seconds that a wait can take, not {args.poll}")
    if args.max_jobs is not None and args.max_jobs < 1:
        raise _UserError("--max-jobs must be positive")
    executor = _load_executor(args.executor)
    private = _load_jwk(args.key) if args.key else None
    urls = [args.storage, *args.also]
    stores = [store, *(_open(url) for url in args.also)]
    for url, each in zip(urls, stores, strict=True):  # fail now, not once per poll
        cfg = _backend(each, url, args.display_name)
        if cfg.sign and private is None:
            raise _UserError(
                f"backend {args.display_name!r} on {redact_url(url)} signs: give its --key"
            )
        try:
            if cfg.sign and private is not None:
                check_signing_key(each, cfg, private)
        except BadSignatureError as exc:
            raise _UserError(f"{args.key}: not the key of {redact_url(url)}: {exc}") from None
    stop = threading.Event()
    logger = logging.getLogger("sqstore")
    errors = 0

    def count(record: logging.LogRecord) -> bool:
        nonlocal errors
        errors += record.levelno >= logging.ERROR
        return True

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    )
    handler.addFilter(count)
    kept = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(
        logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    )
    logger.propagate = False
    if args.verbose:  # one line per storage operation
        stores = [with_logging(each) for each in stores]

    def on_signal(signum: int, frame: Any) -> None:
        if stop.is_set():  # the second: abort the current job
            raise KeyboardInterrupt
        stop.set()  # before saying so: a second signal may come as soon as it is said
        logger.warning(
            f"{signal.Signals(signum).name}: stopping once the job that runs, if any, is done; "
            "send it again (Ctrl-C) to abort that job and put it back in its queue"
        )

    try:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, on_signal)
        logger.info(f"serving {args.display_name!r} on {', '.join(map(redact_url, urls))}")
        try:
            done = work(
                stores,
                args.display_name,
                executor,
                private,
                policy=policy,
                poll=args.poll,
                max_jobs=args.max_jobs,
                stop=stop,
                burst=args.burst,
            )
        except KeyboardInterrupt:
            logger.warning("aborted")
            _give_back(stores, urls, args.display_name, holder, private, logger)
            return 130
        logger.info(f"finished {done} job{'' if done == 1 else 's'}")
        if args.burst and not stop.is_set() and (args.max_jobs is None or done < args.max_jobs):
            for url, each in zip(urls, stores, strict=True):  # a job it could not claim
                if left := len(
                    each["list"](locate(each["layout"], "queued", args.display_name)[0])
                ):
                    logger.error(
                        f"{redact_url(url)}: {left} job{'' if left == 1 else 's'} left in the "
                        "queue that this worker could not claim (or that came in at the end)"
                    )
        return 1 if args.burst and errors else 0
    finally:
        logger.removeHandler(handler)
        logger.setLevel(kept[0])
        logger.propagate = kept[1]


def _give_back(
    stores: Sequence[Storage], urls: Sequence[str], dn: str, holder: str, key: Any, logger: Any
) -> None:
    """Put the jobs *holder* was running back in their queues."""
    for url, store in zip(urls, stores, strict=True):
        for job_id, lease in running_jobs(store, dn).items():
            if lease is not None and lease.holder == holder and requeue_job(store, dn, job_id, key):
                logger.warning(f"put {job_id} back in its queue on {redact_url(url)}")


_BENCH_SHOTS = 100


def _bench_result(job_id: str) -> ResultDict:
    memory = tuple(format(i % 8, "03b") for i in range(_BENCH_SHOTS))
    experiment = ExperimentDict({"name": "experiment_0"}, _BENCH_SHOTS, True, DataDict(memory))
    return ResultDict(
        display_name="bench", backend_version="0.1.0", job_id=job_id, status="DONE",
        results=(experiment,),
    )  # fmt: skip


def _bench_lifecycles(store: Storage, key: JWK | None, jobs: int, dn: str = "bench") -> float:
    """Run *jobs* job round trips one after another; return jobs per second."""
    job = {"experiment_0": {"instructions": [["h", [0], []]], "num_wires": 3, "shots": 100}}
    result = _bench_result("")
    done = StatusMsg("", "DONE", "Finished.", "None")
    start = time.perf_counter()
    for _ in range(jobs):
        job_id = upload_job(store, job, dn, "alice")
        upload_status(store, dn, "alice", job_id)
        claimed = claim_job(store, dn, key)
        assert claimed is not None and claimed[0].job_id == job_id
        finished = attrs.evolve(result, job_id=job_id)
        status = attrs.evolve(done, job_id=job_id)
        update_in_database(store, finished, status, job_id, dn, key)
        get_status(store, dn, "alice", job_id)
        get_result(store, dn, "alice", job_id)
    return jobs / (time.perf_counter() - start)


def _bench_ops(store: Storage, key: JWK | None) -> dict[str, int]:
    """Count the storage calls of one round trip, per verb (failed calls among them)."""
    counts: dict[str, int] = {}
    _bench_lifecycles(store, key, 1)  # the first heartbeat is not part of every round trip
    _bench_lifecycles(with_metrics(store, counts=counts), key, 1)
    return {op: counts[op] for op in store if op in counts}  # in the handle's order


_FLOOR_OPS = (
    "Alice: create job (temp + create-only rename), read config, create status",
    "Bob: read config (heartbeat), list queue (amortised), create lease, rename job to running,"
    " read job, read config, read lease, lock + read + replace lease, create result,"
    " rename job to finished, stat + replace status, lock + read + unlink lease",
    "Alice: read status, read result, read config",
)
"""The file operations of one job life in sqstore, which the floor does in plain os + json."""


def _bench_raw(root: str, jobs: int) -> float:
    """The floor: the file operations of a sqstore job life (`_FLOOR_OPS`), in plain os
    and json, with a create-only rename where sqstore has one; return jobs per second."""
    import fcntl

    noreplace = _renameat2_noreplace()
    seq = [0]

    def temp_of(folder: str, name: str, doc: Doc) -> str:
        temp = f"{folder}/.{name}.{seq[0]}.tmp"
        seq[0] += 1
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, json.dumps(doc).encode())
        os.close(fd)
        return temp

    def create(folder: str, name: str, doc: Doc) -> None:
        temp = temp_of(folder, name, doc)
        if noreplace is not None:
            noreplace(-100, temp, -100, f"{folder}/{name}.json")  # AT_FDCWD
        else:
            os.link(temp, f"{folder}/{name}.json")
            os.unlink(temp)

    def replace(folder: str, name: str, doc: Doc) -> None:
        os.replace(temp_of(folder, name, doc), f"{folder}/{name}.json")

    def read(folder: str, name: str) -> Doc:
        with open(f"{folder}/{name}.json", "rb") as handle:
            doc: Doc = json.loads(handle.read())
        return doc

    def locked(folder: str, name: str, new: Doc | None) -> None:
        lock = os.open(f"{folder}/.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            read(folder, name)
            if new is None:
                os.unlink(f"{folder}/{name}.json")
            else:
                replace(folder, name, new)
        finally:
            os.close(lock)

    base = f"{root}/raw"
    configs = f"{base}/configs"
    queue, running, leases = f"{base}/queued", f"{base}/running", f"{base}/leases"
    status_dir, results, finished = f"{base}/status", f"{base}/results", f"{base}/finished"
    for folder in (configs, queue, running, leases, status_dir, results, finished):
        os.makedirs(folder, exist_ok=True)
    create(configs, "bench", to_doc(demo_config("bench")))
    job = {"experiment_0": {"instructions": [["h", [0], []]], "num_wires": 3, "shots": 100}}
    start = time.perf_counter()
    for _ in range(jobs):
        job_id = os.urandom(12).hex()
        create(queue, job_id, job)
        read(configs, "bench")
        create(status_dir, job_id, {"job_id": job_id, "status": "INITIALIZING"})
        read(configs, "bench")
        name = sorted(os.listdir(queue))[0][:-5]  # one listing per job: a queue of one
        create(leases, name, {"job_id": name, "holder": "raw", "expires": 0.0})
        os.rename(f"{queue}/{name}.json", f"{running}/{name}.json")
        read(running, name)
        read(configs, "bench")
        read(leases, name)
        locked(leases, name, {"job_id": name, "holder": "raw", "expires": 0.0, "finish": {}})
        create(results, name, to_doc(_bench_result(name)))
        os.rename(f"{running}/{name}.json", f"{finished}/{name}.json")
        os.stat(f"{status_dir}/{name}.json")
        replace(status_dir, name, {"job_id": name, "status": "DONE"})
        locked(leases, name, None)
        read(status_dir, name)
        read(results, name)
        read(configs, "bench")
    return jobs / (time.perf_counter() - start)


def _bench_sqooler(root: str, jobs: int) -> float | None:
    """sqooler 0.9's local provider through the same job life; None if it cannot be imported."""
    try:
        warnings.filterwarnings("ignore", module="pydantic")  # its own, at import
        from sqooler.schemes import (  # type: ignore[import-not-found, import-untyped, unused-ignore]
            BackendConfigSchemaIn,
            LocalLoginInformation,
            StatusMsgDict,
        )
        from sqooler.schemes import ResultDict as SqoolerResult
        from sqooler.storage_providers.local import (  # type: ignore[import-not-found, import-untyped, unused-ignore]
            LocalProviderExtended,
        )
    except ImportError:
        return None
    provider = LocalProviderExtended(LocalLoginInformation(base_path=root), "local")
    provider.upload_config(BackendConfigSchemaIn(**to_doc(demo_config("bench"))), "bench")
    job = {"experiment_0": {"instructions": [["h", [0], []]], "num_wires": 3, "shots": 100}}
    start = time.perf_counter()
    for _ in range(jobs):
        job_id = provider.upload_job(job, "bench", "alice")
        provider.upload_status("bench", "alice", job_id)
        nxt = provider.get_next_job_in_queue("bench")
        provider.get_job(nxt.job_json_path, nxt.job_id)
        result = SqoolerResult(**to_doc(_bench_result(nxt.job_id)))
        status = StatusMsgDict(job_id=nxt.job_id, status="DONE", detail="ok", error_message="None")
        provider.update_in_database(result, status, nxt.job_id, "bench")
        provider.get_status("bench", "alice", job_id)
        provider.get_result("bench", "alice", job_id)
    return jobs / (time.perf_counter() - start)


def _bench_sqooler_claims(root: str, queued: int, claims: int) -> float | None:
    """Microseconds per sqooler 0.9 ``get_next_job_in_queue`` with *queued* jobs queued."""
    try:
        warnings.filterwarnings("ignore", module="pydantic")  # its own, at import
        from sqooler.schemes import LocalLoginInformation
        from sqooler.storage_providers.local import LocalProviderExtended
    except ImportError:
        return None
    store = local_storage(root)
    upload_config(store, demo_config("bench"), "bench")
    for _ in range(queued):
        upload_job(store, {"e": {}}, "bench", "alice")
    provider = LocalProviderExtended(LocalLoginInformation(base_path=root), "local")
    start = time.perf_counter()
    for _ in range(min(claims, queued)):
        provider.get_next_job_in_queue("bench")
    return (time.perf_counter() - start) / min(claims, queued) * 1e6


def _bench_drain(
    store: Storage, queued: int, how: str, dn: str = "bench", rounds: int = 1
) -> float:
    """Fill a queue with *queued* jobs, then drain it with *how* (``claim_job`` called once
    per job, ``work`` with an executor that returns at once, or ``claim_jobs``), *rounds*
    times over (a short queue again and again): microseconds per job claimed."""
    elapsed = 0.0
    for _ in range(rounds):
        for _ in range(queued):
            upload_job(store, {"e": {}}, dn, "alice")
        start = time.perf_counter()
        if how == "claim_job":
            done = sum(1 for _ in iter(functools.partial(claim_job, store, dn), None))
        elif how == "work":
            done = work(
                [store], dn, lambda job, job_id, name: _bench_result(job_id), max_jobs=queued
            )
        else:
            done = sum(1 for _ in claim_jobs(store, dn))
        elapsed += time.perf_counter() - start
        if done != queued:
            raise AssertionError(f"{how} drained {done} of {queued} queued jobs")
    return elapsed / (rounds * queued) * 1e6


def _fs_type(path: str) -> str:
    """The file system type of *path* (Linux: from /proc/mounts), or "" if unknown."""
    best, kind = "", ""
    with contextlib.suppress(OSError), open("/proc/mounts") as mounts:
        real = os.path.realpath(path)
        for line in mounts:
            fields = line.split()
            point = fields[1]
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if len(fields) > 2 and inside and len(point) >= len(best):
                best, kind = point, fields[2]
    return kind


def _bench_verify(store: Storage, job_ids: list[str]) -> tuple[float, float, float]:
    """Return verify_result per second (reading the key, then given it) and bare verifies."""
    from nacl.signing import VerifyKey

    public = get_public_key(store, "bench")
    rates = []
    for key in (None, public):
        start = time.perf_counter()
        for job_id in job_ids:
            if not verify_result(store, "bench", job_id, public_jwk=key):
                raise AssertionError(f"result {job_id} does not verify")
        rates.append(len(job_ids) / (time.perf_counter() - start))
    raw = store["get"](*locate(store["layout"], "result", "bench", job_id=job_ids[0]))
    signing_input, signature = _signing_input(_open_signed(raw)[0])
    verify_key = VerifyKey(_key_bytes(public, "x"))
    rounds = max(len(job_ids), 200)
    start = time.perf_counter()
    for _ in range(rounds):
        verify_key.verify(signing_input, signature)
    return rates[0], rates[1], rounds / (time.perf_counter() - start)


def _import_ms(runs: int = 5) -> float:
    """Median cumulative import time of sqstore in fresh interpreters, in milliseconds.

    Measured as an installed module is imported: from its compiled bytecode, which
    a first, unmeasured import writes if it is missing.
    """
    import statistics
    import subprocess

    folder = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = folder
    times = []
    for _ in range(runs + 1):
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", "import sqstore"],
            capture_output=True, text=True, check=True, env=env,
        )  # fmt: skip
        lines = [line for line in proc.stderr.splitlines() if line.rstrip().endswith("| sqstore")]
        times.append(int(lines[-1].split("|")[1]) / 1000)
    return statistics.median(times[1:])


def _install_mib(names: Sequence[str] = ("attrs", "cattrs", "pynacl")) -> float:
    """Size on disk of the installed core dependencies and what they require."""
    import importlib.metadata as metadata

    seen: set[str] = set()
    total = 0
    todo = list(names)
    while todo:
        name = re.split(r"[ ;<>=!~\[(]", todo.pop(), maxsplit=1)[0].lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for file in dist.files or ():
            path = file.locate()
            total += os.path.getsize(path) if os.path.isfile(path) else 0
        todo += [r for r in dist.requires or () if "extra ==" not in r]
    return total / 2**20


def _bench(root: str, jobs: int, repeats: int, queue: int, progress: Callable[[str], None]) -> Doc:
    import statistics
    import tempfile

    def fresh(name: str, sign: bool) -> tuple[Storage, JWK | None]:
        store = local_storage(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
        private, public = generate_keypair("benchkey")
        key = private if sign else None
        upload_config(store, demo_config("bench", sign=sign), "bench", key)
        if sign:
            upload_public_key(store, public, "bench")
        return store, key

    def median(name: str, run: Callable[[], float], times: int = repeats) -> float:
        values = []
        for i in range(times):
            progress(f"{name} {i + 1}/{times}")
            values.append(run())
        return statistics.median(values)

    def round_trips(sign: bool) -> float:
        return _bench_lifecycles(*fresh("round-trips", sign), jobs)

    def raw() -> float:
        return _bench_raw(tempfile.mkdtemp(prefix="raw-", dir=root), jobs)

    def claims(queued: int) -> float:
        return _bench_drain(fresh("claims", False)[0], queued, "claim_jobs")

    def sqooler() -> float | None:
        return _bench_sqooler(tempfile.mkdtemp(prefix="sqooler-", dir=root), jobs)

    def verify_rates() -> tuple[float, float, float]:
        store, key = fresh("verify", True)
        _bench_lifecycles(store, key, jobs)
        finished = locate(store["layout"], "finished", "bench")[0]
        return _bench_verify(store, store["list"](finished))

    figures: Doc = {
        "storage": "local",
        "jobs": jobs,
        "repeats": repeats,
        "python": sys.version.split()[0],
        "machine": f"{os.uname().sysname} {os.uname().machine}, {os.cpu_count()} CPUs",
        "claim_us_100": median("claims, 100 queued", lambda: claims(100)),
        "long_queue": queue,
        "claim_us_long": median(
            f"claims, {queue} queued", lambda: claims(queue), times=min(repeats, 3)
        ),
    }
    figures["fs_type"] = _fs_type(root)
    figures["floor_ops"] = list(_FLOOR_OPS)
    for name in ("claim_job", "work"):
        for size, times in ((100, repeats), (queue, min(repeats, 3))):
            rounds = max(1, 2000 // size) if name == "claim_job" else 1  # up to 2,000 claims
            figures[f"{name}_us_{size}"] = median(
                f"{name}, {size} queued",
                functools.partial(
                    lambda n, tag, r: _bench_drain(fresh(tag, False)[0], n, tag, rounds=r),
                    size, name, rounds,
                ),
                times=times,
            )  # fmt: skip
    sqooler_claims = [
        _bench_sqooler_claims(tempfile.mkdtemp(prefix="sqooler-", dir=root), size, 200)
        for size in (100, queue)
    ]
    if sqooler_claims[0] is not None and sqooler_claims[1] is not None:
        figures["sqooler_claim_us_100"], figures["sqooler_claim_us_long"] = sqooler_claims
    runs: dict[str, list[float]] = {"round_trip_unsigned": [], "round_trip_signed": []}
    runs["raw_baseline"], runs["sqooler_round_trip"] = [], []
    for i in range(repeats):  # interleaved, so that a slow spell of the disk hits them all
        progress(f"round trips {i + 1}/{repeats}")
        runs["round_trip_unsigned"].append(round_trips(False))
        runs["round_trip_signed"].append(round_trips(True))
        runs["raw_baseline"].append(raw())
        if (rate := sqooler()) is not None:
            runs["sqooler_round_trip"].append(rate)
    if not runs["sqooler_round_trip"]:
        del runs["sqooler_round_trip"]
    figures.update({name: statistics.median(values) for name, values in runs.items()})
    pairs_of_runs = list(
        zip(
            runs["round_trip_unsigned"],
            runs["round_trip_signed"],
            runs["raw_baseline"],
            strict=True,
        )
    )
    figures["ops_per_round_trip"] = _bench_ops(*fresh("ops", False))
    pairs = [verify_rates() for _ in range(repeats)]
    figures["verify_result"] = statistics.median(p[0] for p in pairs)
    figures["verify_result_key_given"] = statistics.median(p[1] for p in pairs)
    figures["bare_verify"] = statistics.median(p[2] for p in pairs)
    figures["ratios"] = {  # medians of ratios within each repeat, where runs come in pairs
        "round_trip_per_raw": statistics.median(u / r for u, _, r in pairs_of_runs),
        "signed_per_unsigned": statistics.median(s / u for u, s, _ in pairs_of_runs),
        "verify_per_bare": statistics.median(v / b for v, _, b in pairs),
        "verify_key_given_per_bare": statistics.median(v / b for _, v, b in pairs),
        "long_queue_claim_per_short": figures["claim_us_long"] / figures["claim_us_100"],
        "claim_job_long_per_short": figures[f"claim_job_us_{queue}"] / figures["claim_job_us_100"],
        "work_long_per_short": figures[f"work_us_{queue}"] / figures["work_us_100"],
    }
    if "sqooler_round_trip" in runs:
        figures["ratios"]["round_trip_per_sqooler"] = statistics.median(
            u / q
            for u, q in zip(runs["round_trip_unsigned"], runs["sqooler_round_trip"], strict=True)
        )
    progress("import time")
    figures["import_ms"] = _import_ms()
    figures["core_install_mib"] = _install_mib()
    return figures


def _bench_remote(
    store: Storage, dn: str, calls: list[str], sizes: Sequence[int], jobs: int, repeats: int,
    progress: Any,
) -> Doc:  # fmt: skip
    """Calls per lifecycle and per claim (counted into *calls* by the caller), round trips
    per second and claim cost, on backend *dn*; the caller removes its documents."""
    import statistics

    figures: Doc = {"jobs": jobs, "repeats": repeats, "backend": dn}
    upload_config(store, demo_config(dn), dn)
    _bench_lifecycles(store, None, 1, dn)  # the first heartbeat is not part of every life
    calls.clear()
    _bench_lifecycles(store, None, 1, dn)
    figures["calls_per_round_trip"] = {c: calls.count(c) for c in sorted(set(calls))}
    rates = []
    for run in range(repeats):
        progress(f"round trips {run + 1}/{repeats}")
        rates.append(_bench_lifecycles(store, None, jobs, dn))
    figures["round_trip_unsigned"] = statistics.median(rates)
    for size in sizes:
        times = max(1, min(repeats, 3) if size > 1000 else repeats)
        costs, counted = [], []
        for run in range(times):
            progress(f"claims, {size} queued {run + 1}/{times}")
            before = len(calls)
            costs.append(_bench_drain(store, size, "claim_jobs", dn))
            counted.append((len(calls) - before - size) / size)  # less the uploads that fill it
        figures[f"claim_us_{size}"] = statistics.median(costs)
        figures[f"claim_calls_{size}"] = statistics.median(counted)
    figures["sizes"] = list(sizes)
    short, long = f"claim_us_{sizes[0]}", f"claim_us_{sizes[-1]}"
    figures["ratios"] = {"long_queue_claim_per_short": figures[long] / figures[short]}
    return figures


def _bench_mongodb(uri: str, jobs: int, repeats: int, queue: int, progress: Any) -> Doc:
    """Commands per lifecycle, round trips and claim cost on a MongoDB server; cleans up."""
    import pymongo  # type: ignore[import-not-found, import-untyped, unused-ignore]
    from pymongo import monitoring  # type: ignore[import-not-found, import-untyped, unused-ignore]

    commands: list[str] = []

    class Counter(monitoring.CommandListener):  # type: ignore[misc, unused-ignore]
        def started(self, event: Any) -> None:
            if event.command_name not in ("ismaster", "isMaster", "hello", "ping"):
                commands.append(event.command_name)

        def succeeded(self, event: Any) -> None:
            pass

        def failed(self, event: Any) -> None:
            pass

    client: Any = pymongo.MongoClient(uri, event_listeners=[Counter()])
    dn = f"bench{os.urandom(4).hex()}"  # a backend of its own, removed at the end
    store = mongodb_storage(client)
    try:
        sizes = sorted({10, 1000, queue})
        figures = _bench_remote(store, dn, commands, sizes, jobs, repeats, progress)
    finally:  # the claimed jobs stay running, leased: remove them with their leases

        def collection(kind: str) -> Any:
            database, *rest = locate(store["layout"], kind, dn)[0].split("/")
            return client[database][".".join(rest)]

        leases = collection("lease")
        claimed = [lease["_id"] for lease in leases.find({"display_name": dn}, {"_id": 1})]
        for kind in ("running", "lease"):
            collection(kind).delete_many({"_id": {"$in": claimed}})
        for kind in ("queued", "finished", "status", "result"):
            collection(kind).drop()
        with contextlib.suppress(NotFoundError):
            store["delete"](*locate(store["layout"], "config", dn))
        client.close()
    return {"storage": "mongodb", **figures}


def _bench_dropbox(url: str, jobs: int, repeats: int, queue: int, progress: Any) -> Doc:
    """HTTP requests per lifecycle and per claim, round trips and claim cost on Dropbox."""
    import dropbox  # type: ignore[import-not-found, import-untyped, unused-ignore]
    from dropbox import dropbox_client  # type: ignore[import-not-found, import-untyped, unused-ignore]

    credentials = _dropbox_credentials(url)  # before anything is built
    requests_made: list[str] = []
    session = dropbox_client.create_session()
    session.hooks["response"].append(lambda r, *args, **kwargs: requests_made.append(
        r.request.path_url.partition("?")[0].removeprefix("/2/")))  # fmt: skip
    client = dropbox.Dropbox(
        app_key=credentials["app_key"],
        app_secret=credentials["app_secret"],
        oauth2_refresh_token=credentials["refresh_token"],
        session=session,
    )
    dn = f"bench{os.urandom(4).hex()}"
    store = dropbox_storage(client=client)
    try:
        sizes = sorted({10, queue})
        figures = _bench_remote(store, dn, requests_made, sizes, jobs, repeats, progress)
    finally:  # this backend's folders, then its running jobs and leases (dated ids name it)
        layout = DROPBOX_LAYOUT
        for folder in (layout.configs + "/{display_name}", layout.queued, layout.finished,
                       layout.status, layout.results):  # fmt: skip
            with contextlib.suppress(dropbox.exceptions.ApiError):
                client.files_delete_v2("/" + folder.split("{display_name}")[0] + dn)
        for folder in (layout.running, layout.leases):
            for file_id in store["list"](folder):
                if f"-{dn}-" in file_id:
                    with contextlib.suppress(NotFoundError):
                        store["delete"](folder, file_id)
    return {"storage": "dropbox", **figures}


_BENCH_TARGETS = (
    ("round trip / floor (same file operations)", "round_trip_per_raw", ">=", 0.85),
    ("round trip / sqooler 0.9, on a tmpfs", "round_trip_per_sqooler", ">=", 2.5),
    ("round trip / sqooler 0.9, on a disk", "round_trip_per_sqooler", ">=", 1.5),
    ("signed / unsigned round trip", "signed_per_unsigned", ">=", 0.85),
    ("verify_result / bare verify", "verify_per_bare", ">=", 0.50),
    ("  the same, public key given", "verify_key_given_per_bare", ">=", 0.50),
    ("claim_job per job, long queue / 100 queued", "claim_job_long_per_short", "<=", 1.5),
    ("work() per job, long queue / 100 queued", "work_long_per_short", "<=", 1.5),
    ("claim_jobs per job, long queue / 100 queued", "long_queue_claim_per_short", "<=", 1.5),
)


def _bench_table(f: Doc) -> str:
    """The figures *f* of a bench run (local, or on a server) as the table it prints: a
    row per figure, a row per target (met or MISSED); a local run then says what the
    floor does."""
    trip = (f"round trip ({_BENCH_SHOTS} shots)", f"{f['round_trip_unsigned']:.0f} jobs/s", "")
    if f["storage"] == "local":
        tmpfs = f.get("fs_type") == "tmpfs"
        head = (
            f"sqstore bench: {f['storage']} storage ({f.get('fs_type') or 'unknown fs'}), "
            f"{f['jobs']} jobs x {f['repeats']} repeats, medians; Python {f['python']}, "
            f"{f['machine']}"
        )
        rows = [
            trip,
            ("round trip, signed", f"{f['round_trip_signed']:.0f} jobs/s", ""),
            ("raw baseline (plain os + json)", f"{f['raw_baseline']:.0f} jobs/s", ""),
            ("sqooler 0.9 round trip, same life", f"{f.get('sqooler_round_trip', 0):.0f} jobs/s",
             "" if "sqooler_round_trip" in f else "sqooler not importable"),
            ("claim_jobs draining 100 queued", f"{f['claim_us_100']:.0f} us/job", ""),
            (f"claim_jobs draining {f['long_queue']} queued", f"{f['claim_us_long']:.0f} us/job",
             ""),
            *((f"{name} draining {n} queued", f"{f[f'{name}_us_{n}']:.0f} us/job", "")
              for name in ("claim_job", "work") for n in (100, f["long_queue"])),
            *((f"sqooler get_next_job_in_queue, {n} queued", f"{f[key]:.0f} us/job", "200 calls")
              for n, key in ((100, "sqooler_claim_us_100"),
                             (f["long_queue"], "sqooler_claim_us_long")) if key in f),
            ("storage calls per round trip", str(sum(f["ops_per_round_trip"].values())),
             " ".join(f"{op} {n}" for op, n in f["ops_per_round_trip"].items() if n)),
            ("verify_result (reads config and key)", f"{f['verify_result']:.0f} /s", ""),
            ("verify_result, public key given", f"{f['verify_result_key_given']:.0f} /s", ""),
            ("bare PyNaCl verify, same input", f"{f['bare_verify']:.0f} /s", ""),
            ("import sqstore (cumulative)", f"{f['import_ms']:.0f} ms", "< 100 ms"),
            ("core install (attrs, cattrs, pynacl)", f"{f['core_install_mib']:.1f} MiB",
             "< 10 MiB"),
        ]  # fmt: skip
        targets = [  # of the two sqooler targets, the one of this kind of storage
            t for t in _BENCH_TARGETS
            if t[1] != "round_trip_per_sqooler" or ("tmpfs" in t[0]) == tmpfs
        ]  # fmt: skip
        tail = ["floor: the file operations of one sqstore job life, in plain os + json:"]
        tail += [f"  {line}" for line in f.get("floor_ops", ())]
    else:
        what = "commands" if f["storage"] == "mongodb" else "HTTP requests"
        calls, sizes = f["calls_per_round_trip"], f["sizes"]
        head = (
            f"sqstore bench: {f['storage']} storage, {f['jobs']} jobs x {f['repeats']} repeats, "
            "medians"
        )
        rows = [
            trip,
            (f"{what} per round trip", str(sum(calls.values())),
             " ".join(f"{name} {n}" for name, n in calls.items())),
            *((f"claim while draining {n} queued", f"{f[f'claim_us_{n}']:.0f} us/job",
               f"{f[f'claim_calls_{n}']:.2f} {what} per claim") for n in sizes),
        ]  # fmt: skip
        label = f"claim, {sizes[-1]} / {sizes[0]} queued"
        targets = [(label, "long_queue_claim_per_short", "<=", 1.5)]
        tail = []
    for label, name, op, target in targets:
        if name not in f["ratios"]:
            rows.append((label, "-", "not measured"))
            continue
        ratio = f["ratios"][name]
        ok = ratio >= target if op == ">=" else ratio <= target
        rows.append((label, f"{ratio:.2f}", f"{op} {target:.2f} {'met' if ok else 'MISSED'}"))
    width = max(len(r[0]) for r in rows)
    return "\n".join([head, *(f"{a:<{width}}  {b:>14}  {c}" for a, b, c in rows), *tail])


def _cmd_bench(store: Storage | None, args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    if min(args.jobs, args.repeats, 1 if args.queue is None else args.queue) < 1:
        raise _UserError("--jobs, --repeats and --queue must be at least 1")
    interactive = sys.stderr.isatty()

    def progress(text: str) -> None:
        if interactive:
            print(f"\r\033[Kbench: {text}", end="", file=sys.stderr, flush=True)

    remote = args.storage.partition("://")[0] in ("mongodb", "mongodb+srv", "dropbox")
    if not remote and _local_root(args.storage) is None:
        raise _UserError(
            f"bench runs on a directory, mongodb:// or dropbox://, not {redact_url(args.storage)}"
        )
    parent = args.bench_dir
    if parent is not None and not os.path.isdir(parent):
        raise _UserError(f"{parent} is not a directory")
    root = "" if remote else tempfile.mkdtemp(prefix="sqstore-bench-", dir=parent)
    try:
        if args.storage.startswith("dropbox://"):
            queue = 100 if args.queue is None else args.queue
            figures = _bench_dropbox(args.storage, args.jobs, args.repeats, queue, progress)
        elif remote:
            queue = 10_000 if args.queue is None else args.queue
            figures = _bench_mongodb(args.storage, args.jobs, args.repeats, queue, progress)
        else:
            queue = 10_000 if args.queue is None else args.queue
            figures = _bench(root, args.jobs, args.repeats, queue, progress)
    finally:
        if root:
            shutil.rmtree(root, ignore_errors=True)
        progress("")
        if interactive:
            print("\r\033[K", end="", file=sys.stderr, flush=True)
    print(json.dumps(figures, indent=2) if args.json else _bench_table(figures))
    return 0


def _parser() -> argparse.ArgumentParser:
    import argparse

    parser = argparse.ArgumentParser(
        prog="sqstore",
        description="Storage for a quantum-cloud job exchange (sqooler-compatible).",
    )
    parser.add_argument("--version", action="version", version=f"sqstore {__version__}")
    parser.add_argument(
        "--storage",
        metavar="URL",
        help="a directory, file:///path, memory://, mongodb://... or dropbox:// "
        f"(default: $SQSTORE_STORAGE or {_DEFAULT_STORAGE})",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, func: Any, help_text: str, creates: bool = False, within: Any = sub
    ) -> argparse.ArgumentParser:
        cmd: argparse.ArgumentParser = within.add_parser(
            name, help=help_text, description=help_text
        )
        cmd.set_defaults(func=func, creates=creates)
        return cmd

    demo = command("demo", _cmd_demo, "run Alice and Bob end to end on the storage", True)
    demo.add_argument("--jobs", type=int, default=3, help="jobs to submit (default 3)")
    demo.add_argument("--shots", type=int, default=100, help="shots per job (default 100)")
    demo.add_argument(
        "--key",
        metavar="FILE",
        help="the demo backend's private JWK, made if missing (default: .demo-key.jwk in a "
        "storage directory; ./sqstore-demo-key.jwk for other storages); env:NAME reads it "
        "from the environment variable NAME or ./.env",
    )
    bench = command("bench", _cmd_bench, "measure round trips, claims and verification")
    bench.add_argument("--jobs", type=int, default=200, help="jobs per run (default 200)")
    bench.add_argument("--repeats", type=int, default=5, help="runs per figure (default 5)")
    bench.add_argument(
        "--queue",
        type=int,
        help="the long queue to drain (default 10000; 100 on Dropbox, one request per job)",
    )
    bench.add_argument("--json", action="store_true", help="print the figures as JSON")
    bench.add_argument(
        "--dir", dest="bench_dir", metavar="DIR",
        help="where to make the temporary storage (default: the system's temp folder)",
    )  # fmt: skip
    keygen = command("keygen", _cmd_keygen, "make an Ed25519 key pair; public JWK to stdout")
    keygen.add_argument("kid", help="the key id")
    keygen.add_argument(
        "-o",
        "--private-key",
        metavar="FILE",
        help="where to write the private JWK (default KID.jwk; never overwritten)",
    )
    submit = command("submit", _cmd_submit, "queue a job (JSON file, - for stdin); prints its id")
    submit.add_argument("display_name")
    submit.add_argument("job_file")
    for name, func, text in (
        ("status", _cmd_status, "print a job's status as JSON"),
        ("result", _cmd_result, "print a job's result as JSON"),
        ("verify", _cmd_verify, "check a result's signature (exit 1 if not valid)"),
    ):
        cmd = command(name, func, text)
        cmd.add_argument("display_name")
        cmd.add_argument("job_id")
        cmd.add_argument("-u", "--username", default="cli", help="the job's user")
    cmd.add_argument(
        "--job", action="store_true",
        help="check the chain: the job signed by its user, the result by the backend, for it",
    )  # fmt: skip
    submit.add_argument("-u", "--username", default="cli", help="who submits (default cli)")
    submit.add_argument(
        "--key", metavar="FILE",
        help="sign the job with the user's private JWK (or env:NAME); its public half is "
        "published as a user key",
    )  # fmt: skip
    cancel = command(
        "cancel", _cmd_cancel, "cancel a job (prints cancelled, requested or finished)"
    )
    cancel.add_argument("display_name")
    cancel.add_argument("job_id")
    cancel.add_argument(
        "-u", "--username", default="cli",
        help="who cancels, as the status will say (not checked against the job's user)",
    )  # fmt: skip
    submit.add_argument(
        "--token", metavar="T",
        help="a name for this submit: run again with the same T, it prints the same job id "
        "and queues nothing more",
    )  # fmt: skip
    copy = command("copy", _cmd_copy, "copy every document from one storage to another")
    copy.add_argument("src", metavar="SRC", help="the storage URL to copy from")
    copy.add_argument("dst", metavar="DST", help="the storage URL to copy to (nothing overwritten)")
    copy.add_argument("--verify", action="store_true", help="copy no signed document that fails")
    copy.add_argument("--json", action="store_true", help="print the counts as JSON")
    work_ = command("work", _cmd_work, "run Bob's worker loop until SIGTERM or Ctrl-C")
    work_.add_argument("display_name")
    work_.add_argument(
        "executor",
        nargs="?",
        metavar="MODULE:FUNCTION",
        default="sqstore:run_simulator",
        help="module:function called as f(job, job_id, display_name) -> result "
        "(default sqstore:run_simulator)",
    )
    work_.add_argument(
        "--key",
        metavar="FILE",
        help="the backend's private JWK, to sign; env:NAME reads it from the environment "
        "variable NAME or ./.env (e.g. env:PRIVATE_JWK_STR, as sqooler keeps it)",
    )
    work_.add_argument(
        "--also", metavar="URL", action="append", default=[],
        help="another storage to serve, in turn with --storage (repeatable)",
    )  # fmt: skip
    _policy_options(work_, "lease", "heartbeat", "skew", "max_attempts")
    work_.add_argument(
        "--poll", type=float, default=1.0, metavar="SECONDS",
        help="seconds to wait when every queue is empty (default 1)",
    )  # fmt: skip
    work_.add_argument("--max-jobs", type=int, metavar="N", help="stop after this many jobs")
    work_.add_argument(
        "--burst", action="store_true",
        help="exit once every queue is empty (exit 1 if a storage could not be read)",
    )  # fmt: skip
    loud = work_.add_mutually_exclusive_group()
    loud.add_argument(
        "-v", "--verbose", action="store_true", help="log every storage operation too"
    )
    loud.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    command("backends", _cmd_backends, "list backends with their status")
    queue = command("queue", _cmd_queue, "list a backend's queued job ids, oldest first")
    queue.add_argument("display_name")
    backend = command("backend", None, "register a backend, or show its config")
    verbs = backend.add_subparsers(dest="verb", required=True, metavar="VERB")
    add = command(
        "add", _cmd_backend_add, "upload or update a backend's config from a JSON file; "
        "signed, and its public key published, when the config signs", True, verbs,
    )  # fmt: skip
    add.add_argument("config_file", metavar="CONFIG.json", help="the config (- for stdin)")
    add.add_argument("--key", metavar="FILE", help="the backend's private JWK, or env:NAME")
    show = command("show", _cmd_backend_show, "print a backend's config as JSON", within=verbs)
    show.add_argument("display_name")
    running = command(
        "running", _cmd_running,
        "list a backend's running jobs: id, holder, lease expiry, claims, and live, overdue "
        "(past its time, within the skew) or expired (a sweep takes it back)",
    )  # fmt: skip
    running.add_argument("display_name")
    _policy_options(running, "skew")
    requeue = command(
        "requeue", _cmd_requeue,
        "put a running job back in its queue now (a dead worker's); without JOB_ID, "
        "the running jobs whose lease expired",
    )  # fmt: skip
    requeue.add_argument("display_name")
    requeue.add_argument("job_id", nargs="?")
    requeue.add_argument("--key", metavar="FILE", help="to sign a status, when the backend signs")
    _policy_options(requeue, "lease", "skew", "max_attempts")
    prune_ = command("prune", _cmd_prune, "remove a backend's jobs that finished long ago")
    prune_.add_argument("display_name")
    prune_.add_argument(
        "--older-than", type=_duration, required=True, metavar="AGE",
        help="remove jobs finished longer ago than AGE (90s, 15m, 12h, 30d)",
    )  # fmt: skip
    prune_.add_argument(
        "--keep-results", type=_duration, metavar="AGE",
        help="keep statuses and results until AGE (default: as --older-than)",
    )  # fmt: skip
    prune_.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    prune_.add_argument("--json", action="store_true", help="print what was removed as JSON")
    stats = command("stats", _cmd_stats, "show the queue of one backend, or of each")
    stats.add_argument("display_name", nargs="?")
    stats.add_argument("--json", action="store_true", help="print the figures as JSON")
    stats.add_argument(
        "--watch", type=float, nargs="?", const=2.0, metavar="SECONDS",
        help="on a terminal, redraw every SECONDS (default 2) until Ctrl-C",
    )  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args = _parser().parse_args(argv)
    args.storage = args.storage or os.environ.get("SQSTORE_STORAGE") or _DEFAULT_STORAGE
    shown = ""  # the storage, to name in an error that does not
    try:
        if args.command == "demo" and (args.jobs < 1 or args.shots < 1):
            raise _UserError("--jobs and --shots must be at least 1")
        store = None
        if args.command not in ("keygen", "bench", "copy"):
            store = _open(args.storage, create=args.creates)
            shown = redact_url(args.storage)
        code: int = args.func(store, args)
        sys.stdout.flush()
        return code
    except (_UserError, ValueError) as exc:
        print(f"sqstore: error: {exc}", file=sys.stderr)
        return 1
    except SqstoreError as exc:
        where = f"{shown}: " if shown and shown not in str(exc) else ""
        print(f"sqstore: error: {where}{exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        what = f"{exc.filename}: " if exc.filename else ""
        print(f"sqstore: error: {what}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug; still one line, as every other error
        print(f"sqstore: error: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # An executor's "import sqstore" gets this module, not a second copy of it.
    sys.modules.setdefault("sqstore", sys.modules[__name__])
    raise SystemExit(main())
