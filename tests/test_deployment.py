"""The compose stack as Docker would run it, read from docker-compose.yml and the Dockerfiles
(Docker does not run here).

- Every directory a service of ours writes, and every volume it mounts, exists in its image and
  belongs to the user the image runs as. Docker seeds an empty named volume from the image's
  directory, owner included; a directory the image lacks mounts owned by root, where the
  service's user cannot write. A volume two images mount is seeded by whichever starts first,
  so each of them must leave it writable for every service that writes on it.
- Every command a service runs is one the CLI accepts: the `posegen` script answers it with
  `--help`, and the CLI's own parser takes its options and values.
- The images install what the tests ran: every pip install is held to constraints.txt, a
  version a Dockerfile names is the one pinned there, and the GPU worker gets torch's CUDA
  build of that version.
- The long-running services restart.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import posixpath
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import typer
import yaml
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from sqlalchemy.engine import make_url
from typer.core import TyperGroup

from posegen.cli.main import app as cli_app
from posegen.queue import GENERATION_QUEUE
from posegen.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
POSEGEN = Path(sys.executable).with_name("posegen")
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
ROOT_UID = 0


# -- the Dockerfiles ---------------------------------------------------------------------------

_SHELL_OPERATORS = {"&&", "||", ";", ";;", "|", "&", "(", ")"}
_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def simple_commands(script: str, env: dict[str, str]) -> Iterator[list[str]]:
    """The simple commands of a shell script (`a && b; c`), variables expanded from `env`."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    command: list[str] = []
    for token in lexer:
        if token in _SHELL_OPERATORS:
            if command:
                yield command
            command = []
        else:
            command.append(_VARIABLE.sub(lambda m: env.get(m[1] or m[2], ""), token))
    if command:
        yield command


def _options(*specs: tuple[tuple[str, ...], dict[str, Any]]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    for flags, kwargs in specs:
        parser.add_argument(*flags, **kwargs)
    parser.add_argument("operands", nargs="*")
    return parser


_FLAG = {"action": "store_true"}
_MKDIR = _options(
    (("-p", "--parents"), _FLAG), (("-v", "--verbose"), _FLAG), (("-m", "--mode"), {})
)
_INSTALL = _options(
    (("-d", "--directory"), _FLAG), (("-o", "--owner"), {}), (("-g", "--group"), {}),
    (("-m", "--mode"), {}), (("-v", "--verbose"), _FLAG),
)  # fmt: skip
_CHOWN = _options(
    (("-R", "--recursive"), _FLAG), (("-h", "--no-dereference"), _FLAG),
    (("-v", "--verbose"), _FLAG), (("-c", "--changes"), _FLAG), (("-f", "--silent"), _FLAG),
)  # fmt: skip
_USERADD = _options(
    (("-u", "--uid"), {"type": int}), (("-g", "--gid"), {}), (("-G", "--groups"), {}),
    (("-d", "--home-dir"), {}), (("-s", "--shell"), {}), (("-c", "--comment"), {}),
    (("-m", "--create-home"), _FLAG), (("-M", "--no-create-home"), _FLAG),
    (("-r", "--system"), _FLAG), (("-N", "--no-user-group"), _FLAG), (("-U", "--user-group"), _FLAG),
    (("-l", "--no-log-init"), _FLAG),
)  # fmt: skip


@dataclass
class Image:
    """What one Dockerfile stage leaves: its users, the directories it creates (by owner uid),
    the user it runs as, its environment, its command and its pip installs."""

    dockerfile: str
    users: dict[str, int] = field(default_factory=lambda: {"root": ROOT_UID})
    uid: int = ROOT_UID
    workdir: PurePosixPath = field(default_factory=lambda: PurePosixPath("/"))
    owners: dict[PurePosixPath, int] = field(default_factory=dict)
    volumes: list[PurePosixPath] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    copied: set[str] = field(default_factory=set)
    # Each `pip install`'s arguments, and the files copied in before it.
    pip_installs: list[tuple[list[str], set[str]]] = field(default_factory=list)

    def uid_of(self, user: str) -> int:
        name = user.split(":", 1)[0]
        if name.isdigit():
            return int(name)
        assert name in self.users, f"{self.dockerfile}: user {name!r} is not created with a uid"
        return self.users[name]

    def nearest_owner(self, path: PurePosixPath, *, top: PurePosixPath) -> int | None:
        """The owner of `path` or, where the image lacks it, of its nearest parent up to `top`
        (where a process that creates its parents makes it)."""
        for candidate in (path, *path.parents):
            if candidate in self.owners:
                return self.owners[candidate]
            if candidate == top:
                return None
        return None

    def resolve(self, value: str) -> PurePosixPath:
        return PurePosixPath(posixpath.normpath(self.workdir / value))

    def settable(self, path: PurePosixPath) -> bool:
        # What a RUN changes under a declared VOLUME is discarded.
        return not any(path == v or v in path.parents for v in self.volumes)

    def create(self, path: PurePosixPath, owner: int) -> None:
        for each in (*reversed(path.parents), path):
            if each not in self.owners and self.settable(each):
                self.owners[each] = owner

    def run(self, script: str, env: dict[str, str]) -> None:
        for argv in simple_commands(script, env):
            program, args = PurePosixPath(argv[0]).name, argv[1:]
            if program.startswith("python") and args[:2] == ["-m", "pip"]:
                program, args = "pip", args[2:]
            if program in ("pip", "pip3") and args[:1] == ["install"]:
                self.pip_installs.append((args[1:], set(self.copied)))
            elif program == "mkdir":
                for path in _MKDIR.parse_known_args(args)[0].operands:
                    self.create(self.resolve(path), self.uid)
            elif program == "install":
                opts = _INSTALL.parse_known_args(args)[0]
                if opts.directory:
                    owner = self.uid_of(opts.owner) if opts.owner else self.uid
                    for path in map(self.resolve, opts.operands):
                        self.create(path, owner)
                        if self.settable(path):
                            self.owners[path] = owner
            elif program == "chown":
                opts = _CHOWN.parse_known_args(args)[0]
                owner = self.uid_of(opts.operands[0])
                for target in map(self.resolve, opts.operands[1:]):
                    for path in list(self.owners):
                        inside = opts.recursive and target in path.parents
                        if (path == target or inside) and self.settable(path):
                            self.owners[path] = owner
            elif program == "useradd":
                opts = _USERADD.parse_known_args(args)[0]
                name = opts.operands[-1]
                assert opts.uid is not None, f"{self.dockerfile}: user {name!r} has no fixed uid"
                self.users[name] = opts.uid
                if opts.create_home:
                    self.create(PurePosixPath(opts.home_dir or f"/home/{name}"), opts.uid)


def _exec_or_shell(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("["):
        return list(json.loads(value))
    return ["/bin/sh", "-c", value]


def read_image(dockerfile: str, *, target: str | None = None) -> Image:
    with (ROOT / dockerfile).open("rb") as fh:
        parser = DockerfileParser(fileobj=fh, env_replace=True)
        steps = list(zip(parser.structure, parser.context_structure, strict=True))
    stages: dict[str, Image] = {}
    image = Image(dockerfile)
    for step, context in steps:
        instruction, value = step["instruction"], step["value"]
        if instruction == "FROM":
            words = value.split()
            image = copy.deepcopy(stages[words[0]]) if words[0] in stages else Image(dockerfile)
            if len(words) == 3 and words[1].lower() == "as":
                stages[words[2]] = image
        elif instruction == "RUN":
            script = value
            if value.lstrip().startswith("["):
                script = shlex.join(json.loads(value))
            image.run(script, {**context.args, **context.envs})
        elif instruction == "USER":
            image.uid = image.uid_of(value.strip())
        elif instruction == "WORKDIR":
            # Created owned by root, whatever USER says (the classic builder's way).
            image.workdir = image.resolve(value.strip())
            image.create(image.workdir, ROOT_UID)
        elif instruction == "VOLUME":
            paths = json.loads(value) if value.lstrip().startswith("[") else value.split()
            image.volumes.extend(image.resolve(p) for p in paths)
        elif instruction in ("COPY", "ADD"):
            words = [w for w in shlex.split(value) if not w.startswith("--")]
            image.copied.update(PurePosixPath(w).name for w in words[:-1])
        elif instruction == "ENTRYPOINT":
            image.entrypoint = _exec_or_shell(value)
        elif instruction == "CMD":
            image.cmd = _exec_or_shell(value)
        image.env = dict(context.envs)
    return stages[target] if target else image


# -- the compose file ----------------------------------------------------------------------------

_COMPOSE_VARIABLE = re.compile(r"\$\{\w+(?::?-([^}]*))?\}")


def interpolate(value: str) -> str:
    """A compose value as a plain `docker compose up` reads it (no .env, no variables set):
    `${X:-default}` is the default, `${X}` is empty."""
    return _COMPOSE_VARIABLE.sub(lambda m: m[1] or "", value)


def image_of(service: dict[str, Any]) -> Image:
    build = service["build"]
    if isinstance(build, str):
        build = {"context": build}
    context = PurePosixPath(build.get("context", "."))
    return read_image(
        str(context / build.get("dockerfile", "Dockerfile")), target=build.get("target")
    )


def our_services() -> list[str]:
    return [name for name, service in SERVICES.items() if "build" in service]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(entry.split("=", 1) for entry in env)
    return {key: interpolate(str(value)) for key, value in env.items() if value is not None}


@dataclass(frozen=True)
class Mount:
    source: str | None  # a named volume; None for an anonymous one
    target: PurePosixPath
    bind: bool
    read_only: bool


def mounts(service: dict[str, Any]) -> list[Mount]:
    found = []
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            source, target = entry.get("source"), entry["target"]
            bind, read_only = entry.get("type") == "bind", bool(entry.get("read_only"))
        else:
            parts = interpolate(entry).split(":")
            source, target = (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
            bind = source is not None and source.startswith((".", "/", "~"))
            read_only = len(parts) > 2 and "ro" in parts[2].split(",")
        found.append(Mount(source, PurePosixPath(target), bind, read_only))
    return found


def seeding_images(volume: str) -> list[tuple[Image, PurePosixPath, list[str]]]:
    """The images that may seed a named volume (those of the services that mount it: any may
    start first), each with where it mounts the volume and the services that run it."""
    found: dict[str, tuple[Image, PurePosixPath, list[str]]] = {}
    for name, service in SERVICES.items():
        for mount in mounts(service):
            if mount.source != volume:
                continue
            assert "build" in service, f"{name} mounts {volume} from an image not built here"
            key = json.dumps([service["build"], str(mount.target)], sort_keys=True)
            found.setdefault(key, (image_of(service), mount.target, []))[2].append(name)
    return list(found.values())


def argv_of(service: dict[str, Any], image: Image) -> list[str]:
    command = service.get("command", image.cmd)
    command = shlex.split(command) if isinstance(command, str) else [str(c) for c in command]
    entrypoint = service.get("entrypoint", image.entrypoint)
    entrypoint = shlex.split(entrypoint) if isinstance(entrypoint, str) else list(entrypoint)
    return [*entrypoint, *command]


def posegen_commands(argv: list[str], env: dict[str, str]) -> list[list[str]]:
    """The `posegen` commands (their arguments after `posegen`) that `argv` runs."""
    if PurePosixPath(argv[0]).name in ("sh", "bash") and argv[1:2] == ["-c"]:
        commands = list(simple_commands(argv[2], env))
    else:
        commands = [argv]
    for command in commands:
        assert PurePosixPath(command[0]).name == "posegen", f"{command}: not a posegen command"
    return [command[1:] for command in commands]


def parse(args: list[str]) -> tuple[list[str], dict[str, Any]]:
    """The command path and typed options of `posegen ARGS`, by the CLI's own parser (it
    raises a UsageError for an unknown command, option or value)."""
    command: Any = typer.main.get_command(cli_app)
    ctx = command.make_context("posegen", [], resilient_parsing=True)
    path: list[str] = []
    rest = list(args)
    while isinstance(command, TyperGroup):
        assert rest and not rest[0].startswith("-"), f"posegen {shlex.join(args)}: no command"
        name = rest.pop(0)
        sub = command.get_command(ctx, name)
        assert sub is not None, f"posegen has no command {shlex.join([*path, name])!r}"
        path.append(name)
        command = sub
        if isinstance(command, TyperGroup):
            ctx = command.make_context(name, [], parent=ctx, resilient_parsing=True)
    return path, command.make_context(path[-1], rest, parent=ctx).params


def settings_in(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a container with environment `env` reads."""
    for key in list(os.environ):
        if key.startswith("POSEGEN_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("POSEGEN_"):
            monkeypatch.setenv(key, value)
    return Settings()


def written_dirs(
    path: list[str], params: dict[str, Any], *, settings: Settings, env: dict[str, str]
) -> dict[str, str]:
    """The directories `posegen PATH PARAMS` writes in, each with what it writes there (as
    posegen/cli/processes.py, posegen/storage and the settings place them)."""
    dirs: dict[str, str] = {}
    process = path[0] in ("api", "worker", "beat")
    if path[0] in ("api", "worker") and settings.storage_url.startswith("file://"):
        dirs[settings.storage_url.removeprefix("file://")] = "the storage root"
    if path == ["worker"]:
        if params["metrics_port"]:
            dirs[str(settings.var_dir / "metrics")] = "the metrics of --metrics-port"
        if GENERATION_QUEUE in params["queues"].split(","):
            # `posegen models build-tiny` and `models pull` fill them in this service.
            dirs[str(settings.model_dir)] = "the model dir"
            if env.get("HF_HOME"):
                dirs[env["HF_HOME"]] = "the HF cache"
    if path == ["beat"]:
        dirs[str(settings.var_dir)] = "beat's schedule"
    if process and settings.embedded_broker:
        dirs[str(settings.broker_dir)] = "the embedded broker"
    if settings.is_sqlite and path[0] != "beat":
        database = make_url(settings.database_url).database or ""
        dirs[posixpath.dirname(database) or "."] = "the SQLite database"
    return dirs


def command_cases() -> list[Any]:
    cases = []
    for name in our_services():
        service = SERVICES[name]
        image = image_of(service)
        env = {**image.env, **environment(service)}
        for args in posegen_commands(argv_of(service, image), env):
            cases.append(pytest.param(args, id=f"{name}:{shlex.join(args)}"))
    for dockerfile in sorted(p.name for p in ROOT.glob("Dockerfile*")):
        image = read_image(dockerfile)
        for args in posegen_commands([*image.entrypoint, *image.cmd], image.env):
            cases.append(pytest.param(args, id=f"{dockerfile}:{shlex.join(args)}"))
    return cases


# -- the checks ------------------------------------------------------------------------------


@pytest.mark.parametrize("args", command_cases())
def test_each_command_is_one_the_cli_accepts(args: list[str]) -> None:
    path, _ = parse(args)
    done = subprocess.run(
        [str(POSEGEN), *args, "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Usage: posegen {' '.join(path)}" in done.stdout


@pytest.mark.parametrize("name", our_services())
def test_every_directory_a_service_writes_belongs_to_its_user(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = SERVICES[name]
    image = image_of(service)
    uid = image.uid_of(str(service["user"])) if "user" in service else image.uid
    assert uid != ROOT_UID, f"{name} runs as root"
    env = {**image.env, **environment(service)}
    settings = settings_in(env, monkeypatch)
    workdir = PurePosixPath(service.get("working_dir", image.workdir))
    own_mounts = [m for m in mounts(service) if not m.bind and not m.read_only]

    needed = {m.target: f"the volume {m.source or '(anonymous)'}" for m in own_mounts}
    for args in posegen_commands(argv_of(service, image), env):
        path, params = parse(args)
        for directory, what in written_dirs(path, params, settings=settings, env=env).items():
            needed[PurePosixPath(posixpath.normpath(workdir / directory))] = what

    problems = []
    for directory, what in sorted(needed.items()):
        owner = image.owners.get(directory)
        if owner is None:
            problems.append(f"{directory} ({what}) is not created in {image.dockerfile}")
        elif owner != uid:
            problems.append(
                f"{directory} ({what}) belongs to uid {owner} in {image.dockerfile}; "
                f"{name} runs as uid {uid}"
            )
        # Whichever service first mounts a named volume seeds it from its own image: in each
        # other image the directory, or the parent a process creates it in, is the writer's.
        for mount in own_mounts:
            if mount.source is None or not directory.is_relative_to(mount.target):
                continue
            for seed, target, seeders in seeding_images(mount.source):
                if seed.dockerfile == image.dockerfile and target == mount.target:
                    continue  # checked above, exactly
                there = target / directory.relative_to(mount.target)
                seeded = seed.nearest_owner(there, top=target)
                if seeded != uid:
                    state = "missing" if seeded is None else f"owned by uid {seeded}"
                    problems.append(
                        f"{directory} ({what}) on the volume {mount.source}: {state} at {there} "
                        f"in {seed.dockerfile}, which seeds it when {', '.join(seeders)} starts "
                        f"first; {name} writes it as uid {uid}"
                    )
    assert not problems, "\n".join(problems)


def constraints() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", f"constraints.txt: {line} is not a pin"
            pins[canonicalize_name(requirement.name)] = Version(spec.version)
    return pins


_PIP_INSTALL = _options(
    (("-c", "--constraint"), {"action": "append", "default": []}),
    (("-r", "--requirement"), {"action": "append", "default": []}),
    (("-e", "--editable"), {"action": "append", "default": []}),
    (("-i", "--index-url"), {"action": "append", "default": []}),
    (("--extra-index-url",), {"action": "append", "default": []}),
    (("-f", "--find-links"), {"action": "append", "default": []}),
    (("--config-settings",), {"action": "append", "default": []}),
)


@pytest.mark.parametrize("dockerfile", sorted(p.name for p in ROOT.glob("Dockerfile*")))
def test_images_install_what_the_tests_ran(dockerfile: str) -> None:
    pins = constraints()
    image = read_image(dockerfile)
    assert image.pip_installs, f"{dockerfile} installs nothing with pip"
    problems = []
    torch_from: str | None = None
    for args, copied in image.pip_installs:
        opts = _PIP_INSTALL.parse_known_args(args)[0]
        if not any(PurePosixPath(c).name == "constraints.txt" for c in opts.constraint):
            problems.append(f"pip install {shlex.join(args)}: not held to constraints.txt")
        elif "constraints.txt" not in copied:
            problems.append(f"pip install {shlex.join(args)}: constraints.txt is not copied in")
        indexes = [*opts.index_url, *opts.extra_index_url]
        for operand in opts.operands:
            requirement = Requirement(operand)
            name = canonicalize_name(requirement.name)
            versions = [Version(s.version) for s in requirement.specifier if s.operator == "=="]
            if name not in pins or len(versions) != 1 or versions[0].public != str(pins[name]):
                problems.append(f"{operand}: constraints.txt pins {name}=={pins.get(name)}")
                continue
            local = versions[0].local
            if local and not any(url.rstrip("/").endswith(f"/whl/{local}") for url in indexes):
                problems.append(f"{operand}: no index of {local} builds among {indexes}")
            if name == "torch" and local and local.startswith("cu"):
                torch_from = operand
        if any(re.search(r"\[.*\bworker\b.*\]", e) for e in opts.editable) and torch_from is None:
            problems.append(
                f"pip install {shlex.join(args)}: torch's CUDA build (torch==VERSION+cuNNN, "
                "from its index) is not installed before the worker extra"
            )
    assert not problems, "\n".join(problems)


def test_long_running_services_restart() -> None:
    one_shot = {
        dependency
        for service in SERVICES.values()
        if isinstance(service.get("depends_on"), dict)
        for dependency, condition in service["depends_on"].items()
        if condition.get("condition") == "service_completed_successfully"
    }
    missing = [
        name
        for name, service in SERVICES.items()
        if name not in one_shot
        and service.get("restart") not in ("always", "unless-stopped", "on-failure")
        and "restart_policy" not in service.get("deploy", {})
    ]
    assert not missing, f"no restart policy: {missing}"
