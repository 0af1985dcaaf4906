"""Tests of sqstore: conformance over every backend, API, signing, concurrency, CLI.

Order: strategies, backend table and ``store`` fixture, conformance, records,
signing, state machine, operations, local backend (processes and signals),
sqooler interoperability, CLI and packaging.
"""

from __future__ import annotations

import base64
import copy
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import sqstore
from sqstore import Storage

HERE = Path(__file__).resolve().parent

settings.register_profile("ci", max_examples=200, deadline=None)
settings.register_profile("fast", max_examples=25, deadline=None)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "fast")
)


def skip_or_fail(reason: str) -> None:
    """Skip with *reason*, but fail under CI: CI must run every promised suite."""
    if os.environ.get("CI"):
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


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
times = st.datetimes(timezones=st.just(sqstore.timezone.utc)).map(
    lambda t: t.replace(microsecond=0)
)
RECORDS: dict[type, st.SearchStrategy[Any]] = {
    sqstore.StatusMsg: st.builds(sqstore.StatusMsg, job_id=names, status=statuses),
    sqstore.ResultDict: st.builds(
        sqstore.ResultDict,
        status=statuses,
        header=json_docs,
        results=st.lists(experiments, max_size=3).map(tuple),
    ),
    sqstore.BackendConfig: st.builds(
        sqstore.BackendConfig,
        cold_atom_type=st.sampled_from(["fermion", "boson", "spin", "mixed"]),
        wire_order=st.sampled_from(["sequential", "interleaved"]),
        gates=st.lists(json_docs, max_size=3).map(tuple),
        supported_instructions=st.lists(st.text(max_size=5), max_size=3).map(tuple),
        last_queue_check=st.none() | times,
    ),
    sqstore.BackendDict: st.builds(
        sqstore.BackendDict,
        cold_atom_type=st.sampled_from(["fermion", "boson", "spin", "mixed"]),
        wire_order=st.sampled_from(["sequential", "interleaved"]),
        gates=st.lists(json_docs, max_size=3).map(tuple),
        supported_instructions=st.lists(st.text(max_size=5), max_size=3).map(tuple),
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
BACKENDS: dict[str, Callable[[Path], Storage]] = {
    "memory": lambda tmp: sqstore.memory_storage(),
    "local": lambda tmp: sqstore.local_storage(tmp / "store"),
}


@pytest.fixture(params=sorted(BACKENDS))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    return BACKENDS[request.param](tmp_path)


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
    store["upload"]("f", "x", {"v": 1})
    with pytest.raises(FileExistsError, match="f/x"):
        store["upload"]("f", "x", {"v": 2})
    with pytest.raises(sqstore.AlreadyExistsError):
        store["upload"]("f", "x", {"v": 2})
    assert store["get"]("f", "x") == {"v": 1}


def test_update_replaces_only_existing(store: Storage) -> None:
    """Update replaces an existing document and raises NotFoundError for a missing one."""
    with pytest.raises(FileNotFoundError, match="f/x"):
        store["update"]("f", "x", {"v": 1})
    assert store["list"]("f") == []
    store["upload"]("f", "x", {"v": 1})
    store["update"]("f", "x", {"v": 2})
    assert store["get"]("f", "x") == {"v": 2}


def test_get_missing_raises_not_found(store: Storage) -> None:
    """Reading an id that was never uploaded raises NotFoundError naming path and id."""
    with pytest.raises(sqstore.NotFoundError, match="jobs/nope"):
        store["get"]("jobs", "nope")


def test_move_is_a_move(store: Storage) -> None:
    """Move puts the document in the target folder and removes it from the source."""
    store["upload"]("a", "x", {"v": 1})
    store["move"]("a", "b/c", "x")
    assert store["list"]("a") == []
    assert store["get"]("b/c", "x") == {"v": 1}
    with pytest.raises(sqstore.NotFoundError, match="a/x"):
        store["move"]("a", "b/c", "x")


def test_move_refuses_to_overwrite(store: Storage) -> None:
    """Moving onto an existing id raises AlreadyExistsError and changes neither document."""
    store["upload"]("a", "x", {"v": 1})
    store["upload"]("b", "x", {"v": 2})
    with pytest.raises(sqstore.AlreadyExistsError, match="b/x"):
        store["move"]("a", "b", "x")
    assert store["get"]("a", "x") == {"v": 1}
    assert store["get"]("b", "x") == {"v": 2}


def test_delete(store: Storage) -> None:
    """Delete removes a document; deleting a missing one raises NotFoundError."""
    store["upload"]("a", "x", {})
    store["delete"]("a", "x")
    with pytest.raises(sqstore.NotFoundError):
        store["get"]("a", "x")
    with pytest.raises(sqstore.NotFoundError, match="a/x"):
        store["delete"]("a", "x")


def test_list_is_oldest_first(store: Storage) -> None:
    """List gives the ids of a folder in creation order for sqstore's job ids."""
    assert store["list"]("never/used") == []
    ids = [sqstore.create_job_id(store, "sim", "alice") for _ in range(30)]
    for job_id in reversed(ids):
        store["upload"]("q", job_id, {})
    assert store["list"]("q") == ids
    assert len(set(ids)) == 30


BAD_NAMES = [
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


@pytest.mark.parametrize("bad", BAD_NAMES, ids=repr)
def test_bad_ids_are_refused_before_any_write(store: Storage, tmp_path: Path, bad: Any) -> None:
    """Every callable refuses a bad id with InvalidNameError and touches nothing."""
    store["upload"]("ok", "keep", {"v": 1})
    before = tree(tmp_path)
    calls = [
        lambda: store["upload"]("ok", bad, {}),
        lambda: store["update"]("ok", bad, {}),
        lambda: store["get"]("ok", bad),
        lambda: store["move"]("ok", "other", bad),
        lambda: store["delete"]("ok", bad),
    ]
    for call in calls:
        with pytest.raises(sqstore.InvalidNameError, match="invalid"):
            call()
    assert tree(tmp_path) == before
    assert store["list"]("ok") == ["keep"]


@pytest.mark.parametrize("bad", BAD_PATHS, ids=repr)
def test_bad_paths_are_refused_before_any_write(store: Storage, tmp_path: Path, bad: Any) -> None:
    """Every callable refuses a bad folder path with InvalidNameError and touches nothing."""
    store["upload"]("ok", "keep", {"v": 1})
    before = tree(tmp_path)
    calls = [
        lambda: store["upload"](bad, "x", {}),
        lambda: store["update"](bad, "x", {}),
        lambda: store["get"](bad, "x"),
        lambda: store["move"](bad, "ok", "keep"),
        lambda: store["move"]("ok", bad, "keep"),
        lambda: store["delete"](bad, "x"),
        lambda: store["list"](bad),
    ]
    for call in calls:
        with pytest.raises(sqstore.InvalidNameError):
            call()
    assert tree(tmp_path) == before
    assert store["get"]("ok", "keep") == {"v": 1}


@pytest.mark.parametrize("bad", [{"x": {1, 2}}, {"x": float("nan")}, {"x": object()}, [1], "s"])
def test_unserialisable_documents_are_refused(store: Storage, tmp_path: Path, bad: Any) -> None:
    """A value no JSON store can hold is refused with InvalidDocumentError; nothing is written."""
    with pytest.raises(sqstore.InvalidDocumentError, match="f/x"):
        store["upload"]("f", "x", bad)
    assert store["list"]("f") == []
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
    """A wrong type or an unknown field is an InvalidDocumentError that names the field."""
    good = sqstore.to_doc(sqstore.StatusMsg("j", "DONE", "d", "e"))
    with pytest.raises(sqstore.InvalidDocumentError, match=r"'status' must be in.*got 'FINE'"):
        sqstore.from_doc({**good, "status": "FINE"}, sqstore.StatusMsg)
    with pytest.raises(sqstore.InvalidDocumentError, match="surprise"):
        sqstore.from_doc({**good, "surprise": 1}, sqstore.StatusMsg)
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
        assert cfg.last_queue_check == sqstore.datetime(2024, 5, 1, 12, tzinfo=sqstore.timezone.utc)
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
    signature = sqstore._ed25519_sign(private, RFC_SIGNING_INPUT.encode())
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
    pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
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


# ============================================================================
# State machine: every backend agrees with memory_storage()
# ============================================================================
class StorageComparison(RuleBasedStateMachine):
    """Random sequences of the six verbs give the same outcomes on memory and local."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="sqstore-sm-")
        self.stores = [sqstore.memory_storage(), sqstore.local_storage(self.tmp)]

    def teardown(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def outcomes(self, op: str, *args: Any) -> list[tuple[str, Any]]:
        results = []
        for store in self.stores:
            try:
                results.append(("ok", store[op](*args)))  # type: ignore[literal-required]
            except sqstore.SqstoreError as exc:
                results.append(("error", type(exc)))
        return results

    def agree(self, op: str, *args: Any) -> None:
        model, *others = self.outcomes(op, *args)
        for other in others:
            assert other == model, (op, args)

    paths = st.sampled_from(["a", "a/b", "c"])
    ids = st.sampled_from(["x", "y", "z", ".."])

    @rule(path=paths, doc_id=ids, doc=json_docs)
    def upload(self, path: str, doc_id: str, doc: dict[str, Any]) -> None:
        self.agree("upload", path, doc_id, doc)

    @rule(path=paths, doc_id=ids, doc=json_docs)
    def update(self, path: str, doc_id: str, doc: dict[str, Any]) -> None:
        self.agree("update", path, doc_id, doc)

    @rule(path=paths, doc_id=ids)
    def get(self, path: str, doc_id: str) -> None:
        self.agree("get", path, doc_id)

    @rule(src=paths, dst=paths, doc_id=ids)
    def move(self, src: str, dst: str, doc_id: str) -> None:
        self.agree("move", src, dst, doc_id)

    @rule(path=paths, doc_id=ids)
    def delete(self, path: str, doc_id: str) -> None:
        self.agree("delete", path, doc_id)

    @invariant()
    def lists_agree(self) -> None:
        for path in ("a", "a/b", "c"):
            self.agree("list", path)


StorageComparison.TestCase.settings = settings(
    max_examples=int(os.environ.get("SQSTORE_SM_EXAMPLES", "60")),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStorageComparison = StorageComparison.TestCase


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


def counting(store: Storage) -> tuple[Storage, dict[str, int]]:
    """A handle that counts calls per verb (a layer, as a test helper)."""
    counts = dict.fromkeys(sqstore._OPS, 0)

    def wrap(op: str) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            counts[op] += 1
            return store[op](*args)  # type: ignore[literal-required]

        return call

    return {**store, **{op: wrap(op) for op in sqstore._OPS}}, counts  # type: ignore[return-value]


def finish(store: Storage, display_name: str, key: Any = None) -> list[str]:
    """Run Bob until the queue is empty; return the job ids in the order claimed."""
    done = []
    while (claimed := sqstore.claim_job(store, display_name, key)) is not None:
        nxt, job = claimed
        result = sqstore.run_simulator(job, nxt.job_id, display_name)
        status = sqstore.StatusMsg(nxt.job_id, "DONE", "ok", "None")
        sqstore.update_in_database(store, result, status, nxt.job_id, display_name, key)
        done.append(nxt.job_id)
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
    raw = signed["get"]("backends/configs", "sim")
    assert sqstore.verify_doc(raw, [sqstore.get_public_key(signed, "sim")])["max_shots"] == 1


def test_signing_config_needs_a_key(store: Storage) -> None:
    """A config that signs cannot be uploaded without a private key."""
    with pytest.raises(sqstore.BadSignatureError, match="no private_jwk"):
        sqstore.upload_config(store, sqstore.demo_config("sim", sign=True), "sim")
    assert sqstore.get_backends(store) == []


def test_backend_dict_and_status(store: Storage) -> None:
    """The Qiskit views carry the long backend name, gates and the operational flag."""
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
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


def test_queue_is_fifo(store: Storage) -> None:
    """Jobs are claimed in the order they were submitted."""
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    submitted = [sqstore.upload_job(store, {"n": {"i": i}}, "sim", "alice") for i in range(25)]
    claimed = []
    while (got := sqstore.claim_job(store, "sim")) is not None:
        claimed.append(got[0].job_id)
        assert got[1] == {"n": {"i": len(claimed) - 1}}
    assert claimed == submitted


def test_next_job_answers_like_sqooler(store: Storage) -> None:
    """get_next_job_in_queue says 'None' twice for an empty queue, else the running path."""
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    assert sqstore.get_next_job_in_queue(store, "sim") == sqstore.NextJob("None", "None")
    job_id = sqstore.upload_job(store, JOB, "sim", "alice")
    nxt = sqstore.get_next_job_in_queue(store, "sim")
    assert nxt == sqstore.NextJob(job_id, "jobs/running")
    assert sqstore.get_job(store, nxt.job_json_path, nxt.job_id) == JOB


def test_claim_is_exactly_once_and_leased(store: Storage) -> None:
    """A claimed job is leased to its holder; a second worker gets the next job, not it."""
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    first = sqstore.upload_job(store, JOB, "sim", "alice")
    second = sqstore.upload_job(store, JOB, "sim", "alice")
    t0 = 1_800_000_000.0
    a = sqstore.claim_job(store, "sim", holder="worker-a", lease_seconds=30, now=lambda: t0)
    b = sqstore.claim_job(store, "sim", holder="worker-b", lease_seconds=30, now=lambda: t0)
    assert a is not None and b is not None
    assert (a[0].job_id, b[0].job_id) == (first, second)
    assert sqstore.claim_job(store, "sim", holder="worker-c") is None
    lease = sqstore.from_doc(store["get"]("jobs/leases", first), sqstore.Lease)
    assert (lease.holder, lease.expires, lease.display_name) == ("worker-a", t0 + 30, "sim")


def test_draining_lists_the_queue_once_per_pass(store: Storage) -> None:
    """claim_jobs lists a long queue once, not once per job, and keeps FIFO order."""
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    submitted = [sqstore.upload_job(store, {"e": {}}, "sim", "alice") for _ in range(40)]
    sqstore.timestamp_queue(store, "sim")  # a fresh heartbeat: no lease sweep in this drain
    counted, counts = counting(store)
    claimed = [nxt.job_id for nxt, _ in sqstore.claim_jobs(counted, "sim")]
    assert claimed == submitted
    assert counts["list"] == 2, "one pass over the queue, then one pass that finds it empty"


def test_draining_keeps_the_heartbeat(store: Storage) -> None:
    """A long drain still writes last_queue_check once per heartbeat."""
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    for _ in range(10):
        sqstore.upload_job(store, {"e": {}}, "sim", "alice")
    clock = [1_800_000_000.0]
    for _ in sqstore.claim_jobs(store, "sim", heartbeat=60, now=lambda: clock[0]):
        clock[0] += 20  # each job takes 20 s
    last = sqstore.get_config(store, "sim").last_queue_check
    assert last is not None and clock[0] - last.timestamp() <= 60 + 20


def test_expired_leases_are_requeued(store: Storage) -> None:
    """A job whose worker vanished goes back to its queue once its lease expires, only then."""
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    job_id = sqstore.upload_job(store, JOB, "sim", "alice")
    t0 = 1_800_000_000.0
    assert sqstore.claim_job(store, "sim", holder="dead", lease_seconds=60, now=lambda: t0)
    assert sqstore.requeue_expired(store, now=lambda: t0 + 59) == []
    assert store["list"]("jobs/queued/sim") == []
    assert sqstore.requeue_expired(store, "other", now=lambda: t0 + 61) == []
    assert sqstore.requeue_expired(store, now=lambda: t0 + 61) == [job_id]
    assert store["list"]("jobs/queued/sim") == [job_id]
    assert store["list"]("jobs/leases") == []
    assert sqstore.requeue_expired(store, now=lambda: t0 + 62) == []
    again = sqstore.claim_job(store, "sim", holder="alive", now=lambda: t0 + 62)
    assert again is not None and again[0].job_id == job_id


def test_lease_renewal(store: Storage) -> None:
    """The holder can extend its lease; anyone else gets LeaseLostError."""
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    job_id = sqstore.upload_job(store, JOB, "sim", "alice")
    t0 = 1_800_000_000.0
    sqstore.claim_job(store, "sim", holder="w", lease_seconds=60, now=lambda: t0)
    renewed = sqstore.renew_lease(store, job_id, holder="w", lease_seconds=60, now=lambda: t0 + 50)
    assert renewed.expires == t0 + 110
    assert sqstore.requeue_expired(store, now=lambda: t0 + 100) == []
    with pytest.raises(sqstore.LeaseLostError):
        sqstore.renew_lease(store, job_id, holder="thief")
    with pytest.raises(sqstore.LeaseLostError):
        sqstore.update_in_database(
            store, None, sqstore.StatusMsg(job_id, "ERROR", "", ""), job_id, "sim", holder="thief"
        )
    assert store["list"]("jobs/running") == [job_id]


def test_stale_lease_before_move_is_cleared(store: Storage) -> None:
    """A worker that died between taking the lease and moving the job does not block it."""
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    job_id = sqstore.upload_job(store, JOB, "sim", "alice")
    lease = sqstore.Lease(job_id, "sim", "dead", "t", 100.0)
    store["upload"]("jobs/leases", job_id, sqstore.to_doc(lease))
    sqstore.timestamp_queue(store, "sim")
    assert sqstore.claim_job(store, "sim") is None, "a fresh heartbeat: no requeue yet"
    assert sqstore.requeue_expired(store) == []
    got = sqstore.claim_job(store, "sim")
    assert got is not None and got[0].job_id == job_id


def test_heartbeat_requeues_expired_leases(store: Storage) -> None:
    """Polling workers requeue expired leases by themselves, once per heartbeat."""
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    job_id = sqstore.upload_job(store, JOB, "sim", "alice")
    t0 = 1_800_000_000.0
    sqstore.claim_job(store, "sim", holder="dead", lease_seconds=5, now=lambda: t0)
    assert sqstore.claim_job(store, "sim", heartbeat=60, now=lambda: t0 + 30) is None
    got = sqstore.claim_job(store, "sim", heartbeat=60, now=lambda: t0 + 61)
    assert got is not None and got[0].job_id == job_id


def test_polling_an_empty_queue_does_not_rewrite_the_config(store: Storage, keys: Any) -> None:
    """last_queue_check is written once per heartbeat, not on every poll."""
    private, _ = keys
    sqstore.upload_config(store, sqstore.demo_config("sim", sign=True), "sim", private)
    counted, counts = counting(store)
    clock = [1_800_000_000.0]
    for _ in range(20):
        assert (
            sqstore.claim_job(counted, "sim", private, heartbeat=60, now=lambda: clock[0]) is None
        )
        clock[0] += 1
    assert counts["update"] == 1
    clock[0] += 60
    sqstore.claim_job(counted, "sim", private, heartbeat=60, now=lambda: clock[0])
    assert counts["update"] == 2
    for _ in range(5):
        sqstore.claim_job(counted, "sim", private, heartbeat=0, now=lambda: clock[0] + 1)
    assert counts["update"] == 7
    assert sqstore.get_backend_status(store, "sim", now=lambda: clock[0]).operational


def test_status_lifecycle(store: Storage) -> None:
    """A status starts INITIALIZING; a missing one reads as ERROR, as in sqooler."""
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
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
    assert sqstore.is_signed(signed["get"]("status/sim", job_id))
    result = sqstore.get_result(signed, "sim", "alice", job_id)
    assert result.status == "DONE" and result.results[0].data.memory == ("1",) * 5
    assert result.backend_name == f"{signed['name']}_sim_simulator"
    assert sqstore.verify_result(signed, "sim", job_id)
    assert signed["list"]("jobs/finished/sim") == [job_id]
    assert signed["list"]("jobs/running") == signed["list"]("jobs/leases") == []


def test_missing_result_reads_as_error(store: Storage) -> None:
    """A result that is not there yet reads as an ERROR result, as in sqooler."""
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    result = sqstore.get_result(store, "sim", "alice", "6b0000000000000000000000")
    assert (result.status, result.success) == ("ERROR", False)


def test_unsigned_or_tampered_results_do_not_verify(signed: Storage, keys: Any) -> None:
    """verify_result is False for a tampered result and for an unsigned one."""
    private, _ = keys
    job_id = sqstore.upload_job(signed, JOB, "sim", "alice")
    finish(signed, "sim", private)
    raw = signed["get"]("results/sim", job_id)
    raw["payload"]["results"][0]["data"]["memory"][0] = "0"
    signed["update"]("results/sim", job_id, raw)
    assert not sqstore.verify_result(signed, "sim", job_id)
    signed["update"]("results/sim", job_id, raw["payload"])
    assert not sqstore.verify_result(signed, "sim", job_id)
    with pytest.raises(sqstore.NotFoundError):
        sqstore.verify_result(signed, "sim", "6b0000000000000000000000")


def test_signing_backend_needs_a_key_for_results(signed: Storage) -> None:
    """A backend that signs cannot upload an unsigned result."""
    result = sqstore.run_simulator(JOB, "j1", "sim")
    with pytest.raises(sqstore.BadSignatureError, match="no private_jwk"):
        sqstore.upload_result(signed, result, "sim", "j1")
    assert signed["list"]("results/sim") == []


def test_error_moves_the_job_to_deleted(store: Storage) -> None:
    """An ERROR finish moves the job to deleted and writes the ERROR status."""
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    job_id = sqstore.upload_job(store, JOB, "sim", "alice")
    sqstore.upload_status(store, "sim", "alice", job_id)
    nxt = sqstore.get_next_job_in_queue(store, "sim")
    status = sqstore.StatusMsg(job_id, "ERROR", "boom", "ValueError('boom')")
    sqstore.update_in_database(store, None, status, nxt.job_id, "sim")
    assert store["list"]("jobs/deleted") == [job_id]
    assert sqstore.get_status(store, "sim", "alice", job_id) == status
    assert store["list"]("jobs/running") == store["list"]("jobs/leases") == []


def test_finish_is_safe_to_rerun(signed: Storage, keys: Any) -> None:
    """Running update_in_database again (after a crash) neither fails nor duplicates."""
    private, _ = keys
    job_id = sqstore.upload_job(signed, JOB, "sim", "alice")
    _, job = sqstore.claim_job(signed, "sim", private) or pytest.fail("no job")
    result = sqstore.run_simulator(job, job_id, "sim")
    done = sqstore.StatusMsg(job_id, "DONE", "ok", "None")
    for _ in range(2):
        sqstore.update_in_database(signed, result, done, job_id, "sim", private)
    assert signed["list"]("jobs/finished/sim") == [job_id]
    assert sqstore.verify_result(signed, "sim", job_id)
    with pytest.raises(sqstore.NotFoundError):
        sqstore.update_in_database(signed, result, done, "6b0000000000000000000000", "sim", private)


def test_result_job_id_is_corrected(store: Storage) -> None:
    """A result carrying another job id is stored under the right one, with a warning."""
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    result = sqstore.run_simulator(JOB, "wrong", "sim")
    with pytest.warns(UserWarning, match="wrong"):
        sqstore.upload_result(store, result, "sim", "j1")
    assert sqstore.get_result(store, "sim", "alice", "j1").job_id == "j1"


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
def test_api_names_are_validated(store: Storage, tmp_path: Path, field: str, bad: str) -> None:
    """Names given to the API are checked before they reach a path."""
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    before = tree(tmp_path)
    names = {"display_name": "sim", "username": "alice", "job_id": "6b0000000000000000000000"}
    names[field] = bad
    with pytest.raises(sqstore.InvalidNameError):
        if field == "job_id":
            sqstore.get_status(store, names["display_name"], names["username"], bad)
        else:
            sqstore.upload_job(store, JOB, names["display_name"], names["username"])
    with pytest.raises(sqstore.InvalidNameError):
        sqstore.upload_status(store, names["display_name"], names["username"], names["job_id"])
    assert tree(tmp_path) == before


def test_kid_is_validated(store: Storage) -> None:
    """A kid is a name too: it cannot escape the keys folder."""
    with pytest.raises(sqstore.InvalidNameError):
        sqstore.get_public_key_from_kid(store, "../configs/sim")
    with pytest.raises(sqstore.InvalidNameError):
        sqstore.generate_keypair("../x")


def test_upload_job_refuses_non_objects(store: Storage) -> None:
    """A job must be a JSON object."""
    with pytest.raises(sqstore.InvalidDocumentError):
        sqstore.upload_job(store, ["not", "a", "dict"], "sim", "alice")  # type: ignore[arg-type]


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


def test_malformed_signed_status_names_its_path(store: Storage) -> None:
    """A signed document with a broken envelope is an InvalidDocumentError naming its path."""
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    broken = {"header": {"alg": "EdDSA"}, "payload": {}, "signature": "x"}
    store["upload"]("status/sim", "j1", broken)
    with pytest.raises(sqstore.InvalidDocumentError, match=r"status/sim/j1: .*\$\.header\.kid"):
        sqstore.get_status(store, "sim", "alice", "j1")


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


def _race_worker(root: str, worker: int, ids: list[str], out: str) -> None:
    store = sqstore.local_storage(root)
    won = {"upload": [], "move": []}
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


def test_racing_uploads_and_moves_have_one_winner(tmp_path: Path) -> None:
    """Processes racing to create or to move the same ids: exactly one wins each id."""
    root = str(tmp_path / "store")
    store = sqstore.local_storage(root)
    ids = [f"d{i:03d}" for i in range(300)]
    for doc_id in ids:
        store["upload"]("race/src", doc_id, {"id": doc_id})
    ctx = multiprocessing.get_context("spawn")
    outs = [str(tmp_path / f"r{i}.json") for i in range(4)]
    procs = [ctx.Process(target=_race_worker, args=(root, i, ids, outs[i])) for i in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(300)
        assert proc.exitcode == 0
    results = [json.loads(Path(out).read_text()) for out in outs]
    for op in ("upload", "move"):
        winners = [doc_id for won in results for doc_id in won[op]]
        assert sorted(winners) == ids, op
    assert store["list"]("race/src") == []
    moved = [doc_id for i in range(4) for doc_id in store["list"](f"race/dst{i}")]
    assert sorted(moved) == ids
    for i, won in enumerate(results):
        assert all(store["get"]("race/up", d) == {"by": i} for d in won["upload"])


def _claim_worker(root: str, name: str, out: str) -> None:
    store = sqstore.local_storage(root)
    done = []
    while (claimed := sqstore.claim_job(store, "sim", holder=name)) is not None:
        nxt, job = claimed
        result = sqstore.run_simulator(job, nxt.job_id, "sim")
        status = sqstore.StatusMsg(nxt.job_id, "DONE", name, "None")
        sqstore.update_in_database(store, result, status, nxt.job_id, "sim", holder=name)
        done.append(nxt.job_id)
    Path(out).write_text(json.dumps(done))


def test_four_processes_claim_500_jobs_exactly_once(tmp_path: Path) -> None:
    """Four worker processes on one queue process each of 500 jobs exactly once."""
    root = str(tmp_path / "store")
    store = sqstore.local_storage(root)
    sqstore.upload_config(store, sqstore.demo_config("sim"), "sim")
    job = {"e": {"instructions": [], "num_wires": 1, "shots": 1, "wire_order": "sequential"}}
    submitted = {sqstore.upload_job(store, job, "sim", "alice") for _ in range(500)}
    ctx = multiprocessing.get_context("spawn")
    outs = [str(tmp_path / f"w{i}.json") for i in range(4)]
    procs = [ctx.Process(target=_claim_worker, args=(root, f"w{i}", outs[i])) for i in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(300)
        assert proc.exitcode == 0
    per_worker = [json.loads(Path(out).read_text()) for out in outs]
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
store = sqstore.local_storage(sys.argv[1])
claimed = sqstore.claim_job(store, "sim", holder="doomed", lease_seconds=1.0)
print(claimed[0].job_id, flush=True)
time.sleep(600)
"""


def test_worker_killed_mid_job_loses_nothing(tmp_path: Path) -> None:
    """A worker SIGKILLed while holding a job: after its lease the job is requeued and done."""
    root = tmp_path / "store"
    store = sqstore.local_storage(root)
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
    assert sqstore.requeue_expired(store) == []
    time.sleep(1.1)
    assert sqstore.requeue_expired(store) == [job_id]
    assert finish(store, "sim") == [job_id]
    assert sqstore.get_status(store, "sim", "alice", job_id).status == "DONE"


# ============================================================================
# Interoperability with sqooler 0.9 on one directory
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


def test_sqooler_spooler_serves_an_sqstore_frontend(sqooler: Any, tmp_path: Path) -> None:
    """sqooler's Bob (signing) and sqstore's Alice share a directory."""
    from sqooler.schemes import BackendConfigSchemaIn, StatusMsgDict
    from sqooler.schemes import ResultDict as SqoolerResult
    from sqooler.security import create_jwk_pair

    private, public = create_jwk_pair("sqoolerkid")
    config = BackendConfigSchemaIn(**sqstore.to_doc(sqstore.demo_config("sq", sign=True)))
    sqooler.upload_config(config, "sq", private)
    sqooler.upload_public_key(public, "sq")

    store = sqstore.local_storage(tmp_path / "store")
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
    got = sqstore.get_result(store, "sq", "alice", job_id)
    assert got.results == result.results
    assert sqstore.verify_result(store, "sq", job_id)
    assert sqstore.get_public_key(store, "sq").x == public.x.decode()
    assert sqstore.get_backend_status(store, "sq").operational
    assert sqstore.get_backends(store) == sqooler.get_backends() == ["sq"]


def test_sqstore_spooler_serves_a_sqooler_frontend(sqooler: Any, tmp_path: Path) -> None:
    """sqstore's Bob (signing) and sqooler's Alice share a directory; sqooler verifies."""
    from sqooler.security import JWK as SqoolerJWK

    store = sqstore.local_storage(tmp_path / "store")
    private, public = sqstore.generate_keypair("sqstorekid")
    sqstore.upload_config(store, sqstore.demo_config("sq", sign=True), "sq", private)
    sqstore.upload_public_key(store, public, "sq")

    job_id = sqooler.upload_job(JOB, "sq", "alice")
    sqooler.upload_status("sq", "alice", job_id)
    assert finish(store, "sq", private) == [job_id]

    assert sqooler.get_status("sq", "alice", job_id).status == "DONE"
    result = sqooler.get_result("sq", "alice", job_id)
    assert result.status == "DONE" and result.results[0].data.memory == ["1"] * 5
    assert result.backend_name == "local_sq_simulator"
    assert sqooler.verify_result("sq", job_id)
    assert sqooler.get_public_key("sq").x.decode() == public.x
    assert sqooler.get_backend_status("sq").operational
    assert sqooler.get_backend_dict("sq").backend_name == "local_sq_simulator"
    # sqooler accepts our key as its own: it can update the config we signed
    sqooler.update_config(sqooler.get_config("sq"), "sq", SqoolerJWK(**sqstore.to_doc(private)))
    assert sqstore.get_config(store, "sq").kid == "sqstorekid"
    raw = store["get"]("backends/configs", "sq")
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
    assert proc.stderr == "", "progress is shown only on a terminal"
    assert list(tmp_path.iterdir()) == []
    table = run_cli("bench", "--jobs", "2", "--repeats", "1", "--queue", "5", cwd=tmp_path)
    assert "round trip / raw baseline" in table.stdout and table.returncode == 0


def test_cli_keygen(tmp_path: Path) -> None:
    """keygen writes the private JWK with mode 0600, prints the public one, never overwrites."""
    proc = run_cli("keygen", "mykid", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    public = sqstore.from_doc(json.loads(proc.stdout), sqstore.JWK)
    key_file = tmp_path / "mykid.jwk"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    private = sqstore.from_doc(json.loads(key_file.read_text()), sqstore.JWK)
    assert sqstore.public_from_private(private) == public
    again = run_cli("keygen", "mykid", cwd=tmp_path)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
    assert key_file.read_text() == json.dumps(sqstore.to_doc(private)) + "\n"


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
        (["submit", "nosuch", "job.json"], "backends/configs/nosuch does not exist"),
        (["submit", "sim", "missing.json"], "cannot read job file missing.json"),
        (["submit", "sim", "bad.json"], "bad.json: not valid JSON"),
        (["status", "sim", "../../etc/passwd"], "invalid job_id"),
        (["queue", "Bad-Name"], "invalid display_name"),
        (["verify", "sim", "6b0000000000000000000000"], "does not exist"),
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


def test_all_is_sorted_and_complete() -> None:
    """__all__ is sorted (constants, classes, functions) and lists exactly the public names."""
    import types

    def group(name: str) -> tuple[int, str]:
        return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)

    assert sqstore.__all__ == sorted(sqstore.__all__, key=group)
    public = {
        name
        for name, value in vars(sqstore).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and (
            (callable(value) and getattr(value, "__module__", None) == "sqstore")
            or name.isupper()
            or name == "Doc"
        )
    }
    public -= {"T", "TYPE_CHECKING", "ColdAtomType", "WireOrder", "annotations"}
    assert set(sqstore.__all__) == public


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
    """sqstore.py type-checks with mypy --strict."""
    proc = subprocess.run(
        [_tool("mypy"), "--strict", "sqstore.py"], cwd=HERE, capture_output=True, text=True
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
