"""benchmarks/step_worker.py: the JSON-lines protocol the cross-library benchmarks drive both workers with."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# A worker whose setup and build print to stdout, as libraries do: the replies must stay parseable.
WORKER = textwrap.dedent("""
    import torch
    from step_worker import serve

    def setup(request):
        print("a library's chatter on stdout")
        return {"threads": torch.get_num_threads()}

    def build(request):
        model = torch.nn.Linear(4, 3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(request["rows"], 4)

        def step():
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()

        print("building", request["key"])
        return step, sum(p.numel() for p in model.parameters()), {"rows": request["rows"]}

    serve(setup, build)
""")


def converse(requests: list[dict]) -> list[dict]:
    lines = "".join(json.dumps(r) + "\n" for r in requests)
    done = subprocess.run([sys.executable, "-c", WORKER], input=lines, capture_output=True, text=True,
                          cwd=BENCHMARKS, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "building" in done.stderr  # redirected, not lost
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_replies_one_line_per_request_and_keeps_library_output_out_of_them():
    replies = converse([{"op": "setup"}, {"op": "build", "key": "a", "rows": 8}, {"op": "time", "key": "a", "steps": 3},
                        {"op": "peak", "key": "a"}, {"op": "quit"}, {"op": "time", "key": "a", "steps": 1}])
    assert len(replies) == 4  # nothing after quit
    setup, build, timed, peak = replies
    assert setup["threads"] >= 1  # and setup's print went to stderr, or this line would not parse
    assert build == {"key": "a", "trainable": 15, "rows": 8}
    assert len(timed["seconds"]) == 3 and all(s > 0 for s in timed["seconds"])
    assert isinstance(peak["bytes"], int) and peak["bytes"] >= 0


def test_a_failed_request_is_an_error_reply_and_the_worker_goes_on():
    replies = converse([{"op": "time", "key": "never built", "steps": 1}, {"op": "resize"},
                        {"op": "build", "key": "b", "rows": 2}])
    assert replies[0]["error"].startswith("KeyError")
    assert "unknown op 'resize'" in replies[1]["error"] and "setup, build, time, peak or quit" in replies[1]["error"]
    assert replies[2]["trainable"] == 15
