"""Split GGUF models: a set of files named `<prefix>-00001-of-00003.gguf`, as llama.cpp's
gguf-split and the gguf package's writer make them.

llama.cpp loads a set from its first file. That file holds the metadata; every file holds
`split.no` (0-based), `split.count` and `split.tensors.count` (the set's total), and llama.cpp
finds the other files by name. The checks here are llama.cpp's own (its loader aborts on a
wrong `split.no` or tensor count) plus those that catch a file from another set before the
engine does: another count, another architecture, a tensor twice, a stray file beside the set.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFReader, GGUFValueType

SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS = "split.no", "split.count", "split.tensors.count"
_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


class SplitSetError(Exception):
    """A split set that llama.cpp could not load, or would load wrong; the message names the file."""


@dataclass(frozen=True)
class SplitName:
    """What a shard's file name says: `prefix` is the path before `-00001-of-00003.gguf`."""

    prefix: str
    no: int  # 1-based, as in the name
    count: int

    def path(self, no: int) -> Path:
        """The file `no` (1-based) of this set, named as llama.cpp's llama_split_path names it."""
        return Path(f"{self.prefix}-{no:05d}-of-{self.count:05d}.gguf")

    def paths(self) -> list[Path]:
        return [self.path(no) for no in range(1, self.count + 1)]

    @property
    def set_name(self) -> str:
        """The set's name without the shard numbers: Model-Q4_K_M.gguf."""
        return Path(self.prefix).name + ".gguf"


def split_name(path: str | Path) -> SplitName | None:
    """The shard numbers in a file name, or None for a name without them."""
    path = Path(path)
    match = _NAME.match(path.name)
    if match is None or int(match["count"]) < 1:
        return None
    return SplitName(str(path.parent / match["prefix"]), int(match["no"]), int(match["count"]))


def same_prefix(name: SplitName) -> list[Path]:
    """Every file beside the set that is named as a shard of this prefix, whatever its numbers."""
    folder, stem = Path(name.prefix).parent, Path(name.prefix).name
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"{_glob_escape(stem)}-*-of-*.gguf") if (n := split_name(p)) and n.prefix == name.prefix)


def _glob_escape(text: str) -> str:
    """`text` matched literally by Path.glob (a model name may hold [ or *)."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def _number(reader: GGUFReader, key: str) -> int | None:
    item = reader.fields.get(key)
    if item is None or not item.types or item.types[0] == GGUFValueType.ARRAY:
        return None
    return int(item.contents())


def _architecture(reader: GGUFReader) -> str | None:
    """general.architecture, which only the first file of a set has (llama.cpp's gguf-split and
    the gguf package write the metadata there), and a file of another model may."""
    item = reader.fields.get("general.architecture")
    return str(item.contents()) if item is not None else None


def _split_count(reader: GGUFReader) -> int:
    """How many files the model of this header is split into: 1 for a file alone."""
    return _number(reader, SPLIT_COUNT) or 1


def set_readers(path: Path, reader: GGUFReader, open_reader: Callable[[Path], GGUFReader]) -> list[tuple[Path, GGUFReader]]:
    """Every file of the set that `path` (read as `reader`) belongs to, in order, each checked;
    [(path, reader)] for a model in one file. `open_reader` opens another file of the set."""
    count = _split_count(reader)
    if count == 1:
        return [(path, reader)]
    name = split_name(path)
    if name is None:
        raise SplitSetError(
            f"{path} is file {(_number(reader, SPLIT_NO) or 0) + 1} of a model split into {count} files, but it is not "
            "named like one: llama.cpp finds the other files by the name <prefix>-00001-of-00003.gguf. Rename the "
            "files as they were published"
        )
    if name.count != count or name.no != (_number(reader, SPLIT_NO) or 0) + 1:
        raise SplitSetError(
            f"{path} says it is file {(_number(reader, SPLIT_NO) or 0) + 1} of {count}, but its name says {name.no} of "
            f"{name.count}: it was renamed, or comes from another split of a model. Download the set again"
        )
    expected = name.paths()
    for stray in same_prefix(name):
        if stray not in expected:
            raise SplitSetError(
                f"{stray} is named as a file of {Path(name.prefix).name} but does not belong to its set of {count} files "
                f"({name.path(1).name} .. {name.path(count).name}): move it away or delete it"
            )
    readers: list[tuple[Path, GGUFReader]] = []
    for no, shard in enumerate(expected, start=1):
        if not shard.exists():
            raise SplitSetError(
                f"{shard} is missing: it is file {no} of the {count} of {name.set_name}, which loads only with all of "
                "them. Download it again into the same folder"
            )
        readers.append((shard, reader if shard == path else open_reader(shard)))
    _check(readers, count)
    return readers


def _check(readers: list[tuple[Path, GGUFReader]], count: int) -> None:
    """Refuse a file that belongs to another set: llama.cpp would abort, or load a mix. The set's
    tensor count is the one most of its files give, so that a wrong first file is named too."""
    first_path, first = readers[0]
    totals = [_number(reader, SPLIT_TENSORS) for _, reader in readers]
    total = max(totals, key=lambda t: (totals.count(t), t == totals[0]))
    arch = _architecture(first)
    seen: dict[str, Path] = {}
    for no, (shard, reader) in enumerate(readers, start=1):
        fix = (
            f"{shard} is not file {no} of {first_path.name}'s set: it comes from another model or another split of it. "
            f"Download file {no} again"
        )
        said_no, said_count = _number(reader, SPLIT_NO), _number(reader, SPLIT_COUNT)
        if said_no is None or said_count is None:
            raise SplitSetError(f"{fix} (it has no split.no or split.count)")
        if (said_no + 1, said_count) != (no, count):
            raise SplitSetError(f"{fix} (it says it is file {said_no + 1} of {said_count})")
        if totals[no - 1] != total:
            raise SplitSetError(f"{fix} (its set has {totals[no - 1]} tensors, the others' {total})")
        if (other := _architecture(reader)) is not None and other != arch:
            raise SplitSetError(f"{fix} (its architecture is {other}, this model's {arch})")
        for tensor in reader.tensors:
            if tensor.name in seen:
                raise SplitSetError(f"{fix} (it holds {tensor.name} again, which {seen[tensor.name].name} holds)")
            seen[tensor.name] = shard
    if len(seen) != total:
        held = ", ".join(str(len(reader.tensors)) for _, reader in readers)
        raise SplitSetError(
            f"the {count} files of {first_path.name} hold {len(seen)} tensors ({held}), but the set says {total}: one of "
            "them is from another split of the model. Download the set again"
        )
