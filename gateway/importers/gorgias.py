"""`gateway import gorgias`: the steps, in the order that leaves nothing half-written.

1. Read every integration (a saved answer, or the account's API) and plan the entries; any
   refusal here (a malformed document, a clash, a bad --mode) writes nothing.
2. Write the env file (O_EXCL, 0600), check the merged config as check-config does, replace the
   config; a failed check removes the env file again.
3. Only with --apply: ask the gateway at GATEWAY_URL for each new name (an unauthenticated POST must
   be refused with 401, not 404: the gateway has loaded the config), save the originals to a backup
   file, then update the integrations one by one. A failure there names what was changed already,
   and the backup that puts it back (`--revert BACKUP`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from gateway.errors import ConfigError, ImportRefused
from gateway.importers import files, mapping
from gateway.importers.gorgias_api import GorgiasAPI, account_base
from gateway.settings import load_config

DEFAULT_ENV_FILE = "gorgias.env"


@dataclass
class Report:
    """What an import did: for the table and for --json."""

    gateway_url: str
    config: Path
    entries: list[mapping.Entry]
    skipped: list[mapping.Skipped]
    env_file: Path | None = None  # written by this run
    backup: Path | None = None
    applied: list[mapping.Entry] = field(default_factory=list)
    reactivated: bool = False

    def as_json(self) -> dict[str, Any]:
        applied = {e.name for e in self.applied}
        return {
            "config": str(self.config),
            "env_file": str(self.env_file) if self.env_file else None,
            "backup": str(self.backup) if self.backup else None,
            "integrations": [
                {
                    "gorgias_id": e.source.id,
                    "gorgias_name": e.source.name,
                    "name": e.name,
                    "mode": e.mode,
                    "target": e.target,
                    "old_url": e.source.url,
                    "new_url": e.new_url(self.gateway_url),
                    # the token's value is in the env file, never in the output
                    "helpdesk_headers": {mapping.TOKEN_HEADER: "${" + e.token_var + "}"},
                    "kept_headers": sorted(e.kept_headers),
                    "moved_headers": {h: "${" + v + "}" for h, v in e.header_vars.items()},
                    "deactivated": e.source.deactivated,
                    "already_imported": e.existing,
                    "applied": e.name in applied,
                    "reactivated": e.name in applied and self.reactivated and bool(e.source.deactivated),
                }
                for e in self.entries
            ],
            "skipped": [
                {"gorgias_id": s.source.id, "gorgias_name": s.source.name, "reason": s.reason}
                for s in self.skipped
            ],
        }

    def lines(self) -> list[str]:
        out: list[str] = []
        applied = {e.name for e in self.applied}
        env_hint = f" (in {self.env_file})" if self.env_file else ""
        for e in self.entries:
            source = e.source
            state = ", already in the config" if e.existing else ""
            out.append(f"{e.name}  {e.mode}  <- Gorgias {source.label}, {source.method}{state}")
            out.append(f"  old URL  {source.url}")
            out.append(f"  new URL  {e.new_url(self.gateway_url)}")
            out.append(f"  helpdesk header  {mapping.TOKEN_HEADER}: value of {e.token_var}{env_hint}")
            if e.kept_headers:
                out.append(f"  kept in the helpdesk (templated)  {', '.join(sorted(e.kept_headers))}")
            if e.header_vars:
                moved = ", ".join(f"{h} -> ${{{v}}}" for h, v in e.header_vars.items())
                out.append(f"  moved to the gateway  {moved}")
            if source.deactivated:
                if e.name in applied and self.reactivated:
                    out.append(f"  was deactivated since {source.deactivated}: reactivated")
                else:
                    out.append(
                        f"  deactivated in Gorgias since {source.deactivated}"
                        " (--apply --reactivate turns it on)"
                    )
            if e.name in applied:
                out.append("  updated in Gorgias")
        for s in self.skipped:
            out.append(f"skipped: Gorgias {s.source.label}: {s.reason}")
        new = [e for e in self.entries if not e.existing]
        if new:
            out.append(f"wrote {self.config}: {len(new)} integration(s) added")
        if self.env_file:
            out.append(f"wrote {self.env_file} (mode 0600): the tokens and moved headers")
        if self.backup:
            out.append(
                f"saved the originals to {self.backup}: `gateway import gorgias --revert {self.backup}`"
            )
        if not self.entries:
            out.append("nothing to import")
        elif not self.applied:
            out.append(
                "next: restart `gateway serve` and `gateway worker` so they load the config, then run "
                "the same command with --apply (or set each new URL and header in Gorgias by hand)"
            )
        return out


def read_document(path: Path) -> list[mapping.Source]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImportRefused(f"{path} cannot be read: {exc}") from None
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ImportRefused(f"{path} is not JSON ({exc})") from None
    return mapping.sources(document)


def run_import(
    *,
    document: Path | None,
    account: str | None,
    config_path: Path,
    env_file: Path | None,
    backup: Path | None,
    modes: tuple[str, ...],
    apply: bool,
    reactivate: bool,
    gateway_url: str,
) -> Report:
    if document is not None and account is not None:
        raise ImportRefused("give a saved Gorgias answer (FILE) or --account URL, not both")
    if document is None and account is None:
        raise ImportRefused("give a saved answer of GET /api/integrations?type=http (FILE) or --account URL")
    if reactivate and not apply:
        raise ImportRefused("--reactivate goes with --apply (without it nothing is sent to Gorgias)")
    if apply and account is None:
        raise ImportRefused("--apply needs --account (the helpdesk whose integrations it updates)")
    parts = urlsplit(gateway_url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ImportRefused(
            f"GATEWAY_URL {gateway_url!r} is not a base URL such as https://gw.example.com: "
            "set it to where the helpdesk reaches the gateway"
        )
    wanted = mapping.parse_modes(modes)
    config = files.ConfigFile(config_path)
    api = GorgiasAPI.from_env(account) if account is not None else None
    try:
        items = read_document(document) if document is not None else _listed(api)
        entries, skipped = mapping.plan(items, config.integrations, wanted, gateway_url)
        report = Report(gateway_url, config_path, entries, skipped)
        new = [e for e in entries if not e.existing]
        if new:
            env_path = env_file or config_path.parent / DEFAULT_ENV_FILE
            values: dict[str, str] = {}
            for entry in new:
                values.update(entry.env(mapping.new_token()))
            files.write_import(config, config.merged(entries, env_path), env_path, values)
            report.env_file = env_path
        if apply and api is not None and entries:
            try:
                _apply(api, report, backup or _backup_path(config_path), reactivate)
            except ImportRefused as exc:
                if report.env_file is None:
                    raise
                raise ImportRefused(
                    f"{exc} (this run wrote {config_path} and {report.env_file}: once the gateway "
                    "has loaded them, run the same command again)"
                ) from None
        return report
    finally:
        if api is not None:
            api.close()


def _listed(api: GorgiasAPI | None) -> list[mapping.Source]:
    assert api is not None
    return mapping.sources(api.integrations())


def _backup_path(config_path: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return config_path.parent / f"gorgias-backup-{stamp}.json"


def _tokens(report: Report) -> dict[str, str]:
    """Each entry's inbound token, as the gateway reads it from the config and its env files."""
    try:
        config = load_config(report.config)
    except ConfigError as exc:
        raise ImportRefused(f"the config does not load ({exc}); nothing was sent to Gorgias") from None
    tokens: dict[str, str] = {}
    for entry in report.entries:
        integration = config.integration(entry.name)
        if integration is None or integration.inbound_token is None:
            raise ImportRefused(f"{report.config} has no inbound_token for {entry.name!r}")
        tokens[entry.name] = integration.inbound_token.get_secret_value()
    return tokens


def check_gateway(gateway_url: str, names: list[str]) -> None:
    """Refuses unless the gateway at `gateway_url` serves every name: a POST without the token
    must answer 401 (a 404 means it has not loaded the config), so Gorgias is never pointed at a
    URL that fails."""
    base = gateway_url.rstrip("/")
    with httpx.Client(timeout=10) as client:
        for name in names:
            url = f"{base}/hooks/{name}"
            try:
                status = client.post(url, content=b"").status_code
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                raise ImportRefused(
                    f"cannot reach the gateway at {base} ({type(exc).__name__}); nothing was sent to "
                    "Gorgias: start it, or set GATEWAY_URL to where the helpdesk reaches it"
                ) from None
            if status != 401:
                hint = " (it has not loaded the new config: restart it)" if status == 404 else ""
                raise ImportRefused(
                    f"the gateway at {base} answered {status} to an unauthenticated POST {url}, not 401"
                    f"{hint}; nothing was sent to Gorgias"
                )


def _apply(api: GorgiasAPI, report: Report, backup: Path, reactivate: bool) -> None:
    tokens = _tokens(report)
    check_gateway(report.gateway_url, [e.name for e in report.entries])
    saved = {"account": api.base, "integrations": [e.source.raw for e in report.entries]}
    files.create_private(backup, orjson.dumps(saved, option=orjson.OPT_INDENT_2).decode() + "\n")
    report.backup = backup
    report.reactivated = reactivate
    for entry in report.entries:
        body = entry.helpdesk_update(report.gateway_url, tokens[entry.name], reactivate)
        try:
            api.update(entry.source.id, body)
        except ImportRefused as exc:
            changed = ", ".join(e.name for e in report.applied) or "none"
            raise ImportRefused(
                f"updating Gorgias integration {entry.source.label} failed: {exc}. Changed before it: "
                f"{changed}; `gateway import gorgias --revert {backup}` puts them back"
            ) from None
        report.applied.append(entry)


def run_revert(backup: Path, account: str | None) -> tuple[str, list[str]]:
    """Puts every integration saved in `backup` back as it was: (account, labels put back)."""
    try:
        saved = orjson.loads(backup.read_bytes())
    except OSError as exc:
        raise ImportRefused(f"{backup} cannot be read: {exc}") from None
    except orjson.JSONDecodeError as exc:
        raise ImportRefused(f"{backup} is not JSON ({exc})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("integrations"), list):
        raise ImportRefused(f"{backup} is not a backup written by `gateway import gorgias --apply`")
    base = account or saved.get("account")
    if not isinstance(base, str):
        raise ImportRefused(f"{backup} names no account; pass --account")
    originals = mapping.sources(saved["integrations"])
    done: list[str] = []
    with GorgiasAPI.from_env(base) as api:
        for source in originals:
            body = {"http": source.raw["http"]}
            if "deactivated_datetime" in source.raw:  # --reactivate cleared it: it comes back too
                body["deactivated_datetime"] = source.raw["deactivated_datetime"]
            try:
                api.update(source.id, body)
            except ImportRefused as exc:
                raise ImportRefused(
                    f"putting back Gorgias integration {source.label} failed: {exc}. Put back before it: "
                    f"{', '.join(done) or 'none'}; run the revert again once the cause is fixed"
                ) from None
            done.append(source.label)
    return account_base(base), done


def loopback(url: str) -> bool:
    """A GATEWAY_URL that the helpdesk, on the internet, cannot reach."""
    host = urlsplit(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")
