"""The importer's files: the config merged in place, the env file of secrets, the backup.

The config is edited with tomlkit, so the operator's comments, order and layout survive; the merged
text is validated by `settings.parse_config`, the function behind `gateway check-config`, before
the config file is replaced (a temporary file in the same folder, then a rename: a reader sees the
old file or the new one, never half of one). Secrets go to files created with O_EXCL and mode 0600:
an existing file is never overwritten, and no other user can read them at any moment.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomlkit
import tomlkit.exceptions
from tomlkit.items import AoT, Array, Table

from gateway.errors import ConfigError, ImportRefused
from gateway.importers.mapping import Entry
from gateway.settings import parse_config


class ConfigFile:
    """The config as the operator wrote it: its text, its tomlkit document, its integrations."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.text = path.read_text(encoding="utf-8") if path.exists() else ""
            self.document = tomlkit.parse(self.text)
            raw = tomllib.loads(self.text)
        except (OSError, UnicodeDecodeError) as exc:
            raise ImportRefused(f"{path} cannot be read: {exc}") from None
        except (tomllib.TOMLDecodeError, tomlkit.exceptions.ParseError) as exc:
            raise ImportRefused(f"{path} is not valid TOML ({exc}); fix it first") from None
        items = raw.get("integrations", [])
        if not isinstance(items, list):
            raise ImportRefused(f"{path}: integrations is not a list of [[integrations]] tables")
        self.integrations: dict[str, dict[str, Any]] = {
            str(i.get("name")): i for i in items if isinstance(i, dict)
        }

    def merged(self, entries: list[Entry], env_file: Path | None) -> str:
        """The config with the new entries appended and the env file named in [gateway] env_files."""
        document = tomlkit.parse(self.text)  # a copy: this object stays the file as it is
        if env_file is not None:
            gateway = document.get("gateway")
            if gateway is None:
                gateway = tomlkit.table()
                document.add("gateway", gateway)
            if not isinstance(gateway, Table):
                raise ImportRefused(f"{self.path}: [gateway] is not a table")
            files = gateway.get("env_files")
            if files is None:
                files = tomlkit.array()
                gateway.add("env_files", files)
            if not isinstance(files, Array):
                raise ImportRefused(f"{self.path}: [gateway] env_files is not a list")
            reference = _relative(env_file, self.path.parent)
            if reference not in files:
                files.append(reference)
        new = [e for e in entries if not e.existing]
        if new:
            aot = document.get("integrations")
            if aot is None or (isinstance(aot, Array) and len(aot) == 0):
                if aot is not None:
                    del document["integrations"]
                aot = tomlkit.aot()
                document.add(tomlkit.nl())
                document.add("integrations", aot)
            if not isinstance(aot, AoT):
                raise ImportRefused(f"{self.path}: integrations is not a list of [[integrations]] tables")
            # tomlkit puts blank lines between the tables of an array that ends the file, but
            # not before a table that follows it: then each new table ends with one of its own.
            keys = [key for key, _ in document.body if key is not None]
            spaced = bool(keys) and keys[-1] != "integrations"
            for entry in new:
                aot.append(_table(entry, spaced))
        return tomlkit.dumps(document)


def _table(entry: Entry, spaced: bool) -> Table:
    """One [[integrations]] table, with where it came from (and a blank line after it)."""
    table = tomlkit.table()
    table.add(tomlkit.comment(f"from Gorgias integration {entry.source.label}"))
    last = table
    for key, value in entry.table().items():
        if isinstance(value, dict):
            last = tomlkit.table()
            for name, item in value.items():
                last.add(name, item)
            table.add(key, last)
        else:
            table.add(key, value)
    if spaced:
        last.add(tomlkit.nl())
    return table


def _relative(path: Path, folder: Path) -> str:
    """How the config names the env file: relative to the config's folder when inside it."""
    try:
        return str(path.resolve().relative_to(folder.resolve()))
    except ValueError:
        return str(path.resolve())


def env_text(values: Mapping[str, str]) -> str:
    """NAME='value' lines as python-dotenv reads them (in single quotes only \\ and ' are escaped,
    and nothing is interpolated)."""
    lines = ["# Written by `gateway import gorgias`: the credentials its [[integrations]] refer to."]
    for name, value in values.items():
        quoted = value.replace("\\", "\\\\").replace("'", "\\'")
        lines.append(f"{name}='{quoted}'")
    return "\n".join(lines) + "\n"


def create_private(path: Path, text: str) -> None:
    """Creates `path` readable by its owner alone; refuses a file that exists already."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ImportRefused(
            f"{path} exists already; it is never overwritten (move it or pick another)"
        ) from None
    except OSError as exc:
        raise ImportRefused(f"cannot create {path}: {exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise ImportRefused(f"cannot write {path}: {exc}") from None


def write_atomic(path: Path, text: str) -> None:
    """Replaces `path` at once (temp file + rename), keeping its mode."""
    folder = path.parent
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    except OSError as exc:
        raise ImportRefused(f"cannot write beside {path}: {exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise ImportRefused(f"cannot write {path}: {exc}") from None


def write_import(config: ConfigFile, text: str, env_file: Path | None, env_values: Mapping[str, str]) -> None:
    """Writes the env file, checks the merged config as `gateway check-config` would (with the
    env file in place, as the gateway will read it), then replaces the config. On any failure
    the env file is removed again: nothing is left half-written."""
    if not config.path.parent.is_dir():
        raise ImportRefused(f"{config.path.parent} is not a folder")
    if env_file is not None:
        create_private(env_file, env_text(env_values))
    try:
        try:
            parse_config(text, str(config.path), os.environ)
        except ConfigError as exc:
            raise ImportRefused(
                f"the merged config would not pass check-config ({exc}); nothing was written"
            ) from None
        write_atomic(config.path, text)
    except BaseException:
        if env_file is not None:
            env_file.unlink(missing_ok=True)
        raise
