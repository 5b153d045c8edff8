"""What a recipe from a client that is not trusted may touch: the service's rules, applied while the
recipe is validated (`parse_recipe(..., policy=...)`), so that a path is judged before anything
looks at it on disk.

- Every path a recipe reads (model folder, GGUF file, text files, harness tasks) resolves, symlinks
  followed, inside one of `read_roots`; every path it writes (output, state, local publish and
  checkpoint targets) inside `write_root`. The message is the same whether the path exists or not,
  so validation does not tell a client which files the server has.
- Object storage only at the provider's own endpoints or at those listed; no credentials in a recipe
  (they sit in the job database and in Ray's job record): the service's environment holds them.
- Hub names are names (never a local folder), and only those matching `hub_patterns`.
- Numbers stay under the service's maxima.

The local CLI validates without a policy: on one's own machine a recipe may read and write anywhere.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

# written into the folders sea-convert creates (state folders): cleanup removes only folders that hold it
OWNED_MARKER = ".made-by-sea-convert"
HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")
# the provider's own S3 endpoints (no endpoint_url at all means these too)
AWS_ENDPOINT = re.compile(r"^https://([a-z0-9-]+\.)*s3([.-][a-z0-9-]+)*\.amazonaws\.com(\.cn)?/?$")
# fsspec / s3fs / botocore options that carry credentials; they belong in the service's environment
CREDENTIAL_KEYS = frozenset({
    "key", "secret", "token", "password", "username", "profile", "aws_access_key_id", "aws_secret_access_key",
    "aws_session_token", "session_token", "access_key", "secret_key", "credentials", "session", "creds",
})
ENDPOINT_KEYS = frozenset({"endpoint_url"})
ALLOWED_OPTION_PATHS = frozenset({"endpoint_url", "client_kwargs.endpoint_url", "client_kwargs.region_name"})
CREDENTIALS_HINT = ("credentials do not go in a recipe: the service takes them from its own environment"
                    " (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role)")


@dataclass(frozen=True)
class RecipePolicy:
    read_roots: tuple[Path, ...]
    write_root: Path
    allowed_endpoints: tuple[str, ...] = ()
    hub_patterns: tuple[str, ...] = ("*",)
    maxima: dict[str, float] = field(default_factory=dict)  # key -> the largest value allowed (see `at_most`)

    def __post_init__(self) -> None:
        object.__setattr__(self, "read_roots", tuple(Path(r).expanduser().resolve() for r in self.read_roots))
        object.__setattr__(self, "write_root", Path(self.write_root).expanduser().resolve())

    # --- paths -------------------------------------------------------------------------------------

    def readable(self, path: Path) -> Path:
        """`path` made absolute (relative: against the first read root) with symlinks resolved; ValueError
        when that lies outside every read root. Says nothing about whether it exists."""
        base = self.read_roots[0] if self.read_roots else Path("/nonexistent")
        target = (base / Path(path).expanduser()).resolve()
        if not any(_inside(target, root) for root in self.read_roots):
            raise ValueError(f"{path} is outside the service's data roots")
        return target

    def state_folder(self, path: Path) -> Path:
        """A writable folder that is either new or one sea-convert made (a resumed run's state)."""
        target = self.writable(path)
        if target.exists() and not (target / OWNED_MARKER).is_file():
            raise ValueError(f"{path} exists and was not made by sea-convert: name a new folder")
        return target

    def writable(self, path: Path) -> Path:
        """Like `readable` for the output root; the root itself is refused too (a job's work and state
        folders sit beside its output folder, so that must be strictly inside)."""
        target = (self.write_root / Path(path).expanduser()).resolve()
        if target == self.write_root or not _inside(target, self.write_root):
            raise ValueError(f"{path} is outside the service's output root (it must be a folder inside it)")
        return target

    # --- endpoints, credentials, hub ---------------------------------------------------------------

    def storage_target(self, uri: str) -> str:
        """A publish or checkpoint target: s3:// as given, a local folder resolved inside the output root."""
        if uri.startswith("s3://"):
            return uri
        return str(self.writable(Path(uri.removeprefix("file://"))))

    def storage_options(self, options: dict) -> dict:
        """fsspec options of a target: an allowed endpoint and a region, never credentials."""
        for key_path, value in _flatten(options):
            leaf = key_path.rsplit(".", 1)[-1].lower()
            if leaf in CREDENTIAL_KEYS or "secret" in leaf or "password" in leaf:
                raise ValueError(f"{key_path}: {CREDENTIALS_HINT}")
            if key_path not in ALLOWED_OPTION_PATHS:
                raise ValueError(f"{key_path} is not allowed by the service (allowed: {', '.join(sorted(ALLOWED_OPTION_PATHS))})")
            if leaf in ENDPOINT_KEYS and not self.endpoint_allowed(str(value)):
                raise ValueError(f"{key_path}: {value} is not an allowed endpoint (the provider's own, or one in the"
                                 " service's SEA_CONVERT_ALLOWED_ENDPOINTS)")
        return options

    def endpoint_allowed(self, url: str) -> bool:
        url = url.strip()
        if url.rstrip("/") in {e.rstrip("/") for e in self.allowed_endpoints}:
            return True
        parts = urlsplit(url)
        return bool(AWS_ENDPOINT.match(url)) and parts.username is None and parts.port is None

    def hub(self, name: str) -> str:
        if not HUB_NAME.match(name) or ".." in name:
            raise ValueError(f"{name!r} is not a hub name (owner/name): the service loads local files only from paths")
        if not any(fnmatch.fnmatchcase(name, p) for p in self.hub_patterns):
            raise ValueError(f"{name!r} is not allowed by the service's hub list (SEA_CONVERT_HUB_PATTERNS)")
        return name

    # --- numbers -----------------------------------------------------------------------------------

    def at_most(self, value, key: str):
        limit = self.maxima.get(key)
        if limit is not None and value is not None and value > limit:
            raise ValueError(f"{value} is above the service's maximum ({limit:g}; setting SEA_CONVERT_{key.upper()})")
        return value


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _flatten(options: dict, prefix: str = ""):
    for key, value in options.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _flatten(value, path + ".")
        else:
            yield path, value
