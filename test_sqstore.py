"""Tests of sqstore: conformance over every backend, API, signing, concurrency, CLI.

Order: strategies, backend table and ``store`` fixture, conformance, records,
signing, state machine, operations, local backend (processes and signals),
sqooler interoperability, CLI and packaging; last, the test servers the MongoDB
and Dropbox tests run against.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import copy
import datetime
import functools
import hashlib
import http.server
import json
import multiprocessing
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn, Protocol, cast

import attrs
import cattrs
import cattrs.preconf.json
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import sqstore
from sqstore import Storage

HERE = Path(__file__).resolve().parent

settings.register_profile("ci", max_examples=200, deadline=None)
settings.register_profile("fast", max_examples=25, deadline=None)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "fast")
)


def skip_or_fail(reason: str) -> NoReturn:
    """Skip with *reason*, but fail under CI: CI must run every promised suite."""
    if os.environ.get("CI"):
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


def operation(store: Storage, op: str) -> Callable[..., Any]:
    """The callable named *op* in *store* (mypy checks a handle's keys only when literal)."""
    ops: Mapping[str, object] = store
    fn = ops[op]
    assert callable(fn), op
    return fn


# ============================================================================
# Strategies
# ============================================================================
for _record in (
    sqstore.BackendConfig,
    sqstore.BackendDict,
    sqstore.BackendStatus,
    sqstore.StatusMsg,
    sqstore.GateDict,
    sqstore.DataDict,
    sqstore.ExperimentDict,
    sqstore.ResultDict,
    sqstore.NextJob,
    sqstore.JWK,
    sqstore.Lease,
    sqstore.Layout,
    sqstore.JWSHeader,
    sqstore.JWSDoc,
    sqstore.FlatJWS,
):
    attrs.resolve_types(_record, globalns=vars(sqstore))  # string annotations, for st.builds
names = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.@+-]{0,20}", fullmatch=True)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
json_docs = st.dictionaries(st.text(max_size=8), json_values, max_size=5)
statuses = st.sampled_from(sorted(sqstore.STATUSES))
gates = st.builds(
    sqstore.GateDict,
    name=st.text(max_size=5),
    wires=st.lists(st.integers(0, 9), max_size=3).map(tuple),
    params=st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=2).map(tuple),
)
experiments = st.builds(
    sqstore.ExperimentDict,
    header=json_docs,
    shots=st.integers(0, 10_000),
    success=st.booleans(),
    data=st.builds(
        sqstore.DataDict,
        memory=st.lists(st.text(max_size=6), max_size=5).map(tuple),
        instructions=st.none() | st.lists(gates, max_size=3).map(tuple),
    ),
)
times = st.datetimes(timezones=st.just(datetime.timezone.utc)).map(
    lambda t: t.replace(microsecond=0)
)
backend_fields: dict[str, st.SearchStrategy[Any]] = {  # shared by configs and backend dicts
    "cold_atom_type": st.sampled_from(["fermion", "boson", "spin", "mixed"]),
    "wire_order": st.sampled_from(["sequential", "interleaved"]),
    "gates": st.lists(json_docs, max_size=3).map(tuple),
    "supported_instructions": st.lists(st.text(max_size=5), max_size=3).map(tuple),
}
RECORDS: dict[type, st.SearchStrategy[Any]] = {
    sqstore.StatusMsg: st.builds(sqstore.StatusMsg, job_id=names, status=statuses),
    sqstore.ResultDict: st.builds(
        sqstore.ResultDict,
        status=statuses,
        header=json_docs,
        results=st.lists(experiments, max_size=3).map(tuple),
    ),
    sqstore.BackendConfig: st.builds(
        sqstore.BackendConfig, **backend_fields, last_queue_check=st.none() | times
    ),
    sqstore.BackendDict: st.builds(
        sqstore.BackendDict,
        **backend_fields,
        basis_gates=st.lists(st.text(max_size=5), max_size=3).map(tuple),
    ),
    sqstore.BackendStatus: st.builds(sqstore.BackendStatus),
    sqstore.NextJob: st.builds(sqstore.NextJob),
    sqstore.JWK: st.builds(
        sqstore.JWK, key_ops=st.sampled_from(["sign", "verify"]), d=st.none() | st.text()
    ),
    sqstore.Lease: st.builds(
        sqstore.Lease, expires=st.floats(allow_nan=False, allow_infinity=False)
    ),
    sqstore.Layout: st.builds(sqstore.Layout),
    sqstore.JWSDoc: st.builds(sqstore.JWSDoc, payload=json_docs),
    sqstore.FlatJWS: st.builds(sqstore.FlatJWS, header=json_docs),
    sqstore.GateDict: gates,
    sqstore.ExperimentDict: experiments,
}


# ============================================================================
# Backends and the store fixture
# ============================================================================
def dropbox_store(fake: Any, **options: Any) -> Storage:
    """A Dropbox store on an emptied fake, built from credentials as a user would."""
    fake.reset()
    fake.reset_counts()
    credentials = dict(app_key=fake.app_key, app_secret=fake.app_secret)
    credentials.update(refresh_token=fake.refresh_token, session=fake.session())
    return sqstore.dropbox_storage(**credentials, **options)


SERVER_BACKENDS = frozenset({"dropbox", "mongodb"})
"""The backends whose tests start a server: the fake Dropbox API, a MongoDB-wire server."""


def backend_params(*names: str) -> list[object]:
    """Fixture params *names*, each of SERVER_BACKENDS marked slow (``pytest -m "not slow"``)."""
    return [pytest.param(n, marks=pytest.mark.slow) if n in SERVER_BACKENDS else n for n in names]


BACKENDS: dict[str, Callable[[Path, pytest.FixtureRequest], Storage]] = {
    "memory": lambda tmp, request: sqstore.memory_storage(),
    "memory-dropbox-layout": lambda tmp, request: sqstore.memory_storage(
        layout=sqstore.DROPBOX_LAYOUT
    ),
    "local": lambda tmp, request: sqstore.local_storage(tmp / "store"),
    "local-layered": lambda tmp, request: sqstore.stack(
        sqstore.local_storage(tmp / "store"),
        sqstore.with_logging,
        functools.partial(sqstore.with_metrics, counts={}),
        functools.partial(sqstore.with_retry, ops=("get", "list", "update", "upload", "delete")),
    ),
    "dropbox": lambda tmp, request: dropbox_store(request.getfixturevalue("dropbox_fake")),
    "mongodb": lambda tmp, request: mongo_store(request.getfixturevalue("mongodb_server")),
}


@pytest.fixture(params=backend_params(*sorted(BACKENDS)))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    return BACKENDS[request.param](tmp_path, request)


@pytest.fixture
def configured(store: Storage) -> Storage:
    """*store* with backend 'sim' configured (its demo config), as most API tests begin."""
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    return store


@pytest.fixture(scope="session")
def dropbox_fake() -> Any:
    """One fake Dropbox server for the session (each test empties it first)."""
    try:
        import cryptography  # noqa: F401  (the fake's certificates)
        import dropbox  # noqa: F401
        import requests  # noqa: F401
    except ImportError as exc:
        skip_or_fail(f"the Dropbox tests need dropbox, requests and cryptography ({exc})")
    with FakeDropbox(page_size=3) as fake:
        yield fake


@pytest.fixture
def dbx(dropbox_fake: Any) -> Storage:
    return dropbox_store(dropbox_fake)


@pytest.fixture
def local(tmp_path: Path) -> Storage:
    return sqstore.local_storage(tmp_path / "store")


def tree(root: Path) -> dict[str, bytes]:
    """Every file below *root* with its bytes (missing root: empty)."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# ============================================================================
# Conformance: the six callables, on every backend
# ============================================================================
def test_upload_then_get_returns_the_document(store: Storage) -> None:
    """A document uploaded is read back equal, and reading never aliases it."""
    doc = {"a": [1, 2.5, "x"], "b": {"c": None, "d": True}}
    store["upload"]("jobs/queued/sim", "j1", doc)
    got = store["get"]("jobs/queued/sim", "j1")
    assert got == doc
    got["a"].append(3)
    assert store["get"]("jobs/queued/sim", "j1") == doc


def test_upload_never_overwrites(store: Storage) -> None:
    """Uploading an existing id raises AlreadyExistsError (a FileExistsError) and keeps the old."""
    store["upload"]("t/f", "x", {"v": 1})
    with pytest.raises(FileExistsError, match="f/x"):
        store["upload"]("t/f", "x", {"v": 2})
    with pytest.raises(sqstore.AlreadyExistsError):
        store["upload"]("t/f", "x", {"v": 2})
    assert store["get"]("t/f", "x") == {"v": 1}


def test_update_replaces_only_existing(store: Storage) -> None:
    """Update replaces an existing document and raises NotFoundError for a missing one."""
    with pytest.raises(FileNotFoundError, match="f/x"):
        store["update"]("t/f", "x", {"v": 1})
    assert store["list"]("t/f") == []
    store["upload"]("t/f", "x", {"v": 1})
    store["update"]("t/f", "x", {"v": 2})
    assert store["get"]("t/f", "x") == {"v": 2}


def test_get_missing_raises_not_found(store: Storage) -> None:
    """Reading an id that was never uploaded raises NotFoundError naming path and id."""
    with pytest.raises(sqstore.NotFoundError, match="t/jobs/nope"):
        store["get"]("t/jobs", "nope")


def test_move_is_a_move(store: Storage) -> None:
    """Move puts the document in the target folder and removes it from the source."""
    store["upload"]("t/a", "x", {"v": 1})
    store["move"]("t/a", "b/c", "x")
    assert store["list"]("t/a") == []
    assert store["get"]("b/c", "x") == {"v": 1}
    with pytest.raises(sqstore.NotFoundError, match="a/x"):
        store["move"]("t/a", "b/c", "x")


def test_move_refuses_to_overwrite(store: Storage) -> None:
    """Moving onto an existing id raises AlreadyExistsError and changes neither document."""
    store["upload"]("t/a", "x", {"v": 1})
    store["upload"]("t/b", "x", {"v": 2})
    with pytest.raises(sqstore.AlreadyExistsError, match="b/x"):
        store["move"]("t/a", "t/b", "x")
    assert store["get"]("t/a", "x") == {"v": 1}
    assert store["get"]("t/b", "x") == {"v": 2}


def test_delete(store: Storage) -> None:
    """Delete removes a document; deleting a missing one raises NotFoundError."""
    store["upload"]("t/a", "x", {})
    store["delete"]("t/a", "x")
    with pytest.raises(sqstore.NotFoundError):
        store["get"]("t/a", "x")
    with pytest.raises(sqstore.NotFoundError, match="a/x"):
        store["delete"]("t/a", "x")


def test_swap_replaces_or_deletes_only_what_was_read(store: Storage) -> None:
    """Swap changes a document only if it is still the one given; None deletes it."""
    store["upload"]("t/a", "x", {"v": 1, "n": [1, {"k": "z"}]})
    assert store["swap"]("t/a", "x", {"v": 0}, {"v": 9}) is False
    assert store["get"]("t/a", "x") == {"v": 1, "n": [1, {"k": "z"}]}
    assert store["swap"]("t/a", "x", {"v": 1, "n": [1, {"k": "z"}]}, {"v": 2}) is True
    assert store["get"]("t/a", "x") == {"v": 2}
    assert store["swap"]("t/a", "x", {"v": 1}, None) is False
    assert store["swap"]("t/a", "x", {"v": 2}, None) is True
    with pytest.raises(sqstore.NotFoundError, match="a/x"):
        store["swap"]("t/a", "x", {"v": 2}, None)
    with pytest.raises(sqstore.NotFoundError, match="never/used/x"):
        store["swap"]("never/used", "x", {}, {"v": 3})
    assert store["list"]("t/a") == []


@pytest.mark.slow
def test_racing_swaps_have_one_winner(store: Storage) -> None:
    """Of several workers swapping the same document from the same value, one wins."""
    store["upload"]("t/a", "lease", {"holder": "nobody"})
    wins: list[int] = []

    def body(i: int) -> None:
        if store["swap"]("t/a", "lease", {"holder": "nobody"}, {"holder": f"w{i}"}):
            wins.append(i)

    assert race(6, body) == []
    assert len(wins) == 1
    assert store["get"]("t/a", "lease") == {"holder": f"w{wins[0]}"}


def test_list_is_oldest_first(store: Storage) -> None:
    """List gives the ids of a folder in creation order for sqstore's job ids."""
    assert store["list"]("never/used") == []
    ids = [sqstore.create_job_id(store, "sim", "alice") for _ in range(30)]
    for job_id in reversed(ids):
        store["upload"]("t/q", job_id, {})
    assert store["list"]("t/q") == ids
    assert len(set(ids)) == 30


BAD_IDS: list[object] = [
    "",
    ".",
    "..",
    "../x",
    "a/b",
    "a\\b",
    "/etc",
    "a\x00b",
    "x" * 129,
    "é",
    ".hidden",
    "-rf",
    "$where",
    "a b",
    "a\nb",
    "C:x",
    5,
    None,
]
BAD_PATHS = ["", "/abs", "a/../b", "../a", "a//b", "a/", "a\\b", "a/\x00", "a/$set", "a/.git", None]


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_bad_ids_are_refused_before_any_write(store: Storage, tmp_path: Path, bad: Any) -> None:
    """Every callable refuses a bad id with InvalidNameError and touches nothing."""
    store["upload"]("t/ok", "keep", {"v": 1})
    before = tree(tmp_path)
    calls: list[Callable[[], object]] = [
        lambda: store["upload"]("t/ok", bad, {}),
        lambda: store["update"]("t/ok", bad, {}),
        lambda: store["get"]("t/ok", bad),
        lambda: store["move"]("t/ok", "t/other", bad),
        lambda: store["delete"]("t/ok", bad),
    ]
    for call in calls:
        with pytest.raises(sqstore.InvalidNameError, match="invalid"):
            call()
    assert tree(tmp_path) == before
    assert store["list"]("t/ok") == ["keep"]


def folder_calls(store: Storage, bad: Any, ok: str, doc_id: str) -> list[Callable[[], Any]]:
    """Every callable given folder *bad*: moves between it and *ok*, of *doc_id*."""
    return [
        lambda: store["upload"](bad, "x", {}),
        lambda: store["update"](bad, "x", {}),
        lambda: store["get"](bad, "x"),
        lambda: store["move"](bad, ok, doc_id),
        lambda: store["move"](ok, bad, doc_id),
        lambda: store["delete"](bad, "x"),
        lambda: store["list"](bad),
    ]


@pytest.mark.parametrize("bad", BAD_PATHS, ids=repr)
def test_bad_paths_are_refused_before_any_write(store: Storage, tmp_path: Path, bad: Any) -> None:
    """Every callable refuses a bad folder path with InvalidNameError and touches nothing."""
    store["upload"]("t/ok", "keep", {"v": 1})
    before = tree(tmp_path)
    for call in folder_calls(store, bad, "t/ok", "keep"):
        with pytest.raises(sqstore.InvalidNameError):
            call()
    assert tree(tmp_path) == before
    assert store["get"]("t/ok", "keep") == {"v": 1}


@pytest.mark.parametrize("bad", [{"x": {1, 2}}, {"x": float("nan")}, {"x": object()}, [1], "s"])
def test_unserialisable_documents_are_refused(store: Storage, tmp_path: Path, bad: Any) -> None:
    """A value no JSON store can hold is refused with InvalidDocumentError; nothing is written."""
    with pytest.raises(sqstore.InvalidDocumentError, match="f/x"):
        store["upload"]("t/f", "x", bad)
    assert store["list"]("t/f") == []
    assert not any(tree(tmp_path))


def test_errors_are_builtin_compatible() -> None:
    """sqooler-style code that catches the builtins keeps working."""
    assert issubclass(sqstore.NotFoundError, FileNotFoundError)
    assert issubclass(sqstore.AlreadyExistsError, FileExistsError)
    assert issubclass(sqstore.InvalidDocumentError, ValueError)
    for cls in (sqstore.NotFoundError, sqstore.BadSignatureError, sqstore.StorageError):
        assert issubclass(cls, sqstore.SqstoreError)


def test_hand_built_handle_missing_a_key_is_refused() -> None:
    """A dict that lacks a callable gives one clear TypeError naming the missing key."""
    broken = {k: v for k, v in sqstore.memory_storage().items() if k != "move"}
    with pytest.raises(TypeError, match="move"):
        sqstore.get_backends(broken)  # type: ignore[arg-type]


# ============================================================================
# Records and the converter
# ============================================================================
@pytest.mark.parametrize("cls", list(RECORDS), ids=lambda c: c.__name__)
@settings(suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_records_round_trip(cls: type, data: st.DataObject) -> None:
    """Every record survives to_doc -> JSON text -> from_doc unchanged."""
    record = data.draw(RECORDS[cls])
    doc = json.loads(json.dumps(sqstore.to_doc(record)))
    assert sqstore.from_doc(doc, cls) == record


def test_from_doc_names_the_bad_field() -> None:
    """A wrong type is an InvalidDocumentError that names the field (an unknown one is read)."""
    good = sqstore.to_doc(sqstore.StatusMsg("j", "DONE", "d", "e"))
    with pytest.raises(sqstore.InvalidDocumentError, match=r"'status' must be in.*got 'FINE'"):
        sqstore.from_doc({**good, "status": "FINE"}, sqstore.StatusMsg)
    assert sqstore.from_doc({**good, "surprise": 1}, sqstore.StatusMsg) == (
        sqstore.StatusMsg("j", "DONE", "d", "e")
    )
    with pytest.raises(sqstore.InvalidDocumentError, match=r"\$\.shots"):
        sqstore.from_doc(
            {"header": {}, "shots": "many", "success": True, "data": {"memory": []}},
            sqstore.ExperimentDict,
        )


def test_config_times_are_read_as_sqooler_and_pydantic_write_them() -> None:
    """last_queue_check reads ISO strings with an offset, with Z, and naive (as UTC)."""
    base = sqstore.to_doc(sqstore.demo_config("sim"))
    for text in ("2024-05-01T12:00:00+00:00", "2024-05-01T12:00:00Z", "2024-05-01T12:00:00"):
        cfg = sqstore.from_doc({**base, "last_queue_check": text}, sqstore.BackendConfig)
        assert cfg.last_queue_check == datetime.datetime(
            2024, 5, 1, 12, tzinfo=datetime.timezone.utc
        )
    assert sqstore.to_doc(cfg)["last_queue_check"] == "2024-05-01T12:00:00+00:00"
    with pytest.raises(sqstore.InvalidDocumentError, match="last_queue_check"):
        sqstore.from_doc({**base, "last_queue_check": "yesterday"}, sqstore.BackendConfig)


def test_records_are_frozen() -> None:
    """Records cannot be changed after creation (use attrs.evolve)."""
    status = sqstore.StatusMsg("j", "DONE", "d", "e")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        status.status = "ERROR"  # type: ignore[misc]


# ============================================================================
# Signing
# ============================================================================
# RFC 8037 Appendix A (A.1 key, A.2 public key, A.3 thumbprint, A.4 signature), unpadded base64url.
RFC_D = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"
RFC_X = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
RFC_THUMBPRINT = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
RFC_SIGNING_INPUT = "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc"
RFC_SIGNATURE = (
    "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
)
# The signature sqooler 0.9 makes with the A.1 key (kid "rfc8037") over this payload.
SQOOLER_PAYLOAD = '{"job_id": "abc", "status": "DONE", "detail": "ok", "error_message": "None"}'
SQOOLER_SIGNATURE = (
    "9ENmFSMDlI76eFGrxcvF8FBJ9aP87_UrFzbnaMPcEjhcYUCH8CauABfA-um8VB_Ssscx7Tbe4MZ9Wj5VYW7OBQ=="
)


def rfc_keys(kid: str = "rfc8037") -> tuple[sqstore.JWK, sqstore.JWK]:
    seed = base64.urlsafe_b64decode(RFC_D + "=")
    return sqstore.generate_keypair(kid, seed=seed)


def test_rfc8037_key_and_thumbprint() -> None:
    """The Appendix A private key gives the Appendix A public key and thumbprint."""
    private, public = rfc_keys()
    assert private.d is not None and private.d.rstrip("=") == RFC_D
    assert public.x.rstrip("=") == RFC_X
    assert sqstore.jwk_thumbprint(public) == RFC_THUMBPRINT
    assert sqstore.jwk_thumbprint(attrs.evolve(public, x=RFC_X)) == RFC_THUMBPRINT


def test_rfc8037_signature_bit_for_bit() -> None:
    """The Appendix A.4 signing input signs to the RFC's signature, which verifies (A.5)."""
    private, public = rfc_keys()
    signature = sqstore._signer(private)(RFC_SIGNING_INPUT.encode())
    assert base64.urlsafe_b64encode(signature).decode().rstrip("=") == RFC_SIGNATURE
    assert sqstore._ed25519_verify(public, RFC_SIGNING_INPUT.encode(), signature)
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    assert not sqstore._ed25519_verify(public, RFC_SIGNING_INPUT.encode(), flipped)
    assert not sqstore._ed25519_verify(public, RFC_SIGNING_INPUT.encode() + b"x", signature)


def test_sqooler_fixture_signature_bit_for_bit() -> None:
    """sign_doc in sqooler form reproduces the signature sqooler 0.9 makes for the fixture."""
    private, public = rfc_keys("rfc8037")
    payload = json.loads(SQOOLER_PAYLOAD)
    signed = sqstore.sign_doc(payload, private)
    assert signed["signature"] == SQOOLER_SIGNATURE
    assert signed["header"] == {"alg": "EdDSA", "kid": "rfc8037", "typ": "JWS", "version": "0.1"}
    assert sqstore.verify_doc(signed, [public]) == payload


def test_rfc7515_documents_verify_with_an_independent_library() -> None:
    """A flattened JWS from sign_doc verifies with `cryptography` from its strings alone."""
    crypto = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.ed25519")
    private, public = rfc_keys("k")
    payload = {"job_id": "j", "results": [1, 2.5, "ü"], "nested": {"b": None}}
    signed = sqstore.sign_doc(payload, private, fmt="rfc7515")
    key = crypto.Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(public.x))

    def pad(s: str) -> str:
        return s + "=" * (-len(s) % 4)

    key.verify(
        base64.urlsafe_b64decode(pad(signed["signature"])),
        f"{signed['protected']}.{signed['payload']}".encode(),
    )
    assert "=" not in signed["protected"] + signed["payload"] + signed["signature"]
    assert json.loads(base64.urlsafe_b64decode(pad(signed["protected"]))) == {
        "alg": "EdDSA",
        "kid": "k",
    }
    assert sqstore.verify_doc(signed, [public]) == payload


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _edit(doc: dict[str, Any], part: str, change: Callable[[dict[str, Any]], None]) -> None:
    """Change the header or payload of a signed document in either format, keeping its form."""
    if "protected" not in doc:
        change(doc[part])
        return
    field = "protected" if part == "header" else "payload"
    decoded = json.loads(_unb64(doc[field]))
    change(decoded)
    doc[field] = _b64(json.dumps(decoded).encode())


def _flip_signature(doc: dict[str, Any]) -> None:
    raw = bytearray(_unb64(doc["signature"]))
    raw[5] ^= 0x01
    doc["signature"] = _b64(bytes(raw))


TAMPERS: dict[str, Callable[[dict[str, Any]], None]] = {
    "payload value": lambda d: _edit(d, "payload", lambda p: p.update(status="ERROR")),
    "payload key added": lambda d: _edit(d, "payload", lambda p: p.update(extra=1)),
    "payload key removed": lambda d: _edit(d, "payload", lambda p: p.pop("status")),
    "kid": lambda d: _edit(d, "header", lambda h: h.update(kid="other")),
    "alg none": lambda d: _edit(d, "header", lambda h: h.update(alg="none")),
    "signature bit": _flip_signature,
    "signature truncated": lambda d: d.update(signature=d["signature"][:40]),
    "signature of another doc": lambda d: d.update(
        signature=sqstore.sign_doc(
            {"other": 1}, rfc_keys("k")[0], fmt="rfc7515" if "protected" in d else "sqooler"
        )["signature"]
    ),
}


@pytest.mark.parametrize("fmt", ["sqooler", "rfc7515"])
@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_tampered_documents_do_not_verify(fmt: str, tamper: str) -> None:
    """Every change to a signed document makes verification raise BadSignatureError."""
    private, public = rfc_keys("k")
    signed = sqstore.sign_doc({"job_id": "j", "status": "DONE"}, private, fmt=fmt)
    assert sqstore.verify_doc(signed, [public])
    bad = copy.deepcopy(signed)
    TAMPERS[tamper](bad)
    with pytest.raises(sqstore.BadSignatureError):
        sqstore.verify_doc(bad, [public])


def test_verify_needs_the_right_key_and_a_signature() -> None:
    """Another key, or no signature at all, never verifies; the payload stays inspectable."""
    private, _ = rfc_keys("k")
    _, other_public = sqstore.generate_keypair("k")
    signed = sqstore.sign_doc({"a": 1}, private)
    with pytest.raises(sqstore.BadSignatureError) as info:
        sqstore.verify_doc(signed, [other_public])
    assert info.value.payload == {"a": 1}
    with pytest.raises(sqstore.BadSignatureError, match="not signed"):
        sqstore.verify_doc({"a": 1}, [other_public])
    assert sqstore.verify_doc(signed, [other_public, rfc_keys("k")[1]]) == {"a": 1}


def test_keys_must_be_what_they_claim() -> None:
    """A public key cannot sign, and a private key whose x does not match d is refused."""
    private, public = sqstore.generate_keypair("k")
    with pytest.raises(sqstore.BadSignatureError, match="not a private key"):
        sqstore.sign_doc({}, public)
    _, other = sqstore.generate_keypair("k")
    with pytest.raises(sqstore.BadSignatureError, match="does not match"):
        sqstore.sign_doc({}, attrs.evolve(private, x=other.x))
    assert sqstore.public_from_private(private) == public
    assert private.d is not None and private.d not in repr(private)


# Keys that are not the backend's, replayed results, secrets in messages, recursion bombs, NaN.
WRONG_KEYS: dict[str, Callable[[sqstore.JWK], sqstore.JWK]] = {
    "same kid, other key": lambda private: sqstore.generate_keypair(private.kid)[0],
    "other kid, other key": lambda private: sqstore.generate_keypair("otherkid")[0],
    "other kid, same key": lambda private: attrs.evolve(private, kid="otherkid"),
}
SNAPSHOT_KINDS = (
    "configs", "public_keys", "queued", "running", "finished", "deleted", "results", "status",
    "leases",
)  # fmt: skip


def snapshot(store: Storage, job_id: str) -> dict[str, dict[str, Any]]:
    """Every document in the folders that a finish or a config write of *job_id* touches."""
    found = {}
    for kind in SNAPSHOT_KINDS:
        path = folder(store, kind, job_id)
        found[kind] = {name: store["get"](path, name) for name in store["list"](path)}
    return found


@pytest.mark.parametrize("wrong", sorted(WRONG_KEYS))
def test_a_key_that_is_not_the_backends_signs_nothing(
    signed: Storage, keys: Any, wrong: str
) -> None:
    """A private key whose public half is not the key published under the backend's kid is
    refused by every signing operation (BadSignatureError) before anything is written."""
    private, _ = keys
    other = WRONG_KEYS[wrong](private)
    job_id = sqstore.upload_job(signed, JOB, "sim", "alice")
    _, job = sqstore.claim_job(signed, "sim", private) or pytest.fail("no job")
    result = sqstore.run_simulator(job, job_id, "sim")
    done = sqstore.StatusMsg(job_id, "DONE", "ok", "None")
    cfg = sqstore.get_config(signed, "sim")
    before = snapshot(signed, job_id)
    for call in (
        lambda: sqstore.update_in_database(signed, result, done, job_id, "sim", other),
        lambda: sqstore.upload_result(signed, result, "sim", job_id, other),
        lambda: sqstore.upload_status(signed, "sim", "alice", job_id, other),
        lambda: sqstore.update_config(signed, attrs.evolve(cfg, max_shots=1), "sim", other),
        lambda: sqstore.timestamp_queue(signed, "sim", other),
    ):
        with pytest.raises(sqstore.BadSignatureError):
            call()
        assert snapshot(signed, job_id) == before
    sqstore.update_in_database(signed, result, done, job_id, "sim", private)
    assert sqstore.verify_result(signed, "sim", job_id)


def test_before_its_key_is_published_a_backend_signs_only_with_its_kid(store: Storage) -> None:
    """A signing backend whose key is not published yet takes only a key with its config's
    kid; once the key is published, only that key."""
    private, public = sqstore.generate_keypair("bobkey")
    sqstore.upload_config(store, sqstore.demo_config("sim", sign=True), "sim", private)
    job_id = sqstore.create_job_id(store, "sim", "alice")
    result = sqstore.run_simulator(JOB, job_id, "sim")
    stranger = sqstore.generate_keypair("otherkid")[0]
    with pytest.raises(sqstore.BadSignatureError, match="otherkid"):
        sqstore.upload_result(store, result, "sim", job_id, stranger)
    assert jobs_in(store, "results", job_id) == []
    assert sqstore.upload_result(store, result, "sim", job_id, private)
    sqstore.upload_public_key(store, public, "sim")
    assert sqstore.verify_result(store, "sim", job_id)
    with pytest.raises(sqstore.BadSignatureError):
        sqstore.upload_status(store, "sim", "alice", job_id, sqstore.generate_keypair("bobkey")[0])


@pytest.mark.parametrize("wrong", sorted(WRONG_KEYS))
def test_work_refuses_a_key_that_is_not_the_backends(
    signed: Storage, keys: Any, wrong: str
) -> None:
    """work() with a key that is not the backend's raises BadSignatureError before it claims
    anything: the job stays queued."""
    private, _ = keys
    job_id = sqstore.upload_job(signed, JOB, "sim", "alice")
    before = snapshot(signed, job_id)
    stop = threading.Event()
    with pytest.raises(sqstore.BadSignatureError):
        sqstore.work(
            [signed], "sim", sqstore.run_simulator, WRONG_KEYS[wrong](private),
            max_jobs=1, poll=0.01, stop=stop, log=lambda line: stop.set(),
        )  # fmt: skip
    assert snapshot(signed, job_id) == before


def test_work_refuses_to_serve_a_signing_backend_without_its_key(signed: Storage) -> None:
    """work() without a key on a backend that signs raises BadSignatureError before it claims
    anything (it failed at every claim, forever): the job stays queued."""
    job_id = sqstore.upload_job(signed, JOB, "sim", "alice")
    before = snapshot(signed, job_id)
    with pytest.raises(sqstore.BadSignatureError, match="signs: work needs its private key"):
        sqstore.work([signed], "sim", sqstore.run_simulator, burst=True, log=lambda line: None)
    assert snapshot(signed, job_id) == before


def test_a_result_verifies_only_as_its_own_jobs(signed: Storage, keys: Any) -> None:
    """A genuine signed result put in another job's place, or naming another backend, does
    not verify there, with the stored key or a given one."""
    private, public = keys
    first, second = (sqstore.upload_job(signed, JOB, "sim", "alice") for _ in range(2))
    finish(signed, "sim", private)
    assert sqstore.verify_result(signed, "sim", first)
    replayed = signed["get"](*place(signed, "results", second))
    signed["update"](*place(signed, "results", first), replayed)
    assert not sqstore.verify_result(signed, "sim", first)
    assert not sqstore.verify_result(signed, "sim", first, public_jwk=public)
    assert sqstore.verify_result(signed, "sim", second)
    foreign = attrs.evolve(sqstore.run_simulator(JOB, first, "sim"), display_name="other")
    fmt = signed["layout"].signature_format
    signed["update"](
        *place(signed, "results", first),
        sqstore.sign_doc(sqstore.to_doc(foreign), private, fmt=fmt),
    )
    assert not sqstore.verify_result(signed, "sim", first)
    own = sqstore.run_simulator(JOB, first, "sim")
    signed["update"](
        *place(signed, "results", first), sqstore.sign_doc(sqstore.to_doc(own), private, fmt=fmt)
    )
    assert sqstore.verify_result(signed, "sim", first)


@pytest.mark.parametrize("fmt", ["sqooler", "rfc7515"])
def test_a_document_verifies_only_with_the_key_its_header_names(fmt: str) -> None:
    """When the header names a kid, only the listed keys with that kid are tried."""
    a_private, a_public = sqstore.generate_keypair("a")
    b_private, b_public = sqstore.generate_keypair("b")
    forged = sqstore.sign_doc({"v": 1}, attrs.evolve(b_private, kid="a"), fmt=fmt)
    with pytest.raises(sqstore.BadSignatureError, match="'a'"):
        sqstore.verify_doc(forged, [a_public, b_public])
    by_b = sqstore.sign_doc({"v": 1}, b_private, fmt=fmt)
    with pytest.raises(sqstore.BadSignatureError, match="'b'"):
        sqstore.verify_doc(by_b, [a_public, attrs.evolve(b_public, kid="c")])
    assert sqstore.verify_doc(by_b, [a_public, b_public]) == {"v": 1}
    assert sqstore.verify_doc(sqstore.sign_doc({"v": 1}, a_private, fmt=fmt), [a_public]) == {
        "v": 1
    }


def test_a_header_without_a_kid_is_tried_with_every_key() -> None:
    """A flattened JWS whose header names no kid verifies with any listed key that signed it."""
    _, a_public = sqstore.generate_keypair("a")
    b_private, b_public = sqstore.generate_keypair("b")
    protected, payload = _b64(b'{"alg":"EdDSA"}'), _b64(b'{"v": 1}')
    from nacl.signing import SigningKey

    assert b_private.d is not None
    seed = base64.urlsafe_b64decode(
        b_private.d.rstrip("=") + "=" * (-len(b_private.d.rstrip("=")) % 4)
    )
    signature = SigningKey(seed).sign(f"{protected}.{payload}".encode()).signature
    anonymous = {"protected": protected, "payload": payload, "signature": _b64(signature)}
    assert sqstore.verify_doc(anonymous, [a_public, b_public]) == {"v": 1}
    with pytest.raises(sqstore.BadSignatureError, match="None"):
        sqstore.verify_doc(anonymous, [a_public])


def test_copy_verify_checks_a_document_with_its_own_backends_key(tmp_path: Path) -> None:
    """copy --verify rejects a config, status or result of one backend signed with another
    backend's published key, and copies what each backend's own key signed."""
    src = sqstore.local_storage(tmp_path / "src")
    dst = sqstore.local_storage(tmp_path / "dst")
    a_private, a_public = sqstore.generate_keypair("akey")
    b_private, b_public = sqstore.generate_keypair("bkey")
    for dn, private, public in (("alpha", a_private, a_public), ("beta", b_private, b_public)):
        sqstore.upload_config(src, sqstore.demo_config(dn, sign=True), dn, private)
        sqstore.upload_public_key(src, public, dn)
        sqstore.upload_job(src, JOB, dn, "alice")
        finish(src, dn, private)
    job_id = sqstore.create_job_id(src, "alpha", "alice")
    by_b = functools.partial(sqstore.sign_doc, private_jwk=b_private)
    src["upload"](
        "results/alpha", job_id, by_b(sqstore.to_doc(sqstore.run_simulator(JOB, job_id, "alpha")))
    )
    src["upload"](
        "status/alpha", job_id, by_b(sqstore.to_doc(sqstore.StatusMsg(job_id, "DONE", "", "")))
    )
    gamma = sqstore.to_doc(attrs.evolve(sqstore.demo_config("gamma", sign=True), kid="akey"))
    src["upload"]("backends/configs", "gamma", by_b(gamma))
    warnings: list[str] = []
    counts = sqstore.copy_storage(src, dst, verify=True, warn=warnings.append)
    assert counts["results"] == {"copied": 2, "present": 0, "conflicts": 0, "rejected": 1}
    assert counts["statuses"] == {"copied": 2, "present": 0, "conflicts": 0, "rejected": 1}
    assert counts["configs"] == {"copied": 2, "present": 0, "conflicts": 0, "rejected": 1}
    assert dst["list"]("results/alpha") == [r for r in src["list"]("results/alpha") if r != job_id]
    assert len(warnings) == 3 and all("not copied" in w for w in warnings)


def chained_text(exc: BaseException) -> str:
    """str and repr of *exc* and of every exception chained to it or grouped in it."""
    texts: list[str] = []
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        each = todo.pop()
        if each is None or id(each) in seen:
            continue
        seen.add(id(each))
        texts += [str(each), repr(each), repr(each.args)]
        todo += [each.__cause__, each.__context__, *getattr(each, "exceptions", ())]
    return "\n".join(texts)


def test_no_error_shows_a_private_key() -> None:
    """A private JWK given as JSON text, bytes, a list, or a dict with a bad field is refused
    without its d in any message, repr or chained exception."""
    private, public = sqstore.generate_keypair("bobkey")
    assert private.d is not None
    secret = private.d.rstrip("=")[:12]
    doc = sqstore.to_doc(private)
    store = sqstore.memory_storage()
    sqstore.upload_config(store, sqstore.demo_config("sim", sign=True), "sim", private)
    sqstore.upload_public_key(store, public, "sim")
    job_id = sqstore.upload_job(store, JOB, "sim", "alice")
    sqstore.claim_job(store, "sim", private)
    result = sqstore.run_simulator(JOB, job_id, "sim")
    done = sqstore.StatusMsg(job_id, "DONE", "ok", "None")
    signed_doc = sqstore.sign_doc({"v": 1}, private)
    cfg = sqstore.demo_config("sim", sign=True)

    def work_once(key: Any) -> int:
        stop = threading.Event()
        return sqstore.work(
            [store], "sim", sqstore.run_simulator, key,
            max_jobs=1, poll=0.01, stop=stop, log=lambda line: stop.set(),
        )  # fmt: skip

    bad_keys = {
        "json text": json.dumps(doc),
        "bytes": json.dumps(doc).encode(),
        "list": [doc],
        "secret in key_ops": {**doc, "key_ops": private.d},
        "secret in kty": {**doc, "kty": private.d},
        "secret as a field name": {**doc, private.d: 1},
        "bad x": {**doc, "x": 5},
        "short d": {**doc, "d": private.d[:-8]},
        "d not text": {**doc, "d": 5},
    }
    calls: dict[str, Callable[[Any], Any]] = {
        "sign_doc": lambda key: sqstore.sign_doc({"v": 1}, key),
        "public_from_private": sqstore.public_from_private,
        "jwk_thumbprint": sqstore.jwk_thumbprint,
        "verify_doc": lambda key: sqstore.verify_doc(signed_doc, [key]),
        "upload_config": lambda key: sqstore.upload_config(store, cfg, "other", key),
        "update_config": lambda key: sqstore.update_config(store, cfg, "sim", key),
        "update_in_database": lambda key: sqstore.update_in_database(
            store, result, done, job_id, "sim", key
        ),
        "upload_result": lambda key: sqstore.upload_result(store, result, "sim", job_id, key),
        "upload_status": lambda key: sqstore.upload_status(store, "sim", "bob", job_id, key),
        "upload_public_key": lambda key: sqstore.upload_public_key(store, key, "sim"),
        "verify_result": lambda key: sqstore.verify_result(store, "sim", job_id, public_jwk=key),
        "timestamp_queue": lambda key: sqstore.timestamp_queue(store, "sim", key),
        "work": work_once,
    }
    no_d_needed = {"verify_doc", "verify_result", "jwk_thumbprint"}
    for call_name, call in calls.items():
        for key_name, key in bad_keys.items():
            try:
                call(key)
            except sqstore.SqstoreError as exc:
                assert secret not in chained_text(exc), (call_name, key_name)
            else:  # only a key's d may be bad where d is not used
                assert call_name in no_d_needed and "d" in key_name.split(), (call_name, key_name)


def nested(depth: int) -> list[Any]:
    """A list nested *depth* deep, built without recursion."""
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


BOMB = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


def mongo_bomb(depth: int) -> Callable[[Any], Any]:
    """A raw BSON document with the given ``_id`` and a field nested *depth* documents deep."""
    import struct

    import bson
    from bson.raw_bson import RawBSONDocument

    def build(doc_id: Any) -> Any:
        inner = b"\x05\x00\x00\x00\x00"
        for _ in range(depth):
            body = b"\x03a\x00" + inner + b"\x00"
            inner = struct.pack("<i", len(body) + 4) + body
        body = bson.encode({"_id": doc_id})[4:-1] + b"\x03a\x00" + inner + b"\x00"
        return RawBSONDocument(struct.pack("<i", len(body) + 4) + body)

    return build


def plant(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    store: Storage,
    at: tuple[str, str],
    text: bytes,
    bson_of: Callable[[Any], Any],
) -> bool:
    """Store *text* (or, on MongoDB, ``bson_of(_id)``) at *at* behind the backend's back.

    Returns False on the memory backend, which keeps only what its own writes let in."""
    if store["name"] == "memory":
        return False
    path, doc_id = at
    if store["name"] == "local":
        (tmp_path / "store" / path).mkdir(parents=True, exist_ok=True)
        (tmp_path / "store" / path / f"{doc_id}.json").write_bytes(text)
        return True
    marker = {"marker": secrets.token_hex(8)}
    try:
        store["upload"](path, doc_id, marker)
    except sqstore.AlreadyExistsError:
        store["update"](path, doc_id, marker)
    if store["name"] == "dropbox":
        from dropbox.files import WriteMode

        fake = request.getfixturevalue("dropbox_fake")
        (file,) = (f for f, data in fake.files().items() if data == json.dumps(marker).encode())
        fake.client().files_upload(text, file, mode=WriteMode.overwrite)
        return True
    import pymongo

    uri = mongo_uri(request.getfixturevalue("mongodb_server"))
    with pymongo.MongoClient(uri, document_class=dict) as client:
        database, *rest = path.split("/")
        collection = client[database][".".join(rest)]
        found = collection.find_one(marker)
        assert found is not None, marker
        collection.delete_one({"_id": found["_id"]})
        collection.insert_one(bson_of(found["_id"]))
    return True


@contextlib.contextmanager
def shallow_stack(store: Storage, room: int = 100) -> Any:
    """On MongoDB, lower the recursion limit to *room* frames above the caller's, so that a
    document 150 levels deep is too deep to read (the test server cannot store a deeper one:
    a few hundred levels overflow its Java stack)."""
    import inspect

    old = sys.getrecursionlimit()
    if store["name"] == "mongodb":
        sys.setrecursionlimit(len(inspect.stack(0)) + room)
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


@pytest.mark.usefixtures("configured")
def test_recursion_bombs_are_refused_on_write(store: Storage) -> None:
    """A 100,000-deep value is an InvalidDocumentError naming the path from every write."""
    bomb = {"a": nested(100_000)}
    job_id = sqstore.create_job_id(store, "sim", "alice")
    path, name = place(store, "status", job_id)
    for verb in ("upload", "update"):
        with pytest.raises(sqstore.InvalidDocumentError, match=f"{path}/{name}"):
            store[verb](path, name, bomb)
    with pytest.raises(sqstore.InvalidDocumentError):
        sqstore.upload_job(store, bomb, "sim", "alice")
    result = sqstore.to_doc(sqstore.run_simulator(JOB, job_id, "sim"))
    with pytest.raises(sqstore.InvalidDocumentError):
        sqstore.upload_result(store, {**result, "header": bomb}, "sim", job_id)
    with pytest.raises(sqstore.InvalidDocumentError):
        sqstore.sign_doc(bomb, sqstore.generate_keypair("k")[0])
    with pytest.raises(sqstore.InvalidDocumentError):
        sqstore.to_doc(sqstore.from_doc({**result, "header": bomb}, sqstore.ResultDict))
    assert jobs_in(store, "queued") == jobs_in(store, "results", job_id) == []


@pytest.mark.usefixtures("configured")
def test_recursion_bombs_are_refused_on_read(
    request: pytest.FixtureRequest, tmp_path: Path, store: Storage
) -> None:
    """A stored job, status, result or config nested too deep to parse reads as
    InvalidDocumentError naming its path (never RecursionError); a claim sets the job aside."""
    job_id = sqstore.upload_job(store, JOB, "sim", "alice")
    planted = [place(store, kind, job_id) for kind in ("queued", "status", "results")] + [
        (folder(store, "configs", display_name="bomb"), doc_id(store, "configs", "", "bomb"))
    ]
    if not all([plant(request, tmp_path, store, at, BOMB, mongo_bomb(150)) for at in planted]):
        return  # memory: its writes refuse a bomb (test_recursion_bombs_are_refused_on_write)
    queued, status, results, config = ("/".join(at) for at in planted)
    with shallow_stack(store):
        with pytest.raises(sqstore.InvalidDocumentError, match=queued):
            sqstore.get_job(store, planted[0][0], job_id)
        with pytest.raises(sqstore.InvalidDocumentError, match=status):
            sqstore.get_status(store, "sim", "alice", job_id)
        with pytest.raises(sqstore.InvalidDocumentError, match=results):
            sqstore.get_result(store, "sim", "alice", job_id)
        with pytest.raises(sqstore.InvalidDocumentError, match=results):
            sqstore.verify_result(store, "sim", job_id, public_jwk=sqstore.generate_keypair("k")[1])
        with pytest.raises(sqstore.InvalidDocumentError, match=config):
            sqstore.get_config(store, "bomb")
        # refused, or set aside: never handed to an executor, never a RecursionError
        with contextlib.suppress(sqstore.InvalidDocumentError):
            assert sqstore.claim_job(store, "sim") is None


def test_signed_payload_bombs_are_refused() -> None:
    """A flattened JWS whose payload or header is a recursion bomb is an InvalidDocumentError
    for payload_of and verify_doc."""
    private, public = sqstore.generate_keypair("k")
    good = sqstore.sign_doc({"v": 1}, private, fmt="rfc7515")
    for field in ("payload", "protected"):
        bad = {**good, field: _b64(BOMB)}
        with pytest.raises(sqstore.InvalidDocumentError):
            sqstore.payload_of(bad)
        with pytest.raises(sqstore.InvalidDocumentError):
            sqstore.verify_doc(bad, [public])


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.usefixtures("configured")
def test_non_finite_numbers_are_refused_on_read(
    request: pytest.FixtureRequest, tmp_path: Path, store: Storage, constant: str
) -> None:
    """NaN and infinities, refused on write, are refused on read too (InvalidDocumentError
    naming the path), so they never reach an executor."""
    with pytest.raises(sqstore.InvalidDocumentError):
        sqstore.upload_job(store, {"shots": float(constant.lower())}, "sim", "alice")
    job_id = sqstore.upload_job(store, JOB, "sim", "alice")
    at = place(store, "queued", job_id)
    text = f'{{"experiment_0": {{"shots": {constant}}}}}'.encode()
    bson_of = lambda _id: {"_id": _id, "shots": float(constant.lower())}  # noqa: E731
    if not plant(request, tmp_path, store, at, text, bson_of):
        return
    with pytest.raises(sqstore.InvalidDocumentError, match="/".join(at)):
        store["get"](*at)
    with contextlib.suppress(sqstore.InvalidDocumentError):
        assert sqstore.claim_job(store, "sim") is None
    signed = sqstore.sign_doc({"v": 1}, sqstore.generate_keypair("k")[0], fmt="rfc7515")
    with pytest.raises(sqstore.InvalidDocumentError):
        sqstore.payload_of({**signed, "payload": _b64(f'{{"v": {constant}}}'.encode())})


# ============================================================================
# State machine: every backend agrees with memory_storage()
# ============================================================================
SM_VERBS = ("upload", "update", "get", "move", "delete", "list", "swap")
SM_DATED = sqstore.new_job_id(sqstore.DROPBOX_LAYOUT, "sim", "alice", 1_700_000_000_123_456_789, 0)
SM_PATHS = (
    "a",
    *(sqstore.locate(sqstore.LOCAL_LAYOUT, kind, "sim")[0] for kind in ("queued", "running")),
    sqstore.locate(sqstore.DROPBOX_LAYOUT, "finished", "sim", "alice")[0],
)
"""The folders the machine uses: one of its own; two of sqooler's local layout; one of its
Dropbox layout."""
SM_IDS = (
    "x",
    sqstore.new_job_id(sqstore.LOCAL_LAYOUT, "sim", "alice", 1_700_000_000_123_456_789, 7),
    sqstore.locate(sqstore.DROPBOX_LAYOUT, "queued", "sim", job_id=SM_DATED)[1],
)
Outcome = tuple[str, Any]
"""``("ok", value)`` or ``("error", type of the exception)``: what one call did."""


class LineLog:
    """A logger for with_logging that keeps each line it is given."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, level: int, msg: str, *args: Any) -> None:
        self.lines.append(msg % args)


def failing_as_planned(store: Storage, plan: list[str]) -> Storage:
    """*store* whose next calls fail with TransientError as *plan* says, one entry a call:
    ``"before"`` (nothing done) or ``"after"`` (done, but the answer is lost)."""

    def wrap(op: str) -> Callable[..., Any]:
        fn = operation(store, op)

        def call(*args: Any) -> Any:
            fault = plan.pop(0) if plan else None
            if fault == "before":
                raise sqstore.TransientError(f"{op}: failed before it was done")
            result = fn(*args)
            if fault == "after":
                raise sqstore.TransientError(f"{op}: done, but the answer was lost")
            return result

        return call

    return cast(Storage, {**store, **{op: wrap(op) for op in SM_VERBS}})


def call_outcome(store: Storage, op: str, args: tuple[Any, ...]) -> Outcome:
    try:
        return ("ok", operation(store, op)(*args))
    except Exception as exc:  # every exception a verb raises is part of its contract
        return ("error", type(exc))


class StorageComparison(RuleBasedStateMachine):
    """Random sequences of the seven verbs give the same outcomes and the same contents on
    memory_storage() (the model) and on each subject: local; a stack of every layer over
    local, with transient failures injected below its retry; memory with the Dropbox layout."""

    LAYERED = "local-layered"

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="sqstore-sm-"))
        self.model = sqstore.memory_storage()
        self.plan: list[str] = []  # the transient failures of the layered subject's next calls
        self.counts: dict[str, int] = {}  # with_metrics's, in the layered subject
        self.expected_counts: collections.Counter[str] = collections.Counter()
        self.log = LineLog()
        self.subjects = self.make_subjects(self.tmp)

    def make_subjects(self, tmp: Path) -> dict[str, Storage]:
        """The stores compared with the model, by name."""
        return {
            "local": sqstore.local_storage(tmp / "local"),
            self.LAYERED: sqstore.stack(
                sqstore.local_storage(tmp / "layered"),
                functools.partial(sqstore.with_logging, logger=self.log),
                functools.partial(sqstore.with_metrics, counts=self.counts),
                functools.partial(
                    sqstore.with_retry,
                    ops=("get", "list", "update", "upload", "delete", "swap"),
                    sleep=lambda seconds: None,
                ),
                functools.partial(failing_as_planned, plan=self.plan),
            ),
            "memory-dropbox-layout": sqstore.memory_storage(layout=sqstore.DROPBOX_LAYOUT),
        }

    def teardown(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def call(self, name: str, op: str, args: tuple[Any, ...], plan: list[str]) -> Outcome:
        store = self.subjects[name]
        if name != self.LAYERED:
            return call_outcome(store, op, args)
        self.plan[:] = plan
        got = call_outcome(store, op, args)
        self.plan.clear()
        self.expected_counts[op] += 1
        word = "ok" if got[0] == "ok" else got[1].__name__
        if got[0] == "error":
            self.expected_counts[f"{op}:{word}"] += 1
        assert self.log.lines[-1].startswith(f"{store['name']} {op} "), self.log.lines[-1]
        assert self.log.lines[-1].endswith(f" {word}"), (self.log.lines[-1], word)
        return got

    def done(self, op: str, args: tuple[Any, ...]) -> Outcome | None:
        """What with_retry documents that a repeated write returns once the model shows the
        write's effect (a repeat cannot tell its own earlier attempt from another's)."""
        path, doc_id = args[:2]
        now = call_outcome(self.model, "get", (path, doc_id))
        if op == "upload" and now == ("ok", args[2]):
            return ("ok", None)
        if op == "delete" and now == ("error", sqstore.NotFoundError):
            return ("ok", None)
        if op == "swap" and now == (
            ("error", sqstore.NotFoundError) if args[3] is None else ("ok", args[3])
        ):
            return ("ok", True)
        return None

    def agree(self, op: str, *args: Any, plan: tuple[str, ...] = ()) -> None:
        expected = call_outcome(self.model, op, args)
        for name in self.subjects:
            got = self.call(name, op, args, list(plan))
            if got == expected or (name == self.LAYERED and plan and got == self.done(op, args)):
                continue
            raise AssertionError(f"{name}: {op}{args!r} gave {got}, but memory gave {expected}")

    paths = st.sampled_from([*SM_PATHS, *SM_PATHS, "a/../b"])  # invalid names are refused
    ids = st.sampled_from([*SM_IDS, *SM_IDS, ".."])  # everywhere alike, as InvalidNameError
    keys = st.tuples(paths, ids, st.none() | st.integers(0, 15))
    faults = st.lists(st.sampled_from(["before", "after"]), max_size=2).map(tuple)

    def pick(self, key: tuple[str, str, int | None]) -> tuple[str, str]:
        """The drawn folder and id, or (when it draws a number) a document the model has."""
        path, doc_id, nth = key
        docs = [(folder, i) for folder in SM_PATHS for i in self.model["list"](folder)]
        return docs[nth % len(docs)] if docs and nth is not None else (path, doc_id)

    @rule(key=keys, doc=json_docs, plan=faults)
    def upload(self, key: Any, doc: dict[str, Any], plan: tuple[str, ...]) -> None:
        self.agree("upload", *self.pick(key), doc, plan=plan)

    @rule(key=keys, doc=json_docs, plan=faults)
    def update(self, key: Any, doc: dict[str, Any], plan: tuple[str, ...]) -> None:
        self.agree("update", *self.pick(key), doc, plan=plan)

    @rule(key=keys, plan=faults)
    def get(self, key: Any, plan: tuple[str, ...]) -> None:
        self.agree("get", *self.pick(key), plan=plan)

    @rule(key=keys, dst=paths)
    def move(self, key: Any, dst: str) -> None:
        src, doc_id = self.pick(key)
        self.agree("move", src, dst, doc_id)  # never retried: no failure is injected

    @rule(key=keys, plan=faults)
    def delete(self, key: Any, plan: tuple[str, ...]) -> None:
        self.agree("delete", *self.pick(key), plan=plan)

    @rule(
        key=keys,
        old=st.sampled_from([{}, {"v": 1}]),  # "current" and "changed" are the usual bases
        new=st.none() | json_docs,
        base=st.sampled_from(["current", "changed", "drawn"]),
        plan=faults,
    )
    def swap(self, key: Any, old: Any, new: Any, base: str, plan: tuple[str, ...]) -> None:
        """Swap from what is there (so that swaps succeed), from what is there changed (so
        that they fail on an existing document), or from a drawn document."""
        path, doc_id = self.pick(key)
        if base != "drawn":
            with contextlib.suppress(sqstore.SqstoreError):
                old = self.model["get"](path, doc_id)
                old = {**old, "not what is there": True} if base == "changed" else old
        self.agree("swap", path, doc_id, old, new, plan=plan)

    @rule(path=paths, plan=faults)
    def list_all(self, path: str, plan: tuple[str, ...]) -> None:
        self.agree("list", path, plan=plan)

    @rule(path=paths, step=st.sampled_from([1, 2, 3, 1, 2, 0, True]), fail=st.booleans())
    def list_step(self, path: str, step: int, fail: bool) -> None:
        # A step's walk is the handle's own state: a failed listing never advances it, so the
        # failure injected here is one before the listing.
        self.agree("list", path, step, plan=("before",) if fail else ())

    @invariant()
    def contents_agree(self) -> None:
        for path in SM_PATHS:
            self.agree("list", path)
            for doc_id in self.model["list"](path):
                self.agree("get", path, doc_id)

    @invariant()
    def layers_saw_every_call(self) -> None:
        assert self.counts == self.expected_counts
        assert len(self.log.lines) == self.expected_counts.total() - sum(
            n for key, n in self.expected_counts.items() if ":" in key
        )
        for name, store in self.subjects.items():  # the verbs ignore it; no layer may lose it
            dropbox = name.endswith("dropbox-layout")
            assert store["layout"] == (sqstore.DROPBOX_LAYOUT if dropbox else sqstore.LOCAL_LAYOUT)


SM_RUNS = settings(
    max_examples=int(os.environ.get("SQSTORE_SM_EXAMPLES", "60")),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
StorageComparison.TestCase.settings = SM_RUNS
TestStorageComparison = StorageComparison.TestCase


def breaking(op: str, make: Callable[[Storage], Callable[..., Any]]) -> sqstore.Layer:
    """A layer that replaces *op* by ``make(store)``: a deliberately broken one."""

    def layer(store: Storage) -> Storage:
        return cast(Storage, {**store, op: make(store)})

    return layer


def _falling_back(op: str, error: type[Exception], fallback: str) -> Callable[..., Any]:
    """A broken *op* that, where the real one raises *error*, does *fallback* instead."""

    def make(store: Storage) -> Callable[..., Any]:
        def call(path: str, doc_id: str, doc: Any) -> None:
            try:
                operation(store, op)(path, doc_id, doc)
            except error:
                operation(store, fallback)(path, doc_id, doc)

        return call

    return make


def _quiet_delete(store: Storage) -> Callable[..., Any]:
    def delete(path: str, doc_id: str) -> None:
        with contextlib.suppress(sqstore.NotFoundError):
            store["delete"](path, doc_id)

    return delete


def _move_over(store: Storage) -> Callable[..., Any]:
    def move(src: str, dst: str, doc_id: str) -> Any:
        store["get"](src, doc_id)
        with contextlib.suppress(sqstore.NotFoundError):
            store["delete"](dst, doc_id)
        return store["move"](src, dst, doc_id)

    return move


def _blind_swap(store: Storage) -> Callable[..., Any]:
    def swap(path: str, doc_id: str, old: Any, new: Any) -> bool:
        current = store["get"](path, doc_id)
        return store["swap"](path, doc_id, current, new)  # ignores *old*

    return swap


def _swap_keeping(store: Storage) -> Callable[..., Any]:
    def swap(path: str, doc_id: str, old: Any, new: Any) -> bool:
        return store["swap"](path, doc_id, old, old if new is None else new)

    return swap


def _stale_get(store: Storage) -> Callable[..., Any]:
    seen: dict[tuple[str, str], Any] = {}

    def get(path: str, doc_id: str) -> Any:
        if (path, doc_id) not in seen:
            seen[path, doc_id] = store["get"](path, doc_id)
        return copy.deepcopy(seen[path, doc_id])

    return get


def _whole_steps(store: Storage) -> Callable[..., Any]:
    def list_ids(path: str, limit: int | None = None) -> list[str]:
        return store["list"](path)  # ignores the step

    return list_ids


def _newest_first(store: Storage) -> Callable[..., Any]:
    def list_ids(path: str, limit: int | None = None) -> list[str]:
        return store["list"](path, *([] if limit is None else [limit]))[::-1]

    return list_ids


def _newest_steps(store: Storage) -> Callable[..., Any]:
    def list_ids(path: str, limit: int | None = None) -> list[str]:
        newest = store["list"](path)[::-1]
        return newest if limit is None else newest[:limit]  # always the newest: no walk

    return list_ids


BROKEN_LAYERS = {
    "update creates": breaking("update", _falling_back("update", sqstore.NotFoundError, "upload")),
    "upload replaces": breaking(
        "upload", _falling_back("upload", sqstore.AlreadyExistsError, "update")
    ),
    "delete of nothing passes": breaking("delete", _quiet_delete),
    "move replaces the target": breaking("move", _move_over),
    "swap ignores old": breaking("swap", _blind_swap),
    "swap to None keeps the document": breaking("swap", _swap_keeping),
    "get serves what it read first": breaking("get", _stale_get),
    "a list step is the whole folder": breaking("list", _whole_steps),
    "list is newest first": breaking("list", _newest_first),
    "a list step serves the newest": breaking("list", _newest_steps),
}
"""Layers each breaking one verb's contract, as a layer could: the machine must find each."""


SM_FIND = settings(
    max_examples=200,
    stateful_step_count=30,
    deadline=None,
    database=None,
    derandomize=True,
    report_multiple_bugs=False,
    phases=[Phase.generate],  # finding is the point; shrinking would take long
    suppress_health_check=[HealthCheck.too_slow],
)
"""Settings of a machine that must fail: repeatable, and done at the first failure."""


@pytest.mark.slow  # checks the machines, not the library: CI runs it
@pytest.mark.parametrize("broken", sorted(BROKEN_LAYERS))
def test_the_state_machine_finds_a_broken_layer(broken: str) -> None:
    """A layer that breaks one verb's contract makes the comparison with memory fail."""

    class Broken(StorageComparison):
        def make_subjects(self, tmp: Path) -> dict[str, Storage]:
            return {"broken": BROKEN_LAYERS[broken](sqstore.memory_storage())}

    with pytest.raises(AssertionError, match=r"broken: .* but memory gave"):
        run_state_machine_as_test(Broken, settings=SM_FIND)


@pytest.mark.slow  # checks the machines, not the library: CI runs it
def test_the_state_machine_fails_the_layered_stack_without_its_retry() -> None:
    """The failures injected below the retry layer are real: without with_retry the layered
    subject disagrees with memory."""

    class Unretried(StorageComparison):
        def make_subjects(self, tmp: Path) -> dict[str, Storage]:
            layered = sqstore.stack(
                sqstore.local_storage(tmp / "layered"),
                functools.partial(sqstore.with_logging, logger=self.log),
                functools.partial(sqstore.with_metrics, counts=self.counts),
                functools.partial(failing_as_planned, plan=self.plan),
            )
            return {self.LAYERED: layered}

    with pytest.raises(
        AssertionError, match=r"local-layered: .* gave \('error', <class '\S*TransientError"
    ):
        run_state_machine_as_test(Unretried, settings=SM_FIND)


WORKER = sqstore.LeasePolicy(holder="worker")


class JobLifeComparison(RuleBasedStateMachine):
    """Random job lives (submit, claim, finish, cancel, requeue, sweep) give the same outcomes
    on memory in sqooler's local layout (the model), memory in its Dropbox layout and a
    directory in its Dropbox layout; only the job ids differ, so jobs are compared by the
    order in which they were submitted.  One user submits: the Dropbox layout's ids name
    their user, so a cancel by another user differs by design, and their order within a
    second differs too (see the expected failure below)."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="sqstore-life-"))
        self.stores = {
            "memory": sqstore.memory_storage(),
            "memory-dropbox-layout": sqstore.memory_storage(layout=sqstore.DROPBOX_LAYOUT),
            "local-dropbox-layout": sqstore.local_storage(self.tmp, layout=sqstore.DROPBOX_LAYOUT),
        }
        for store in self.stores.values():
            sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
        self.jobs: list[dict[str, str]] = []  # by submission: each store's id of the job
        self.clock = 1_700_000_000.0

    def teardown(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def now(self) -> float:
        return self.clock

    def index(self, name: str, job_id: Any) -> Any:
        """A job id of store *name* as its job's submission number (other values as they are)."""
        for i, ids in enumerate(self.jobs):
            if ids[name] == job_id:
                return i
        return job_id

    def agree(self, act: Callable[[str, Storage], Any]) -> list[Any]:
        """Run *act* on each store; its outcomes, job ids as submission numbers, must agree."""
        outcomes = {}
        for name, store in self.stores.items():
            try:
                outcomes[name] = ("ok", self.numbered(name, act(name, store)))
            except Exception as exc:
                outcomes[name] = ("error", type(exc))
        model = outcomes["memory"]
        for name, got in outcomes.items():
            assert got == model, f"{name} gave {got}, but memory gave {model}"
        return [outcomes[name] for name in self.stores]

    def numbered(self, name: str, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return type(value)(self.numbered(name, v) for v in value)
        if isinstance(value, dict):
            return {self.index(name, k): self.numbered(name, v) for k, v in value.items()}
        if isinstance(value, sqstore.NextJob):
            return ("next", self.index(name, value.job_id))
        if isinstance(value, sqstore.Lease):
            return ("lease", value.holder, value.attempts, value.expires)
        return self.index(name, value)

    def pick(self, nth: int, running: bool = False) -> dict[str, str]:
        """Each store's id of a job: the nth submitted, or (*running*) the nth that the
        model has running, when it has any."""
        if running and (held := sorted(sqstore.running_jobs(self.stores["memory"], "sim"))):
            nth = self.index("memory", held[nth % len(held)])
        return self.jobs[nth % len(self.jobs)]

    @rule(doc=json_docs)
    def submit(self, doc: dict[str, Any]) -> None:
        ids: dict[str, str] = {}

        def act(name: str, store: Storage) -> None:
            ids[name] = sqstore.upload_job(store, doc, "sim", "alice")
            sqstore.upload_status(store, "sim", "alice", ids[name])

        self.agree(act)
        self.jobs.append(ids)

    @precondition(lambda self: self.jobs)
    @rule()
    def claim(self) -> None:
        def act(name: str, store: Storage) -> Any:
            claimed = sqstore.claim_job(store, "sim", policy=WORKER, now=self.now)
            return None if claimed is None else claimed[0]

        self.agree(act)

    @precondition(lambda self: self.jobs)
    @rule(nth=st.integers(0, 9), done=st.booleans(), running=st.booleans())
    def finish(self, nth: int, done: bool, running: bool) -> None:
        ids = self.pick(nth, running)

        def act(name: str, store: Storage) -> None:
            job_id = ids[name]
            status = sqstore.StatusMsg(job_id, "DONE" if done else "ERROR", "ran", "None")
            result = sqstore.ResultDict(
                display_name="sim", backend_version="1", job_id=job_id, status="DONE"
            )
            sqstore.update_in_database(
                store,
                result if done else None,
                status,
                job_id,
                "sim",
                policy=WORKER,
                now=self.now,
            )

        self.agree(act)

    @precondition(lambda self: self.jobs)
    @rule(nth=st.integers(0, 9))
    def cancel(self, nth: int) -> None:
        ids = self.pick(nth)
        self.agree(lambda name, store: sqstore.cancel_job(store, "sim", "alice", ids[name]))

    @precondition(lambda self: self.jobs)
    @rule(nth=st.integers(0, 9), running=st.booleans())
    def requeue(self, nth: int, running: bool) -> None:
        ids = self.pick(nth, running)
        self.agree(lambda name, store: sqstore.requeue_job(store, "sim", ids[name], now=self.now))

    @rule(seconds=st.sampled_from([1.0, 60.0, 800.0]))  # a lease is 600 s, the skew 120 s
    def sweep(self, seconds: float) -> None:
        self.clock += seconds
        self.agree(lambda name, store: sqstore.requeue_expired(store, "sim", now=self.now))

    @precondition(lambda self: self.jobs)
    @rule(nth=st.integers(0, 9))
    def read(self, nth: int) -> None:
        ids = self.pick(nth)

        def act(name: str, store: Storage) -> Any:
            job_id = ids[name]
            result = sqstore.get_result(store, "sim", "alice", job_id)
            return sqstore.get_status(store, "sim", "alice", job_id).status, result.status

        self.agree(act)

    @invariant()
    def queues_agree(self) -> None:
        self.agree(lambda name, store: sqstore.running_jobs(store, "sim"))
        self.agree(
            lambda name, store: sqstore.get_backend_status(store, "sim", now=self.now).pending_jobs
        )
        self.agree(
            lambda name, store: [
                sqstore.job_id_from(store["layout"], "queued", i)
                for i in sqstore.get_file_queue(
                    store, sqstore.locate(store["layout"], "queued", "sim")[0]
                )
            ]
        )


JobLifeComparison.TestCase.settings = SM_RUNS
TestJobLifeComparison = JobLifeComparison.TestCase


@pytest.mark.slow  # checks the machines, not the library: CI runs it
def test_the_job_life_machine_finds_a_broken_layer() -> None:
    """A layer whose list steps serve the newest ids, under the operations of one store,
    makes the comparison of job lives fail (its claims take the newest job)."""

    class Broken(JobLifeComparison):
        def __init__(self) -> None:
            super().__init__()
            name = "memory-dropbox-layout"
            self.stores[name] = BROKEN_LAYERS["a list step serves the newest"](self.stores[name])

    with pytest.raises(AssertionError, match=r"memory-dropbox-layout gave .* but memory gave"):
        run_state_machine_as_test(Broken, settings=SM_FIND)


def test_the_queue_is_served_in_submission_order_whoever_submits(configured: Storage) -> None:
    """Of two jobs submitted by two users, the one submitted first is claimed first."""
    store, layout = configured, configured["layout"]
    now_ns = 1_700_000_000_000_000_000
    first = sqstore.new_job_id(layout, "sim", "bob", now_ns, 1)
    second = sqstore.new_job_id(layout, "sim", "alice", now_ns + 1_000, 2)  # 1 microsecond on
    for job_id in (first, second):  # as upload_job stores them
        store["upload"](*sqstore.locate(layout, "queued", "sim", job_id=job_id), {"j": job_id})
    claimed = sqstore.claim_job(store, "sim", policy=WORKER)
    assert claimed is not None and claimed[0].job_id == first, (first, second)


# ============================================================================
# Operations (the high-level API) on every backend
# ============================================================================
JOB = {
    "experiment_0": {
        "instructions": [["x", [0], []], ["measure", [0], []]],
        "num_wires": 1,
        "shots": 5,
        "wire_order": "sequential",
    }
}


@pytest.fixture
def keys() -> tuple[sqstore.JWK, sqstore.JWK]:
    return sqstore.generate_keypair("bobkey")


@pytest.fixture
def signed(store: Storage, keys: tuple[sqstore.JWK, sqstore.JWK]) -> Storage:
    """A store with a signing backend 'sim' and its published public key."""
    private, public = keys
    sqstore.upload_config(store, sqstore.demo_config("sim", sign=True), "sim", private)
    sqstore.upload_public_key(store, public, "sim")
    return store


# A Layout field -> the kind of document `locate` places there.
LOCATED = {"configs": "config", "public_keys": "public_key", "results": "result", "leases": "lease"}


def place(
    store: Storage, kind: str, job_id: str = "", display_name: str = "sim"
) -> tuple[str, str]:
    """Where a job's document of *kind* (a Layout field) lives: `locate` in the store's layout."""
    return sqstore.locate(store["layout"], LOCATED.get(kind, kind), display_name, job_id=job_id)


def folder(store: Storage, kind: str, job_id: str = "", display_name: str = "sim") -> str:
    """The folder of a kind of document (a Layout field) for a job, in the store's layout."""
    return place(store, kind, job_id, display_name)[0]


def doc_id(store: Storage, kind: str, job_id: str, display_name: str = "sim") -> str:
    """The id of a job's document of *kind* in its folder."""
    return place(store, kind, job_id, display_name)[1]


def jobs_in(store: Storage, kind: str, job_id: str = "") -> list[str]:
    """The job ids with a document of *kind* in its folder (that of *job_id*'s user)."""
    stored = store["list"](folder(store, kind, job_id))
    located = LOCATED.get(kind, kind)
    return [sqstore.job_id_from(store["layout"], located, name) or name for name in stored]


def finish(store: Storage, display_name: str, key: Any = None) -> list[str]:
    """Run Bob until the queue is empty; return the job ids in the order claimed."""
    done: list[str] = []
    lines: list[str] = []

    def bob(job: dict[str, Any], job_id: str, dn: str) -> Any:
        done.append(job_id)
        return sqstore.run_simulator(job, job_id, dn)

    finished = sqstore.work([store], display_name, bob, key, burst=True, log=lines.append)
    assert finished == len(done) == len(lines), lines  # each claimed job finished, no error
    assert all(f" {job_id} DONE in " in line for job_id, line in zip(done, lines, strict=True)), (
        lines
    )
    return done


def test_config_upload_get_update(store: Storage) -> None:
    """Configs upload once, read back, update in place, and take the given display_name."""
    cfg = sqstore.demo_config("sim")
    sqstore.upload_config(store, attrs.evolve(cfg, display_name="other"), "sim")
    assert sqstore.get_config(store, "sim") == cfg
    with pytest.raises(sqstore.AlreadyExistsError):
        sqstore.upload_config(store, cfg, "sim")
    sqstore.update_config(store, attrs.evolve(cfg, max_shots=7), "sim")
    assert sqstore.get_config(store, "sim").max_shots == 7
    with pytest.raises(sqstore.NotFoundError):
        sqstore.update_config(store, cfg, "nope")
    with pytest.raises(sqstore.NotFoundError):
        sqstore.get_config(store, "nope")
    assert sqstore.get_backends(store) == ["sim"]


def test_config_accepts_plain_dicts(store: Storage) -> None:
    """A plain dict with the config's fields works where a record does; a bad one is refused."""
    doc = sqstore.to_doc(sqstore.demo_config("sim"))
    sqstore.upload_config(store, doc, "sim")
    assert sqstore.get_config(store, "sim") == sqstore.demo_config("sim")
    with pytest.raises(sqstore.InvalidDocumentError, match="max_shots"):
        sqstore.upload_config(store, {**doc, "max_shots": "lots"}, "sim2")
    assert sqstore.get_backends(store) == ["sim"]


def test_signed_config_is_only_updated_by_its_key(signed: Storage, keys: Any) -> None:
    """A signed config cannot be replaced without its key, or with another key."""
    private, _ = keys
    cfg = sqstore.get_config(signed, "sim")
    assert cfg.kid == "bobkey" and cfg.sign
    intruder, _ = sqstore.generate_keypair("bobkey")
    with pytest.raises(sqstore.BadSignatureError, match="another key"):
        sqstore.update_config(signed, attrs.evolve(cfg, max_shots=1), "sim", intruder)
    with pytest.raises(sqstore.BadSignatureError, match="private_jwk"):
        sqstore.update_config(signed, attrs.evolve(cfg, sign=False, max_shots=1), "sim")
    sqstore.update_config(signed, attrs.evolve(cfg, max_shots=1), "sim", private)
    assert sqstore.get_config(signed, "sim").max_shots == 1
    raw = signed["get"](folder(signed, "configs"), doc_id(signed, "configs", ""))
    assert sqstore.verify_doc(raw, [sqstore.get_public_key(signed, "sim")])["max_shots"] == 1


def test_signing_config_needs_a_key(store: Storage) -> None:
    """A config that signs cannot be uploaded without a private key."""
    with pytest.raises(sqstore.BadSignatureError, match="no private_jwk"):
        sqstore.upload_config(store, sqstore.demo_config("sim", sign=True), "sim")
    assert sqstore.get_backends(store) == []


@pytest.mark.usefixtures("configured")
def test_backend_dict_and_status(store: Storage) -> None:
    """The Qiskit views carry the long backend name, gates and the operational flag."""
    view = sqstore.get_backend_dict(store, "sim")
    assert view.backend_name == f"{store['name']}_sim_simulator"
    assert view.basis_gates == ("x", "h", "rx", "rz", "cz")
    assert view.n_qubits == 4 and view.backend_version == "0.1.0"
    assert not sqstore.get_backend_status(store, "sim").operational
    t0 = 1_800_000_000.0
    assert sqstore.timestamp_queue(store, "sim", now=lambda: t0)
    status = sqstore.get_backend_status(store, "sim", now=lambda: t0 + 299)
    assert status.operational and status.pending_jobs == 0 and status.status_msg == ""
    assert not sqstore.get_backend_status(store, "sim", now=lambda: t0 + 301).operational
    assert sqstore.get_backend_status(store, "sim", timeout=400, now=lambda: t0 + 301).operational


@pytest.mark.usefixtures("configured")
def test_queue_is_fifo(store: Storage) -> None:
    """Jobs are claimed in the order they were submitted."""
    submitted = [sqstore.upload_job(store, {"n": {"i": i}}, "sim", "alice") for i in range(25)]
    claimed = []
    while (got := sqstore.claim_job(store, "sim")) is not None:
        claimed.append(got[0].job_id)
        assert got[1] == {"n": {"i": len(claimed) - 1}}
    assert claimed == submitted


@pytest.mark.usefixtures("configured")
def test_next_job_answers_like_sqooler(store: Storage) -> None:
    """get_next_job_in_queue says 'None' twice for an empty queue, else the running path."""
    assert sqstore.get_next_job_in_queue(store, "sim") == sqstore.NextJob("None", "None")
    job_id = sqstore.upload_job(store, JOB, "sim", "alice")
    nxt = sqstore.get_next_job_in_queue(store, "sim")
    assert nxt == sqstore.NextJob(job_id, store["layout"].running)
    assert sqstore.get_job(store, nxt.job_json_path, nxt.job_id) == JOB


@pytest.mark.usefixtures("configured")
def test_claim_is_exactly_once_and_leased(store: Storage) -> None:
    """A claimed job is leased to its holder; a second worker gets the next job, not it."""
    first = sqstore.upload_job(store, JOB, "sim", "alice")
    second = sqstore.upload_job(store, JOB, "sim", "alice")
    t0 = 1_800_000_000.0
    a = sqstore.claim_job(
        store,
        "sim",
        policy=sqstore.LeasePolicy(holder="worker-a", lease_seconds=30),
        now=lambda: t0,
    )
    b = sqstore.claim_job(
        store,
        "sim",
        policy=sqstore.LeasePolicy(holder="worker-b", lease_seconds=30),
        now=lambda: t0,
    )
    assert a is not None and b is not None
    assert (a[0].job_id, b[0].job_id) == (first, second)
    assert sqstore.claim_job(store, "sim", policy=sqstore.LeasePolicy(holder="worker-c")) is None
    lease = sqstore.from_doc(store["get"](folder(store, "leases"), first), sqstore.Lease)
    assert (lease.holder, lease.expires, lease.display_name) == ("worker-a", t0 + 30, "sim")


@pytest.mark.usefixtures("configured")
def test_draining_lists_the_queue_once_per_pass(store: Storage) -> None:
    """claim_jobs walks a long queue one id per step (never the whole queue per job), FIFO."""
    submitted = [sqstore.upload_job(store, {"e": {}}, "sim", "alice") for _ in range(40)]
    sqstore.timestamp_queue(store, "sim")  # a fresh heartbeat: no lease sweep in this drain
    counts: collections.Counter[str] = collections.Counter()
    counted = sqstore.with_metrics(store, counts=counts)
    claimed = [nxt.job_id for nxt, _ in sqstore.claim_jobs(counted, "sim")]
    assert claimed == submitted
    assert counts["list"] == len(submitted) + 2, "a step per job, then two that find it empty"


@pytest.mark.usefixtures("configured")
def test_draining_keeps_the_heartbeat(store: Storage) -> None:
    """A long drain still writes last_queue_check once per heartbeat."""
    for _ in range(10):
        sqstore.upload_job(store, {"e": {}}, "sim", "alice")
    clock = [1_800_000_000.0]
    for _ in sqstore.claim_jobs(
        store, "sim", policy=sqstore.LeasePolicy(heartbeat=60), now=lambda: clock[0]
    ):
        clock[0] += 20  # each job takes 20 s
    last = sqstore.get_config(store, "sim").last_queue_check
    assert last is not None and clock[0] - last.timestamp() <= 60 + 20


@pytest.mark.usefixtures("configured")
def test_expired_leases_are_requeued(store: Storage) -> None:
    """A job whose worker vanished goes back to its queue once its lease expires, only then."""
    job_id = sqstore.upload_job(store, JOB, "sim", "alice")
    t0 = 1_800_000_000.0
    assert sqstore.claim_job(
        store, "sim", policy=sqstore.LeasePolicy(holder="dead", lease_seconds=60), now=lambda: t0
    )
    assert (
        sqstore.requeue_expired(store, now=lambda: t0 + 59, policy=sqstore.LeasePolicy(skew=0))
        == []
    )
    assert sqstore.requeue_expired(store, now=lambda: t0 + 61) == [], "within the clock skew"
    assert jobs_in(store, "queued") == []
    assert (
        sqstore.requeue_expired(
            store, "other", now=lambda: t0 + 61, policy=sqstore.LeasePolicy(skew=0)
        )
        == []
    )
    assert sqstore.requeue_expired(
        store, now=lambda: t0 + 61, policy=sqstore.LeasePolicy(skew=0)
    ) == [job_id]
    assert jobs_in(store, "queued") == [job_id]
    released = sqstore.from_doc(store["get"](folder(store, "leases"), job_id), sqstore.Lease)
    assert (released.holder, released.attempts) == ("", 1), "the lease counts the attempts"
    assert (
        sqstore.requeue_expired(store, now=lambda: t0 + 62, policy=sqstore.LeasePolicy(skew=0))
        == []
    )
    again = sqstore.claim_job(
        store, "sim", policy=sqstore.LeasePolicy(holder="alive"), now=lambda: t0 + 62
    )
    assert again is not None and again[0].job_id == job_id
    taken = sqstore.from_doc(store["get"](folder(store, "leases"), job_id), sqstore.Lease)
    assert (taken.holder, taken.attempts) == ("alive", 2)


@pytest.mark.usefixtures("configured")
def test_torn_or_hostile_leases_are_swept(store: Storage) -> None:
    """A lease that is not a lease, or names an unsafe backend, is deleted, not followed."""
    job_id = sqstore.upload_job(store, JOB, "sim", "alice")
    hostile = sqstore.Lease(job_id, "../../etc", "x", "t", 0.0)
    store["upload"](folder(store, "leases"), job_id, sqstore.to_doc(hostile))
    store["upload"](folder(store, "leases"), "other", {"not": "a lease"})
    assert sqstore.requeue_expired(store) == []
    assert jobs_in(store, "leases") == []
    assert jobs_in(store, "queued") == [job_id]


@pytest.mark.usefixtures("configured")
def test_lease_renewal(store: Storage) -> None:
    """The holder can extend its lease; anyone else gets LeaseLostError."""
    job_id = sqstore.upload_job(store, JOB, "sim", "alice")
    t0 = 1_800_000_000.0
    w, thief = sqstore.LeasePolicy(holder="w", lease_seconds=60), sqstore.LeasePolicy(holder="t")
    sqstore.claim_job(store, "sim", policy=w, now=lambda: t0)
    renewed = sqstore.renew_lease(store, job_id, policy=w, now=lambda: t0 + 50)
    assert renewed.expires == t0 + 110
    assert sqstore.requeue_expired(store, now=lambda: t0 + 100) == []
    with pytest.raises(sqstore.LeaseLostError):
        sqstore.renew_lease(store, job_id, policy=thief)
    error = sqstore.StatusMsg(job_id, "ERROR", "", "")
    with pytest.raises(sqstore.LeaseLostError):
        sqstore.update_in_database(store, None, error, job_id, "sim", policy=thief)
    assert jobs_in(store, "running") == [job_id]


@pytest.mark.usefixtures("configured")
def test_stale_lease_before_move_is_cleared(store: Storage) -> None:
    """A worker that died between taking the lease and moving the job does not block it."""
    job_id = sqstore.upload_job(store, JOB, "sim", "alice")
    lease = sqstore.Lease(job_id, "sim", "dead", "t", 100.0)
    store["upload"](folder(store, "leases"), job_id, sqstore.to_doc(lease))
    sqstore.timestamp_queue(store, "sim")
    got = sqstore.claim_job(store, "sim")  # no sweep needed: the claim takes the lease over
    assert got is not None and got[0].job_id == job_id
    taken = sqstore.from_doc(store["get"](folder(store, "leases"), job_id), sqstore.Lease)
    assert taken.holder != "dead" and taken.attempts == 2


@pytest.mark.usefixtures("configured")
def test_heartbeat_requeues_expired_leases(store: Storage) -> None:
    """Polling workers requeue expired leases by themselves, once per heartbeat."""
    job_id = sqstore.upload_job(store, JOB, "sim", "alice")
    t0 = 1_800_000_000.0
    dead, alive = sqstore.LeasePolicy(holder="dead", lease_seconds=5), sqstore.LeasePolicy(skew=0)
    sqstore.claim_job(store, "sim", policy=dead, now=lambda: t0)
    assert sqstore.claim_job(store, "sim", policy=alive, now=lambda: t0 + 30) is None
    got = sqstore.claim_job(store, "sim", policy=alive, now=lambda: t0 + 61)
    assert got is not None and got[0].job_id == job_id


def test_polling_an_empty_queue_does_not_rewrite_the_config(store: Storage, keys: Any) -> None:
    """last_queue_check is written once per heartbeat, not on every poll."""
    private, _ = keys
    sqstore.upload_config(store, sqstore.demo_config("sim", sign=True), "sim", private)
    counts: collections.Counter[str] = collections.Counter()
    counted = sqstore.with_metrics(store, counts=counts)
    clock = [1_800_000_000.0]
    for _ in range(20):
        assert (
            sqstore.claim_job(
                counted,
                "sim",
                private,
                policy=sqstore.LeasePolicy(heartbeat=60),
                now=lambda: clock[0],
            )
            is None
        )
        clock[0] += 1
    assert counts["update"] == 1
    clock[0] += 60
    sqstore.claim_job(
        counted, "sim", private, policy=sqstore.LeasePolicy(heartbeat=60), now=lambda: clock[0]
    )
    assert counts["update"] == 2
    every_second = sqstore.LeasePolicy(heartbeat=1)
    for k in range(1, 6):
        at = functools.partial(float, clock[0] + k)
        sqstore.claim_job(counted, "sim", private, policy=every_second, now=at)
    assert counts["update"] == 7
    assert sqstore.get_backend_status(store, "sim", now=lambda: clock[0]).operational


@pytest.mark.usefixtures("configured")
def test_status_lifecycle(store: Storage) -> None:
    """A status starts INITIALIZING; a missing one reads as ERROR, as in sqooler."""
    job_id = sqstore.upload_job(store, JOB, "sim", "alice")
    missing = sqstore.get_status(store, "sim", "alice", job_id)
    assert (missing.status, missing.detail) == ("ERROR", "Could not find the status file.")
    assert sqstore.upload_status(store, "sim", "alice", job_id).status == "INITIALIZING"
    assert sqstore.get_status(store, "sim", "alice", job_id).status == "INITIALIZING"
    with pytest.raises(sqstore.AlreadyExistsError):
        sqstore.upload_status(store, "sim", "alice", job_id)


def test_full_signed_lifecycle(signed: Storage, keys: Any) -> None:
    """Alice submits, Bob finishes signed, Alice reads a DONE status and a verified result."""
    private, _ = keys
    job_id = sqstore.upload_job(signed, JOB, "sim", "alice")
    sqstore.upload_status(signed, "sim", "alice", job_id)
    assert finish(signed, "sim", private) == [job_id]
    assert sqstore.get_status(signed, "sim", "alice", job_id).status == "DONE"
    assert sqstore.is_signed(signed["get"](*place(signed, "status", job_id)))
    result = sqstore.get_result(signed, "sim", "alice", job_id)
    assert result.status == "DONE" and result.results[0].data.memory == ("1",) * 5
    assert result.backend_name == f"{signed['name']}_sim_simulator"
    assert sqstore.verify_result(signed, "sim", job_id)
    assert jobs_in(signed, "finished", job_id) == [job_id]
    assert jobs_in(signed, "running") == jobs_in(signed, "leases") == []


@pytest.mark.usefixtures("configured")
def test_missing_result_reads_as_error(store: Storage) -> None:
    """A result that is not there yet reads as an ERROR result, as in sqooler."""
    result = sqstore.get_result(store, "sim", "alice", sqstore.create_job_id(store, "sim", "a"))
    assert (result.status, result.success) == ("ERROR", False)


def test_unsigned_or_tampered_results_do_not_verify(signed: Storage, keys: Any) -> None:
    """verify_result is False for a tampered result and for an unsigned one."""
    private, _ = keys
    job_id = sqstore.upload_job(signed, JOB, "sim", "alice")
    finish(signed, "sim", private)
    raw = signed["get"](*place(signed, "results", job_id))
    raw["payload"]["results"][0]["data"]["memory"][0] = "0"
    signed["update"](*place(signed, "results", job_id), raw)
    assert not sqstore.verify_result(signed, "sim", job_id)
    signed["update"](*place(signed, "results", job_id), raw["payload"])
    assert not sqstore.verify_result(signed, "sim", job_id)
    with pytest.raises(sqstore.NotFoundError):
        sqstore.verify_result(signed, "sim", sqstore.create_job_id(signed, "sim", "alice"))


def test_verify_result_with_a_given_key(signed: Storage, keys: Any) -> None:
    """A frontend may pass the key it fetched once; another key does not verify."""
    private, public = keys
    job_id = sqstore.upload_job(signed, JOB, "sim", "alice")
    finish(signed, "sim", private)
    assert sqstore.verify_result(signed, "sim", job_id, public_jwk=public)
    assert sqstore.verify_result(signed, "sim", job_id, public_jwk=sqstore.to_doc(public))
    _, stranger = sqstore.generate_keypair("bobkey")
    assert not sqstore.verify_result(signed, "sim", job_id, public_jwk=stranger)


def test_signing_backend_needs_a_key_for_results(signed: Storage) -> None:
    """A backend that signs cannot upload an unsigned result."""
    job_id = sqstore.create_job_id(signed, "sim", "alice")
    result = sqstore.run_simulator(JOB, job_id, "sim")
    with pytest.raises(sqstore.BadSignatureError, match="no private_jwk"):
        sqstore.upload_result(signed, result, "sim", job_id)
    assert jobs_in(signed, "results", job_id) == []


@pytest.mark.usefixtures("configured")
def test_error_moves_the_job_to_deleted(store: Storage) -> None:
    """An ERROR finish moves the job to deleted and writes the ERROR status."""
    job_id = sqstore.upload_job(store, JOB, "sim", "alice")
    sqstore.upload_status(store, "sim", "alice", job_id)
    nxt = sqstore.get_next_job_in_queue(store, "sim")
    status = sqstore.StatusMsg(job_id, "ERROR", "boom", "ValueError('boom')")
    sqstore.update_in_database(store, None, status, nxt.job_id, "sim")
    assert jobs_in(store, "deleted") == [job_id]
    assert sqstore.get_status(store, "sim", "alice", job_id) == status
    assert jobs_in(store, "running") == jobs_in(store, "leases") == []


@pytest.mark.usefixtures("configured")
def test_progress_status_keeps_the_job_and_its_lease(store: Storage) -> None:
    """A status that is neither DONE nor ERROR is written; the job stays running and leased."""
    job_id = sqstore.upload_job(store, JOB, "sim", "alice")
    sqstore.claim_job(store, "sim", policy=sqstore.LeasePolicy(holder="w"))
    progress = sqstore.StatusMsg(job_id, "QUEUED", "50 % done", "None")
    sqstore.update_in_database(
        store, None, progress, job_id, "sim", policy=sqstore.LeasePolicy(holder="w")
    )
    assert sqstore.get_status(store, "sim", "alice", job_id) == progress
    assert jobs_in(store, "running") == jobs_in(store, "leases") == [job_id]


def test_finish_is_safe_to_rerun(signed: Storage, keys: Any) -> None:
    """Running update_in_database again (after a crash) neither fails nor duplicates."""
    private, _ = keys
    job_id = sqstore.upload_job(signed, JOB, "sim", "alice")
    _, job = sqstore.claim_job(signed, "sim", private) or pytest.fail("no job")
    result = sqstore.run_simulator(job, job_id, "sim")
    done = sqstore.StatusMsg(job_id, "DONE", "ok", "None")
    for _ in range(2):
        sqstore.update_in_database(signed, result, done, job_id, "sim", private)
    assert jobs_in(signed, "finished", job_id) == [job_id]
    assert sqstore.verify_result(signed, "sim", job_id)
    with pytest.raises(sqstore.NotFoundError):
        other = sqstore.create_job_id(signed, "sim", "alice")
        sqstore.update_in_database(signed, attrs.evolve(result, job_id=other), done, other, "sim")


@pytest.mark.usefixtures("configured")
def test_result_job_id_is_corrected(store: Storage) -> None:
    """A result carrying another job id is stored under the right one, with a warning."""
    result = sqstore.run_simulator(JOB, "wrong", "sim")
    job_id = sqstore.create_job_id(store, "sim", "alice")
    with pytest.warns(UserWarning, match="wrong"):
        sqstore.upload_result(store, result, "sim", job_id)
    assert sqstore.get_result(store, "sim", "alice", job_id).job_id == job_id


def test_public_key_is_never_silently_replaced(signed: Storage, keys: Any) -> None:
    """Publishing the same key again is fine; another key under the kid is refused."""
    private, public = keys
    sqstore.upload_public_key(signed, public, "sim")
    assert sqstore.get_public_key_from_kid(signed, "bobkey") == public
    _, imposter = sqstore.generate_keypair("bobkey")
    with pytest.raises(sqstore.AlreadyExistsError, match="another public key"):
        sqstore.upload_public_key(signed, imposter, "sim")
    assert sqstore.get_public_key(signed, "sim") == public
    with pytest.raises(sqstore.BadSignatureError, match="not a public key"):
        sqstore.upload_public_key(signed, private, "sim")
    _, wrong_kid = sqstore.generate_keypair("otherkid")
    with pytest.raises(sqstore.BadSignatureError, match="otherkid"):
        sqstore.upload_public_key(signed, wrong_kid, "sim")


@pytest.mark.parametrize("field", ["display_name", "username", "job_id"])
@pytest.mark.parametrize("bad", ["../../etc", "a/b", "", "x\x00", "Sim" * 50])
@pytest.mark.usefixtures("configured")
def test_api_names_are_validated(store: Storage, tmp_path: Path, field: str, bad: str) -> None:
    """Names given to the API are checked before they reach a path."""
    before = tree(tmp_path)
    names = {"display_name": "sim", "username": "alice"}
    names["job_id"] = sqstore.create_job_id(store, "sim", "alice")
    names[field] = bad
    with pytest.raises(sqstore.InvalidNameError):
        if field == "job_id":
            result = sqstore.run_simulator(JOB, "x", "sim")
            sqstore.upload_result(store, result, names["display_name"], bad)
        else:
            sqstore.upload_job(store, JOB, names["display_name"], names["username"])
    with pytest.raises(sqstore.InvalidNameError):
        sqstore.upload_status(store, names["display_name"], names["username"], names["job_id"])
    assert tree(tmp_path) == before


def test_kid_is_validated(store: Storage) -> None:
    """A kid is a name too: it cannot escape the keys folder."""
    with pytest.raises(
        sqstore.NotFoundError, match=re.escape("no public key '../configs/sim': a kid is")
    ):
        sqstore.get_public_key_from_kid(store, "../configs/sim")
    with pytest.raises(sqstore.InvalidNameError):
        sqstore.generate_keypair("../x")


def test_upload_job_refuses_non_objects(store: Storage) -> None:
    """A job must be a JSON object."""
    with pytest.raises(sqstore.InvalidDocumentError):
        sqstore.upload_job(store, ["not", "a", "dict"], "sim", "alice")  # type: ignore[arg-type]


# sqooler's callers on the API -----------------------------------
def spied(store: Storage) -> tuple[Storage, list[tuple[str, tuple[Any, ...]]]]:
    """*store* with every call of a verb recorded as ``(verb, args)``."""
    calls: list[tuple[str, tuple[Any, ...]]] = []

    def wrap(op: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def spy(*args: Any) -> Any:
            calls.append((op, args))
            return call(*args)

        return spy

    return sqstore.wrap_ops(store, wrap), calls


WRITES = ("upload", "update", "move", "delete", "swap")  # the verbs that change a store


def test_upload_status_for_a_backend_without_config_is_not_found(store: Storage) -> None:
    """upload_status for a backend with no config raises NotFoundError after one read, and
    writes nothing: a frontend rejects a job for an unknown backend as it does on sqooler."""
    job_id = sqstore.create_job_id(store, "ghost", "alice")
    spy, calls = spied(store)
    with pytest.raises(sqstore.NotFoundError, match="ghost") as info:
        sqstore.upload_status(spy, "ghost", "alice", job_id)
    assert isinstance(info.value, FileNotFoundError)
    assert [op for op, _ in calls] == ["get"]
    assert sqstore.get_status(store, "ghost", "alice", job_id).status == "ERROR"  # none written


def test_upload_status_for_an_unknown_backend_fails_as_on_sqooler(
    sqooler: Any, tmp_path: Path
) -> None:
    """sqooler 0.9 and sqstore both refuse a status for a backend without a config, with a
    FileNotFoundError, on one directory."""
    shared = sqstore.local_storage(tmp_path / "store")
    job_id = sqstore.create_job_id(shared, "ghost", "alice")
    with pytest.raises(FileNotFoundError):
        sqooler.upload_status("ghost", "alice", job_id)
    with pytest.raises(FileNotFoundError):
        sqstore.upload_status(shared, "ghost", "alice", job_id)
    assert tree(tmp_path / "store") == {}


def test_upload_status_costs_one_config_read_which_signing_shares(
    store: Storage, keys: tuple[sqstore.JWK, sqstore.JWK]
) -> None:
    """The config read that finds an unknown backend is the one a signing backend makes
    anyway: unsigned, a read and a write; signed, two reads (config, published key)."""
    private, public = keys
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    sqstore.upload_config(store, sqstore.demo_config("sig", sign=True), "sig", private)
    sqstore.upload_public_key(store, public, "sig")
    counts: dict[str, int] = {}
    metered = sqstore.with_metrics(store, counts=counts)
    sqstore.upload_status(metered, "sim", "alice", sqstore.create_job_id(store, "sim", "alice"))
    assert counts == {"get": 1, "upload": 1}
    counts.clear()
    job_id = sqstore.create_job_id(store, "sig", "alice")
    sqstore.upload_status(metered, "sig", "alice", job_id, private)
    assert counts == {"get": 2, "upload": 1}
    assert sqstore.is_signed(store["get"](folder(store, "status", job_id, "sig"),
                                          doc_id(store, "status", job_id, "sig")))  # fmt: skip


BAD_DISPLAY_NAMES = ["dummy_non_existing", "Sim", "../../etc", "", "a/b", "x\x00y", "s" * 65, "$ne"]
BAD_NAMES = ["../../etc", "a/b", "", "x\x00y", ".hidden", "$where", "a" * 129, "\u202egnp.exe"]
BAD_FOLDERS = ["../jobs", "/etc/passwd", "jobs//running", "jobs/running/", "", "x\x00y"]
NOT_FOUND = re.compile(r"no (backend|user|job|public key|folder) (.+): an? [a-z ]+ is .+")


READS_WITH_A_BAD_NAME: list[tuple[str, list[str], Callable[[Storage, str, str], object]]] = [
    ("get_config", BAD_DISPLAY_NAMES, lambda s, b, j: sqstore.get_config(s, b)),
    ("get_backend_dict", BAD_DISPLAY_NAMES, lambda s, b, j: sqstore.get_backend_dict(s, b)),
    ("get_backend_status", BAD_DISPLAY_NAMES, lambda s, b, j: sqstore.get_backend_status(s, b)),
    ("get_status dn", BAD_DISPLAY_NAMES, lambda s, b, j: sqstore.get_status(s, b, "alice", j)),
    ("get_status user", BAD_NAMES, lambda s, b, j: sqstore.get_status(s, "sim", b, j)),
    ("get_status id", BAD_NAMES, lambda s, b, j: sqstore.get_status(s, "sim", "alice", b)),
    ("get_result dn", BAD_DISPLAY_NAMES, lambda s, b, j: sqstore.get_result(s, b, "alice", j)),
    ("get_result user", BAD_NAMES, lambda s, b, j: sqstore.get_result(s, "sim", b, j)),
    ("get_result id", BAD_NAMES, lambda s, b, j: sqstore.get_result(s, "sim", "alice", b)),
    ("get_job id", BAD_NAMES, lambda s, b, j: sqstore.get_job(s, s["layout"].running, b)),
    ("get_job folder", BAD_FOLDERS, lambda s, b, j: sqstore.get_job(s, b, j)),
    ("get_public_key", BAD_DISPLAY_NAMES, lambda s, b, j: sqstore.get_public_key(s, b)),
    ("get_public_key_from_kid", BAD_NAMES, lambda s, b, j: sqstore.get_public_key_from_kid(s, b)),
    ("verify_result dn", BAD_DISPLAY_NAMES, lambda s, b, j: sqstore.verify_result(s, b, j)),
    ("verify_result id", BAD_NAMES, lambda s, b, j: sqstore.verify_result(s, "sim", b)),
]
"""Every read with each name it takes replaced by a bad one: (what, bad names, call)."""


def test_a_name_that_cannot_exist_is_not_found_on_every_read(
    signed: Storage, keys: tuple[sqstore.JWK, sqstore.JWK]
) -> None:
    """Every read given a name that cannot exist raises NotFoundError (a FileNotFoundError,
    which a frontend serves as a 404) saying why, with the name escaped, and touches nothing."""
    job_id = sqstore.upload_job(signed, JOB, "sim", "alice")
    finish(signed, "sim", keys[0])
    assert sqstore.verify_result(signed, "sim", job_id)
    for what, bad_names, read in READS_WITH_A_BAD_NAME:
        for bad in bad_names:
            spy, calls = spied(signed)
            with pytest.raises(sqstore.NotFoundError) as info:
                read(spy, bad, job_id)
            message = str(info.value)
            assert isinstance(info.value, FileNotFoundError), (what, bad)
            assert NOT_FOUND.fullmatch(message), (what, bad, message)
            assert repr(bad)[:20] in message, (what, bad, message)
            assert "\x00" not in message and "\u202e" not in message, (what, bad)
            assert calls == [], (what, bad, calls)


def test_a_name_that_cannot_exist_is_still_invalid_on_every_write(
    signed: Storage, keys: tuple[sqstore.JWK, sqstore.JWK]
) -> None:
    """Writes keep refusing a bad name with InvalidNameError (a ValueError), before any write."""
    private, public = keys
    s = signed
    job_id = sqstore.upload_job(s, JOB, "sim", "alice")
    result = sqstore.run_simulator(JOB, job_id, "sim")
    done = sqstore.StatusMsg(job_id, "DONE", "ok", "None")
    config = sqstore.demo_config("sim")
    writes: list[tuple[str, list[str], Callable[[Storage, str], object]]] = [
        ("upload_config", BAD_DISPLAY_NAMES, lambda t, b: sqstore.upload_config(t, config, b)),
        ("update_config", BAD_DISPLAY_NAMES, lambda t, b: sqstore.update_config(t, config, b)),
        ("timestamp_queue", BAD_DISPLAY_NAMES, lambda t, b: sqstore.timestamp_queue(t, b)),
        ("upload_job dn", BAD_DISPLAY_NAMES, lambda t, b: sqstore.upload_job(t, JOB, b, "al")),
        ("upload_job user", BAD_NAMES, lambda t, b: sqstore.upload_job(t, JOB, "sim", b)),
        ("upload_status dn", BAD_DISPLAY_NAMES,
         lambda t, b: sqstore.upload_status(t, b, "alice", job_id)),
        ("upload_status user", BAD_NAMES, lambda t, b: sqstore.upload_status(t, "sim", b, job_id)),
        ("upload_status id", BAD_NAMES, lambda t, b: sqstore.upload_status(t, "sim", "alice", b)),
        ("upload_result dn", BAD_DISPLAY_NAMES,
         lambda t, b: sqstore.upload_result(t, result, b, job_id, private)),
        ("upload_result id", BAD_NAMES,
         lambda t, b: sqstore.upload_result(t, result, "sim", b, private)),
        ("update_in_database dn", BAD_DISPLAY_NAMES,
         lambda t, b: sqstore.update_in_database(t, result, done, job_id, b, private)),
        ("update_in_database id", BAD_NAMES,
         lambda t, b: sqstore.update_in_database(t, result, done, b, "sim", private)),
        ("upload_public_key dn", BAD_DISPLAY_NAMES,
         lambda t, b: sqstore.upload_public_key(t, public, b)),
        ("upload_public_key user", BAD_NAMES,
         lambda t, b: sqstore.upload_public_key(t, public, b, role="user")),
    ]  # fmt: skip
    for what, bad_names, write in writes:
        for bad in bad_names:
            spy, calls = spied(s)
            with pytest.raises(sqstore.InvalidNameError):
                write(spy, bad)
            assert [c[0] for c in calls if c[0] in WRITES] == [], (what, bad, calls)


def test_upload_public_key_publishes_a_user_key_without_a_backend(store: Storage) -> None:
    """role="user" (sqooler after 0.9) publishes a user's key under its kid in the users'
    keys folder, in the same JWK form, without a config; a second key for that kid is refused."""
    private, public = sqstore.generate_keypair("alicekey")
    sqstore.upload_public_key(store, public, "alice", role="user")
    sqstore.upload_public_key(store, public, "alice", role="user")  # the same key: a no-op
    folder_ = f"{store['layout'].public_keys}/users"
    assert store["list"](folder_) == ["alicekey"]
    assert store["list"](store["layout"].public_keys) == [], "apart from backend keys"
    stored = store["get"](folder_, "alicekey")
    stored.pop("_id", None)
    assert stored == sqstore.to_doc(public)
    assert sqstore.get_public_key_from_kid(store, "alicekey", role="user") == public
    with pytest.raises(sqstore.NotFoundError):
        sqstore.get_public_key_from_kid(store, "alicekey")
    _, other = sqstore.generate_keypair("alicekey")
    with pytest.raises(sqstore.AlreadyExistsError, match="another public key"):
        sqstore.upload_public_key(store, other, "alice", role="user")
    with pytest.raises(sqstore.BadSignatureError, match="not a public key"):
        sqstore.upload_public_key(store, private, "alice", role="user")
    assert sqstore.get_public_key_from_kid(store, "alicekey", role="user") == public
    with pytest.raises(sqstore.NotFoundError):  # a backend key still needs the config
        sqstore.upload_public_key(store, sqstore.generate_keypair("bobkey")[1], "sim")
    with pytest.raises(sqstore.NotFoundError):
        sqstore.upload_public_key(
            store, sqstore.generate_keypair("bobkey")[1], "sim", role="backend"
        )


def test_upload_public_key_checks_a_backend_key_and_refuses_other_roles(
    store: Storage, keys: tuple[sqstore.JWK, sqstore.JWK]
) -> None:
    """role="backend" (the default) keeps the config-kid check; any other role is a ValueError
    and writes nothing."""
    private, public = keys
    sqstore.upload_config(store, sqstore.demo_config("sim", sign=True), "sim", private)
    _, wrong_kid = sqstore.generate_keypair("otherkid")
    with pytest.raises(sqstore.BadSignatureError, match="otherkid"):
        sqstore.upload_public_key(store, wrong_kid, "sim", role="backend")
    sqstore.upload_public_key(store, wrong_kid, "sim", role="user")  # no config check for users
    sqstore.upload_public_key(store, public, "sim", role="backend")
    assert sqstore.get_public_key(store, "sim") == public
    for role in ("admin", "Backend", "", None, 1):
        spy, calls = spied(store)
        with pytest.raises(ValueError, match="role"):
            sqstore.upload_public_key(spy, public, "sim", role=role)  # type: ignore[arg-type]
        assert calls == []


# ============================================================================
# The local backend: files, atomicity, processes and signals
# ============================================================================
def test_local_files_are_as_json_dump_writes_them(local: Storage, tmp_path: Path) -> None:
    """Documents are <root>/<path>/<id>.json in json.dump's format, and no temp file stays."""
    doc = {"b": [1, 2], "a": "ü"}
    local["upload"]("jobs/queued/sim", "j1", doc)
    local["update"]("jobs/queued/sim", "j1", {**doc, "c": 1})
    folder = tmp_path / "store" / "jobs" / "queued" / "sim"
    assert os.listdir(folder) == ["j1.json"]
    assert (folder / "j1.json").read_text() == json.dumps({**doc, "c": 1})


def test_local_list_ignores_foreign_files(local: Storage, tmp_path: Path) -> None:
    """Temporary files, non-JSON files and unsafe names are not listed as documents."""
    local["upload"]("f", "good", {})
    folder = tmp_path / "store" / "f"
    for name in (".good.123.abcd.tmp", "notes.txt", ".hidden.json", "sub"):
        (folder / name).write_text("{}") if name != "sub" else (folder / name).mkdir()
    assert local["list"]("f") == ["good"]


def test_local_malformed_document_is_a_clear_error(local: Storage, tmp_path: Path) -> None:
    """A torn or foreign file reads as InvalidDocumentError naming path and id."""
    folder = tmp_path / "store" / "results" / "sim"
    folder.mkdir(parents=True)
    (folder / "j1.json").write_text('{"half": ')
    with pytest.raises(sqstore.InvalidDocumentError, match="results/sim/j1"):
        local["get"]("results/sim", "j1")
    sqstore.upload_config(local, sqstore.demo_config("sim"), "sim")
    with pytest.raises(sqstore.InvalidDocumentError, match="results/sim/j1"):
        sqstore.get_result(local, "sim", "alice", "j1")
    (folder / "j2.json").write_text('{"status": "DONE"}')
    with pytest.raises(sqstore.InvalidDocumentError, match=r"results/sim/j2.*required field"):
        sqstore.get_result(local, "sim", "alice", "j2")


@pytest.mark.usefixtures("configured")
def test_malformed_signed_status_names_its_path(store: Storage) -> None:
    """A signed document with a broken envelope is an InvalidDocumentError naming its path."""
    broken = {"header": {"alg": "EdDSA"}, "payload": {}, "signature": "x"}
    job_id = sqstore.create_job_id(store, "sim", "alice")
    path, name = place(store, "status", job_id)
    store["upload"](path, name, broken)
    with pytest.raises(sqstore.InvalidDocumentError, match=rf"{path}/{name}: .*\$\.header\.kid"):
        sqstore.get_status(store, "sim", "alice", job_id)


def test_local_malformed_job_is_set_aside_and_the_queue_flows(
    local: Storage, tmp_path: Path
) -> None:
    """A queued job that is not JSON is moved to deleted with an ERROR status; the next runs."""
    sqstore.upload_config(local, sqstore.demo_config("sim"), "sim")
    bad_id = sqstore.create_job_id(local, "sim", "alice")
    good_id = sqstore.upload_job(local, JOB, "sim", "alice")
    (tmp_path / "store" / "jobs" / "queued" / "sim" / f"{bad_id}.json").write_text("{torn")
    assert finish(local, "sim") == [good_id]
    assert local["list"]("jobs/deleted") == [bad_id]
    status = sqstore.get_status(local, "sim", "alice", bad_id)
    assert status.status == "ERROR" and "not valid JSON" in status.error_message
    assert local["list"]("jobs/leases") == []


def test_local_storage_errors_name_the_path(tmp_path: Path) -> None:
    """An OS failure other than missing/existing becomes StorageError naming path and id."""
    if os.geteuid() == 0:
        blocker = tmp_path / "store"
        blocker.write_text("a file where the root folder should be")
    else:
        (tmp_path / "store" / "f").mkdir(parents=True)
        os.chmod(tmp_path / "store" / "f", 0o500)
    store = sqstore.local_storage(tmp_path / "store")
    with pytest.raises(sqstore.StorageError, match="f/x"):
        store["upload"]("f", "x", {})


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 2 MiB tmpfs mounted for this test (root only; CI runs as root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        skip_or_fail("mounting a small tmpfs needs root")
    mount = ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)]
    proc = subprocess.run(mount, capture_output=True, text=True)
    if proc.returncode != 0:
        skip_or_fail(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_local_full_disk_fails_cleanly_and_keeps_every_document(small_disk: Path) -> None:
    """On a full disk upload, update and swap raise StorageError "no space left" naming the
    path, and leave every old document intact and no temporary file behind."""
    root = small_disk / "store"
    store = sqstore.local_storage(root)
    old = {"old": "x" * 100}
    store["upload"]("docs", "kept", old)
    store["upload"]("docs", "hot", old)
    assert store["swap"]("docs", "hot", old, old)  # makes the folder's lock file
    stats = os.statvfs(small_disk)
    (small_disk / "filler").write_bytes(b"\0" * (stats.f_bavail * stats.f_frsize - 8192))
    before = tree(root)
    big = {"pad": "x" * 30_000}
    calls: dict[str, Callable[[], object]] = {
        "docs/new": lambda: store["upload"]("docs", "new", big),
        "docs/hot": lambda: store["update"]("docs", "hot", big),
        "docs/kept": lambda: store["swap"]("docs", "kept", old, big),
        "fresh/folder/new": lambda: store["upload"]("fresh/folder", "new", big),
    }
    for what, call in calls.items():
        with pytest.raises(sqstore.StorageError, match=rf"(?i){what}\b.*no space left"):
            call()
        assert tree(root) == before, what
    assert store["get"]("docs", "hot") == store["get"]("docs", "kept") == old
    assert store["list"]("docs") == ["hot", "kept"]
    store["update"]("docs", "hot", {"small": 1})  # what fits is still written
    assert store["get"]("docs", "hot") == {"small": 1}


OUTSIDE: dict[str, dict[str, Any]] = {"settings": {"theme": "dark"}, "j1": {"job": 1}}


@pytest.mark.parametrize(
    ("link", "path"),
    [
        ("results/sim", "results/sim"),
        ("status/sim", "status/sim"),
        ("jobs/leases", "jobs/leases"),
        ("jobs/finished/sim", "jobs/finished/sim"),
        ("jobs", "jobs/finished/sim"),
    ],
)
def test_local_never_follows_a_folder_symlink(tmp_path: Path, link: str, path: str) -> None:
    """A folder below the root that is a symlink is refused by every verb with a StorageError
    naming it, and nothing outside the root is read, written or removed."""
    root, outside = tmp_path / "store", tmp_path / "outside"
    docs = outside / os.path.relpath(path, link)
    docs.mkdir(parents=True)
    for name, doc in OUTSIDE.items():
        (docs / f"{name}.json").write_text(json.dumps(doc))
    before = tree(outside)
    (root / link).parent.mkdir(parents=True, exist_ok=True)
    (root / link).symlink_to(outside, target_is_directory=True)
    store = sqstore.local_storage(root)
    store["upload"]("inside", "j1", {"inside": 1})
    calls: list[Callable[[], object]] = [
        lambda: store["upload"](path, "settings", {"theme": "hacked"}),
        lambda: store["upload"](path, "new", {}),
        lambda: store["update"](path, "settings", {"theme": "hacked"}),
        lambda: store["get"](path, "j1"),
        lambda: store["list"](path),
        lambda: store["delete"](path, "j1"),
        lambda: store["move"](path, "inside2", "j1"),
        lambda: store["move"]("inside", path, "j1"),
        lambda: store["swap"](path, "j1", OUTSIDE["j1"], {"job": 2}),
        lambda: store["swap"](path, "j1", OUTSIDE["j1"], None),
    ]
    for i, call in enumerate(calls):
        with pytest.raises(sqstore.StorageError, match=rf"\b{link} is a symlink"):
            call()
        assert tree(outside) == before, i
    assert store["get"]("inside", "j1") == {"inside": 1}
    assert store["list"]("inside2") == []


def test_local_never_reads_through_a_document_symlink(tmp_path: Path) -> None:
    """A document that is a symlink is listed but never read through: get, update and swap
    raise StorageError naming it; move and delete act on the link, never on its target."""
    root, secret = tmp_path / "store", tmp_path / "secret.json"
    secret.write_text(json.dumps({"secret": 1}))
    store = sqstore.local_storage(root)
    queue = root / "jobs" / "queued" / "sim"
    queue.mkdir(parents=True)
    (queue / "j1.json").symlink_to(secret)
    (queue / "gone.json").symlink_to(tmp_path / "missing.json")
    assert store["list"]("jobs/queued/sim") == ["gone", "j1"]
    for doc_id in ("j1", "gone"):
        symlink = rf"jobs/queued/sim/{doc_id}\.json is a symlink"
        for verb, args in [
            ("get", ()),
            ("update", ({"x": 1},)),
            ("swap", ({"secret": 1}, {"x": 1})),
            ("swap", ({"secret": 1}, None)),
        ]:
            with pytest.raises(sqstore.StorageError, match=symlink):
                operation(store, verb)("jobs/queued/sim", doc_id, *args)
        with pytest.raises(sqstore.AlreadyExistsError):
            store["upload"]("jobs/queued/sim", doc_id, {"x": 1})
    store["move"]("jobs/queued/sim", "jobs/deleted", "j1")
    assert (root / "jobs" / "deleted" / "j1.json").is_symlink()
    store["delete"]("jobs/deleted", "j1")
    store["delete"]("jobs/queued/sim", "gone")
    assert json.loads(secret.read_text()) == {"secret": 1}
    assert sorted(os.listdir(tmp_path)) == ["secret.json", "store"]


@pytest.mark.parametrize("durable", [False, True])
def test_local_root_may_be_a_symlink(tmp_path: Path, durable: bool) -> None:
    """The root itself may be a symlink given by the user: every verb works through it."""
    (tmp_path / "real").mkdir()
    (tmp_path / "root").symlink_to(tmp_path / "real", target_is_directory=True)
    store = sqstore.local_storage(tmp_path / "root", durable=durable)
    store["upload"]("a/b", "x", {"v": 1})
    store["update"]("a/b", "x", {"v": 2})
    assert store["swap"]("a/b", "x", {"v": 2}, {"v": 3})
    store["move"]("a/b", "c", "x")
    assert store["list"]("c") == ["x"] and store["get"]("c", "x") == {"v": 3}
    store["delete"]("c", "x")
    assert store["list"]("c") == [] and (tmp_path / "real" / "a" / "b").is_dir()


def test_local_folder_or_fifo_where_a_document_should_be(tmp_path: Path) -> None:
    """A folder, a FIFO or an unreadable file named <id>.json is listed, and get raises a
    StorageError naming it (never hangs on a FIFO)."""
    store = sqstore.local_storage(tmp_path / "store")
    folder = tmp_path / "store" / "results" / "sim"
    (folder / "d.json").mkdir(parents=True)
    os.mkfifo(folder / "p.json")
    (folder / "u.json").write_text("{}")
    os.chmod(folder / "u.json", 0)
    unreadable = ["u"] if os.geteuid() != 0 else []
    assert store["list"]("results/sim") == ["d", "p", "u"]
    # If get blocks on the FIFO, this unblocks it (a reader then sees end of file).
    watchdog = threading.Timer(30, lambda: os.close(os.open(folder / "p.json", os.O_WRONLY)))
    watchdog.start()
    try:
        for doc_id in ["d", "p", *unreadable]:
            with pytest.raises(sqstore.StorageError, match=rf"results/sim/{doc_id}\b"):
                store["get"]("results/sim", doc_id)
    finally:
        watchdog.cancel()


ORPHAN_WRITER = """
import resource, signal, sys, sqstore
store = sqstore.local_storage(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it; let it kill, as a crash
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
store["upload"]("docs", "big", {"pad": "x" * 100_000})
"""


def test_local_orphaned_temp_files_are_never_listed_and_old_ones_are_swept(
    tmp_path: Path,
) -> None:
    """A writer killed mid-write leaves a temporary file that is never listed as a document;
    list removes such files once they are an hour old and keeps recent ones."""
    root = tmp_path / "store"
    store = sqstore.local_storage(root)
    store["upload"]("docs", "kept", {"v": 1})
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", ORPHAN_WRITER, str(root)], env=env)
        assert proc.returncode == -signal.SIGXFSZ
    orphans = sorted(p for p in (root / "docs").iterdir() if p.name.endswith(".tmp"))
    assert len(orphans) == 2 and all(p.name.startswith(".big.") for p in orphans)
    foreign = root / "docs" / ".notes.tmp"
    foreign.write_text("not ours")
    assert store["list"]("docs") == ["kept"]
    assert all(p.exists() for p in orphans)  # a recent one may belong to a live writer
    hour_ago = time.time() - 3700
    for path in (orphans[0], foreign):
        os.utime(path, (hour_ago, hour_ago))
    assert store["list"]("docs") == ["kept"]
    assert not orphans[0].exists() and orphans[1].exists() and foreign.exists()
    assert store["get"]("docs", "kept") == {"v": 1}


def _race_worker(root: str, worker: int, ids: list[str], out: str, start: Any) -> None:
    store = sqstore.local_storage(root)
    start.wait()  # every process is up before any races
    won: dict[str, list[str]] = {"upload": [], "move": []}
    for doc_id in ids:
        try:
            store["upload"]("race/up", doc_id, {"by": worker})
            won["upload"].append(doc_id)
        except sqstore.AlreadyExistsError:
            pass
    for doc_id in ids:
        try:
            store["move"]("race/src", f"race/dst{worker}", doc_id)
            won["move"].append(doc_id)
        except sqstore.NotFoundError:
            pass
    Path(out).write_text(json.dumps(won))


def race_processes(
    tmp_path: Path,
    target: Callable[..., None],
    args_of: Callable[[int, str, Any], tuple[Any, ...]],
    *,
    count: int = 4,
    timeout: float = 300,
) -> list[Any]:
    """Run *count* spawned processes ``target(*args_of(i, out_file, barrier))`` released together
    at a barrier; each must exit 0; return the JSON each wrote to its out_file."""
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(count)
    outs = [str(tmp_path / f"racer{i}.json") for i in range(count)]
    procs = [ctx.Process(target=target, args=args_of(i, outs[i], start)) for i in range(count)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout)
        assert proc.exitcode == 0
    return [json.loads(Path(out).read_text()) for out in outs]


@pytest.mark.slow
def test_racing_uploads_and_moves_have_one_winner(tmp_path: Path) -> None:
    """Processes racing to create or to move the same ids: exactly one wins each id."""
    root = str(tmp_path / "store")
    store = sqstore.local_storage(root)
    ids = [f"d{i:03d}" for i in range(300)]
    for doc_id in ids:
        store["upload"]("race/src", doc_id, {"id": doc_id})
    results = race_processes(
        tmp_path, _race_worker, lambda i, out, start: (root, i, ids, out, start)
    )
    for op in ("upload", "move"):
        winners = [doc_id for won in results for doc_id in won[op]]
        assert sorted(winners) == ids, op
    assert store["list"]("race/src") == []
    moved = [doc_id for i in range(4) for doc_id in store["list"](f"race/dst{i}")]
    assert sorted(moved) == ids
    for i, won in enumerate(results):
        assert all(store["get"]("race/up", d) == {"by": i} for d in won["upload"])


@pytest.fixture(params=backend_params("local", "mongodb"))
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty store that other processes open by URL: a directory or MongoDB."""
    if request.param == "local":
        return str(tmp_path / "store")
    server = request.getfixturevalue("mongodb_server")
    mongo_reset(mongo_uri(server))
    return mongo_uri(server)


def _claim_worker(root: str, name: str, out: str, start: Any) -> None:
    store = sqstore.open_storage(root)
    start.wait()  # every process is up before any claims
    done = []
    while (
        claimed := sqstore.claim_job(store, "sim", policy=sqstore.LeasePolicy(holder=name))
    ) is not None:
        nxt, job = claimed
        result = sqstore.run_simulator(job, nxt.job_id, "sim")
        status = sqstore.StatusMsg(nxt.job_id, "DONE", name, "None")
        sqstore.update_in_database(
            store, result, status, nxt.job_id, "sim", policy=sqstore.LeasePolicy(holder=name)
        )
        done.append(nxt.job_id)
    Path(out).write_text(json.dumps(done))


@pytest.mark.slow
def test_four_processes_claim_500_jobs_exactly_once(url: str, tmp_path: Path) -> None:
    """Four worker processes on one queue process each of 500 jobs exactly once."""
    root = url
    store = sqstore.open_storage(root)
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    job = {"e": {"instructions": [], "num_wires": 1, "shots": 1, "wire_order": "sequential"}}
    submitted = {sqstore.upload_job(store, job, "sim", "alice") for _ in range(500)}
    per_worker = race_processes(
        tmp_path, _claim_worker, lambda i, out, start: (root, f"w{i}", out, start)
    )
    processed = [job_id for done in per_worker for job_id in done]
    assert len(processed) == len(set(processed)) == 500
    assert set(processed) == submitted
    assert set(store["list"]("jobs/finished/sim")) == submitted
    assert store["list"]("jobs/running") == store["list"]("jobs/leases") == []
    assert sum(1 for done in per_worker if done) >= 2, "the workers did not actually race"


CRASH_WRITER = """
import sys, sqstore
store = sqstore.local_storage(sys.argv[1])
big = "x" * 200_000
i = 0
try:
    store["upload"]("docs", "hot", {"i": 0, "pad": big})
except sqstore.AlreadyExistsError:
    pass
print("ready", flush=True)
while True:
    i += 1
    store["update"]("docs", "hot", {"i": i, "pad": big})
    store["upload"]("docs", f"n{sys.argv[2]}-{i}", {"i": i, "pad": big})
"""


@pytest.mark.slow
def test_sigkill_mid_write_never_leaves_a_torn_document(tmp_path: Path) -> None:
    """A writer killed with SIGKILL at random instants leaves only complete documents."""
    root = tmp_path / "store"
    store = sqstore.local_storage(root)
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    kills = 25
    for round_ in range(kills):
        proc = subprocess.Popen(
            [sys.executable, "-c", CRASH_WRITER, str(root), str(round_)],
            stdout=subprocess.PIPE,
            env=env,
        )
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        time.sleep(0.01 + 0.04 * (round_ % 5) / 4)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        hot = store["get"]("docs", "hot")
        assert isinstance(hot["i"], int) and len(hot["pad"]) == 200_000
    ids = store["list"]("docs")
    assert len(ids) > kills, "the writer never got going"
    for doc_id in ids:
        assert len(store["get"]("docs", doc_id)["pad"]) == 200_000
    for path in (root / "docs").iterdir():
        if path.suffix == ".json":
            json.loads(path.read_text())


CLAIM_AND_HANG = """
import sys, time, sqstore
store = sqstore.open_storage(sys.argv[1])
doomed = sqstore.LeasePolicy(holder="doomed", lease_seconds=1.0)
claimed = sqstore.claim_job(store, "sim", policy=doomed)
print(claimed[0].job_id, flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_worker_killed_mid_job_loses_nothing(url: str) -> None:
    """A worker SIGKILLed while holding a job: after its lease the job is requeued and done."""
    root = url
    store = sqstore.open_storage(root)
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    job_id = sqstore.upload_job(store, JOB, "sim", "alice")
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CLAIM_AND_HANG, str(root)], stdout=subprocess.PIPE, env=env
    )
    assert proc.stdout is not None and proc.stdout.readline().decode().strip() == job_id
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert store["list"]("jobs/running") == [job_id]
    assert sqstore.claim_job(store, "sim") is None
    assert sqstore.requeue_expired(store, policy=sqstore.LeasePolicy(skew=0)) == []
    time.sleep(1.1)
    assert sqstore.requeue_expired(store, policy=sqstore.LeasePolicy(skew=0)) == [job_id]
    assert finish(store, "sim") == [job_id]
    assert sqstore.get_status(store, "sim", "alice", job_id).status == "DONE"


# ============================================================================
# The MongoDB backend against a real MongoDB-wire server
# ============================================================================
def mongo_store(server: Any, **options: Any) -> Storage:
    """A MongoDB store on an emptied server."""
    mongo_reset(mongo_uri(server))
    return sqstore.mongodb_storage(mongo_uri(server), **options)


class CommandCounter:
    """A pymongo command listener that counts the commands a client sends."""

    def __init__(self) -> None:
        self.commands: list[str] = []

    def started(self, event: Any) -> None:
        if event.command_name not in ("ismaster", "isMaster", "hello", "ping", "endSessions"):
            self.commands.append(event.command_name)

    def succeeded(self, event: Any) -> None:
        pass

    def failed(self, event: Any) -> None:
        pass


def counted_client(uri: str) -> tuple[Any, CommandCounter]:
    import pymongo
    from pymongo import monitoring

    counter = CommandCounter()

    class Listener(monitoring.CommandListener):
        def started(self, event: monitoring.CommandStartedEvent) -> None:
            counter.started(event)

        def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
            pass

        def failed(self, event: monitoring.CommandFailedEvent) -> None:
            pass

    return pymongo.MongoClient(uri, event_listeners=[Listener()]), counter


@pytest.fixture
def mongo(mongodb_server: Any) -> Storage:
    return mongo_store(mongodb_server)


@pytest.mark.slow
def test_mongodb_server_refuses_duplicate_ids_and_keeps_dotted_collections(
    mongodb_server: Any,
) -> None:
    """The test server: a duplicate _id fails; jobs/status/results/backends take dotted names."""
    import pymongo
    from bson import ObjectId

    mongo_reset(mongo_uri(mongodb_server))
    with pymongo.MongoClient(mongo_uri(mongodb_server), document_class=dict) as client:
        for database in ("jobs", "status", "results", "backends"):
            collection = client[database]["queued.sim"]
            collection.insert_one({"_id": ObjectId("0" * 24), "nested": [[1, [2]]]})
            with pytest.raises(pymongo.errors.DuplicateKeyError):
                collection.insert_one({"_id": ObjectId("0" * 24)})
            assert "queued.sim" in client[database].list_collection_names()
            found = collection.find_one()
            assert found is not None and found["nested"] == [[1, [2]]]


def _find_and_modify_racer(uri: str, out: str, start: Any) -> None:
    import pymongo

    collection = pymongo.MongoClient(uri, document_class=dict)["jobs"]["race"]
    start.wait()
    taken, deleted = [], []
    while doc := collection.find_one_and_update(
        {"taken": False}, {"$set": {"taken": True}}, sort=[("_id", 1)]
    ):
        taken.append(doc["_id"])
    while doc := collection.find_one_and_delete({}, sort=[("_id", 1)]):
        deleted.append(doc["_id"])
    Path(out).write_text(json.dumps([taken, deleted]))


@pytest.mark.slow
def test_mongodb_server_hands_each_document_to_one_racer(
    mongodb_server: Any, tmp_path: Path
) -> None:
    """The test server: find_one_and_update/delete racing from 4 processes never hand out twice."""
    import pymongo

    uri = mongo_uri(mongodb_server)
    mongo_reset(uri)
    with pymongo.MongoClient(uri, document_class=dict) as client:
        client["jobs"]["race"].insert_many([{"_id": i, "taken": False} for i in range(400)])
    results = race_processes(
        tmp_path, _find_and_modify_racer, lambda i, out, start: (uri, out, start), timeout=120
    )
    for kind in (0, 1):
        handed = [doc_id for result in results for doc_id in result[kind]]
        assert sorted(handed) == list(range(400))


def own_server(mongodb_server: Any) -> MongoServer:
    if not isinstance(mongodb_server, MongoServer):
        pytest.skip("killing the server needs the tests' own one, not SQSTORE_TEST_MONGODB_URI")
    return mongodb_server


@pytest.mark.slow
def test_mongodb_server_keeps_its_data_through_sigkill(mongodb_server: Any) -> None:
    """The test server: what it acknowledged survives a SIGKILL and a restart."""
    server = own_server(mongodb_server)
    store = mongo_store(server)
    for i in range(50):
        store["upload"]("jobs/kept", f"d{i}", {"i": [[i]]})
    store["delete"]("jobs/kept", "d7")
    server.kill()
    server.start()
    store = sqstore.mongodb_storage(server.uri)
    assert len(store["list"]("jobs/kept")) == 49
    assert store["get"]("jobs/kept", "d49") == {"i": [[49]]}


@pytest.mark.slow
def test_mongodb_layout_is_sqoolers(mongo: Storage, mongodb_server: Any) -> None:
    """Jobs, statuses and results are ObjectId documents in sqooler's databases and collections."""
    import pymongo
    from bson import ObjectId

    sqstore.upload_config(mongo, sqstore.demo_config("sim"), "sim")
    job_id = sqstore.upload_job(mongo, JOB, "sim", "alice")
    sqstore.upload_status(mongo, "sim", "alice", job_id)
    with pymongo.MongoClient(mongo_uri(mongodb_server), document_class=dict) as client:
        assert client["jobs"]["queued.sim"].find_one({"_id": ObjectId(job_id)}) == {
            "_id": ObjectId(job_id),
            **JOB,
        }
        status = client["status"]["sim"].find_one({"_id": ObjectId(job_id)})
        assert status is not None and status["status"] == "INITIALIZING"
        config = client["backends"]["configs"].find_one({"display_name": "sim"})
        assert config is not None and config["num_wires"] == 4
    assert sqstore.get_backends(mongo) == ["sim"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "path",
    ["jobs", "jobs/queued/a.b", "jobs/queued.x", "a.b/c", "jobs/a@b", "jobs/a+b", "x" * 64 + "/c"],
)
def test_mongodb_refuses_folders_that_are_not_database_and_collection(
    mongo: Storage, mongodb_server: Any, path: str
) -> None:
    """A folder must be database/collection of plain parts: no dots, no '@', no lone database."""
    import pymongo

    with pymongo.MongoClient(mongo_uri(mongodb_server), document_class=dict) as client:
        before = {db: client[db].list_collection_names() for db in client.list_database_names()}
        for call in folder_calls(mongo, path, "jobs/ok", "x"):
            with pytest.raises(sqstore.InvalidNameError, match=r"MongoDB folder|invalid"):
                call()
        after = {db: client[db].list_collection_names() for db in client.list_database_names()}
    assert after == before


@pytest.mark.slow
@pytest.mark.parametrize("field", ["display_name", "username", "job_id"])
@pytest.mark.parametrize("bad", ["{'$gt': ''}", "$where", "$ne", "sim\x00", "sim/../x", "a b"])
def test_mongodb_injection_through_names_reaches_no_query(
    mongodb_server: Any, field: str, bad: str
) -> None:
    """Operator-like, path-like or NUL names are refused (writes) or not found (reads) before
    any command is sent."""
    mongo_reset(mongo_uri(mongodb_server))
    client, counter = counted_client(mongo_uri(mongodb_server))
    store = sqstore.mongodb_storage(client, create_indexes=False)
    names = {"display_name": "sim", "username": "alice", "job_id": "0" * 24, field: bad}
    dn, user, job_id = names["display_name"], names["username"], names["job_id"]
    status = sqstore.StatusMsg("x", "ERROR", "", "")
    calls: dict[str, Callable[[], object]] = {
        "upload_job": (lambda: sqstore.upload_job(store, JOB, dn, user)),
        "upload_status": (lambda: sqstore.upload_status(store, dn, user, job_id)),
        "get_status": (lambda: sqstore.get_status(store, dn, user, job_id)),
        "get_result": (lambda: sqstore.get_result(store, dn, user, job_id)),
        "get_job": (lambda: sqstore.get_job(store, f"jobs/queued/{dn}", job_id)),
        "get_config": (lambda: sqstore.get_config(store, dn)),
        "next_job": (lambda: sqstore.get_next_job_in_queue(store, dn)),
        "finish": (lambda: sqstore.update_in_database(store, None, status, job_id, dn)),
    }
    takes = {
        "display_name": calls,
        "username": ["upload_job", "upload_status", "get_status", "get_result"],
        "job_id": ["upload_status", "get_status", "get_result", "get_job", "finish"],
    }
    reads = {"get_status", "get_result", "get_job", "get_config"}  # a name that cannot exist
    for name in takes[field]:
        with pytest.raises(sqstore.NotFoundError if name in reads else sqstore.InvalidNameError):
            calls[name]()
    assert counter.commands == []


@pytest.mark.slow
def test_mongodb_oversized_document_is_refused_before_it_is_sent(mongo: Storage) -> None:
    """A document over MongoDB's 16 MiB limit gets a clear error and nothing is stored."""
    big = {"memory": ["0" * 1024] * (17 * 1024)}
    with pytest.raises(sqstore.InvalidDocumentError, match=r"jobs/queued/sim/0{24}: .*16 MiB"):
        mongo["upload"]("jobs/queued/sim", "0" * 24, big)
    assert mongo["list"]("jobs/queued/sim") == []


@pytest.mark.slow
def test_mongodb_unreachable_server_is_a_transient_error_naming_the_operation() -> None:
    """No server: a TransientError that names the document, and no pymongo exception."""
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = sqstore.mongodb_storage(
        f"mongodb://user:s3cret-pw@127.0.0.1:{port}/", timeout=0.3, create_indexes=False
    )
    with pytest.raises(
        sqstore.TransientError, match="jobs/queued/sim/x: cannot reach MongoDB"
    ) as exc:
        store["get"]("jobs/queued/sim", "x")
    assert "s3cret-pw" not in str(exc.value)
    with pytest.raises(sqstore.TransientError):
        sqstore.mongodb_storage(f"mongodb://127.0.0.1:{port}/", timeout=0.3)
    for bad in (
        "mongodb://u:s3cret-pw@127.0.0.1:notaport/",
        "mongodb://u:s3cret-pw@127.0.0.1:99999/",
        "mongodb://u:s3cret-pw/@127.0.0.1/",  # unescaped: pymongo refuses it
        "mongodb://u:s3cret-pw@@127.0.0.1/",
        "mongodb://s3cret-token@@127.0.0.1/",  # a user alone may be a token
    ):
        with pytest.raises(ValueError, match="bad MongoDB URI") as refused:
            sqstore.mongodb_storage(bad)
        assert "s3cret" not in str(refused.value)


@pytest.mark.slow
def test_mongodb_interrupted_move_is_finished_by_the_next(mongo: Storage) -> None:
    """A move stopped between its insert and its delete leaves two copies; moving again mends it."""
    mongo["upload"]("jobs/running", "0" * 24, {"v": 1})
    mongo["upload"]("jobs/queued/sim", "0" * 24, {"v": 1})  # the state after the insert
    mongo["move"]("jobs/running", "jobs/queued/sim", "0" * 24)
    assert mongo["list"]("jobs/running") == []
    assert mongo["get"]("jobs/queued/sim", "0" * 24) == {"v": 1}
    mongo["upload"]("jobs/running", "0" * 24, {"v": 2})  # a different document: a real conflict
    with pytest.raises(sqstore.AlreadyExistsError):
        mongo["move"]("jobs/running", "jobs/queued/sim", "0" * 24)
    assert mongo["get"]("jobs/running", "0" * 24) == {"v": 2}


@pytest.mark.slow
def test_mongodb_racing_moves_have_one_winner(mongodb_server: Any) -> None:
    """Of 8 threads moving one document to different folders, exactly one succeeds."""
    mongo = mongo_store(mongodb_server)
    for round_ in range(10):
        doc_id = f"{round_:024x}"
        mongo["upload"]("jobs/src", doc_id, {"round": round_})
        wins: list[int] = []

        def move(i: int, doc_id: str = doc_id, wins: list[int] = wins) -> None:
            mongo["move"]("jobs/src", f"jobs/dst{i}", doc_id)
            wins.append(i)

        errors = race(8, move)
        assert len(wins) == 1
        assert len(errors) == 7 and all(isinstance(e, sqstore.NotFoundError) for e in errors)
        assert mongo["get"](f"jobs/dst{wins[0]}", doc_id) == {"round": round_}
        assert mongo["list"]("jobs/src") == []


RESILIENT_WORKER = """
import json, sys, time, sqstore
store = sqstore.open_storage(sys.argv[1])
name, done = sys.argv[2], []

def retry(step):
    while True:
        try:
            return step()
        except sqstore.TransientError:
            time.sleep(0.05)

print("ready", flush=True)
while True:
    try:
        claimed = sqstore.claim_job(store, "sim", policy=sqstore.LeasePolicy(holder=name))
    except sqstore.TransientError:
        time.sleep(0.05)
        continue
    if claimed is None:
        break
    nxt, job = claimed
    done.append(nxt.job_id)
    result = sqstore.run_simulator(job, nxt.job_id, "sim")
    status = sqstore.StatusMsg(nxt.job_id, "DONE", name, "None")
    mine = sqstore.LeasePolicy(holder=name)
    retry(lambda: sqstore.update_in_database(store, result, status, nxt.job_id, "sim", policy=mine))
print(json.dumps(done), flush=True)
"""


@pytest.mark.slow
def test_mongodb_server_killed_mid_run_loses_and_repeats_nothing(mongodb_server: Any) -> None:
    """SIGKILL the database while two workers drain 300 jobs, restart it: each job runs once."""
    server = own_server(mongodb_server)
    store = mongo_store(server)
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    job = {"e": {"instructions": [], "num_wires": 1, "shots": 1, "wire_order": "sequential"}}
    submitted = {sqstore.upload_job(store, job, "sim", "alice") for _ in range(300)}
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", RESILIENT_WORKER, server.uri, f"w{i}"],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    for worker in workers:
        assert worker.stdout is not None and worker.stdout.readline() == "ready\n"
    while len(store["list"]("jobs/finished/sim")) < 60:
        time.sleep(0.02)
    server.kill()
    time.sleep(0.5)
    server.start()
    executed = []
    for worker in workers:
        out, _ = worker.communicate(timeout=300)
        assert worker.returncode == 0
        executed += json.loads(out)
    store = sqstore.mongodb_storage(server.uri)
    recovered = sqstore.requeue_expired(store, now=lambda: time.time() + 10 * sqstore.DEFAULT_LEASE)
    executed += finish(store, "sim")
    assert sorted(executed) == sorted(submitted), "a job was lost or ran twice"
    assert set(store["list"]("jobs/finished/sim")) == submitted
    assert store["list"]("jobs/queued/sim") == store["list"]("jobs/running") == []
    assert store["list"]("jobs/leases") == []
    for job_id in submitted:
        assert sqstore.get_status(store, "sim", "alice", job_id).status == "DONE"
        assert sqstore.get_result(store, "sim", "alice", job_id).success
    print(f"jobs recovered after the kill: {len(recovered)}")


def _mixed_worker(kind: str, where: str, i: int, out: str, start: Any) -> None:
    """Drain queue ``mix`` as sqooler 0.9 (``kind`` "sqooler") or as sqstore; write what ran."""
    import warnings

    ran: list[str] = []
    losses: list[str] = []
    plain: list[bool] = []
    stale: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sqooler.schemes import ResultDict as SqoolerResult
        from sqooler.schemes import StatusMsgDict
    failures: list[str] = []
    if kind == "work":  # Bob's worker loop, stopped once the queue is empty
        store = (
            sqstore.mongodb_storage(where)
            if where.startswith("mongodb")
            else sqstore.local_storage(where)
        )
        stop = threading.Event()

        def executor(job: Any, job_id: str, display_name: str) -> Any:
            ran.append(job_id)
            return sqstore.run_simulator(job, job_id, display_name)

        def report(line: str) -> None:
            if "cannot" in line and "trying again" not in line:
                failures.append(line)

        def watch() -> None:
            while not stop.wait(0.05):
                if not store["list"]("jobs/queued/mix"):
                    stop.set()

        start.wait()
        threading.Thread(target=watch, daemon=True).start()
        sqstore.work(
            [store],
            "mix",
            executor,
            policy=sqstore.LeasePolicy(holder=f"work{i}"),
            poll=0.01,
            stop=stop,
            log=report,
        )
    elif kind == "sqstore":
        store = (
            sqstore.mongodb_storage(where)
            if where.startswith("mongodb")
            else sqstore.local_storage(where)
        )
        start.wait()
        while (
            claimed := sqstore.claim_job(
                store, "mix", policy=sqstore.LeasePolicy(holder=f"{kind}{i}")
            )
        ) is not None:
            nxt, job = claimed
            ran.append(nxt.job_id)
            result = sqstore.run_simulator(job, nxt.job_id, "mix")
            status = sqstore.StatusMsg(nxt.job_id, "DONE", "ok", "None")
            sqstore.update_in_database(
                store,
                result,
                status,
                nxt.job_id,
                "mix",
                policy=sqstore.LeasePolicy(holder=f"{kind}{i}"),
            )
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if where.startswith("mongodb"):
                import pymongo
                import sqooler.storage_providers.mongodb as sqooler_mongodb
                from sqooler.schemes import MongodbLoginInformation

                # sqooler connects through this module-level name
                vars(sqooler_mongodb)["MongoClient"] = lambda *a, **k: pymongo.MongoClient(where)
                login: Any = MongodbLoginInformation(
                    mongodb_username="u", mongodb_password="p", mongodb_database_url="test"
                )
                provider: Any = sqooler_mongodb.MongodbProviderExtended(login, name="mongodb")
            else:
                from sqooler.schemes import LocalLoginInformation
                from sqooler.storage_providers.local import LocalProviderExtended

                provider = LocalProviderExtended(LocalLoginInformation(base_path=where), "local")
        peek = (
            sqstore.mongodb_storage(where)
            if where.startswith("mongodb")
            else sqstore.local_storage(where)
        )
        start.wait()
        while True:
            try:
                nxt = provider.get_next_job_in_queue("mix")
            except (
                Exception
            ) as exc:  # a mover that lost the race: counted, as sqooler's own loop would
                losses.append(type(exc).__name__)
                continue
            if nxt.job_id == "None":
                if not peek["list"]("jobs/queued/mix"):
                    break
                continue
            ran.append(nxt.job_id)
            job = provider.get_job(storage_path=nxt.job_json_path, job_id=nxt.job_id)
            plain.append(set(job) == set(JOB))
            result_doc = sqstore.to_doc(sqstore.run_simulator(job, nxt.job_id, "mix"))
            status_dict = StatusMsgDict(
                job_id=nxt.job_id, status="DONE", detail="ok", error_message="None"
            )
            for attempt in range(20):  # sqooler rereads the config its peers rewrite in place
                try:
                    provider.update_in_database(
                        SqoolerResult(**result_doc), status_dict, nxt.job_id, "mix"
                    )
                except FileExistsError:  # its result exists: a stale re-insert, see the test
                    if attempt == 0:
                        stale.append(nxt.job_id)
                except ValueError:  # a torn read of the config: as sqooler's user, try again
                    time.sleep(0.01)
                    continue
                break
    Path(out).write_text(
        json.dumps(
            {
                "ran": ran,
                "losses": losses,
                "plain": all(plain),
                "stale": stale,
                "kind": kind,
                "failures": failures,
            }
        )
    )


@pytest.mark.slow
@pytest.mark.parametrize("where", ["mongodb", "local"])
def test_sqooler_and_sqstore_workers_share_a_queue_without_losing_jobs(
    where: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Two sqooler 0.9 and two sqstore worker processes (a claim_job loop and work()) drain
    one queue: each job runs once, and nothing escapes or is reported from sqstore's workers.

    Except sqooler's own stale re-inserts: a sqooler mover reads the queued job, stalls, and
    inserts it into running again after another worker ran and finished it; it then finds
    the result there (FileExistsError) and leaves the copy in running.  sqooler alone does
    the same; such a job ran twice, and the test lists it.
    """
    try:
        import sqooler  # noqa: F401
    except ImportError as exc:
        skip_or_fail(f"sqooler 0.9 is not installed ({exc}): pip install -e '.[test]'")
    if where == "mongodb":
        uri = mongo_uri(request.getfixturevalue("mongodb_server"))
        store, place = mongo_store(uri), uri
    else:
        place = str(tmp_path / "store")
        store = sqstore.local_storage(place)
        for made in ("results/mix", "jobs/finished/mix", "jobs/running"):  # sqooler's makedirs
            (tmp_path / "store" / made).mkdir(parents=True)  # races itself: not under test
    sqstore.upload_config(store, sqstore.demo_config("mix"), "mix")
    submitted = []
    for _ in range(300):
        job_id = sqstore.upload_job(store, JOB, "mix", "alice")
        sqstore.upload_status(store, "mix", "alice", job_id)
        submitted.append(job_id)
    kinds = ["sqooler", "sqstore", "sqooler", "work"]
    results = race_processes(
        tmp_path, _mixed_worker, lambda i, out, start: (kinds[i], place, i, out, start)
    )
    ran = [job_id for result in results for job_id in result["ran"]]
    stale = {job_id for result in results for job_id in result["stale"]}
    lost = set(submitted) - set(ran)
    twice = {job_id for job_id in ran if ran.count(job_id) > 1} - stale
    assert not lost and not twice, f"{len(lost)} jobs never ran, {len(twice)} ran twice"
    assert all(result["plain"] for result in results), "sqooler read a job with a foreign field"
    assert [line for result in results for line in result["failures"]] == []
    assert all(result["ran"] for result in results[1::2]), "both sqstore workers took jobs"
    assert store["list"]("jobs/queued/mix") == []
    assert set(store["list"]("jobs/running")) == stale
    for job_id in submitted:
        status = sqstore.get_status(store, "mix", "alice", job_id).status
        assert status == "DONE", (job_id, [r["kind"] for r in results if job_id in r["ran"]])
    print(f"sqooler's own stale re-inserts (its find, delete, insert): {len(stale)}")
    print("sqooler movers that lost a race:", sum(len(r["losses"]) for r in results))


def _read_message(sock: socket.socket) -> bytes | None:
    """One MongoDB wire message from *sock*, or None when the peer closed."""
    data = b""
    while len(data) < 4 or len(data) < int.from_bytes(data[:4], "little"):
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    return data


def _command_name(message: bytes) -> str:
    """The command an OP_MSG carries (the first key of its body); "" for anything else."""
    import bson

    if int.from_bytes(message[12:16], "little") != 2013 or message[20] != 0:
        return ""
    size = int.from_bytes(message[21:25], "little")
    return next(iter(bson.decode(message[21 : 21 + size])), "")


class LosingProxy:
    """A TCP proxy to a MongoDB server that can lose answers: for the next command named
    in `lose`, it forwards the command, waits for the server's answer, then closes the
    client's connection instead of passing the answer on."""

    def __init__(self, upstream: str) -> None:
        address = urllib.parse.urlsplit(upstream)
        self.upstream = (address.hostname or "127.0.0.1", address.port or 27017)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.uri = f"mongodb://127.0.0.1:{self.listener.getsockname()[1]}/"
        self.lose: list[str] = []
        self.lost: list[str] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        with client, socket.create_connection(self.upstream) as server:
            while (request := _read_message(client)) is not None:
                server.sendall(request)
                if int.from_bytes(request[12:16], "little") == 2013 and request[16] & 2:
                    continue  # moreToCome: no answer
                if (answer := _read_message(server)) is None:
                    return
                name = _command_name(request)
                with self.lock:
                    if name in self.lose:
                        self.lose.remove(name)
                        self.lost.append(name)
                        return  # the server acted; the client never hears of it
                client.sendall(answer)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def lossy(mongodb_server: Any) -> Any:
    """A MongoDB store that talks to the test server through a `LosingProxy`."""
    mongo_reset(mongo_uri(mongodb_server))
    proxy = LosingProxy(mongo_uri(mongodb_server))
    try:
        yield proxy, sqstore.mongodb_storage(proxy.uri)
    finally:
        proxy.close()


MONGO_LOST_ANSWERS: dict[
    str, tuple[str, Callable[[Storage], object], sqstore.Doc | None, sqstore.Doc | None]
] = {
    "upload": ("insert", lambda s: s["upload"]("jobs/a", "0" * 24, {"v": 2}), {"v": 2}, None),
    "update": ("update", lambda s: s["update"]("jobs/a", "0" * 24, {"v": 2}), {"v": 2}, None),
    "delete": ("delete", lambda s: s["delete"]("jobs/a", "0" * 24), None, None),
    "swap": ("update", lambda s: s["swap"]("jobs/a", "0" * 24, {"v": 1}, {"v": 2}), {"v": 2}, None),
    "swap-delete": ("delete", lambda s: s["swap"]("jobs/a", "0" * 24, {"v": 1}, None), None, None),
    "move-find": ("find", lambda s: s["move"]("jobs/a", "jobs/running", "0" * 24), None, {"v": 1}),
    "move-insert": (
        "insert",
        lambda s: s["move"]("jobs/a", "jobs/running", "0" * 24),
        None,
        {"v": 1},
    ),
    "move-aggregate": (
        "aggregate",
        lambda s: s["move"]("jobs/a", "jobs/b", "0" * 24),
        None,
        {"v": 1},
    ),
    "move-delete": ("delete", lambda s: s["move"]("jobs/a", "jobs/b", "0" * 24), None, {"v": 1}),
}
# A move into running reads, inserts and deletes; into any other folder, copies and deletes.
MOVED_INTO = {"move-find": "jobs/running", "move-insert": "jobs/running"}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(MONGO_LOST_ANSWERS))
def test_mongodb_lost_answer_counts_as_done(case: str, lossy: Any) -> None:
    """A write the server applied but whose answer was lost returns as done, state intact."""
    proxy, store = lossy
    command, verb, in_a, in_b = MONGO_LOST_ANSWERS[case]
    if case != "upload":
        store["upload"]("jobs/a", "0" * 24, {"v": 1})
    proxy.lose.append(command)
    assert verb(store) in (None, True, in_b)  # a move may return what it moved
    assert proxy.lost == [command], "the proxy lost no answer"
    assert store["list"]("jobs/a") == ([] if in_a is None else ["0" * 24])
    if in_a is not None:
        assert store["get"]("jobs/a", "0" * 24) == in_a
    into = MOVED_INTO.get(case, "jobs/b")
    assert store["list"](into) == ([] if in_b is None else ["0" * 24])
    if in_b is not None:
        assert store["get"](into, "0" * 24) == in_b


@pytest.mark.slow
def test_mongodb_lost_answers_in_claim_and_finish_run_each_job_once(lossy: Any) -> None:
    """Answers lost in the lease insert, the claim's move and the finish: each job runs once."""
    proxy, store = lossy
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    steps = [
        ("claim", "insert"),  # the lease
        ("claim", "find"),
        ("claim", "delete"),  # the move's delete
        ("finish", "insert"),  # the result
        ("finish", "delete"),  # the move's delete
        ("finish", "update"),  # the status
    ]
    submitted, ran = [], []
    for step, command in steps:
        job_id = sqstore.upload_job(store, JOB, "sim", "alice")
        sqstore.upload_status(store, "sim", "alice", job_id)
        submitted.append(job_id)
        proxy.lost.clear()
        if step == "claim":
            proxy.lose.append(command)
        claimed = sqstore.claim_job(store, "sim")
        assert claimed is not None
        nxt, job = claimed
        ran.append(nxt.job_id)
        if step == "finish":
            proxy.lose.append(command)
        result = sqstore.run_simulator(job, nxt.job_id, "sim")
        status = sqstore.StatusMsg(nxt.job_id, "DONE", "ok", "None")
        sqstore.update_in_database(store, result, status, nxt.job_id, "sim")
        assert proxy.lost == [command], f"{step}: no {command} answer was lost"
    assert sqstore.claim_job(store, "sim") is None
    assert ran == submitted
    assert sorted(store["list"]("jobs/finished/sim")) == sorted(submitted)
    assert store["list"]("jobs/running") == store["list"]("jobs/leases") == []
    for job_id in submitted:
        assert sqstore.get_status(store, "sim", "alice", job_id).status == "DONE"
        assert sqstore.get_result(store, "sim", "alice", job_id).success


@pytest.mark.slow
def test_mongodb_claim_paused_inside_its_move_while_sqooler_takes_the_job(
    mongodb_server: Any, sqooler_mongodb: Any
) -> None:
    """A claim paused between its move's insert and delete while a sqooler 0.9 worker takes the
    same job (its find and delete succeed, its insert fails): sqstore runs the job, once."""
    from pymongo import monitoring

    uri = mongo_uri(mongodb_server)
    mongo_reset(uri)
    interleaved: list[str] = []

    class Pause(monitoring.CommandListener):
        def started(self, event: Any) -> None:
            on_queue = (
                event.command_name == "delete" and event.command.get("delete") == "queued.sim"
            )
            if on_queue and not interleaved:
                interleaved.append("sqooler acts")
                try:
                    sqooler_mongodb.get_next_job_in_queue("sim")
                except Exception as exc:  # sqooler loses at its insert: recorded
                    interleaved.append(type(exc).__name__)

        def succeeded(self, event: Any) -> None:
            pass

        def failed(self, event: Any) -> None:
            pass

    import pymongo

    store = sqstore.mongodb_storage(pymongo.MongoClient(uri, event_listeners=[Pause()]))
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    job_id = sqstore.upload_job(store, JOB, "sim", "alice")
    sqstore.upload_status(store, "sim", "alice", job_id)
    claimed = sqstore.claim_job(store, "sim", policy=sqstore.LeasePolicy(holder="me"))
    assert interleaved == ["sqooler acts", "DuplicateKeyError"]
    assert claimed is not None and claimed[0].job_id == job_id
    finish_as(store, job_id, claimed[1], "me")
    done_once(store, job_id)


# ============================================================================
# The Dropbox backend through the real SDK
# ============================================================================
@pytest.mark.slow
def test_dropbox_costs_one_request_per_operation(dbx: Storage, dropbox_fake: Any) -> None:
    """Each verb is exactly one HTTP request (update two, or one at the rev this handle saw
    last, as here), with one token refresh at start."""
    expected: list[tuple[Callable[[], object], dict[str, int]]] = [
        (lambda: dbx["upload"]("f", "a", {"v": 1}), {"/oauth2/token": 1, "/2/files/upload": 1}),
        (lambda: dbx["get"]("f", "a"), {"/2/files/download": 1}),
        (lambda: dbx["update"]("f", "a", {"v": 2}), {"/2/files/upload": 1}),
        (lambda: dbx["move"]("f", "g", "a"), {"/2/files/move_v2": 1}),
        (lambda: dbx["list"]("g"), {"/2/files/list_folder": 1}),
        (lambda: dbx["delete"]("g", "a"), {"/2/files/delete_v2": 1}),
        (lambda: dbx["list"]("missing"), {"/2/files/list_folder": 1}),
    ]  # fmt: skip
    for call, counts in expected:
        dropbox_fake.reset_counts()
        call()
        assert dropbox_fake.counts == counts
    assert "/2/users/get_current_account" not in dropbox_fake.counts


@pytest.mark.slow
def test_dropbox_list_follows_every_page(dbx: Storage, dropbox_fake: Any) -> None:
    """A folder longer than a page is listed whole, through list_folder/continue."""
    for i in range(8):
        dbx["upload"]("f", f"d{i}", {})
    dropbox_fake.reset_counts()
    assert dbx["list"]("f") == [f"d{i}" for i in range(8)]
    assert dropbox_fake.counts == {"/2/files/list_folder": 1, "/2/files/list_folder/continue": 2}


@pytest.mark.slow
def test_dropbox_layout_is_sqoolers(dbx: Storage, dropbox_fake: Any) -> None:
    """Documents land at sqooler's Dropbox paths, with its dated job ids."""
    private, public = sqstore.generate_keypair("kid1")
    sqstore.upload_config(dbx, sqstore.demo_config("sim", sign=True), "sim", private)
    sqstore.upload_public_key(dbx, public, "sim")
    job_id = sqstore.upload_job(dbx, JOB, "sim", "alice")
    sqstore.upload_status(dbx, "sim", "alice", job_id)
    finish(dbx, "sim", private)
    assert re.fullmatch(r"\d{8}_\d{6}-sim-alice-[0-9a-f]{5}", job_id)
    assert sorted(dropbox_fake.files()) == [
        "/Backend_files/Config/sim/config.json",
        f"/Backend_files/Finished_Jobs/sim/alice/job-{job_id}.json",
        f"/Backend_files/Result/sim/alice/result-{job_id}.json",
        f"/Backend_files/Status/sim/None/status-{job_id}.json",
        "/Backend_files/public_keys/kid1.json",
    ]
    assert sqstore.get_backends(dbx) == ["sim"]


@pytest.mark.slow
def test_dropbox_rate_limits_are_retried_a_bounded_number_of_times(dropbox_fake: Any) -> None:
    """429s are retried `retries` times, then raise TransientError (the SDK alone would loop)."""
    store = dropbox_store(dropbox_fake, retries=2)
    store["upload"]("f", "a", {"v": 1})
    dropbox_fake.fail_next("files/download", status=429, count=2)
    assert store["get"]("f", "a") == {"v": 1}
    dropbox_fake.fail_next("files/download", status=429, count=3)
    with pytest.raises(sqstore.TransientError, match="f/a"):
        store["get"]("f", "a")
    dropbox_fake.reset()


@pytest.mark.slow
def test_dropbox_server_errors_become_transient(dropbox_fake: Any) -> None:
    """A 5xx that outlasts the retries is a TransientError naming the document."""
    store = dropbox_store(dropbox_fake, retries=0)
    store["upload"]("f", "a", {"v": 1})
    dropbox_fake.fail_next("files/download", status=503)
    with pytest.raises(sqstore.TransientError, match="f/a"):
        store["get"]("f", "a")
    assert store["get"]("f", "a") == {"v": 1}


@pytest.mark.slow
def test_dropbox_expired_token_is_refreshed(dbx: Storage, dropbox_fake: Any) -> None:
    """An expired access token is refreshed transparently: one more token request."""
    dbx["upload"]("f", "a", {"v": 1})
    dropbox_fake.expire_access_tokens()
    dropbox_fake.reset_counts()
    assert dbx["get"]("f", "a") == {"v": 1}
    assert dropbox_fake.counts == {"/2/files/download": 2, "/oauth2/token": 1}


@pytest.mark.slow
def test_dropbox_revoked_credentials_say_what_to_fix(dbx: Storage, dropbox_fake: Any) -> None:
    """A revoked refresh token is a CredentialsError that names what to check, not an exit."""
    dropbox_fake.revoke_refresh_token()
    try:
        with pytest.raises(sqstore.CredentialsError, match="refresh token") as info:
            dbx["get"]("f", "a")
        assert isinstance(info.value, PermissionError)
        assert dropbox_fake.refresh_token not in str(info.value)
    finally:
        dropbox_fake.revoke_refresh_token(False)


@pytest.mark.slow
def test_dropbox_needs_credentials_or_a_client(dropbox_fake: Any) -> None:
    """Missing credentials are named; a ready client is accepted as it is."""
    with pytest.raises(ValueError, match="app_secret, refresh_token"):
        sqstore.dropbox_storage(app_key="k")
    store = sqstore.dropbox_storage(client=dropbox_fake.client())
    store["upload"]("f", "x", {"a": 1})
    assert store["get"]("f", "x") == {"a": 1}


def race(threads: int, body: Callable[[int], None]) -> list[BaseException]:
    """Run body(0..threads-1) in threads released together at a barrier; return what they raised."""
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        start.wait()
        try:
            body(i)
        except Exception as exc:  # handed to the caller, which asserts on it
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    return errors


@pytest.mark.slow
def test_dropbox_racing_claimers_each_get_distinct_jobs(dropbox_fake: Any) -> None:
    """Four workers with their own clients drain one queue: every job claimed exactly once."""
    stores = [dropbox_store(dropbox_fake) for _ in range(4)]
    sqstore.upload_config(stores[0], sqstore.demo_config("sim"), "sim")
    submitted = {sqstore.upload_job(stores[0], {"e": {}}, "sim", "alice") for _ in range(40)}
    claimed: list[list[str]] = [[] for _ in stores]

    def work(i: int) -> None:
        for nxt, _ in sqstore.claim_jobs(
            stores[i], "sim", policy=sqstore.LeasePolicy(holder=f"w{i}")
        ):
            claimed[i].append(nxt.job_id)

    assert race(4, work) == []
    everything = [job_id for ids in claimed for job_id in ids]
    assert len(everything) == len(set(everything)) == 40
    assert set(everything) == submitted
    assert sum(1 for ids in claimed if ids) >= 2, "the workers did not actually race"


@pytest.mark.slow
def test_dropbox_concurrent_updates_last_writer_wins(dropbox_fake: Any) -> None:
    """Writers replacing one document at once all succeed; one of their versions stays."""
    stores = [dropbox_store(dropbox_fake) for _ in range(4)]
    stores[0]["upload"]("f", "hot", {"by": -1})

    def writer(i: int) -> None:
        for n in range(8):
            stores[i]["update"]("f", "hot", {"by": i, "n": n})

    assert race(4, writer) == []
    assert stores[0]["get"]("f", "hot") in [{"by": i, "n": 7} for i in range(4)]


@pytest.mark.slow
def test_dropbox_racing_moves_have_one_winner(dropbox_fake: Any) -> None:
    """Threads moving the same file with files_move_v2: exactly one wins, the rest NotFound."""
    stores = [dropbox_store(dropbox_fake) for _ in range(4)]
    stores[0]["upload"]("src", "x", {})

    def mover(i: int) -> None:
        stores[i]["move"]("src", f"dst{i}", "x")

    errors = race(4, mover)
    assert [type(e) for e in errors] == [sqstore.NotFoundError] * 3, errors


def lossy_store(fake: Any, **options: Any) -> tuple[Storage, list[float]]:
    """A Dropbox store on an emptied fake that records the waits between retries, not waiting."""
    waits: list[float] = []
    return dropbox_store(fake, sleep=waits.append, **options), waits


def fake_files(fake: Any) -> dict[str, Any]:
    """The fake's files, parsed: ``path_display -> JSON``."""
    return {path: json.loads(data) for path, data in fake.files().items()}


# verb: (the call, the route whose answer is lost, what the call returns, the files after it)
DROPBOX_LOST_ANSWERS: dict[str, tuple[Callable[[Storage], Any], str, Any, dict[str, Any]]] = {
    "upload": (
        lambda s: s["upload"]("f", "b", {"v": 2}),
        "files/upload",
        None,
        {"/f/a.json": {"v": 1}, "/f/b.json": {"v": 2}},
    ),
    "update": (
        lambda s: s["update"]("f", "a", {"v": 2}),
        "files/upload",
        None,
        {"/f/a.json": {"v": 2}},
    ),
    "get": (lambda s: s["get"]("f", "a"), "files/download", {"v": 1}, {"/f/a.json": {"v": 1}}),
    "move": (lambda s: s["move"]("f", "g", "a"), "files/move_v2", None, {"/g/a.json": {"v": 1}}),
    "delete": (lambda s: s["delete"]("f", "a"), "files/delete_v2", None, {}),
    "list": (lambda s: s["list"]("f"), "files/list_folder", ["a"], {"/f/a.json": {"v": 1}}),
    "swap": (
        lambda s: s["swap"]("f", "a", {"v": 1}, {"v": 2}),
        "files/upload",
        True,
        {"/f/a.json": {"v": 2}},
    ),
    "swap-delete": (lambda s: s["swap"]("f", "a", {"v": 1}, None), "files/delete_v2", True, {}),
}


@pytest.mark.slow
@pytest.mark.parametrize("how", ["503", "drop"])
@pytest.mark.parametrize("verb", sorted(DROPBOX_LOST_ANSWERS))
def test_dropbox_lost_answer_counts_as_done(dropbox_fake: Any, verb: str, how: str) -> None:
    """A verb whose request took effect but whose answer was lost (a 503, a dropped
    connection) returns as if done, after one more request, and leaves the expected files."""
    store, waits = lossy_store(dropbox_fake)
    store["upload"]("f", "a", {"v": 1})
    call, route, returns, files = DROPBOX_LOST_ANSWERS[verb]
    dropbox_fake.lose_next(route, how)
    dropbox_fake.reset_counts()
    assert call(store) == returns
    assert fake_files(dropbox_fake) == files
    assert dropbox_fake.counts["/2/" + route] == 2  # the lost attempt and one retry
    assert len(waits) == 1


@pytest.mark.slow
@pytest.mark.parametrize("how", ["503", "drop"])
def test_dropbox_lost_answer_to_a_page_is_asked_again(dropbox_fake: Any, how: str) -> None:
    """A listing whose second page's answer is lost asks for that page again and lists all."""
    store, _ = lossy_store(dropbox_fake)
    for i in range(7):
        store["upload"]("f", f"d{i}", {})
    dropbox_fake.lose_next("files/list_folder/continue", how)
    assert store["list"]("f") == [f"d{i}" for i in range(7)]


@pytest.mark.slow
def test_dropbox_lost_answers_are_retried_a_bounded_number_of_times(dropbox_fake: Any) -> None:
    """Answers lost `retries` times are retried; one more loss is a TransientError."""
    store, waits = lossy_store(dropbox_fake, retries=2)
    dropbox_fake.lose_next("files/upload", "drop", count=1)
    dropbox_fake.lose_next("files/download", "503", count=1)
    store["upload"]("f", "a", {"v": 1})  # the retry's conflict reads the file: lost once more
    assert fake_files(dropbox_fake) == {"/f/a.json": {"v": 1}} and len(waits) == 2
    dropbox_fake.lose_next("files/download", "503", count=3)
    with pytest.raises(sqstore.TransientError, match="f/a"):
        store["get"]("f", "a")
    assert len(waits) == 4


@pytest.mark.slow
def test_dropbox_a_given_client_is_not_left_retrying_on_its_own(dropbox_fake: Any) -> None:
    """A ready client gets the same lost-answer handling: the SDK itself repeats nothing."""
    dropbox_fake.reset()
    waits: list[float] = []
    store = sqstore.dropbox_storage(client=dropbox_fake.client(), sleep=waits.append)
    store["upload"]("f", "a", {"v": 1})
    dropbox_fake.lose_next("files/delete_v2", "503")
    store["delete"]("f", "a")
    assert dropbox_fake.files() == {} and len(waits) == 1


@pytest.mark.slow
def test_dropbox_first_attempt_conflicts_keep_their_meaning(dropbox_fake: Any) -> None:
    """Without a lost answer, a conflict or a missing document is still an error (a lost race)."""
    store, _ = lossy_store(dropbox_fake)
    store["upload"]("f", "a", {"v": 1})
    store["upload"]("g", "a", {"v": 1})
    with pytest.raises(sqstore.AlreadyExistsError):
        store["upload"]("f", "a", {"v": 1})  # the same bytes, but not from a lost attempt
    with pytest.raises(sqstore.NotFoundError):
        store["move"]("h", "g", "a")  # the target exists, but this move never went through
    with pytest.raises(sqstore.NotFoundError):
        store["delete"]("h", "a")
    dropbox_fake.fail_next("files/move_v2", status=429)  # refused, so not applied: a race lost
    with pytest.raises(sqstore.NotFoundError):
        store["move"]("h", "g", "a")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["503", "drop"])
def test_dropbox_claim_and_finish_survive_lost_answers(dropbox_fake: Any, how: str) -> None:
    """With the answers to the claim's move and upload and the finish's move and upload lost,
    every job is claimed and run once and ends DONE with its result."""
    store, _ = lossy_store(dropbox_fake)
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    submitted = [sqstore.upload_job(store, JOB, "sim", "alice") for _ in range(3)]
    for job_id in submitted:
        sqstore.upload_status(store, "sim", "alice", job_id)
    ran: list[str] = []
    for _ in submitted:
        dropbox_fake.lose_next("files/move_v2", how)
        dropbox_fake.lose_next("files/upload", how)
        claimed = sqstore.claim_job(store, "sim")
        assert claimed is not None
        nxt, job = claimed
        ran.append(nxt.job_id)
        result = sqstore.run_simulator(job, nxt.job_id, "sim")
        status = sqstore.StatusMsg(nxt.job_id, "DONE", "ok", "None")
        dropbox_fake.lose_next("files/move_v2", how)
        dropbox_fake.lose_next("files/upload", how)
        sqstore.update_in_database(store, result, status, nxt.job_id, "sim")
    assert sqstore.claim_job(store, "sim") is None
    assert sorted(ran) == sorted(submitted)
    for job_id in submitted:
        assert sqstore.get_status(store, "sim", "alice", job_id).status == "DONE"
        result = sqstore.get_result(store, "sim", "alice", job_id)
        assert result.status == "DONE" and result.results[0].data.memory == ("1",) * 5
    assert jobs_in(store, "running") == []


@pytest.mark.slow
def test_dropbox_rate_limited_token_refresh_is_retried(dropbox_fake: Any) -> None:
    """429s on the OAuth token refresh are retried `retries` times, then raise TransientError."""
    store, waits = lossy_store(dropbox_fake, retries=2)
    dropbox_fake.fail_next("/oauth2/token", status=429, count=2)
    store["upload"]("f", "a", {"v": 1})  # the first call refreshes the token
    assert dropbox_fake.counts == {"/oauth2/token": 3, "/2/files/upload": 1}
    assert waits == [0, 0]  # as long as Retry-After says
    fresh = sqstore.dropbox_storage(
        app_key=dropbox_fake.app_key,
        app_secret=dropbox_fake.app_secret,
        refresh_token=dropbox_fake.refresh_token,
        session=dropbox_fake.session(),
        retries=2,
        sleep=waits.append,
    )
    dropbox_fake.fail_next("/oauth2/token", status=429, count=3)
    with pytest.raises(sqstore.TransientError, match="f/a"):
        fresh["get"]("f", "a")
    assert fresh["get"]("f", "a") == {"v": 1}


@pytest.mark.slow
@pytest.mark.parametrize("change", ["update", "delete"])
@pytest.mark.parametrize("new", [{"v": 2}, None], ids=["replace", "delete"])
def test_dropbox_swap_loses_to_a_change_between_its_read_and_its_write(
    dropbox_fake: Any, change: str, new: dict[str, Any] | None
) -> None:
    """A document changed or removed by another client after swap read it and before swap
    wrote: swap returns False and the other client's change stands."""
    store, _ = lossy_store(dropbox_fake)
    other = sqstore.dropbox_storage(client=dropbox_fake.client())

    def act() -> None:
        if change == "update":
            other["update"]("f", "a", {"v": 9})
        else:
            other["delete"]("f", "a")

    expected = {"/f/a.json": {"v": 9}} if change == "update" else {}
    store["upload"]("f", "a", {"v": 1})
    fresh = sqstore.dropbox_storage(client=dropbox_fake.client())  # has never seen the file
    dropbox_fake.after_next("files/download", act)
    assert fresh["swap"]("f", "a", {"v": 1}, new) is False
    assert fake_files(dropbox_fake) == expected
    other["upload"]("f", "a", {"v": 1}) if change == "delete" else other["update"](
        "f", "a", {"v": 1}
    )
    store["get"]("f", "a")  # the store now knows the file at its current rev
    act()  # changed after the store saw it: the rev it knows is stale
    if change == "update":
        assert store["swap"]("f", "a", {"v": 1}, new) is False
    else:
        with pytest.raises(sqstore.NotFoundError):  # gone before swap began
            store["swap"]("f", "a", {"v": 1}, new)
    assert fake_files(dropbox_fake) == expected


@pytest.fixture
def sqooler_dropbox(dropbox_fake: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """sqooler 0.9's unmodified Dropbox provider, its SDK sessions aimed at the fake."""
    try:
        import warnings

        import dropbox.dropbox_client

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from sqooler.schemes import DropboxLoginInformation
            from sqooler.storage_providers.dropbox import DropboxProviderExtended
    except ImportError as exc:
        skip_or_fail(f"sqooler 0.9 is not installed ({exc}): pip install -e '.[test]'")
    monkeypatch.setattr(
        dropbox.dropbox_client, "create_session", lambda *a, **k: dropbox_fake.session()
    )
    login = DropboxLoginInformation(
        app_key=dropbox_fake.app_key,
        app_secret=dropbox_fake.app_secret,
        refresh_token=dropbox_fake.refresh_token,
    )
    return DropboxProviderExtended(login, name="dropbox")


def one_life(store: Storage, display_name: str) -> None:
    """One job's life in sqstore on a store where *display_name* is configured: Alice
    submits a job and its status; Bob claims it and finishes it with a result; Alice
    reads the status and the result."""
    job_id = sqstore.upload_job(store, JOB, display_name, "alice")
    sqstore.upload_status(store, display_name, "alice", job_id)
    assert sqstore.claim_job(store, display_name) is not None
    done = sqstore.StatusMsg(job_id, "DONE", "ok", "None")
    result = attrs.evolve(sqstore.run_simulator(JOB, job_id, display_name), job_id=job_id)
    sqstore.update_in_database(store, result, done, job_id, display_name)
    sqstore.get_status(store, display_name, "alice", job_id)
    sqstore.get_result(store, display_name, "alice", job_id)


def lifecycle_counts(
    store: Storage, sqooler: Any, reset: Callable[[], None], count: Callable[[], int]
) -> list[int]:
    """What one job's life costs sqstore and then sqooler 0.9 on one storage, as *count* says.

    The life: Alice submits a job and its status; Bob claims it, reads it and finishes it
    with a result; Alice reads the status and the result.
    """
    from sqooler.schemes import ResultDict as SqoolerResult
    from sqooler.schemes import StatusMsgDict

    sqstore.upload_config(store, sqstore.demo_config("sq"), "sq")
    sqstore.timestamp_queue(store, "sq")  # both Bobs start with a fresh heartbeat
    result = sqstore.run_simulator(JOB, "x", "sq")

    def sqooler_life() -> None:
        job_id = sqooler.upload_job(JOB, "sq", "alice")
        sqooler.upload_status("sq", "alice", job_id)
        nxt = sqooler.get_next_job_in_queue("sq")
        sqooler.get_job(storage_path=nxt.job_json_path, job_id=nxt.job_id)
        res = SqoolerResult(**sqstore.to_doc(attrs.evolve(result, job_id=job_id)))
        status = StatusMsgDict(job_id=job_id, status="DONE", detail="ok", error_message="")
        sqooler.update_in_database(res, status, job_id, "sq")
        sqooler.get_status("sq", "alice", job_id)
        sqooler.get_result("sq", "alice", job_id)

    counts = []
    for life in (functools.partial(one_life, store, "sq"), sqooler_life):
        reset()
        life()
        counts.append(count())
    return counts


@pytest.mark.slow
def test_dropbox_lifecycle_needs_at_most_half_of_sqoolers_requests(
    dbx: Storage, dropbox_fake: Any, sqooler_dropbox: Any
) -> None:
    """A job life (see `lifecycle_counts`) costs sqstore at most half of sqooler's requests."""
    counts = lifecycle_counts(
        dbx, sqooler_dropbox, dropbox_fake.reset_counts, lambda: sum(dropbox_fake.counts.values())
    )
    print(f"HTTP requests per job lifecycle: sqstore {counts[0]}, sqooler 0.9 {counts[1]}")
    assert counts[0] * 2 <= counts[1]


@pytest.mark.slow
def test_mongodb_lifecycle_needs_fewer_round_trips_than_sqooler(
    mongodb_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole job life costs sqstore fewer database commands than sqooler 0.9, leases included.

    Counted with pymongo's command monitoring (see `lifecycle_counts`).  sqstore's count
    is pinned, so that a change that adds a round trip shows here: submit 3 (the job and
    its status, and the config read that finds an unknown backend, as sqooler's does); claim 6
    (config, list, lease, a move that reads the job: 3); finish 8 (config, lease, the final
    status recorded in the lease by a swap, result, a move by copy and delete: 2, status, the
    lease dropped by a swap); reads 3.
    """
    from sqooler.schemes import MongodbLoginInformation
    from sqooler.storage_providers import mongodb as sqooler_mongodb

    uri = mongo_uri(mongodb_server)
    mongo_reset(uri)
    client, counter = counted_client(uri)
    monkeypatch.setattr(sqooler_mongodb, "MongoClient", lambda *a, **k: client)
    login = MongodbLoginInformation(
        mongodb_username="u", mongodb_password="p", mongodb_database_url="test"
    )
    sqooler = sqooler_mongodb.MongodbProviderExtended(login, name="mongodb")
    store = sqstore.mongodb_storage(client)
    counts = lifecycle_counts(store, sqooler, counter.commands.clear, lambda: len(counter.commands))
    print(f"MongoDB commands per job lifecycle: sqstore {counts[0]}, sqooler 0.9 {counts[1]}")
    assert counts[0] == 20 and counts[0] < counts[1]


# ============================================================================
# Idempotent submit, retention, queue insight
# ============================================================================
def token_doc(store: Storage, display_name: str, token: str) -> dict[str, Any]:
    """The stored token document of *token* for a backend."""
    return store["get"](
        *sqstore.locate(store["layout"], "submit_token", display_name, job_id=token)
    )


def test_submit_with_a_token_gives_one_job_per_token_and_backend(store: Storage) -> None:
    """The same client_token on the same backend returns the first job id and queues nothing
    more; another token, or the same token on another backend, is another job."""
    for dn in ("sim", "other"):
        sqstore.upload_config(store, sqstore.demo_config(dn), dn)
    first = sqstore.upload_job(store, JOB, "sim", "alice", client_token="req-1")
    assert sqstore.upload_job(store, JOB, "sim", "alice", client_token="req-1") == first
    assert sqstore.upload_job(store, JOB, "sim", "alice", client_token="req-1") == first
    second = sqstore.upload_job(store, JOB, "sim", "alice", client_token="req-2")
    elsewhere = sqstore.upload_job(store, JOB, "other", "alice", client_token="req-1")
    plain = sqstore.upload_job(store, JOB, "sim", "alice")
    assert len({first, second, elsewhere, plain}) == 4
    assert sorted(jobs_in(store, "queued")) == sorted([first, second, plain])
    assert token_doc(store, "sim", "req-1")["job_id"] == first
    # once claimed and finished, a retry still names that job and queues nothing
    assert sorted(finish(store, "sim")) == sorted([first, second, plain])
    assert sqstore.upload_job(store, JOB, "sim", "alice", client_token="req-1") == first
    assert jobs_in(store, "queued") == []


@pytest.mark.usefixtures("configured")
def test_submit_token_reused_for_another_job_or_user_is_refused(store: Storage) -> None:
    """A token already used for another job or by another user raises AlreadyExistsError
    naming it; a token that cannot be a name raises InvalidNameError before any write."""
    job_id = sqstore.upload_job(store, JOB, "sim", "alice", client_token="t1")
    with pytest.raises(sqstore.AlreadyExistsError, match="t1"):
        sqstore.upload_job(store, {"other": {}}, "sim", "alice", client_token="t1")
    with pytest.raises(sqstore.AlreadyExistsError, match="t1"):
        sqstore.upload_job(store, JOB, "sim", "bob", client_token="t1")
    for bad in ("../x", "", "a/b", "$where", 5):
        with pytest.raises(sqstore.InvalidNameError, match="client_token"):
            sqstore.upload_job(store, JOB, "sim", "alice", client_token=bad)  # type: ignore[arg-type]
    assert jobs_in(store, "queued") == [job_id]


@pytest.mark.usefixtures("configured")
def test_submit_token_whose_submitter_died_before_its_job_is_completed(store: Storage) -> None:
    """A token whose submitter died between its token and its job: the same process's retry
    queues the job at once; another's, while the token is fresh, gets TransientError (try
    again), and once it is stale takes it over; either way one job, under the token's id."""
    tokens = sqstore.locate(store["layout"], "submit_token", "sim")[0]
    queue = folder(store, "queued")

    def die_at_queue(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            if args[0] == queue:
                raise Stopped  # the submitter dies before its job is queued
            return fn(*args)

        return call

    dying = sqstore.wrap_ops(store, die_at_queue, only=("upload",))

    def dead_submit(token: str, holder: str | None = None, created: float = 0.0) -> str:
        """Submit with *token* and die before queuing; then make another *holder* its own."""
        with pytest.raises(Stopped):
            sqstore.upload_job(dying, JOB, "sim", "alice", client_token=token)
        doc = store["get"](tokens, token)
        if holder is not None:
            store["update"](tokens, token, {**doc, "holder": holder, "created": created})
        job_id: str = doc["job_id"]
        return job_id

    mine = dead_submit("own")
    assert sqstore.upload_job(store, JOB, "sim", "alice", client_token="own") == mine
    theirs = dead_submit("theirs", "elsewhere:1:1", time.time())
    with pytest.raises(sqstore.TransientError, match="theirs"):
        sqstore.upload_job(store, JOB, "sim", "alice", client_token="theirs")
    stale = dead_submit("stale", "elsewhere:1:1", time.time() - 3600)
    assert sqstore.upload_job(store, JOB, "sim", "alice", client_token="stale") == stale
    assert sorted(jobs_in(store, "queued")) == sorted([mine, stale])
    assert theirs not in jobs_in(store, "queued")
    for token in ("own", "stale"):
        assert token_doc(store, "sim", token)["holder"] == ""


@pytest.mark.slow
@pytest.mark.parametrize("lost", ["token", "job"])
def test_submit_retried_after_a_lost_mongodb_answer_queues_one_job(lossy: Any, lost: str) -> None:
    """A submit whose answer MongoDB sent but the client never got (the connection dropped,
    no retry below) raises TransientError; the retry with the same token returns the same
    job id, and the backend has one job."""
    proxy, _ = lossy
    store = sqstore.mongodb_storage(proxy.uri, retries=0)
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    uploads = [0]

    def arm(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            uploads[0] += 1
            if uploads[0] == (1 if lost == "token" else 2):
                proxy.lose.append("insert")
            return fn(*args)

        return call

    armed = sqstore.wrap_ops(store, arm, only=("upload",))
    with pytest.raises(sqstore.TransientError):
        sqstore.upload_job(armed, JOB, "sim", "alice", client_token="retry-me")
    assert proxy.lost == ["insert"], "the proxy lost no answer"
    job_id = sqstore.upload_job(store, JOB, "sim", "alice", client_token="retry-me")
    assert jobs_in(store, "queued") == [job_id]
    assert sqstore.upload_job(store, JOB, "sim", "alice", client_token="retry-me") == job_id


@pytest.mark.slow
def test_submit_without_a_token_after_a_lost_answer_queues_two_jobs(lossy: Any) -> None:
    """Why tokens exist: the same retry without one queues the job twice."""
    proxy, _ = lossy
    store = sqstore.mongodb_storage(proxy.uri, retries=0)
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    proxy.lose.append("insert")
    with pytest.raises(sqstore.TransientError):
        sqstore.upload_job(store, JOB, "sim", "alice")
    sqstore.upload_job(store, JOB, "sim", "alice")
    assert len(jobs_in(store, "queued")) == 2


@pytest.mark.slow
@pytest.mark.parametrize("how", ["503", "drop"])
def test_submit_retried_after_a_lost_dropbox_answer_queues_one_job(
    dropbox_fake: Any, how: str
) -> None:
    """A Dropbox submit whose upload took effect but whose answer was lost (a 503, or a
    dropped connection) and then retried with its token queues one job under one id."""
    store = dropbox_store(dropbox_fake, retries=0)
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    for route_count in (1, 2):  # the token's upload, then the job's
        token = f"t{route_count}"
        dropbox_fake.reset_counts()
        if route_count == 2:
            dropbox_fake.after_next(
                "files/upload", lambda: dropbox_fake.lose_next("files/upload", how)
            )
        else:
            dropbox_fake.lose_next("files/upload", how)
        with pytest.raises(sqstore.SqstoreError):
            sqstore.upload_job(store, JOB, "sim", "alice", client_token=token)
        job_id = sqstore.upload_job(store, JOB, "sim", "alice", client_token=token)
        assert job_id in jobs_in(store, "queued")
    assert len(jobs_in(store, "queued")) == 2


def _token_submitter(root: str, tokens: list[str], out: str, start: Any) -> None:
    store = sqstore.open_storage(root)
    start.wait()
    got = []
    for token in tokens:
        for _ in range(200):
            try:
                got.append(sqstore.upload_job(store, JOB, "sim", "alice", client_token=token))
                break
            except sqstore.TransientError:
                time.sleep(0.01)  # another submit with this token is between its two writes
    Path(out).write_text(json.dumps(got))


def _token_claimer(root: str, out: str, start: Any, stop: Any) -> None:
    store = sqstore.open_storage(root)
    start.wait()
    claimed = []
    while True:
        got = sqstore.claim_job(store, "sim", policy=sqstore.LeasePolicy(holder=f"w{os.getpid()}"))
        if got is not None:
            claimed.append(got[0].job_id)
            finish_as(store, got[0].job_id, got[1], f"w{os.getpid()}")
        elif stop.is_set():
            break
    Path(out).write_text(json.dumps(claimed))


@pytest.mark.slow
def test_submits_racing_with_one_token_and_a_worker_make_one_job_each(url: str) -> None:
    """Four processes submit the same 30 tokens at once while a worker drains the queue:
    every process gets the same id per token, and each token's job runs exactly once."""
    store = sqstore.open_storage(url)
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    tokens = [f"tok{i}" for i in range(30)]
    ctx = multiprocessing.get_context("spawn")
    start, stop = ctx.Event(), ctx.Event()
    tmp = Path(tempfile.mkdtemp())
    submitters = [
        ctx.Process(target=_token_submitter, args=(url, tokens, str(tmp / f"s{i}"), start))
        for i in range(4)
    ]
    worker = ctx.Process(target=_token_claimer, args=(url, str(tmp / "w"), start, stop))
    for proc in (*submitters, worker):
        proc.start()
    start.set()
    for proc in submitters:
        proc.join(120)
        assert proc.exitcode == 0
    stop.set()
    worker.join(120)
    assert worker.exitcode == 0
    answers = [json.loads((tmp / f"s{i}").read_text()) for i in range(4)]
    assert all(len(a) == 30 for a in answers) and answers[1:] == answers[:-1]
    claimed = json.loads((tmp / "w").read_text())
    claimed += [got[0].job_id for got in iter(lambda: sqstore.claim_job(store, "sim"), None)]
    assert sorted(claimed) == sorted(answers[0])
    shutil.rmtree(tmp)


def test_cli_submit_with_a_token_prints_the_same_id_twice(tmp_path: Path) -> None:
    """`sqstore submit --token T` run twice prints one job id and queues one job."""
    store = sqstore.local_storage(tmp_path / "data")
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    (tmp_path / "job.json").write_text(json.dumps(JOB))
    args = ("--storage", str(tmp_path / "data"), "submit", "sim", "job.json", "--token", "abc")
    first, again = run_cli(*args, cwd=tmp_path), run_cli(*args, cwd=tmp_path)
    assert first.returncode == again.returncode == 0, first.stderr + again.stderr
    assert first.stdout == again.stdout and len(first.stdout.strip()) == 24
    assert store["list"]("jobs/queued/sim") == [first.stdout.strip()]
    bad = run_cli(*args[:-1], "../x", cwd=tmp_path)
    assert bad.returncode == 1 and "client_token" in bad.stderr


# -- retention -------------------------------------------------------------------------------
DAY = 86_400.0


def old_job(store: Storage, submitted: float, display_name: str = "sim") -> str:
    """Queue a job whose id says it was submitted at Unix time *submitted*; return its id."""
    layout = store["layout"]
    job_id = sqstore.new_job_id(layout, display_name, "alice", int(submitted * 1e9), 7)
    store["upload"](*place(store, "queued", job_id, display_name), JOB)
    return job_id


def aged_lab(
    store: Storage, clock: list[float], *, submitted: float | None = None
) -> dict[str, str]:
    """A backend 'sim' with jobs finished at known times: old DONE and ERROR jobs (ten days
    ago), a recent DONE job (an hour ago), an old job still queued and one still running.
    They are submitted now with tokens named as the dict's keys, or at *submitted*."""
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    jobs: dict[str, str] = {}
    for i, name in enumerate(("old_done", "old_error", "new_done", "running", "queued")):
        if submitted is None:
            jobs[name] = sqstore.upload_job(store, JOB, "sim", "alice", client_token=name)
        else:
            jobs[name] = old_job(store, submitted + i)
        sqstore.upload_status(store, "sim", "alice", jobs[name])
    for name, at, outcome in (
        ("old_done", clock[0] - 10 * DAY, "DONE"),
        ("old_error", clock[0] - 10 * DAY, "ERROR"),
        ("new_done", clock[0] - 3600, "DONE"),
        ("running", clock[0] - 10 * DAY, None),
    ):
        got = sqstore.claim_job(
            store, "sim", policy=sqstore.LeasePolicy(holder="bob"), now=functools.partial(float, at)
        )
        assert got is not None and got[0].job_id == jobs[name]
        if outcome is None:
            break
        result = sqstore.run_simulator(got[1], jobs[name], "sim") if outcome == "DONE" else None
        status = sqstore.StatusMsg(jobs[name], outcome, "x", "None")
        sqstore.update_in_database(
            store,
            result,
            status,
            jobs[name],
            "sim",
            policy=sqstore.LeasePolicy(holder="bob"),
            now=functools.partial(float, at),
        )
    return jobs


def left_of(store: Storage, job_id: str) -> set[str]:
    """Which of a job's documents exist: its job file (anywhere), status, result, token."""
    found = set()
    if sqstore.locate_job(store, "sim", job_id) is not None:
        found.add("job")
    for kind, name in (("status", "status"), ("results", "result")):
        with contextlib.suppress(sqstore.NotFoundError):
            store["get"](*place(store, kind, job_id))
            found.add(name)
    return found


def test_prune_removes_old_finished_and_failed_jobs_only(store: Storage) -> None:
    """prune removes the job, status, result and token of each job finished or failed longer
    ago than older_than, and reports them; it leaves younger ones and never touches a queued
    or running job, however old; a dry run reports the same and removes nothing."""
    clock = [T0]
    jobs = aged_lab(store, clock)
    before = {name: left_of(store, job_id) for name, job_id in jobs.items()}
    assert before["old_done"] == {"job", "status", "result"}
    plan = sqstore.prune(store, "sim", older_than=7 * DAY, dry_run=True, now=lambda: T0)
    assert {name: left_of(store, job_id) for name, job_id in jobs.items()} == before
    assert sorted(plan["jobs"]) == sorted([jobs["old_done"], jobs["old_error"]])
    assert plan["results"] == [jobs["old_done"]]
    assert sorted(plan["statuses"]) == sorted(plan["jobs"])
    assert sorted(plan["tokens"]) == ["old_done", "old_error"]
    done = sqstore.prune(store, "sim", older_than=7 * DAY, now=lambda: T0)
    assert {k: sorted(v) for k, v in done.items()} == {k: sorted(v) for k, v in plan.items()}
    assert left_of(store, jobs["old_done"]) == left_of(store, jobs["old_error"]) == set()
    for name in ("new_done", "running", "queued"):
        assert left_of(store, jobs[name]) == before[name], name
    assert sqstore.get_status(store, "sim", "alice", jobs["old_done"]).status == "ERROR"
    assert sqstore.prune(store, "sim", older_than=7 * DAY, now=lambda: T0) == {
        "jobs": [], "statuses": [], "results": [], "tokens": []
    }  # fmt: skip
    # a pruned token is free again: a new submit with it is a new job
    assert (
        sqstore.upload_job(store, JOB, "sim", "alice", client_token="old_done") not in jobs.values()
    )
    # the rest goes once old enough; the running and queued jobs stay
    sqstore.prune(store, "sim", older_than=0, now=lambda: T0)
    assert left_of(store, jobs["new_done"]) == set()
    assert left_of(store, jobs["running"]) == before["running"]
    assert left_of(store, jobs["queued"]) == before["queued"]


def test_prune_keep_results_removes_inputs_first(store: Storage) -> None:
    """With keep_results longer than older_than, the job documents (the inputs) of old jobs
    go while their statuses and results stay until keep_results; then those go too."""
    jobs = aged_lab(store, [T0])
    got = sqstore.prune(store, "sim", older_than=DAY, keep_results=30 * DAY, now=lambda: T0)
    assert sorted(got["jobs"]) == sorted([jobs["old_done"], jobs["old_error"]])
    assert got["statuses"] == got["results"] == got["tokens"] == []
    assert left_of(store, jobs["old_done"]) == {"status", "result"}
    assert sqstore.get_result(store, "sim", "alice", jobs["old_done"]).status == "DONE"
    later = sqstore.prune(store, "sim", older_than=DAY, keep_results=30 * DAY,
                          now=lambda: T0 + 25 * DAY)  # fmt: skip
    assert left_of(store, jobs["old_done"]) == set() and later["results"] == [jobs["old_done"]]
    with pytest.raises(ValueError, match="keep_results"):
        sqstore.prune(store, "sim", older_than=DAY, keep_results=1.0)
    with pytest.raises(ValueError, match="older_than"):
        sqstore.prune(store, "sim", older_than=-1)
    with pytest.raises(sqstore.InvalidNameError):
        sqstore.prune(store, "../sim", older_than=DAY)


def stopping_after(count: int) -> Callable[[str, Callable[..., Any]], Callable[..., Any]]:
    """A wrap for `wrap_ops` that ends the process's work (KeyboardInterrupt) right after
    the *count*-th wrapped call took effect."""
    calls = [0]

    def wrap(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            out = fn(*args)
            calls[0] += 1
            if calls[0] == count:
                raise KeyboardInterrupt
            return out

        return call

    return wrap


def test_prune_stopped_after_any_delete_never_leaves_a_done_status_without_result(
    tmp_path: Path,
) -> None:
    """A prune that stops after any one of its deletes leaves no DONE status whose result is
    gone; run again, it removes the rest."""
    for stop_after in range(1, 12):
        store = sqstore.local_storage(tmp_path / f"s{stop_after}")
        jobs = aged_lab(store, [T0])
        with contextlib.suppress(KeyboardInterrupt):
            stopping = sqstore.wrap_ops(store, stopping_after(stop_after), only=("delete",))
            sqstore.prune(stopping, "sim", older_than=DAY, now=lambda: T0)
        for job_id in jobs.values():
            left = left_of(store, job_id)
            status = sqstore.get_status(store, "sim", "alice", job_id).status
            assert not (status == "DONE" and "result" not in left), (stop_after, left)
        sqstore.prune(store, "sim", older_than=DAY, now=lambda: T0)
        assert left_of(store, jobs["old_done"]) == left_of(store, jobs["old_error"]) == set()
        assert left_of(store, jobs["new_done"]) == {"job", "status", "result"}


@pytest.mark.usefixtures("configured")
def test_prune_leaves_a_job_whose_worker_is_finishing_it(store: Storage) -> None:
    """A job whose lease still exists (its finish is under way, or a sweep must complete
    it) is left alone by prune, however old; once the finish completes it can go."""
    job_id = sqstore.upload_job(store, JOB, "sim", "alice")
    sqstore.upload_status(store, "sim", "alice", job_id)
    got = sqstore.claim_job(store, "sim", policy=sqstore.LeasePolicy(holder="bob"), now=lambda: T0)
    assert got is not None
    result = sqstore.run_simulator(got[1], job_id, "sim")
    status = sqstore.StatusMsg(job_id, "DONE", "x", "None")

    def late(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(path: str, *args: Any) -> Any:
            if path == store["layout"].leases and args[-1] is None:  # the lease's drop
                assert sqstore.prune(store, "sim", older_than=0, now=lambda: T0 + DAY) == {
                    "jobs": [], "statuses": [], "results": [], "tokens": []
                }  # fmt: skip
            return fn(path, *args)

        return call

    slow = sqstore.wrap_ops(store, late, only=("swap",))
    sqstore.update_in_database(
        slow,
        result,
        status,
        job_id,
        "sim",
        policy=sqstore.LeasePolicy(holder="bob"),
        now=lambda: T0,
    )
    done_once(store, job_id)
    assert sqstore.prune(store, "sim", older_than=0, now=lambda: T0 + DAY)["jobs"] == [job_id]


@pytest.mark.slow
def test_prune_sigkilled_midway_then_run_again_removes_everything_once(tmp_path: Path) -> None:
    """`sqstore prune` SIGKILLed midway and run again removes every old job, and no young
    one; no DONE status is left without its result."""
    root = tmp_path / "store"
    store = sqstore.local_storage(root)
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    jobs, old = 1000, time.time() - 10 * DAY
    for i in range(jobs + 5):
        job_id = old_job(store, old - DAY + i * 0.001)
        sqstore.upload_status(store, "sim", "alice", job_id)
    finished: list[str] = []
    while (
        got := sqstore.claim_job(store, "sim", policy=sqstore.LeasePolicy(holder="bob"))
    ) is not None:
        at = old if len(finished) < jobs else time.time()
        result = sqstore.run_simulator(got[1], got[0].job_id, "sim")
        status = sqstore.StatusMsg(got[0].job_id, "DONE", "x", "None")
        sqstore.update_in_database(
            store,
            result,
            status,
            got[0].job_id,
            "sim",
            policy=sqstore.LeasePolicy(holder="bob"),
            now=functools.partial(float, at),
        )
        finished.append(got[0].job_id)
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    child = subprocess.Popen(
        [sys.executable, "-m", "sqstore", "--storage", str(root), "prune", "sim",
         "--older-than", "7d"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    results = root / "results" / "sim"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(results.glob("*.json"))) > jobs - 200:
        time.sleep(0.002)
    child.kill()
    assert child.wait() == -signal.SIGKILL, "the prune ended before it could be killed"
    assert 5 < len(list(results.glob("*.json"))) <= jobs - 200
    for job_id in finished:
        left = left_of(store, job_id)
        assert "status" not in left or "result" in left
    proc = run_cli("--storage", str(root), "prune", "sim", "--older-than", "7d", "--json",
                   cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["jobs"]) > 0
    assert sorted(jobs_in(store, "finished")) == sorted(finished[jobs:])
    assert sorted(store["list"]("results/sim")) == sorted(finished[jobs:])
    assert sorted(store["list"]("status/sim")) == sorted(finished[jobs:])


def test_cli_prune_dry_run_reports_and_keeps(tmp_path: Path) -> None:
    """`sqstore prune --dry-run` names what it would remove and removes nothing; without it
    the same is removed; a bad duration is a clear error."""
    root = tmp_path / "data"
    store = sqstore.local_storage(root)
    jobs = aged_lab(store, [time.time()], submitted=time.time() - 11 * DAY)
    before = tree(root)
    base = ("--storage", str(root), "prune", "sim", "--older-than", "7d")
    dry = run_cli(*base, "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert tree(root) == before
    assert "would remove 2 jobs" in dry.stdout and jobs["old_done"] in dry.stdout
    real = run_cli(*base, "--json", cwd=tmp_path)
    assert real.returncode == 0, real.stderr
    assert sorted(json.loads(real.stdout)["jobs"]) == sorted([jobs["old_done"], jobs["old_error"]])
    bad = run_cli("--storage", str(root), "prune", "sim", "--older-than", "soon", cwd=tmp_path)
    assert bad.returncode == 2 and "soon" in bad.stderr


# -- queue insight ---------------------------------------------------------------------------
@pytest.mark.usefixtures("configured")
def test_queue_stats_counts_and_times(store: Storage) -> None:
    """queue_stats reports the queued count and the oldest one's age, the running jobs with
    holder and lease ages, finished and failed counts, jobs/hour over the last hour and day
    and the median submission-to-DONE time; pending_jobs is the queued count."""
    layout = store["layout"]
    submitted = {}
    for i, ago in enumerate((5000.0, 4000.0, 3000.0, 2000.0, 1000.0, 900.0)):
        ns = int((T0 - ago) * 1e9)
        job_id = sqstore.new_job_id(layout, "sim", "alice", ns + i * 1000, i)
        store["upload"](*place(store, "queued", job_id), JOB)
        submitted[job_id] = T0 - ago
    ids = sorted(submitted)
    assert sqstore.get_backend_status(store, "sim").pending_jobs == 6
    outcomes = {ids[0]: ("DONE", T0 - 4000), ids[1]: ("DONE", T0 - 1000),
                ids[2]: ("ERROR", T0 - 1000), ids[3]: ("DONE", T0 - 100)}  # fmt: skip
    bob = sqstore.LeasePolicy(holder="bob")
    for job_id in ids[:4]:
        got = sqstore.claim_job(store, "sim", policy=bob, now=lambda: T0 - 5000)
        assert got is not None and got[0].job_id == job_id
        outcome, at = outcomes[job_id]
        result = sqstore.run_simulator(got[1], job_id, "sim") if outcome == "DONE" else None
        status = sqstore.StatusMsg(job_id, outcome, "x", "None")
        sqstore.update_in_database(store, result, status, job_id, "sim", policy=bob,
                                   now=functools.partial(float, at))  # fmt: skip
    got = sqstore.claim_job(
        store,
        "sim",
        policy=sqstore.LeasePolicy(holder="carol", lease_seconds=600),
        now=lambda: T0 - 60,
    )
    assert got is not None and got[0].job_id == ids[4]
    stats = sqstore.queue_stats(store, "sim", now=lambda: T0)
    assert stats.display_name == "sim"
    assert stats.queued == 1 and stats.oldest_queued_age == pytest.approx(900.0, abs=0.01)
    assert [(r.job_id, r.holder) for r in stats.running] == [(ids[4], "carol")]
    assert stats.running[0].age == pytest.approx(60.0) and stats.running[0].expires_in == 540.0
    assert (stats.finished, stats.failed) == (3, 1)
    assert stats.jobs_per_hour_last_hour == 3.0  # two at T0-1000, one at T0-100
    assert stats.jobs_per_hour_last_day == pytest.approx(4 / 24)
    # submission to DONE: 1000, 3000 and 1900 seconds -> median 1900
    assert stats.median_seconds_to_done == pytest.approx(1900.0, abs=0.01)
    assert sqstore.get_backend_status(store, "sim").pending_jobs == 1
    empty = sqstore.queue_stats(store, "sim", now=lambda: T0 + 10 * DAY)
    assert empty.jobs_per_hour_last_day == 0 and empty.finished == 3
    with pytest.raises(sqstore.NotFoundError):
        sqstore.queue_stats(store, "nosuch")


def test_cli_stats_json_and_text(tmp_path: Path) -> None:
    """`sqstore stats [DISPLAY_NAME] [--json]` prints each backend's figures; --watch needs
    a terminal."""
    root = tmp_path / "data"
    store = sqstore.local_storage(root)
    aged_lab(store, [time.time()], submitted=time.time() - 11 * DAY)
    one = run_cli("--storage", str(root), "stats", "sim", "--json", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    doc = json.loads(one.stdout)
    assert (doc["queued"], doc["finished"], doc["failed"]) == (1, 2, 1)
    assert doc["running"][0]["holder"] == "bob"
    every = run_cli("--storage", str(root), "stats", cwd=tmp_path)
    assert every.returncode == 0 and every.stdout.startswith("sim: 1 queued"), every.stdout
    watch = run_cli("--storage", str(root), "stats", "--watch", cwd=tmp_path)
    assert watch.returncode == 1 and "terminal" in watch.stderr


def test_cli_stats_watch_refreshes_in_place_on_a_terminal(tmp_path: Path) -> None:
    """On a terminal, `sqstore stats --watch` redraws in place until Ctrl-C, then exits 130."""
    import pty

    root = tmp_path / "data"
    sqstore.upload_config(sqstore.local_storage(root), sqstore.demo_config("sim"), "sim")
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    main_fd, child_fd = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sqstore", "--storage", str(root), "stats", "--watch", "0.05"],
        stdin=child_fd, stdout=child_fd, stderr=child_fd, env=env,
    )  # fmt: skip
    os.close(child_fd)
    seen = b""
    deadline = time.monotonic() + 60
    while seen.count(b"\x1b[H") < 3 and time.monotonic() < deadline:
        seen += os.read(main_fd, 4096)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130
    os.close(main_fd)
    assert seen.count(b"\x1b[H") >= 3 and b"sim: 0 queued" in seen


@pytest.mark.parametrize("seconds", ["inf", "nan", "0", "-1"])
def test_cli_stats_watch_refuses_a_period_that_is_not_a_time(tmp_path: Path, seconds: str) -> None:
    """On a terminal, `stats --watch` with no finite positive period is one error line, exit 1."""
    import pty

    root = tmp_path / "data"
    sqstore.upload_config(sqstore.local_storage(root), sqstore.demo_config("sim"), "sim")
    main_fd, child_fd = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sqstore", "--storage", str(root), "stats", "--watch", seconds],
        stdin=child_fd, stdout=child_fd, stderr=child_fd,
        env={**os.environ, "PYTHONPATH": str(HERE)},
    )  # fmt: skip
    os.close(child_fd)
    assert proc.wait(60) == 1
    seen = b""
    with contextlib.suppress(OSError):  # EIO once the child's side is closed
        while chunk := os.read(main_fd, 4096):
            seen += chunk
    os.close(main_fd)
    assert seen.decode().strip() == "sqstore: error: --watch takes a number of seconds > 0"


def test_tokens_finish_times_and_pruning_leave_sqooler_reading_as_before(
    shared: tuple[Any, Storage],
) -> None:
    """sqooler 0.9 on the same storage still lists the backends and serves a job submitted
    with a token, after sqstore finished (with finished_at) and pruned another there."""
    sqooler, store = shared
    sqstore.upload_config(store, sqstore.demo_config("sq"), "sq")
    old = sqstore.upload_job(store, JOB, "sq", "alice", client_token="first")
    sqstore.upload_status(store, "sq", "alice", old)
    got = sqstore.claim_job(store, "sq", policy=sqstore.LeasePolicy(holder="bob"))
    assert got is not None
    sqstore.update_in_database(store, sqstore.run_simulator(got[1], old, "sq"),
                               sqstore.StatusMsg(old, "DONE", "x", "None"), old, "sq",
                               policy=sqstore.LeasePolicy(holder="bob"))  # fmt: skip
    job_id = sqstore.upload_job(store, JOB, "sq", "alice", client_token="second")
    sqstore.upload_status(store, "sq", "alice", job_id)
    assert "finished_at" in store["get"](*place(store, "status", old, "sq"))
    assert sqooler.get_status("sq", "alice", old).status == "DONE"  # finished_at is ignored
    assert sqooler.get_result("sq", "alice", old).job_id == old
    assert sqstore.queue_stats(store, "sq").finished == 1
    assert sqstore.prune(store, "sq", older_than=0, now=lambda: time.time() + 1)["jobs"] == [old]
    assert sqooler.get_backends() == ["sq"]
    assert sqooler.get_status("sq", "alice", job_id).status == "INITIALIZING"
    assert sqooler.get_next_job_in_queue("sq").job_id == job_id


@pytest.mark.parametrize("heading", ["## Idempotent submit", "## Retention", "## Queue insight"])
def test_readme_examples_of_tokens_prune_and_stats_run(heading: str) -> None:
    """The python examples of the README's sections on tokens, retention and stats run."""
    blocks = re.findall(r"```python\n(.*?)```", readme_section(heading), re.S)
    assert blocks, heading
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


# ============================================================================
# Interoperability with sqooler 0.9 on one directory and on Dropbox
# ============================================================================
@pytest.fixture
def sqooler(tmp_path: Path) -> Any:
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from sqooler.schemes import LocalLoginInformation
            from sqooler.storage_providers.local import LocalProviderExtended
    except ImportError as exc:
        skip_or_fail(f"sqooler 0.9 is not installed ({exc}): pip install -e '.[test]'")
    login = LocalLoginInformation(base_path=str(tmp_path / "store"))
    return LocalProviderExtended(login, name="local")


@pytest.fixture
def sqooler_mongodb(mongodb_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """sqooler 0.9's unmodified MongoDB provider, its client aimed at the test server.

    sqooler builds a ``mongodb+srv://`` URI from its login; the client it gets
    connects to the test server instead.
    """
    try:
        import warnings

        import pymongo

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import sqooler.storage_providers.mongodb as sqooler_mongodb
            from sqooler.schemes import MongodbLoginInformation
    except ImportError as exc:
        skip_or_fail(f"sqooler 0.9 is not installed ({exc}): pip install -e '.[test]'")
    uri = mongo_uri(mongodb_server)
    monkeypatch.setattr(sqooler_mongodb, "MongoClient", lambda *a, **k: pymongo.MongoClient(uri))
    login = MongodbLoginInformation(
        mongodb_username="alice", mongodb_password="secret", mongodb_database_url="test"
    )
    return sqooler_mongodb.MongodbProviderExtended(login, name="mongodb")


@pytest.fixture(params=backend_params("local", "dropbox", "mongodb"))
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Any, Storage]:
    """sqooler 0.9's provider and an sqstore handle on one storage (directory, Dropbox, MongoDB)."""
    if request.param == "local":
        return request.getfixturevalue("sqooler"), sqstore.local_storage(tmp_path / "store")
    if request.param == "mongodb":
        store = mongo_store(request.getfixturevalue("mongodb_server"))
        return request.getfixturevalue("sqooler_mongodb"), store
    return request.getfixturevalue("sqooler_dropbox"), request.getfixturevalue("dbx")


def test_sqooler_spooler_serves_an_sqstore_frontend(shared: tuple[Any, Storage]) -> None:
    """sqooler's Bob (signing) serves sqstore's Alice on one storage; she verifies."""
    from sqooler.schemes import BackendConfigSchemaIn, StatusMsgDict
    from sqooler.schemes import ResultDict as SqoolerResult
    from sqooler.security import create_jwk_pair

    sqooler, store = shared
    private, public = create_jwk_pair("sqoolerkid")
    config = BackendConfigSchemaIn(**sqstore.to_doc(sqstore.demo_config("sq", sign=True)))
    sqooler.upload_config(config, "sq", private)
    sqooler.upload_public_key(public, "sq")
    job_id = sqstore.upload_job(store, JOB, "sq", "alice")
    sqstore.upload_status(store, "sq", "alice", job_id)

    nxt = sqooler.get_next_job_in_queue("sq", private)
    assert nxt.job_id == job_id
    job = sqooler.get_job(storage_path=nxt.job_json_path, job_id=nxt.job_id)
    result = sqstore.run_simulator(job, job_id, "sq")
    status = StatusMsgDict(job_id=job_id, status="DONE", detail="ok", error_message="None")
    sqooler.update_in_database(
        SqoolerResult(**sqstore.to_doc(result)), status, job_id, "sq", private
    )

    assert sqstore.get_status(store, "sq", "alice", job_id).status == "DONE"
    assert sqstore.get_result(store, "sq", "alice", job_id).results == result.results
    assert sqstore.verify_result(store, "sq", job_id)
    assert sqstore.get_public_key(store, "sq").x == public.x.decode()
    assert sqstore.get_backend_status(store, "sq").operational
    assert sqstore.get_backends(store) == sqooler.get_backends() == ["sq"]


def test_sqstore_spooler_serves_a_sqooler_frontend(shared: tuple[Any, Storage]) -> None:
    """sqstore's Bob (signing) serves sqooler's Alice on one storage; sqooler verifies."""
    from sqooler.security import JWK as SqoolerJWK

    sqooler, store = shared
    private, public = sqstore.generate_keypair("sqstorekid")
    sqstore.upload_config(store, sqstore.demo_config("sq", sign=True), "sq", private)
    sqstore.upload_public_key(store, public, "sq")

    job_id = sqooler.upload_job(JOB, "sq", "alice")
    sqooler.upload_status("sq", "alice", job_id)
    assert finish(store, "sq", private) == [job_id]

    assert sqooler.get_status("sq", "alice", job_id).status == "DONE"
    result = sqooler.get_result("sq", "alice", job_id)
    assert result.status == "DONE" and result.results[0].data.memory == ["1"] * 5
    assert result.backend_name == f"{store['name']}_sq_simulator"
    assert sqooler.verify_result("sq", job_id)
    assert sqooler.get_public_key("sq").x.decode() == public.x
    assert sqooler.get_backend_status("sq").operational
    assert sqooler.get_backend_dict("sq").backend_name == f"{store['name']}_sq_simulator"
    # sqooler accepts our key as its own: it can update the config we signed
    sqooler.update_config(sqooler.get_config("sq"), "sq", SqoolerJWK(**sqstore.to_doc(private)))
    assert sqstore.get_config(store, "sq").kid == "sqstorekid"
    raw = store["get"](folder(store, "configs"), doc_id(store, "configs", "", "sq"))
    assert sqstore.verify_doc(raw, [public])


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=json_docs)
def test_sqooler_and_sqstore_sign_identically(sqooler: Any, payload: dict[str, Any]) -> None:
    """For any JSON payload sqooler's sign_payload and sqstore's sign_doc agree bit for bit."""
    from sqooler.security import JWK as SqoolerJWK
    from sqooler.security import sign_payload

    private, public = rfc_keys("k")
    theirs = sign_payload(payload, SqoolerJWK(**sqstore.to_doc(private))).model_dump()
    ours = sqstore.sign_doc(payload, private)
    assert ours == theirs
    assert sqstore.verify_doc(theirs, [public]) == payload


def test_sqooler_models_are_accepted(sqooler: Any, tmp_path: Path) -> None:
    """sqooler's pydantic records (configs, results, keys) work where sqstore's records do."""
    from sqooler.schemes import BackendConfigSchemaIn
    from sqooler.security import create_jwk_pair

    store = sqstore.local_storage(tmp_path / "store")
    private, public = create_jwk_pair("pk")
    cfg = BackendConfigSchemaIn(**sqstore.to_doc(sqstore.demo_config("sq", sign=True)))
    sqstore.upload_config(store, cfg, "sq", private)
    sqstore.upload_public_key(store, public, "sq")
    assert sqstore.get_config(store, "sq").kid == "pk"
    assert sqooler.get_config("sq").kid == "pk"


def signed_local(tmp_path: Path) -> tuple[Storage, sqstore.JWK, sqstore.JWK]:
    """A directory store with the signing backend 'qsim' and its published key ('qk')."""
    store = sqstore.local_storage(tmp_path / "store")
    private, public = sqstore.generate_keypair("qk")
    sqstore.upload_config(store, sqstore.demo_config("qsim", sign=True), "qsim", private)
    sqstore.upload_public_key(store, public, "qsim")
    return store, private, public


# Records that mirror a sqooler pydantic model; they also read as their JSON document.
SQOOLER_SHAPED = (
    sqstore.BackendConfig,
    sqstore.BackendDict,
    sqstore.BackendStatus,
    sqstore.DataDict,
    sqstore.ExperimentDict,
    sqstore.GateDict,
    sqstore.JWK,
    sqstore.JWSDoc,
    sqstore.JWSHeader,
    sqstore.NextJob,
    sqstore.ResultDict,
    sqstore.StatusMsg,
)
RECORD_STRATEGIES: dict[type, st.SearchStrategy[Any]] = {
    **RECORDS,
    sqstore.DataDict: experiments.map(lambda e: e.data),
    sqstore.JWSHeader: st.builds(sqstore.JWSHeader, kid=names),
}


@pytest.mark.parametrize("cls", SQOOLER_SHAPED, ids=lambda c: c.__name__)
@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=30)
@given(data=st.data())
def test_sqooler_shaped_records_are_read_only_mappings(cls: type, data: st.DataObject) -> None:
    """A sqooler-shaped record reads as to_doc(record) and stays a frozen, hashable attrs record."""
    from collections.abc import Mapping

    record = data.draw(RECORD_STRATEGIES[cls])
    doc = sqstore.to_doc(record)
    assert issubclass(type(record), Mapping)  # isinstance would hide the attrs class from mypy
    assert dict(record) == doc and list(record) == list(doc) and len(record) == len(doc)
    assert all(key in record and record[key] == doc[key] for key in doc)
    assert "no such field" not in record and record.get("no such field") is None
    with pytest.raises(KeyError):
        record["no such field"]
    # still the record it was: attribute access, equality, hash, repr, frozen, round trip
    field = attrs.fields(cls)[0].name
    assert getattr(record, field) == getattr(attrs.evolve(record), field)
    assert record == attrs.evolve(record)
    try:
        assert hash(record) == hash(attrs.evolve(record))
    except TypeError as exc:  # a dict in a field (a header, a gate), never the record itself
        assert str(exc) == "unhashable type: 'dict'"
    assert record != doc and repr(record).startswith(f"{cls.__name__}(")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        setattr(record, field, None)
    with pytest.raises(TypeError):
        record[field] = None
    assert sqstore.from_doc(json.loads(json.dumps(doc)), cls) == record


def test_returned_records_validate_as_sqooler_models(tmp_path: Path) -> None:
    """What sqstore returns where sqooler returns a pydantic model validates as that model."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sqooler import schemes, security

    store, private, public = signed_local(tmp_path)
    sqstore.timestamp_queue(store, "qsim", private)
    job = job_with(shots=3)
    job_id = sqstore.upload_job(store, job, "qsim", "alice")
    returned: list[tuple[Any, Any]] = [
        (schemes.StatusMsgDict, sqstore.upload_status(store, "qsim", "alice", job_id, private)),
        (schemes.BackendConfigSchemaIn, sqstore.get_config(store, "qsim")),
        (schemes.BackendConfigSchemaOut, sqstore.get_backend_dict(store, "qsim")),
        (schemes.BackendStatusSchemaOut, sqstore.get_backend_status(store, "qsim")),
        (security.JWK, sqstore.get_public_key(store, "qsim")),
        (security.JWK, sqstore.get_public_key_from_kid(store, "qk")),
    ]
    nxt = sqstore.get_next_job_in_queue(store, "qsim", private)
    returned.append((schemes.NextJobSchema, nxt))
    result = sqstore.run_simulator(
        sqstore.get_job(store, nxt.job_json_path, nxt.job_id), nxt.job_id, "qsim"
    )
    status = attrs.evolve(sqstore.get_status(store, "qsim", "alice", job_id), status="DONE")
    sqstore.update_in_database(store, result, status, nxt.job_id, "qsim", private)
    returned += [
        (schemes.StatusMsgDict, sqstore.get_status(store, "qsim", "alice", job_id)),
        (schemes.ResultDict, sqstore.get_result(store, "qsim", "alice", job_id)),
        (schemes.ResultDict, sqstore.get_result(store, "qsim", "alice", "missing")),
        (schemes.StatusMsgDict, sqstore.get_status(store, "qsim", "alice", "missing")),
    ]
    for model, record in returned:
        validated = model.model_validate(record)  # as django-ninja validates a response
        assert validated == model.model_validate(sqstore.to_doc(record)), model.__name__
        assert model.model_validate(validated.model_dump(mode="json")) == validated
    result_model = schemes.ResultDict.model_validate(returned[-3][1])
    assert result_model.results[0].data.memory == ["1", "1", "1"]
    assert security.JWK.model_validate(returned[4][1]).x == public.x.encode()


def _ninja_api(store: Storage) -> Any:
    """A django-ninja API shaped like django-qlued's: sqstore's records are returned as is."""
    import uuid
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from ninja import NinjaAPI
        from ninja.params.functions import Body  # what ninja.Body calls, with its signature
        from ninja.responses import codes_4xx
        from sqooler.schemes import (
            BackendConfigSchemaOut,
            BackendStatusSchemaOut,
            NextJobSchema,
            ResultDict,
            StatusMsgDict,
        )

    api = NinjaAPI(urls_namespace=f"sq-{uuid.uuid4().hex}")
    unknown = {
        "job_id": "None",
        "status": "ERROR",
        "detail": "Unknown back-end!",
        "error_message": "Unknown back-end!",
    }

    @api.get(
        "{backend}/get_config", response={200: BackendConfigSchemaOut, codes_4xx: StatusMsgDict}
    )
    def get_config(request: Any, backend: str) -> Any:
        try:
            info = sqstore.get_backend_dict(store, backend)
        except FileNotFoundError:
            return 404, unknown
        return attrs.evolve(info, url=f"https://example.org/api/v3/{info.backend_name}/")

    @api.get(
        "{backend}/get_backend_status",
        response={200: BackendStatusSchemaOut, codes_4xx: StatusMsgDict},
    )
    def get_backend_status(request: Any, backend: str) -> Any:
        return sqstore.get_backend_status(store, backend)

    @api.post("{backend}/post_job", response={200: StatusMsgDict, codes_4xx: StatusMsgDict})
    def post_job(request: Any, backend: str, data: dict[str, str] = Body(...)) -> Any:  # noqa: B008
        job_id = sqstore.upload_job(store, json.loads(data["job"]), backend, data["token"])
        return sqstore.upload_status(store, backend, data["token"], job_id)

    @api.get("{backend}/get_job_status", response={200: StatusMsgDict, codes_4xx: StatusMsgDict})
    def get_job_status(request: Any, backend: str, job_id: str, token: str) -> Any:
        status = sqstore.get_status(store, backend, token, job_id)
        return (406, status) if status.status == "ERROR" else (200, status)

    @api.get(
        "{backend}/get_job_result",
        response={200: StatusMsgDict | ResultDict, codes_4xx: StatusMsgDict},
    )
    def get_job_result(request: Any, backend: str, job_id: str, token: str) -> Any:
        status = sqstore.get_status(store, backend, token, job_id)
        if status.status == "ERROR":
            return 406, status
        if status.status != "DONE":
            return 200, status
        return 200, sqstore.get_result(store, backend, token, job_id)

    @api.get("/backends", response=list[BackendConfigSchemaOut])
    def list_backends(request: Any) -> Any:
        return [sqstore.get_backend_dict(store, dn) for dn in sqstore.get_backends(store)]

    @api.get("{backend}/next_job", response=NextJobSchema)
    def next_job(request: Any, backend: str) -> Any:
        return sqstore.get_next_job_in_queue(store, backend)

    return api


@pytest.mark.filterwarnings("ignore:Returning tuple:DeprecationWarning")  # as django-qlued does
def test_django_ninja_frontend_serves_records(tmp_path: Path) -> None:
    """A django-ninja frontend shaped like django-qlued returns sqstore's records as responses."""
    import types
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import django
        from django.conf import settings as django_settings
        from django.test import Client, override_settings
        from django.urls import path

    if not django_settings.configured:
        django_settings.configure(
            DEBUG=False,
            SECRET_KEY="test",
            ALLOWED_HOSTS=["testserver"],
            INSTALLED_APPS=[],
            MIDDLEWARE=[],
            DATABASES={},
            ROOT_URLCONF=None,
        )
        django.setup()
    store = sqstore.local_storage(tmp_path / "store")
    sqstore.upload_config(store, sqstore.demo_config("qsim"), "qsim")
    api = _ninja_api(store)
    urls = types.ModuleType("frontend_urls")  # a URLconf module, made here (resolvers hash it)
    urls.urlpatterns = [path("api/v3/", api.urls)]  # type: ignore[attr-defined]
    with override_settings(ROOT_URLCONF=urls):
        client = Client()
        base = "/api/v3/local_qsim_simulator"
        config = client.get(f"{base.replace('local_qsim_simulator', 'qsim')}/get_config")
        assert config.status_code == 200, config.content
        assert config.json()["url"].endswith("/local_qsim_simulator/")
        assert config.json()["backend_name"] == "local_qsim_simulator"
        assert client.get("/api/v3/nosuch/get_config").status_code == 404
        listed = client.get("/api/v3/backends")
        assert [b["display_name"] for b in listed.json()] == ["qsim"]
        status = client.get("/api/v3/qsim/get_backend_status")
        assert status.status_code == 200 and status.json()["operational"] is False
        hadamard = [["h", [0], []], ["measure", [0], []]]
        job = {"experiment_0": {**JOB["experiment_0"], "instructions": hadamard, "shots": 4}}
        posted = client.post(
            "/api/v3/qsim/post_job",
            {"job": json.dumps(job), "token": "alice"},
            content_type="application/json",
        )
        assert posted.status_code == 200, posted.content
        assert posted.json()["status"] == "INITIALIZING"
        job_id = posted.json()["job_id"]
        query = {"job_id": job_id, "token": "alice"}
        assert client.get("/api/v3/qsim/get_job_status", query).json() == posted.json()
        assert client.get("/api/v3/qsim/get_job_result", query).json()["status"] == "INITIALIZING"
        nxt = client.get("/api/v3/qsim/next_job").json()
        assert nxt == {"job_id": job_id, "job_json_path": "jobs/running"}
        result = sqstore.run_simulator(
            sqstore.get_job(store, nxt["job_json_path"], job_id), job_id, "qsim"
        )
        done = sqstore.StatusMsg(job_id, "DONE", "done", "None")
        sqstore.update_in_database(store, result, done, job_id, "qsim")
        served = client.get("/api/v3/qsim/get_job_result", query)
        assert served.status_code == 200, served.content
        assert served.json()["backend_name"] == "local_qsim_simulator"
        assert len(served.json()["results"][0]["data"]["memory"]) == 4
        missing = client.get("/api/v3/qsim/get_job_status", {"job_id": "f" * 24, "token": "a"})
        assert missing.status_code == 406 and missing.json()["status"] == "ERROR"


def test_sqooler_signs_and_verifies_with_sqstore_keys(tmp_path: Path) -> None:
    """sqooler's own signing and verifying helpers work with the keys sqstore makes and returns."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sqooler import security

    store, private, public = signed_local(tmp_path)
    served = sqstore.get_public_key(store, "qsim")
    assert isinstance(served.x, str) and served == public  # text, as the stored JWK has it
    payload = {"job_id": "j1", "status": "DONE", "detail": "ok", "error_message": "None"}
    # sqooler signs with a sqstore private key; sqstore verifies with the key it serves
    theirs = security.sign_payload(payload, private)  # type: ignore[arg-type]
    assert sqstore.verify_doc(theirs.model_dump(), [served]) == payload
    # sqstore signs; sqooler verifies with the key sqstore serves, as is and as its own JWK
    ours = sqstore.sign_doc(payload, private)
    for key in (served, security.JWK.model_validate(served)):
        assert security.JWSDict.model_validate(ours).verify_signature(key)  # type: ignore[arg-type]
        assert security.JWSDict.model_validate(theirs.model_dump()).verify_signature(key)  # type: ignore[arg-type]
    other = sqstore.generate_keypair("qk")[1]
    assert not security.JWSDict.model_validate(ours).verify_signature(other)  # type: ignore[arg-type]
    assert security.public_from_private_jwk(private) == security.JWK.model_validate(served)  # type: ignore[arg-type]
    # sqooler's keys, in every form sqooler code holds them, work where sqstore takes a key
    sq_private, sq_public = security.create_jwk_pair("sk")
    for priv, pub in (
        (sq_private, sq_public),
        (sq_private.model_dump(), sq_public.model_dump()),  # x and d as bytes
        (sq_private.model_dump(mode="json"), sq_public.model_dump(mode="json")),
    ):
        signed = sqstore.sign_doc(payload, priv)
        assert security.JWSDict.model_validate(signed).verify_signature(sq_public)
        assert sqstore.verify_doc(signed, [pub]) == payload
        assert sqstore.public_from_private(priv).x == sq_public.x.decode()
    sqstore.upload_config(
        store, sqstore.demo_config("sqb", sign=True), "sqb", sq_private.model_dump()
    )
    sqstore.upload_public_key(store, sq_public.model_dump(), "sqb")
    assert sqstore.get_public_key(store, "sqb").x == sq_public.x.decode()
    assert security.JWK.model_validate(sqstore.get_public_key(store, "sqb")) == sq_public
    with pytest.raises(sqstore.InvalidDocumentError, match=r"\$\.x"):
        sqstore.from_doc({**sq_public.model_dump(), "x": b"\xff"}, sqstore.JWK)


@pytest.mark.parametrize("make", [cattrs.Converter, cattrs.preconf.json.make_converter])
def test_a_users_own_cattrs_converter_converts_records_after_configure_converter(
    make: Callable[[], cattrs.Converter],
) -> None:
    """Records are also mappings; a stock cattrs converter structures them as mappings until
    configure_converter teaches it to treat them as records."""
    conv = make()
    status = sqstore.StatusMsg("j1", "DONE", "ok", "None")
    result = sqstore.run_simulator(JOB, "j1", "sim")
    with pytest.raises(TypeError):
        conv.structure(conv.unstructure(status), sqstore.StatusMsg)
    sqstore.configure_converter(conv)
    assert conv.structure(conv.unstructure(status), sqstore.StatusMsg) == status
    assert conv.structure(conv.unstructure(result), sqstore.ResultDict) == result


@pytest.mark.parametrize("where", ["experiment", "gate"])
def test_writes_refuse_unknown_fields_inside_tuples_too(where: str) -> None:
    """An unknown field in a nested list is refused whether the list is a list or a tuple
    (a record's own lists are tuples), never dropped silently."""
    store = sqstore.memory_storage()
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    job_id = sqstore.upload_job(store, JOB, "sim", "alice")
    gate = {"name": "x", "wires": [0], "params": []}
    experiment = {"header": {}, "shots": 1, "success": True, "data": {"memory": ["1"]}}
    if where == "gate":
        experiment["data"] = {"memory": ["1"], "instructions": ({**gate, "duration_us": 3},)}
    else:
        experiment["calibration_id"] = "c-17"
    result = {"display_name": "sim", "backend_version": "1", "job_id": job_id, "status": "DONE"}
    with pytest.raises(sqstore.InvalidDocumentError, match=r"duration_us|calibration_id"):
        sqstore.upload_result(store, {**result, "results": (experiment,)}, "sim", job_id)
    assert store["list"]("results/sim") == []


def test_strict_pydantic_validation_takes_a_records_json() -> None:
    """As the README says: strict validation as sqooler's model takes the record's JSON."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sqooler.schemes import BackendConfigSchemaIn
        from sqooler.security import JWK

    store = sqstore.memory_storage()
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    sqstore.timestamp_queue(store, "sim")
    config = sqstore.get_config(store, "sim")
    _, public = sqstore.generate_keypair("k1")
    for model, record in ((BackendConfigSchemaIn, config), (JWK, public)):
        checked = model.model_validate_json(json.dumps(dict(record)), strict=True)
        assert checked.model_dump(mode="json")["display_name" if model is not JWK else "kid"]


def test_a_user_key_cannot_take_a_backends_kid(store: Storage) -> None:
    """User keys live apart from backend keys: a user who publishes a key under the kid a
    signing backend names changes nothing for that backend, which still publishes and signs."""
    bob_private, bob_public = sqstore.generate_keypair("sqsim-key")
    sqstore.upload_config(store, sqstore.demo_config("sqsim", sign=True), "sqsim", bob_private)
    _, mallory = sqstore.generate_keypair("sqsim-key")  # the same kid, her own key
    sqstore.upload_public_key(store, mallory, "mallory", role="user")
    sqstore.upload_public_key(store, bob_public, "sqsim")
    assert sqstore.get_public_key(store, "sqsim") == bob_public
    assert sqstore.get_public_key_from_kid(store, "sqsim-key", role="user") == mallory
    job_id = sqstore.upload_job(store, JOB, "sqsim", "alice")
    sqstore.upload_status(store, "sqsim", "alice", job_id, bob_private)
    got = sqstore.claim_job(store, "sqsim", bob_private)
    assert got is not None
    done = sqstore.StatusMsg(job_id, "DONE", "ok", "None")
    result = sqstore.run_simulator(got[1], job_id, "sqsim")
    sqstore.update_in_database(store, result, done, job_id, "sqsim", bob_private)
    assert sqstore.verify_result(store, "sqsim", job_id)


BOOL_TEXTS = ["false", "False", "0", "no", "off", "f", "N", "true", "1", "YES", "on", "t", "y"]
NOT_BOOLS = [" true", "maybe", "", 2, 0.5, None, [], {}]


@pytest.mark.parametrize("value", [*BOOL_TEXTS, 0, 1, 0.0, 1.0, True, False, *NOT_BOOLS])
def test_a_configs_flags_read_as_sqooler_reads_them(value: Any) -> None:
    """A config's true/false field written by another program (``"sign": "false"``) reads as
    sqooler 0.9's pydantic model reads it, and what that model refuses is refused."""
    from sqooler.schemes import BackendConfigSchemaIn

    doc = {**sqstore.to_doc(sqstore.demo_config("sq")), "sign": value, "simulator": value}
    try:
        model = BackendConfigSchemaIn(**doc)
    except ValueError:  # pydantic's ValidationError
        with pytest.raises(sqstore.InvalidDocumentError, match="sign"):
            sqstore.from_doc(doc, sqstore.BackendConfig)
        return
    config = sqstore.from_doc(doc, sqstore.BackendConfig)
    assert (config.sign, config.simulator) == (model.sign, model.simulator)
    assert type(config.sign) is bool and type(config.simulator) is bool


# Documents as sqooler 0.4-0.8 wrote them, field for field (read from each release's
# schemes.py and storage providers; built here, not copied).  A config is
# BackendConfigSchemaIn.model_dump() in that release's field order: 0.4.0 ends with
# operational, pending_jobs, status_msg (no heartbeat, no signing); 0.6.3 has operational
# before pending_jobs, status_msg, last_queue_check, sign (no kid); 0.8.0 has pending_jobs,
# status_msg, last_queue_check, sign, kid and then the deprecated operational (default True).
# Times are datetime.isoformat() text in files (their datetime_handler) and BSON dates in
# MongoDB; a public key's x is BSON binary in MongoDB (JWK.model_dump()) and text in files
# (JWK.model_dump_json()).  Every release writes statuses as StatusMsgDict.model_dump() and
# results as ResultDict.model_dump(); 0.6 and 0.8 sign them as {header, payload, signature}
# when the config signs.  Local and MongoDB job ids are uuid4().hex[:24] (not time-ordered),
# Dropbox ones YYYYMMDD_HHMMSS-<dn>-<user>-<5 hex>.
OLD_SQOOLERS = ("0.4.0", "0.6.3", "0.8.0")
OLD_CHECK = "2024-05-01T12:00:00+00:00"  # a heartbeat long ago, as datetime.isoformat() wrote it
OLD_GATE = {  # GateInstruction.config_dict(), as Spooler.get_configuration lists each gate
    "coupling_map": [[0], [1]],
    "description": "Evolution under the rotation around x",
    "name": "rlx",
    "parameters": ["omega"],
    "qasm_def": "gate rlx(omega) {}",
}


def old_config(version: str, display_name: str, checked: str | None) -> dict[str, Any]:
    """The config sqooler *version* writes (unsigned), with heartbeat *checked* if it has one."""
    doc: dict[str, Any] = {
        "description": f"a spin simulator configured by sqooler {version}",
        "version": "0.2.1",
        "display_name": display_name,
        "cold_atom_type": "spin",
        "gates": [OLD_GATE],
        "max_experiments": 10,
        "max_shots": 1000,
        "simulator": True,
        "supported_instructions": ["rlx", "measure", "barrier"],
        "num_wires": 2,
        "wire_order": "interleaved",
        "num_species": 1,
    }
    if version == "0.4.0":
        return {**doc, "operational": True, "pending_jobs": None, "status_msg": None}
    if version == "0.6.3":
        doc["operational"] = True
    doc |= {"pending_jobs": None, "status_msg": None, "last_queue_check": checked, "sign": False}
    if version == "0.8.0":
        doc |= {"kid": None, "operational": True}
    return doc


def old_result(display_name: str, job_id: str) -> dict[str, Any]:
    """ResultDict.model_dump() of a finished job, as the 0.6/0.8 Spooler builds it."""
    experiment = {
        "header": {"name": "experiment_0", "extra metadata": "text"},
        "shots": 3,
        "success": True,
        "data": {"memory": ["1 0", "1 0", "0 1"], "instructions": None},
    }
    return {
        "backend_name": None,
        "display_name": display_name,
        "backend_version": "0.2.1",
        "job_id": job_id,
        "qobj_id": None,
        "success": True,
        "status": "DONE",
        "header": {},
        "results": [experiment],
    }


def old_status(job_id: str, status: str = "INITIALIZING") -> dict[str, Any]:
    detail = {"INITIALIZING": "Got your json.", "DONE": "None; Passed json sanity check; done"}
    return {"job_id": job_id, "status": status, "detail": detail[status], "error_message": "None"}


@pytest.fixture(params=backend_params("local", "mongodb", "dropbox"))
def legacy(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Storage, Callable[..., None]]:
    """An sqstore handle, and ``put(kind, name, doc, display_name)`` that stores *doc*
    where and as sqooler 0.4-0.8 stored it: raw files, raw MongoDB documents (random
    ``_id`` for configs and keys, BSON dates and binary), raw Dropbox uploads."""
    if request.param == "local":
        store = sqstore.local_storage(tmp_path / "store")
    elif request.param == "mongodb":
        store = mongo_store(request.getfixturevalue("mongodb_server"))
    else:
        store = request.getfixturevalue("dbx")

    def put(kind: str, name: str, doc: dict[str, Any], display_name: str = "old") -> None:
        path = folder(store, kind, name, display_name)
        file_id = name if kind == "public_keys" else doc_id(store, kind, name, display_name)
        if request.param == "local":
            file = tmp_path / "store" / path / f"{file_id}.json"
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(json.dumps(doc))  # their json.dump: default separators
        elif request.param == "mongodb":
            import bson
            import pymongo

            def bsonify(value: Any, key: str = "") -> Any:
                if isinstance(value, dict):
                    return {k: bsonify(v, k) for k, v in value.items()}
                if key == "last_queue_check" and isinstance(value, str):
                    return datetime.datetime.fromisoformat(value)
                return value.encode() if key == "x" else value

            body = bsonify(doc)
            keyed = kind in ("configs", "public_keys")
            body["_id"] = bson.ObjectId() if keyed else bson.ObjectId(name)
            database, *rest = path.split("/")
            with pymongo.MongoClient(
                mongo_uri(request.getfixturevalue("mongodb_server")), document_class=dict
            ) as c:
                c[database][".".join(rest)].insert_one(body)
        else:  # a status goes to Status/<dn>/None, where sqooler 0.9 and sqstore read it;
            # 0.4-0.8 wrote it under Status/<dn>/<username>, which neither reads
            store["upload"](path, file_id, doc)

    return store, put


def old_job_ids(store: Storage, display_name: str, count: int) -> list[str]:
    """Job ids as sqooler 0.4-0.8 made them for this backend (random on local/MongoDB)."""
    if store["layout"].job_ids == "dated":
        return [f"20240501_1200{i:02d}-{display_name}-alice-{i:05x}" for i in range(count)]
    return [secrets.token_hex(12) for _ in range(count)]


@pytest.mark.parametrize("version", OLD_SQOOLERS)
def test_sqooler_0_4_to_0_8_storage_is_served(
    legacy: tuple[Storage, Callable[..., None]], version: str
) -> None:
    """A storage written by sqooler 0.4-0.8 (config with operational, queued jobs, statuses,
    a result) is read, heartbeaten and served, and its config keeps its unknown fields."""
    store, put = legacy
    checked = None if version == "0.4.0" else OLD_CHECK
    put("configs", "old", old_config(version, "old", checked))
    finished, *queued = old_job_ids(store, "old", 3)
    put("results", finished, old_result("old", finished))
    put("status", finished, old_status(finished, "DONE"))
    for job_id in queued:
        put("queued", job_id, JOB)
        put("status", job_id, old_status(job_id))

    cfg = sqstore.get_config(store, "old")
    assert (cfg.num_wires, cfg.wire_order, cfg.sign, cfg.kid) == (2, "interleaved", False, None)
    assert sqstore.get_backends(store) == ["old"]
    assert sqstore.get_backend_dict(store, "old").basis_gates == ("rlx",)
    status = sqstore.get_backend_status(store, "old")
    assert not status.operational  # no heartbeat for 300 s, whatever 'operational' said
    assert sqstore.get_status(store, "old", "alice", finished).status == "DONE"
    assert sqstore.get_result(store, "old", "alice", finished).results[0].data.memory == (
        "1 0",
        "1 0",
        "0 1",
    )
    assert sqstore.get_status(store, "old", "alice", queued[0]).status == "INITIALIZING"

    assert sqstore.timestamp_queue(store, "old")
    assert sqstore.get_backend_status(store, "old").operational
    nxt = sqstore.get_next_job_in_queue(store, "old")
    assert nxt.job_id in queued
    result = sqstore.run_simulator(JOB, nxt.job_id, "old")
    done = sqstore.StatusMsg(nxt.job_id, "DONE", "ok", "None")
    sqstore.update_in_database(store, result, done, nxt.job_id, "old")
    assert finish(store, "old") == [j for j in queued if j != nxt.job_id]
    for job_id in queued:
        assert sqstore.get_status(store, "old", "alice", job_id).status == "DONE"
        assert sqstore.get_result(store, "old", "alice", job_id).results == result.results

    beaten = sqstore.get_config(store, "old")
    sqstore.update_config(store, attrs.evolve(beaten, description="renamed"), "old")
    raw = store["get"](folder(store, "configs"), doc_id(store, "configs", "", "old"))
    assert raw["operational"] is True and raw["description"] == "renamed"
    assert raw["last_queue_check"] is not None  # the heartbeat, written over 0.4's none
    assert set(raw) == set(sqstore.to_doc(cfg)) | {"operational"}


@pytest.mark.parametrize("version", ["0.6.3", "0.8.0"])
def test_signed_sqooler_0_6_and_0_8_configs_verify_after_sqstore_resigns_them(
    legacy: tuple[Storage, Callable[..., None]], version: str
) -> None:
    """A config signed by sqooler 0.6/0.8 is re-signed by sqstore's heartbeat with its
    unknown fields, and verifies with sqstore and with sqooler 0.9; its signed jobs finish."""
    from sqooler.security import JWK as SqoolerJWK
    from sqooler.security import JWSDict

    store, put = legacy
    private, public = sqstore.generate_keypair("oldkey")
    payload = old_config(version, "old", OLD_CHECK) | {"sign": True}
    if version == "0.8.0":  # 0.8 names the key in the config and publishes it under its kid
        payload["kid"] = "oldkey"
        put("public_keys", "oldkey", sqstore.to_doc(public))
    put("configs", "old", sqstore.sign_doc(payload, private))  # = their sign_payload
    (job_id,) = old_job_ids(store, "old", 1)
    put("queued", job_id, JOB)
    put("status", job_id, sqstore.sign_doc(old_status(job_id), private))

    assert sqstore.get_config(store, "old").sign
    assert sqstore.get_status(store, "old", "alice", job_id).status == "INITIALIZING"
    assert sqstore.timestamp_queue(store, "old", private)
    raw = store["get"](folder(store, "configs"), doc_id(store, "configs", "", "old"))
    assert sqstore.verify_doc(raw, [public])["operational"] is True
    assert raw["payload"]["kid"] == "oldkey" and raw["payload"]["last_queue_check"] > OLD_CHECK
    assert JWSDict(**raw).verify_signature(SqoolerJWK(**sqstore.to_doc(public)))

    sqstore.upload_public_key(store, public, "old")  # a no-op for 0.8; 0.6 kept keys by name
    assert finish(store, "old", private) == [job_id]
    assert sqstore.verify_result(store, "old", job_id)
    assert sqstore.get_status(store, "old", "alice", job_id).status == "DONE"
    sqstore.update_config(store, sqstore.get_config(store, "old"), "old", private)
    raw = store["get"](folder(store, "configs"), doc_id(store, "configs", "", "old"))
    assert sqstore.verify_doc(raw, [public])["operational"] is True


def test_unknown_fields_of_any_stored_document_are_read_and_kept(store: Storage) -> None:
    """Unknown fields in a config, status, result, key or lease (a newer program's) do not
    stop a read, and sqstore's rewrites of a config or a lease keep them."""
    new = {"written_by": "sqstore 9", "extras": {"nested": [1, 2]}}
    private, public = sqstore.generate_keypair("simkey")
    cfg = attrs.evolve(sqstore.demo_config("sim"), kid="simkey")
    store["upload"](
        folder(store, "configs"),
        doc_id(store, "configs", "", "sim"),
        {**sqstore.to_doc(cfg), **new},
    )
    store["upload"](folder(store, "public_keys"), "simkey", {**sqstore.to_doc(public), **new})
    assert sqstore.get_config(store, "sim") == cfg
    assert sqstore.get_public_key(store, "sim") == public

    job_id = sqstore.upload_job(store, JOB, "sim", "alice")
    status = sqstore.StatusMsg(job_id, "INITIALIZING", "Got your json.", "None")
    store["upload"](*place(store, "status", job_id), {**sqstore.to_doc(status), **new})
    assert sqstore.get_status(store, "sim", "alice", job_id) == status
    claimed = sqstore.claim_job(store, "sim", policy=sqstore.LeasePolicy(holder="bob"))
    assert claimed is not None
    lease_place = folder(store, "leases"), job_id
    lease = store["get"](*lease_place)
    assert store["swap"](*lease_place, lease, {**lease, **new})
    sqstore.renew_lease(store, job_id, policy=sqstore.LeasePolicy(holder="bob"))
    assert store["get"](*lease_place)["written_by"] == "sqstore 9"
    result = sqstore.run_simulator(JOB, job_id, "sim")
    done = sqstore.StatusMsg(job_id, "DONE", "ok", "None")
    sqstore.update_in_database(
        store, result, done, job_id, "sim", policy=sqstore.LeasePolicy(holder="bob")
    )
    res_doc = store["get"](*place(store, "results", job_id))
    store["update"](*place(store, "results", job_id), {**res_doc, **new})
    assert sqstore.get_result(store, "sim", "alice", job_id).results == result.results

    sqstore.timestamp_queue(store, "sim")
    sqstore.update_config(store, cfg, "sim")
    raw = store["get"](folder(store, "configs"), doc_id(store, "configs", "", "sim"))
    assert {k: raw[k] for k in new} == new and raw["last_queue_check"] is None
    sqstore.update_config(store, attrs.evolve(cfg, sign=True), "sim", private)
    raw = store["get"](folder(store, "configs"), doc_id(store, "configs", "", "sim"))
    assert {k: sqstore.verify_doc(raw, [public])[k] for k in new} == new


CFG = sqstore.demo_config("sim")
RES = sqstore.run_simulator(JOB, "j1", "sim")


def nested_extra(result: sqstore.ResultDict) -> dict[str, Any]:
    doc = sqstore.to_doc(result)
    doc["results"][0]["data"]["counts"] = {"1": 5}
    return doc


@pytest.mark.parametrize(
    "call",
    [
        lambda s: sqstore.upload_config(s, {**sqstore.to_doc(CFG), "operational": True}, "sim"),
        lambda s: sqstore.update_config(s, {**sqstore.to_doc(CFG), "operational": True}, "sim"),
        lambda s: sqstore.upload_result(s, {**sqstore.to_doc(RES), "date": "today"}, "sim", "j1"),
        lambda s: sqstore.upload_result(s, nested_extra(RES), "sim", "j1"),
        lambda s: sqstore.update_in_database(
            s,
            RES,
            {**sqstore.to_doc(sqstore.StatusMsg("j1", "DONE", "", "")), "priority": 1},
            "j1",
            "sim",
        ),
    ],
    ids=["upload_config", "update_config", "upload_result", "nested", "status"],
)
def test_writes_refuse_unknown_fields(tmp_path: Path, call: Callable[[Storage], Any]) -> None:
    """What sqstore writes stays strict: a document given with a field sqstore does not
    know is refused with an InvalidDocumentError naming it, and nothing is written."""
    store = sqstore.local_storage(tmp_path / "store")
    sqstore.upload_config(store, CFG, "sim")
    before = tree(tmp_path)
    with pytest.raises(
        sqstore.InvalidDocumentError,
        match=r"unknown field.*\$\.(operational|date|results\[0\]\.data\.counts|priority)",
    ):
        call(store)
    assert tree(tmp_path) == before


# sqooler's 32 provider methods, the migration guide and a ported spooler, run against sqooler.
def sqooler_provider_methods() -> dict[str, list[Any]]:
    """sqooler 0.9's public provider methods: name -> their signatures (without ``self``).

    Read from ``StorageProvider`` and every concrete provider (local, MongoDB, Dropbox).
    """
    import inspect
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sqooler.storage_providers import base
        from sqooler.storage_providers import dropbox as sq_dropbox
        from sqooler.storage_providers import local as sq_local
        from sqooler.storage_providers import mongodb as sq_mongodb
    methods: dict[str, list[inspect.Signature]] = {}
    for module in (base, sq_local, sq_mongodb, sq_dropbox):
        for cls in vars(module).values():
            if not (inspect.isclass(cls) and issubclass(cls, base.StorageProvider)):
                continue
            for name, func in inspect.getmembers(cls, inspect.isfunction):
                if not name.startswith("_"):
                    sig = inspect.signature(func)
                    params = list(sig.parameters.values())[1:]
                    methods.setdefault(name, []).append(sig.replace(parameters=params))
    return methods


def readme_section(heading: str) -> str:
    """The text of README.md from *heading* to the next heading of its level or above."""
    text = (HERE / "README.md").read_text()
    start = text.index(f"\n{heading}\n")
    level = heading.split(" ")[0]
    ends = [text.find(f"\n{'#' * n} ", start + 1) for n in range(1, len(level) + 1)]
    return text[start : min([e for e in ends if e != -1] or [len(text)])]


def readme_mapping() -> dict[str, tuple[str, str]]:
    """The README's table of sqooler's CRUD verbs: name -> (sqooler call, sqstore code)."""
    rows = re.findall(
        r"^\| `provider\.(\w+)\(([^`]*)\)` \| `([^`]+)`",
        readme_section("## Compatibility with sqooler 0.9"),
        re.M,
    )
    return {name: (args, code) for name, args, code in rows}


def test_every_sqooler_provider_method_is_offered_or_mapped(sqooler: Any) -> None:
    """Each sqooler 0.9 provider method is sqstore.f(store, *its params) or in the README table."""
    import inspect

    methods = sqooler_provider_methods()
    table = readme_mapping()
    offered = {name for name in methods if name in sqstore.__all__}
    assert len(methods) == 32
    assert offered.isdisjoint(table) and offered | set(table) == set(methods), sorted(
        set(methods) - offered - set(table)
    )
    for name in sorted(offered):
        ours = list(inspect.signature(getattr(sqstore, name)).parameters.values())
        assert ours[0].name == "store", name
        for sig in methods[name]:
            theirs = list(sig.parameters.values())
            shape = [(p.name, p.kind, p.default) for p in theirs]
            assert [(p.name, p.kind, p.default) for p in ours[1 : len(theirs) + 1]] == shape, name
            assert all(p.default is not p.empty for p in ours[len(theirs) + 1 :]), name
    for name, (args, _) in table.items():  # the table quotes sqooler's own parameter names
        for sig in methods[name]:
            assert args == ", ".join(sig.parameters), name
    claim = readme_section("## The API at a glance")
    assert f"{len(offered)} of the {len(methods)} public methods" in claim
    assert f"the other {len(table)}" in claim


def test_sqooler_crud_verbs_map_to_the_handle_as_the_readme_says(
    shared: tuple[Any, Storage],
) -> None:
    """Each row of the README's CRUD table does on sqstore's handle what sqooler's verb does."""
    sqooler, store = shared
    table = readme_mapping()
    queue, running = folder(store, "queued", display_name="sq"), store["layout"].running
    ids = [doc_id(store, "queued", sqstore.create_job_id(store, "sq", "alice")) for _ in range(3)]
    first, second = {"experiment_0": {"shots": 1}}, {"experiment_0": {"shots": 2}}

    def run(name: str, **names: Any) -> Any:
        """Run the sqstore column of the README's row *name* with sqooler's argument names."""
        return eval(table[name][1], {"json": json, "store": store, **names})

    run("upload", content_dict=first, storage_path=queue, job_id=ids[0])
    assert sqooler.get(queue, ids[0]) == first
    sqooler.upload(second, queue, ids[1])
    assert run("get", storage_path=queue, job_id=ids[1]) == second == sqooler.get(queue, ids[1])
    run("update", content_dict=second, storage_path=queue, job_id=ids[0])
    assert sqooler.get(queue, ids[0]) == second
    run("move", start_path=queue, final_path=running, job_id=ids[0])
    assert sqooler.get(running, ids[0]) == second
    with pytest.raises(FileNotFoundError):
        sqooler.get(queue, ids[0])
    run("delete", storage_path=running, job_id=ids[0])
    with pytest.raises(FileNotFoundError):
        sqooler.get(running, ids[0])
    run("upload_string", content_string=json.dumps(first), storage_path=queue, job_id=ids[2])
    assert sqooler.get(queue, ids[2]) == first
    run("delete_folder", folder_path=queue)
    assert sqooler.get_file_queue(queue) == [] == store["list"](queue)


def test_sqooler_high_level_methods_agree_with_sqooler(shared: tuple[Any, Storage]) -> None:
    """get_file_queue, get_attribute_path/_id, long_backend_name, the Qiskit views match sqooler."""
    from sqooler.schemes import BackendConfigSchemaIn

    sqooler, store = shared
    assert store["name"] == sqooler.name
    config = sqstore.demo_config("sq")
    sqstore.upload_config(store, config, "sq")
    job_ids = [sqooler.upload_job(JOB, "sq", "alice") for _ in range(2)]
    job_ids.append(sqstore.upload_job(store, JOB, "sq", "alice"))
    for job_id in job_ids:
        sqooler.upload_status("sq", "alice", job_id)
    nxt = sqstore.get_next_job_in_queue(store, "sq")
    sqstore.update_in_database(
        store,
        sqstore.run_simulator(JOB, nxt.job_id, "sq"),
        sqstore.StatusMsg(nxt.job_id, "DONE", "ok", "None"),
        nxt.job_id,
        "sq",
    )

    queue = sqooler.get_attribute_path("queue", "sq")
    assert sqstore.get_file_queue(store, queue) == sorted(sqooler.get_file_queue(queue))
    assert len(sqstore.get_file_queue(store, queue)) == 2
    assert sqstore.get_file_queue(store, "jobs/queued/nobody") == []
    done = nxt.job_id
    wheres: list[tuple[str, str | None, dict[str, Any]]] = [
        ("queue", "job", {"display_name": "sq"}),
        ("running", None, {}),
        ("finished", "job", {"display_name": "sq", "job_id": done, "username": "alice"}),
        ("deleted", None, {"display_name": "sq"}),
        ("status", "status", {"display_name": "sq"}),
        ("results", "results", {"display_name": "sq", "job_id": done}),
        ("configs", "configs", {"display_name": "sq"}),
        ("pks", None, {}),
    ]
    for attribute, kind, names in wheres:
        theirs = sqooler.get_attribute_path(attribute, **names)
        ours = sqstore.get_attribute_path(store, attribute, **names)
        if store["name"] != "dropbox":  # the same string on a directory and on MongoDB
            assert ours == theirs, attribute
        if kind is None:
            continue
        job_id = next(j for j in job_ids if j != done) if attribute == "queue" else done
        our_id = sqstore.get_attribute_id(store, kind, job_id, display_name="sq")
        if kind == "configs" and store["name"] == "mongodb":
            with pytest.raises(ValueError):  # sqooler finds MongoDB configs by a query instead
                sqooler.get_attribute_id(kind, job_id, display_name="sq")
            assert store["get"](ours, our_id)["display_name"] == "sq"
            continue
        their_id = sqooler.get_attribute_id(kind, job_id, display_name="sq")
        if store["name"] != "dropbox":
            assert our_id == their_id, attribute
        assert store["get"](ours, our_id) == sqooler.get(theirs, their_id), attribute
    with pytest.raises(ValueError):
        sqstore.get_attribute_path(store, "job", "sq")
    with pytest.raises(ValueError):
        sqstore.get_attribute_id(store, "queue", done)

    for simulator in (True, False):
        assert sqstore.long_backend_name(store, "sq", simulator) == sqooler.long_backend_name(
            "sq", simulator
        )
    theirs_in = BackendConfigSchemaIn(**sqstore.to_doc(config))
    ours_out = sqstore.backend_dict_to_qiskit(store, config)
    assert sqstore.to_doc(ours_out) == sqooler.backend_dict_to_qiskit(theirs_in).model_dump()
    assert sqstore.backend_dict_to_qiskit(store, theirs_in) == ours_out
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    for age in (0, 3600):
        stamped = attrs.evolve(config, last_queue_check=now - datetime.timedelta(seconds=age))
        theirs_status = sqooler.backend_dict_to_qiskit_status(
            BackendConfigSchemaIn(**sqstore.to_doc(stamped))
        )
        ours_status = sqstore.backend_dict_to_qiskit_status(store, stamped)
        assert sqstore.to_doc(ours_status) == theirs_status.model_dump()
        assert ours_status.operational is (age == 0)


def test_readme_frozen_records_guide_runs() -> None:
    """The guide's replacements run, and each sqooler line it quotes fails on sqstore's records."""
    code = readme_block("### Records are frozen", "python")
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    status, result = namespace["status"], namespace["result"]
    assert (status.status, status.detail) == ("DONE", "Got your json.; done")
    assert [e.shots for e in result.results] == [3, 2, 1]
    quoted = re.findall(r"# sqooler: (.+)", code)
    assert len(quoted) >= 2
    for line in quoted:
        with pytest.raises(AttributeError):
            exec(line.split(", ")[0] if "append" in line else line, namespace)
    assert sqstore.from_doc(sqstore.to_doc(result), sqstore.ResultDict) == result


# A lab's spooler, as sqooler 0.9 has labs write it: gates as pydantic models, gen_circuit.
# The executor fails on 13 shots (a RuntimeError, which sqooler's add_job does not catch).
LAB_SPOOLER = """
from typing import Literal

from pydantic import BaseModel
from sqooler.schemes import ExperimentDict, GateInstruction
from sqooler.spoolers import Spooler


class XInstruction(GateInstruction):
    name: Literal["x"] = "x"
    wires: list[int]
    params: list[float] = []
    parameters: str = ""
    description: str = "Pauli X"
    coupling_map: list = [[0]]


class MeasureInstruction(BaseModel):
    name: Literal["measure"]
    wires: list[int]
    params: list[float]


class LabExperiment(BaseModel):
    instructions: list[list]
    num_wires: Literal[1]
    shots: int
    wire_order: str


def gen_circuit(name, experiment):
    if experiment.shots == 13:
        raise RuntimeError("the laser is off")
    flips = sum(gate.name == "x" for gate in experiment.instructions) % 2
    memory = [str(flips)] * experiment.shots
    return ExperimentDict(header={"name": name}, shots=experiment.shots, success=True,
                          data={"memory": memory})


spooler_object = Spooler(
    ins_schema_dict={"x": XInstruction, "measure": MeasureInstruction},
    device_config=LabExperiment,
    n_wires=1,
    description="A one-qubit lab",
    n_max_shots=100,
    version="1.0",
    wire_order="sequential",
    sign=True,
)
spooler_object.gen_circuit = gen_circuit
"""


def lab_jobs(sqooler: Any) -> dict[str, str]:
    """sqooler's Alice submits three jobs (good, rejected by the spooler, failing): id -> kind."""
    bad = {"experiment_0": {**JOB["experiment_0"], "instructions": [["h", [0], []]]}}
    failing = {"experiment_0": {**JOB["experiment_0"], "shots": 13}}
    kinds = {}
    for kind, job in (("good", JOB), ("rejected", bad), ("failing", failing)):
        job_id = sqooler.upload_job(job, "lab", "alice")
        sqooler.upload_status("lab", "alice", job_id)
        kinds[job_id] = kind
    return kinds


def check_lab_jobs(sqooler: Any, kinds: dict[str, str]) -> None:
    """sqooler's Alice sees the good job DONE with a verified result, the others ERROR."""
    for job_id, kind in kinds.items():
        status = sqooler.get_status("lab", "alice", job_id)
        assert status.status == ("DONE" if kind == "good" else "ERROR"), (kind, status)
        if kind == "good":
            assert sqooler.get_result("lab", "alice", job_id).results[0].data.memory == ["1"] * 5
            assert sqooler.verify_result("lab", job_id)
        elif kind == "rejected":
            assert "Instruction h not allowed" in status.error_message
        else:
            assert "RuntimeError: the laser is off" in status.error_message
    assert sqooler.get_backend_status("lab").operational


def lab_key_env(monkeypatch: pytest.MonkeyPatch) -> sqstore.JWK:
    """A fresh key for the lab, put in PRIVATE_JWK_STR as sqooler's spoolers read it."""
    private, _ = sqstore.generate_keypair("labkey")
    text = json.dumps(sqstore.to_doc(private)).encode()
    monkeypatch.setenv("PRIVATE_JWK_STR", base64.urlsafe_b64encode(text).decode())
    return private


def test_readme_ported_spooler_loop_serves_a_sqooler_frontend(
    shared: tuple[Any, Storage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's port of sqooler's main loop serves sqooler 0.9's Alice on one storage."""
    sqooler, store = shared
    lab_key_env(monkeypatch)
    namespace: dict[str, Any] = {}
    exec(compile(LAB_SPOOLER, "labspooler.py", "exec", dont_inherit=True), namespace)
    exec(
        compile(readme_block("### The main loop, ported", "python"), "README.md", "exec"), namespace
    )
    backends = {"lab": namespace["spooler_object"]}
    namespace["publish"](store, backends)
    namespace["publish"](store, backends)  # a restart: update_config, the same key again
    kinds = lab_jobs(sqooler)
    namespace["serve"](store, backends, num_iter=4, wait=0.0)
    check_lab_jobs(sqooler, kinds)
    assert jobs_in(store, "leases") == [] and sqstore.get_file_queue(store, "jobs/running") == []


@pytest.mark.slow
def test_readme_sqooler_spooler_under_sqstore_work(
    sqooler: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's executor runs a sqooler Spooler under `sqstore work` for sqooler's Alice."""
    from sqooler.utils import update_backends

    private = lab_key_env(monkeypatch)
    namespace: dict[str, Any] = {}
    exec(compile(LAB_SPOOLER, "labspooler.py", "exec", dont_inherit=True), namespace)
    update_backends(sqooler, {"lab": namespace["spooler_object"]})  # sqooler publishes
    kinds = lab_jobs(sqooler)
    (tmp_path / "labspooler.py").write_text(LAB_SPOOLER)
    (tmp_path / "labwork.py").write_text(readme_block("### Keeping sqooler's Spooler", "python"))
    (tmp_path / "lab.jwk").write_text(json.dumps(sqstore.to_doc(private)))
    *setup, command = readme_block("### Keeping sqooler's Spooler", "sh").strip().splitlines()
    assert setup[-1] == ". .venv/bin/activate" and command.startswith("sqstore work ")
    argv = [sys.executable, "-m", "sqstore", *command.split()[1:], "--max-jobs", "3"]
    env = {**os.environ, "PYTHONPATH": str(HERE), "SQSTORE_STORAGE": str(tmp_path / "store")}
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    check_lab_jobs(sqooler, kinds)
    for job_id, kind in kinds.items():  # the statuses are work()'s own, as the README says
        status = sqooler.get_status("lab", "alice", job_id)
        if kind == "good":
            assert status.detail == "The job is done."
        else:
            assert status.detail == "The executor failed."
            assert status.error_message.startswith("RuntimeError: ")


# ============================================================================
# Storage URLs and layers
# ============================================================================
DROPBOX_ENV = (
    "SQSTORE_DROPBOX_APP_KEY",
    "SQSTORE_DROPBOX_APP_SECRET",
    "SQSTORE_DROPBOX_REFRESH_TOKEN",
)


@pytest.fixture
def dropbox_env(dropbox_fake: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The fake's credentials in the environment, and the SDK's sessions aimed at the fake."""
    import dropbox.dropbox_client

    dropbox_fake.reset()
    monkeypatch.setattr(
        dropbox.dropbox_client, "create_session", lambda *a, **k: dropbox_fake.session()
    )
    monkeypatch.delenv("SQSTORE_DROPBOX_CREDENTIALS", raising=False)
    for name, value in zip(
        DROPBOX_ENV,
        (dropbox_fake.app_key, dropbox_fake.app_secret, dropbox_fake.refresh_token),
        strict=True,
    ):
        monkeypatch.setenv(name, value)
    return dropbox_fake


@pytest.mark.slow
def test_open_storage_names_each_backend(tmp_path: Path, dropbox_env: Any) -> None:
    """Each URL form opens the backend it names; dropbox:// takes sqooler's Dropbox layout."""
    assert sqstore.open_storage(str(tmp_path / "a"))["name"] == "local"
    file_store = sqstore.open_storage(f"file://{urllib.parse.quote(str(tmp_path / 'a b'))}")
    file_store["upload"]("f/g", "x", {"v": 1})
    assert (tmp_path / "a b" / "f" / "g" / "x.json").exists()
    assert sqstore.open_storage("memory://")["name"] == "memory"
    dbx = sqstore.open_storage("dropbox://")
    assert (dbx["name"], dbx["layout"]) == ("dropbox", sqstore.DROPBOX_LAYOUT)
    dbx["upload"]("f", "x", {"v": 2})
    assert json.loads(dropbox_env.files()["/f/x.json"]) == {"v": 2}
    for bad, message in (("ftp://h/x", "unknown storage scheme"), ("file://rel", "absolute")):
        with pytest.raises(ValueError, match=message):
            sqstore.open_storage(bad)


@pytest.mark.slow
def test_dropbox_url_takes_credentials_from_a_file_named_by_the_environment(
    tmp_path: Path, dropbox_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$SQSTORE_DROPBOX_CREDENTIALS names a JSON file; missing fields are named, not shown."""
    for name in DROPBOX_ENV:
        monkeypatch.delenv(name)
    with pytest.raises(sqstore.CredentialsError, match="SQSTORE_DROPBOX_REFRESH_TOKEN"):
        sqstore.open_storage("dropbox://")
    creds = tmp_path / "dropbox.json"
    monkeypatch.setenv("SQSTORE_DROPBOX_CREDENTIALS", str(creds))
    with pytest.raises(sqstore.CredentialsError, match="cannot read"):
        sqstore.open_storage("dropbox://")
    creds.write_text(json.dumps({"app_key": dropbox_env.app_key, "app_secret": "s3cr3t-v"}))
    with pytest.raises(sqstore.CredentialsError, match="refresh_token") as info:
        sqstore.open_storage("dropbox://")
    assert "s3cr3t-v" not in str(info.value)
    creds.write_text(
        json.dumps(
            {
                "app_key": dropbox_env.app_key,
                "app_secret": dropbox_env.app_secret,
                "refresh_token": dropbox_env.refresh_token,
            }
        )
    )
    store = sqstore.open_storage("dropbox://")
    store["upload"]("f", "y", {"v": 3})
    assert store["get"]("f", "y") == {"v": 3}


@pytest.mark.slow
def test_dropbox_url_never_carries_or_repeats_a_token(dropbox_env: Any) -> None:
    """A token put into the URL is refused, and the error does not repeat it."""
    for url in ("dropbox://sl.SECRETTOKEN", "dropbox://user:sl.SECRETTOKEN@", "dropbox:///x"):
        with pytest.raises(ValueError, match="just dropbox://") as info:
            sqstore.open_storage(url)
        assert "SECRETTOKEN" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "logged"),
    [
        ("mongodb://bob:pw%40x@h1,h2/db?replicaSet=r", "mongodb://bob:***@h1,h2/db?replicaSet=r"),
        ("mongodb+srv://token@cluster/", "mongodb+srv://***@cluster/"),
        ("mongodb://h/?authSource=a&tlsCertificateKeyFilePassword=pw", "mongodb://h/?authSource=a&tlsCertificateKeyFilePassword=***"),
        ("/srv/exchange", "/srv/exchange"),
        ("dropbox://", "dropbox://"),
    ],
)  # fmt: skip
def test_redact_url(url: str, logged: str) -> None:
    """Passwords, bare tokens and secret query values become ***; the rest stays readable."""
    assert sqstore.redact_url(url) == logged


@given(
    user=st.text("abcdefgh", min_size=1, max_size=8),
    password=st.text("0123456789XYZ%-._~!$&'()*+,;=/:@?#", min_size=6, max_size=24),
    query=st.sampled_from(["", "?authSource=admin", "?tls=true&tlsCertificateKeyFilePassword=p"]),
)
def test_redact_url_hides_any_password(user: str, password: str, query: str) -> None:
    """No password, whatever its characters, survives redact_url."""
    url = f"mongodb://{user}:{password}@db1:27017,db2/lab{query}"
    logged = sqstore.redact_url(url)
    assert password not in logged and logged.startswith(f"mongodb://{user}:***@db1:27017,db2/lab")


@pytest.mark.slow
def test_cli_never_prints_a_password_or_token(
    tmp_path: Path, dropbox_env: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Failing commands on MongoDB and Dropbox URLs say what failed, never the secret."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    secret = "pw-" + secrets.token_hex(8)
    url = f"mongodb://bob:{secret}@127.0.0.1:{port}/?serverSelectionTimeoutMS=300"
    demo = run_cli("--storage", url, "demo", "--key", str(tmp_path / "k.jwk"), cwd=tmp_path)
    bench = run_cli("--storage", url, "bench", "--jobs", "1", "--repeats", "1", cwd=tmp_path)
    for proc in (demo, bench):
        assert proc.returncode == 1 and "cannot reach MongoDB" in proc.stderr, proc.stderr
    bad_uri = run_cli("--storage", f"mongodb://bob:{secret}@h:port/", "backends", cwd=tmp_path)
    assert bad_uri.returncode == 1 and "bad MongoDB URI" in bad_uri.stderr
    outputs = [proc.stdout + proc.stderr for proc in (demo, bench, bad_uri)]
    dropbox_env.revoke_refresh_token()
    try:
        assert sqstore.main(["--storage", "dropbox://", "backends"]) == 1
        assert sqstore.main(["--storage", "dropbox://", "queue", "sim"]) == 1
    finally:
        dropbox_env.revoke_refresh_token(False)
    out, err = capsys.readouterr()
    assert "refresh token" in err
    outputs += [out + err, repr(sqstore.open_storage("dropbox://"))]
    layered = sqstore.stack(sqstore.open_storage("dropbox://"), sqstore.with_logging)
    outputs.append(repr(layered) + str(layered))
    for text in outputs:
        assert secret not in text and dropbox_env.refresh_token not in text
        assert dropbox_env.app_secret not in text


@pytest.mark.slow
def test_cli_commands_take_a_storage_url(
    tmp_path: Path, dropbox_env: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every storage command runs on dropbox:// (and memory://) as on a directory."""
    assert sqstore.main(["--storage", "memory://", "demo", "--jobs", "2"]) == 0
    key = tmp_path / "demo.jwk"
    assert sqstore.main(["--storage", "dropbox://", "demo", "--jobs", "1", "--key", str(key)]) == 0
    assert key.exists() and key.stat().st_mode & 0o777 == 0o600
    store = sqstore.open_storage("dropbox://")
    assert sqstore.get_backends(store) == ["sqsim"]
    (tmp_path / "job.json").write_text(json.dumps(JOB))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SQSTORE_STORAGE", "dropbox://")
        assert sqstore.main(["submit", "sqsim", str(tmp_path / "job.json")]) == 0
    (job_id,) = store["list"]("Backend_files/Queued_Jobs/sqsim")
    job_id = job_id.removeprefix("job-")
    for args, expected in (
        (["queue", "sqsim"], job_id),
        (["backends"], "sqsim"),
        (["status", "sqsim", job_id], '"INITIALIZING"'),
    ):
        assert sqstore.main(["--storage", "dropbox://", *args]) == 0
        assert expected in capsys.readouterr().out
    assert sqstore.main(["--storage", "dropbox://", "result", "sqsim", job_id]) == 1  # not run
    assert "has no result yet" in capsys.readouterr().err
    statuses = store["list"]("Backend_files/Status/sqsim/None")
    (demo_job,) = {name.removeprefix("status-") for name in statuses} - {job_id}
    assert sqstore.main(["--storage", "dropbox://", "verify", "sqsim", demo_job]) == 0


def flaky(store: Storage, failures: dict[str, int], *, after: bool = False) -> Storage:
    """*store* whose ops raise TransientError their first *failures[op]* times (after doing it)."""

    def wrap(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            if failures.get(op, 0) > 0:
                failures[op] -= 1
                if after:
                    fn(*args)  # done, but the answer is lost
                raise sqstore.TransientError(f"{op}: flaky")
            return fn(*args)

        return call

    return sqstore.wrap_ops(store, wrap)


def test_read_only_refuses_every_write_and_sends_nothing(local: Storage, tmp_path: Path) -> None:
    """read_only: reads pass; every write raises ReadOnlyError naming the path, sends nothing."""
    local["upload"]("f/a", "x", {"v": 1})
    before = tree(tmp_path / "store")
    ro = sqstore.read_only(local)
    assert ro["get"]("f/a", "x") == {"v": 1} and ro["list"]("f/a") == ["x"]
    for call in (
        lambda: ro["upload"]("f/a", "y", {}),
        lambda: ro["update"]("f/a", "x", {}),
        lambda: ro["move"]("f/a", "f/b", "x"),
        lambda: ro["delete"]("f/a", "x"),
        lambda: sqstore.upload_job(ro, JOB, "sim", "alice"),
    ):
        with pytest.raises(sqstore.ReadOnlyError, match="read-only") as info:
            call()
        assert isinstance(info.value, PermissionError)
    with pytest.raises(sqstore.ReadOnlyError, match="f/a/x -> f/b"):
        ro["move"]("f/a", "f/b", "x")
    assert tree(tmp_path / "store") == before


def test_with_retry_retries_reads_only_by_default() -> None:
    """A read failing twice transiently succeeds on the third attempt; writes are not repeated."""
    sleeps: list[float] = []
    failures = {"get": 2, "list": 2, "upload": 1}
    store = sqstore.with_retry(flaky(sqstore.memory_storage(), failures), sleep=sleeps.append)
    with pytest.raises(sqstore.TransientError):
        store["upload"]("f", "x", {"v": 1})
    store["upload"]("f", "x", {"v": 1})
    assert store["get"]("f", "x") == {"v": 1} and store["list"]("f") == ["x"]
    assert sleeps == [0.2, 0.4, 0.2, 0.4]
    failures["get"] = 3
    with pytest.raises(sqstore.TransientError):
        store["get"]("f", "x")


def test_with_retry_repeats_writes_only_where_safe() -> None:
    """A lost answer to upload/delete/update is retried and counts as done; move never is."""
    inner = sqstore.memory_storage()
    failures = {"upload": 1, "delete": 1, "update": 1}
    ops = ("upload", "update", "delete")
    store = sqstore.with_retry(flaky(inner, failures, after=True), ops=ops, sleep=lambda s: None)
    store["upload"]("f", "x", {"v": 1})  # stored, answer lost, retried: finds its own document
    store["update"]("f", "x", {"v": 2})
    assert inner["get"]("f", "x") == {"v": 2}
    store["delete"]("f", "x")  # deleted, answer lost, retried: finds nothing
    assert inner["list"]("f") == []
    inner["upload"]("f", "y", {"theirs": 1})
    failures["upload"] = 1
    with pytest.raises(sqstore.AlreadyExistsError):  # someone else's document is not ours
        sqstore.with_retry(flaky(inner, failures), ops=ops, sleep=lambda s: None)["upload"](
            "f", "y", {"ours": 1}
        )
    assert inner["get"]("f", "y") == {"theirs": 1}
    with pytest.raises(sqstore.NotFoundError):  # a first-attempt NotFound is the caller's
        store["delete"]("f", "nope")
    for bad in (("move",), ("get", "frob")):
        with pytest.raises(ValueError, match="cannot repeat"):
            sqstore.with_retry(inner, ops=bad)


def test_with_retry_counts_a_swap_whose_answer_was_lost_as_done() -> None:
    """A swap applied but answered with a TransientError is retried and returns True when it
    finds its new document (or nothing, deleting); a swap someone else won stays False."""
    inner = sqstore.memory_storage()
    failures = {"swap": 1}
    store = sqstore.with_retry(
        flaky(inner, failures, after=True), ops=("swap",), sleep=lambda s: None
    )
    inner["upload"]("f", "x", {"v": 1})
    assert store["swap"]("f", "x", {"v": 1}, {"v": 2}) is True
    assert inner["get"]("f", "x") == {"v": 2}
    failures["swap"] = 1
    assert store["swap"]("f", "x", {"v": 2}, None) is True
    assert inner["list"]("f") == []
    inner["upload"]("f", "y", {"v": 1})
    failures["swap"] = 1
    lost = sqstore.with_retry(flaky(inner, failures), ops=("swap",), sleep=lambda s: None)
    inner["update"]("f", "y", {"v": 7})  # another worker's change before the retried swap
    assert lost["swap"]("f", "y", {"v": 1}, {"v": 2}) is False
    assert inner["get"]("f", "y") == {"v": 7}
    with pytest.raises(sqstore.ReadOnlyError):
        sqstore.read_only(inner)["swap"]("f", "y", {"v": 7}, None)


SWAP_HOLDING_THE_LOCK = """
import fcntl, os, sys, time
fd = os.open(os.path.join(sys.argv[1], ".sqstore.lock"), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(600)
"""


@contextlib.contextmanager
def child_running(script: str, arg: str, ready: str) -> Iterator[subprocess.Popen[str]]:
    """Run ``python -c script arg`` until the block ends (then SIGKILL it), from the moment
    it prints the line *ready*."""
    child = subprocess.Popen([sys.executable, "-c", script, arg], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == ready + "\n"
        yield child
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


@pytest.mark.slow
def test_local_swap_waits_for_the_lock_and_a_dead_holder_releases_it(
    local: Storage, tmp_path: Path
) -> None:
    """A local swap waits while another process holds the folder's lock, and goes through
    once that process is SIGKILLed: the kernel releases the lock of a dead holder."""
    local["upload"]("jobs/leases", "j1", {"holder": "a"})
    outcome: list[bool] = []
    with child_running(SWAP_HOLDING_THE_LOCK, str(tmp_path / "store/jobs/leases"), "locked"):
        swapper = threading.Thread(
            target=lambda: outcome.append(
                local["swap"]("jobs/leases", "j1", {"holder": "a"}, {"holder": "b"})
            )
        )
        swapper.start()
        swapper.join(0.5)
        assert swapper.is_alive() and outcome == [], "the swap must wait for the lock"
        assert local["get"]("jobs/leases", "j1") == {"holder": "a"}
    swapper.join(30)  # the holder is SIGKILLed as the block ends
    assert outcome == [True]
    assert local["get"]("jobs/leases", "j1") == {"holder": "b"}


def test_with_logging_logs_one_line_per_operation(caplog: pytest.LogCaptureFixture) -> None:
    """One line per call with the store, verb, path, time and outcome; never the document."""
    store = sqstore.with_logging(sqstore.memory_storage("mem"))
    with caplog.at_level("DEBUG", logger="sqstore"):
        store["upload"]("f", "x", {"secret": "hunter2"})
        store["move"]("f", "g", "x")
        with pytest.raises(sqstore.NotFoundError):
            store["get"]("f", "x")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert re.fullmatch(r"mem upload f/x \d+\.\d ms ok", lines[0])
    assert re.fullmatch(r"mem move f/x -> g \d+\.\d ms ok", lines[1])
    assert re.fullmatch(r"mem get f/x \d+\.\d ms NotFoundError", lines[2])
    assert "hunter2" not in caplog.text


def test_with_metrics_counts_calls_and_failures() -> None:
    """counts[op] per call, counts['op:Error'] per failure; the store still behaves."""
    counts: collections.Counter[str] = collections.Counter()
    store = sqstore.with_metrics(sqstore.memory_storage(), counts=counts)
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    sqstore.upload_job(store, JOB, "sim", "alice")
    with pytest.raises(sqstore.NotFoundError):
        store["get"]("f", "x")
    assert counts == {"upload": 2, "get": 1, "get:NotFoundError": 1}


def test_stack_puts_the_first_layer_outermost() -> None:
    """stack(s, a, b) == a(b(s)): a read_only outside metrics refuses before counting."""
    counts: dict[str, int] = {}
    metrics = functools.partial(sqstore.with_metrics, counts=counts)
    outer = sqstore.stack(sqstore.memory_storage(), sqstore.read_only, metrics)
    with pytest.raises(sqstore.ReadOnlyError):
        outer["upload"]("f", "x", {})
    assert counts == {}
    inner = sqstore.stack(sqstore.memory_storage(), metrics, sqstore.read_only)
    with pytest.raises(sqstore.ReadOnlyError):
        inner["upload"]("f", "x", {})
    assert counts == {"upload": 1, "upload:ReadOnlyError": 1}
    assert outer["upload"].__name__ == "upload"  # wrappers keep the wrapped callable's name
    with pytest.raises(TypeError, match="storage handle"):
        sqstore.read_only({"get": print})  # type: ignore[typeddict-item]


# ============================================================================
# The README, run as written; typing and packaging
# ============================================================================
_NEEDS_RE = re.compile(r"# needs: (.+)")


@dataclass
class ShellBlock:
    """One ```sh block of README.md, and what running it as written gave."""

    line: int
    code: str
    skipped: str = ""
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""


def readme_sh_blocks(text: str) -> list[ShellBlock]:
    """Every ```sh block of *text*, in order, with its first line number."""
    return [
        ShellBlock(text.count("\n", 0, match.start()) + 2, match.group(1))
        for match in re.finditer(r"^```sh\n(.*?)^```$", text, re.S | re.M)
    ]


def _ci_command() -> str:
    """The command .ci/run runs (its last line)."""
    return (HERE / ".ci" / "run").read_text().strip().splitlines()[-1]


def fresh_shell_env(home: Path) -> dict[str, str]:
    """A new login's environment: PATH without this test run's venv, HOME, and pip's own
    settings (index, certificates, proxies) if the test run has any."""
    own = {str(Path(sys.executable).parent)}
    if os.environ.get("VIRTUAL_ENV"):
        own.add(os.path.join(os.environ["VIRTUAL_ENV"], "bin"))
    path = [p for p in os.environ["PATH"].split(os.pathsep) if p and p not in own]
    env = {"PATH": os.pathsep.join(path), "HOME": str(home)}
    passed = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
    env.update((k, v) for k, v in os.environ.items() if k.startswith("PIP_") or k in passed)
    return env


def _copy_checkout(dest: Path) -> Path:
    """Copy the project's files (as they are now) to *dest*, as a fresh clone has them."""
    dest.mkdir()
    for name in ("pyproject.toml", "sqstore.py", "test_sqstore.py", "README.md", "LICENSE"):
        shutil.copy2(HERE / name, dest / name)
    shutil.copytree(HERE / ".ci", dest / ".ci")
    return dest


@pytest.fixture(scope="session")
def readme_shell(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[ShellBlock]]:
    """Run every ```sh block of README.md as written, in README order, each in a fresh shell
    (only PATH and HOME set) in the directory of a copy of the checkout; the first block is
    the install command, whose .venv the later blocks and the typing tests then use, so the
    package index is asked once.  A block whose first line is ``# needs: ...`` is not run,
    and neither is the test command that .ci/run runs (it would run these tests again)."""
    checkout = _copy_checkout(tmp_path_factory.mktemp("readme") / "sqstore")
    env = fresh_shell_env(Path(os.environ.get("HOME", str(checkout))))
    blocks = readme_sh_blocks((HERE / "README.md").read_text())
    for block in blocks:
        needs = _NEEDS_RE.match(block.code)
        if needs:
            block.skipped = f"needs {needs.group(1)}"
            continue
        if block.code.strip() == _ci_command():
            block.skipped = "the test command: .ci/run runs it"
            continue
        proc = subprocess.run(
            ["bash", "-e", "-c", block.code], cwd=checkout, env=env,
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        block.returncode, block.stdout, block.stderr = proc.returncode, proc.stdout, proc.stderr
    return checkout, blocks


@pytest.mark.slow
def test_readme_shell_blocks_run_as_written(
    readme_shell: tuple[Path, list[ShellBlock]], capsys: pytest.CaptureFixture[str]
) -> None:
    """Every ```sh block of the README runs as written in a fresh shell after the install
    command (blocks marked ``# needs: ...`` are listed with their reason instead)."""
    _, blocks = readme_shell
    assert blocks and "pip install ." in blocks[0].code, "the install command comes first"
    with capsys.disabled():
        for block in blocks:
            if block.skipped:
                print(f"\nREADME.md:{block.line}: sh block not run: {block.skipped}")
    failed = [
        f"README.md:{b.line} exit {b.returncode}:\n{b.code}\n{b.stderr[-1500:]}"
        for b in blocks
        if not b.skipped and b.returncode != 0
    ]
    assert failed == [], "\n\n".join(failed)
    ran = [b for b in blocks if not b.skipped]
    assert len(ran) >= 2 and any("sqstore work" in b.code for b in ran)


@pytest.mark.slow
def test_readme_install_needs_no_test_extra() -> None:
    """What the README tells users to install is the checkout with a user's extras; the test
    extra appears only in the development command, which is the one .ci/run runs."""
    text = (HERE / "README.md").read_text()
    before_dev = text[: text.index("\n## Development\n")]
    assert "[test]" not in before_dev
    assert "pip install 'sqstore[" not in text, "sqstore is not on a package index"
    for extra in ("dropbox", "mongodb"):
        assert f"pip install '.[{extra}]'" in before_dev, extra
    assert _ci_command() in readme_section("## Development")


def test_readme_quickstart_bob_runs_twice_as_a_script(tmp_path: Path) -> None:
    """The README's Bob runs as a script, twice: the second run reuses his key and config."""
    bob = readme_block("### Bob (spooler)", "python")
    (tmp_path / "bob.py").write_text(bob)
    env = {**os.environ, "PYTHONPATH": str(HERE), "TMPDIR": str(tmp_path)}
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "bob.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    (key_file,) = [p for p in tmp_path.rglob("*.jwk")]
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    store = sqstore.local_storage(tmp_path / "sqstore-exchange")
    public = sqstore.get_public_key(store, "sqsim")
    assert public == sqstore.public_from_private(sqstore.load_jwk(key_file))


def test_save_jwk_load_jwk_round_trip(tmp_path: Path) -> None:
    """save_jwk writes a key file of mode 0600 that load_jwk reads back as the same JWK."""
    private, public = sqstore.generate_keypair("bob")
    sqstore.save_jwk(tmp_path / "bob.jwk", private)
    sqstore.save_jwk(str(tmp_path / "bob.pub.jwk"), public)
    assert oct((tmp_path / "bob.jwk").stat().st_mode & 0o777) == "0o600"
    assert sqstore.load_jwk(tmp_path / "bob.jwk") == private
    assert sqstore.load_jwk(str(tmp_path / "bob.pub.jwk")) == public
    assert json.loads((tmp_path / "bob.jwk").read_text()) == sqstore.to_doc(private)
    encoded = base64.urlsafe_b64encode((tmp_path / "bob.jwk").read_bytes()).decode()
    (tmp_path / "env.jwk").write_text(encoded)  # sqooler's PRIVATE_JWK_STR form
    assert sqstore.load_jwk(tmp_path / "env.jwk") == private
    assert sorted(os.listdir(tmp_path)) == ["bob.jwk", "bob.pub.jwk", "env.jwk"]


def test_save_jwk_never_overwrites(tmp_path: Path) -> None:
    """save_jwk refuses an existing file (AlreadyExistsError) and leaves it as it was."""
    first, _ = sqstore.generate_keypair("bob")
    second, _ = sqstore.generate_keypair("bob")
    path = tmp_path / "bob.jwk"
    sqstore.save_jwk(path, first)
    with pytest.raises(sqstore.AlreadyExistsError, match=r"bob\.jwk"):
        sqstore.save_jwk(path, second)
    assert sqstore.load_jwk(path) == first
    assert sorted(os.listdir(tmp_path)) == ["bob.jwk"], "no temporary file is left"
    os.chmod(tmp_path, 0o500)
    try:
        if os.access(tmp_path, os.W_OK):  # root writes anyway
            return
        with pytest.raises(sqstore.StorageError, match=r"other\.jwk"):
            sqstore.save_jwk(tmp_path / "other.jwk", first)
    finally:
        os.chmod(tmp_path, 0o700)


def test_load_jwk_errors_name_the_file_never_the_key(tmp_path: Path) -> None:
    """load_jwk: a missing file is NotFoundError, a bad one InvalidDocumentError, a private key
    whose x is not d's BadSignatureError; each names the file and never shows the key."""
    private, _ = sqstore.generate_keypair("bob")
    other, _ = sqstore.generate_keypair("bob")
    assert private.d is not None
    with pytest.raises(sqstore.NotFoundError, match=r"missing\.jwk"):
        sqstore.load_jwk(tmp_path / "missing.jwk")
    doc = sqstore.to_doc(private)
    for name, text, error in (
        ("list.jwk", json.dumps([doc]), sqstore.InvalidDocumentError),
        ("extra.jwk", json.dumps({**doc, private.d: 1}), sqstore.InvalidDocumentError),
        ("cut.jwk", json.dumps(doc)[:-9], sqstore.InvalidDocumentError),
        ("mixed.jwk", json.dumps({**doc, "x": other.x}), sqstore.BadSignatureError),
        ("dir.jwk", None, sqstore.StorageError),
    ):
        if text is None:
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_text(text)
        with pytest.raises(error) as info:
            sqstore.load_jwk(tmp_path / name)
        assert name in str(info.value) and private.d.rstrip("=")[:12] not in str(info.value)


def test_get_result_of_a_pending_job_is_not_an_error(store: Storage) -> None:
    """A job still queued or running has no result yet: get_result answers with its status
    (not ERROR), and verify_result raises NotFinishedError (a NotFoundError)."""
    private, public = sqstore.generate_keypair("simkey")
    sqstore.upload_config(store, sqstore.demo_config("sim", sign=True), "sim", private)
    sqstore.upload_public_key(store, public, "sim")
    job_id = sqstore.upload_job(store, JOB, "sim", "alice")
    sqstore.upload_status(store, "sim", "alice", job_id, private)
    for _ in range(2):  # queued, then running
        result = sqstore.get_result(store, "sim", "alice", job_id)
        assert (result.status, result.success, result.results) == ("INITIALIZING", False, ())
        assert result.job_id == job_id
        with pytest.raises(sqstore.NotFinishedError, match=job_id) as info:
            sqstore.verify_result(store, "sim", job_id)
        assert isinstance(info.value, FileNotFoundError)
        assert info.value.status == "INITIALIZING"
        if sqstore.claim_job(store, "sim", private) is None:
            break
    failed = sqstore.StatusMsg(job_id, "ERROR", "Failed.", "boom")
    sqstore.update_in_database(store, None, failed, job_id, "sim", private)
    result = sqstore.get_result(store, "sim", "alice", job_id)
    assert (result.status, result.success) == ("ERROR", False)
    with pytest.raises(sqstore.NotFoundError) as missing:
        sqstore.verify_result(store, "sim", job_id)
    assert not isinstance(missing.value, sqstore.NotFinishedError)


def test_readme_api_table_names_every_public_function() -> None:
    """ "The API at a glance" names every public function, record and error of sqstore."""
    section = readme_section("## The API at a glance")
    named = set(re.findall(r"`(\w+)", section))
    documented = {name for name in sqstore.__all__ if not name.isupper() and name not in ("Doc",)}
    assert sorted(documented - named) == []


def test_readme_error_table_says_what_each_error_also_is() -> None:
    """Each row of the README's error table names exactly the builtins the error subclasses."""
    section = readme_section("## The API at a glance")
    rows = re.findall(r"^\| `(\w+Error)` \| ([^|]*) \|", section, re.M)
    errors = {name for name in sqstore.__all__ if name.endswith("Error")}
    assert {name for name, _ in rows} == errors
    for name, cell in rows:
        cls = getattr(sqstore, name)
        said = set(re.findall(r"`(\w+)`", cell))
        bases = {
            c.__name__
            for c in cls.__mro__
            if c.__module__ == "builtins" and c not in (object, BaseException, Exception)
        }
        ours = {c.__name__ for c in cls.__mro__[1:] if c.__module__ == "sqstore"}
        assert said - ours == bases, (name, said, bases)


def test_module_header_carries_the_full_licence() -> None:
    """A vendored sqstore.py carries the MIT notice of LICENSE, word for word, at its top."""
    licence = (HERE / "LICENSE").read_text().split()
    header = []
    for line in (HERE / "sqstore.py").read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.removeprefix("#"))
    assert " ".join(licence) in " ".join(" ".join(header).split())


def test_pyproject_metadata() -> None:
    """The licence is an SPDX expression with its file, and the metadata lists the supported
    Python versions and the project's addresses."""
    import importlib

    try:  # by name: mypy checks this file for Python 3.10, which has no tomllib
        tomllib = importlib.import_module("tomllib")
    except ImportError:
        skip_or_fail("reading pyproject.toml needs tomllib (Python 3.11)")

    meta = tomllib.loads((HERE / "pyproject.toml").read_text())
    project = meta["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert not any(c.startswith("License ::") for c in project["classifiers"])
    floor = project["requires-python"].removeprefix(">=")
    versions = [c.rsplit(" :: ", 1)[1] for c in project["classifiers"] if
                re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]  # fmt: skip
    assert versions and versions[0] == floor and "3.11" in versions
    assert project["urls"] and all(u.startswith("https://") for u in project["urls"].values())
    setuptools_floor = re.search(r"setuptools>=(\d+)", " ".join(meta["build-system"]["requires"]))
    assert setuptools_floor and int(setuptools_floor.group(1)) >= 77  # PEP 639 licence fields


def _mypy(*args: str, cwd: Path, python: Path) -> subprocess.CompletedProcess[str]:
    """Run this environment's mypy with *python*'s installed packages (not this venv's)."""
    return subprocess.run(
        [_tool("mypy"), "--strict", "--no-incremental", "--python-executable", str(python), *args],
        cwd=cwd, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _readme_venv_python(readme_shell: tuple[Path, list[ShellBlock]]) -> Path:
    python = readme_shell[0] / ".venv" / "bin" / "python"
    assert python.exists(), "the README's install command made no .venv"
    return python


@pytest.mark.slow
def test_vendored_module_passes_mypy_strict_alone(
    readme_shell: tuple[Path, list[ShellBlock]], tmp_path: Path
) -> None:
    """sqstore.py copied alone into a project whose venv has only sqstore's core dependencies
    (no pymongo, no dropbox) passes mypy --strict with no configuration."""
    python = _readme_venv_python(readme_shell)
    missing = subprocess.run(
        [str(python), "-c", "import importlib.util as u; "
         "print([m for m in ('pymongo', 'dropbox', 'requests') if u.find_spec(m)])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert missing == "[]", "the optional dependencies must be absent for this test"
    shutil.copy2(HERE / "sqstore.py", tmp_path / "sqstore.py")
    proc = _mypy("sqstore.py", cwd=tmp_path, python=python)
    assert proc.returncode == 0, proc.stdout + proc.stderr


USER_SCRIPT = """\
import sqstore

store = sqstore.local_storage("exchange")
private, public = sqstore.generate_keypair("bobkey")
sqstore.upload_config(store, sqstore.demo_config("sim", sign=True), "sim", private)
job_id: str = sqstore.upload_job(store, {"experiment_0": {}}, "sim", "alice")
result = sqstore.get_result(store, "sim", "alice", job_id)
status: str = result.status
"""


@pytest.mark.slow
def test_installed_package_types_reach_a_users_mypy(
    readme_shell: tuple[Path, list[ShellBlock]], tmp_path: Path
) -> None:
    """With the mypy setting the README gives, a user's script type-checks against the
    installed sqstore under --strict, and wrong calls (argument order, a key of the wrong
    type) are reported."""
    python = _readme_venv_python(readme_shell)
    config = readme_block("### Type checking", "toml")
    (tmp_path / "pyproject.toml").write_text(config)
    (tmp_path / "app.py").write_text(USER_SCRIPT)
    proc = _mypy("app.py", cwd=tmp_path, python=python)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wrong = USER_SCRIPT + (
        'sqstore.upload_job(store, "sim", {"experiment_0": {}}, "alice")\n'
        'sqstore.upload_config(store, sqstore.demo_config("x"), "x", private_jwk=42)\n'
        "sqstore.update_in_database(store, result, status, job_id, 'sim')\n"
    )
    (tmp_path / "app.py").write_text(wrong)
    proc = _mypy("app.py", cwd=tmp_path, python=python)
    out = proc.stdout
    assert proc.returncode == 1 and "py.typed" not in out, out
    for line in (9, 10, 11):
        assert f"app.py:{line}: error: Argument" in out, (line, out)


# ============================================================================
# Copying between storages
# ============================================================================
def exchange(store: Storage, keys: tuple[sqstore.JWK, sqstore.JWK]) -> dict[str, str]:
    """A signing and a plain backend with jobs in every state; returns ids by state. The
    first job (DONE) is signed by its user and submitted with a token; the running one has
    a cancel request."""
    private, public = keys
    user_private, user_public = rfc_keys("user0-key")
    sqstore.upload_config(store, sqstore.demo_config("sim", sign=True), "sim", private)
    sqstore.upload_public_key(store, public, "sim")
    sqstore.upload_public_key(store, user_public, "user0", role="user")
    sqstore.upload_config(store, sqstore.demo_config("plain"), "plain")
    for dn, n in (("sim", 4), ("plain", 2)):
        for i in range(n):
            first = dn == "sim" and i == 0
            signer, token = (user_private, "token0") if first else (None, None)
            job_id = sqstore.upload_job(store, JOB, dn, f"user{i}", token, private_jwk=signer)
            sqstore.upload_status(store, dn, f"user{i}", job_id, private if dn == "sim" else None)
    ids = {}
    for state in ("DONE", "ERROR", "running"):
        claimed = sqstore.claim_job(store, "sim", private)
        assert claimed is not None
        ids[state] = job_id = claimed[0].job_id
        if state != "running":
            result = sqstore.run_simulator(claimed[1], job_id, "sim") if state == "DONE" else None
            status = sqstore.StatusMsg(job_id, state, "ok", "None")
            sqstore.update_in_database(store, result, status, job_id, "sim", private)
    ids["queued"] = store["list"](folder(store, "queued"))[0]
    assert sqstore.cancel_job(store, "sim", "user2", ids["running"]) == "requested"
    finish(store, "plain")
    return ids


def copy_counts(**copied: int) -> dict[str, dict[str, int]]:
    kinds = sqstore.copy_storage(sqstore.memory_storage(), sqstore.memory_storage())  # each kind
    assert set(copied) <= set(kinds)
    return {
        kind: {"copied": copied.get(kind, 0), "present": 0, "conflicts": 0, "rejected": 0}
        for kind in kinds
    }


def visible(root: Path) -> dict[str, bytes]:
    """tree(root) without the temporary files an interrupted atomic write leaves behind."""
    return {k: v for k, v in tree(root).items() if not Path(k).name.startswith(".")}


@pytest.mark.slow
def test_copy_round_trip_local_mongodb_dropbox_local(
    tmp_path: Path, keys: Any, mongodb_server: Any, dropbox_env: Any
) -> None:
    """local -> MongoDB -> Dropbox -> local gives back every document, byte for byte."""
    first = sqstore.local_storage(tmp_path / "first")
    ids = exchange(first, keys)
    mongo = mongo_store(mongodb_server)
    dbx = sqstore.open_storage("dropbox://")
    last = sqstore.local_storage(tmp_path / "last")
    expected = copy_counts(
        public_keys=1, user_keys=1, configs=2, job_signatures=1, submit_tokens=1,
        cancel_requests=1, jobs=6, statuses=6, results=3, leases=1,
    )  # fmt: skip
    for src, dst in ((first, mongo), (mongo, dbx), (dbx, last)):
        assert sqstore.copy_storage(src, dst, verify=True) == expected
    assert visible(tmp_path / "last") == visible(tmp_path / "first")
    for store in (mongo, dbx, last):  # each copy works through the API, signatures included
        assert sqstore.get_status(store, "sim", "user0", ids["DONE"]).status == "DONE"
        assert sqstore.verify_result(store, "sim", ids["DONE"])
        assert sqstore.verify_job(store, "sim", "user0", ids["DONE"])
        assert sqstore.upload_job(store, JOB, "sim", "user0", "token0") == ids["DONE"]
        assert sqstore.cancel_requested(store, ids["running"]) == "user2"
        assert sqstore.get_status(store, "sim", "user1", ids["ERROR"]).status == "ERROR"
        assert sqstore.get_job(store, store["layout"].running, ids["running"]) == JOB
    assert "/Backend_files/Result/sim/None/result-" + ids["DONE"] + ".json" in dropbox_env.files()


def recorded(store: Storage) -> tuple[Storage, set[tuple[str, str]]]:
    """*store* and the set of (folder, id) it holds, kept up to date by a layer."""
    held: set[tuple[str, str]] = set()

    def wrap(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            out = fn(*args)
            if op in ("upload", "update"):
                held.add((args[0], args[1]))
            elif op == "move":
                held.discard((args[0], args[2]))
                held.add((args[1], args[2]))
            elif op == "delete" or (op == "swap" and out and args[3] is None):
                held.discard((args[0], args[1]))
            return out

        return call

    return sqstore.wrap_ops(store, wrap), held


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    first=st.sampled_from([sqstore.LOCAL_LAYOUT, sqstore.DROPBOX_LAYOUT]),
    steps=st.lists(
        st.tuples(
            st.sampled_from(["submit", "signed", "token", "claim", "done", "error", "cancel"]),
            st.sampled_from(["sim", "plain"]),
            st.sampled_from(["alice", "bob"]),
        ),
        max_size=14,
    ),
)
def test_copy_there_and_back_keeps_every_document(
    first: sqstore.Layout, steps: list[tuple[str, str, str]]
) -> None:
    """Whatever state an exchange is in (signed submissions, submit tokens and cancel requests
    included), copying it to the other layout and back gives back every document it holds,
    and nothing else."""
    src, held = recorded(sqstore.memory_storage(layout=first))
    private, user_private = signing_exchange(src)
    sqstore.upload_config(src, sqstore.demo_config("plain"), "plain")
    running: dict[str, list[str]] = {"sim": [], "plain": []}
    submitted: list[tuple[str, str, str]] = []
    for n, (action, dn, user) in enumerate(steps):
        key = private if dn == "sim" else None
        if action in ("submit", "signed", "token"):
            signer = user_private if action == "signed" else None
            token = f"t{n}" if action == "token" else None
            job_id = sqstore.upload_job(src, JOB, dn, user, token, private_jwk=signer)
            sqstore.upload_status(src, dn, user, job_id, key)
            submitted.append((dn, user, job_id))
        elif action == "cancel" and submitted:
            sqstore.cancel_job(src, *submitted[-1])
        elif action == "claim" and (claimed := sqstore.claim_job(src, dn, key)) is not None:
            running[dn].append(claimed[0].job_id)
        elif action in ("done", "error") and running[dn]:
            job_id = running[dn].pop(0)
            result = sqstore.run_simulator(JOB, job_id, dn) if action == "done" else None
            status = sqstore.StatusMsg(job_id, action.upper(), "", "None")
            sqstore.update_in_database(src, result, status, job_id, dn, key)
    other = sqstore.DROPBOX_LAYOUT if first == sqstore.LOCAL_LAYOUT else sqstore.LOCAL_LAYOUT
    middle = sqstore.memory_storage(layout=other)
    back, back_held = recorded(sqstore.memory_storage(layout=first))
    there = sqstore.copy_storage(src, middle, verify=True)
    assert sqstore.copy_storage(middle, back, verify=True) == there
    assert back_held == held
    assert {at: back["get"](*at) for at in back_held} == {at: src["get"](*at) for at in held}


def signing_exchange(store: Storage) -> tuple[sqstore.JWK, sqstore.JWK]:
    """Configure the signing backend "sim" and publish its key and user alice's; return the
    two private keys (the backend's, alice's)."""
    private, public = rfc_keys()
    user_private, user_public = rfc_keys("alice-key")
    sqstore.upload_config(store, sqstore.demo_config("sim", sign=True), "sim", private)
    sqstore.upload_public_key(store, public, "sim")
    sqstore.upload_public_key(store, user_public, "alice", role="user")
    return private, user_private


@pytest.mark.parametrize("layout", [sqstore.LOCAL_LAYOUT, sqstore.DROPBOX_LAYOUT])
def test_locate_names_every_place_the_operations_write(layout: sqstore.Layout) -> None:
    """Every document a job's life writes (signed, with a token, a cancel request and a user
    key) is where `locate` says a document of its kind lives, and nowhere else."""
    store, held = recorded(sqstore.memory_storage(layout=layout))
    private, user_private = signing_exchange(store)
    done = sqstore.upload_job(store, JOB, "sim", "alice", "t1", private_jwk=user_private)
    sqstore.upload_status(store, "sim", "alice", done, private)
    running = sqstore.upload_job(store, JOB, "sim", "alice")
    sqstore.upload_status(store, "sim", "alice", running, private)
    claimed = sqstore.claim_job(store, "sim", private)
    assert claimed is not None
    result = sqstore.run_simulator(claimed[1], done, "sim")
    status = sqstore.StatusMsg(done, "DONE", "", "None")
    sqstore.update_in_database(store, result, status, done, "sim", private)
    assert sqstore.claim_job(store, "sim", private) is not None
    assert sqstore.cancel_job(store, "sim", "alice", running) == "requested"
    places = {
        sqstore.locate(layout, "config", "sim"),
        sqstore.locate(layout, "public_key", job_id="rfc8037"),
        sqstore.locate(layout, "user_key", job_id="alice-key"),
        sqstore.locate(layout, "finished", "sim", job_id=done),
        sqstore.locate(layout, "status", "sim", job_id=done),
        sqstore.locate(layout, "result", "sim", job_id=done),
        sqstore.locate(layout, "job_signature", "sim", job_id=done),
        sqstore.locate(layout, "submit_token", "sim", job_id="t1"),
        sqstore.locate(layout, "running", "sim", job_id=running),
        sqstore.locate(layout, "status", "sim", job_id=running),
        sqstore.locate(layout, "lease", job_id=running),
        sqstore.locate(layout, "cancel_request", job_id=running),
    }
    assert held == places
    assert {sqstore.job_id_from(layout, "finished", at[1]) for at in held if "inish" in at[0]} == {
        done
    }


@pytest.mark.slow
def test_copy_moves_a_sqooler_lab_from_dropbox_to_mongodb(
    sqooler_dropbox: Any, sqooler_mongodb: Any, dropbox_fake: Any, mongodb_server: Any
) -> None:
    """What sqooler 0.9 signed on Dropbox (dated ids, user folders) copies to MongoDB with
    --verify, and sqooler's MongoDB provider then reads and verifies it."""
    from sqooler.schemes import BackendConfigSchemaIn, StatusMsgDict
    from sqooler.schemes import ResultDict as SqoolerResult
    from sqooler.security import JWK as SqoolerJWK

    dropbox_fake.reset()
    private, public = sqstore.generate_keypair("labkid")
    sq_private, sq_public = (SqoolerJWK(**sqstore.to_doc(k)) for k in (private, public))
    config = BackendConfigSchemaIn(**sqstore.to_doc(sqstore.demo_config("sq", sign=True)))
    sqooler_dropbox.upload_config(config, "sq", sq_private)
    sqooler_dropbox.upload_public_key(sq_public, "sq")
    job_ids = [sqooler_dropbox.upload_job(JOB, "sq", user) for user in ("alice", "bob")]
    for job_id, user in zip(job_ids, ("alice", "bob"), strict=True):
        sqooler_dropbox.upload_status("sq", user, job_id)
    nxt = sqooler_dropbox.get_next_job_in_queue("sq", sq_private)
    result = SqoolerResult(**sqstore.to_doc(sqstore.run_simulator(JOB, nxt.job_id, "sq")))
    status = StatusMsgDict(job_id=nxt.job_id, status="DONE", detail="ok", error_message="None")
    sqooler_dropbox.update_in_database(result, status, nxt.job_id, "sq", sq_private)

    src = sqstore.dropbox_storage(client=dropbox_fake.client())
    counts = sqstore.copy_storage(src, mongo_store(mongodb_server), verify=True)
    assert counts == copy_counts(public_keys=1, configs=1, jobs=2, statuses=2, results=1)
    mongo = sqstore.mongodb_storage(mongo_uri(mongodb_server))
    user = nxt.job_id.split("-")[2]
    assert sqstore.get_status(mongo, "sq", user, nxt.job_id).status == "DONE"
    assert sqstore.verify_result(mongo, "sq", nxt.job_id)
    assert finish(mongo, "sq", private) == [j for j in job_ids if j != nxt.job_id]
    # sqooler's MongoDB provider finds configs and keys by name; its jobs need ObjectId ids,
    # which dated Dropbox ids are not, so only sqstore serves those jobs after the move.
    assert sqooler_mongodb.get_config("sq").kid == "labkid"
    assert sqooler_mongodb.get_public_key("sq").kid == "labkid"


def test_copy_keeps_what_the_target_has_and_verifies_on_request(tmp_path: Path, keys: Any) -> None:
    """A different document in the target is a conflict left alone; a forged result is
    rejected with --verify; the CLI names both and exits 1."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    ids = exchange(sqstore.local_storage(src), keys)
    result_file = src / "results" / "sim" / f"{ids['DONE']}.json"
    forged = json.loads(result_file.read_text())
    forged["payload"]["success"] = False
    result_file.write_text(json.dumps(forged))
    source_before = tree(src)
    target = sqstore.local_storage(dst)
    status = sqstore.StatusMsg(ids["queued"], "INITIALIZING", "Got your json.", "None")
    target["upload"]("status/sim", ids["queued"], sqstore.to_doc(status))  # not the source's
    status_file = dst / "status" / "sim" / f"{ids['queued']}.json"
    before = status_file.read_bytes()
    proc = run_cli("copy", "--verify", "--json", str(src), f"file://{dst}", cwd=tmp_path)
    assert proc.returncode == 1
    counts = json.loads(proc.stdout)
    assert counts["results"] == {"copied": 2, "present": 0, "conflicts": 0, "rejected": 1}
    assert f"results/sim/{ids['DONE']}: not copied: signature" in proc.stderr
    assert not (dst / "results" / "sim" / f"{ids['DONE']}.json").exists()
    assert status_file.read_bytes() == before
    again = run_cli("copy", str(src), str(dst), cwd=tmp_path)  # without --verify: copied
    assert again.returncode == 1 and "kept the different" in again.stderr
    assert re.search(r"results\s+1\s+2\s+0\s+0", again.stdout), again.stdout
    assert tree(src) == source_before  # the source is only read


@pytest.mark.slow
@pytest.mark.parametrize("verify", [False, True])
def test_copy_rejects_a_source_document_that_is_not_json(tmp_path: Path, verify: bool) -> None:
    """A source document that cannot be read is counted as rejected and named; the rest is
    copied (with or without verify)."""
    src = sqstore.local_storage(tmp_path / "src")
    sqstore.upload_config(src, sqstore.demo_config("sim"), "sim")
    (tmp_path / "src" / "backends" / "public_keys").mkdir(parents=True)
    (tmp_path / "src" / "backends" / "public_keys" / "broken.json").write_text("{not json")
    warnings: list[str] = []
    dst = sqstore.local_storage(tmp_path / "dst")
    counts = sqstore.copy_storage(src, dst, verify=verify, warn=warnings.append)
    assert counts["public_keys"]["rejected"] == 1 and counts["configs"]["copied"] == 1
    assert len(warnings) == 1 and "public_keys/broken: not copied:" in warnings[0], warnings


def test_copy_refuses_layouts_that_disagree_on_which_folders_are_per_backend() -> None:
    """Two layouts whose result folders are per backend in one only cannot be copied between:
    ValueError naming the folder, before anything is read or written."""
    shared = attrs.evolve(sqstore.LOCAL_LAYOUT, results="results")
    src = sqstore.memory_storage(layout=shared)
    sqstore.upload_config(src, sqstore.demo_config("sim"), "sim")
    dst = sqstore.memory_storage()
    with pytest.raises(ValueError, match="the result folder is per backend in one layout only"):
        sqstore.copy_storage(src, dst)
    assert sqstore.get_backends(dst) == []


def test_copy_killed_then_resumed_copies_everything_once(tmp_path: Path) -> None:
    """A copy SIGKILLed midway, run again, completes: nothing twice, nothing lost."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    store = sqstore.local_storage(src)
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    jobs = 1500
    for _ in range(jobs):
        job_id = sqstore.upload_job(store, JOB, "sim", "alice")
        sqstore.upload_status(store, "sim", "alice", job_id)
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    child = subprocess.Popen(
        [sys.executable, "-m", "sqstore", "copy", str(src), str(dst)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    queued = dst / "jobs" / "queued" / "sim"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(queued.glob("*.json"))) < 200:
        time.sleep(0.005)
    child.kill()
    assert child.wait() == -signal.SIGKILL, "the copy ended before it could be killed"
    copied_before = len(list(queued.glob("*.json")))
    assert 200 <= copied_before < jobs
    proc = run_cli("copy", "--json", str(src), str(dst), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    counts = json.loads(proc.stdout)
    assert counts["jobs"]["present"] >= copied_before
    for kind, total in (("configs", 1), ("jobs", jobs), ("statuses", jobs)):
        row = counts[kind]
        assert row["copied"] + row["present"] == total and row["conflicts"] == row["rejected"] == 0
    assert visible(dst) == visible(src)


# ============================================================================
# Verifying results fast and safely
# ============================================================================
def signed_result(store: Storage, job_id: str, private: Any, *, named: str = "") -> None:
    """Store a result for *job_id* signed with *private* (of job *named*, if given), as Bob
    or someone holding his key would."""
    result = sqstore.to_doc(sqstore.run_simulator(JOB, named or job_id, "sim"))
    doc = sqstore.sign_doc(result, private, fmt=store["layout"].signature_format)
    store["upload"](*place(store, "results", job_id), doc)


def test_a_handle_verifies_with_the_key_published_now(store: Storage) -> None:
    """Once the published key is replaced under its kid (a raw write), a handle that verified
    with the old key accepts only what the new key signed, as a fresh reader does."""
    old_private, old_public = sqstore.generate_keypair("labkey")
    new_private, new_public = sqstore.generate_keypair("labkey")
    sqstore.upload_config(store, sqstore.demo_config("sim", sign=True), "sim", old_private)
    sqstore.upload_public_key(store, old_public, "sim")
    genuine, forged, later, other = (sqstore.create_job_id(store, "sim", "a") for _ in range(4))
    signed_result(store, genuine, old_private)
    assert sqstore.verify_result(store, "sim", genuine)
    assert sqstore.verify_result(store, "sim", genuine)
    keys_folder = sqstore.locate(store["layout"], "public_key")[0]
    store["update"](keys_folder, "labkey", sqstore.to_doc(new_public))
    signed_result(store, forged, old_private)  # with the old key, leaked
    signed_result(store, later, new_private)
    signed_result(store, other, new_private, named=later)  # another job's genuine result
    assert not sqstore.verify_result(store, "sim", forged)
    assert not sqstore.verify_result(store, "sim", genuine)
    assert sqstore.verify_result(store, "sim", later)
    assert not sqstore.verify_result(store, "sim", other)
    assert sqstore.get_public_key(store, "sim").x == new_public.x


def test_a_handle_verifies_with_the_kid_the_config_names_now(store: Storage) -> None:
    """Once the config names a new kid (a key rotated under a new kid), a handle that verified
    with the old key accepts only what the new key signed."""
    old_private, old_public = sqstore.generate_keypair("labkey")
    new_private, new_public = sqstore.generate_keypair("labkey2")
    config = sqstore.demo_config("sim", sign=True)
    sqstore.upload_config(store, config, "sim", old_private)
    sqstore.upload_public_key(store, old_public, "sim")
    genuine, forged, later = (sqstore.create_job_id(store, "sim", "a") for _ in range(3))
    signed_result(store, genuine, old_private)
    assert sqstore.verify_result(store, "sim", genuine)
    rotated = sqstore.to_doc(attrs.evolve(config, kid="labkey2"))
    fmt = store["layout"].signature_format
    config_place = sqstore.locate(store["layout"], "config", "sim")
    store["update"](*config_place, sqstore.sign_doc(rotated, new_private, fmt=fmt))
    sqstore.upload_public_key(store, new_public, "sim")
    signed_result(store, forged, old_private)
    signed_result(store, later, new_private)
    assert not sqstore.verify_result(store, "sim", forged)
    assert not sqstore.verify_result(store, "sim", genuine)
    assert sqstore.verify_result(store, "sim", later)


def test_a_stored_key_with_members_of_any_json_type_verifies() -> None:
    """A published key that another program stored with extra members of any JSON type
    (lists, objects, numbers) is read and verifies as the same key does without them."""
    store = sqstore.memory_storage()
    private, public = sqstore.generate_keypair("labkey")
    sqstore.upload_config(store, sqstore.demo_config("sim", sign=True), "sim", private)
    job_id = sqstore.create_job_id(store, "sim", "a")
    signed_result(store, job_id, private)
    keys_folder = sqstore.locate(store["layout"], "public_key")[0]
    store["upload"](keys_folder, "labkey", sqstore.to_doc(public))
    for extra in ({"use": "sig"}, {"x5c": ["a"], "n": 1}, {"ext": True, "meta": {"a": 1}}):
        store["update"](keys_folder, "labkey", {**sqstore.to_doc(public), **extra})
        assert sqstore.get_public_key(store, "sim") == public
        assert sqstore.verify_result(store, "sim", job_id)


@pytest.mark.parametrize("kid", ["labkey", "thumbprint"])
def test_a_key_sqooler_replaces_is_the_key_a_handle_verifies_with(
    shared: tuple[Any, Storage], kid: str
) -> None:
    """sqooler 0.9 replaces a published key in place (a rotation after a leak), also under a
    kid that is the old key's thumbprint: a handle that verified with the old key then
    refuses results the old key signs."""
    from sqooler.schemes import BackendConfigSchemaIn
    from sqooler.security import JWK as SqoolerJWK

    sqooler, store = shared
    seed = os.urandom(32)
    if kid == "thumbprint":
        kid = sqstore.jwk_thumbprint(sqstore.generate_keypair("k", seed=seed)[1])
    old_private, old_public = sqstore.generate_keypair(kid, seed=seed)
    new_private, new_public = sqstore.generate_keypair(kid)
    config = BackendConfigSchemaIn(**sqstore.to_doc(sqstore.demo_config("sim", sign=True)))
    sqooler.upload_config(config, "sim", SqoolerJWK(**sqstore.to_doc(old_private)))
    sqooler.upload_public_key(SqoolerJWK(**sqstore.to_doc(old_public)), "sim")
    genuine, forged, later = (sqstore.create_job_id(store, "sim", "a") for _ in range(3))
    signed_result(store, genuine, old_private)
    assert sqstore.verify_result(store, "sim", genuine)
    sqooler.upload_public_key(SqoolerJWK(**sqstore.to_doc(new_public)), "sim")
    signed_result(store, forged, old_private)
    signed_result(store, later, new_private)
    assert not sqstore.verify_result(store, "sim", forged)
    assert not sqstore.verify_result(store, "sim", genuine)
    assert sqstore.verify_result(store, "sim", later)
    assert sqooler.verify_result("sim", later) and not sqooler.verify_result("sim", forged)


# ============================================================================
# Performance: what each cut removes
# ============================================================================
def hex_ids(count: int) -> list[str]:
    """*count* ids that sort as they are made, as job ids do (24 hex: an ObjectId on MongoDB)."""
    return [f"{i:024x}" for i in range(1, count + 1)]


def test_list_in_steps_walks_the_folder_then_comes_round(store: Storage) -> None:
    """``list(path, n)`` serves the next n ids of one listing, oldest first, then lists afresh."""
    path = "jobs/queued/sim"
    assert store["list"](path, 2) == []
    ids = hex_ids(5)
    for doc_id in reversed(ids):
        store["upload"](path, doc_id, {"n": doc_id})
    assert store["list"](path, 2) == ids[:2]
    store["delete"](path, ids[0])
    late = "f" * 24
    store["upload"](path, late, {})
    assert store["list"](path, 2) == ids[2:4]
    step = store["list"](path, 2)
    assert step[0] == ids[4] and set(step[1:]) <= {late}, "one listing, whatever came since"
    walked = step + [i for _ in range(6) for i in store["list"](path, 1)]
    assert late in walked, "what came meanwhile comes in a later step"
    assert store["list"](path) == [*ids[1:], late], "a plain list is always fresh"
    for doc_id in store["list"](path):
        store["delete"](path, doc_id)
    seen = [store["list"](path, 3) for _ in range(3)]
    assert seen[-1] == [], "an empty step means the folder is empty now"
    with pytest.raises(ValueError):
        store["list"](path, 0)
    with pytest.raises(sqstore.InvalidNameError):
        store["list"]("../x", 1)


def finish_benchlike(job: Any, job_id: str, display_name: str) -> Any:
    """An executor that returns a small valid result at once."""
    return sqstore.ResultDict(
        display_name=display_name, backend_version="0.1.0", job_id=job_id, status="DONE"
    )


def listed_entries(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record how many names each directory listing of this process returns."""
    sizes: list[int] = []
    listdir = os.listdir

    def counted(*args: Any) -> list[str]:
        names = listdir(*args)
        sizes.append(len(names))
        return names

    monkeypatch.setattr(os, "listdir", counted)
    return sizes


@pytest.mark.slow
@pytest.mark.parametrize("drain", ["claim_job", "work"])
def test_a_claim_lists_a_constant_share_of_a_long_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, drain: str
) -> None:
    """claim_job in a loop and work() read O(1) directory entries per job at any queue length."""
    per_job = {}
    for queued in (100, 2000):
        store = sqstore.local_storage(tmp_path / f"q{queued}")
        sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
        for _ in range(queued):
            sqstore.upload_job(store, {"e": {}}, "sim", "alice")
        sizes = listed_entries(monkeypatch)
        if drain == "claim_job":
            while sqstore.claim_job(store, "sim") is not None:
                pass
        else:
            done = sqstore.work([store], "sim", finish_benchlike, max_jobs=queued)
            assert done == queued
        monkeypatch.undo()
        assert store["list"]("jobs/queued/sim") == []
        per_job[queued] = sum(sizes) / queued
    assert per_job[2000] <= 1.5 * per_job[100] + 1, per_job


@pytest.mark.usefixtures("configured")
def test_claim_job_lists_one_id_per_step(store: Storage) -> None:
    """Each claim_job asks the queue for the next id only, on every backend (storage calls)."""
    submitted = [sqstore.upload_job(store, {"e": {}}, "sim", "alice") for _ in range(12)]
    sqstore.timestamp_queue(store, "sim")  # a fresh heartbeat: no lease sweep meanwhile
    steps: list[tuple[Any, ...]] = []
    plain = store["list"]

    def listing(*args: Any) -> list[str]:
        steps.append(args[1:])
        return plain(*args)

    counted: Any = {**store, "list": listing}
    claimed = []
    while (got := sqstore.claim_job(counted, "sim")) is not None:
        claimed.append(got[0].job_id)
    assert claimed == submitted, "oldest first"
    assert steps and all(step == (1,) for step in steps), steps
    assert len(steps) <= len(submitted) + 2


def test_work_reads_the_config_once_per_job(tmp_path: Path) -> None:
    """work() keeps one claimer per store: the config is read by the finish, not by each claim."""
    store = sqstore.local_storage(tmp_path / "store")
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    for _ in range(20):
        sqstore.upload_job(store, {"e": {}}, "sim", "alice")
    reads: list[str] = []
    plain = store["get"]

    def get(path: str, doc_id: str) -> Any:
        reads.append(path)
        return plain(path, doc_id)

    counted: Any = {**store, "get": get}
    assert sqstore.work([counted], "sim", finish_benchlike, max_jobs=20) == 20
    assert reads.count(store["layout"].configs) <= 20 + 3, reads.count(store["layout"].configs)


@pytest.fixture
def linux_store(tmp_path: Path) -> Storage:
    """A local store in ``tmp_path/store``, on Linux only (renameat2 is Linux's)."""
    if sys.platform != "linux":
        pytest.skip("renameat2 is Linux's")
    return sqstore.local_storage(tmp_path / "store")


def test_create_only_upload_is_one_rename_that_never_replaces(
    linux_store: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Linux an upload renames its temporary file into place with RENAME_NOREPLACE: no link."""
    store = linux_store

    def refused(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("link used")

    monkeypatch.setattr(os, "link", refused)
    store["upload"]("a", "x", {"v": 1})
    with pytest.raises(sqstore.AlreadyExistsError):
        store["upload"]("a", "x", {"v": 2})
    assert store["get"]("a", "x") == {"v": 1}
    assert sorted(p.name for p in (tmp_path / "store" / "a").iterdir()) == ["x.json"]


def test_local_move_is_one_rename_that_never_replaces(
    linux_store: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Linux a move is one RENAME_NOREPLACE: it checks nothing first, and refuses a target."""
    store = linux_store
    for path in ("a", "b"):
        store["upload"](path, "x", {"in": path})
    store["upload"]("a", "y", {"in": "a"})
    stats: list[Any] = []
    real_stat = os.stat

    def stat(*args: Any, **kwargs: Any) -> Any:
        stats.append(args)
        return real_stat(*args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    store["move"]("a", "b", "y")
    assert stats == [], "no existence checks before the rename"
    with pytest.raises(sqstore.AlreadyExistsError):
        store["move"]("a", "b", "x")
    with pytest.raises(sqstore.NotFoundError):
        store["move"]("a", "b", "z")
    monkeypatch.undo()
    assert store["get"]("b", "x") == {"in": "b"} and store["get"]("a", "x") == {"in": "a"}


# ============================================================================
# Performance: fewer commands and requests
# ============================================================================
def life_steps(store: Storage, count: Callable[[], int]) -> dict[str, int]:
    """What each step of one job life (see `lifecycle_counts`) costs, as *count* says."""
    sqstore.upload_config(store, sqstore.demo_config("sq"), "sq")
    sqstore.timestamp_queue(store, "sq")  # a fresh heartbeat: no sweep in the life
    result = sqstore.run_simulator(JOB, "x", "sq")
    job_id = ""
    steps: dict[str, int] = {}

    def step(name: str, call: Callable[[], Any]) -> Any:
        before = count()
        out = call()
        steps[name] = count() - before
        return out

    job_id = step("upload_job", lambda: sqstore.upload_job(store, JOB, "sq", "alice"))
    step("upload_status", lambda: sqstore.upload_status(store, "sq", "alice", job_id))
    claimed = step("claim_job", lambda: sqstore.claim_job(store, "sq"))
    assert claimed is not None and claimed[1] == JOB, "the claimed job is the one submitted"
    done = sqstore.StatusMsg(job_id, "DONE", "ok", "None")
    finished = attrs.evolve(result, job_id=job_id)
    step("finish", lambda: sqstore.update_in_database(store, finished, done, job_id, "sq"))
    assert step("get_status", lambda: sqstore.get_status(store, "sq", "alice", job_id)) == done
    assert step("get_result", lambda: sqstore.get_result(store, "sq", "alice", job_id)).success
    return steps


@pytest.mark.slow
def test_mongodb_job_life_reads_back_nothing_it_wrote(mongodb_server: Any) -> None:
    """A MongoDB job life is 20 commands: a claim is 6 and a finish 8 (no lease read before a
    swap, no read-back of the claimed job, a move out of running is a copy and a delete)."""
    uri = mongo_uri(mongodb_server)
    mongo_reset(uri)
    client, counter = counted_client(uri)
    steps = life_steps(sqstore.mongodb_storage(client), lambda: len(counter.commands))
    assert steps == {
        "upload_job": 1,  # insert
        "upload_status": 2,  # config, insert
        "claim_job": 6,  # config (heartbeat), list step, lease insert, move: find, insert, delete
        "finish": 8,  # config, lease, lease swap, result, move: aggregate, delete, status, lease
        "get_status": 1,
        "get_result": 2,  # result, config (backend_name)
    }, steps


@pytest.mark.slow
def test_mongodb_claim_while_draining_is_four_commands(mongodb_server: Any) -> None:
    """claim_jobs draining a queue costs a lease insert and a three-command move per job, and
    one list step per 64 ids: the job is not read again after the move that read it."""
    uri = mongo_uri(mongodb_server)
    mongo_reset(uri)
    client, counter = counted_client(uri)
    store = sqstore.mongodb_storage(client)
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    sqstore.timestamp_queue(store, "sim")
    jobs = {sqstore.upload_job(store, {"n": n}, "sim", "alice"): {"n": n} for n in range(30)}
    counter.commands.clear()
    claimed = {next_job.job_id: job for next_job, job in sqstore.claim_jobs(store, "sim")}
    assert claimed == jobs
    # 4 per job; one heartbeat's config read; the walk's finds: a page, then empty ones
    # as it comes round (twice: the pass that ends, the pass that finds nothing)
    assert len(counter.commands) <= 4 * len(jobs) + 5, counter.commands


@pytest.mark.slow
def test_mongodb_swap_of_what_was_read_is_one_command(mongodb_server: Any) -> None:
    """A swap sends one conditional command and never a read first; it still refuses a
    document that changed in any way (an extra field, a null that is now missing, an array
    that now holds the value) and raises NotFoundError for a missing one."""
    uri = mongo_uri(mongodb_server)
    mongo_reset(uri)
    client, counter = counted_client(uri)
    store = sqstore.mongodb_storage(client)
    doc = {"a": 1, "s": "$x", "f": None, "n": {"p": [1, [2]], "q": "z"}}
    store["upload"]("jobs/leases", "x", doc)
    counter.commands.clear()
    assert store["swap"]("jobs/leases", "x", doc, {**doc, "a": 2})
    assert counter.commands == ["update"], counter.commands
    assert store["get"]("jobs/leases", "x") == {**doc, "a": 2}
    counter.commands.clear()
    assert store["swap"]("jobs/leases", "x", {**doc, "a": 2}, None)
    assert counter.commands == ["delete"], counter.commands
    store["upload"]("jobs/leases", "x", doc)
    for stale in (
        {**doc, "g": None},  # g is missing, not null
        {k: v for k, v in doc.items() if k != "f"},  # f is there
        {**doc, "n": {"p": [2], "q": "z"}},  # p holds [2], it is not [2]
        {**doc, "a": [1]},
    ):
        assert not store["swap"]("jobs/leases", "x", stale, {"taken": True}), stale
        assert not store["swap"]("jobs/leases", "x", stale, None), stale
    assert store["get"]("jobs/leases", "x") == doc
    reordered = {"n": {"q": "z", "p": [1, [2]]}, "f": None, "s": "$x", "a": 1}
    assert store["swap"]("jobs/leases", "x", reordered, {"b": 1}), "equal as JSON: swapped"
    with pytest.raises(sqstore.NotFoundError):
        store["swap"]("jobs/leases", "y", doc, None)


@pytest.mark.slow
def test_mongodb_move_out_of_running_is_two_commands(mongodb_server: Any) -> None:
    """A move to any folder but running copies on the server and deletes (two commands);
    it still refuses a different document in the target and a missing source."""
    uri = mongo_uri(mongodb_server)
    mongo_reset(uri)
    client, counter = counted_client(uri)
    store = sqstore.mongodb_storage(client)
    ids = hex_ids(3)
    for doc_id in ids:
        store["upload"]("jobs/running", doc_id, {"id": doc_id, "deep": [[1], {"k": None}]})
    counter.commands.clear()
    store["move"]("jobs/running", "jobs/finished/sim", ids[0])
    assert counter.commands == ["aggregate", "delete"], counter.commands
    assert store["get"]("jobs/finished/sim", ids[0]) == {"id": ids[0], "deep": [[1], {"k": None}]}
    assert store["list"]("jobs/running") == ids[1:]
    with pytest.raises(sqstore.NotFoundError):
        store["move"]("jobs/running", "jobs/finished/sim", ids[0])
    store["upload"]("jobs/finished/sim", ids[1], {"other": 1})
    with pytest.raises(sqstore.AlreadyExistsError):
        store["move"]("jobs/running", "jobs/finished/sim", ids[1])
    assert store["get"]("jobs/running", ids[1])["id"] == ids[1]
    store["upload"]("jobs/finished/sim", ids[2], store["get"]("jobs/running", ids[2]))
    store["move"]("jobs/running", "jobs/finished/sim", ids[2])  # a half-done move completes
    assert store["list"]("jobs/running") == [ids[1]]


@pytest.mark.slow
def test_dropbox_job_life_is_18_requests(dbx: Storage, dropbox_fake: Any) -> None:
    """A Dropbox job life on one handle is 18 HTTP requests: the final status overwrites the
    rev this handle wrote, with no existence check first."""
    steps = life_steps(dbx, lambda: sum(dropbox_fake.counts.values()))
    assert steps["finish"] == 7 and sum(steps.values()) == 18, steps


@pytest.mark.slow
def test_dropbox_update_at_a_known_rev_still_replaces_and_refuses(
    dbx: Storage, dropbox_fake: Any
) -> None:
    """An update of a file this handle saw is one request; if another client changed it
    since, it is still replaced (the last writer wins); a file deleted since is NotFoundError."""
    other = dropbox_store(dropbox_fake)
    dropbox_fake.reset_counts()
    dbx["upload"]("jobs/a", "x", {"v": 1})
    dbx["update"]("jobs/a", "x", {"v": 2})
    files = {k: v for k, v in dropbox_fake.counts.items() if k.startswith("/2/files/")}
    assert files == {"/2/files/upload": 2}, files
    other["update"]("jobs/a", "x", {"v": 3})
    dbx["update"]("jobs/a", "x", {"v": 4})
    assert other["get"]("jobs/a", "x") == {"v": 4}
    other["delete"]("jobs/a", "x")
    with pytest.raises(sqstore.NotFoundError):
        dbx["update"]("jobs/a", "x", {"v": 5})
    assert other["list"]("jobs/a") == []


def counted_opens(monkeypatch: pytest.MonkeyPatch) -> collections.Counter[str]:
    """Count this process's file opens (``os.open`` and ``openat2``) and reads, by kind."""
    if sys.platform != "linux":
        pytest.skip("openat2 is Linux's")
    counts: collections.Counter[str] = collections.Counter()
    real_open, real_read, make = os.open, os.read, sqstore._openat2_beneath

    def opening(*args: Any, **kwargs: Any) -> int:
        counts["open"] += 1
        return real_open(*args, **kwargs)

    def reading(fd: int, size: int) -> bytes:
        counts["read"] += 1
        return real_read(fd, size)

    def beneath() -> Any:
        call = make()
        if call is None:
            skip_or_fail("this kernel or sandbox has no openat2")

        def opening_beneath(folder: int, name: str, flags: int) -> int:
            counts["openat2"] += 1
            return call(folder, name, flags)

        return opening_beneath

    monkeypatch.setattr(os, "open", opening)
    monkeypatch.setattr(os, "read", reading)
    monkeypatch.setattr(sqstore, "_openat2_beneath", beneath)
    return counts


def test_local_get_opens_the_root_and_the_document_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local get opens the root, then the document in one openat2 that follows no link
    on the way, and reads it in one read; a missing one costs as much and is NotFoundError."""
    counts = counted_opens(monkeypatch)
    store = sqstore.local_storage(tmp_path / "store")
    store["upload"]("jobs/queued/sim", "x", {"v": 1})
    counts.clear()
    assert store["get"]("jobs/queued/sim", "x") == {"v": 1}
    assert counts == {"open": 1, "openat2": 1, "read": 1}, counts
    counts.clear()
    with pytest.raises(sqstore.NotFoundError, match="jobs/queued/sim/y does not exist"):
        store["get"]("jobs/queued/sim", "y")
    with pytest.raises(sqstore.NotFoundError, match="jobs/running/sim/x does not exist"):
        store["get"]("jobs/running/sim", "x")
    assert counts == {"open": 2, "openat2": 2}, counts
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x.json").write_text('{"secret": 1}')
    (tmp_path / "store" / "jobs" / "lnk").symlink_to(tmp_path / "outside")
    with pytest.raises(sqstore.StorageError, match=r"jobs/lnk is a symlink"):
        store["get"]("jobs/lnk", "x")


def test_local_folder_opens_take_one_call_below_the_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write, a move and a swap open each folder below the root in one openat2, however
    deep: one local job life opens at most 50 files and folders (it was 82)."""
    counts = counted_opens(monkeypatch)
    store = sqstore.local_storage(tmp_path / "store")
    store["upload"]("jobs/queued/sim", "x", {"v": 1})
    store["upload"]("jobs/running/sim", "y", {"v": 1})
    counts.clear()
    store["move"]("jobs/queued/sim", "jobs/running/sim", "x")
    assert counts["openat2"] == 2 and counts["open"] == 2, counts  # the root, twice
    counts.clear()
    assert store["swap"]("jobs/running/sim", "x", {"v": 1}, {"v": 2})
    assert counts["openat2"] == 1 and counts["open"] == 4, counts  # root, lock, it, temp file
    monkeypatch.undo()
    counts = counted_opens(monkeypatch)
    store = sqstore.local_storage(tmp_path / "life")
    sqstore.upload_config(store, sqstore.demo_config("bench"), "bench")
    one_life(store, "bench")  # the folders are made, the heartbeat written
    counts.clear()
    one_life(store, "bench")
    assert counts["open"] + counts["openat2"] <= 50, counts


def test_local_storage_without_openat2_walks_one_name_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where openat2 is refused (an old kernel, a sandbox), every verb still works and
    a planted link is still refused, by opening one name at a time."""
    import errno

    refusals = []

    def refusing() -> Callable[[int, str, int], int]:
        def refuse(folder: int, name: str, flags: int) -> int:
            refusals.append(name)
            raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS), name)

        return refuse

    monkeypatch.setattr(sqstore, "_openat2_beneath", refusing)
    store = sqstore.local_storage(tmp_path / "store")
    store["upload"]("jobs/queued/sim", "x", {"v": 1})
    store["move"]("jobs/queued/sim", "jobs/running/sim", "x")
    assert store["get"]("jobs/running/sim", "x") == {"v": 1}
    assert store["swap"]("jobs/running/sim", "x", {"v": 1}, None)
    assert len(refusals) == 1, "refused once, then never asked again"
    (tmp_path / "store" / "jobs" / "lnk").symlink_to(tmp_path)
    with pytest.raises(sqstore.StorageError, match=r"jobs/lnk is a symlink"):
        store["get"]("jobs/lnk", "x")


@pytest.mark.usefixtures("configured")
def test_a_claim_parses_its_backends_config_once(
    store: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """claim_job structures the config its heartbeat read once: the signed-jobs policy is
    read from that same, already checked document, not structured a second time."""
    sqstore.timestamp_queue(store, "sim")
    parsed: list[type] = []
    real = sqstore.from_doc

    def counting(doc: Any, cls: type[Any], **kwargs: Any) -> Any:
        parsed.append(cls)
        return real(doc, cls, **kwargs)

    monkeypatch.setattr(sqstore, "from_doc", counting)
    for n in range(3):
        job_id = sqstore.upload_job(store, {"n": n}, "sim", "alice")
        parsed.clear()
        claimed = sqstore.claim_job(store, "sim")
        assert claimed is not None and claimed[0].job_id == job_id
        assert parsed.count(sqstore.BackendConfig) == 1, parsed


def test_a_local_job_life_decodes_json_without_sniffing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What sqstore wrote is read as UTF-8 at once: json.detect_encoding is called for no
    document of a job life (it was for each of its 10 reads); other encodings still read."""
    store = sqstore.local_storage(tmp_path / "store")
    sqstore.upload_config(store, sqstore.demo_config("bench"), "bench")
    one_life(store, "bench")
    sniffs: list[bytes] = []
    real = json.detect_encoding

    def sniffing(data: bytes) -> str:
        sniffs.append(data[:4])
        return real(data)

    monkeypatch.setattr(json, "detect_encoding", sniffing)
    one_life(store, "bench")
    assert sniffs == [], sniffs
    for text in ('{"\u00e9": "\u00e9"}', '{"é": "é"}'):
        for encoding in ("utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32-be"):
            (tmp_path / "store" / "x").mkdir(exist_ok=True)
            (tmp_path / "store" / "x" / "d.json").write_bytes(text.encode(encoding))
            assert store["get"]("x", "d") == {"é": "é"}, encoding


# ============================================================================
# One policy for claims, one sweep
# ============================================================================
@pytest.mark.usefixtures("configured")
def test_work_requeues_a_dead_workers_job_by_the_clock_it_is_given(store: Storage) -> None:
    """work() sweeps on its claims' heartbeat by the clock it is given: once that clock passes a
    dead worker's lease, the job is requeued, the requeue logged, and the job run."""
    job_id = sqstore.upload_job(store, JOB, "sim", "alice")
    sqstore.upload_status(store, "sim", "alice", job_id)
    dead = sqstore.LeasePolicy(holder="dead:1", lease_seconds=60)
    assert sqstore.claim_job(store, "sim", policy=dead, now=lambda: T0) is not None
    policy = sqstore.LeasePolicy(holder="alive:2", lease_seconds=60, heartbeat=10, skew=0)
    clock, lines = [T0 + 30], list[str]()

    def serve() -> int:
        return sqstore.work(
            [store], "sim", sqstore.run_simulator, policy=policy, now=lambda: clock[0],
            max_jobs=1, burst=True, log=lines.append,
        )  # fmt: skip

    assert serve() == 0 and lines == []  # within the lease: nothing to requeue
    assert jobs_in(store, "running") == [job_id]
    clock[0] = T0 + 61
    assert serve() == 1
    assert lines[0].endswith(f": requeued {job_id} (lease expired)")
    assert f" {job_id} DONE in " in lines[1] and len(lines) == 2
    done_once(store, job_id)


@pytest.mark.usefixtures("configured")
@pytest.mark.parametrize("other", ["polls", "clock ahead"])
def test_a_dead_workers_job_is_requeued_whoever_writes_the_heartbeat(
    store: Storage, other: str
) -> None:
    """work() sweeps at least once per heartbeat of its own clock, even when another program
    (sqooler 0.9 writes ``last_queue_check`` at every poll, or a worker whose clock is an
    hour ahead) keeps the heartbeat so fresh that no beat of this worker writes it: a dead
    worker's job is requeued, logged, and run within a few heartbeats."""
    job_id = sqstore.upload_job(store, JOB, "sim", "alice")
    dead = sqstore.LeasePolicy(holder="dead:1", lease_seconds=1)
    assert sqstore.claim_job(store, "sim", policy=dead, now=functools.partial(float, T0))
    if other == "clock ahead":
        assert sqstore.timestamp_queue(store, "sim", now=functools.partial(float, T0 + 3600))
    clock, stop, lines = [T0], threading.Event(), list[str]()

    def tick() -> float:  # a fake clock that moves a tenth of a second each time it is read
        clock[0] += 0.1
        if clock[0] > T0 + 60:
            stop.set()  # never requeued: give up
        return clock[0]

    def polled(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def get(path: str, doc_id: str) -> Any:
            if other == "polls" and path == sqstore.locate(store["layout"], "config", "sim")[0]:
                at = functools.partial(float, clock[0])  # the other program polls first
                sqstore.timestamp_queue(store, "sim", min_interval=0, now=at)
            return fn(path, doc_id)

        return get

    beside = sqstore.wrap_ops(store, polled, only=("get",))
    policy = sqstore.LeasePolicy(holder="alive:2", heartbeat=3, skew=0)
    served = sqstore.work(
        [beside], "sim", sqstore.run_simulator, policy=policy, now=tick, poll=0.001,
        max_jobs=1, stop=stop, log=lines.append,
    )  # fmt: skip
    assert served == 1, (other, lines)
    assert lines[0].endswith(f": requeued {job_id} (lease expired)"), lines
    assert clock[0] <= T0 + 1 + 3 * policy.heartbeat, clock[0] - T0
    done_once(store, job_id)


@pytest.mark.usefixtures("configured")
def test_claim_jobs_reports_what_its_heartbeat_sweep_requeued(store: Storage) -> None:
    """claim_jobs calls on_requeue with the ids each heartbeat's sweep requeued, then claims
    them like any queued job; a heartbeat that requeues nothing calls it not."""
    job_id = sqstore.upload_job(store, JOB, "sim", "alice")
    dead = sqstore.LeasePolicy(holder="dead:1", lease_seconds=60)
    assert sqstore.claim_job(store, "sim", policy=dead, now=lambda: T0) is not None
    policy = sqstore.LeasePolicy(holder="w", heartbeat=10, skew=0)
    seen: list[list[str]] = []
    early = sqstore.claim_jobs(store, "sim", policy=policy, now=lambda: T0 + 30,
                               on_requeue=seen.append)  # fmt: skip
    assert list(early) == [] and seen == []
    late = sqstore.claim_jobs(store, "sim", policy=policy, now=lambda: T0 + 61,
                              on_requeue=seen.append)  # fmt: skip
    assert [nxt.job_id for nxt, _ in late] == [job_id] and seen == [[job_id]]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lease_seconds", 0), ("lease_seconds", -1.0), ("lease_seconds", float("inf")),
        ("lease_seconds", float("nan")), ("lease_seconds", "60"), ("heartbeat", -1),
        ("heartbeat", float("inf")), ("skew", -1), ("skew", float("nan")), ("skew", True),
        ("max_attempts", 0), ("max_attempts", 2.5), ("holder", ""), ("holder", 7),
        ("lease_seconds", 1e308), ("lease_seconds", 10**400), ("lease_seconds", 5e-324),
        ("heartbeat", 10**400), ("skew", 10**400), ("holder", "(no lease)"),
    ],
)  # fmt: skip
def test_a_lease_policy_refuses_a_bad_value_by_name(field: str, value: Any) -> None:
    """A LeasePolicy with a bad value is a ValueError that names the field."""
    with pytest.raises(ValueError, match=rf"^LeasePolicy\.{field} "):
        sqstore.LeasePolicy(**{field: value})


def test_locate_job_and_wrap_ops_refuse_what_cannot_be_meant(store: Storage) -> None:
    """locate_job checks its names as its siblings do; wrap_ops takes only verbs."""
    for display_name, job_id in (("SIM", "abc"), (None, "abc"), ("sim", 5), ("sim", None)):
        with pytest.raises(sqstore.InvalidNameError):
            sqstore.locate_job(store, display_name, job_id)  # type: ignore[arg-type]
    for only in ("list", ("layout",), ("bogus",)):
        with pytest.raises(ValueError, match="verbs"):
            sqstore.wrap_ops(store, lambda op, fn: fn, only)


def test_a_lease_policy_defaults_to_the_documented_constants() -> None:
    """LeasePolicy() is this process's holder with the DEFAULT_* constants, and frozen."""
    policy = sqstore.LeasePolicy()
    assert policy == sqstore.LeasePolicy(
        None, sqstore.DEFAULT_LEASE, sqstore.DEFAULT_HEARTBEAT, sqstore.DEFAULT_SKEW,
        sqstore.DEFAULT_MAX_ATTEMPTS,
    )  # fmt: skip
    assert sqstore.LeasePolicy(skew=0, max_attempts=1, holder="h:1").skew == 0
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        policy.skew = 0  # type: ignore[misc]


def test_the_lease_keywords_are_said_once_in_a_policy() -> None:
    """No public function takes holder, lease_seconds, heartbeat, skew, max_attempts or grace
    on its own; those that took them take ``policy`` (keyword-only, default LeasePolicy())."""
    old = {"holder", "lease_seconds", "heartbeat", "skew", "max_attempts", "grace"}
    import inspect

    takers = set()
    for name in sqstore.__all__:
        obj = getattr(sqstore, name)
        if not inspect.isfunction(obj):
            continue
        params = inspect.signature(obj).parameters
        assert not old & set(params), name
        if "policy" in params:
            takers.add(name)
            assert params["policy"].kind is inspect.Parameter.KEYWORD_ONLY, name
            assert params["policy"].default == sqstore.LeasePolicy(), name
    assert takers == {
        "claim_job", "claim_jobs", "get_next_job_in_queue", "lease_expired", "queue_stats",
        "renew_lease", "requeue_expired", "update_in_database", "work",
    }  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["running", "sim", "--skew", "-1"], "--skew must be 0 to 1e+09 (seconds)"),
        (["requeue", "sim", "--skew", "nan"], "--skew must be 0 to 1e+09 (seconds)"),
        (["requeue", "sim", "--lease", "1e10"], "--lease must be 0.001 to 1e+09 (seconds)"),
        (["work", "sim", "--lease", "0"], "--lease must be 0.001 to 1e+09 (seconds)"),
        (["work", "sim", "--heartbeat", "inf"], "--heartbeat must be 0 to 1e+09 (seconds)"),
        (["work", "sim", "--max-attempts", "0"], "--max-attempts must be a positive int"),
    ],
)
def test_the_cli_refuses_a_bad_lease_option_by_its_flag(
    tmp_path: Path, args: list[str], message: str
) -> None:
    """The lease options of running, requeue and work make one LeasePolicy: a bad value is one
    line naming the option, exit 1."""
    sqstore.upload_config(sqstore.local_storage(tmp_path), sqstore.demo_config("sim"), "sim")
    proc = sqstore_cli("--storage", str(tmp_path), *args, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith(f"sqstore: error: {message}"), proc.stderr
    assert len(proc.stderr.splitlines()) == 1


@pytest.mark.slow
def test_sqstore_requeue_gives_up_a_job_after_the_fleets_max_attempts(tmp_path: Path) -> None:
    """``sqstore requeue --max-attempts N`` judges claims as a fleet run with that policy does:
    a job claimed four times by workers that died is requeued under 10, and at its fifth
    claim given up under the default 3."""
    store = sqstore.local_storage(tmp_path)
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    job_id = sqstore.upload_job(store, JOB, "sim", "alice")
    fleet = sqstore.LeasePolicy(holder="dead:1", lease_seconds=1, skew=0, max_attempts=10)
    past = time.time() - 1000  # the command judges leases by the real clock
    for attempt in range(3):  # three workers die holding it
        at = past + 10 * attempt
        assert sqstore.claim_job(store, "sim", policy=fleet, now=functools.partial(float, at))
        assert sqstore.requeue_expired(
            store, "sim", policy=fleet, now=functools.partial(float, at + 5)
        ) == [job_id]
    assert sqstore.claim_job(store, "sim", policy=fleet, now=functools.partial(float, past + 30))
    patient = sqstore_cli(
        "--storage", str(tmp_path), "requeue", "sim", "--skew", "0", "--max-attempts", "10",
        cwd=tmp_path,
    )  # fmt: skip
    assert patient.returncode == 0 and patient.stdout.split() == [job_id], patient.stderr
    assert sqstore.locate_job(store, "sim", job_id) == "queued"
    assert sqstore.claim_job(store, "sim", policy=fleet, now=functools.partial(float, past + 40))
    strict = sqstore_cli("--storage", str(tmp_path), "requeue", "sim", "--skew", "0", cwd=tmp_path)
    assert strict.returncode == 0 and strict.stdout.split() == [], strict.stderr
    assert sqstore.locate_job(store, "sim", job_id) == "deleted"


# ============================================================================
# The worker loop: real processes and signals
# ============================================================================
EXECUTOR = """
import os, time
import sqstore

def run(job, job_id, display_name):
    with open(os.environ["EXECUTED"], "a") as log:
        log.write(f"{display_name} {job_id}\\n")
    spec = job["experiment_0"]
    if spec.get("fail"):
        raise ValueError(f"boom in {job_id}")
    time.sleep(spec.get("sleep", 0))
    return sqstore.run_simulator(job, job_id, display_name)
"""


def worker(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    """``python -m sqstore ... work`` with the test executor importable."""
    (tmp_path / "lab_executor.py").write_text(EXECUTOR)
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{tmp_path}"}
    env["EXECUTED"] = str(tmp_path / "executed.log")
    return subprocess.Popen(
        [sys.executable, "-m", "sqstore", *args],
        cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def executed(tmp_path: Path) -> list[str]:
    log = tmp_path / "executed.log"
    return log.read_text().split("\n")[:-1] if log.exists() else []


def job_with(**options: Any) -> dict[str, Any]:
    job = copy.deepcopy(JOB)
    job["experiment_0"].update(options)
    return job


@pytest.mark.slow
def test_work_serves_storages_in_turn_and_reports_failures(tmp_path: Path) -> None:
    """Two storages served in turn; an executor's exception is an ERROR status with its text;
    a dead worker's expired lease is requeued and its job run; --max-jobs ends with exit 0."""
    one, two = (sqstore.local_storage(tmp_path / name) for name in ("one", "two"))
    ids: dict[str, list[str]] = {"one": [], "two": []}
    for store in (one, two):
        sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    dead = sqstore.upload_job(one, JOB, "sim", "alice")
    expired = -sqstore.DEFAULT_SKEW - 2  # claimed so long ago that the lease ran out past the skew
    gone = sqstore.LeasePolicy(holder="dead", lease_seconds=1)
    assert sqstore.claim_job(one, "sim", policy=gone, now=lambda: time.time() + expired) is not None
    ids["one"] += [dead, sqstore.upload_job(one, job_with(fail=True), "sim", "alice")]
    ids["two"] += [sqstore.upload_job(two, JOB, "sim", "bob") for _ in range(2)]
    for name, store in (("one", one), ("two", two)):
        for job_id in ids[name]:
            sqstore.upload_status(store, "sim", "u", job_id)
    proc = worker(tmp_path, "--storage", str(tmp_path / "one"), "work", "sim",
                  "lab_executor:run", "--also", f"file://{tmp_path / 'two'}",
                  "--max-jobs", "4", "--poll", "0.05")  # fmt: skip
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    order = [line.split()[1] for line in executed(tmp_path)]
    assert order == [ids["one"][0], ids["two"][0], ids["one"][1], ids["two"][1]]
    failed = ids["one"][1]
    status = sqstore.get_status(one, "sim", "u", failed)
    assert (status.status, status.error_message) == ("ERROR", f"ValueError: boom in {failed}")
    assert sqstore.get_job(one, "jobs/deleted", failed)["experiment_0"]["fail"] is True
    for name, store in (("one", one), ("two", two)):
        for job_id in ids[name]:
            if job_id != failed:
                assert sqstore.get_status(store, "sim", "u", job_id).status == "DONE"
                assert sqstore.get_result(store, "sim", "u", job_id).status == "DONE"
        assert store["list"]("jobs/leases") == store["list"]("jobs/running") == []
    assert f"local1 {failed} ERROR" in err and f"local2 {ids['two'][1]} DONE" in err
    assert f"local1: requeued {dead} (lease expired)" in err
    assert "finished 4 jobs" in err and out == ""


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_work_renews_a_long_lease_and_stops_cleanly_on_a_signal(
    tmp_path: Path, signum: int
) -> None:
    """A job three times longer than its lease is renewed, so a second worker that requeues
    expired leases never runs it twice; a signal lets the job finish, then exit 0."""
    root = tmp_path / "store"
    store = sqstore.local_storage(root)
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    long_job = sqstore.upload_job(store, job_with(sleep=6), "sim", "alice")
    sqstore.upload_status(store, "sim", "alice", long_job)
    common = ("--lease", "2", "--heartbeat", "0.2", "--poll", "0.05")
    first = worker(tmp_path, "--storage", str(root), "work", "sim", "lab_executor:run", *common)
    deadline = time.monotonic() + 60
    while not executed(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert executed(tmp_path) == [f"sim {long_job}"]
    second = worker(tmp_path, "--storage", str(root), "work", "sim", "lab_executor:run", *common)
    quick = [sqstore.upload_job(store, JOB, "sim", "bob") for _ in range(3)]
    time.sleep(1)
    first.send_signal(signum)  # mid-job: the long job still has seconds to go
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert err.index(f"{signal.Signals(signum).name}: stopping") < err.index(f"{long_job} DONE")
    deadline = time.monotonic() + 60
    while len(executed(tmp_path)) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=120) == 0
    assert sorted(executed(tmp_path)) == sorted(f"sim {j}" for j in [long_job, *quick])
    assert sqstore.get_status(store, "sim", "alice", long_job).status == "DONE"
    assert store["list"]("jobs/leases") == store["list"]("jobs/running") == []


@pytest.mark.slow
def test_work_refuses_a_bad_executor_or_option(tmp_path: Path) -> None:
    """A missing executor, a non-positive option, a storage without the backend or a signing
    backend without --key is one clear line and exit 1, before any job is claimed."""
    store = tmp_path / "store"
    sqstore.upload_config(sqstore.local_storage(store), sqstore.demo_config("sim"), "sim")
    private, _ = sqstore.generate_keypair("k")
    signs = sqstore.local_storage(tmp_path / "signs")
    sqstore.upload_config(signs, sqstore.demo_config("sim", sign=True), "sim", private)
    for args, message in (
        (["nosuch_module:run"], "No module named 'nosuch_module'"),
        (["lab_executor"], "module:function"),
        (["lab_executor:nothing"], "has no attribute 'nothing'"),
        (["--poll", "0"], "--poll must be positive"),
        (["--poll", "nan"], "--poll must be positive"),
        (["--poll", "inf"], "--poll must be positive"),
        (["--max-jobs", "0"], "--max-jobs must be positive"),
        (["--also", str(tmp_path / "empty")], "no storage at"),
        (["--also", str(tmp_path / "signs")], "signs: give its --key"),
    ):
        proc = worker(tmp_path, "--storage", str(store), "work", "sim", *args)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1 and err.startswith("sqstore: error: ") and message in err


def test_work_function_runs_in_process_until_stopped() -> None:
    """work() returns the number finished; a set stop event ends an idle loop at once."""
    store = sqstore.memory_storage()
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    for _ in range(3):
        sqstore.upload_job(store, JOB, "sim", "alice")
    lines: list[str] = []
    assert sqstore.work([store], "sim", sqstore.run_simulator, max_jobs=2, log=lines.append) == 2
    assert len(lines) == 2 and all(" DONE in " in line for line in lines)
    stop = threading.Event()
    stop.set()
    assert sqstore.work([store], "sim", sqstore.run_simulator, stop=stop) == 0
    assert len(store["list"]("jobs/queued/sim")) == 1
    with pytest.raises(ValueError, match="at least one store"):
        sqstore.work([], "sim", sqstore.run_simulator)


# ============================================================================
# Cancel and signed submissions
# ============================================================================
def queued_job(store: Storage, job: Any = None, key: Any = None, user: str = "alice") -> str:
    """A job of *user* for backend 'sim' (configured if need be), queued with its status."""
    if "sim" not in sqstore.get_backends(store):
        sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    job_id = sqstore.upload_job(store, job or JOB, "sim", user, private_jwk=key)
    sqstore.upload_status(store, "sim", user, job_id)
    return job_id


def test_cancel_a_queued_job_sets_it_aside_and_it_never_runs(store: Storage) -> None:
    """A queued job cancelled goes to deleted with an ERROR status naming who cancelled it,
    no worker ever gets it, and cancelling it again says it has finished."""
    job_id = queued_job(store)
    assert sqstore.cancel_job(store, "sim", "alice", job_id) == "cancelled"
    status = sqstore.get_status(store, "sim", "alice", job_id)
    assert (status.status, status.detail) == ("ERROR", "Cancelled by alice.")
    assert jobs_in(store, "deleted", job_id) == [job_id]
    assert sqstore.claim_job(store, "sim") is None
    assert sqstore.cancel_requested(store, job_id) is None
    assert sqstore.cancel_job(store, "sim", "alice", job_id) == "finished"
    assert sqstore.get_status(store, "sim", "alice", job_id).detail == "Cancelled by alice."


def test_cancel_of_a_finished_job_changes_nothing(store: Storage) -> None:
    """A job that ended already is left as it is: its status and result stay DONE."""
    job_id = queued_job(store)
    assert finish(store, "sim") == [job_id]
    assert sqstore.cancel_job(store, "sim", "alice", job_id) == "finished"
    done_once(store, job_id)
    assert sqstore.cancel_requested(store, job_id) is None


def test_cancel_refuses_bad_names_and_unknown_jobs(store: Storage) -> None:
    """Bad names are InvalidNameError, a job the backend does not have is NotFoundError, and
    on dated ids a job of another user or backend is not found either."""
    job_id = queued_job(store)
    for bad in (("si/m", "alice", job_id), ("sim", "../x", job_id), ("sim", "alice", "a/b")):
        with pytest.raises(sqstore.InvalidNameError):
            sqstore.cancel_job(store, *bad)
    other = sqstore.create_job_id(store, "sim", "alice")
    with pytest.raises(sqstore.NotFoundError, match=f"no job {other}"):
        sqstore.cancel_job(store, "sim", "alice", other)
    if store["layout"].job_ids == "dated":
        with pytest.raises(sqstore.NotFoundError, match="not a job of 'bob'"):
            sqstore.cancel_job(store, "sim", "bob", job_id)
    assert jobs_in(store, "queued") == [job_id]
    with pytest.raises(sqstore.NotFoundError):
        sqstore.cancel_requested(store, "a/b")


@pytest.mark.usefixtures("configured")
def test_cancel_races_a_claim_paused_at_each_step(store: Storage) -> None:
    """A cancel acting between any two storage calls of a claim, and a claim acting between
    any two of a cancel's, either wins (the job never runs) or loses (the job is claimed
    and its worker sees the request): never both, never neither."""
    for paused in ("claim", "cancel"):
        for index in range(1, 40):
            job_id = queued_job(store)
            seen: dict[str, Any] = {}

            def cancel(s: Storage = store, j: str = job_id, seen: dict[str, Any] = seen) -> None:
                seen["cancel"] = sqstore.cancel_job(s, "sim", "alice", j)

            def claim(s: Storage = store, seen: dict[str, Any] = seen) -> None:
                seen["claim"] = sqstore.claim_job(s, "sim", policy=sqstore.LeasePolicy(holder="w"))

            if paused == "claim":
                claim(paused_at(store, index, cancel))
            else:
                cancel(paused_at(store, index, claim))
            if "cancel" not in seen or "claim" not in seen:
                break  # fewer calls than index: every pause point was tried
            where = f"{paused} paused at call {index}"
            if seen["cancel"] == "cancelled":
                assert seen["claim"] is None, where
                assert job_id in jobs_in(store, "deleted", job_id), where
            else:
                assert seen["cancel"] == "requested", where
                assert seen["claim"] is not None and seen["claim"][0].job_id == job_id, where
                assert sqstore.cancel_requested(store, job_id) == "alice", where
                finish_as(store, job_id, seen["claim"][1], "w")
        else:
            pytest.fail(f"the {paused} should make fewer than 40 calls")


CANCEL_RACE_CLAIMER = """
import os, sys, time
import sqstore

store = sqstore.open_storage(sys.argv[1])
with open(sys.argv[2], "a") as log:
    for _ in range(400):
        claimed = sqstore.claim_job(store, "sim", policy=sqstore.LeasePolicy(holder=sys.argv[3]))
        if claimed is None:
            continue
        job_id = claimed[0].job_id
        log.write(f"{job_id} {sqstore.cancel_requested(store, job_id)}\\n")
        log.flush()
        while not os.path.exists(sys.argv[4]):  # one claim each before the cancels start
            time.sleep(0.001)
        result = sqstore.run_simulator(claimed[1], job_id, "sim")
        status = sqstore.StatusMsg(job_id, "DONE", "ok", "None")
        mine = sqstore.LeasePolicy(holder=sys.argv[3])
        sqstore.update_in_database(store, result, status, job_id, "sim", policy=mine)
"""

CANCEL_RACE_CANCELLER = """
import json, os, sys, time
import sqstore

store = sqstore.open_storage(sys.argv[1])
go, logs, job_ids = sys.argv[2], sys.argv[3:5], sys.argv[5:]
while not all(os.path.exists(log) and os.path.getsize(log) for log in logs):
    time.sleep(0.001)
outcomes = {job_ids[0]: sqstore.cancel_job(store, "sim", "alice", job_ids[0])}
open(go, "w").close()  # the rest race the claims
outcomes |= {job_id: sqstore.cancel_job(store, "sim", "alice", job_id) for job_id in job_ids[1:]}
print(json.dumps(outcomes))
"""


@pytest.mark.slow
def test_cancel_races_claiming_workers_in_real_processes(tmp_path: Path) -> None:
    """Two worker processes claim while a third cancels every job: each job was either
    cancelled and never run, or claimed and run, with the request there when the cancel said
    so; never both, never neither, and no job is claimed twice."""
    root = tmp_path / "store"
    store = sqstore.local_storage(root)
    job_ids = [queued_job(store) for _ in range(40)]
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    url = f"file://{root}"
    go, logs = str(tmp_path / "go"), [str(tmp_path / f"w{i}.log") for i in range(2)]
    claimers = [
        subprocess.Popen(
            [sys.executable, "-c", CANCEL_RACE_CLAIMER, url, logs[i], f"w{i}", go],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    canceller = subprocess.run(
        [sys.executable, "-c", CANCEL_RACE_CANCELLER, url, go, *logs, *job_ids[::-1]],
        env=env, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    for proc in claimers:
        assert proc.wait(timeout=300) == 0, proc.stderr.read() if proc.stderr else ""
    outcomes = json.loads(canceller.stdout)
    lines = [
        ln.split()
        for i in range(2)
        for ln in (tmp_path / f"w{i}.log").read_text().split("\n")
        if ln
    ]
    ran = collections.Counter(job_id for job_id, _ in lines)
    assert max(ran.values(), default=1) == 1
    for job_id in job_ids:
        if outcomes[job_id] == "cancelled":
            assert job_id not in ran
            assert sqstore.get_status(store, "sim", "alice", job_id).detail == "Cancelled by alice."
        else:
            assert job_id in ran, (job_id, outcomes[job_id])
            assert sqstore.get_status(store, "sim", "alice", job_id).status == "DONE"
        if outcomes[job_id] == "requested":
            assert sqstore.cancel_requested(store, job_id) == "alice"
    assert "cancelled" in outcomes.values() and len(ran) > 0, (outcomes, ran)


@pytest.mark.slow
def test_work_hands_the_cancel_request_to_its_executor(store: Storage) -> None:
    """A running job's cancel request reaches an executor that takes ``cancel=`` (an event it
    polls) at a lease renewal; the job ends ERROR, cancelled, without a result."""
    job_id = queued_job(store)
    started, seen = threading.Event(), {}

    def executor(job: Any, jid: str, dn: str, cancel: threading.Event) -> Any:
        started.set()
        seen["cancelled"] = cancel.wait(60)
        return sqstore.run_simulator(job, jid, dn)

    worker = threading.Thread(
        target=sqstore.work, args=([store], "sim", executor),
        kwargs={"max_jobs": 1, "policy": sqstore.LeasePolicy(lease_seconds=0.6), "poll": 0.05},
    )  # fmt: skip
    worker.start()
    assert started.wait(60)
    assert sqstore.cancel_job(store, "sim", "alice", job_id) == "requested"
    worker.join(120)
    assert not worker.is_alive() and seen["cancelled"]
    status = sqstore.get_status(store, "sim", "alice", job_id)
    assert (status.status, status.detail) == ("ERROR", "Cancelled by alice.")
    assert "result was dropped" in status.error_message
    assert sqstore.get_result(store, "sim", "alice", job_id).status == "ERROR"  # none stored
    assert jobs_in(store, "deleted", job_id) == [job_id]
    assert sqstore.cancel_requested(store, job_id) is None


@pytest.mark.slow
def test_work_honours_a_cancel_that_its_executor_ignores(store: Storage) -> None:
    """An executor that never looks at the request still has its job end cancelled: work()
    looks once more before finishing, drops the result and writes the cancelled status."""
    job_id = queued_job(store)
    started, release = threading.Event(), threading.Event()

    def executor(job: Any, jid: str, dn: str) -> Any:
        started.set()
        release.wait(60)
        return sqstore.run_simulator(job, jid, dn)

    lines: list[str] = []
    worker = threading.Thread(
        target=sqstore.work, args=([store], "sim", executor),
        kwargs={"max_jobs": 1, "poll": 0.05, "log": lines.append},
    )  # fmt: skip
    worker.start()
    assert started.wait(60)
    assert sqstore.cancel_job(store, "sim", "alice", job_id) == "requested"
    release.set()
    worker.join(120)
    assert sqstore.get_status(store, "sim", "alice", job_id).detail == "Cancelled by alice."
    assert not sqstore.get_result(store, "sim", "alice", job_id).results
    assert any(f"{job_id} ERROR" in line for line in lines), lines


def test_cli_cancel_prints_the_outcome_and_refuses_unknown_jobs(tmp_path: Path) -> None:
    """`sqstore cancel` prints what happened (exit 0); an unknown job is one error line, exit 1."""
    store = sqstore.local_storage(tmp_path / "data")
    job_id = queued_job(store, user="cli")
    proc = run_cli("--storage", "data", "cancel", "sim", job_id, cwd=tmp_path)
    assert (proc.returncode, proc.stdout) == (0, f"{job_id}: cancelled\n"), proc.stderr
    assert sqstore.get_status(store, "sim", "cli", job_id).detail == "Cancelled by cli."
    other = sqstore.create_job_id(store, "sim", "cli")
    proc = run_cli("--storage", "data", "cancel", "sim", other, "-u", "alice", cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"no job {other!r} on backend 'sim' at data" in proc.stderr


def test_readme_command_table_names_every_command_and_option() -> None:
    """The README's command table has a row for every subcommand, and that row's synopsis
    names each of its options and arguments."""
    import argparse

    rows = [
        line for line in readme_section("## Command line").splitlines() if line.startswith("| `")
    ]

    def commands(
        parser: argparse.ArgumentParser, prefix: str
    ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    has_verbs = any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)
                    if has_verbs:
                        yield from commands(sub, f"{prefix}{name} ")
                    else:
                        yield f"{prefix}{name}", sub

    missing = []
    for name, sub in commands(sqstore._parser(), "sqstore "):
        row = next(
            (r for r in rows if r.startswith(f"| `{name} ") or r.startswith(f"| `{name}`")), None
        )
        if row is None:
            missing.append(name)
            continue
        synopsis = re.split(r"(?<!\\)\|", row)[1]
        for action in sub._actions:
            if action.option_strings and "--help" not in action.option_strings:
                if not any(opt in synopsis for opt in action.option_strings):
                    missing.append(f"{name} {action.option_strings[-1]}")
            elif (
                not action.option_strings
                and (action.metavar or action.dest.upper()) not in synopsis
            ):
                missing.append(f"{name} {action.metavar or action.dest}")
    assert missing == [], "\n".join(missing)


def test_cli_signed_submission_from_submit_to_verify(tmp_path: Path) -> None:
    """`submit --key` signs a job with the user's key and publishes its public half;
    a backend requiring signed jobs runs it, `verify --job` checks the chain (exit 0) and
    fails (exit 1) for an unsigned job; a token used for another job is one line, exit 1."""
    store = sqstore.local_storage(tmp_path / "data")
    bob, bob_public = sqstore.generate_keypair("bobkey")
    config = attrs.evolve(sqstore.demo_config("sim", sign=True), require_signed_jobs=True)
    sqstore.upload_config(store, config, "sim", bob)
    sqstore.upload_public_key(store, bob_public, "sim")
    (tmp_path / "job.json").write_text(json.dumps(JOB))
    assert run_cli("keygen", "alicekey", "-o", "alice.jwk", cwd=tmp_path).returncode == 0
    cli = ("--storage", "data")
    signed = run_cli(*cli, "submit", "sim", "job.json", "-u", "alice", "--key", "alice.jwk",
                     cwd=tmp_path)  # fmt: skip
    assert signed.returncode == 0, signed.stderr
    plain = run_cli(*cli, "submit", "sim", "job.json", "-u", "mallory", cwd=tmp_path)
    signed_id, plain_id = signed.stdout.strip(), plain.stdout.strip()
    assert sqstore.get_public_key_from_kid(store, "alicekey", role="user").kid == "alicekey"
    assert (
        sqstore.work([store], "sim", sqstore.run_simulator, bob, burst=True) == 1
    )  # one set aside
    ok = run_cli(*cli, "verify", "sim", signed_id, "--job", "-u", "alice", cwd=tmp_path)
    assert (ok.returncode, ok.stdout) == (0, f"{signed_id}: job and result verified\n"), ok.stderr
    bad = run_cli(*cli, "verify", "sim", plain_id, "--job", "-u", "mallory", cwd=tmp_path)
    assert (bad.returncode, bad.stdout) == (1, f"{plain_id}: NOT VERIFIED\n"), bad.stderr
    # the job's document pruned, its result kept: the chain cannot be checked, so no "valid"
    later = time.time() + 2 * 86_400
    sqstore.prune(store, "sim", older_than=86_400, keep_results=30 * 86_400, now=lambda: later)
    assert run_cli(*cli, "verify", "sim", signed_id, cwd=tmp_path).returncode == 0  # the result
    gone = run_cli(*cli, "verify", "sim", signed_id, "--job", "-u", "alice", cwd=tmp_path)
    assert (gone.returncode, gone.stdout) == (1, ""), gone.stdout
    assert "cannot check the chain" in gone.stderr and gone.stderr.count("\n") == 1
    first = run_cli(*cli, "submit", "sim", "job.json", "--token", "t1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    (tmp_path / "other.json").write_text(json.dumps(job_with(shots=7)))
    clash = run_cli(*cli, "submit", "sim", "other.json", "--token", "t1", cwd=tmp_path)
    assert clash.returncode == 1 and clash.stderr.count("\n") == 1, clash.stderr
    assert "token 't1' on backend 'sim' at data was used for another job" in clash.stderr
    assert "leases" not in clash.stderr  # no internal folder


@pytest.fixture
def user_keys(store: Storage) -> tuple[sqstore.JWK, sqstore.JWK]:
    """Alice's key pair, her public key published as a user key."""
    private, public = sqstore.generate_keypair("alicekey")
    sqstore.upload_public_key(store, public, "alice", role="user")
    return private, public


def strict_config(**fields: Any) -> sqstore.BackendConfig:
    return attrs.evolve(sqstore.demo_config("sim"), **fields)


def test_a_backend_requiring_signed_jobs_sets_the_others_aside(
    store: Storage, user_keys: tuple[sqstore.JWK, sqstore.JWK]
) -> None:
    """With ``require_signed_jobs``, claims run only jobs signed with a published user key over
    that very job; unsigned, unknown-key, tampered and replayed jobs go to deleted with an
    ERROR status naming the reason, and the queue keeps flowing."""
    private = user_keys[0]
    sqstore.upload_config(store, strict_config(require_signed_jobs=True), "sim")
    good = queued_job(store, key=private)
    unsigned = queued_job(store)
    stranger = queued_job(store, key=sqstore.generate_keypair("mallory")[0])
    tampered = queued_job(store, key=private)
    store["update"](*place(store, "queued", tampered), job_with(shots=999))
    replayed = queued_job(store, job=JOB)
    signatures = f"{folder(store, 'status')}/signatures"
    store["upload"](signatures, replayed, store["get"](signatures, good))
    assert finish(store, "sim") == [good]
    reasons = {
        unsigned: "the job is not signed",
        stranger: "signed with an unknown key 'mallory'",
        tampered: "the job was changed after it was signed",
        replayed: "its signature is that of another job",
    }
    for job_id, why in reasons.items():
        status = sqstore.get_status(store, "sim", "alice", job_id)
        assert status.status == "ERROR" and why in status.error_message, (why, status)
        assert status.detail == "The job was set aside: its signature is not accepted."
        assert job_id in jobs_in(store, "deleted", job_id)


def test_accepted_kids_limit_which_user_keys_a_backend_runs(
    store: Storage, user_keys: tuple[sqstore.JWK, sqstore.JWK]
) -> None:
    """``accepted_kids`` names the user keys a backend runs jobs of: a job signed with another
    published key is set aside, naming its kid."""
    other, other_public = sqstore.generate_keypair("carolkey")
    sqstore.upload_public_key(store, other_public, "carol", role="user")
    sqstore.upload_config(store, strict_config(accepted_kids=("alicekey",)), "sim")
    good = queued_job(store, key=user_keys[0])
    refused = queued_job(store, key=other, user="carol")
    assert finish(store, "sim") == [good]
    status = sqstore.get_status(store, "sim", "carol", refused)
    assert "key 'carolkey', which this backend does not accept" in status.error_message


def test_a_backend_without_the_requirement_runs_every_job(
    store: Storage, user_keys: tuple[sqstore.JWK, sqstore.JWK]
) -> None:
    """Unsigned backends behave as before: signed and unsigned jobs run, and their config
    document carries no new field."""
    signed_job = queued_job(store, key=user_keys[0])
    plain = queued_job(store)
    assert finish(store, "sim") == [signed_job, plain]
    raw = store["get"](*place(store, "configs", ""))
    assert "require_signed_jobs" not in raw and "accepted_kids" not in raw


def test_verify_job_checks_the_chain_from_submission_to_result(
    signed: Storage, keys: tuple[sqstore.JWK, sqstore.JWK]
) -> None:
    """verify_job is True for a signed job whose signed result names it; False for an
    unsigned job, a job changed after signing, or another job's result in its place."""
    store = signed
    alice, alice_public = sqstore.generate_keypair("alicekey")
    sqstore.upload_public_key(store, alice_public, "alice", role="user")
    first, second = (queued_job(store, key=alice) for _ in range(2))
    unsigned = queued_job(store)
    assert finish(store, "sim", keys[0]) == [first, second, unsigned]
    assert sqstore.verify_job(store, "sim", "alice", first)
    assert not sqstore.verify_job(store, "sim", "alice", unsigned)
    if store["layout"].job_ids != "dated":
        assert not sqstore.verify_job(store, "sim", "bob", first)  # signed for alice
    store["update"](*place(store, "results", first), store["get"](*place(store, "results", second)))
    assert not sqstore.verify_job(store, "sim", "alice", first)
    store["update"](*place(store, "finished", second), job_with(shots=1))
    assert not sqstore.verify_job(store, "sim", "alice", second)
    with pytest.raises(sqstore.NotFoundError):
        sqstore.verify_job(store, "sim", "alice", sqstore.create_job_id(store, "sim", "alice"))


@pytest.mark.usefixtures("configured")
def test_signed_submission_bad_input_gives_clear_errors(store: Storage) -> None:
    """A public key cannot sign a job, and a config's accepted_kids must be a list of strings."""
    public = sqstore.generate_keypair("alicekey")[1]
    with pytest.raises(sqstore.BadSignatureError, match="not a private key"):
        sqstore.upload_job(store, JOB, "sim", "alice", private_jwk=public)
    assert jobs_in(store, "queued") == []
    bad = {**sqstore.to_doc(sqstore.demo_config("sim")), "accepted_kids": "alicekey"}
    with pytest.raises(sqstore.InvalidDocumentError, match="accepted_kids"):
        sqstore.update_config(store, bad, "sim")


def test_sqooler_reads_signed_jobs_cancelled_jobs_and_strict_configs(
    shared: tuple[Any, Storage],
) -> None:
    """sqooler 0.9 loads a signed config that requires signed jobs, reads a signed job exactly
    as submitted (a job its spooler runs), and reads a cancelled job's status."""
    sqooler, store = shared
    bob, bob_public = sqstore.generate_keypair("bobkey")
    config = attrs.evolve(
        sqstore.demo_config("sq", sign=True), require_signed_jobs=True, accepted_kids=("alicekey",)
    )
    sqstore.upload_config(store, config, "sq", bob)
    sqstore.upload_public_key(store, bob_public, "sq")
    alice, alice_public = sqstore.generate_keypair("alicekey")
    sqstore.upload_public_key(store, alice_public, "alice", role="user")
    assert sqooler.get_config("sq").display_name == "sq"
    assert sqooler.get_backend_dict("sq").backend_name == f"{store['name']}_sq_simulator"
    job_id = sqstore.upload_job(store, JOB, "sq", "alice", private_jwk=alice)
    sqstore.upload_status(store, "sq", "alice", job_id, bob)
    cancelled = sqstore.upload_job(store, JOB, "sq", "alice", private_jwk=alice)
    sqstore.upload_status(store, "sq", "alice", cancelled, bob)
    assert sqstore.cancel_job(store, "sq", "alice", cancelled) == "cancelled"
    status = sqooler.get_status("sq", "alice", cancelled)
    assert (status.status, status.detail) == ("ERROR", "Cancelled by alice.")
    nxt = sqooler.get_next_job_in_queue("sq", bob)
    assert nxt.job_id == job_id
    assert sqooler.get_job(storage_path=nxt.job_json_path, job_id=job_id) == JOB


@pytest.mark.parametrize(
    ("heading", "printed"),
    [
        ("## Cancelling a job", "Cancelled by alice.\n"),
        ("## Signed submissions", "the job is not signed\n"),
    ],
)
def test_readme_cancel_and_signed_submission_examples_run(heading: str, printed: str) -> None:
    """The README's examples of cancelling and of signed submissions run and print what they
    say."""
    out = subprocess.run(
        [sys.executable, "-c", readme_block(heading, "python")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(HERE)}, timeout=120,
    )  # fmt: skip
    assert (out.returncode, out.stdout) == (0, printed), out.stderr


# ============================================================================
# Attacks on cancel, signed submissions and idempotent submit
# ============================================================================
class Stopped(BaseException):
    """A process killed before a storage call: nothing after it runs, no handler sees it."""


def stopped_at(store: Storage, index: int) -> tuple[Storage, list[int]]:
    """*store* whose *index*-th call (from 1) stops the caller dead before it reaches the
    storage, and the count of calls made through it."""
    calls = [0]

    def wrap(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            calls[0] += 1
            if calls[0] == index:
                raise Stopped(f"{op} {args[:2]}")
            return fn(*args)

        return call

    return sqstore.wrap_ops(store, wrap), calls


@pytest.mark.usefixtures("configured")
def test_a_cancel_stopped_at_any_call_is_completed_by_running_it_again(store: Storage) -> None:
    """A cancel of a queued job killed before any of its storage calls, then run again,
    leaves the job in deleted with the cancelled status and no request behind; it never runs."""
    for index in range(1, 40):
        job_id = queued_job(store)
        doomed, calls = stopped_at(store, index)
        try:
            outcome = sqstore.cancel_job(doomed, "sim", "alice", job_id)
        except Stopped:
            outcome = sqstore.cancel_job(store, "sim", "alice", job_id)
            assert outcome in ("cancelled", "finished"), index
        else:
            assert outcome == "cancelled" and calls[0] < index
        status = sqstore.get_status(store, "sim", "alice", job_id)
        assert (status.status, status.detail) == ("ERROR", "Cancelled by alice."), index
        raw = store["get"](*place(store, "status", job_id))
        assert isinstance(raw.get("finished_at"), str), index  # so prune and stats see it
        assert job_id in jobs_in(store, "deleted", job_id), index
        assert sqstore.cancel_requested(store, job_id) is None, index
        assert sqstore.claim_job(store, "sim") is None, index
        if calls[0] < index:
            break  # the cancel made fewer calls than index: every stop point was tried
    else:
        pytest.fail("a cancel should make fewer than 40 calls")


@pytest.mark.usefixtures("configured")
def test_a_job_cancelled_while_its_worker_died_is_not_run_again(store: Storage) -> None:
    """A running job with a cancel request whose worker dies is not requeued when its lease
    expires, nor by an operator's requeue: it ends cancelled, and no claim gets it again."""
    for how in ("sweep", "requeue_job"):
        job_id = queued_job(store)
        assert sqstore.claim_job(
            store, "sim", policy=sqstore.LeasePolicy(holder="dead", lease_seconds=1), now=lambda: T0
        )
        assert sqstore.cancel_job(store, "sim", "alice", job_id) == "requested"
        if how == "sweep":
            assert (
                sqstore.requeue_expired(
                    store, now=lambda: T0 + 10, policy=sqstore.LeasePolicy(skew=0)
                )
                == []
            )
        else:
            assert sqstore.requeue_job(store, "sim", job_id, now=lambda: T0 + 10) is False
        assert sqstore.claim_job(store, "sim", now=lambda: T0 + 20) is None, how
        status = sqstore.get_status(store, "sim", "alice", job_id)
        assert (status.status, status.detail) == ("ERROR", "Cancelled by alice."), how
        assert job_id in jobs_in(store, "deleted", job_id), how
        assert job_id not in jobs_in(store, "leases"), how
        assert sqstore.cancel_requested(store, job_id) is None, how


def test_a_cancel_request_that_cannot_be_read_never_strands_a_job(tmp_path: Path) -> None:
    """A dead worker's job whose cancel request cannot be read (a directory in its place) is
    still requeued when its lease expires, and runs."""
    store = sqstore.local_storage(tmp_path)
    job_id = queued_job(store)
    assert sqstore.claim_job(
        store, "sim", policy=sqstore.LeasePolicy(holder="dead", lease_seconds=1), now=lambda: T0
    )
    (tmp_path / store["layout"].leases / "cancel" / f"{job_id}.json").mkdir(parents=True)
    assert sqstore.requeue_expired(
        store, now=lambda: T0 + 10, policy=sqstore.LeasePolicy(skew=0)
    ) == [job_id]
    assert finish(store, "sim") == [job_id]


@pytest.mark.usefixtures("configured")
def test_a_token_retry_racing_a_claim_never_queues_its_job_twice(store: Storage) -> None:
    """A retry with a token whose first submit queued the job but lost the answer, while a
    worker claims that job between any two of the retry's storage calls, returns the job's
    id and leaves it in one place: it runs once."""

    def lose_the_queued_answer(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            out = fn(*args)
            if args[0] == folder(store, "queued"):
                raise sqstore.TransientError("the answer was lost")
            return out

        return call

    lossy = sqstore.wrap_ops(store, lose_the_queued_answer, only=("upload",))
    for index in range(1, 40):
        token = f"t{index}"
        with pytest.raises(sqstore.TransientError):
            sqstore.upload_job(lossy, JOB, "sim", "alice", client_token=token)
        claimed: list[Any] = []

        def claim(claimed: list[Any] = claimed) -> None:
            claimed.append(sqstore.claim_job(store, "sim", policy=sqstore.LeasePolicy(holder="me")))

        racing = paused_at(store, index, claim)
        job_id = sqstore.upload_job(racing, JOB, "sim", "alice", client_token=token)
        places = [kind for kind in ("queued", "running") if job_id in jobs_in(store, kind, job_id)]
        assert len(places) == 1, (index, places)
        while (
            got := sqstore.claim_job(store, "sim", policy=sqstore.LeasePolicy(holder="me"))
        ) is not None:
            finish_as(store, got[0].job_id, got[1], "me")
        for nxt in claimed:
            if nxt is not None:
                finish_as(store, nxt[0].job_id, nxt[1], "me")
        if not claimed:
            break  # the retry made fewer calls than index: every pause point was tried
    else:
        pytest.fail("a retry should make fewer than 40 calls")


def test_prune_removes_a_jobs_signature_and_cancel_request_with_it(
    store: Storage, user_keys: tuple[sqstore.JWK, sqstore.JWK]
) -> None:
    """Pruning a signed job, or one whose cancel came too late, leaves neither its signature
    nor its cancel request behind; a dry run removes neither."""
    signed_job = queued_job(store, key=user_keys[0])
    late = queued_job(store)
    got = sqstore.claim_job(store, "sim", policy=sqstore.LeasePolicy(holder="w"))
    assert got is not None and got[0].job_id == signed_job
    finish_as(store, signed_job, got[1], "w")
    got = sqstore.claim_job(store, "sim", policy=sqstore.LeasePolicy(holder="w"))
    assert got is not None
    assert sqstore.cancel_job(store, "sim", "alice", late) == "requested"
    finish_as(store, late, got[1], "w")  # a worker of its own, which never looked
    signatures = f"{folder(store, 'status')}/signatures"
    cancels = f"{store['layout'].leases}/cancel"
    later = time.time() + 8 * DAY
    sqstore.prune(store, "sim", older_than=7 * DAY, dry_run=True, now=lambda: later)
    assert (store["list"](signatures), store["list"](cancels)) == ([signed_job], [late])
    report = sqstore.prune(store, "sim", older_than=7 * DAY, now=lambda: later)
    assert sorted(report["jobs"]) == sorted([signed_job, late])
    assert (store["list"](signatures), store["list"](cancels)) == ([], [])


def test_a_signature_that_cannot_be_read_sets_its_job_aside(tmp_path: Path) -> None:
    """A job whose signature cannot be read (a directory in its place) on a backend requiring
    signed jobs is set aside with an ERROR status naming why, not left held and running; the
    next job is claimed."""
    store = sqstore.local_storage(tmp_path)
    private, public = sqstore.generate_keypair("alicekey")
    sqstore.upload_public_key(store, public, "alice", role="user")
    sqstore.upload_config(store, strict_config(require_signed_jobs=True), "sim")
    carol, carol_public = sqstore.generate_keypair("carolkey")
    sqstore.upload_public_key(store, carol_public, "carol", role="user")
    odd = queued_job(store, key=private)
    odd_key = queued_job(store, key=carol, user="carol")
    good = queued_job(store, key=private)
    for path in (
        tmp_path / folder(store, "status") / "signatures" / f"{odd}.json",
        tmp_path / store["layout"].public_keys / "users" / "carolkey.json",
    ):
        path.unlink()
        path.mkdir()
    got = sqstore.claim_job(store, "sim")
    assert got is not None and got[0].job_id == good
    for job_id, why in ((odd, "its signature cannot be read"), (odd_key, "key 'carolkey' cannot")):
        status = sqstore.get_status(store, "sim", "alice", job_id)
        assert status.status == "ERROR" and why in status.error_message, status
        assert job_id in jobs_in(store, "deleted", job_id)
    assert jobs_in(store, "leases") == [good]


def test_a_signature_check_that_fails_for_a_passing_reason_gives_the_job_back(
    store: Storage,
) -> None:
    """On a backend requiring signed jobs, a claim whose signature read fails for a passing
    reason (a TransientError) puts the job back in its queue before it raises: the job is
    not held in running until its lease expires, and the next claim runs it."""
    private, public = sqstore.generate_keypair("alicekey")
    sqstore.upload_public_key(store, public, "alice", role="user")
    sqstore.upload_config(store, strict_config(require_signed_jobs=True), "sim")
    job_id = queued_job(store, key=private)
    failures = [1]

    def flaky(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            if args[0].endswith("/signatures") and failures:
                failures.pop()
                raise sqstore.TransientError(f"{args[0]}: the network blinked")
            return fn(*args)

        return call

    with pytest.raises(sqstore.TransientError):
        sqstore.claim_job(sqstore.wrap_ops(store, flaky, only=("get",)), "sim")
    assert jobs_in(store, "queued", job_id) == [job_id] and jobs_in(store, "running") == []
    got = sqstore.claim_job(store, "sim")
    assert got is not None and got[0].job_id == job_id


def test_cli_cancel_on_an_unknown_backend_names_the_known_ones(tmp_path: Path) -> None:
    """`sqstore cancel` on a backend that does not exist says so in one line, listing the
    known backends, exit 1, as every command that names a backend does."""
    store = sqstore.local_storage(tmp_path / "data")
    job_id = queued_job(store)
    proc = run_cli("--storage", "data", "cancel", "sm", job_id, "-u", "alice", cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "no backend 'sm'" in proc.stderr and "sim" in proc.stderr, proc.stderr
    assert jobs_in(store, "queued") == [job_id]


# ============================================================================
# Faults, races and hostile input: each guarantee attacked
# ============================================================================
T0 = 1_800_000_000.0
DONE_STATUS = "The job is done."


def paused_at(store: Storage, index: int, meanwhile: Callable[[], object]) -> Storage:
    """*store* whose *index*-th call (counting from 1) first lets *meanwhile* act: another
    worker running between two of this worker's storage calls, deterministically."""
    calls = [0]

    def wrap(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            calls[0] += 1
            if calls[0] == index:
                meanwhile()
            return fn(*args)

        return call

    return sqstore.wrap_ops(store, wrap)


def done_once(store: Storage, job_id: str, display_name: str = "sim") -> None:
    """The job ended DONE with its result, and sits in finished only: no lease, no copy."""
    assert sqstore.get_status(store, display_name, "alice", job_id).status == "DONE"
    assert sqstore.get_result(store, display_name, "alice", job_id).status == "DONE"
    assert job_id in jobs_in(store, "finished", job_id)
    for kind in ("queued", "running", "deleted", "leases"):
        assert job_id not in jobs_in(store, kind), kind


def finish_as(store: Storage, job_id: str, job: Any, holder: str, key: Any = None) -> None:
    result = sqstore.run_simulator(job, job_id, "sim")
    status = sqstore.StatusMsg(job_id, "DONE", DONE_STATUS, "None")
    sqstore.update_in_database(
        store, result, status, job_id, "sim", key, policy=sqstore.LeasePolicy(holder=holder)
    )


@pytest.mark.parametrize("second", ["sweep and claim", "claim only"])
@pytest.mark.usefixtures("configured")
def test_a_sweep_paused_at_each_step_never_takes_a_live_job(store: Storage, second: str) -> None:
    """A sweep paused between any two of its storage calls, while another sweep requeues the
    dead worker's job and a live worker claims it, leaves that claim alone: the live worker
    renews and finishes the job, and it runs once."""
    live: dict[str, Any] = {}

    def meanwhile() -> None:
        if second == "sweep and claim":
            sqstore.requeue_expired(store, now=lambda: T0 + 10, policy=sqstore.LeasePolicy(skew=0))
        live["claim"] = sqstore.claim_job(
            store, "sim", policy=sqstore.LeasePolicy(holder="live"), now=lambda: T0 + 10
        )

    for index in range(1, 40):
        live.clear()
        job_id = sqstore.upload_job(store, JOB, "sim", "alice")
        sqstore.upload_status(store, "sim", "alice", job_id)
        assert sqstore.claim_job(
            store, "sim", policy=sqstore.LeasePolicy(holder="dead", lease_seconds=1), now=lambda: T0
        )
        sqstore.requeue_expired(
            paused_at(store, index, meanwhile),
            now=lambda: T0 + 10,
            policy=sqstore.LeasePolicy(skew=0),
        )
        runs = 0
        if live.get("claim"):
            sqstore.renew_lease(
                store, job_id, policy=sqstore.LeasePolicy(holder="live"), now=lambda: T0 + 11
            )
            finish_as(store, job_id, live["claim"][1], "live")
            runs += 1
        while (
            got := sqstore.claim_job(
                store, "sim", policy=sqstore.LeasePolicy(holder="z"), now=lambda: T0 + 20
            )
        ) is not None:
            finish_as(store, got[0].job_id, got[1], "z")
            runs += 1
        assert runs == 1, f"paused at call {index}"
        done_once(store, job_id)
        if not live:
            break  # the sweep made fewer calls than index: every pause point was tried
    assert not live, "the sweep should make fewer than 40 calls"


KILL_AT_WRITE = """
import json, os, signal, sys
import sqstore

store = sqstore.open_storage(sys.argv[1])
kill_at = int(sys.argv[2])
key = sqstore.from_doc(json.loads(sys.argv[3]), sqstore.JWK)
writes = [0]

def wrap(op, fn):
    def call(*args):
        out = fn(*args)
        writes[0] += 1
        if writes[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    return call

store = sqstore.wrap_ops(store, wrap, ("upload", "update", "move", "delete", "swap"))
doomed = sqstore.LeasePolicy(holder="doomed", lease_seconds=1, heartbeat=0)
nxt, job = sqstore.claim_job(store, "sim", key, policy=doomed)
result = sqstore.run_simulator(job, nxt.job_id, "sim")
done = sqstore.StatusMsg(nxt.job_id, "DONE", "The job is done.", "None")
sqstore.update_in_database(store, result, done, nxt.job_id, "sim", key, policy=doomed)
print(writes[0], flush=True)
"""


@pytest.mark.slow
def test_sigkill_at_each_write_of_a_signed_life_is_recovered(url: str) -> None:
    """A worker SIGKILLed right after each storage write of a signed claim and finish: the
    sweep and a second worker finish every job exactly once, with a verified result and a
    DONE status, and no document is torn; the config still verifies."""
    private, public = sqstore.generate_keypair("bobkey")
    store = sqstore.open_storage(url)
    sqstore.upload_config(store, sqstore.demo_config("sim", sign=True), "sim", private)
    sqstore.upload_public_key(store, public, "sim")
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    key_text = json.dumps(sqstore.to_doc(private))
    kill_at, total = 1, None
    while total is None or kill_at <= total:
        job_id = sqstore.upload_job(store, JOB, "sim", "alice")
        sqstore.upload_status(store, "sim", "alice", job_id, private)
        proc = subprocess.run(
            [sys.executable, "-c", KILL_AT_WRITE, url, str(kill_at), key_text],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if proc.returncode == 0:
            total = int(proc.stdout)  # the writes of a whole life: each was a kill point
        else:
            assert proc.returncode == -signal.SIGKILL, proc.stderr
        sqstore.requeue_expired(
            store, "sim", private, now=an_hour_later, policy=sqstore.LeasePolicy(skew=0)
        )
        me = sqstore.LeasePolicy(holder="me")
        while got := sqstore.claim_job(store, "sim", private, policy=me, now=an_hour_later):
            finish_as(store, got[0].job_id, got[1], "me", private)
        try:
            done_once(store, job_id)
        except AssertionError as exc:
            raise AssertionError(f"killed after write {kill_at}") from exc
        assert sqstore.verify_result(store, "sim", job_id)
        raw_status = store["get"](*place(store, "status", job_id))
        assert sqstore.verify_doc(raw_status, [public])["status"] == "DONE"
        kill_at += 1
    assert total is not None and total >= 7  # lease, move, intent, result, move, status, drop
    raw_config = store["get"]("backends/configs", "sim")
    assert sqstore.verify_doc(raw_config, [public])["display_name"] == "sim"
    if "://" not in url:
        for path in Path(url).rglob("*.json"):
            json.loads(path.read_text())


def an_hour_later() -> float:
    """A clock at which every lease a test's worker took has long run out."""
    return time.time() + 3600


@pytest.mark.usefixtures("configured")
def test_running_jobs_without_a_usable_lease_are_adopted_then_requeued(store: Storage) -> None:
    """A running job whose lease is garbage, or that has none (moved there by a program that
    takes no leases), is given a lease by the sweep and requeued when that expires."""
    ids = [sqstore.upload_job(store, JOB, "sim", "alice") for _ in range(3)]
    for job_id in ids:
        sqstore.upload_status(store, "sim", "alice", job_id)
    for holder in ("a", "b"):
        assert sqstore.claim_job(
            store, "sim", policy=sqstore.LeasePolicy(holder=holder), now=lambda: T0
        )
    leases = folder(store, "leases")
    store["update"](leases, ids[0], {"torn": "not a lease"})
    store["delete"](leases, ids[1])
    queue = folder(store, "queued")
    store["move"](queue, folder(store, "running"), doc_id(store, "queued", ids[2]))
    assert (
        sqstore.requeue_expired(store, now=lambda: T0, policy=sqstore.LeasePolicy(lease_seconds=30))
        == []
    )
    adopted = [sqstore.from_doc(store["get"](leases, j), sqstore.Lease) for j in ids]
    assert [(lease.holder, lease.expires) for lease in adopted] == [("(no lease)", T0 + 30)] * 3
    assert (
        sqstore.requeue_expired(store, now=lambda: T0 + 29, policy=sqstore.LeasePolicy(skew=0))
        == []
    )
    assert (
        sqstore.requeue_expired(store, now=lambda: T0 + 31, policy=sqstore.LeasePolicy(skew=0))
        == ids
    )
    assert finish(store, "sim") == ids
    for job_id in ids:
        done_once(store, job_id)


@pytest.mark.slow
def test_a_job_that_kills_its_worker_is_given_up(tmp_path: Path) -> None:
    """A poison job (its executor dies by SIGKILL every time) goes to deleted with an ERROR
    status after max_attempts claims, and the job queued behind it still runs."""
    root = tmp_path / "store"
    store = sqstore.local_storage(root)
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    poison = sqstore.upload_job(store, job_with(die=True), "sim", "alice")
    healthy = sqstore.upload_job(store, JOB, "sim", "alice")
    for job_id in (poison, healthy):
        sqstore.upload_status(store, "sim", "alice", job_id)
    (tmp_path / "dying.py").write_text(
        "import os, signal, sqstore\n"
        "def run(job, job_id, display_name):\n"
        "    if job['experiment_0'].get('die'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return sqstore.run_simulator(job, job_id, display_name)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{tmp_path}"}
    deaths = 0
    while True:
        proc = subprocess.run(
            [sys.executable, "-m", "sqstore", "--storage", str(root), "work", "sim",
             "dying:run", "--lease", "0.3", "--skew", "0", "--max-jobs", "1", "--poll", "0.05",
             "--max-attempts", "3", "--heartbeat", "0.1"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        deaths += 1
        assert deaths <= 3
        time.sleep(0.4)  # the dead worker's lease runs out, and a heartbeat (with its sweep) is due
    assert deaths == 3
    status = sqstore.get_status(store, "sim", "alice", poison)
    assert status.status == "ERROR" and "3 times" in status.error_message
    assert jobs_in(store, "deleted") == [poison]
    assert jobs_in(store, "queued") == jobs_in(store, "running") == []
    done_once(store, healthy)


@pytest.mark.usefixtures("configured")
def test_a_finisher_without_the_lease_cannot_overwrite_the_holder(store: Storage) -> None:
    """update_in_database checks the lease by default: a worker whose lease expired and was
    taken over cannot finish the job, even without naming a holder; the new holder can."""
    job_id = sqstore.upload_job(store, JOB, "sim", "alice")
    sqstore.upload_status(store, "sim", "alice", job_id)
    first = sqstore.claim_job(
        store, "sim", policy=sqstore.LeasePolicy(lease_seconds=1), now=lambda: T0
    )  # this process
    assert first is not None
    assert sqstore.requeue_expired(
        store, now=lambda: T0 + 10, policy=sqstore.LeasePolicy(skew=0)
    ) == [job_id]
    second = sqstore.claim_job(
        store, "sim", policy=sqstore.LeasePolicy(holder="new"), now=lambda: T0 + 10
    )
    assert second is not None
    stale = attrs.evolve(sqstore.run_simulator(JOB, job_id, "sim"), header={"by": "stale"})
    done = sqstore.StatusMsg(job_id, "DONE", DONE_STATUS, "None")
    with pytest.raises(sqstore.LeaseLostError):
        sqstore.update_in_database(store, stale, done, job_id, "sim")
    assert jobs_in(store, "running") == [job_id]
    fresh = attrs.evolve(sqstore.run_simulator(JOB, job_id, "sim"), header={"by": "new"})
    sqstore.update_in_database(
        store, fresh, done, job_id, "sim", policy=sqstore.LeasePolicy(holder="new")
    )
    assert sqstore.get_result(store, "sim", "alice", job_id).header == {"by": "new"}
    done_once(store, job_id)


@pytest.mark.usefixtures("configured")
def test_clocks_that_disagree(store: Storage) -> None:
    """A sweeper whose clock is ahead by less than the tolerated skew requeues no live job;
    one behind never moves last_queue_check backwards."""
    job_id = sqstore.upload_job(store, JOB, "sim", "alice")
    assert sqstore.claim_job(
        store, "sim", policy=sqstore.LeasePolicy(holder="w", lease_seconds=60), now=lambda: T0
    )
    hour_ahead = T0 + 3600
    assert (
        sqstore.requeue_expired(
            store, now=lambda: hour_ahead, policy=sqstore.LeasePolicy(skew=3700)
        )
        == []
    )
    assert sqstore.requeue_expired(store, now=lambda: T0 + 60 + sqstore.DEFAULT_SKEW) == []
    assert jobs_in(store, "running") == [job_id]
    after = T0 + 61 + sqstore.DEFAULT_SKEW
    assert sqstore.requeue_expired(store, now=lambda: after) == [job_id]
    assert sqstore.timestamp_queue(store, "sim", now=lambda: T0 + 100)
    assert not sqstore.timestamp_queue(store, "sim", now=lambda: T0 + 100 - 3600)
    last = sqstore.get_config(store, "sim").last_queue_check
    assert last is not None and last.timestamp() == T0 + 100


def torn_once(store: Storage, path: str, times: int) -> tuple[Storage, list[int]]:
    """*store* whose next *times* reads under *path*, once armed, see a half-written file, as
    a reader does while sqooler rewrites a document in place."""
    armed = [0]

    def wrap(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            if op == "get" and args[0] == path and armed[0] > 0:
                armed[0] -= 1
                raise sqstore.InvalidDocumentError(f"{path}/{args[1]}: not valid JSON (torn)")
            return fn(*args)

        return call

    return sqstore.wrap_ops(store, wrap), armed


def test_work_never_turns_a_storage_hiccup_into_an_error_status(tmp_path: Path) -> None:
    """A torn config read while work() finishes a successful job does not mark it ERROR: the
    finish is tried again and the job ends DONE; a malformed result still ends ERROR."""
    store = sqstore.local_storage(tmp_path)
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    good = sqstore.upload_job(store, JOB, "sim", "alice")
    bad = sqstore.upload_job(store, job_with(bad_result=True), "sim", "alice")
    for job_id in (good, bad):
        sqstore.upload_status(store, "sim", "alice", job_id)
    torn, armed = torn_once(store, "backends/configs", 0)

    def executor(job: Any, job_id: str, display_name: str) -> Any:
        armed[0] = 3  # the finish's config reads meet a rewrite in progress
        if job["experiment_0"].get("bad_result"):
            return {"not": "a result"}
        return sqstore.run_simulator(job, job_id, display_name)

    lines: list[str] = []
    assert sqstore.work([torn], "sim", executor, max_jobs=2, log=lines.append) == 2
    done_once(store, good)
    status = sqstore.get_status(store, "sim", "alice", bad)
    assert (status.status, status.detail) == ("ERROR", "The executor's result is malformed.")
    assert any("trying again" in line for line in lines)


@pytest.mark.slow
def test_mongodb_claim_during_a_half_done_requeue_move_waits_for_it(mongodb_server: Any) -> None:
    """A sweep requeuing on MongoDB inserts into the queue, then deletes from running; a claim
    that comes between those two commands leaves the job alone (it is in both places), so the
    sweep's delete cannot strand it: the job is then claimed and finished once."""
    from pymongo import monitoring

    live: dict[str, Any] = {}

    class Pause(monitoring.CommandListener):
        def started(self, event: Any) -> None:
            on_running = event.command_name == "delete" and event.command.get("delete") == "running"
            if on_running and "claim" not in live and live.get("armed"):
                live["claim"] = sqstore.claim_job(
                    plain, "sim", policy=sqstore.LeasePolicy(holder="live"), now=lambda: T0 + 10
                )

        def succeeded(self, event: Any) -> None:
            pass

        def failed(self, event: Any) -> None:
            pass

    import pymongo

    uri = mongo_uri(mongodb_server)
    mongo_reset(uri)
    plain = sqstore.mongodb_storage(uri)
    store = sqstore.mongodb_storage(pymongo.MongoClient(uri, event_listeners=[Pause()]))
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    job_id = sqstore.upload_job(store, JOB, "sim", "alice")
    sqstore.upload_status(store, "sim", "alice", job_id)
    assert sqstore.claim_job(
        store, "sim", policy=sqstore.LeasePolicy(holder="dead", lease_seconds=1), now=lambda: T0
    )
    live["armed"] = True
    assert sqstore.requeue_expired(
        store, now=lambda: T0 + 10, policy=sqstore.LeasePolicy(skew=0)
    ) == [job_id]
    assert "claim" in live and live["claim"] is None, "the claim waited for the move"
    got = sqstore.claim_job(
        plain, "sim", policy=sqstore.LeasePolicy(holder="z"), now=lambda: T0 + 20
    )
    assert got is not None and got[0].job_id == job_id
    finish_as(plain, job_id, got[1], "z")
    done_once(plain, job_id)


def jobs_with_status(count: int, *, status: bool = True) -> tuple[Storage, list[str]]:
    store = sqstore.memory_storage()
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    ids = [sqstore.upload_job(store, JOB, "sim", "alice") for _ in range(count)]
    for job_id in ids if status else ():
        sqstore.upload_status(store, "sim", "alice", job_id)
    return store, ids


@pytest.mark.parametrize("status", [True, False], ids=["with-status", "no-status"])
def test_a_claim_from_a_stale_listing_gives_back_the_lease_it_took(status: bool) -> None:
    """claim_jobs lists the queue once per pass: a claimer that reaches, from its old listing,
    a job another worker claimed since (and died holding) takes that expired lease over, finds
    the job gone from the queue, and gives the lease back as it was: the job keeps its lease
    and its claim count, and is requeued and finished."""
    store, (a, b) = jobs_with_status(2, status=status)
    clock = [T0]
    slow = sqstore.LeasePolicy(holder="Z", heartbeat=5000)  # no beat, so no sweep, in this test
    drain = sqstore.claim_jobs(store, "sim", policy=slow, now=lambda: clock[0])
    first = next(drain)
    assert first[0].job_id == a
    taken = sqstore.claim_job(
        store, "sim", policy=sqstore.LeasePolicy(holder="W"), now=lambda: T0 + 1
    )  # then W dies
    assert taken is not None and taken[0].job_id == b
    before = store["get"]("jobs/leases", b)
    clock[0] = T0 + 1000  # Z's job took 1000 s
    finish_as(store, a, first[1], "Z")
    assert next(drain, None) is None
    assert store["get"]("jobs/leases", b) == before, "W's lease, with its claim count, is kept"
    assert sqstore.requeue_expired(store, now=lambda: T0 + 2000) == [b]
    got = sqstore.claim_job(
        store, "sim", policy=sqstore.LeasePolicy(holder="Y"), now=lambda: T0 + 2000
    )
    assert got is not None and got[0].job_id == b
    finish_as(store, b, got[1], "Y")
    assert store["list"]("jobs/running") == store["list"]("jobs/leases") == []


def test_a_second_finish_with_another_outcome_completes_the_first() -> None:
    """A DONE finish whose status write failed after the job moved to finished, run again as
    ERROR, completes the DONE it recorded (status written, lease dropped) and says so; the job
    is never left with a lease and a stale status."""
    store, (job_id,) = jobs_with_status(1)
    claimed = sqstore.claim_job(
        store, "sim", policy=sqstore.LeasePolicy(holder="W"), now=lambda: T0
    )
    assert claimed is not None
    failing = [True]

    def wrap(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            if failing[0] and op in ("update", "upload") and args[0].startswith("status/"):
                failing[0] = False
                raise sqstore.StorageError(f"{args[0]}/{args[1]}: no space left on device")
            return fn(*args)

        return call

    with pytest.raises(sqstore.StorageError):
        finish_as(sqstore.wrap_ops(store, wrap), job_id, claimed[1], "W")
    error = sqstore.StatusMsg(job_id, "ERROR", "Could not store the result.", "disk full")
    with pytest.raises(sqstore.InvalidDocumentError, match="finished as DONE already"):
        sqstore.update_in_database(
            store, None, error, job_id, "sim", policy=sqstore.LeasePolicy(holder="W")
        )
    done_once(store, job_id)


IN_PLACE_WRITER = """
import sys, time
path, text = sys.argv[1], open(sys.argv[1]).read()
half = len(text) // 2
print("ready", flush=True)
while True:  # as sqooler's local backend writes: truncate, then write, here in two steps
    with open(path, "w") as file:
        file.write(text[:half])
        file.flush()
        time.sleep(0.001)
        file.write(text[half:])
    time.sleep(0.03)
"""


@pytest.mark.slow
def test_reads_outlast_a_program_that_rewrites_documents_in_place(
    local: Storage, tmp_path: Path
) -> None:
    """While another process keeps rewriting a config in place (truncate, then write), every
    read of it succeeds: a half-written document is read again, not reported."""
    sqstore.upload_config(local, sqstore.demo_config("sim"), "sim")
    root = tmp_path / "store"
    with child_running(IN_PLACE_WRITER, str(root / "backends/configs/sim.json"), "ready"):
        for _ in range(200):
            assert sqstore.get_config(local, "sim").display_name == "sim"
            time.sleep(0.002)


def test_odd_entries_stop_neither_the_sweep_nor_the_claims(local: Storage, tmp_path: Path) -> None:
    """A directory or garbage where a lease should be does not stop the sweep; a queued job
    that is a directory or not JSON is set aside with an ERROR status and the queue flows."""
    root = tmp_path / "store"
    sqstore.upload_config(local, sqstore.demo_config("sim"), "sim")
    odd = [sqstore.create_job_id(local, "sim", "alice") for _ in range(2)]
    (root / "jobs/queued/sim").mkdir(parents=True)
    (root / f"jobs/queued/sim/{odd[0]}.json").mkdir()
    (root / f"jobs/queued/sim/{odd[1]}.json").write_text('{"torn": ')
    dead = sqstore.upload_job(local, JOB, "sim", "alice")
    (root / "jobs/leases").mkdir(parents=True)
    (root / "jobs/leases/0.json").mkdir()
    (root / "jobs/leases/00garbage.json").write_text("[1, 2")
    with contextlib.suppress(StopIteration):  # the odd jobs are set aside; dead's is claimed
        got = sqstore.claim_job(
            local, "sim", policy=sqstore.LeasePolicy(holder="dead", lease_seconds=1), now=lambda: T0
        )
        assert got is not None and got[0].job_id == dead
    assert sorted(jobs_in(local, "deleted")) == sorted(odd)
    for job_id in odd:
        status = sqstore.get_status(local, "sim", "alice", job_id)
        assert status.status == "ERROR" and job_id in status.error_message
    assert sqstore.requeue_expired(
        local, now=lambda: T0 + 10, policy=sqstore.LeasePolicy(skew=0)
    ) == [dead]
    last = sqstore.upload_job(local, JOB, "sim", "alice")
    assert finish(local, "sim") == [dead, last]


# ============================================================================
# Attacks on retention, queue insight and the command line
# ============================================================================
def ended_every_way(store: Storage) -> dict[str, str]:
    """On backend 'sim' (which runs signed jobs only), one job ended each way sqstore ends a
    job other than by a worker's finish: cancelled while queued, set aside at its claim, and
    given up by the sweep after its worker died; a 'plain' job finished by a worker."""
    sqstore.upload_config(store, strict_config(require_signed_jobs=True), "sim")
    ended = {"cancelled": queued_job(store)}
    assert sqstore.cancel_job(store, "sim", "alice", ended["cancelled"]) == "cancelled"
    ended["set_aside"] = queued_job(store)
    assert sqstore.claim_job(store, "sim") is None  # unsigned: set aside
    sqstore.update_config(store, sqstore.demo_config("sim"), "sim")  # now it runs any job
    ended["given_up"] = queued_job(store)
    dead = sqstore.LeasePolicy(holder="dead:1", lease_seconds=1)
    assert sqstore.claim_job(store, "sim", policy=dead, now=lambda: time.time() - 1001) is not None
    assert (
        sqstore.requeue_expired(store, "sim", policy=sqstore.LeasePolicy(skew=0, max_attempts=1))
        == []
    )
    ended["finished"] = queued_job(store)
    assert finish(store, "sim") == [ended["finished"]]
    for how, job_id in ended.items():
        assert sqstore.get_status(store, "sim", "alice", job_id).status in ("ERROR", "DONE"), how
    return ended


def test_every_job_sqstore_ends_is_pruned_and_counted(store: Storage) -> None:
    """A job cancelled, set aside or given up has a final status with ``finished_at`` like a
    finished one: `queue_stats` counts it in jobs/hour and `prune` removes it in time."""
    ended = ended_every_way(store)
    for how, job_id in ended.items():
        raw = store["get"](*place(store, "status", job_id))
        assert isinstance(sqstore.payload_of(raw).get("finished_at"), str), how
    stats = sqstore.queue_stats(store, "sim")
    assert (stats.finished, stats.failed, stats.jobs_per_hour_last_hour) == (1, 3, 4.0)
    later = time.time() + 2 * DAY
    got = sqstore.prune(store, "sim", older_than=DAY, now=lambda: later)
    assert sorted(got["statuses"]) == sorted(ended.values())
    assert all(left_of(store, job_id) == set() for job_id in ended.values())


def test_a_job_that_is_not_json_ends_with_a_finish_time(tmp_path: Path) -> None:
    """A queued job that cannot be read, set aside at its claim, gets ``finished_at`` too."""
    store = sqstore.local_storage(tmp_path)
    job_id = queued_job(store)
    (tmp_path / f"jobs/queued/sim/{job_id}.json").write_text("[1, 2")
    assert sqstore.claim_job(store, "sim") is None
    assert sqstore.prune(store, "sim", older_than=0, now=lambda: time.time() + 1)["jobs"] == [
        job_id
    ]


def test_prune_removes_the_signature_of_a_signed_submission(
    store: Storage, user_keys: tuple[sqstore.JWK, sqstore.JWK]
) -> None:
    """A job submitted signed leaves nothing behind once pruned: its detached signature goes
    with its job document (with keep_results, too)."""
    signed_ids = [queued_job(store, key=user_keys[0]) for _ in range(2)]
    assert finish(store, "sim") == signed_ids
    signatures = f"{folder(store, 'status')}/signatures"
    assert sorted(store["list"](signatures)) == sorted(signed_ids)
    later = time.time() + 2 * DAY
    kept = sqstore.prune(store, "sim", older_than=DAY, keep_results=3 * DAY, now=lambda: later)
    assert kept["jobs"] == signed_ids and kept["results"] == []
    assert store["list"](signatures) == []
    assert sqstore.get_result(store, "sim", "alice", signed_ids[0]).status == "DONE"
    got = sqstore.prune(store, "sim", older_than=DAY, now=lambda: later + 2 * DAY)
    assert got["statuses"] == signed_ids
    assert all(left_of(store, job_id) == set() for job_id in signed_ids)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (
            ["cancel", "sqsm", "6b0000000000000000000000"],
            ["no backend 'sqsm' on ./lab (known: sqsim)"],
        ),
        (["cancel", "sqsim", "6b0000000000000000000000"], ["no job '6b00", "'sqsim' at ./lab"]),
        (["cancel", "sqsim", "../etc"], ["'../etc'"]),
        (["prune", "sqsm", "--older-than", "1d"], ["no backend 'sqsm' on ./lab (known: sqsim)"]),
        (["stats", "sqsm"], ["no backend 'sqsm' on ./lab (known: sqsim)"]),
        (["prune", "sqsim", "--older-than", "2d", "--keep-results", "1d"], ["--keep-results"]),
    ],
)
def test_cli_cancel_prune_and_stats_name_what_does_not_exist(
    tmp_path: Path, args: list[str], needles: list[str]
) -> None:
    """`cancel`, `prune` and `stats` given an unknown backend or job, or a --keep-results
    shorter than --older-than, exit 1 with one line in the command line's terms; nothing
    is written."""
    a_lab(tmp_path / "lab")
    before = tree(tmp_path / "lab")
    proc = sqstore_cli(*args, cwd=tmp_path, env={"SQSTORE_STORAGE": "./lab"})
    one_error_line(proc, *needles)
    assert proc.stdout == "" and tree(tmp_path / "lab") == before


@pytest.mark.slow
def test_cli_stats_shows_the_other_backends_when_one_config_is_broken(tmp_path: Path) -> None:
    """One corrupt config does not hide the other backends' figures: `stats` (and `stats
    --json`) show every readable backend, mark the broken one, say why on stderr in one
    line naming the backend and the storage, and exit 1."""
    store, _, job_id = a_lab(tmp_path / "lab")
    sqstore.upload_config(store, sqstore.demo_config("zeta"), "zeta")
    (tmp_path / "lab/backends/configs/broken.json").write_text('{"display_name": ')
    text = sqstore_cli("--storage", "lab", "stats", cwd=tmp_path)
    one_error_line(text, "'broken'", "lab")
    lines = text.stdout.splitlines()
    assert lines[0] == "broken: broken", lines
    assert "sqsim: 1 queued" in text.stdout and "zeta: 0 queued" in text.stdout
    as_json = sqstore_cli("--storage", "lab", "stats", "--json", cwd=tmp_path)
    one_error_line(as_json, "'broken'")
    docs = json.loads(as_json.stdout)
    assert sorted(docs) == ["broken", "sqsim", "zeta"] and docs["broken"] is None
    assert docs["sqsim"]["queued"] == 1
    one = sqstore_cli("--storage", "lab", "stats", "broken", cwd=tmp_path)
    one_error_line(one, "backend 'broken' on lab: ")
    assert one.stdout == "" and job_id
    for command in (["queue"], ["running"], ["backend", "show"], ["prune", "--older-than", "1d"]):
        proc = sqstore_cli("--storage", "lab", *command, "broken", cwd=tmp_path)
        one_error_line(proc, "backend 'broken' on lab: ")


class LateFinish(Protocol):
    """A worker's late finish, on its own handle or on *store* (one that pauses, say)."""

    def __call__(self, store: Storage = ...) -> None: ...


def late_finisher_lab(root: Path) -> tuple[Storage, str, LateFinish]:
    """A job of backend 'sim' finished (by 'bob') long ago after its first worker lost its
    lease; and that worker finishing it late (a callable)."""
    store = sqstore.local_storage(root)
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    job_id = old_job(store, T0 - 11 * DAY)
    sqstore.upload_status(store, "sim", "alice", job_id)
    by_late = sqstore.LeasePolicy(holder="late", lease_seconds=60)
    claimed = sqstore.claim_job(store, "sim", policy=by_late, now=lambda: T0 - 11 * DAY)
    assert claimed is not None
    assert sqstore.requeue_expired(store, "sim", now=lambda: T0 - 10 * DAY) == [job_id]
    got = sqstore.claim_job(
        store, "sim", policy=sqstore.LeasePolicy(holder="bob"), now=lambda: T0 - 10 * DAY
    )
    assert got is not None
    finish_as(store, job_id, got[1], "bob")
    where = place(store, "status", job_id)
    store["update"](*where, {**store["get"](*where), "finished_at": "2026-12-01T00:00:00+00:00"})

    def late(store: Storage = store) -> None:
        result = sqstore.run_simulator(claimed[1], job_id, "sim")
        done = sqstore.StatusMsg(job_id, "DONE", "late", "None")
        with contextlib.suppress(sqstore.NotFoundError, sqstore.LeaseLostError):
            sqstore.update_in_database(store, result, done, job_id, "sim", policy=by_late)

    return store, job_id, late


@pytest.mark.parametrize("paused", ["prune", "late finisher"])
def test_prune_and_a_late_finisher_paused_at_each_call_leave_no_orphan(
    tmp_path: Path, paused: str
) -> None:
    """A worker that lost its lease (the sweep requeued its job and another worker finished
    it) finishing late while a prune runs, either paused between any two storage calls of
    the other, leaves the other worker's finish as it was or nothing: never a document that
    no status leads to, nor a DONE status without its result."""
    for index in range(1, 20):
        store, job_id, late = late_finisher_lab(tmp_path / f"s{index}")
        if paused == "prune":
            sqstore.prune(paused_at(store, index, late), "sim", older_than=DAY,
                          now=lambda: T0 + 1000 * DAY)  # fmt: skip
        else:
            prune = functools.partial(
                sqstore.prune, store, "sim", older_than=DAY, now=lambda: T0 + 1000 * DAY
            )
            late(paused_at(store, index, prune))
        left = left_of(store, job_id)
        assert not left or "status" in left, (index, left)
        if "status" in left:
            status = sqstore.get_status(store, "sim", "alice", job_id)
            assert status.detail == DONE_STATUS, (index, status)  # bob's finish stands
            assert status.status != "DONE" or "result" in left, (index, left)
    store, job_id, _ = late_finisher_lab(tmp_path / "plain")
    late_done = sqstore.StatusMsg(job_id, "DONE", "late", "None")
    result, by_late = sqstore.run_simulator(JOB, job_id, "sim"), sqstore.LeasePolicy(holder="late")
    with pytest.raises(sqstore.LeaseLostError, match="another worker"):
        sqstore.update_in_database(store, result, late_done, job_id, "sim", policy=by_late)
    finish_as(store, job_id, JOB, "late")  # the very same finish again: a re-run, no change
    assert sqstore.get_status(store, "sim", "alice", job_id).detail == DONE_STATUS


def test_cli_output_cut_short_by_its_reader_exits_quietly(tmp_path: Path) -> None:
    """A reader that goes away after one line (`| head -1`) ends a listing command quietly
    with 141, as a tool killed by SIGPIPE does: no traceback, nothing on stderr."""
    store = sqstore.local_storage(tmp_path / "lab")
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    for _ in range(3000):
        sqstore.upload_job(store, JOB, "sim", "alice")
    env = {**os.environ, "PYTHONPATH": str(HERE), "SQSTORE_STORAGE": "lab", "PY": sys.executable}
    for args in (["queue", "sim"], ["stats", "--json"], ["backends"]):
        line = '"$PY" -m sqstore ' + " ".join(args) + " | head -1 >/dev/null; exit ${PIPESTATUS[0]}"
        proc = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode in (0, 141) and proc.stderr == "", (args, proc)
        if args[0] == "queue":
            assert proc.returncode == 141, proc


# ============================================================================
# The command line: every mistake fails loudly
# ============================================================================
def sqstore_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> Any:
    """``python -m sqstore *args`` in *cwd*, without $SQSTORE_STORAGE unless *env* gives it."""
    full_env = {k: v for k, v in os.environ.items() if k != "SQSTORE_STORAGE"}
    full_env.update({"PYTHONPATH": f"{HERE}{os.pathsep}{cwd}", **(env or {})})
    full_env["EXECUTED"] = str(cwd / "executed.log")
    (cwd / "lab_executor.py").write_text(EXECUTOR)
    return subprocess.run(
        [sys.executable, "-m", "sqstore", *args], cwd=cwd, env=full_env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip


def one_error_line(proc: Any, *needles: str) -> None:
    """*proc* failed with exit 1 and one 'sqstore: error:' line holding every needle."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert proc.stderr.startswith("sqstore: error: "), proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


def a_lab(root: Path) -> tuple[Storage, sqstore.JWK, str]:
    """A storage with backend sqsim (signing), its key in root/../bob.jwk, and one job."""
    store = sqstore.local_storage(root)
    private, public = sqstore.generate_keypair("bobkey")
    sqstore.upload_config(store, sqstore.demo_config("sqsim", sign=True), "sqsim", private)
    sqstore.upload_public_key(store, public, "sqsim")
    job_id = sqstore.upload_job(store, JOB, "sqsim", "cli")
    sqstore.upload_status(store, "sqsim", "cli", job_id, private)
    (root.parent / "bob.jwk").write_text(json.dumps(sqstore.to_doc(private)))
    return store, private, job_id


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--storage", "./typo", "backends"], ["no storage at ./typo"]),
        (["--storage", "./typo", "queue", "sqsim"], ["no storage at ./typo"]),
        (["--storage", "./typo", "work", "sqsim", "--burst"], ["no storage at ./typo"]),
        (["queue", "sqsm"], ["no backend 'sqsm' on ./lab (known: sqsim)"]),
        (["submit", "sqsm", "job.json"], ["no backend 'sqsm' on ./lab (known: sqsim)"]),
        (["work", "sqsm", "--burst"], ["no backend 'sqsm' on ./lab (known: sqsim)"]),
        (["running", "sqsm"], ["no backend 'sqsm' on ./lab (known: sqsim)"]),
        (["backend", "show", "sqsm"], ["no backend 'sqsm' on ./lab (known: sqsim)"]),
        (["status", "sqsim", "not-a-job"], ["no job 'not-a-job'", "'sqsim'", "./lab"]),
        (["result", "sqsim", "not-a-job"], ["no job 'not-a-job'", "'sqsim'", "./lab"]),
        (["verify", "sqsim", "6b0000000000000000000000"], ["no job '6b00", "./lab"]),
        (["requeue", "sqsim", "6b0000000000000000000000"], ["no job '6b00", "./lab"]),
        (["result", "sqsim", "QUEUED"], ["has no result yet", "INITIALIZING", "./lab"]),
        (["copy", "./nonexistent", "./x"], ["no storage at ./nonexistent"]),
        (["--storage", "mongodb:/localhost", "backends"], ["did you mean mongodb://localhost?"]),
        (["--storage", "mongodb:bob:pw@h", "backends"], ["did you mean mongodb://bob:***@h?"]),
        (["--storage", "mongodb://localhost/mydb", "backends"], ["'mydb'", "authSource"]),
    ],
)
def test_cli_typos_fail_naming_the_storage_and_the_thing(
    tmp_path: Path, args: list[str], needles: list[str]
) -> None:
    """A storage, backend or job that does not exist, or a malformed storage URL, is exit 1
    and one line naming the storage and the thing (and the known backends); nothing is
    created or changed."""
    _, _, job_id = a_lab(tmp_path / "lab")
    (tmp_path / "job.json").write_text(json.dumps(JOB))
    (tmp_path / "lab_executor.py").write_text(EXECUTOR)
    args = [job_id if arg == "QUEUED" else arg for arg in args]
    before = {p.name for p in tmp_path.iterdir()}, tree(tmp_path / "lab")
    proc = sqstore_cli(*args, cwd=tmp_path, env={"SQSTORE_STORAGE": "./lab"})
    one_error_line(proc, *needles)
    assert proc.stdout == ""
    assert ({p.name for p in tmp_path.iterdir()}, tree(tmp_path / "lab")) == before


@pytest.mark.slow
def test_cli_names_an_unreachable_mongodb_in_the_users_terms(tmp_path: Path) -> None:
    """A MongoDB that does not answer is 'cannot reach MongoDB at URL' (password hidden),
    never the internal folder the first request was for."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"mongodb://bob:pw-secret@127.0.0.1:{port}/?serverSelectionTimeoutMS=300"
    shown = f"mongodb://bob:***@127.0.0.1:{port}/?serverSelectionTimeoutMS=300"
    for args in (["backends"], ["queue", "sqsim"], ["status", "sqsim", "x"], ["work", "sqsim"]):
        proc = sqstore_cli("--storage", url, *args, cwd=tmp_path)
        one_error_line(proc, f"cannot reach MongoDB at {shown}")
        assert "backends/configs" not in proc.stderr and "pw-secret" not in proc.stderr
    copy = sqstore_cli("copy", str(tmp_path / "lab"), url, cwd=tmp_path)
    one_error_line(copy, "no storage at")
    a_lab(tmp_path / "lab")
    copy = sqstore_cli("copy", str(tmp_path / "lab"), url, cwd=tmp_path)
    one_error_line(copy, f"cannot reach MongoDB at {shown}")


@pytest.fixture
def unwritable_lab(tmp_path: Path) -> Any:
    """A lab (see `a_lab`) whose root cannot be written: a read-only tmpfs as root, else
    folders without write permission."""
    root = tmp_path / "ro"
    root.mkdir()
    mounted = False
    if os.geteuid() == 0:
        mount = ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(root)]
        proc = subprocess.run(mount, capture_output=True, text=True)
        if proc.returncode != 0:
            skip_or_fail(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted = True
    try:
        a_lab(root / "lab")
        if mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
        else:
            for folder in [root, *root.rglob("*")]:
                if folder.is_dir():
                    folder.chmod(0o555)
        yield root / "lab"
    finally:
        if mounted:
            subprocess.run(["umount", str(root)], check=True)
        else:
            for folder in [root, *root.rglob("*")]:
                if folder.is_dir():
                    folder.chmod(0o755)


@pytest.mark.slow
def test_cli_never_prints_a_traceback(tmp_path: Path, unwritable_lab: Path) -> None:
    """Every command, on an unwritable root, a missing root, a corrupt document and an
    unreachable MongoDB, ends with exit 0 or 1 and no traceback; each error is one line."""
    corrupt = tmp_path / "corrupt"
    _, _, job_id = a_lab(corrupt)
    (corrupt / "backends/configs/sqsim.json").write_text('{"display_name": "sqs')
    (corrupt / f"status/sqsim/{job_id}.json").write_text("[1, 2")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "job.json").write_text(json.dumps(JOB))
    (tmp_path / "cfg.json").write_text(json.dumps(sqstore.to_doc(sqstore.demo_config("sim2"))))
    storages = {
        "unwritable": str(unwritable_lab),
        "missing": str(tmp_path / "missing"),
        "corrupt": str(corrupt),
        "unreachable": f"mongodb://127.0.0.1:{port}/?serverSelectionTimeoutMS=300",
    }
    commands = [
        ["submit", "sqsim", "job.json"],
        ["status", "sqsim", job_id],
        ["result", "sqsim", job_id],
        ["verify", "sqsim", job_id],
        ["backends"],
        ["queue", "sqsim"],
        ["running", "sqsim"],
        ["requeue", "sqsim"],
        ["backend", "show", "sqsim"],
        ["backend", "add", "cfg.json"],
        ["work", "sqsim", "lab_executor:run", "--key", "bob.jwk", "--burst"],
        ["copy", "STORAGE", "COPY"],
        ["copy", str(corrupt), "STORAGE"],
        ["demo", "--jobs", "1", "--key", str(tmp_path / "demo.jwk")],  # makes a missing root
    ]
    (tmp_path / "bob.jwk").write_text((unwritable_lab.parent.parent / "bob.jwk").read_text())
    for kind, url in storages.items():
        for command in commands:
            swap = {"STORAGE": url, "COPY": str(tmp_path / f"copy-{kind}")}
            args = [swap.get(arg, arg) for arg in command]
            proc = sqstore_cli("--storage", url, *args, cwd=tmp_path)
            assert proc.returncode in (0, 1), (kind, command, proc.stderr)
            assert "Traceback" not in proc.stderr, (kind, command, proc.stderr)
            assert "error: unexpected" not in proc.stderr, (kind, command, proc.stderr)  # a crash
            lines = proc.stderr.splitlines()
            if command[0] == "copy":  # one line per document not copied, or one error
                said = ("sqstore: error: ", "sqstore: copy: ")
                assert all(line.startswith(said) for line in lines), (kind, proc.stderr)
            elif proc.returncode == 1 and command[0] != "work":
                assert proc.stderr.count("\n") == 1, (kind, command, proc.stderr)
            errors = [line for line in lines if "error" in line.lower() or "not copied" in line]
            assert errors or proc.returncode == 0, (kind, command, proc.stderr)


def test_storage_urls_expand_the_home_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'~' in a storage path (--storage, $SQSTORE_STORAGE, copy) is the home directory: no
    folder named '~' appears."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    assert sqstore.open_storage("~/lab")["name"] == "local"
    sqstore.upload_config(sqstore.open_storage("~/lab"), sqstore.demo_config("sim"), "sim")
    assert (home / "lab/backends/configs/sim.json").exists()
    env = {"HOME": str(home)}
    demo = sqstore_cli("--storage", "~/demo", "demo", "--jobs", "1", cwd=tmp_path, env=env)
    assert demo.returncode == 0, demo.stderr
    queue = sqstore_cli("queue", "sqsim", cwd=tmp_path, env={**env, "SQSTORE_STORAGE": "~/demo"})
    assert queue.returncode == 0 and queue.stdout == "", queue.stderr
    copy = sqstore_cli("copy", "~/demo", "~/copy", cwd=tmp_path, env=env)
    assert copy.returncode == 0, copy.stderr
    assert (home / "demo/backends/configs/sqsim.json").exists()
    assert (home / "copy/backends/configs/sqsim.json").exists()
    assert not list(tmp_path.rglob("~"))


def test_mongodb_url_naming_a_database_is_refused() -> None:
    """A MongoDB URL with a database path is refused (sqstore uses sqooler's databases and
    would ignore it), with the URL redacted and authSource named; without one it is taken."""
    for url in ("mongodb://bob:s3cret@db.example.org/mydb", "mongodb+srv://c.example.org/mydb?x=1"):
        for call in (sqstore.open_storage, sqstore.mongodb_storage):
            with pytest.raises(ValueError, match=r"'mydb'.*authSource") as info:
                call(url)
            assert "s3cret" not in str(info.value)
    with pytest.raises(ValueError, match="bad MongoDB URI") as info:  # "/" in a password
        sqstore.mongodb_storage("mongodb://bob:s3c/ret@db.example.org/")
    assert "ret@" not in str(info.value)
    for url in ("mongodb://db.example.org", "mongodb://db/", "mongodb://db/?authSource=mydb"):
        assert sqstore.mongodb_storage(url, create_indexes=False)["name"] == "mongodb"


def test_cli_copy_verify_blames_a_conflicting_key_not_the_signature(tmp_path: Path) -> None:
    """copy --verify into a target that holds another key under the backend's kid reports
    that conflict as why the signed documents were not copied, not a bad signature; a
    document that its own key does not verify is still blamed on its signature."""
    src, _, job_id = a_lab(tmp_path / "src")
    dst = sqstore.local_storage(tmp_path / "dst")
    _, other = sqstore.generate_keypair("bobkey")
    dst["upload"]("backends/public_keys", "bobkey", sqstore.to_doc(other))
    proc = sqstore_cli("copy", "--verify", "src", "dst", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert any("public_keys/bobkey" in line and "kept the different" in line for line in lines)
    config = [line for line in lines if "configs/sqsim" in line]
    assert len(config) == 1 and "'bobkey'" in config[0] and "conflict" in config[0], lines
    assert "signature" not in config[0], config
    assert not (tmp_path / "dst/backends/configs/sqsim.json").exists()
    # a tampered config whose key is not in conflict: its signature is the cause
    tampered = src["get"]("backends/configs", "sqsim")
    tampered["payload"]["max_shots"] = 7
    src["update"]("backends/configs", "sqsim", tampered)
    shutil.rmtree(tmp_path / "dst")
    proc = sqstore_cli("copy", "--verify", "src", "dst", cwd=tmp_path)
    config = [line for line in proc.stderr.splitlines() if "configs/sqsim" in line]
    assert len(config) == 1 and "conflict" not in config[0] and proc.returncode == 1, config
    assert job_id


def test_work_logs_to_the_sqstore_logger_by_default(caplog: pytest.LogCaptureFixture) -> None:
    """work() without *log* logs to the 'sqstore' logger: a finished job at INFO, a job
    whose executor failed at WARNING; with burst=True it returns once every queue is empty."""
    store = sqstore.memory_storage()
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    ok = sqstore.upload_job(store, JOB, "sim", "alice")
    bad = sqstore.upload_job(store, job_with(num_wires=99), "sim", "alice")
    with caplog.at_level("DEBUG", logger="sqstore"):
        assert sqstore.work([store], "sim", sqstore.run_simulator, burst=True) == 2
    records = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert records[0][:2] == ("sqstore", "INFO") and f"{ok} DONE" in records[0][2], records
    assert records[1][:2] == ("sqstore", "WARNING") and f"{bad} ERROR" in records[1][2], records
    assert sqstore.work([store], "sim", sqstore.run_simulator, burst=True) == 0


@pytest.mark.slow
def test_cli_work_log_lines_carry_time_and_level_and_burst_exits(tmp_path: Path) -> None:
    """`sqstore work --burst` serves the queued jobs and exits 0 once every queue is empty
    (1, saying so, when a job is left that it could not claim); its log lines start with a
    timestamp and a level; -q keeps only warnings, -v adds one line per storage operation."""
    store, _, first = a_lab(tmp_path / "lab")
    second = sqstore.upload_job(store, job_with(fail=True), "sqsim", "cli")
    common = ["--storage", "lab", "work", "sqsim", "lab_executor:run", "--key", "bob.jwk"]
    proc = sqstore_cli(*common, "--burst", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
    assert re.search(rf"^{stamp} INFO sqstore: local {first} DONE in \d+ ms$", proc.stderr, re.M)
    assert re.search(rf"^{stamp} WARNING sqstore: local {second} ERROR", proc.stderr, re.M)
    assert all(re.match(stamp, line) for line in proc.stderr.splitlines()), proc.stderr
    assert executed(tmp_path) == [f"sqsim {first}", f"sqsim {second}"]
    third = sqstore.upload_job(store, JOB, "sqsim", "cli")
    quiet = sqstore_cli(*common, "--burst", "-q", cwd=tmp_path)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    assert executed(tmp_path)[-1] == f"sqsim {third}"
    verbose = sqstore_cli(*common, "--burst", "-v", cwd=tmp_path)
    assert verbose.returncode == 0, verbose.stderr
    assert re.search(rf"^{stamp} DEBUG sqstore: local list jobs/queued/sqsim", verbose.stderr, re.M)
    held = sqstore.upload_job(store, JOB, "sqsim", "cli")  # another worker's claim, half done
    lease = sqstore.Lease(held, "sqsim", "elsewhere:1", "t0ken", time.time() + 600)
    store["upload"]("jobs/leases", held, sqstore.to_doc(lease))
    left = sqstore_cli(*common, "--burst", cwd=tmp_path)
    assert left.returncode == 1 and "Traceback" not in left.stderr, left.stderr
    assert re.search(rf"^{stamp} ERROR sqstore: lab: 1 job left in the queue", left.stderr, re.M)


@pytest.mark.slow
def test_cli_work_second_ctrl_c_aborts_the_job_and_puts_it_back(tmp_path: Path) -> None:
    """The first Ctrl-C says the current job finishes and that a second one aborts it; the
    second aborts it (exit 130, no traceback) and puts the job back in its queue at once."""
    store, _, job_id = a_lab(tmp_path / "lab")
    store["delete"]("jobs/queued/sqsim", job_id)
    long_job = sqstore.upload_job(store, job_with(sleep=60), "sqsim", "cli")
    proc = worker(tmp_path, "--storage", "lab", "work", "sqsim", "lab_executor:run", "--key",
                  str(tmp_path / "bob.jwk"), "--poll", "0.05")  # fmt: skip
    deadline = time.monotonic() + 60
    while not executed(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert executed(tmp_path) == [f"sqsim {long_job}"]
    proc.send_signal(signal.SIGINT)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    while "SIGINT" not in line and line:
        line = proc.stderr.readline()
    assert "once the job that runs, if any, is done" in line and "again" in line, line
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and f"put {long_job} back" in err, err
    assert store["list"]("jobs/queued/sqsim") == [long_job]
    assert store["list"]("jobs/running") == []
    assert sqstore.running_jobs(store, "sqsim") == {}  # a lease left is released: no holder
    assert all(not store["get"]("jobs/leases", j)["holder"] for j in store["list"]("jobs/leases"))


def test_cli_backend_add_and_show_register_a_backend_from_the_command_line(
    tmp_path: Path,
) -> None:
    """`backend add CONFIG --key FILE` uploads a config (signed when it says so) and
    publishes its public key, then updates it on a later run; `backend show` prints the
    config as `add` takes it; a wrong or missing key is one error line, nothing written."""
    keygen = sqstore_cli("keygen", "bobkey", cwd=tmp_path)
    assert keygen.returncode == 0, keygen.stderr
    config = sqstore.to_doc(sqstore.demo_config("sqsim", sign=True))
    config["kid"] = "bobkey"
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    add = ["--storage", "lab", "backend", "add", "cfg.json"]
    one_error_line(sqstore_cli(*add, cwd=tmp_path), "signs", "--key")
    assert not (tmp_path / "lab").exists()
    proc = sqstore_cli(*add, "--key", "bobkey.jwk", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "sqsim" in proc.stdout and "bobkey" in proc.stdout
    store = sqstore.local_storage(tmp_path / "lab")
    public = sqstore.from_doc(json.loads(keygen.stdout), sqstore.JWK)
    assert sqstore.get_public_key(store, "sqsim") == public
    assert sqstore.is_signed(store["get"]("backends/configs", "sqsim"))
    shown = sqstore_cli("--storage", "lab", "backend", "show", "sqsim", cwd=tmp_path)
    assert shown.returncode == 0 and json.loads(shown.stdout)["max_shots"] == config["max_shots"]
    (tmp_path / "cfg.json").write_text(json.dumps({**json.loads(shown.stdout), "max_shots": 9}))
    again = sqstore_cli(*add, "--key", "bobkey.jwk", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert sqstore.get_config(store, "sqsim").max_shots == 9
    other = sqstore_cli("keygen", "bobkey", "-o", "other.jwk", cwd=tmp_path)
    assert other.returncode == 0
    before = tree(tmp_path / "lab")
    one_error_line(sqstore_cli(*add, "--key", "other.jwk", cwd=tmp_path), "sqsim")
    (tmp_path / "bad.json").write_text('{"display_name": "x", "max_shots": "many"}')
    bad = sqstore_cli("--storage", "lab", "backend", "add", "bad.json", cwd=tmp_path)
    one_error_line(bad, "bad.json")
    assert tree(tmp_path / "lab") == before
    plain = sqstore.to_doc(sqstore.demo_config("plain"))
    (tmp_path / "plain.json").write_text(json.dumps(plain))
    proc = sqstore_cli("--storage", "lab", "backend", "add", "plain.json", cwd=tmp_path)
    assert proc.returncode == 0 and sqstore.get_backends(store) == ["plain", "sqsim"]


def test_cli_backends_lists_the_others_and_marks_a_broken_config(tmp_path: Path) -> None:
    """One corrupt config does not hide the others: `backends` lists every backend, marks
    the broken one, says why on stderr (one line) and exits 1."""
    store, _, _ = a_lab(tmp_path / "lab")
    sqstore.upload_config(store, sqstore.demo_config("zeta"), "zeta")
    (tmp_path / "lab/backends/configs/broken.json").write_text('{"display_name": ')
    proc = sqstore_cli("--storage", "lab", "backends", cwd=tmp_path)
    one_error_line(proc, "'broken'", "lab")
    rows = [line.split("\t") for line in proc.stdout.splitlines()]
    assert [row[0] for row in rows] == ["broken", "sqsim", "zeta"]
    assert rows[0][1:] == ["-", "broken"] and rows[1][1] == "local_sqsim_simulator"


def test_running_jobs_and_requeue_job(tmp_path: Path) -> None:
    """running_jobs lists a backend's running jobs with their leases (None for a job that
    has none); requeue_job puts one back in its queue at once, lease or not, and
    refuses a job of another backend or one that is not running."""
    store = sqstore.local_storage(tmp_path / "lab")
    for dn in ("sim", "other"):
        sqstore.upload_config(store, sqstore.demo_config(dn), dn)
    ids = [sqstore.upload_job(store, JOB, "sim", "alice") for _ in range(3)]
    theirs = sqstore.upload_job(store, JOB, "other", "alice")
    for job_id in ids:
        sqstore.upload_status(store, "sim", "alice", job_id)
    for holder in ("w1", "w2"):
        assert (
            sqstore.claim_job(
                store, "sim", policy=sqstore.LeasePolicy(holder=holder, lease_seconds=600)
            )
            is not None
        )
    assert sqstore.claim_job(store, "other", policy=sqstore.LeasePolicy(holder="w3")) is not None
    store["move"]("jobs/queued/sim", "jobs/running", ids[2])  # as sqooler claims: no lease
    running = sqstore.running_jobs(store, "sim")
    assert list(running) == ids
    assert [lease.holder for lease in running.values() if lease] == ["w1", "w2"]
    first = running[ids[0]]
    assert running[ids[2]] is None and first is not None and first.expires > time.time() + 500
    assert sqstore.requeue_job(store, "sim", ids[1]) is True
    assert sqstore.requeue_job(store, "sim", ids[2]) is True
    assert store["list"]("jobs/queued/sim") == ids[1:]
    assert list(sqstore.running_jobs(store, "sim")) == [ids[0]]
    with pytest.raises(sqstore.NotFoundError, match="not running"):
        sqstore.requeue_job(store, "sim", ids[1])
    with pytest.raises(sqstore.NotFoundError, match="'sim'"):
        sqstore.requeue_job(store, "sim", theirs)
    again = sqstore.claim_job(store, "sim", policy=sqstore.LeasePolicy(holder="w4"))
    assert again is not None and again[0].job_id == ids[1]
    lease = sqstore.running_jobs(store, "sim")[ids[1]]
    assert lease is not None and lease.holder == "w4"


def test_requeue_job_completes_a_recorded_finish_and_releases_a_half_claim(
    tmp_path: Path,
) -> None:
    """requeue_job finishes a job whose worker died while finishing it (its lease holds the
    final status) instead of running it again, and releases the live lease a claim left on
    a queued job when it stopped before its move, so that the next claim takes the job."""
    store = sqstore.local_storage(tmp_path / "lab")
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    dying, blocked = (sqstore.upload_job(store, JOB, "sim", "alice") for _ in range(2))
    for job_id in (dying, blocked):
        sqstore.upload_status(store, "sim", "alice", job_id)
    assert (
        sqstore.claim_job(store, "sim", policy=sqstore.LeasePolicy(holder="w1", lease_seconds=600))
        is not None
    )
    lease = store["get"]("jobs/leases", dying)
    final = sqstore.StatusMsg(dying, "ERROR", "The executor failed.", "ValueError: x")
    store["update"]("jobs/leases", dying, {**lease, "finish": sqstore.to_doc(final)})
    assert sqstore.requeue_job(store, "sim", dying) is False
    assert jobs_in(store, "deleted") == [dying] and store["list"]("jobs/running") == []
    assert sqstore.get_status(store, "sim", "alice", dying).error_message == "ValueError: x"
    half = sqstore.Lease(blocked, "sim", "w2", "t0ken", time.time() + 600)
    store["upload"]("jobs/leases", blocked, sqstore.to_doc(half))
    assert (
        sqstore.claim_job(store, "sim", policy=sqstore.LeasePolicy(holder="w3")) is None
    )  # w2 seems to hold it
    assert sqstore.requeue_job(store, "sim", blocked) is True
    claimed = sqstore.claim_job(store, "sim", policy=sqstore.LeasePolicy(holder="w3"))
    assert claimed is not None and claimed[0].job_id == blocked


def test_cli_running_and_requeue(tmp_path: Path) -> None:
    """`running` prints each running job with holder, lease expiry, attempts and whether a
    sweep would take it (`expired`, as `requeue` judges it, or `overdue` within the skew);
    `requeue DN JOB` forces that job back; `requeue DN` requeues the expired ones only."""
    store, key, job_id = a_lab(tmp_path / "lab")
    second = sqstore.upload_job(store, JOB, "sqsim", "cli")
    third = sqstore.upload_job(store, JOB, "sqsim", "cli")
    assert sqstore.claim_job(
        store, "sqsim", key, policy=sqstore.LeasePolicy(holder="deadbox:42", lease_seconds=600)
    )
    expired = -sqstore.DEFAULT_SKEW - 2  # claimed with a 1 s lease so long ago
    gone, late = (sqstore.LeasePolicy(holder=h, lease_seconds=1) for h in ("gone:7", "late:8"))
    assert sqstore.claim_job(store, "sqsim", key, policy=gone, now=lambda: time.time() + expired)
    assert sqstore.claim_job(store, "sqsim", key, policy=late, now=lambda: time.time() - 2)
    proc = sqstore_cli("--storage", "lab", "running", "sqsim", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t") for line in proc.stdout.splitlines()]
    assert [row[:2] for row in rows] == [
        [job_id, "deadbox:42"],
        [second, "gone:7"],
        [third, "late:8"],
    ]
    assert [row[4] for row in rows] == ["live", "expired", "overdue"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", rows[0][2]) and rows[0][3] == "1"
    sweep = sqstore_cli("--storage", "lab", "requeue", "sqsim", cwd=tmp_path)
    assert sweep.returncode == 0 and sweep.stdout.split() == [second], sweep.stderr
    force = sqstore_cli("--storage", "lab", "requeue", "sqsim", job_id, cwd=tmp_path)
    assert force.returncode == 0 and force.stdout.split() == [job_id], force.stderr
    assert sorted(store["list"]("jobs/queued/sqsim")) == sorted([job_id, second])
    left = sqstore_cli("--storage", "lab", "running", "sqsim", cwd=tmp_path)
    assert left.returncode == 0 and left.stdout.split("\t")[0] == third
    odd = {**store["get"]("jobs/leases", third), "expires": 1e300}  # written by another program
    store["update"]("jobs/leases", third, odd)
    beyond = sqstore_cli("--storage", "lab", "running", "sqsim", cwd=tmp_path)
    assert beyond.returncode == 0, beyond.stderr
    assert beyond.stdout.split("\t")[2:] == ["1e+300", "1", "live\n"], beyond.stdout


# ============================================================================
# A newcomer's first hour
# ============================================================================
# Blocks that need a server, credentials or a lab's own files: pasted, they must parse.
_FRAGMENT_HEADINGS = ("### Dropbox", "### MongoDB", "### Keeping sqooler's Spooler")


def readme_python_blocks() -> list[tuple[str, str]]:
    """Every ```python block of README.md, in order, with the heading it sits under."""
    text = (HERE / "README.md").read_text()
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```$", text, re.S | re.M):
        headings = re.findall(r"^#+ .*$", text[: match.start()], re.M)
        blocks.append((headings[-1], match.group(1)))
    return blocks


def test_readme_python_examples_paste_into_the_interpreter(tmp_path: Path) -> None:
    """Every Python example of the README, pasted into an interactive `python` (in README
    order, in one temporary folder), parses there, and each self-contained one runs without
    a traceback."""
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "TMPDIR": str(tmp_path),
           "PYTHONPATH": str(HERE)}  # fmt: skip
    failed = []
    for heading, code in readme_python_blocks():
        proc = subprocess.run(
            [sys.executable, "-i", "-q"], input=code + "\n", cwd=tmp_path, env=env,
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        fragment = heading.startswith(_FRAGMENT_HEADINGS)
        bad = ("SyntaxError", "IndentationError") + (() if fragment else ("Traceback",))
        if any(word in proc.stderr for word in bad):
            failed.append(f"{heading}:\n{proc.stderr[-800:]}")
    assert failed == [], "\n\n".join(failed)


def test_readme_alice_says_how_to_read_her_result_later() -> None:
    """The README tells Alice to read her result in the same Python session, after Bob ran
    again: her script run anew submits a new job, which is pending again."""
    alice = readme_block("### Alice (frontend)", "python")
    marker = re.search(r"^# later, when Bob has run again\n(.*)$", alice, re.M)
    assert marker and "same session" in marker.group(1), alice
    text = (HERE / "README.md").read_text()
    prose = text[text.index("### Alice (frontend)") : text.index("### Dropbox")]
    assert re.search(r"same Python\s+session", prose) and "pending in turn" in prose


def test_cli_missing_extra_says_how_to_install_it(tmp_path: Path) -> None:
    """Without pymongo or the Dropbox SDK, a MongoDB or Dropbox storage is one error line
    naming the package to install, never the package index name sqstore does not have."""
    for package in ("pymongo", "dropbox"):
        (tmp_path / "absent" / package).mkdir(parents=True)
        (tmp_path / "absent" / package / "__init__.py").write_text(
            f"raise ModuleNotFoundError(\"No module named '{package}'\", name='{package}')\n"
        )
    env = {"PYTHONPATH": f"{tmp_path / 'absent'}{os.pathsep}{HERE}",
           "SQSTORE_DROPBOX_APP_KEY": "k", "SQSTORE_DROPBOX_APP_SECRET": "s",
           "SQSTORE_DROPBOX_REFRESH_TOKEN": "t"}  # fmt: skip
    for url, package, extra in (
        ("mongodb://127.0.0.1:1/", "pymongo", "mongodb"),
        ("dropbox://", "dropbox", "dropbox"),
    ):
        proc = sqstore_cli("--storage", url, "backends", cwd=tmp_path, env=env)
        one_error_line(proc, f"pip install '{package}", f"'.[{extra}]'")
        assert "sqstore[" not in proc.stderr, proc.stderr


def test_cli_demo_and_backend_add_with_another_key_say_so_in_user_terms(tmp_path: Path) -> None:
    """`demo --key` or `backend add --key` with a key other than the one the backend's config
    is signed with is one line naming the key file, the backend, the storage and the kid the
    config is signed with, not a folder of the layout."""
    first = run_cli("--storage", "lab", "demo", "--jobs", "1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    keygen = run_cli("keygen", "other", "-o", "other.jwk", cwd=tmp_path)
    assert keygen.returncode == 0, keygen.stderr
    config = {**sqstore.to_doc(sqstore.demo_config("sqsim", sign=True)), "kid": None}
    (tmp_path / "sqsim.json").write_text(json.dumps(config))
    for args in (
        ["demo", "--key", "other.jwk"],
        ["backend", "add", "sqsim.json", "--key", "other.jwk"],
    ):
        proc = run_cli("--storage", "lab", *args, cwd=tmp_path)
        one_error_line(proc, "other.jwk", "backend 'sqsim'", "lab", "'sqsim-demo'")
        assert "backends/" not in proc.stderr, proc.stderr
    again = run_cli("--storage", "lab", "demo", "--jobs", "1", cwd=tmp_path)
    assert again.returncode == 0, again.stderr


def test_cli_demo_counts_read_as_english(tmp_path: Path) -> None:
    """`sqstore demo --jobs 1` (the README's worker example runs it) says "1 job", not "1 jobs"."""
    proc = run_cli("demo", "--jobs", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "submitted 1 job\n" in proc.stdout and "simulated 1 job\n" in proc.stdout, proc.stdout
    assert "1 round trip in" in proc.stdout, proc.stdout


def test_cli_cancel_says_the_username_is_not_checked(tmp_path: Path) -> None:
    """`cancel -u USER` records USER as who cancelled without checking it is the job's user
    (an unsigned job's user is not recorded on every backend): help and README say so."""
    store, _, job_id = a_lab(tmp_path / "lab")
    proc = run_cli("--storage", "lab", "cancel", "sqsim", job_id, "-u", "mallory", cwd=tmp_path)
    assert (proc.returncode, proc.stdout) == (0, f"{job_id}: cancelled\n"), proc.stderr
    assert sqstore.get_status(store, "sqsim", "cli", job_id).detail == "Cancelled by mallory."
    helptext = " ".join(run_cli("cancel", "--help", cwd=tmp_path).stdout.split())
    assert "not checked" in helptext, helptext
    assert "not checked" in " ".join(readme_section("## Cancelling a job").split())


def test_cli_backend_add_names_a_bad_config_file_once(tmp_path: Path) -> None:
    """`backend add` of a file that is not a backend config is one line naming the file once."""
    (tmp_path / "lab").mkdir()
    for name, text in (("bad.json", "not json"), ("partial.json", '{"display_name": "x"}')):
        (tmp_path / name).write_text(text)
        proc = run_cli("--storage", "lab", "backend", "add", name, cwd=tmp_path)
        one_error_line(proc, name, "not a backend config")
        assert proc.stderr.count(name) == 1, proc.stderr


# ============================================================================
# One locator
# ============================================================================
_ATTRIBUTE_CASES: list[tuple[str, str, tuple[Any, ...], dict[str, str], str, str]] = [
    # (function, attribute, args, keywords, local answer, Dropbox answer); "!" = InvalidNameError
    ("path", "configs", (), {}, "backends/configs", "Backend_files/Config"),
    ("path", "pks", (), {}, "backends/public_keys", "Backend_files/public_keys"),
    ("path", "queue", (), {}, "!invalid display_name None", "!invalid display_name None"),
    (
        "path",
        "queue",
        ("sim",),
        {"job_id": "../x"},
        "jobs/queued/sim",
        "Backend_files/Queued_Jobs/sim",
    ),
    (
        "path",
        "nope",
        ("sim",),
        {},
        "!attribute 'nope' has no folder: use one of ['configs', "
        "'deleted', 'finished', 'pks', 'queue', 'results', 'running', 'status']",
        "!attribute 'nope'",
    ),
    (
        "path",
        "finished",
        ("sim",),
        {},
        "jobs/finished/sim",
        "!the finished folder of this layout needs a job_id or username",
    ),
    (
        "path",
        "finished",
        ("sim",),
        {"job_id": "20231114_221320-sim-alice-1e240", "username": "bob"},
        "jobs/finished/sim",
        "Backend_files/Finished_Jobs/sim/alice",
    ),
    (
        "path",
        "finished",
        ("sim",),
        {"username": "bob"},
        "jobs/finished/sim",
        "Backend_files/Finished_Jobs/sim/bob",
    ),
    ("path", "finished", ("sim",), {"username": "../"}, "jobs/finished/sim", "!invalid username"),
    (
        "path",
        "results",
        ("sim",),
        {"job_id": "6553f100075bcd15abcdef01"},
        "results/sim",
        "Backend_files/Result/sim/None",
    ),
    (
        "path",
        "results",
        ("Sim",),
        {"job_id": "j1"},
        "!invalid display_name 'Sim'",
        "!invalid display_name 'Sim'",
    ),
    ("id", "configs", ("j1",), {}, "!invalid display_name None", "!invalid display_name None"),
    ("id", "configs", ("j1", "sim"), {}, "sim", "sim"),
    ("id", "status", ("j1",), {}, "j1", "status-j1"),
    ("id", "job", ("j1",), {}, "j1", "job-j1"),
    ("id", "results", ("../j1",), {}, "!invalid job_id '../j1'", "!invalid job_id '../j1'"),
    (
        "id",
        "queue",
        ("j1",),
        {},
        "!attribute 'queue' has no id: use one of ['configs', 'job', 'results', 'status']",
        "!attribute 'queue' has no id",
    ),
]


@pytest.mark.parametrize("case", _ATTRIBUTE_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[3]}{c[2]}")
def test_get_attribute_path_and_id_answer_as_the_layout_places_documents(
    case: tuple[str, str, tuple[Any, ...], dict[str, str], str, str],
) -> None:
    """get_attribute_path/_id give each layout's folder and id, or an InvalidNameError why not."""
    which, attribute, args, keywords, local, dropbox = case
    function = sqstore.get_attribute_path if which == "path" else sqstore.get_attribute_id
    for layout, expected in ((sqstore.LOCAL_LAYOUT, local), (sqstore.DROPBOX_LAYOUT, dropbox)):
        store = sqstore.memory_storage(layout=layout)
        if expected.startswith("!"):
            with pytest.raises(sqstore.InvalidNameError) as caught:
                function(store, attribute, *args, **keywords)
            assert str(caught.value).startswith(expected[1:]), str(caught.value)
        else:
            assert function(store, attribute, *args, **keywords) == expected


# ============================================================================
# Public names only
# ============================================================================
def test_wrap_ops_makes_a_layer_of_a_function_and_leaves_the_store_alone(store: Storage) -> None:
    """`wrap_ops` returns a new handle whose named operations (all seven by default) go
    through ``wrap(op, fn)``, keeps the others and the given handle as they were, and
    refuses what is not a handle."""
    seen: list[str] = []

    def spy(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            seen.append(op)
            return fn(*args)

        return call

    spied = sqstore.wrap_ops(store, spy, only=("upload", "get"))
    spied["upload"]("jobs/running", "a1", {"v": 1})
    assert spied["get"]("jobs/running", "a1") == {"v": 1}
    assert spied["list"]("jobs/running") == ["a1"] and seen == ["upload", "get"]
    assert store["get"]("jobs/running", "a1") == {"v": 1} and seen == ["upload", "get"]
    every = sqstore.wrap_ops(store, spy)
    every["list"]("jobs/running")
    every["swap"]("jobs/running", "a1", {"v": 1}, {"v": 2})
    assert seen[-2:] == ["list", "swap"] and spied["name"] == every["name"] == store["name"]
    with pytest.raises(TypeError, match="not a sqstore storage handle"):
        sqstore.wrap_ops(cast(Storage, {"get": store["get"]}), spy)


@pytest.mark.usefixtures("configured")
def test_locate_job_says_which_folder_holds_a_job_through_its_life(store: Storage) -> None:
    """`locate_job` names the one of queued, running, finished and deleted that holds a job,
    None for a job that is nowhere, and refuses a name that cannot be one."""
    done, failed = (sqstore.upload_job(store, JOB, "sim", "alice") for _ in range(2))
    assert sqstore.locate_job(store, "sim", done) == "queued"
    for job_id, outcome in ((done, "DONE"), (failed, "ERROR")):
        claimed = sqstore.claim_job(store, "sim", policy=sqstore.LeasePolicy(holder="me"))
        assert claimed is not None and claimed[0].job_id == job_id
        assert sqstore.locate_job(store, "sim", job_id) == "running"
        result = sqstore.run_simulator(JOB, job_id, "sim") if outcome == "DONE" else None
        status = sqstore.StatusMsg(job_id, outcome, "x", "None")
        sqstore.update_in_database(
            store, result, status, job_id, "sim", policy=sqstore.LeasePolicy(holder="me")
        )
    assert sqstore.locate_job(store, "sim", done) == "finished"
    assert sqstore.locate_job(store, "sim", failed) == "deleted"
    assert sqstore.locate_job(store, "sim", sqstore.create_job_id(store, "sim", "alice")) is None
    with pytest.raises(sqstore.InvalidNameError):
        sqstore.locate_job(store, "sim", "../x")


@pytest.mark.usefixtures("configured")
def test_lease_expired_judges_a_lease_as_the_sweep_does(store: Storage) -> None:
    """`lease_expired` is false while a lease runs (and *skew* after it), true after that and
    for a released lease; `requeue_expired` at the same instants agrees."""
    job_id = sqstore.upload_job(store, JOB, "sim", "alice")
    assert sqstore.claim_job(
        store, "sim", policy=sqstore.LeasePolicy(holder="w", lease_seconds=10), now=lambda: T0
    )
    lease = sqstore.running_jobs(store, "sim")[job_id]
    assert lease is not None and lease.expires == T0 + 10
    assert not sqstore.lease_expired(lease, T0 + 12, policy=sqstore.LeasePolicy(skew=5))
    assert (
        sqstore.requeue_expired(
            store, "sim", now=lambda: T0 + 12, policy=sqstore.LeasePolicy(skew=5)
        )
        == []
    )
    assert sqstore.lease_expired(lease, T0 + 16, policy=sqstore.LeasePolicy(skew=5))
    assert sqstore.lease_expired(attrs.evolve(lease, holder=""), T0)
    assert sqstore.requeue_expired(
        store, "sim", now=lambda: T0 + 16, policy=sqstore.LeasePolicy(skew=5)
    ) == [job_id]


def test_check_signing_key_accepts_the_backends_own_key_only(
    signed: Storage, keys: tuple[sqstore.JWK, sqstore.JWK]
) -> None:
    """`check_signing_key` returns the backend's published key and refuses another key of
    the same kid, a key of another kid, and a public key, with BadSignatureError."""
    private, _ = keys
    cfg = sqstore.get_config(signed, "sim")
    assert sqstore.check_signing_key(signed, cfg, private) == private
    assert sqstore.check_signing_key(signed, cfg, sqstore.to_doc(private)) == private
    for name, wrong in WRONG_KEYS.items():
        with pytest.raises(sqstore.BadSignatureError):
            sqstore.check_signing_key(signed, cfg, wrong(private))
            pytest.fail(name)
    with pytest.raises(sqstore.BadSignatureError):
        sqstore.check_signing_key(signed, cfg, sqstore.public_from_private(private))


def test_parse_jwk_reads_both_forms_and_never_shows_the_key() -> None:
    """`parse_jwk` reads a JWK's JSON and sqooler's base64url form of it (the same key as
    `load_jwk` reads from a file); text that holds no JWK, or whose x is not its d's, is an
    error that names *where* and does not show the key."""
    private, public = sqstore.generate_keypair("k1")
    assert private.d is not None
    doc = sqstore.to_doc(private)
    assert sqstore.parse_jwk(json.dumps(doc)) == private
    assert sqstore.parse_jwk(sqooler_config_str(doc).encode(), "PRIVATE_JWK_STR") == private
    assert sqstore.parse_jwk(json.dumps(sqstore.to_doc(public))) == public
    other = sqstore.to_doc(sqstore.generate_keypair("k1")[0])
    bad: dict[str, tuple[str, type[Exception]]] = {
        "no JWK": (f"!{private.d}!", sqstore.InvalidDocumentError),
        "bad JSON": (json.dumps(doc)[:-3], sqstore.InvalidDocumentError),
        "a field too many": (json.dumps({**doc, private.d: 1}), sqstore.InvalidDocumentError),
        "x not of d": (json.dumps({**doc, "x": other["x"]}), sqstore.BadSignatureError),
    }
    for case, (text, error) in bad.items():
        with pytest.raises(error) as info:
            sqstore.parse_jwk(text, "env:KEY")
        message = str(info.value)
        assert message.startswith("env:KEY") and private.d.rstrip("=")[:12] not in message, case


# The library's private names that the programs use, and why no public name does it.
PROGRAMS_PRIVATE_NAMES = {
    # work()'s per-job step: the status of a job cancelled while running (the one wording of
    # a cancel), dropping the cancel request it honoured, and whether an executor's result can
    # be stored at all (the strict coercion and JSON encoding that the finish applies)
    *("_cancelled", "_forget_cancel", "_coerce", "_json_bytes"),
    # work()'s claims, which keep the time they last swept from one claimer to the next, so
    # that work sweeps on its own clock whoever writes the heartbeat
    "_claims",
    # copy_storage: which folders are per backend or per user (`locate` fills them in)
    "_folder_template",
    # the command line: a URL's directory, a user's JSON file read strictly
    *("_local_root", "_loads"),
    # the bench: a Dropbox client of its own that counts requests; the floor's create-only
    # rename; the signing input under verify_result, to time the bare verify
    *("_dropbox_credentials", "_renameat2_noreplace", "_signing_input", "_open_signed"),
    "_key_bytes",
}


def test_the_programs_use_public_names_but_a_listed_few() -> None:
    """The programs below the Programs banner name no private name of the library but those
    listed (and said why)."""
    import ast

    library, programs = (HERE / "sqstore.py").read_text(encoding="utf-8").split(PROGRAMS_BANNER)
    defined = set()  # the library's module-level names
    for node in ast.parse(library).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
        targets = node.targets if isinstance(node, ast.Assign) else []
        targets += [node.target] if isinstance(node, ast.AnnAssign) else []
        defined |= {t.id for t in targets if isinstance(t, ast.Name)}
    used = {
        node.id
        for node in ast.walk(ast.parse(programs))
        if isinstance(node, ast.Name) and node.id in defined
    }
    private = {name for name in used if name.startswith("_") and not name.startswith("__")}
    assert private == PROGRAMS_PRIVATE_NAMES


# What the tests read of sqstore's private names, and why no public name does it: the
# primitive signer and verifier that the RFC 8037 vector pins (its signing input is no
# document), the parser the README's command table is held to, and the kernel call that the
# local backend's open counts replace (to count it, and to play a kernel without it).
PRIVATE_NAMES_TESTED = {"_signer", "_ed25519_verify", "_parser", "_openat2_beneath"}


def test_the_tests_use_public_names_only_but_a_listed_few() -> None:
    """The tests name no private attribute of sqstore but those listed (and said why)."""
    import ast

    tree = ast.parse((HERE / "test_sqstore.py").read_text(encoding="utf-8"))
    named = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "sqstore"
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
    }
    assert named == PRIVATE_NAMES_TESTED


# ============================================================================
# Programs on public names
# ============================================================================
def test_check_handle_refuses_what_is_not_a_storage_handle() -> None:
    """check_handle accepts a storage handle and raises TypeError, naming the missing
    operations, for anything else."""
    sqstore.check_handle(sqstore.memory_storage())
    with pytest.raises(TypeError, match=r"missing keys: \['delete'"):
        sqstore.check_handle({"upload": print})
    with pytest.raises(TypeError, match="not a sqstore storage handle"):
        sqstore.check_handle("memory://")


def test_check_display_name_returns_a_backend_name_or_refuses_it() -> None:
    """check_display_name returns a backend name of 1 to 64 of a-z and 0-9 and raises
    InvalidNameError for any other value, a job id's characters included."""
    assert sqstore.check_display_name("sim2") == "sim2"
    for bad in ("Sim", "sim-2", "", "a" * 65, None, "../sim"):
        with pytest.raises(sqstore.InvalidNameError, match="display_name"):
            sqstore.check_display_name(bad)
    assert sqstore.check_name("sim-2", "display_name") == "sim-2"  # the general rule is wider


def test_is_stored_tells_a_stored_document_from_a_missing_one(store: Storage) -> None:
    """is_stored says whether a document is stored, where get_status answers a missing status
    with sqooler's ERROR status; it raises InvalidNameError for a name no document can have."""
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    job_id = sqstore.upload_job(store, JOB, "sim", "alice")
    folder, doc_id = sqstore.locate(store["layout"], "status", "sim", "alice", job_id)
    assert not sqstore.is_stored(store, folder, doc_id)
    assert sqstore.get_status(store, "sim", "alice", job_id).status == "ERROR"
    sqstore.upload_status(store, "sim", "alice", job_id)
    assert sqstore.is_stored(store, folder, doc_id)
    with pytest.raises(sqstore.InvalidNameError):
        sqstore.is_stored(store, folder, "../x")


@pytest.mark.usefixtures("configured")
def test_work_holds_its_jobs_as_this_process(store: Storage) -> None:
    """work with no holder in its policy holds each job as this process, ``host:pid``, as
    LeasePolicy documents for holder=None."""
    import socket

    sqstore.upload_job(store, JOB, "sim", "alice")
    holders: list[str | None] = []

    def look(job: dict[str, Any], job_id: str, dn: str) -> Any:
        lease = sqstore.running_jobs(store, dn)[job_id]
        holders.append(lease.holder if lease is not None else None)
        return sqstore.run_simulator(job, job_id, dn)

    assert sqstore.work([store], "sim", look, burst=True, log=lambda line: None) == 1
    assert holders == [f"{socket.gethostname()}:{os.getpid()}"]


# ============================================================================
# CLI and packaging
# ============================================================================
def run_cli(
    *args: str, cwd: Path, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(HERE), **(env or {})}
    full_env.pop("SQSTORE_STORAGE", None) if env is None else None
    return subprocess.run(
        [sys.executable, "-m", "sqstore", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
    )


def test_cli_demo_runs_on_the_default_directory(tmp_path: Path) -> None:
    """`sqstore demo` runs Alice and Bob on ./sqstore-data and verifies every result, twice."""
    for _ in range(2):
        proc = run_cli("demo", "--jobs", "4", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "4/4 results verified" in proc.stdout
    store = sqstore.local_storage(tmp_path / "sqstore-data")
    assert len(store["list"]("jobs/finished/sqsim")) == 8
    assert oct((tmp_path / "sqstore-data" / ".demo-key.jwk").stat().st_mode & 0o777) == "0o600"


@pytest.mark.slow
def test_cli_bench_prints_figures_and_cleans_up(tmp_path: Path) -> None:
    """`sqstore bench --json` reports every figure and leaves nothing behind."""
    proc = run_cli(
        "bench", "--jobs", "3", "--repeats", "1", "--queue", "20", "--json", "--dir", str(tmp_path),
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    for key in (
        "round_trip_unsigned",
        "round_trip_signed",
        "raw_baseline",
        "claim_us_100",
        "claim_us_long",
        "verify_result",
        "bare_verify",
        "import_ms",
        "core_install_mib",
    ):
        assert figures[key] > 0, key
    assert figures["long_queue"] == 20
    assert set(figures["ratios"]) == {
        "round_trip_per_raw", "signed_per_unsigned", "verify_per_bare",
        "verify_key_given_per_bare", "long_queue_claim_per_short", "claim_job_long_per_short",
        "work_long_per_short", "round_trip_per_sqooler",
    }  # fmt: skip
    assert figures["verify_result_key_given"] > 0
    assert proc.stderr == "", "progress is shown only on a terminal"
    assert list(tmp_path.iterdir()) == []
    table = run_cli("bench", "--jobs", "2", "--repeats", "1", "--queue", "5", cwd=tmp_path)
    assert "round trip / floor (same file operations)" in table.stdout and table.returncode == 0
    assert "floor: the file operations of one sqstore job life" in table.stdout


@pytest.mark.slow
def test_cli_bench_on_mongodb_counts_commands_and_cleans_up(
    mongodb_server: Any, tmp_path: Path
) -> None:
    """`sqstore --storage mongodb://... bench` counts commands, times claims, removes its data."""
    import pymongo

    uri = mongo_uri(mongodb_server)
    store = mongo_store(mongodb_server)
    sqstore.upload_config(store, sqstore.demo_config("keep"), "keep")
    args = ("--storage", uri, "bench", "--jobs", "2", "--repeats", "1", "--queue", "30")
    proc = run_cli(*args, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    calls = {"aggregate": 1, "delete": 3, "find": 9, "insert": 5, "update": 2}
    assert figures["calls_per_round_trip"] == calls
    assert min(figures["claim_us_10"], figures["claim_us_1000"], figures["claim_us_30"]) > 0
    for n in (10, 30, 1000):  # lease insert, find + insert + delete; list once per pass
        assert 4 <= figures[f"claim_calls_{n}"] <= 4.5
    assert set(figures["ratios"]) == {"long_queue_claim_per_short"}
    assert sqstore.get_backends(store) == ["keep"]
    with pymongo.MongoClient(uri, document_class=dict) as client:
        for db in ("jobs", "status", "results"):
            assert not [c for c in client[db].list_collection_names() if "bench" in c]
        assert client["jobs"]["running"].count_documents({}) == 0
        assert client["jobs"]["leases"].count_documents({}) == 0
    table = run_cli(*args, cwd=tmp_path)
    assert "commands per round trip" in table.stdout and table.returncode == 0


@pytest.mark.slow
def test_cli_bench_on_dropbox_counts_requests_and_cleans_up(
    dropbox_env: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """`sqstore --storage dropbox:// bench` counts HTTP requests per round trip and per claim
    (18 per round trip, as the lifecycle test counts), and leaves only what was there."""
    store = sqstore.open_storage("dropbox://")
    sqstore.upload_config(store, sqstore.demo_config("keep"), "keep")
    kept = dropbox_env.files()
    args = ["--storage", "dropbox://", "bench", "--jobs", "2", "--repeats", "1", "--queue", "7"]
    assert sqstore.main([*args, "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["storage"] == "dropbox" and figures["sizes"] == [7, 10]
    calls = figures["calls_per_round_trip"]
    assert sum(calls.values()) == 18 and "users/get_current_account" not in calls
    for n in (7, 10):  # lease upload, move, download; a list page per 3 (the fake's page size)
        assert 3 <= figures[f"claim_calls_{n}"] <= 4, figures
    assert dropbox_env.files() == kept
    assert sqstore.main(args) == 0
    assert "HTTP requests per round trip" in capsys.readouterr().out


def on_terminal(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess[bytes], bytes]:
    """Run ``python -m sqstore *args`` with stderr on a pseudo-terminal; return what it wrote."""
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.run(
        [sys.executable, "-m", "sqstore", *args], cwd=cwd, stdout=subprocess.PIPE,
        stderr=follower, env={**os.environ, "PYTHONPATH": str(HERE)}, timeout=120,
    )  # fmt: skip
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    return proc, seen


@pytest.mark.slow
def test_cli_bench_shows_progress_on_a_terminal(tmp_path: Path) -> None:
    """On a terminal, bench shows what it is measuring on stderr and clears the line."""
    args = ["bench", "--jobs", "2", "--repeats", "1", "--queue", "5", "--dir", str(tmp_path)]
    proc, seen = on_terminal(args, tmp_path)
    assert proc.returncode == 0
    assert b"bench: round trips 1/1" in seen and seen.endswith(b"\r\x1b[K")
    assert b"round trip" in proc.stdout


def test_cli_copy_shows_progress_on_a_terminal_only(tmp_path: Path) -> None:
    """copy shows a progress line on a terminal (cleared at the end), none when piped."""
    store = sqstore.local_storage(tmp_path / "src")
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    for _ in range(30):
        sqstore.upload_job(store, JOB, "sim", "alice")
    proc, seen = on_terminal(["copy", "src", "dst"], tmp_path)
    assert proc.returncode == 0
    assert b"\r\x1b[Kcopy: 20 documents" in seen and seen.endswith(b"\r\x1b[K")
    assert re.search(rb"jobs\s+30\s+0\s+0\s+0", proc.stdout)
    piped = run_cli("copy", "src", "dst", cwd=tmp_path)
    assert piped.returncode == 0 and piped.stderr == ""
    assert re.search(r"jobs\s+0\s+30\s+0\s+0", piped.stdout)


def test_cli_keygen(tmp_path: Path) -> None:
    """keygen writes the private JWK with mode 0600, prints the public one, never overwrites."""
    proc = run_cli("keygen", "mykid", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    public = sqstore.from_doc(json.loads(proc.stdout), sqstore.JWK)
    key_file = tmp_path / "mykid.jwk"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    private = sqstore.from_doc(json.loads(key_file.read_text()), sqstore.JWK)
    assert sqstore.public_from_private(private) == public
    written = key_file.read_bytes()
    again = run_cli("keygen", "mykid", cwd=tmp_path)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
    assert key_file.read_bytes() == written


# Keys from the environment, as sqooler's PRIVATE_JWK_STR ------------------
def sqooler_config_str(private: dict[str, Any]) -> str:
    """A JWK document in the form of sqooler's ``PRIVATE_JWK_STR``: base64url of its JSON."""
    return base64.urlsafe_b64encode(json.dumps(private).encode()).decode()


@pytest.mark.slow
def test_cli_work_and_demo_take_the_key_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--key env:NAME` reads the private JWK from the environment (JSON, or sqooler's
    PRIVATE_JWK_STR form) or else from ./.env, for `work` and `demo`, and signs with it."""
    root = tmp_path / "store"
    store = sqstore.local_storage(root)
    private, public = sqstore.generate_keypair("bobkey")
    assert private.d is not None
    sqstore.upload_config(store, sqstore.demo_config("sim", sign=True), "sim", private)
    sqstore.upload_public_key(store, public, "sim")
    try:
        from sqooler.security import JWK as SqoolerJWK
    except ImportError as exc:
        skip_or_fail(f"sqooler 0.9 is not installed ({exc}): pip install -e '.[test]'")
    config_str = SqoolerJWK(**sqstore.to_doc(private)).to_config_str()  # sqooler's own form
    runs = [
        ("PRIVATE_JWK_STR", json.dumps(sqstore.to_doc(private)), None),
        ("PRIVATE_JWK_STR", config_str, None),
        ("BOB_KEY", None, f"# sqooler's .env\nBOB_KEY='{config_str}'\n"),
    ]
    for name, value, dotenv in runs:
        monkeypatch.delenv(name, raising=False)
        if value is not None:
            monkeypatch.setenv(name, value)
        if dotenv is not None:
            (tmp_path / ".env").write_text(dotenv)
        job_id = sqstore.upload_job(store, JOB, "sim", "alice")
        proc = worker(tmp_path, "--storage", str(root), "work", "sim", "lab_executor:run",
                      "--key", f"env:{name}", "--max-jobs", "1", "--poll", "0.05")  # fmt: skip
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (name, err)
        assert sqstore.verify_result(store, "sim", job_id), name
        assert private.d.rstrip("=")[:12] not in err
    demo = run_cli("demo", "--jobs", "1", "--key", "env:BOB_KEY", cwd=tmp_path,
                   env={"SQSTORE_STORAGE": str(tmp_path / "demo")})  # fmt: skip
    assert demo.returncode == 0, demo.stderr
    assert "1/1 results verified" in demo.stdout and "'bobkey'" in demo.stdout
    assert not (tmp_path / "demo" / ".demo-key.jwk").exists()


@pytest.mark.slow
def test_cli_key_from_the_environment_errors_are_one_line_without_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing or empty variable, a value that is not a JWK (bad JSON, bad base64), a public
    key, a key whose x is not its d's, or another key than the backend's: exit 1 with one
    'sqstore: error:' line that never contains the private key, and nothing written."""
    root = tmp_path / "store"
    store = sqstore.local_storage(root)
    private, public = sqstore.generate_keypair("bobkey")
    sqstore.upload_config(store, sqstore.demo_config("sim", sign=True), "sim", private)
    sqstore.upload_public_key(store, public, "sim")
    sqstore.upload_job(store, JOB, "sim", "alice")
    assert private.d is not None
    secret = private.d.rstrip("=")[:12]
    doc = sqstore.to_doc(private)
    other = sqstore.to_doc(sqstore.generate_keypair("bobkey")[0])
    cases: dict[str, tuple[str | None, str]] = {
        "unset": (None, "is not set"),
        "empty": ("", "is empty"),
        "bad JSON": (json.dumps(doc)[:-3], "not valid JSON"),
        "bad base64": (f"!{private.d}!", "neither a JSON JWK nor a base64 one"),
        "not a JWK": (json.dumps({**doc, "kty": private.d}), "not a JWK"),
        "public key": (json.dumps(sqstore.to_doc(public)), "not a private key"),
        "x not of d": (json.dumps({**doc, "x": other["x"]}), "does not match"),
        "another key": (json.dumps(other), "not the key of"),
        "another key, sqooler form": (sqooler_config_str(other), "not the key of"),
    }  # fmt: skip
    before = tree(root)
    for case, (value, message) in cases.items():
        monkeypatch.delenv("PRIVATE_JWK_STR", raising=False)
        if value is not None:
            monkeypatch.setenv("PRIVATE_JWK_STR", value)
        for args in (
            ["--storage", str(root), "work", "sim", "lab_executor:run", "--max-jobs", "1"],
            ["--storage", str(tmp_path / "demo"), "demo", "--jobs", "1"],
        ):
            proc = worker(tmp_path, *args, "--key", "env:PRIVATE_JWK_STR")
            try:
                _, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                pytest.fail(f"{case}: {args[2]} ran on: {proc.communicate()[1]}")
            if args[2] == "demo" and case.startswith("another key"):
                assert proc.returncode == 0, (case, err)  # a key of its own for the demo backend
                continue
            assert proc.returncode == 1, (case, args[2], err)
            assert err.startswith("sqstore: error: env:PRIVATE_JWK_STR"), (case, err)
            assert message in err and err.count("\n") == 1, (case, err)
            assert secret not in err and "Traceback" not in err, (case, err)
        assert tree(root) == before, case
    for bad in ("env:", "env:1X", "env:A=B"):
        proc = worker(tmp_path, "--storage", str(root), "work", "sim", "--key", bad)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 1 and "environment variable" in err and err.count("\n") == 1


def test_cli_job_commands(tmp_path: Path) -> None:
    """submit, queue, status, result, verify and backends work on a local directory."""
    data = tmp_path / "data"
    store = sqstore.local_storage(data)
    private, public = sqstore.generate_keypair("k")
    sqstore.upload_config(store, sqstore.demo_config("sim", sign=True), "sim", private)
    sqstore.upload_public_key(store, public, "sim")
    (tmp_path / "job.json").write_text(json.dumps(JOB))
    submit = run_cli(
        "--storage", str(data), "submit", "sim", "job.json", "-u", "alice", cwd=tmp_path
    )
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip()
    from_stdin = run_cli(
        "--storage", str(data), "submit", "sim", "-", cwd=tmp_path, stdin=json.dumps(JOB)
    )
    assert from_stdin.returncode == 0
    queue = run_cli("queue", "sim", cwd=tmp_path, env={"SQSTORE_STORAGE": str(data)})
    assert queue.stdout.split() == [job_id, from_stdin.stdout.strip()]
    status = run_cli("--storage", str(data), "status", "sim", job_id, "-u", "alice", cwd=tmp_path)
    assert json.loads(status.stdout)["status"] == "INITIALIZING"
    finish(store, "sim", private)
    result = run_cli("--storage", str(data), "result", "sim", job_id, cwd=tmp_path)
    assert json.loads(result.stdout)["results"][0]["data"]["memory"] == ["1"] * 5
    verify = run_cli("--storage", str(data), "verify", "sim", job_id, cwd=tmp_path)
    assert verify.returncode == 0 and "valid signature" in verify.stdout
    backends = run_cli("--storage", str(data), "backends", cwd=tmp_path)
    assert backends.stdout.split("\t")[:2] == ["sim", "local_sim_simulator"]
    raw = store["get"]("results/sim", job_id)
    raw["payload"]["success"] = False
    store["update"]("results/sim", job_id, raw)
    tampered = run_cli("--storage", str(data), "verify", "sim", job_id, cwd=tmp_path)
    assert tampered.returncode == 1 and "NOT VERIFIED" in tampered.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["submit", "nosuch", "job.json"], "no backend 'nosuch' on"),
        (["submit", "sim", "missing.json"], "cannot read job file missing.json"),
        (["submit", "sim", "bad.json"], "bad.json: not valid JSON"),
        (["status", "sim", "../../etc/passwd"], "no job '../../etc/passwd': a job id is"),
        (["queue", "Bad-Name"], "invalid display_name"),
        (["verify", "sim", "6b0000000000000000000000"], "no job '6b0000000000000000000000'"),
        (["demo", "--jobs", "0"], "at least 1"),
    ],
)
def test_cli_user_errors_are_one_line_on_stderr(
    tmp_path: Path, args: list[str], message: str
) -> None:
    """User mistakes exit 1 with one 'sqstore: error:' line on stderr and no traceback."""
    data = tmp_path / "data"
    sqstore.upload_config(sqstore.local_storage(data), sqstore.demo_config("sim"), "sim")
    (tmp_path / "bad.json").write_text("{nope")
    (tmp_path / "job.json").write_text(json.dumps(JOB))
    before = tree(data)
    proc = run_cli("--storage", str(data), *args, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.startswith("sqstore: error: ") and message in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert tree(data) == before


def test_cli_usage_errors_exit_2(tmp_path: Path) -> None:
    """A wrong command line is argparse's usage error (exit 2); --help and --version exit 0."""
    assert run_cli("frobnicate", cwd=tmp_path).returncode == 2
    assert run_cli("status", "sim", cwd=tmp_path).returncode == 2
    help_ = run_cli("--help", cwd=tmp_path)
    assert help_.returncode == 0 and "demo" in help_.stdout
    assert run_cli("--version", cwd=tmp_path).stdout.strip() == f"sqstore {sqstore.__version__}"


def test_cli_symlinks_and_directories_in_the_storage_are_one_line_or_set_aside(
    tmp_path: Path,
) -> None:
    """Through the CLI: a status folder that is a symlink out of the root is one error line
    naming it, and nothing outside is read; a queued job that is a symlink or a directory is
    set aside by `sqstore work`, which runs the job behind it."""
    root = tmp_path / "lab"
    store = sqstore.local_storage(root)
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    odd = [sqstore.create_job_id(store, "sim", "alice") for _ in range(2)]
    good = sqstore.upload_job(store, JOB, "sim", "alice")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / f"{good}.json").write_text(json.dumps({"secret": "outside the root"}))
    (root / "status").mkdir()
    (root / "status/sim").symlink_to(outside)
    proc = run_cli("--storage", str(root), "status", "sim", good, cwd=tmp_path)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("sqstore: error: ") and proc.stderr.count("\n") == 1
    assert "status/sim is a symlink" in proc.stderr and "Traceback" not in proc.stderr
    (root / "status/sim").unlink()
    (root / f"jobs/queued/sim/{odd[0]}.json").symlink_to(outside / f"{good}.json")
    (root / f"jobs/queued/sim/{odd[1]}.json").mkdir()
    proc = run_cli(
        "--storage", str(root), "work", "sim", "--max-jobs", "1", "--poll", "0.05", cwd=tmp_path
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert sorted(jobs_in(store, "deleted")) == sorted(odd)
    assert sqstore.get_status(store, "sim", "alice", odd[0]).status == "ERROR"
    assert json.loads((outside / f"{good}.json").read_text()) == {"secret": "outside the root"}
    assert jobs_in(store, "finished") == [good]


@pytest.mark.slow
def test_cli_work_refuses_a_key_that_is_not_the_backends(tmp_path: Path) -> None:
    """`sqstore work --key` with a key that is not the backend's published one exits 1 with
    one 'sqstore: error:' line and no traceback; the job stays queued, nothing is written."""
    root = tmp_path / "store"
    store = sqstore.local_storage(root)
    private, public = sqstore.generate_keypair("bobkey")
    sqstore.upload_config(store, sqstore.demo_config("sim", sign=True), "sim", private)
    sqstore.upload_public_key(store, public, "sim")
    job_id = sqstore.upload_job(store, JOB, "sim", "alice")
    before = tree(root)
    for wrong in sorted(WRONG_KEYS):
        (tmp_path / "wrong.jwk").write_text(json.dumps(sqstore.to_doc(WRONG_KEYS[wrong](private))))
        proc = worker(tmp_path, "--storage", str(root), "work", "sim", "lab_executor:run",
                      "--key", "wrong.jwk", "--max-jobs", "1", "--poll", "0.05")  # fmt: skip
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"{wrong}: the worker ran on with a key that is not the backend's: {err}")
        assert proc.returncode == 1, (wrong, err)
        assert err.startswith("sqstore: error: ") and err.count("\n") == 1, (wrong, err)
        assert tree(root) == before, wrong
    assert executed(tmp_path) == []
    assert store["list"]("jobs/queued/sim") == [job_id]


@pytest.mark.slow
def test_cli_reports_recursion_bombs_and_non_finite_numbers_in_one_line(tmp_path: Path) -> None:
    """A job file, status or result nested 100,000 deep (or holding NaN) is one
    'sqstore: error:' line naming the file, never a traceback; `work` sets such a job aside."""
    data = tmp_path / "data"
    store = sqstore.local_storage(data)
    private, public = sqstore.generate_keypair("bobkey")
    sqstore.upload_config(store, sqstore.demo_config("sim", sign=True), "sim", private)
    sqstore.upload_public_key(store, public, "sim")
    job_id = sqstore.create_job_id(store, "sim", "alice")
    (data / "status" / "sim").mkdir(parents=True)
    (data / "status" / "sim" / f"{job_id}.json").write_bytes(BOMB)
    (data / "results" / "sim").mkdir(parents=True)
    (data / "results" / "sim" / f"{job_id}.json").write_bytes(BOMB)
    (tmp_path / "bomb.json").write_bytes(BOMB)
    (tmp_path / "nan.json").write_text('{"experiment_0": {"shots": NaN}}')
    for args, where in (
        (["submit", "sim", "bomb.json"], "bomb.json"),
        (["submit", "sim", "nan.json"], "nan.json"),
        (["status", "sim", job_id], f"status/sim/{job_id}"),
        (["result", "sim", job_id], f"results/sim/{job_id}"),
        (["verify", "sim", job_id], f"results/sim/{job_id}"),
    ):
        proc = run_cli("--storage", str(data), *args, cwd=tmp_path)
        assert proc.returncode == 1, (args, proc.stderr[-500:])
        assert proc.stderr.startswith("sqstore: error: ") and where in proc.stderr, args
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, args
    bad = sqstore.create_job_id(store, "sim", "alice")
    (data / "jobs" / "queued" / "sim").mkdir(parents=True)
    (data / "jobs" / "queued" / "sim" / f"{bad}.json").write_bytes(BOMB)
    good = sqstore.upload_job(store, JOB, "sim", "alice")
    (tmp_path / "bob.jwk").write_text(json.dumps(sqstore.to_doc(private)))
    working = worker(tmp_path, "--storage", str(data), "work", "sim", "lab_executor:run",
                     "--key", "bob.jwk", "--max-jobs", "1", "--poll", "0.05")  # fmt: skip
    _, err = working.communicate(timeout=120)
    assert working.returncode == 0 and "Traceback" not in err, err
    assert executed(tmp_path) == [f"sim {good}"]
    assert sqstore.get_status(store, "sim", "alice", bad).status == "ERROR"


@pytest.mark.slow
def test_cli_key_errors_never_show_the_key(tmp_path: Path) -> None:
    """A key file that is not a JWK is one error line that does not repeat the key."""
    private, _ = sqstore.generate_keypair("bobkey")
    assert private.d is not None
    data = tmp_path / "data"
    sqstore.upload_config(sqstore.local_storage(data), sqstore.demo_config("sim"), "sim")
    doc = sqstore.to_doc(private)
    for bad in ([doc], {**doc, "kty": private.d}, {**doc, private.d: 1}, json.dumps(doc)):
        (tmp_path / "bad.jwk").write_text(json.dumps(bad))
        proc = worker(tmp_path, "--storage", str(data), "work", "sim", "lab_executor:run",
                      "--key", "bad.jwk", "--max-jobs", "1")  # fmt: skip
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 1 and err.startswith("sqstore: error: bad.jwk"), err
        assert private.d.rstrip("=")[:12] not in err and err.count("\n") == 1, err


def test_readme_quickstart_runs(tmp_path: Path) -> None:
    """The README's Bob and Alice run as written (in a temporary folder): Bob publishes, Alice
    submits and her job reads as pending, Bob runs again and serves it, Alice reads the result;
    Alice's whole script, run once more, says that her new job is pending."""
    bob = readme_block("### Bob (spooler)", "python")
    alice = readme_block("### Alice (frontend)", "python")
    submit, later = alice.split("# later, when Bob has run again")
    driver = f"""
import json, sqstore
bob, alice = {{}}, {{}}
exec(compile({bob!r}, "README.md", "exec"), bob)
exec(compile({submit!r}, "README.md", "exec"), alice)
pending = sqstore.get_result(alice["store"], "sqsim", "alice", alice["job_id"])
try:
    sqstore.verify_result(alice["store"], "sqsim", alice["job_id"])
except sqstore.NotFinishedError as exc:
    raised = exc.status
exec(compile({bob!r}, "README.md", "exec"), bob)
exec(compile({later!r}, "README.md", "exec"), alice)
print(json.dumps([pending.status, raised, alice["status"].status, alice["result"].status]))
"""
    env = {**os.environ, "PYTHONPATH": str(HERE), "TMPDIR": str(tmp_path)}
    run = functools.partial(
        subprocess.run, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    proc = run([sys.executable, "-c", driver])
    assert proc.returncode == 0, proc.stderr
    outcome = json.loads(proc.stdout.splitlines()[-1])
    assert outcome == ["INITIALIZING", "INITIALIZING", "DONE", "DONE"]
    whole = run([sys.executable, "-c", alice])
    assert whole.returncode == 0 and whole.stdout == "pending: INITIALIZING\n", whole.stderr


def readme_block(heading: str, lang: str) -> str:
    """The first ``lang`` code block after *heading* in README.md."""
    text = (HERE / "README.md").read_text()
    blocks: list[str] = re.findall(rf"```{lang}\n(.*?)```", text[text.index(heading) :], re.S)
    return blocks[0]


def test_readme_layers_example_runs() -> None:
    """The README's layer stack runs and counts what its comment says."""
    out = subprocess.run(
        [sys.executable, "-c", readme_block("### Layers", "python")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(HERE)}, check=True,
    )  # fmt: skip
    assert out.stdout == "{'upload': 2, 'get': 1}\n"


@pytest.mark.slow
def test_readme_work_example_runs(readme_shell: tuple[Path, list[ShellBlock]]) -> None:
    """The README's worker example, run as written, serves the submitted job and exits 0, and
    its log line has the form the README quotes."""
    (block,) = [b for b in readme_shell[1] if "sqstore work sqsim lab:run" in b.code]
    assert block.returncode == 0, block.stderr
    assert "finished 1 job\n" in block.stderr
    quoted = re.search(
        r"`(\d{4}-[^`]+ INFO sqstore: [^`]+)`", readme_section("### Running Bob: `sqstore work`")
    )
    assert quoted, "the README quotes a work log line"
    shape = re.escape(quoted.group(1)).replace(r"6b0a\.\.\.", "JOB")
    shape = re.sub(r"\d+", r"\\d+", shape).replace("JOB", "[0-9a-f]{24}")
    assert re.search(shape, block.stderr), (shape, block.stderr)


def test_import_loads_no_optional_dependency() -> None:
    """`import sqstore` imports neither pymongo, dropbox nor nacl."""
    code = (
        "import sys, sqstore; "
        "print(sorted(m for m in ('pymongo', 'dropbox', 'nacl') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(HERE)},
        check=True,
    )
    assert out.stdout.strip() == "[]"


def test_every_public_name_has_a_docstring() -> None:
    """pydoc reads well: every function and class in __all__ says what it is."""
    import inspect

    missing = [
        name
        for name in sqstore.__all__
        if (inspect.isfunction(obj := getattr(sqstore, name)) or inspect.isclass(obj))
        and len((obj.__doc__ or "").strip()) < 20
    ]
    assert missing == [], "\n".join(missing)
    page = subprocess.run(
        [sys.executable, "-m", "pydoc", "sqstore"], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(HERE)}, check=True,
    ).stdout  # fmt: skip
    for name in ("copy_storage", "work", "with_retry", "read_only", "open_storage"):
        assert f"{name}(" in page


def test_all_is_sorted_and_complete() -> None:
    """__all__ is sorted (constants, classes, functions) and lists exactly the public names."""
    import types

    def group(name: str) -> tuple[int, str]:
        return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)

    programs = ["copy_storage", "main", "run_simulator", "work"]  # added below the library
    library = [name for name in sqstore.__all__ if name not in programs]
    assert sqstore.__all__ == library + programs
    assert library == sorted(library, key=group)
    public = {
        name
        for name, value in vars(sqstore).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and (
            (callable(value) and getattr(value, "__module__", None) == "sqstore")
            or name.isupper()
            or name in ("Doc", "Layer", "ConfigLike", "KeyLike", "ResultLike", "StatusLike")
        )
    }
    public -= {"T", "TYPE_CHECKING", "ColdAtomType", "WireOrder", "annotations"}
    assert set(sqstore.__all__) == public


PROGRAMS_BANNER = "# " + "=" * 76 + "\n# Programs\n# " + "=" * 76 + "\n"

LIBRARY_ALONE = """
import os, sys, tempfile, types

text = open(sys.argv[1]).read()
module = types.ModuleType("sqstore")
module.__file__ = sys.argv[1]
sys.modules["sqstore"] = module  # what `import sqstore` gives the examples
exec(compile(text[: text.index(sys.argv[2])], sys.argv[1], "exec"), module.__dict__)
print(sorted(n for n in ("copy_storage", "main", "run_simulator", "work") if hasattr(module, n)))
store = module.local_storage(os.path.join(tempfile.gettempdir(), "sqstore-exchange"))
module.upload_config(store, module.demo_config("sqsim"), "sqsim")  # Alice needs Bob's backend
for path in sys.argv[3:]:
    exec(compile(open(path).read(), path, "exec"), {"__name__": "__main__"})
"""


def test_the_library_stands_alone_without_the_programs(tmp_path: Path) -> None:
    """The text above the Programs banner names nothing defined below it, and executed on its
    own (no programs defined) it runs the README's library examples."""
    import ast

    text = (HERE / "sqstore.py").read_text()
    assert text.count(PROGRAMS_BANNER) == 1
    library, programs = text.split(PROGRAMS_BANNER)
    below: set[str] = set()  # what the programs define at module level
    for node in ast.parse(programs).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            below.add(node.name)
        targets = node.targets if isinstance(node, ast.Assign) else []
        targets += [node.target] if isinstance(node, ast.AnnAssign) else []
        below |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    named = sorted(  # names, and strings such as __all__'s, in the library
        f"{node.lineno}: {name}"
        for node in ast.walk(ast.parse(library))
        if isinstance(node, ast.expr)  # a name or a string is an expression
        for name in [getattr(node, "id", None) or getattr(node, "value", None)]
        if isinstance(name, str) and name in below
    )
    assert {"work", "copy_storage", "run_simulator", "main", "_cmd_work"} <= below
    assert named == []
    blocks: list[Path] = []
    for heading in ("### Alice (frontend)", "### Layers", "## Idempotent submit",
                    "## Queue insight", "### Records are frozen"):  # fmt: skip
        code = readme_block(heading, "python")
        assert not re.search(r"sqstore\.(work|copy_storage|run_simulator|main)\b", code), heading
        blocks.append(tmp_path / f"block{len(blocks)}.py")
        blocks[-1].write_text(code)
    (tmp_path / "alone.py").write_text(LIBRARY_ALONE)
    proc = subprocess.run(
        [sys.executable, "alone.py", str(HERE / "sqstore.py"), PROGRAMS_BANNER, *map(str, blocks)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={"PATH": os.environ["PATH"], "TMPDIR": str(tmp_path), "HOME": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("[]\n")  # no program was defined
    assert "pending: INITIALIZING" in proc.stdout  # Alice's example ran to its end


def test_module_carries_its_licence() -> None:
    """A vendored sqstore.py carries its SPDX licence line at the top."""
    assert (HERE / "sqstore.py").read_text().startswith("# SPDX-License-Identifier: MIT\n")


def _tool(name: str) -> str:
    path = shutil.which(
        name, path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]
    )
    if path is None:
        skip_or_fail(f"{name} is not installed: pip install -e '.[test]'")
    return str(path)


def test_mypy_strict() -> None:
    """sqstore.py and its tests type-check with mypy --strict."""
    proc = subprocess.run(
        [_tool("mypy"), "--strict", "sqstore.py", "test_sqstore.py"],
        cwd=HERE,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff() -> None:
    """ruff finds nothing to lint and nothing to reformat."""
    ruff = _tool("ruff")
    lint = subprocess.run(
        [ruff, "check", "sqstore.py", "test_sqstore.py"], cwd=HERE, capture_output=True, text=True
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = subprocess.run(
        [ruff, "format", "--check", "sqstore.py", "test_sqstore.py"],
        cwd=HERE,
        capture_output=True,
        text=True,
    )
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_ruff_is_the_version_the_test_extra_pins() -> None:
    """The test extra pins ruff to one version, the one that checks and formats the files here."""
    pins = re.findall(r'"ruff([^"]*)"', (HERE / "pyproject.toml").read_text())
    version = subprocess.run(
        [_tool("ruff"), "--version"], capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    assert pins == [f"=={version}"], pins


def test_tests_that_start_a_server_are_marked_slow(request: pytest.FixtureRequest) -> None:
    """Every test that starts the MongoDB-wire server or the fake Dropbox API (a fixture, or a
    backend parameter) is marked slow, so ``pytest -m "not slow"`` starts neither."""
    unmarked = []
    for item in request.session.items:
        fixtures = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        params = {str(value) for value in callspec.params.values()} if callspec else set()
        starts = fixtures & {"mongodb_server", "dropbox_fake"} or params & SERVER_BACKENDS
        if starts and item.get_closest_marker("slow") is None:
            unmarked.append(item.nodeid)
    assert unmarked == []


# ============================================================================
# Test servers: a MongoDB-wire server and a fake Dropbox API, on 127.0.0.1
# ============================================================================
# A MongoDB-wire server (mongo-java-server, H2 file backend) ------------------
MONGO_SERVER_VERSION = "1.47.0"
MONGO_SERVER_POM = f"""<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>sqstore.test</groupId><artifactId>mongo-server</artifactId><version>1</version>
  <dependencies>
    <dependency><groupId>de.bwaldvogel</groupId><artifactId>mongo-java-server</artifactId>
      <version>{MONGO_SERVER_VERSION}</version></dependency>
    <dependency><groupId>de.bwaldvogel</groupId><artifactId>mongo-java-server-h2-backend</artifactId>
      <version>{MONGO_SERVER_VERSION}</version></dependency>
  </dependencies>
</project>
"""
# Serves one H2 file on 127.0.0.1 and commits after every command, so that a
# SIGKILL loses nothing that was acknowledged.  Prints "ready <port>".
MONGO_SERVER_MAIN = """
import de.bwaldvogel.mongo.MongoServer;
import de.bwaldvogel.mongo.ServerVersion;
import de.bwaldvogel.mongo.backend.h2.H2Backend;
import de.bwaldvogel.mongo.bson.Document;
import io.netty.channel.Channel;

public class SqstoreTestMongoServer {
    public static void main(String[] args) throws Exception {
        H2Backend backend = new H2Backend(args[0]) {
            @Override
            public Document handleCommand(Channel channel, String db, String command,
                                          Document query) {
                try {
                    return super.handleCommand(channel, db, command, query);
                } finally {
                    commit();
                }
            }
        };
        backend.version(ServerVersion.MONGO_5_0);
        MongoServer server = new MongoServer(backend);
        server.bind("127.0.0.1", Integer.parseInt(args[1]));
        System.out.println("ready " + server.getLocalAddress().getPort());
        System.out.flush();
        Thread.currentThread().join();
    }
}
"""


def mongo_server_build() -> Path:
    """Fetch the server from Maven Central and compile its launcher, once per machine.

    The build lives in ``$SQSTORE_CACHE`` (default ``~/.cache/sqstore``), outside
    the clone, so later runs on the machine start at once.
    """
    cache = Path(os.environ.get("SQSTORE_CACHE") or Path.home() / ".cache" / "sqstore")
    home = cache / f"mongo-java-server-{MONGO_SERVER_VERSION}"
    if (home / "classes" / "SqstoreTestMongoServer.class").exists():
        return home
    tools = {tool: shutil.which(tool) for tool in ("java", "javac", "mvn")}
    if missing := [tool for tool, path in tools.items() if path is None]:
        skip_or_fail(f"the MongoDB tests build their server with Java and Maven: no {missing}")
    build = cache / f"{home.name}.{os.getpid()}.tmp"
    shutil.rmtree(build, ignore_errors=True)
    (build / "classes").mkdir(parents=True)
    (build / "pom.xml").write_text(MONGO_SERVER_POM)
    (build / "SqstoreTestMongoServer.java").write_text(MONGO_SERVER_MAIN)
    steps = [
        ["mvn", "-q", "-B", "dependency:copy-dependencies", "-DoutputDirectory=lib"],
        ["javac", "-d", "classes", "-cp", "lib/*", "SqstoreTestMongoServer.java"],
    ]
    for step in steps:
        done = subprocess.run(step, cwd=build, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            skip_or_fail(
                f"building the MongoDB test server failed: {step}\n{done.stdout}{done.stderr}"
            )
    try:
        build.rename(home)
    except OSError:  # another run finished first
        shutil.rmtree(build, ignore_errors=True)
    return home


def _die_with_parent() -> None:
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: never outlive the tests


class MongoServer:
    """A real MongoDB-wire server process on 127.0.0.1 over one data file."""

    def __init__(self, home: Path, data: Path) -> None:
        self.home, self.data, self.port = home, data, 0
        self.proc: subprocess.Popen[str] | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    def start(self) -> None:
        """Start (or restart, on the same port) and wait until ``ping`` answers."""
        classpath = f"{self.home / 'classes'}:{self.home / 'lib'}/*"
        command = [
            "java",
            "-cp",
            classpath,
            "SqstoreTestMongoServer",
            str(self.data),
            str(self.port),
        ]
        for _ in range(50):  # the port of a killed server can take a moment to free
            self.proc = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                preexec_fn=_die_with_parent,
            )
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline().split()
            if line[:1] == ["ready"]:
                self.port = int(line[1])
                break
            self.proc.wait()
            time.sleep(0.1)
        else:
            pytest.fail(f"the MongoDB test server did not start: {command}")
        import pymongo

        with pymongo.MongoClient(
            self.uri, serverSelectionTimeoutMS=10_000, document_class=dict
        ) as client:
            client.admin.command("ping")

    def kill(self) -> None:
        """SIGKILL the server (its data file stays)."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None


@pytest.fixture(scope="session")
def mongodb_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A MongoDB-wire server for the session: ours, or ``$SQSTORE_TEST_MONGODB_URI``.

    The tests empty every collection of that server but those of admin, config and local.
    """
    try:
        import pymongo  # noqa: F401
    except ImportError as exc:
        skip_or_fail(f"the MongoDB tests need pymongo ({exc}): pip install -e '.[test]'")
    if uri := os.environ.get("SQSTORE_TEST_MONGODB_URI"):
        yield uri
        return
    server = MongoServer(mongo_server_build(), tmp_path_factory.mktemp("mongo") / "data.mv")
    server.start()
    try:
        yield server
    finally:
        server.kill()


def mongo_uri(server: Any) -> str:
    return server if isinstance(server, str) else str(server.uri)


def mongo_reset(uri: str) -> None:
    """Empty every collection the tests may have made."""
    import pymongo

    with pymongo.MongoClient(uri, serverSelectionTimeoutMS=10_000, document_class=dict) as client:
        for name in client.list_database_names():
            if name not in ("admin", "config", "local"):
                for collection in client[name].list_collection_names():
                    client[name][collection].delete_many({})  # dropping is less reliable


# A fake Dropbox API v2 over TLS, for the unmodified dropbox SDK --------------
_BLOCK = 4 * 1024 * 1024
_CONTENT_ROUTES = {"/2/files/upload", "/2/files/download"}


def content_hash(data: bytes) -> str:
    """Dropbox content hash: SHA-256 of the concatenated SHA-256 of each 4 MiB block."""
    blocks = b"".join(
        hashlib.sha256(data[i : i + _BLOCK]).digest() for i in range(0, len(data), _BLOCK)
    )
    return hashlib.sha256(blocks).hexdigest()


def _now() -> str:
    """The current UTC time in Dropbox's format (whole seconds, ``Z`` suffix)."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _make_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """Write a CA certificate and a 127.0.0.1 leaf certificate and key; return their paths."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, leaf_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())

    def certificate(common_name: str, key: Any, extensions: list[Any]) -> Any:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-dropbox CA")]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(ca_key, hashes.SHA256())

    # Extensions that strict verifiers (e.g. Python 3.13's VERIFY_X509_STRICT) insist on.
    ca_usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
    ca = certificate(
        "fake-dropbox CA",
        ca_key,
        [(x509.BasicConstraints(ca=True, path_length=0), True), (ca_usage, True), (ca_ski, False)],
    )
    san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    leaf = certificate(
        "127.0.0.1",
        leaf_key,
        [
            (x509.SubjectAlternativeName(san), False),
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
            (aki, False),
        ],
    )
    pem = serialization.Encoding.PEM
    paths = directory / "ca.pem", directory / "leaf.pem", directory / "leaf.key"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(leaf.public_bytes(pem))
    no_password = serialization.NoEncryption()
    paths[2].write_bytes(
        leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, no_password)
    )
    return paths


class _Reply(Exception):
    """An HTTP answer other than success, raised from a route handler."""

    def __init__(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


def _summary(error: Any) -> str:
    """Build an ``error_summary`` like Dropbox's (``path/not_found/..``) from an error union."""
    tags = []
    while isinstance(error, dict) and ".tag" in error:
        tag = error[".tag"]
        tags.append(tag)
        error = error.get(tag) if isinstance(error.get(tag), dict) else error.get("reason")
    return "/".join(tags) + "/.."


def _route_error(error: dict[str, Any]) -> _Reply:
    """A 409 route error with Dropbox's JSON body."""
    return _Reply(409, {"error_summary": _summary(error), "error": error})


def _bad_input(text: str) -> _Reply:
    """A 400 with a text body, which the SDK raises as ``BadInputError``."""
    return _Reply(400, "Error in call to API function: " + text)


def _lookup(tag: str, member: str = "path") -> _Reply:
    """A LookupError (``not_found``/``not_file``/``not_folder``) under the union member."""
    return _route_error({".tag": member, member: {".tag": tag}})


def _conflict(kind: str) -> dict[str, Any]:
    """A WriteError ``conflict`` of the given kind (file, folder, file_ancestor)."""
    return {".tag": "conflict", "conflict": {".tag": kind}}


@dataclass(frozen=True)
class _Entry:
    """One file or folder; ``data`` is None for folders."""

    display: str
    id: str
    data: bytes | None = None
    rev: str = ""
    client_modified: str = ""
    server_modified: str = ""

    def metadata(self, tagged: bool = True) -> dict[str, Any]:
        """The entry's Dropbox metadata; ``tagged`` adds ``.tag`` (for Metadata unions)."""
        meta: dict[str, Any] = {
            "name": self.display.rsplit("/", 1)[1],
            "path_lower": self.display.lower(),
            "path_display": self.display,
            "id": self.id,
        }
        if self.data is not None:
            meta.update(
                client_modified=self.client_modified,
                server_modified=self.server_modified,
                rev=self.rev,
                size=len(self.data),
                is_downloadable=True,
                content_hash=content_hash(self.data),
            )
        if tagged:
            meta = {".tag": "folder" if self.data is None else "file", **meta}
        return meta


_ACCOUNT = {
    "account_id": "dbid:AAH4f99T0taONIb-OurWxbNQ6ywGRopQngc",
    "name": dict(
        given_name="Fake",
        surname="User",
        familiar_name="Fake",
        display_name="Fake User",
        abbreviated_name="FU",
    ),
    "email": "fake.user@example.org",
    "email_verified": True,
    "disabled": False,
    "country": "DE",
    "locale": "en",
    "referral_link": "https://db.tt/fake",
    "is_paired": False,
    "account_type": {".tag": "basic"},
    "root_info": {".tag": "user", "root_namespace_id": "3235641", "home_namespace_id": "3235641"},
}


class FakeDropbox:
    """An in-memory Dropbox API v2 served over TLS on ``127.0.0.1`` in a background thread.

    Args:
        app_key, app_secret, refresh_token: the credentials the token endpoint accepts.
        page_size: the most entries one ``list_folder`` page returns (``limit`` can lower it).
        expires_in: the ``expires_in`` of issued access tokens, in seconds. The SDK refreshes
            when fewer than 300 s are left, so keep it above 300 unless that is the point.
    """

    def __init__(
        self,
        app_key: str = "fake-app-key",
        app_secret: str = "fake-app-secret",
        refresh_token: str = "fake-refresh-token",
        page_size: int = 2000,
        expires_in: int = 14400,
    ) -> None:
        self.app_key, self.app_secret, self.refresh_token = app_key, app_secret, refresh_token
        self.page_size, self.expires_in = page_size, expires_in
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}  # path_lower -> entry; the root is implicit
        self._cursors: dict[
            str, tuple[int, list[dict[str, Any]]]
        ] = {}  # cursor -> (limit, entries left)
        self._tokens: set[str] = set()
        self._expired: set[str] = set()
        self._revoked = False
        self._faults: list[list[Any]] = []  # [route or "*", remaining, status, retry_after]
        self._afters: list[list[Any]] = []  # [route or "*", remaining, "503" | "drop" | hook]
        self._counts: dict[str, int] = {}
        self._rev = 0x1_0000_0000
        self._server: http.server.ThreadingHTTPServer | None = None
        self._tmp: Path | None = None
        self._routes: dict[str, Callable[[dict[str, Any], bytes], tuple[Any, bytes | None]]] = {
            "/2/users/get_current_account": lambda arg, body: (_ACCOUNT, None),
            "/2/files/upload": self._upload,
            "/2/files/download": self._download,
            "/2/files/get_metadata": self._get_metadata,
            "/2/files/move_v2": self._move,
            "/2/files/delete_v2": self._delete,
            "/2/files/list_folder": self._list_folder,
            "/2/files/list_folder/continue": self._list_folder_continue,
            "/2/files/create_folder_v2": self._create_folder,
        }

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> FakeDropbox:
        """Make the certificates, bind an ephemeral port and serve in a daemon thread."""
        self._tmp = Path(tempfile.mkdtemp(prefix="fake-dropbox-"))
        _, cert, key = _make_tls_files(self._tmp)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server = _Server(("127.0.0.1", 0), _make_handler(self))
        # The handshake runs on the first read, in the handler thread, not in accept().
        server.socket = context.wrap_socket(
            server.socket, server_side=True, do_handshake_on_connect=False
        )
        self._server = server
        threading.Thread(target=server.serve_forever, name="fake-dropbox", daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop serving and delete the certificates."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> FakeDropbox:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, usable as ``DROPBOX_API_HOST`` and ``DROPBOX_API_CONTENT_HOST``."""
        assert self._server is not None, "the fake is not started"
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def ca_path(self) -> str:
        """The PEM file of the CA that signed the server's certificate."""
        assert self._tmp is not None, "the fake is not started"
        return str(self._tmp / "ca.pem")

    # -- SDK wiring -----------------------------------------------------------------------------

    def session(self) -> Any:
        """A ``requests.Session`` aimed at this fake; see :func:`fake_session`."""
        return fake_session(self.host, self.ca_path)

    def client(self, **kwargs: Any) -> Any:
        """A ``dropbox.Dropbox`` with this fake's credentials and :meth:`session`."""
        import dropbox

        kwargs.setdefault("app_key", self.app_key)
        kwargs.setdefault("app_secret", self.app_secret)
        kwargs.setdefault("oauth2_refresh_token", self.refresh_token)
        return dropbox.Dropbox(session=self.session(), **kwargs)

    # -- inspection and fault injection ---------------------------------------------------------

    @property
    def counts(self) -> dict[str, int]:
        """Requests received per URL path (faulted ones included), e.g. ``/2/files/upload``."""
        with self._lock:
            return dict(self._counts)

    def reset_counts(self) -> None:
        """Forget the request counts."""
        with self._lock:
            self._counts.clear()

    def files(self) -> dict[str, bytes]:
        """A snapshot of every file, as ``path_display -> bytes``."""
        with self._lock:
            return {e.display: e.data for e in self._entries.values() if e.data is not None}

    def reset(self) -> None:
        """Delete every file and folder, cursor and pending fault."""
        with self._lock:
            self._entries.clear()
            self._cursors.clear()
            self._faults.clear()
            self._afters.clear()

    def fail_next(
        self, route: str = "*", status: int = 429, count: int = 1, retry_after: int = 0
    ) -> None:
        """Answer the next ``count`` requests to ``route`` with ``status`` instead.

        ``route`` is ``"*"`` (any request, the token endpoint included), or a path with or
        without the ``/2/`` prefix: ``"files/upload"``, ``"/oauth2/token"``. A 429 carries
        ``Retry-After: retry_after``; other statuses get a text body.
        """
        with self._lock:
            self._faults.append([_route_path(route), count, status, retry_after])

    def lose_next(self, route: str, how: str = "503", count: int = 1) -> None:
        """Apply the next ``count`` successful requests to ``route``, then lose their answers.

        The request takes effect; instead of its answer the client gets a 503 (``how="503"``)
        or a connection closed without a word (``how="drop"``). Requests that fail (a route
        error, a 401) are answered as usual and do not count. ``route`` as in :meth:`fail_next`.
        """
        if how not in ("503", "drop"):
            raise ValueError(f"how must be '503' or 'drop', not {how!r}")
        with self._lock:
            self._afters.append([_route_path(route), count, how])

    def after_next(self, route: str, hook: Callable[[], None]) -> None:
        """Run ``hook()`` once the next successful request to ``route`` took effect.

        The hook runs in the server thread after the request was applied and before it is
        answered, without the fake's lock, so it may make requests of its own (as another
        client): a deterministic interleaving between one request and its answer.
        """
        with self._lock:
            self._afters.append([_route_path(route), 1, hook])

    def expire_access_tokens(self) -> None:
        """Expire every issued access token: the next call gets 401 ``expired_access_token``."""
        with self._lock:
            self._expired |= self._tokens
            self._tokens.clear()

    def revoke_refresh_token(self, revoked: bool = True) -> None:
        """Make the token endpoint answer 400 ``invalid_grant`` (or accept again)."""
        with self._lock:
            self._revoked = revoked

    # -- request dispatch (called from handler threads) -----------------------------------------

    def _handle(
        self, path: str, headers: Any, body: bytes
    ) -> tuple[int, dict[str, str], bytes] | None:
        """Answer one POST: status, headers and body, or None to hang up without an answer."""
        answer, after = self._apply(path, headers, body)
        if after is None:
            return answer
        if callable(after):
            after()
            return answer
        if after == "drop":
            return None
        return _error_reply(_Reply(503, "injected failure 503 after the request took effect"))

    def _apply(
        self, path: str, headers: Any, body: bytes
    ) -> tuple[tuple[int, dict[str, str], bytes], Any]:
        """Apply one POST; return its answer and what :meth:`lose_next`/:meth:`after_next`
        asked to do after it (None for nothing)."""
        try:
            with self._lock:
                self._counts[path] = self._counts.get(path, 0) + 1
                self._take_fault(path)
                if path == "/oauth2/token":
                    return _json_reply(200, self._token(body)), self._take_after(path)
                route = self._routes.get(path)
                if route is None:
                    raise _Reply(404, "Unknown API function: " + path)
                self._check_host(path, headers.get("Host", ""))
                self._check_auth(headers.get("Authorization", ""))
                if path in _CONTENT_ROUTES:
                    arg = _json_arg(headers.get("Dropbox-API-Arg"), "Dropbox-API-Arg header")
                else:
                    if headers.get("Content-Type", "").split(";")[0] != "application/json":
                        raise _bad_input("bad Content-Type, expected application/json")
                    arg = _json_arg(body.decode("utf-8", "replace") or None, "request body")
                if arg.get("autorename"):
                    raise _bad_input("fake_dropbox does not implement autorename")
                result, payload = route(arg, body)
                after = self._take_after(path)
        except _Reply as reply:
            return _error_reply(reply), None
        except Exception:  # a bug in the fake: a 400 is not retried, and shows the traceback
            return _error_reply(_bad_input("fake_dropbox failed:\n" + traceback.format_exc())), None
        if payload is None:
            return _json_reply(200, result), after
        api_result = json.dumps(result)  # ASCII-escaped, as an HTTP header must be
        headers = {"Content-Type": "application/octet-stream", "Dropbox-API-Result": api_result}
        return (200, headers, payload), after

    def _take_after(self, path: str) -> Any:
        after = next((a for a in self._afters if a[0] in ("*", path)), None)
        if after is None:
            return None
        after[1] -= 1
        if after[1] == 0:
            self._afters.remove(after)
        return after[2]

    def _take_fault(self, path: str) -> None:
        fault = next((f for f in self._faults if f[0] in ("*", path)), None)
        if fault is None:
            return
        _, remaining, status, retry_after = fault
        fault[1] = remaining - 1
        if fault[1] == 0:
            self._faults.remove(fault)
        if status == 429:
            raise _Reply(429, "too_many_requests", {"Retry-After": str(retry_after)})
        raise _Reply(status, f"injected failure {status}")

    def _token(self, body: bytes) -> dict[str, Any]:
        form = {k: v[0] for k, v in urllib.parse.parse_qs(body.decode("ascii", "replace")).items()}
        if form.get("grant_type") != "refresh_token":
            raise _Reply(400, {"error": "unsupported_grant_type"})
        if (form.get("client_id"), form.get("client_secret")) != (self.app_key, self.app_secret):
            raise _Reply(400, {"error": "invalid_client"})
        if self._revoked or form.get("refresh_token") != self.refresh_token:
            raise _Reply(400, {"error": "invalid_grant", "error_description": "revoked"})
        token = "sl.fake-" + secrets.token_urlsafe(24)
        self._tokens.add(token)
        return {"access_token": token, "token_type": "bearer", "expires_in": self.expires_in}

    def _check_auth(self, header: str) -> None:
        scheme, _, token = header.partition(" ")
        if scheme != "Bearer" or not token:
            raise _bad_input('missing or malformed "Authorization" header')
        if token not in self._tokens:
            tag = "expired_access_token" if token in self._expired else "invalid_access_token"
            raise _Reply(401, {"error_summary": tag + "/..", "error": {".tag": tag}})

    def _check_host(self, path: str, host: str) -> None:
        want = "content" if path in _CONTENT_ROUTES else "api"
        if host.endswith(".dropboxapi.com") and not host.startswith(want + "."):
            raise _bad_input(f"{path} must be called on {want}.dropboxapi.com, not {host}")

    # -- the file tree (callers hold the lock) --------------------------------------------------

    def _norm(self, path: str, allow_root: bool = False) -> str:
        """Validate a path; return it without trailing slash (``""`` for the root)."""
        if path.startswith("id:"):
            found = [e.display for e in self._entries.values() if e.id == path]
            if not found:
                raise _lookup("not_found")
            return found[0]
        if path and not path.startswith("/"):
            raise _bad_input(f"path {path!r} did not match pattern")
        path = path.rstrip("/")
        if not path and not allow_root:
            raise _bad_input("the root folder is unsupported")
        return path

    def _place(self, path: str) -> str | None:
        """Create the missing parents of ``path``; return ``path`` cased like its parents.

        Return None, creating nothing, when an ancestor is a file (``file_ancestor``).
        """
        display = ""
        names = path.split("/")[1:]
        for name in names[:-1]:
            parent = self._entries.get((display + "/" + name).lower())
            if parent is not None and parent.data is not None:
                return None
            display = parent.display if parent is not None else display + "/" + name
        display = ""
        for name in names[:-1]:
            lower = (display + "/" + name).lower()
            parent = self._entries.setdefault(lower, _Entry(display + "/" + name, self._new_id()))
            display = parent.display
        return display + "/" + names[-1]

    def _new_id(self) -> str:
        return "id:" + secrets.token_urlsafe(16)[:22]

    def _new_rev(self) -> str:
        self._rev += 1
        return f"{self._rev:015x}"

    # -- routes (called with the lock held) -----------------------------------------------------

    def _upload(self, arg: dict[str, Any], body: bytes) -> tuple[Any, None]:
        path, mode = self._norm(arg["path"]), arg.get("mode", "add")
        mode = {".tag": mode} if isinstance(mode, str) else mode
        if arg.get("content_hash") not in (None, content_hash(body)):
            raise _route_error({".tag": "content_hash_mismatch"})

        def conflict(kind: str) -> _Reply:
            session = secrets.token_hex(16)  # required by the SDK's UploadWriteFailed
            error = {".tag": "path", "reason": _conflict(kind), "upload_session_id": session}
            return _route_error(error)

        old = self._entries.get(path.lower())
        if old is not None and old.data is None:
            raise conflict("folder")
        if old is not None and mode[".tag"] != "overwrite":
            stale = mode[".tag"] == "add" or mode.get("update") != old.rev
            if stale and (arg.get("strict_conflict") or old.data != body):
                raise conflict("file")
        elif old is None and mode[".tag"] == "update" and arg.get("strict_conflict"):
            raise conflict("file")  # no rev can match a file that is gone
        if old is not None and old.data == body:
            return old.metadata(tagged=False), None  # identical bytes: nothing changes
        if (display := old.display if old is not None else self._place(path)) is None:
            raise conflict("file_ancestor")
        now = _now()
        entry = _Entry(
            display=display,
            id=old.id if old is not None else self._new_id(),
            data=body,
            rev=self._new_rev(),
            client_modified=arg.get("client_modified") or now,
            server_modified=now,
        )
        self._entries[path.lower()] = entry
        return entry.metadata(tagged=False), None

    def _download(self, arg: dict[str, Any], body: bytes) -> tuple[Any, bytes]:
        entry = self._entries.get(self._norm(arg["path"]).lower())
        if entry is None or (arg.get("rev") not in (None, entry.rev)):
            raise _lookup("not_found")
        if entry.data is None:
            raise _lookup("not_file")
        return entry.metadata(tagged=False), entry.data

    def _get_metadata(self, arg: dict[str, Any], body: bytes) -> tuple[Any, None]:
        entry = self._entries.get(self._norm(arg["path"]).lower())
        if entry is None:
            raise _lookup("not_found")
        return entry.metadata(), None

    def _move(self, arg: dict[str, Any], body: bytes) -> tuple[Any, None]:
        src, dst = self._norm(arg["from_path"]), self._norm(arg["to_path"])
        entry = self._entries.get(src.lower())
        if entry is None:
            raise _lookup("not_found", "from_lookup")
        if dst.lower() == src.lower() and dst != entry.display:
            pass  # a case-only rename
        elif dst.lower() == src.lower():
            raise _route_error({".tag": "duplicated_or_nested_paths"})
        elif dst.lower().startswith(src.lower() + "/"):
            raise _route_error({".tag": "cant_move_folder_into_itself"})
        elif (old := self._entries.get(dst.lower())) is not None:
            kind = "folder" if old.data is None else "file"
            raise _route_error({".tag": "to", "to": _conflict(kind)})
        if (target := self._place(dst)) is None:
            raise _route_error({".tag": "to", "to": _conflict("file_ancestor")})
        prefix = src.lower()
        moved = {
            lower: e
            for lower, e in self._entries.items()
            if lower == prefix or lower.startswith(prefix + "/")
        }
        for lower in moved:
            del self._entries[lower]
        for e in moved.values():
            display = target + e.display[len(src) :]
            rev = self._new_rev() if e.data is not None else ""
            self._entries[display.lower()] = replace(e, display=display, rev=rev)
        return {"metadata": self._entries[target.lower()].metadata()}, None

    def _delete(self, arg: dict[str, Any], body: bytes) -> tuple[Any, None]:
        path = self._norm(arg["path"]).lower()
        entry = self._entries.get(path)
        # A stale parent_rev answering not_found is a guess; real Dropbox is unverified here.
        if entry is None or arg.get("parent_rev") not in (None, entry.rev):
            raise _lookup("not_found", "path_lookup")
        for lower in [k for k in self._entries if k == path or k.startswith(path + "/")]:
            del self._entries[lower]
        return {"metadata": entry.metadata()}, None

    def _create_folder(self, arg: dict[str, Any], body: bytes) -> tuple[Any, None]:
        path = self._norm(arg["path"])
        old = self._entries.get(path.lower())
        if old is not None:
            kind = "folder" if old.data is None else "file"
            raise _route_error({".tag": "path", "path": _conflict(kind)})
        if (display := self._place(path)) is None:
            raise _route_error({".tag": "path", "path": _conflict("file_ancestor")})
        entry = self._entries[display.lower()] = _Entry(display, self._new_id())
        return {"metadata": entry.metadata(tagged=False)}, None

    def _list_folder(self, arg: dict[str, Any], body: bytes) -> tuple[Any, None]:
        if arg["path"] == "/":
            raise _bad_input('path: "/" did not match pattern; use "" for the root')
        path = self._norm(arg["path"], allow_root=True).lower()
        if path:
            folder = self._entries.get(path)
            if folder is None:
                raise _lookup("not_found")
            if folder.data is not None:
                raise _lookup("not_folder")
        recursive = arg.get("recursive", False)
        entries = [
            e.metadata()
            for lower, e in sorted(self._entries.items())
            if (lower == path and recursive)
            or (lower.startswith(path + "/") and (recursive or lower.rsplit("/", 1)[0] == path))
        ]
        limit = min(self.page_size, arg.get("limit") or self.page_size)
        return self._page(entries, limit), None

    def _list_folder_continue(self, arg: dict[str, Any], body: bytes) -> tuple[Any, None]:
        if (pending := self._cursors.get(arg["cursor"])) is None:  # a cursor can be reused
            raise _route_error({".tag": "reset"})
        limit, entries = pending
        return self._page(entries, limit), None

    def _page(self, entries: list[dict[str, Any]], limit: int) -> dict[str, Any]:
        """One page of ``entries``; the rest waits under a fresh cursor."""
        cursor = "AAF" + secrets.token_urlsafe(24)
        self._cursors[cursor] = (limit, entries[limit:])  # the final cursor lists nothing
        return {"entries": entries[:limit], "cursor": cursor, "has_more": len(entries) > limit}


def _route_path(route: str) -> str:
    """``"*"``, or a route's URL path: ``files/upload`` and ``/2/files/upload`` are the same."""
    if route == "*":
        return route
    route = "/" + route.lstrip("/")
    return route if route.startswith(("/2/", "/oauth2/")) else "/2" + route


def _json_arg(text: str | None, where: str) -> dict[str, Any]:
    """Parse a route argument; ``null`` becomes ``{}``."""
    try:
        value = json.loads(text) if text is not None else None
    except ValueError as exc:
        raise _bad_input(f"could not decode {where} as JSON: {exc}") from None
    if value is not None and not isinstance(value, dict):
        raise _bad_input(f"{where} must be a JSON object")
    return value or {}


def _json_reply(status: int, body: Any) -> tuple[int, dict[str, str], bytes]:
    # Exactly "application/json": the SDK asserts it for 200 RPC replies and 401s.
    return status, {"Content-Type": "application/json"}, json.dumps(body).encode("utf-8")


def _error_reply(reply: _Reply) -> tuple[int, dict[str, str], bytes]:
    if isinstance(reply.body, dict):
        status, headers, body = _json_reply(reply.status, reply.body)
    else:
        status, body = reply.status, str(reply.body).encode("utf-8")
        headers = {"Content-Type": "text/plain; charset=utf-8"}
    return status, {**headers, **reply.headers}, body


def fake_session(host: str, ca_path: str) -> Any:
    """A ``requests.Session`` that sends every ``https://`` request to ``host`` (``IP:PORT``).

    The original host stays in the ``Host`` header, so the fake can check that content routes
    went to the content host. TLS is verified against ``ca_path``; the environment (CA bundle
    variables, proxies, netrc) is ignored. Pass it as ``dropbox.Dropbox(session=...)``.
    """
    import requests
    from requests.adapters import HTTPAdapter

    class _ToFake(HTTPAdapter):
        def send(self, request: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            parts = urllib.parse.urlsplit(request.url)
            request.headers["Host"] = parts.netloc
            request.url = urllib.parse.urlunsplit(parts._replace(netloc=host))
            kwargs.update(verify=ca_path, proxies={})
            return super().send(request, **kwargs)

    result = requests.Session()
    result.trust_env = False
    result.mount("https://", _ToFake())
    return result


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet about clients that hang up or reject the certificate."""
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, ssl.SSLError, TimeoutError)):
            super().handle_error(request, client_address)


def _make_handler(fake: FakeDropbox) -> type[http.server.BaseHTTPRequestHandler]:
    """A request handler class bound to ``fake``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like the real API
        timeout = 30  # idle keep-alive connections end eventually
        disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms ACK wait

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            path = urllib.parse.urlsplit(self.path).path
            answer = fake._handle(path, self.headers, body)
            if answer is None:  # the request took effect; its answer is lost with the connection
                self.close_connection = True
                return
            status, headers, payload = answer
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("X-Dropbox-Request-Id", secrets.token_hex(16))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            self.send_error(405, "Dropbox API v2 routes are POST only")

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output quiet

    return Handler
