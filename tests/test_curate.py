"""curate.py against the world's real oracle teacher server (data.py teacher, here in a thread of the test process): the
demonstrations it writes, every fault retried then counted, kill -9 and resume without a repeated paid call, the
difficulty filter against an independent count, bad images, 2 processes == 1."""

import asyncio
import json
import os
import shutil
import threading
import time

import pyarrow.parquet as pq
import pytest

import curate
import data
import verify
from helpers import ENV, ROOT, command, run

REASON = {"429": "429", "500": "5xx", "drop": "connection", "timeout": "timeout", "malformed": "malformed",
          "unformatted": "format"}


class Teacher:
    """data.serve_teacher in a thread for the length of a with-block: .url, .stats() (the server's own counts)."""

    def __init__(self, world_dir, **kw):
        self.server = data.serve_teacher(world_dir, **{"hang": 1.0, "retry_after": 0.01, **kw})
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def stats(self):
        import urllib.request
        return json.load(urllib.request.urlopen(self.url.rsplit("/v1", 1)[0] + "/stats"))


def args_for(url, *extra):
    return curate.parse_args(["--pool", "unused", "--out", "unused", "--samples", "0", "--teacher-url", url, "--timeout", "0.4",
                              "--backoff", "0.01", "--backoff-max", "0.02", *map(str, extra)])


def ask(examples, url, *extra, cache=None, path=os.devnull):
    """Every example to the teacher through curate.ask_teacher: ({where: answer or None}, the client's stats)."""
    args = args_for(url, *extra)
    jobs = [(lambda ex=ex: curate.teacher_request(ex, curate.TEACHER_SYSTEM_PROMPT, args, 0), {"where": ex.where})
            for ex in examples]
    stats = {"calls": 0, "cached": 0, "failed": 0, "failed_by_reason": {}, "retries": {}, "prompt_tokens": 0,
             "completion_tokens": 0}
    answers = asyncio.run(curate.ask_teacher(jobs, {} if cache is None else cache, path, args, stats))
    return {ex.where: a for ex, a in zip(examples, answers)}, stats


def test_the_oracle_writes_the_worlds_demonstration_for_every_image(world):
    """Each align and hard record (embedded bytes and image files) sent over HTTP comes back as the world's own teacher
    caption and reasoning: the scene table, the protocol and solve() agree with make_synthetic."""
    exs = data.read_examples(os.path.join(world[0], "align.parquet"), "prompt")[0] + \
        data.read_examples(os.path.join(world[0], "eval_hard.parquet"), "prompt")[0]
    with Teacher(world[0]) as t:
        answers, stats = ask(exs, t.url)
    assert stats["failed"] == 0 and stats["calls"] == len(exs) and stats["completion_tokens"] > 0
    for ex in exs:
        assert curate.normalise(answers[ex.where]) == (ex.teacher_caption, ex.teacher_cot)


def test_the_oracle_refuses_what_it_cannot_answer(world, tmp_path):
    """A question outside the world and an image outside its table are 400s: not retried, counted as failed."""
    from PIL import Image
    ex = data.read_examples(os.path.join(world[0], "align.parquet"), "prompt")[0][0]
    Image.new("RGB", (96, 96), (1, 2, 3)).save(tmp_path / "new.png")
    odd_q = data.Example(question="<image>\nWhat is the meaning of this?", images=ex.images, where="odd:0")
    odd_img = data.Example(question=ex.question, images=[str(tmp_path / "new.png")], where="odd:1")
    with pytest.raises(ValueError):
        data.solve("What is the meaning of this?", [(1, 1, "red", "circle")])
    with Teacher(world[0]) as t:
        answers, stats = ask([odd_q, odd_img], t.url)
    assert answers == {"odd:0": None, "odd:1": None}
    assert stats["failed"] == 2 and stats["retries"] == {"rejected": 2} == stats["failed_by_reason"] and stats["calls"] == 2


@pytest.mark.parametrize("kind", data.FAULTS)
def test_every_fault_is_retried_then_counted_as_failed(world, kind):
    exs = data.read_examples(os.path.join(world[0], "rl.parquet"), "prompt")[0][:2]
    with Teacher(world[0], error_rate=1.0, error_kinds=(kind,)) as t:
        answers, stats = ask(exs, t.url, "--max-retries", 2)
        server = t.stats()
    assert set(answers.values()) == {None}
    assert stats["calls"] == 6 and stats["failed"] == 2 and stats["retries"] == {REASON[kind]: 6}
    assert stats["failed_by_reason"] == {REASON[kind]: 2}
    assert server["faults"] == {kind: 6} and server["requests"] == 6


def test_faults_change_the_calls_but_not_the_answers(world):
    """Under a 50% fault rate of every kind (and a teacher that answers a quarter of the problems wrongly) the retries
    reach the same answers as a fault-free server's; the 429s wait at least their Retry-After."""
    exs = data.read_examples(os.path.join(world[0], "rl.parquet"), "prompt")[0]
    with Teacher(world[0], mistake_rate=0.25) as t:
        clean, _ = ask(exs, t.url)
    with Teacher(world[0], mistake_rate=0.25, error_rate=0.5) as t:
        faulty, stats = ask(exs, t.url, "--max-retries", 20, "--concurrency", 4)
        server = t.stats()
    assert faulty == clean and stats["failed"] == 0
    assert stats["calls"] == server["requests"] > len(exs) and sum(stats["retries"].values()) == stats["calls"] - len(exs)
    wrong = [w for w, a in clean.items() if not verify.reward(a, *next((e.answer, e.equivalents) for e in exs if e.where == w))["acc"]]
    assert 0 < len(wrong) < len(exs)  # the mistakes exist, and the clean-up will drop them


def test_read_jsonl_cuts_a_torn_last_line(tmp_path):
    path = str(tmp_path / "rank0.jsonl")
    with open(path, "w") as f:
        f.write('{"key": "a", "answer": "x"}\n{"key": "b", "answer": "y"}\n{"key": "c", "ans')
    torn = open(path).read()
    assert [r["key"] for r in curate.read_jsonl(path, repair=False)] == ["a", "b"] and open(path).read() == torn  # another
    assert [r["key"] for r in curate.read_jsonl(path)] == ["a", "b"]  # rank's file is only read; one's own is cut
    with open(path, "a") as f:
        f.write('{"key": "d", "answer": "z"}\n')
    assert [r["key"] for r in curate.read_jsonl(path)] == ["a", "b", "d"]
    with open(path, "a") as f:
        f.write('garbage\n{"key": "e", "answer": "w"}\n')
    with pytest.raises(SystemExit, match="rank0.jsonl:3"):
        curate.read_jsonl(path)


def test_normalise_gives_the_students_template():
    messy = "  <caption>  - a red circle \n\n  - text: 3\n</caption>\n\n<think>first\n\n  second  </think> <answer>  4 </answer> "
    assert curate.normalise(messy) == ("<caption>\n- a red circle\n- text: 3\n</caption>",
                                       "<think>\nfirst\nsecond\n</think>\n<answer>4</answer>")


def curate_args(world, pool, out, url, *extra):
    return ["--pool", pool, "--out", out, "--teacher-url", url, "--timeout", "2", "--backoff", "0.01", "--backoff-max", "0.05",
            "--processor", os.path.join(world[0], "processor"), *map(str, extra)]


def test_kill_9_and_resume_repeats_no_paid_call_and_writes_what_an_uninterrupted_run_writes(world, tmp_path):
    import subprocess
    pool = os.path.join(world[0], "rl.parquet")
    n = len(data.read_examples(pool, "prompt")[0])
    with Teacher(world[0], latency=0.15, mistake_rate=0.25, error_rate=0.2, error_kinds=("429", "500", "drop")) as t:
        ref = str(tmp_path / "ref")
        run("curate.py", *curate_args(world, pool, ref, t.url, "--samples", 0))
        out = str(tmp_path / "out")
        cache = os.path.join(out, "cache", "rank0.jsonl")
        proc = subprocess.Popen(command("curate.py", curate_args(world, pool, out, t.url, "--samples", 0, "--concurrency", 1)),
                                cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while (not os.path.exists(cache) or open(cache).read().count("\n") < 3) and time.time() < deadline:
            time.sleep(0.005)
        proc.kill()
        proc.wait()
        done = {r["where"] for r in curate.read_jsonl(cache)}
        assert 3 <= len(done) < n, "the kill came too late"
        assert not os.path.exists(os.path.join(out, "run_config.json"))
        exs = {e.where: e for e in data.read_examples(pool, "prompt")[0]}
        q = lambda w: exs[w].question.split("\n", 1)[1]  # noqa: E731  the question text the server counts by
        before = t.stats()["by_question"]
        r = run("curate.py", *curate_args(world, pool, out, t.url, "--samples", 0))
        after = t.stats()["by_question"]
    assert all(after[q(w)] == before[q(w)] for w in done), "a cached problem was asked again"
    assert "calls" in r.stdout and f"{len(done)} cached" in r.stdout
    for name in ("align.parquet", "sft.jsonl"):
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(ref, name), "rb").read()
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["teacher_cached"] == len(done) and summary["demonstrations"] + summary["drops_by_reason"]["wrong_answer"] == n


def test_the_difficulty_filter_keeps_what_the_policy_cannot_solve(world, tiny_dirs, tmp_path):
    """A scripted policy (tests/patched.py mixed: sample k answers str(k) for even k) solves exactly the problems whose
    gold is an even number below k: the pass rates, the kept set and its order follow from that alone. The SFT
    records load as SFT data, and align.py's reader takes the parquet. (The small world's alignment split has golds
    the script solves and golds it does not.)"""
    pool = os.path.join(world[0], "align.parquet")
    exs = data.read_examples(pool, "prompt")[0]
    k = 4
    fake = lambda j: f"<caption>\n- x\n</caption>\n<think>\nx\n</think>\n<answer>{j}</answer>"  # noqa: E731
    want = {e.where: sum(int(verify.reward(fake(j), e.answer, e.equivalents)["acc"]) for j in range(0, k, 2)) for e in exs}
    assert 0 < sum(v == 0 for v in want.values()) < len(exs)
    out = str(tmp_path / "cur")
    with Teacher(world[0]) as t:
        run("curate.py", *curate_args(world, pool, out, t.url, "--policy", tiny_dirs[0], "--samples", k,
                                       "--max-pass", 0.25, "--batch-size", 3), env={"PATCH_GENERATE": "mixed"})
    rates = {r["where"]: r["correct"] for r in map(json.loads, open(os.path.join(out, "pass_rates.jsonl")))}
    assert rates == want
    rows = pq.read_table(os.path.join(out, "align.parquet")).to_pylist()
    kept = sorted((w for w in want if want[w] / k <= 0.25), key=lambda w: (want[w], int(w.rsplit(":", 1)[1])))
    assert [f"{pool}:{r['extra_info']['index']}" for r in rows] == kept  # hardest first, the teacher dropped none
    assert [r["pass_rate"] for r in rows] == [want[w] / k for w in kept]
    sft = data.read_examples(os.path.join(out, "sft.jsonl"), "sft")[0]
    aligned = data.read_examples(os.path.join(out, "align.parquet"), "prompt", require=("teacher_caption", "teacher_cot"))[0]
    assert [s.response for s in sft] == [a.teacher_response for a in aligned] == [r["teacher_response"] for r in rows]
    assert all(open(s.images[0], "rb").read() == a.images[0]["bytes"] for s, a in zip(sft, aligned))


def test_a_resumed_difficulty_pass_samples_what_it_would_have(world, tiny_dirs, tmp_path):
    """The real tiny policy's samples are a function of (seed, rank, batch): drop the last finished batch and tear the
    line before it, and the re-run writes the same pass rates (and so the same kept set)."""
    pool = os.path.join(world[0], "rl.parquet")
    out = str(tmp_path / "cur")
    extra = ("--policy", tiny_dirs[0], "--samples", 2, "--max-pass", 1, "--batch-size", 3, "--max-new-tokens", 48,
             "--temperature", 2.0)
    with Teacher(world[0]) as t:
        run("curate.py", *curate_args(world, pool, out, t.url, *extra))
        first = open(os.path.join(out, "pass_rates.jsonl")).read()
        path = os.path.join(out, "difficulty", "rank0.jsonl")
        lines = open(path).read().splitlines()
        assert len(lines) == 3
        with open(path, "w") as f:
            f.write(lines[0] + "\n" + lines[1][:5])
        os.remove(os.path.join(out, "run_config.json"))
        run("curate.py", *curate_args(world, pool, out, t.url, *extra))
    assert open(os.path.join(out, "pass_rates.jsonl")).read() == first
    assert len(open(path).read().splitlines()) == 3


def test_a_bad_image_names_its_record_or_is_skipped_and_counted(world, tmp_path):
    rows = pq.read_table(os.path.join(world[0], "rl.parquet")).to_pylist()
    rows[1]["images"] = [{"bytes": b"\x89PNG\r\n\x1a\n not an image", "path": "broken.png"}]
    pool = str(tmp_path / "pool.parquet")
    data.write_parquet(pool, rows)
    with Teacher(world[0]) as t:
        r = run("curate.py", *curate_args(world, pool, str(tmp_path / "a"), t.url, "--samples", 0), check=False)
        assert r.returncode != 0 and f"{pool}:1: cannot decode image" in r.stderr
        run("curate.py", *curate_args(world, pool, str(tmp_path / "b"), t.url, "--samples", 0, "--skip-bad"))
    s = json.load(open(str(tmp_path / "b" / "summary.json")))
    assert s["drops_by_reason"]["bad_record"] == 1 and s["usable"] == len(rows) - 1 and s["sent_to_teacher"] == len(rows) - 1


def test_two_processes_write_what_one_writes(world, tmp_path):
    pool = os.path.join(world[0], "rl.parquet")
    with Teacher(world[0], mistake_rate=0.25, error_rate=0.3, error_kinds=("500", "drop", "malformed")) as t:
        run("curate.py", *curate_args(world, pool, str(tmp_path / "one"), t.url, "--samples", 0))
        run("curate.py", *curate_args(world, pool, str(tmp_path / "two"), t.url, "--samples", 0), nproc=2)
    assert sorted(os.listdir(tmp_path / "two" / "cache")) == ["rank0.jsonl", "rank1.jsonl"]
    for name in ("align.parquet", "sft.jsonl"):
        assert open(tmp_path / "one" / name, "rb").read() == open(tmp_path / "two" / name, "rb").read()
    shutil.rmtree(tmp_path / "one")
