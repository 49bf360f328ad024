"""Verification campaigns (celerinfer_lab/campaign.py, `celerinfer-lab campaign`) on a small Dask LocalCluster.

One cluster of 2 worker processes for the file; each worker compiles each C++ folder once. The correct C++
passes a small campaign; a catalogue fault patched into a copy is found, shrunk and reproduced by the
written command; a worker killed mid-campaign loses no row; a second run resumes from the output file.
"""

from __future__ import annotations

import os
import shlex
import signal
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from celerinfer_lab.campaign import (
    CampaignSpec,
    Case,
    LocalDask,
    applicable_faults,
    draw_case,
    op_kind,
    read_rows,
    run_campaign,
    summarize,
)
from celerinfer_lab.cli import main
from celerinfer_lab.faults import FAULTS, apply_fault
from celerinfer_lab.native import DEFAULT_CPP_DIR

FAST = ("fast",)


@pytest.fixture(scope="module")
def client():
    with LocalDask(2, dashboard_address=None) as dask:
        yield dask.client


@pytest.fixture(scope="module")
def faulty_cpp(tmp_path_factory):
    """A copy of cpp/ with the readable RMSNorm ignoring its weight (a catalogue fault, by text)."""
    return apply_fault(FAULTS["rmsnorm_weight_ignored"], DEFAULT_CPP_DIR, tmp_path_factory.mktemp("cpp") / "cpp")


def test_draw_is_deterministic_and_covers_the_space():
    assert draw_case(3, 17) == draw_case(3, 17)
    assert Case.from_json(draw_case(3, 17).to_json()) == draw_case(3, 17)
    assert draw_case(3, 17) != draw_case(4, 17) and draw_case(3, 17) != draw_case(3, 18)
    seen: dict[str, Counter] = {}
    for i in range(300):
        case = draw_case(0, i, decode=3)
        case.model_config().validate(seq_len=case.seq_len + case.decode)
        for key, value in case.features().items():
            seen.setdefault(key, Counter())[value] += 1
    assert set(seen["padding"]) == {"none", "left", "right", "mixed"}
    assert set(seen["rope_pairing"]) == {"half", "interleaved"}
    assert set(seen["yarn"]) == {"off", "minimind", "transformers"}
    assert set(seen["topk_renorm"]) == {"-", "always", "k>1", "never"}
    assert set(seen["weights"]) == {"f32", "bf16", "q8"} and set(seen["decode"]) == {0, 1, 2, 3}
    assert {True, False} <= set(seen["tied"]) and {True, False} <= set(seen["qk_norm"])
    assert {0, 1, 2} <= set(seen["shared_experts"]) and 80 in seen["head_dim"]
    assert any(h % 8 for h in seen["hidden"]) and max(seen["batch"]) == 4


def test_applicable_faults_follow_the_catalogue():
    case = draw_case(0, 0)
    names = applicable_faults(case, ("readable", "fast"))
    assert names and all(set(FAULTS[n].kernels) & {"readable", "fast"} for n in names)
    assert not applicable_faults(case, ("q8",), ["gqa_modulo"])  # a readable/fast fault: not on q8 alone
    no_moe = next(draw_case(0, i) for i in range(50) if not draw_case(0, i).config.get("use_moe"))
    assert "moe_topk_not_renormalised" not in applicable_faults(no_moe, ("fast",))


def test_small_campaign_on_the_correct_cpp_passes(client, tmp_path):
    out = tmp_path / "results.parquet"
    result = run_campaign(CampaignSpec(configs=6, kernels=("readable", "fast")), out=out, client=client)
    rows = read_rows(out)
    assert len(rows) == 12 and set(rows["verdict"]) == {"pass"}, rows[rows["verdict"] != "pass"][["culprit", "error"]]
    assert (rows["worst_ratio"] < 10).all() and not result.failures and result.workers == 2
    summary = summarize(rows)
    assert summary.by_kernels["pass_rate"].tolist() == [1.0, 1.0] and summary.faults is None
    assert "failures: none" in summary.to_text()


def test_a_patched_bug_is_found_shrunk_and_reproduced(client, tmp_path, faulty_cpp, capsys):
    out = tmp_path / "results.parquet"
    spec = CampaignSpec(configs=2, kernels=("readable",), cpp_dir=str(faulty_cpp))
    result = run_campaign(spec, out=out, client=client, progress=False)
    assert len(result.failures) == 2 and len(result.reproductions) == 2
    row = result.failures[0]
    drawn, shrunk = draw_case(0, row["index"]), Case.from_json(row["shrunk"])
    assert op_kind(row["shrunk_culprit"]) == op_kind(row["culprit"]) == "input_layernorm"
    assert shrunk.config["num_hidden_layers"] == 1 and shrunk.batch == 1 and shrunk.seq_len == 1
    assert shrunk.config["hidden_size"] < drawn.config["hidden_size"] or drawn.config["hidden_size"] == 8
    words = shlex.split(row["repro"])
    assert words[:2] == ["celerinfer-lab", "compare"] and str(faulty_cpp) in words
    capsys.readouterr()
    assert main(words[1:] + ["--precision", "off"]) == 1  # the written reproduction fails...
    culprits = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.endswith("culprit")]
    assert culprits == [row["shrunk_culprit"]]  # ...with the same culprit
    assert main([words[1], words[2], "--kernels", "readable", "--precision", "off"]) == 0  # the correct C++ agrees


def test_the_fault_catalogue_mode_scores_the_debugger(client, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # without --out the shrunk models go to ./campaign_failures
    spec = CampaignSpec(configs=1, kernels=FAST, faults=True, fault_names=("fast_attention_scale",), decode=0)
    result = run_campaign(spec, client=client, progress=False)
    assert len(result.rows) == 1 and result.rows[0]["fault"] == "fast_attention_scale"
    assert [Path(path).parent.resolve() for path, _ in result.reproductions] == [tmp_path / "campaign_failures"]
    table = summarize(result.rows).faults
    assert table is not None and table.loc["fast_attention_scale", "found"] == 1.0
    assert table.loc["fast_attention_scale", "localized"] == 1.0 and table.loc["ALL", "runs"] == 1


def test_killing_a_worker_loses_no_result(client, tmp_path):
    out = tmp_path / "results.parquet"
    pids = client.run(os.getpid)  # worker address -> its process
    killed: list[int] = []
    held: list[int] = []  # tasks the killed worker held when it died

    def kill_one(rows):
        if not killed:  # after the first result, a worker that holds tasks
            address, tasks = max(client.processing().items(), key=lambda item: len(item[1]))
            held.append(len(tasks))
            killed.append(pids[address])
            os.kill(pids[address], signal.SIGKILL)

    result = run_campaign(CampaignSpec(configs=8, kernels=FAST, seed=5), out=out, client=client, on_result=kill_one)
    rows = read_rows(out)
    assert killed and held[0] > 0, "the killed worker held no task: the test proved nothing"
    assert sorted(rows["index"]) == list(range(8)) and set(rows["seed"]) == {5}
    assert set(rows["verdict"]) == {"pass"} and result.ran == 8


def test_resume_skips_done_rows(client, tmp_path):
    out = tmp_path / "results.parquet"
    first = run_campaign(CampaignSpec(configs=3, kernels=FAST, decode=0), out=out, client=client, progress=False)
    assert (first.ran, first.skipped) == (3, 0)
    again = run_campaign(CampaignSpec(configs=5, kernels=FAST, decode=0), out=out, client=client, progress=False)
    assert (again.ran, again.skipped) == (2, 3)
    rows = read_rows(out)
    assert sorted(rows["index"]) == [0, 1, 2, 3, 4]
    other = run_campaign(CampaignSpec(configs=1, kernels=FAST, seed=9, decode=0), out=out, client=client)
    assert (other.ran, other.skipped) == (1, 0)  # another seed's rows are other rows
    assert len(read_rows(out)) == 6


def test_report_and_plot(client, tmp_path, capsys):
    out = tmp_path / "results.parquet"
    run_campaign(CampaignSpec(configs=2, kernels=FAST, decode=0), out=out, client=client, progress=False)
    plot = tmp_path / "margins.png"
    assert main(["campaign", "--report", str(out), "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert "pass rate per kernel set" in text and "tolerance margin" in text and plot.stat().st_size > 1000


def test_a_campaigns_own_cluster_leaves_this_process_environment_alone(tmp_path, monkeypatch):
    """Dask's nanny writes OMP_NUM_THREADS=1 (and more) into the process that starts its workers, and
    leaves it: after a campaign every later subprocess of the session ran torch on one thread (in the
    full suite, test_train's CLI training then no longer matched the same training in this process)."""
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(key, raising=False)
    before = dict(os.environ)
    with LocalDask(1, dashboard_address=None) as dask:
        assert os.environ.get("OMP_NUM_THREADS") == "1"  # the nanny's doing, which LocalDask undoes
        assert dask.client.submit(os.getpid, pure=False).result() != os.getpid()
    assert dict(os.environ) == before
    result = run_campaign(CampaignSpec(configs=1, kernels=FAST, decode=0), workers=1, progress=False, log=print)
    assert result.ran == 1 and result.workers == 1 and dict(os.environ) == before


@pytest.mark.parametrize(
    "argv,words",
    [
        (["campaign"], "--configs"),
        (["campaign", "--configs", "0"], "--configs 0"),
        (["campaign", "--configs", "2", "--workers", "-1"], "--workers -1"),
        (["campaign", "--configs", "2", "--scheduler", "tcp://x:1", "--workers", "2"], "--scheduler and --workers"),
        (["campaign", "--configs", "2", "--out", "r.csv"], "parquet"),
        (["campaign", "--configs", "2", "--decode", "-1"], "--decode -1"),
        (["campaign", "--configs", "2", "--fault-names", "nosuch"], "unknown fault 'nosuch'"),
        (["campaign", "--configs", "2", "--cpp-dir", "/nonexistent"], "no include/celerinfer"),
        (["campaign", "--configs", "2", "--kernels", "fast,nosuch"], "no kernel set 'nosuch'; this build has readable"),
        (["campaign", "--configs", "2", "--kernels", ","], "no kernel set ''"),
        (["campaign", "--report", "/nonexistent.parquet"], "no such results file"),
        (["compare", "--decode", "-2", "x.json"], "x.json"),
    ],
)
def test_bad_flags_exit_2(argv, words, capsys):
    assert main(argv) == 2
    assert words in capsys.readouterr().err


def test_a_scheduler_that_does_not_answer_is_named():
    from celerinfer_lab.errors import UsageError

    with pytest.raises(UsageError, match="--scheduler tcp://127.0.0.1:9: no Dask scheduler answers"):
        run_campaign(CampaignSpec(configs=1), scheduler="tcp://127.0.0.1:9", connect_timeout=1, progress=False)


def test_report_rejects_a_file_that_is_not_results(tmp_path, capsys):
    bad = tmp_path / "r.parquet"
    bad.write_text("not parquet")
    assert main(["campaign", "--report", str(bad)]) == 2
    assert "not a campaign results file" in capsys.readouterr().err
    empty = tmp_path / "e.parquet"
    pd.DataFrame({"fault": []}).to_parquet(empty)
    assert main(["campaign", "--report", str(empty)]) == 2
    assert "no rows" in capsys.readouterr().err


@pytest.mark.campaign_long
def test_200_configs_on_a_local_cluster_find_no_failure(tmp_path, capsys):
    """The issue's campaign: 200 configs, readable and fast, decode up to 2, one worker per core."""
    out = tmp_path / "results.parquet"
    assert main(["campaign", "--configs", "200", "--out", str(out)]) == 0, capsys.readouterr().out[-3000:]
    rows = read_rows(out)
    assert sorted(set(rows["index"])) == list(range(200)) and set(rows["verdict"]) == {"pass"}
