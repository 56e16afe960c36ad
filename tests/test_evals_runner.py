"""The resumable runner (crash, torn line, manifest), two-process sharding, and the ``vlmkit eval`` CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from PIL import Image

import vlmkit
from vlmkit.cli import main
from vlmkit.errors import ConfigError
from vlmkit.evals import runner
from vlmkit.evals.files import data_file


class Crash(Exception):
    pass


class FakeModel:
    """Answers "yes <prompt>"; raises Crash after ``crash_after`` prompts."""

    def __init__(self, crash_after: int | None = None):
        self.crash_after, self.prompts = crash_after, []

    def __call__(self, images, prompts):
        if self.crash_after is not None and len(self.prompts) + len(prompts) > self.crash_after:
            raise Crash
        self.prompts += prompts
        return [vlmkit.Generation(f"yes {p}", [], {"new_tokens": 2}) for p in prompts]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for index in range(3):
        Image.new("RGB", (24, 24), (40 * index, 90, 200)).save(folder / f"{index}.png")
    return folder


def items(image_dir, n=10):
    return [runner.Item(f"q{i}", str(image_dir / f"{i % 3}.png"), f"question {i}", {"n": i}) for i in range(n)]


def test_resume_after_crash_and_torn_line(tmp_path, image_dir):
    out, manifest = tmp_path / "run", {"task": "test", "model": "fake"}
    with pytest.raises(Crash):
        runner.run(runner.per_batch(FakeModel(crash_after=5)), items(image_dir), out, manifest, batch_size=2,
                   progress=False)
    part = out / "predictions.part0.jsonl"
    assert len(part.read_text().splitlines()) == 4  # two full batches were fsynced before the crash
    with open(part, "a") as handle:  # a kill -9 in the middle of writing the fifth record
        handle.write('{"id": "q4", "n": 4, "prompt": "question 4", "te')
    second = FakeModel()
    records = runner.run(runner.per_batch(second), items(image_dir), out, manifest, batch_size=2, progress=False)
    assert second.prompts == [f"question {i}" for i in range(4, 10)]
    assert [r["id"] for r in records] == [f"q{i}" for i in range(10)]
    assert [r["text"] for r in records] == [f"yes question {i}" for i in range(10)]
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert lines == records
    assert sorted(json.loads(line)["id"] for line in part.read_text().splitlines()) == sorted(r["id"] for r in records)
    third = FakeModel()
    assert runner.run(runner.per_batch(third), items(image_dir), out, manifest, progress=False) == records
    assert third.prompts == []


def test_manifest_mismatch_is_refused(tmp_path, image_dir):
    out = tmp_path / "run"
    run = runner.per_batch(FakeModel())
    runner.run(run, items(image_dir, 2), out, {"task": "test", "model": "a"}, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["run"]["batch_size"] == 1 and "torch" in manifest["versions"]
    runner.run(run, items(image_dir, 3), out, {"task": "test", "model": "a"}, batch_size=4, progress=False)
    with pytest.raises(ConfigError, match="differs in: model"):
        runner.run(run, items(image_dir, 2), out, {"task": "test", "model": "b"}, progress=False)


SHARD_SCRIPT = """
import sys

import vlmkit
from vlmkit.evals import runner
from vlmkit.testing import tiny_model

image_dir, out = sys.argv[1], sys.argv[2]
vlm = vlmkit.wrap(*tiny_model("llava"))
prompts = ["Describe the image.", "Is there a dog?"]
items = [runner.Item(f"q{i}", f"{image_dir}/{i % 3}.png", prompts[i % 2]) for i in range(7)]
generate = lambda batches: vlm.generate_batches(batches, max_new_tokens=4)
shard = runner.shard_from_env()
runner.run(generate, items, f"{out}/two", {"task": "shard-test"}, shard=shard, progress=False)
if shard.rank == 0:  # then the same items in one process (default Shard: world size 1)
    runner.run(generate, items, f"{out}/one", {"task": "shard-test"}, progress=False)
"""


def test_two_gloo_processes_equal_one(tmp_path, image_dir):
    """A real torchrun launch of two gloo ranks (fresh processes, no fork after torch threads); rank 0 then
    repeats the run alone. The merged file must equal the single-process one."""
    script = tmp_path / "shard_run.py"
    script.write_text(SHARD_SCRIPT)
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
               str(image_dir), str(tmp_path)]
    with subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True) as launch:
        try:
            output, _ = launch.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(launch.pid, signal.SIGKILL)  # torchrun and both ranks
            launch.communicate()
            pytest.fail("the two-process run did not finish within 120 s")
    assert launch.returncode == 0, output[-3000:]
    two = tmp_path / "two"
    parts = [(two / f"predictions.part{rank}.jsonl").read_text().splitlines() for rank in range(2)]
    assert [[json.loads(line)["id"] for line in part] for part in parts] == [["q0", "q2", "q4", "q6"],
                                                                             ["q1", "q3", "q5"]]
    one = (tmp_path / "one" / "predictions.jsonl").read_text()
    assert [json.loads(line)["id"] for line in one.splitlines()] == [f"q{i}" for i in range(7)]
    assert (two / "predictions.jsonl").read_text() == one


def test_cli_score_only_chair_and_pope(tmp_path, capsys):
    captions = tmp_path / "caps.jsonl"
    captions.write_text('{"image_id": 42, "caption": "A dog and a cat."}\n')  # GT of 42 is {dog}
    assert main(["eval", "chair", "--predictions", str(captions), "--pipeline", "offline",
                 "--out", str(tmp_path / "c")]) == 0
    metrics = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert (metrics["chair_s"], metrics["chair_i"], metrics["recall"]) == (1.0, 0.5, 1.0)
    assert metrics["pipeline"] == "offline"
    assert "100.0" in capsys.readouterr().out

    questions = tmp_path / "coco_pope_random.json"
    questions.write_text("".join(json.dumps({"question_id": i, "image": "x.jpg", "text": "Is there a dog?",
                                             "label": "yes" if i % 2 else "no"}) + "\n" for i in range(1, 5)))
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": i, "text": t}) + "\n"
                               for i, t in enumerate(["Yes.", "No, there is not.", "No.", "There isn't."], 1)))
    assert main(["eval", "pope", "--predictions", str(answers), "--questions", str(questions),
                 "--out", str(tmp_path / "p")]) == 0
    pope_metrics = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert pope_metrics["accuracy"] == 0.5 and pope_metrics["yes_ratio"] == 0.5  # P1 reads "isn't" as yes
    assert pope_metrics["splits"]["random"]["tp"] == 1
    assert main(["eval", "pope", "--predictions", str(answers), "--questions", str(questions), "--parser",
                 "opera"]) == 0
    assert "random" in capsys.readouterr().out

    answers.write_text('{"question_id": 1, "text": 3}\n')
    assert main(["eval", "pope", "--predictions", str(answers), "--questions", str(questions)]) == 2
    assert "answers.jsonl: line 1: 'text' must be a valid str" in capsys.readouterr().err
    assert main(["eval", "mmhal", "--predictions", str(data_file("mmhal/response_template.json"))]) == 2
    assert "needs a judge" in capsys.readouterr().err


def test_cli_model_mode_pope_resumes(tmp_path, tiny, capsys):
    model, processor = tiny("llava")
    model.save_pretrained(tmp_path / "tiny")
    processor.save_pretrained(tmp_path / "tiny")
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (32, 32), (200, 30, 30) if name == "a.jpg" else (20, 20, 200)).save(images / name)
    questions = tmp_path / "coco_pope_popular.json"
    questions.write_text("".join(json.dumps({"question_id": i, "image": "ab"[i % 2] + ".jpg",
                                             "text": "Is there a dog in the image?", "label": "yes" if i < 3 else "no"})
                                 + "\n" for i in range(1, 6)))
    command = ["eval", "pope", "--model", str(tmp_path / "tiny"), "--questions", str(questions), "--images",
               str(images), "--out", str(tmp_path / "run"), "--max-new-tokens", "3", "--batch-size", "2",
               "--no-progress", "--limit", "3"]
    assert main(command) == 0
    assert len((tmp_path / "run" / "predictions.jsonl").read_text().splitlines()) == 3
    assert main(command[:-2]) == 0  # the full set: the first three come from disk
    records = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in records] == [1, 2, 3, 4, 5]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["splits"]["popular"]["n"] == 5
    assert main(command[:-2] + ["--max-new-tokens", "5"]) == 2
    assert "differs in: decoding" in capsys.readouterr().err
    (images / "b.jpg").unlink()
    assert main(command[:-2] + ["--out", str(tmp_path / "other")]) == 2
    assert "no image for question" in capsys.readouterr().err


def test_records_keep_method_stats_but_not_timings(tmp_path):
    from vlmkit.evals.cli import _early_exits
    from vlmkit.evals.runner import recorded_stats

    stats = {"visual_tokens_in": 576, "visual_tokens_by_layer": [576, 64], "prefill_s": 0.1, "decode_s": 0.2,
             "kept_visual_indices": [1, 2], "sgl_exit": True, "sgl_confidence": 0.97, "sgl_small_s": 0.05}
    assert recorded_stats(stats) == {"visual_tokens_in": 576, "visual_tokens_by_layer": [576, 64], "sgl_exit": True,
                                     "sgl_confidence": 0.97}
    lines = [json.dumps({"id": str(i), "sgl_exit": i % 4 == 0, "dyvte_exit_layer": 3}) for i in range(8)]
    (tmp_path / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    assert _early_exits(tmp_path) == {"sgl_exit": (2, 8)}
