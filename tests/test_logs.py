"""Progress output: plain lines (no carriage returns) when stderr is a file, as on a pod; metrics.jsonl."""

import json

from rdpo_jax import logs


def test_bar_prints_plain_lines_off_a_terminal(capsys):
    assert sum(logs.bar(range(5), desc="sample", unit="prompt")) == 10
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    # the first draw and the final one: redraws in between wait LOG_FILE_INTERVAL_S
    assert len(lines) == 2 and lines[0].startswith("sample: 0/5 [") and lines[1].startswith("sample: 5/5 [")
    assert "prompt/s" in lines[1]


def test_metric_logger_writes_jsonl_and_a_final_progress_line(tmp_path, capsys):
    logger = logs.MetricLogger(str(tmp_path), total_steps=20, start_step=0, tensorboard=False)
    logger.write(10, {"loss": 0.5})
    logger.progress(10, {"loss": 0.5})
    logger.write(20, {"loss": 0.25})
    logger.progress(20, {"loss": 0.25})
    logger.message("a note")
    logger.close()
    err = capsys.readouterr()
    assert "\r" not in err.err
    assert err.err.splitlines()[-1].startswith("train: 20/20 [") and "loss=0.25" in err.err.splitlines()[-1]
    assert "a note" in err.out + err.err
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["loss"]) for r in records] == [(10, 0.5), (20, 0.25)]
