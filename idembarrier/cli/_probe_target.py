"""What the probe was told about its target, and the requests it makes of it.

`Target` is the checked, frozen description (one URL, one method, one body, the credentials, the optional
count endpoint and failure switch); `Probe` sends requests built from it through the budgeted `Sender`.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import anyio
import httpx

from ._probe_http import Answer, Headers, Sender

__all__ = ["First", "Probe", "ProbeUsageError", "Target", "other_body"]

Header = tuple[str, str]


class ProbeUsageError(Exception):
    """Raised when the probe's options do not describe a target it can probe."""


@dataclass(frozen=True, kw_only=True)
class Target:
    """The API under probe."""

    url: httpx.URL
    method: str = "POST"
    body: bytes
    other_body: bytes | None = None
    headers: tuple[Header, ...] = ()
    credential: Header | None = None
    other_credential: Header | None = None
    key_header: str = "Idempotency-Key"
    key_style: str = "quoted"
    key_required: bool = True
    id_field: str | None = None
    count_url: httpx.URL | None = None
    fail_header: Header | None = None
    replay_header: str | None = None
    concurrency: int = 5

    def __post_init__(self) -> None:
        if self.url.scheme not in ("http", "https") or not self.url.host:
            raise ProbeUsageError(f"the target must be an http:// or https:// URL, not {str(self.url)!r}")
        if self.count_url is not None and _origin(self.count_url) != _origin(self.url):
            raise ProbeUsageError(f"--count-url must be on the target's origin {_origin(self.url)}")
        if self.other_credential is not None and self.credential is None:
            raise ProbeUsageError("--other-credential needs --credential: the principal it is compared with")
        if not 2 <= self.concurrency <= 50:
            raise ProbeUsageError(f"--concurrency must be 2-50, not {self.concurrency}")


def _origin(url: httpx.URL) -> str:
    return f"{url.scheme}://{url.netloc.decode('ascii')}"


def other_body(body: bytes) -> bytes | None:
    """A body that differs from ``body`` in one value: its first number plus one, or its first string changed."""
    try:
        document = json.loads(body)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    for name, value in document.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            return json.dumps({**document, name: value + 1}).encode()
    for name, value in document.items():
        if isinstance(value, str):
            return json.dumps({**document, name: f"{value}-other"}).encode()
    return None


@dataclass(frozen=True)
class First:
    """The probe's first request, which every later clause may compare with."""

    key: bytes
    answer: Answer


class Probe:
    """Builds and sends the probe's requests to one target."""

    def __init__(self, target: Target, sender: Sender) -> None:
        self.target = target
        self.sender = sender
        self.first: First

    def new_key(self) -> bytes:
        """A fresh key, as an sf-string (the draft's syntax) or bare."""
        key = str(uuid.uuid4())
        return (f'"{key}"' if self.target.key_style == "quoted" else key).encode()

    def _headers(self, key: bytes | None, *, other_principal: bool = False, failing: bool = False) -> Headers:
        headers: Headers = [("content-type", "application/json"), *self.target.headers]
        credential = self.target.other_credential if other_principal else self.target.credential
        if credential is not None:
            headers.append(credential)
        if failing and self.target.fail_header is not None:
            headers.append(self.target.fail_header)
        if key is not None:
            headers.append((self.target.key_header, key))
        return headers

    async def start(self) -> First:
        """Send the first request; refuse to go on unless the target accepts it."""
        key = self.new_key()
        answer = await self.send(key)
        if not 200 <= answer.status < 300:
            raise ProbeUsageError(f"the target answered {answer.short()}: give --data and headers it accepts")
        self.first = First(key, answer)
        return self.first

    async def send(
        self, key: bytes | None, *, body: bytes | None = None, other_principal: bool = False, failing: bool = False
    ) -> Answer:
        """Send the target's request with ``key`` (``None``: no key header)."""
        headers = self._headers(key, other_principal=other_principal, failing=failing)
        content = self.target.body if body is None else body
        return await self.sender.send(self.target.method, str(self.target.url), headers=headers, body=content)

    async def send_retrying(self, key: bytes) -> Answer:
        """Send the request with ``key``; after a 409 (still in flight), wait and send it once more."""
        answer = await self.send(key)
        if answer.status == 409 and self.sender.affords(1):
            await anyio.sleep(1)
            answer = await self.send(key)
        return answer

    async def send_lost(self, key: bytes, port: int) -> Answer | None:
        """Send the request with ``key`` through the losing proxy on ``port``."""
        url = self.target.url.copy_with(scheme="http", host="127.0.0.1", port=port)
        headers = self._headers(key)
        return await self.sender.send_lost(self.target.method, str(url), headers=headers, body=self.target.body)

    async def burst(self, key: bytes, count: int) -> list[Answer]:
        """Send ``count`` copies of the request with ``key`` at once."""
        url, headers = str(self.target.url), self._headers(key)
        return await self.sender.burst(count, self.target.method, url, headers=headers, body=self.target.body)

    def resource_id(self, answer: Answer) -> object:
        """The id of what ``answer`` created: ``--id-field``, else ``id`` or a ``…_id`` field, else ``Location``."""
        document = answer.document()
        if self.target.id_field is not None:
            for part in self.target.id_field.split("."):
                document = document.get(part) if isinstance(document, dict) else None
            return document
        if isinstance(document, dict):
            for name, value in document.items():
                if (name == "id" or name.endswith("_id")) and isinstance(value, str | int):
                    return value
        return answer.headers.get("location")

    async def count(self) -> int | None:
        """The count endpoint's number (a JSON number, a list's length, or a ``count`` field), if one was named."""
        if self.target.count_url is None:
            return None
        headers: Headers = [*self.target.headers, *([self.target.credential] if self.target.credential else [])]
        answer = await self.sender.send("GET", str(self.target.count_url), headers=headers)
        document = answer.document()
        if isinstance(document, dict):
            document = document.get("count", document.get("total"))
        if isinstance(document, list):
            return len(document)
        if isinstance(document, int) and not isinstance(document, bool):
            return document
        raise ProbeUsageError(f"--count-url answered {answer.short()}: no number, list or 'count' field")

    async def count_since(self, before: int) -> int | None:
        """How many effects the count endpoint shows since ``before``."""
        after = await self.count()
        return None if after is None else after - before
