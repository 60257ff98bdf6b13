"""Ray's token authentication for pdserve's Ray driver (`pdserve up`, `pdserve down`).

Ray (>= 2.52) checks one static bearer token on every GCS, raylet and Ray Client RPC and on the
dashboard when `RAY_AUTH_MODE=token` is set on every node. Ray reads the token itself (its C++
loader), first found of: `$RAY_AUTH_TOKEN`, the file `$RAY_AUTH_TOKEN_PATH`, `~/.ray/auth_token`.
The nodes of a token cluster pass it on to the processes they start (pdserve's workers), so
only the driver needs it from us.

`configure_ray_auth` sets those variables before `ray.init`, from `--ray-auth-token-file` or
what the environment already holds; pdserve never reads the token's value beyond checking the
file is non-empty, and never logs or prints it. `ray_init` is `ray.init` with that done
first and a refused connection turned into a RayConnectError that says what to give.

Ray is imported inside `ray_init` and `_reload_ray_auth`, not when this module is: importing
it with `launcher.cluster` (before the router's modules) makes joining a token-protected
cluster through Ray Client fail ("Starting Ray client server failed";
tests/test_security.py::test_pdserve_up_joins_a_token_protected_ray_cluster).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from pdserve_api.errors import ConfigError

log = logging.getLogger(__name__)

MODE, TOKEN, TOKEN_PATH = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"


class RayConnectError(RuntimeError):
    """Ray refused pdserve's driver (or never answered); the message says what to check."""


def configure_ray_auth(token_file: str | None, joining: bool) -> str:
    """Set Ray's auth variables for this process before `ray.init`; returns how Ray will
    authenticate, for a log line (never the token).

    - `token_file` (`--ray-auth-token-file`): token mode with that file; it replaces a
      `$RAY_AUTH_TOKEN`, which Ray would otherwise prefer.
    - else a token in `$RAY_AUTH_TOKEN` / `$RAY_AUTH_TOKEN_PATH` with `$RAY_AUTH_MODE` unset
      turns token mode on (a token given is a token meant).
    - else, starting a private local Ray (`joining` False), `$RAY_AUTH_MODE` defaults to
      disabled as before (Ray 2.60 would turn token mode on and write ~/.ray/auth_token);
      joining a cluster, Ray decides (token mode when ~/.ray/auth_token exists).
    A token file that is missing, unreadable or empty is a ConfigError here, where Ray itself
    would abort the process.
    """
    env = os.environ
    if token_file is not None:
        _check_token_file(token_file, "--ray-auth-token-file")
        env[MODE] = "token"
        env[TOKEN_PATH] = str(Path(token_file).resolve())
        env.pop(TOKEN, None)
    elif MODE not in env and (env.get(TOKEN) or env.get(TOKEN_PATH)):
        env[MODE] = "token"
    elif MODE not in env and not joining:
        env[MODE] = "disabled"
    mode = env.get(MODE, "")
    if mode.lower() != "token":
        return mode.lower() or "Ray's default (token if ~/.ray/auth_token exists)"
    if env.get(TOKEN):
        return f"token (from ${TOKEN})"
    if env.get(TOKEN_PATH):
        _check_token_file(env[TOKEN_PATH], f"${TOKEN_PATH}")
        return f"token (from file {env[TOKEN_PATH]})"
    return "token (from ~/.ray/auth_token)"


def _check_token_file(path: str, what: str) -> None:
    try:
        size = Path(path).stat().st_size
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot read the Ray token file ({e.strerror})") \
            from None
    if size == 0:
        raise ConfigError(f"{what} {path}: the Ray token file is empty")


def _reload_ray_auth() -> None:
    """Make Ray read the variables just set. It caches its config (RAY_AUTH_MODE) and the
    token when this process first loads them, e.g. on `import ray`, so without this a process
    that imported Ray earlier keeps its old mode and sends no token. Private Ray API: the
    calls Ray's own token set-up makes (ray/_private/authentication); only before ray.init."""
    try:
        # Ray's _raylet.pyi stub does not declare these two classes that _raylet exports.
        from ray._raylet import (  # type: ignore[attr-defined]
            AuthenticationTokenLoader,
            Config,
        )
    except ImportError:  # a Ray without token authentication (< 2.52)
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def ray_init(*, auth_token_file: str | None = None, **init_kwargs: Any) -> Any:
    """`ray.init(**init_kwargs)` after `configure_ray_auth`; a refusal becomes a
    RayConnectError naming the address, the auth mode used and what to give."""
    import ray

    address = init_kwargs.get("address")
    how = configure_ray_auth(auth_token_file, joining=address is not None)
    _reload_ray_auth()
    log.info("Ray: %s, authentication %s", f"joining {address}" if address else "local", how)
    try:
        return ray.init(**init_kwargs)
    except (ConnectionError, RuntimeError) as e:
        text = f"{e} {e.__cause__ or ''} {e.__context__ or ''}"
        if "InvalidAuthToken" in text or "Unauthenticated" in text:
            reason = "it refused the authentication token"
        elif str(address).startswith("ray://") and "connection timeout" in str(e):
            # Ray Client does not say why: a wrong or missing token looks like a timeout.
            reason = ("no answer in time (with Ray Client, also what a missing or wrong "
                      "token looks like)")
        else:
            raise
        raise RayConnectError(
            f"Ray at {address}: {reason}; pdserve used authentication {how}. A cluster "
            f"started with {MODE}=token needs its token: --ray-auth-token-file FILE, or "
            f"${TOKEN} / ${TOKEN_PATH}") from None
