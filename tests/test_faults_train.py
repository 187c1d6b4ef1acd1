"""Fault injection on the training side, through the real entry points (CPU, the tiny world of tests/test_train.py):
kill -9 in the middle of a checkpoint write then an exact resume, a second run on a busy output_dir (one process and
two ranks through the `deepspeed` launcher), data with no usable sample, a full disk while saving (an injected
ENOSPC, and a real small tmpfs where the test may mount one), damaged checkpoints on resume, and every error found
while building a run as one `vora-train: error:` line.

Real runs cost ~30 s each on 2 cores, so there are few: a reference run (`vora-train` without any launcher
variable), a run killed while saving and its resume, a resume past a damaged checkpoint, a zero-data run, and two
refused runs that stop before any model is loaded. The rest calls `vora.train.main([...])` in-process.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers_data import write_jsonl
from tests.train_world import (
    REPO,
    TINY,
    _base_overrides,
    _env,
    _free_port,
    _recipe,
    _trainer,
    assert_same_steps,
    build_train_world,
    step_logs,
)

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
KEYS = ("loss", "lm_loss", "distill_loss", "grad_norm", "learning_rate")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_train_world(tmp_path_factory.mktemp("train_world"))


def _no_launcher_env() -> dict:
    env = _env(single=False)
    for k in LAUNCHER_VARS:
        env.pop(k, None)
    return env


def run_code(world, out, prelude="", timeout=300, **extra) -> subprocess.CompletedProcess:
    """`vora.train.main` in a fresh interpreter without launcher variables; ``prelude`` runs first (fault injection
    on the test side: product code has no test hooks)."""
    code = prelude + "\nimport sys\nfrom vora.train import main\nsys.argv[0] = 'vora-train'\nsys.exit(main())\n"
    cmd = [sys.executable, "-c", code, str(TINY), *_base_overrides(world, out, **extra)]
    return subprocess.run(cmd, cwd=REPO, env=_no_launcher_env(), capture_output=True, text=True, timeout=timeout)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one `vora-train: error:` line of a failed run (exit 2, no traceback)."""
    # (a progress bar may still be on the terminal line the message starts on)
    lines = [ln[ln.index("vora-train: error:"):] for ln in proc.stderr.splitlines() if "vora-train: error:" in ln]
    assert proc.returncode == 2 and len(lines) == 1, \
        f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return lines[0]


# ---------------------------------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def reference(world):
    """6 steps, checkpoints every 2 (keep 2), through the `vora-train` console script with no launcher variable
    set (README's one-process example): DeepSpeed must not go looking for MPI."""
    out = world / "fault_reference"
    cmd = [str(Path(sys.executable).parent / "vora-train"), str(TINY),
           *_base_overrides(world, out, **{"train.save_steps": 2})]
    proc = subprocess.run(cmd, cwd=REPO, env=_no_launcher_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return out, proc


@pytest.mark.e2e
def test_one_process_without_launcher_variables(reference):
    from vora.checkpoint import MANIFEST, validate_checkpoint

    out, proc = reference
    assert "mpi4py" not in proc.stdout + proc.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert (out / "final" / "adapter_model.safetensors").is_file() and not list(out.glob(".tmp-*"))
    for ck in ("checkpoint-4", "checkpoint-6"):
        validate_checkpoint(out / ck)
        manifest = json.loads((out / ck / MANIFEST).read_text())
        run = json.loads((out / ck / "vora_run.json").read_text())
        assert manifest["run_id"] == run["run_id"] and "adapter_model.safetensors" in manifest["files"]
    assert (out / ".vora-run.lock").read_text() == ""  # released at the end of a clean run


KILL_AT_STEP_4 = """
import os, signal
import vora.trainer as _t
_orig = _t.VoRATrainer._save_optimizer_and_scheduler
def _killing(self, output_dir):
    _orig(self, output_dir)  # the weights and the optimizer are in the temporary directory; the rest is not
    if self.state.global_step == 4:
        os.kill(os.getpid(), signal.SIGKILL)
_t.VoRATrainer._save_optimizer_and_scheduler = _killing
"""


@pytest.mark.e2e
def test_kill9_while_saving_then_resume_is_exact(world, reference, tmp_path):
    """kill -9 in the middle of writing checkpoint-4: checkpoint-2 stays the newest, the half-written save is only
    a `.tmp-checkpoint-4-<run id>`, the dead run's lock is taken over, its temporary directory removed, and the
    resumed run's steps 3–6 equal the uninterrupted run's."""
    ref, _ = reference
    out = tmp_path / "killed"
    proc = run_code(world, out, prelude=KILL_AT_STEP_4, **{"train.save_steps": 2})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    left = list(out.glob(".tmp-checkpoint-4-*"))
    assert len(left) == 1 and (left[0] / "adapter_model.safetensors").exists()
    holder = json.loads((out / ".vora-run.lock").read_text())
    assert holder["host"] == socket.gethostname() and holder["pid"] > 0

    resumed = run_code(world, out, **{"train.save_steps": 2, "train.resume_from_checkpoint": "auto"})
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"PID {holder['pid']}" in resumed.stdout and "taking over the lock" in resumed.stdout
    assert "left by a run that died while saving" in resumed.stdout and not list(out.glob(".tmp-*"))
    assert "resuming from" in resumed.stdout and str(out / "checkpoint-2") in resumed.stdout
    assert_same_steps(step_logs(ref), step_logs(out), [3, 4, 5, 6], keys=KEYS)


@pytest.mark.e2e
def test_damaged_newest_checkpoint_auto_falls_back(world, reference, tmp_path):
    """A truncated safetensors file in the newest checkpoint: `auto` warns and resumes from the newest intact one
    (exactly); naming the damaged checkpoint explicitly is a one-line error naming the file."""
    ref, _ = reference
    out = tmp_path / "damaged"
    shutil.copytree(ref, out)
    broken = out / "checkpoint-6" / "adapter_model.safetensors"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])

    proc = run_code(world, out, **{"train.save_steps": 2, "train.resume_from_checkpoint": "auto"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "not resuming from checkpoint-6" in proc.stdout and str(broken) in proc.stdout
    assert "the newest intact checkpoint" in proc.stdout
    assert_same_steps(step_logs(ref), step_logs(out), [5, 6], keys=KEYS)


@contextlib.contextmanager
def lock_holder(out: Path):
    """Another live run, as far as the lock can tell: a process holding output_dir's lock."""
    code = ("import sys, time\nfrom vora.runlock import RunLock\nRunLock(sys.argv[1]).acquire()\n"
            "print('locked', flush=True)\ntime.sleep(600)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=REPO, env=_env(single=False),
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        yield p
    finally:
        p.kill()
        p.wait()


@pytest.mark.e2e
def test_second_run_on_a_busy_output_dir_is_refused(world, tmp_path):
    """While a run holds output_dir, another is refused at once — one process, and two ranks through the deepspeed
    launcher (rank 1 learns of the refusal, nothing hangs) — naming the holder; nothing of the holder's is touched.
    When the holder dies (kill -9) its lock is taken over."""
    from vora.runlock import RunLock

    out = tmp_path / "busy"
    with lock_holder(out) as holder:
        t0 = time.time()
        line = error_line(run_code(world, out))
        assert f"is in use by another vora-train run: PID {holder.pid} on host {socket.gethostname()}" in line
        assert time.time() - t0 < 120
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()),
               "--module", "vora.train", str(TINY),
               *_base_overrides(world, out, **{"train.per_device_train_batch_size": 1})]
        proc = subprocess.run(cmd, cwd=REPO, env=_env(single=False), capture_output=True, text=True, timeout=240)
        assert proc.returncode != 0
        assert f"PID {holder.pid}" in proc.stdout + proc.stderr
        assert sorted(p.name for p in out.iterdir()) == [".vora-run.lock"]  # the refused runs wrote nothing
    lock = RunLock(out).acquire()  # the holder was killed: its lock is free again
    lock.release()


@pytest.mark.e2e
def test_no_usable_sample_stops_before_any_checkpoint(world, tmp_path):
    """Every image missing: the run stops with the skip counts by reason (before the first checkpoint, no final/)
    instead of training 'successfully' at loss 0."""
    rows = [{"image": f"nowhere/{i}.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                            {"from": "gpt", "value": "A dog."}]} for i in range(16)]
    write_jsonl(str(tmp_path / "bad.jsonl"), rows)
    out = tmp_path / "nothing"
    proc = run_code(world, out, **{"data.sources.0.path": str(tmp_path / "bad.jsonl"), "train.max_steps": 20})
    line = error_line(proc)
    assert "no usable sample" in line and "image_missing" in line, line
    assert not (out / "final").exists() and not list(out.glob("checkpoint-*"))
    assert json.loads((out / "data_report.json").read_text())["ok"] == 0


# ---------------------------------------------------------------------------------------------------- in process
def test_skip_fraction_rule():
    """DataReportCallback: more than data.max_skip_fraction skipped stops (once enough samples were read to judge);
    all skipped stops whatever the fraction; counts by reason in the message."""
    from vora.data import BadSampleCounter, DataError
    from vora.trainer import DataReportCallback

    class Data:
        def __init__(self, n):
            self.n, self.stats = n, BadSampleCounter()

        def __len__(self):
            return self.n

    class State:
        global_step, epoch = 8, 1.0

    class Control:
        should_save = False

    def feed(ds, ok, missing, too_long=0):
        for _ in range(ok):
            ds.stats.add("ok")
        if missing:
            ds.stats.add("image_missing", "f:1", "gone", n=missing)
        if too_long:
            ds.stats.add("images_exceed_max_length", "f:2", "long", n=too_long)

    ds = Data(1000)
    cb = DataReportCallback(ds, "/nonexistent-never-written", is_main=False, max_skip_fraction=0.5)
    feed(ds, 2, 3)
    cb.on_step_end(None, State(), Control())  # 5 samples: too few to judge a fraction
    feed(ds, 38, 57)  # 40 ok, 60 skipped
    with pytest.raises(DataError, match=r"60 of 100 samples .*60%: image_missing 60.*data.max_skip_fraction 0.5"):
        cb.on_step_end(None, State(), Control())
    ds = Data(1000)
    cb = DataReportCallback(ds, "/nonexistent-never-written", is_main=False, max_skip_fraction=0.7)
    feed(ds, 40, 60)
    cb.on_step_end(None, State(), Control())  # 60 % <= 70 %: trains on
    ds = Data(1000)
    cb = DataReportCallback(ds, "/nonexistent-never-written", is_main=False, max_skip_fraction=1.0)
    feed(ds, 0, 1, too_long=2)
    with pytest.raises(DataError, match=r"no usable sample: all 3 .*images_exceed_max_length 2, image_missing 1"):
        cb.on_epoch_end(None, State(), Control())


def _main_error(capsys, world, out, *extra, exc=None):
    """`vora.train.main([...])` in-process (no DeepSpeed): the one `vora-train: error:` line it prints."""
    from vora.checkpoint import CheckpointError
    from vora.config import ConfigError
    from vora.data import DataError
    from vora.runlock import RunLockError
    from vora.train import main

    argv = [str(TINY), *_base_overrides(world, out, **{"train.deepspeed": "null"}), *extra]
    with pytest.raises(exc or (ConfigError, CheckpointError, DataError, RunLockError)):
        main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("vora-train: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]  # (loading progress bars share stderr)
    return lines[0]


def test_missing_paths_are_one_line_at_once_also_with_print_config(world, tmp_path, capsys):
    out = tmp_path / "o"
    for extra, expected in [
        ([f"data.sources.0.path={tmp_path / 'none.jsonl'}"],
         "command line: data.sources.0.path: no such file or directory"),
        ([f"model.llm={tmp_path / 'no_llm'}"], f"command line: model.llm: no such directory: {tmp_path / 'no_llm'}"),
        ([f"distill.teacher={tmp_path / 'no_vit'}"], "command line: distill.teacher: no such directory"),
        ([f"data.sources.0.image_root={tmp_path / 'no_img'}"], "data.sources.0.image_root: no such directory"),
    ]:
        for flag in ([], ["--print-config"]):
            t0 = time.time()
            line = _main_error(capsys, world, out, *extra, *flag)
            assert expected in line and time.time() - t0 < 20, line  # no hub retries
    assert not out.exists()


@pytest.mark.parametrize("case", ["empty_data", "teacher_not_vit", "lora_too_deep", "lora_target", "lr", "batch",
                                  "output_is_file"])
def test_late_errors_are_one_line(world, tmp_path, capsys, case):
    """Each error found while building or starting a run is one line naming the key or file and the fix."""
    out = tmp_path / "o"
    if case == "empty_data":
        (tmp_path / "empty.jsonl").write_text("")
        line = _main_error(capsys, world, out, f"data.sources.0.path={tmp_path / 'empty.jsonl'}")
        assert f"data.sources.0.path: {tmp_path / 'empty.jsonl'} holds no record" in line
    elif case == "teacher_not_vit":
        line = _main_error(capsys, world, out, f"distill.teacher={world / 'llm'}")
        assert "distill.teacher" in line and "is not a vision transformer (Qwen2Config" in line
    elif case == "lora_too_deep":
        line = _main_error(capsys, world, out, "lora.layers=9", "distill.num_blocks=2")
        assert "command line: lora.layers: 9 is beyond the LLM depth (4 blocks)" in line
    elif case == "lora_target":
        line = _main_error(capsys, world, out, "lora.targets=[q_proj, qkv]")
        assert "command line: lora.targets: unknown target module 'qkv'" in line and "q_proj" in line
    elif case == "lr":
        assert "command line: train.learning_rate: expected >= 0, got -0.001" in _main_error(
            capsys, world, out, "train.learning_rate=-1e-3")
    elif case == "batch":
        assert "command line: train.per_device_train_batch_size: expected >= 1, got 0" in _main_error(
            capsys, world, out, "train.per_device_train_batch_size=0")
    elif case == "output_is_file":
        (tmp_path / "file").write_text("mine")
        line = _main_error(capsys, world, tmp_path / "file")
        assert "train.output_dir: cannot use" in line and "Not a directory" in line
        assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.e2e
@pytest.mark.parametrize("case", ["truncated", "empty_run_file", "mixed"])
def test_damaged_checkpoint_given_by_path_is_one_line(world, reference, tmp_path, capsys, case):
    """Truncated safetensors, a 0-byte vora_run.json, files of two runs: one line naming the file."""
    ref, _ = reference
    ck = tmp_path / "checkpoint-6"
    shutil.copytree(ref / "checkpoint-6", ck)
    if case == "truncated":
        bad = ck / "vora_trainable.safetensors"
        bad.write_bytes(bad.read_bytes()[:100])
    elif case == "empty_run_file":
        bad = ck / "vora_run.json"
        bad.write_text("")
    else:  # files of two runs in one directory
        bad = ck
        manifest = json.loads((ck / "vora_checkpoint.json").read_text())
        (ck / "vora_checkpoint.json").write_text(json.dumps({**manifest, "run_id": "0123456789ab"}))
    line = _main_error(capsys, world, tmp_path / "o", f"train.resume_from_checkpoint={ck}")
    assert "train.resume_from_checkpoint" in line and str(bad) in line, line
    if case == "mixed":
        assert "come from different runs" in line


@pytest.mark.e2e
def test_auto_resume_with_every_checkpoint_damaged_is_an_error(world, reference, tmp_path):
    from vora.checkpoint import CheckpointError
    from vora.train import _resume_target

    ref, _ = reference
    out = tmp_path / "o"
    for ck in ("checkpoint-4", "checkpoint-6"):
        shutil.copytree(ref / ck, out / ck)
        (out / ck / "trainer_state.json").write_text("{")
    recipe = _recipe(world, out, "train.resume_from_checkpoint=auto")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .* \(2 damaged; newest: .*checkpoint-6"):
        _resume_target(recipe, str(out))


# ---------------------------------------------------------------------------------------------------- full disk
def test_enospc_while_saving_leaves_nothing_and_says_why(world, tmp_path, monkeypatch):
    """An OSError(ENOSPC) in the middle of a checkpoint: the temporary directory is removed, the error is one line
    naming the checkpoint, the cause and the free space; the next save works."""
    from vora.checkpoint import CheckpointError

    out = tmp_path / "o"
    trainer = _trainer(_recipe(world, out, "train.save_only_model=true"))
    trainer.state.global_step = 7
    real = trainer._write_weights

    def full(directory):
        real(directory)  # most of the checkpoint is there when the disk fills up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(directory) / "rng_state.pth"))

    monkeypatch.setattr(trainer, "_write_weights", full)
    with pytest.raises(CheckpointError) as e:
        trainer._save_checkpoint(trainer.model, None)
    msg = str(e.value)
    assert "\n" not in msg and f"saving {out / 'checkpoint-7'} failed" in msg
    assert "No space left on device" in msg and " free on " in msg and str(out) in msg
    assert sorted(p.name for p in out.iterdir()) == []  # no .tmp-checkpoint-7-*, no checkpoint-7
    monkeypatch.setattr(trainer, "_write_weights", real)
    trainer._save_checkpoint(trainer.model, None)
    assert (out / "checkpoint-7" / "adapter_model.safetensors").is_file() and not list(out.glob(".tmp-*"))


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str, readonly=False):
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                                                       capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_really_full_disk_while_saving(world, tmp_path):
    """The same on a real 64 KiB filesystem (safetensors / torch report a full disk in their own words)."""
    from vora.checkpoint import CheckpointError

    with small_tmpfs(tmp_path / "small", "64k") as disk:
        out = disk / "o"
        trainer = _trainer(_recipe(world, out, "train.save_only_model=true"))
        trainer.state.global_step = 3
        with pytest.raises(CheckpointError, match=r"saving .*checkpoint-3 failed .*free on"):
            trainer._save_checkpoint(trainer.model, None)
        assert sorted(p.name for p in out.iterdir()) == []
        assert shutil.disk_usage(disk).used < 16 * 1024  # the space is given back


def test_read_only_output_and_cache_dirs_are_one_line(world, tmp_path, capsys):
    with small_tmpfs(tmp_path / "ro", "1m", readonly=True) as ro:
        line = _main_error(capsys, world, ro / "out")
        assert "command line: train.output_dir: cannot use" in line and "Read-only file system" in line
        line = _main_error(capsys, world, tmp_path / "o", f"data.cache_dir={ro / 'cache'}")
        assert "command line: data.cache_dir: cannot write the data cache" in line and "Read-only" in line
