"""JSON schemas to llama.cpp grammars (GBNF), in the daemon, before a request is queued.

This is the one module of daemon/llama/ that the daemon imports (tests/test_import_hygiene.py
allows it by name): it never imports llama_cpp. llama-cpp-python's converter
(`llama_cpp/llama_grammar.py`, a translation of llama.cpp's json_schema_to_grammar.py) is pure
Python, but `import llama_cpp.llama_grammar` would run the package's __init__, which loads the
native library. So its source file is loaded on its own, as a private module: the daemon gets the
exact converter the engine's llama-cpp-python ships, and no native code.

The converter silently ignores what it cannot express (`minimum`, most `format`s, `not`, ...),
which would let a reply through that the schema refuses. `check_schema` refuses those parts first,
naming where they are, so a grammar built here only admits text that validates.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from functools import cache
from types import ModuleType
from typing import Any

# A control character must be escaped inside a JSON string; the converter's `char` allows them raw.
JSON_CHAR = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'
# What the converter expands into rules of this many items: beyond, the grammar gets too big to build.
MAX_REPEAT = 4096
MAX_DEPTH = 32
# Keywords that only describe: they constrain nothing, so the converter may ignore them.
ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly", "writeOnly"}
)
CONTAINERS = frozenset({"$defs", "definitions"})
# What each kind of schema may carry besides annotations; everything else is refused by name.
BY_TYPE: dict[str, frozenset[str]] = {
    "object": frozenset({"properties", "required", "additionalProperties"}),
    "array": frozenset({"items", "minItems", "maxItems"}),
    "string": frozenset({"minLength", "maxLength", "format"}),
    "integer": frozenset(),
    "number": frozenset(),
    "boolean": frozenset(),
    "null": frozenset(),
}
KNOWN = frozenset({"type", "$ref", "anyOf", "enum", "const"}).union(*BY_TYPE.values())
FORMATS = ("date", "time", "date-time", "uuid")
WHY = {
    "oneOf": "use anyOf (the grammar cannot make sure only one alternative matches)",
    "allOf": "merge the parts into one schema",
    "pattern": "use enum or maxLength (the converter's regular expressions can break JSON strings)",
    "minimum": "the grammar cannot bound numbers; check the value after parsing",
    "maximum": "the grammar cannot bound numbers; check the value after parsing",
}
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"


class SchemaError(ValueError):
    """A schema the grammar cannot enforce; the message names the part and what to do."""


class GrammarDeadEnd(RuntimeError):
    """While sampling: no token of the model's vocabulary can continue what the grammar allows."""


@cache
def converter_module() -> ModuleType:
    """llama-cpp-python's llama_grammar.py, loaded from its file without the llama_cpp package."""
    found = importlib.util.find_spec("llama_cpp")  # finds the folder; imports nothing
    if found is None or not found.submodule_search_locations:
        raise SchemaError("llama-cpp-python is not installed, so no grammar can be built")
    path = f"{next(iter(found.submodule_search_locations))}/llama_grammar.py"
    spec = importlib.util.spec_from_file_location("vramchat_llama_grammar", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.PRIMITIVE_RULES["char"] = module.BuiltinRule(JSON_CHAR, [])
    # Its literals escape quotes and newlines but not backslashes, so a name or an enum value with
    # a \ or a " (JSON-escaped: \\ or \") would end its GBNF literal early, or mean another text.
    vars(module).update(
        GRAMMAR_LITERAL_ESCAPE_RE=re.compile(r'[\r\n"\\]'),
        GRAMMAR_LITERAL_ESCAPES={"\r": "\\r", "\n": "\\n", '"': '\\"', "\\": "\\\\"},
    )
    sys.modules.pop("vramchat_llama_grammar", None)
    return module


def check_schema(schema: Any, *, strict: bool, where: str = "schema") -> None:
    """Refuse (SchemaError) what the grammar would not enforce; with `strict`, also what OpenAI's
    strict mode refuses: an object whose properties are not all required, or that allows others."""
    Checker(schema, strict, where).visit(schema, where, 0)


class Checker:
    """Walks a schema, naming the path of each part as a JSON-path-like `where`."""

    def __init__(self, root: Any, strict: bool, root_where: str) -> None:
        self.root, self.strict, self.root_where = root, strict, root_where
        self.followed: set[str] = set()  # the $refs whose targets were checked

    def visit(self, schema: Any, where: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise SchemaError(f"{where}: the schema nests deeper than {MAX_DEPTH} levels")
        if not isinstance(schema, dict):
            raise SchemaError(f"{where}: a schema must be a JSON object, not {json.dumps(schema)[:40]}")
        keys = set(schema) - ANNOTATIONS - CONTAINERS
        for container in CONTAINERS & set(schema):
            definitions = schema[container]
            if not isinstance(definitions, dict):
                raise SchemaError(f"{where}.{container} must be an object of schemas")
            for name, definition in definitions.items():
                self.visit(definition, f"{where}.{container}.{name}", depth + 1)
        if unknown := sorted(keys - KNOWN):
            raise SchemaError(f"{where}.{unknown[0]} is not supported: {WHY.get(unknown[0], 'the grammar cannot enforce it')}")
        for alone in ("$ref", "anyOf", "enum", "const"):
            if alone in keys:
                self._only(schema, keys, {alone, "type"} if alone in ("enum", "const") else {alone}, where)
                return self._visit_alone(schema, alone, where, depth)
        kind = schema.get("type")
        if kind is None:
            kind = "object" if "properties" in schema else None
            if kind is None:
                if keys:
                    raise SchemaError(f"{where}: give a type with {', '.join(sorted(keys))}")
                return None  # {}: any JSON value
        if isinstance(kind, list):
            if not kind or not all(isinstance(k, str) and k in BY_TYPE for k in kind):
                raise SchemaError(f"{where}.type: a list of types needs names of {', '.join(BY_TYPE)}")
            return self._only(schema, keys, {"type"}, where)
        if not isinstance(kind, str) or kind not in BY_TYPE:
            raise SchemaError(f"{where}.type: {json.dumps(kind)[:40]} is not one of {', '.join(BY_TYPE)}")
        self._only(schema, keys, {"type"} | BY_TYPE[kind], where)
        getattr(self, f"_{kind}", lambda *_: None)(schema, where, depth)
        return None

    def _only(self, schema: dict[str, Any], keys: set[str], allowed: set[str], where: str) -> None:
        extra = sorted(keys - allowed)
        if extra:
            name = extra[0]
            why = WHY.get(name, f"the grammar cannot enforce it beside {'/'.join(sorted(allowed))}")
            raise SchemaError(f"{where}.{name} is not supported: {why}")

    def _visit_alone(self, schema: dict[str, Any], keyword: str, where: str, depth: int) -> None:
        value = schema[keyword]
        if keyword == "$ref":
            if not isinstance(value, str) or not value.startswith("#/"):
                raise SchemaError(f"{where}.$ref: only references inside the schema (#/$defs/...) are supported")
            target: Any = self.root
            for part in value[2:].split("/"):
                if not isinstance(target, dict) or part not in target:
                    raise SchemaError(f"{where}.$ref: {value} points to nothing")
                target = target[part]
            if value not in self.followed:
                self.followed.add(value)
                self.visit(target, self.root_where + value[1:].replace("/", "."), depth + 1)
        elif keyword == "anyOf":
            if not isinstance(value, list) or not value:
                raise SchemaError(f"{where}.anyOf must be a non-empty list of schemas")
            for index, option in enumerate(value):
                self.visit(option, f"{where}.anyOf[{index}]", depth + 1)
        elif keyword == "enum" and (not isinstance(value, list) or not value):
            raise SchemaError(f"{where}.enum must be a non-empty list")

    def _object(self, schema: dict[str, Any], where: str, depth: int) -> None:
        properties = schema.get("properties", {})
        required = schema.get("required", [])
        if not isinstance(properties, dict) or not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise SchemaError(f"{where}: properties must be an object and required a list of names")
        missing = [name for name in required if name not in properties]
        if missing:
            raise SchemaError(f"{where}.required names {missing[0]!r}, which is not in its properties")
        additional = schema.get("additionalProperties")
        if self.strict and (additional is not False or set(required) != set(properties)):
            raise SchemaError(
                f"{where}: with strict, an object needs additionalProperties: false and every property in required "
                "(as in OpenAI's strict mode); send strict: false to let properties be optional"
            )
        for name, child in properties.items():
            self.visit(child, f"{where}.properties.{name}", depth + 1)
        if isinstance(additional, dict):
            self.visit(additional, f"{where}.additionalProperties", depth + 1)
        elif additional is not None and not isinstance(additional, bool):
            raise SchemaError(f"{where}.additionalProperties must be a boolean or a schema")

    def _array(self, schema: dict[str, Any], where: str, depth: int) -> None:
        self._bounds(schema, ("minItems", "maxItems"), where)
        items = schema.get("items", {})
        self.visit(items, f"{where}.items", depth + 1)

    def _string(self, schema: dict[str, Any], where: str, depth: int) -> None:
        self._bounds(schema, ("minLength", "maxLength"), where)
        if "format" in schema and schema["format"] not in FORMATS:
            raise SchemaError(f"{where}.format {json.dumps(schema['format'])[:40]} is not supported: only {', '.join(FORMATS)}")
        if "format" in schema and ("minLength" in schema or "maxLength" in schema):
            raise SchemaError(f"{where}: format and minLength/maxLength together are not supported")

    def _bounds(self, schema: dict[str, Any], names: tuple[str, str], where: str) -> None:
        low, high = (schema.get(name) for name in names)
        for name, value in zip(names, (low, high), strict=True):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_REPEAT):
                raise SchemaError(f"{where}.{name} must be a whole number from 0 to {MAX_REPEAT}")
        if low is not None and high is not None and low > high:
            raise SchemaError(f"{where}: {names[0]} is above {names[1]}")


def _convert(schema: Any, name: str, where: str) -> tuple[Any, str]:
    """The converter after visiting `schema` as rule `name` (its refs resolved)."""
    module = converter_module()
    converter = module.SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    try:
        resolved = converter.resolve_refs(json.loads(json.dumps(schema)), "input")
        rule = converter.visit(resolved, name)
    except Exception as exc:  # the converter's own code: whatever it fails on, it cannot express
        raise SchemaError(f"{where}: the grammar converter cannot express this schema ({exc})") from None
    return converter, rule


def schema_grammar(schema: Any, *, strict: bool, where: str = "schema") -> str:
    """The GBNF of replies that validate against `schema` (checked first: SchemaError naming
    the part, from `where`)."""
    check_schema(schema, strict=strict, where=where)
    converter, _ = _convert(schema, "", where)
    return str(converter.format_grammar())


def json_object_grammar() -> str:
    """Any JSON object (OpenAI's `json_object`)."""
    return schema_grammar({"type": "object"}, strict=False)


def tool_call_grammar(functions: list[tuple[str, dict[str, Any]]], *, opened: bool = False) -> str:
    """One call of one of `functions` (name, parameters schema), in the Hermes form that Qwen,
    SmolLM and Hermes models are trained on: <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>.
    With `opened`, the model has written <tool_call> already (tool_choice auto)."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name, parameters in functions
    ]
    converter, rule = _convert(options[0] if len(options) == 1 else {"anyOf": options}, "call", "tools")
    opening = "" if opened else json.dumps(TOOL_OPEN) + " "
    converter._rules["root"] = f'{opening}"\\n" {rule} "\\n" {json.dumps(TOOL_CLOSE)}'
    return str(converter.format_grammar())
