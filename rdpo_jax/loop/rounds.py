"""The loop's rounds: each stage one command in a subprocess, recorded in the round's manifest.

RUNS/round_NNN/manifest.json holds, per stage: the command (module and arguments), its inputs and their
fingerprints (taken when the stage first starts), its outputs and their fingerprints (when it finishes),
status (running | done | skipped | failed | interrupted), attempts, seconds and the log file. A stage's
command is built when it first starts and reused verbatim on every later attempt, so that an
interrupted stage is resumed by the same command (each command resumes its own partial output); a
finished stage is never run again. A stage whose inputs changed since its first attempt is refused.
Once SIGTERM arrived (`terminate`), no stage starts: the round is recorded as interrupted.

Testing only: RDPO_TEST_KILL_LOOP_AT="ROUND/STAGE:VAR=VALUE" passes VAR=VALUE (a command's own crash
hook, e.g. RDPO_TEST_KILL_AT_RECORD=3) to that stage's first attempt, and when the stage dies of SIGKILL
the loop SIGKILLs itself: the whole machine went down, nothing recorded the stage's end.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

KILL_ENV = "RDPO_TEST_KILL_LOOP_AT"  # testing only: see the module docstring
MANIFEST = "manifest.json"


class StageFailed(SystemExit):
    pass


def round_dir(workdir: str, r: int) -> str:
    return os.path.join(workdir, f"round_{r:03d}")


def is_dataset(path: str) -> bool:
    return os.path.exists(path + ".manifest.json")


def fingerprint(path: str) -> str:
    """Identifies an input: a dataset by its manifest's content, a training run by its latest complete
    checkpoint (step and files), another folder (an HF model) by its files' names, sizes and mtimes, a
    file by its content."""
    from rdpo_jax import checkpoint

    digest = hashlib.sha256()
    if is_dataset(path):
        with open(path + ".manifest.json", "rb") as f:
            manifest = json.loads(f.read())
        digest.update(json.dumps([manifest["kind"], manifest["shards"]], sort_keys=True).encode())
        return f"dataset:{manifest['count']}:{digest.hexdigest()[:16]}"
    if checkpoint.is_run_dir(path):
        steps = checkpoint.saved_steps(path)
        if not steps:
            return "run:none"
        _files_digest(digest, os.path.join(path, "checkpoints", str(steps[-1])))
        return f"run:{steps[-1]}:{digest.hexdigest()[:16]}"
    if os.path.isdir(path):
        _files_digest(digest, path)
        return "folder:" + digest.hexdigest()[:16]
    if os.path.isfile(path):
        with open(path, "rb") as f:
            digest.update(f.read())
        return "file:" + digest.hexdigest()[:16]
    return "missing"


def _files_digest(digest, folder: str) -> None:
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(root, name)
            st = os.stat(p)
            digest.update(f"{os.path.relpath(p, folder)}:{st.st_size}:{st.st_mtime_ns}\n".encode())


class Round:
    """One round's manifest and the running of its stages (see the module doc). `stop`: set once the
    loop was asked to stop (shared by the loop's rounds, so that a SIGTERM between two rounds counts too)."""

    def __init__(self, workdir: str, r: int, env: dict, cwd: str, stop: threading.Event | None = None):
        self.r, self.dir, self.env, self.cwd = r, round_dir(workdir, r), env, cwd
        self.stop = stop or threading.Event()
        self.path = os.path.join(self.dir, MANIFEST)
        os.makedirs(os.path.join(self.dir, "logs"), exist_ok=True)
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.m = json.load(f)
        else:
            self.m = {"round": r, "status": "running", "stages": {}}
        self.child: subprocess.Popen | None = None

    @property
    def done(self) -> bool:
        return self.m["status"] == "done"

    def stage(self, name: str) -> dict | None:
        return self.m["stages"].get(name)

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.m, f, indent=2)
        os.replace(tmp, self.path)

    def skip(self, name: str, note: str) -> None:
        """Records stage `name` as not needed (e.g. training on zero pairs)."""
        if self.stage(name) is None:
            self.m["stages"][name] = {"status": "skipped", "note": note}
            self.save()
            print(f"[loop] round {self.r} {name}: skipped ({note})", flush=True)

    def run(self, name: str, build, *, finished=None) -> dict:
        """Runs stage `name` unless it finished before. `build()` -> (module, args, inputs, outputs) is
        called on the first attempt only; `finished(stage)` -> None or why the command's exit 0 is not a
        finished stage (a training run stopped by SIGTERM saves and exits 0)."""
        st = self.stage(name)
        if st is not None and st["status"] in ("done", "skipped"):
            return st
        if self.stop.is_set():  # SIGTERM between two stages: start nothing new
            self.m.update(status="interrupted", note=f"stopped (SIGTERM) before {name}")
            self.save()
            raise StageFailed(f"[loop] round {self.r} {name}: not started (SIGTERM); rerun the same command to resume")
        if st is None:
            module, args, inputs, outputs = build()
            st = {"module": module, "args": args, "inputs": inputs, "outputs": outputs, "status": "pending",
                  "attempts": 0, "seconds": 0.0, "log": os.path.join(self.dir, "logs", f"{name}.log"),
                  "input_fingerprints": {k: fingerprint(v) for k, v in inputs.items()}}
            self.m["stages"][name] = st
        else:
            now = {k: fingerprint(v) for k, v in st["inputs"].items()}
            changed = [f"{k} ({st['inputs'][k]}: {st['input_fingerprints'][k]} → {now[k]})"
                       for k in now if now[k] != st["input_fingerprints"][k]]
            if changed:
                raise StageFailed(
                    f"[loop] round {self.r} {name}: its inputs changed since its first attempt: {', '.join(changed)}. "
                    f"Resuming would mix outputs of two inputs; delete its outputs ({', '.join(st['outputs'].values())}) "
                    f"and the stage's entry in {self.path} to start it over")
        st["status"], st["attempts"] = "running", st["attempts"] + 1
        self.m.update(status="running", note="")
        self.save()
        env, kill_hook = self._env(name, st)
        again = f", attempt {st['attempts']}" if st["attempts"] > 1 else ""
        print(f"[loop] round {self.r} {name}{again} … (log {st['log']})", flush=True)
        t0 = time.perf_counter()
        with open(st["log"], "a") as log:
            log.write(f"$ python -m {st['module']} {' '.join(st['args'])}\n")
            log.flush()
            self.child = subprocess.Popen([sys.executable, "-m", st["module"], *st["args"]], cwd=self.cwd, env=env,
                                          stdout=log, stderr=subprocess.STDOUT)
            if self.stop.is_set():  # SIGTERM came after the check above, while no child was there to pass it to
                self.child.send_signal(signal.SIGTERM)
            code = self.child.wait()
            self.child = None
        st["seconds"] = round(st["seconds"] + time.perf_counter() - t0, 1)
        if code == -signal.SIGKILL and kill_hook:
            os.kill(os.getpid(), signal.SIGKILL)
        why = None if code != 0 else (finished(st) if finished else None)
        if code != 0 or why:
            st["status"] = "failed" if code != 0 and not self.stop.is_set() else "interrupted"
            self.save()
            with open(st["log"]) as f:
                tail = f.read()[-3000:]
            reason = f"exit {code}" if code != 0 else why
            raise StageFailed(f"[loop] round {self.r} {name}: {reason} (log {st['log']}):\n{tail}\n"
                              f"[loop] rerun the same command to resume at this stage")
        st["status"] = "done"
        st["output_fingerprints"] = {k: fingerprint(v) for k, v in st["outputs"].items()}
        self.save()
        print(f"[loop] round {self.r} {name}: {st['seconds']:.0f} s", flush=True)
        return st

    def _env(self, name: str, st: dict) -> tuple[dict, bool]:
        hook = os.environ.get(KILL_ENV, "")
        where, _, assignment = hook.partition(":")
        if hook and where == f"{self.r}/{name}" and st["attempts"] == 1:
            var, _, value = assignment.partition("=")
            return dict(self.env, **{var: value}), True
        return self.env, False

    def terminate(self) -> None:
        """Stops the loop: no stage starts any more, and the running one gets SIGTERM (a training run saves
        its step and exits)."""
        self.stop.set()
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)
