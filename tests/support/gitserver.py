"""Test helpers for the git layer: a seeded bare repository and a local smart-HTTP git server.

:class:`GitHttpServer` serves every bare repository under a folder through ``git http-backend``
(CGI, fetch and push) and demands a token: HTTP Basic with any user name and the token as password,
or ``Authorization: Bearer <token>``; anything else gets ``401`` with ``WWW-Authenticate: Basic``.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

IDENTITY = {
    "GIT_AUTHOR_NAME": "Test Author",
    "GIT_AUTHOR_EMAIL": "author@example.com",
    "GIT_COMMITTER_NAME": "Test Author",
    "GIT_COMMITTER_EMAIL": "author@example.com",
}


def git(*args: str, cwd: Path | str | None = None, input: bytes | None = None) -> str:
    """Run git for test set-up and assertions (not through the code under test)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(IDENTITY, GIT_CONFIG_NOSYSTEM="1", GIT_TERMINAL_PROMPT="0", LC_ALL="C")
    result = subprocess.run(["git", "-c", "protocol.file.allow=always", *args], cwd=cwd, env=env, input=input,
                            capture_output=True, check=False)
    if result.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {result.stderr.decode()}")
    return result.stdout.decode()


def write(root: Path, files: dict[str, str | bytes | None]) -> None:
    """Write (``str``/``bytes``) or delete (``None``) files under ``root``."""
    for name, content in files.items():
        target = root / name
        if content is None:
            target.unlink()
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)


@dataclass
class Remote:
    """A bare repository (default branch ``trunk``) and a private work clone used to add commits."""

    bare: Path
    seed: Path
    commits: dict[str, str] = field(default_factory=dict)

    def commit(self, files: dict[str, str | bytes | None], message: str, branch: str = "trunk") -> str:
        """Commit ``files`` on ``branch`` in the seed clone and push it; returns the commit id."""
        git("checkout", "-q", branch, cwd=self.seed)
        write(self.seed, files)
        git("add", "-A", cwd=self.seed)
        git("commit", "-q", "-m", message, cwd=self.seed)
        git("push", "-q", "origin", branch, cwd=self.seed)
        return git("rev-parse", "HEAD", cwd=self.seed).strip()

    def log(self, ref: str = "trunk") -> list[str]:
        """Commit ids on ``ref`` in the bare repository, newest first."""
        return git(f"--git-dir={self.bare}", "log", "--format=%H", ref).split()


_TEMPLATE: Remote | None = None


def _build_remote(root: Path, name: str) -> Remote:
    root.mkdir(parents=True, exist_ok=True)
    bare = root / name
    git("init", "-q", "--bare", "-b", "trunk", str(bare))
    git("config", "http.receivepack", "true", cwd=bare)
    seed = root / f"{name}.seed"
    git("init", "-q", "-b", "trunk", str(seed))
    git("remote", "add", "origin", str(bare), cwd=seed)
    remote = Remote(bare=bare, seed=seed)
    write(seed, {"README.md": "# project\n", "src/app.py": "def main():\n    return 1\n",
                 "data.bin": bytes(range(256)) * 4})
    git("add", "-A", cwd=seed)
    git("commit", "-q", "-m", "first", cwd=seed)
    git("push", "-q", "origin", "trunk", cwd=seed)
    remote.commits["first"] = git("rev-parse", "HEAD", cwd=seed).strip()
    git("tag", "v1", cwd=seed)
    git("push", "-q", "origin", "v1", cwd=seed)
    remote.commits["second"] = remote.commit({"src/app.py": "def main():\n    return 2\n"}, "second")
    git("checkout", "-q", "-b", "feature", cwd=seed)
    remote.commits["feature"] = remote.commit({"feature.txt": "feature\n"}, "feature work", branch="feature")
    git("checkout", "-q", "trunk", cwd=seed)
    return remote


def make_remote(root: Path, name: str = "project.git") -> Remote:
    """A bare repo with history on ``trunk`` (not ``main``), a tag ``v1`` and a branch ``feature``.

    Built once per test run and copied (same commit ids every time), which is ten times faster."""
    global _TEMPLATE
    if _TEMPLATE is None:
        where = Path(tempfile.mkdtemp(prefix="gitops-template-"))
        atexit.register(shutil.rmtree, where, True)
        _TEMPLATE = _build_remote(where, "template.git")
    root.mkdir(parents=True, exist_ok=True)
    bare, seed = root / name, root / f"{name}.seed"
    shutil.copytree(_TEMPLATE.bare, bare, symlinks=True)
    shutil.copytree(_TEMPLATE.seed, seed, symlinks=True)
    git("remote", "set-url", "origin", str(bare), cwd=seed)
    return Remote(bare=bare, seed=seed, commits=dict(_TEMPLATE.commits))


class GitHttpServer:
    """Smart-HTTP git server on 127.0.0.1 for the bare repositories under ``project_root``."""

    def __init__(self, project_root: Path, token: str) -> None:
        self.project_root = project_root
        self.token = token
        #: Seconds to wait before answering each request (to observe a clone in flight).
        self.delay = 0.0
        #: ``Authorization`` header values received (None when absent).
        self.auth_seen: list[str | None] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    def _authorized(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            return value == self.token
        if scheme.lower() == "basic":
            try:
                _, _, password = base64.b64decode(value).decode().partition(":")
            except ValueError:
                return False
            return password == self.token
        return False

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        header = request.headers.get("Authorization")
        self.auth_seen.append(header)
        if self.delay:
            await asyncio.sleep(self.delay)
        if not self._authorized(header):
            return web.Response(status=401, text="token required\n",
                                headers={"WWW-Authenticate": 'Basic realm="git"'})
        body = await request.read()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": str(self.project_root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "GIT_CONFIG_NOSYSTEM": "1",
            "PATH_INFO": request.path,
            "REQUEST_METHOD": request.method,
            "QUERY_STRING": request.query_string,
            "CONTENT_TYPE": request.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_USER": "tester",
            "REMOTE_ADDR": "127.0.0.1",
            "GIT_PROTOCOL": request.headers.get("Git-Protocol", ""),
        }
        if body[:2] == b"\x1f\x8b":  # still gzip: aiohttp did not decompress it
            env["HTTP_CONTENT_ENCODING"] = "gzip"
        proc = await asyncio.create_subprocess_exec(
            "git", "http-backend", env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate(body)
        head, sep, payload = out.partition(b"\r\n\r\n")
        if not sep:
            head, _, payload = out.partition(b"\n\n")
        status, headers = 200, {}
        for line in head.decode("latin-1").splitlines():
            key, _, value = line.partition(":")
            if key.lower() == "status":
                status = int(value.strip().split()[0])
            elif key:
                headers[key.strip()] = value.strip()
        return web.Response(status=status, headers=headers, body=payload)

    async def start(self) -> str:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
