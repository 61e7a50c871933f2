"""``kotune eval --compare`` shows a change only where both reports measured the same thing: other held-out rows,
other tokens for them (another tokenizer) or other multiple-choice items read "not comparable", with the reason."""

from __future__ import annotations

from kotune.evaluation.tables import markdown, not_comparable


def report(name: str, data: str = "heldout.jsonl", rows: int = 3, sha: str = "a", items: int = 10) -> dict:
    generation = {"stop_rate": 0.5, "loop_rate": 0.1}
    choice = {"file": "ko.jsonl", "items": items, "acc": 0.4, "acc_norm": 0.5, "by_subject": {}}
    loss = {"loss": 2.0, "perplexity": 7.4}
    return {"model": {"name": name}, "data": data, "rows": [{}] * rows, "examples_sha256": sha, "loss": loss,
            "generation": generation, "choice": choice}  # fmt: skip


def test_the_same_rows_and_items_are_compared():
    assert not_comparable(report("adapter"), report("base")) == {}
    assert "not comparable" not in markdown(report("adapter"), report("base"))


def test_other_rows_tokens_or_items_are_not_compared_and_say_why():
    other_data = not_comparable(report("adapter", data="other.jsonl", rows=5, sha="b"), report("base"))
    assert other_data == {"heldout": "other held-out rows or tokens (data heldout.jsonl vs other.jsonl, 3 vs 5 rows)"}
    other_tokens = not_comparable(report("adapter", sha="b"), report("base"))
    assert other_tokens == {"heldout": "other held-out rows or tokens (another tokenizer or template)"}
    table = markdown(report("adapter", sha="b", items=20), report("base"))
    changes = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[-1].rstrip(" |") for line in table.splitlines()}
    assert changes["loss (held-out rows)"] == changes["multiple choice acc"] == "not comparable"
    assert "Not comparable: other multiple-choice items (10 items of ko.jsonl vs 20 of ko.jsonl)." in table


def test_a_written_report_names_no_folder_of_this_machine(tmp_path):
    import json

    from kotune.evaluation.tables import write_report

    mine = report("adapter", data="/home/me/data/heldout.jsonl (validation split)")
    mine["model"]["path"], mine["choice"]["file"] = "/home/me/runs/ko-demo", "/home/me/eval/ko.jsonl"
    written = json.loads((write_report(tmp_path, mine).parent / "eval_report.json").read_text(encoding="utf-8"))
    assert (written["model"]["path"], written["data"]) == ("ko-demo", "heldout.jsonl (validation split)")
    assert written["choice"]["file"] == "ko.jsonl" and "/home/me" not in json.dumps(written)
