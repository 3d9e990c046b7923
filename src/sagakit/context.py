"""Saga contexts and their JSON form.

A context is one of:

- a dataclass, usually a subclass of :class:`SagaContext`;
- a ``pydantic.BaseModel`` subclass;
- a plain ``dict`` whose keys are strings and whose values are JSON values (str, int, float,
  bool, None, lists and dicts of those).

Contexts are stored as JSON objects with field names exactly as written in the class (pydantic
aliases are not applied). Dataclass and pydantic contexts round-trip UUID, datetime, date, time,
Decimal, Enum, nested dataclasses/models, lists, tuples, sets and optionals, driven by the field
annotations. A value that cannot be written raises :class:`SagaSerializationError` naming the
field path (e.g. ``items[2].price``).

Decoding stored data never drops any (see :meth:`ContextCodec.decode`): a stored key that the
dataclass or model (or a nested one) does not have is an error naming the unknown keys and the
fields the data lacks, unless the type's ``upgrade_context`` hook maps it first. A field absent
from the data takes its default (that is how a field is added); a field without a default must
be there. Pydantic models that allow extras (``extra="allow"``) keep unknown keys as extras.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import math
import types
import typing
import uuid
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, Generic, Self, TypeVar, cast

import msgspec
import orjson

from sagakit.exceptions import SagaSerializationError

__all__ = ["ContextCodec", "SagaContext", "codec_for"]

C = TypeVar("C")

_JSON_SCALARS = (str, int, float, bool, type(None))


@dataclasses.dataclass
class SagaContext:
    """Base class for dataclass contexts. Subclasses must be decorated with ``@dataclass``."""

    def to_dict(self) -> dict[str, Any]:
        """This context as stored: a JSON-compatible dict."""
        return codec_for(type(self)).encode(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Rebuild a context from its stored dict (through :meth:`upgrade_context`). Raises
        SagaSerializationError when the data does not fit, naming unknown keys and missing
        fields."""
        return codec_for(cls).decode(data)

    @classmethod
    def upgrade_context(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Turn a stored context written by an earlier version of this class into the current
        form, before it is decoded (on recovery, on resume, in :meth:`from_dict`). ``data`` is
        a fresh copy: change it in place or return another dict. It also receives data already
        in the current form, which it must return unchanged. The default returns ``data``.
        Any dataclass or pydantic context may define this classmethod."""
        return data


def _is_pydantic_model(tp: Any) -> bool:
    return isinstance(tp, type) and hasattr(tp, "model_validate") and hasattr(tp, "model_dump")


class ContextCodec(Generic[C]):
    """Turns contexts of one type into stored dicts and back. Build with :func:`codec_for`."""

    __slots__ = ("_decode", "_encode", "_encode_json", "_upgrade", "context_type", "kind")

    def __init__(self, context_type: type[C]) -> None:
        context_type = typing.get_origin(context_type) or context_type  # dict[str, Any] -> dict
        self.context_type = context_type
        if context_type is dict or (isinstance(context_type, type) and issubclass(context_type, dict)):
            self.kind = "dict"
            self._encode: Callable[[Any], dict[str, Any]] = _encode_dict
            self._encode_json: Callable[[Any], bytes] = _encode_dict_json
            self._decode: Callable[[Mapping[str, Any]], Any] = dict
        elif _is_pydantic_model(context_type):
            self.kind = "pydantic"
            self._encode = _encode_pydantic
            self._encode_json = _encode_pydantic_json
            model = cast(Any, context_type)
            self._decode = lambda data: model.model_validate(data, by_alias=False, by_name=True)
        elif dataclasses.is_dataclass(context_type):
            self.kind = "dataclass"
            self._encode = _encode_dataclass
            self._encode_json = _encode_dataclass_json
            self._decode = lambda data: msgspec.convert(data, context_type, strict=False)
        else:
            raise SagaSerializationError(
                f"unsupported context type {context_type!r}: use a dataclass (SagaContext), "
                "a pydantic model or dict"
            )
        hook = getattr(context_type, "upgrade_context", None) if self.kind != "dict" else None
        self._upgrade: Callable[[dict[str, Any]], Any] | None = hook

    def encode(self, context: C) -> dict[str, Any]:
        """Context -> JSON-compatible dict. Raises SagaSerializationError naming the bad field."""
        if not isinstance(context, self.context_type):
            raise SagaSerializationError(
                f"expected a {self.context_type.__name__} context, got {type(context).__name__}"
            )
        return self._encode(context)

    def encode_json(self, context: C) -> bytes:
        """Context -> its stored JSON text (what :meth:`encode` returns, as JSON). Equal
        contexts give equal bytes, so comparing the bytes tells whether a context changed.
        Raises SagaSerializationError naming the bad field."""
        if not isinstance(context, self.context_type):
            raise SagaSerializationError(
                f"expected a {self.context_type.__name__} context, got {type(context).__name__}"
            )
        return self._encode_json(context)

    def decode(self, data: Mapping[str, Any]) -> C:
        """Stored dict -> context, through the type's ``upgrade_context`` hook if it has one.
        Raises SagaSerializationError when the data does not fit: a stored key that the type
        (or a nested dataclass or model) does not have — named, with the fields missing from
        the data — or a missing field without a default, or a value of the wrong type. Nothing
        stored is ever dropped or replaced by a default silently. Dict contexts take any keys.

        The context shares no mutable value with ``data`` (``Any``-typed fields and dict
        contexts would otherwise alias it, and the engine compares against ``data`` later)."""
        plain = _plain_copy(data)
        name = self.context_type.__name__
        if self._upgrade is not None:
            plain = self._upgraded(plain)
        if self.kind != "dict":
            problem = _key_mismatch(self.context_type, plain)
            if problem is not None:
                raise SagaSerializationError(f"stored context does not fit {name}: {problem}")
        try:
            return cast(C, self._decode(plain))
        except (msgspec.ValidationError, ValueError, TypeError) as exc:
            raise SagaSerializationError(f"stored context does not fit {name}: {exc}") from exc

    def _upgraded(self, data: dict[str, Any]) -> dict[str, Any]:
        assert self._upgrade is not None
        hook = f"{self.context_type.__name__}.upgrade_context"
        try:
            upgraded = self._upgrade(data)
        except Exception as exc:
            raise SagaSerializationError(
                f"{hook} failed on the stored context: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(upgraded, Mapping):
            raise SagaSerializationError(
                f"{hook} must return a dict, got {type(upgraded).__name__}"
            )
        return upgraded if isinstance(upgraded, dict) else dict(upgraded)

    def restore(self, context: C, stored: Mapping[str, Any]) -> None:
        """Put the stored form's values back into the live ``context`` object, in place
        (callers hold references to it): dataclass and pydantic fields are set one by one, a
        dict is cleared and refilled. Used to undo what a failed attempt left in the context
        before the next attempt (or a fallback) runs."""
        fresh: Any = self.decode(stored)
        live: Any = context
        if self.kind == "dict":
            live.clear()
            live.update(fresh)
        elif self.kind == "pydantic":
            for name in type(live).model_fields:
                object.__setattr__(live, name, getattr(fresh, name))
            object.__setattr__(live, "__pydantic_fields_set__", set(fresh.model_fields_set))
            if getattr(fresh, "__pydantic_extra__", None) is not None:
                object.__setattr__(live, "__pydantic_extra__", dict(fresh.__pydantic_extra__))
        else:
            params = getattr(type(live), "__dataclass_params__", None)
            assign = object.__setattr__ if params is not None and params.frozen else setattr
            for field in dataclasses.fields(live):
                assign(live, field.name, getattr(fresh, field.name))

    def copy(self, context: C) -> C:
        """An independent deep copy, made through the stored form."""
        return self.decode(self.encode(context))


_codecs: dict[type[Any], ContextCodec[Any]] = {}


def codec_for(context_type: type[C]) -> ContextCodec[C]:
    """The (cached) codec for a context type."""
    codec = _codecs.get(context_type)
    if codec is None:
        codec = _codecs[context_type] = ContextCodec(context_type)
    return codec


# --- stored keys against the type ----------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Shape:
    """The keys a dataclass or pydantic model accepts, and the annotations to look inside."""

    fields: tuple[str, ...]
    accepted: frozenset[str]
    required: frozenset[str]
    extra_allowed: bool
    hints: dict[str, Any]


_SHAPES: dict[Any, _Shape | None] = {}


def _shape(tp: Any) -> _Shape | None:
    """The shape of a dataclass or pydantic model type (cached), else None."""
    try:
        return _SHAPES[tp]
    except KeyError:
        pass
    except TypeError:  # an unhashable annotation: not a class
        return None
    shape = None
    if _is_pydantic_model(tp):
        fields = dict(tp.model_fields)
        shape = _Shape(
            fields=tuple(fields),
            accepted=frozenset(fields) | frozenset(getattr(tp, "model_computed_fields", ())),
            required=frozenset(n for n, f in fields.items() if f.is_required()),
            extra_allowed=tp.model_config.get("extra") == "allow",
            hints={n: f.annotation for n, f in fields.items()},
        )
    elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
        fields = {f.name: f for f in dataclasses.fields(tp)}
        try:
            hints = typing.get_type_hints(tp)
        except Exception:  # unresolvable annotations: check this level only
            hints = {}
        shape = _Shape(
            fields=tuple(fields),
            accepted=frozenset(fields),
            required=frozenset(
                n for n, f in fields.items()
                if f.init and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING
            ),
            extra_allowed=False,
            hints={n: hints[n] for n in fields if n in hints},
        )
    _SHAPES[tp] = shape
    return shape


def _key_mismatch(tp: Any, data: Any) -> str | None:
    """What keeps ``data`` from fitting ``tp`` key-wise, or None. Values of the wrong type are
    left to the decoder."""
    unknown: list[str] = []
    missing: list[str] = []
    _walk_keys(tp, data, "", unknown, missing)
    if unknown:
        return (f"stored keys {unknown} are not fields of it (fields missing from the data: "
                f"{missing}); rename them in an upgrade_context hook, or restore the fields")
    if missing:
        return f"fields {missing} have no default and are missing from the data"
    return None


def _walk_keys(tp: Any, value: Any, path: str, unknown: list[str], missing: list[str]) -> None:
    shape = _shape(tp)
    if shape is not None:
        if not isinstance(value, dict):
            return
        strange = [] if shape.extra_allowed else [k for k in value if k not in shape.accepted]
        unknown.extend(_join(path, k) for k in strange)
        missing.extend(_join(path, f) for f in shape.fields
                       if f not in value and (strange or f in shape.required))
        for name, hint in shape.hints.items():
            if name in value:
                _walk_keys(hint, value[name], _join(path, name), unknown, missing)
        return
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        _walk_keys(args[0], value, path, unknown, missing)
    elif origin is typing.Union or origin is types.UnionType:
        fitting = [a for a in args if _container_kind(a) is type(value)]
        if len(fitting) == 1:  # look inside only when the member is not in doubt
            _walk_keys(fitting[0], value, path, unknown, missing)
    elif _container_kind(tp) is dict and isinstance(value, dict) and len(args) == 2:
        for key, item in value.items():
            _walk_keys(args[1], item, f"{path}[{key!r}]", unknown, missing)
    elif _container_kind(tp) is list and isinstance(value, list) and args:
        variadic = origin is not tuple or (len(args) == 2 and args[1] is Ellipsis)
        for i, item in enumerate(value):
            if variadic or i < len(args):
                hint = args[0] if variadic else args[i]
                _walk_keys(hint, item, f"{path}[{i}]", unknown, missing)


def _container_kind(tp: Any) -> type | None:
    """dict for annotations stored as JSON objects (classes, mappings), list for sequences and
    sets, else None."""
    if _shape(tp) is not None:
        return dict
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _container_kind(typing.get_args(tp)[0])
    if not isinstance(origin, type):
        return None
    if issubclass(origin, Mapping):
        return dict
    if issubclass(origin, Sequence | AbstractSet) and not issubclass(origin, str | bytes):
        return list
    return None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# --- encoders -------------------------------------------------------------------------------


_JSON_ENCODER = msgspec.json.Encoder(enc_hook=lambda obj: _reject(obj))


def _encode_dataclass(context: Any) -> dict[str, Any]:
    # One C pass to JSON and one back: plain lists and string keys, no Python-level walk.
    return cast(dict[str, Any], orjson.loads(_encode_dataclass_json(context)))


def _encode_dataclass_json(context: Any) -> bytes:
    # msgspec writes NaN and infinities as null, so types that can hold floats are checked.
    try:
        data = _JSON_ENCODER.encode(context)
    except (TypeError, ValueError, OverflowError) as exc:
        raise _locate(context, exc) from exc
    if _may_hold_floats(type(context)):
        path = _first_non_finite(context, "")
        if path is not None:
            raise SagaSerializationError(
                f"context {type(context).__name__}: field {path!r} is not a finite number, "
                "which JSON cannot represent", field=path,
            )
    return data


_FLOATY: dict[Any, bool] = {}


def _may_hold_floats(tp: Any) -> bool:
    """Whether values of this annotation can contain a float (cached per type)."""
    known = _FLOATY.get(tp)
    if known is None:
        _FLOATY[tp] = False  # recursion guard for self-referencing types
        known = _FLOATY[tp] = _floaty(tp)
    return known


def _floaty(tp: Any) -> bool:
    if tp is float or tp is Any or tp is object:
        return True
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        try:
            hints = typing.get_type_hints(tp)
        except Exception:  # unresolvable annotations: be safe
            return True
        return any(_may_hold_floats(h) for h in hints.values())
    args = typing.get_args(tp)
    if args:
        return any(_may_hold_floats(a) for a in args if a is not Ellipsis)
    origin = typing.get_origin(tp) or tp
    return origin in (list, dict, tuple, set, frozenset)  # bare containers: unknown items


def _first_non_finite(value: Any, path: str) -> str | None:
    if isinstance(value, float):
        return None if math.isfinite(value) else (path or "<root>")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            found = _first_non_finite(getattr(value, f.name), f"{path}.{f.name}" if path else f.name)
            if found is not None:
                return found
    elif isinstance(value, dict):
        for key, item in value.items():
            found = _first_non_finite(item, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
    elif isinstance(value, list | tuple | set | frozenset):
        for i, item in enumerate(value):
            found = _first_non_finite(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def _encode_pydantic(context: Any) -> dict[str, Any]:
    try:
        data = context.model_dump(mode="json", by_alias=False)
    except Exception as exc:  # pydantic raises its own PydanticSerializationError
        raise _locate(context, exc) from exc
    return _finish(context, data)


def _encode_dict(context: Any) -> dict[str, Any]:
    _check_json(context, "")
    return cast(dict[str, Any], _plain_copy(context))


def _encode_dict_json(context: Any) -> bytes:
    _check_json(context, "")
    return orjson.dumps(context)


def _encode_pydantic_json(context: Any) -> bytes:
    return orjson.dumps(_encode_pydantic(context))


def _finish(context: Any, data: Any) -> dict[str, Any]:
    # msgspec leaves tuples, sets and non-string keys as they are; make everything plain JSON.
    data = _plain_copy(data)
    bad = _first_non_json(data, "")
    if bad is not None:
        path, why = bad
        raise SagaSerializationError(
            f"context {type(context).__name__}: field {path!r} {why}", field=path
        )
    return cast(dict[str, Any], data)


def _reject(obj: Any) -> Any:
    raise TypeError(f"objects of type {type(obj).__name__} cannot be stored as JSON")


def _plain_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain_copy(v) for v in value]
    return value


def _first_non_json(value: Any, path: str) -> tuple[str, str] | None:
    if isinstance(value, float) and not math.isfinite(value):
        return path or "<root>", f"is {value!r}, which JSON cannot represent"
    if isinstance(value, _JSON_SCALARS):
        return None
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = _first_non_json(item, f"{path}[{i}]")
            if found:
                return found
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{path}[{key!r}]", "has a non-string key"
            found = _first_non_json(item, f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    return path or "<root>", f"holds a {type(value).__name__}, which cannot be stored as JSON"


def _check_json(value: Any, path: str) -> None:
    if not isinstance(value, dict):
        raise SagaSerializationError(f"a dict context must be a dict, got {type(value).__name__}")
    bad = _first_non_json(value, path)
    if bad is not None:
        field, why = bad
        raise SagaSerializationError(f"dict context: key {field!r} {why}", field=field)


_KNOWN = (uuid.UUID, dt.datetime, dt.date, dt.time, dt.timedelta, decimal.Decimal, enum.Enum)


def _locate(context: Any, exc: BaseException) -> SagaSerializationError:
    """Find the field that made encoding fail (slow path, only on errors)."""
    path = _walk_for_bad(context, "")
    name = type(context).__name__
    if path is None:
        return SagaSerializationError(f"context {name} cannot be serialised: {exc}")
    return SagaSerializationError(
        f"context {name}: field {path!r} cannot be serialised: {exc}", field=path
    )


def _walk_for_bad(value: Any, path: str) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return path
    if isinstance(value, _JSON_SCALARS + _KNOWN):
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        items: Any = ((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
    elif _is_pydantic_model(type(value)):
        items = ((k, getattr(value, k)) for k in type(value).model_fields)
    elif isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, list | tuple | set | frozenset):
        for i, item in enumerate(value):
            found = _walk_for_bad(item, f"{path}[{i}]")
            if found is not None:
                return found
        return None
    else:
        return path or "<root>"
    for key, item in items:
        found = _walk_for_bad(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None

