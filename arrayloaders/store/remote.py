"""Stores in object storage (``s3://``, ``gs://``, ``az://``, ``https://``): where one is, and how it is reached.

Everything remote goes through obstore (Rust's ``object_store``): the main
process opens a store's files through zarr's ``ObjectStore`` on it, and the
workers fetch byte ranges with it (:mod:`~arrayloaders.store.range_fetcher`).

**Credentials never travel with a store's description.** A :class:`RemoteRoot`
holds its URL and, in this process's registry only, the ``storage_options``
it was given. Pickled (a dataset saved, a layout sent), it carries the URL, the
options that are no secret (:data:`PUBLIC_OPTIONS`) and a random token; a
worker gets the options of its tokens through its config pipe
(:func:`secrets_of`, :func:`register_secrets`), never on its command line or
in its environment. In any other process an unpickled root has only the
public options: credentials then come from the environment, as obstore reads
them. Its ``repr`` and every message name the URL only.
"""

from __future__ import annotations

import re
import secrets
import threading
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from ..errors import StoreError

__all__ = [
    "PUBLIC_OPTIONS", "RemoteRoot", "is_url", "missing_bucket", "register_secrets", "remote_error", "secrets_of",
    "storage_url",
]  # fmt: skip

#: URL schemes read through obstore.
SCHEMES = ("s3", "s3a", "gs", "az", "adl", "azure", "abfs", "abfss", "http", "https", "memory")

#: ``storage_options`` keys that hold no secret: kept when a root is pickled.
PUBLIC_OPTIONS = frozenset({
    "endpoint", "endpoint_url", "region", "skip_signature", "client_options", "retry_config",
    "virtual_hosted_style_request", "bucket", "account_name", "container_name", "use_emulator",
})  # fmt: skip

#: Retries unless ``storage_options`` says otherwise: a transient fault (5xx, a reset, a timeout) is retried
#: with backoff for at most ``retry_timeout``, so a server gone for good is reported within about that time
#: (obstore's own default retries for 3 minutes).
DEFAULT_RETRY = {"max_retries": 4, "retry_timeout": timedelta(seconds=20),
                 "backoff": {"init_backoff": timedelta(seconds=0.1), "max_backoff": timedelta(seconds=4), "base": 2.0}}  # fmt: skip
DEFAULT_CLIENT = {"connect_timeout": "5s", "timeout": "60s"}

_registry: dict[str, dict[str, Any]] = {}  # token -> the storage_options given in this process
_registry_lock = threading.Lock()


def is_url(path: object) -> bool:
    """Whether ``path`` is a URL obstore reads (``s3://bucket/prefix``, ...), not a local path."""
    if not isinstance(path, str):
        return False
    scheme = urlsplit(path).scheme.lower()
    return scheme in SCHEMES and "://" in path


def storage_url(url: str) -> str:
    """``url`` as messages show it: no user, password or query (where a signed URL keeps its signature)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}".rstrip("/")


class RemoteRoot:
    """A store's location in object storage: its URL, and the options to reach it (kept out of sight).

    Parameters
    ----------
    url
        ``s3://bucket/prefix`` and the like.
    storage_options
        Keyword arguments of ``obstore.store.from_url`` (``endpoint``,
        ``region``, credentials, ``skip_signature``, ``client_options``,
        ``retry_config``...). Retries and timeouts not given are bounded
        (:data:`DEFAULT_RETRY`, :data:`DEFAULT_CLIENT`).
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, _token: str | None = None,
                 cache: tuple[str, int] | None = None):  # fmt: skip
        if not is_url(url):
            raise ValueError(f"{url!r} is not a URL of object storage ({', '.join(s + '://' for s in SCHEMES)})")
        self._full_url = url.rstrip("/")
        self.url = storage_url(url)
        options = dict(storage_options or {})
        self.public = {k: v for k, v in options.items() if k in PUBLIC_OPTIONS}
        self.token = _token or secrets.token_hex(16)
        if _token is None:
            with _registry_lock:
                _registry[self.token] = options
        self._store = None
        self._lock = threading.Lock()
        self.cache_spec = cache  # (directory, bytes) of a local cache of fetched bytes, or None
        self._cache = None
        self.metadata: dict[str, Any] = {}  # zarr metadata documents read in this process (RemoteZarrStore)

    def __repr__(self) -> str:
        return f"RemoteRoot({self.url!r})"

    def __str__(self) -> str:
        return self.url

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemoteRoot) and (self.url, self.token) == (other.url, other.token)

    def __hash__(self) -> int:
        return hash((self.url, self.token))

    def __reduce__(self):
        # No secret in a pickle: the token finds them in a process that was given them (a worker, by its pipe).
        return (_unpickle_root, (self._safe_url(), self.public, self.token, self.cache_spec))

    def _safe_url(self) -> str:
        # a signed https URL's query is a credential: kept only in this process
        return self.url if urlsplit(self._full_url).query or "@" in self._full_url else self._full_url

    def options(self) -> dict[str, Any]:
        """The options this process knows for this root: those given, else the public ones."""
        with _registry_lock:
            known = _registry.get(self.token)
        return dict(known) if known is not None else dict(self.public)

    def store(self):
        """This root's ``obstore`` store (made once per process; thread-safe)."""
        with self._lock:
            if self._store is None:
                self._store = _from_url(self._full_url, self.options())
            return self._store

    def cache(self):
        """This process's :class:`~arrayloaders.store.remote_cache.RemoteCache` of the root, or None without one."""
        if self.cache_spec is None:
            return None
        with self._lock:
            if self._cache is None:
                from .remote_cache import RemoteCache

                self._cache = RemoteCache(self.cache_spec[0], self.cache_spec[1], self.url)
            return self._cache

    def child(self, key: str) -> str:
        """The URL of ``key`` under this root, for messages."""
        return f"{self.url}/{key.lstrip('/')}"


def _unpickle_root(url: str, public: dict[str, Any], token: str, cache: tuple[str, int] | None = None) -> RemoteRoot:
    root = RemoteRoot.__new__(RemoteRoot)
    root._full_url, root.url, root.public, root.token = url, storage_url(url), dict(public), token
    root._store, root._lock, root.cache_spec, root._cache = None, threading.Lock(), cache, None
    root.metadata = {}
    return root


def _from_url(url: str, options: dict[str, Any]):
    from obstore.store import from_url

    options = dict(options)
    options.setdefault("retry_config", DEFAULT_RETRY)
    client = dict(DEFAULT_CLIENT)
    client.update(options.pop("client_options", None) or {})
    try:
        return from_url(url, client_options=client, **options)
    except Exception as e:  # noqa: BLE001 - obstore raises ValueError, GenericError, ... for bad options
        # the message may quote an option's value: say only which kind of problem
        raise StoreError(f"{storage_url(url)}: cannot be opened with the storage_options given ({type(e).__name__}; "
                         f"options named: {sorted(options)})") from None  # fmt: skip


def secrets_of(roots) -> dict[str, dict[str, Any]]:
    """The options of ``roots`` known here, by token: what a worker's config carries to it."""
    with _registry_lock:
        return {r.token: dict(_registry[r.token]) for r in roots if r.token in _registry}


def register_secrets(options: dict[str, dict[str, Any]]) -> None:
    """Make the options of these tokens known in this process (a worker, from its config)."""
    with _registry_lock:
        _registry.update(options)


_STATUS = re.compile(r"status code: (\d{3}[^:<\n]*)")
_CODE = re.compile(r"<Code>([^<]+)</Code>")


def missing_bucket(error: BaseException) -> bool:
    """Whether an obstore error says the bucket (or container) itself does not exist, not just an object."""
    return isinstance(error, FileNotFoundError) and any(
        code in str(error) for code in ("NoSuchBucket", "ContainerNotFound", "The specified bucket does not exist")
    )


def remote_error(url: str, error: BaseException, doing: str = "cannot be read") -> OSError:
    """One line naming ``url`` and what the server said (status and S3 error code), for an obstore error.

    obstore's messages span many lines (a debug dump of the request); the
    status and code are what a user acts on. A missing object stays a
    ``FileNotFoundError``.
    """
    text = str(error)
    status = _STATUS.search(text)
    code = _CODE.search(text)
    if status:
        said = status.group(1).strip()
        if code:
            said += f", {code.group(1)}"
    else:
        first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
        said = first[:300]
    # the server's message may echo a request's URL; never more than what the user gave us
    said = said.replace("\n", " ")
    kind = FileNotFoundError if isinstance(error, FileNotFoundError) else OSError
    return kind(f"{url}: {doing} ({said})")

