"""Network git for workspaces owned by the agent's user (``agent_user``): through a sidecar-owned mirror.

Two rules meet here. A git token must never reach a process of the agent's user: any other
process of that user (the agent's bash) could read it from ``/proc``. And git run by the sidecar in
a repository the agent controls could be made to run the agent's commands with the sidecar's rights
(filters, ``core.alternateRefsCommand``, ``http.proxy`` with ``sslVerify`` off to catch the token).
So the sidecar talks to the remote only from a bare mirror of its own, under
``data_dir/git-mirrors`` (one per workspace and remote URL, readable by the agent's user, written
by the sidecar only), and the workspace's git, run as the agent's user, talks only to the mirror:

- clone: the sidecar clones the remote into the mirror (bare); the agent's git clones the mirror
  into the workspace with ``url.<mirror>.insteadOf=<remote URL>``, so ``origin`` is the remote URL
  as without a mirror and every later command looks the same.
- fetch: the sidecar fetches the remote's branches and tags (and a wanted commit or ref) into the
  mirror, then the agent's git runs the very fetch it would have run, against the mirror.
- push: the agent's git bundles the branch (only what the mirror lacks), the sidecar reads the
  bundle (a file, never the agent's repository), pushes the commit from the mirror, and the
  workspace's remote-tracking branch (and upstream, when asked) is set as ``git push`` would.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ocbridge.bridge.agent_user import AgentUser, copy_agent_file
from ocbridge.bridge.redact import Redactor

from .errors import GitError
from .repo import resolve_commit
from .runner import GitCredentials, GitResult, allowed_protocols, run_git
from .safety import normalize_url
from .settings import GitSettings

_HEADS = "+refs/heads/*:refs/heads/*"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:20]


def mirror_path(agent: AgentUser, workspace: Path, url: str) -> Path:
    """The mirror of remote ``url`` for ``workspace``."""
    return agent.mirror_root / f"{_digest(str(workspace))}-{_digest(normalize_url(url))}.git"


def forget_mirrors(agent: AgentUser, workspace: Path) -> None:
    """Delete every mirror of ``workspace`` (when the workspace itself is deleted)."""
    for mirror in agent.mirror_root.glob(f"{_digest(str(workspace))}-*.git"):
        shutil.rmtree(mirror, ignore_errors=True)


def _local_transport(settings: GitSettings) -> tuple[list[str], dict[str, str]]:
    """``-c`` items and environment that let one command use ``file://`` (the mirror, a bundle)."""
    protocols = ":".join(dict.fromkeys([*allowed_protocols(settings), "file"]))
    return ["protocol.file.allow=always"], {"GIT_ALLOW_PROTOCOL": protocols}


class Mirror:
    """The mirror of one remote for one workspace, and the commands that go through it."""

    def __init__(self, workspace: Path, url: str, *, settings: GitSettings, redactor: Redactor) -> None:
        agent = settings.agent
        if agent is None:
            raise RuntimeError("mirrors are for workspaces owned by the agent's user")
        self.workspace = workspace
        self.url = url
        self.settings = settings
        self.redactor = redactor
        self.path = mirror_path(agent, workspace, url)

    # ------------------------------------------------------------------ the agent's side

    def agent_config(self) -> tuple[list[str], dict[str, str]]:
        """``-c`` items and environment for the workspace's git: the remote URL means the mirror."""
        config, env = _local_transport(self.settings)
        return [f"url.{self.path.as_uri()}.insteadOf={self.url}", *config], env

    async def agent_git(self, args: Sequence[str], cwd: Path, *, timeout: float | None = None,
                        check: bool = True) -> GitResult:
        """Run ``git args`` as the agent's user, with the remote URL pointing at the mirror."""
        config, env = self.agent_config()
        return await run_git(args, cwd, settings=self.settings, config=config, env=env, timeout=timeout,
                             check=check, redactor=self.redactor)

    # ---------------------------------------------------------------- the sidecar's side

    async def _git(self, args: Sequence[str], *, credentials: GitCredentials | None = None,
                   timeout: float | None = None, check: bool = True, local: bool = False,
                   cwd: Path | None = None, input: bytes | None = None) -> GitResult:
        config, env = _local_transport(self.settings) if local else ([], {})
        return await run_git(args, cwd or self.path, settings=self.settings, credentials=credentials,
                             config=config, env=env, timeout=timeout, check=check, input=input,
                             redactor=self.redactor, as_sidecar=True)

    async def _configure(self) -> None:
        await self._git(["config", "remote.origin.url", self.url])
        await self._git(["config", "--replace-all", "remote.origin.fetch", _HEADS])
        # The workspace may ask for a commit no branch points at (a task's ``ref``).
        await self._git(["config", "uploadpack.allowAnySHA1InWant", "true"])

    async def _ensure(self) -> None:
        if (self.path / "HEAD").is_file():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        await self._git(["init", "--bare", "--quiet", str(self.path)], cwd=self.path.parent)
        await self._configure()

    async def clone(self, *, credentials: GitCredentials, branch: str | None, shallow: bool) -> None:
        """Clone the remote into a fresh mirror (what the workspace's clone then reads)."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        args = ["clone", "--quiet", "--bare", *(["--depth", "1"] if shallow else []),
                *(["--branch", branch] if branch else []), "--", self.url, str(self.path)]
        try:
            await self._git(args, credentials=credentials, timeout=self.settings.clone_timeout, cwd=self.path.parent)
            await self._configure()
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise

    async def refresh(self, *, credentials: GitCredentials, depth: bool = False, unshallow: bool = False,
                      wants: Sequence[str] = (), check: bool = True) -> GitResult | None:
        """Bring the mirror up to date with the remote: every branch and tag, and each of ``wants``
        (a commit id, tag or ref). A failure raises :class:`GitError` when ``check``, else the failed
        command's result is returned; ``None`` when all went well."""
        await self._ensure()
        timeout = self.settings.fetch_timeout
        shallow = (self.path / "shallow").exists()
        history = ["--unshallow"] if unshallow and shallow else ["--depth", "1"] if depth and shallow else []
        result = await self._git(["fetch", "--quiet", "--prune", "--tags", *history, "--", "origin"],
                                 credentials=credentials, timeout=timeout, check=check)
        if result.code != 0:
            return result
        for want in wants:
            refspec = f"+{want}:{want}" if want.startswith("refs/") else want
            result = await self._git(["fetch", "--quiet", *(["--depth", "1"] if shallow else []), "--", "origin",
                                      refspec], credentials=credentials, timeout=timeout, check=check)
            if result.code != 0:
                return result
        return None

    async def push(self, branch: str, remote: str, *, credentials: GitCredentials) -> GitResult:
        """Push the workspace's ``branch`` to the remote as ``refs/heads/<branch>`` (porcelain output)."""
        await self._ensure()
        tip = await resolve_commit(self.workspace, f"refs/heads/{branch}", settings=self.settings,
                                   redactor=self.redactor)
        if tip is None:
            raise GitError(f"branch {branch!r} does not exist", redactor=self.redactor)
        if (await self._git(["cat-file", "-e", f"{tip}^{{commit}}"], check=False)).code != 0:
            await self._take_from_workspace(branch, remote)
        result = await self._git(["push", "--porcelain", "--", "origin", f"{tip}:refs/heads/{branch}"],
                                 credentials=credentials, timeout=self.settings.push_timeout, check=False)
        if result.code == 0:
            await self._git(["update-ref", f"refs/heads/{branch}", tip])
            await run_git(["update-ref", f"refs/remotes/{remote}/{branch}", tip], self.workspace,
                          settings=self.settings, redactor=self.redactor)
        return result

    async def _take_from_workspace(self, branch: str, remote: str) -> None:
        """Copy the branch's commits the mirror lacks into it, through a bundle the agent's git writes."""
        agent = self.settings.agent
        assert agent is not None
        known = (await run_git(["for-each-ref", "--format=%(objectname)", f"refs/remotes/{remote}/"],
                               self.workspace, settings=self.settings, redactor=self.redactor)).stdout.split()
        present = await self._present(known)
        with agent.scratch() as outbox:
            bundle = outbox / "branch.bundle"
            await run_git(["bundle", "create", "--quiet", str(bundle), f"refs/heads/{branch}",
                           *(["--not", *present] if present else [])], self.workspace, settings=self.settings,
                          redactor=self.redactor)
            with tempfile.TemporaryDirectory(prefix="ocbridge-bundle-") as private:
                copy = Path(private) / "branch.bundle"
                await asyncio.to_thread(copy_agent_file, bundle, copy)
                await self._git(["fetch", "--quiet", "--", str(copy), f"refs/heads/{branch}"], local=True,
                                timeout=self.settings.push_timeout)

    async def _present(self, objects: Sequence[str]) -> list[str]:
        """Those of ``objects`` the mirror has."""
        if not objects:
            return []
        result = await self._git(["cat-file", "--batch-check=%(objectname)"], check=False,
                                 input="".join(f"{sha}\n" for sha in objects).encode())
        # A missing object is answered "<id> missing".
        wanted = set(objects)
        return [line for line in result.stdout.splitlines() if line in wanted]
