"""``llmq eval tasks``: lm-evaluation-harness on the model llmq loads, offline, on a local task.

The task (tests/data/tasks/llmq_local_choice.yaml) is an ordinary lm-eval YAML task whose data is
a local JSON-lines file, so the command takes the same path as a hub task: lm-eval's task index,
``datasets``' json builder, ``HFLM`` and ``simple_evaluate``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmq.errors import TaskError, UsageError
from llmq.runtime.eval import tasks as T

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "tests" / "data" / "tasks"
TASK = "llmq_local_choice"
DOCS_IN_TASK = 40


@pytest.fixture
def in_repo(monkeypatch):
    """The task's data_files path is relative: ``datasets`` reads it from the current directory."""
    monkeypatch.chdir(REPO)


def _tasks_json(cli, model: str, *extra: str) -> dict:
    result = cli("eval", "tasks", model, "--tasks", TASK, "--include-path", str(TASKS_DIR), "--json", "-q", *extra)
    assert result.code == 0, result.stderr
    assert result.stderr == ""  # -q: no logs, and no bars from lm-eval or datasets
    return json.loads(result.stdout)


def _metrics(row: dict) -> dict[str, dict]:
    return {m["metric"]: m for m in row["metrics"] if m["filter"] == "none"}


@pytest.mark.slow
def test_demo_accuracy_equals_lm_eval_run_on_the_demo_folder(cli, demo_cache, monkeypatch, in_repo):
    monkeypatch.setenv("LLMQ_CACHE_DIR", str(demo_cache))
    doc = _tasks_json(cli, "demo", "--limit", "8", "--device", "cpu", "--dtype", "fp32")
    assert doc["command"] == "eval tasks" and doc["model"]["kind"] == "demo"
    assert "dequantized from the Q4_1 GGUF" in doc["model"]["label"]
    assert (doc["device"], doc["dtype"], doc["backend"]) == ("cpu", "fp32", None)
    assert doc["protocol"]["limit"] == 8 and doc["protocol"]["tasks"] == [TASK]
    (row,) = doc["results"]
    assert (row["task"], row["kind"], row["samples"], row["samples_total"]) == (TASK, "task", 8, DOCS_IN_TASK)

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from llmq.runtime.sources import demo

    direct = HFLM(pretrained=str(demo.ensure_demo_model(progress=False)), device="cpu", dtype="float32", batch_size=1)
    output = lm_eval.simple_evaluate(
        model=direct, tasks=[TASK], limit=8, task_manager=TaskManager(include_path=str(TASKS_DIR))
    )
    expected = output["results"][TASK]
    ours = _metrics(row)
    for metric in ("acc", "acc_norm"):
        assert ours[metric]["value"] == expected[f"{metric},none"], metric
        assert ours[metric]["stderr"] == pytest.approx(expected[f"{metric}_stderr,none"]), metric
    # Simple facts a 135M instruct model mostly knows: well above the 0.25 of guessing.
    assert ours["acc"]["value"] >= 0.5


def test_an_artifact_scores_a_share_of_the_documents(cli, tiny_artifact, in_repo):
    doc = _tasks_json(cli, str(tiny_artifact), "--limit", "6", "--batch-size", "2")
    assert doc["model"]["kind"] == "artifact" and doc["backend"] == "torch"
    assert doc["protocol"]["batch_size"] == 2 and doc["protocol"]["lm_eval_version"]
    (row,) = doc["results"]
    assert (row["samples"], row["samples_total"], row["num_fewshot"]) == (6, DOCS_IN_TASK, 0)
    acc = _metrics(row)["acc"]
    assert 0.0 <= acc["value"] <= 1.0 and acc["higher_is_better"] is True
    assert acc["value"] * 6 == pytest.approx(round(acc["value"] * 6))  # a count of right answers
    assert acc["stderr"] is not None and acc["stderr"] >= 0


def test_without_json_a_table_goes_to_stdout_and_logs_to_stderr(cli, tiny_model, in_repo):
    result = cli("eval", "tasks", str(tiny_model), "--tasks", TASK, "--include-path", str(TASKS_DIR), "--limit", "4")
    assert result.code == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith(TASK)]
    assert [row[1] for row in rows] == ["acc", "acc_norm"] and all(row[-1] == f"4/{DOCS_IN_TASK}" for row in rows)
    assert "lm-eval 0.4" in result.stdout and "first 4 documents" in result.stdout
    assert "model: local folder" in result.stderr and "%|" not in result.stderr  # no bars off a terminal


def test_the_library_call_returns_typed_results(tiny_model, in_repo):
    import llmq

    lines: list[str] = []
    report = llmq.evaluate_tasks(
        tiny_model, TASK, limit=3, include_path=TASKS_DIR, options=llmq.LoadOptions(device="cpu"),
        feedback=llmq.Feedback(info=lines.append, warn=lines.append),
    )  # fmt: skip
    acc = report.task(TASK).metric("acc")
    assert 0.0 <= acc.value <= 1.0 and report.task(TASK).samples == 3
    assert report.to_json()["results"][0]["metrics"][0] == acc.to_json()
    assert any(line.startswith("model: local folder") for line in lines)


def test_a_stop_lands_before_the_next_decoder_layer_of_the_harness(tiny_model, in_repo):
    """lm-eval's loop is the harness's, so llmq checks before every decoder layer of the model it
    hands over: a stop asked for during the scoring ends it there, with KeyboardInterrupt."""
    import contextlib

    import llmq

    checks = []

    def check():
        checks.append(1)
        if len(checks) == 3:  # inside the first forward pass of the harness
            raise KeyboardInterrupt

    feedback = llmq.Feedback(stoppable=lambda: contextlib.nullcontext(check))
    with pytest.raises(KeyboardInterrupt):
        llmq.evaluate_tasks(tiny_model, TASK, limit=3, include_path=TASKS_DIR, feedback=feedback,
                            options=llmq.LoadOptions(device="cpu"))  # fmt: skip
    assert len(checks) == 3


def test_a_group_reports_its_aggregate_and_its_tasks(tiny_model, tmp_path, in_repo):
    shutil.copy(TASKS_DIR / f"{TASK}.yaml", tmp_path)
    (tmp_path / "group.yaml").write_text(
        f"group: llmq_local_group\ntask: [{TASK}]\naggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n"
    )
    report = T.evaluate_tasks(tiny_model, "llmq_local_group", limit=3, include_path=tmp_path)
    group, task = report.task("llmq_local_group"), report.task(TASK)
    assert (group.kind, group.samples, task.kind, task.samples) == ("group", None, "task", 3)
    assert group.metric("acc").value == task.metric("acc").value  # one task: its own mean


def test_missing_lm_eval_names_the_extra(cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` meets when it is not installed
    result = cli("eval", "tasks", "demo", "--tasks", TASK)
    assert result.code == 1 and result.stdout == ""
    assert "pip install 'llmq[tasks]'" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(TaskError, match=r"llmq\[tasks\]"):
        T.evaluate_tasks("demo", [TASK])


def test_unknown_task_is_a_usage_error_before_the_model_loads(cli, tiny_model):
    result = cli("eval", "tasks", str(tiny_model), "--tasks", "llmq_local_choise", "--include-path", str(TASKS_DIR))
    assert result.code == 2 and result.stdout == ""
    assert "unknown task 'llmq_local_choise'" in result.stderr and "did you mean llmq_local_choice" in result.stderr
    assert "Traceback" not in result.stderr and "model:" not in result.stderr


def test_missing_task_data_is_an_error_before_the_model_loads(cli, tiny_model, tmp_path):
    text = (TASKS_DIR / f"{TASK}.yaml").read_text()
    (tmp_path / "gone.yaml").write_text(
        text.replace(f"task: {TASK}", "task: llmq_gone").replace(f"tests/data/tasks/{TASK}.jsonl", "/no/such.jsonl")
    )
    result = cli("eval", "tasks", str(tiny_model), "--tasks", "llmq_gone", "--include-path", str(tmp_path))
    assert result.code == 1 and "the data of task 'llmq_gone' cannot be loaded" in result.stderr
    assert "Traceback" not in result.stderr and "model:" not in result.stderr


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": "a,,b"}, "empty name"),
        ({"tasks": []}, "empty name"),
        ({"tasks": "a,b,a"}, "names a more than once"),
        ({"tasks": "a", "limit": 0}, "--limit 0"),
        ({"tasks": "a", "batch_size": 0}, "--batch-size 0"),
        ({"tasks": "a", "include_path": "/no/such/folder"}, "does not exist"),
    ],
)
def test_the_request_is_checked_first(kwargs, message):
    with pytest.raises(UsageError, match=message):
        T.evaluate_tasks("./no-such-model", **kwargs)


def test_task_names_parse_from_a_string_or_a_list():
    assert T.parse_task_names(" arc_easy , piqa") == ["arc_easy", "piqa"]
    assert T.parse_task_names(["hellaswag"]) == ["hellaswag"]


def test_importing_the_command_loads_neither_lm_eval_nor_datasets():
    code = (
        "import sys, llmq.runtime.eval.tasks, llmq.cli.eval_tasks; "
        "print('lm_eval' in sys.modules, 'datasets' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_results_are_read_with_their_stderr_and_groups():
    output = {
        "results": {
            "grp": {"alias": "grp", "acc,none": 0.5, "acc_stderr,none": "N/A"},
            "t1": {"alias": " - t1", "acc,none": 0.25, "acc_stderr,none": 0.1, "sample_len": 4},
        },
        "group_subtasks": {"grp": ["t1"], "t1": []},
        "n-samples": {"t1": {"original": 10, "effective": 4}},
        "n-shot": {"t1": 0},
        "versions": {"t1": 1.0},
        "higher_is_better": {"t1": {"acc": True}},
    }
    group, task = T.read_results(output)
    assert (group.name, group.kind, group.samples, group.metric("acc").stderr) == ("grp", "group", None, None)
    assert (task.alias, task.kind, task.samples, task.samples_total, task.version) == ("t1", "task", 4, 10, "1.0")
    assert task.metric("acc") == T.TaskMetric("acc", "none", 0.25, 0.1, True)
    with pytest.raises(KeyError, match="has no metric f1,none"):
        task.metric("f1")
