"""Fixtures: a fake OpenRouter and a real orproxy, both on ephemeral loopback ports.

Both are the repository's own binaries (built by `cargo build`); readiness is read from what
they print, never waited for with a sleep.
"""

import atexit
import json
import os
import pathlib
import queue
import shutil
import subprocess
import tempfile
import threading

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "debug"
PROXY_KEY = "sk-orproxy-test-key"
FAKE_ANTHROPIC_KEY = "sk-ant-test-upstream-key"
READY_TIMEOUT = 30


def binary(name):
    path = pathlib.Path(os.environ.get(f"{name.upper().replace('-', '_')}_BIN", TARGET / name))
    if not path.exists():
        raise RuntimeError(f"{path} is missing: run `cargo build --workspace` first")
    return str(path)


class Process:
    """A child process whose output lines are collected by a reader thread."""

    def __init__(self, args, env, stream):
        self.proc = subprocess.Popen(
            args,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE if stream == "stdout" else subprocess.DEVNULL,
            stderr=subprocess.PIPE if stream == "stderr" else None,
            text=True,
        )
        self.lines = queue.Queue()
        self.log = []
        source = self.proc.stdout if stream == "stdout" else self.proc.stderr
        threading.Thread(target=self._pump, args=(source,), daemon=True).start()

    def _pump(self, source):
        for line in source:
            self.log.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, predicate):
        while True:
            try:
                line = self.lines.get(timeout=READY_TIMEOUT)
            except queue.Empty:
                raise RuntimeError("process did not become ready:\n" + "".join(self.log))
            if line is None:
                raise RuntimeError("process exited before it was ready:\n" + "".join(self.log))
            found = predicate(line)
            if found:
                return found

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def json_line(line):
    try:
        return json.loads(line)
    except ValueError:
        return None


@pytest.fixture(scope="session")
def fake_openrouter():
    fake = Process([binary("fake-upstream"), "--dialect", "openrouter"], dict(os.environ), "stdout")
    info = fake.wait_for(json_line)
    yield info["base_url"]
    fake.stop()


@pytest.fixture(scope="session")
def fake_anthropic():
    fake = Process(
        [binary("fake-upstream"), "--dialect", "anthropic", "--api-key", FAKE_ANTHROPIC_KEY],
        dict(os.environ),
        "stdout",
    )
    info = fake.wait_for(json_line)
    yield info["base_url"]
    fake.stop()


def state_directory():
    """A fresh directory for a daemon's usage database, removed when the test run ends."""
    path = tempfile.mkdtemp(prefix="orproxy-sdk-")
    atexit.register(shutil.rmtree, path, True)
    return path


def start_orproxy(config, env_extra):
    """Starts orproxy with `config` (YAML text); returns the process and its /v1 base URL."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(config)
    env = dict(os.environ)
    env.pop("OPENROUTER_API_KEY", None)
    env.pop("ANTHROPIC_API_KEY", None)
    env["ORPROXY_TEST_KEY"] = PROXY_KEY
    env["STATE_DIRECTORY"] = state_directory()
    env.update(env_extra)
    env.setdefault("RUST_LOG", "info")
    args = [
        binary("orproxy"), "--config", f.name,
        "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log-format", "json",
    ]
    proxy = Process(args, env, "stderr")

    def ready(line):
        event = json_line(line)
        return event if event and event.get("message") == "Ready." else None

    event = proxy.wait_for(ready)
    os.unlink(f.name)
    return proxy, f"http://{event['listen']}/v1"


@pytest.fixture(scope="session")
def orproxy_anthropic(fake_anthropic):
    """orproxy whose default backend is the fake Anthropic. Yields its /v1 base URL."""
    proxy, base = start_orproxy(
        f"""
backends:
  claude:
    type: anthropic
    base_url: {fake_anthropic}
default_backend: claude
auth:
  keys:
    - name: tests
      key_env: ORPROXY_TEST_KEY
""",
        {"ANTHROPIC_API_KEY": FAKE_ANTHROPIC_KEY},
    )
    yield base
    proxy.stop()


@pytest.fixture(scope="session")
def orproxy(fake_openrouter):
    """orproxy in front of the fake OpenRouter, with one proxy key. Yields its /v1 base URL."""
    proxy, base = start_orproxy(
        f"""
backends:
  openrouter:
    type: openrouter
    base_url: {fake_openrouter}
    api_key_env: FAKE_OPENROUTER_KEY
default_backend: openrouter
auth:
  keys:
    - name: tests
      key_env: ORPROXY_TEST_KEY
limits:
  commit_after: 5s
""",
        {"FAKE_OPENROUTER_KEY": "sk-or-v1-fake-" + "0" * 64},
    )
    yield base
    proxy.stop()
