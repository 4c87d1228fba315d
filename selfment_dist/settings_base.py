"""The machinery under every settings model (:mod:`selfment_dist.settings` declares the models):
the ``setting()`` field helper, the ``Settings`` base class, URI types, validation with one line
per problem (:class:`SettingsError`) and the stage functions' two call forms."""
from __future__ import annotations

import os
from typing import Any, ClassVar, Mapping, Sequence

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import PydanticUndefined
from typing_extensions import Annotated

from selfment_dist.errors import SelfmentUserError

__all__ = ["setting", "Settings", "SettingsError", "Uri", "UriList", "fspath", "flag_of",
           "validate", "build_settings"]


def setting(default: Any = PydanticUndefined, description: str = "", *, flag: str | None = None,
            negative_flag: str | None = None, metavar: str | None = None,
            cli: str | None = None, secret: bool = False, **constraints: Any) -> Any:
    """A field with its one-line description and command-line metadata.

    Args:
        default: the default; leave it out for a required option.
        description: one line: what the option does (``--help`` adds the default).
        flag: the command-line flag when it is not ``--`` + the name with ``-``.
        negative_flag: for a bool that defaults to True, the flag that sets it False.
        metavar: ``--help``'s name for the value.
        cli: ``"key=value"`` (repeatable KEY=VALUE, fsspec style), ``"benchmark"``
            (repeatable NAME=IMAGES,MASKS) or ``"json"`` (one JSON value).
        secret: never serialised (``model_dump`` leaves it out): manifests, summaries, logs.
        constraints: pydantic's (``ge``, ``gt``, ``le`` …).
    """
    extra = {k: v for k, v in (("flag", flag), ("negative_flag", negative_flag),
                               ("metavar", metavar), ("cli", cli)) if v is not None}
    return Field(default, description=description, exclude=secret or None,
                 json_schema_extra=extra or None, **constraints)


def fspath(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _uri_list(value: Any) -> Any:
    """One URI (the YAML shorthand ``input: s3://b/x``) or a sequence of them, as a list."""
    value = fspath(value)
    if isinstance(value, str):
        return [value]
    if isinstance(value, (tuple, list)):
        return [fspath(v) for v in value]
    return value


#: A local path or fsspec URL (``os.PathLike`` accepted from Python).
Uri = Annotated[str, BeforeValidator(fspath), Field(min_length=1)]
UriList = Annotated[list[Uri], BeforeValidator(_uri_list), Field(min_length=1)]


class Settings(BaseModel):
    """Base of every settings model: strict types, unknown names refused, checked on assignment.

    ``positional`` names the fields the keyword form of a stage function takes positionally
    (``run_pseudo_label(inputs, output, ...)``); ``section`` is the model's YAML section.
    """
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True,
                              validate_default=True)
    positional: ClassVar[tuple[str, ...]] = ()
    section: ClassVar[str] = ""

    def record(self) -> dict[str, Any]:
        """JSON-safe settings for manifests, summaries and logs: ``secret`` fields left out."""
        return self.model_dump(mode="json")


# ---------------------------------------------------------------------------------------------
# Building settings, and what a problem looks like

def flag_of(model: type[Settings], name: str) -> str:
    """The command-line flag of ``model``'s field ``name``."""
    extra = model.model_fields[name].json_schema_extra or {}
    return extra.get("flag") or "--" + name.replace("_", "-")


class SettingsError(SelfmentUserError, ValueError):
    """Settings that do not validate: one line per problem, each naming where it is."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def _problem(model: type[Settings], where: str, error: Mapping[str, Any]) -> str:
    loc = [str(p) for p in error["loc"]]
    name = ".".join([where, *loc]) if where else ".".join(loc) or model.__name__
    if error["type"] == "missing":
        field = loc[0] if loc else ""
        flag = f" ({flag_of(model, field)})" if field in model.model_fields else ""
        return f"{name}{flag} is required"
    if error["type"] == "extra_forbidden":
        return (f"{name}: unknown option; valid: "
                f"{', '.join(sorted(model.model_fields))}")
    message = error["msg"].removeprefix("Value error, ")
    if not loc:  # a check across fields
        return f"{where or model.__name__}: {message}"
    shown = repr(error["input"])  # a value from YAML may be large: the line stays short
    return f"{name}: {message} (got {shown if len(shown) <= 200 else shown[:197] + '...'})"


def validate(model: type[Settings], values: Mapping[str, Any], where: str = "") -> Settings:
    """``model`` built from ``values``, or :class:`SettingsError` (``where`` prefixes problems)."""
    try:
        return model.model_validate(dict(values))
    except ValidationError as exc:
        raise SettingsError([_problem(model, where, e) for e in exc.errors()]) from None


def build_settings(model: type[Settings], args: Sequence[Any], options: Mapping[str, Any]
                   ) -> Settings:
    """The settings a stage function was called with: ``f(settings)`` or ``f(*positional, **kw)``.

    Raises:
        TypeError: settings of another model, or too many positional arguments.
        SettingsError: values that do not validate.
    """
    if len(args) == 1 and isinstance(args[0], Settings):
        if not isinstance(args[0], model):
            raise TypeError(f"expected {model.__name__}, got {type(args[0]).__name__}")
        return args[0] if not options else validate(
            model, {**_given(args[0]), **options}, model.section)
    if len(args) > len(model.positional):
        raise TypeError(f"takes at most {len(model.positional)} positional arguments "
                        f"({', '.join(model.positional)}), got {len(args)}")
    values = dict(zip(model.positional, args))
    clash = sorted(set(values) & set(options))
    if clash:
        raise TypeError(f"got multiple values for {', '.join(clash)}")
    return validate(model, {**values, **options}, model.section)


def _given(settings: Settings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in settings.model_fields_set}
